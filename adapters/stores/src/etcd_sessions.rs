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
//!
//! etcd does not know the session's [`Secret`]: it is drawn here and checked here, so it only
//! guards against a confused caller of this process. Who may touch the keys is etcd's own
//! authorisation: TLS client certificates (`--client-cert-auth`) and RBAC on the prefix.
//!
//! v1 ([`EtcdBackend`](crate::EtcdBackend)) keys live at `<prefix><key>`, v2's under
//! `<prefix>v2/`: a v1 and a v2 client of the same key do **not** exclude each other, so move
//! every contender of a key to v2 together.

use std::collections::HashMap;
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
    Grant, Secret, Seq, SessionId, SessionOp, SessionReply, SessionRequest, SessionResponse,
};
use leasehold_core::{Duration as LDuration, Fence, Key, Reject};
use leasehold_http::{HttpClient, SessionBackend, TransportError, MAX_IN_FLIGHT};
use serde_json::{json, Value};

use crate::etcd::{
    error_message, grant_body, int, keepalive_ttl, range_end, refusal, remaining_time, Refusal, UNKNOWN_WAIT,
};

/// Most predecessors one held keepalive watches at once (one streamed request each). A
/// session waiting for more keys than this checks the others at each keepalive, so their
/// hand-off can take up to a keepalive interval.
pub const MAX_WATCHES: usize = 16;

/// Most queues one check reads in one txn: etcd's default `--max-txn-ops` is 128.
const MAX_TXN_OPS: usize = 128;

/// A bug planted on purpose, so the tests can show they catch it (feature `fault-injection`;
/// never in a real build).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EtcdFault {
    /// The waiter right behind the holder is granted the key too: exclusion is broken.
    SecondInLineGranted,
    /// Held keepalives watch nothing: a waiter hears of its turn only at its next keepalive.
    NoWatch,
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
    sessions: Mutex<HashMap<SessionId, Arc<Local>>>,
    #[cfg(feature = "fault-injection")]
    fault: Option<EtcdFault>,
}

/// What this process knows of one of its sessions.
struct Local {
    secret: Secret,
    /// The etcd lease: the session's id.
    lease: i64,
    /// Written as each waiter key's value, so an operator reading etcd sees who waits.
    label: String,
    keys: Mutex<HashMap<Key, Want>>,
    /// A key was queued: a held keepalive has one more predecessor to watch.
    queued: Event,
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
    },
    /// First in the queue, reported in keepalives until an acquire confirms it.
    Pushed(Grant),
}

/// Why an exchange ended without the value needed.
enum Fail {
    /// The session's lease is gone.
    Expired,
    /// No usable answer.
    Transport(TransportError),
}

impl From<TransportError> for Fail {
    fn from(e: TransportError) -> Fail {
        Fail::Transport(e)
    }
}

