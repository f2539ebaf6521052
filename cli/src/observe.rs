//! `leasehold observe`: print a key's holder and each change of it, without polling.
//!
//! The observer is a protocol-v2 session of its own at the built-in server (or on etcd with
//! `--backend etcd`), which holds its keepalive open and answers it when the key changes
//! holder (on etcd: a watch of the key's queue). Leader election is `run` plus
//! `observe`: every candidate runs `leasehold run --protocol v2 --key K --value ADDR --
//! serve-as-leader`, and whoever needs the leader runs `leasehold observe --key K`, whose
//! latest line names it (with the value it set: its address).
//!
//! Exit codes: 0 after `--count` lines, or on SIGINT / SIGTERM / SIGHUP (the session closed
//! first); 2 usage or configuration error (bad key or URL, a refused token, an observer
//! refused for capacity). A server that cannot be reached is retried (said once on stderr
//! after 2 s).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use async_signal::{Signal as Caught, Signals};
use futures_lite::{future, StreamExt};
use leasehold_http::{BuiltinSessions, Observation, Options, Report, SessionClient};

use crate::run::BackendKind;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The key to follow.
    #[arg(long)]
    key: String,
    /// The built-in lease server (or the etcd endpoint).
    #[arg(long, env = "LEASEHOLD_SERVER", default_value = "http://127.0.0.1:7878")]
    server: String,
    /// Which kind of store `--server` is: the built-in server or etcd (DynamoDB has no
    /// sessions).
    #[arg(long, value_enum, default_value = "builtin")]
    backend: BackendKind,
    /// etcd: the prefix under which lease keys are stored (`run --prefix`).
    #[arg(long, visible_alias = "etcd-prefix", default_value = "leasehold/")]
    prefix: String,
    /// Bearer token, if the server requires one.
    #[arg(long, env = "LEASEHOLD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    tls: crate::TlsArgs,
    /// One JSON object per line: `{"key","holder":{"session","label","fence","value"}|null}`.
    #[arg(long)]
    json: bool,
    /// Exit after printing this many lines (the first is the holder now).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// The observer's session ttl: how long the server keeps it after this process vanishes.
    #[arg(long, default_value = "15s", value_parser = crate::duration)]
    ttl: Duration,
}

/// One change as `observe` prints it.
pub(crate) fn line(key: &str, o: &Observation, json: bool) -> String {
    match (o, json) {
        (Observation::Held { session, label, fence, value }, true) => serde_json::json!({
            "key": key,
            "holder": {"session": session, "label": label, "fence": fence.0, "value": value},
        })
        .to_string(),
        (Observation::Free, true) => serde_json::json!({"key": key, "holder": null}).to_string(),
        (Observation::Held { session, label, fence, value }, false) => {
            format!("{key}: held by {label} (session {session}) fence {} value {value:?}", fence.0)
        }
        (Observation::Free, false) => format!("{key}: free"),
    }
}

pub(crate) fn main(args: Args) -> ExitCode {
    if let Err(e) = leasehold_core::parse_key(&args.key) {
        eprintln!("leasehold observe: invalid key {:?}: {e}", args.key);
        return ExitCode::from(2);
    }
    let tls = match args.tls.config() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("leasehold observe: {e}");
            return ExitCode::from(2);
        }
    };
    let label = format!("observe:{}", crate::run::session_label());
    let label = &label[..label.len().min(leasehold_core::session::wire::MAX_LABEL_LEN)];
    let options = Options::session(args.ttl);
    let timeout = options.config.request_timeout.into();
    let client = match args.backend {
        BackendKind::Builtin => BuiltinSessions::new(&args.server, args.token.clone(), timeout)
            .map_err(|e| Report(&e).to_string())
            .and_then(|b| {
                SessionClient::new(b.with_tls(tls), label, options).map_err(|e| Report(&e).to_string())
            }),
        BackendKind::Etcd => leasehold_stores::EtcdSessions::new(&args.server, &args.prefix, timeout)
            .map_err(|e| Report(&e).to_string())
            .and_then(|b| {
                SessionClient::new(b.with_tls(tls), label, options).map_err(|e| Report(&e).to_string())
            }),
        BackendKind::Dynamodb => {
            Err("--backend dynamodb has no sessions to observe with (built-in server or etcd)".to_string())
        }
    };
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            eprintln!("leasehold observe: {e}");
            return ExitCode::from(2);
        }
    };
    let mut signals = match Signals::new([Caught::Term, Caught::Int, Caught::Hup]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("leasehold observe: cannot catch signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    smol::block_on(async {
        let mut changes = match client.observe(&args.key) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("leasehold observe: {}", Report(&e));
                return ExitCode::from(2);
            }
        };
        let heard = std::sync::atomic::AtomicBool::new(false);
        // Without a server the wait is silent; say once what it waits for.
        let waiting = async {
            async_io::Timer::after(Duration::from_secs(2)).await;
            if !heard.load(std::sync::atomic::Ordering::Relaxed) {
                eprintln!("leasehold observe: waiting for the server at {} (retrying)", args.server);
            }
            future::pending::<ExitCode>().await
        };
        let print = async {
            let mut printed = 0u64;
            let mut out = std::io::stdout();
            while args.count.is_none_or(|n| printed < n) {
                let Some(o) = changes.next().await else {
                    let why = changes.error().map(|e| Report(&e).to_string()).unwrap_or_default();
                    eprintln!("leasehold observe: the observation ended: {why}");
                    return ExitCode::from(2);
                };
                // A reader gone (a closed pipe) ends the observation.
                if writeln!(out, "{}", line(&args.key, &o, args.json)).and_then(|()| out.flush()).is_err() {
                    return ExitCode::FAILURE;
                }
                printed += 1;
                heard.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            ExitCode::SUCCESS
        };
        let print = future::or(print, waiting);
        let interrupted = async {
            let _ = signals.next().await;
            ExitCode::SUCCESS
        };
        let code = future::or(print, interrupted).await;
        drop(changes);
        // Closed rather than left to expire, so the server forgets the observer at once.
        client.close().await;
        code
    })
}
