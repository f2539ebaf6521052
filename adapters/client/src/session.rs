//! Protocol v2: one session (one keepalive, one secret) for every key a client holds, FIFO
//! waiting with pushed grants. The core's `Session` machine decides everything; this file
//! carries its requests through a [`SessionBackend`] and its events to the handles.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_lock::MutexGuardArc;
use event_listener::Event as Signal;
use futures_lite::future;
use leasehold_core::session::wire::{
    parse_label, LabelError, Seq, SessionId, SessionOp, SessionRequest, SessionResponse, Value,
};
use leasehold_core::session::{Session, SessionEvent, SessionState};
use leasehold_core::{Config, ConfigError, Fence, Health, Key, LostReason, NotAcquired, OwnerId, Reject};

use crate::backend::{ErasedSessionBackend, SessionBackend};
use crate::client::{AcquireError, DriverThread, Options, ReleaseError, Unreachable, Waiting};
use crate::clock::{Clock, SystemClock};
use crate::error::TransportError;
use crate::turns::{parse, LocalTurns};
use crate::Lease;

mod observe;
pub use observe::{Observation, Observations, ObserveError, MAX_OBSERVED_KEYS};

/// Most keys one [`SessionClient`] holds or waits for at once.
pub const MAX_SESSION_KEYS: usize = 16 * 1024;

/// Most requests of a session out at once, keepalives aside; the rest wait in the order the
/// machine made them. The authority ignores a seq more than the core's replay window (64)
/// below the highest it has seen, and requests on parallel connections arrive in any order:
/// with at most half the window out, none is ever too old to tell. A backend that pools
/// connections should allow this many (plus two for keepalives: one the machine gave up on
/// may still be out when it sends the next), so no request waits for a connection out of
/// order.
pub const MAX_IN_FLIGHT: usize = 32;

type Machine = Session<MAX_SESSION_KEYS, MAX_OBSERVED_KEYS>;

/// Why a [`SessionClient`] cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionSetupError {
    /// The timing cannot keep the safety promise (see [`Config::validate`]).
    #[error("session timing: {0}")]
    Config(ConfigError),
    /// The label is not acceptable.
    #[error("session label: {0}")]
    Label(LabelError),
    /// The session table could not be built.
    #[error("cannot build the session table: {0}")]
    Spawn(String),
}

impl Options {
    /// Defaults for a session of `ttl`, tuned for held keepalives: request timeout ttl/3, and a
    /// keepalive every ttl/4, which is also how long the server may hold one open waiting for
    /// a grant to push. So one keepalive is out at almost every moment: four a ttl, whatever
    /// the number of keys.
    pub fn session(ttl: Duration) -> Options {
        let mut o = Options::new(ttl);
        o.config.request_timeout = o.config.ttl.mul_div_floor(1, 3);
        o.config.renew_every = o.config.ttl.mul_div_floor(1, 4);
        o
    }
}

/// Takes leases over protocol v2 through a [`SessionBackend`] (the built-in server's is
/// `leasehold_http::BuiltinSessions`): every key in one session.
///
/// One keepalive renews every key; a waiter queues FIFO at the server and is pushed its grant
/// in the reply to a keepalive the server holds open (no polling); losing the session loses
/// every key at the same instant. The handles are the same [`Lease`] as [`Client`](crate::Client)'s.
/// The session opens at the first acquisition (and again after it was lost), and closes when
/// the client, its clones and its leases are all dropped, or at [`close`](SessionClient::close).
pub struct SessionClient {
    user: User,
}

impl Clone for SessionClient {
    fn clone(&self) -> Self {
        SessionClient { user: User::new(&self.user.0) }
    }
}

/// Counts a client handle or a lease as a user of the session; the driver closes the
/// session once there are none.
struct User(Arc<Inner>);

impl User {
    fn new(inner: &Arc<Inner>) -> User {
        inner.users.fetch_add(1, Ordering::SeqCst);
        User(inner.clone())
    }
}

impl Drop for User {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, Ordering::SeqCst);
        self.0.poke.notify(usize::MAX);
    }
}

