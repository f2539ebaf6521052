//! Acquire+release throughput and latency, the built-in server and a real etcd side by side,
//! both durable (fsync before acknowledging). For the built-in server it also prints how many
//! requests each fsync carried (group commit), from the server's own metrics.
//!
//! ```text
//! cargo run --release -p leasehold-tests --example load -- [CLIENTS[,CLIENTS...]] [SECONDS]
//! cargo run --release -p leasehold-tests --example load -- 64 5        # 1 and 64 clients
//! cargo run --release -p leasehold-tests --example load -- 1,16,64,256 5
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
use leasehold_tests::load::{acquire_release, LoadReport};

fn run<B: Backend>(
    name: &str,
    backend: Arc<B>,
    clients: &[usize],
    secs: u64,
    commits: impl Fn() -> Option<u64>,
) -> Vec<LoadReport> {
    clients
        .iter()
        .map(|&c| {
            let before = commits();
            let r = smol::block_on(acquire_release(
                backend.clone(),
                &format!("{name}{c}"),
                c,
                Duration::from_secs(secs),
                LDuration::from_secs(30),
            ));
            // Each pair is two requests; an fsync covers every request in its group.
            let per_commit = match (before, commits()) {
                (Some(b), Some(a)) if a > b => format!("  {:.1} requests/fsync", 2.0 * r.pairs as f64 / (a - b) as f64),
                _ => String::new(),
            };
            println!(
                "{name:<8} clients {c:>3}: {:>8.0} acquire+release/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ({} pairs, {} errors){per_commit}",
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

    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::spawn(ServerConfig::new(dir.path().join("builtin"), "127.0.0.1:0".parse().unwrap()))
        .expect("server");
    println!("built-in: {} (redb, fsync before every reply, group commit)", server.url());
    let builtin =
        Arc::new(BuiltinBackend::new(&server.url(), None, Duration::from_secs(5)).expect("backend"));
    let port = server.addr().port();
    let b = run("builtin", builtin, &levels, secs, || {
        leasehold_test_servers::metric(port, "leasehold_commits_total")
    });

    if std::process::Command::new("etcd").arg("--version").output().is_err() {
        println!("etcd not installed (apt-get install etcd-server): no comparison");
        return;
    }
    let etcd = leasehold_test_servers::etcd();
    let backend = Arc::new(EtcdBackend::new(etcd.url(), "load/", Duration::from_secs(5)).expect("backend"));
    println!("etcd:     {} (its WAL fsyncs before acknowledging, default settings)", etcd.url());
    let e = run("etcd", backend, &levels, secs, || None);
    for (i, c) in levels.iter().enumerate() {
        println!("clients {c:>3}: built-in / etcd = {:.1}x", b[i].rate() / e[i].rate().max(1e-9));
    }
}
