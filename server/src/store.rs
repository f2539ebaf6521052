//! Durable lease records in redb, written by one task that commits in groups.
//!
//! Every request that may change a record goes through [`Store::apply`]: the writer takes
//! everything queued, applies the authority's rules to each in order inside one write
//! transaction (so a later request sees an earlier one's record), commits once with fsync,
//! and only then answers. Under load, many grants share one fsync.
//!
//! **Faults.** After an I/O error (a full disk, mostly) redb refuses every later transaction
//! until the database is closed and re-opened. So the writer then closes it, answers every
//! request `unavailable` at once, and re-opens it on a backoff (50 ms doubling to 1 s). It is
//! back up only after a probe write commits with fsync, so `/healthz` reports it up only when a
//! grant could be stored. Everything acknowledged was committed before it was acknowledged, and
//! re-opening keeps every committed transaction; the failed batch was answered `unavailable`,
//! never granted. The clock is the process's, which did not restart, so no grant is re-armed.
//!
//! **Reclaiming.** Records of keys that stay free for `reclaim_after` are deleted, and the
//! highest fence among them is folded into a store-wide fence floor, committed in the same
//! transaction; a key with no record starts from [`Record::fresh`] at that floor, so its next
//! fence is above every fence it ever had. The file is then compacted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use leasehold_core::authority::{Decision, Limits, Record};
use leasehold_core::{namespace, Fence, Key, Request};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::Clock;

const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
/// Store-wide values: the fence floor.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const FENCE_FLOOR: &str = "fence_floor";
/// Written and deleted when re-opening, to prove the store takes writes again.
const PROBE: TableDefinition<&str, &[u8]> = TableDefinition::new("probe");
/// About a full batch of records (`MAX_BATCH` of ~100 bytes).
const PROBE_BYTES: usize = 64 * 1024;

/// At most this many requests share one commit; bounds a batch's latency.
const MAX_BATCH: usize = 512;

const REOPEN_MIN: Duration = Duration::from_millis(50);
const REOPEN_MAX: Duration = Duration::from_secs(1);
/// A store that fails again within this long of being re-opened is flapping (the disk has
/// room for the probe but not for the traffic): each such failure doubles the wait before
/// the next re-open, so `/healthz` mostly says unavailable instead of flickering.
const STABLE: Duration = Duration::from_secs(5);

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
    /// An earlier I/O error closed the store; it is being re-opened.
    #[error("store: unavailable for {:.1}s after {cause}; re-opening, retry", .down_for.as_secs_f64())]
    Down {
        /// How long it has been down.
        down_for: Duration,
        /// The error that closed it.
        cause: String,
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

/// Whether the store can take writes, as `/healthz` reports it.
#[derive(Debug, Clone)]
pub(crate) enum Health {
    Up,
    Down { since: std::time::Instant, cause: String },
}

struct Job {
    key: Key,
    request: Request,
    /// Fences granted are above this.
    floor: Fence,
    done: async_channel::Sender<Result<Decision, Arc<StoreError>>>,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub(crate) struct StoreStats {
    pub(crate) commits: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) reopens: AtomicU64,
    pub(crate) reclaimed: AtomicU64,
    pub(crate) compactions: AtomicU64,
    pub(crate) fence_floor: AtomicU64,
}

struct Inner {
    path: PathBuf,
    /// `None` while down. Readers hold the read lock for one transaction; closing, re-opening
    /// and compacting take the write lock, because redb needs the database to itself for them.
    db: RwLock<Option<Database>>,
    health: Mutex<Health>,
    stats: StoreStats,
}

impl Inner {
    fn health(&self) -> Health {
        self.health.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_health(&self, h: Health) {
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) = h;
    }

    fn down_error(&self) -> StoreError {
        match self.health() {
            Health::Down { since, cause } => StoreError::Down { down_for: since.elapsed(), cause },
            // Up again between the caller's look and ours.
            Health::Up => StoreError::Down { down_for: Duration::ZERO, cause: "a re-open".into() },
        }
    }

    /// Runs `f` on the open database, or fails with [`StoreError::Down`].
    fn read<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(db) => f(db),
            None => Err(self.down_error()),
        }
    }

    /// Closes the database after `cause`; the writer re-opens it.
    fn close(&self, cause: &StoreError) {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        self.set_health(Health::Down { since: std::time::Instant::now(), cause: cause.to_string() });
        let db = self.db.write().unwrap_or_else(|e| e.into_inner()).take();
        drop(db);
    }

    /// Opens the database and proves it takes a durable write the size of a full batch (a
    /// tiny probe fits in the file's free pages long after real batches stop fitting).
    fn reopen(&self) -> Result<(), StoreError> {
        let db = Database::create(&self.path).map_err(StoreError::db)?;
        let probe = vec![0u8; PROBE_BYTES];
        for put in [true, false] {
            let txn = db.begin_write().map_err(StoreError::db)?;
            {
                let mut t = txn.open_table(PROBE).map_err(StoreError::db)?;
                if put {
                    t.insert("probe", probe.as_slice()).map_err(StoreError::db)?;
                } else {
                    t.remove("probe").map_err(StoreError::db)?;
                }
            }
            txn.commit().map_err(StoreError::db)?;
        }
        *self.db.write().unwrap_or_else(|e| e.into_inner()) = Some(db);
        self.stats.reopens.fetch_add(1, Ordering::Relaxed);
        self.set_health(Health::Up);
        Ok(())
    }

    /// Compacts the file; a failure other than "busy" closes the store like any I/O error.
    fn compact(&self) {
        let mut guard = self.db.write().unwrap_or_else(|e| e.into_inner());
        let Some(db) = guard.as_mut() else {
            return;
        };
        // A read transaction that began before the write lock was taken may still be
        // finishing; it ends within moments, and skipping would leave the freed space until
        // the next sweep that reclaims something, which may never come.
        let mut result = db.compact();
        for _ in 0..50 {
            if !matches!(result, Err(redb::CompactionError::TransactionInProgress)) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            result = db.compact();
        }
        match result {
            Ok(_) => {
                self.stats.compactions.fetch_add(1, Ordering::Relaxed);
            }
            Err(redb::CompactionError::TransactionInProgress) => {
                tracing::warn!("compaction skipped: transactions still in progress; the next sweep retries");
            }
            Err(e) => {
                drop(guard);
                let e = StoreError::db(e);
                tracing::error!("compaction failed, re-opening the store: {e}");
                self.close(&e);
            }
        }
    }
}

