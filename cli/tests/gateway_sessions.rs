//! Protocol-v2 sessions through the gateway binary, between the real built-in server and
//! devices running leasehold-serial's `SessionLink` on the host over TCP links. Frames a
//! device sent are captured on its link and replayed, on the same link and on another one,
//! as someone with access to the wire would.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leasehold_core::session::wire::{parse_label, Secret, Seq, SessionId, SessionOp, SessionRequest};
use leasehold_core::session::{Session, SessionEvent, SessionState};
use leasehold_core::{parse_key, Config, Duration as LDuration, Fence, Instant as LInstant, Key};
use leasehold_serial::{Body, Frame, FrameDecoder, SessionLink, SessionRefusal, MAX_FRAME};
use leasehold_server::{RunningServer, Server, ServerConfig};

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");

/// Generous: these are liveness deadlines on a loaded machine, never the measured bounds.
const PATIENCE: Duration = Duration::from_secs(10);

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP stream as a device UART, keeping a copy of every byte the device sent (the tap an
/// attacker on the wire would have).
struct Uart {
    stream: TcpStream,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl embedded_io::ErrorType for Uart {
    type Error = std::io::Error;
}
impl embedded_io::Read for Uart {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        self.stream.read(buf)
    }
}
impl embedded_io::ReadReady for Uart {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        let mut b = [0u8; 1];
        self.stream.set_nonblocking(true)?;
        let r = self.stream.peek(&mut b);
        self.stream.set_nonblocking(false)?;
        match r {
            Ok(n) => Ok(n > 0),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }
}
impl embedded_io::Write for Uart {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        let n = self.stream.write(buf)?;
        self.sent.lock().unwrap().extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        self.stream.flush()
    }
}

#[derive(Clone, Copy)]
struct Clock(Instant);
impl leasehold_serial::Clock for Clock {
    fn now(&self) -> LInstant {
        LInstant::from_micros(self.0.elapsed().as_micros() as u64)
    }
}

type Link = SessionLink<Uart, Clock, 4>;

/// A device on the next connection the gateway makes to `listener`: its link, a second handle
/// on the same wire (to inject frames), and the tap of what it sent.
struct Device {
    link: Link,
    wire: TcpStream,
    sent: Arc<Mutex<Vec<u8>>>,
    events: Vec<SessionEvent>,
}

/// The same timing as `leasehold_client::Options::session`: keepalive every ttl/4, a request
/// timed out after ttl/3 (longer than the gateway holds a keepalive: ttl/4).
fn config(ttl: LDuration) -> Config {
    let mut c = Config::new(ttl);
    c.renew_every = ttl.mul_div_floor(1, 4);
    c.request_timeout = ttl.mul_div_floor(1, 3);
    c
}

fn device(listener: &TcpListener, id: u32, ttl: LDuration, epoch: Instant) -> Device {
    let (stream, _) = listener.accept().expect("gateway connects");
    stream.set_nodelay(true).unwrap();
    let wire = stream.try_clone().unwrap();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let session = Session::new(parse_label(&format!("dev-{id}")).unwrap(), config(ttl)).unwrap();
    let link = SessionLink::new(Uart { stream, sent: sent.clone() }, Clock(epoch), session, id);
    Device { link, wire, sent, events: Vec::new() }
}

impl Device {
    /// Polls until no event is left; returns the ones this call saw (also kept in `events`).
    fn pump(&mut self) -> Vec<SessionEvent> {
        let mut new = Vec::new();
        while let Some(e) = self.link.poll().expect("link works") {
            new.push(e);
        }
        self.events.extend(new.iter().cloned());
        new
    }

    /// The session requests it has sent, each with its frame's bytes, in order.
    fn captured(&self) -> Vec<(SessionRequest, Vec<u8>)> {
        let mut dec = FrameDecoder::new();
        let sent = self.sent.lock().unwrap().clone();
        sent.iter()
            .filter_map(|&b| dec.push(b))
            .filter_map(Result::ok)
            .filter_map(|f| match &f.body {
                Body::SessionRequest(r) => Some((r.clone(), encoded(&f))),
                _ => None,
            })
            .collect()
    }

