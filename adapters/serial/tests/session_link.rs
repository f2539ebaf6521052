//! The blocking `SessionLink` on the host: in-memory pipes for the UART, a manual clock, and
//! a host answering from the core's own session rules (`SessionAuthority`). Time moves only
//! when the test says so, so every step is exact.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use leasehold_core::session::wire::{
    parse_label, Secret, SessionId, SessionOp, SessionReply, SessionRequest,
};
use leasehold_core::session::{Session, SessionAuthority, SessionEvent, SessionLimits};
use leasehold_core::{parse_key, Config, Duration, Instant, Key};
use leasehold_serial::{
    Body, Clock, Frame, FrameDecoder, Header, SessionLink, SessionRefusal, MAX_FRAME, VERSION,
};

type Pipe = Rc<RefCell<VecDeque<u8>>>;

struct DeviceEnd {
    rx: Pipe,
    tx: Pipe,
}
impl embedded_io::ErrorType for DeviceEnd {
    type Error = embedded_io::ErrorKind;
}
impl embedded_io::ReadReady for DeviceEnd {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        Ok(!self.rx.borrow().is_empty())
    }
}
impl embedded_io::Read for DeviceEnd {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let mut rx = self.rx.borrow_mut();
        // A small UART FIFO: frames arrive in pieces.
        let n = buf.len().min(rx.len()).min(7);
        for (b, x) in buf.iter_mut().zip(rx.drain(..n)) {
            *b = x;
        }
        Ok(n)
    }
}
impl embedded_io::Write for DeviceEnd {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        self.tx.borrow_mut().extend(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

#[derive(Clone)]
struct ManualClock(Rc<Cell<u64>>);
impl Clock for ManualClock {
    fn now(&self) -> Instant {
        Instant::from_micros(self.0.get())
    }
}

const DEVICE: u32 = 7;
const TTL: Duration = Duration::from_millis(4_000);

struct Rig {
    link: SessionLink<DeviceEnd, ManualClock, 4>,
    authority: SessionAuthority<4, 8, 4>,
    clock: Rc<Cell<u64>>,
    to_device: Pipe,
    to_host: Pipe,
    decoder: FrameDecoder,
    events: Vec<SessionEvent>,
}

fn config() -> Config {
    let mut c = Config::new(TTL);
    c.renew_every = TTL.mul_div_floor(1, 4);
    c.request_timeout = TTL.mul_div_floor(1, 3);
    c
}

impl Rig {
    fn new() -> Rig {
        let (to_device, to_host): (Pipe, Pipe) = Default::default();
        let clock = Rc::new(Cell::new(1_000_000));
        let uart = DeviceEnd { rx: to_device.clone(), tx: to_host.clone() };
        let session = Session::new(parse_label("dev").unwrap(), config()).unwrap();
        Rig {
            link: SessionLink::new(uart, ManualClock(clock.clone()), session, DEVICE),
            authority: SessionAuthority::new(SessionLimits::default()),
            clock,
            to_device,
            to_host,
            decoder: FrameDecoder::new(),
            events: Vec::new(),
        }
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.clock.get())
    }

    fn advance(&mut self, d: Duration) {
        self.clock.set(self.clock.get() + d.as_micros());
    }

    fn poll(&mut self) {
        while let Some(e) = self.link.poll().unwrap() {
            self.events.push(e);
        }
    }

    /// The session requests the device has sent since the last call, with their headers.
    fn sent(&mut self) -> Vec<(Header, SessionRequest)> {
        let bytes: Vec<u8> = self.to_host.borrow_mut().drain(..).collect();
        bytes
            .iter()
            .filter_map(|&b| self.decoder.push(b))
            .map(|f| match f.unwrap() {
                Frame { header, body: Body::SessionRequest(r) } => (header, r),
                f => panic!("the device sent {f:?}"),
            })
            .collect()
    }

    fn send_to_device(&mut self, frame: Frame) {
        let mut buf = [0u8; MAX_FRAME];
        self.to_device.borrow_mut().extend(frame.encode(&mut buf).unwrap());
    }

    /// Answers `requests` from the authority.
    fn answer(&mut self, requests: Vec<(Header, SessionRequest)>) {
        for (header, r) in requests {
            let now = self.now();
            let reply = match &r.op {
                SessionOp::Open { ttl, label } => {
                    self.authority.open(now, *ttl, label, Secret::from_bytes([3; 16]))
                }
                _ => self.authority.handle(now, &r),
            };
            self.send_to_device(Frame::new(
                header.seq,
                header.device,
                Body::SessionResponse(r.answer(reply)),
            ));
        }
        self.poll();
    }

    /// Polls, answers everything sent, until nothing more is sent.
    fn settle(&mut self) {
        self.poll();
        loop {
            let sent = self.sent();
            if sent.is_empty() {
                return;
            }
            self.answer(sent);
        }
    }

    fn open_and_hold(&mut self, keys: &[&str]) -> Vec<Key> {
        self.link.open().unwrap();
        self.settle();
        let keys: Vec<Key> = keys.iter().map(|k| parse_key(k).unwrap()).collect();
        for k in &keys {
            self.link.acquire(k.clone(), false).unwrap();
        }
        self.settle();
        for k in &keys {
            assert!(self.link.remaining(k).is_some(), "{k} not held: {:?}", self.events);
        }
        keys
    }
}

#[test]
fn one_keepalive_frame_renews_every_key() {
    let mut rig = Rig::new();
    let keys = rig.open_and_hold(&["a", "b", "c"]);
    let before: Vec<Instant> = keys.iter().map(|k| rig.now() + rig.link.remaining(k).unwrap()).collect();
    // Ten keepalive periods: each sends exactly one frame, a keepalive, whatever the number of keys.
    for _ in 0..10 {
        rig.advance(TTL.mul_div_floor(1, 4));
        rig.poll();
        let sent = rig.sent();
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].1.op, SessionOp::KeepAlive);
        rig.answer(sent);
    }
    for (k, was) in keys.iter().zip(before) {
        let until = rig.now() + rig.link.remaining(k).expect("still held");
        assert!(until > was + TTL, "{k} was not renewed");
    }
    // And the seqs went strictly up, each frame carrying the session's secret.
    assert_eq!(rig.link.stats().decoder.errors(), 0);
}

