//! The high-level handle: `client.acquire("key").await` and a lease that renews itself.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_lock::MutexGuardArc;
use event_listener::Event as Signal;
use futures_lite::future;
use leasehold_core::{
    Config, ConfigError, Event, Fence, Health, Key, KeyError, LostReason, NotAcquired, OwnerId, Reject,
    Reply, RequestId, Response, State,
};

use crate::backend::Backend;
use crate::clock::{Clock, SystemClock};
use crate::error::TransportError;
use crate::turns::{parse, LocalTurns};

/// Why an acquisition failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AcquireError {
    /// The key is not acceptable.
    #[error("invalid key: {0}")]
    InvalidKey(KeyError),
    /// Someone else holds the key (and we were not to wait, or the deadline came).
    #[error("the lease is held by someone else")]
    Busy,
    /// The authority could not be reached (or answered that it cannot serve) before the
    /// deadline. The last transport error, if that is what kept it away, says where and why.
    #[error("the lease authority is unavailable{}", match .0 { Some(e) => format!(": {e}"), None => String::new() })]
    Unavailable(#[source] Option<Unreachable>),
    /// The authority refused the request outright.
    #[error("the authority rejected the request: {0}")]
    Rejected(Reject),
    /// The authority cannot be talked to as configured (a refused certificate, missing
    /// credentials...): see [`TransportError::is_permanent`]. Retrying would not help.
    #[error("cannot talk to the authority as configured: {0}")]
    Misconfigured(TransportError),
    /// The driver thread could not be started.
    #[error("cannot start the lease driver: {0}")]
    Spawn(String),
    /// The value to acquire with is not acceptable (protocol v2's
    /// [`SessionClient::acquire_with_value`](crate::SessionClient::acquire_with_value)).
    #[error("invalid value: {0}")]
    InvalidValue(leasehold_core::session::wire::ValueError),
}

/// The transport error behind [`AcquireError::Unavailable`], displayed by it already: its
/// [`source`](std::error::Error::source) is that error's cause, so a [`Report`](crate::Report)
/// of the chain names each thing once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable(pub TransportError);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Unreachable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.0)
    }
}

/// Why [`Lease::release`] could not confirm that the key is free.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseError {
    /// No answer to the release came before the grant's validity ran out (the authority is
    /// unreachable). The holder stopped believing at once all the same; the key frees when the
    /// authority expires the grant, at most a ttl after its last renewal.
    #[error(
        "the release of {key:?} (fence {fence}) was not acknowledged; the key frees when its grant expires"
    )]
    NotAcknowledged {
        /// The key.
        key: String,
        /// The fence given back.
        fence: Fence,
        /// The last transport error, if any.
        #[source]
        last_error: Option<TransportError>,
    },
    /// The lease had been lost before the release: there was nothing to give back.
    #[error("the lease on {key:?} was lost before the release: {reason}")]
    Lost {
        /// The key.
        key: String,
        /// Why it was lost.
        reason: LostReason,
    },
}

/// What an acquisition is waiting for, as told to
/// [`Client::acquire_reporting`]'s callback each time it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Waiting {
    /// Someone else holds the key. `expires_in` is how long the authority says its grant has
    /// left (a bound: the holder may release earlier), if the backend can tell.
    Held {
        /// The holder's remaining grant, if the backend can tell.
        expires_in: Option<Duration>,
    },
    /// The authority cannot be reached, or cannot serve; the acquisition keeps retrying.
    Unreachable(Option<TransportError>),
}

/// Client-side settings of a lease.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Timing of every lease this client takes.
    pub config: Config,
}

impl Options {
    /// Defaults for a ttl (see [`Config::new`]).
    pub fn new(ttl: Duration) -> Options {
        Options { config: Config::new(ttl.into()) }
    }
}

/// Takes leases from one backend.
pub struct Client<B: Backend> {
    inner: Arc<Inner<B>>,
}

impl<B: Backend> Clone for Client<B> {
    fn clone(&self) -> Self {
        Client { inner: self.inner.clone() }
    }
}

