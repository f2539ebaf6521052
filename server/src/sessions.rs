//! Protocol v2: sessions, made durable as a write-ahead log of the authority's inputs.
//!
//! The rules are the core's [`SessionAuthority`], held in memory. The core is deterministic
//! (same inputs, same outputs, no clock, no randomness), so its state is exactly the result of
//! its inputs: every input (the time, the request, and for an open the secret drawn here) is
//! appended to a log in redb before anyone hears of its effect. The one writer task takes every
//! queued input, applies each to the authority in order, appends them all in one write
//! transaction and commits it with fsync (group commit), and only then answers. At start the
//! log is replayed through a fresh authority, then a `Recover` input re-arms every session from
//! the restart (its old expiry was counted before the crash, as for v1 grants).
//!
//! Session expiries are inputs too (`Timeout`), logged like requests: when a session's time is
//! up its keys move to their waiters, and that hand-off must be on disk before the new holder
//! is told, and must replay identically.
//!
//! v1 leases share the keys: each is an external hold of its key in the authority, set by
//! logged inputs (see the `namespace` module for the order and the crash argument).
//!
//! **Time across restarts.** The log's clock continues where the previous run's last entry
//! left it (the process clock is added to that base), so the authority never sees time run
//! backwards while replaying.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use leasehold_core::session::authority::{
    ExternalHold, ExternalRefusal, KeyHolder, SessionInput as Input, SessionStatus,
};
use leasehold_core::session::wire::{Label, Secret, SessionId, SessionOp, SessionReply, SessionRequest};
use leasehold_core::session::{SessionAuthority, SessionLimits};
use leasehold_core::{Duration, Fence, Instant, Key};
use redb::{Database, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};

/// Most sessions live at once; an open past it is answered `Rejected(Capacity)`.
pub const MAX_SESSIONS: usize = 16 * 1024;
/// Most distinct keys sessions may ever use (a power of two, as the core's map needs). Keys
/// are never forgotten, because a forgotten key would forget its fence counter; an acquire of
/// one more is answered `Rejected(Capacity)`.
pub const MAX_SESSION_KEYS: usize = 64 * 1024;
/// Most claims at once, over all keys: a claim is one session's grant of a key, or its place
/// in a key's queue. One pool serves every key, so a key may have any number of waiters up to
/// it; one more claim is answered `Rejected(Capacity)`. Twice [`MAX_SESSION_KEYS`]: room for
/// every key to be held and for as many claims again queued (or holding semaphore slots) in any
/// distribution, at about 5 MiB, where the 32 waiters each key reserved inline before (and at
/// most) took 32 MiB.
pub const MAX_CLAIMS: usize = 2 * MAX_SESSION_KEYS;
/// Most observers of keys at once (a session observing a key is one); one more is answered
/// `Rejected(Capacity)`. Each observed key keeps its last few changes (about 1 KiB).
pub const MAX_OBSERVERS: usize = 4 * 1024;

/// The server's session authority.
pub(crate) type Authority = SessionAuthority<MAX_SESSIONS, MAX_SESSION_KEYS, MAX_CLAIMS, MAX_OBSERVERS>;

/// The log: entry number → JSON of an [`Entry`].
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("session_log");
/// The authority as of some log entry, JSON; the entries it covers are deleted with its write.
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("session_snapshot");
/// A snapshot is written (and the log cut) at every start and whenever this many entries
/// follow the last one, so a start replays at most this many entries.
const SNAPSHOT_EVERY: u64 = 100_000;

/// At most this many inputs share one commit; bounds a batch's latency.
const MAX_BATCH: usize = 512;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    now: Instant,
    input: Input,
}

/// Why the session store could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum SessionStoreError {
    /// The database failed (I/O, corruption, lock held by another process).
    #[error("session store: {0}")]
    Db(#[from] redb::Error),
    /// A logged input could not be decoded.
    #[error("session store: log entry {index} is corrupt: {source}")]
    Corrupt {
        /// The entry's number.
        index: u64,
        /// The decoding error.
        source: serde_json::Error,
    },
    /// The snapshot could not be encoded or decoded.
    #[error("session store: the snapshot is corrupt: {0}")]
    Snapshot(serde_json::Error),
    /// The snapshot is of a layout this server does not read (written by another version).
    #[error(
        "session store: the session snapshot has layout {found}, this server reads layout {reads}; \
         it was written by another leasehold version: start that version, or move sessions.redb \
         aside to start with no sessions (fences then continue above the v1 store's)"
    )]
    SnapshotFormat {
        /// The layout found.
        found: u32,
        /// The layout this server reads.
        reads: u32,
    },
    /// The authority's table could not be built.
    #[error("session store: cannot build the session table: {0}")]
    Build(std::io::Error),
    /// An earlier failure left the in-memory state ahead of the log; it is being rebuilt.
    #[error("session store: unavailable after {0}; rebuilding from the log, retry")]
    Down(String),
    /// The writer task is gone (the server is shutting down).
    #[error("session store: writer stopped")]
    Stopped,
}

impl SessionStoreError {
    fn db(e: impl Into<redb::Error>) -> SessionStoreError {
        SessionStoreError::Db(e.into())
    }
}