#[test]
fn a_queued_key_has_a_keepalive_out_at_once() {
    let mut rig = Rig::new();
    rig.open_and_hold(&[]);
    // Someone else holds "pump".
    let now = rig.now();
    let SessionReply::Opened { session: other, .. } =
        rig.authority.open(now, TTL, &parse_label("other").unwrap(), Secret::from_bytes([8; 16]))
    else {
        panic!()
    };
    let pump = parse_key("pump").unwrap();
    let take = SessionRequest {
        session: other,
        secret: Secret::from_bytes([8; 16]),
        seq: leasehold_core::session::wire::Seq(1),
        op: SessionOp::Acquire { key: pump.clone(), wait: false },
    };
    assert!(matches!(rig.authority.handle(now, &take), SessionReply::Granted { .. }));

    rig.link.acquire(pump.clone(), true).unwrap();
    rig.poll();
    let sent = rig.sent();
    rig.answer(sent);
    assert!(rig.events.iter().any(|e| matches!(e, SessionEvent::Queued { .. })), "{:?}", rig.events);
    // No time has passed, yet a keepalive is out: the one a gateway would hold until the grant.
    let sent = rig.sent();
    assert_eq!(sent.iter().map(|(_, r)| &r.op).collect::<Vec<_>>(), [&SessionOp::KeepAlive]);
}

#[test]
fn refusals_are_retried_or_ignored_by_kind() {
    let mut rig = Rig::new();
    let keys = rig.open_and_hold(&["pump"]);
    let session = rig.link.session().id().unwrap();
    rig.advance(TTL.mul_div_floor(1, 4));
    rig.poll();
    let sent = rig.sent();
    let (header, keepalive) = sent.into_iter().next().unwrap();
    let refused =
        |why| Frame::new(header.seq, DEVICE, Body::SessionRefused { session, seq: keepalive.seq, why });

    // Forged: about someone else's frame. Ignored: the keepalive stays out, nothing is resent.
    rig.send_to_device(refused(SessionRefusal::Forged));
    rig.advance(Duration::from_millis(500));
    rig.poll();
    assert!(rig.sent().is_empty());
    assert_eq!(rig.link.stats().forged, 1);

    // WrongLink: never forwarded, so it is retried (after the backoff) with a new seq.
    rig.send_to_device(refused(SessionRefusal::WrongLink));
    rig.poll();
    assert_eq!(rig.link.stats().wrong_link, 1);
    rig.advance(Duration::from_millis(200));
    rig.poll();
    let retry = rig.sent();
    assert_eq!(retry.len(), 1, "{retry:?}");
    assert_eq!(retry[0].1.op, SessionOp::KeepAlive);
    assert!(retry[0].1.seq > keepalive.seq);

    // A version mismatch for that frame: also retried.
    let (h, r) = retry[0].clone();
    rig.send_to_device(Frame::new(h.seq, DEVICE, Body::VersionMismatch { supported: VERSION + 1 }));
    rig.poll();
    rig.advance(Duration::from_millis(200));
    rig.poll();
    let again = rig.sent();
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(again[0].1.seq > r.seq);
    rig.answer(again);
    assert!(rig.link.remaining(&keys[0]).is_some());
    assert!(!rig.events.iter().any(|e| matches!(e, SessionEvent::Lost { .. })), "{:?}", rig.events);
    // A refusal for another device is not ours.
    rig.send_to_device(Frame::new(
        1,
        DEVICE + 1,
        Body::SessionRefused { session: SessionId(99), seq: keepalive.seq, why: SessionRefusal::WrongLink },
    ));
    rig.poll();
    assert_eq!(rig.link.stats().foreign, 1);
}