/// The records of all keys, and the writer that changes them.
#[derive(Clone)]
pub(crate) struct Store {
    inner: Arc<Inner>,
    jobs: async_channel::Sender<Job>,
}

impl Store {
    /// Closes the database for good, once no transaction uses it (a reader on the blocking
    /// pool may outlive the task that asked for it): the next server on this directory can
    /// open it.
    pub(crate) fn shut(&self) {
        drop(self.inner.db.write().unwrap_or_else(|e| e.into_inner()).take());
    }

    /// Opens (or creates) the store in `dir`, re-arms every grant as of `now`, compacts it, and
    /// returns it with the writer loop, which the caller must run.
    pub(crate) fn open(
        dir: &Path,
        clock: Clock,
        limits: Limits,
        reclaim_after: Option<Duration>,
    ) -> Result<(Store, impl std::future::Future<Output = ()>), StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Db(e.into()))?;
        let path = dir.join("leases.redb");
        let mut db = Database::create(&path).map_err(StoreError::db)?;
        let floor = recover(&db, clock.now())?;
        // Re-arming rewrites every held record, and copy-on-write pages are only returned to
        // the file's free space: without compacting, the file grows with each restart.
        db.compact().map_err(StoreError::db)?;
        let inner = Arc::new(Inner {
            path,
            db: RwLock::new(Some(db)),
            health: Mutex::new(Health::Up),
            stats: StoreStats::default(),
        });
        inner.stats.fence_floor.store(floor.0, Ordering::Relaxed);
        let (tx, rx) = async_channel::bounded::<Job>(4 * MAX_BATCH);
        let writer = Writer { inner: inner.clone(), jobs: rx, clock, limits, reclaim_after }.run();
        Ok((Store { inner, jobs: tx }, writer))
    }

    /// Applies `request` to `key` durably; returns the decision once it is on disk.
    /// The key's fences continue above `floor` as well as above its own (the sessions'
    /// fences of the same key: see the `namespace` module).
    pub(crate) async fn apply(
        &self,
        key: Key,
        request: Request,
        floor: Fence,
    ) -> Result<Decision, Arc<StoreError>> {
        let (done, result) = async_channel::bounded(1);
        self.jobs.send(Job { key, request, floor, done }).await.map_err(|_| Arc::new(StoreError::Stopped))?;
        result.recv().await.map_err(|_| Arc::new(StoreError::Stopped))?
    }

    pub(crate) fn stats(&self) -> &StoreStats {
        &self.inner.stats
    }

    pub(crate) fn health(&self) -> Health {
        self.inner.health()
    }

    /// The record of `key`, if it was ever written.
    pub(crate) async fn get(&self, key: Key) -> Result<Option<Record>, StoreError> {
        let inner = self.inner.clone();
        smol::unblock(move || {
            inner.read(|db| {
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
        })
        .await
    }

    /// Every record, in key order.
    pub(crate) async fn all(&self) -> Result<Vec<(String, Record)>, StoreError> {
        let inner = self.inner.clone();
        smol::unblock(move || {
            inner.read(|db| {
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
        })
        .await
    }
}

/// The one task that writes.
struct Writer {
    inner: Arc<Inner>,
    jobs: async_channel::Receiver<Job>,
    clock: Clock,
    limits: Limits,
    reclaim_after: Option<Duration>,
}

/// What woke the writer.
enum Wake {
    Job(Job),
    Timer,
    Stopped,
}

impl Writer {
    async fn run(self) {
        let mut next_sweep = self.reclaim_after.map(|d| std::time::Instant::now() + d);
        // Free keys seen at the last sweep, with their fence then: still free with the same
        // fence at the next sweep means nobody acquired them in between (every grant takes a
        // new fence), so they were idle for a whole interval.
        let mut candidates: HashMap<String, Fence> = HashMap::new();
        let mut reopen_delay = REOPEN_MIN;
        let mut reopen_at = std::time::Instant::now();
        let (mut was_down, mut up_since) = (false, std::time::Instant::now());
        loop {
            let down = matches!(self.inner.health(), Health::Down { .. });
            if down && !was_down {
                reopen_delay =
                    if up_since.elapsed() < STABLE { (reopen_delay * 2).min(REOPEN_MAX) } else { REOPEN_MIN };
                reopen_at = std::time::Instant::now() + reopen_delay;
            }
            was_down = down;
            let wake_at = if down { Some(reopen_at) } else { next_sweep };
            match self.wait(wake_at).await {
                Wake::Stopped => return,
                Wake::Job(first) if down => {
                    // Answered at once: a client should not wait out a disk that is full.
                    let e = Arc::new(self.inner.down_error());
                    let _ = first.done.try_send(Err(e.clone()));
                    while let Ok(job) = self.jobs.try_recv() {
                        let _ = job.done.try_send(Err(e.clone()));
                    }
                }
                Wake::Job(first) => self.commit(first).await,
                Wake::Timer if down => {
                    let inner = self.inner.clone();
                    match crate::log_work(move || inner.reopen()).await {
                        Ok(()) => {
                            tracing::warn!("store re-opened: serving again");
                            up_since = std::time::Instant::now();
                        }
                        Err(e) => {
                            tracing::debug!("store still unavailable: {e}");
                            reopen_delay = (reopen_delay * 2).min(REOPEN_MAX);
                        }
                    }
                    reopen_at = std::time::Instant::now() + reopen_delay;
                }
                Wake::Timer => {
                    self.sweep(&mut candidates).await;
                    next_sweep = self.reclaim_after.map(|d| std::time::Instant::now() + d);
                }
            }
        }
    }

    async fn wait(&self, until: Option<std::time::Instant>) -> Wake {
        let job = async {
            match self.jobs.recv().await {
                Ok(job) => Wake::Job(job),
                Err(_) => Wake::Stopped,
            }
        };
        match until {
            Some(at) => {
                futures_lite::future::or(job, async {
                    leasehold_timer::Deadline::at(at).await;
                    Wake::Timer
                })
                .await
            }
            None => job.await,
        }
    }

    /// Commits `first` and everything queued behind it, then answers them.
    async fn commit(&self, first: Job) {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match self.jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let (inner, clock, limits) = (self.inner.clone(), self.clock, self.limits);
        let (batch, result) = crate::log_work(move || {
            let r = inner.read(|db| apply_batch(db, &batch, clock, &limits));
            if let Err(e @ StoreError::Db(_)) = &r {
                // redb refuses everything after an I/O error until re-opened.
                tracing::error!("commit failed, closing the store to re-open it: {e}");
                inner.close(e);
            }
            (batch, r)
        })
        .await;
        match result {
            Ok((decisions, committed)) => {
                if committed {
                    self.inner.stats.commits.fetch_add(1, Ordering::Relaxed);
                }
                for (job, d) in batch.iter().zip(decisions) {
                    let _ = job.done.try_send(Ok(d));
                }
            }
            Err(e) => {
                tracing::debug!("{} requests answered unavailable: {e}", batch.len());
                let e = Arc::new(e);
                for job in &batch {
                    let _ = job.done.try_send(Err(e.clone()));
                }
            }
        }
    }

    /// Deletes the records of keys idle since the last sweep, raising the floor; compacts.
    async fn sweep(&self, candidates: &mut HashMap<String, Fence>) {
        let (inner, clock) = (self.inner.clone(), self.clock);
        let seen = std::mem::take(candidates);
        let result = crate::log_work(move || {
            let r = inner.read(|db| reclaim(db, clock, &seen));
            match &r {
                Ok((reclaimed, floor, _)) if *reclaimed > 0 => {
                    inner.stats.reclaimed.fetch_add(*reclaimed, Ordering::Relaxed);
                    inner.stats.fence_floor.store(floor.0, Ordering::Relaxed);
                    inner.compact();
                }
                Ok(_) => {}
                Err(e @ StoreError::Db(_)) => {
                    tracing::error!("reclaiming idle keys failed, closing the store to re-open it: {e}");
                    inner.close(e);
                }
                Err(e) => tracing::error!("reclaiming idle keys failed: {e}"),
            }
            r
        })
        .await;
        if let Ok((reclaimed, _, next)) = result {
            if reclaimed > 0 {
                tracing::info!("reclaimed the records of {reclaimed} idle keys");
            }
            *candidates = next;
        }
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt { key: key.to_string(), source })
}

fn encode(record: &Record) -> Vec<u8> {
    // Serialising plain integers and options cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

fn floor_in(meta: &impl ReadableTable<&'static str, u64>) -> Result<Fence, StoreError> {
    Ok(Fence(meta.get(FENCE_FLOOR).map_err(StoreError::db)?.map(|v| v.value()).unwrap_or(0)))
}

/// Re-arms every stored grant as of `now` (the old expiry was on a clock that did not
/// survive); returns the fence floor.
fn recover(db: &Database, now: leasehold_core::Instant) -> Result<Fence, StoreError> {
    let txn = db.begin_write().map_err(StoreError::db)?;
    let floor;
    {
        let mut table = txn.open_table(LEASES).map_err(StoreError::db)?;
        floor = floor_in(&txn.open_table(META).map_err(StoreError::db)?)?;
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
    Ok(floor)
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
        let floor = floor_in(&txn.open_table(META).map_err(StoreError::db)?)?;
        for job in batch {
            let key = job.key.as_str();
            let before = match table.get(key).map_err(StoreError::db)? {
                Some(v) => decode(key, v.value())?,
                None => Record::fresh(floor),
            };
            let d = namespace::decide_above(&before, job.floor, clock.now(), &job.request, limits);
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

/// Deletes the records that are reclaimable now and were reclaimable with the same fence in
/// `seen`, folding their fences into the floor in the same transaction. Returns how many were
/// deleted, the floor, and the reclaimable records to look at next time.
fn reclaim(
    db: &Database,
    clock: Clock,
    seen: &HashMap<String, Fence>,
) -> Result<(u64, Fence, HashMap<String, Fence>), StoreError> {
    let txn = db.begin_write().map_err(StoreError::db)?;
    let now = clock.now();
    let (mut doomed, mut next) = (Vec::new(), HashMap::new());
    let mut floor;
    {
        let mut table = txn.open_table(LEASES).map_err(StoreError::db)?;
        let mut meta = txn.open_table(META).map_err(StoreError::db)?;
        floor = floor_in(&meta)?;
        for item in table.iter().map_err(StoreError::db)? {
            let (k, v) = item.map_err(StoreError::db)?;
            let rec = decode(k.value(), v.value())?;
            if !rec.reclaimable(now) {
                continue;
            }
            if seen.get(k.value()) == Some(&rec.last_fence) {
                floor = floor.max(rec.last_fence);
                doomed.push(k.value().to_string());
            } else {
                next.insert(k.value().to_string(), rec.last_fence);
            }
        }
        if doomed.is_empty() {
            drop((table, meta));
            txn.abort().map_err(StoreError::db)?;
            return Ok((0, floor, next));
        }
        for k in &doomed {
            table.remove(k.as_str()).map_err(StoreError::db)?;
        }
        meta.insert(FENCE_FLOOR, floor.0).map_err(StoreError::db)?;
    }
    txn.commit().map_err(StoreError::db)?;
    Ok((doomed.len() as u64, floor, next))
}