struct Inner<B> {
    backend: B,
    config: Config,
    /// Every `now` the machines get and every wake-up armed for them.
    clock: Arc<dyn Clock>,
    /// One async mutex per key: leases of the same key taken through one client queue up
    /// here instead of hammering the authority.
    local: LocalTurns,
    /// Started with the first acquisition; stops once the client and all its leases are gone.
    driver: Mutex<Option<DriverThread>>,
    /// Leases whose driver task has not ended yet, and a signal for each that ends.
    active: AtomicUsize,
    idle: Signal,
}

/// Counts one lease's driver task as active for as long as it lives (dropping the task, run or
/// not, ends it).
struct Active<B: Backend>(Arc<Inner<B>>);

impl<B: Backend> Active<B> {
    fn new(inner: &Arc<Inner<B>>) -> Active<B> {
        inner.active.fetch_add(1, Ordering::SeqCst);
        Active(inner.clone())
    }
}

impl<B: Backend> Drop for Active<B> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        self.0.idle.notify(usize::MAX);
    }
}

/// Where the leases of a client (and its clones) are driven: the process's one driver thread,
/// shared by every [`Client`] and [`SessionClient`](crate::SessionClient).
///
/// Renewal runs there rather than on the caller's executor for two reasons: the crate needs no
/// runtime (no spawn trait to implement, works under smol, tokio or plain `block_on`), and a
/// caller that blocks its own executor threads cannot starve renewals and lose the lease.
///
/// One thread for the process, not one per client: a program with 64 session clients had 64
/// driver threads, each woken (a futex and a context switch) by the I/O reactor's thread for
/// its own responses; one thread drains the responses of all of them per wake-up. Drivers do
/// no blocking work (name resolution is moved off it), so clients cannot hold each other up.
/// The reactor stays on async-io's own thread: run on this one (`async_io::block_on`), a burst
/// of 1,000 acquisitions in one client took 10-38 s instead of 1-10 s in a loaded debug build,
/// timing out and retrying (`a_thousand_leases_in_one_client_share_one_keepalive`).
pub(crate) struct DriverThread {
    pub(crate) executor: Arc<async_executor::Executor<'static>>,
}

impl DriverThread {
    pub(crate) fn start() -> std::io::Result<DriverThread> {
        static SHARED: std::sync::OnceLock<Arc<async_executor::Executor<'static>>> =
            std::sync::OnceLock::new();
        static STARTING: Mutex<()> = Mutex::new(());
        if let Some(ex) = SHARED.get() {
            return Ok(DriverThread { executor: ex.clone() });
        }
        // One thread even if two clients start at once; a failed spawn is retried by the next.
        let _turn = STARTING.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ex) = SHARED.get() {
            return Ok(DriverThread { executor: ex.clone() });
        }
        let executor = Arc::new(async_executor::Executor::new());
        let ex = executor.clone();
        std::thread::Builder::new()
            .name("leasehold-driver".into())
            .spawn(move || future::block_on(ex.run(future::pending::<()>())))?;
        let _ = SHARED.set(executor.clone());
        Ok(DriverThread { executor })
    }
}

#[derive(Clone, Copy)]
enum Mode {
    Wait,
    Try,
    Until(leasehold_core::Instant),
}

impl<B: Backend> Client<B> {
    /// A client taking leases from `backend` with the given options. The configuration is
    /// checked here, so every later acquisition can rely on it.
    pub fn new(backend: B, options: Options) -> Result<Client<B>, ConfigError> {
        Self::with_clock(backend, options, SystemClock)
    }

    /// [`new`](Self::new) with the time read from `clock`: for tests, a
    /// [`ManualClock`](crate::ManualClock) runs renewals, expiry and deadlines without waiting
    /// for them. The backend's own timeouts (an HTTP request's) stay on the wall clock.
    pub fn with_clock(backend: B, options: Options, clock: impl Clock) -> Result<Client<B>, ConfigError> {
        options.config.validate()?;
        Ok(Client {
            inner: Arc::new(Inner {
                backend,
                config: options.config,
                clock: Arc::new(clock),
                local: LocalTurns::default(),
                driver: Mutex::new(None),
                active: AtomicUsize::new(0),
                idle: Signal::new(),
            }),
        })
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.inner.backend
    }