/// The answer of a keepalive held open.
enum Wake {
    /// A predecessor went, or a key was queued: look again.
    Look,
    /// `hold` is up.
    Timer,
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
            sessions: Mutex::new(HashMap::new()),
            #[cfg(feature = "fault-injection")]
            fault: None,
        })
    }

    /// Plants `fault` (tests only).
    #[cfg(feature = "fault-injection")]
    pub fn with_fault(self, fault: EtcdFault) -> EtcdSessions {
        EtcdSessions { fault: Some(fault), ..self }
    }

    /// Whether the waiter at `index` in a key's queue holds it: only the first.
    fn holds(&self, index: usize) -> bool {
        #[cfg(feature = "fault-injection")]
        if self.fault == Some(EtcdFault::SecondInLineGranted) {
            return index <= 1;
        }
        index == 0
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

    /// `key`'s queue as a range request: every waiter key, oldest first.
    fn queue(&self, key: &Key) -> Value {
        let start = format!("{}{key}@", self.prefix).into_bytes();
        json!({
            "key": B64.encode(&start),
            "range_end": B64.encode(range_end(&start)),
            "sort_order": "ASCEND",
            "sort_target": "CREATE",
            "keys_only": true,
        })
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
            queued: Event::new(),
        };
        let session = SessionId(lease as u64);
        lock(&self.sessions).insert(session, Arc::new(local));
        // etcd's TTL counts from when it granted the lease, after our request was sent, which
        // is what the holder anchors at: never an overstatement.
        Ok(SessionReply::Opened { session, secret, ttl: LDuration::from_secs(secs.max(0) as u64) })
    }

    async fn acquire(&self, local: &Local, seq: Seq, key: &Key, wait: bool) -> Result<SessionReply, Fail> {
        let me = B64.encode(self.waiter(key, local.lease));
        // Put our waiter key if absent (a repeated acquire keeps its place and its fence) and
        // read the queue in the same txn, so the put is in what we read.
        let txn = json!({
            "compare": [{"key": me, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [
                {"request_put": {"key": me, "value": B64.encode(&local.label), "lease": local.lease.to_string()}},
                {"request_range": self.queue(key)},
            ],
            "failure": [{"request_range": self.queue(key)}],
        });
        let v = self.post(&self.http, "/v3/kv/txn", txn).await?;
        let range = v["responses"].as_array().and_then(|r| r.last()).map(|r| &r["response_range"]);
        let kvs = range.and_then(|r| r["kvs"].as_array()).map(Vec::as_slice).unwrap_or_default();
        let Some((index, revision)) = place(kvs, &me) else {
            return Err(
                TransportError::Protocol(format!("etcd txn put {me} but its range lacks it: {v}")).into()
            );
        };
        if self.holds(index) {
            lock(&local.keys).remove(key);
            // Why fences strictly increase per key in grant order: a grant goes to the oldest
            // waiter key there is, and a waiter key created later has a higher create revision
            // (etcd's revision only grows, across restarts too). When waiter W is granted, no
            // older one exists, so every later grant is of a key created after W: a higher
            // revision. Re-asking keeps the key, hence the same fence.
            return Ok(SessionReply::Granted { key: key.clone(), fence: Fence(revision as u64) });
        }
        if wait {
            lock(&local.keys).insert(key.clone(), Want::Queued { asked: seq, revision });
            local.queued.notify(usize::MAX);
            let position = u16::try_from(index).unwrap_or(u16::MAX);
            return Ok(SessionReply::Queued { key: key.clone(), position });
        }
        lock(&local.keys).remove(key);
        let holder = int(&kvs[0]["lease"]);
        // Give up our place; if the delete fails the key leaves with the session.
        let leave = json!({
            "compare": [{"key": me, "target": "CREATE", "result": "EQUAL", "create_revision": revision.to_string()}],
            "success": [{"request_delete_range": {"key": me}}],
        });
        self.post(&self.http, "/v3/kv/txn", leave).await?;
        let expires_in = match holder {
            Some(l) => {
                match self.post(&self.http, "/v3/lease/timetolive", json!({"ID": l.to_string()})).await {
                    Ok(v) => remaining_time(&v).unwrap_or(UNKNOWN_WAIT),
                    Err(_) => UNKNOWN_WAIT,
                }
            }
            None => UNKNOWN_WAIT,
        };
        Ok(SessionReply::Busy { key: key.clone(), expires_in })
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
            if lock(&local.keys).values().any(|w| matches!(w, Want::Pushed(_))) {
                return Ok(alive_reply(local, ttl));
            }
            let wake = future::or(
                async {
                    match watch.filter(|_| self.watches()) {
                        Some((revision, keys)) => self.first_deletion(revision, keys).await,
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

    /// Reads the queues of the keys the session waits for: a waiter now first becomes a pushed
    /// grant. Returns the revision read at and the predecessors of the others, to watch.
    async fn look(&self, local: &Local) -> Result<Option<(i64, Vec<String>)>, Fail> {
        let waiting: Vec<(Key, Seq, i64)> = lock(&local.keys)
            .iter()
            .filter_map(|(k, w)| match w {
                Want::Queued { asked, revision } => Some((k.clone(), *asked, *revision)),
                Want::Pushed(_) => None,
            })
            .collect();
        if waiting.is_empty() {
            return Ok(None);
        }
        // A txn per MAX_TXN_OPS queues; watching from the oldest revision read misses nothing.
        let mut read_at = i64::MAX;
        let mut queues: Vec<Vec<Value>> = Vec::with_capacity(waiting.len());
        for chunk in waiting.chunks(MAX_TXN_OPS) {
            let reads: Vec<Value> =
                chunk.iter().map(|(k, ..)| json!({"request_range": self.queue(k)})).collect();
            let v = self.post(&self.keepalive_http, "/v3/kv/txn", json!({"success": reads})).await?;
            let Some(r) = int(&v["header"]["revision"]) else {
                return Err(
                    TransportError::Protocol(format!("etcd txn answer without a revision: {v}")).into()
                );
            };
            read_at = read_at.min(r);
            for i in 0..chunk.len() {
                let kvs = v["responses"][i]["response_range"]["kvs"].as_array().cloned().unwrap_or_default();
                queues.push(kvs);
            }
        }
        let (mut predecessors, mut vanished) = (Vec::new(), Vec::new());
        {
            let mut keys = lock(&local.keys);
            for ((key, asked, revision), kvs) in waiting.into_iter().zip(&queues) {
                let me = B64.encode(self.waiter(&key, local.lease));
                // Only a key still waiting: an acquire or release may have moved it since.
                if !matches!(keys.get(&key), Some(Want::Queued { revision: r, .. }) if *r == revision) {
                    continue;
                }
                match place(kvs, &me) {
                    Some((n, _)) if self.holds(n) => {
                        let grant = Grant { key: key.clone(), fence: Fence(revision as u64), asked };
                        keys.insert(key, Want::Pushed(grant));
                    }
                    Some((n, _)) => {
                        let before = n.checked_sub(1).and_then(|p| kvs.get(p));
                        if let Some(k) = before.and_then(|kv| kv["key"].as_str()) {
                            predecessors.push(k.to_string());
                        }
                    }
                    // Our waiter key is gone while the session lives (deleted by hand): the place is
                    // lost, so queue again at the back rather than wait for a grant that never comes.
                    None => {
                        tracing::warn!(
                            "etcd waiter key {me} vanished while its session lives; queueing again"
                        );
                        vanished.push((key, asked));
                    }
                }
            }
        }
        for (key, asked) in vanished {
            if let SessionReply::Granted { key, fence } = self.acquire(local, asked, &key, true).await? {
                lock(&local.keys).insert(key.clone(), Want::Pushed(Grant { key, fence, asked }));
            }
        }
        predecessors.truncate(MAX_WATCHES);
        Ok((!predecessors.is_empty()).then_some((read_at, predecessors)))
    }

    /// Waits until one of `keys` (base64) is deleted after `revision`. A watch that cannot be
    /// set up never wakes (the keepalive's timer does, and the next one looks again).
    async fn first_deletion(&self, revision: i64, keys: Vec<String>) -> Wake {
        let watches: Vec<Pin<Box<dyn Future<Output = ()> + Send + '_>>> =
            keys.into_iter().map(|k| Box::pin(self.deletion(revision, k)) as Pin<Box<_>>).collect();
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

    /// Returns once `key` (base64) has been deleted after `revision`, or the watch ended.
    async fn deletion(&self, revision: i64, key: String) {
        let body = json!({"create_request": {
            "key": key,
            // From just after the read: a deletion between the read and the watch is not missed.
            "start_revision": (revision + 1).to_string(),
            "filters": ["NOPUT"],
        }});
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
                return future::pending().await;
            }
            Err(e) => {
                tracing::debug!("etcd watch: {e}");
                return future::pending().await;
            }
        };
        let mut buf = Vec::new();
        while let Some(chunk) = stream.next_chunk().await {
            let Ok(chunk) = chunk else { return };
            buf.extend_from_slice(&chunk);
            let mut messages = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
            for m in messages.by_ref() {
                let Ok(m) = m else { return };
                // Only the watch's creation is no news; an event, a cancellation (a compacted
                // start revision) or an error all mean: look again.
                if !watch_created(&m) {
                    return;
                }
            }
            let used = messages.byte_offset();
            buf.drain(..used);
        }
    }
}

/// The keepalive's answer: the session's ttl and one grant not yet confirmed, if any.
fn alive_reply(local: &Local, ttl: LDuration) -> SessionReply {
    let keys = lock(&local.keys);
    let mut pushed = keys.values().filter_map(|w| match w {
        Want::Pushed(g) => Some(g.clone()),
        Want::Queued { .. } => None,
    });
    let granted = pushed.next();
    let more = pushed.next().is_some();
    SessionReply::Alive { ttl, granted, more }
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
        let local = match req.op {
            SessionOp::Open { .. } => None,
            _ => match self.local(req.session) {
                Some(l) if l.secret.ct_eq(&req.secret) => Some(l),
                Some(_) => return Ok(req.answer(SessionReply::Rejected(Reject::Unauthorized))),
                None => return Ok(req.answer(SessionReply::Expired)),
            },
        };
        let r = match (&req.op, local) {
            (SessionOp::Open { ttl, label }, _) => self.open(*ttl, label).await,
            (_, None) => Err(Fail::Expired),
            // No observers on etcd: an acknowledgement of one is a plain keepalive.
            (SessionOp::KeepAlive | SessionOp::KeepAliveSeen { .. }, Some(l)) => {
                self.keep_alive(&l, hold).await
            }
            (SessionOp::Acquire { key, wait }, Some(l)) => self.acquire(&l, req.seq, key, *wait).await,
            (SessionOp::Release { key, fence }, Some(l)) => self.release(&l, key, *fence).await,
            (SessionOp::Close, Some(l)) => self.close(&l, req.session).await,
            (SessionOp::AcquireWithLimit { key, wait, limit: 1 }, Some(l)) => {
                self.acquire(&l, req.seq, key, *wait).await
            }
            // Semaphores (N slots) are not built on etcd yet: refused as an operation this
            // authority does not speak, so the holder gives up at once instead of retrying.
            (SessionOp::AcquireWithLimit { .. }, Some(_)) => {
                Ok(SessionReply::Rejected(Reject::UnsupportedVersion))
            }
            // Observing (and the values observers are told) is the built-in server's so far.
            (
                SessionOp::AcquireWithValue { .. } | SessionOp::Observe { .. } | SessionOp::Unobserve { .. },
                Some(_),
            ) => Ok(SessionReply::Rejected(Reject::Malformed)),
        };
        match r {
            Ok(reply) => Ok(req.answer(reply)),
            Err(Fail::Expired) => {
                self.forget(req.session);
                Ok(req.answer(SessionReply::Expired))
            }
            Err(Fail::Transport(e)) => Err(e),
        }
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
