//! The store file's size with 100,000 keys, over 3 restarts, and after the grants expire and
//! their records are reclaimed (issue 11, item 6).
//!
//! ```text
//! cargo run --release -p leasehold-server --example store_growth [-- KEYS]
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use leasehold_server::{RunningServer, Server, ServerConfig};

const TTL: Duration = Duration::from_secs(30);
const RECLAIM_AFTER: Duration = Duration::from_secs(2);
const CLIENTS: usize = 16;

/// One request on a kept-alive connection; the status and body.
fn call(
    conn: &mut BufReader<TcpStream>,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    // One write: split across writes, Nagle and delayed ACKs would add 40 ms per request.
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    conn.get_mut().write_all(request.as_bytes())?;
    let (mut status, mut len, mut line) = (0, 0, String::new());
    loop {
        line.clear();
        conn.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(s) = line.strip_prefix("HTTP/1.1 ") {
            status = s.get(..3).and_then(|s| s.parse().ok()).unwrap_or(0);
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    conn.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn connect(addr: SocketAddr) -> BufReader<TcpStream> {
    BufReader::new(TcpStream::connect(addr).expect("connect"))
}

fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (_, text) = call(&mut connect(addr), "GET", "/metrics", "").expect("metrics");
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0)
}

/// A server that reclaims idle keys every `reclaim_after`, or never.
fn start(dir: &std::path::Path, reclaim_after: Option<Duration>) -> RunningServer {
    let mut config = ServerConfig::new(dir, "127.0.0.1:0".parse().expect("address"));
    config.reclaim_after = reclaim_after;
    Server::spawn(config).expect("server starts")
}

fn main() {
    let keys: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("leases.redb");
    let mib = || std::fs::metadata(&file).map(|m| m.len() as f64 / (1024.0 * 1024.0)).unwrap_or(0.0);

    // No reclaiming until the last restart: every record is counted in the sizes until then.
    let server = start(dir.path(), None);
    let addr = server.addr();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for c in 0..CLIENTS {
            scope.spawn(move || {
                let mut conn = connect(addr);
                for i in (c..keys).step_by(CLIENTS) {
                    let body =
                        format!(r#"{{"id":1,"owner":{c},"op":{{"acquire":{{"ttl":{}}}}}}}"#, TTL.as_micros());
                    let (status, reply) =
                        call(&mut conn, "POST", &format!("/v1/leases/key-{i}"), &body).expect("acquire");
                    assert_eq!(status, 200, "{reply}");
                }
            });
        }
    });
    println!("{keys} keys held (ttl {TTL:?}) in {:.1?}: {:.2} MiB", started.elapsed(), mib());
    drop(server);
    println!("after a clean stop: {:.2} MiB", mib());
    let mut server = None;
    for n in 1..=3 {
        drop(server.take());
        let t = Instant::now();
        server = Some(start(dir.path(), (n == 3).then_some(RECLAIM_AFTER)));
        println!("restart {n} (re-arms every grant, compacts) in {:.1?}: {:.2} MiB", t.elapsed(), mib());
    }
    let addr = server.as_ref().expect("running").addr();
    let waited = Instant::now();
    while call(&mut connect(addr), "GET", "/v1/leases", "").expect("list").1 != r#"{"leases":[]}"# {
        assert!(waited.elapsed() < TTL + 30 * RECLAIM_AFTER, "not all keys reclaimed");
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "all grants expired and reclaimed ({:.1?} after the last restart; fence floor {}): {:.2} MiB",
        waited.elapsed(),
        metric(addr, "leasehold_store_fence_floor"),
        mib()
    );
}
