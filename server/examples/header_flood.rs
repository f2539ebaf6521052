//! RSS of an in-process server while 300 connections each send 300 KB of a request head that
//! never ends (issue 11, item 3).
//!
//! ```text
//! cargo run --release -p leasehold-server --example header_flood            # the 16 KiB default cap
//! cargo run --release -p leasehold-server --example header_flood -- 417792  # hyper's own default
//! ```
//!
//! The flood is written from this one thread with non-blocking sockets, so the figures are the
//! server's memory, not client thread stacks. Run each cap in its own process: freed memory is
//! not always returned to the system.

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use leasehold_server::{Server, ServerConfig};

const CONNECTIONS: usize = 300;
const HEAD_BYTES: usize = 300_000;

fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cap: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(16 * 1024);
    let dir = tempfile::tempdir()?;
    let mut config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse()?);
    config.max_header_bytes = cap;
    config.max_connections = 2 * CONNECTIONS;
    let server = Server::spawn(config)?;
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_kib("VmRSS:");

    let mut conns: Vec<(TcpStream, usize, bool)> = (0..CONNECTIONS)
        .map(|_| {
            let c = TcpStream::connect(server.addr()).expect("connect");
            c.set_nonblocking(true).expect("non-blocking");
            (c, 0, false)
        })
        .collect();
    for (c, _, _) in &mut conns {
        let _ = c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: ");
    }
    let chunk = [b'a'; 4096];
    let started = Instant::now();
    // Round-robin until every connection has sent its 300 KB or been closed by the server.
    while started.elapsed() < Duration::from_secs(60)
        && conns.iter().any(|(_, sent, done)| !done && *sent < HEAD_BYTES)
    {
        for (c, sent, done) in &mut conns {
            if *done || *sent >= HEAD_BYTES {
                continue;
            }
            match c.write(&chunk[..chunk.len().min(HEAD_BYTES - *sent)]) {
                Ok(n) => *sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => *done = true,
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(500));
    let during = rss_kib("VmRSS:");
    let closed = conns.iter().filter(|(_, _, done)| *done).count();
    let sent: usize = conns.iter().map(|(_, s, _)| s).sum();
    println!(
        "header cap {cap} B: RSS {:.1} MiB before, {:.1} MiB with {CONNECTIONS} endless heads \
         ({:.1} MB sent, {closed} connections cut off by the server), peak {:.1} MiB",
        before as f64 / 1024.0,
        during as f64 / 1024.0,
        sent as f64 / 1e6,
        rss_kib("VmHWM:") as f64 / 1024.0,
    );
    Ok(())
}