    fn inject(&mut self, bytes: &[u8]) {
        self.wire.write_all(bytes).unwrap();
    }
}

fn encoded(frame: &Frame) -> Vec<u8> {
    let mut buf = [0u8; MAX_FRAME];
    frame.encode(&mut buf).unwrap().to_vec()
}

/// Polls every device until `done` says so; fails after `PATIENCE`.
fn drive(devices: &mut [&mut Device], what: &str, mut done: impl FnMut(&mut [&mut Device]) -> bool) {
    let start = Instant::now();
    loop {
        for d in devices.iter_mut() {
            d.pump();
        }
        if done(devices) {
            return;
        }
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        // A pace for the loop (a device's main loop), not a synchronisation.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Polls every device for `d` of wall time (a device running normally meanwhile).
fn run_for(devices: &mut [&mut Device], d: Duration) {
    let until = Instant::now() + d;
    drive(devices, "time to pass", |_| Instant::now() >= until);
}

fn opened(d: &mut Device) -> SessionId {
    d.link.open().unwrap();
    drive(&mut [&mut *d], "the session to open", |d| d[0].link.state() == SessionState::Open);
    d.link.session().id().unwrap()
}

fn acquired(d: &SessionEvent, key: &Key) -> Option<Fence> {
    match d {
        SessionEvent::Acquired { key: k, fence, .. } if k == key => Some(*fence),
        _ => None,
    }
}

/// The gateway with `--metrics 127.0.0.1:0` on `links`; its stderr goes to `log`.
fn gateway(server: &str, links: &[&TcpListener], log: &std::path::Path) -> (Proc, u16) {
    gateway_with_fault(server, links, log, "")
}

/// The same, with a deliberate bug (`LEASEHOLD_GATEWAY_FAULT`; only a build with the
/// `fault-injection` feature obeys it).
fn gateway_with_fault(
    server: &str,
    links: &[&TcpListener],
    log: &std::path::Path,
    fault: &str,
) -> (Proc, u16) {
    let mut cmd = Command::new(BIN);
    cmd.args(["gateway", "--server", server, "--metrics", "127.0.0.1:0"])
        .env("LEASEHOLD_GATEWAY_FAULT", fault);
    for l in links {
        cmd.args(["--link", &format!("tcp:{}", l.local_addr().unwrap())]);
    }
    let stderr = std::fs::File::create(log).unwrap();
    let mut child = Proc(cmd.stdout(Stdio::piped()).stderr(stderr).spawn().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.0.stdout.take().unwrap()), &mut line)
        .unwrap();
    let port = line
        .trim()
        .strip_prefix("metrics on http://")
        .and_then(|s| s.strip_suffix("/metrics"))
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("{line:?}"))
        .port();
    (child, port)
}

fn counter(port: u16, name: &str, link: &TcpListener, extra_label: &str) -> u64 {
    let series = format!("{name}{{link=\"tcp:{}\"{extra_label}}}", link.local_addr().unwrap());
    leasehold_test_servers::metric(port, &series).unwrap_or_else(|| panic!("no {series} on /metrics"))
}

/// The server's `GET /v2/leases` entry of `key`: (holder session, fence, waiters).
fn at_server(url: &str, key: &str) -> (Option<u64>, Option<u64>, u64) {
    let http = leasehold_http::HttpClient::new(url, Duration::from_secs(5)).unwrap();
    let req = http
        .request(hyper::Method::GET, "/v2/leases")
        .body(http_body_util::Full::new(hyper::body::Bytes::new()))
        .unwrap();
    let resp = smol::block_on(http.send(req)).unwrap();
    assert_eq!(resp.status, 200);
    let all: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    let entry =
        all["leases"].as_array().unwrap().iter().find(|l| l["key"] == key).cloned().unwrap_or_default();
    let holder = &entry["holder"];
    (holder["session"].as_u64(), holder["fence"].as_u64(), entry["waiting"].as_u64().unwrap_or(0))
}

fn server(dir: &std::path::Path) -> RunningServer {
    Server::spawn(ServerConfig::new(dir, "127.0.0.1:0".parse().unwrap())).unwrap()
}