    /// Waits until the lease on `key` is granted (or the authority refuses outright).
    pub async fn acquire(&self, key: &str) -> Result<Lease, AcquireError> {
        let key = parse(key)?;
        let guard = self.inner.local.take(&key, None).await?;
        self.start(key, guard, Mode::Wait, &mut |_| {}).await
    }

    /// One attempt: `Err(Busy)` at once if anyone (in this process or elsewhere) holds `key`.
    pub async fn try_acquire(&self, key: &str) -> Result<Lease, AcquireError> {
        let key = parse(key)?;
        let guard = self.inner.local.try_take(&key)?;
        self.start(key, guard, Mode::Try, &mut |_| {}).await
    }

    /// Waits at most `timeout` for the lease on `key`. It keeps trying for the whole
    /// `timeout`, and makes its last attempt at the deadline itself; an attempt in flight then
    /// is still honoured if granted, so it can return up to one request timeout later.
    pub async fn acquire_timeout(&self, key: &str, timeout: Duration) -> Result<Lease, AcquireError> {
        self.acquire_reporting(key, Some(timeout), |_| {}).await
    }

    /// [`acquire`](Client::acquire) (`timeout` `None`) or
    /// [`acquire_timeout`](Client::acquire_timeout), telling `report` what the acquisition is
    /// waiting for each time that changes: a holder, or an authority it cannot reach.
    pub async fn acquire_reporting(
        &self,
        key: &str,
        timeout: Option<Duration>,
        mut report: impl FnMut(&Waiting) + Send,
    ) -> Result<Lease, AcquireError> {
        let key = parse(key)?;
        let clock = &self.inner.clock;
        let deadline = timeout.map(|t| clock.now() + t.into());
        let guard = self.inner.local.take(&key, deadline.map(|d| clock.sleep_until(d))).await?;
        let mode = deadline.map_or(Mode::Wait, Mode::Until);
        self.start(key, guard, mode, &mut report).await
    }

    /// Waits until every lease taken through this client (and its clones) has ended:
    /// released, lost, or not acquired. Dropped leases and cancelled acquisitions finish in the
    /// background; await this before the process exits so their releases reach the authority
    /// and the next holder need not wait out the ttl. A lease still held keeps it waiting, so
    /// release or drop them first.
    pub async fn wait_idle(&self) {
        loop {
            let listener = self.inner.idle.listen();
            if self.inner.active.load(Ordering::SeqCst) == 0 {
                return;
            }
            listener.await;
        }
    }

    fn executor(&self) -> Result<Arc<async_executor::Executor<'static>>, AcquireError> {
        let mut driver = self.inner.driver.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = driver.as_ref() {
            return Ok(d.executor.clone());
        }
        let d = DriverThread::start().map_err(|e| AcquireError::Spawn(e.to_string()))?;
        Ok(driver.insert(d).executor.clone())
    }

    async fn start(
        &self,
        key: Key,
        guard: MutexGuardArc<()>,
        mode: Mode,
        report: &mut (dyn FnMut(&Waiting) + Send),
    ) -> Result<Lease, AcquireError> {
        let owner = OwnerId(fastrand::u64(..));
        let mut config = self.inner.config;
        config.jitter_seed = fastrand::u64(..);
        let machine =
            leasehold_core::Lease::new(owner, config).map_err(|e| AcquireError::Spawn(e.to_string()))?;
        let shared = Arc::new(Shared {
            machine: Mutex::new(machine),
            clock: self.inner.clock.clone(),
            ended: Mutex::new(None),
            changed: Signal::new(),
            poke: Signal::new(),
            release: AtomicBool::new(false),
            permanent: Mutex::new(None),
            last_error: Mutex::new(None),
            waiting: Mutex::new((0, None)),
            guard: Mutex::new(Some(guard)),
        });
        let active = Active::new(&self.inner);
        let task = drive(self.inner.clone(), key.clone(), shared.clone(), mode);
        self.executor()?
            .spawn(async move {
                task.await;
                drop(active);
            })
            .detach();
        let lease = SingleLease { key, owner, shared, released: false };
        let mut reported = 0;
        loop {
            let listener = lease.shared.changed.listen();
            if lease.shared.lock().state() == State::Held {
                return Ok(Lease(Held::Single(lease)));
            }
            if let Some(Event::NotAcquired { reason }) = *lease.shared.ended() {
                return Err(match reason {
                    NotAcquired::Busy | NotAcquired::Cancelled => AcquireError::Busy,
                    NotAcquired::Unavailable => {
                        AcquireError::Unavailable(lease.shared.last_error().clone().map(Unreachable))
                    }
                    NotAcquired::Rejected(r) => AcquireError::Rejected(r),
                    NotAcquired::Unreachable => match lease.shared.permanent().take() {
                        Some(e) => AcquireError::Misconfigured(e),
                        None => AcquireError::Unavailable(None),
                    },
                });
            }
            let news = match &*lease.shared.waiting() {
                (n, Some(w)) if *n != reported => Some((*n, w.clone())),
                _ => None,
            };
            if let Some((n, w)) = news {
                reported = n;
                report(&w);
            }
            listener.await;
        }
    }
}