struct Inner {
    backend: Box<dyn ErasedSessionBackend>,
    /// Every `now` the machine is handed and every deadline the driver waits for.
    clock: Arc<dyn Clock>,
    /// How long the authority may hold a keepalive: under the request timeout, so the answer
    /// comes before the machine gives up on it.
    hold: Duration,
    /// The machine's request timeout.
    request_timeout: leasehold_core::Duration,
    /// The session's ttl.
    ttl: leasehold_core::Duration,
    machine: Mutex<Box<Machine>>,
    /// The handles' view of each key the machine tracks.
    slots: Mutex<HashMap<Key, Arc<Slot>>>,
    /// The streams' view of each key the machine observes.
    watches: Mutex<HashMap<Key, Arc<observe::Watch>>>,
    view: Mutex<SessionView>,
    /// One async mutex per key: a key is asked for by one handle of this client at a time.
    local: LocalTurns,
    /// Driver to handles: a session-level event (opened, refused, closed, lost), a permanent
    /// error, or a key's slot ended.
    changed: Signal,
    /// Handles to driver: a verb was called, or a user left.
    poke: Signal,
    driver: Mutex<Option<DriverThread>>,
    /// The driver thread's executor, where flights run: set with `driver`.
    executor: std::sync::OnceLock<Arc<async_executor::Executor<'static>>>,
    /// The requests waiting to be sent and those out.
    flights: Mutex<Flights>,
    users: AtomicUsize,
    last_error: Mutex<Option<TransportError>>,
    permanent: Mutex<Option<TransportError>>,
}

/// The session-level events, as the handles need them.
#[derive(Default)]
struct SessionView {
    /// Counts the opens asked for; `outcome` is that of the newest.
    opens: u64,
    outcome: Option<Result<SessionId, Reject>>,
    closed: u64,
}

/// One acquisition's state, shared by the driver and the handle.
struct Slot {
    event: Mutex<Option<SessionEvent>>,
    /// Driver to this slot's handle: its event changed. One signal per key, so an event for
    /// one key wakes one waiter, not every acquisition in flight.
    changed: Signal,
    /// This client's turn at the key, given up when the acquisition or holding ends.
    guard: Mutex<Option<MutexGuardArc<()>>>,
}

impl Slot {
    fn event(&self) -> MutexGuard<'_, Option<SessionEvent>> {
        self.event.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn terminal(e: &SessionEvent) -> bool {
    matches!(e, SessionEvent::NotAcquired { .. } | SessionEvent::Released { .. } | SessionEvent::Lost { .. })
}

/// A fresh machine on the heap. Its key table is an inline array (megabytes); a debug build
/// makes copies of it on the stack on the way into the box, which overflows small stacks (a
/// tokio worker's is 2 MiB), and the workspace forbids the unsafe code that would build it in
/// place. So it is built on a thread whose stack fits those copies.
fn fresh_machine(
    label: leasehold_core::session::wire::Label,
    config: Config,
) -> Result<Box<Machine>, SessionSetupError> {
    let size = std::mem::size_of::<Machine>();
    std::thread::Builder::new()
        .name("session-table".into())
        .stack_size(8 * size + (1 << 20))
        .spawn(move || Machine::new(label, config).map(Box::new))
        .map_err(|e| SessionSetupError::Spawn(e.to_string()))?
        .join()
        .map_err(|_| SessionSetupError::Spawn("building the session table panicked".into()))?
        .map_err(SessionSetupError::Config)
}

impl SessionClient {
    /// A client whose session is labelled `label` (shown by status pages: a host or process
    /// name, at most 32 printable ASCII bytes), carried by `backend`. `options`' ttl is the
    /// session's; [`Options::session`] has timings that keep one keepalive held at the
    /// authority at almost every moment, so grants are pushed at once.
    pub fn new(
        backend: impl SessionBackend,
        label: &str,
        options: Options,
    ) -> Result<SessionClient, SessionSetupError> {
        Self::with_clock(backend, label, options, SystemClock)
    }