/// Hand-offs measured; even, so each device ends as it started.
const HANDOFFS: usize = 10;

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn a_waiting_device_is_pushed_the_key_on_release_in_fifo_order() {
    hand_off("");
}

fn hand_off(fault: &str) {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir.path().join("store"));
    let (l1, l2) = (TcpListener::bind("127.0.0.1:0").unwrap(), TcpListener::bind("127.0.0.1:0").unwrap());
    let (_gw, metrics) =
        gateway_with_fault(&server.url(), &[&l1, &l2], &dir.path().join("gateway.log"), fault);
    let epoch = Instant::now();
    // A 4 s ttl: the gateway holds keepalives up to 1 s, the keepalive interval.
    let ttl = LDuration::from_secs(4);
    let mut a = device(&l1, 1, ttl, epoch);
    let mut b = device(&l2, 2, ttl, epoch);
    let (sa, sb) = (opened(&mut a), opened(&mut b));
    let pump = parse_key("pump").unwrap();

    a.link.acquire(pump.clone(), true).unwrap();
    drive(&mut [&mut a], "a's grant", |d| d[0].link.remaining(&pump).is_some());
    b.link.acquire(pump.clone(), true).unwrap();
    drive(&mut [&mut b], "b queued", |d| {
        d[0].events.iter().any(|e| matches!(e, SessionEvent::Queued { .. }))
    });

    // While b waits: a keeps the key (its keepalives renew it), b is never granted it, and b's
    // held keepalives are a handful of frames, not a poll loop.
    let forwarded_before = counter(metrics, "leasehold_gateway_requests_forwarded_total", &l2, "");
    let wait = Duration::from_secs(3);
    let until = Instant::now() + wait;
    drive(&mut [&mut a, &mut b], "3 s of waiting", |d| {
        assert!(d[0].link.remaining(&pump).is_some(), "a lost the key while keeping alive");
        assert!(d[1].link.remaining(&pump).is_none(), "two holders");
        Instant::now() >= until
    });
    let waiting_frames =
        counter(metrics, "leasehold_gateway_requests_forwarded_total", &l2, "") - forwarded_before;
    println!("b's requests forwarded in {wait:?} of waiting: {waiting_frames}");
    // Each keepalive is held up to 1 s: about one a second; a poll loop would be hundreds.
    assert!(waiting_frames <= 10, "{waiting_frames}");
    assert_eq!(at_server(&server.url(), "pump"), (Some(sa.0), a.link.session().fence(&pump).map(|f| f.0), 1));

    // Hand the key back and forth: each release is answered by a push to the waiter.
    let mut latencies = Vec::new();
    let mut last_fence = a.link.session().fence(&pump).unwrap();
    let (mut holder, mut waiter) = (&mut a, &mut b);
    for round in 0..HANDOFFS {
        let released = Instant::now();
        holder.link.release(&pump).unwrap();
        let mut fence = None;
        let mut pushed = None;
        drive(&mut [&mut *holder, &mut *waiter], "the hand-off", |d| {
            fence = d[1].events.iter().rev().find_map(|e| acquired(e, &pump));
            if fence.is_some_and(|f| f > last_fence) {
                pushed.get_or_insert_with(|| released.elapsed());
            }
            // The push may overtake the release's own answer (the server serves connections
            // on several threads): the holder may queue again only once that has come.
            pushed.is_some() && d[0].events.iter().any(|e| matches!(e, SessionEvent::Released { .. }))
        });
        latencies.push(pushed.unwrap());
        last_fence = fence.unwrap();
        assert!(holder.link.remaining(&pump).is_none());
        // The one who gave it back queues again, behind nobody.
        holder.events.clear();
        holder.link.acquire(pump.clone(), true).unwrap();
        drive(&mut [&mut *holder, &mut *waiter], "re-queued", |d| {
            d[0].events.iter().any(|e| matches!(e, SessionEvent::Queued { .. }))
        });
        let expected_holder = if round % 2 == 0 { sb } else { sa };
        assert_eq!(at_server(&server.url(), "pump").0, Some(expected_holder.0));
        std::mem::swap(&mut holder, &mut waiter);
    }
    let worst = *latencies.iter().max().unwrap();
    let p50 = median(&mut latencies);
    println!("release to the waiter's pushed grant over {HANDOFFS} hand-offs: median {p50:?}, max {worst:?}");
    // Pushed, not polled: a waiter that learnt of its grant at its next keepalive would wait
    // anything up to the keepalive interval (1 s), half of it on average; pushed, it is a
    // round trip and an fsync. The median has room for a loaded machine; one slow hand-off
    // cannot fail it.
    assert!(p50 < Duration::from_millis(250), "{latencies:?}");
    assert!(worst < Duration::from_secs(2), "{latencies:?}");
    assert_eq!(
        counter(metrics, "leasehold_gateway_session_refusals_total", &l1, ",reason=\"wrong_link\""),
        0
    );
    assert_eq!(counter(metrics, "leasehold_gateway_link_sessions", &l1, ""), 1);
}

