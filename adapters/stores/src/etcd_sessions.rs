//! Protocol v2 (sessions, FIFO waiting, pushed hand-off) on etcd, the way etcd's own
//! `client/v3/concurrency` `Session` and `Mutex` do it.
//!
//! - A session is one etcd lease: every key the session holds or waits for is attached to it,
//!   so one lease keepalive renews them all, and the lease's end (expiry, revoke) deletes them
//!   all at the same revision.
//! - Each key has a queue in etcd: a waiter key `<prefix>v2/<key>@<lease id, 16 hex digits>`
//!   per session that wants the key, created with the session's lease. The queue's order is
//!   the waiter keys' create revisions; the first holds the key, under the fence of its create
//!   revision. `@` is not in the key alphabet, so `<prefix>v2/<key>@` prefixes exactly that
//!   key's waiters (a `/` would also take in the waiters of `<key>/…`).
//! - A waiter watches its predecessor's deletion (not the holder's: no herd at each release)
//!   from inside a keepalive held open for up to `hold`, and the keepalive answers at once with
//!   the grant when the session has become first.
//! - A semaphore (`AcquireWithLimit`, limit N) is N slots: the first N waiter keys hold it, each
//!   under its own fence (its create revision). Every waiter key's value records its limit, and
//!   the key's is its oldest waiter key's: a session asking with another N sees it in its
//!   acquire's txn and is refused [`Reject::LimitMismatch`], as by the built-in server. A waiter beyond
//!   the N slots can be made a holder by the deletion of any key ahead of it (a holder's
//!   release, or a waiter ahead giving up), so it watches the deletions in its key's whole
//!   queue: one watch per waited key, re-read at each deletion in that queue.
//! - Observing a key ([`SessionOp::Observe`]) is a watch of its queue, from a keepalive held
//!   open like a waiter's: see "Observers and their change numbers" below.
//!
//! A waiter key's value is a JSON object `{"label","limit","value"}`: who waits (an operator
//! reading etcd sees it), the limit it asked for, and the value observers are told
//! (`AcquireWithValue`; empty otherwise). A value that is not such an object (written by an
//! older leasehold) is read as a label, with a limit of 1.
//!
//! # Observers and their change numbers
//!
//! An observer follows the key's oldest waiter key, its holder (for a semaphore, its oldest
//! grant, as on the built-in server; a v1 holder's entry `<prefix>v2/<key>@v1` is a holder
//! too). This process keeps a replica of each observed key's queue (its waiter keys with their
//! values) and the revision it is current at, and records a change, numbered per observation
//! from 1 (the holder when the observation began), for each holder (session, fence) the queue
//! passes through, in order:
//!
//! - At each keepalive of the observing session it reads the queue. A read whose oldest
//!   waiter key is the replica's, created and modified at the same revisions, proves that the
//!   holder did not change in between (it lived throughout, and nobody joins ahead of it): the
//!   read becomes the replica. Otherwise it replays the queue's puts and deletes from the
//!   revision after the replica's, with a watch that etcd answers from its history, and
//!   records each holder the queue went through, until the replica has reached the read.
//! - A held keepalive watches the queue from the replica's revision on, applying its events
//!   as they come, and answers when one records a change. So a key free at two reads and
//!   taken and given back in between (which a read cannot tell from a key nobody touched) is
//!   heard from the keepalive held after the first: a session that never holds its keepalives
//!   hears it only at its next held one.
//! - A state is what holds after a whole revision: a release that hands the key straight to
//!   the next waiter (the delete's revision) is one change, never an instant of free, and a
//!   revoke that deletes several waiter keys at once is one change too. An event at or before
//!   the replica's revision is skipped, so two watches replaying the same history record it
//!   once.
//! - The last [`OBSERVED_HISTORY`] (8) changes of each observed key are kept, as the built-in
//!   server keeps them: an observer further behind is reported the oldest kept, whose number
//!   shows the gap (the client logs it), so a laggard costs no more memory than that.
//! - History etcd compacted (the replay's watch is cancelled with a `compact_revision`), or
//!   that cannot be replayed (the watch refused or cut off, or no answer within the request
//!   timeout), falls back to the read: the holder now is recorded as the next change if it is
//!   another, the holders in between are not heard, and this process logs that (a warning).
//!   A compaction is no gap when the holder read is the replica's, unmodified: it held
//!   throughout.
//!
//! So the numbers are dense as [`Observed::change`] promises, and a gap in them means the
//! observer lagged more than 8 changes behind, or a report was lost or overtaken. They are not
//! etcd revisions: a revision counts every write of the whole cluster, so the holder machine
//! would count each unrelated write as a missed change. They need not survive a restart of
//! this process, because the session does not: a new process's session observes afresh and
//! its first report is the holder at that time. Each keepalive reads every observed queue
//! whole, with its values (a queue of n waiters is n kvs).
//!
//! [`Observed::change`]: leasehold_core::session::wire::Observed::change
//!
//! etcd does not know the session's [`Secret`]: it is drawn here and checked here, so it only
//! guards against a confused caller of this process. Who may touch the keys is etcd's own
//! authorisation: TLS client certificates (`--client-cert-auth`) and RBAC on the prefix.
//!
//! v1 ([`EtcdBackend`](crate::EtcdBackend)) and v2 share one key namespace: a v1 holder keeps
//! its key at `<prefix><key>` and also stands in the key's queue as the entry
//! `<prefix>v2/<key>@v1` on its own etcd lease, so a session queues behind it (and a v1
//! acquire is refused while the queue is not empty). A session waiting behind a v1 holder
//! watches that entry's deletion like any predecessor's, and is pushed the key at the v1
//! release or expiry; fences are create revisions on both sides, so they increase across both.
//! The argument is in [`EtcdBackend`](crate::EtcdBackend)'s module doc.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use event_listener::Event;
use futures_lite::future;
use http_body_util::Full;
use hyper::body::Bytes;
use leasehold_core::session::wire::{
    parse_label, parse_value, Grant, Observed, ObservedHolder, Secret, Seq, SessionId, SessionOp,
    SessionReply, SessionRequest, SessionResponse, OBSERVED_HISTORY,
};
use leasehold_core::{Duration as LDuration, Fence, Key, Reject};
use leasehold_http::{HttpClient, SessionBackend, TransportError, MAX_IN_FLIGHT};
use serde_json::{json, Value};

use crate::session_exchange::{respond, session_of, Fail};

use crate::listing::{Filter, ListError, DEFAULT_PAGE};

use crate::etcd::{
    error_message, grant_body, int, keepalive_ttl, range_end, refusal, remaining_time, stored_key, Refusal,
    UNKNOWN_WAIT, V1_ENTRY,
};

/// Most watches one held keepalive keeps at once (one streamed request each: a waiter's
/// predecessor, a semaphore's queue, an observed queue). A session waiting for or observing
/// more keys than this checks the others at each keepalive, so their hand-off (or change) can
/// take up to a keepalive interval to be heard.
pub const MAX_WATCHES: usize = 16;

/// Most queues one check reads in one txn: etcd's default `--max-txn-ops` is 128.
const MAX_TXN_OPS: usize = 128;

/// Most keys one session observes at once; one more is refused `Rejected(Capacity)`. Each
/// observed key is one more queue read at every keepalive of the session.
pub const MAX_OBSERVED: usize = 256;

/// Most holders' leases a `Busy` answer asks etcd about, to say when the first slot ends.
const MAX_TTL_LOOKUPS: usize = 8;

/// A bug planted on purpose, so the tests can show they catch it (feature `fault-injection`;
/// never in a real build).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EtcdFault {
    /// The waiter right behind the last slot is granted too (the second in line for a key,
    /// the N+1-th for a semaphore of N): exclusion is broken.
    SecondInLineGranted,
    /// Held keepalives watch nothing: a waiter hears of its turn only at its next keepalive.
    NoWatch,
    /// A v1 acquire ([`EtcdBackend::with_fault`](crate::EtcdBackend::with_fault)) does not
    /// look at the key's v2 queue: a v1 holder and a session can hold the key at once.
    V1IgnoresSessions,
}

/// Sessions on an etcd cluster's v3 JSON gateway (etcd 3.4+), as a [`SessionBackend`] for
/// [`SessionClient`](leasehold_http::SessionClient).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use leasehold_http::{Options, SessionClient};
/// use leasehold_stores::EtcdSessions;
///
/// let options = Options::session(Duration::from_secs(15));
/// let timeout = options.config.request_timeout.into();
/// let etcd = EtcdSessions::new("http://127.0.0.1:2379", "leasehold/", timeout)?;
/// let client = SessionClient::new(etcd, "worker-1", options)?;
/// let lease = client.acquire("nightly-report").await?; // queued FIFO, pushed when first
/// println!("fence {:?}", lease.fence());
/// lease.release().await?;
/// # Ok(()) }
/// ```
///
/// The session's state that etcd cannot keep (its secret, which keys it waits for and which
/// grants it has not confirmed yet) lives in this value: a session is usable only through the
/// `EtcdSessions` that opened it; to any other it is [`Expired`](SessionReply::Expired).
pub struct EtcdSessions {
    /// Opens, acquires, releases, closes.
    http: HttpClient,
    /// Keepalives and the queue reads they make, so a held one never waits behind acquires.
    keepalive_http: HttpClient,
    /// The held keepalives' watch streams: a connection each while it lasts.
    watch_http: HttpClient,
    /// `<prefix>v2/`.
    prefix: String,
    /// How long replaying an observed key's history may take before the holder now is told
    /// instead: the request timeout.
    catch_up: Duration,
    /// `<prefix>`, where v1 ([`EtcdBackend`](crate::EtcdBackend)) keeps its keys.
    v1_prefix: String,
    sessions: Mutex<HashMap<SessionId, Arc<Local>>>,
    #[cfg(feature = "fault-injection")]
    fault: Option<EtcdFault>,
}