    /// [`new`](Self::new) with the time read from `clock`: every deadline the driver keeps
    /// (keepalives, validity and loss, request timeouts, acquisition timeouts) is on it. For
    /// tests, a [`ManualClock`](crate::ManualClock) runs a session's renewals, expiry and
    /// deadlines without waiting for them. A backend's own timeouts (an HTTP request's) stay
    /// on the wall clock, and so does how long the authority holds a keepalive.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let config = leasehold_server::ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap());
    /// # let server = leasehold_server::Server::spawn(config).unwrap();
    /// use std::time::Duration;
    /// use leasehold_http::{BuiltinSessions, Clock, ManualClock, Options, SessionClient};
    ///
    /// let clock = ManualClock::new(leasehold_core::Instant::from_micros(1_000_000));
    /// let options = Options::session(Duration::from_secs(60));
    /// let backend = BuiltinSessions::new(&server.url(), None, Duration::from_secs(20))?;
    /// let client = SessionClient::with_clock(backend, "worker", options, clock.clone())?;
    /// let lease = smol::block_on(client.acquire("report"))?;
    /// // The validity is counted on the client's clock: it stands still until moved, and
    /// // moving it 5 s uses up exactly 5 s of it, however long that took for real.
    /// let left = lease.remaining().unwrap();
    /// assert_eq!(lease.remaining(), Some(left));
    /// clock.advance(leasehold_core::Duration::from_secs(5));
    /// assert_eq!(lease.remaining(), Some(left - Duration::from_secs(5)));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_clock(
        backend: impl SessionBackend,
        label: &str,
        options: Options,
        clock: impl Clock,
    ) -> Result<SessionClient, SessionSetupError> {
        let config = options.config;
        config.validate().map_err(SessionSetupError::Config)?;
        let label = parse_label(label).map_err(SessionSetupError::Label)?;
        let timeout: Duration = config.request_timeout.into();
        let hold = Duration::from(config.renew_every).min(timeout.mul_f64(0.75));
        let inner = Arc::new(Inner {
            backend: Box::new(backend),
            clock: Arc::new(clock),
            hold,
            request_timeout: config.request_timeout,
            ttl: config.ttl,
            machine: Mutex::new(fresh_machine(label, config)?),
            slots: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
            view: Mutex::new(SessionView::default()),
            local: LocalTurns::default(),
            changed: Signal::new(),
            poke: Signal::new(),
            driver: Mutex::new(None),
            executor: std::sync::OnceLock::new(),
            flights: Mutex::new(Flights::new()),
            users: AtomicUsize::new(0),
            last_error: Mutex::new(None),
            permanent: Mutex::new(None),
        });
        Ok(SessionClient { user: User::new(&inner) })
    }

    /// The session's id while it is open.
    pub fn session_id(&self) -> Option<u64> {
        lock(&self.user.0.machine).id().map(|s| s.0)
    }

    /// Waits until `key` is granted: queued FIFO at the server behind earlier waiters, and
    /// pushed the grant when its turn comes.
    pub async fn acquire(&self, key: &str) -> Result<Lease, AcquireError> {
        self.acquire_reporting(key, None, |_| {}).await
    }

    /// One attempt: `Err(Busy)` at once if anyone holds `key`.
    pub async fn try_acquire(&self, key: &str) -> Result<Lease, AcquireError> {
        self.try_acquire_with_limit(key, NonZeroU16::MIN).await
    }

