//! The fenced write against a real PostgreSQL server, started by this test binary on
//! 127.0.0.1 (one for all the tests here; each test works in a schema of its own).
#![cfg(feature = "postgres")]

#[allow(dead_code)] // each backend uses what its types allow
mod scenarios;

use std::sync::OnceLock;

use leasehold_core::resource::HighWater;
use leasehold_core::wire::{Fence, OwnerId};
use leasehold_fence_sql::{postgres as fenced, FenceError};
use leasehold_test_servers::Postgres;
use postgres::{Client, IsolationLevel, NoTls};
use scenarios::{Db, A, B};

/// The binary's server. Never dropped (statics are not), so it stops when this process
/// exits: see [`Postgres`].
fn server() -> &'static Postgres {
    static SERVER: OnceLock<Postgres> = OnceLock::new();
    SERVER.get_or_init(leasehold_test_servers::postgres)
}

struct Pg {
    schema: String,
    client: Client,
}

impl Pg {
    /// A fresh schema `name` with the caller's tables and the fence table.
    fn new(name: &str) -> Pg {
        let mut admin = Client::connect(&server().config(), NoTls).unwrap();
        admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}")).unwrap();
        let mut db = Pg { client: connect(name), schema: name.to_owned() };
        fenced::create_table(&mut db.client).unwrap();
        db.client
            .batch_execute(
                "CREATE TABLE counter (id INT PRIMARY KEY, value BIGINT NOT NULL);
                 INSERT INTO counter VALUES (1, 0);
                 CREATE TABLE log (seq BIGSERIAL PRIMARY KEY, fence BIGINT NOT NULL);",
            )
            .unwrap();
        db
    }
}

fn connect(schema: &str) -> Client {
    let config = format!("{} options='-c search_path={schema}'", server().config());
    Client::connect(&config, NoTls).unwrap_or_else(|e| panic!("connect to {config}: {e}\n{}", server().log()))
}

/// The counter's read-modify-write and the log append, in `tx`. A plain read, no lock of its
/// own: only the fence row's lock keeps two of these from losing an update.
fn increment(tx: &mut postgres::Transaction<'_>, fence: Fence) -> Result<i64, postgres::Error> {
    scenarios::widen_races();
    let value: i64 = tx.query_one("SELECT value FROM counter WHERE id = 1", &[])?.get(0);
    scenarios::widen_races();
    tx.execute("UPDATE counter SET value = $1 WHERE id = 1", &[&(value + 1)])?;
    tx.execute("INSERT INTO log (fence) VALUES ($1)", &[&(fence.0 as i64)])?;
    Ok(value + 1)
}

impl Db for Pg {
    type Driver = postgres::Error;

    fn connect(&self) -> Pg {
        Pg { client: connect(&self.schema), schema: self.schema.clone() }
    }

    fn fenced_increment(
        &mut self,
        resource: &str,
        fence: Fence,
        holder: OwnerId,
    ) -> Result<i64, fenced::Error> {
        fenced::fenced_write(&mut self.client, resource, fence, holder, |tx| increment(tx, fence))
    }

    fn write_then_admit(
        &mut self,
        resource: &str,
        fence: Fence,
        holder: OwnerId,
        value: i64,
    ) -> Result<HighWater, fenced::Error> {
        let mut tx = self.client.transaction().unwrap();
        tx.execute("UPDATE counter SET value = $1 WHERE id = 1", &[&value]).unwrap();
        let mark = fenced::admit(&mut tx, resource, fence, holder)?;
        tx.commit().unwrap();
        Ok(mark)
    }

    fn admit_outside_transaction(&mut self, _: &str, _: Fence) -> Option<fenced::Error> {
        None // `admit` takes a `Transaction`: the mistake does not compile.
    }

    fn store_raw_mark(&mut self, resource: &str, fence: i64, holder: i64) {
        self.client
            .batch_execute(
                "ALTER TABLE leasehold_fences DROP CONSTRAINT IF EXISTS leasehold_fences_fence_check",
            )
            .unwrap();
        self.client
            .execute(
                "INSERT INTO leasehold_fences VALUES ($1, $2, $3) \
                 ON CONFLICT (resource) DO UPDATE SET fence = $2, holder = $3",
                &[&resource, &fence, &holder],
            )
            .unwrap();
    }

