#![doc = include_str!("../README.md")]

mod conns;
mod http;
mod metrics;
mod namespace;
mod sessions;
mod store;
#[cfg(feature = "tls")]
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use leasehold_core::authority::Limits;
use smol_hyper::rt::FuturesIo;

pub use http::MAX_BODY;
pub use sessions::{SessionStoreError, MAX_CLAIMS, MAX_OBSERVERS, MAX_SESSIONS, MAX_SESSION_KEYS};
pub use store::StoreError;
#[cfg(feature = "tls")]
pub use tls::ServerTls;

/// The longest ttl a server may be configured to grant (one day, the lease machine's own
/// bound). Past it a crashed holder, or a restart (which re-arms every grant for its full
/// ttl), locks a key for longer than anyone would want.
pub const TTL_CEILING: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);

/// The longest ttl granted unless configured otherwise: five minutes. A restart re-arms every
/// stored grant for its full ttl, including grants that had already expired before the crash
/// (the server cannot know how long it was down), so this is also how long a restart can keep
/// an abandoned key locked.
pub const DEFAULT_MAX_TTL: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// hyper refuses read buffers smaller than this (it panics), so neither may the header cap be.
pub const MIN_HEADER_BYTES: usize = 8 * 1024;

/// How to run a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Directory of the store; created if missing.
    pub data_dir: PathBuf,
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// When set, every request but `/healthz` needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// The ttls granted: 10 ms to [`DEFAULT_MAX_TTL`] by default, at most [`TTL_CEILING`].
    pub limits: Limits,
    /// How long a client may take to send a request's head, and then its body; a connection
    /// that stalls longer is closed (head) or answered `malformed_json` (body). 30 s by default.
    /// It bounds the TLS handshake too.
    pub request_timeout: std::time::Duration,
    /// Most bytes a request head (request line and headers) may take; a connection that sends
    /// more before finishing its head is answered 431 and closed. 16 KiB by default, at least
    /// [`MIN_HEADER_BYTES`].
    pub max_header_bytes: usize,
    /// Most connections served at once (1024 by default, and never more than the file
    /// descriptor limit allows). A connection past the cap sheds the one that has been idle the
    /// longest, or, if every connection is mid-request, the oldest.
    pub max_connections: usize,
    /// Records of keys that stayed free (released or expired, never re-acquired) this long are
    /// deleted, and the store compacted; the store-wide fence floor keeps a reclaimed key's
    /// next fence above every fence it had. `None` keeps every record forever. One hour by
    /// default.
    pub reclaim_after: Option<std::time::Duration>,
    /// Threads that serve connections (HTTP and JSON), the one polling [`Server::run`]
    /// included: one by default. Each log is still written by one writer in one order,
    /// whatever this is. More threads measured no faster on 2 cores. (With two, a session's
    /// requests are handled out of order more often; the holder machine allows for it.)
    pub threads: usize,
    /// Serve https instead of http.
    #[cfg(feature = "tls")]
    pub tls: Option<ServerTls>,
    /// A deliberate bug in the sessions' rules, so that tests can prove they catch it (builds
    /// with the `fault-injection` feature only).
    #[cfg(feature = "fault-injection")]
    pub session_fault: leasehold_core::session::authority::SessionFault,
    /// Failures of the server's own logs, and planted bugs in its order of commits (builds
    /// with the `fault-injection` feature only).
    #[cfg(feature = "fault-injection")]
    pub faults: ServerFaults,
}

/// Deliberate faults of the server's I/O and of its order, so that tests can drive a failure
/// case or prove they catch a planted bug.
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Default)]
pub struct ServerFaults {
    /// While true, every session-log commit that carries a v1 hold or set fails as a full
    /// disk would; the next commit then rebuilds the session table from the log on disk.
    /// Shared, so a test can turn it on and off while the server runs.
    pub fail_v1_session_commits: Arc<std::sync::atomic::AtomicBool>,
    /// Planted bug: a v1 grant is answered once v1's own record is on disk, without waiting
    /// for its hold in the session log to be.
    pub v1_answers_before_its_hold_is_durable: bool,
}