    /// Waits until one of `limit` slots of the semaphore `key` is granted: up to `limit`
    /// sessions hold it at once, each under its own fence, and the rest queue FIFO for the
    /// next slot freed. Every holder and waiter of the key must ask for the same `limit`, else
    /// `Err(Rejected(LimitMismatch))`. A `limit` of 1 is [`acquire`](Self::acquire).
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let config = leasehold_server::ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap());
    /// # let server = leasehold_server::Server::spawn(config).unwrap();
    /// use std::num::NonZeroU16;
    /// use std::time::Duration;
    /// use leasehold_http::{AcquireError, BuiltinSessions, Options, Reject, SessionClient};
    ///
    /// let options = Options::session(Duration::from_secs(5));
    /// let timeout = options.config.request_timeout.into();
    /// let client = |label| -> Result<SessionClient, Box<dyn std::error::Error>> {
    ///     Ok(SessionClient::new(BuiltinSessions::new(&server.url(), None, timeout)?, label, options.clone())?)
    /// };
    /// let (a, b, c) = (client("a")?, client("b")?, client("c")?);
    /// let two = NonZeroU16::new(2).unwrap();
    /// smol::block_on(async {
    ///     // At most two workers run the import at once, each under its own fence.
    ///     let first = a.acquire_with_limit("import", two).await?;
    ///     let second = b.acquire_with_limit("import", two).await?;
    ///     assert!(second.fence() > first.fence());
    ///     assert_eq!(c.try_acquire_with_limit("import", two).await.unwrap_err(), AcquireError::Busy);
    ///     // A plain lease asks for a limit of 1: refused while the key is a semaphore.
    ///     let refused = c.try_acquire("import").await.unwrap_err();
    ///     assert_eq!(refused, AcquireError::Rejected(Reject::LimitMismatch));
    ///     Ok::<(), AcquireError>(())
    /// })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn acquire_with_limit(&self, key: &str, limit: NonZeroU16) -> Result<Lease, AcquireError> {
        self.acquire_reporting_with_limit(key, limit, None, |_| {}).await
    }

    /// [`try_acquire`](Self::try_acquire) of one of `limit` slots of `key`: `Err(Busy)` at
    /// once if all are held.
    pub async fn try_acquire_with_limit(&self, key: &str, limit: NonZeroU16) -> Result<Lease, AcquireError> {
        let key = parse(key)?;
        let guard = self.user.0.local.try_take(&key)?;
        self.start(key, Terms::slot(limit), guard, false, None, &mut |_| {}).await
    }

    /// Waits at most `timeout` for `key`; at the deadline the wait is given up (`Err(Busy)`).
    pub async fn acquire_timeout(&self, key: &str, timeout: Duration) -> Result<Lease, AcquireError> {
        self.acquire_reporting(key, Some(timeout), |_| {}).await
    }

    /// [`acquire`](Self::acquire) or [`acquire_timeout`](Self::acquire_timeout), telling
    /// `report` what the acquisition waits for when that changes.
    pub async fn acquire_reporting(
        &self,
        key: &str,
        timeout: Option<Duration>,
        report: impl FnMut(&Waiting) + Send,
    ) -> Result<Lease, AcquireError> {
        self.acquire_reporting_with_limit(key, NonZeroU16::MIN, timeout, report).await
    }

    /// [`acquire_reporting`](Self::acquire_reporting) of one of `limit` slots of `key` (see
    /// [`acquire_with_limit`](Self::acquire_with_limit)).
    pub async fn acquire_reporting_with_limit(
        &self,
        key: &str,
        limit: NonZeroU16,
        timeout: Option<Duration>,
        mut report: impl FnMut(&Waiting) + Send,
    ) -> Result<Lease, AcquireError> {
        let key = parse(key)?;
        let clock = &self.user.0.clock;
        let deadline = timeout.map(|t| clock.now() + t.into());
        let guard = self.user.0.local.take(&key, deadline.map(|d| clock.sleep_until(d))).await?;
        self.start(key, Terms::slot(limit), guard, true, deadline, &mut report).await
    }

    /// Ends the session: every key it holds is free at once at the server, and every lease of
    /// this client is released. Returns once the server acknowledged (or the session expired).
    pub async fn close(&self) {
        let inner = &self.user.0;
        let closed = lock(&inner.view).closed;
        if lock(&inner.machine).close(inner.clock.now()).is_err() {
            return;
        }
        inner.turn_now();
        loop {
            let listener = inner.changed.listen();
            if lock(&inner.view).closed != closed || lock(&inner.machine).state() != SessionState::Closing {
                return;
            }
            listener.await;
        }
    }

    /// Waits until every lease of this client has ended (released, lost, or not acquired), so
    /// that releases of dropped leases reach the server before the process exits.
    pub async fn wait_idle(&self) {
        let inner = &self.user.0;
        loop {
            let listener = inner.changed.listen();
            if lock(&inner.slots).is_empty() {
                return;
            }
            listener.await;
        }
    }

    fn ensure_driver(&self) -> Result<(), AcquireError> {
        let inner = &self.user.0;
        let mut driver = lock(&inner.driver);
        if driver.is_some() {
            return Ok(());
        }
        let d = DriverThread::start().map_err(|e| AcquireError::Spawn(e.to_string()))?;
        let executor = d.executor.clone();
        let _ = inner.executor.set(executor.clone());
        executor.spawn(drive(inner.clone())).detach();
        *driver = Some(d);
        Ok(())
    }

    /// Waits for an open session, opening one if there is none.
    async fn opened(&self, deadline: Option<leasehold_core::Instant>) -> Result<(), AcquireError> {
        self.opened_reporting(deadline, &mut |_| {}).await
    }

    /// [`opened`](Self::opened), telling `report` of each failure to reach the authority
    /// while the session opens: a waiter must be able to tell a dead server from a held key.
    async fn opened_reporting(
        &self,
        deadline: Option<leasehold_core::Instant>,
        report: &mut (dyn FnMut(&Waiting) + Send),
    ) -> Result<(), AcquireError> {
        let inner = &self.user.0;
        let mut asked = None;
        loop {
            let listener = inner.changed.listen();
            let unreachable = lock(&inner.last_error).clone();
            if let Some(e) = unreachable {
                report(&Waiting::Unreachable(Some(e)));
            }
            if let Some(e) = lock(&inner.permanent).clone() {
                return Err(AcquireError::Misconfigured(e));
            }
            {
                let mut m = lock(&inner.machine);
                let mut view = lock(&inner.view);
                match m.state() {
                    SessionState::Open => return Ok(()),
                    SessionState::Idle | SessionState::Ended => {
                        if let (Some(n), Some(Err(reason))) = (asked, view.outcome) {
                            if n == view.opens {
                                return Err(AcquireError::Rejected(reason));
                            }
                        }
                        if m.open(inner.clock.now()).is_ok() {
                            view.opens += 1;
                            view.outcome = None;
                            asked = Some(view.opens);
                            inner.poke.notify(usize::MAX);
                        }
                    }
                    SessionState::Opening | SessionState::Closing => {}
                }
            }
            if !heard_before(&*inner.clock, listener, deadline).await {
                let last = lock(&inner.last_error).clone();
                return Err(AcquireError::Unavailable(last.map(Unreachable)));
            }
        }
    }

    async fn start(
        &self,
        key: Key,
        terms: Terms,
        guard: MutexGuardArc<()>,
        wait: bool,
        deadline: Option<leasehold_core::Instant>,
        report: &mut (dyn FnMut(&Waiting) + Send),
    ) -> Result<Lease, AcquireError> {
        let Terms { limit, value } = terms;
        self.ensure_driver()?;
        let inner = &self.user.0;
        let slot = Arc::new(Slot {
            event: Mutex::new(None),
            changed: Signal::new(),
            guard: Mutex::new(Some(guard)),
        });
        loop {
            self.opened_reporting(deadline, report).await?;
            let mut m = lock(&inner.machine);
            lock(&inner.slots).insert(key.clone(), slot.clone());
            // A value is for a key with one holder; a semaphore's slots carry none.
            let asked = if value.is_empty() {
                m.acquire_with_limit(inner.clock.now(), key.clone(), wait, limit.get())
            } else {
                m.acquire_with_value(inner.clock.now(), key.clone(), wait, value.clone())
            };
            match asked {
                Ok(()) => break,
                // Lost between the look and the verb: open again.
                Err(leasehold_core::session::holder::AcquireError::NotOpen) => continue,
                Err(leasehold_core::session::holder::AcquireError::Full) => {
                    lock(&inner.slots).remove(&key);
                    return Err(AcquireError::Rejected(Reject::Capacity));
                }
                Err(e) => {
                    lock(&inner.slots).remove(&key);
                    return Err(AcquireError::Spawn(format!("session machine refused the acquire: {e}")));
                }
            }
        }
        inner.turn_now();
        let mut gave_up = false;
        loop {
            let listener = slot.changed.listen();
            let event = slot.event().clone();
            match event {
                Some(SessionEvent::Acquired { fence, .. }) => {
                    let session = lock(&inner.machine).id().unwrap_or(SessionId::NONE);
                    return Ok(Lease::from(SessionLease {
                        key,
                        fence,
                        session,
                        slot,
                        released: false,
                        user: User::new(inner),
                    }));
                }
                Some(SessionEvent::Queued { .. }) => report(&Waiting::Held { expires_in: None }),
                Some(SessionEvent::NotAcquired { reason, .. }) => {
                    return Err(match reason {
                        NotAcquired::Busy | NotAcquired::Cancelled => AcquireError::Busy,
                        NotAcquired::Rejected(r) => AcquireError::Rejected(r),
                        NotAcquired::Unavailable | NotAcquired::Unreachable => {
                            match lock(&inner.permanent).clone() {
                                Some(e) => AcquireError::Misconfigured(e),
                                None => AcquireError::Unavailable(
                                    lock(&inner.last_error).clone().map(Unreachable),
                                ),
                            }
                        }
                    })
                }
                _ => {}
            }
            if !heard_before(&*inner.clock, listener, deadline.filter(|_| !gave_up)).await {
                // Leave the queue; a grant that crossed this is given back by the machine.
                // The answer is the slot's end, whichever it is.
                gave_up = true;
                let _ = lock(&inner.machine).release(inner.clock.now(), &key);
                inner.turn_now();
            }
        }
    }
}

