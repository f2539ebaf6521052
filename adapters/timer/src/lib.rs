//! Deadlines that wake no thread when they are armed, for leasehold's host adapters and server.
//!
//! Every request a client or the server makes races a timeout, and almost none of them fire.
//! async-io's `Timer` notifies its reactor each time one is armed: an eventfd write that wakes
//! whichever thread sleeps in `epoll_wait`, for nothing. Measured on the built-in server's
//! acquire+release benchmark, those wake-ups were most of its context switches (about ten per
//! pair). A [`Deadline`] is kept in one ordered table served by one thread, which sleeps until
//! the earliest deadline armed. Arming a deadline no earlier than that (a request's timeout is
//! later than every timeout armed before it) takes the table's lock and nothing else; only a
//! deadline earlier than every other wakes the thread, to sleep less.
//!
//! A deadline fires at its instant, not on a coarse tick: the thread sleeps until exactly the
//! earliest one, so a deadline is as punctual as the operating system's sleep (the same as
//! async-io's reactor). It is runtime-agnostic: any executor's waker is woken.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use leasehold_timer::Deadline;
//!
//! futures_lite::future::block_on(async {
//!     let start = Instant::now();
//!     // A request that answers in time: its timeout is dropped unfired, having woken nobody.
//!     let answer = futures_lite::future::or(async { Some(42) }, async {
//!         Deadline::after(Duration::from_secs(5)).await;
//!         None
//!     });
//!     assert_eq!(answer.await, Some(42));
//!
//!     // One that does not: the deadline fires no earlier than asked.
//!     let mut deadline = Deadline::after(Duration::from_millis(20));
//!     deadline.reset(Instant::now() + Duration::from_millis(30));
//!     (&mut deadline).await;
//!     assert!(start.elapsed() >= Duration::from_millis(30));
//! });
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// A future that is ready at an instant. Dropping it unfired disarms it.
#[derive(Debug)]
pub struct Deadline {
    at: Instant,
    state: Armed,
}

#[derive(Debug)]
enum Armed {
    /// Not in the table: not polled since made or reset, or fired.
    No,
    /// In the table under this id.
    Table(u64),
    /// The table's thread could not be started: async-io's timer stands in.
    Fallback(async_io::Timer),
}

impl Deadline {
    /// Ready at `at`.
    pub fn at(at: Instant) -> Deadline {
        Deadline { at, state: Armed::No }
    }

    /// Ready once `after` has passed from now. An `after` too long for the clock to express
    /// is a deadline that never comes.
    pub fn after(after: Duration) -> Deadline {
        let now = Instant::now();
        Deadline::at(now.checked_add(after).unwrap_or_else(|| far_future(now)))
    }

    /// The instant it is ready at.
    pub fn when(&self) -> Instant {
        self.at
    }

    /// Makes it ready at `at` instead, whether or not it had fired.
    pub fn reset(&mut self, at: Instant) {
        self.disarm();
        self.at = at;
    }

    fn disarm(&mut self) {
        if let Armed::Table(id) = std::mem::replace(&mut self.state, Armed::No) {
            if let Some(Some(table)) = TABLE.get() {
                table.lock().armed.remove(&(self.at, id));
            }
        }
    }
}