impl ServerConfig {
    /// A config for `data_dir` on `listen`, no token, default limits.
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        ServerConfig {
            data_dir: data_dir.into(),
            listen,
            token: None,
            limits: Limits { max_ttl: DEFAULT_MAX_TTL.into(), ..Limits::default() },
            request_timeout: std::time::Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
            max_connections: 1024,
            reclaim_after: Some(std::time::Duration::from_secs(60 * 60)),
            threads: 1,
            #[cfg(feature = "tls")]
            tls: None,
            #[cfg(feature = "fault-injection")]
            session_fault: leasehold_core::session::authority::SessionFault::None,
            #[cfg(feature = "fault-injection")]
            faults: ServerFaults::default(),
        }
    }

    /// Refuses settings with which the server could not do its job: ttl limits that admit no
    /// ttl, ttl 0, ttls past [`TTL_CEILING`] (a ttl near `u64::MAX` µs never expires, as the
    /// clock arithmetic saturates), a token no client can send, zero caps or timeouts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let micros = |d: leasehold_core::Duration| std::time::Duration::from_micros(d.as_micros());
        let (min, max) = (micros(self.limits.min_ttl), micros(self.limits.max_ttl));
        if min.is_zero() {
            return Err(ConfigError::ZeroMinTtl);
        }
        if max > TTL_CEILING {
            return Err(ConfigError::MaxTtlTooLong { max, ceiling: TTL_CEILING });
        }
        if min > max {
            return Err(ConfigError::MinAboveMax { min, max });
        }
        if let Some(token) = &self.token {
            // Bearer tokens are visible ASCII; anything else can never arrive in a header.
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::BadToken);
            }
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError::Zero("request timeout"));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Zero("connection cap"));
        }
        if self.threads == 0 {
            return Err(ConfigError::Zero("thread count"));
        }
        if self.reclaim_after.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::Zero("reclaim interval"));
        }
        // A reclaimed record forgets when its holder expired, and with it a lock-delay still
        // running.
        let lock_delay: std::time::Duration = self.limits.lock_delay.into();
        if let Some(reclaim_after) = self.reclaim_after.filter(|d| *d < lock_delay) {
            return Err(ConfigError::ReclaimBeforeLockDelay { reclaim_after, lock_delay });
        }
        if self.max_header_bytes < MIN_HEADER_BYTES {
            return Err(ConfigError::HeaderCapTooSmall { bytes: self.max_header_bytes });
        }
        Ok(())
    }
}