/// What an acquisition asks for beyond the key: one of `limit` slots (1: the key itself), and
/// the value observers are told with the holder (a key with one holder only).
pub(super) struct Terms {
    limit: NonZeroU16,
    value: Value,
}

impl Terms {
    fn slot(limit: NonZeroU16) -> Terms {
        Terms { limit, value: Value::new() }
    }

    pub(super) fn valued(value: Value) -> Terms {
        Terms { limit: NonZeroU16::MIN, value }
    }
}

/// Waits for `listener`, or until `deadline` if there is one: whether it was heard first.
async fn heard_before(
    clock: &dyn Clock,
    listener: event_listener::EventListener,
    deadline: Option<leasehold_core::Instant>,
) -> bool {
    match deadline {
        None => {
            listener.await;
            true
        }
        Some(d) => {
            future::or(
                async {
                    listener.await;
                    true
                },
                async {
                    clock.sleep_until(d).await;
                    false
                },
            )
            .await
        }
    }
}

impl Inner {
    /// Carries one request of the machine to the authority and brings back the response, or
    /// an error if the answer is for another request.
    async fn call(&self, req: &SessionRequest) -> Result<SessionResponse, TransportError> {
        let r = self.backend.call(req.clone(), self.hold).await?;
        if r.seq != req.seq || r.session != req.session {
            return Err(TransportError::Protocol("session response for another request".into()));
        }
        Ok(r)
    }
}

