//! `leasehold gateway`: devices on serial links, a lease backend on the network.
//!
//! The gateway only forwards. It never holds a lease for a device: each device's validity is
//! anchored at the device's own send time, so a slow gateway can only shorten a lease. What it
//! adds is bookkeeping about the links: a bound on the keys each link may use, counters that
//! live as long as the gateway (not the connection), and warnings throttled per link.
//!
//! Protocol-v2 session frames are forwarded through [`BuiltinSessions`], each as its own task
//! so a keepalive held open at the server (until it can push a grant) never holds up the
//! link. A session belongs to the connection whose open request created it: any other frame
//! for it on another connection is refused without being forwarded. A link that reconnects is
//! a new connection: its peer may be another device (anyone can connect to a TCP port after a
//! drop, and a USB serial adapter can be replugged into another board), so it must open a new
//! session; the old one's keys free when the old session expires. The gateway never closes a
//! session itself: its device may still believe in its keys until their validity ends.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_io::Async;
use futures_lite::{AsyncRead, AsyncWrite};
use leasehold_core::session::wire::{SessionId, SessionOp, SessionReply, SessionRequest};
use leasehold_core::{Key, Reject, Reply, Response};
use leasehold_http::{Backend, BuiltinBackend, BuiltinSessions, SessionBackend, TlsConfig, TransportError};
use leasehold_serial::host::{response_to, version_mismatch, AsyncHostLink};
use leasehold_serial::{Body, DecodeError, Frame, Header, SessionRefusal};

/// Repeated warnings of one kind on one link: the first in each window is logged, the rest are
/// counted and reported as one line when the window ends.
const LOG_WINDOW: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub(crate) struct Args {
    /// A device link: a serial device path (e.g. /dev/ttyUSB0, configured with stty) or
    /// tcp:HOST:PORT (e.g. an emulator's UART). Repeat for several links.
    #[arg(long = "link", required = true, value_name = "PATH|tcp:HOST:PORT", value_parser = LinkSpec::parse)]
    links: Vec<LinkSpec>,
    /// The lease server.
    #[arg(long, env = "LEASEHOLD_SERVER", default_value = "http://127.0.0.1:7878")]
    server: String,
    /// Bearer token, if the server requires one.
    #[arg(long, env = "LEASEHOLD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    tls: crate::TlsArgs,
    /// Per-request timeout towards the server.
    #[arg(long, default_value = "2s", value_parser = crate::duration)]
    timeout: Duration,
    /// Stop after this many reconnect failures in a row on every link (default: never).
    #[arg(long)]
    give_up_after: Option<u32>,
    /// Forward requests for at most this many distinct keys from one link (for the gateway's
    /// lifetime); requests for further keys are answered "rejected: capacity".
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_keys_per_link: u32,
    /// Serve per-link counters as Prometheus text on http://ADDR/metrics; port 0 picks a free
    /// one (the chosen address is printed on stdout).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

pub(crate) fn main(args: Args) -> ExitCode {
    if let Some(dup) =
        args.links.iter().enumerate().find_map(|(i, l)| args.links[..i].contains(l).then_some(l))
    {
        eprintln!("leasehold gateway: link {dup} is given twice");
        return ExitCode::from(2);
    }
    let backend = match args.tls.config().and_then(|tls| {
        BuiltinBackend::new(&args.server, args.token.clone(), args.timeout)
            .map(|b| b.with_tls(tls))
            .map_err(|e| e.to_string())
    }) {
        Ok(b) => Arc::new(b),
        Err(e) => {
            eprintln!("leasehold gateway: {e}");
            return ExitCode::from(2);
        }
    };
    let target = match args.tls.config().and_then(|tls| {
        SessionsTarget::new(args.server.clone(), args.token.clone(), args.timeout, tls)
            .map_err(|e| e.to_string())
    }) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            eprintln!("leasehold gateway: {e}");
            return ExitCode::from(2);
        }
    };
    let bindings = Arc::new(SessionBindings::default());
    let links: Arc<[Arc<LinkState>]> =
        args.links.iter().map(|spec| Arc::new(LinkState::new(spec.clone()))).collect();
    smol::block_on(async {
        if let Some(addr) = args.metrics {
            let listener = match async_net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("leasehold gateway: cannot listen on {addr} for --metrics: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Ok(addr) = listener.local_addr() {
                println!("metrics on http://{addr}/metrics");
                let _ = std::io::stdout().flush();
            }
            smol::spawn(serve_metrics(listener, links.clone())).detach();
        }
        smol::spawn(report_suppressed(links.clone())).detach();
        let max_keys = args.max_keys_per_link as usize;
        let tasks: Vec<_> = links
            .iter()
            .map(|l| {
                let sessions = SessionRoute {
                    target: target.clone(),
                    bindings: bindings.clone(),
                    fault: Fault::from_env(),
                };
                smol::spawn(serve_link(l.clone(), backend.clone(), sessions, args.give_up_after, max_keys))
            })
            .collect();
        for t in tasks {
            t.await;
        }
        ExitCode::FAILURE
    })
}

