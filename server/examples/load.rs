//! Load figures for a lease store: N concurrent clients, each doing acquire + release on a key
//! of its own, for a few seconds; prints pairs per second and latency percentiles.
//!
//! ```text
//! cargo run --release -p leasehold-server --example load -- --clients 1,16,64 --seconds 5
//! cargo run --release -p leasehold-server --example load -- --url http://127.0.0.1:7878
//! ```
//!
//! Without `--url` it starts the built-in server in this process on loopback, with its store in
//! a temporary directory (or `--data DIR`), durability on (fsync before every reply, commits
//! grouped). The client side only knows [`LeaseStore`]/[`LeaseConn`], so another store (etcd,
//! DynamoDB) is measured by implementing those two traits.

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use leasehold_core::{Duration as LDuration, Op, OwnerId, Reply, Request, RequestId, Response};
use leasehold_server::{Server, ServerConfig};
use smol_hyper::rt::FuturesIo;

/// A lease store the load runs against: hands out one connection per client.
trait LeaseStore {
    /// One client's connection.
    type Conn: LeaseConn;
    /// Opens a connection for one client.
    async fn connect(&self) -> Result<Self::Conn, String>;
}

/// The two operations measured, as one client sees them.
trait LeaseConn {
    /// Acquires `key` for `owner`; the fence on success, an error for anything but a grant.
    async fn acquire(&mut self, key: &str, owner: u64, ttl: Duration) -> Result<u64, String>;
    /// Releases `key` held by `owner` with `fence`.
    async fn release(&mut self, key: &str, owner: u64, fence: u64) -> Result<(), String>;
}

/// The built-in server's HTTP API over one keep-alive connection per client.
struct Builtin {
    addr: std::net::SocketAddr,
    authority: String,
}

struct BuiltinConn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    authority: String,
    next_id: u32,
}

impl LeaseStore for Builtin {
    type Conn = BuiltinConn;
    async fn connect(&self) -> Result<BuiltinConn, String> {
        let stream = async_net::TcpStream::connect(self.addr).await.map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) =
            hyper::client::conn::http1::handshake(FuturesIo::new(stream)).await.map_err(|e| e.to_string())?;
        smol::spawn(async move {
            let _ = conn.await;
        })
        .detach();
        Ok(BuiltinConn { sender, authority: self.authority.clone(), next_id: 0 })
    }
}

impl BuiltinConn {
    async fn call(&mut self, key: &str, owner: u64, op: Op) -> Result<Reply, String> {
        self.next_id = self.next_id.wrapping_add(1);
        let request = Request { id: RequestId(self.next_id), owner: OwnerId(owner), op };
        let body = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
        let req = hyper::Request::post(format!("/v1/leases/{key}"))
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let resp = self.sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        if status != hyper::StatusCode::OK {
            return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
        }
        let r: Response = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        Ok(r.reply)
    }
}

impl LeaseConn for BuiltinConn {
    async fn acquire(&mut self, key: &str, owner: u64, ttl: Duration) -> Result<u64, String> {
        match self
            .call(key, owner, Op::Acquire { ttl: LDuration::from_micros(ttl.as_micros() as u64) })
            .await?
        {
            Reply::Granted { fence, .. } => Ok(fence.0),
            other => Err(format!("acquire answered {other:?}")),
        }
    }
    async fn release(&mut self, key: &str, owner: u64, fence: u64) -> Result<(), String> {
        match self.call(key, owner, Op::Release { fence: leasehold_core::Fence(fence) }).await? {
            Reply::Released => Ok(()),
            other => Err(format!("release answered {other:?}")),
        }
    }
}

