//! Acquire+release throughput and latency, the built-in server and a real etcd side by side,
//! both durable (fsync before acknowledging).
//!
//! `cargo run --release -p leasehold-tests --example load -- [CLIENTS] [SECONDS]`
//! etcd is started on loopback if the `etcd` binary is installed (`apt-get install etcd-server`).

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
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

    let (cp, pp) = (free_port(), free_port());
    let (c, p) = (format!("http://127.0.0.1:{cp}"), format!("http://127.0.0.1:{pp}"));
    let etcd = Command::new("etcd")
        .arg("--data-dir")
        .arg(dir.path().join("etcd"))
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
        .args([
            "--listen-peer-urls",
            &p,
            "--initial-advertise-peer-urls",
            &p,
            "--initial-cluster",
            &format!("default={p}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut etcd) = etcd else {
        println!("etcd not installed (apt-get install etcd-server): no comparison");
        return;
    };
    let backend = Arc::new(EtcdBackend::new(&c, "load/", Duration::from_secs(5)).expect("backend"));
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", cp)).is_err()
        && started.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    println!("etcd:     {c} (its WAL fsyncs before acknowledging, default settings)");
    let e = run("etcd", backend, &levels, secs);
    let _ = etcd.kill();
    let _ = etcd.wait();
    for (i, c) in levels.iter().enumerate() {
        println!("clients {c:>3}: built-in / etcd = {:.1}x", b[i].rate() / e[i].rate().max(1e-9));
    }
}