/// The log's clock: the previous run's last logged time, plus this process's monotonic time.
#[derive(Debug, Clone, Copy)]
struct LogClock {
    origin: std::time::Instant,
    base: Instant,
}

impl LogClock {
    fn now(&self) -> Instant {
        self.base + Duration::from_micros(self.origin.elapsed().as_micros() as u64)
    }

    /// When the process clock reads `t`.
    fn at(&self, t: Instant) -> std::time::Instant {
        self.origin + StdDuration::from_micros((t - self.base).as_micros())
    }
}

/// Counters for `/metrics`.
#[derive(Default)]
pub(crate) struct SessionStats {
    pub(crate) opens: AtomicU64,
    pub(crate) keepalives: AtomicU64,
    pub(crate) acquires: AtomicU64,
    pub(crate) releases: AtomicU64,
    pub(crate) closes: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) commits: AtomicU64,
    pub(crate) pushed: AtomicU64,
    pub(crate) observes: AtomicU64,
    /// Keepalive replies that carried a change of an observed key.
    pub(crate) observed: AtomicU64,
    /// Appends to the session log that failed (a full disk, mostly).
    pub(crate) log_failures: AtomicU64,
    /// Times the session table was rebuilt from its log after a failed append.
    pub(crate) rebuilds: AtomicU64,
}

struct Job {
    input: Input,
    /// A keepalive to hold until its session has news (or is gone), at most until then.
    hold: Option<(SessionId, std::time::Instant)>,
    /// Told the reply as soon as the input is applied in memory, before its commit: for a v1
    /// hold, whose decision may run beside the hold's fsync (see the `namespace` module).
    applied: Option<async_channel::Sender<SessionReply>>,
    done: async_channel::Sender<Result<SessionReply, Arc<SessionStoreError>>>,
}

struct State {
    /// `None` between a failed re-open and the next: redb refuses to open a file this process
    /// has open, so the old handle goes before the re-open.
    db: Option<Database>,
    authority: Box<Authority>,
    /// The number the next log entry gets.
    next_index: u64,
    /// The first entry the newest snapshot does not cover.
    snapshot_at: u64,
    /// Set when a commit failed after its inputs were applied in memory: the authority is
    /// ahead of the log and must be rebuilt from it before it answers again.
    diverged: Option<String>,
    /// While true, commits carrying a v1 hold or set fail (`ServerFaults`).
    #[cfg(feature = "fault-injection")]
    fail_v1_commits: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Clone)]
pub(crate) struct Sessions {
    clock: LogClock,
    state: Arc<Mutex<State>>,
    jobs: async_channel::Sender<Job>,
    pub(crate) stats: Arc<SessionStats>,
    /// Since when, and why, the last commit failed; `None` once one succeeds again.
    failing: Failing,
}

/// The session log's last commit failure, for `/healthz`: every v1 grant needs the log too.
type Failing = Arc<Mutex<Option<(std::time::Instant, String)>>>;

/// A key as `GET /v2/leases` shows it: nothing here authorises.
#[derive(Debug, Serialize)]
pub(crate) struct KeyView {
    key: String,
    /// The oldest grant (the one grant of a key with a limit of 1).
    holder: Option<HolderView>,
    /// Every grant, oldest first: more than one for a semaphore.
    holders: Vec<HolderView>,
    /// How many sessions may hold the key at once.
    limit: u16,
    last_fence: u64,
    waiting: usize,
    /// Held by a v1 lease: how long (µs) until it ends, at most (0 while v1 is deciding).
    #[serde(skip_serializing_if = "Option::is_none")]
    v1_remaining: Option<u64>,
}

#[derive(Debug, Serialize)]
struct HolderView {
    session: u64,
    label: String,
    fence: u64,
    ttl: u64,
    remaining: u64,
    /// What the holder acquired with (`AcquireWithValue`); absent if nothing.
    #[serde(skip_serializing_if = "String::is_empty")]
    value: String,
}

/// Runs `f` on a thread whose stack fits a few copies of the table. The core's tables are
/// inline arrays (tens of MiB here); building one (`Box::new(Authority::new(..))`) or decoding
/// one from a snapshot makes the value on the stack before moving it into the box (always in
/// a debug build), which overflows a thread's stack, and the workspace forbids the unsafe code
/// that would build it in place.
/// How many copies of the table the stack must fit. An unoptimised build moves the value
/// through many frames: 8 copies suffice to build an empty table, decoding one from a snapshot
/// (serde's derive, through `Option`s and `Result`s) took more than 32 and at most 128
/// (measured in `cargo test`). Optimised builds move it far less. The stack is reserved
/// address space, touched only as deep as used, and the thread ends at once.
#[cfg(debug_assertions)]
const STACK_COPIES: usize = 128;
#[cfg(not(debug_assertions))]
const STACK_COPIES: usize = 16;

fn on_big_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, SessionStoreError> {
    let size = std::mem::size_of::<Authority>();
    std::thread::Builder::new()
        .name("session-table".into())
        .stack_size(STACK_COPIES * size + (1 << 20))
        .spawn(f)
        .map_err(SessionStoreError::Build)?
        .join()
        .map_err(|_| SessionStoreError::Build(std::io::Error::other("building the session table panicked")))
}

