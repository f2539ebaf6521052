//! Idle waiters (issue 10 §4): 1,000 sessions queued on one key of a real `leasehold serve`,
//! each with a held keepalive out (the long poll that brings its grant). Prints
//!
//! - the server process's CPU (from `/proc/PID/stat`, in % of one core), with the requests
//!   and commits it handled meanwhile: over a window between two renewals, when every waiter's
//!   held keepalive is out and nothing else happens (the waiters are made to renew together
//!   once, so such a window exists), and over 60 s of steady waiting, when each waiter renews
//!   its session every time the server ends its held keepalive (half the server's 30 s request
//!   timeout): the cost of keeping sessions alive, none of it polling the key;
//! - the hand-off latency to the head of the queue over several hand-offs, made in the same
//!   window between renewals: from just before
//!   the holder sends its release to the moment the head reads the keepalive reply carrying
//!   its grant (median, p90, max).
//!
//! Waiters speak raw HTTP/1.1 (one thread and one connection each), so the client side is
//! the protocol and nothing else.
//!
//! ```sh
//! cargo build --release -p leasehold && cargo run --release -p leasehold --example idle_waiters [-- WAITERS HANDOFFS]
//! ```

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration as StdDuration, Instant};

use leasehold_core::session::wire::{
    parse_label, Secret, Seq, SessionId, SessionOp, SessionReply, SessionRequest, SessionResponse,
};
use leasehold_core::{parse_key, Duration, Fence};

use common::{leasehold_bin, percentile, serve};

/// The sessions' ttl: the server's default longest (5 min), so that no session needs a renewal
/// beyond its held keepalive's.
const TTL: Duration = Duration::from_secs(300);
/// What each held keepalive asks for; the server holds it at most 60 s.
const WAIT_MS: u64 = 600_000;
const KEY: &str = "idle";

/// One request on a kept-alive connection; the status and body.
fn call(conn: &mut BufReader<TcpStream>, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    try_call(conn, method, path, body).expect("the server closed the connection")
}

/// [`call`], or `None` if the server had closed the (idle) connection: nothing was handled.
fn try_call(
    conn: &mut BufReader<TcpStream>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Option<(u16, Vec<u8>)> {
    // One write: split across writes, Nagle and delayed ACKs would add 40 ms per request.
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    request.extend_from_slice(body);
    conn.get_mut().write_all(&request).ok()?;
    let (mut status, mut len, mut line) = (0, 0, String::new());
    loop {
        line.clear();
        if conn.read_line(&mut line).ok()? == 0 && status == 0 {
            return None;
        }
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
    conn.read_exact(&mut body).expect("body");
    Some((status, body))
}

fn connect(addr: SocketAddr) -> BufReader<TcpStream> {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    BufReader::new(s)
}

/// A session driven by hand over its own connection.
struct Holder {
    addr: SocketAddr,
    conn: BufReader<TcpStream>,
    id: SessionId,
    secret: Secret,
    seq: u64,
}

impl Holder {
    fn open(addr: SocketAddr, label: &str) -> Holder {
        let mut conn = connect(addr);
        let open = SessionRequest {
            session: SessionId::NONE,
            secret: Secret::NONE,
            seq: Seq(1),
            op: SessionOp::Open { ttl: TTL, label: parse_label(label).expect("label") },
        };
        let (_, body) = call(&mut conn, "POST", "/v2/sessions", &serde_json::to_vec(&open).unwrap());
        let r: SessionResponse = serde_json::from_slice(&body).expect("a session response");
        let SessionReply::Opened { session, secret, .. } = r.reply else {
            panic!("not opened: {:?}", r.reply)
        };
        Holder { addr, conn, id: session, secret, seq: 1 }
    }

    fn send(&mut self, op: SessionOp, query: &str) -> SessionReply {
        self.seq += 1;
        let req = SessionRequest { session: self.id, secret: self.secret, seq: Seq(self.seq), op };
        let path = format!("/v2/sessions/{}{query}", self.id.0);
        let bytes = serde_json::to_vec(&req).unwrap();
        // The server closes connections idle too long (a waiter between rounds): reconnect.
        let (_, body) = try_call(&mut self.conn, "POST", &path, &bytes).unwrap_or_else(|| {
            self.conn = connect(self.addr);
            call(&mut self.conn, "POST", &path, &bytes)
        });
        serde_json::from_slice::<SessionResponse>(&body).expect("a session response").reply
    }
}

/// The server process's CPU time (user + system), from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> StdDuration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces) close with ')'.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
    let ticks = f[11] + f[12];
    // USER_HZ, in which /proc counts: 100 on Linux unless `getconf` says otherwise.
    let hz = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100u64);
    StdDuration::from_micros(ticks * 1_000_000 / hz)
}

fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (_, text) = call(&mut connect(addr), "GET", "/metrics", b"");
    let text = String::from_utf8_lossy(&text);
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0)
}

/// The server's work counters: requests handled and commits.
fn work(addr: SocketAddr) -> [u64; 3] {
    [
        metric(addr, "leasehold_session_keepalives_total"),
        metric(addr, "leasehold_session_commits_total"),
        metric(addr, "leasehold_session_acquires_total") + metric(addr, "leasehold_session_releases_total"),
    ]
}

/// Measures the server over `window` while nothing but waiting happens.
fn quiet_window(pid: u32, addr: SocketAddr, window: StdDuration, what: &str) {
    let (cpu0, work0, t0) = (cpu_time(pid), work(addr), Instant::now());
    std::thread::sleep(window);
    let (cpu1, work1, t1) = (cpu_time(pid), work(addr), Instant::now());
    let elapsed = t1 - t0;
    let share = (cpu1 - cpu0).as_secs_f64() / elapsed.as_secs_f64() * 100.0;
    // The metrics requests themselves are on the server's clock too: 3 per reading.
    println!(
        "{what}: server CPU {:.0} ms in {:.1} s = {share:.2}% of a core; keepalives handled {}, commits {}, acquires+releases {}",
        (cpu1 - cpu0).as_secs_f64() * 1e3,
        elapsed.as_secs_f64(),
        work1[0] - work0[0],
        work1[1] - work0[1],
        work1[2] - work0[2],
    );
}

/// What a waiter thread reports.
enum News {
    /// Its held keepalive is out.
    Waiting,
    /// It read its grant at this instant; send on the channel to make it release.
    Granted { at: Instant, release: mpsc::Sender<mpsc::Sender<Instant>> },
}

/// When waiters may send their next held keepalive: in rounds the main thread starts (so that
/// all renew at once and a window between renewals has no request), or freely.
#[derive(Default)]
struct Rounds {
    state: std::sync::Mutex<(u64, bool)>,
    changed: std::sync::Condvar,
}

impl Rounds {
    /// Waits until a round after `seen` starts (or rounds are over); returns it, and whether
    /// rounds are over.
    fn after(&self, seen: u64) -> (u64, bool) {
        let mut g = self.state.lock().unwrap();
        while g.0 <= seen && !g.1 {
            g = self.changed.wait(g).unwrap();
        }
        *g
    }

    fn start(&self, free: bool) {
        let mut g = self.state.lock().unwrap();
        g.0 += 1;
        g.1 = free;
        self.changed.notify_all();
    }
}

/// A waiter: queue, then hold keepalives until one brings the grant; confirm it, report, and
/// on request release it (telling the caller when it sent the release).
fn waiter(mut h: Holder, news: mpsc::Sender<(usize, News)>, me: usize, rounds: std::sync::Arc<Rounds>) {
    let key = parse_key(KEY).unwrap();
    let asked = h.send(SessionOp::Acquire { key: key.clone(), wait: true }, "");
    assert!(matches!(asked, SessionReply::Queued { .. }), "{asked:?}");
    let (mut round, mut wait_ms, mut spread) = (0, WAIT_MS, false);
    let fence: Fence = loop {
        let _ = news.send((me, News::Waiting));
        match h.send(SessionOp::KeepAlive, &format!("?wait_ms={wait_ms}")) {
            SessionReply::Alive { granted: Some(g), .. } => break g.fence,
            SessionReply::Alive { granted: None, .. } => {
                let free;
                (round, free) = rounds.after(round);
                // Once free, one shorter hold apiece spreads the renewals over the server's
                // 15 s hold, as independent waiters' would be.
                wait_ms = if free && !spread { 1_000 + (me as u64 % 14) * 1_000 } else { WAIT_MS };
                spread |= free;
            }
            other => panic!("waiter {me}: {other:?}"),
        }
    };
    let at = Instant::now();
    let confirmed = h.send(SessionOp::Acquire { key: key.clone(), wait: true }, "");
    assert_eq!(confirmed, SessionReply::Granted { key: key.clone(), fence });
    let (tx, rx) = mpsc::channel::<mpsc::Sender<Instant>>();
    let _ = news.send((me, News::Granted { at, release: tx }));
    if let Ok(sent) = rx.recv() {
        let _ = sent.send(Instant::now());
        h.send(SessionOp::Release { key, fence }, "");
        h.send(SessionOp::Close, "");
    }
}

