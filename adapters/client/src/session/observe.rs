//! Following a key's holder (issue 10 §3), and acquiring with a value for its observers.
//!
//! An observation rides on the session's keepalive: the server holds it open until the key
//! changes holder and answers with the change, and the next keepalive (sent at once)
//! acknowledges it and waits for the one after. So following a key costs no polling and no
//! connection beyond the session's own, and a change whose reply is lost is heard again.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use event_listener::Event as Signal;
use futures_lite::Stream;
use leasehold_core::session::holder::ObserveError as MachineObserveError;
use leasehold_core::session::wire::{parse_value, ObservedHolder};
use leasehold_core::session::SessionEvent;
use leasehold_core::{Fence, Key, KeyError, Reject};

use super::{lock, SessionClient, Terms};
use crate::client::{AcquireError, Waiting};
use crate::error::TransportError;
use crate::turns::parse;
use crate::Lease;

/// Most keys one [`SessionClient`] observes at once.
pub const MAX_OBSERVED_KEYS: usize = 256;

/// A key's holder, as an [`Observations`] stream reports each change of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// The key is held.
    Held {
        /// The holder's session id (what `leasehold run` exports as `LEASEHOLD_OWNER`).
        session: u64,
        /// The holder's label (`leasehold run`: `HOST:PID`).
        label: String,
        /// The grant's fence: strictly greater than every fence reported before it.
        fence: Fence,
        /// The value the holder acquired with ([`SessionClient::acquire_with_value`]); empty
        /// if none.
        value: String,
    },
    /// Nobody holds the key.
    Free,
}

impl From<Option<&ObservedHolder>> for Observation {
    fn from(h: Option<&ObservedHolder>) -> Observation {
        match h {
            Some(h) => Observation::Held {
                session: h.session.0,
                label: h.label.to_string(),
                fence: h.fence,
                value: h.value.to_string(),
            },
            None => Observation::Free,
        }
    }
}

/// Why an [`Observations`] stream ended (see [`Observations::error`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ObserveError {
    /// The key is not acceptable.
    #[error("invalid key: {0}")]
    InvalidKey(KeyError),
    /// This client observes the key already (one stream per key and client).
    #[error("the key is observed by this client already")]
    AlreadyObserved,
    /// The server refused (`Capacity`: it follows as many observers as it can).
    #[error("the server refused to observe the key: {0}")]
    Rejected(Reject),
    /// The server cannot be talked to as configured; retrying would not help.
    #[error("cannot talk to the server as configured: {0}")]
    Misconfigured(TransportError),
    /// The driver thread could not be started.
    #[error("cannot start the session driver: {0}")]
    Spawn(String),
}

impl From<AcquireError> for ObserveError {
    fn from(e: AcquireError) -> ObserveError {
        match e {
            AcquireError::InvalidKey(k) => ObserveError::InvalidKey(k),
            AcquireError::Rejected(r) => ObserveError::Rejected(r),
            AcquireError::Misconfigured(t) => ObserveError::Misconfigured(t),
            other => ObserveError::Spawn(other.to_string()),
        }
    }
}

/// One observed key's changes, from the driver to its stream.
#[derive(Default)]
pub(super) struct Watch {
    changes: Mutex<VecDeque<Observation>>,
    /// The machine ended the observation: `None` with the session (observe again in the
    /// next), or the authority's refusal.
    ended: Mutex<Option<Option<Reject>>>,
    changed: Signal,
}

impl super::Inner {
    /// Hands an observation's event to its stream; gives any other event back.
    pub(super) fn route_observation(&self, e: SessionEvent) -> Option<SessionEvent> {
        match e {
            SessionEvent::Observed { key, holder, missed, change } => {
                if missed > 0 {
                    tracing::warn!(%key, change, "observer lagged: {missed} changes of the key were not heard");
                }
                if let Some(w) = lock(&self.watches).get(&key) {
                    lock(&w.changes).push_back(Observation::from(holder.as_ref()));
                    w.changed.notify(usize::MAX);
                }
                None
            }
            SessionEvent::ObserveEnded { key, reason } => {
                if let Some(w) = lock(&self.watches).remove(&key) {
                    *lock(&w.ended) = Some(reason);
                    w.changed.notify(usize::MAX);
                }
                None
            }
            other => Some(other),
        }
    }
}