    fn counter(&mut self) -> i64 {
        self.client.query_one("SELECT value FROM counter WHERE id = 1", &[]).unwrap().get(0)
    }

    fn log(&mut self) -> Vec<u64> {
        let rows = self.client.query("SELECT fence FROM log ORDER BY seq", &[]).unwrap();
        rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect()
    }

    fn mark(&mut self, resource: &str) -> Option<(i64, i64)> {
        let row = self
            .client
            .query_opt("SELECT fence, holder FROM leasehold_fences WHERE resource = $1", &[&resource]);
        row.unwrap().map(|r| (r.get(0), r.get(1)))
    }
}

#[test]
fn a_stale_holder_is_refused_and_its_change_rolls_back() {
    scenarios::a_stale_holder_is_refused_and_its_change_rolls_back(Pg::new("stale"));
}

#[test]
fn the_same_holder_writes_twice_and_a_reused_fence_is_refused() {
    scenarios::the_same_holder_writes_twice_and_a_reused_fence_is_refused(Pg::new("same_holder"));
}

#[test]
fn concurrent_writers_lose_no_update() {
    scenarios::concurrent_writers_lose_no_update(Pg::new("concurrent"));
}

#[test]
fn bad_input_is_a_typed_error_and_writes_nothing() {
    scenarios::bad_input_is_a_typed_error_and_writes_nothing(Pg::new("bad_input"));
}

/// Two transactions make the resource's first write at once: the second waits for the
/// first's row, then reads and locks it, and its older fence is refused.
#[test]
fn two_first_writes_at_once_are_ordered_by_the_row() {
    let mut first = Pg::new("first_write");
    let mut second = first.connect();
    let mut tx = first.client.transaction().unwrap();
    assert_eq!(
        fenced::admit(&mut tx, "pump", Fence(2), B).unwrap(),
        HighWater { fence: Fence(2), holder: B }
    );
    let waiter = std::thread::spawn(move || {
        let mut tx = second.client.transaction().unwrap();
        let refused = fenced::admit(&mut tx, "pump", Fence(1), A).unwrap_err();
        refused.refusal()
    });
    // Whether or not the waiter has reached its INSERT yet, it cannot pass this commit.
    scenarios::widen_races();
    tx.commit().unwrap();
    assert_eq!(
        waiter.join().unwrap(),
        Some(leasehold_core::resource::AdmitError::Stale { fence: Fence(1), high_water: Fence(2) })
    );
}

/// Under REPEATABLE READ, a mark changed since the transaction's snapshot cannot be locked:
/// a database error, transient, whose source is PostgreSQL's.
#[test]
fn a_serialisation_failure_is_a_transient_database_error() {
    let mut db = Pg::new("repeatable_read");
    let mut other = db.connect();
    other.fenced_increment("pump", Fence(1), A).unwrap();
    let mut tx =
        db.client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).start().unwrap();
    tx.query_one("SELECT value FROM counter", &[]).unwrap(); // takes the snapshot
    other.fenced_increment("pump", Fence(2), B).unwrap();
    let e = fenced::admit(&mut tx, "pump", Fence(3), A).unwrap_err();
    assert!(matches!(e, FenceError::Database { .. }) && e.is_transient(), "{e:?}");
    let source = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<postgres::Error>()).unwrap();
    assert_eq!(source.code(), Some(&postgres::error::SqlState::T_R_SERIALIZATION_FAILURE));
    drop(tx);
    // Run again, it goes through.
    assert_eq!(db.fenced_increment("pump", Fence(3), A).unwrap(), 3);
}

/// No fence table: a database error, not retryable.
#[test]
fn a_missing_table_is_a_permanent_database_error() {
    let mut db = Pg::new("no_table");
    db.client.batch_execute("DROP TABLE leasehold_fences").unwrap();
    let e = db.fenced_increment("pump", Fence(1), A).unwrap_err();
    assert!(matches!(e, FenceError::Database { .. }) && !e.is_transient(), "{e:?}");
    let source = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<postgres::Error>()).unwrap();
    assert_eq!(source.code(), Some(&postgres::error::SqlState::UNDEFINED_TABLE));
    assert_eq!(db.counter(), 0);
}
