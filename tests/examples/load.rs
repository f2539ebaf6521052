//! Acquire+release throughput and latency against the built-in server (durability on).
//!
//! `cargo run --release -p leasehold-tests --example load -- [CLIENTS] [SECONDS]`

use std::sync::Arc;
use std::time::Duration;

use leasehold_core::Duration as LDuration;
use leasehold_http::BuiltinBackend;
use leasehold_server::{Server, ServerConfig};
use leasehold_tests::load::acquire_release;

fn main() {
    let mut args = std::env::args().skip(1);
    let clients: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let secs: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let dir = tempfile::tempdir().expect("temp dir");
    let server =
        Server::spawn(ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap())).expect("server");
    let backend =
        Arc::new(BuiltinBackend::new(&server.url(), None, Duration::from_secs(5)).expect("backend"));
    println!(
        "built-in server {} on {} (fsync before every reply, group commit)",
        server.url(),
        dir.path().display()
    );
    for c in [1, clients] {
        let r = smol::block_on(acquire_release(
            backend.clone(),
            &format!("c{c}"),
            c,
            Duration::from_secs(secs),
            LDuration::from_secs(30),
        ));
        println!(
            "clients {c:>4}: {:>8.0} acquire+release/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ({} pairs, {} errors, {:.1}s)",
            r.rate(),
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.pairs,
            r.errors,
            r.elapsed.as_secs_f64()
        );
    }
}