/// A fresh, empty table on the heap.
fn fresh_authority(limits: SessionLimits) -> Result<Box<Authority>, SessionStoreError> {
    on_big_stack(move || Box::new(Authority::new(limits)))
}

/// The snapshot's one record.
const SNAPSHOT_KEY: &str = "state";

/// The snapshot's layout: 2 since waiters and holders are kept in one pool of claims. A
/// snapshot without the field is of layout 1 (waiters inline in each key).
const SNAPSHOT_FORMAT: u32 = 2;

/// Read before the rest of a snapshot, so a layout this server cannot read is refused by name
/// rather than as a decoding error.
#[derive(Deserialize)]
struct SnapshotHeader {
    #[serde(default = "layout_one")]
    format: u32,
}

fn layout_one() -> u32 {
    1
}

/// The table as of the log entries below `covers`, and the last time logged before them.
#[derive(Serialize)]
struct SnapshotRef<'a> {
    format: u32,
    covers: u64,
    last: Instant,
    authority: &'a Authority,
}

#[derive(Deserialize)]
struct Snapshot {
    covers: u64,
    last: Instant,
    authority: Box<Authority>,
}

fn apply(authority: &mut Authority, entry: &Entry) -> Option<SessionReply> {
    authority.apply(entry.now, &entry.input)
}

fn encode(entry: &Entry) -> Vec<u8> {
    // Integers, byte arrays and bounded strings: serialising cannot fail.
    serde_json::to_vec(entry).unwrap_or_default()
}

/// Restores the newest snapshot (or a fresh table) and replays the log entries after it.
/// Returns the table, the next entry number, and the last logged time.
fn replay(db: &Database, limits: SessionLimits) -> Result<(Box<Authority>, u64, Instant), SessionStoreError> {
    let txn = db.begin_read().map_err(SessionStoreError::db)?;
    let snapshot = match txn.open_table(SNAPSHOT) {
        Ok(t) => t.get(SNAPSHOT_KEY).map_err(SessionStoreError::db)?.map(|v| v.value().to_vec()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(SessionStoreError::db(e)),
    };
    let (mut authority, mut next_index, mut last) = match snapshot {
        Some(bytes) => {
            let header: SnapshotHeader =
                serde_json::from_slice(&bytes).map_err(SessionStoreError::Snapshot)?;
            if header.format != SNAPSHOT_FORMAT {
                return Err(SessionStoreError::SnapshotFormat {
                    found: header.format,
                    reads: SNAPSHOT_FORMAT,
                });
            }
            let snap = on_big_stack(move || serde_json::from_slice::<Snapshot>(&bytes))?
                .map_err(SessionStoreError::Snapshot)?;
            let mut authority = snap.authority;
            authority.set_limits(limits);
            (authority, snap.covers, snap.last)
        }
        None => (fresh_authority(limits)?, 0, Instant::from_micros(0)),
    };
    let table = match txn.open_table(LOG) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((authority, next_index, last)),
        Err(e) => return Err(SessionStoreError::db(e)),
    };
    for item in table.range(next_index..).map_err(SessionStoreError::db)? {
        let (k, v) = item.map_err(SessionStoreError::db)?;
        let index = k.value();
        let entry: Entry = serde_json::from_slice(v.value())
            .map_err(|source| SessionStoreError::Corrupt { index, source })?;
        apply(&mut authority, &entry);
        next_index = index + 1;
        last = last.max(entry.now);
    }
    Ok((authority, next_index, last))
}

/// Writes the table as of entry `covers` (exclusive) and deletes the entries it covers, in
/// one fsynced transaction: a crash leaves the old snapshot and log, or the new ones.
fn snapshot(
    db: &Database,
    authority: &Authority,
    covers: u64,
    last: Instant,
) -> Result<(), SessionStoreError> {
    let bytes = serde_json::to_vec(&SnapshotRef { format: SNAPSHOT_FORMAT, covers, last, authority })
        .map_err(SessionStoreError::Snapshot)?;
    let txn = db.begin_write().map_err(SessionStoreError::db)?;
    {
        let mut snap = txn.open_table(SNAPSHOT).map_err(SessionStoreError::db)?;
        snap.insert(SNAPSHOT_KEY, bytes.as_slice()).map_err(SessionStoreError::db)?;
        let mut log = txn.open_table(LOG).map_err(SessionStoreError::db)?;
        log.retain_in(..covers, |_, _| false).map_err(SessionStoreError::db)?;
    }
    txn.commit().map_err(SessionStoreError::db)
}

fn append(db: &Database, first: u64, entries: &[Vec<u8>]) -> Result<(), SessionStoreError> {
    let txn = db.begin_write().map_err(SessionStoreError::db)?;
    {
        let mut table = txn.open_table(LOG).map_err(SessionStoreError::db)?;
        for (i, e) in entries.iter().enumerate() {
            table.insert(first + i as u64, e.as_slice()).map_err(SessionStoreError::db)?;
        }
    }
    // Durability::Immediate (redb's default): fsync before anyone is answered.
    txn.commit().map_err(SessionStoreError::db)
}