struct Shared {
    machine: Mutex<leasehold_core::Lease>,
    /// The client's clock, for the handle's readings of validity.
    clock: Arc<dyn Clock>,
    /// The event that ended the lease's life (lost, released, not acquired).
    ended: Mutex<Option<Event>>,
    /// Driver to handles: the machine's state changed.
    changed: Signal,
    /// Handles to driver: look at `release`.
    poke: Signal,
    release: AtomicBool,
    /// The transport error that made the driver give up, if that is why the lease ended.
    permanent: Mutex<Option<TransportError>>,
    /// The newest transport error, cleared by every answer from the authority.
    last_error: Mutex<Option<TransportError>>,
    /// What an acquisition waits for, numbered by change.
    waiting: Mutex<(u64, Option<Waiting>)>,
    /// This client's turn at the key; given up as soon as the lease ends (lost, released or
    /// not acquired), whether or not the handle is dropped.
    guard: Mutex<Option<MutexGuardArc<()>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, leasehold_core::Lease> {
        self.machine.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn ended(&self) -> MutexGuard<'_, Option<Event>> {
        self.ended.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn permanent(&self) -> MutexGuard<'_, Option<TransportError>> {
        self.permanent.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn last_error(&self) -> MutexGuard<'_, Option<TransportError>> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn waiting(&self) -> MutexGuard<'_, (u64, Option<Waiting>)> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn drop_guard(&self) {
        drop(self.guard.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
    fn set_waiting(&self, w: Waiting) {
        let mut waiting = self.waiting();
        if waiting.1.as_ref() != Some(&w) {
            waiting.0 += 1;
            waiting.1 = Some(w);
        }
    }
}

type InFlight = Pin<Box<dyn Future<Output = (RequestId, OwnerId, Result<Reply, TransportError>)> + Send>>;

/// Moves requests, replies and time between the core machine and the backend. No lease logic
/// lives here: the machine decides what to send, when to wake and what everything means.
async fn drive<B: Backend>(inner: Arc<Inner<B>>, key: Key, shared: Arc<Shared>, mode: Mode) {
    let now = || inner.clock.now();
    {
        let mut m = shared.lock();
        let t = now();
        let _ = match mode {
            Mode::Wait => m.acquire(t),
            Mode::Try => m.try_acquire(t),
            Mode::Until(deadline) => m.acquire_until(t, deadline),
        };
    }
    let mut inflight: Option<InFlight> = None;
    loop {
        let timeout = {
            let mut m = shared.lock();
            if shared.release.swap(false, Ordering::SeqCst) {
                let _ = m.release(now());
            }
            while let Some(req) = m.poll_transmit() {
                // The machine has at most one request outstanding: a new one supersedes the old.
                let inner = inner.clone();
                let key = key.clone();
                inflight =
                    Some(Box::pin(async move { (req.id, req.owner, inner.backend.call(&key, req).await) }));
            }
            while let Some(e) = m.poll_event() {
                tracing::debug!(key = %key, "lease event: {e:?}");
                if matches!(e, Event::Lost { .. } | Event::Released { .. } | Event::NotAcquired { .. }) {
                    *shared.ended() = Some(e);
                    shared.drop_guard();
                }
            }
            m.poll_timeout()
        };
        shared.changed.notify(usize::MAX);
        if timeout.is_none() && inflight.is_none() {
            // Idle for good: lost, released or not acquired.
            return;
        }
        let poked = shared.poke.listen();
        if shared.release.load(Ordering::SeqCst) {
            continue;
        }
        enum Wake {
            Reply(RequestId, OwnerId, Result<Reply, TransportError>),
            Timer,
            Poke,
        }
        let reply = async {
            match inflight.as_mut() {
                Some(f) => {
                    let (id, owner, r) = f.await;
                    Wake::Reply(id, owner, r)
                }
                None => future::pending().await,
            }
        };
        let timer = async {
            match timeout {
                Some(t) => inner.clock.sleep_until(t).await,
                None => future::pending::<()>().await,
            }
            Wake::Timer
        };
        let poke = async {
            poked.await;
            Wake::Poke
        };
        let wake = future::or(future::or(reply, timer), poke).await;
        let mut m = shared.lock();
        let acquiring = matches!(m.state(), State::Acquiring | State::Waiting);
        match wake {
            Wake::Reply(id, owner, result) => {
                inflight = None;
                // What the acquisition waits for, as the reply says it; the machine decides.
                if acquiring {
                    match &result {
                        Ok(Reply::Busy { retry_after }) => shared
                            .set_waiting(Waiting::Held { expires_in: Some(Duration::from(*retry_after)) }),
                        Ok(Reply::Observed { .. }) => shared.set_waiting(Waiting::Held { expires_in: None }),
                        Ok(Reply::Unavailable) => shared.set_waiting(Waiting::Unreachable(None)),
                        Err(e) if !e.is_permanent() => {
                            shared.set_waiting(Waiting::Unreachable(Some(e.clone())))
                        }
                        _ => {}
                    }
                }
                match &result {
                    Ok(_) => *shared.last_error() = None,
                    Err(e) => *shared.last_error() = Some(e.clone()),
                }
                match result {
                    Ok(reply) => m.handle_response(now(), Response { id, owner, reply }),
                    Err(e) if e.is_permanent() => {
                        tracing::warn!(key = %key, "giving up: {}", crate::Report(&e));
                        *shared.permanent() = Some(e);
                        m.handle_permanent_error(now(), id)
                    }
                    Err(e) => {
                        tracing::debug!(key = %key, "request failed: {}", crate::Report(&e));
                        m.handle_transport_error(now(), id)
                    }
                }
            }
            Wake::Timer => m.handle_timeout(now()),
            Wake::Poke => {}
        }
    }
}

/// A held lease. It renews itself in the background until released, dropped or lost.
///
/// Check [`remaining`](Lease::remaining) (or [`is_healthy`](Lease::is_healthy)) before acting,
/// present [`fence`](Lease::fence) to every resource the lease protects, and select on
/// [`lost`](Lease::lost) to stop work promptly. The same handle comes from a [`Client`] (one
/// lease machine per key) and from a [`SessionClient`](crate::SessionClient) (every key of the
/// client in one session).
pub struct Lease(Held);

enum Held {
    Single(SingleLease),
    Session(crate::session::SessionLease),
}

/// A lease of its own (protocol v1): one core `Lease` machine renewing one key.
struct SingleLease {
    key: Key,
    owner: OwnerId,
    shared: Arc<Shared>,
    released: bool,
}

impl From<crate::session::SessionLease> for Lease {
    fn from(l: crate::session::SessionLease) -> Lease {
        Lease(Held::Session(l))
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key())
            .field("owner", &self.owner())
            .field("fence", &self.fence())
            .finish()
    }
}

impl Lease {
    /// The key.
    pub fn key(&self) -> &str {
        match &self.0 {
            Held::Single(l) => &l.key,
            Held::Session(l) => l.key(),
        }
    }

    /// Who holds it. For a lease of its own: a fresh random 64-bit id per acquisition (from
    /// `fastrand`, whose per-thread generators are seeded from std's OS-randomised hasher keys,
    /// so processes started at the same instant still differ); a new id per incarnation means a
    /// restarted process never mistakes its predecessor's grant for its own. For a session's
    /// lease: the session's id (public; the session's secret is what authorises).
    pub fn owner(&self) -> OwnerId {
        match &self.0 {
            Held::Single(l) => l.owner,
            Held::Session(l) => l.owner(),
        }
    }

    /// The fence, while held.
    pub fn fence(&self) -> Option<Fence> {
        match &self.0 {
            Held::Single(l) => l.shared.lock().fence(),
            Held::Session(l) => l.fence(),
        }
    }

    /// How long the lease may still be relied on; `None` once it may not.
    pub fn remaining(&self) -> Option<Duration> {
        match &self.0 {
            Held::Single(l) => l.shared.lock().remaining(l.shared.clock.now()).map(Into::into),
            Held::Session(l) => l.remaining(),
        }
    }

    /// How much the lease can be trusted now.
    pub fn health(&self) -> Health {
        match &self.0 {
            Held::Single(l) => l.shared.lock().health(l.shared.clock.now()),
            Held::Session(l) => l.health(),
        }
    }

    /// Held, valid, and renewing without trouble.
    pub fn is_healthy(&self) -> bool {
        match &self.0 {
            Held::Single(l) => l.shared.lock().is_healthy(l.shared.clock.now()),
            Held::Session(l) => l.health() == Health::Held,
        }
    }

    /// Resolves when the lease is lost (never, after a clean release).
    pub async fn lost(&self) -> LostReason {
        let l = match &self.0 {
            Held::Single(l) => l,
            Held::Session(l) => return l.lost().await,
        };
        loop {
            let listener = l.shared.changed.listen();
            if let Some(Event::Lost { reason, .. }) = *l.shared.ended() {
                return reason;
            }
            listener.await;
        }
    }

    /// Gives the lease back and waits until the authority acknowledged it. The lease stops
    /// being valid at once.
    ///
    /// Against an authority that does not answer it retries until the grant's validity runs
    /// out, so it takes at most [`remaining`](Lease::remaining) as it was when called (never
    /// more than the ttl), then returns [`ReleaseError::NotAcknowledged`]: the key frees by
    /// expiry instead. Dropping the future early leaves the release running in the background
    /// ([`Client::wait_idle`] waits for it).
    pub async fn release(mut self) -> Result<(), ReleaseError> {
        let l = match &mut self.0 {
            Held::Single(l) => l,
            Held::Session(l) => return l.release().await,
        };
        l.begin_release();
        loop {
            let listener = l.shared.changed.listen();
            let ended = *l.shared.ended();
            match ended {
                Some(Event::Released { acknowledged: true, .. }) => return Ok(()),
                Some(Event::Released { fence, acknowledged: false }) => {
                    let last_error = l.shared.last_error().clone();
                    return Err(ReleaseError::NotAcknowledged { key: l.key.to_string(), fence, last_error });
                }
                Some(Event::Lost { reason, .. }) => {
                    return Err(ReleaseError::Lost { key: l.key.to_string(), reason })
                }
                // A lease handle exists only once held, so an acquisition never ends here.
                Some(_) => return Ok(()),
                None => listener.await,
            }
        }
    }
}

impl SingleLease {
    fn begin_release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        // Local waiters get their turn before the remote release goes out, so that they
        // compete with other processes on equal terms instead of always winning.
        self.shared.drop_guard();
        self.shared.release.store(true, Ordering::SeqCst);
        self.shared.poke.notify(usize::MAX);
    }
}

impl Drop for SingleLease {
    /// Releases in the background.
    fn drop(&mut self) {
        self.begin_release();
    }
}