/// A `--link` value, checked before anything starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkSpec {
    /// `tcp:HOST:PORT`; an IPv6 host is written in brackets and stored without them.
    Tcp { host: String, port: u16 },
    /// A serial device (or any file that reads and writes bytes).
    Path(PathBuf),
}

/// Why a `--link` value is not a link.
#[derive(Debug)]
pub(crate) enum LinkSpecError {
    EmptyPath,
    NoPort(String),
    EmptyHost(String),
    EmptyPort(String),
    BadPort { spec: String, source: std::num::ParseIntError },
    ZeroPort(String),
    Ipv6(String),
}

impl fmt::Display for LinkSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const FORM: &str = "expected tcp:HOST:PORT, e.g. tcp:127.0.0.1:5555, or a device path";
        match self {
            LinkSpecError::EmptyPath => write!(f, "empty link ({FORM})"),
            LinkSpecError::NoPort(s) => write!(f, "{s:?} has no port ({FORM})"),
            LinkSpecError::EmptyHost(s) => write!(f, "{s:?} has no host ({FORM})"),
            LinkSpecError::EmptyPort(s) => write!(f, "{s:?} has an empty port ({FORM})"),
            LinkSpecError::BadPort { spec, .. } => write!(f, "{spec:?} has a port that is not 1-65535"),
            LinkSpecError::ZeroPort(s) => write!(f, "{s:?}: port 0 cannot be connected to"),
            LinkSpecError::Ipv6(s) => write!(
                f,
                "{s:?}: an IPv6 host is written in brackets, e.g. tcp:[::1]:5555, and brackets hold only an IPv6 address"
            ),
        }
    }
}

impl std::error::Error for LinkSpecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LinkSpecError::BadPort { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl LinkSpec {
    pub(crate) fn parse(s: &str) -> Result<LinkSpec, LinkSpecError> {
        let Some(rest) = s.strip_prefix("tcp:") else {
            return if s.is_empty() { Err(LinkSpecError::EmptyPath) } else { Ok(LinkSpec::Path(s.into())) };
        };
        let Some((host, port)) = rest.rsplit_once(':') else { return Err(LinkSpecError::NoPort(s.into())) };
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) if v6.parse::<Ipv6Addr>().is_ok() => v6,
            Some(_) => return Err(LinkSpecError::Ipv6(s.into())),
            None if host.contains(':') => return Err(LinkSpecError::Ipv6(s.into())),
            None if host.is_empty() => return Err(LinkSpecError::EmptyHost(s.into())),
            None => host,
        };
        if port.is_empty() {
            return Err(LinkSpecError::EmptyPort(s.into()));
        }
        match port.parse::<u16>() {
            Ok(0) => Err(LinkSpecError::ZeroPort(s.into())),
            Ok(port) => Ok(LinkSpec::Tcp { host: host.into(), port }),
            Err(source) => Err(LinkSpecError::BadPort { spec: s.into(), source }),
        }
    }
}

impl fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkSpec::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            LinkSpec::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            LinkSpec::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn open(link: &LinkSpec) -> std::io::Result<Box<dyn Stream>> {
    match link {
        LinkSpec::Tcp { host, port } => {
            let s = async_net::TcpStream::connect((host.as_str(), *port)).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s))
        }
        LinkSpec::Path(path) => {
            let file = OpenOptions::new().read(true).write(true).open(path)?;
            Ok(Box::new(Async::new(file)?))
        }
    }
}

/// One counter; relaxed atomics, read only for reporting.
#[derive(Default)]
struct Counter(AtomicU64);

impl Counter {
    fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
    fn sub(&self, n: u64) {
        self.0.fetch_sub(n, Relaxed);
    }
}

/// What one link has done since the gateway started, over all its connections.
#[derive(Default)]
struct Counters {
    /// 1 while connected.
    up: Counter,
    connects: Counter,
    /// Frames of this protocol version decoded.
    frames: Counter,
    oversize: Counter,
    cobs: Counter,
    malformed: Counter,
    version_mismatches: Counter,
    /// Requests sent to the lease server (answered or not).
    forwarded: Counter,
    /// Forwarded requests that got no reply from the server (the device was told "unavailable").
    backend_errors: Counter,
    /// Requests refused because the link reached `--max-keys-per-link`.
    key_limit_refusals: Counter,
    /// Distinct keys the link has used.
    keys: Counter,
    /// Session requests refused unforwarded: the session was not opened on this connection.
    wrong_link_refusals: Counter,
    /// Session requests the server refused for a wrong secret (the reply was withheld).
    forged_refusals: Counter,
    /// Sessions opened on the link's current connection and not known to have ended.
    sessions: Counter,
    /// Opens refused because the connection had `MAX_SESSIONS_PER_CONNECTION` sessions.
    session_limit_refusals: Counter,
}

/// What the gateway warns about, per link.
enum Warning {
    /// A frame that could not be used (line noise, another protocol version...).
    Frame(DecodeError),
    /// The link could not be opened.
    Open(std::io::Error),
    /// A request reached no lease server.
    Backend { device: u32, error: TransportError },
    /// A request for one key too many.
    KeyLimit { device: u32, key: Key, max: usize },
    /// A session request on a connection that did not open the session.
    WrongLink { device: u32, session: SessionId },
    /// A session request with a wrong secret.
    Forged { device: u32, session: SessionId },
    /// An open past the connection's session limit.
    SessionLimit { device: u32, max: usize },
}

