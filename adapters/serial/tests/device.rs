//! The blocking `DeviceLink` on the host: in-memory pipes for the UART, a manual clock, and the
//! host codec (`HostLink`) answering from the core's own authority rules (`LeaseTable`).
//! Time moves only when the test says so, so every step is exact.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::rc::Rc;

use leasehold_core::authority::{LeaseTable, Limits};
use leasehold_core::{
    parse_key, Config, Duration, Event, Fence, Instant, Lease, Op, OwnerId, Request, RequestId,
};
use leasehold_serial::host::{DeviceRequest, HostLink};
use leasehold_serial::{Body, Clock, DeviceLink, Frame, MAX_FRAME};

type Pipe = Rc<RefCell<VecDeque<u8>>>;

/// The device's end of a UART: bytes from the host in `rx`, bytes to the host into `tx`.
struct DeviceEnd {
    rx: Pipe,
    tx: Pipe,
    fail_writes: Rc<Cell<bool>>,
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
        // A small UART FIFO: at most 7 bytes per read, so frames arrive in pieces.
        let n = buf.len().min(rx.len()).min(7);
        for (b, x) in buf.iter_mut().zip(rx.drain(..n)) {
            *b = x;
        }
        Ok(n)
    }
}
impl embedded_io::Write for DeviceEnd {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        if self.fail_writes.get() {
            return Err(embedded_io::ErrorKind::TimedOut);
        }
        self.tx.borrow_mut().extend(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// The host's end: a std byte stream. An empty pipe reads as end of stream, which is how
/// `HostLink::next_request` tells the test there is nothing more to answer for now.
struct HostEnd {
    rx: Pipe,
    tx: Pipe,
}

impl io::Read for HostEnd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rx = self.rx.borrow_mut();
        let n = buf.len().min(rx.len());
        for (b, x) in buf.iter_mut().zip(rx.drain(..n)) {
            *b = x;
        }
        Ok(n)
    }
}
impl io::Write for HostEnd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx.borrow_mut().extend(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
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
const OWNER: OwnerId = OwnerId(0xd1);
const TTL: Duration = Duration::from_millis(6_400);

struct Rig {
    link: DeviceLink<DeviceEnd, ManualClock>,
    host: HostLink<HostEnd>,
    table: LeaseTable<4>,
    clock: Rc<Cell<u64>>,
    to_device: Pipe,
    fail_writes: Rc<Cell<bool>>,
}

impl Rig {
    fn new() -> Rig {
        let (to_device, to_host): (Pipe, Pipe) = Default::default();
        let fail_writes = Rc::new(Cell::new(false));
        let clock = Rc::new(Cell::new(1_000_000));
        let uart = DeviceEnd { rx: to_device.clone(), tx: to_host.clone(), fail_writes: fail_writes.clone() };
        let lease = Lease::new(OWNER, Config::new(TTL)).unwrap();
        let link =
            DeviceLink::new(uart, ManualClock(clock.clone()), lease, parse_key("pump").unwrap(), DEVICE);
        let host = HostLink::new(HostEnd { rx: to_host, tx: to_device.clone() });
        Rig { link, host, table: LeaseTable::new(Limits::default()), clock, to_device, fail_writes }
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.clock.get())
    }

    fn advance_to(&mut self, t: Instant) {
        assert!(t >= self.now(), "time goes forward");
        self.clock.set(t.as_micros());
    }

    /// Every request the device has sent so far.
    fn requests(&mut self) -> Vec<DeviceRequest> {
        std::iter::from_fn(|| self.host.next_request().unwrap()).collect()
    }

    /// Answers every request from the table, and returns what was asked.
    fn serve(&mut self) -> Vec<Request> {
        let mut asked = Vec::new();
        for r in self.requests() {
            assert_eq!(r.header.device, DEVICE);
            assert_eq!(r.key.as_str(), "pump");
            let reply = self.table.handle(self.now(), &r.key, &r.request).reply;
            self.host.answer(&r, reply).unwrap();
            asked.push(r.request);
        }
        asked
    }

    /// Polls until the link has nothing more to say.
    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.link.poll().unwrap()).collect()
    }

    fn holder(&self) -> Option<(OwnerId, Fence)> {
        let r = self.table.get(&parse_key("pump").unwrap())?;
        r.holder.map(|h| (h.owner, h.fence))
    }
}

#[test]
fn acquire_renew_release_cycle_through_the_host_codec() {
    let mut rig = Rig::new();
    rig.link.acquire().unwrap();
    assert_eq!(rig.events(), []);
    let asked = rig.serve();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].owner, OWNER);
    assert_eq!(asked[0].op, Op::Acquire { ttl: TTL });

    let events = rig.events();
    let [Event::Acquired { fence, valid_until, .. }] = events[..] else { panic!("{events:?}") };
    assert_eq!(fence, Fence(1));
    assert!(valid_until > rig.now() && valid_until <= rig.now() + TTL);
    assert_eq!(rig.holder(), Some((OWNER, fence)));
    assert!(rig.link.remaining().is_some());

    // Renewals, each at the machine's own deadline, keep it for three ttls.
    let mut last_valid = valid_until;
    let start = rig.now();
    let mut renewals = 0;
    while rig.now() < start + Duration::from_micros(TTL.as_micros() * 3) {
        let due = rig.link.poll_timeout().expect("a held lease has a timer");
        rig.advance_to(due);
        assert_eq!(rig.events(), [], "nothing happens before the reply");
        let asked = rig.serve();
        assert_eq!(asked.len(), 1, "one renewal per deadline");
        assert_eq!(asked[0].op, Op::Renew { fence, ttl: TTL });
        let events = rig.events();
        let [Event::Renewed { fence: f, valid_until }] = events[..] else { panic!("{events:?}") };
        assert_eq!(f, fence, "renewal keeps the fence");
        assert!(valid_until > last_valid);
        last_valid = valid_until;
        renewals += 1;
    }
    assert!(renewals >= 9, "{renewals} renewals in three ttls");
    assert_eq!(rig.holder(), Some((OWNER, fence)));

    rig.link.release().unwrap();
    assert_eq!(rig.events(), []);
    assert_eq!(rig.serve().iter().map(|r| r.op).collect::<Vec<_>>(), [Op::Release { fence }]);
    assert_eq!(rig.events(), [Event::Released { fence, acknowledged: true }]);
    assert_eq!(rig.holder(), None, "released at the authority");
    assert_eq!(rig.link.remaining(), None);

    // A new grant has a higher fence.
    rig.link.acquire().unwrap();
    rig.events();
    rig.serve();
    assert!(matches!(rig.events()[..], [Event::Acquired { fence: Fence(2), .. }]));

    let stats = rig.link.link_stats();
    assert_eq!(stats.decoder.frames, renewals + 3);
    assert_eq!(stats.decoder.errors(), 0);
    assert_eq!((stats.foreign, stats.version_mismatches, stats.write_errors), (0, 0, 0));
    assert_eq!(rig.host.stats().frames, renewals + 3);
}