/// What this process knows of one of its sessions.
struct Local {
    secret: Secret,
    /// The etcd lease: the session's id.
    lease: i64,
    /// Written in each waiter key's value, so an operator reading etcd sees who waits.
    label: String,
    keys: Mutex<HashMap<Key, Want>>,
    /// The keys the session observes.
    observed: Mutex<HashMap<Key, Follow>>,
    /// A key was queued or observed: a held keepalive has one more queue to watch.
    queued: Event,
}

/// One observation of a key by a session.
#[derive(Debug, Clone)]
struct Follow {
    /// The seq of the observe that began it: an unobserve older than that is not for it.
    since: Seq,
    /// The highest change the session acknowledged.
    acked: u64,
    /// The changes recorded, oldest first: the last [`OBSERVED_HISTORY`], as the built-in
    /// server keeps, so a laggard costs no more than that (empty: the queue not read yet).
    changes: VecDeque<Change>,
    /// The key's queue as this process last knew it (`None`: to be read afresh).
    replica: Option<Replica>,
}

/// One recorded change of an observed key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Change {
    number: u64,
    holder: Option<ObservedHolder>,
}

/// An observed key's queue (its waiter keys' kvs, with values, in create order) at a revision:
/// the state that replaying the queue's events from `at + 1` moves through.
#[derive(Debug, Clone, PartialEq)]
struct Replica {
    at: i64,
    queue: Vec<Value>,
    /// etcd compacted the history after `at`: it cannot be replayed, only read afresh.
    compacted: bool,
}

/// What a read of an observed queue did to its replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caught {
    /// Brought to the read with nothing missed (or nothing to replay yet).
    Current,
    /// The queue's history must be replayed from this revision first.
    ReplayFrom(i64),
    /// Its history was compacted: the holder now is recorded, the changes before it may not
    /// have been heard.
    Coalesced,
}

/// What one watch message did to an observed key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replayed {
    /// Its events were applied; whether a change was recorded.
    Applied { changed: bool },
    /// etcd compacted the history asked for (its compact revision): the replica is marked, to
    /// be read afresh.
    Compacted(i64),
    /// The watch failed or was cancelled otherwise; nothing was applied.
    Failed,
}

impl Follow {
    fn new(since: Seq) -> Follow {
        Follow { since, acked: 0, changes: VecDeque::new(), replica: None }
    }

    /// The latest change's number (0: none yet; the first is the holder when it began).
    fn latest(&self) -> u64 {
        self.changes.back().map_or(0, |c| c.number)
    }

    fn behind(&self) -> bool {
        self.acked < self.latest()
    }

    /// The oldest change not acknowledged still kept (for a laggard, the oldest kept: its
    /// number shows the gap).
    fn report(&self) -> Option<&Change> {
        self.changes.iter().find(|c| c.number > self.acked)
    }

    /// Records `holder` as the next change if it is not the holder recorded last.
    fn record(&mut self, holder: Option<ObservedHolder>) -> bool {
        let same = self.changes.back().is_some_and(|c| match (&c.holder, &holder) {
            (None, None) => true,
            (Some(a), Some(b)) => a.session == b.session && a.fence == b.fence,
            _ => false,
        });
        if same {
            return false;
        }
        let number = self.latest() + 1;
        self.changes.push_back(Change { number, holder });
        while self.changes.len() > OBSERVED_HISTORY {
            self.changes.pop_front();
        }
        true
    }

    /// Takes the read of the key's queue `kvs` at revision `at`: the replica is brought to it
    /// if that needs no history (see [`Replica::adopt`]), or must be replayed from its
    /// revision first.
    fn read(&mut self, kvs: &[Value], at: i64) -> Caught {
        let Some(r) = &mut self.replica else {
            self.resync(kvs, at);
            return Caught::Current;
        };
        if r.adopt(kvs, at) {
            return Caught::Current;
        }
        if r.compacted {
            self.resync(kvs, at);
            return Caught::Coalesced;
        }
        // Ahead of the read already (a watch applied what came after it).
        if r.at >= at {
            return Caught::Current;
        }
        Caught::ReplayFrom(r.at + 1)
    }

    /// The replica becomes the read `kvs` at `at`, and its holder a change if it is another:
    /// the first report, or catching up after history that could not be replayed
    /// (coalesced, with the holders in between not heard).
    fn resync(&mut self, kvs: &[Value], at: i64) {
        let replica = Replica { at, queue: kvs.to_vec(), compacted: false };
        self.record(replica.holder());
        self.replica = Some(replica);
    }

    /// Applies one watch message of the key's queue: its events in revision order, each
    /// revision a whole step (a release that hands the key to the next waiter, a revoke that
    /// deletes several keys), recording each holder the queue passes through. Events at or
    /// before the replica's revision are skipped, so two watches replaying the same history
    /// record it once.
    fn replay(&mut self, m: &Value) -> Replayed {
        let result = &m["result"];
        if let Some(compacted) = int(&result["compact_revision"]).filter(|c| *c > 0) {
            if let Some(r) = &mut self.replica {
                r.compacted = true;
            }
            return Replayed::Compacted(compacted);
        }
        if result["canceled"] == json!(true) || !m["error"].is_null() {
            return Replayed::Failed;
        }
        let Some(mut replica) = self.replica.take_if(|r| !r.compacted) else { return Replayed::Failed };
        let mut changed = false;
        let events = result["events"].as_array().map(Vec::as_slice).unwrap_or_default();
        for (i, event) in events.iter().enumerate() {
            let Some(revision) = int(&event["kv"]["mod_revision"]).filter(|r| *r > replica.at) else {
                continue;
            };
            replica.apply(event);
            // etcd sends a revision's events together, in one message: the step ends with the
            // last event of its revision.
            let next = events.get(i + 1).and_then(|e| int(&e["kv"]["mod_revision"]));
            if next != Some(revision) {
                replica.at = revision;
                changed |= self.record(replica.holder());
            }
        }
        self.replica = Some(replica);
        Replayed::Applied { changed }
    }
}

impl Replica {
    /// The holder: the oldest waiter key's session (a semaphore's oldest grant), or a v1
    /// holder's entry.
    fn holder(&self) -> Option<ObservedHolder> {
        self.queue.first().and_then(observed_holder)
    }

    /// Becomes the read `kvs` (the queue in create order) at `at` if no holder can have come
    /// between them, and says whether it did.
    ///
    /// Why a read whose oldest waiter key is the replica's, created and modified at the same
    /// revisions, has missed no change: that key is alive at `at` unmodified, so it lived
    /// throughout (deleted and put again, it would have another create revision), and no key
    /// created later can be older; the holder never changed, and the waiters that came and
    /// went behind it are no change. An empty replica and an empty read prove nothing (a
    /// session may have taken the key and given it back in between): the replica stays where
    /// it was, for a held keepalive's watch to replay from, unless its history was compacted
    /// (nothing can be replayed, and there is nothing to tell).
    fn adopt(&mut self, kvs: &[Value], at: i64) -> bool {
        let id = |kv: &Value| (kv["key"].clone(), int(&kv["create_revision"]), int(&kv["mod_revision"]));
        match (self.queue.first(), kvs.first()) {
            (Some(mine), Some(read)) if id(mine) == id(read) => {
                // A replica ahead of the read stays as it is.
                if at >= self.at {
                    self.queue = kvs.to_vec();
                    self.at = at;
                    self.compacted = false;
                }
                true
            }
            (None, None) => {
                if self.compacted {
                    self.at = self.at.max(at);
                    self.compacted = false;
                }
                true
            }
            _ => false,
        }
    }

    /// One watch event: a put adds its waiter key in create order (or replaces it), a delete
    /// removes it.
    fn apply(&mut self, event: &Value) {
        let kv = &event["kv"];
        self.queue.retain(|q| q["key"] != kv["key"]);
        if event["type"] == json!("DELETE") {
            return;
        }
        // A put's type is etcd's default, so the gateway leaves it out.
        let created = int(&kv["create_revision"]).unwrap_or(i64::MAX);
        let at = self.queue.partition_point(|q| int(&q["create_revision"]).unwrap_or(0) <= created);
        self.queue.insert(at, kv.clone());
    }
}

/// What a waiter key's value records.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stake {
    label: String,
    /// The limit the waiter asked for (1: a plain key).
    limit: u16,
    /// What observers are told (empty: nothing).
    value: String,
}

