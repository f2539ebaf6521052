//! The session driver on a clock the test moves by hand: keepalives, loss at the validity
//! bound, pushed grants and acquisition deadlines, each at the instant the core's contract
//! names, with no wall-clock waiting. The authority is the core's own rulebook
//! (`SessionAuthority`) in this process, on the same clock, holding keepalives the way the
//! built-in server does (until the session has news or the hold is over), so time and push
//! mean the same thing on both sides.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use event_listener::Event as Signal;
use futures_lite::future;
use leasehold_client::{
    AcquireError, Clock, Health, LostReason, ManualClock, Options, SessionBackend, SessionClient,
    TransportError,
};
use leasehold_core::session::wire::{Secret, SessionOp, SessionRequest, SessionResponse};
use leasehold_core::session::{SessionAuthority, SessionLimits};
use leasehold_core::{parse_key, Instant};

type Authority = SessionAuthority<16, 64, 64, 8>;

/// The core's session rules in memory, on the test's clock. `silent`: nothing is answered any
/// more (a server that vanished mid-connection), held keepalives included.
#[derive(Clone)]
struct InProcess {
    authority: Arc<Mutex<Box<Authority>>>,
    clock: ManualClock,
    /// Rung after every request handled: a held keepalive looks again for news.
    handled: Arc<Signal>,
    silent: Arc<AtomicBool>,
    /// When each keepalive arrived (the holder's send time: the clock stands still while the
    /// driver sends).
    arrivals: Arc<Mutex<Vec<Instant>>>,
    /// When each keepalive that was answered arrived.
    keepalives: Arc<Mutex<Vec<Instant>>>,
    /// Calls in progress: the driver has neither had their answer nor dropped them.
    live: Arc<AtomicUsize>,
}

/// Counts a call as live until its future ends or is dropped.
struct Live(Arc<AtomicUsize>);

