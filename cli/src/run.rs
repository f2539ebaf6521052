//! `leasehold run`: hold a lease while a command runs.
//!
//! Exit codes: the command's own code when it finishes; 128+N when it died of signal N;
//! 75 when the lease could not be acquired (held, timed out, or server unreachable); 76 when
//! the lease was lost while the command ran (the command was sent SIGTERM, then SIGKILL after
//! the grace period); 126/127 when the command could not be started; 2 for usage and configuration
//! errors (a refused certificate or missing credentials is reported at once, not retried).
//!
//! Signals: SIGTERM and SIGHUP are passed on to the command; SIGINT is not, because Ctrl-C on
//! a terminal already reached the whole foreground process group, command included. Either
//! way `run` waits for the command to exit and then releases the lease at once, so the next
//! holder need not wait out the ttl. A signal while waiting for the lease cancels the wait and
//! exits 128+N once any grant that raced it is released.

use std::io::IsTerminal;
use std::num::NonZeroU16;
use std::process::ExitCode;
use std::time::Duration;

use async_signal::{Signal as Caught, Signals};
use futures_lite::{future, StreamExt};
use leasehold_http::{
    AcquireError, Backend, BuiltinBackend, BuiltinSessions, Client, Lease, Options, Report, SessionBackend,
    SessionClient, TransportError, Waiting,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The lease could not be acquired.
pub(crate) const EXIT_NOT_ACQUIRED: u8 = 75;
/// The lease was lost while the command ran.
pub(crate) const EXIT_LOST: u8 = 76;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The lease key.
    #[arg(long)]
    key: String,
    /// Lease time-to-live; renewed every third of it while the command runs.
    #[arg(long, default_value = "15s", value_parser = crate::duration)]
    ttl: Duration,
    /// The lease server (or the etcd / DynamoDB endpoint).
    #[arg(long, env = "LEASEHOLD_SERVER", default_value = "http://127.0.0.1:7878")]
    server: String,
    /// Which kind of store `--server` is.
    #[arg(long, value_enum, default_value = "builtin")]
    backend: BackendKind,
    /// The protocol: `v2` (the default on the built-in server and etcd) holds the key in a
    /// session, waits FIFO and is pushed the key when its turn comes (on DynamoDB: polls with
    /// jitter, no FIFO); `v1` (the default on DynamoDB) renews each key on its own and polls
    /// while it waits. On the built-in server the two share one namespace (a key held under one
    /// is busy under the other, fences increase across both), and on DynamoDB they share the
    /// items; on etcd they do not (`PREFIX` and `PREFIX`v2/), so every contender for a key
    /// there must use the same one.
    #[arg(long, value_enum, env = "LEASEHOLD_PROTOCOL")]
    protocol: Option<Protocol>,
    /// Let up to N contenders hold the key at once, each under its own fence (a semaphore,
    /// like `consul lock -n`); the rest wait FIFO for a slot. Needs protocol v2. Every
    /// contender of the key must give the same N (exit 2 otherwise).
    #[arg(long, value_name = "N")]
    limit: Option<NonZeroU16>,
    /// etcd: the prefix under which lease keys are stored.
    #[arg(long, visible_alias = "etcd-prefix", default_value = "leasehold/")]
    prefix: String,
    /// DynamoDB: the table (partition key `key`, string).
    #[arg(long, default_value = "leases")]
    table: String,
    /// Bearer token, if the server requires one.
    #[arg(long, env = "LEASEHOLD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    tls: crate::TlsArgs,
    /// Wait for the lease if it is held (the default).
    #[arg(long, overrides_with = "no_wait")]
    wait: bool,
    /// Fail at once (exit 75) if the lease is held.
    #[arg(long)]
    no_wait: bool,
    /// Give up waiting after this long (exit 75).
    #[arg(long, value_parser = crate::duration)]
    timeout: Option<Duration>,
    /// After SIGTERM on loss, wait this long before SIGKILL.
    #[arg(long, default_value = "5s", value_parser = crate::duration)]
    grace: Duration,
    /// With protocol v2: what observers of the key (`leasehold observe`) are told with the
    /// holder while this run holds it, such as the address where it serves as leader. At most
    /// 64 bytes of printable ASCII.
    #[arg(long, value_name = "STR")]
    value: Option<String>,
    /// Clock-rate bound ε between this host and the server, in parts per million.
    #[arg(long, default_value_t = 10_000)]
    drift_ppm: u32,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Where leases live.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum BackendKind {
    /// The built-in server (`leasehold serve`).
    Builtin,
    /// An etcd cluster's v3 JSON gateway (`--server http://HOST:2379`).
    Etcd,
    /// A DynamoDB table (`--server` is the endpoint; credentials and region from AWS_*).
    Dynamodb,
}

/// The protocol of `run` (built-in server and etcd).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Protocol {
    /// One lease per key, renewed on its own; waiting polls with backoff.
    V1,
    /// Sessions: FIFO waiting with pushed grants.
    V2,
}