#[test]
fn line_noise_and_other_devices_frames_do_not_disturb_the_device() {
    let mut rig = Rig::new();
    rig.link.acquire().unwrap();
    rig.events();
    let reqs = rig.requests();
    let [r] = &reqs[..] else { panic!("{reqs:?}") };
    let now = rig.now();
    let reply = rig.table.handle(now, &r.key, &r.request).reply;

    // Noise, a truncated frame, the same answer addressed to another device, then ours.
    let mut buf = [0u8; MAX_FRAME];
    let mut other = r.answer(reply);
    other.header.device = DEVICE + 1;
    let other = other.encode(&mut buf).unwrap().to_vec();
    let ours = r.answer(reply).encode(&mut buf).unwrap().to_vec();
    let mut line = rig.to_device.borrow_mut();
    line.extend(b"\xff\x13noise");
    line.extend(&ours[..ours.len() - 4]);
    line.extend(&other);
    line.extend(&ours);
    drop(line);

    assert!(matches!(rig.events()[..], [Event::Acquired { fence: Fence(1), .. }]));
    let s = rig.link.link_stats();
    assert_eq!(s.decoder.frames, 2);
    assert_eq!(s.decoder.cobs + s.decoder.malformed, 2, "noise and truncation: {s:?}");
    assert_eq!(s.foreign, 1);
}

#[test]
fn a_failed_write_is_reported_to_the_lease_which_retries() {
    let mut rig = Rig::new();
    rig.fail_writes.set(true);
    rig.link.acquire().unwrap();
    assert_eq!(rig.link.poll(), Err(embedded_io::ErrorKind::TimedOut));
    assert_eq!(rig.link.link_stats().write_errors, 1);
    // The machine knows the request is lost: it retries after its backoff, well before the
    // request timeout it would otherwise have waited out.
    let retry = rig.link.poll_timeout().expect("a retry is scheduled");
    assert!(retry < rig.now() + Config::new(TTL).request_timeout, "{retry:?}");
    assert_eq!(rig.requests(), []);

    rig.fail_writes.set(false);
    rig.advance_to(retry);
    assert_eq!(rig.events(), []);
    let asked = rig.serve();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].id, RequestId(1), "a new request, not the lost one");
    assert!(matches!(rig.events()[..], [Event::Acquired { fence: Fence(1), .. }]));
}

#[test]
fn a_version_mismatch_reply_is_reported_and_counted() {
    let mut rig = Rig::new();
    rig.link.acquire().unwrap();
    rig.events();
    let reqs = rig.requests();
    let [r] = &reqs[..] else { panic!("{reqs:?}") };
    // A gateway of another version answers with a notice echoing the frame.
    let notice = Frame::new(r.header.seq, DEVICE, Body::VersionMismatch { supported: 9 });
    let mut buf = [0u8; MAX_FRAME];
    rig.to_device.borrow_mut().extend(notice.encode(&mut buf).unwrap());
    assert_eq!(rig.events(), []);
    assert_eq!(rig.link.link_stats().version_mismatches, 1);
    let retry = rig.link.poll_timeout().unwrap();
    assert!(retry < rig.now() + Config::new(TTL).request_timeout, "treated as a lost request");
}

#[test]
fn the_host_answers_a_frame_of_another_version_itself() {
    let mut rig = Rig::new();
    let request = Request { id: RequestId(0), owner: OWNER, op: Op::Acquire { ttl: TTL } };
    let mut future = Frame::new(77, 3, Body::Request { key: parse_key("pump").unwrap(), request });
    future.header.version = 2;
    let mut buf = [0u8; MAX_FRAME];
    let bytes = future.encode(&mut buf).unwrap().to_vec();
    // Written straight onto the host's input, as a newer device would.
    let to_host = {
        let Rig { host, .. } = &mut rig;
        host.get_mut().rx.clone()
    };
    to_host.borrow_mut().extend(&bytes);
    assert_eq!(rig.requests(), [], "nothing to forward");
    assert_eq!(rig.host.stats().wrong_version, 1);
    let reply: Vec<u8> = rig.to_device.borrow_mut().drain(..).collect();
    let mut d = leasehold_serial::FrameDecoder::new();
    let got: Vec<_> = reply.iter().filter_map(|&b| d.push(b)).collect();
    assert_eq!(got, [Ok(Frame::new(77, 3, Body::VersionMismatch { supported: 1 }))]);
}
