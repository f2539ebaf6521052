//! What the fence check costs a write: committed single-row updates per second with and
//! without it, on SQLite (a file) and on a PostgreSQL server this example starts on loopback
//! (durable defaults), measured side by side in one run.
//!
//! ```sh
//! cargo run --release -p leasehold-fence-sql --example overhead            # 3 rounds of 3 × 1 s
//! cargo run --release -p leasehold-fence-sql --example overhead -- 2 5     # 5 rounds of 3 × 2 s
//! ```
//!
//! Each write is one transaction that adds one to a counter row. Three ways:
//! - `plain`: the write alone;
//! - `fenced, same grant`: the check first, under a fence already stored (the common case: a
//!   holder writes many times per grant), so the mark is read and locked, not rewritten;
//! - `fenced, new grant`: a fence higher than the last on every write (the worst case), so
//!   the mark is rewritten too.
//!
//! The ways take turns write by write, so a machine whose load changes during the run shifts
//! all of them alike; the figure is the median over the rounds.

use std::time::{Duration, Instant};

use leasehold_core::wire::{Fence, OwnerId};
use leasehold_fence_sql::{postgres as fenced_pg, sqlite as fenced_sqlite};

const HOLDER: OwnerId = OwnerId(42);

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Plain,
    SameGrant,
    NewGrant,
}

const WAYS: [(Way, &str); 3] =
    [(Way::Plain, "plain"), (Way::SameGrant, "fenced, same grant"), (Way::NewGrant, "fenced, new grant")];

/// One database's write, done the three ways.
trait Target {
    /// One committed write; `fence` is ignored by `Way::Plain`.
    fn write(&mut self, way: Way, fence: Fence) -> Result<(), Box<dyn std::error::Error>>;
}

struct Sqlite(rusqlite::Connection);

impl Target for Sqlite {
    fn write(&mut self, way: Way, fence: Fence) -> Result<(), Box<dyn std::error::Error>> {
        let add_one = |tx: &rusqlite::Connection| {
            tx.prepare_cached("UPDATE counter SET value = value + 1 WHERE id = 1")?.execute([]).map(drop)
        };
        if way == Way::Plain {
            let tx = self.0.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            add_one(&tx)?;
            return Ok(tx.commit()?);
        }
        Ok(fenced_sqlite::fenced_write(&mut self.0, "counter", fence, HOLDER, |tx| add_one(tx))?)
    }
}

fn sqlite(dir: &std::path::Path, name: &str, pragmas: &str) -> Result<Sqlite, Box<dyn std::error::Error>> {
    let conn = rusqlite::Connection::open(dir.join(name))?;
    conn.execute_batch(pragmas)?;
    fenced_sqlite::create_table(&conn)?;
    conn.execute_batch(
        "CREATE TABLE counter (id INTEGER PRIMARY KEY, value INTEGER); INSERT INTO counter VALUES (1, 0);",
    )?;
    Ok(Sqlite(conn))
}

struct Postgres {
    client: postgres::Client,
    add_one: postgres::Statement,
}

impl Target for Postgres {
    fn write(&mut self, way: Way, fence: Fence) -> Result<(), Box<dyn std::error::Error>> {
        let add_one = self.add_one.clone();
        if way == Way::Plain {
            let mut tx = self.client.transaction()?;
            tx.execute(&add_one, &[])?;
            return Ok(tx.commit()?);
        }
        fenced_pg::fenced_write(&mut self.client, "counter", fence, HOLDER, |tx| tx.execute(&add_one, &[]))?;
        Ok(())
    }
}

/// Writes per second for each way, the median over `rounds` rounds of `3 * slice`. Within a
/// round the ways take turns write by write, and each write is timed on its own, so a disk
/// whose flushes slow down for a moment (another build on the machine) costs all ways alike.
fn measure(
    target: &mut dyn Target,
    slice: Duration,
    rounds: usize,
) -> Result<[f64; 3], Box<dyn std::error::Error>> {
    let mut rates = [const { Vec::new() }; 3];
    // Above whatever an earlier measurement on the same database stored.
    let mut fence = Fence(u64::from(u32::MAX) * (1 + target_runs()));
    target.write(Way::NewGrant, fence)?; // the mark exists before anything is timed
    target.write(Way::Plain, fence)?;
    for _ in 0..rounds {
        let (mut spent, mut writes) = ([Duration::ZERO; 3], [0u32; 3]);
        let round = Instant::now();
        let mut cycle = 0;
        while round.elapsed() < 3 * slice {
            // Each cycle starts with the next way: a write right after another's commit can
            // cost more (seen with SQLite's WAL), and rotating spreads that over all three.
            cycle += 1;
            for i in (0..3).map(|k| (k + cycle) % 3) {
                let way = &WAYS[i].0;
                if *way == Way::NewGrant {
                    fence = Fence(fence.0 + 1);
                }
                let start = Instant::now();
                target.write(*way, fence)?;
                spent[i] += start.elapsed();
                writes[i] += 1;
            }
        }
        for i in 0..3 {
            rates[i].push(f64::from(writes[i]) / spent[i].as_secs_f64());
        }
    }
    Ok(rates.map(|mut r| {
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    }))
}

/// How many measurements have started, this one included.
fn target_runs() -> u64 {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
}

fn report(name: &str, rates: [f64; 3]) {
    println!("{name}");
    for ((_, way), rate) in WAYS.iter().zip(rates) {
        println!(
            "  {way:<20} {rate:>8.0} writes/s  {:>6.1} µs/write  ratio to plain {:.2}",
            1e6 / rate,
            rate / rates[0]
        );
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let slice = Duration::from_secs_f64(args.next().map(|a| a.parse()).transpose()?.unwrap_or(1.0));
    let rounds: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3);
    println!(
        "{rounds} rounds of 3 × {:.1} s, the ways taking turns write by write; median writes/s; \
         one committed transaction per write",
        slice.as_secs_f64()
    );
    let dir = tempfile::tempdir()?;
    let mut defaults = sqlite(dir.path(), "defaults.db", "")?;
    report("SQLite, defaults (rollback journal, synchronous=FULL)", measure(&mut defaults, slice, rounds)?);
    let mut wal = sqlite(dir.path(), "wal.db", "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")?;
    report("SQLite, WAL, synchronous=NORMAL", measure(&mut wal, slice, rounds)?);

    let server = leasehold_test_servers::postgres_with(leasehold_test_servers::Durability::Full);
    let mut client = postgres::Client::connect(&server.config(), postgres::NoTls)?;
    fenced_pg::create_table(&mut client)?;
    client.batch_execute(
        "CREATE TABLE counter (id INT PRIMARY KEY, value BIGINT); INSERT INTO counter VALUES (1, 0);",
    )?;
    let add_one = client.prepare("UPDATE counter SET value = value + 1 WHERE id = 1")?;
    let mut pg = Postgres { client, add_one };
    report(
        "PostgreSQL 127.0.0.1, durable defaults (fsync, synchronous_commit=on)",
        measure(&mut pg, slice, rounds)?,
    );
    // Without the wait for the WAL flush, what is left is round trips and the server's work,
    // which is where the check's extra statements show.
    pg.client.batch_execute("SET synchronous_commit = off")?;
    report("PostgreSQL 127.0.0.1, synchronous_commit=off (this session)", measure(&mut pg, slice, rounds)?);
    Ok(())
}
