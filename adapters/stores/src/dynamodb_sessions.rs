//! Protocol v2 (sessions) on DynamoDB, with the compare-and-set discipline of v1.
//!
//! DynamoDB keeps no clock, pushes nothing, and (without TransactWriteItems, which the
//! DynamoDB-compatible test server lacks) has no condition across items. So:
//!
//! - **Items are v1's.** One item per key in the same table, `owner`, `fence`, `version` and
//!   `ttl_us` as [`DynamoDbBackend`] writes them, plus the holder's public `label`. The owner
//!   is the session's id in decimal, so a v1 and a v2 client of the same key exclude each
//!   other: both write the same items under the same conditions, and each waits the other out
//!   the same way.
//! - **A session renews per item.** A keepalive makes one conditional update per held key
//!   (same owner and fence; bump `version`), all issued after the keepalive was sent, so every
//!   key's life in the store starts after the moment the holder counts its validity from. A
//!   failed condition means a rival took the key over, which waiting out `ttl·(1+ε)` allows
//!   only after our validity ended: the session is answered
//!   [`Expired`](SessionReply::Expired), so the holder loses every key at once, and the others
//!   are released.
//! - **Taking over waits on the contender's clock**: a waiter that finds the key held keeps a
//!   [`Sighting`] (the core's rule, shared with v1's `Lease`) of the version it saw and takes
//!   over *that version* only once it is due, `ttl·(1+ε) + margin` after the first sighting;
//!   a renewal by the holder changes the version and restarts the wait.
//! - **Waiting polls, with jitter.** There is no push: a keepalive held open (`hold`) polls the
//!   session's waited keys every `U[0.5, 1.0]·poll interval` (the interval is the session's
//!   ttl/8, between 20 ms and 5 s), and at the takeover's due time, and answers early with the
//!   grant when a conditional write wins. A keepalive not held polls once.
//!
//! **Fairness that remains:** none by order. There is no queue in the store, so there is no
//! FIFO: when a key is released, whichever waiter's poll lands first gets it; when a holder
//! dies, whichever waiter's takeover is due first (it saw the last version earliest) gets it.
//! The jitter keeps waiters from polling in lockstep, so over many hand-offs each has the same
//! chance, but a waiter can be overtaken by one that came later. A session that releases and
//! acquires again at once can win again before any waiter polls (the starvation v1 has).
//!
//! The session's [`Secret`] and id are drawn here: DynamoDB never sees the secret, so it only
//! guards against a confused caller of this process; who may write the items is IAM's
//! business. Semaphores (limit above 1) and observers are not built on DynamoDB: refused as
//! `Rejected(UnsupportedVersion)` and `Rejected(Malformed)`, as on etcd.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use event_listener::Event;
use futures_lite::future;
use leasehold_core::authority::cas::Sighting;
use leasehold_core::session::wire::{
    Grant, Secret, Seq, SessionId, SessionOp, SessionReply, SessionRequest, SessionResponse,
};
use leasehold_core::{Config, Duration as LDuration, Fence, Instant as LInstant, Key, Reject, Reply};
use leasehold_http::{SessionBackend, TransportError};
use serde_json::{json, Value};

use crate::session_exchange::{respond, session_of, Fail};

use crate::dynamodb::{get_body, num, update_body, DynamoDbBackend, Failure};
use crate::Credentials;

/// Renewals of one keepalive in flight at once.
const RENEW_IN_FLIGHT: usize = 16;

/// Shortest and longest poll interval of a waiting session.
const POLL_MIN: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_secs(5);

/// A bug planted on purpose, so the tests can show they catch it (feature `fault-injection`;
/// never in a real build).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DynamoFault {
    /// A waiter takes over the version it saw at its next poll, without waiting it out.
    TakeOverAtOnce,
}

