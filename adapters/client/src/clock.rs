//! Where the drivers read the time and wait for it: the process's monotonic clock, or one a
//! test moves by hand.

use std::sync::{Arc, Mutex, OnceLock};

use event_listener::Event as Signal;
use leasehold_core::{Duration, Instant};

use crate::backend::Boxed;

/// The drivers' source of time: every `now` they hand the core's machines, and every wake-up
/// they arm for them.
///
/// [`SystemClock`] is the default. [`ManualClock`] moves only when told, so a test of renewal,
/// expiry or deadlines runs without waiting for them on the wall clock.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Instant;
    /// Resolves once [`now`](Clock::now) has reached `deadline`.
    fn sleep_until(&self, deadline: Instant) -> Boxed<'static, ()>;
}

/// The process's monotonic clock, counted from the first reading (the value [`now`](crate::now)
/// gives): never goes back, never jumps with the wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

fn epoch() -> std::time::Instant {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// The process's monotonic clock in the core's time type ([`SystemClock`]'s reading).
pub fn now() -> Instant {
    Instant::from_micros(epoch().elapsed().as_micros() as u64)
}

/// Where `t` falls on the process's monotonic clock.
pub(crate) fn to_std(t: Instant) -> std::time::Instant {
    epoch() + std::time::Duration::from_micros(t.as_micros())
}

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        now()
    }

    fn sleep_until(&self, deadline: Instant) -> Boxed<'static, ()> {
        let at = to_std(deadline);
        Box::pin(async move {
            leasehold_timer::Deadline::at(at).await;
        })
    }
}

/// A clock that stands still until [`advance`](ManualClock::advance)d, for tests: whatever
/// waits on it wakes when the time it waits for is reached, at once and in no real time.
/// Clones share one time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<ManualTime>);

#[derive(Debug)]
struct ManualTime {
    now: Mutex<Instant>,
    moved: Signal,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: Instant) -> ManualClock {
        ManualClock(Arc::new(ManualTime { now: Mutex::new(start), moved: Signal::new() }))
    }

    /// Moves the time forward by `by`, waking every sleeper whose deadline it reaches.
    pub fn advance(&self, by: Duration) {
        {
            let mut now = self.0.now.lock().unwrap_or_else(|p| p.into_inner());
            *now += by;
        }
        self.0.moved.notify(usize::MAX);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.now.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sleep_until(&self, deadline: Instant) -> Boxed<'static, ()> {
        let time = self.0.clone();
        Box::pin(async move {
            loop {
                // Listening before looking, so an advance between the two still wakes us.
                let moved = time.moved.listen();
                if *time.now.lock().unwrap_or_else(|p| p.into_inner()) >= deadline {
                    return;
                }
                moved.await;
            }
        })
    }
}
