//! The gateway binary between the real server and device links over TCP. The devices here run
//! leasehold-serial's own `DeviceLink` on the host; the QEMU test runs it on emulated boards.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use leasehold_core::{parse_key, Config, Duration as LDuration, Event, Instant as LInstant, Lease, OwnerId};
use leasehold_serial::{Body, DeviceLink, Frame, FrameDecoder, MAX_FRAME};
use leasehold_server::{Server, ServerConfig};

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");

/// The flood test saturates the machine for 5 s; tests that bound latencies hold this shared,
/// the flood test holds it exclusively, so they never run at the same time.
static MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn quiet_machine() -> std::sync::RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP stream as a device UART.
struct Uart(TcpStream);

impl embedded_io::ErrorType for Uart {
    type Error = std::io::Error;
}
impl embedded_io::Read for Uart {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        self.0.read(buf)
    }
}
impl embedded_io::ReadReady for Uart {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        let mut b = [0u8; 1];
        self.0.set_nonblocking(true)?;
        let r = self.0.peek(&mut b);
        self.0.set_nonblocking(false)?;
        match r {
            Ok(n) => Ok(n > 0),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }
}
impl embedded_io::Write for Uart {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        self.0.flush()
    }
}

#[derive(Clone, Copy)]
struct Clock(Instant);
impl leasehold_serial::Clock for Clock {
    fn now(&self) -> LInstant {
        LInstant::from_micros(self.0.elapsed().as_micros() as u64)
    }
}

fn device(listener: &TcpListener, id: u32, ttl_ms: u64) -> DeviceLink<Uart, Clock> {
    let (stream, _) = listener.accept().expect("gateway connects");
    let mut config = Config::new(LDuration::from_millis(ttl_ms));
    config.jitter_seed = u64::from(id);
    let lease = Lease::new(OwnerId(1000 + u64::from(id)), config).unwrap();
    DeviceLink::new(Uart(stream), Clock(Instant::now()), lease, parse_key("pump").unwrap(), id)
}