/// Sessions on a DynamoDB table, as a [`SessionBackend`] for
/// [`SessionClient`](leasehold_http::SessionClient).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use leasehold_http::{Options, SessionClient};
/// use leasehold_stores::DynamoSessions;
///
/// let options = Options::session(Duration::from_secs(15));
/// // Credentials and region from AWS_*; ε and the margin of the takeover rule from the config.
/// let dynamo = DynamoSessions::from_env("https://dynamodb.eu-west-1.amazonaws.com", "leases", &options.config)?;
/// let client = SessionClient::new(dynamo, "worker-1", options)?;
/// let lease = client.acquire("nightly-report").await?; // polls with jitter while held
/// println!("fence {:?}", lease.fence());
/// lease.release().await?;
/// # Ok(()) }
/// ```
///
/// A session lives in this value (its secret, which keys it holds and waits for): it is usable
/// only through the `DynamoSessions` that opened it; to any other it is
/// [`Expired`](SessionReply::Expired).
pub struct DynamoSessions {
    store: DynamoDbBackend,
    /// Whose ε and margin the takeover rule uses.
    config: Config,
    /// Where this value's [`LInstant`]s count from.
    origin: std::time::Instant,
    sessions: Mutex<HashMap<SessionId, Arc<Local>>>,
    #[cfg(feature = "fault-injection")]
    fault: Option<DynamoFault>,
}

/// What this process knows of one of its sessions.
struct Local {
    secret: Secret,
    /// The `owner` attribute of its items: the session id in decimal.
    owner: String,
    label: String,
    /// The session's ttl, written as each item's `ttl_us`.
    ttl: LDuration,
    state: Mutex<State>,
    /// A key was queued: a held keepalive has one more key to poll.
    queued: Event,
}

struct State {
    keys: HashMap<Key, Holding>,
    /// Until when the last successful keepalive (or the open) keeps the session, on our clock,
    /// counted from before its writes: a later keepalive finds it expired.
    alive_until: LInstant,
}

/// Where the session is with a key.
#[derive(Debug, Clone)]
enum Holding {
    /// A grant's write may be in flight (or was made by a call that was dropped): the item may
    /// be ours, so keepalives renew it if it is.
    Acquiring,
    /// Ours under `fence`.
    Held { fence: Fence },
    /// Held by someone else; polled.
    Waiting {
        /// The seq of the acquire that queued it, reported with its grant.
        asked: Seq,
        /// The holder's version as last seen, and when its takeover is due.
        sighting: Sighting,
        /// The next attempt.
        poll_at: LInstant,
    },
    /// Won by a poll, reported in keepalives until an acquire confirms it.
    Pushed(Grant),
}

/// What one conditional write of a grant found.
enum Attempt {
    /// The key is now ours under this fence.
    Won(Fence),
    /// It was ours already (a write of ours whose answer was lost).
    Ours(Fence),
    /// Held by another holder at this version, with this ttl.
    Held { version: u64, ttl: LDuration },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DynamoSessions {
    /// Sessions on `table` at `endpoint` in `region`, signing with `credentials` (as
    /// [`DynamoDbBackend::new`]). `config` gives the request timeout and the ε and margin a
    /// waiter waits a holder out with: use the session's (`Options::session(ttl).config`).
    /// Nothing is contacted until the first call.
    pub fn new(
        endpoint: &str,
        region: &str,
        table: &str,
        credentials: Credentials,
        config: &Config,
    ) -> Result<DynamoSessions, TransportError> {
        let timeout = config.request_timeout.into();
        Ok(DynamoSessions::on(DynamoDbBackend::new(endpoint, region, table, credentials, timeout)?, config))
    }

    /// As [`new`](Self::new), with credentials and region from the environment (as
    /// [`DynamoDbBackend::from_env`]).
    pub fn from_env(endpoint: &str, table: &str, config: &Config) -> Result<DynamoSessions, TransportError> {
        let timeout = config.request_timeout.into();
        Ok(DynamoSessions::on(DynamoDbBackend::from_env(endpoint, table, timeout)?, config))
    }

    fn on(store: DynamoDbBackend, config: &Config) -> DynamoSessions {
        DynamoSessions {
            store,
            config: *config,
            origin: std::time::Instant::now(),
            sessions: Mutex::new(HashMap::new()),
            #[cfg(feature = "fault-injection")]
            fault: None,
        }
    }

    /// Uses `tls` for an `https://` endpoint (see [`DynamoDbBackend::with_tls`]).
    #[cfg(feature = "tls")]
    pub fn with_tls(self, tls: leasehold_http::TlsConfig) -> DynamoSessions {
        DynamoSessions { store: self.store.with_tls(tls), ..self }
    }

    /// Plants `fault` (tests only).
    #[cfg(feature = "fault-injection")]
    pub fn with_fault(self, fault: DynamoFault) -> DynamoSessions {
        DynamoSessions { fault: Some(fault), ..self }
    }

    /// Creates the table if it does not exist (see [`DynamoDbBackend::create_table`]).
    pub async fn create_table(&self) -> Result<(), TransportError> {
        self.store.create_table().await
    }

    fn now(&self) -> LInstant {
        LInstant::from_micros(u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX))
    }

