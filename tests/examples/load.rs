//! Acquire+release throughput and latency, the built-in server (protocol v1 and v2) and a real
//! etcd side by side, all durable (fsync before acknowledging). For the built-in server it also
//! prints how many requests each fsync carried (group commit), from the server's own metrics.
//!
//! v1 and etcd are driven through the [`Backend`] trait (one request per acquire, one per
//! release); v2 through [`leasehold_http::SessionClient`]'s public API, one session per client
//! (see [`session_acquire_release`]), so its figure includes the session client's own work.
//!
//! ```text
//! cargo run --release -p leasehold-tests --example load -- [CLIENTS[,CLIENTS...]] [SECONDS]
//! cargo run --release -p leasehold-tests --example load -- 64 5        # 1 and 64 clients
//! cargo run --release -p leasehold-tests --example load -- 1,16,64,256 5
//! cargo run --release -p leasehold-tests --example load -- 64 5 v2      # only some: v1,v2,etcd
//! LOAD_SERVER_THREADS=2 cargo run --release -p leasehold-tests --example load -- 64 5
//! ```
//!
//! etcd is started on loopback if the `etcd` binary is installed (`apt-get install
//! etcd-server`). The generator only knows the [`leasehold_http::Backend`] trait, so any
//! store is measured the same way.

use std::sync::Arc;
use std::time::Duration;

use leasehold_core::Duration as LDuration;
use leasehold_http::{Backend, BuiltinBackend};
use leasehold_server::{Server, ServerConfig};
use leasehold_stores::EtcdBackend;
use leasehold_tests::load::{acquire_release, session_acquire_release, LoadReport};

/// Measures each level of `clients` with `measure` and prints a line for it. `commits` reads
/// the server's fsync counter for the protocol measured, if it has one.
fn run(
    name: &str,
    clients: &[usize],
    measure: impl Fn(usize) -> LoadReport,
    commits: impl Fn() -> Option<u64>,
) -> Vec<LoadReport> {
    clients
        .iter()
        .map(|&c| {
            let before = commits();
            let r = measure(c);
            // Each pair is two requests; an fsync covers every request in its group.
            let per_commit = match (before, commits()) {
                (Some(b), Some(a)) if a > b => format!("  {:.1} requests/fsync", 2.0 * r.pairs as f64 / (a - b) as f64),
                _ => String::new(),
            };
            println!(
                "{name:<11} clients {c:>3}: {:>8.0} acquire+release/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ({} pairs, {} errors){per_commit}",
                r.rate(),
                r.p50.as_secs_f64() * 1e3,
                r.p99.as_secs_f64() * 1e3,
                r.pairs,
                r.errors
            );
            r
        })
        .collect()
}

/// [`acquire_release`] against `backend` at `c` clients.
fn raw<B: Backend>(backend: Arc<B>, name: &str, secs: u64) -> impl Fn(usize) -> LoadReport {
    let name = name.to_string();
    move |c| {
        smol::block_on(acquire_release(
            backend.clone(),
            &format!("{name}{c}"),
            c,
            Duration::from_secs(secs),
            LDuration::from_secs(30),
        ))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let levels: Vec<usize> = match args.next() {
        Some(list) if list.contains(',') => {
            list.split(',').map(|c| c.trim().parse().expect("CLIENTS: numbers separated by commas")).collect()
        }
        Some(n) => vec![1, n.parse().expect("CLIENTS: a number")],
        None => vec![1, 64],
    };
    let secs: u64 = args.next().map(|a| a.parse().expect("SECONDS: a number")).unwrap_or(5);
    let only = args.next().unwrap_or_else(|| "v1,v2,etcd".into());
    let wanted = |what: &str| only.split(',').any(|w| w.trim() == what);

    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = ServerConfig::new(dir.path().join("builtin"), "127.0.0.1:0".parse().unwrap());
    // LOAD_SERVER_THREADS=N serves connections on N threads (one by default).
    if let Some(n) = std::env::var("LOAD_SERVER_THREADS").ok().and_then(|n| n.parse().ok()) {
        config.threads = n;
    }
    let threads = config.threads;
    let server = Server::spawn(config).expect("server");
    println!("built-in: {} (redb, fsync before every reply, group commit, {threads} threads)", server.url());
    let port = server.addr().port();
    let v1 = wanted("v1").then(|| {
        let builtin =
            Arc::new(BuiltinBackend::new(&server.url(), None, Duration::from_secs(5)).expect("backend"));
        run("builtin v1", &levels, raw(builtin, "v1-", secs), || {
            leasehold_test_servers::metric(port, "leasehold_commits_total")
        })
    });
    let url = server.url();
    let v2 = wanted("v2").then(|| {
        run(
            "builtin v2",
            &levels,
            |c| {
                smol::block_on(session_acquire_release(
                    &url,
                    &format!("v2-{c}"),
                    c,
                    Duration::from_secs(secs),
                    Duration::from_secs(30),
                ))
                .expect("session clients")
            },
            || leasehold_test_servers::metric(port, "leasehold_session_commits_total"),
        )
    });

    if !wanted("etcd") {
        return;
    }
    if std::process::Command::new("etcd").arg("--version").output().is_err() {
        println!("etcd not installed (apt-get install etcd-server): no comparison");
        return;
    }
    let etcd = leasehold_test_servers::etcd();
    let backend = Arc::new(EtcdBackend::new(etcd.url(), "load/", Duration::from_secs(5)).expect("backend"));
    println!("etcd:     {} (its WAL fsyncs before acknowledging, default settings)", etcd.url());
    let e = run("etcd", &levels, raw(backend, "etcd-", secs), || None);
    for (i, c) in levels.iter().enumerate() {
        let etcd = e[i].rate().max(1e-9);
        let mut line = format!("clients {c:>3}:");
        if let Some(v1) = &v1 {
            line += &format!(" built-in v1 / etcd = {:.1}x", v1[i].rate() / etcd);
        }
        if let Some(v2) = &v2 {
            line += &format!(" built-in v2 / etcd = {:.1}x", v2[i].rate() / etcd);
        }
        if let (Some(v1), Some(v2)) = (&v1, &v2) {
            line += &format!(" v2 / v1 = {:.2}", v2[i].rate() / v1[i].rate().max(1e-9));
        }
        println!("{line}");
    }
}