impl Sessions {
    /// Opens (or creates) the session log in `dir`, replays it, re-arms every session from
    /// now, and returns the sessions with the writer loop, which the caller must run.
    pub(crate) fn open(
        dir: &Path,
        limits: SessionLimits,
    ) -> Result<(Sessions, impl std::future::Future<Output = ()>), SessionStoreError> {
        std::fs::create_dir_all(dir).map_err(|e| SessionStoreError::Db(e.into()))?;
        let path = dir.join("sessions.redb");
        let db = Database::create(&path).map_err(SessionStoreError::db)?;
        let (mut authority, next_index, last) = replay(&db, limits)?;
        // One microsecond on, so the restart is strictly after everything logged.
        let clock = LogClock { origin: std::time::Instant::now(), base: last + Duration::from_micros(1) };
        // A store sessions never used has nothing to re-arm or cover: a server that serves only
        // v1 starts without writing here (and never decodes a snapshot).
        let next_index = if next_index == 0 {
            0
        } else {
            let recover = Entry { now: clock.now(), input: Input::Recover };
            append(&db, next_index, &[encode(&recover)])?;
            apply(&mut authority, &recover);
            // Every start replays at most the entries since the last snapshot.
            snapshot(&db, &authority, next_index + 1, recover.now)?;
            next_index + 1
        };
        let state = Arc::new(Mutex::new(State {
            db: Some(db),
            authority,
            next_index,
            snapshot_at: next_index,
            diverged: None,
            #[cfg(feature = "fault-injection")]
            fail_v1_commits: Arc::default(),
        }));
        let (tx, rx) = async_channel::bounded::<Job>(4 * MAX_BATCH);
        let stats = Arc::new(SessionStats::default());
        let failing = Failing::default();
        let writer = Writer {
            path,
            limits,
            clock,
            state: state.clone(),
            jobs: rx,
            stats: stats.clone(),
            failing: failing.clone(),
        }
        .run();
        Ok((Sessions { clock, state, jobs: tx, stats, failing }, writer))
    }

    /// Fails every commit carrying a v1 hold or set while `switch` is true.
    #[cfg(feature = "fault-injection")]
    pub(crate) fn fail_v1_commits_while(&self, switch: Arc<std::sync::atomic::AtomicBool>) {
        self.lock().fail_v1_commits = switch;
    }