impl Warning {
    /// Which throttle it goes through: one per kind, so a flood of one cannot hide another.
    fn kind(&self) -> usize {
        match self {
            Warning::Frame(DecodeError::WrongVersion(_)) => 0,
            Warning::Frame(_) => 1,
            Warning::Open(_) => 2,
            Warning::Backend { .. } => 3,
            Warning::KeyLimit { .. } => 4,
            Warning::WrongLink { .. } => 5,
            Warning::Forged { .. } => 6,
            Warning::SessionLimit { .. } => 7,
        }
    }
}

const KINDS: usize = 8;

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::Frame(e @ DecodeError::WrongVersion(_)) => {
                write!(f, "{e}; answered with a version mismatch")
            }
            Warning::Frame(e) => write!(f, "bad frame: {e}"),
            Warning::Open(e) => write!(f, "cannot open: {e}; retrying"),
            Warning::Backend { device, error } => {
                write!(f, "device {device}: no reply from the lease server ({error}); told the device it is unavailable")
            }
            Warning::KeyLimit { device, key, max } => write!(
                f,
                "device {device}: refused key {:?}: this link already uses {max} keys (--max-keys-per-link)",
                key.as_str()
            ),
            Warning::WrongLink { device, session } => write!(
                f,
                "device {device}: refused a request for session {session}: it was not opened on this connection"
            ),
            Warning::Forged { device, session } => write!(
                f,
                "device {device}: the server refused the secret of a request for session {session} (forged or replayed with a wrong secret); its reply withheld"
            ),
            Warning::SessionLimit { device, max } => write!(
                f,
                "device {device}: refused to open a session: this connection already has {max} open"
            ),
        }
    }
}

/// One kind of warning within the current window.
#[derive(Default)]
struct Throttle {
    /// The window's first occurrence has been logged.
    logged: bool,
    /// Occurrences since then, and the latest of them.
    suppressed: u64,
    last: Option<Warning>,
}

/// One link: its name, counters and warning throttles, kept for the gateway's lifetime.
struct LinkState {
    spec: LinkSpec,
    name: String,
    counters: Counters,
    throttles: Mutex<[Throttle; KINDS]>,
}

impl LinkState {
    fn new(spec: LinkSpec) -> LinkState {
        LinkState { name: spec.to_string(), spec, counters: Counters::default(), throttles: Mutex::default() }
    }

    /// Logs `w` if it is the first of its kind in this window; otherwise counts it.
    fn warn(&self, w: Warning) {
        let mut throttles = self.throttles.lock().unwrap_or_else(PoisonError::into_inner);
        let t = &mut throttles[w.kind()];
        if t.logged {
            t.suppressed += 1;
            t.last = Some(w);
        } else {
            t.logged = true;
            drop(throttles);
            tracing::warn!("link {}: {w}", self.name);
        }
    }

    /// Ends the window: one line per kind that had occurrences beyond the logged one.
    fn end_window(&self) -> Vec<String> {
        let ended = std::mem::take(&mut *self.throttles.lock().unwrap_or_else(PoisonError::into_inner));
        let window = LOG_WINDOW.as_secs();
        ended
            .into_iter()
            .filter_map(|t| {
                Some(format!(
                    "link {}: {} ({} more in the last {window} s)",
                    self.name, t.last?, t.suppressed
                ))
            })
            .collect()
    }

    fn count_decode_error(&self, e: &DecodeError) {
        let c = &self.counters;
        match e {
            DecodeError::Oversize => c.oversize.inc(),
            DecodeError::Cobs => c.cobs.inc(),
            DecodeError::Malformed => c.malformed.inc(),
            DecodeError::WrongVersion(_) => c.version_mismatches.inc(),
        }
    }
}

async fn report_suppressed(links: Arc<[Arc<LinkState>]>) {
    loop {
        async_io::Timer::after(LOG_WINDOW).await;
        for line in links.iter().flat_map(|l| l.end_window()) {
            tracing::warn!("{line}");
        }
    }
}

/// The keys a link has used, up to its limit. Kept across reconnects: a device cannot reset
/// its allowance by dropping the line.
struct KeySet {
    keys: HashSet<Key>,
    max: usize,
}

impl KeySet {
    /// Whether a request for `key` may be forwarded; records the key if it is new.
    fn admit(&mut self, key: &Key) -> bool {
        if self.keys.contains(key) {
            return true;
        }
        if self.keys.len() >= self.max {
            return false;
        }
        self.keys.insert(key.clone());
        true
    }
}

/// The built-in server's sessions API, and how to reach it: each session gets a pool of its
/// own for its keepalives (the server holds one open until it can push a grant, so sessions
/// sharing a pool would queue behind each other's held keepalives).
struct SessionsTarget {
    url: String,
    token: Option<String>,
    timeout: Duration,
    tls: TlsConfig,
}

impl SessionsTarget {
    fn new(
        url: String,
        token: Option<String>,
        timeout: Duration,
        tls: TlsConfig,
    ) -> Result<Self, TransportError> {
        let target = SessionsTarget { url, token, timeout, tls };
        // The URL is checked here, once, rather than at every session's open.
        target.client()?;
        Ok(target)
    }