/// The changes of one key's holder: a [`Stream`] of [`Observation`]s, the holder at the start
/// first. It ends only if the server refuses the observation ([`error`](Self::error) says
/// why); a lost session is opened again and the key observed again, without reporting the
/// same holder twice. Dropping it stops the observation.
pub struct Observations {
    inner: Pin<Box<dyn Stream<Item = Observation> + Send>>,
    error: Arc<Mutex<Option<ObserveError>>>,
}

impl Observations {
    /// Why the stream ended, once it has.
    pub fn error(&self) -> Option<ObserveError> {
        lock(&self.error).clone()
    }
}

impl Stream for Observations {
    type Item = Observation;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Observation>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl std::fmt::Debug for Observations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observations").field("error", &self.error()).finish_non_exhaustive()
    }
}

/// The stream's state: the client (a user of the session), the key, the watch while the
/// machine observes it, and the last observation reported.
struct Follower {
    client: SessionClient,
    key: Key,
    watch: Option<Arc<Watch>>,
    last: Option<Observation>,
    error: Arc<Mutex<Option<ObserveError>>>,
}

impl Follower {
    async fn next(&mut self) -> Option<Observation> {
        loop {
            let watch = match &self.watch {
                Some(w) => w.clone(),
                None => match self.start().await {
                    Ok(w) => {
                        self.watch = Some(w.clone());
                        w
                    }
                    Err(e) => {
                        *lock(&self.error) = Some(e);
                        return None;
                    }
                },
            };
            let listener = watch.changed.listen();
            let change = lock(&watch.changes).pop_front();
            if let Some(o) = change {
                // After a new session's first report, the holder may be the one told already.
                if self.last.as_ref() != Some(&o) {
                    self.last = Some(o.clone());
                    return Some(o);
                }
                continue;
            }
            let ended = lock(&watch.ended).take();
            match ended {
                Some(Some(reason)) => {
                    self.watch = None;
                    *lock(&self.error) = Some(ObserveError::Rejected(reason));
                    return None;
                }
                // The session ended: observe again in the next one.
                Some(None) => self.watch = None,
                None => listener.await,
            }
        }
    }