impl Stake {
    fn encode(&self) -> String {
        json!({"label": self.label, "limit": self.limit, "value": self.value}).to_string()
    }

    /// From a range answer's kv; a value that is not ours is an older leasehold's label.
    fn of(kv: &Value) -> Stake {
        let raw = kv["value"].as_str().and_then(|v| B64.decode(v).ok()).unwrap_or_default();
        let v: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        match (v["label"].as_str(), v["limit"].as_u64()) {
            (Some(label), Some(limit)) => Stake {
                label: label.to_string(),
                limit: u16::try_from(limit).unwrap_or(u16::MAX),
                value: v["value"].as_str().unwrap_or_default().to_string(),
            },
            _ => Stake { label: String::from_utf8_lossy(&raw).into_owned(), limit: 1, value: String::new() },
        }
    }
}

/// Where the session is with a key it asked for and has not been confirmed.
#[derive(Debug, Clone)]
enum Want {
    /// Waiting behind other sessions' waiter keys.
    Queued {
        /// The seq of the acquire that queued it, reported with its grant.
        asked: Seq,
        /// The create revision of this session's waiter key.
        revision: i64,
        /// How many may hold the key at once.
        limit: u16,
        /// What observers are told once it holds the key (empty: nothing).
        value: String,
    },
    /// First in the queue, reported in keepalives until an acquire confirms it.
    Pushed(Grant),
}

/// What a held keepalive watches: one key's deletion, or a queue's changes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Watched {
    /// The key, or the start of the range (base64).
    key: String,
    /// The range's end (base64), for a whole queue.
    range_end: Option<String>,
    /// Deletions only (a waiter cares for nothing else); an observer wants puts too.
    deletions_only: bool,
    /// The observed key whose queue this is: its events are replayed into its replica.
    follows: Option<Key>,
}

/// The answer of a keepalive held open.
enum Wake {
    /// A predecessor went, or a key was queued: look again.
    Look,
    /// `hold` is up.
    Timer,
}

/// A protocol-v2 key as etcd keeps it, for `leasehold status --protocol v2`: its holders and
/// how many wait. etcd deletes a queue's last waiter key with its release or its lease, so a
/// listed key always has a holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStatus {
    /// The lease key, without the `<prefix>v2/` it is stored under.
    pub key: String,
    /// How many sessions may hold it at once (as its oldest waiter key asked).
    pub limit: u16,
    /// Its holders, the oldest grant first (a semaphore's key has up to `limit`).
    pub holders: Vec<SlotHolder>,
    /// How many sessions wait for it.
    pub waiting: usize,
    /// Held by a v1 holder ([`EtcdBackend`](crate::EtcdBackend)) instead of a session.
    pub v1_holder: Option<V1Holder>,
}

/// A v1 holder of a key, as the key's v2 queue shows it: v1 and v2 share one key namespace on
/// etcd, so a session is refused (or queues behind) a key a v1 client holds.
///
/// ```
/// use std::time::Duration;
/// use leasehold_core::{parse_key, Duration as LDuration, Op, OwnerId, Reply, Request, RequestId};
/// use leasehold_http::{AcquireError, Backend, Options, SessionClient};
/// use leasehold_stores::{EtcdBackend, EtcdSessions, Filter};
///
/// # let etcd = leasehold_test_servers::etcd();
/// # let url = etcd.url();
/// futures_lite::future::block_on(async {
///     let v1 = EtcdBackend::new(url, "leasehold/", Duration::from_secs(2))?;
///     let acquire = Op::Acquire { ttl: LDuration::from_secs(10) };
///     let request = Request { id: RequestId(1), owner: OwnerId(7), op: acquire };
///     let Reply::Granted { fence, .. } = v1.call(&parse_key("pump")?, request).await? else {
///         panic!("the key is free")
///     };
///
///     let options = Options::session(Duration::from_secs(6));
///     let timeout = options.config.request_timeout.into();
///     let worker = SessionClient::new(EtcdSessions::new(url, "leasehold/", timeout)?, "worker-1", options)?;
///     assert_eq!(worker.try_acquire("pump").await.unwrap_err(), AcquireError::Busy);
///
///     let queues = EtcdSessions::new(url, "leasehold/", timeout)?.list(&Filter::default()).await?;
///     let held = queues[0].v1_holder.as_ref().expect("held by v1");
///     assert_eq!((queues[0].key.as_str(), held.fence), ("pump", fence));
///     Ok::<(), Box<dyn std::error::Error>>(())
/// })
/// .unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Holder {
    /// Its fence (the v1 key's revision, and its queue entry's create revision).
    pub fence: Fence,
    /// How long its etcd lease has left (zero if it ended since the listing's read).
    pub remaining: Duration,
}

