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