#[test]
fn replayed_frames_on_the_same_link_change_nothing_and_a_dead_device_still_expires() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir.path().join("store"));
    let (l1, l2) = (TcpListener::bind("127.0.0.1:0").unwrap(), TcpListener::bind("127.0.0.1:0").unwrap());
    let (_gw, metrics) = gateway(&server.url(), &[&l1, &l2], &dir.path().join("gateway.log"));
    let epoch = Instant::now();
    let ttl = LDuration::from_millis(1600);
    let mut a = device(&l1, 1, ttl, epoch);
    let mut b = device(&l2, 2, ttl, epoch);
    let sa = opened(&mut a);
    opened(&mut b);
    let pump = parse_key("pump").unwrap();

    // a takes the key, gives it back, and takes it again: the wire has seen an acquire, a
    // release and keepalives of a's session.
    a.link.acquire(pump.clone(), false).unwrap();
    drive(&mut [&mut a], "a's first grant", |d| d[0].link.remaining(&pump).is_some());
    let first_fence = a.link.session().fence(&pump).unwrap();
    a.link.release(&pump).unwrap();
    drive(&mut [&mut a], "a's release", |d| {
        d[0].events.iter().any(|e| matches!(e, SessionEvent::Released { .. }))
    });
    a.link.acquire(pump.clone(), false).unwrap();
    drive(&mut [&mut a], "a's second grant", |d| d[0].link.remaining(&pump).is_some());
    let fence = a.link.session().fence(&pump).unwrap();
    assert!(fence > first_fence);
    run_for(&mut [&mut a], Duration::from_millis(900)); // a keepalive or two
    b.link.acquire(pump.clone(), true).unwrap();
    drive(&mut [&mut a, &mut b], "b queued", |d| {
        d[1].events.iter().any(|e| matches!(e, SessionEvent::Queued { .. }))
    });

    let captured = a.captured();
    let pick = |want: fn(&SessionOp) -> bool| -> Vec<u8> {
        captured.iter().find(|(r, _)| want(&r.op)).map(|(_, f)| f.clone()).expect("captured")
    };
    let acquire = pick(|op| matches!(op, SessionOp::Acquire { .. }));
    let release = pick(|op| matches!(op, SessionOp::Release { .. }));
    let keepalive = pick(|op| matches!(op, SessionOp::KeepAlive));
    // Replayed on a's own wire, so the gateway forwards them: the server must ignore them.
    let forwarded_before = counter(metrics, "leasehold_gateway_requests_forwarded_total", &l1, "");
    for frame in [&release, &acquire, &keepalive, &release] {
        a.inject(frame);
        run_for(&mut [&mut a, &mut b], Duration::from_millis(50));
    }
    drive(&mut [&mut a, &mut b], "the replays forwarded", |_| {
        counter(metrics, "leasehold_gateway_requests_forwarded_total", &l1, "") >= forwarded_before + 4
    });
    run_for(&mut [&mut a, &mut b], Duration::from_millis(300));
    // Nothing changed: a still believes, the server still has a's grant, b still waits.
    assert_eq!(a.link.remaining(&pump).map(|_| a.link.session().fence(&pump)), Some(Some(fence)));
    assert!(!a
        .events
        .iter()
        .any(|e| matches!(e, SessionEvent::Lost { .. } | SessionEvent::SessionLost { .. })));
    assert!(b.link.remaining(&pump).is_none(), "a replayed release handed the key on");
    assert_eq!(at_server(&server.url(), "pump"), (Some(sa.0), Some(fence.0), 1));

    // a dies (stops running, its line stays up) while someone keeps replaying its keepalives:
    // its key frees when its session expires, and not before a's own belief ended.
    let a_believed_until = Instant::now() + Duration::from(a.link.remaining(&pump).unwrap());
    let died = Instant::now();
    let keepalives: Vec<Vec<u8>> =
        captured.iter().filter(|(r, _)| r.op == SessionOp::KeepAlive).map(|(_, f)| f.clone()).collect();
    let mut next_replay = Instant::now();
    let mut i = 0;
    drive(&mut [&mut b], "b's grant after a's session expired", |d| {
        if Instant::now() >= next_replay {
            a.wire.write_all(&keepalives[i % keepalives.len()]).unwrap();
            i += 1;
            next_replay += Duration::from_millis(100);
        }
        d[0].link.remaining(&pump).is_some()
    });
    let granted = Instant::now();
    let failover = granted - died;
    // a's last keepalive may have been held at the server (up to ttl/4) and renewed the session
    // only when answered: the design frees the key within (ttl + ttl/4)·(1+ε) of a's death.
    let bound = Duration::from(ttl).mul_f64(1.25 * 1.01);
    println!(
        "{i} keepalives replayed; b granted {failover:?} after a died ({:.2} ttl; bound (ttl + ttl/4)·(1+ε) = {bound:?})",
        failover.as_secs_f64() / Duration::from(ttl).as_secs_f64()
    );
    assert!(granted >= a_believed_until, "b was granted while a still believed");
    assert!(failover <= bound + Duration::from_millis(500), "{failover:?}");
    assert!(i >= 5);
    let b_fence = b.link.session().fence(&pump).unwrap();
    assert!(b_fence > fence);
}