/// Why a [`ServerConfig`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A minimum ttl of zero would grant leases that expire as they are granted.
    #[error("the minimum ttl must be greater than zero")]
    ZeroMinTtl,
    /// No ttl would be accepted.
    #[error(
        "the minimum ttl ({min:?}) is longer than the maximum ttl ({max:?}): every request would be refused"
    )]
    MinAboveMax {
        /// The minimum.
        min: std::time::Duration,
        /// The maximum.
        max: std::time::Duration,
    },
    /// The maximum ttl is past [`TTL_CEILING`].
    #[error("the maximum ttl ({max:?}) is longer than {ceiling:?}, the longest a server grants")]
    MaxTtlTooLong {
        /// The maximum asked for.
        max: std::time::Duration,
        /// [`TTL_CEILING`].
        ceiling: std::time::Duration,
    },
    /// The token is empty or has characters a header cannot carry: every request would be
    /// refused.
    #[error("the token must be non-empty visible ASCII (no spaces or control characters)")]
    BadToken,
    /// A cap or timeout is zero.
    #[error("the {0} must be greater than zero")]
    Zero(&'static str),
    /// Idle records would be reclaimed while a lock-delay still keeps their key.
    #[error("the reclaim interval ({reclaim_after:?}) must be at least the lock-delay ({lock_delay:?})")]
    ReclaimBeforeLockDelay {
        /// How long a key stays free before its record is reclaimed.
        reclaim_after: std::time::Duration,
        /// The lock-delay after an expiry.
        lock_delay: std::time::Duration,
    },
    /// The header cap is below what hyper can work with.
    #[error("the header cap ({bytes} bytes) must be at least {MIN_HEADER_BYTES} bytes")]
    HeaderCapTooSmall {
        /// The cap asked for.
        bytes: usize,
    },
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The session log could not be opened or replayed.
    #[error(transparent)]
    Sessions(#[from] SessionStoreError),
    /// The configuration cannot work.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// The TLS certificate, key or client CA cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
}

/// The authority's clock: microseconds since the process started. It restarts with the
/// process, which is why grants are re-armed on start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock(std::time::Instant);

impl Clock {
    pub(crate) fn now(&self) -> leasehold_core::Instant {
        leasehold_core::Instant::from_micros(self.0.elapsed().as_micros() as u64)
    }
}

pub(crate) struct Shared {
    store: store::Store,
    sessions: sessions::Sessions,
    /// v1 requests that may change a record go through it, never straight to `store`.
    namespace: namespace::Namespace,
    clock: Clock,
    token: Option<String>,
    request_timeout: std::time::Duration,
    max_header_bytes: usize,
    conns: Arc<conns::Conns>,
    /// The soft `RLIMIT_NOFILE` after raising it; for `/metrics`.
    fd_limit: Option<u64>,
    metrics: metrics::Metrics,
}

impl Shared {
    fn render_metrics(&self) -> String {
        let st = self.store.stats();
        let ss = &self.sessions.stats;
        let (live_sessions, session_keys) = self.sessions.counts();
        let load = |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed);
        let up = matches!(self.store.health(), store::Health::Up);
        let gauges = [
            (
                "leasehold_store_up",
                "1 while the store takes writes, 0 while it is being re-opened.",
                up as u64,
            ),
            (
                "leasehold_store_fence_floor",
                "Fences of keys without a record (never used, or reclaimed) continue above this.",
                load(&st.fence_floor),
            ),
            ("leasehold_connections_open", "Connections being served.", self.conns.open() as u64),
            ("leasehold_sessions_live", "Sessions open now.", live_sessions),
            (
                "leasehold_session_keys",
                "Keys sessions have used (never forgotten: they keep their fence counters).",
                session_keys,
            ),
            ("leasehold_connections_max", "The connection cap in force.", self.conns.cap() as u64),
            (
                "leasehold_open_files_limit",
                "The soft RLIMIT_NOFILE after raising it to the hard limit (0: unlimited or unknown).",
                self.fd_limit.unwrap_or(0),
            ),
        ];
        let counters = [
            ("leasehold_commits_total", "Fsynced write transactions (one per group of changes).", load(&st.commits)),
            (
                "leasehold_store_failures_total",
                "Transactions that failed in the store (I/O errors: a full disk, mostly); each closes it until re-opened.",
                load(&st.failures),
            ),
            ("leasehold_store_reopens_total", "Times the store was re-opened after a failure.", load(&st.reopens)),
            ("leasehold_keys_reclaimed_total", "Records of idle keys deleted.", load(&st.reclaimed)),
            ("leasehold_store_compactions_total", "Compactions of the store file after reclaiming.", load(&st.compactions)),
            ("leasehold_session_opens_total", "Session opens handled.", load(&ss.opens)),
            ("leasehold_session_keepalives_total", "Session keepalives handled (one renews every key).", load(&ss.keepalives)),
            ("leasehold_session_acquires_total", "Session acquires handled.", load(&ss.acquires)),
            ("leasehold_session_releases_total", "Session releases handled.", load(&ss.releases)),
            ("leasehold_session_closes_total", "Session closes handled.", load(&ss.closes)),
            ("leasehold_session_expiries_total", "Session expiry passes logged (each ends every session due).", load(&ss.timeouts)),
            ("leasehold_session_pushed_total", "Keepalives answered with a grant made while the session waited.", load(&ss.pushed)),
            ("leasehold_session_observes_total", "Session observes and unobserves handled.", load(&ss.observes)),
            ("leasehold_session_observed_total", "Keepalives answered with a change of an observed key.", load(&ss.observed)),
            ("leasehold_session_commits_total", "Fsynced appends to the session log (one per group of inputs).", load(&ss.commits)),
            (
                "leasehold_session_log_failures_total",
                "Appends to the session log that failed (a full disk, mostly); the table is rebuilt from the log before it answers again.",
                load(&ss.log_failures),
            ),
            ("leasehold_session_log_rebuilds_total", "Times the session table was rebuilt from its log after a failed append.", load(&ss.rebuilds)),
        ];
        self.metrics.render(&counters, &gauges)
    }
}