impl Protocol {
    /// `asked`, or the backend's default: v2 where sessions are served (the built-in server,
    /// etcd), v1 on DynamoDB, which has no sessions yet.
    pub(crate) fn or_default_for(asked: Option<Protocol>, backend: BackendKind) -> Protocol {
        asked.unwrap_or(match backend {
            BackendKind::Builtin | BackendKind::Etcd => Protocol::V2,
            BackendKind::Dynamodb => Protocol::V1,
        })
    }
}

/// What `run` needs from a client, whichever protocol it speaks.
trait Leases {
    async fn try_acquire(&self, key: &str) -> Result<Lease, AcquireError>;
    async fn acquire_reporting(
        &self,
        key: &str,
        timeout: Option<Duration>,
        report: impl FnMut(&Waiting) + Send,
    ) -> Result<Lease, AcquireError>;
    /// Lets background releases reach the authority before the process exits.
    async fn finish(&self);
}

impl<B: Backend> Leases for Client<B> {
    async fn try_acquire(&self, key: &str) -> Result<Lease, AcquireError> {
        Client::try_acquire(self, key).await
    }
    async fn acquire_reporting(
        &self,
        key: &str,
        timeout: Option<Duration>,
        report: impl FnMut(&Waiting) + Send,
    ) -> Result<Lease, AcquireError> {
        Client::acquire_reporting(self, key, timeout, report).await
    }
    async fn finish(&self) {
        self.wait_idle().await
    }
}

/// A session client asking for one of `limit` slots of the key (1: the key itself).
struct Slots {
    client: SessionClient,
    limit: NonZeroU16,
}

impl Leases for Slots {
    async fn try_acquire(&self, key: &str) -> Result<Lease, AcquireError> {
        self.client.try_acquire_with_limit(key, self.limit).await
    }
    async fn acquire_reporting(
        &self,
        key: &str,
        timeout: Option<Duration>,
        report: impl FnMut(&Waiting) + Send,
    ) -> Result<Lease, AcquireError> {
        self.client.acquire_reporting_with_limit(key, self.limit, timeout, report).await
    }
    async fn finish(&self) {
        self.client.wait_idle().await;
        // Closed rather than left to expire, so the server forgets it at once.
        self.client.close().await
    }
}

/// A session client whose acquisitions carry a value for the key's observers.
struct Valued {
    client: SessionClient,
    value: String,
}

impl Leases for Valued {
    async fn try_acquire(&self, key: &str) -> Result<Lease, AcquireError> {
        self.client.try_acquire_with_value(key, &self.value).await
    }
    async fn acquire_reporting(
        &self,
        key: &str,
        timeout: Option<Duration>,
        report: impl FnMut(&Waiting) + Send,
    ) -> Result<Lease, AcquireError> {
        self.client.acquire_with_value(key, &self.value, timeout, report).await
    }
    async fn finish(&self) {
        self.client.wait_idle().await;
        self.client.close().await
    }
}