/// One holder of a v2 key on etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotHolder {
    /// The holding session: its etcd lease id.
    pub session: u64,
    /// The holder's label (`leasehold run`: `HOST:PID`).
    pub label: String,
    /// The grant's fence: its waiter key's create revision.
    pub fence: Fence,
    /// What the holder acquired with (`run --value`); empty if nothing.
    pub value: String,
    /// The session's ttl, as etcd granted its lease.
    pub ttl: Option<Duration>,
    /// How long etcd keeps the session without a keepalive.
    pub remaining: Option<Duration>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl EtcdSessions {
    /// Sessions on the etcd client URL `url` (e.g. `http://127.0.0.1:2379`, or `https://…`
    /// with the default `tls` feature), keys under `<prefix>v2/`; `timeout` is the per-request
    /// timeout (the session's request timeout: [`Options::session`] gives ttl/3). Nothing is
    /// contacted until the first call.
    ///
    /// [`Options::session`]: leasehold_http::Options::session
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<EtcdSessions, TransportError> {
        Ok(EtcdSessions {
            http: HttpClient::new(url, timeout)?.with_max_connections(MAX_IN_FLIGHT),
            keepalive_http: HttpClient::new(url, timeout)?.with_max_connections(2),
            watch_http: HttpClient::new(url, timeout)?.with_max_connections(2 * MAX_WATCHES),
            prefix: format!("{prefix}v2/"),
            catch_up: timeout,
            v1_prefix: prefix.to_string(),
            sessions: Mutex::new(HashMap::new()),
            #[cfg(feature = "fault-injection")]
            fault: None,
        })
    }

    /// Every v2 key under `filter.prefix` that has a waiter key, in byte order, with its holders
    /// (each with its session's remaining time from its etcd lease) and how many wait. Read a
    /// page of 1000 waiter keys at a time over `<prefix>v2/`. etcd keeps no free key, so
    /// `filter.held_only` changes nothing.
    ///
    /// ```
    /// use std::num::NonZeroU16;
    /// use std::time::Duration;
    /// use leasehold_http::{Options, SessionClient};
    /// use leasehold_stores::{EtcdSessions, Filter};
    ///
    /// # let etcd = leasehold_test_servers::etcd();
    /// # let url = etcd.url();
    /// futures_lite::future::block_on(async {
    ///     let options = Options::session(Duration::from_secs(6));
    ///     let timeout = options.config.request_timeout.into();
    ///     let worker = SessionClient::new(EtcdSessions::new(url, "leasehold/", timeout)?, "worker-1", options)?;
    ///     let slot = worker.acquire_with_limit("pool", NonZeroU16::new(2).unwrap()).await?;
    ///
    ///     let etcd = EtcdSessions::new(url, "leasehold/", timeout)?;
    ///     let queues = etcd.list(&Filter::default()).await?;
    ///     let pool = &queues[0];
    ///     assert_eq!((pool.key.as_str(), pool.limit, pool.waiting), ("pool", 2, 0));
    ///     assert_eq!(pool.holders[0].label, "worker-1");
    ///     assert_eq!(Some(pool.holders[0].fence), slot.fence());
    ///     slot.release().await?;
    ///     Ok::<(), Box<dyn std::error::Error>>(())
    /// })
    /// .unwrap();
    /// ```
    pub async fn list(&self, filter: &Filter) -> Result<Vec<QueueStatus>, ListError> {
        let start = format!("{}{}", self.prefix, filter.prefix).into_bytes();
        let end = B64.encode(range_end(&start));
        let mut from = start;
        // Per key, its waiter keys as (create revision, lease, stake, whether a v1 holder's).
        let mut queues: std::collections::BTreeMap<String, Vec<(i64, i64, Stake, bool)>> = Default::default();
        loop {
            let range =
                json!({"key": B64.encode(&from), "range_end": end, "limit": DEFAULT_PAGE.to_string()});
            let page = self.read("/v3/kv/range", range).await?;
            let kvs = page["kvs"].as_array().map(Vec::as_slice).unwrap_or_default();
            for kv in kvs {
                let Some(raw) = stored_key(kv) else { continue };
                let Some(name) = raw.strip_prefix(self.prefix.as_bytes()) else { continue };
                // `<key>@<lease>`: `@` is not in the key alphabet, so the last one splits.
                let Some(at) = name.iter().rposition(|b| *b == b'@') else { continue };
                let Ok(key) = std::str::from_utf8(&name[..at]) else { continue };
                let (Some(revision), Some(lease)) = (int(&kv["create_revision"]), int(&kv["lease"])) else {
                    continue;
                };
                let v1 = &name[at + 1..] == V1_ENTRY.as_bytes();
                queues.entry(key.to_string()).or_default().push((revision, lease, Stake::of(kv), v1));
            }
            match kvs.last() {
                // The next page starts just after the last key of this one.
                Some(last) if page["more"] == json!(true) => {
                    from = stored_key(last).ok_or_else(|| ListError::Malformed {
                        operation: "etcd /v3/kv/range".into(),
                        detail: "a key that is not base64".into(),
                    })?;
                    from.push(0);
                }
                _ => break,
            }
        }
        let mut ttls: HashMap<i64, Value> = HashMap::new();
        let mut out = Vec::with_capacity(queues.len());
        for (key, mut waiters) in queues {
            waiters.sort_by_key(|(revision, ..)| *revision);
            let limit = waiters[0].2.limit.max(1);
            let held = waiters.len().min(usize::from(limit));
            let mut holders = Vec::with_capacity(held);
            let mut v1_holder = None;
            for (revision, lease, stake, v1) in waiters.iter().take(held) {
                let alive = match ttls.get(lease) {
                    Some(v) => v.clone(),
                    None => {
                        let v = self.read("/v3/lease/timetolive", json!({"ID": lease.to_string()})).await?;
                        ttls.insert(*lease, v.clone());
                        v
                    }
                };
                let secs = |v: &Value| int(v).filter(|t| *t > 0).map(|t| Duration::from_secs(t as u64));
                if *v1 {
                    let remaining = secs(&alive["TTL"]).unwrap_or_default();
                    v1_holder = Some(V1Holder { fence: Fence(*revision as u64), remaining });
                    continue;
                }
                holders.push(SlotHolder {
                    session: *lease as u64,
                    label: stake.label.clone(),
                    fence: Fence(*revision as u64),
                    value: stake.value.clone(),
                    ttl: secs(&alive["grantedTTL"]),
                    remaining: secs(&alive["TTL"]),
                });
            }
            out.push(QueueStatus { key, limit, holders, waiting: waiters.len() - held, v1_holder });
        }
        Ok(out)
    }

    /// A gateway call whose error answer is reported as it is, for listings.
    async fn read(&self, path: &'static str, body: Value) -> Result<Value, ListError> {
        let req = self
            .http
            .request(hyper::Method::POST, path)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let resp = self.http.send(req).await?;
        if resp.status != 200 {
            let message = error_message(&resp.body);
            return Err(ListError::Refused {
                operation: format!("etcd {path}"),
                status: resp.status,
                message,
            });
        }
        serde_json::from_slice(&resp.body)
            .map_err(|e| ListError::Malformed { operation: format!("etcd {path}"), detail: e.to_string() })
    }

    /// Plants `fault` (tests only).
    #[cfg(feature = "fault-injection")]
    pub fn with_fault(self, fault: EtcdFault) -> EtcdSessions {
        EtcdSessions { fault: Some(fault), ..self }
    }

    /// Whether the waiter at `index` in the queue of a key with `limit` slots holds one: the
    /// first `limit` do.
    fn holds(&self, index: usize, limit: u16) -> bool {
        #[cfg(feature = "fault-injection")]
        if self.fault == Some(EtcdFault::SecondInLineGranted) {
            return index <= usize::from(limit);
        }
        index < usize::from(limit)
    }

    /// Whether held keepalives watch predecessors.
    fn watches(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        if self.fault == Some(EtcdFault::NoWatch) {
            return false;
        }
        true
    }

    /// Uses `tls` for an `https://` URL: the CA that signed etcd's certificates and the client
    /// certificate an etcd started with `--client-cert-auth` asks for.
    #[cfg(feature = "tls")]
    pub fn with_tls(self, tls: leasehold_http::TlsConfig) -> EtcdSessions {
        EtcdSessions {
            http: self.http.with_tls(tls.clone()),
            keepalive_http: self.keepalive_http.with_tls(tls.clone()),
            watch_http: self.watch_http.with_tls(tls),
            ..self
        }
    }

    /// The waiter key of `lease` in `key`'s queue, as etcd stores it (not yet base64).
    fn waiter(&self, key: &Key, lease: i64) -> String {
        format!("{}{key}@{:016x}", self.prefix, lease as u64)
    }

    /// The range of `key`'s waiter keys (base64 start and end).
    fn queue_range(&self, key: &Key) -> (String, String) {
        let start = format!("{}{key}@", self.prefix).into_bytes();
        (B64.encode(&start), B64.encode(range_end(&start)))
    }

    /// `key`'s queue as a range request: every waiter key (without its value), oldest first.
    fn queue(&self, key: &Key) -> Value {
        let (start, end) = self.queue_range(key);
        json!({"key": start, "range_end": end, "sort_order": "ASCEND", "sort_target": "CREATE", "keys_only": true})
    }

    /// `key`'s queue as a range request: every waiter key with its value, oldest first.
    fn queue_with_values(&self, key: &Key) -> Value {
        let (start, end) = self.queue_range(key);
        json!({"key": start, "range_end": end, "sort_order": "ASCEND", "sort_target": "CREATE"})
    }

    /// `key`'s oldest waiter key, with its value (the key's limit, its holder's label and
    /// value), as a range request.
    fn oldest(&self, key: &Key) -> Value {
        let (start, end) = self.queue_range(key);
        json!({"key": start, "range_end": end, "sort_order": "ASCEND", "sort_target": "CREATE", "limit": "1"})
    }

    fn local(&self, session: SessionId) -> Option<Arc<Local>> {
        lock(&self.sessions).get(&session).cloned()
    }

    fn forget(&self, session: SessionId) {
        if let Some(local) = lock(&self.sessions).remove(&session) {
            local.queued.notify(usize::MAX);
        }
    }

    async fn post(&self, http: &HttpClient, path: &str, body: Value) -> Result<Value, Fail> {
        let req = http
            .request(hyper::Method::POST, path)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let resp = http.send(req).await?;
        answer(path, resp.status, &resp.body)
    }

    async fn open(&self, ttl: LDuration, label: &str) -> Result<SessionReply, Fail> {
        let mut bytes = [0u8; 16];
        getrandom::getrandom(&mut bytes)
            .map_err(|e| TransportError::Config(format!("no randomness for the session's secret: {e}")))?;
        let granted = self.post(&self.http, "/v3/lease/grant", grant_body(ttl)).await?;
        let (Some(lease), Some(secs)) = (int(&granted["ID"]).filter(|l| *l > 0), int(&granted["TTL"])) else {
            return Err(
                TransportError::Protocol(format!("etcd lease grant without ID or TTL: {granted}")).into()
            );
        };
        let secret = Secret::from_bytes(bytes);
        let local = Local {
            secret,
            lease,
            label: label.to_string(),
            keys: Mutex::new(HashMap::new()),
            observed: Mutex::new(HashMap::new()),
            queued: Event::new(),
        };
        let session = SessionId(lease as u64);
        lock(&self.sessions).insert(session, Arc::new(local));
        // etcd's TTL counts from when it granted the lease, after our request was sent, which
        // is what the holder anchors at: never an overstatement.
        Ok(SessionReply::Opened { session, secret, ttl: LDuration::from_secs(secs.max(0) as u64) })
    }

    /// Asks for one of `limit` slots of `key` (1: the key itself), with `value` for its
    /// observers.
    async fn acquire(
        &self,
        local: &Local,
        seq: Seq,
        key: &Key,
        wait: bool,
        limit: u16,
        value: &str,
    ) -> Result<SessionReply, Fail> {
        if limit == 0 {
            return Ok(SessionReply::Rejected(Reject::Malformed));
        }
        let me = B64.encode(self.waiter(key, local.lease));
        let stake = Stake { label: local.label.clone(), limit, value: value.to_string() };
        // Put our waiter key if absent (a repeated acquire keeps its place, its fence and its
        // first value) and read the queue, its oldest waiter key and ours in the same txn, so
        // the put is in what we read.
        let v1_key = B64.encode(format!("{}{key}", self.v1_prefix));
        let reads = [
            json!({"request_range": self.queue(key)}),
            json!({"request_range": self.oldest(key)}),
            json!({"request_range": {"key": me}}),
            json!({"request_range": {"key": v1_key}}),
        ];
        let put = json!({"request_put": {"key": me, "value": B64.encode(stake.encode()), "lease": local.lease.to_string()}});
        let txn = json!({
            "compare": [{"key": me, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": std::iter::once(put).chain(reads.clone()).collect::<Vec<_>>(),
            "failure": reads,
        });
        let v = self.post(&self.http, "/v3/kv/txn", txn).await?;
        let created = v["succeeded"] == json!(true);
        let responses = v["responses"].as_array().map(Vec::as_slice).unwrap_or_default();
        let ranges: Vec<&[Value]> = responses
            .iter()
            .rev()
            .take(4)
            .map(|r| r["response_range"]["kvs"].as_array().map(Vec::as_slice).unwrap_or_default())
            .collect();
        let (kvs, oldest, mine, v1_held) = match ranges[..] {
            [v1, mine, oldest, kvs] => (kvs, oldest.first(), mine.first(), v1.first()),
            _ => {
                return Err(
                    TransportError::Protocol(format!("etcd txn answer without its ranges: {v}")).into()
                )
            }
        };
        let Some((index, revision)) = place(kvs, &me) else {
            return Err(
                TransportError::Protocol(format!("etcd txn put {me} but its range lacks it: {v}")).into()
            );
        };
        // A v1 key with no entry in the queue was written by an older leasehold (or its entry
        // was deleted by hand): its holder cannot be waited behind, so the key is busy even
        // for a session that would wait, until that holder's lease ends.
        let v1_entry = B64.encode(format!("{}{key}@{V1_ENTRY}", self.prefix));
        if let Some(v1) =
            v1_held.filter(|_| !kvs.iter().any(|kv| kv["key"].as_str() == Some(v1_entry.as_str())))
        {
            lock(&local.keys).remove(key);
            // Not acquired: a place kept would be granted to nobody.
            self.leave(&me, revision).await?;
            let left = match int(&v1["lease"]).filter(|l| *l > 0) {
                Some(l) => self.lease_left(l).await,
                None => UNKNOWN_WAIT,
            };
            return Ok(SessionReply::Busy { key: key.clone(), expires_in: left });
        }
        // Every holder and waiter of a key must agree on its limit: the key's is its oldest
        // waiter's (each later one was checked against it on the way in). Of two sessions
        // asking with different limits at once, the later txn sees the earlier's key and is
        // refused, and a third asking meanwhile is judged by the oldest, not by the refused
        // one's key before it goes. A key already ours keeps its limit; asking with another is
        // refused, as the server does.
        let disagrees = |kv: Option<&Value>| kv.is_some_and(|kv| Stake::of(kv).limit != limit);
        if disagrees(oldest) || disagrees(mine) {
            if created {
                self.leave(&me, revision).await?;
            }
            return Ok(SessionReply::Rejected(Reject::LimitMismatch));
        }
        if self.holds(index, limit) {
            lock(&local.keys).remove(key);
            // Why fences strictly increase per key in grant order: the queue's order is create
            // order (a waiter key created later has a higher create revision: etcd's revision
            // only grows, across restarts too), nobody joins ahead of an existing waiter, and a
            // deletion moves everyone behind it up by one place. So a waiter reaches the first
            // `limit` places no later than any waiter created after it, and grants are made in
            // create-revision order; keys created in distinct txns have distinct revisions, so
            // every grant's fence is above every earlier grant's. Slots granted at the same
            // instant (one revoke freeing two) are ordered by their fences too. Re-asking keeps
            // the key, hence the same fence.
            return Ok(SessionReply::Granted { key: key.clone(), fence: Fence(revision as u64) });
        }
        if wait {
            lock(&local.keys)
                .insert(key.clone(), Want::Queued { asked: seq, revision, limit, value: value.to_string() });
            local.queued.notify(usize::MAX);
            let behind = index + 1 - usize::from(limit);
            let position = u16::try_from(behind).unwrap_or(u16::MAX);
            return Ok(SessionReply::Queued { key: key.clone(), position });
        }
        lock(&local.keys).remove(key);
        // Give up our place; if the delete fails the key leaves with the session.
        self.leave(&me, revision).await?;
        // Busy until the first slot ends: the soonest of the holders' leases.
        let mut expires_in: Option<LDuration> = None;
        let holders =
            kvs.iter().take(usize::from(limit).min(MAX_TTL_LOOKUPS)).filter_map(|kv| int(&kv["lease"]));
        for l in holders {
            let left = self.lease_left(l).await;
            expires_in = Some(expires_in.map_or(left, |e| e.min(left)));
        }
        Ok(SessionReply::Busy { key: key.clone(), expires_in: expires_in.unwrap_or(UNKNOWN_WAIT) })
    }

    /// How long etcd keeps `lease`, for a `Busy` answer; [`UNKNOWN_WAIT`] when it cannot say.
    async fn lease_left(&self, lease: i64) -> LDuration {
        let v = self.post(&self.http, "/v3/lease/timetolive", json!({"ID": lease.to_string()})).await;
        v.ok().and_then(|v| remaining_time(&v)).unwrap_or(UNKNOWN_WAIT)
    }

    /// Deletes our waiter key `me` (base64) if it is still the one created at `revision`.
    async fn leave(&self, me: &str, revision: i64) -> Result<(), Fail> {
        let leave = json!({
            "compare": [{"key": me, "target": "CREATE", "result": "EQUAL", "create_revision": revision.to_string()}],
            "success": [{"request_delete_range": {"key": me}}],
        });
        self.post(&self.http, "/v3/kv/txn", leave).await.map(drop)
    }

    fn observe(&self, local: &Local, seq: Seq, key: &Key) -> SessionReply {
        let mut observed = lock(&local.observed);
        let full = observed.len() >= MAX_OBSERVED;
        match observed.get_mut(key) {
            // Asked again by a later request: a new watch at the session, whose first report
            // must be the holder now even if it acknowledged that before (an Observe overtaken
            // by its own Unobserve left this one behind), as the built-in server does.
            Some(f) => {
                if f.since < seq {
                    f.acked = f.latest().saturating_sub(1);
                    f.since = seq;
                }
            }
            None if full => return SessionReply::Rejected(Reject::Capacity),
            None => {
                observed.insert(key.clone(), Follow::new(seq));
            }
        }
        drop(observed);
        // A held keepalive reads the new queue at once, and answers with its first report.
        local.queued.notify(usize::MAX);
        SessionReply::Observing { key: key.clone() }
    }

    fn unobserve(&self, local: &Local, seq: Seq, key: &Key) -> SessionReply {
        let mut observed = lock(&local.observed);
        if observed.get(key).is_some_and(|f| f.since < seq) {
            observed.remove(key);
        }
        SessionReply::Unobserved { key: key.clone() }
    }

    async fn release(&self, local: &Local, key: &Key, fence: Fence) -> Result<SessionReply, Fail> {
        let me = B64.encode(self.waiter(key, local.lease));
        lock(&local.keys).remove(key);
        if fence == Fence::NONE {
            // Leaving the queue. If the key became ours meanwhile, the holder was not told yet
            // (or is told in a keepalive and gives it back by its fence): deleting it gives up a
            // grant nobody believes in.
            self.post(&self.http, "/v3/kv/deleterange", json!({"key": me})).await?;
            return Ok(SessionReply::Released { key: key.clone() });
        }
        // The fence is the waiter key's create revision: a key re-created since (another
        // acquisition of this session) is not this grant.
        let txn = json!({
            "compare": [{"key": me, "target": "CREATE", "result": "EQUAL", "create_revision": fence.0.to_string()}],
            "success": [{"request_delete_range": {"key": me}}],
        });
        let v = self.post(&self.http, "/v3/kv/txn", txn).await?;
        Ok(match v["succeeded"] == json!(true) {
            true => SessionReply::Released { key: key.clone() },
            false => SessionReply::NotHolder { key: key.clone() },
        })
    }

    async fn close(&self, local: &Local, session: SessionId) -> Result<SessionReply, Fail> {
        // Revoking the lease deletes every waiter key of the session in one revision.
        // Forgotten only once etcd has answered: a close that failed is retried, and finds the
        // session still known.
        self.post(&self.http, "/v3/lease/revoke", json!({"ID": local.lease.to_string()})).await?;
        self.forget(session);
        Ok(SessionReply::Closed)
    }

    async fn keep_alive(&self, local: &Local, hold: Duration) -> Result<SessionReply, Fail> {
        let deadline = Instant::now() + hold;
        let alive = self
            .post(&self.keepalive_http, "/v3/lease/keepalive", json!({"ID": local.lease.to_string()}))
            .await?;
        // A dead lease's keepalive answer has no TTL.
        let Some(secs) = keepalive_ttl(&alive) else { return Err(Fail::Expired) };
        let ttl = LDuration::from_secs(secs as u64);
        loop {
            let queued = local.queued.listen();
            let watch = match self.look(local).await {
                Ok(w) => w,
                Err(Fail::Expired) => return Err(Fail::Expired),
                // The renewal stands; the next keepalive looks again.
                Err(Fail::Transport(e)) => {
                    tracing::debug!("etcd queue check after a keepalive: {e}");
                    return Ok(alive_reply(local, ttl));
                }
            };
            let pushed = lock(&local.keys).values().any(|w| matches!(w, Want::Pushed(_)));
            if pushed || lock(&local.observed).values().any(Follow::behind) {
                return Ok(alive_reply(local, ttl));
            }
            let wake = future::or(
                async {
                    match watch.filter(|_| self.watches()) {
                        Some((revision, keys)) => self.first_event(local, revision, keys).await,
                        None => future::pending().await,
                    }
                },
                future::or(
                    async {
                        queued.await;
                        Wake::Look
                    },
                    async {
                        async_io::Timer::at(deadline).await;
                        Wake::Timer
                    },
                ),
            )
            .await;
            if let Wake::Timer = wake {
                return Ok(alive_reply(local, ttl));
            }
        }
    }

    /// Reads the queues of the keys the session waits for or observes: a waiter now among the
    /// first `limit` becomes a pushed grant, an observed key with another holder a recorded
    /// change. Returns the revision read at and what to watch for the rest.
    async fn look(&self, local: &Local) -> Result<Option<(i64, Vec<Watched>)>, Fail> {
        let waiting: Vec<(Key, Seq, i64, u16, String)> = lock(&local.keys)
            .iter()
            .filter_map(|(k, w)| match w {
                Want::Queued { asked, revision, limit, value } => {
                    Some((k.clone(), *asked, *revision, *limit, value.clone()))
                }
                Want::Pushed(_) => None,
            })
            .collect();
        let observed: Vec<Key> = lock(&local.observed).keys().cloned().collect();
        if waiting.is_empty() && observed.is_empty() {
            return Ok(None);
        }
        // Waited queues first (keys only), then observed ones (with values).
        let reads: Vec<Value> = waiting
            .iter()
            .map(|(k, ..)| self.queue(k))
            .chain(observed.iter().map(|k| self.queue_with_values(k)))
            .map(|q| json!({"request_range": q}))
            .collect();
        // A txn per MAX_TXN_OPS queues; watching from the oldest revision read misses nothing.
        let mut read_at = i64::MAX;
        // Each queue with the revision it was read at.
        let mut queues: Vec<(Vec<Value>, i64)> = Vec::with_capacity(reads.len());
        for chunk in reads.chunks(MAX_TXN_OPS) {
            let v = self.post(&self.keepalive_http, "/v3/kv/txn", json!({"success": chunk})).await?;
            let Some(r) = int(&v["header"]["revision"]) else {
                return Err(
                    TransportError::Protocol(format!("etcd txn answer without a revision: {v}")).into()
                );
            };
            read_at = read_at.min(r);
            for i in 0..chunk.len() {
                let kvs = v["responses"][i]["response_range"]["kvs"].as_array().cloned().unwrap_or_default();
                queues.push((kvs, r));
            }
        }
        let (waited_queues, observed_queues) = queues.split_at(waiting.len());
        let (mut watched, mut vanished) = (Vec::new(), Vec::new());
        {
            let mut keys = lock(&local.keys);
            for ((key, asked, revision, limit, value), (kvs, _)) in waiting.into_iter().zip(waited_queues) {
                let me = B64.encode(self.waiter(&key, local.lease));
                // Only a key still waiting: an acquire or release may have moved it since.
                if !matches!(keys.get(&key), Some(Want::Queued { revision: r, .. }) if *r == revision) {
                    continue;
                }
                match place(kvs, &me) {
                    Some((n, _)) if self.holds(n, limit) => {
                        let grant = Grant { key: key.clone(), fence: Fence(revision as u64), asked };
                        keys.insert(key, Want::Pushed(grant));
                    }
                    // One slot: only the predecessor's deletion makes us first (no herd).
                    Some((n, _)) if limit == 1 => {
                        let before = n.checked_sub(1).and_then(|p| kvs.get(p));
                        if let Some(k) = before.and_then(|kv| kv["key"].as_str()) {
                            watched.push(Watched {
                                key: k.to_string(),
                                range_end: None,
                                deletions_only: true,
                                follows: None,
                            });
                        }
                    }
                    // N slots: any deletion ahead of us can give us one.
                    Some(_) => {
                        let (start, end) = self.queue_range(&key);
                        watched.push(Watched {
                            key: start,
                            range_end: Some(end),
                            deletions_only: true,
                            follows: None,
                        });
                    }
                    // Our waiter key is gone while the session lives (deleted by hand): the place is
                    // lost, so queue again at the back rather than wait for a grant that never comes.
                    None => {
                        tracing::warn!(
                            "etcd waiter key {me} vanished while its session lives; queueing again"
                        );
                        vanished.push((key, asked, limit, value));
                    }
                }
            }
        }
        let mut replays = Vec::new();
        {
            let mut follows = lock(&local.observed);
            for (key, (kvs, at)) in observed.iter().zip(observed_queues) {
                let Some(f) = follows.get_mut(key) else { continue };
                match f.read(kvs, *at) {
                    Caught::Current => {}
                    Caught::ReplayFrom(from) => replays.push(self.catch_up(local, key, from, kvs, *at)),
                    Caught::Coalesced => tracing::warn!(
                        %key,
                        "etcd compacted the observed key's history: told its holder now, the changes before it not heard"
                    ),
                }
                let (start, end) = self.queue_range(key);
                let follows = Some(key.clone());
                watched.push(Watched { key: start, range_end: Some(end), deletions_only: false, follows });
            }
        }
        all(replays).await;
        for (key, asked, limit, value) in vanished {
            if let SessionReply::Granted { key, fence } =
                self.acquire(local, asked, &key, true, limit, &value).await?
            {
                lock(&local.keys).insert(key.clone(), Want::Pushed(Grant { key, fence, asked }));
            }
        }
        // Two waits for the same semaphore's queue are one watch.
        watched.dedup();
        watched.truncate(MAX_WATCHES);
        Ok((!watched.is_empty()).then_some((read_at, watched)))
    }

    /// Waits until one of `watched` sees an event after `revision` (an observed queue's
    /// watch: until a change of its holder is recorded). A watch that cannot be set up never
    /// wakes (the keepalive's timer does, and the next one looks again).
    async fn first_event(&self, local: &Local, revision: i64, watched: Vec<Watched>) -> Wake {
        let watches: Vec<Pin<Box<dyn Future<Output = ()> + Send + '_>>> = watched
            .into_iter()
            .map(|w| match w.follows {
                Some(key) => Box::pin(self.follow(local, key)) as Pin<Box<_>>,
                None => Box::pin(self.event(revision, w)) as Pin<Box<_>>,
            })
            .collect();
        let mut watches = watches;
        future::poll_fn(|cx| {
            for w in watches.iter_mut() {
                if w.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Look);
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Returns once `watched` has seen an event after `revision`, or the watch ended.
    async fn event(&self, revision: i64, watched: Watched) {
        let mut create = json!({
            "key": watched.key,
            // From just after the read: an event between the read and the watch is not missed.
            "start_revision": (revision + 1).to_string(),
        });
        if let Some(end) = watched.range_end {
            create["range_end"] = json!(end);
        }
        if watched.deletions_only {
            create["filters"] = json!(["NOPUT"]);
        }
        // Only the watch's creation is no news; an event, a cancellation (a compacted start
        // revision) or an error all mean: look again.
        if let Err(WatchEnd::Refused) = self.watch(create, |m| (!watch_created(m)).then_some(())).await {
            future::pending::<()>().await;
        }
    }

    /// Replays `key`'s queue into its replica from the revision after the replica's, while a
    /// keepalive is held, and returns once that records a change (or finds the history
    /// compacted: the next read catches up). A watch that fails never returns (the keepalive's
    /// timer does).
    async fn follow(&self, local: &Local, key: Key) {
        let from = lock(&local.observed)
            .get(&key)
            .and_then(|f| f.replica.as_ref())
            .filter(|r| !r.compacted)
            .map(|r| r.at + 1);
        let Some(from) = from else { return future::pending().await };
        let heard = self
            .watch(self.queue_history(&key, from), |m| {
                let mut follows = lock(&local.observed);
                // Unobserved meanwhile: look again, and watch it no more.
                let Some(f) = follows.get_mut(&key) else { return Some(true) };
                match f.replay(m) {
                    Replayed::Applied { changed } => changed.then_some(true),
                    Replayed::Compacted(_) => Some(true),
                    Replayed::Failed => Some(false),
                }
            })
            .await;
        if heard != Ok(true) {
            future::pending::<()>().await;
        }
    }

    /// Replays `key`'s queue into its replica from revision `from` until it has caught up with
    /// the read `kvs` at revision `at`. History etcd compacted, or that cannot be replayed
    /// within a request timeout, falls back to the read itself: the holder now is recorded
    /// (if it is another), the changes before it not heard, and that is logged.
    async fn catch_up(&self, local: &Local, key: &Key, from: i64, kvs: &[Value], at: i64) {
        let replay = self.watch(self.queue_history(key, from), |m| {
            let mut follows = lock(&local.observed);
            let Some(f) = follows.get_mut(key) else { return Some(Ok(())) };
            match f.replay(m) {
                // Past the read, or at a holder the read shows unchanged: nothing more to
                // hear before it (a queue empty at both ends: what may follow is replayed by
                // a held keepalive).
                Replayed::Applied { .. } => {
                    let r = f.replica.as_mut()?;
                    (r.at >= at || r.adopt(kvs, at)).then_some(Ok(()))
                }
                Replayed::Compacted(c) => Some(Err(format!("etcd compacted its history up to revision {c}"))),
                Replayed::Failed => Some(Err(format!("etcd ended the watch: {m}"))),
            }
        });
        let timeout = async {
            async_io::Timer::after(self.catch_up).await;
            Err(WatchEnd::TimedOut)
        };
        let why = match future::or(replay, timeout).await {
            Ok(Ok(())) => return,
            Ok(Err(why)) => why,
            Err(end) => end.to_string(),
        };
        tracing::warn!(
            %key,
            "cannot replay the observed key's changes from etcd revision {from} ({why}): told its holder now, the changes before it not heard"
        );
        if let Some(f) = lock(&local.observed).get_mut(key) {
            f.resync(kvs, at);
        }
    }

    /// A watch of `key`'s queue, puts and deletes, from revision `from` (etcd answers from its
    /// history what came since).
    fn queue_history(&self, key: &Key, from: i64) -> Value {
        let (start, end) = self.queue_range(key);
        json!({"key": start, "range_end": end, "start_revision": from.to_string()})
    }

    /// Opens the watch `create` (a watch create request) and hands each of its messages to
    /// `on` until `on` returns something.
    async fn watch<T>(&self, create: Value, mut on: impl FnMut(&Value) -> Option<T>) -> Result<T, WatchEnd> {
        let body = json!({ "create_request": create });
        let request = self
            .watch_http
            .request(hyper::Method::POST, "/v3/watch")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())));
        let stream = match request {
            Ok(r) => self.watch_http.stream(r).await,
            Err(e) => Err(TransportError::Config(e.to_string())),
        };
        let mut stream = match stream {
            Ok(s) if s.status == 200 => s,
            Ok(s) => {
                tracing::debug!("etcd refused a watch: HTTP {}", s.status);
                return Err(WatchEnd::Refused);
            }
            Err(e) => {
                tracing::debug!("etcd watch: {e}");
                return Err(WatchEnd::Refused);
            }
        };
        let mut buf = Vec::new();
        while let Some(chunk) = stream.next_chunk().await {
            let Ok(chunk) = chunk else { return Err(WatchEnd::Ended) };
            buf.extend_from_slice(&chunk);
            let mut messages = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
            for m in messages.by_ref() {
                match m {
                    Ok(m) => {
                        if let Some(t) = on(&m) {
                            return Ok(t);
                        }
                    }
                    // A message cut at the chunk's end: the rest comes with the next chunk.
                    Err(e) if e.is_eof() => break,
                    Err(_) => return Err(WatchEnd::Ended),
                }
            }
            let used = messages.byte_offset();
            buf.drain(..used);
        }
        Err(WatchEnd::Ended)
    }
}

/// Why a watch handed nothing back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchEnd {
    /// etcd refused it, or could not be reached.
    Refused,
    /// Its stream ended (or carried something that is not JSON).
    Ended,
    /// Not answered in time.
    TimedOut,
}

impl std::fmt::Display for WatchEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WatchEnd::Refused => "etcd refused the watch or could not be reached",
            WatchEnd::Ended => "the watch's stream ended",
            WatchEnd::TimedOut => "no answer within a request timeout",
        })
    }
}