/// A bound, recovered server, ready to [`run`](Server::run).
pub struct Server {
    listener: async_net::TcpListener,
    #[cfg(feature = "tls")]
    tls: Option<ServerTls>,
    shared: Arc<Shared>,
    writer: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    session_writer: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    v1_runner: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    threads: usize,
}

impl Server {
    /// Opens the store (re-arming every stored grant from now) and binds the listener.
    pub async fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        config.validate()?;
        let fd_limit = conns::raise_fd_limit();
        let clock = Clock(std::time::Instant::now());
        let (store, writer) =
            store::Store::open(&config.data_dir, clock, config.limits, config.reclaim_after)?;
        // Field by field: the core has a test-only field behind a feature.
        let mut session_limits = leasehold_core::session::SessionLimits::default();
        (session_limits.min_ttl, session_limits.max_ttl) = (config.limits.min_ttl, config.limits.max_ttl);
        #[cfg(feature = "fault-injection")]
        {
            session_limits.fault = config.session_fault;
        }
        let (sessions, session_writer) = sessions::Sessions::open(&config.data_dir, session_limits)?;
        #[cfg(feature = "fault-injection")]
        sessions.fail_v1_commits_while(config.faults.fail_v1_session_commits.clone());
        let (namespace, v1_runner) = namespace::Namespace::new(
            store.clone(),
            sessions.clone(),
            clock,
            config.limits.lock_delay,
            #[cfg(feature = "fault-injection")]
            config.faults.v1_answers_before_its_hold_is_durable,
        );
        // Before serving: the sessions learn what v1 holds on disk (a crash may have cut off
        // what they were told).
        namespace.sync().await?;
        let listener = async_net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
        let shared = Arc::new(Shared {
            store,
            sessions,
            namespace,
            clock,
            token: config.token,
            request_timeout: config.request_timeout,
            max_header_bytes: config.max_header_bytes,
            conns: Arc::new(conns::Conns::new(conns::effective_cap(config.max_connections, fd_limit))),
            fd_limit,
            metrics: Default::default(),
        });
        Ok(Server {
            listener,
            #[cfg(feature = "tls")]
            tls: config.tls,
            shared,
            writer: Box::pin(writer),
            session_writer: Box::pin(session_writer),
            v1_runner: Box::pin(v1_runner),
            threads: config.threads,
        })
    }

    /// `http://ADDR`, or `https://ADDR` when serving TLS.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.local_addr())
    }

    fn scheme(&self) -> &'static str {
        #[cfg(feature = "tls")]
        if self.tls.is_some() {
            return "https";
        }
        "http"
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serves until this future is dropped; dropping it closes every connection and the store.
    /// Works on any executor: connections run on an executor driven by this future and by one
    /// worker thread per further thread asked for (see `Workers`), each log's writer on a
    /// thread of its own (see `LogWriters`), and store I/O on a blocking thread pool.
    pub async fn run(self) {
        #[cfg(feature = "tls")]
        let Server { listener, tls, shared, writer, session_writer, v1_runner, threads } = self;
        #[cfg(not(feature = "tls"))]
        let Server { listener, shared, writer, session_writer, v1_runner, threads } = self;
        // Dropped last: closes both databases, waiting for any transaction still running on
        // the blocking pool (its task is gone, its closure is not), so that a server started
        // on this directory once `run` is dropped finds them free, not `DatabaseAlreadyOpen`.
        let _shut = Shut(shared.clone());
        // Declared before `ex`, so dropped after it: every connection is gone before the
        // writers are stopped and joined, and the store is closed once `run` returns.
        let mut _logs = LogWriters::new();
        let ex = Arc::new(smol::Executor::new());
        // Declared after `ex`, so dropped before it: the workers are joined first, and then the
        // last handle on the executor drops its tasks (every connection) here.
        let _workers = Workers::start(&ex, threads.saturating_sub(1));
        for (name, log) in [("leasehold-v1-log", writer), ("leasehold-session-log", session_writer)] {
            if let Some(log) = _logs.start(name, log) {
                ex.spawn(log).detach();
            }
        }
        ex.spawn(v1_runner).detach();
        ex.run(async {
            let mut backoff = conns::AcceptBackoff::default();
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        shared.metrics.accept_error();
                        // Out of descriptors: closing the longest-idle connection frees one for
                        // a client that has work to do.
                        if conns::out_of_descriptors(&e) && shared.conns.shed_idle() {
                            shared.metrics.shed();
                        }
                        async_io::Timer::after(backoff.failed(&e)).await;
                        continue;
                    }
                };
                backoff.succeeded();
                let _ = stream.set_nodelay(true);
                let (admitted, shed) = shared.conns.admit();
                if shed {
                    shared.metrics.shed();
                }
                let shared = shared.clone();
                #[cfg(feature = "tls")]
                let tls = tls.as_ref().map(|t| t.acceptor.clone());
                ex.spawn(async move {
                    let admitted = Arc::new(admitted);
                    let closed = admitted.shed.clone();
                    // Shed: the connection (and its stream) is dropped wherever it was.
                    let shed = async {
                        let _ = closed.recv().await;
                        tracing::debug!("connection from {peer} shed at the connection cap");
                    };
                    #[cfg(feature = "tls")]
                    if let Some(acceptor) = tls {
                        return futures_lite::future::or(
                            tls_connection(acceptor, stream, shared, peer, admitted),
                            shed,
                        )
                        .await;
                    }
                    futures_lite::future::or(serve_connection(stream, shared, peer, admitted), shed).await
                })
                .detach();
                // A full backlog must not keep the accept loop from letting admitted connections
                // read their requests (accept is ready without waiting while it is non-empty).
                futures_lite::future::yield_now().await;
            }
        })
        .await
    }

    /// Runs a server on a thread of its own until the returned handle is dropped. For tests and
    /// embedding; the `leasehold serve` command runs [`Server::run`] directly.
    pub fn spawn(config: ServerConfig) -> Result<RunningServer, ServerError> {
        let server = smol::block_on(Server::bind(config))?;
        let (addr, url) = (server.local_addr(), server.url());
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let thread = std::thread::spawn(move || {
            smol::block_on(futures_lite::future::or(server.run(), async {
                let _ = stopped.recv().await;
            }))
        });
        Ok(RunningServer { addr, url, stop, thread: Some(thread) })
    }
}