/// The session's public label: this host and process, as status pages show the holder.
pub(crate) fn session_label() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host.trim().chars().filter(|c| (' '..='~').contains(c)).collect();
    let pid = format!(":{}", std::process::id());
    let room = leasehold_core::session::wire::MAX_LABEL_LEN - pid.len();
    let host = if host.is_empty() { "leasehold-run".to_string() } else { host };
    format!("{}{pid}", &host[..host.len().min(room)])
}

pub(crate) fn main(args: Args) -> ExitCode {
    let protocol = Protocol::or_default_for(args.protocol, args.backend);
    let mut options = Options::new(args.ttl);
    options.config.drift = leasehold_core::Drift::from_ppm(args.drift_ppm);
    let timeout: Duration = options.config.request_timeout.into();
    let tls = match args.tls.config() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("leasehold run: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(value) = &args.value {
        if protocol != Protocol::V2 || matches!(args.backend, BackendKind::Dynamodb) {
            eprintln!(
                "leasehold run: --value needs protocol v2 on the built-in server or etcd (observers are a session feature)"
            );
            return ExitCode::from(2);
        }
        if let Err(e) = leasehold_core::session::wire::parse_value(value) {
            eprintln!("leasehold run: --value {value:?}: {e}");
            return ExitCode::from(2);
        }
    }
    if args.limit.is_some() && protocol != Protocol::V2 {
        eprintln!(
            "leasehold run: --limit needs protocol v2 (semaphores are held in sessions), not --protocol v1"
        );
        return ExitCode::from(2);
    }
    if args.limit.is_some_and(|n| n.get() > 1) && args.value.is_some() {
        eprintln!("leasehold run: --value is for a key with one holder, not with --limit above 1");
        return ExitCode::from(2);
    }
    if args.limit.is_some_and(|n| n.get() > 1) && matches!(args.backend, BackendKind::Dynamodb) {
        eprintln!("leasehold run: --limit above 1 is for the built-in server and etcd (DynamoDB has no semaphores yet)");
        return ExitCode::from(2);
    }
    smol::block_on(async {
        match args.backend {
            BackendKind::Builtin if protocol == Protocol::V2 => {
                let backend =
                    BuiltinSessions::new(&args.server, args.token.clone(), timeout).map(|b| b.with_tls(tls));
                run_session(args, backend).await
            }
            BackendKind::Etcd if protocol == Protocol::V2 => {
                let backend = leasehold_stores::EtcdSessions::new(&args.server, &args.prefix, timeout)
                    .map(|b| b.with_tls(tls));
                run_session(args, backend).await
            }
            BackendKind::Dynamodb if protocol == Protocol::V2 => {
                // The same config run_session gives the holder: the waiter's ε is the holder's.
                let mut config = Options::session(args.ttl).config;
                config.drift = leasehold_core::Drift::from_ppm(args.drift_ppm);
                let backend = leasehold_stores::DynamoSessions::from_env(&args.server, &args.table, &config)
                    .map(|b| b.with_tls(tls));
                run_session(args, backend).await
            }
            BackendKind::Builtin => {
                let b =
                    BuiltinBackend::new(&args.server, args.token.clone(), timeout).map(|b| b.with_tls(tls));
                run(args, options, b).await
            }
            BackendKind::Etcd => {
                let b = leasehold_stores::EtcdBackend::new(&args.server, &args.prefix, timeout)
                    .map(|b| b.with_tls(tls));
                run(args, options, b).await
            }
            BackendKind::Dynamodb => {
                let b = leasehold_stores::DynamoDbBackend::from_env(&args.server, &args.table, timeout)
                    .map(|b| b.with_tls(tls));
                run(args, options, b).await
            }
        }
    })
}