    /// Since when and why the log takes no writes, if its last commit failed.
    pub(crate) fn failing(&self) -> Option<(std::time::Instant, String)> {
        self.failing.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the writer is gone (the server stopped).
    /// Closes the session log for good, once no commit uses it (see `Store::shut`).
    pub(crate) fn shut(&self) {
        self.lock().db = None;
    }

    pub(crate) fn stopped(&self) -> bool {
        self.jobs.is_closed()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a session with a secret from the OS's CSPRNG.
    pub(crate) async fn open_session(
        &self,
        ttl: Duration,
        label: Label,
    ) -> Result<SessionReply, Arc<SessionStoreError>> {
        let mut bytes = [0u8; 16];
        getrandom::getrandom(&mut bytes).map_err(|e| {
            Arc::new(SessionStoreError::Build(std::io::Error::other(format!(
                "no random bytes for a secret: {e}"
            ))))
        })?;
        self.submit(Input::Open { ttl, label, secret: Secret::from_bytes(bytes) }, None).await
    }

    /// Answers a request within a session, once its input is on disk.
    pub(crate) async fn request(
        &self,
        request: SessionRequest,
    ) -> Result<SessionReply, Arc<SessionStoreError>> {
        self.submit(Input::Request(request), None).await
    }

    /// Answers a keepalive, held for at most `wait` (less if the session's own ttl or
    /// remaining time asks for less) until the authority has a grant to push to its session,
    /// or the session is gone. Handling it only then puts the grant in its reply: hand-off
    /// without polling. The writer handles a held keepalive in the same commit as the input
    /// that made the grant, so a hand-off costs one fsync. The session is renewed when the
    /// keepalive is handled, later than the holder sent it, so the holder's send-anchored
    /// validity stays inside the authority's.
    pub(crate) async fn held_keepalive(
        &self,
        request: SessionRequest,
        wait: StdDuration,
    ) -> Result<SessionReply, Arc<SessionStoreError>> {
        let until = {
            let state = self.lock();
            state.authority.session(request.session).map(|s| {
                let now = self.clock.now();
                // Never long enough for the session to run out while its keepalive waits.
                let bound = Duration::from(wait)
                    .min(s.ttl.mul_div_floor(1, 3))
                    .min((s.expires_at - now).mul_div_floor(1, 2));
                std::time::Instant::now() + StdDuration::from(bound)
            })
        };
        let hold = until.map(|until| (request.session, until));
        self.submit(Input::Request(request), hold).await
    }

    async fn submit(
        &self,
        input: Input,
        hold: Option<(SessionId, std::time::Instant)>,
    ) -> Result<SessionReply, Arc<SessionStoreError>> {
        let (done, result) = async_channel::bounded(1);
        let job = Job { input, hold, applied: None, done };
        self.jobs.send(job).await.map_err(|_| Arc::new(SessionStoreError::Stopped))?;
        result.recv().await.map_err(|_| Arc::new(SessionStoreError::Stopped))?
    }

    /// Submits `input` and answers once it is applied in memory, before its commit: its
    /// reply, and the commit to wait for ([`LogCommit::durable`]).
    async fn submit_applied(
        &self,
        input: Input,
    ) -> Result<(SessionReply, LogCommit), Arc<SessionStoreError>> {
        let (applied, in_memory) = async_channel::bounded(1);
        let (done, committed) = async_channel::bounded(1);
        let job = Job { input, hold: None, applied: Some(applied), done };
        self.jobs.send(job).await.map_err(|_| Arc::new(SessionStoreError::Stopped))?;
        let commit = LogCommit { committed };
        match in_memory.recv().await {
            Ok(reply) => Ok((reply, commit)),
            // Never applied (the log could not be rebuilt after a failure): the commit's
            // answer says why.
            Err(_) => {
                commit.durable().await?;
                Err(Arc::new(SessionStoreError::Stopped))
            }
        }
    }

    /// Holds `key` for a v1 request about to be decided ([`ExternalHold::Pending`]); answers
    /// as soon as the hold is applied in memory, with the key's last fence, which v1's grant
    /// must be above, and the hold's commit, which v1 must wait for before it answers a grant.
    /// Follow it with [`set_external`](Self::set_external), whatever v1 decides (a refused hold
    /// changed nothing and needs neither).
    pub(crate) async fn hold_external(
        &self,
        key: Key,
        exclusive: bool,
    ) -> Result<(Result<Fence, ExternalRefusal>, LogCommit), Arc<SessionStoreError>> {
        let input = Input::HoldExternal { key, hold: ExternalHold::Pending, exclusive };
        let (reply, commit) = self.submit_applied(input).await?;
        let held = match reply {
            SessionReply::Granted { fence, .. } => Ok(fence),
            SessionReply::Busy { expires_in, .. } => Err(ExternalRefusal::Busy { retry_after: expires_in }),
            _ => Err(ExternalRefusal::Capacity),
        };
        Ok((held, commit))
    }

    /// Records what v1 decided for `key`: held for `remaining` from now (`None`: free), and
    /// the highest fence v1 granted it. Answers once it is applied in memory, with its commit.
    pub(crate) async fn set_external(
        &self,
        key: Key,
        remaining: Option<StdDuration>,
        fence: Fence,
    ) -> Result<LogCommit, Arc<SessionStoreError>> {
        let until = remaining.map(|r| self.clock.now() + Duration::from_micros(r.as_micros() as u64));
        Ok(self.submit_applied(Input::SetExternal { key, until, fence }).await?.1)
    }

    /// At a start, before the writer runs: makes the keys held under another protocol exactly
    /// `held` (key, its remaining time, its last fence), other keys' fences continue above
    /// `fences` (key, last fence) and `floor`, logged in one commit. A v1 decision whose
    /// [`set_external`](Self::set_external) a crash cut off is corrected here, and a key v1
    /// forgot while the sessions were not told is covered by the floor.
    pub(crate) fn sync_external(
        &self,
        held: &[(Key, StdDuration, Fence)],
        fences: &[(Key, Fence)],
        floor: Fence,
    ) -> Result<(), SessionStoreError> {
        let mut state = self.lock();
        let now = self.clock.now();
        let mut inputs = Vec::new();
        if floor > Fence::NONE {
            inputs.push(Input::FenceFloor { floor });
        }
        let a = &state.authority;
        let v1_held: std::collections::HashSet<&Key> = held.iter().map(|(k, ..)| k).collect();
        // Holds first, frees last: a key never passes through free on the way.
        for (key, remaining, fence) in held {
            let until = Some(now + Duration::from_micros(remaining.as_micros() as u64));
            inputs.push(Input::SetExternal { key: key.clone(), until, fence: *fence });
        }
        for (key, fence) in fences {
            if a.key(key).is_none_or(|k| k.last_fence < *fence) && !v1_held.contains(key) {
                inputs.push(Input::SetExternal { key: key.clone(), until: None, fence: *fence });
            }
        }
        for (key, _) in a.external_holds() {
            if !v1_held.contains(key) {
                inputs.push(Input::SetExternal { key: key.clone(), until: None, fence: Fence::NONE });
            }
        }
        if inputs.is_empty() {
            return Ok(());
        }
        let entries: Vec<Entry> = inputs.into_iter().map(|input| Entry { now, input }).collect();
        for e in &entries {
            apply(&mut state.authority, e);
        }
        let bytes: Vec<Vec<u8>> = entries.iter().map(encode).collect();
        if let Err(e) = state.db().and_then(|db| append(db, state.next_index, &bytes)) {
            state.diverged = Some(e.to_string());
            return Err(e);
        }
        state.next_index += bytes.len() as u64;
        Ok(())
    }

    /// The keys sessions have used, in byte order, as status pages may show them.
    pub(crate) fn keys(&self, held_only: bool, prefix: &str) -> Vec<KeyView> {
        let state = self.lock();
        let a = &state.authority;
        let now = self.clock.now();
        let mut out: Vec<KeyView> = a
            .keys()
            .filter(|(k, _)| k.starts_with(prefix))
            .filter(|(k, st)| !held_only || st.holder.is_some() || a.external_hold(k).is_some())
            .map(|(k, st)| {
                let view = |h: KeyHolder| {
                    let s: SessionStatus = a.session(h.session)?;
                    Some(HolderView {
                        session: h.session.0,
                        label: s.label.to_string(),
                        fence: h.fence.0,
                        ttl: s.ttl.as_micros(),
                        remaining: (s.expires_at - now).as_micros(),
                        value: a.value(h.session, k).to_string(),
                    })
                };
                KeyView {
                    key: k.to_string(),
                    holder: st.holder.and_then(view),
                    holders: a.holders(k).filter_map(view).collect(),
                    limit: st.limit,
                    last_fence: st.last_fence.0,
                    waiting: st.waiting,
                    v1_remaining: a.external_hold(k).map(|h| match h {
                        ExternalHold::Pending => 0,
                        ExternalHold::Until(t) => (t - now).as_micros(),
                    }),
                }
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// Live sessions and keys known, for `/metrics`.
    pub(crate) fn counts(&self) -> (u64, u64) {
        let state = self.lock();
        (state.authority.sessions().count() as u64, state.authority.keys().count() as u64)
    }

    #[cfg(test)]
    fn key(&self, key: &leasehold_core::Key) -> Option<leasehold_core::session::authority::KeyStatus> {
        self.lock().authority.key(key)
    }
}

/// The commit of an input answered from memory (a v1 hold or set), which the session writer
/// makes whether or not anyone waits for it.
pub(crate) struct LogCommit {
    committed: async_channel::Receiver<Result<SessionReply, Arc<SessionStoreError>>>,
}

impl LogCommit {
    /// Returns once the input is on disk, or why it is not (then a rebuild of the session
    /// table from its log drops it: it never happened).
    pub(crate) async fn durable(self) -> Result<(), Arc<SessionStoreError>> {
        self.committed.recv().await.map_err(|_| Arc::new(SessionStoreError::Stopped))?.map(|_| ())
    }
}

/// The one task that writes.
struct Writer {
    path: PathBuf,
    limits: SessionLimits,
    clock: LogClock,
    state: Arc<Mutex<State>>,
    jobs: async_channel::Receiver<Job>,
    stats: Arc<SessionStats>,
    failing: Failing,
}

impl Writer {
    async fn run(self) {
        // Held keepalives, not yet handled.
        let mut parked: Vec<Job> = Vec::new();
        loop {
            let expiry = {
                let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                state.authority.poll_timeout().map(|t| self.clock.at(t))
            };
            let hold_ends = parked.iter().filter_map(|j| j.hold.map(|(_, until)| until)).min();
            let wake_at = expiry.into_iter().chain(hold_ends).min();
            let job = async { self.jobs.recv().await.ok().map(Some) };
            let first = match wake_at {
                Some(at) => {
                    futures_lite::future::or(job, async {
                        leasehold_timer::Deadline::at(at).await;
                        Some(None)
                    })
                    .await
                }
                None => job.await,
            };
            let mut batch = match first {
                None => return,
                Some(Some(job)) => vec![job],
                Some(None) => Vec::new(),
            };
            while batch.len() < MAX_BATCH {
                match self.jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            parked = self.commit(batch, parked).await;
        }
    }

    /// Applies the batch (after any expiry that is due) and the held keepalives that now have
    /// news, logs them, fsyncs, answers. Returns the keepalives still held.
    async fn commit(&self, batch: Vec<Job>, parked: Vec<Job>) -> Vec<Job> {
        let (state, clock, limits, path) = (self.state.clone(), self.clock, self.limits, self.path.clone());
        let stats = self.stats.clone();
        let (answered, parked, result) = crate::log_work(move || {
            let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
            commit_batch(&mut guard, batch, parked, clock, limits, &path, &stats)
        })
        .await;
        match result {
            Ok(committed) => {
                if committed {
                    self.stats.commits.fetch_add(1, Ordering::Relaxed);
                    *self.failing.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                for (job, reply) in answered {
                    let _ = job.done.try_send(Ok(reply));
                }
            }
            Err(e) => {
                tracing::error!(
                    "session commit failed; {} requests answered unavailable: {e}",
                    answered.len()
                );
                let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
                let since = failing.as_ref().map_or_else(std::time::Instant::now, |(since, _)| *since);
                *failing = Some((since, e.to_string()));
                drop(failing);
                let e = Arc::new(e);
                for (job, _) in answered {
                    let _ = job.done.try_send(Err(e.clone()));
                }
            }
        }
        parked
    }
}

/// What a pass over the authority says about held keepalives: the sessions with news and
/// the sessions alive, each found in one pass however many keepalives are held.
struct Standing {
    news: std::collections::HashSet<SessionId>,
    live: std::collections::HashSet<SessionId>,
    /// Per session, its observed keys with changes it has not acknowledged: the key, the
    /// change acknowledged, and the latest.
    behind: std::collections::HashMap<SessionId, Vec<(leasehold_core::Key, u64, u64)>>,
}

impl State {
    fn db(&self) -> Result<&Database, SessionStoreError> {
        self.db
            .as_ref()
            .ok_or_else(|| SessionStoreError::Down("the session log is closed after a failure".into()))
    }
}

impl Standing {
    fn of(authority: &Authority) -> Standing {
        let mut behind: std::collections::HashMap<_, Vec<_>> = std::collections::HashMap::new();
        for (session, key, acked, latest) in authority.observers_behind() {
            behind.entry(session).or_default().push((key.clone(), acked, latest));
        }
        Standing {
            news: authority.sessions_with_news().collect(),
            live: authority.sessions().map(|s| s.id).collect(),
            behind,
        }
    }

    /// Whether a held keepalive is to be handled now: its hold is over, or core's rule
    /// ([`SessionAuthority::keepalive_due_given`]) says so on the facts gathered in
    /// [`of`](Self::of)'s one pass.
    fn due(&self, authority: &Authority, job: &Job, at: std::time::Instant) -> bool {
        let Some((session, until)) = job.hold else { return false };
        let op = match &job.input {
            Input::Request(r) => &r.op,
            _ => &SessionOp::KeepAlive,
        };
        let behind =
            self.behind.get(&session).into_iter().flatten().map(|(k, acked, latest)| (k, *acked, *latest));
        until <= at
            || authority.keepalive_due_given(
                self.live.contains(&session),
                self.news.contains(&session),
                behind,
                op,
            )
    }
}

/// The jobs answered (with their replies), the keepalives still held, and whether anything
/// was committed.
type Committed = (Vec<(Job, SessionReply)>, Vec<Job>, Result<bool, SessionStoreError>);

fn commit_batch(
    state: &mut State,
    batch: Vec<Job>,
    mut parked: Vec<Job>,
    clock: LogClock,
    limits: SessionLimits,
    path: &Path,
    stats: &SessionStats,
) -> Committed {
    let mut answered: Vec<(Job, SessionReply)> = Vec::with_capacity(batch.len());
    if let Some(cause) = state.diverged.clone() {
        // The failed batch was applied in memory only: rebuild from what is on disk. redb
        // refuses every transaction after an I/O error until re-opened, so re-open it first.
        tracing::warn!("rebuilding the session table from its log after: {cause}");
        let fail = |e: SessionStoreError| SessionStoreError::Down(format!("{cause}; then {e}"));
        state.db = None;
        let rebuilt = Database::create(path)
            .map_err(|e| fail(SessionStoreError::db(e)))
            .and_then(|db| replay(&db, limits).map_err(fail).map(|r| (db, r)));
        match rebuilt {
            Ok((db, (authority, next_index, _))) => {
                (state.db, state.authority, state.next_index, state.diverged) =
                    (Some(db), authority, next_index, None);
                stats.rebuilds.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                answered.extend(batch.into_iter().map(|j| (j, SessionReply::Expired)));
                return (answered, parked, Err(e));
            }
        }
    }
    let now = clock.now();
    let wall = std::time::Instant::now();
    let mut entries = Vec::with_capacity(batch.len() + 1);
    // The expiry first, as its own input, so that its hand-offs replay identically.
    if state.authority.poll_timeout().is_some_and(|t| t <= now) {
        let entry = Entry { now, input: Input::Timeout };
        apply(&mut state.authority, &entry);
        entries.push(encode(&entry));
        stats.timeouts.fetch_add(1, Ordering::Relaxed);
    }
    let mut handle = |state: &mut State, job: Job, entries: &mut Vec<Vec<u8>>| {
        let entry = Entry { now, input: job.input.clone() };
        let reply = apply(&mut state.authority, &entry).unwrap_or(SessionReply::Expired);
        match reply {
            SessionReply::Alive { granted: Some(_), .. }
            | SessionReply::AliveObserved { granted: Some(_), .. } => {
                stats.pushed.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if let SessionReply::AliveObserved { .. } = reply {
            stats.observed.fetch_add(1, Ordering::Relaxed);
        }
        count(stats, &job.input);
        entries.push(encode(&entry));
        if let Some(applied) = &job.applied {
            let _ = applied.try_send(reply.clone());
        }
        answered.push((job, reply));
    };
    // Held keepalives of this batch wait with the others; the rest are handled in order.
    for job in batch {
        match job.hold {
            Some(_) => parked.push(job),
            None => handle(state, job, &mut entries),
        }
    }
    // Held keepalives whose session has news (or ended), or whose hold is over: answered in
    // this same commit, so a hand-off costs one fsync. Handling one may expire sessions and so
    // hand keys to others: until none is due. One pass over the keys finds every session with
    // news, however many keepalives are held.
    loop {
        // A holder that hung up no longer waits for the answer.
        parked.retain(|j| !j.done.is_closed());
        if parked.is_empty() {
            break;
        }
        let standing = Standing::of(&state.authority);
        let (now_due, still): (Vec<Job>, Vec<Job>) =
            parked.into_iter().partition(|j| standing.due(&state.authority, j, wall));
        parked = still;
        if now_due.is_empty() {
            break;
        }
        for job in now_due {
            handle(state, job, &mut entries);
        }
    }
    if entries.is_empty() {
        return (answered, parked, Ok(false));
    }
    #[cfg(feature = "fault-injection")]
    let injected = state.fail_v1_commits.load(Ordering::Relaxed)
        && answered
            .iter()
            .any(|(j, _)| matches!(j.input, Input::HoldExternal { .. } | Input::SetExternal { .. }));
    #[cfg(not(feature = "fault-injection"))]
    let injected = false;
    let appended = if injected {
        Err(SessionStoreError::Db(redb::Error::Io(std::io::Error::other("injected: the disk is full"))))
    } else {
        state.db().and_then(|db| append(db, state.next_index, &entries))
    };
    let result = match appended {
        Ok(()) => {
            state.next_index += entries.len() as u64;
            if state.next_index - state.snapshot_at >= SNAPSHOT_EVERY {
                match state.db().and_then(|db| snapshot(db, &state.authority, state.next_index, now)) {
                    Ok(()) => state.snapshot_at = state.next_index,
                    // The log is whole: only the cut is missed. redb refuses the next
                    // transaction after an I/O error, and that append takes the failure path.
                    Err(e) => tracing::warn!("session snapshot failed: {e}"),
                }
            }
            Ok(true)
        }
        Err(e) => {
            stats.log_failures.fetch_add(1, Ordering::Relaxed);
            state.diverged = Some(e.to_string());
            Err(e)
        }
    };
    (answered, parked, result)
}

fn count(stats: &SessionStats, input: &Input) {
    let c = match input {
        Input::Open { .. } => &stats.opens,
        Input::Request(r) => match r.op {
            SessionOp::KeepAlive | SessionOp::KeepAliveSeen { .. } => &stats.keepalives,
            SessionOp::Acquire { .. }
            | SessionOp::AcquireWithLimit { .. }
            | SessionOp::AcquireWithValue { .. } => &stats.acquires,
            SessionOp::Observe { .. } | SessionOp::Unobserve { .. } => &stats.observes,
            SessionOp::Release { .. } => &stats.releases,
            SessionOp::Close => &stats.closes,
            SessionOp::Open { .. } => return,
        },
        Input::Timeout
        | Input::Recover
        | Input::HoldExternal { .. }
        | Input::SetExternal { .. }
        | Input::FenceFloor { .. } => return,
    };
    c.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_core::session::wire::{parse_label, Seq};
    use leasehold_core::{parse_key, Fence};
    use redb::ReadableTableMetadata;

    #[test]
    fn the_table_is_built_off_the_stack_and_the_log_replays_it_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let limits = SessionLimits::default();
        let key = parse_key("k").unwrap();
        let id = {
            let (s, writer) = Sessions::open(dir.path(), limits).unwrap();
            let ex = smol::LocalExecutor::new();
            ex.spawn(writer).detach();
            smol::block_on(ex.run(async {
                let ttl = Duration::from_secs(30);
                let SessionReply::Opened { session, secret, .. } =
                    s.open_session(ttl, parse_label("a").unwrap()).await.unwrap()
                else {
                    panic!("not opened")
                };
                let acquire = |seq| SessionRequest {
                    session,
                    secret,
                    seq: Seq(seq),
                    op: SessionOp::Acquire { key: key.clone(), wait: false },
                };
                assert_eq!(
                    s.request(acquire(2)).await.unwrap(),
                    SessionReply::Granted { key: key.clone(), fence: Fence(1) }
                );
                let release = SessionRequest {
                    session,
                    secret,
                    seq: Seq(3),
                    op: SessionOp::Release { key: key.clone(), fence: Fence(1) },
                };
                assert_eq!(s.request(release).await.unwrap(), SessionReply::Released { key: key.clone() });
                assert_eq!(
                    s.request(acquire(4)).await.unwrap(),
                    SessionReply::Granted { key: key.clone(), fence: Fence(2) }
                );
                session
            }))
        };
        let (s, writer) = Sessions::open(dir.path(), limits).unwrap();
        let st = s.key(&key).unwrap();
        assert_eq!(st.last_fence, Fence(2));
        assert_eq!(st.holder.map(|h| h.session), Some(id));
        let state = s.lock();
        assert!(state.authority.session(id).is_some(), "the session survives the restart");
        // The start wrote a snapshot of everything and cut the log: the next start decodes it
        // and replays nothing.
        let log_len = |db: &Database| db.begin_read().unwrap().open_table(LOG).unwrap().len().unwrap();
        assert_eq!(log_len(state.db.as_ref().unwrap()), 0);
        drop(state);
        drop((s, writer));
        let (s, _writer) = Sessions::open(dir.path(), limits).unwrap();
        assert_eq!(s.key(&key).unwrap().last_fence, Fence(2), "restored from the snapshot");
        assert!(s.lock().authority.session(id).is_some());
    }

    #[test]
    fn a_snapshot_of_the_older_layout_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join("sessions.redb")).unwrap();
            // What a server with waiters inline in each key wrote: no `format` field.
            let old = br#"{"covers":4,"last":17,"authority":{"sessions":[],"keys":{"k":{"holder":null,"last_fence":3,"waiters":[]}},"next_id":2}}"#;
            let txn = db.begin_write().unwrap();
            txn.open_table(SNAPSHOT).unwrap().insert(SNAPSHOT_KEY, old.as_slice()).unwrap();
            txn.open_table(LOG)
                .unwrap()
                .insert(4, encode(&Entry { now: Instant::from_micros(18), input: Input::Timeout }).as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let Err(e) = Sessions::open(dir.path(), SessionLimits::default()) else {
            panic!("an old snapshot was read")
        };
        assert!(matches!(e, SessionStoreError::SnapshotFormat { found: 1, reads: 2 }), "{e}");
        assert!(
            e.to_string().contains("layout 1") && e.to_string().contains("another leasehold version"),
            "{e}"
        );
    }
}