/// Threads that run the server's executor beside the future polling [`Server::run`], until
/// dropped ([`ServerConfig::threads`] less one). HTTP parsing and JSON are most of a request's
/// work off the log, and one thread for all of it capped the server at one core (on a shared
/// machine, at one thread's share of one). The session and v1 writers stay one task each, so
/// a log is still written by one writer in one order, whichever thread polls it.
struct Workers {
    stop: async_channel::Sender<()>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn start(ex: &Arc<smol::Executor<'static>>, n: usize) -> Workers {
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let threads = (0..n)
            .filter_map(|i| {
                let (ex, stopped) = (ex.clone(), stopped.clone());
                std::thread::Builder::new()
                    .name(format!("leasehold-serve-{i}"))
                    .spawn(move || {
                        async_io::block_on(ex.run(async { while stopped.recv().await.is_ok() {} }))
                    })
                    // Fewer threads only means less parallel HTTP work: the server still serves.
                    .map_err(|e| tracing::warn!("no server worker thread: {e}"))
                    .ok()
            })
            .collect();
        Workers { stop, threads }
    }
}

/// Closes the server's databases when dropped (see [`Server::run`]).
struct Shut(Arc<Shared>);

impl Drop for Shut {
    fn drop(&mut self) {
        self.0.store.shut();
        self.0.sessions.shut();
    }
}

std::thread_local! {
    /// Whether this thread is a log writer's own (see [`LogWriters`]): nothing else runs on it.
    static LOG_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a log writer's blocking work (a commit and its fsync, a sweep, a re-open): right here
/// on the writer's own thread, where nothing else waits for it, else on the blocking pool.
/// Handing each commit to the pool from its own thread cost two thread wake-ups per commit,
/// which every request of its group waited for.
pub(crate) async fn log_work<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    if LOG_THREAD.with(std::cell::Cell::get) {
        work()
    } else {
        smol::unblock(work).await
    }
}