/// `run --protocol v2`: the key in a session, on whichever store carries it.
async fn run_session(args: Args, backend: Result<impl SessionBackend, TransportError>) -> ExitCode {
    let mut options = Options::session(args.ttl);
    options.config.drift = leasehold_core::Drift::from_ppm(args.drift_ppm);
    let client = backend
        .map_err(|e| Report(&e).to_string())
        .and_then(|b| SessionClient::new(b, &session_label(), options).map_err(|e| Report(&e).to_string()));
    let limit = args.limit.unwrap_or(NonZeroU16::MIN);
    match client {
        Ok(client) => match args.value.clone() {
            Some(value) => run_with(args, Valued { client, value }).await,
            None => run_with(args, Slots { client, limit }).await,
        },
        Err(e) => {
            eprintln!("leasehold run: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run<B: Backend>(args: Args, options: Options, backend: Result<B, TransportError>) -> ExitCode {
    let backend = match backend {
        Ok(b) => b,
        Err(e) => {
            eprintln!("leasehold run: {e}");
            return ExitCode::from(2);
        }
    };
    match Client::new(backend, options) {
        Ok(c) => run_with(args, c).await,
        Err(e) => {
            eprintln!("leasehold run: bad lease timing: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run_with(args: Args, client: impl Leases) -> ExitCode {
    // Installed before the first request, so no signal finds a grant without its release.
    let mut signals = match Signals::new([Caught::Term, Caught::Int, Caught::Hup]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("leasehold run: cannot catch signals: {e}");
            return ExitCode::FAILURE;
        }
    };

    let spinner = (!args.no_wait && std::io::stderr().is_terminal()).then(|| {
        let s = indicatif::ProgressBar::new_spinner();
        s.set_message(format!("waiting for lease {:?} on {}", args.key, args.server));
        s.enable_steady_tick(Duration::from_millis(120));
        s
    });
    // What the wait is for, said on stderr whether or not it is a terminal: a key held by
    // someone else and a server that cannot be reached call for different actions.
    let mut said = None;
    let report = |w: &Waiting| {
        let (kind, line) = waiting_line(w);
        match &spinner {
            Some(s) => s.set_message(format!("lease {:?} on {}: {line}", args.key, args.server)),
            // A pipe gets a line only when the story changes, not at every poll.
            None if said.as_deref() != Some(kind.as_str()) => {
                eprintln!("leasehold run: waiting for {:?} on {}: {line}", args.key, args.server);
                said = Some(kind);
            }
            None => {}
        }
    };
    let acquire = async {
        Ok(match (args.no_wait, args.timeout) {
            (true, _) => client.try_acquire(&args.key).await,
            (false, timeout) => client.acquire_reporting(&args.key, timeout, report).await,
        })
    };
    let acquired = future::or(acquire, async { Err(next_signal(&mut signals).await) }).await;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let acquired = match acquired {
        Ok(a) => a,
        Err(sig) => {
            // Dropping the acquisition cancelled it; a grant already on its way is released by
            // the client's driver. A second signal does not wait for that.
            tracing::info!(key = %args.key, "signal {sig} while waiting; cancelling");
            future::or(client.finish(), async {
                next_signal(&mut signals).await;
            })
            .await;
            return ExitCode::from(128u8.saturating_add(sig as u8));
        }
    };
    let lease = match acquired {
        Ok(l) => l,
        Err(e) => {
            let why = match &e {
                AcquireError::Busy => "it is held by someone else".to_string(),
                other => Report(other).to_string(),
            };
            eprintln!("leasehold run: could not acquire {:?}: {why}", args.key);
            if e == AcquireError::Busy {
                // The authority answered, so it hears the close at once: a v2 session (an etcd
                // lease) is gone now rather than at the end of its ttl.
                client.finish().await;
            }
            return ExitCode::from(match e {
                AcquireError::InvalidKey(_)
                | AcquireError::InvalidValue(_)
                | AcquireError::Rejected(_)
                | AcquireError::Misconfigured(_) => 2,
                _ => EXIT_NOT_ACQUIRED,
            });
        }
    };
    let fence = lease.fence().map(|f| f.0).unwrap_or(0);
    tracing::info!(key = %args.key, fence, "acquired");

    let mut child = match async_process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .env("LEASEHOLD_FENCE", fence.to_string())
        .env("LEASEHOLD_KEY", &args.key)
        .env("LEASEHOLD_OWNER", lease.owner().to_string())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("leasehold run: cannot start {:?}: {e}", args.command[0]);
            release(lease).await;
            client.finish().await;
            return ExitCode::from(if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 });
        }
    };
    let pid = Pid::from_raw(child.id() as i32);

    enum Outcome {
        Exited(std::io::Result<std::process::ExitStatus>),
        Lost(leasehold_http::LostReason),
    }
    let outcome = loop {
        let ended = future::or(async { Outcome::Exited(child.status().await) }, async {
            Outcome::Lost(lease.lost().await)
        });
        let signalled = async { Err(next_signal(&mut signals).await) };
        let sig = match future::or(async { Ok(ended.await) }, signalled).await {
            Ok(outcome) => break outcome,
            Err(sig) => sig,
        };
        if sig == Caught::Int as i32 {
            tracing::info!("SIGINT: waiting for the command to exit, then releasing");
        } else {
            tracing::info!("signal {sig}: passing it on to the command, then releasing");
            if let Ok(sig) = Signal::try_from(sig) {
                let _ = kill(pid, sig);
            }
        }
    };
    match outcome {
        Outcome::Exited(status) => {
            release(lease).await;
            client.finish().await;
            exit_code(status)
        }
        Outcome::Lost(reason) => {
            eprintln!("leasehold run: lease {:?} lost ({reason}); stopping the command", args.key);
            let _ = kill(pid, Signal::SIGTERM);
            let grace = args.grace;
            let exited = future::or(async { child.status().await.ok() }, async {
                async_io::Timer::after(grace).await;
                None
            })
            .await;
            if exited.is_none() {
                eprintln!("leasehold run: command ignored SIGTERM for {grace:?}; sending SIGKILL");
                let _ = kill(pid, Signal::SIGKILL);
                let _ = child.status().await;
            }
            ExitCode::from(EXIT_LOST)
        }
    }
}

/// The next caught signal's number. A broken signal pipe never resolves: the command's exit
/// or the lease's loss still ends the wait.
async fn next_signal(signals: &mut Signals) -> i32 {
    match signals.next().await {
        Some(Ok(sig)) => sig as i32,
        _ => future::pending().await,
    }
}

fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => ExitCode::from(c as u8),
            (None, Some(sig)) => ExitCode::from(128u8.saturating_add(sig as u8)),
            _ => ExitCode::FAILURE,
        },
        Err(_) => ExitCode::FAILURE,
    }
}

/// Gives the lease back; the command's exit code stands either way, but a release that never
/// reached the authority is worth a line: the key frees only when the grant expires.
async fn release(lease: leasehold_http::Lease) {
    if let Err(e) = lease.release().await {
        eprintln!("leasehold run: {}", leasehold_http::Report(&e));
    }
}

/// What a waiting acquisition is up against: a kind (a line is printed when it changes) and
/// the line.
fn waiting_line(w: &Waiting) -> (String, String) {
    match w {
        Waiting::Held { expires_in: Some(d) } => (
            "held".into(),
            format!(
                "held by someone else (its grant runs out within {:.1} s unless renewed)",
                d.as_secs_f64()
            ),
        ),
        Waiting::Unreachable(Some(e)) => {
            let e = Report(e).to_string();
            (format!("unreachable: {e}"), format!("server unreachable ({e}); retrying"))
        }
        Waiting::Unreachable(None) => {
            ("unavailable".into(), "the server answers that it cannot serve now; retrying".into())
        }
        _ => ("held".into(), "held by someone else".into()),
    }
}