#[test]
fn a_sessions_frames_on_another_link_are_refused_and_a_forged_release_too() {
    other_link_and_forged("");
}

fn other_link_and_forged(fault: &str) {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir.path().join("store"));
    let (l1, l2) = (TcpListener::bind("127.0.0.1:0").unwrap(), TcpListener::bind("127.0.0.1:0").unwrap());
    let log = dir.path().join("gateway.log");
    let (_gw, metrics) = gateway_with_fault(&server.url(), &[&l1, &l2], &log, fault);
    let epoch = Instant::now();
    let ttl = LDuration::from_secs(3);
    let mut a = device(&l1, 1, ttl, epoch);
    // Link 2's peer is not a device: it only sends what was captured on link 1.
    let (mut other, _) = l2.accept().unwrap();
    other.set_read_timeout(Some(PATIENCE)).unwrap();
    let sa = opened(&mut a);
    let pump = parse_key("pump").unwrap();
    a.link.acquire(pump.clone(), false).unwrap();
    drive(&mut [&mut a], "a's grant", |d| d[0].link.remaining(&pump).is_some());
    let fence = a.link.session().fence(&pump).unwrap();
    run_for(&mut [&mut a], Duration::from_millis(1000)); // a keepalive

    // a's own frames, and a release of a's key made up from them, on link 2.
    let captured = a.captured();
    let mut frames: Vec<(Seq, Vec<u8>)> =
        captured.iter().filter(|(r, _)| r.session == sa).map(|(r, f)| (r.seq, f.clone())).collect();
    let (template, _) = captured.iter().find(|(r, _)| r.session == sa).unwrap();
    let release = |seq, secret| {
        let op = SessionOp::Release { key: pump.clone(), fence };
        Frame::new(900, 1, Body::SessionRequest(SessionRequest { session: sa, secret, seq, op }))
    };
    // With a's true secret (as read off the wire) and a fresh seq: only the link tells.
    frames.push((Seq(1_000), encoded(&release(Seq(1_000), template.secret))));
    let mut expected = Vec::new();
    for (seq, bytes) in &frames {
        other.write_all(bytes).unwrap();
        expected.push(*seq);
    }
    let mut dec = FrameDecoder::new();
    let mut refused = Vec::new();
    let mut chunk = [0u8; 256];
    while refused.len() < expected.len() {
        a.pump();
        let n = other.read(&mut chunk).expect("the gateway answers on link 2");
        assert!(n > 0, "gateway closed link 2");
        for f in chunk[..n].iter().filter_map(|&b| dec.push(b)) {
            match f.unwrap().body {
                Body::SessionRefused { session, seq, why } => {
                    assert_eq!((session, why), (sa, SessionRefusal::WrongLink));
                    refused.push(seq);
                }
                body => panic!("link 2 got {body:?}: a frame of a's session was forwarded"),
            }
        }
    }
    assert_eq!(refused, expected);
    assert_eq!(
        counter(metrics, "leasehold_gateway_session_refusals_total", &l2, ",reason=\"wrong_link\""),
        expected.len() as u64
    );
    assert_eq!(counter(metrics, "leasehold_gateway_requests_forwarded_total", &l2, ""), 0);

    // On a's own wire, releases with a wrong secret: forwarded, refused by the server, and
    // their replies withheld from a. One names the seq of a's keepalive that is out (held at
    // the server) right now: passed on, its refusal would be taken as that keepalive's answer.
    let captured = a.captured();
    let out = captured.iter().rev().find(|(r, _)| r.op == SessionOp::KeepAlive).unwrap().0.seq.0;
    let next = captured.iter().map(|(r, _)| r.seq.0).max().unwrap() + 1;
    let forwarded = counter(metrics, "leasehold_gateway_requests_forwarded_total", &l1, "");
    for seq in [out, next, 5_000] {
        a.inject(&encoded(&release(Seq(seq), Secret::from_bytes([7; 16]))));
    }
    drive(&mut [&mut a], "three forged releases forwarded", |_| {
        counter(metrics, "leasehold_gateway_requests_forwarded_total", &l1, "") >= forwarded + 3
    });
    run_for(&mut [&mut a], Duration::from_millis(1000)); // the answers, and a's next keepalive

    // Nothing changed: a holds and believes, the server agrees.
    assert!(
        !a.events.iter().any(|e| matches!(e, SessionEvent::Lost { .. } | SessionEvent::SessionLost { .. })),
        "{:?}",
        a.events
    );
    assert_eq!(a.link.session().fence(&pump), Some(fence));
    assert!(a.link.remaining(&pump).is_some());
    assert_eq!(at_server(&server.url(), "pump"), (Some(sa.0), Some(fence.0), 0));
    assert_eq!(a.link.stats().forged, 3);
    assert_eq!(counter(metrics, "leasehold_gateway_session_refusals_total", &l1, ",reason=\"forged\""), 3);
    // a itself still can: its own release frees the key at once.
    a.link.release(&pump).unwrap();
    drive(&mut [&mut a], "a's release", |d| {
        d[0].events.iter().any(|e| matches!(e, SessionEvent::Released { acknowledged: true, .. }))
    });
    assert_eq!(at_server(&server.url(), "pump").0, None);
    // Throttled: several refusals of each kind, one warning line each.
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("it was not opened on this connection").count(), 1, "{text}");
    assert_eq!(text.matches("refused the secret").count(), 1, "{text}");
}