/// Set once the figures are printed and the server is being stopped.
static ENDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn main() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !ENDING.load(std::sync::atomic::Ordering::Relaxed) {
            default_hook(info);
        }
    }));
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let waiters = args.first().copied().unwrap_or(1_000);
    let handoffs = args.get(1).copied().unwrap_or(20).min(waiters);
    let bin = leasehold_bin();
    let dir = tempfile::tempdir().expect("temp dir");
    // Room for every waiter's connection.
    let (server, url) =
        serve(&bin, &dir.path().join("store"), &["--max-connections", &(waiters + 64).to_string()]);
    let addr: SocketAddr = url.trim_start_matches("http://").parse().expect("an address");
    let pid = server.0.id();

    let mut holder = Holder::open(addr, "holder");
    let key = parse_key(KEY).unwrap();
    let first = holder.send(SessionOp::Acquire { key: key.clone(), wait: false }, "");
    let SessionReply::Granted { fence: holder_fence, .. } = first else { panic!("{first:?}") };

    // Open and queue the waiters in order (each asks only once the previous one is queued),
    // so the queue order is their number.
    let started = Instant::now();
    let (news_tx, news) = mpsc::channel::<(usize, News)>();
    let rounds = std::sync::Arc::new(Rounds::default());
    for me in 0..waiters {
        let h = Holder::open(addr, &format!("w{me}"));
        let tx = news_tx.clone();
        let rounds = rounds.clone();
        std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || waiter(h, tx, me, rounds))
            .expect("waiter thread");
        // Its first Waiting comes after its Acquire was answered.
        loop {
            match news.recv().expect("waiter alive") {
                (w, News::Waiting) if w == me => break,
                (w, News::Waiting) => assert!(w < me),
                (w, News::Granted { .. }) => panic!("w{w} granted while the holder holds"),
            }
        }
    }
    let queued = started.elapsed();
    let waiting = metric(addr, "leasehold_session_keepalives_total");
    println!(
        "{waiters} sessions queued on {KEY:?} in {:.1} s, each with a held keepalive out ({waiting} keepalives so far)",
        queued.as_secs_f64()
    );
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
        })
        .unwrap_or_default();
    println!("server RSS {rss} kB");

    // The server holds a keepalive at most 15 s (half its request timeout). Once every first
    // keepalive is back, all renew together; measure while their keepalives are out.
    let renewals = |n: u64| {
        let deadline = Instant::now() + StdDuration::from_secs(60);
        while metric(addr, "leasehold_session_keepalives_total") < n {
            assert!(Instant::now() < deadline, "keepalives did not come back");
            std::thread::sleep(StdDuration::from_millis(100));
        }
    };
    renewals(waiters as u64);
    rounds.start(false);
    std::thread::sleep(StdDuration::from_secs(1));
    quiet_window(pid, addr, StdDuration::from_secs(8), "between renewals, every waiter's keepalive held");
    // A waiter whose held keepalive ends before its hand-off (a loaded machine can stretch the
    // hand-offs past the server's 15 s hold) renews at once: waiting for the next round, it
    // would never hear its grant, and this thread would wait for it forever.
    rounds.start(false);

    // Hand-offs: the holder releases; the head's held keepalive returns with the grant.
    let mut latencies = Vec::new();
    let mut release_current: Option<mpsc::Sender<mpsc::Sender<Instant>>> = None;
    for n in 0..handoffs {
        let sent = match release_current.take() {
            None => {
                let t0 = Instant::now();
                let r = holder.send(SessionOp::Release { key: key.clone(), fence: holder_fence }, "");
                assert!(matches!(r, SessionReply::Released { .. }), "{r:?}");
                t0
            }
            Some(release) => {
                let (tx, rx) = mpsc::channel();
                release.send(tx).expect("holder thread alive");
                rx.recv().expect("release sent")
            }
        };
        let (who, at, release) = loop {
            match news.recv().expect("a waiter reports") {
                (w, News::Granted { at, release }) => break (w, at, release),
                (_, News::Waiting) => {}
            }
        };
        assert_eq!(who, n, "FIFO: the head of the queue is granted");
        latencies.push((at - sent).as_secs_f64() * 1e3);
        release_current = Some(release);
        // Space the hand-offs so each is its own commit (all within the round's 15 s hold).
        std::thread::sleep(StdDuration::from_millis(100));
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "hand-off to the head of {waiters}..{} waiters, {handoffs} hand-offs: median {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        waiters - handoffs + 1,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        latencies[latencies.len() - 1],
    );
    renewals(2 * waiters as u64);
    // From now on each waiter renews as soon as its keepalive comes back.
    rounds.start(true);
    // Every waiter renews its session each time the server ends its held keepalive: the cost
    // of keeping the waiting sessions alive, none of it polling the key. Once the renewals are
    // spread (the keepalives out end within one hold of the server's 15 s, and the shorter
    // holds that spread them within another):
    std::thread::sleep(StdDuration::from_secs(31));
    quiet_window(pid, addr, StdDuration::from_secs(60), "60 s of steady waiting, renewals spread, included");
    // Killing the server ends the waiters' connections: no panic messages for that.
    ENDING.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(server);
}
