//! The device links on the host: real sockets, the host codec, and the core's own authority
//! rules (`LeaseTable`) standing in for the gateway's backend.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use embedded_io_adapters::futures_03::FromFutures;
use leasehold_core::authority::{LeaseTable, Limits};
use leasehold_core::session::wire::parse_label;
use leasehold_core::session::{Session, SessionAuthority, SessionEvent, SessionLimits};
use leasehold_core::{parse_key, Config, Duration as LDuration, Event, Instant as LInstant, Lease, OwnerId};
use leasehold_serial::host::{response_to, AsyncHostLink};
use leasehold_serial::{
    AsyncDeviceLink, AsyncSessionLink, Body, Clock, Frame, LeaseWatch, Renewal, SessionWatch,
};

#[derive(Clone, Copy)]
struct HostClock(Instant);
impl Clock for HostClock {
    fn now(&self) -> LInstant {
        LInstant::from_micros(self.0.elapsed().as_micros() as u64)
    }
}

struct TimerDelay;
impl embedded_hal_async::delay::DelayNs for TimerDelay {
    async fn delay_ns(&mut self, ns: u32) {
        async_io::Timer::after(Duration::from_nanos(u64::from(ns))).await;
    }
}

/// Answers every request on `stream` from one shared in-memory authority.
async fn gateway(stream: async_net::TcpStream, table: Arc<Mutex<LeaseTable<8>>>, epoch: Instant) -> usize {
    let mut link = AsyncHostLink::new(stream);
    let mut answered = 0;
    while let Ok(Some(frame)) = link.read_frame().await {
        let Ok(f) = frame else { continue };
        let Body::Request { key, request } = f.body else { continue };
        let now = LInstant::from_micros(epoch.elapsed().as_micros() as u64);
        let reply = table.lock().unwrap().handle(now, &key, &request).reply;
        let response = leasehold_core::Response { id: request.id, owner: request.owner, reply };
        if link.write_frame(&response_to(&f.header, response)).await.is_err() {
            break;
        }
        answered += 1;
    }
    answered
}

type Link = AsyncDeviceLink<FromFutures<async_net::TcpStream>, HostClock, TimerDelay>;

/// A device link on a socket to a gateway task answering from `table`; the task returns how
/// many requests it answered.
async fn rig(table: &Arc<Mutex<LeaseTable<8>>>, epoch: Instant, config: Config) -> (Link, smol::Task<usize>) {
    let listener = async_net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let t = table.clone();
    let host = smol::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        gateway(s, t, epoch).await
    });
    let uart = FromFutures::new(async_net::TcpStream::connect(addr).await.unwrap());
    let lease = Lease::new(OwnerId(9), config).unwrap();
    (AsyncDeviceLink::new(uart, HostClock(epoch), TimerDelay, lease, parse_key("pump").unwrap(), 4), host)
}