/// Runs every future in `all` to its end.
async fn all<F: Future<Output = ()>>(all: Vec<F>) {
    let mut all: Vec<Option<Pin<Box<F>>>> = all.into_iter().map(|f| Some(Box::pin(f))).collect();
    future::poll_fn(|cx| {
        for slot in all.iter_mut() {
            if slot.as_mut().is_some_and(|f| f.as_mut().poll(cx).is_ready()) {
                *slot = None;
            }
        }
        match all.iter().all(Option::is_none) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    })
    .await
}

/// The keepalive's answer: the session's ttl, one grant not yet confirmed and one change of
/// an observed key not yet acknowledged, if any.
fn alive_reply(local: &Local, ttl: LDuration) -> SessionReply {
    let keys = lock(&local.keys);
    let mut pushed = keys.values().filter_map(|w| match w {
        Want::Pushed(g) => Some(g.clone()),
        Want::Queued { .. } => None,
    });
    let granted = pushed.next();
    let more_grants = pushed.next().is_some();
    let follows = lock(&local.observed);
    let mut behind = follows.iter().filter(|(_, f)| f.behind());
    let Some((key, f)) = behind.next() else {
        return SessionReply::Alive { ttl, granted, more: more_grants };
    };
    let Some(c) = f.report() else { return SessionReply::Alive { ttl, granted, more: more_grants } };
    let observed = Observed { key: key.clone(), change: c.number, holder: c.holder.clone() };
    let more = more_grants || c.number < f.latest() || behind.next().is_some();
    SessionReply::AliveObserved { ttl, granted, more, observed }
}