#[test]
fn a_reconnected_link_is_a_new_link() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir.path().join("store"));
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let (_gw, metrics) = gateway(&server.url(), &[&l1], &dir.path().join("gateway.log"));
    let epoch = Instant::now();
    let ttl = LDuration::from_millis(1200);
    let mut a = device(&l1, 1, ttl, epoch);
    let sa = opened(&mut a);
    let pump = parse_key("pump").unwrap();
    a.link.acquire(pump.clone(), false).unwrap();
    drive(&mut [&mut a], "a's grant", |d| d[0].link.remaining(&pump).is_some());
    assert_eq!(counter(metrics, "leasehold_gateway_link_sessions", &l1, ""), 1);
    let captured = a.captured();
    drop(a); // the line drops: the gateway reconnects

    let (mut again, _) = l1.accept().unwrap();
    again.set_read_timeout(Some(PATIENCE)).unwrap();
    let keepalive =
        captured.iter().rev().find(|(r, _)| r.op == SessionOp::KeepAlive).or(captured.last()).unwrap();
    again.write_all(&keepalive.1).unwrap();
    let mut dec = FrameDecoder::new();
    let mut chunk = [0u8; 256];
    let refusal = loop {
        let n = again.read(&mut chunk).expect("the gateway answers");
        assert!(n > 0);
        if let Some(f) = chunk[..n].iter().filter_map(|&b| dec.push(b)).find_map(Result::ok) {
            break f;
        }
    };
    assert_eq!(
        refusal.body,
        Body::SessionRefused { session: sa, seq: keepalive.0.seq, why: SessionRefusal::WrongLink }
    );
    assert_eq!(counter(metrics, "leasehold_gateway_link_sessions", &l1, ""), 0);
    assert_eq!(counter(metrics, "leasehold_gateway_link_connects_total", &l1, ""), 2);
}