impl Future for Deadline {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if let Armed::Fallback(timer) = &mut this.state {
            return Pin::new(timer).poll(cx).map(|_| ());
        }
        if Instant::now() >= this.at {
            this.disarm();
            return Poll::Ready(());
        }
        let Some(table) = table() else {
            let mut timer = async_io::Timer::at(this.at);
            let poll = Pin::new(&mut timer).poll(cx).map(|_| ());
            this.state = Armed::Fallback(timer);
            return poll;
        };
        match this.state {
            Armed::Table(id) => match table.lock().armed.get_mut(&(this.at, id)) {
                Some(waker) => {
                    if !waker.will_wake(cx.waker()) {
                        waker.clone_from(cx.waker());
                    }
                }
                // Fired between our look at the clock and the lock: its waker has been (or is
                // being) woken, and the next poll sees the time has come.
                None => cx.waker().wake_by_ref(),
            },
            _ => this.state = Armed::Table(table.arm(this.at, cx.waker()).0),
        }
        Poll::Pending
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// Far enough ahead to never come, near enough for `Instant` to express on every platform.
fn far_future(now: Instant) -> Instant {
    now + Duration::from_secs(86_400 * 365 * 30)
}

struct Table {
    state: Mutex<State>,
    thread: Thread,
}

struct State {
    /// By instant, then by arming order; the waker of each armed deadline.
    armed: BTreeMap<(Instant, u64), Waker>,
    next_id: u64,
    /// When the thread next looks at the table; `None` while it sleeps until woken.
    looks_at: Option<Instant>,
}

impl Table {
    /// Puts a deadline in the table; its id, and whether the thread had to be woken (only for
    /// a deadline earlier than it meant to look).
    fn arm(&self, at: Instant, waker: &Waker) -> (u64, bool) {
        let mut guard = self.lock();
        let id = guard.next_id;
        guard.next_id += 1;
        guard.armed.insert((at, id), waker.clone());
        let sooner = guard.looks_at.is_none_or(|t| at < t);
        if sooner {
            guard.looks_at = Some(at);
            drop(guard);
            self.thread.unpark();
        }
        (id, sooner)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A waker that panicked while the lock was held leaves the table consistent: every
        // change to it is one map operation.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

static TABLE: OnceLock<Option<Table>> = OnceLock::new();

/// The table, its thread started on first use; `None` if the thread could not be started.
fn table() -> Option<&'static Table> {
    TABLE
        .get_or_init(|| {
            let thread = std::thread::Builder::new()
                .name("leasehold-timer".into())
                .spawn(serve)
                .ok()?
                .thread()
                .clone();
            Some(Table {
                state: Mutex::new(State { armed: BTreeMap::new(), next_id: 0, looks_at: None }),
                thread,
            })
        })
        .as_ref()
}

/// The table's thread: wakes what is due, then sleeps until the earliest deadline left.
fn serve() {
    // The table is set once this thread has been spawned; wait for it.
    let table = loop {
        match TABLE.get() {
            Some(Some(table)) => break table,
            Some(None) => return,
            None => std::thread::park_timeout(Duration::from_millis(1)),
        }
    };
    let mut due = Vec::new();
    loop {
        let next = {
            let mut state = table.lock();
            let now = Instant::now();
            while let Some(entry) = state.armed.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                due.push(entry.remove());
            }
            state.looks_at = state.armed.first_key_value().map(|(&(at, _), _)| at);
            state.looks_at
        };
        // Woken outside the lock: a waker may poll its future on this thread, which locks.
        for waker in due.drain(..) {
            waker.wake();
        }
        match next {
            Some(at) => std::thread::park_timeout(at.saturating_duration_since(Instant::now())),
            // A deadline armed from now on finds `looks_at` empty and unparks us; one armed
            // since the lock was let go has already left the unpark token.
            None => std::thread::park(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Counts its wakes.
    struct Count(AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn is_armed(d: &Deadline) -> bool {
        let Armed::Table(id) = d.state else { return false };
        table().expect("timer thread").lock().armed.contains_key(&(d.at, id))
    }

    #[test]
    fn arming_a_deadline_later_than_one_armed_wakes_no_thread() {
        let table = table().expect("timer thread");
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let now = Instant::now();
        // While this one is armed the thread looks at the table no later than its instant.
        let (first, _) = table.arm(now + Duration::from_secs(500), &waker);
        let later: Vec<_> =
            (1..=100).map(|i| table.arm(now + Duration::from_secs(500 + i), &waker)).collect();
        assert!(later.iter().all(|&(_, woke)| !woke), "a later deadline woke the thread");
        let mut state = table.lock();
        state.armed.remove(&(now + Duration::from_secs(500), first));
        for (i, (id, _)) in later.into_iter().enumerate() {
            state.armed.remove(&(now + Duration::from_secs(501 + i as u64), id));
        }
    }

    #[test]
    fn fires_no_earlier_than_its_instant_and_in_order() {
        let start = Instant::now();
        let order = Arc::new(Mutex::new(Vec::new()));
        let run = |ms: u64| {
            let order = order.clone();
            async move {
                Deadline::at(start + Duration::from_millis(ms)).await;
                assert!(start.elapsed() >= Duration::from_millis(ms), "{ms} ms fired early");
                order.lock().unwrap().push(ms);
            }
        };
        // Armed latest first: each later-armed one is sooner, so each must wake the thread.
        futures_lite::future::block_on(async {
            let (a, b, c) = (run(60), run(30), run(10));
            futures_lite::future::zip(futures_lite::future::zip(a, b), c).await;
        });
        assert_eq!(*order.lock().unwrap(), vec![10, 30, 60]);
    }

    #[test]
    fn a_dropped_deadline_is_disarmed_and_never_wakes() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut d = Box::pin(Deadline::after(Duration::from_millis(30)));
        assert!(d.as_mut().poll(&mut cx).is_pending());
        assert!(is_armed(&d), "armed once polled");
        let (at, Armed::Table(id)) = (d.at, &d.state) else { panic!("not in the table") };
        let id = *id;
        drop(d);
        assert!(!table().unwrap().lock().armed.contains_key(&(at, id)), "still armed after drop");
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "a dropped deadline woke its task");
    }

    #[test]
    fn reset_moves_the_instant_both_ways() {
        futures_lite::future::block_on(async {
            let start = Instant::now();
            let mut d = Deadline::after(Duration::from_secs(3600));
            // Polled once, so it is in the table under the far instant.
            assert!(futures_lite::future::poll_once(&mut d).await.is_none());
            d.reset(start + Duration::from_millis(20));
            (&mut d).await;
            let fired = start.elapsed();
            assert!(fired >= Duration::from_millis(20));
            assert!(fired < Duration::from_secs(3000), "kept the old instant");
            // Reset after firing: waits again.
            d.reset(Instant::now() + Duration::from_millis(10));
            assert!(futures_lite::future::poll_once(&mut d).await.is_none());
            (&mut d).await;
        });
    }

    #[test]
    fn an_absurd_duration_is_a_deadline_that_never_comes() {
        let d = Deadline::after(Duration::MAX);
        assert!(d.when() > Instant::now() + Duration::from_secs(86_400 * 365));
        assert!(futures_lite::future::block_on(futures_lite::future::poll_once(d)).is_none());
    }

    #[test]
    fn a_deadline_repolled_with_another_waker_wakes_the_new_one() {
        let (first, second) = (Arc::new(Count(AtomicUsize::new(0))), Arc::new(Count(AtomicUsize::new(0))));
        let mut d = Box::pin(Deadline::after(Duration::from_millis(20)));
        let w1 = Waker::from(first.clone());
        let w2 = Waker::from(second.clone());
        assert!(d.as_mut().poll(&mut Context::from_waker(&w1)).is_pending());
        assert!(d.as_mut().poll(&mut Context::from_waker(&w2)).is_pending());
        let until = Instant::now() + Duration::from_secs(10);
        while second.0.load(Ordering::SeqCst) == 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(second.0.load(Ordering::SeqCst), 1, "the new waker was not woken");
        assert_eq!(first.0.load(Ordering::SeqCst), 0, "the replaced waker was woken");
        assert!(d.as_mut().poll(&mut Context::from_waker(&w2)).is_ready());
    }
}
