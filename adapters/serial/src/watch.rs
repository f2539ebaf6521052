//! The lease's validity, readable by other tasks while the link task waits.

use core::cell::Cell;

use critical_section::Mutex;
use leasehold_core::{Duration, Fence, Instant, Lease};

/// The fence and validity deadline of a device's lease, published by its link.
///
/// [`AsyncDeviceLink::next_event`](crate::AsyncDeviceLink::next_event) borrows the link
/// mutably for as long as it waits, so no other task can ask the link itself how long the
/// lease remains valid. Give the link a `LeaseWatch`, usually a `static`
/// ([`publish_to`](crate::AsyncDeviceLink::publish_to)), and any task, or an interrupt
/// handler, reads it instead: [`held`](LeaseWatch::held) at `now` on the same clock.
///
/// The link publishes after every change of the machine's belief and before it awaits
/// anything, so the watch is never more optimistic than the machine: a deadline only ever
/// runs out by itself (a late reader sees `None` at the very instant the machine would), and
/// a lease the machine drops early (a `NotHolder` reply, a release) disappears from the watch
/// before the link waits again. Guarded by a `critical_section`, so it is `Sync` on every
/// target, ARMv6-M included.
#[derive(Debug)]
pub struct LeaseWatch {
    held: Mutex<Cell<Option<(Fence, Instant)>>>,
}

impl Default for LeaseWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl LeaseWatch {
    /// Nothing held yet.
    pub const fn new() -> Self {
        LeaseWatch { held: Mutex::new(Cell::new(None)) }
    }

    /// The fence held and how long it may still be relied on at `now` (the link's clock), or
    /// `None` if nothing may be relied on.
    pub fn held(&self, now: Instant) -> Option<(Fence, Duration)> {
        let (fence, until) = critical_section::with(|cs| self.held.borrow(cs).get())?;
        (now < until).then(|| (fence, until - now))
    }

    /// How long the lease may still be relied on at `now`; see [`held`](LeaseWatch::held).
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        self.held(now).map(|(_, d)| d)
    }

    /// Copies the machine's belief at `now`.
    pub(crate) fn publish(&self, lease: &Lease, now: Instant) {
        let held = lease.fence().zip(lease.remaining(now)).map(|(f, d)| (f, now + d));
        critical_section::with(|cs| self.held.borrow(cs).set(held));
    }
}

/// The keys a device's session holds, their fences and the session's validity, published by
/// its [`AsyncSessionLink`](crate::AsyncSessionLink) for other tasks: the session-side
/// [`LeaseWatch`], on the same terms (published after every change of the machine's belief and
/// before the link awaits anything, so it is never more optimistic than the machine; guarded
/// by a `critical_section`). `K` is the session's number of keys.
///
/// ```
/// use leasehold_core::{parse_key, Instant};
/// use leasehold_serial::SessionWatch;
///
/// static WATCH: SessionWatch<2> = SessionWatch::new();
/// // Nothing is published before the link opens its session.
/// assert_eq!(WATCH.held(Instant::from_micros(5), &parse_key("pump").unwrap()), None);
/// assert_eq!(WATCH.renewed(), None);
/// ```
#[cfg(feature = "sessions")]
pub struct SessionWatch<const K: usize> {
    view: Mutex<core::cell::RefCell<SessionView<K>>>,
    /// The task waiting in [`changed`](SessionWatch::changed), woken when the renewal changes.
    waiter: Mutex<Cell<Option<core::task::Waker>>>,
}

/// A session's validity as its link last saw it.
#[cfg(feature = "sessions")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Renewal {
    /// The end of the session's validity (the link's clock): the send time of the request that
    /// extended it, plus the machine's validity per ttl.
    pub valid_until: Instant,
    /// When the link first saw the validity end there (fed the reply). `seen_at - (valid_until
    /// - validity)` is that request's round trip, a held keepalive's hold included.
    pub seen_at: Instant,
}