impl Live {
    fn new(n: &Arc<AtomicUsize>) -> Live {
        n.fetch_add(1, Ordering::SeqCst);
        Live(n.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl InProcess {
    fn new(clock: &ManualClock) -> InProcess {
        InProcess {
            authority: Arc::new(Mutex::new(Box::new(Authority::new(SessionLimits::default())))),
            clock: clock.clone(),
            handled: Arc::new(Signal::new()),
            silent: Arc::new(AtomicBool::new(false)),
            arrivals: Arc::new(Mutex::new(Vec::new())),
            keepalives: Arc::new(Mutex::new(Vec::new())),
            live: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn authority(&self) -> MutexGuard<'_, Box<Authority>> {
        self.authority.lock().unwrap()
    }

    fn arrivals(&self) -> Vec<Instant> {
        self.arrivals.lock().unwrap().clone()
    }

    fn keepalives(&self) -> Vec<Instant> {
        self.keepalives.lock().unwrap().clone()
    }

    fn waiters(&self, key: &str) -> usize {
        self.authority().waiters(&parse_key(key).unwrap()).count()
    }
}

impl SessionBackend for InProcess {
    async fn call(&self, req: SessionRequest, hold: Duration) -> Result<SessionResponse, TransportError> {
        let _live = Live::new(&self.live);
        let arrived = self.clock.now();
        let keepalive = matches!(req.op, SessionOp::KeepAlive | SessionOp::KeepAliveSeen { .. });
        if keepalive {
            self.arrivals.lock().unwrap().push(arrived);
            let until = arrived + hold.into();
            loop {
                let listener = self.handled.listen();
                {
                    let a = self.authority();
                    if a.has_news(req.session)
                        || a.session(req.session).is_none()
                        || self.clock.now() >= until
                    {
                        break;
                    }
                }
                future::or(listener, self.clock.sleep_until(until)).await;
            }
        }
        if self.silent.load(Ordering::SeqCst) {
            return future::pending().await;
        }
        let now = self.clock.now();
        let reply = {
            let mut a = self.authority();
            match &req.op {
                SessionOp::Open { ttl, label } => {
                    let mut bytes = [0u8; 16];
                    bytes[..8].copy_from_slice(&fastrand::u64(..).to_le_bytes());
                    bytes[8..].copy_from_slice(&fastrand::u64(..).to_le_bytes());
                    a.open(now, *ttl, label, Secret::from_bytes(bytes))
                }
                _ => a.handle(now, &req),
            }
        };
        if keepalive {
            self.keepalives.lock().unwrap().push(arrived);
        }
        self.handled.notify(usize::MAX);
        Ok(SessionResponse { session: req.session, seq: req.seq, reply })
    }
}

/// Waits in real time (bounded, for a loaded machine) until `done`: the driver runs on its own
/// thread, so what it makes of a step of the manual clock shows a moment later.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what} never happened");
        std::thread::yield_now();
    }
}

const TTL: Duration = Duration::from_secs(10);

fn start() -> (ManualClock, InProcess) {
    // Days ahead of the process's monotonic clock, so a deadline the driver wrongly kept on
    // the wall clock would not come within the test (nor its real-time bound).
    let clock = ManualClock::new(Instant::from_micros(1_000_000 * 1_000_000));
    (clock.clone(), InProcess::new(&clock))
}

fn client(authority: &InProcess, clock: &ManualClock, label: &str, ttl: Duration) -> SessionClient {
    SessionClient::with_clock(authority.clone(), label, Options::session(ttl), clock.clone()).unwrap()
}

#[test]
fn a_minute_of_keepalives_renews_every_key_once_per_interval_and_all_are_lost_at_the_validity_bound() {
    let real = std::time::Instant::now();
    let (clock, authority) = start();
    let config = Options::session(TTL).config;
    let c = client(&authority, &clock, "holder", TTL);
    let keys: Vec<String> = (0..12).map(|i| format!("k{i}")).collect();
    let leases: Vec<_> = keys.iter().map(|k| future::block_on(c.acquire(k)).unwrap()).collect();
    let first = authority.arrivals().len();

    // A minute of manual time, one keepalive interval at a time. The server holds each
    // keepalive for the hold (a renewal interval: nothing to push), answers it as the next one
    // is due, and that one keepalive renews all twelve keys.
    let validity = config.drift.shrink(config.ttl) - config.margin;
    let steps = (60_000_000 / config.renew_every.as_micros()) as usize;
    for i in 1..=steps {
        clock.advance(config.renew_every);
        eventually(&format!("keepalive {i} sent"), || authority.arrivals().len() >= first + i);
        // The one sent an interval ago is answered now (the test's clock stands still until
        // the next step), and restores every key's validity as of its sending.
        if let Some(&sent) = authority.keepalives().last() {
            let left = sent + validity - clock.now();
            for (k, lease) in keys.iter().zip(&leases) {
                eventually(&format!("{k} renewed at step {i}"), || lease.remaining() == Some(left.into()));
                assert!(lease.is_healthy(), "{k} at step {i}: {:?}", lease.health());
            }
        }
    }
    let times = authority.arrivals();
    assert_eq!(times.len(), first + steps, "one keepalive per interval for all keys, no more: {times:?}");
    for w in times[first..].windows(2) {
        assert_eq!(w[1] - w[0], config.renew_every, "keepalives one interval apart: {times:?}");
    }

    // The authority goes silent: the keepalive out now is never answered, nor are its
    // retries. The last answered one was sent at `sent`; every key's validity ends at
    // sent + ttl·(1−ε) − margin, not a microsecond before or after, all at once.
    authority.silent.store(true, Ordering::SeqCst);
    let sent = *authority.keepalives().last().unwrap();
    let end = sent + validity;
    clock.advance(end - clock.now() - leasehold_core::Duration::from_micros(1));
    for lease in &leases {
        assert!(lease.remaining().is_some(), "still valid one microsecond before its end");
    }
    clock.advance(leasehold_core::Duration::from_micros(1));
    for (k, lease) in keys.iter().zip(&leases) {
        assert_eq!(lease.remaining(), None, "{k} not valid at its end");
        assert_eq!(lease.health(), Health::Lost, "{k}");
        let why = future::block_on(lease.lost());
        assert!(matches!(why, LostReason::Expired), "{k}: {why:?}");
    }
    assert_eq!(authority.keepalives().len(), first + steps - 1, "nothing answered while silent");
    // The driver gives each unanswered keepalive up a ttl after its sending (its late reply
    // could renew until then), dropping the transport's future: nothing is left waiting on
    // the silent authority.
    assert!(authority.live.load(Ordering::SeqCst) > 0, "the unanswered keepalives are still out");
    clock.advance(config.ttl);
    eventually("every unanswered call dropped", || authority.live.load(Ordering::SeqCst) == 0);
    // Over a minute of the session's time, in a fraction of it on the wall clock (bounded
    // loosely, for a loaded machine): nothing waited for real time.
    assert!(real.elapsed() < Duration::from_secs(20), "took {:?} of real time", real.elapsed());
}

#[test]
fn a_release_pushes_the_grant_to_the_waiter_while_the_clock_stands_still() {
    let (clock, authority) = start();
    let holder = client(&authority, &clock, "holder", TTL);
    let waiter = client(&authority, &clock, "waiter", TTL);
    let held = future::block_on(holder.acquire("k")).unwrap();
    let first = held.fence().unwrap();

    let waiting = std::thread::spawn(move || {
        let lease = future::block_on(waiter.acquire("k"));
        (lease, waiter)
    });
    eventually("the waiter queued", || authority.waiters("k") == 1);
    let at = clock.now();
    future::block_on(held.release()).unwrap();
    eventually("the waiter's grant", || waiting.is_finished());

    // No time passes: the grant can only have come in the reply to the waiter's held
    // keepalive, pushed by the release, not by a poll or a renewal.
    let (lease, _waiter) = waiting.join().unwrap();
    let lease = lease.unwrap();
    assert_eq!(clock.now(), at, "the test never moved the clock");
    assert!(lease.fence().unwrap() > first, "a new fence for the new holder");
    assert!(lease.is_healthy());
    assert_eq!(authority.waiters("k"), 0);
}

#[test]
fn an_acquire_timeout_is_kept_on_the_clock_it_is_given() {
    let (clock, authority) = start();
    // Sessions of an hour of manual time: no keepalive is due within the test, so only the
    // acquisition's deadline can end the wait.
    let hour = Duration::from_secs(3600);
    let holder = client(&authority, &clock, "holder", hour);
    let rival = client(&authority, &clock, "rival", hour);
    let held = future::block_on(holder.acquire("k")).unwrap();

    let started = clock.now();
    let waiting =
        std::thread::spawn(move || future::block_on(rival.acquire_timeout("k", Duration::from_secs(30))));
    eventually("the rival queued", || authority.waiters("k") == 1);
    clock.advance(
        started + leasehold_core::Duration::from_secs(30)
            - clock.now()
            - leasehold_core::Duration::from_micros(1),
    );
    // A microsecond before its deadline the rival still waits in the queue.
    assert_eq!(authority.waiters("k"), 1, "gave up before its deadline");
    assert!(!waiting.is_finished(), "gave up before its deadline");
    clock.advance(leasehold_core::Duration::from_micros(1));
    eventually("the rival's deadline", || waiting.is_finished());
    assert_eq!(waiting.join().unwrap().unwrap_err(), AcquireError::Busy);
    assert_eq!(clock.now() - started, leasehold_core::Duration::from_secs(30));
    eventually("the rival left the queue", || authority.waiters("k") == 0);
    assert!(held.is_healthy(), "the holder's hour is not over");
}