/// A future a log's writer runs.
type LogWriter = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The logs' writers, each on a thread of its own until dropped, so that a writer is never
/// queued behind the connections' tasks for its turn (twice per commit: for the first
/// request, and to answer once its fsync is done), and commits on it (see [`log_work`]).
struct LogWriters {
    stop: async_channel::Sender<()>,
    stopped: async_channel::Receiver<()>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl LogWriters {
    fn new() -> LogWriters {
        let (stop, stopped) = async_channel::bounded::<()>(1);
        LogWriters { stop, stopped, threads: Vec::new() }
    }

    /// Runs `writer` on a new thread named `name`; gives it back if no thread could be
    /// started, to be run on the executor as before (slower, never wrong).
    fn start(&mut self, name: &str, writer: LogWriter) -> Option<LogWriter> {
        let stopped = self.stopped.clone();
        // Handed over once the thread runs, so that a failed spawn leaves it here.
        let (hand, over) = std::sync::mpsc::sync_channel::<LogWriter>(1);
        let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
            if let Ok(writer) = over.recv() {
                LOG_THREAD.with(|own| own.set(true));
                // Stopped between two commits: a writer is only ever dropped at an await.
                async_io::block_on(futures_lite::future::or(writer, async {
                    while stopped.recv().await.is_ok() {}
                }));
            }
        });
        match spawned {
            Ok(thread) => {
                self.threads.push(thread);
                let _ = hand.send(writer);
                None
            }
            Err(e) => {
                tracing::warn!("no thread for {name}, it runs with the connections: {e}");
                Some(writer)
            }
        }
    }
}

impl Drop for LogWriters {
    fn drop(&mut self) {
        self.stop.close();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.close();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A server running on its own thread; dropping it stops the server and closes its store.
pub struct RunningServer {
    addr: SocketAddr,
    url: String,
    stop: async_channel::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningServer {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, or `https://ADDR` when serving TLS.
    pub fn url(&self) -> String {
        self.url.clone()
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.stop.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Finishes a TLS handshake (within `request_timeout`), then serves the connection.
#[cfg(feature = "tls")]
async fn tls_connection(
    acceptor: futures_rustls::TlsAcceptor,
    stream: async_net::TcpStream,
    shared: Arc<Shared>,
    peer: SocketAddr,
    admitted: Arc<conns::Admitted>,
) {
    // A client that never finishes its handshake cannot pin a connection.
    let timeout = shared.request_timeout;
    let handshake = futures_lite::future::or(async { Some(acceptor.accept(stream).await) }, async {
        leasehold_timer::Deadline::after(timeout).await;
        None
    });
    let why = match handshake.await {
        Some(Ok(stream)) => return serve_connection(stream, shared, peer, admitted).await,
        Some(Err(e)) => e.to_string(),
        None => "timed out".to_string(),
    };
    shared.metrics.tls_failure();
    tracing::debug!("TLS handshake with {peer} failed: {why}");
}

/// hyper's timer for the request-head deadline, which it arms for every request on a
/// connection: a [`leasehold_timer::Deadline`], because async-io's timer (smol-hyper's) wakes
/// the reactor's thread each time one is armed, and almost none of them fire.
#[derive(Clone, Copy)]
struct HeadTimer;

/// A [`HeadTimer`]'s sleep.
struct HeadSleep(leasehold_timer::Deadline);

impl std::future::Future for HeadSleep {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

impl hyper::rt::Sleep for HeadSleep {}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: std::time::Duration) -> std::pin::Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep(leasehold_timer::Deadline::after(duration)))
    }

    fn sleep_until(&self, at: std::time::Instant) -> std::pin::Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep(leasehold_timer::Deadline::at(at)))
    }

    fn reset(&self, sleep: &mut std::pin::Pin<Box<dyn hyper::rt::Sleep>>, at: std::time::Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeadSleep>() {
            Some(mut ours) => ours.0.reset(at),
            None => *sleep = self.sleep_until(at),
        }
    }
}

