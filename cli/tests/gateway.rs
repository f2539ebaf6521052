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

    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    let mut chunk = [0u8; 256];
    while got.len() < 2 {
        let n = s.read(&mut chunk).expect("gateway answers");
        assert!(n > 0, "gateway closed the link");
        got.extend(chunk[..n].iter().filter_map(|&b| dec.push(b)).filter_map(Result::ok));
    }
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
