//! The fenced write against SQLite: a database file in a temporary folder.
#![cfg(feature = "sqlite")]

#[allow(dead_code)] // each backend uses what its types allow
mod scenarios;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use leasehold_core::resource::HighWater;
use leasehold_core::wire::{Fence, OwnerId};
use leasehold_fence_sql::{sqlite, FenceError};
use rusqlite::{Connection, TransactionBehavior};
use scenarios::{Db, A, B};

struct Sqlite {
    path: PathBuf,
    conn: Connection,
    _dir: Arc<tempfile::TempDir>,
}

impl Sqlite {
    fn new() -> Sqlite {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let path = dir.path().join("resource.db");
        let db = Sqlite { conn: open(&path), path, _dir: dir };
        sqlite::create_table(&db.conn).unwrap();
        db.conn
            .execute_batch(
                "CREATE TABLE counter (id INTEGER PRIMARY KEY, value INTEGER NOT NULL);
                 INSERT INTO counter VALUES (1, 0);
                 CREATE TABLE log (seq INTEGER PRIMARY KEY AUTOINCREMENT, fence INTEGER NOT NULL);",
            )
            .unwrap();
        db
    }
}

fn open(path: &std::path::Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    // Writers queue for the write lock instead of failing at once.
    conn.busy_timeout(Duration::from_secs(30)).unwrap();
    conn
}

/// The counter's read-modify-write and the log append, in `tx`.
fn increment(tx: &Connection, fence: Fence) -> rusqlite::Result<i64> {
    scenarios::widen_races();
    let value: i64 = tx.query_row("SELECT value FROM counter WHERE id = 1", [], |r| r.get(0))?;
    scenarios::widen_races();
    tx.execute("UPDATE counter SET value = ?1 WHERE id = 1", [value + 1])?;
    tx.execute("INSERT INTO log (fence) VALUES (?1)", [fence.0 as i64])?;
    Ok(value + 1)
}

impl Db for Sqlite {
    type Driver = rusqlite::Error;

    fn connect(&self) -> Sqlite {
        Sqlite { conn: open(&self.path), path: self.path.clone(), _dir: self._dir.clone() }
    }

    fn fenced_increment(
        &mut self,
        resource: &str,
        fence: Fence,
        holder: OwnerId,
    ) -> Result<i64, sqlite::Error> {
        sqlite::fenced_write(&mut self.conn, resource, fence, holder, |tx| increment(tx, fence))
    }

    fn write_then_admit(
        &mut self,
        resource: &str,
        fence: Fence,
        holder: OwnerId,
        value: i64,
    ) -> Result<HighWater, sqlite::Error> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).unwrap();
        tx.execute("UPDATE counter SET value = ?1 WHERE id = 1", [value]).unwrap();
        let mark = sqlite::admit(&tx, resource, fence, holder)?;
        tx.commit().unwrap();
        Ok(mark)
    }

    fn admit_outside_transaction(&mut self, resource: &str, fence: Fence) -> Option<sqlite::Error> {
        Some(sqlite::admit(&self.conn, resource, fence, A).unwrap_err())
    }

    fn store_raw_mark(&mut self, resource: &str, fence: i64, holder: i64) {
        // SQLite cannot drop a CHECK constraint; this connection ignores them instead.
        self.conn.execute_batch("PRAGMA ignore_check_constraints = ON").unwrap();
        self.conn
            .execute(
                "INSERT OR REPLACE INTO leasehold_fences VALUES (?1, ?2, ?3)",
                rusqlite::params![resource, fence, holder],
            )
            .unwrap();
        self.conn.execute_batch("PRAGMA ignore_check_constraints = OFF").unwrap();
    }

    fn counter(&mut self) -> i64 {
        self.conn.query_row("SELECT value FROM counter WHERE id = 1", [], |r| r.get(0)).unwrap()
    }

    fn log(&mut self) -> Vec<u64> {
        let mut s = self.conn.prepare("SELECT fence FROM log ORDER BY seq").unwrap();
        s.query_map([], |r| r.get::<_, i64>(0)).unwrap().map(|f| f.unwrap() as u64).collect()
    }

    fn mark(&mut self, resource: &str) -> Option<(i64, i64)> {
        use rusqlite::OptionalExtension;
        self.conn
            .query_row("SELECT fence, holder FROM leasehold_fences WHERE resource = ?1", [resource], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .unwrap()
    }
}

#[test]
fn a_stale_holder_is_refused_and_its_change_rolls_back() {
    scenarios::a_stale_holder_is_refused_and_its_change_rolls_back(Sqlite::new());
}

#[test]
fn the_same_holder_writes_twice_and_a_reused_fence_is_refused() {
    scenarios::the_same_holder_writes_twice_and_a_reused_fence_is_refused(Sqlite::new());
}

#[test]
fn concurrent_writers_lose_no_update() {
    scenarios::concurrent_writers_lose_no_update(Sqlite::new());
}

#[test]
fn bad_input_is_a_typed_error_and_writes_nothing() {
    scenarios::bad_input_is_a_typed_error_and_writes_nothing(Sqlite::new());
}

#[test]
fn the_mark_survives_reopening_the_file() {
    let mut db = Sqlite::new();
    db.fenced_increment("pump", Fence(4), B).unwrap();
    let mut reopened = db.connect();
    drop(db);
    let refused = reopened.fenced_increment("pump", Fence(3), A).unwrap_err();
    assert!(refused.refusal().is_some(), "{refused:?}");
}

/// Another connection's write transaction holds the lock past the busy timeout: a database
/// error, with the driver's error as its source, and worth retrying.
#[test]
fn a_locked_database_is_a_transient_database_error() {
    let db = Sqlite::new();
    let mut other = db.connect();
    other.conn.busy_timeout(Duration::ZERO).unwrap();
    db.conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    let busy = other.fenced_increment("pump", Fence(1), A).unwrap_err();
    assert!(matches!(busy, FenceError::Database { .. }), "{busy:?}");
    assert!(busy.is_transient());
    assert!(std::error::Error::source(&busy).is_some());
    db.conn.execute_batch("ROLLBACK").unwrap();
    assert_eq!(other.fenced_increment("pump", Fence(1), A).unwrap(), 1);
}

/// No fence table: a database error, not retryable.
#[test]
fn a_missing_table_is_a_permanent_database_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = open(&dir.path().join("empty.db"));
    let e = sqlite::fenced_write(&mut conn, "pump", Fence(1), A, |_| Ok(())).unwrap_err();
    assert!(matches!(e, FenceError::Database { .. }) && !e.is_transient(), "{e:?}");
    let source = std::error::Error::source(&e).unwrap().to_string();
    assert!(source.contains("no such table"), "{source}");
}