/// A request out: until its response arrives, or until `give_up_at`, when dropping it drops
/// the transport's future.
struct Flight {
    id: u64,
    seq: Seq,
    keepalive: bool,
    patience: leasehold_core::Duration,
    give_up_at: leasehold_core::Instant,
    task: async_task::Task<()>,
}

/// Whether `op` renews the session (and so is held at the server and sent on its own pool).
fn is_keepalive(op: &SessionOp) -> bool {
    matches!(op, SessionOp::KeepAlive | SessionOp::KeepAliveSeen { .. })
}

/// The driver's side of the requests: made but not sent, and out.
struct Flights {
    /// Requests made but not yet sent, in the order made; keepalives skip it.
    backlog: VecDeque<(SessionRequest, leasehold_core::Instant)>,
    /// Requests out, each until its response or until it is given up.
    out: Vec<Flight>,
    next_id: u64,
    /// The machine's state at the end of the last turn: a change is news for the handles.
    last_state: SessionState,
    /// The deadline the drive task sleeps until. A turn elsewhere that finds an earlier one
    /// pokes the task, so it sleeps until that instead.
    armed: Option<leasehold_core::Instant>,
}

impl Flights {
    fn new() -> Flights {
        Flights {
            backlog: VecDeque::new(),
            out: Vec::new(),
            next_id: 0,
            last_state: SessionState::Idle,
            armed: None,
        }
    }
}

/// What a turn of the driver hands the machine first. A response is as large as its biggest
/// reply (a change of an observed key, inline: the core has no heap); it is moved once, into
/// the turn, so it is not boxed.
#[allow(clippy::large_enum_variant)]
enum Input {
    /// A flight's answer, or why it has none.
    Response(u64, Result<SessionResponse, TransportError>),
    /// The drive task's deadline passed.
    Timer,
    /// Nothing new: a verb or a user's leaving changed the machine.
    Nothing,
}

/// Who takes a turn: the drive task sleeps until the deadline the turn finds; anyone else
/// only pokes it if that deadline is earlier than the one it sleeps until.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Turner {
    DriveTask,
    Other,
}