/// The holder an observer is told of, from the first kv of a queue read with values.
fn observed_holder(kv: &Value) -> Option<ObservedHolder> {
    let lease = int(&kv["lease"]).filter(|l| *l > 0)?;
    let fence = int(&kv["create_revision"]).filter(|r| *r > 0)?;
    let stake = Stake::of(kv);
    // Written by a leasehold, so valid; a hand-written one is shown as far as it is.
    let label = parse_label(&stake.label).unwrap_or_default();
    let value = parse_value(&stake.value).unwrap_or_default();
    Some(ObservedHolder { session: SessionId(lease as u64), label, fence: Fence(fence as u64), value })
}

/// Whether a watch stream message only says the watch was created.
fn watch_created(m: &Value) -> bool {
    let r = &m["result"];
    r["created"] == json!(true)
        && r["events"].as_array().is_none_or(Vec::is_empty)
        && r["canceled"] != json!(true)
}

/// Where the waiter key `me` (base64) stands in a queue's `kvs`: its index (0: it holds the
/// key) and create revision.
fn place(kvs: &[Value], me: &str) -> Option<(usize, i64)> {
    kvs.iter().enumerate().find(|(_, kv)| kv["key"].as_str() == Some(me)).and_then(|(i, kv)| {
        let revision = int(&kv["create_revision"]).filter(|r| *r > 0)?;
        Some((i, revision))
    })
}