    fn client(&self) -> Result<BuiltinSessions, TransportError> {
        Ok(BuiltinSessions::new(&self.url, self.token.clone(), self.timeout)?.with_tls(self.tls.clone()))
    }

    /// How long the server may hold a session's keepalive: a quarter of its ttl (the device
    /// renews every ttl/4 and times a request out after ttl/3), and well inside the gateway's
    /// own request timeout towards the server.
    fn hold(&self, ttl: leasehold_core::Duration) -> Duration {
        (Duration::from(ttl) / 4).min(self.timeout / 2)
    }
}

/// One connection of one link, as the session bindings know it. Never reused.
type ConnId = u64;

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// A session the gateway forwards for: the connection that opened it, how long its
/// keepalives may be held, and their pool.
struct Binding {
    conn: ConnId,
    hold: Duration,
    keepalives: Arc<BuiltinSessions>,
    ttl: Duration,
    /// After this the server has certainly expired the session (unless a later keepalive
    /// renewed it, which moves this on): the binding can go.
    alive_until: std::time::Instant,
}

/// Sessions one connection may have open at once (a device needs one); an open beyond it is
/// answered `Rejected(Capacity)` without being forwarded, so a device opening sessions in a
/// loop cannot grow the gateway's table.
const MAX_SESSIONS_PER_CONNECTION: usize = 8;

/// When a session renewed for `ttl` by a reply received at `at` has certainly expired at the
/// server: the server renewed it before it replied, for `ttl` on its clock, which may run
/// slower than ours by ε; a quarter more and a second cover that with room to spare.
fn certainly_expired_after(at: std::time::Instant, ttl: Duration) -> std::time::Instant {
    at + ttl.mul_f64(1.25) + Duration::from_secs(1)
}

/// Which connection opened each session, over every link: a frame for a session is forwarded
/// only from the connection that opened it.
#[derive(Default)]
struct SessionBindings(Mutex<HashMap<SessionId, Binding>>);

impl SessionBindings {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Binding>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The session's hold and keepalive pool, if `conn` opened it.
    fn lookup(
        &self,
        session: SessionId,
        conn: ConnId,
        fault: Fault,
    ) -> Option<(Duration, Arc<BuiltinSessions>)> {
        let map = self.lock();
        let found = map.get(&session).filter(|b| b.conn == conn || fault == Fault::AnyLink);
        found.map(|b| (b.hold, b.keepalives.clone()))
    }

    fn bind(&self, session: SessionId, binding: Binding) -> bool {
        // Ids are never reused by the server, so an existing entry can only be a bug there;
        // the first binding stands.
        let mut map = self.lock();
        if map.contains_key(&session) {
            return false;
        }
        map.insert(session, binding);
        true
    }

    /// A keepalive of `session` was answered `Alive` at `at`.
    fn renewed(&self, session: SessionId, conn: ConnId, at: std::time::Instant) {
        if let Some(b) = self.lock().get_mut(&session).filter(|b| b.conn == conn) {
            b.alive_until = certainly_expired_after(at, b.ttl);
        }
    }

    /// Forgets `conn`'s sessions that have certainly expired by `now`; returns how many it
    /// forgot and how many `conn` still has.
    fn prune(&self, conn: ConnId, now: std::time::Instant) -> (u64, usize) {
        let mut map = self.lock();
        let before = map.len();
        map.retain(|_, b| b.conn != conn || b.alive_until > now);
        let pruned = (before - map.len()) as u64;
        (pruned, map.values().filter(|b| b.conn == conn).count())
    }

    /// Forgets `session` if `conn` opened it; returns whether it did.
    fn unbind(&self, session: SessionId, conn: ConnId) -> bool {
        let mut map = self.lock();
        if map.get(&session).is_some_and(|b| b.conn == conn) {
            map.remove(&session);
            return true;
        }
        false
    }

    /// Forgets every session `conn` opened (it ended); returns how many.
    fn drop_conn(&self, conn: ConnId) -> u64 {
        let mut map = self.lock();
        let before = map.len();
        map.retain(|_, b| b.conn != conn);
        (before - map.len()) as u64
    }
}

/// What a link needs to forward session frames.
#[derive(Clone)]
struct SessionRoute {
    target: Arc<SessionsTarget>,
    bindings: Arc<SessionBindings>,
    fault: Fault,
}

/// Deliberate bugs, so the tests can prove they catch them: chosen by the environment variable
/// `LEASEHOLD_GATEWAY_FAULT` in a build with the `fault-injection` feature, and never
/// otherwise (a release build has no way to turn off a check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
enum Fault {
    /// Correct behaviour.
    None,
    /// `any-link`: forward a session's frames from any connection.
    AnyLink,
    /// `pass-forged`: pass the server's refusal of a wrong secret on to the device.
    PassForged,
    /// `no-hold`: have the server answer keepalives at once, never holding one for a grant.
    NoHold,
}