impl Inner {
    /// One turn of the driver: hands `input` to the machine, then carries out what it asks
    /// (requests to send, flights to give up, events to route to the handles).
    ///
    /// Whoever has the input takes the turn: a flight with its response, a verb right after
    /// changing the machine, the drive task at its deadline. Handing each to the drive task
    /// instead cost two more passes through the driver thread's run queue per request, and
    /// that queue holds a whole burst of other sessions' flights: at 64 clients about 0.5 ms
    /// each (figures in README). Returns the next deadline and whether the session is done
    /// with the driver (no users, nothing out, not open).
    fn turn(self: &Arc<Self>, input: Input, turner: Turner) -> (Option<leasehold_core::Instant>, bool) {
        let Some(executor) = self.executor.get() else { return (None, false) };
        let mut m = lock(&self.machine);
        let mut guard = lock(&self.flights);
        let f = &mut *guard;
        match input {
            Input::Response(id, result) => {
                // A flight given up on has been answered to the machine already.
                if let Some(at) = f.out.iter().position(|x| x.id == id) {
                    let flight = f.out.swap_remove(at);
                    // This is that flight's own task, about to end: let it.
                    flight.task.detach();
                    self.answer(&mut m, flight.seq, result);
                }
            }
            Input::Timer => m.handle_timeout(self.clock.now()),
            Input::Nothing => {}
        }
        if self.users.load(Ordering::SeqCst) == 0 && m.state() == SessionState::Open {
            let _ = m.close(self.clock.now());
        }
        // Dropping a flight's task drops the transport's future: its connection and its
        // in-flight place are free, and the machine hears of the timeout.
        let now = self.clock.now();
        let mut i = 0;
        while i < f.out.len() {
            if f.out[i].give_up_at > now {
                i += 1;
                continue;
            }
            let late = f.out.swap_remove(i);
            *lock(&self.last_error) = Some(TransportError::Timeout {
                addr: "the session authority".into(),
                timeout: late.patience.into(),
            });
            m.handle_transport_error(now, late.seq);
        }
        let spawn = |req: SessionRequest, id: u64| -> (Flight, async_task::Runnable) {
            let inner = self.clone();
            // The machine gives up on a request at its timeout, on its clock, and makes it
            // again under a new seq; the flight is given up then too. A keepalive's late reply
            // still renews (anchored at its own send), so it is waited for as long as it
            // could: a ttl.
            let keepalive = is_keepalive(&req.op);
            let patience = if keepalive { self.ttl } else { self.request_timeout };
            let (seq, give_up_at) = (req.seq, self.clock.now() + patience);
            let flight = async move {
                let r = inner.call(&req).await;
                inner.turn(Input::Response(id, r), Turner::Other);
            };
            // Every wake-up runs it on the driver's executor; the first poll, which writes the
            // request, runs where this turn is (see `starts`).
            let executor = executor.clone();
            let (start, task) = async_task::spawn(flight, move |run: async_task::Runnable| {
                executor.spawn(async move { run.run() }).detach();
            });
            (Flight { id, seq, keepalive, patience, give_up_at, task }, start)
        };
        let transmit = |m: &mut Machine, f: &mut Flights, starts: &mut Vec<async_task::Runnable>| {
            let mut send = |req: SessionRequest, f: &mut Flights| {
                f.next_id += 1;
                let (flight, start) = spawn(req, f.next_id);
                f.out.push(flight);
                starts.push(start);
            };
            while let Some(req) = m.poll_transmit() {
                if is_keepalive(&req.op) {
                    send(req, f);
                } else {
                    f.backlog.push_back((req, self.clock.now()));
                }
            }
            let stale_before = self.clock.now().saturating_sub(self.request_timeout);
            while f.out.iter().filter(|x| !x.keepalive).count() < MAX_IN_FLIGHT {
                let Some((req, made)) = f.backlog.pop_front() else { break };
                // The machine has given up on it and made it again under a new seq.
                if made <= stale_before {
                    continue;
                }
                send(req, f);
            }
        };
        // The new flights' first polls, run once the locks are let go (a flight that ends at
        // once takes a turn itself). Spawned instead, a request a verb made waited behind
        // every flight already queued on the driver thread (at 64 clients, a burst of them)
        // before it was written.
        let mut starts = Vec::new();
        transmit(&mut m, f, &mut starts);
        let mut news = false;
        while let Some(e) = m.poll_event() {
            tracing::debug!("session event: {e:?}");
            // The grant will come in a keepalive's reply: have one held at the server from now
            // on, not from the next renewal. After a pushed grant the machine makes the next
            // one itself once its confirmation lands: made before, it could overtake the
            // confirmation on another connection and be answered at once with the grant again.
            if let SessionEvent::Queued { .. } = e {
                m.keep_alive_now(self.clock.now());
            }
            news |= self.route(e);
        }
        // Routing may have asked for a keepalive now: send what that made in this turn.
        transmit(&mut m, f, &mut starts);
        let state = m.state();
        if news || state != f.last_state {
            self.changed.notify(usize::MAX);
        }
        f.last_state = state;
        let give_up = f.out.iter().map(|x| x.give_up_at).min();
        let deadline = m.poll_timeout().into_iter().chain(give_up).min();
        match turner {
            Turner::DriveTask => f.armed = deadline,
            Turner::Other => {
                if deadline.is_some_and(|d| f.armed.is_none_or(|a| d < a)) {
                    self.poke.notify(usize::MAX);
                }
            }
        }
        let gone = self.users.load(Ordering::SeqCst) == 0;
        let finished =
            gone && f.out.is_empty() && !matches!(state, SessionState::Open | SessionState::Closing);
        drop((m, guard));
        for start in starts {
            start.run();
        }
        (deadline, finished)
    }

    /// Hands a flight's answer to the machine.
    fn answer(&self, m: &mut Machine, seq: Seq, result: Result<SessionResponse, TransportError>) {
        match result {
            Ok(resp) => {
                *lock(&self.last_error) = None;
                m.handle_response(self.clock.now(), &resp);
            }
            Err(e) => {
                tracing::debug!("session request failed: {}", crate::Report(&e));
                if e.is_permanent() && m.state() == SessionState::Opening {
                    *lock(&self.permanent) = Some(e.clone());
                    self.changed.notify(usize::MAX);
                }
                *lock(&self.last_error) = Some(e);
                if m.state() == SessionState::Opening {
                    // An acquire waiting for the open reports it.
                    self.changed.notify(usize::MAX);
                }
                m.handle_transport_error(self.clock.now(), seq);
            }
        }
    }

    /// A turn for a verb that just changed the machine: its requests leave now, from the
    /// caller's thread, rather than after the drive task's next turn.
    fn turn_now(self: &Arc<Self>) {
        self.turn(Input::Nothing, Turner::Other);
    }
}