    /// Observes the key in an open session (opening one if need be).
    async fn start(&self) -> Result<Arc<Watch>, ObserveError> {
        let client = &self.client;
        client.ensure_driver()?;
        let inner = &client.user.0;
        loop {
            client.opened(None).await?;
            let watch = Arc::new(Watch::default());
            let mut m = lock(&inner.machine);
            let mut watches = lock(&inner.watches);
            if watches.contains_key(&self.key) {
                return Err(ObserveError::AlreadyObserved);
            }
            watches.insert(self.key.clone(), watch.clone());
            let result = m.observe(inner.clock.now(), self.key.clone());
            match result {
                Ok(()) => {
                    // The first report comes in a keepalive's reply: have one out now.
                    m.keep_alive_now(inner.clock.now());
                    drop((m, watches));
                    inner.poke.notify(usize::MAX);
                    return Ok(watch);
                }
                Err(MachineObserveError::NotOpen) => {
                    watches.remove(&self.key);
                    continue;
                }
                Err(MachineObserveError::Full) => {
                    watches.remove(&self.key);
                    return Err(ObserveError::Rejected(Reject::Capacity));
                }
                Err(_) => {
                    watches.remove(&self.key);
                    return Err(ObserveError::AlreadyObserved);
                }
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let Some(watch) = self.watch.take() else { return };
        let inner = &self.client.user.0;
        // The machine first, then the watches: the order the driver takes them in.
        let mut m = lock(&inner.machine);
        let mut watches = lock(&inner.watches);
        if watches.get(&self.key).is_some_and(|w| Arc::ptr_eq(w, &watch)) {
            watches.remove(&self.key);
            if m.unobserve(inner.clock.now(), &self.key).is_ok() {
                inner.poke.notify(usize::MAX);
            }
        }
    }
}

impl SessionClient {
    /// Follows `key`'s holder: a stream of its holder now, then of each change (a new
    /// holder with its label, fence and value, or free), in order, pushed by the server in
    /// the session's held keepalives (no polling). Leader election is every candidate's
    /// [`acquire_with_value`](Self::acquire_with_value) with its address, and `observe` to
    /// find the leader.
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures_lite::StreamExt;
    /// use leasehold_client::{Observation, Options, SessionClient};
    /// use leasehold_http::BuiltinSessions;
    ///
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let config = leasehold_server::ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap());
    /// # let server = leasehold_server::Server::spawn(config).unwrap();
    /// # let url = server.url();
    /// futures_lite::future::block_on(async {
    ///     let options = Options::session(Duration::from_secs(6));
    ///     let timeout = options.config.request_timeout.into();
    ///     let follower = SessionClient::new(BuiltinSessions::new(&url, None, timeout)?, "follower", options.clone())?;
    ///     let candidate = SessionClient::new(BuiltinSessions::new(&url, None, timeout)?, "candidate", options)?;
    ///
    ///     let mut leaders = follower.observe("leader")?;
    ///     assert_eq!(leaders.next().await, Some(Observation::Free)); // nobody leads yet
    ///     let lease = candidate.acquire_with_value("leader", "10.0.0.7:8080", None, |_| {}).await?;
    ///     match leaders.next().await {
    ///         Some(Observation::Held { label, fence, value, .. }) => {
    ///             assert_eq!((label.as_str(), value.as_str()), ("candidate", "10.0.0.7:8080"));
    ///             assert_eq!(Some(fence), lease.fence());
    ///         }
    ///         other => panic!("{other:?}"),
    ///     }
    ///     lease.release().await?;
    ///     assert_eq!(leaders.next().await, Some(Observation::Free));
    ///     Ok::<(), Box<dyn std::error::Error>>(())
    /// })
    /// .unwrap();
    /// ```
    pub fn observe(&self, key: &str) -> Result<Observations, ObserveError> {
        let key = leasehold_core::parse_key(key).map_err(ObserveError::InvalidKey)?;
        let error = Arc::new(Mutex::new(None));
        let follower = Follower { client: self.clone(), key, watch: None, last: None, error: error.clone() };
        let inner = futures_lite::stream::unfold(follower, |mut f| async move {
            let o = f.next().await?;
            Some((o, f))
        });
        Ok(Observations { inner: Box::pin(inner), error })
    }

    /// [`acquire_reporting`](Self::acquire_reporting), and the holding carries `value` (at
    /// most 64 bytes of printable ASCII: an address, say), which observers of the key are
    /// told with the holder.
    pub async fn acquire_with_value(
        &self,
        key: &str,
        value: &str,
        timeout: Option<Duration>,
        mut report: impl FnMut(&Waiting) + Send,
    ) -> Result<Lease, AcquireError> {
        let value = parse_value(value).map_err(AcquireError::InvalidValue)?;
        let key = parse(key)?;
        let clock = &self.user.0.clock;
        let deadline = timeout.map(|t| clock.now() + t.into());
        let guard = self.user.0.local.take(&key, deadline.map(|d| clock.sleep_until(d))).await?;
        self.start(key, Terms::valued(value), guard, true, deadline, &mut report).await
    }

    /// [`try_acquire`](Self::try_acquire), with a value as for
    /// [`acquire_with_value`](Self::acquire_with_value).
    pub async fn try_acquire_with_value(&self, key: &str, value: &str) -> Result<Lease, AcquireError> {
        let value = parse_value(value).map_err(AcquireError::InvalidValue)?;
        let key = parse(key)?;
        let guard = self.user.0.local.try_take(&key)?;
        self.start(key, Terms::valued(value), guard, false, None, &mut |_| {}).await
    }
}
