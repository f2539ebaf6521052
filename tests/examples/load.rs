//! Acquire+release throughput and latency, the built-in server and a real etcd side by side,
//! both durable (fsync before acknowledging).
//!
//! `cargo run --release -p leasehold-tests --example load -- [CLIENTS] [SECONDS]`
//! etcd is started on loopback if the `etcd` binary is installed (`apt-get install etcd-server`).

use std::sync::Arc;
use std::time::Duration;

use leasehold_core::Duration as LDuration;
use leasehold_http::{Backend, BuiltinBackend};
use leasehold_server::{Server, ServerConfig};
use leasehold_stores::EtcdBackend;
use leasehold_tests::load::{acquire_release, LoadReport};

fn run<B: Backend>(name: &str, backend: Arc<B>, clients: &[usize], secs: u64) -> Vec<LoadReport> {
    clients
        .iter()
        .map(|&c| {
            let r = smol::block_on(acquire_release(
                backend.clone(),
                &format!("{name}{c}"),
                c,
                Duration::from_secs(secs),
                LDuration::from_secs(30),
            ));
            println!(
                "{name:<8} clients {c:>3}: {:>8.0} acquire+release/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ({} pairs, {} errors)",
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
    let clients: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let secs: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let levels = [1, clients];

    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::spawn(ServerConfig::new(dir.path().join("builtin"), "127.0.0.1:0".parse().unwrap()))
        .expect("server");
    println!("built-in: {} (redb, fsync before every reply, group commit)", server.url());
    let builtin =
        Arc::new(BuiltinBackend::new(&server.url(), None, Duration::from_secs(5)).expect("backend"));
    let b = run("builtin", builtin, &levels, secs);

    if std::process::Command::new("etcd").arg("--version").output().is_err() {
        println!("etcd not installed (apt-get install etcd-server): no comparison");
        return;
    }
    let etcd = leasehold_test_servers::etcd();
    let backend = Arc::new(EtcdBackend::new(etcd.url(), "load/", Duration::from_secs(5)).expect("backend"));
    println!("etcd:     {} (its WAL fsyncs before acknowledging, default settings)", etcd.url());
    let e = run("etcd", backend, &levels, secs);
    for (i, c) in levels.iter().enumerate() {
        println!("clients {c:>3}: built-in / etcd = {:.1}x", b[i].rate() / e[i].rate().max(1e-9));
    }
}