/// Keeps the session's time: sleeps until the machine's next deadline (or a flight's give-up
/// time) and takes a turn then, and takes one whenever poked (a user left, or a turn elsewhere
/// found an earlier deadline). Requests run concurrently, each as a task on the driver's
/// executor that takes the turn for its own response; the machine decides what each means.
async fn drive(inner: Arc<Inner>) {
    let mut input = Input::Nothing;
    loop {
        // Listening before the turn, so a poke after it still wakes us.
        let poked = inner.poke.listen();
        let (deadline, finished) = inner.turn(input, Turner::DriveTask);
        if finished {
            // Nobody left to serve.
            return;
        }
        let timer = async {
            match deadline {
                Some(t) => inner.clock.sleep_until(t).await,
                None => future::pending().await,
            };
            Input::Timer
        };
        let poke = async {
            poked.await;
            Input::Nothing
        };
        input = future::or(timer, poke).await;
    }
}

impl Inner {
    /// Hands an event to whom it concerns. Returns whether the session-level waiters (or
    /// [`SessionClient::wait_idle`]) must look.
    fn route(&self, e: SessionEvent) -> bool {
        let Some(e) = self.route_observation(e) else { return false };
        let key = match &e {
            SessionEvent::Opened { session, .. } => {
                lock(&self.view).outcome = Some(Ok(*session));
                *lock(&self.permanent) = None;
                return true;
            }
            SessionEvent::NotOpened { reason } => {
                lock(&self.view).outcome = Some(Err(*reason));
                return true;
            }
            SessionEvent::Closed { .. } => {
                lock(&self.view).closed += 1;
                return true;
            }
            SessionEvent::SessionLost { reason } => {
                tracing::warn!("session lost ({reason}); every key with it");
                return true;
            }
            SessionEvent::Acquired { key, .. }
            | SessionEvent::Queued { key, .. }
            | SessionEvent::NotAcquired { key, .. }
            | SessionEvent::Released { key, .. }
            | SessionEvent::Lost { key, .. } => key.clone(),
            SessionEvent::Observed { .. } | SessionEvent::ObserveEnded { .. } => return false,
        };
        let mut slots = lock(&self.slots);
        let Some(slot) = slots.get(&key).cloned() else { return false };
        let end = terminal(&e);
        *slot.event() = Some(e);
        if end {
            slots.remove(&key);
            drop(lock(&slot.guard).take());
        }
        slot.changed.notify(usize::MAX);
        end
    }
}

/// A key held through a [`SessionClient`]: what a [`Lease`] wraps.
pub(crate) struct SessionLease {
    key: Key,
    fence: Fence,
    session: SessionId,
    slot: Arc<Slot>,
    released: bool,
    user: User,
}

impl SessionLease {
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    pub(crate) fn owner(&self) -> OwnerId {
        OwnerId(self.session.0)
    }

    fn held(&self) -> bool {
        matches!(*self.slot.event(), Some(SessionEvent::Acquired { .. }))
    }

    pub(crate) fn fence(&self) -> Option<Fence> {
        if !self.held() {
            return None;
        }
        lock(&self.user.0.machine).fence(&self.key).filter(|f| *f == self.fence)
    }

    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.fence()?;
        lock(&self.user.0.machine).remaining(self.user.0.clock.now(), &self.key).map(Into::into)
    }

    pub(crate) fn health(&self) -> Health {
        match *self.slot.event() {
            Some(SessionEvent::Lost { .. }) => return Health::Lost,
            Some(SessionEvent::Released { .. }) => return Health::Released,
            _ => {}
        }
        if self.remaining().is_none() {
            // Past the validity; the machine reports the loss at its next turn.
            return Health::Lost;
        }
        match *lock(&self.user.0.last_error) {
            Some(_) => Health::Unknown,
            None => Health::Held,
        }
    }

    pub(crate) async fn lost(&self) -> LostReason {
        loop {
            let listener = self.slot.changed.listen();
            if let Some(SessionEvent::Lost { reason, .. }) = *self.slot.event() {
                return reason;
            }
            listener.await;
        }
    }

    pub(crate) async fn release(&mut self) -> Result<(), ReleaseError> {
        self.begin_release();
        loop {
            let listener = self.slot.changed.listen();
            let event = self.slot.event().clone();
            match event {
                Some(SessionEvent::Released { acknowledged: true, .. }) => return Ok(()),
                Some(SessionEvent::Released { fence, acknowledged: false, .. }) => {
                    return Err(ReleaseError::NotAcknowledged {
                        key: self.key.to_string(),
                        fence,
                        last_error: lock(&self.user.0.last_error).clone(),
                    })
                }
                Some(SessionEvent::Lost { reason, .. }) => {
                    return Err(ReleaseError::Lost { key: self.key.to_string(), reason })
                }
                _ => listener.await,
            }
        }
    }

    fn begin_release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        if lock(&self.user.0.machine).release(self.user.0.clock.now(), &self.key).is_ok() {
            self.user.0.turn_now();
        }
    }
}

impl Drop for SessionLease {
    /// Releases in the background.
    fn drop(&mut self) {
        self.begin_release();
    }
}