/// Serves HTTP/1.1 on one connection, plain or TLS, until the client closes it.
async fn serve_connection<S>(stream: S, shared: Arc<Shared>, peer: SocketAddr, admitted: Arc<conns::Admitted>)
where
    S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin + Send + 'static,
{
    let head_timeout = shared.request_timeout;
    let max_header_bytes = shared.max_header_bytes;
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        // Mid-request until answered: the connection is not idle, so it is shed last.
        let in_flight = admitted.request();
        async move {
            let resp = http::handle(shared, req).await;
            drop(in_flight);
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    // A client that opens a connection and dribbles (or never sends) its request head cannot
    // pin it, and one that sends an endless head cannot make it hold more than the cap: hyper
    // answers 431 and closes once its read buffer (which holds the head) is full. The body is
    // streamed through that buffer too, so the cap bounds it per read, not per request.
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(HeadTimer)
        .header_read_timeout(head_timeout)
        .max_buf_size(max_header_bytes)
        .keep_alive(true)
        .serve_connection(FuturesIo::new(stream), service)
        .await
    {
        tracing::debug!("connection from {peer}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_core::Duration;

    fn config() -> ServerConfig {
        ServerConfig::new("/nonexistent", "127.0.0.1:0".parse().unwrap())
    }

    #[test]
    fn the_defaults_are_valid_and_bound_the_ttl_to_minutes() {
        let c = config();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.limits.max_ttl, DEFAULT_MAX_TTL.into());
    }

    #[test]
    fn configurations_that_cannot_work_are_refused() {
        let with = |f: &dyn Fn(&mut ServerConfig)| {
            let mut c = config();
            f(&mut c);
            c.validate()
        };
        let s = std::time::Duration::from_secs;
        assert_eq!(
            with(&|c| c.limits = Limits {
                min_ttl: Duration::from_secs(10),
                max_ttl: Duration::from_secs(1),
                ..Limits::default()
            }),
            Err(ConfigError::MinAboveMax { min: s(10), max: s(1) })
        );
        assert_eq!(with(&|c| c.limits.min_ttl = Duration::ZERO), Err(ConfigError::ZeroMinTtl));
        assert_eq!(
            with(&|c| c.limits.max_ttl = Duration::MAX),
            Err(ConfigError::MaxTtlTooLong {
                max: std::time::Duration::from_micros(u64::MAX),
                ceiling: TTL_CEILING
            })
        );
        assert_eq!(with(&|c| c.limits.max_ttl = TTL_CEILING.into()), Ok(()), "the ceiling itself is allowed");
        assert_eq!(with(&|c| c.token = Some(String::new())), Err(ConfigError::BadToken));
        assert_eq!(with(&|c| c.token = Some("two words".into())), Err(ConfigError::BadToken));
        assert_eq!(with(&|c| c.token = Some("s3cret".into())), Ok(()));
        assert_eq!(with(&|c| c.max_connections = 0), Err(ConfigError::Zero("connection cap")));
        assert_eq!(with(&|c| c.threads = 0), Err(ConfigError::Zero("thread count")));
        assert_eq!(
            with(&|c| c.request_timeout = std::time::Duration::ZERO),
            Err(ConfigError::Zero("request timeout"))
        );
        assert_eq!(
            with(&|c| c.reclaim_after = Some(std::time::Duration::ZERO)),
            Err(ConfigError::Zero("reclaim interval"))
        );
        assert_eq!(with(&|c| c.max_header_bytes = 100), Err(ConfigError::HeaderCapTooSmall { bytes: 100 }));
        let hours = |h: u64| std::time::Duration::from_secs(h * 3600);
        assert_eq!(
            with(&|c| {
                c.limits.lock_delay = hours(2).into();
                c.reclaim_after = Some(hours(1));
            }),
            Err(ConfigError::ReclaimBeforeLockDelay { reclaim_after: hours(1), lock_delay: hours(2) })
        );
    }

    #[test]
    fn bind_refuses_an_invalid_config_before_touching_the_store() {
        let dir = std::env::temp_dir().join(format!("leasehold-invalid-{}", std::process::id()));
        let mut c = ServerConfig::new(&dir, "127.0.0.1:0".parse().unwrap());
        c.token = Some(String::new());
        let e = smol::block_on(Server::bind(c)).err().expect("refused");
        assert!(matches!(e, ServerError::Config(ConfigError::BadToken)), "{e}");
        assert!(!dir.exists(), "the store was created for a config that cannot work");
    }
}