/// Reads a gateway answer for a session: a lease etcd no longer has is the session's end,
/// every other refusal a transport error, permanent when an operator must act.
fn answer(path: &str, status: u16, body: &[u8]) -> Result<Value, Fail> {
    if status == 200 {
        return serde_json::from_slice(body)
            .map_err(|e| Fail::Transport(TransportError::Protocol(format!("etcd {path}: {e}"))));
    }
    let message = error_message(body);
    if message.contains("requested lease not found") {
        return Err(Fail::Expired);
    }
    let what = format!("etcd {path}: HTTP {status}: {message}");
    Err(Fail::Transport(match refusal(status, body) {
        Refusal::Unavailable => TransportError::Protocol(what),
        Refusal::Unauthorized => TransportError::Config(format!("etcd refused our credentials: {what}")),
        Refusal::Misconfigured => TransportError::Config(what),
    }))
}

impl SessionBackend for EtcdSessions {
    async fn call(&self, req: SessionRequest, hold: Duration) -> Result<SessionResponse, TransportError> {
        let local = match session_of(&req, |id| self.local(id), |l| &l.secret) {
            Ok(local) => local,
            Err(unknown) => return Ok(req.answer(unknown.reply())),
        };
        let r = match (&req.op, local) {
            (SessionOp::Open { ttl, label }, _) => self.open(*ttl, label).await,
            (_, None) => Err(Fail::Expired),
            (SessionOp::KeepAlive, Some(l)) => self.keep_alive(&l, hold).await,
            (SessionOp::KeepAliveSeen { key, change }, Some(l)) => {
                if let Some(f) = lock(&l.observed).get_mut(key) {
                    // Never past the latest: a confused number cannot skip changes to come.
                    f.acked = f.acked.max((*change).min(f.latest()));
                }
                self.keep_alive(&l, hold).await
            }
            (SessionOp::Acquire { key, wait }, Some(l)) => self.acquire(&l, req.seq, key, *wait, 1, "").await,
            (SessionOp::Release { key, fence }, Some(l)) => self.release(&l, key, *fence).await,
            (SessionOp::Close, Some(l)) => self.close(&l, req.session).await,
            (SessionOp::AcquireWithLimit { key, wait, limit }, Some(l)) => {
                self.acquire(&l, req.seq, key, *wait, *limit, "").await
            }
            (SessionOp::AcquireWithValue { key, wait, value }, Some(l)) => {
                self.acquire(&l, req.seq, key, *wait, 1, value).await
            }
            (SessionOp::Observe { key }, Some(l)) => Ok(self.observe(&l, req.seq, key)),
            (SessionOp::Unobserve { key }, Some(l)) => Ok(self.unobserve(&l, req.seq, key)),
        };
        respond(&req, r, |session| self.forget(session))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_lease_is_the_sessions_end_and_other_refusals_are_classified() {
        let body = |msg: &str, code: u8| format!(r#"{{"error":"{msg}","message":"{msg}","code":{code}}}"#);
        let gone = body("etcdserver: requested lease not found", 5);
        assert!(matches!(answer("/v3/kv/txn", 404, gone.as_bytes()), Err(Fail::Expired)));
        let transport = |status, b: &str| match answer("/v3/kv/txn", status, b.as_bytes()) {
            Err(Fail::Transport(e)) => e,
            _ => panic!("expected a transport error"),
        };
        assert!(!transport(503, &body("etcdserver: no leader", 14)).is_permanent());
        assert!(!transport(429, &body("etcdserver: too many requests", 8)).is_permanent());
        assert!(transport(403, &body("etcdserver: permission denied", 7)).is_permanent());
        assert!(transport(404, "Not Found\n").is_permanent());
        assert!(!transport(200, "{truncated").is_permanent());
    }

    #[test]
    fn a_waiter_keys_value_says_its_label_limit_and_value_and_an_older_one_is_a_label() {
        let kv = |v: &str| json!({"key": "YQ==", "value": B64.encode(v)});
        let stake = Stake { label: "host:7".into(), limit: 3, value: "10.0.0.1:80".into() };
        assert_eq!(Stake::of(&kv(&stake.encode())), stake);
        // Written by an older leasehold: the label alone, a key of one holder.
        let old = Stake { label: "host:8".into(), limit: 1, value: String::new() };
        assert_eq!(Stake::of(&kv("host:8")), old);
        // A limit beyond u16 is not silently a small one.
        assert_eq!(Stake::of(&kv(r#"{"label":"x","limit":70000,"value":""}"#)).limit, u16::MAX);
        let held = observed_holder(&json!({
            "key": "YQ==", "lease": "42", "create_revision": "9", "value": B64.encode(stake.encode())
        }))
        .expect("a holder");
        assert_eq!((held.session, held.fence, held.label.as_str()), (SessionId(42), Fence(9), "host:7"));
        assert_eq!(held.value.as_str(), "10.0.0.1:80");
        assert_eq!(observed_holder(&json!({"key": "YQ==", "create_revision": "9"})), None, "no lease");
    }

    /// A waiter key of session `lease` created at revision `created`, as a range or a watch
    /// shows it.
    fn waiter_kv(name: &str, lease: i64, created: i64) -> Value {
        let stake = Stake { label: format!("s{lease}"), limit: 1, value: String::new() };
        json!({"key": B64.encode(name), "lease": lease.to_string(), "create_revision": created.to_string(),
               "mod_revision": created.to_string(), "version": "1", "value": B64.encode(stake.encode())})
    }

    /// A watch message with `events`, as etcd 3.4.23's gateway sends it (a put has no type).
    fn message(events: &[Value]) -> Value {
        json!({"result": {"header": {"revision": "99"}, "events": events}})
    }

    fn put(kv: Value) -> Value {
        json!({"kv": kv})
    }

    fn delete(name: &str, at: i64) -> Value {
        json!({"type": "DELETE", "kv": {"key": B64.encode(name), "mod_revision": at.to_string()}})
    }

    /// The recorded changes as (number, holder's session or 0 for free).
    fn heard(f: &Follow) -> Vec<(u64, u64)> {
        f.changes.iter().map(|c| (c.number, c.holder.as_ref().map_or(0, |h| h.session.0))).collect()
    }

    #[test]
    fn a_replayed_queue_records_each_holder_once_per_revision_and_a_replay_twice_once() {
        let mut f = Follow::new(Seq(1));
        assert_eq!(f.read(&[], 3), Caught::Current);
        assert_eq!(heard(&f), [(1, 0)], "the first report: free");
        // a takes the key (4), b and c queue (5, 6); a's release hands it to b (7): one change;
        // a revoke deletes b's and c's keys at once (8): one change, to free.
        let events = [
            put(waiter_kv("q@a", 10, 4)),
            put(waiter_kv("q@b", 11, 5)),
            put(waiter_kv("q@c", 12, 6)),
            delete("q@a", 7),
            delete("q@b", 8),
            delete("q@c", 8),
        ];
        assert_eq!(f.replay(&message(&events[..2])), Replayed::Applied { changed: true });
        assert_eq!(f.replay(&message(&events[2..])), Replayed::Applied { changed: true });
        assert_eq!(heard(&f), [(1, 0), (2, 10), (3, 11), (4, 0)]);
        // The same history from a second watch: skipped, nothing recorded twice.
        assert_eq!(f.replay(&message(&events)), Replayed::Applied { changed: false });
        assert_eq!(f.latest(), 4);
        // The watch's creation is no event.
        let created = json!({"result": {"header": {"revision": "8"}, "created": true}});
        assert_eq!(f.replay(&created), Replayed::Applied { changed: false });
        assert_eq!(f.replica.as_ref().map(|r| r.at), Some(8));
    }

    #[test]
    fn a_read_with_the_replicas_holder_proves_nothing_was_missed_and_an_empty_one_does_not() {
        let mut f = Follow::new(Seq(1));
        let held = [waiter_kv("q@a", 10, 4)];
        assert_eq!(f.read(&held, 4), Caught::Current);
        // Read again later, the same holder unmodified and a waiter behind it: current up to
        // the read, which it becomes.
        let waited = [waiter_kv("q@a", 10, 4), waiter_kv("q@w", 13, 15)];
        assert_eq!(f.read(&waited, 20), Caught::Current);
        assert_eq!(f.replica.as_ref().map(|r| (r.at, r.queue.len())), Some((20, 2)));
        // A read older than the replica leaves it as it is.
        assert_eq!(f.read(&held, 18), Caught::Current);
        assert_eq!(f.replica.as_ref().map(|r| (r.at, r.queue.len())), Some((20, 2)));
        // Another queue: the history after 20 must be replayed.
        let other = [waiter_kv("q@b", 11, 22)];
        assert_eq!(f.read(&other, 30), Caught::ReplayFrom(21));
        assert_eq!(f.latest(), 1, "nothing recorded before the replay");
        // Free at both reads: the replica stays where it was, for a held watch to replay from.
        let mut free = Follow::new(Seq(1));
        free.read(&[], 3);
        assert_eq!(free.read(&[], 9), Caught::Current);
        assert_eq!(free.replica.as_ref().map(|r| r.at), Some(3));
    }

    #[test]
    fn a_compacted_history_is_coalesced_into_the_next_read_unless_the_holder_stayed() {
        let compacted =
            json!({"result": {"header": {"revision": "40"}, "canceled": true, "compact_revision": "35"}});
        let mut f = Follow::new(Seq(1));
        let held = [waiter_kv("q@a", 10, 4)];
        f.read(&held, 4);
        assert_eq!(f.replay(&compacted), Replayed::Compacted(35));
        // The same holder, unmodified, at the next read: nothing can have been missed.
        assert_eq!(f.read(&held, 41), Caught::Current);
        assert_eq!(f.latest(), 1);
        assert_eq!(f.replay(&compacted), Replayed::Compacted(35));
        // Nothing is applied to a compacted replica.
        assert_eq!(f.replay(&message(&[delete("q@a", 42)])), Replayed::Failed);
        let now = [waiter_kv("q@c", 12, 39)];
        assert_eq!(f.read(&now, 43), Caught::Coalesced);
        assert_eq!(heard(&f), [(1, 10), (2, 12)]);
        let error = json!({"error": {"grpc_code": 14, "message": "unavailable"}});
        assert_eq!(f.replay(&error), Replayed::Failed);
    }

    #[test]
    fn a_laggard_is_reported_the_oldest_of_the_last_eight_changes() {
        let mut f = Follow::new(Seq(1));
        f.read(&[], 1);
        for i in 0..10 {
            let name = format!("q@{i}");
            let at = 2 + 2 * i;
            f.replay(&message(&[put(waiter_kv(&name, 100 + i, at)), delete(&name, at + 1)]));
        }
        assert_eq!(f.latest(), 21);
        assert_eq!(f.changes.len(), OBSERVED_HISTORY);
        let first = f.report().expect("behind");
        assert_eq!(first.number, 21 - OBSERVED_HISTORY as u64 + 1, "its number shows the gap");
        f.acked = 20;
        assert_eq!(f.report().map(|c| (c.number, c.holder.is_none())), Some((21, true)));
    }

    #[test]
    fn a_waiters_place_is_its_index_in_create_order() {
        let kvs: Vec<Value> = serde_json::from_str(
            r#"[{"key":"YQ==","create_revision":"4","lease":"7"},{"key":"Yg==","create_revision":"9"}]"#,
        )
        .unwrap();
        assert_eq!(place(&kvs, "YQ=="), Some((0, 4)));
        assert_eq!(place(&kvs, "Yg=="), Some((1, 9)));
        assert_eq!(place(&kvs, "Yw=="), None);
    }

    #[test]
    fn only_the_creation_of_a_watch_is_no_news() {
        let v = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        // Recorded from etcd 3.4.23's gateway.
        assert!(watch_created(&v(r#"{"result":{"header":{"revision":"2"},"created":true}}"#)));
        assert!(!watch_created(&v(
            r#"{"result":{"header":{"revision":"3"},"events":[{"type":"DELETE","kv":{"key":"djIvYUAx","mod_revision":"3"}}]}}"#
        )));
        assert!(!watch_created(&v(r#"{"result":{"canceled":true,"compact_revision":"5"}}"#)));
        assert!(!watch_created(&v(r#"{"error":{"grpc_code":14,"message":"unavailable"}}"#)));
    }
}