#[cfg(feature = "sessions")]
#[derive(Debug)]
struct SessionView<const K: usize> {
    /// `None` while the session is not open.
    renewal: Option<Renewal>,
    held: heapless::Vec<(leasehold_core::Key, Fence), K>,
}

#[cfg(feature = "sessions")]
impl<const K: usize> core::fmt::Debug for SessionWatch<K> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let renewal = self.renewed();
        f.debug_struct("SessionWatch").field("renewal", &renewal).finish_non_exhaustive()
    }
}

#[cfg(feature = "sessions")]
impl<const K: usize> Default for SessionWatch<K> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "sessions")]
impl<const K: usize> SessionWatch<K> {
    /// No session yet.
    pub const fn new() -> Self {
        SessionWatch {
            view: Mutex::new(core::cell::RefCell::new(SessionView {
                renewal: None,
                held: heapless::Vec::new(),
            })),
            waiter: Mutex::new(Cell::new(None)),
        }
    }

    /// The fence `key` is held under and how long it may still be relied on at `now` (the
    /// link's clock), or `None` if it may not be.
    pub fn held(&self, now: Instant, key: &leasehold_core::Key) -> Option<(Fence, Duration)> {
        // Inside the critical section nothing else borrows the view: `try_borrow` only avoids
        // RefCell's panic path.
        let (fence, until) = critical_section::with(|cs| {
            let view = self.view.borrow(cs).try_borrow().ok()?;
            let fence = view.held.iter().find(|(k, _)| k == key)?.1;
            Some((fence, view.renewal?.valid_until))
        })?;
        (now < until).then(|| (fence, until - now))
    }

    /// How long the session may still be relied on at `now`.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        let until = self.renewed()?.valid_until;
        (now < until).then(|| until - now)
    }

    /// The session's end of validity and when the link saw it move there; `None` while the
    /// session is not open. A change of `valid_until` is a renewal.
    pub fn renewed(&self) -> Option<Renewal> {
        critical_section::with(|cs| self.view.borrow(cs).try_borrow().ok()?.renewal)
    }

    /// Waits until [`renewed`](SessionWatch::renewed) is no longer `from`, and returns it: a
    /// task can log or act on each renewal (or the session's end) as the link sees it, without
    /// polling. One task waits at a time: a second waiter takes the first one's place.
    pub async fn changed(&self, from: Option<Renewal>) -> Option<Renewal> {
        core::future::poll_fn(|cx| {
            critical_section::with(|cs| {
                // Registered in the same critical section as the look, so a publish cannot
                // fall between them unseen.
                let now = self.view.borrow(cs).try_borrow().ok().and_then(|v| v.renewal);
                if now != from {
                    return core::task::Poll::Ready(now);
                }
                self.waiter.borrow(cs).set(Some(cx.waker().clone()));
                core::task::Poll::Pending
            })
        })
        .await
    }

    /// Copies the machine's belief at `now`.
    pub(crate) fn publish<const O: usize>(
        &self,
        session: &leasehold_core::session::Session<K, O>,
        now: Instant,
    ) {
        let valid_until = session.session_remaining(now).map(|r| now + r);
        let waiter = critical_section::with(|cs| {
            let Ok(mut view) = self.view.borrow(cs).try_borrow_mut() else { return None };
            let renewal = valid_until.map(|valid_until| match view.renewal {
                Some(r) if r.valid_until == valid_until => r,
                _ => Renewal { valid_until, seen_at: now },
            });
            let changed = renewal != view.renewal;
            view.renewal = renewal;
            view.held.clear();
            for (key, fence) in session.held() {
                // Cannot be full: the machine holds at most K keys.
                let _ = view.held.push((key.clone(), fence));
            }
            changed.then(|| self.waiter.borrow(cs).take()).flatten()
        });
        if let Some(w) = waiter {
            w.wake();
        }
    }
}