impl Fault {
    #[cfg(feature = "fault-injection")]
    fn from_env() -> Fault {
        match std::env::var("LEASEHOLD_GATEWAY_FAULT").as_deref() {
            Ok("any-link") => Fault::AnyLink,
            Ok("pass-forged") => Fault::PassForged,
            Ok("no-hold") => Fault::NoHold,
            _ => Fault::None,
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    fn from_env() -> Fault {
        Fault::None
    }
}

/// Session requests of one connection being forwarded at once, at most: a device has one
/// keepalive and one request per key out, so more is a flood, answered "unreachable".
const MAX_SESSION_REQUESTS_IN_FLIGHT: usize = 64;

/// Keeps one link connected and forwards its frames, forever (or until `give_up_after`).
async fn serve_link<B: Backend>(
    link: Arc<LinkState>,
    backend: Arc<B>,
    sessions: SessionRoute,
    give_up_after: Option<u32>,
    max_keys: usize,
) {
    let mut failures = 0u32;
    let mut keys = KeySet { keys: HashSet::new(), max: max_keys };
    let name = &link.name;
    // Opens, acquires, releases and closes of this link's sessions; keepalives go through
    // each session's own pool. Cannot fail: the target was checked at start.
    let Ok(shared) = sessions.target.client().map(Arc::new) else { return };
    loop {
        let stream = match open(&link.spec).await {
            Ok(s) => {
                failures = 0;
                eprintln!("leasehold gateway: link {name} connected");
                s
            }
            Err(e) => {
                failures += 1;
                if give_up_after.is_some_and(|n| failures >= n) {
                    eprintln!("leasehold gateway: link {name}: {e}; giving up");
                    return;
                }
                link.warn(Warning::Open(e));
                async_io::Timer::after(Duration::from_millis(250)).await;
                continue;
            }
        };
        link.counters.connects.inc();
        link.counters.up.set(1);
        let conn = Connection {
            id: NEXT_CONN.fetch_add(1, Relaxed),
            link: link.clone(),
            route: sessions.clone(),
            shared: shared.clone(),
            in_flight: Arc::new(AtomicU64::new(0)),
        };
        let result = forward(&mut AsyncHostLink::new(stream), &*backend, &conn, &mut keys).await;
        link.counters.up.set(0);
        // Its sessions can no longer be used from anywhere: they expire at the server.
        link.counters.sessions.sub(sessions.bindings.drop_conn(conn.id));
        match result {
            Ok(()) => eprintln!("leasehold gateway: link {name} closed; reconnecting"),
            Err(e) => eprintln!("leasehold gateway: link {name}: {e}; reconnecting"),
        }
        async_io::Timer::after(Duration::from_millis(100)).await;
    }
}

/// One connection of a link, for its session frames.
struct Connection {
    id: ConnId,
    link: Arc<LinkState>,
    route: SessionRoute,
    shared: Arc<BuiltinSessions>,
    in_flight: Arc<AtomicU64>,
}

/// What the forwarding loop waits for: the device's next frame, or a session request's answer.
enum Next {
    Frame(std::io::Result<Option<Result<Frame, DecodeError>>>),
    Answer(Frame),
}

/// Forwards one connection's requests until it ends. Nothing a device sends can make this
/// panic: bad frames are counted and skipped, a request for one key too many is refused.
async fn forward<S: Stream, B: Backend>(
    link: &mut AsyncHostLink<S>,
    backend: &B,
    conn: &Connection,
    keys: &mut KeySet,
) -> std::io::Result<()> {
    let state = &*conn.link;
    let c = &state.counters;
    // Session answers come back here from their tasks, which are cancelled with the
    // connection (when `tasks` is dropped).
    let (answers_tx, answers) = smol::channel::unbounded::<Frame>();
    let mut tasks: Vec<smol::Task<()>> = Vec::new();
    loop {
        // Reading is cancel-safe (AsyncHostLink::read_frame loses nothing when dropped).
        let next = futures_lite::future::or(async { Next::Frame(link.read_frame().await) }, async {
            match answers.recv().await {
                Ok(f) => Next::Answer(f),
                // Never: this function holds a sender.
                Err(_) => std::future::pending().await,
            }
        })
        .await;
        let frame = match next {
            Next::Answer(f) => {
                link.write_frame(&f).await?;
                continue;
            }
            Next::Frame(r) => match r? {
                Some(frame) => frame,
                None => return Ok(()),
            },
        };
        match frame {
            Ok(f) => {
                c.frames.inc();
                let header = f.header;
                let (key, request) = match f.body {
                    Body::Request { key, request } => (key, request),
                    Body::SessionRequest(request) => {
                        tasks.retain(|t| !t.is_finished());
                        if let Some(refusal) = conn.start(header, request, &answers_tx, &mut tasks) {
                            link.write_frame(&refusal).await?;
                        }
                        continue;
                    }
                    _ => {
                        tracing::debug!(
                            "link {}: ignoring a non-request frame from device {}",
                            state.name,
                            header.device
                        );
                        continue;
                    }
                };
                let device = header.device;
                let reply = if keys.admit(&key) {
                    c.keys.set(keys.keys.len() as u64);
                    c.forwarded.inc();
                    // A request that cannot be forwarded is answered "unavailable": the device's
                    // machine backs off and retries, exactly as after a lost reply. Permanent
                    // errors too: they are the gateway's configuration, fixable while devices
                    // keep trying, and a rejection would make every device give up.
                    backend.call(&key, request).await.unwrap_or_else(|error| {
                        c.backend_errors.inc();
                        state.warn(Warning::Backend { device, error });
                        Reply::Unavailable
                    })
                } else {
                    // The same answer an authority gives when it cannot track more keys: the
                    // device's machine reports it and stops asking for this key.
                    c.key_limit_refusals.inc();
                    state.warn(Warning::KeyLimit { device, key, max: keys.max });
                    Reply::Rejected(Reject::Capacity)
                };
                let response = Response { id: request.id, owner: request.owner, reply };
                link.write_frame(&response_to(&header, response)).await?;
            }
            Err(e) => {
                state.count_decode_error(&e);
                state.warn(Warning::Frame(e));
                if let DecodeError::WrongVersion(h) = e {
                    link.write_frame(&version_mismatch(&h)).await?;
                }
            }
        }
    }
}

impl Connection {
    /// Starts forwarding a session request in a task of its own, whose answer comes back on
    /// `answers`; or returns the refusal to send at once.
    fn start(
        &self,
        header: Header,
        request: SessionRequest,
        answers: &smol::channel::Sender<Frame>,
        tasks: &mut Vec<smol::Task<()>>,
    ) -> Option<Frame> {
        let c = &self.link.counters;
        let refuse = |why| {
            Frame::new(
                header.seq,
                header.device,
                Body::SessionRefused { session: request.session, seq: request.seq, why },
            )
        };
        // Anyone may open a session; everything else only on the connection that opened it.
        let (pool, hold) = if matches!(request.op, SessionOp::Open { .. }) {
            let (pruned, open) = self.route.bindings.prune(self.id, std::time::Instant::now());
            c.sessions.sub(pruned);
            if open >= MAX_SESSIONS_PER_CONNECTION {
                c.session_limit_refusals.inc();
                self.link
                    .warn(Warning::SessionLimit { device: header.device, max: MAX_SESSIONS_PER_CONNECTION });
                let answer = request.answer(SessionReply::Rejected(Reject::Capacity));
                return Some(Frame::new(header.seq, header.device, Body::SessionResponse(answer)));
            }
            (self.shared.clone(), Duration::ZERO)
        } else {
            let Some((hold, keepalives)) =
                self.route.bindings.lookup(request.session, self.id, self.route.fault)
            else {
                c.wrong_link_refusals.inc();
                self.link.warn(Warning::WrongLink { device: header.device, session: request.session });
                return Some(refuse(SessionRefusal::WrongLink));
            };
            match request.op {
                SessionOp::KeepAlive => (keepalives, hold),
                _ => (self.shared.clone(), Duration::ZERO),
            }
        };
        if self.in_flight.load(Relaxed) >= MAX_SESSION_REQUESTS_IN_FLIGHT as u64 {
            c.backend_errors.inc();
            return Some(refuse(SessionRefusal::Unreachable));
        }
        self.in_flight.fetch_add(1, Relaxed);
        c.forwarded.inc();
        let task = SessionTask {
            conn: self.id,
            link: self.link.clone(),
            route: self.route.clone(),
            in_flight: self.in_flight.clone(),
            header,
        };
        let answers = answers.clone();
        tasks.push(smol::spawn(async move {
            let answer = task.run(&pool, request, hold).await;
            if answers.send(answer).await.is_err() {
                // The connection ended meanwhile; anything bound for it was dropped with it.
            }
            task.in_flight.fetch_sub(1, Relaxed);
        }));
        None
    }
}

/// One session request on its way to the server and back.
struct SessionTask {
    conn: ConnId,
    link: Arc<LinkState>,
    route: SessionRoute,
    in_flight: Arc<AtomicU64>,
    header: Header,
}

impl SessionTask {
    async fn run(&self, pool: &BuiltinSessions, request: SessionRequest, hold: Duration) -> Frame {
        let c = &self.link.counters;
        let (header, device) = (self.header, self.header.device);
        let (session, seq) = (request.session, request.seq);
        let frame = |body| Frame::new(header.seq, device, body);
        let response = match SessionBackend::call(pool, request, hold).await {
            Ok(r) => r,
            Err(error) => {
                c.backend_errors.inc();
                self.link.warn(Warning::Backend { device, error });
                return frame(Body::SessionRefused { session, seq, why: SessionRefusal::Unreachable });
            }
        };
        match response.reply {
            SessionReply::Opened { session: opened, ttl, .. } => {
                let keepalives = match self.route.target.client() {
                    Ok(k) => Arc::new(k),
                    // Cannot happen (the URL was checked at start); the shared pool still works.
                    Err(_) => return frame(Body::SessionResponse(response)),
                };
                let hold = match self.route.fault {
                    Fault::NoHold => Duration::ZERO,
                    _ => self.route.target.hold(ttl),
                };
                let ttl = Duration::from(ttl);
                let alive_until = certainly_expired_after(std::time::Instant::now(), ttl);
                let binding = Binding { conn: self.conn, hold, keepalives, ttl, alive_until };
                if self.route.bindings.bind(opened, binding) {
                    c.sessions.inc();
                }
            }
            SessionReply::Alive { .. } => {
                self.route.bindings.renewed(session, self.conn, std::time::Instant::now())
            }
            SessionReply::Closed | SessionReply::Expired
                if self.route.bindings.unbind(session, self.conn) =>
            {
                c.sessions.sub(1);
            }
            // The holder has its secret, so a wrong one is someone else's frame. Its reply,
            // which carries the seq it named, must not reach the holder as the answer to its
            // own request of that seq.
            SessionReply::Rejected(Reject::Unauthorized)
                if session != SessionId::NONE && self.route.fault != Fault::PassForged =>
            {
                c.forged_refusals.inc();
                self.link.warn(Warning::Forged { device, session });
                return frame(Body::SessionRefused { session, seq, why: SessionRefusal::Forged });
            }
            _ => {}
        }
        frame(Body::SessionResponse(response))
    }
}

/// One series of a family: its labels beyond `link`, and where its value is.
type Series = (&'static str, fn(&Counters) -> &Counter);

/// One metric family: each link's series, with extra labels.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    series: &'static [Series],
}

const FAMILIES: [Family; 11] = [
    Family {
        name: "leasehold_gateway_link_up",
        kind: "gauge",
        help: "1 while the link is connected.",
        series: &[("", |c| &c.up)],
    },
    Family {
        name: "leasehold_gateway_link_connects_total",
        kind: "counter",
        help: "Connections made.",
        series: &[("", |c| &c.connects)],
    },
    Family {
        name: "leasehold_gateway_frames_total",
        kind: "counter",
        help: "Frames of this protocol version decoded.",
        series: &[("", |c| &c.frames)],
    },
    Family {
        name: "leasehold_gateway_decode_errors_total",
        kind: "counter",
        help: "Byte runs that were not a frame, by kind.",
        series: &[
            ("kind=\"oversize\"", |c| &c.oversize),
            ("kind=\"cobs\"", |c| &c.cobs),
            ("kind=\"malformed\"", |c| &c.malformed),
        ],
    },
    Family {
        name: "leasehold_gateway_version_mismatches_total",
        kind: "counter",
        help: "Frames of another protocol version (each answered with a version mismatch).",
        series: &[("", |c| &c.version_mismatches)],
    },
    Family {
        name: "leasehold_gateway_requests_forwarded_total",
        kind: "counter",
        help: "Requests sent to the lease server.",
        series: &[("", |c| &c.forwarded)],
    },
    Family {
        name: "leasehold_gateway_backend_errors_total",
        kind: "counter",
        help: "Forwarded requests the lease server did not answer (the device was told it is unavailable).",
        series: &[("", |c| &c.backend_errors)],
    },
    Family {
        name: "leasehold_gateway_key_limit_refusals_total",
        kind: "counter",
        help: "Requests refused because the link reached --max-keys-per-link.",
        series: &[("", |c| &c.key_limit_refusals)],
    },
    Family {
        name: "leasehold_gateway_session_refusals_total",
        kind: "counter",
        help: "Session requests answered by the gateway instead of the server: not opened on this connection (not forwarded), a wrong secret (the reply withheld), or an open past the connection's session limit (not forwarded).",
        series: &[
            ("reason=\"wrong_link\"", |c| &c.wrong_link_refusals),
            ("reason=\"forged\"", |c| &c.forged_refusals),
            ("reason=\"session_limit\"", |c| &c.session_limit_refusals),
        ],
    },
    Family {
        name: "leasehold_gateway_link_sessions",
        kind: "gauge",
        help: "Sessions opened on the link's current connection and not known to have ended.",
        series: &[("", |c| &c.sessions)],
    },
    Family {
        name: "leasehold_gateway_link_keys",
        kind: "gauge",
        help: "Distinct keys the link has used.",
        series: &[("", |c| &c.keys)],
    },
];

/// The counters of every link in the Prometheus text format.
fn render_metrics(links: &[Arc<LinkState>]) -> String {
    let mut out = String::new();
    for Family { name, kind, help, series } in &FAMILIES {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for l in links {
            let label = escape_label(&l.name);
            for (extra, get) in *series {
                let sep = if extra.is_empty() { "" } else { "," };
                out.push_str(&format!("{name}{{link=\"{label}\"{sep}{extra}}} {}\n", get(&l.counters).get()));
            }
        }
    }
    out
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

async fn serve_metrics(listener: async_net::TcpListener, links: Arc<[Arc<LinkState>]>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("metrics listener: accept failed: {e}");
                async_io::Timer::after(Duration::from_millis(50)).await;
                continue;
            }
        };
        let links = links.clone();
        smol::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let links = links.clone();
                async move {
                    let (status, body) = if req.uri().path() == "/metrics" {
                        (hyper::StatusCode::OK, render_metrics(&links))
                    } else {
                        (hyper::StatusCode::NOT_FOUND, "not found; try /metrics\n".to_string())
                    };
                    let mut r =
                        hyper::Response::new(http_body_util::Full::new(hyper::body::Bytes::from(body)));
                    *r.status_mut() = status;
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(smol_hyper::rt::SmolTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(smol_hyper::rt::FuturesIo::new(stream), service)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        })
        .detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_specs_are_checked() {
        let tcp = |h: &str, port| LinkSpec::Tcp { host: h.into(), port };
        assert_eq!(LinkSpec::parse("tcp:127.0.0.1:5555").unwrap(), tcp("127.0.0.1", 5555));
        assert_eq!(LinkSpec::parse("tcp:localhost:1").unwrap(), tcp("localhost", 1));
        assert_eq!(LinkSpec::parse("tcp:[::1]:5555").unwrap(), tcp("::1", 5555));
        assert_eq!(LinkSpec::parse("tcp:[::1]:5555").unwrap().to_string(), "tcp:[::1]:5555");
        assert_eq!(LinkSpec::parse("/dev/ttyUSB0").unwrap(), LinkSpec::Path("/dev/ttyUSB0".into()));
        let err = |s| LinkSpec::parse(s).unwrap_err();
        assert!(matches!(err("tcp:127.0.0.1:"), LinkSpecError::EmptyPort(_)));
        assert!(matches!(err("tcp:127.0.0.1"), LinkSpecError::NoPort(_)));
        assert!(matches!(err("tcp::5555"), LinkSpecError::EmptyHost(_)));
        assert!(matches!(err("tcp:h:0"), LinkSpecError::ZeroPort(_)));
        assert!(matches!(err("tcp:h:65536"), LinkSpecError::BadPort { .. }));
        assert!(std::error::Error::source(&err("tcp:h:x")).is_some());
        assert!(matches!(err("tcp:::1:5555"), LinkSpecError::Ipv6(_)));
        assert!(matches!(err("tcp:[nope]:5555"), LinkSpecError::Ipv6(_)));
        assert!(matches!(err(""), LinkSpecError::EmptyPath));
    }

    #[test]
    fn a_key_set_admits_known_keys_past_its_limit_and_no_new_ones() {
        let key = |s| leasehold_core::parse_key(s).unwrap();
        let mut keys = KeySet { keys: HashSet::new(), max: 2 };
        assert!(keys.admit(&key("a")) && keys.admit(&key("b")) && keys.admit(&key("a")));
        assert!(!keys.admit(&key("c")));
        assert!(keys.admit(&key("b")));
    }

    #[test]
    fn repeated_warnings_are_counted_and_summed_up_once_per_window() {
        let link = LinkState::new(LinkSpec::parse("tcp:h:1").unwrap());
        let header = |version| leasehold_serial::Header { version, seq: 1, device: 7 };
        for v in 2..=6 {
            link.warn(Warning::Frame(DecodeError::WrongVersion(header(v))));
        }
        link.warn(Warning::Frame(DecodeError::Cobs));
        assert_eq!(
            link.end_window(),
            ["link tcp:h:1: device 7 speaks protocol version 6 (this side speaks 1); answered with a version \
              mismatch (4 more in the last 10 s)"]
        );
        // A new window: the next one is logged at once, and nothing is left to sum up.
        link.warn(Warning::Frame(DecodeError::WrongVersion(header(2))));
        assert!(link.end_window().is_empty());
    }

    #[test]
    fn a_session_is_found_only_from_the_connection_that_opened_it() {
        let target =
            SessionsTarget::new("http://127.0.0.1:1".into(), None, Duration::from_secs(2), TlsConfig::new())
                .unwrap();
        let bindings = SessionBindings::default();
        let start = std::time::Instant::now();
        let bind = |s, conn| {
            let (ttl, keepalives) = (Duration::from_secs(2), Arc::new(target.client().unwrap()));
            let alive_until = certainly_expired_after(start, ttl);
            bindings.bind(SessionId(s), Binding { conn, hold: Duration::ZERO, keepalives, ttl, alive_until })
        };
        assert!(bind(1, 10) && bind(2, 10) && bind(3, 11));
        assert!(!bind(1, 11), "a second binding of a session");
        assert!(bindings.lookup(SessionId(1), 10, Fault::None).is_some());
        assert!(bindings.lookup(SessionId(1), 11, Fault::None).is_none());
        assert!(bindings.lookup(SessionId(4), 10, Fault::None).is_none());
        assert!(!bindings.unbind(SessionId(3), 10), "unbound from another connection");
        assert!(bindings.unbind(SessionId(3), 11));
        // Expired for certain only well past the ttl: 2 s · 1.25 + 1 s; a renewal moves it on.
        assert_eq!(bindings.prune(10, start + Duration::from_millis(3_400)), (0, 2));
        bindings.renewed(SessionId(1), 10, start + Duration::from_secs(2));
        assert_eq!(bindings.prune(10, start + Duration::from_millis(3_600)), (1, 1));
        assert!(bindings.lookup(SessionId(2), 10, Fault::None).is_none(), "the expired one went");
        assert!(bindings.lookup(SessionId(1), 10, Fault::None).is_some(), "the renewed one stayed");
        assert_eq!(bindings.drop_conn(10), 1);
        assert!(bindings.lookup(SessionId(1), 10, Fault::None).is_none());
        // Held for a quarter of the ttl, never past half the request timeout.
        assert_eq!(target.hold(leasehold_core::Duration::from_secs(4)), Duration::from_secs(1));
        assert_eq!(target.hold(leasehold_core::Duration::from_secs(60)), Duration::from_secs(1));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
