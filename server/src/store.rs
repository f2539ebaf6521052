//! Durable lease records in redb, written by one task that commits in groups.
//!
//! Every request that may change a record goes through [`Store::apply`]: the writer takes
//! everything queued, applies the authority's rules to each in order inside one write
//! transaction (so a later request sees an earlier one's record), commits once with fsync,
//! and only then answers. Under load, many grants share one fsync.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use leasehold_core::authority::{self, Decision, Limits, Record};
use leasehold_core::{Instant, Key, Request};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::Clock;

const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");

/// At most this many requests share one commit; bounds a batch's latency.
const MAX_BATCH: usize = 512;

/// Why the store could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (I/O, corruption, lock held by another process).
    #[error("store: {0}")]
    Db(#[from] redb::Error),
    /// A stored record could not be decoded.
    #[error("store: record for key {key:?} is corrupt: {source}")]
    Corrupt {
        /// The key whose record is corrupt.
        key: String,
        /// The decoding error.
        source: serde_json::Error,
    },
    /// The writer task is gone (the server is shutting down).
    #[error("store: writer stopped")]
    Stopped,
}

impl StoreError {
    fn db(e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db(e.into())
    }
}

struct Job {
    key: Key,
    request: Request,
    done: async_channel::Sender<Result<Decision, Arc<StoreError>>>,
}

/// The records of all keys, and the writer that changes them.
#[derive(Clone)]
pub(crate) struct Store {
    db: Arc<Database>,
    jobs: async_channel::Sender<Job>,
    commits: Arc<AtomicU64>,
}

impl Store {
    /// Opens (or creates) the store in `dir`, re-arms every grant as of `now`, and returns it
    /// with the writer loop, which the caller must run.
    pub(crate) fn open(
        dir: &Path,
        clock: Clock,
        limits: Limits,
    ) -> Result<(Store, impl std::future::Future<Output = ()>), StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Db(e.into()))?;
        let db = Arc::new(Database::create(dir.join("leases.redb")).map_err(StoreError::db)?);
        recover(&db, clock.now())?;
        let (tx, rx) = async_channel::bounded::<Job>(4 * MAX_BATCH);
        let writer_db = db.clone();
        let commits = Arc::new(AtomicU64::new(0));
        let writer_commits = commits.clone();
        let writer = async move {
            while let Ok(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let db = writer_db.clone();
                let (batch, result) = smol::unblock(move || {
                    let r = apply_batch(&db, &batch, clock, &limits);
                    (batch, r)
                })
                .await;
                match result {
                    Ok((decisions, committed)) => {
                        if committed {
                            writer_commits.fetch_add(1, Ordering::Relaxed);
                        }
                        for (job, d) in batch.iter().zip(decisions) {
                            let _ = job.done.try_send(Ok(d));
                        }
                    }
                    Err(e) => {
                        tracing::error!("commit failed, {} requests answered unavailable: {e}", batch.len());
                        let e = Arc::new(e);
                        for job in &batch {
                            let _ = job.done.try_send(Err(e.clone()));
                        }
                    }
                }
            }
        };
        Ok((Store { db, jobs: tx, commits }, writer))
    }

    /// Applies `request` to `key` durably; returns the decision once it is on disk.
    pub(crate) async fn apply(&self, key: Key, request: Request) -> Result<Decision, Arc<StoreError>> {
        let (done, result) = async_channel::bounded(1);
        self.jobs.send(Job { key, request, done }).await.map_err(|_| Arc::new(StoreError::Stopped))?;
        result.recv().await.map_err(|_| Arc::new(StoreError::Stopped))?
    }

    /// How many write transactions have been committed (each one fsync); with the number of
    /// requests, shows how well commits are grouped.
    pub(crate) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// The record of `key`, if it was ever written.
    pub(crate) async fn get(&self, key: Key) -> Result<Option<Record>, StoreError> {
        let db = self.db.clone();
        smol::unblock(move || {
            let txn = db.begin_read().map_err(StoreError::db)?;
            let table = match txn.open_table(LEASES) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(StoreError::db(e)),
            };
            let Some(v) = table.get(key.as_str()).map_err(StoreError::db)? else {
                return Ok(None);
            };
            decode(&key, v.value()).map(Some)
        })
        .await
    }

    /// Every record, in key order.
    pub(crate) async fn all(&self) -> Result<Vec<(String, Record)>, StoreError> {
        let db = self.db.clone();
        smol::unblock(move || {
            let txn = db.begin_read().map_err(StoreError::db)?;
            let table = match txn.open_table(LEASES) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(StoreError::db(e)),
            };
            let mut out = Vec::new();
            for item in table.iter().map_err(StoreError::db)? {
                let (k, v) = item.map_err(StoreError::db)?;
                out.push((k.value().to_string(), decode(k.value(), v.value())?));
            }
            Ok(out)
        })
        .await
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt { key: key.to_string(), source })
}

fn encode(record: &Record) -> Vec<u8> {
    // Serialising plain integers and options cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

/// Re-arms every stored grant as of `now`: the old expiry was on a clock that did not survive.
fn recover(db: &Database, now: Instant) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(StoreError::db)?;
    {
        let mut table = txn.open_table(LEASES).map_err(StoreError::db)?;
        let mut updates = Vec::new();
        for item in table.iter().map_err(StoreError::db)? {
            let (k, v) = item.map_err(StoreError::db)?;
            let rec = decode(k.value(), v.value())?;
            if rec.holder.is_some() {
                updates.push((k.value().to_string(), rec.recover(now)));
            }
        }
        for (k, rec) in updates {
            table.insert(k.as_str(), encode(&rec).as_slice()).map_err(StoreError::db)?;
        }
    }
    txn.commit().map_err(StoreError::db)?;
    Ok(())
}

fn apply_batch(
    db: &Database,
    batch: &[Job],
    clock: Clock,
    limits: &Limits,
) -> Result<(Vec<Decision>, bool), StoreError> {
    let txn = db.begin_write().map_err(StoreError::db)?;
    let mut decisions = Vec::with_capacity(batch.len());
    let mut dirty = false;
    {
        let mut table = txn.open_table(LEASES).map_err(StoreError::db)?;
        for job in batch {
            let key = job.key.as_str();
            let before = match table.get(key).map_err(StoreError::db)? {
                Some(v) => decode(key, v.value())?,
                None => Record::default(),
            };
            let d = authority::decide(&before, clock.now(), &job.request, limits);
            if d.changed(&before) {
                table.insert(key, encode(&d.record).as_slice()).map_err(StoreError::db)?;
                dirty = true;
            }
            decisions.push(d);
        }
    }
    if dirty {
        // Durability::Immediate (redb's default): fsync before anyone is answered.
        txn.commit().map_err(StoreError::db)?;
    } else {
        txn.abort().map_err(StoreError::db)?;
    }
    Ok((decisions, dirty))
}