/// Latencies of one client, in microseconds.
#[derive(Default)]
struct Samples {
    acquire: Vec<u32>,
    release: Vec<u32>,
    pair: Vec<u32>,
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

async fn client<S: LeaseStore>(
    store: &S,
    key: String,
    owner: u64,
    until: Instant,
) -> Result<Samples, String> {
    let mut conn = store.connect().await?;
    let mut s = Samples::default();
    while Instant::now() < until {
        let t0 = Instant::now();
        let fence = conn.acquire(&key, owner, Duration::from_secs(10)).await?;
        let t1 = Instant::now();
        conn.release(&key, owner, fence).await?;
        let t2 = Instant::now();
        s.acquire.push(micros(t1 - t0));
        s.release.push(micros(t2 - t1));
        s.pair.push(micros(t2 - t0));
    }
    Ok(s)
}

/// Runs `clients` concurrent clients on distinct keys for `secs`; returns their samples and the
/// wall time the run took.
fn run<S: LeaseStore>(
    store: &S,
    run_id: usize,
    clients: usize,
    secs: f64,
) -> Result<(Samples, Duration), String> {
    let ex = smol::LocalExecutor::new();
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(secs);
    let results = smol::block_on(ex.run(async {
        let tasks: Vec<_> = (0..clients)
            .map(|c| ex.spawn(client(store, format!("load-{run_id}-{c}"), c as u64 + 1, until)))
            .collect();
        let mut out = Vec::with_capacity(clients);
        for t in tasks {
            out.push(t.await);
        }
        out
    }));
    let elapsed = started.elapsed();
    let mut all = Samples::default();
    for r in results {
        let s = r?;
        all.acquire.extend(s.acquire);
        all.release.extend(s.release);
        all.pair.extend(s.pair);
    }
    Ok((all, elapsed))
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

/// `leasehold_commits_total` from the built-in server's metrics, for the group-commit ratio.
fn commits(addr: std::net::SocketAddr) -> Option<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines().find_map(|l| l.strip_prefix("leasehold_commits_total ")).and_then(|v| v.trim().parse().ok())
}

struct Args {
    clients: Vec<usize>,
    seconds: f64,
    url: Option<String>,
    data: Option<std::path::PathBuf>,
}

fn args() -> Result<Args, String> {
    let mut a = Args { clients: vec![1, 16, 64], seconds: 5.0, url: None, data: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--clients" => {
                a.clients = value()?
                    .split(',')
                    .map(|n| n.trim().parse().map_err(|e| format!("--clients {n:?}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--seconds" => a.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--url" => a.url = Some(value()?),
            "--data" => a.data = Some(value()?.into()),
            _ => {
                return Err(format!(
                    "unknown argument {flag:?} (--clients 1,16,64 --seconds 5 [--url URL | --data DIR])"
                ))
            }
        }
    }
    Ok(a)
}

fn main() -> Result<(), String> {
    let args = args()?;
    // Kept alive until the end: the in-process server and its store directory.
    let mut _server = None;
    let mut _tmp = None;
    let addr = match &args.url {
        Some(url) => {
            let hostport = url.trim_start_matches("http://").trim_end_matches('/');
            std::net::ToSocketAddrs::to_socket_addrs(hostport)
                .map_err(|e| format!("--url {url}: {e}"))?
                .next()
                .ok_or(format!("--url {url}: no address"))?
        }
        None => {
            let dir = match &args.data {
                Some(d) => d.clone(),
                None => {
                    let t = tempfile::tempdir().map_err(|e| e.to_string())?;
                    let p = t.path().to_path_buf();
                    _tmp = Some(t);
                    p
                }
            };
            let s = Server::spawn(ServerConfig::new(&dir, "127.0.0.1:0".parse().map_err(|_| "addr")?))
                .map_err(|e| e.to_string())?;
            println!("built-in server on {} (store {}, fsync before reply)", s.url(), dir.display());
            let a = s.addr();
            _server = Some(s);
            a
        }
    };
    let store = Builtin { addr, authority: addr.to_string() };
    println!(
        "{:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11}",
        "clients", "pairs/s", "acq p50", "acq p99", "rel p50", "rel p99", "pair p99", "reqs/commit"
    );
    for (run_id, &clients) in args.clients.iter().enumerate() {
        let commits_before = commits(addr);
        let (mut s, elapsed) = run(&store, run_id, clients, args.seconds)?;
        let commits_after = commits(addr);
        s.acquire.sort_unstable();
        s.release.sort_unstable();
        s.pair.sort_unstable();
        let pairs = s.pair.len();
        let per_commit = match (commits_before, commits_after) {
            (Some(b), Some(a)) if a > b => format!("{:.1}", (2 * pairs) as f64 / (a - b) as f64),
            _ => "-".to_string(),
        };
        println!(
            "{:>7} {:>10.0} {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>11}",
            clients,
            pairs as f64 / elapsed.as_secs_f64(),
            pct(&s.acquire, 0.50),
            pct(&s.acquire, 0.99),
            pct(&s.release, 0.50),
            pct(&s.release, 0.99),
            pct(&s.pair, 0.99),
            per_commit
        );
    }
    Ok(())
}