struct TimerDelay;
impl embedded_hal_async::delay::DelayNs for TimerDelay {
    async fn delay_ns(&mut self, ns: u32) {
        async_io::Timer::after(Duration::from_nanos(u64::from(ns))).await;
    }
}

#[test]
fn an_async_device_waits_in_next_event_and_is_pushed_its_grant() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir.path().join("store"));
    let (l1, l2) = (TcpListener::bind("127.0.0.1:0").unwrap(), TcpListener::bind("127.0.0.1:0").unwrap());
    let (_gw, _) = gateway(&server.url(), &[&l1, &l2], &dir.path().join("gateway.log"));
    let epoch = Instant::now();
    let ttl = LDuration::from_secs(4);
    let pump = parse_key("pump").unwrap();
    let mut a = device(&l1, 1, ttl, epoch);
    opened(&mut a);
    a.link.acquire(pump.clone(), false).unwrap();
    drive(&mut [&mut a], "a's grant", |d| d[0].link.remaining(&pump).is_some());
    let fence = a.link.session().fence(&pump).unwrap();

    // b: the async link in a thread of its own, waiting in next_event for its events.
    let (stream, _) = l2.accept().unwrap();
    stream.set_nodelay(true).unwrap();
    let (events_tx, events) = std::sync::mpsc::channel();
    let key = pump.clone();
    let b = std::thread::spawn(move || {
        smol::block_on(async {
            let uart =
                embedded_io_adapters::futures_03::FromFutures::new(async_io::Async::new(stream).unwrap());
            let session = Session::<4>::new(parse_label("dev-2").unwrap(), config(ttl)).unwrap();
            let mut link =
                leasehold_serial::AsyncSessionLink::new(uart, Clock(epoch), TimerDelay, session, 2);
            link.open().unwrap();
            loop {
                let e = link.next_event().await.unwrap();
                if matches!(e, SessionEvent::Opened { .. }) {
                    link.acquire(key.clone(), true).unwrap();
                }
                let done = acquired(&e, &key).is_some();
                events_tx.send((e, Instant::now())).unwrap();
                if done {
                    return link.remaining(&key).is_some();
                }
            }
        })
    });
    let mut seen = Vec::new();
    drive(&mut [&mut a], "b queued", |_| {
        seen.extend(events.try_iter());
        seen.iter().any(|(e, _)| matches!(e, SessionEvent::Queued { .. }))
    });
    run_for(&mut [&mut a], Duration::from_millis(1500)); // b's keepalives held meanwhile
    let released = Instant::now();
    a.link.release(&pump).unwrap();
    drive(&mut [&mut a], "b's grant", |_| {
        seen.extend(events.try_iter());
        seen.iter().any(|(e, _)| acquired(e, &pump).is_some())
    });
    let (e, at) = seen.iter().find(|(e, _)| acquired(e, &pump).is_some()).unwrap();
    println!("async device: release to pushed grant {:?}", at.duration_since(released));
    assert!(acquired(e, &pump).unwrap() > fence);
    assert!(b.join().unwrap(), "b does not believe its grant");
    assert!(at.duration_since(released) < Duration::from_secs(1));
}