    fn at(&self, t: LInstant) -> std::time::Instant {
        self.origin + Duration::from_micros(t.as_micros())
    }

    /// From when the takeover of what `sighting` saw may be asked for.
    fn due_at(&self, sighting: &Sighting) -> LInstant {
        #[cfg(feature = "fault-injection")]
        if self.fault == Some(DynamoFault::TakeOverAtOnce) {
            return LInstant::from_micros(0);
        }
        sighting.due()
    }

    fn due(&self, sighting: &Sighting, now: LInstant) -> bool {
        now >= self.due_at(sighting)
    }

    /// The next poll of a waited key: jittered in [0.5, 1.0] of the interval so waiters do not
    /// poll in lockstep, and no later than the takeover's due time.
    fn next_poll(&self, local: &Local, now: LInstant, sighting: &Sighting) -> LInstant {
        let interval = Duration::from(local.ttl.mul_div_floor(1, 8)).clamp(POLL_MIN, POLL_MAX);
        let mut r = [0u8; 8];
        // Without randomness the jitter is a constant, still within the bounds.
        let r = getrandom::getrandom(&mut r).map(|_| u64::from_le_bytes(r)).unwrap_or(0);
        let fraction = 0.5 + 0.5 * (r >> 11) as f64 / (1u64 << 53) as f64;
        let jittered = LDuration::from_micros((interval.as_micros() as f64 * fraction) as u64);
        poll_at(now, now + jittered, self.due_at(sighting))
    }

    fn local(&self, session: SessionId) -> Option<Arc<Local>> {
        lock(&self.sessions).get(&session).cloned()
    }

    fn forget(&self, session: SessionId) {
        if let Some(local) = lock(&self.sessions).remove(&session) {
            local.queued.notify(usize::MAX);
        }
    }