#[test]
fn devices_contend_through_the_gateway_and_fail_over() {
    let _quiet = quiet_machine();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::spawn(ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap())).unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
    let _gw = Proc(
        Command::new(BIN)
            .args(["gateway", "--server", &server.url()])
            .args(["--link", &format!("tcp:{}", l1.local_addr().unwrap())])
            .args(["--link", &format!("tcp:{}", l2.local_addr().unwrap())])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ttl_ms = 600;
    let mut d1 = device(&l1, 1, ttl_ms);
    let mut d2 = device(&l2, 2, ttl_ms);
    d1.acquire().unwrap();
    let start = Instant::now();
    let mut fence1 = None;
    while fence1.is_none() {
        assert!(start.elapsed() < Duration::from_secs(3), "device 1 never acquired");
        if let Some(Event::Acquired { fence, .. }) = d1.poll().unwrap() {
            fence1 = Some(fence);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    d2.acquire().unwrap();
    // Both run for a few ttls: device 1 renews, device 2 must never hold meanwhile.
    let until = Instant::now() + Duration::from_millis(3 * ttl_ms);
    while Instant::now() < until {
        assert!(d1.poll().unwrap().is_none_or(|e| matches!(e, Event::Renewed { .. })));
        assert!(!matches!(d2.poll().unwrap(), Some(Event::Acquired { .. })), "two holders");
        assert!(d1.remaining().is_some(), "device 1 lost its lease while renewing");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Device 1 dies (stops talking); device 2 takes over within ttl·(1+ε) plus slack.
    drop(d1);
    let died = Instant::now();
    let fence2 = loop {
        assert!(died.elapsed() < Duration::from_secs(3), "device 2 never took over");
        if let Some(Event::Acquired { fence, .. }) = d2.poll().unwrap() {
            break fence;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let failover = died.elapsed();
    let bound = Duration::from_millis(ttl_ms).mul_f64(1.01);
    println!(
        "device failover {failover:?}, bound {bound:?}, ratio {:.2}",
        failover.as_secs_f64() / bound.as_secs_f64()
    );
    assert!(fence2 > fence1.unwrap());
    assert!(failover <= bound + Duration::from_millis(150), "{failover:?}");
    assert_eq!(d2.stats().cobs + d2.stats().malformed + d2.stats().oversize, 0);
}

#[test]
fn garbage_and_wrong_versions_do_not_break_a_link() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::spawn(ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap())).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let _gw = Proc(
        Command::new(BIN)
            .args([
                "gateway",
                "--server",
                &server.url(),
                "--link",
                &format!("tcp:{}", l.local_addr().unwrap()),
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(b"\xff\xfe garbage without delimiters").unwrap();
    s.write_all(&[0x55; 400]).unwrap();
    let request = leasehold_core::Request {
        id: leasehold_core::RequestId(1),
        owner: OwnerId(5),
        op: leasehold_core::Op::Acquire { ttl: LDuration::from_secs(1) },
    };
    let mut future = Frame::new(3, 77, Body::Request { key: parse_key("pump").unwrap(), request });
    future.header.version = 9;
    let mut buf = [0u8; MAX_FRAME];
    s.write_all(future.encode(&mut buf).unwrap()).unwrap();
    let good = Frame::new(4, 77, Body::Request { key: parse_key("pump").unwrap(), request });
    s.write_all(good.encode(&mut buf).unwrap()).unwrap();

    let got = read_frames(&mut s, 2);
    assert_eq!(got[0].body, Body::VersionMismatch { supported: leasehold_serial::VERSION });
    assert_eq!((got[0].header.seq, got[0].header.device), (3, 77));
    let Body::Response(r) = &got[1].body else { panic!("{:?}", got[1]) };
    assert_eq!((got[1].header.seq, r.id, r.owner), (4, request.id, request.owner));
    assert!(matches!(r.reply, leasehold_core::Reply::Granted { .. }), "{r:?}");
}

/// A pseudo-terminal as a device UART: a reader thread feeds a queue, so `read_ready` can
/// answer without blocking.
struct PtyUart {
    rx: std::sync::mpsc::Receiver<u8>,
    pending: std::collections::VecDeque<u8>,
    tx: std::fs::File,
}

impl PtyUart {
    fn open(path: &std::path::Path) -> PtyUart {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        let mut reader = file.try_clone().unwrap();
        let (send, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || buf[..n].iter().any(|&b| send.send(b).is_err()) {
                    break;
                }
            }
        });
        PtyUart { rx, pending: Default::default(), tx: file }
    }
}

impl embedded_io::ErrorType for PtyUart {
    type Error = std::io::Error;
}
impl embedded_io::ReadReady for PtyUart {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        self.pending.extend(self.rx.try_iter());
        Ok(!self.pending.is_empty())
    }
}
impl embedded_io::Read for PtyUart {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        if self.pending.is_empty() {
            let b = self.rx.recv().map_err(|_| std::io::Error::other("pty closed"))?;
            self.pending.push_back(b);
        }
        self.pending.extend(self.rx.try_iter());
        let n = buf.len().min(self.pending.len());
        for (slot, b) in buf.iter_mut().zip(self.pending.drain(..n)) {
            *slot = b;
        }
        Ok(n)
    }
}
impl embedded_io::Write for PtyUart {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        self.tx.write(buf)
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        self.tx.flush()
    }
}

#[test]
fn a_serial_device_path_link_works() {
    let _quiet = quiet_machine();
    let dir = tempfile::tempdir().unwrap();
    let (gw_end, board_end) = (dir.path().join("ttyGW"), dir.path().join("ttyBOARD"));
    // Two linked pseudo-terminals: the gateway opens one like /dev/ttyUSB0, the device the other.
    let _socat = Proc(
        Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", gw_end.display()))
            .arg(format!("pty,raw,echo=0,link={}", board_end.display()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start socat ({e}); install it: apt-get install socat")),
    );
    let t0 = Instant::now();
    while !(gw_end.exists() && board_end.exists()) {
        assert!(t0.elapsed() < Duration::from_secs(5), "socat made no ptys");
        std::thread::sleep(Duration::from_millis(10));
    }
    let server =
        Server::spawn(ServerConfig::new(dir.path().join("store"), "127.0.0.1:0".parse().unwrap())).unwrap();
    let _gw = Proc(
        Command::new(BIN)
            .args(["gateway", "--server", &server.url(), "--link"])
            .arg(&gw_end)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lease = Lease::new(OwnerId(4242), Config::new(LDuration::from_millis(600))).unwrap();
    let mut dev = DeviceLink::new(
        PtyUart::open(&board_end),
        Clock(Instant::now()),
        lease,
        parse_key("tty").unwrap(),
        9,
    );
    dev.acquire().unwrap();
    let mut events = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1_500) {
        if let Some(e) = dev.poll().unwrap() {
            events.push(e);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(matches!(events.first(), Some(Event::Acquired { .. })), "{events:?}");
    assert!(events.iter().filter(|e| matches!(e, Event::Renewed { .. })).count() >= 2, "{events:?}");
    assert!(dev.remaining().is_some());
    dev.release().unwrap();
    let released = loop {
        assert!(start.elapsed() < Duration::from_secs(4), "no release ack");
        if let Some(e) = dev.poll().unwrap() {
            break e;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(matches!(released, Event::Released { .. }), "{released:?}");
}

/// A gateway with `--metrics 127.0.0.1:0` on `links`, stderr to `stderr`; returns it and the
/// port of its metrics listener (read from its stdout).
fn gateway_with_metrics(server: &str, links: &[&TcpListener], extra: &[&str], stderr: Stdio) -> (Proc, u16) {
    let mut cmd = Command::new(BIN);
    cmd.args(["gateway", "--server", server, "--metrics", "127.0.0.1:0"]).args(extra);
    for l in links {
        cmd.args(["--link", &format!("tcp:{}", l.local_addr().unwrap())]);
    }
    let mut child = Proc(cmd.stdout(Stdio::piped()).stderr(stderr).spawn().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.0.stdout.take().unwrap()), &mut line)
        .unwrap();
    let addr = line.trim().strip_prefix("metrics on http://").and_then(|s| s.strip_suffix("/metrics"));
    let port = addr
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("{line:?}"))
        .port();
    (child, port)
}

/// One of a link's counters on the gateway's /metrics; 0 if the series is absent.
fn counter(port: u16, name: &str, link: &TcpListener, extra_label: &str) -> u64 {
    let series = format!("{name}{{link=\"tcp:{}\"{extra_label}}}", link.local_addr().unwrap());
    leasehold_test_servers::metric(port, &series).unwrap_or_else(|| panic!("no {series} on /metrics"))
}

fn encoded(frame: &Frame) -> Vec<u8> {
    let mut buf = [0u8; MAX_FRAME];
    frame.encode(&mut buf).unwrap().to_vec()
}

fn acquire(seq: u16, key: &str, owner: u64) -> Frame {
    let request = leasehold_core::Request {
        id: leasehold_core::RequestId(u32::from(seq)),
        owner: OwnerId(owner),
        op: leasehold_core::Op::Acquire { ttl: LDuration::from_secs(5) },
    };
    Frame::new(seq, 77, Body::Request { key: parse_key(key).unwrap(), request })
}

/// Reads frames from `s` until `n` have arrived.
fn read_frames(s: &mut TcpStream, n: usize) -> Vec<Frame> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    let mut chunk = [0u8; 256];
    while got.len() < n {
        let k = s.read(&mut chunk).expect("gateway answers");
        assert!(k > 0, "gateway closed the link");
        got.extend(chunk[..k].iter().filter_map(|&b| dec.push(b)).filter_map(Result::ok));
    }
    got
}

fn reply_of(f: &Frame) -> leasehold_core::Reply {
    match &f.body {
        Body::Response(r) => r.reply,
        other => panic!("not a response: {other:?}"),
    }
}

/// Issue 11 items 8 and 9: two links flood the gateway as fast as loopback goes (one with
/// garbage, one with frames of another protocol version, whose answers it drains) for 5 s,
/// while a device with a 3 s ttl on a third link keeps renewing. Without a budget per turn the
/// flooding link's task never yields and the device loses its lease; without throttling the
/// gateway writes one warning per wrong-version frame.
#[test]
fn a_flooding_link_starves_no_other_link_and_logs_a_bounded_amount() {
    let _exclusive = MACHINE.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::spawn(ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap())).unwrap();
    let (l_dev, l_garbage, l_versions) = (bind(), bind(), bind());
    let log_path = dir.path().join("gateway.stderr");
    let log = std::fs::File::create(&log_path).unwrap();
    let (_gw, metrics) =
        gateway_with_metrics(&server.url(), &[&l_dev, &l_garbage, &l_versions], &[], log.into());
    let ttl_ms = 3_000;
    let mut dev = device(&l_dev, 1, ttl_ms);
    let (garbage, _) = l_garbage.accept().unwrap();
    let (versions, _) = l_versions.accept().unwrap();
    dev.acquire().unwrap();
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(10), "the device never acquired");
        match dev.poll().unwrap() {
            Some(Event::Acquired { .. }) => break,
            None => std::thread::sleep(Duration::from_millis(5)),
            Some(e) => panic!("{e:?}"),
        }
    }

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = |mut s: TcpStream, chunk: Vec<u8>| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && s.write_all(&chunk).is_ok() {
                sent += chunk.len() as u64;
            }
            sent
        })
    };
    let mut future = acquire(1, "pump", 5);
    future.header.version = 9;
    let one = encoded(&future);
    let frames_per_chunk = 65_536 / one.len();
    let drain = {
        let mut s = versions.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65_536];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        })
    };
    let floods = [
        // Line noise: every byte value, so runs end at zeros and fail to decode in every way.
        flood(garbage, (0..65_536u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()),
        flood(versions.try_clone().unwrap(), one.repeat(frames_per_chunk)),
    ];

    let flood_start = Instant::now();
    let mut renewals = 0;
    while flood_start.elapsed() < Duration::from_secs(5) {
        match dev.poll().unwrap() {
            Some(Event::Renewed { .. }) => renewals += 1,
            Some(e) => {
                panic!("the device's lease ended during the flood after {:?}: {e:?}", flood_start.elapsed())
            }
            None => {}
        }
        assert!(dev.remaining().is_some(), "the device lost its lease after {:?}", flood_start.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent: Vec<u64> = floods.into_iter().map(|t| t.join().unwrap()).collect();
    let _ = versions.shutdown(std::net::Shutdown::Both);
    drain.join().unwrap();

    let stderr_bytes = std::fs::metadata(&log_path).unwrap().len();
    let c = |name: &str, link: &TcpListener, extra: &str| counter(metrics, name, link, extra);
    let mismatches = c("leasehold_gateway_version_mismatches_total", &l_versions, "");
    let bad: u64 = ["oversize", "cobs", "malformed"]
        .iter()
        .map(|k| c("leasehold_gateway_decode_errors_total", &l_garbage, &format!(",kind=\"{k}\"")))
        .sum();
    let forwarded = c("leasehold_gateway_requests_forwarded_total", &l_dev, "");
    println!(
        "5 s flood: {:.0} MB of garbage and {:.0} MB of wrong-version frames sent; the gateway \
         answered {mismatches} of them ({:.0}/s); {bad} bad frames counted on the garbage link; the device renewed {renewals} times (ttl {ttl_ms} ms), \
         {forwarded} requests forwarded for it; gateway stderr {stderr_bytes} bytes",
        sent[0] as f64 / 1e6,
        sent[1] as f64 / 1e6,
        mismatches as f64 / 5.0
    );
    // Renewals every ttl/3: a lease that outlived 5 s of a 3 s ttl was renewed at least twice.
    assert!(renewals >= 2, "{renewals} renewals");
    assert!(forwarded > renewals, "{forwarded} forwarded, {renewals} renewals");
    // The flood links were served too, not starved in turn.
    assert!(mismatches > 0 && bad > 0, "{mismatches} mismatches, {bad} bad frames");
    // Throttled: per link and kind, one line and at most one summary per 10 s window.
    assert!(stderr_bytes < 16 * 1024, "{stderr_bytes} bytes of stderr:\n{}", tail(&log_path));
    let log = std::fs::read_to_string(&log_path).unwrap();
    println!("gateway stderr:\n{log}");
    assert!(log.contains("speaks protocol version 9"), "{log}");
}

fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text[text.len().saturating_sub(2000)..].to_string()
}

/// Issue 11 item 9: the counters count what each connection of a link saw, and a reconnect
/// does not reset them.
#[test]
fn link_counters_are_exported_and_survive_a_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::spawn(ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap())).unwrap();
    let l = bind();
    let (_gw, metrics) = gateway_with_metrics(&server.url(), &[&l], &[], Stdio::null());
    for round in 0..2u16 {
        let (mut s, _) = l.accept().unwrap();
        let mut future = acquire(1, "pump", 5);
        future.header.version = 9;
        let good = encoded(&acquire(2 + round, "pump", 5));
        let mut bytes = [0x55; 300].to_vec(); // oversize
        bytes.push(0);
        bytes.extend(encoded(&future).repeat(3));
        bytes.extend(&good[..good.len() / 2]); // truncated: ends in the next frame's leading zero
        bytes.extend(&good);
        s.write_all(&bytes).unwrap();
        let got = read_frames(&mut s, 4);
        assert!(got[..3].iter().all(|f| matches!(f.body, Body::VersionMismatch { .. })), "{got:?}");
        assert!(matches!(reply_of(&got[3]), leasehold_core::Reply::Granted { .. }), "{got:?}");
        // The gateway sees the end of the connection and reconnects.
    }
    let (_third, _) = l.accept().unwrap();
    let c = |name: &str, extra: &str| counter(metrics, name, &l, extra);
    let errors: u64 = ["oversize", "cobs", "malformed"]
        .iter()
        .map(|k| c("leasehold_gateway_decode_errors_total", &format!(",kind=\"{k}\"")))
        .sum();
    assert_eq!(c("leasehold_gateway_link_connects_total", ""), 3);
    assert_eq!(c("leasehold_gateway_frames_total", ""), 2);
    assert_eq!(c("leasehold_gateway_decode_errors_total", ",kind=\"oversize\""), 2);
    assert_eq!(errors, 4);
    assert_eq!(c("leasehold_gateway_version_mismatches_total", ""), 6);
    assert_eq!(c("leasehold_gateway_requests_forwarded_total", ""), 2);
    assert_eq!(c("leasehold_gateway_backend_errors_total", ""), 0);
}