#[test]
fn a_request_the_server_never_answers_is_refused_as_unreachable_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on: bound, then closed.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let (_gw, metrics) = gateway(&format!("http://{dead}"), &[&l1], &dir.path().join("gateway.log"));
    let mut a = device(&l1, 1, LDuration::from_secs(2), Instant::now());
    a.link.open().unwrap();
    drive(&mut [&mut a], "three refusals", |d| d[0].link.stats().unreachable >= 3);
    // Each was a new open (a new seq), not one frame answered three times.
    let opens: Vec<Seq> = a
        .captured()
        .iter()
        .filter(|(r, _)| matches!(r.op, SessionOp::Open { .. }))
        .map(|(r, _)| r.seq)
        .collect();
    assert!(opens.len() >= 3 && opens.windows(2).all(|w| w[0] < w[1]), "{opens:?}");
    assert!(counter(metrics, "leasehold_gateway_backend_errors_total", &l1, "") >= 3);
    assert_eq!(a.link.state(), SessionState::Opening);
}

#[test]
fn a_connection_opening_sessions_in_a_loop_is_refused_past_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir.path().join("store"));
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let (_gw, metrics) = gateway(&server.url(), &[&l1], &dir.path().join("gateway.log"));
    let (mut s, _) = l1.accept().unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut replies = Vec::new();
    let mut dec = FrameDecoder::new();
    let mut chunk = [0u8; 256];
    for i in 1..=10u64 {
        let op = SessionOp::Open { ttl: LDuration::from_secs(30), label: parse_label("looping").unwrap() };
        let open = SessionRequest { session: SessionId::NONE, secret: Secret::NONE, seq: Seq(i), op };
        s.write_all(&encoded(&Frame::new(i as u16, 5, Body::SessionRequest(open)))).unwrap();
        // One at a time, so the limit is met in order.
        while replies.len() < i as usize {
            let n = s.read(&mut chunk).expect("the gateway answers");
            assert!(n > 0);
            replies.extend(chunk[..n].iter().filter_map(|&b| dec.push(b)).filter_map(Result::ok));
        }
    }
    let kinds: Vec<&str> = replies
        .iter()
        .map(|f| match &f.body {
            Body::SessionResponse(r) => match r.reply {
                leasehold_core::session::wire::SessionReply::Opened { .. } => "opened",
                leasehold_core::session::wire::SessionReply::Rejected(leasehold_core::Reject::Capacity) => {
                    "capacity"
                }
                _ => "other",
            },
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, [vec!["opened"; 8], vec!["capacity"; 2]].concat());
    assert_eq!(
        counter(metrics, "leasehold_gateway_session_refusals_total", &l1, ",reason=\"session_limit\""),
        2
    );
    assert_eq!(counter(metrics, "leasehold_gateway_requests_forwarded_total", &l1, ""), 8);
    assert_eq!(counter(metrics, "leasehold_gateway_link_sessions", &l1, ""), 8);
}

/// Each deliberate gateway bug makes the test that guards against it fail, for the reason it
/// should: `cargo test -p leasehold --features fault-injection --test gateway_sessions planted`.
#[cfg(feature = "fault-injection")]
mod planted {
    /// The message `f` panicked with; fails if it did not panic.
    fn failure(f: impl FnOnce()) -> String {
        let payload =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).expect_err("the bug went unnoticed");
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    }

    #[test]
    fn planted_forwarding_from_any_link_is_caught() {
        let why = failure(|| super::other_link_and_forged("any-link"));
        assert!(why.contains("a frame of a's session was forwarded"), "{why}");
    }

    #[test]
    fn planted_passing_on_a_forged_frames_refusal_is_caught() {
        let why = failure(|| super::other_link_and_forged("pass-forged"));
        assert!(why.contains("SessionLost"), "{why}");
    }

    #[test]
    fn planted_keepalives_never_held_is_caught() {
        let why = failure(|| super::hand_off("no-hold"));
        // The waiter's keepalives come back at once and it sends the next at once: a poll loop.
        assert!(why.parse::<u64>().is_ok_and(|frames| frames > 10), "{why}");
    }
}