#[test]
fn async_device_link_acquires_renews_and_releases() {
    smol::block_on(async {
        let epoch = Instant::now();
        let table = Arc::new(Mutex::new(LeaseTable::<8>::new(Limits::default())));
        let (mut link, host) = rig(&table, epoch, Config::new(LDuration::from_millis(300))).await;

        link.acquire().unwrap();
        let Event::Acquired { fence, .. } = link.next_event().await.unwrap() else { panic!("not acquired") };
        // Renewals keep it alive well past one ttl, each one answered by the authority.
        let held_since = Instant::now();
        let mut renewals = 0;
        while held_since.elapsed() < Duration::from_millis(900) {
            match link.next_event().await.unwrap() {
                Event::Renewed { fence: f, .. } => {
                    assert_eq!(f, fence);
                    renewals += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(renewals >= 3, "{renewals} renewals");
        assert!(link.remaining().is_some());
        link.release().unwrap();
        assert_eq!(link.next_event().await.unwrap(), Event::Released { fence, acknowledged: true });
        let key = parse_key("pump").unwrap();
        assert_eq!(table.lock().unwrap().get(&key).and_then(|r| r.holder), None, "released at the authority");
        assert_eq!(link.stats().frames as usize, renewals + 2);
        drop(link);
        assert_eq!(host.await, renewals + 2);
    });
}

/// A peer that always has bytes ready: `pattern` over and over, for `reads` reads, then end of
/// stream. Writes are swallowed.
struct AlwaysReady {
    pattern: &'static [u8],
    at: usize,
    reads: usize,
}

impl futures_lite::AsyncRead for AlwaysReady {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.reads == 0 {
            return std::task::Poll::Ready(Ok(0));
        }
        self.reads -= 1;
        for b in buf.iter_mut() {
            *b = self.pattern[self.at % self.pattern.len()];
            self.at += 1;
        }
        std::task::Poll::Ready(Ok(buf.len()))
    }
}

impl futures_lite::AsyncWrite for AlwaysReady {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// How many `read_frame` calls complete on a stream that is never empty before one returns to
/// the executor (Pending); `None` if the stream ran out first (it never yielded).
fn calls_before_a_yield(pattern: &'static [u8]) -> Option<usize> {
    let mut link = AsyncHostLink::new(AlwaysReady { pattern, at: 0, reads: 100_000 });
    smol::block_on(async {
        for done in 0.. {
            match futures_lite::future::poll_once(link.read_frame()).await {
                None => return Some(done),
                Some(Ok(Some(_))) => {}
                // End of stream (or an error) before any yield.
                Some(_) => return None,
            }
        }
        None
    })
}

#[test]
fn a_link_that_is_always_ready_still_yields_to_the_executor() {
    // Garbage with no delimiter: no frame ever completes, so one call would read forever.
    assert_eq!(calls_before_a_yield(&[0x55]), Some(0));
    // A bad frame every two bytes: every call completes at once, and the caller loops forever.
    let calls = calls_before_a_yield(&[0x01, 0x00]);
    assert!(calls.is_some_and(|n| (1..=32).contains(&n)), "{calls:?}");
}

/// `next_event` dropped every 7 ms, mid-wait, for three ttls: no event, byte or request is
/// lost (the lease is renewed throughout), and another task reads the validity through the
/// watch meanwhile, never more than the machine's own.
#[test]
fn next_event_is_cancel_safe_and_the_watch_shows_validity_meanwhile() {
    smol::block_on(async {
        let epoch = Instant::now();
        let clock = HostClock(epoch);
        let table = Arc::new(Mutex::new(LeaseTable::<8>::new(Limits::default())));
        let config = Config::new(LDuration::from_millis(300));
        let (mut link, _host) = rig(&table, epoch, config).await;
        let watch: &'static LeaseWatch = Box::leak(Box::new(LeaseWatch::new()));
        link.publish_to(watch);
        assert_eq!(watch.held(clock.now()), None);

        link.acquire().unwrap();
        let Event::Acquired { fence, .. } = link.next_event().await.unwrap() else { panic!("not acquired") };
        let (seen, left) = watch.held(clock.now()).expect("the watch shows the grant");
        assert_eq!(seen, fence);
        assert!(left <= config.validity(config.ttl), "{left:?}");

        let held_since = Instant::now();
        let (mut cancelled, mut renewals) = (0, 0);
        while held_since.elapsed() < Duration::from_millis(900) {
            let tick = async {
                async_io::Timer::after(Duration::from_millis(7)).await;
                None
            };
            match futures_lite::future::or(async { Some(link.next_event().await) }, tick).await {
                Some(Ok(Event::Renewed { fence: f, .. })) => {
                    assert_eq!(f, fence);
                    renewals += 1;
                }
                Some(other) => panic!("unexpected {other:?}"),
                None => cancelled += 1,
            }
            // The reading task: the watch never promises more than the machine.
            let now = clock.now();
            let (f, w) = watch.held(now).expect("held throughout");
            assert_eq!(f, fence);
            assert!(
                w <= link.lease().remaining(now).unwrap_or(LDuration::ZERO),
                "watch ahead of the machine"
            );
        }
        assert!(cancelled >= 10, "{cancelled} cancellations");
        assert!(renewals >= 3, "{renewals} renewals with next_event cancelled {cancelled} times");

        link.release().unwrap();
        assert_eq!(watch.held(clock.now()), None, "gone from the watch at release");
        assert_eq!(link.next_event().await.unwrap(), Event::Released { fence, acknowledged: true });
    });
}

/// Answers every session request on `stream` from one in-memory session authority (the core's
/// rules, as the built-in server applies them; keepalives are answered at once, not held).
async fn session_gateway(stream: async_net::TcpStream, epoch: Instant) {
    use leasehold_core::session::wire::{Secret, SessionOp};
    let mut authority = SessionAuthority::<4, 8, 4>::new(SessionLimits::default());
    let mut link = AsyncHostLink::new(stream);
    while let Ok(Some(frame)) = link.read_frame().await {
        let Ok(Frame { header, body: Body::SessionRequest(request) }) = frame else { continue };
        let now = LInstant::from_micros(epoch.elapsed().as_micros() as u64);
        let reply = match &request.op {
            SessionOp::Open { ttl, label } => authority.open(now, *ttl, label, Secret::from_bytes([5; 16])),
            _ => authority.handle(now, &request),
        };
        let answer = Frame::new(header.seq, header.device, Body::SessionResponse(request.answer(reply)));
        if link.write_frame(&answer).await.is_err() {
            break;
        }
    }
}

/// The async session link with `next_event` dropped every 7 ms, mid-wait, for three ttls: the
/// session holding two keys is renewed throughout, and another task reads both keys' fences
/// and the session's validity through a `SessionWatch` meanwhile, never more than the
/// machine's own; a released key leaves the watch at once.
#[test]
fn async_session_link_publishes_its_keys_and_validity_to_a_watch_while_cancelled() {
    smol::block_on(async {
        let epoch = Instant::now();
        let clock = HostClock(epoch);
        let listener = async_net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _host = smol::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            session_gateway(s, epoch).await
        });
        let uart = FromFutures::new(async_net::TcpStream::connect(addr).await.unwrap());
        let ttl = LDuration::from_millis(400);
        let mut config = Config::new(ttl);
        config.renew_every = ttl.mul_div_floor(1, 4);
        config.request_timeout = ttl.mul_div_floor(1, 3);
        let validity = config.validity(ttl);
        let session = Session::<2, 0>::new(parse_label("watched").unwrap(), config).unwrap();
        let mut link = AsyncSessionLink::new(uart, clock, TimerDelay, session, 4);
        let watch: &'static SessionWatch<2> = Box::leak(Box::new(SessionWatch::new()));
        link.publish_to(watch);
        let (pump, valve) = (parse_key("pump").unwrap(), parse_key("valve").unwrap());
        assert_eq!(watch.renewed(), None, "no session yet");

        link.open().unwrap();
        assert!(matches!(link.next_event().await.unwrap(), SessionEvent::Opened { .. }));
        assert!(watch.remaining(clock.now()).is_some_and(|r| r <= validity));
        assert_eq!(watch.held(clock.now(), &pump), None, "opened, nothing held yet");
        let mut fences = Vec::new();
        for key in [&pump, &valve] {
            link.acquire(key.clone(), false).unwrap();
            let SessionEvent::Acquired { key: k, fence, .. } = link.next_event().await.unwrap() else {
                panic!("{key} not acquired")
            };
            assert_eq!(&k, key);
            assert_eq!(watch.held(clock.now(), key).map(|h| h.0), Some(fence), "{key} not on the watch");
            fences.push(fence);
        }

        // A task elsewhere (a thread, here) waiting for the next renewal is woken by it.
        let before = watch.renewed();
        let waiter = std::thread::spawn(move || futures_lite::future::block_on(watch.changed(before)));
        let driven = Instant::now();
        while !waiter.is_finished() {
            assert!(
                driven.elapsed() < Duration::from_secs(5),
                "the waiter was not woken by a renewal in 5 s"
            );
            let tick = async {
                async_io::Timer::after(Duration::from_millis(7)).await;
                None
            };
            if let Some(event) = futures_lite::future::or(async { Some(link.next_event().await) }, tick).await
            {
                panic!("unexpected {event:?}");
            }
        }
        let next = waiter.join().unwrap();
        assert!(
            before.zip(next).is_some_and(|(b, n)| b.valid_until < n.valid_until),
            "{before:?} then {next:?}"
        );

        let held_since = Instant::now();
        let mut cancelled = 0;
        let mut renewals: Vec<Renewal> = watch.renewed().into_iter().collect();
        while held_since.elapsed() < Duration::from_millis(1_200) {
            let tick = async {
                async_io::Timer::after(Duration::from_millis(7)).await;
                None
            };
            if let Some(event) = futures_lite::future::or(async { Some(link.next_event().await) }, tick).await
            {
                panic!("unexpected {event:?}");
            }
            cancelled += 1;
            // The reading task: the watch never promises more than the machine.
            let now = clock.now();
            for (key, fence) in [&pump, &valve].into_iter().zip(&fences) {
                let (f, left) =
                    watch.held(now, key).unwrap_or_else(|| panic!("{key} dropped from the watch"));
                assert_eq!(f, *fence);
                assert!(
                    left <= link.session().remaining(now, key).unwrap_or(LDuration::ZERO),
                    "watch ahead of the machine"
                );
            }
            let r = watch.renewed().unwrap();
            if renewals.last() != Some(&r) {
                // Seen after the keepalive that earned it was sent, and not in the future.
                assert!(r.valid_until - validity <= r.seen_at && r.seen_at <= now, "{r:?} at {now:?}");
                renewals.push(r);
            }
        }
        assert!(cancelled >= 10, "{cancelled} cancellations");
        // A keepalive every ttl/4 = 100 ms for 1.2 s; the watch may miss none of their answers.
        assert!(
            renewals.len() >= 6,
            "{} renewals seen with next_event cancelled {cancelled} times",
            renewals.len()
        );
        assert!(renewals.windows(2).all(|w| w[0].valid_until < w[1].valid_until), "{renewals:?}");

        link.release(&valve).unwrap();
        assert_eq!(watch.held(clock.now(), &valve), None, "gone from the watch at release");
        assert!(watch.held(clock.now(), &pump).is_some(), "the pump is still held");
        assert!(matches!(
            link.next_event().await.unwrap(),
            SessionEvent::Released { acknowledged: true, .. }
        ));
        link.close().unwrap();
        assert_eq!(watch.held(clock.now(), &pump), None, "gone from the watch at close");
    });
}