/// Issue 11 item 10: a link may use `--max-keys-per-link` keys; a request for one more is
/// answered `Rejected(Capacity)`, which a device's machine reports as a typed event, and
/// reconnecting does not reset the allowance.
#[test]
fn a_link_is_refused_keys_past_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::spawn(ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap())).unwrap();
    let l = bind();
    let (_gw, metrics) =
        gateway_with_metrics(&server.url(), &[&l], &["--max-keys-per-link", "2"], Stdio::null());
    let (mut s, _) = l.accept().unwrap();
    for (seq, key) in [(1, "k1"), (2, "k2"), (3, "k3"), (4, "k1")] {
        s.write_all(&encoded(&acquire(seq, key, u64::from(seq)))).unwrap();
    }
    let got = read_frames(&mut s, 4);
    let replies: Vec<_> = got.iter().map(reply_of).collect();
    use leasehold_core::Reply;
    assert!(
        matches!(replies[..], [Reply::Granted { .. }, Reply::Granted { .. }, _, Reply::Busy { .. }]),
        "{replies:?}"
    );
    assert_eq!(replies[2], Reply::Rejected(leasehold_core::Reject::Capacity));
    // Pinned: what a device of this protocol version receives for the refused request.
    assert_eq!(encoded(&got[2]), [0, 9, 1, 3, 77, 1, 3, 3, 5, 5, 0]);
    drop(s);

    // A device on the reconnected link asking for a third key gets the refusal as an event.
    let mut dev = device(&l, 1, 600);
    dev.acquire().unwrap();
    let start = Instant::now();
    let event = loop {
        assert!(start.elapsed() < Duration::from_secs(10), "no answer for the device");
        if let Some(e) = dev.poll().unwrap() {
            break e;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(
        event,
        Event::NotAcquired {
            reason: leasehold_core::NotAcquired::Rejected(leasehold_core::Reject::Capacity)
        }
    );
    let c = |name| counter(metrics, name, &l, "");
    assert_eq!(c("leasehold_gateway_key_limit_refusals_total"), 2);
    assert_eq!(c("leasehold_gateway_link_keys"), 2);
    assert_eq!(c("leasehold_gateway_requests_forwarded_total"), 3);
}

/// Issue 9 item 8: a link spec that cannot work is a usage error at start (exit 2), not a
/// reconnect loop.
#[test]
fn bad_link_specs_are_usage_errors() {
    for (links, says) in [
        (&["tcp:127.0.0.1:"][..], "empty port"),
        (&["tcp:127.0.0.1:5555", "tcp:localhost"][..], "has no port"),
        (&["tcp::5555"][..], "has no host"),
        (&["tcp:127.0.0.1:0"][..], "port 0"),
        (&["tcp:127.0.0.1:99999"][..], "not 1-65535"),
        (&["tcp:127.0.0.1:5555", "tcp:127.0.0.1:5555"][..], "given twice"),
    ] {
        let mut cmd = Command::new(BIN);
        cmd.args(["gateway", "--server", "http://127.0.0.1:1"]);
        for l in links {
            cmd.args(["--link", l]);
        }
        let mut child = Proc(cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap());
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{links:?}: still running after 20 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        child.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        assert_eq!(status.code(), Some(2), "{links:?}: {stderr}");
        assert!(stderr.contains(says), "{links:?}: {stderr}");
    }
}