    fn open(&self, ttl: LDuration, label: &str) -> Result<SessionReply, Fail> {
        let mut bytes = [0u8; 24];
        getrandom::getrandom(&mut bytes)
            .map_err(|e| TransportError::Config(format!("no randomness for the session: {e}")))?;
        let mut secret = [0u8; 16];
        secret.copy_from_slice(&bytes[..16]);
        let secret = Secret::from_bytes(secret);
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[16..]);
        // Random, not counted: nothing here outlives the process to count with, and 64 random
        // bits do not collide with another process's session or a v1 owner id in practice.
        let session = SessionId(u64::from_le_bytes(id).max(1));
        let local = Local {
            secret,
            owner: session.0.to_string(),
            label: label.to_string(),
            ttl,
            state: Mutex::new(State { keys: HashMap::new(), alive_until: self.now() + ttl }),
            queued: Event::new(),
        };
        let mut sessions = lock(&self.sessions);
        // Sessions whose holder went away without closing: their items expire in the store by
        // the takeover rule; here they only take memory.
        let now = self.now();
        sessions.retain(|_, l| lock(&l.state).alive_until > now);
        sessions.insert(session, Arc::new(local));
        Ok(SessionReply::Opened { session, secret, ttl })
    }

    /// A grant of `key` to the session: free, or (`takeover`) still at the version seen and
    /// waited out. An item freed between a failed write and its read is tried again.
    async fn attempt(&self, local: &Local, key: &Key, takeover: Option<u64>) -> Result<Attempt, Fail> {
        let mut freed = 0;
        loop {
            match self.attempt_once(local, key, takeover).await? {
                Some(a) => return Ok(a),
                None if freed < 3 => freed += 1,
                // Freed and taken again each time: seen at an unknown version, wait anew.
                None => return Ok(Attempt::Held { version: u64::MAX, ttl: local.ttl }),
            }
        }
    }

    /// One conditional write; `None`: the item was free when read after a failed condition.
    async fn attempt_once(
        &self,
        local: &Local,
        key: &Key,
        takeover: Option<u64>,
    ) -> Result<Option<Attempt>, Fail> {
        let body = acquire_body(self.store.table(), key, local, takeover);
        let item = match self.store.update(&body).await? {
            Ok(old) => {
                let before = match &old["fence"] {
                    Value::Null => Some(0),
                    f => num(f),
                };
                return match before.and_then(|f| Fence(f).next()) {
                    Some(fence) => Ok(Some(Attempt::Won(fence))),
                    None => Err(unusable(&old).into()),
                };
            }
            Err(Failure::Reply(r)) => return Err(refused("UpdateItem", r).into()),
            Err(Failure::Condition(Some(item))) => item,
            // dynalite does not return the item that failed the check: one consistent read.
            Err(Failure::Condition(None)) => {
                match self.store.api("GetItem", &get_body(self.store.table(), key)).await? {
                    (200, v) => v["Item"].clone(),
                    (status, v) => {
                        return Err(match crate::dynamodb::classify(status, &v) {
                            Failure::Reply(r) => refused("GetItem", r),
                            Failure::Condition(_) => {
                                TransportError::Protocol(format!("GetItem: HTTP {status}: {v}"))
                            }
                        }
                        .into())
                    }
                }
            }
        };
        match item["owner"]["S"].as_str() {
            Some(o) if o == local.owner => match num(&item["fence"]) {
                Some(f) => Ok(Some(Attempt::Ours(Fence(f)))),
                None => Err(unusable(&item).into()),
            },
            None => Ok(None),
            Some(_) => match (num(&item["version"]), num(&item["ttl_us"])) {
                (Some(version), Some(ttl)) => {
                    Ok(Some(Attempt::Held { version, ttl: LDuration::from_micros(ttl) }))
                }
                // Waiting would never end: the item was not written by leasehold.
                _ => Err(TransportError::Config(format!(
                    "DynamoDB item {key} has an owner but no numeric version/ttl_us: {item}"
                ))
                .into()),
            },
        }
    }

    async fn acquire(&self, local: &Local, seq: Seq, key: &Key, wait: bool) -> Result<SessionReply, Fail> {
        let prior = {
            let mut state = lock(&local.state);
            match state.keys.get(key).cloned() {
                Some(Holding::Held { fence }) => {
                    return Ok(SessionReply::Granted { key: key.clone(), fence })
                }
                // The holder confirms a grant a poll won.
                Some(Holding::Pushed(g)) => {
                    state.keys.insert(key.clone(), Holding::Held { fence: g.fence });
                    return Ok(SessionReply::Granted { key: key.clone(), fence: g.fence });
                }
                Some(Holding::Waiting { sighting, .. }) => {
                    state.keys.insert(key.clone(), Holding::Acquiring);
                    Some(sighting)
                }
                Some(Holding::Acquiring) | None => {
                    state.keys.insert(key.clone(), Holding::Acquiring);
                    None
                }
            }
        };
        let now = self.now();
        let takeover = prior.filter(|s| self.due(s, now)).map(|s| s.version());
        match self.attempt(local, key, takeover).await? {
            Attempt::Won(fence) | Attempt::Ours(fence) => {
                lock(&local.state).keys.insert(key.clone(), Holding::Held { fence });
                Ok(SessionReply::Granted { key: key.clone(), fence })
            }
            Attempt::Held { version, ttl } => {
                let now = self.now();
                let sighting = match prior {
                    Some(s) => s.again(&self.config, now, version, ttl),
                    None => Sighting::new(&self.config, now, version, ttl),
                };
                let mut state = lock(&local.state);
                if wait {
                    let poll_at = self.next_poll(local, now, &sighting);
                    state.keys.insert(key.clone(), Holding::Waiting { asked: seq, sighting, poll_at });
                    drop(state);
                    local.queued.notify(usize::MAX);
                    // No queue in the store: every waiter is as near as any other.
                    return Ok(SessionReply::Queued { key: key.clone(), position: 1 });
                }
                state.keys.remove(key);
                // Not a bound on the holder's remaining time (nobody here knows it): how long
                // the key can stay held without a renewal we would see.
                let expires_in = sighting.due().saturating_duration_since(now);
                Ok(SessionReply::Busy { key: key.clone(), expires_in })
            }
        }
    }

    async fn release(&self, local: &Local, key: &Key, fence: Fence) -> Result<SessionReply, Fail> {
        {
            let mut state = lock(&local.state);
            if fence == Fence::NONE {
                // Leaving the wait. A grant a poll already won stays reported; the holder gives
                // it back by its fence.
                if !matches!(state.keys.get(key), Some(Holding::Pushed(_))) {
                    state.keys.remove(key);
                }
                return Ok(SessionReply::Released { key: key.clone() });
            }
            // Forgotten before the write, so a keepalive renewing meanwhile does not take the
            // item's release for a rival's takeover.
            state.keys.remove(key);
        }
        Ok(match self.give_back(local, key, fence).await? {
            true => SessionReply::Released { key: key.clone() },
            false => SessionReply::NotHolder { key: key.clone() },
        })
    }

    /// Frees the item if it is still the session's grant under `fence`; keeps the item, so the
    /// fence counter never resets. `false`: it was not.
    async fn give_back(&self, local: &Local, key: &Key, fence: Fence) -> Result<bool, Fail> {
        match self.store.update(&release_body(self.store.table(), key, local, fence)).await? {
            Ok(_) => Ok(true),
            Err(Failure::Condition(_)) => Ok(false),
            Err(Failure::Reply(r)) => Err(refused("UpdateItem", r).into()),
        }
    }

    /// Every key the session holds (with its fence) or may hold (a grant in flight: `None`).
    fn holdings(local: &Local) -> Vec<(Key, Option<Fence>)> {
        lock(&local.state)
            .keys
            .iter()
            .filter_map(|(k, h)| match h {
                Holding::Held { fence } => Some((k.clone(), Some(*fence))),
                Holding::Pushed(g) => Some((k.clone(), Some(g.fence))),
                Holding::Acquiring => Some((k.clone(), None)),
                Holding::Waiting { .. } => None,
            })
            .collect()
    }

    async fn close(&self, local: &Local, session: SessionId) -> Result<SessionReply, Fail> {
        for (key, fence) in DynamoSessions::holdings(local) {
            let fence = match fence {
                Some(f) => f,
                // A grant in flight: read who holds the item.
                None => match self.store.api("GetItem", &get_body(self.store.table(), &key)).await? {
                    (200, v) if v["Item"]["owner"]["S"].as_str() == Some(&local.owner) => {
                        Fence(num(&v["Item"]["fence"]).unwrap_or(0))
                    }
                    (200, _) => {
                        lock(&local.state).keys.remove(&key);
                        continue;
                    }
                    (status, v) => {
                        return Err(TransportError::Protocol(format!("GetItem: HTTP {status}: {v}")).into())
                    }
                },
            };
            // Forgotten only once given back: a close that failed is retried and finds the rest.
            self.give_back(local, &key, fence).await?;
            lock(&local.state).keys.remove(&key);
        }
        self.forget(session);
        Ok(SessionReply::Closed)
    }

    /// The session's end seen by this process: its items are given back (whichever still are
    /// its), and it is forgotten.
    async fn expire(&self, local: &Local, session: SessionId) -> Fail {
        self.forget(session);
        for (key, fence) in DynamoSessions::holdings(local) {
            if let Some(fence) = fence {
                if let Err(Fail::Transport(e)) = self.give_back(local, &key, fence).await {
                    tracing::debug!("DynamoDB release of {key} at the session's end: {e}");
                }
            }
        }
        Fail::Expired
    }

    async fn keep_alive(
        &self,
        local: &Local,
        session: SessionId,
        hold: Duration,
    ) -> Result<SessionReply, Fail> {
        let started = self.now();
        let deadline = std::time::Instant::now() + hold;
        if started >= lock(&local.state).alive_until {
            return Err(self.expire(local, session).await);
        }
        // One conditional write per key, each after the keepalive was sent; RENEW_IN_FLIGHT at
        // a time, so a session of many keys renews in a few round trips, not one per key.
        let holdings = DynamoSessions::holdings(local);
        for chunk in holdings.chunks(RENEW_IN_FLIGHT) {
            let writes: Vec<_> = chunk
                .iter()
                .map(|(key, fence)| {
                    let body = renew_body(self.store.table(), key, local, *fence);
                    async move { self.store.update(&body).await }
                })
                .collect();
            let mut transient = None;
            for ((key, fence), result) in chunk.iter().zip(join_all(writes).await) {
                match result {
                    Ok(Ok(old)) => {
                        let mut state = lock(&local.state);
                        if fence.is_none() && matches!(state.keys.get(key), Some(Holding::Acquiring)) {
                            // The grant in flight was made: the item is ours.
                            if let Some(f) = num(&old["fence"]) {
                                state.keys.insert(key.clone(), Holding::Held { fence: Fence(f) });
                            }
                        }
                    }
                    Ok(Err(Failure::Condition(_))) => {
                        let still = match (lock(&local.state).keys.get(key), fence) {
                            (Some(Holding::Held { fence: now }), Some(f)) => now == f,
                            (Some(Holding::Pushed(g)), Some(f)) => g.fence == *f,
                            _ => false,
                        };
                        // Released or acquired again meanwhile, or a grant not made yet: not a
                        // loss.
                        if still {
                            tracing::warn!("DynamoDB item {key} was taken over: the session has expired");
                            return Err(self.expire(local, session).await);
                        }
                    }
                    Ok(Err(Failure::Reply(r))) => transient = transient.or(Some(refused("UpdateItem", r))),
                    Err(e) => transient = transient.or(Some(e)),
                }
            }
            if let Some(e) = transient {
                return Err(e.into());
            }
        }
        lock(&local.state).alive_until = started + local.ttl;
        loop {
            let queued = local.queued.listen();
            if let Err(e) = self.poll_waits(local).await {
                // The renewal stands; the next keepalive polls again.
                tracing::debug!("DynamoDB poll of waited keys after a keepalive: {e}");
                return Ok(alive_reply(local));
            }
            let next = {
                let state = lock(&local.state);
                if state.keys.values().any(|h| matches!(h, Holding::Pushed(_))) {
                    drop(state);
                    return Ok(alive_reply(local));
                }
                state
                    .keys
                    .values()
                    .filter_map(|h| match h {
                        Holding::Waiting { poll_at, .. } => Some(*poll_at),
                        _ => None,
                    })
                    .min()
            };
            let wake = next.map_or(deadline, |t| self.at(t).min(deadline));
            if wake >= deadline && std::time::Instant::now() >= deadline {
                return Ok(alive_reply(local));
            }
            future::or(
                async {
                    queued.await;
                },
                async {
                    async_io::Timer::at(wake).await;
                },
            )
            .await;
            if std::time::Instant::now() >= deadline {
                return Ok(alive_reply(local));
            }
        }
    }

    /// One attempt at each waited key whose poll is due: a win becomes a pushed grant.
    async fn poll_waits(&self, local: &Local) -> Result<(), TransportError> {
        let now = self.now();
        let due: Vec<(Key, Seq, Sighting)> = lock(&local.state)
            .keys
            .iter()
            .filter_map(|(k, h)| match h {
                Holding::Waiting { asked, sighting, poll_at } if *poll_at <= now => {
                    Some((k.clone(), *asked, *sighting))
                }
                _ => None,
            })
            .collect();
        for (key, asked, sighting) in due {
            let takeover = self.due(&sighting, self.now()).then(|| sighting.version());
            let attempt = match self.attempt(local, &key, takeover).await {
                Ok(a) => a,
                Err(Fail::Transport(e)) => return Err(e),
                Err(Fail::Expired) => continue,
            };
            let give_back = {
                let mut state = lock(&local.state);
                let waiting =
                    matches!(state.keys.get(&key), Some(Holding::Waiting { asked: a, .. }) if *a == asked);
                match attempt {
                    Attempt::Won(fence) | Attempt::Ours(fence) if waiting => {
                        state
                            .keys
                            .insert(key.clone(), Holding::Pushed(Grant { key: key.clone(), fence, asked }));
                        None
                    }
                    // Won for a wait the holder gave up meanwhile: give it back.
                    Attempt::Won(fence) | Attempt::Ours(fence) => Some(fence),
                    Attempt::Held { version, ttl } if waiting => {
                        let now = self.now();
                        let sighting = sighting.again(&self.config, now, version, ttl);
                        let poll_at = self.next_poll(local, now, &sighting);
                        state.keys.insert(key.clone(), Holding::Waiting { asked, sighting, poll_at });
                        None
                    }
                    Attempt::Held { .. } => None,
                }
            };
            if let Some(fence) = give_back {
                if let Err(Fail::Transport(e)) = self.give_back(local, &key, fence).await {
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

/// Runs `futures` concurrently; their outputs in order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// A waited key's next attempt: the jittered poll, or the takeover's due time if that comes
/// first (never in the past).
fn poll_at(now: LInstant, poll: LInstant, due: LInstant) -> LInstant {
    poll.min(due).max(now)
}

/// The keepalive's answer: the session's ttl and one grant not yet confirmed, if any.
fn alive_reply(local: &Local) -> SessionReply {
    let state = lock(&local.state);
    let mut pushed = state.keys.values().filter_map(|h| match h {
        Holding::Pushed(g) => Some(g.clone()),
        _ => None,
    });
    let granted = pushed.next();
    let more = pushed.next().is_some();
    SessionReply::Alive { ttl: local.ttl, granted, more }
}

fn unusable(item: &Value) -> TransportError {
    TransportError::Protocol(format!("DynamoDB returned an unusable fence: {item}"))
}

/// A refusal [`classify`](crate::dynamodb::classify) read as a v1 reply, for a session:
/// throttling and server errors are transient, the rest needs an operator.
fn refused(op: &str, r: Reply) -> TransportError {
    match r {
        Reply::Rejected(Reject::Unauthorized) => {
            TransportError::Config(format!("DynamoDB {op}: refused our credentials"))
        }
        Reply::Rejected(r) => TransportError::Config(format!("DynamoDB {op}: refused: {r:?} (see the log)")),
        _ => TransportError::Protocol(format!("DynamoDB {op}: unavailable or throttled")),
    }
}

/// A grant to the session: the item is free (no owner), or (`takeover`) still at the version
/// seen and waited out. Sets owner, label and ttl, bumps fence and version, in one write.
/// Already ours fails the condition, and the item returned tells (the fence stays).
fn acquire_body(table: &str, key: &Key, local: &Local, takeover: Option<u64>) -> Value {
    let mut values = json!({
        ":me": {"S": local.owner},
        ":label": {"S": local.label},
        ":ttl": {"N": local.ttl.as_micros().to_string()},
        ":zero": {"N": "0"},
        ":one": {"N": "1"},
    });
    let mut cond = "attribute_not_exists(#o)".to_string();
    if let Some(v) = takeover {
        values[":seen"] = json!({"N": v.to_string()});
        cond.push_str(" OR (#v = :seen AND #o <> :me)");
    }
    let expr = "SET #o = :me, #l = :label, #t = :ttl, #f = if_not_exists(#f, :zero) + :one, \
                #v = if_not_exists(#v, :zero) + :one";
    update_body(table, key, expr, &cond, values)
}

/// A keepalive's renewal of one item: still ours under `fence` (or, for a grant in flight, ours
/// at all); bumping the version tells waiters we are alive.
fn renew_body(table: &str, key: &Key, local: &Local, fence: Option<Fence>) -> Value {
    let mut values = json!({
        ":me": {"S": local.owner},
        ":ttl": {"N": local.ttl.as_micros().to_string()},
        ":one": {"N": "1"},
    });
    let cond = match fence {
        Some(f) => {
            values[":fence"] = json!({"N": f.0.to_string()});
            "#o = :me AND #f = :fence"
        }
        None => "#o = :me",
    };
    update_body(table, key, "SET #t = :ttl, #v = #v + :one", cond, values)
}

/// Release: still ours under `fence`; owner and label go, the item (and its fence) stays.
fn release_body(table: &str, key: &Key, local: &Local, fence: Fence) -> Value {
    let values = json!({
        ":me": {"S": local.owner},
        ":fence": {"N": fence.0.to_string()},
        ":one": {"N": "1"},
    });
    update_body(table, key, "REMOVE #o, #l SET #v = #v + :one", "#o = :me AND #f = :fence", values)
}

impl SessionBackend for DynamoSessions {
    async fn call(&self, req: SessionRequest, hold: Duration) -> Result<SessionResponse, TransportError> {
        let local = match session_of(&req, |id| self.local(id), |l| &l.secret) {
            Ok(local) => local,
            Err(unknown) => return Ok(req.answer(unknown.reply())),
        };
        let r = match (&req.op, local) {
            (SessionOp::Open { ttl, label }, _) => self.open(*ttl, label),
            (_, None) => Err(Fail::Expired),
            // No observers on DynamoDB: an acknowledgement of one is a plain keepalive.
            (SessionOp::KeepAlive | SessionOp::KeepAliveSeen { .. }, Some(l)) => {
                self.keep_alive(&l, req.session, hold).await
            }
            (SessionOp::Acquire { key, wait }, Some(l))
            | (SessionOp::AcquireWithLimit { key, wait, limit: 1 }, Some(l)) => {
                self.acquire(&l, req.seq, key, *wait).await
            }
            (SessionOp::Release { key, fence }, Some(l)) => self.release(&l, key, *fence).await,
            (SessionOp::Close, Some(l)) => self.close(&l, req.session).await,
            // Semaphores are not built on DynamoDB: refused as an operation this authority does
            // not speak, so the holder gives up at once instead of retrying.
            (SessionOp::AcquireWithLimit { .. }, Some(_)) => {
                Ok(SessionReply::Rejected(Reject::UnsupportedVersion))
            }
            (
                SessionOp::AcquireWithValue { .. } | SessionOp::Observe { .. } | SessionOp::Unobserve { .. },
                Some(_),
            ) => Ok(SessionReply::Rejected(Reject::Malformed)),
        };
        respond(&req, r, |session| self.forget(session))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_core::parse_key;

    fn local() -> Local {
        Local {
            secret: Secret::NONE,
            owner: "42".into(),
            label: "host-1".into(),
            ttl: LDuration::from_secs(2),
            state: Mutex::new(State { keys: HashMap::new(), alive_until: LInstant::from_micros(0) }),
            queued: Event::new(),
        }
    }

    #[test]
    fn a_grant_is_to_a_free_item_or_a_waited_out_version_of_another_holder() {
        let k = parse_key("pump").unwrap();
        let b = acquire_body("leases", &k, &local(), None);
        assert_eq!(b["ConditionExpression"], "attribute_not_exists(#o)");
        assert_eq!(b["ExpressionAttributeValues"][":me"], json!({"S": "42"}));
        assert_eq!(b["ExpressionAttributeValues"][":label"], json!({"S": "host-1"}));
        assert_eq!(b["ExpressionAttributeValues"][":ttl"], json!({"N": "2000000"}));
        assert_eq!(b["ExpressionAttributeNames"]["#l"], "label");
        let t = acquire_body("leases", &k, &local(), Some(9));
        assert_eq!(t["ConditionExpression"], "attribute_not_exists(#o) OR (#v = :seen AND #o <> :me)");
        assert_eq!(t["ExpressionAttributeValues"][":seen"], json!({"N": "9"}));
    }

    #[test]
    fn polls_are_jittered_within_half_to_all_of_the_interval_and_never_after_the_takeover_is_due() {
        let config = Config::new(LDuration::from_secs(2));
        let creds = Credentials::new("AKID", "secret", None, None, "test");
        let b = DynamoSessions::new("http://127.0.0.1:9", "us-east-1", "leases", creds, &config).unwrap();
        let (l, ms) = (local(), LInstant::from_millis);
        // ttl 2 s: interval 250 ms, so polls 125–250 ms apart.
        let far = Sighting::new(&config, ms(1_000), 1, LDuration::from_secs(60));
        let gaps: Vec<u64> =
            (0..2_000).map(|_| (b.next_poll(&l, ms(1_000), &far) - ms(1_000)).as_millis()).collect();
        assert!(gaps.iter().all(|g| (125..=250).contains(g)), "{:?}", (gaps.iter().min(), gaps.iter().max()));
        let (lo, hi) = (gaps.iter().filter(|g| **g < 160).count(), gaps.iter().filter(|g| **g > 215).count());
        assert!(lo > 200 && hi > 200, "spread over the range, not lockstep: {lo} low, {hi} high");
        // A takeover due before the next poll is tried at its due time, and one overdue at once.
        let soon = Sighting::new(&config, ms(1_000), 1, LDuration::from_millis(50));
        assert_eq!(b.next_poll(&l, ms(1_000), &soon), soon.due());
        assert_eq!(b.next_poll(&l, ms(9_000), &soon), ms(9_000));
    }

    #[test]
    fn renewals_and_releases_are_fenced_and_a_release_keeps_the_item() {
        let k = parse_key("pump").unwrap();
        let r = renew_body("leases", &k, &local(), Some(Fence(4)));
        assert_eq!(r["ConditionExpression"], "#o = :me AND #f = :fence");
        assert_eq!(r["UpdateExpression"], "SET #t = :ttl, #v = #v + :one");
        let pending = renew_body("leases", &k, &local(), None);
        assert_eq!(pending["ConditionExpression"], "#o = :me");
        assert_eq!(pending["ExpressionAttributeValues"].get(":fence"), None);
        let d = release_body("leases", &k, &local(), Fence(4));
        assert_eq!(d["UpdateExpression"], "REMOVE #o, #l SET #v = #v + :one");
        assert_eq!(
            d["ExpressionAttributeNames"],
            json!({"#o": "owner", "#l": "label", "#f": "fence", "#v": "version"})
        );
    }
}
