//! The connection cap: which connections are open, which are mid-request, and which one to
//! shed when a new one arrives at the cap.
//!
//! A flood of connections that send nothing (or dribble a head) must not lock out clients that
//! do work, and the file descriptors must not run out. At the cap, the connection idle the
//! longest (no request in flight, oldest last activity) is closed to admit the new one; a client
//! that just connected or just got an answer is the last to go. Only if every connection is
//! mid-request is the oldest one closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

struct Entry {
    opened: Instant,
    last_active: Instant,
    in_flight: u32,
    /// Dropping it tells the connection's task to close.
    _shed: async_channel::Sender<()>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    open: HashMap<u64, Entry>,
}

pub(crate) struct Conns {
    cap: usize,
    inner: Mutex<Inner>,
}

/// One admitted connection; dropping it forgets the connection.
pub(crate) struct Admitted {
    conns: Arc<Conns>,
    id: u64,
    /// Closed (its sender dropped) when the connection is shed.
    pub(crate) shed: async_channel::Receiver<()>,
}

impl Conns {
    pub(crate) fn new(cap: usize) -> Conns {
        Conns { cap, inner: Mutex::default() }
    }

    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map stays consistent even if a holder panicked: every change is one insert or
        // remove.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn open(&self) -> usize {
        self.lock().open.len()
    }

    /// Admits a new connection, shedding one first if at the cap; returns it and whether one
    /// was shed.
    pub(crate) fn admit(self: &Arc<Self>) -> (Admitted, bool) {
        let mut inner = self.lock();
        let shed = inner.open.len() >= self.cap && shed_one(&mut inner, false);
        let now = Instant::now();
        let id = inner.next_id;
        inner.next_id += 1;
        let (tx, rx) = async_channel::bounded(1);
        inner.open.insert(id, Entry { opened: now, last_active: now, in_flight: 0, _shed: tx });
        (Admitted { conns: self.clone(), id, shed: rx }, shed)
    }

    /// Closes the connection idle the longest, if any is idle: frees a descriptor when accept
    /// fails for want of one.
    pub(crate) fn shed_idle(&self) -> bool {
        shed_one(&mut self.lock(), true)
    }

    fn set(&self, id: u64, change: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.lock().open.get_mut(&id) {
            change(e);
        }
    }
}

/// Removes the longest-idle connection, or (unless `idle_only`) the oldest one.
fn shed_one(inner: &mut Inner, idle_only: bool) -> bool {
    let idle = inner.open.iter().filter(|(_, e)| e.in_flight == 0).min_by_key(|(_, e)| e.last_active);
    let victim = match idle {
        Some((id, _)) => Some(*id),
        None if idle_only => None,
        None => inner.open.iter().min_by_key(|(_, e)| e.opened).map(|(id, _)| *id),
    };
    victim.and_then(|id| inner.open.remove(&id)).is_some()
}

impl Admitted {
    /// Marks a request in flight until the returned guard drops.
    pub(crate) fn request(&self) -> InFlight {
        self.conns.set(self.id, |e| e.in_flight += 1);
        InFlight { conns: self.conns.clone(), id: self.id }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.conns.lock().open.remove(&self.id);
    }
}

/// A request being handled; on drop the connection is idle again, as of now.
pub(crate) struct InFlight {
    conns: Arc<Conns>,
    id: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conns.set(self.id, |e| {
            e.in_flight = e.in_flight.saturating_sub(1);
            e.last_active = Instant::now();
        });
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, so connections are capped by
/// [`Conns`] and not by an accidental default of 1024, and returns the soft limit now in force
/// (`None`: unlimited or unknown).
#[cfg(unix)]
pub(crate) fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        match setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum }) {
            Ok(()) => {
                tracing::info!("raised the open file limit from {:?} to {:?}", limit.current, limit.maximum);
                return limit.maximum;
            }
            // macOS refuses soft limits above OPEN_MAX even under an unlimited hard limit.
            Err(e) => tracing::warn!("cannot raise the open file limit above {:?}: {e}", limit.current),
        }
    }
    limit.current
}

#[cfg(not(unix))]
pub(crate) fn raise_fd_limit() -> Option<u64> {
    None
}

/// The connection cap in force: `wanted`, but leaving descriptors for the store, the listener,
/// stdio and the blocking pool's files within `fd_limit`.
pub(crate) fn effective_cap(wanted: usize, fd_limit: Option<u64>) -> usize {
    let Some(limit) = fd_limit else {
        return wanted;
    };
    let reserve = (limit / 4).min(64);
    let room = usize::try_from(limit.saturating_sub(reserve)).unwrap_or(usize::MAX).max(1);
    if wanted > room {
        tracing::warn!("connection cap lowered from {wanted} to {room}: the open file limit is {limit}");
    }
    wanted.min(room)
}

/// Paces the accept loop after errors (mostly running out of descriptors): pauses doubling
/// from 5 ms to 1 s, reset by the next success, and one warning per 10 s with the count of
/// failures behind it instead of one line per failure.
pub(crate) struct AcceptBackoff {
    delay: std::time::Duration,
    failures: u64,
    warned: Option<Instant>,
}

const BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(5);
const BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(1);
const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff { delay: BACKOFF_MIN, failures: 0, warned: None }
    }
}

impl AcceptBackoff {
    /// Notes a failure; returns how long to pause.
    pub(crate) fn failed(&mut self, e: &std::io::Error) -> std::time::Duration {
        self.failures += 1;
        if self.warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            tracing::warn!(
                "accept failed ({} times since the last warning): {e}; backing off",
                self.failures
            );
            self.failures = 0;
            self.warned = Some(Instant::now());
        }
        let delay = self.delay;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        delay
    }

    pub(crate) fn succeeded(&mut self) {
        self.delay = BACKOFF_MIN;
    }
}

/// Whether accept failed for want of a descriptor, which closing an idle connection fixes.
pub(crate) fn out_of_descriptors(e: &std::io::Error) -> bool {
    // EMFILE (24) and ENFILE (23) on Linux and the BSDs.
    matches!(e.raw_os_error(), Some(23 | 24))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_longest_idle_goes_first_then_the_oldest() {
        let c = Arc::new(Conns::new(3));
        let (a, shed) = c.admit();
        assert!(!shed);
        let (b, _) = c.admit();
        let (d, _) = c.admit();
        // a is busy; b finished a request after d was opened, so d is idle the longest.
        let busy = a.request();
        drop(b.request());
        let (_e, shed) = c.admit();
        assert!(shed);
        assert!(d.shed.is_closed(), "the longest-idle connection is shed");
        assert!(!a.shed.is_closed() && !b.shed.is_closed());
        assert_eq!(c.open(), 3);
        // Everything else is busy: the oldest goes.
        let _b_busy = b.request();
        let _e_busy = _e.request();
        let (_f, shed) = c.admit();
        assert!(shed && a.shed.is_closed(), "all busy: the oldest is shed");
        drop(busy);
        // A shed connection's guards are harmless afterwards.
        drop(a);
        assert_eq!(c.open(), 3);
        assert!(c.shed_idle(), "f has never sent a request: idle");
        assert!(!c.shed_idle(), "b and e are mid-request");
    }
}
