//! The v1 driver on a clock the test moves by hand: renewal, loss at the validity bound and
//! acquisition deadlines, each at the instant the core's contract names, with no wall-clock
//! waiting. The authority is the core's own rulebook (`LeaseTable`) in this process, on the
//! same clock, so time means the same thing on both sides.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_lite::future;
use leasehold_client::{
    AcquireError, Backend, Client, Clock, Health, LostReason, ManualClock, Options, TransportError,
};
use leasehold_core::authority::{LeaseTable, Limits};
use leasehold_core::{Instant, Key, Op, Reply, Request};

/// The core's rules in memory, on the test's clock. `silent`: every request is swallowed (a
/// server that vanished mid-connection: nothing ever comes back).
#[derive(Clone)]
struct InProcess {
    table: Arc<Mutex<LeaseTable<8>>>,
    clock: ManualClock,
    silent: Arc<AtomicBool>,
    renewals: Arc<AtomicUsize>,
}

impl InProcess {
    fn new(clock: &ManualClock) -> InProcess {
        InProcess {
            table: Arc::new(Mutex::new(LeaseTable::new(Limits::default()))),
            clock: clock.clone(),
            silent: Arc::new(AtomicBool::new(false)),
            renewals: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// Waits in real time (bounded, for a loaded machine) until `done`: the driver runs on its own
/// thread, so what it makes of a step of the manual clock shows a moment later.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what} never happened");
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Backend for InProcess {
    async fn call(&self, key: &Key, request: Request) -> Result<Reply, TransportError> {
        if self.silent.load(Ordering::SeqCst) {
            return future::pending().await;
        }
        let reply = self.table.lock().unwrap().handle(self.clock.now(), key, &request).reply;
        if matches!(request.op, Op::Renew { .. }) && matches!(reply, Reply::Granted { .. }) {
            self.renewals.fetch_add(1, Ordering::SeqCst);
        }
        Ok(reply)
    }
}

const TTL: Duration = Duration::from_secs(10);

fn start() -> (ManualClock, InProcess, Options) {
    let clock = ManualClock::new(Instant::from_micros(1_000_000));
    (clock.clone(), InProcess::new(&clock), Options::new(TTL))
}

#[test]
fn a_lease_renews_on_the_clock_it_is_given_and_is_lost_at_its_validity_bound() {
    let (clock, authority, options) = start();
    let config = options.config;
    let client = Client::with_clock(authority.clone(), options, clock.clone()).unwrap();
    let lease = future::block_on(client.acquire("k")).unwrap();
    assert_eq!(lease.health(), Health::Held);

    // A minute of manual time, one renew interval at a time: renewed each interval, held
    // throughout, although no real minute passes. Each renewal is sent the moment it is due
    // (the clock stands still meanwhile), so its reply restores the whole validity.
    let validity = config.drift.shrink(config.ttl) - config.margin;
    let steps = (60_000_000 / config.renew_every.as_micros()) as usize;
    for i in 1..=steps {
        clock.advance(config.renew_every);
        eventually(&format!("renewal {i}"), || lease.remaining() == Some(validity.into()));
        assert!(lease.is_healthy(), "after {i} renewals: {:?}", lease.health());
    }
    assert_eq!(authority.renewals.load(Ordering::SeqCst), steps, "one renewal per interval, no more");

    // The authority goes silent right after the last renewal, which was sent at `sent`.
    // Validity ends at sent + ttl·(1−ε) − margin, and not a microsecond before or after.
    let sent = clock.now();
    authority.silent.store(true, Ordering::SeqCst);
    let end = sent + validity;
    clock.advance(end - clock.now() - leasehold_core::Duration::from_micros(1));
    assert!(lease.remaining().is_some(), "still valid one microsecond before its end");
    clock.advance(leasehold_core::Duration::from_micros(1));
    assert_eq!(lease.remaining(), None, "not valid at its end");
    assert_eq!(lease.health(), Health::Lost);
    let why = future::block_on(lease.lost());
    assert!(matches!(why, LostReason::Expired), "{why:?}");
}

#[test]
fn an_acquisition_deadline_is_kept_on_the_clock_it_is_given() {
    let (clock, authority, options) = start();
    // Held for an hour of manual time, so the holder needs no renewal within the test.
    let holder =
        Client::with_clock(authority.clone(), Options::new(Duration::from_secs(3600)), clock.clone())
            .unwrap();
    let rival = Client::with_clock(authority.clone(), options, clock.clone()).unwrap();
    let held = future::block_on(holder.acquire("k")).unwrap();

    // The rival waits at most 30 s of manual time for the held key: it polls (busy), and
    // gives up at its deadline, not a step before, whatever real time that takes.
    let waiting =
        std::thread::spawn(move || future::block_on(rival.acquire_timeout("k", Duration::from_secs(30))));
    let started = clock.now();
    let mut steps = 0;
    while !waiting.is_finished() {
        assert!(steps < 20_000, "the rival's deadline never came");
        clock.advance(leasehold_core::Duration::from_millis(500));
        steps += 1;
        // Pacing only: let the driver threads see each step before the next.
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(waiting.join().unwrap().unwrap_err(), AcquireError::Busy);
    let waited = clock.now() - started;
    assert!(waited >= leasehold_core::Duration::from_secs(30), "gave up after {waited:?} of manual time");
    assert!(held.is_healthy(), "the holder's hour is not over");
}
