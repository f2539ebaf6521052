//! The holder's side: one [`Lease`] per key.

use core::fmt;

use crate::authority::cas::Sighting;
use crate::config::{Config, ConfigError};
use crate::time::{Duration, Instant};
use crate::wire::{Fence, Op, OwnerId, Reject, Reply, Request, RequestId, Response};

/// A sans-IO lease on one key, from the holder's side.
///
/// Drive it like this: call a verb ([`acquire`](Lease::acquire), [`release`](Lease::release)) or
/// feed an input ([`handle_response`](Lease::handle_response),
/// [`handle_timeout`](Lease::handle_timeout),
/// [`handle_transport_error`](Lease::handle_transport_error),
/// [`handle_permanent_error`](Lease::handle_permanent_error)); then drain
/// [`poll_transmit`](Lease::poll_transmit) (send each request),
/// [`poll_event`](Lease::poll_event) (tell the application), and finally arm a timer for
/// [`poll_timeout`](Lease::poll_timeout). The machine never reads a clock: every `now` is the
/// caller's reading of one local monotonic clock, which must never go backwards.
///
/// # Safety contract
///
/// A grant of `ttl` obtained by a request *sent* at local time `s` is believed until
/// `s + ttl·(1−ε) − margin` (see [`Config::validity`]). The authority counts the same `ttl` from
/// the moment it acted, which is after `s`, on a clock at most a factor `1+ε` faster, so the
/// holder's belief always ends before the authority can grant the key to anyone else. Anchoring
/// at the *reply* instead would let a slow reply stretch the holder's belief past the
/// authority's expiry.
///
/// From that instant on [`remaining`](Lease::remaining) is `None`, and the next call into the
/// machine with a `now` at or after it emits [`Event::Lost`]; `poll_timeout` asks for such a
/// call no later than that instant. Nothing the network does (late, duplicated, reordered or
/// forged replies) extends the belief: only a reply to the *newest* request counts, a renewal
/// is anchored at its own send time, and a fence that is not new is never trusted.
#[derive(Debug, Clone)]
pub struct Lease {
    config: Config,
    owner: OwnerId,
    /// What the machine is doing, with the deadlines and the request that belong to it.
    phase: Phase,
    /// The fence held now, or the highest one ever granted to this lease.
    fence: Fence,
    rng: u64,
    /// The id of the next request made.
    next_id: u32,
    /// Consecutive failed attempts, for backoff and [`Health::Unknown`].
    failures: u8,
    /// Oldest first. Each call produces at most one event, so a caller that drains after
    /// every call never loses one; for one that does not, the newest two are kept.
    events: [Option<Event>; 2],
}

/// "No deadline" for the give-up bound, which would otherwise need an `Option` (8 more
/// bytes): nothing is ever later, so the comparison needs no special case.
const NEVER: Instant = Instant::MAX;

/// One request's life in a phase that talks to the authority: due to be made, made but not
/// handed out, handed out and awaiting its reply. Exactly one of these at a time, so a timer
/// for the next request and a request in the air cannot both be set.
///
/// Unlike the session holder's flight, a request made but not yet handed out still times out
/// (from when it was made): a caller that never drains [`Lease::poll_transmit`] gets retries
/// with backoff, as it always has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flight {
    /// The next request (renewal, retry, poll, takeover) is to be made at `at`.
    Due { at: Instant },
    /// Made at `at`, waiting in [`Lease::poll_transmit`]. Replies and errors for `id` are not
    /// believed yet: nobody can have answered a request that was never handed out.
    Unsent { id: RequestId, at: Instant },
    /// Handed out; made at `at`, which is what its validity is anchored at.
    Sent { id: RequestId, at: Instant },
}

impl Flight {
    /// When the machine must next act on this request: when it is due, or when its reply is
    /// overdue.
    fn deadline(self, request_timeout: Duration) -> Instant {
        match self {
            Flight::Due { at } => at,
            Flight::Unsent { at, .. } | Flight::Sent { at, .. } => at + request_timeout,
        }
    }

    /// A request was made (handed out or not) and its reply is overdue.
    fn overdue(self, now: Instant, request_timeout: Duration) -> bool {
        match self {
            Flight::Due { .. } => false,
            Flight::Unsent { at, .. } | Flight::Sent { at, .. } => now >= at + request_timeout,
        }
    }

    /// The id and making time of the request awaiting its reply, if one is out.
    fn sent(self) -> Option<(RequestId, Instant)> {
        match self {
            Flight::Sent { id, at } => Some((id, at)),
            Flight::Due { .. } | Flight::Unsent { .. } => None,
        }
    }
}

/// A compare-and-set record seen held, and whether the next attempt takes it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Observation {
    /// The version seen and when its takeover is due (the rule is [`Sighting`]'s).
    sighting: Sighting,
    /// The next attempt is the takeover (else a poll, which also catches an early release).
    ready: bool,
}

/// Each phase that talks to the authority owns its one [`Flight`] and the deadline that ends
/// it. An explicit tag, with the flight declared first after anything smaller than it, puts the
/// flight at the same offset in every phase: the hot path (a timer, a renewal, its reply)
/// then finds it without decoding which phase holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Idle,
    Acquiring {
        /// `release` was called while an attempt was in flight.
        cancel: bool,
        flight: Flight,
        /// Stop trying once an attempt could not end before this ([`NEVER`]: keep trying).
        give_up_at: Instant,
        /// An observed record to take over once it has stood still long enough
        /// (compare-and-set stores).
        takeover: Option<Observation>,
    },
    Held {
        /// The renewal: due at its time, or out.
        flight: Flight,
        /// End of the local validity.
        valid_until: Instant,
    },
    Releasing {
        flight: Flight,
        /// When the grant would have expired anyway: the release then ends unacknowledged,
        /// since nothing is left to give back.
        give_up_at: Instant,
    },
    Lost,
    Released,
}

impl Phase {
    fn flight(&self) -> Option<Flight> {
        match *self {
            Phase::Acquiring { flight, .. }
            | Phase::Held { flight, .. }
            | Phase::Releasing { flight, .. } => Some(flight),
            Phase::Idle | Phase::Lost | Phase::Released => None,
        }
    }

    fn flight_mut(&mut self) -> Option<&mut Flight> {
        match self {
            Phase::Acquiring { flight, .. }
            | Phase::Held { flight, .. }
            | Phase::Releasing { flight, .. } => Some(flight),
            Phase::Idle | Phase::Lost | Phase::Released => None,
        }
    }
}

/// What the machine is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum State {
    /// Not holding and not trying.
    Idle,
    /// Asking the authority, or backing off between attempts.
    Acquiring,
    /// Waiting out another holder's observed record before a takeover.
    Waiting,
    /// Holding (possibly past its validity until the next call notices).
    Held,
    /// Giving the lease back.
    Releasing,
}

/// How much the holder can trust its lease right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Health {
    /// Held, and the last renewal attempt succeeded.
    Held,
    /// Held and still valid, but renewal is failing: act only if the remaining time suffices.
    Unknown,
    /// The last holding ended without the holder asking.
    Lost,
    /// The last holding ended by [`Lease::release`].
    Released,
    /// Never held, or acquiring.
    NotHeld,
}

/// What the application must know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Event {
    /// The key is ours under `fence` until `valid_until` (local clock) unless renewed.
    Acquired {
        /// Present it to every resource the lease protects.
        fence: Fence,
        /// End of the local validity.
        valid_until: Instant,
        /// The previous holder's lease ended by expiry rather than release (the authority
        /// said [`Reply::GrantedAfterExpiry`]): it may have stopped half-way, so recover before
        /// trusting the protected resource's state. `false` also when the authority cannot
        /// tell (see [`Reply::Granted`]).
        after_expiry: bool,
    },
    /// A renewal extended the validity.
    Renewed {
        /// Unchanged by renewal.
        fence: Fence,
        /// New end of the local validity.
        valid_until: Instant,
    },
    /// An acquisition ended without a grant.
    NotAcquired {
        /// Why.
        reason: NotAcquired,
    },
    /// The lease is gone; stop acting on `fence` now.
    Lost {
        /// The fence that must no longer be used.
        fence: Fence,
        /// Why.
        reason: LostReason,
    },
    /// A release finished: acknowledged, or given up once the grant expired anyway.
    Released {
        /// The fence given back.
        fence: Fence,
        /// The authority answered the release, so the key was free at once. `false`: no
        /// answer came before the grant's validity ran out, so the key frees by expiry, up to
        /// a ttl after the last successful renewal.
        acknowledged: bool,
    },
}

/// Why an acquisition ended without a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum NotAcquired {
    /// Someone else holds the key and the deadline came first.
    Busy,
    /// The authority could not be reached before the deadline.
    Unavailable,
    /// [`Lease::release`] was called during the acquisition.
    Cancelled,
    /// The authority refused the request outright.
    Rejected(Reject),
    /// The authority cannot be talked to as configured (a refused certificate, missing
    /// credentials): see [`Lease::handle_permanent_error`].
    Unreachable,
}

/// Why a held lease was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum LostReason {
    /// The local validity ran out before a renewal succeeded.
    Expired,
    /// The authority says the grant is no longer ours.
    Revoked,
    /// The authority refused the renewal outright.
    Rejected(Reject),
    /// The authority can no longer be talked to as configured (credentials revoked, a
    /// certificate refused): see [`Lease::handle_permanent_error`].
    Unreachable,
}

/// Misuse of [`Lease::acquire`] and friends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum AcquireError {
    /// The lease is already held.
    AlreadyHeld,
    /// An acquisition is already under way.
    InProgress,
    /// A release is under way; wait for [`Event::Released`].
    Releasing,
}

/// Misuse of [`Lease::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ReleaseError {
    /// Nothing is held or being acquired.
    NotHeld,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Held => "held",
            Health::Unknown => "held, but renewal is failing",
            Health::Lost => "lost",
            Health::Released => "released",
            Health::NotHeld => "not held",
        })
    }
}

impl fmt::Display for NotAcquired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotAcquired::Busy => f.write_str("held by someone else until the deadline"),
            NotAcquired::Unavailable => f.write_str("the authority was unreachable until the deadline"),
            NotAcquired::Cancelled => f.write_str("cancelled"),
            NotAcquired::Rejected(r) => write!(f, "refused by the authority: {r}"),
            NotAcquired::Unreachable => f.write_str("the authority cannot be reached as configured"),
        }
    }
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LostReason::Expired => f.write_str("validity ran out before a renewal succeeded"),
            LostReason::Revoked => f.write_str("the authority says the lease is no longer ours"),
            LostReason::Rejected(r) => write!(f, "the authority refused the renewal: {r}"),
            LostReason::Unreachable => f.write_str("the authority can no longer be reached as configured"),
        }
    }
}

impl fmt::Display for AcquireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AcquireError::AlreadyHeld => "lease is already held",
            AcquireError::InProgress => "an acquisition is already under way",
            AcquireError::Releasing => "a release is under way",
        })
    }
}
impl core::error::Error for AcquireError {}

impl fmt::Display for ReleaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("lease is neither held nor being acquired")
    }
}
impl core::error::Error for ReleaseError {}

impl Lease {
    /// A lease for `owner`, idle. `owner` must be unique per incarnation (see [`OwnerId`]).
    pub const fn new(owner: OwnerId, config: Config) -> Result<Lease, ConfigError> {
        if let Err(e) = config.validate() {
            return Err(e);
        }
        Ok(Lease {
            config,
            owner,
            phase: Phase::Idle,
            fence: Fence::NONE,
            // Mixing in the owner keeps identically configured leases from retrying in step.
            rng: config.jitter_seed ^ owner.0.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            next_id: 0,
            failures: 0,
            events: [None, None],
        })
    }

    // ----- getters -----

    /// The timing this lease runs on.
    pub const fn config(&self) -> &Config {
        &self.config
    }

    /// Who this lease asks as.
    pub const fn owner(&self) -> OwnerId {
        self.owner
    }

    /// What the machine is doing.
    pub const fn state(&self) -> State {
        match self.phase {
            Phase::Idle | Phase::Lost | Phase::Released => State::Idle,
            Phase::Acquiring { takeover: Some(_), .. } => State::Waiting,
            Phase::Acquiring { .. } => State::Acquiring,
            Phase::Held { .. } => State::Held,
            Phase::Releasing { .. } => State::Releasing,
        }
    }

    /// The fence of the lease held now, if any.
    pub const fn fence(&self) -> Option<Fence> {
        match self.phase {
            Phase::Held { .. } => Some(self.fence),
            _ => None,
        }
    }

    /// How long the lease may still be relied on at local time `now`; `None` once it may not.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        match self.phase {
            Phase::Held { valid_until, .. } if now < valid_until => Some(valid_until - now),
            _ => None,
        }
    }

    /// How much the holder can trust its lease at `now`.
    pub fn health(&self, now: Instant) -> Health {
        match self.phase {
            Phase::Held { valid_until, .. } if now >= valid_until => Health::Lost,
            Phase::Held { .. } if self.failures > 0 => Health::Unknown,
            Phase::Held { .. } => Health::Held,
            Phase::Releasing { .. } | Phase::Released => Health::Released,
            Phase::Lost => Health::Lost,
            Phase::Idle | Phase::Acquiring { .. } => Health::NotHeld,
        }
    }

    /// Held, still valid, and renewing without trouble.
    pub fn is_healthy(&self, now: Instant) -> bool {
        self.health(now) == Health::Held
    }

    // ----- verbs -----

    /// Start acquiring; keep trying (waiting out other holders) until granted or
    /// [`release`](Lease::release)d.
    pub fn acquire(&mut self, now: Instant) -> Result<(), AcquireError> {
        self.start_acquire(now, NEVER)
    }

    /// Make one attempt; if the key is held or the authority unreachable, end with
    /// [`Event::NotAcquired`] instead of waiting.
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), AcquireError> {
        self.start_acquire(now, now)
    }

    /// Keep trying until `deadline`, then end with [`Event::NotAcquired`]. An attempt already
    /// in flight at the deadline is still honoured if it succeeds.
    pub fn acquire_until(&mut self, now: Instant, deadline: Instant) -> Result<(), AcquireError> {
        self.start_acquire(now, deadline)
    }

    /// Stop believing in the lease at once and give it back; or cancel an acquisition. Ends
    /// with [`Event::Released`] (or [`Event::NotAcquired`] for a cancelled acquisition).
    pub fn release(&mut self, now: Instant) -> Result<(), ReleaseError> {
        self.expire(now);
        match self.phase {
            Phase::Held { valid_until, .. } => {
                self.failures = 0;
                let flight = make_request(&mut self.next_id, now);
                self.phase = Phase::Releasing { give_up_at: valid_until, flight };
                Ok(())
            }
            Phase::Acquiring {
                ref mut cancel, flight: Flight::Unsent { .. } | Flight::Sent { .. }, ..
            } => {
                // The attempt in flight may be granted; if so it is released at once.
                *cancel = true;
                Ok(())
            }
            Phase::Acquiring { flight: Flight::Due { .. }, .. } => {
                self.not_acquired(NotAcquired::Cancelled);
                Ok(())
            }
            Phase::Releasing { .. } => Ok(()),
            Phase::Idle | Phase::Lost | Phase::Released => Err(ReleaseError::NotHeld),
        }
    }

    // ----- inputs -----

    /// Feed a reply from the authority. Replies to anything but this owner's newest request are
    /// ignored.
    pub fn handle_response(&mut self, now: Instant, response: Response) {
        if self.expire(now) {
            return;
        }
        let Some((id, sent_at)) = self.phase.flight().and_then(Flight::sent) else { return };
        if id != response.id || response.owner != self.owner {
            return;
        }
        // Every branch below moves the phase on: to a new flight or to an end.
        match self.phase {
            Phase::Acquiring { .. } => self.on_acquire_reply(now, sent_at, response.reply),
            Phase::Held { .. } => self.on_renew_reply(now, sent_at, response.reply),
            Phase::Releasing { .. } => self.on_release_reply(now, response.reply),
            Phase::Idle | Phase::Lost | Phase::Released => {}
        }
    }

    /// The request `id` could not be delivered or answered (connection refused, reset,
    /// timed out, garbled reply). It is retried with backoff.
    pub fn handle_transport_error(&mut self, now: Instant, id: RequestId) {
        if self.expire(now) {
            return;
        }
        if self.phase.flight().and_then(Flight::sent).is_some_and(|(sent, _)| sent == id) {
            self.fail(now);
        }
    }

    /// The request `id` failed in a way retrying cannot mend: the adapter cannot reach the
    /// authority as configured (a refused certificate, missing credentials, a bad URL). An
    /// acquisition ends at once ([`NotAcquired::Unreachable`]), a holding is lost at once
    /// ([`LostReason::Unreachable`]: ending early is the safe direction, and riding out the
    /// validity would only delay the news), and a release ends unacknowledged.
    pub fn handle_permanent_error(&mut self, now: Instant, id: RequestId) {
        if self.expire(now) {
            return;
        }
        if self.phase.flight().and_then(Flight::sent).is_none_or(|(sent, _)| sent != id) {
            return;
        }
        match self.phase {
            Phase::Acquiring { .. } => self.not_acquired(NotAcquired::Unreachable),
            Phase::Held { .. } => {
                self.end(Phase::Lost, Event::Lost { fence: self.fence, reason: LostReason::Unreachable })
            }
            Phase::Releasing { .. } => {
                self.end(Phase::Released, Event::Released { fence: self.fence, acknowledged: false })
            }
            Phase::Idle | Phase::Lost | Phase::Released => {}
        }
    }

    /// The time from [`poll_timeout`](Lease::poll_timeout) came (early or spurious calls are
    /// harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.expire(now) {
            return;
        }
        let timeout = self.config.request_timeout;
        if self.phase.flight().is_some_and(|f| f.overdue(now, timeout)) {
            self.fail(now);
        }
        // Checked after a failure too: a retry due at once is made in the same call.
        if let Some(flight) = self.phase.flight_mut() {
            if matches!(*flight, Flight::Due { at } if now >= at) {
                *flight = make_request(&mut self.next_id, now);
            }
        }
    }

    // ----- outputs -----

    /// The next request to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Request> {
        let flight = self.phase.flight_mut()?;
        let Flight::Unsent { id, at } = *flight else { return None };
        *flight = Flight::Sent { id, at };
        Some(Request { id, owner: self.owner, op: self.op()? })
    }

    /// The next event for the application, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        let first = self.events[0].take()?;
        self.events[0] = self.events[1].take();
        Some(first)
    }

    /// When [`handle_timeout`](Lease::handle_timeout) must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timeout = self.config.request_timeout;
        match self.phase {
            Phase::Held { valid_until: end, flight } | Phase::Releasing { give_up_at: end, flight } => {
                Some(flight.deadline(timeout).min(end))
            }
            Phase::Acquiring { flight, .. } => Some(flight.deadline(timeout)),
            Phase::Idle | Phase::Lost | Phase::Released => None,
        }
    }

    // ----- internals -----

    fn start_acquire(&mut self, now: Instant, give_up_at: Instant) -> Result<(), AcquireError> {
        self.expire(now);
        match self.phase {
            Phase::Idle | Phase::Lost | Phase::Released => {
                self.failures = 0;
                let flight = make_request(&mut self.next_id, now);
                self.phase = Phase::Acquiring { give_up_at, cancel: false, takeover: None, flight };
                Ok(())
            }
            Phase::Acquiring { .. } => Err(AcquireError::InProgress),
            Phase::Held { .. } => Err(AcquireError::AlreadyHeld),
            Phase::Releasing { .. } => Err(AcquireError::Releasing),
        }
    }

    /// Ends a holding or release whose time is up. Returns whether it did.
    fn expire(&mut self, now: Instant) -> bool {
        match self.phase {
            Phase::Held { valid_until, .. } if now >= valid_until => {
                self.end(Phase::Lost, Event::Lost { fence: self.fence, reason: LostReason::Expired });
                true
            }
            // The authority has expired the grant by now: nothing left to give back.
            Phase::Releasing { give_up_at, .. } if now >= give_up_at => {
                self.end(Phase::Released, Event::Released { fence: self.fence, acknowledged: false });
                true
            }
            _ => false,
        }
    }

    fn on_acquire_reply(&mut self, now: Instant, sent_at: Instant, reply: Reply) {
        let Phase::Acquiring { give_up_at, cancel, takeover, .. } = self.phase else {
            return;
        };
        match reply {
            Reply::Granted { fence, ttl } | Reply::GrantedAfterExpiry { fence, ttl } => {
                let after_expiry = matches!(reply, Reply::GrantedAfterExpiry { .. });
                if fence <= self.fence {
                    // A replayed or confused grant: an old fence is never trusted.
                    return self.fail(now);
                }
                self.fence = fence;
                let valid_until = self.anchor(sent_at, now) + self.config.validity(ttl.min(self.config.ttl));
                if cancel {
                    self.failures = 0;
                    let flight = make_request(&mut self.next_id, now);
                    let give_up_at = valid_until.max(now + self.config.request_timeout);
                    self.phase = Phase::Releasing { give_up_at, flight };
                    return;
                }
                if valid_until <= now {
                    // The reply came too late to rely on. Asking again gets a fresh grant
                    // (and a new fence) from our own stale one.
                    return self.fail(now);
                }
                self.failures = 0;
                let renew_at = (sent_at + self.config.renew_every).max(now);
                self.phase = Phase::Held { valid_until, flight: Flight::Due { at: renew_at } };
                self.push(Event::Acquired { fence, valid_until, after_expiry });
            }
            Reply::Busy { retry_after } => {
                if cancel {
                    return self.not_acquired(NotAcquired::Cancelled);
                }
                // Poll at least every `backoff_max`: a holder may release long before its
                // grant would expire, and a waiter that slept the whole `retry_after` would be
                // starved by a holder that releases and re-acquires in between.
                let jitter = self.jitter(self.config.backoff_min);
                let wait = retry_after.min(self.config.backoff_max);
                self.retry_acquire_at(now, now + wait + jitter, give_up_at, None);
            }
            Reply::Observed { version, ttl } => {
                if cancel {
                    return self.not_acquired(NotAcquired::Cancelled);
                }
                // Anchored at receipt of the first sighting of this version: the write of it
                // happened before we read it. A changed version starts the wait again.
                let sighting = match takeover {
                    Some(o) => o.sighting.again(&self.config, now, version, ttl),
                    None => Sighting::new(&self.config, now, version, ttl),
                };
                let due = sighting.due();
                // Poll meanwhile: the holder may die right after a renewal we have not seen,
                // or release early; either way waiting out a stale sighting would cost a
                // second full ttl.
                let poll = now + self.config.backoff_max;
                let (at, ready) = if due <= poll { (due.max(now), true) } else { (poll, false) };
                let o = Observation { sighting, ready };
                self.retry_acquire_at(now, at, give_up_at, Some(o));
            }
            Reply::Rejected(r) => self.not_acquired(NotAcquired::Rejected(r)),
            Reply::Unavailable | Reply::NotHolder | Reply::Released => self.fail(now),
        }
    }

    fn retry_acquire_at(
        &mut self,
        now: Instant,
        at: Instant,
        give_up_at: Instant,
        takeover: Option<Observation>,
    ) {
        let Some(attempt) = last_chance(now, at, give_up_at) else {
            return self.not_acquired(NotAcquired::Busy);
        };
        // A takeover is safe only from its due time on: a last attempt brought forward to the
        // deadline is a plain acquire, which catches a release but never takes over a record
        // that has not stood still long enough.
        let takeover = match takeover {
            Some(o) if attempt < at => Some(Observation { ready: false, ..o }),
            other => other,
        };
        self.phase =
            Phase::Acquiring { give_up_at, cancel: false, takeover, flight: Flight::Due { at: attempt } };
        self.failures = 0;
    }

    fn on_renew_reply(&mut self, now: Instant, sent_at: Instant, reply: Reply) {
        let Phase::Held { valid_until, .. } = self.phase else {
            return;
        };
        match reply {
            Reply::Granted { fence, ttl } if fence == self.fence => {
                let until = self.anchor(sent_at, now) + self.config.validity(ttl.min(self.config.ttl));
                let valid_until = valid_until.max(until);
                self.failures = 0;
                let renew_at = (sent_at + self.config.renew_every).max(now);
                self.phase = Phase::Held { valid_until, flight: Flight::Due { at: renew_at } };
                self.push(Event::Renewed { fence, valid_until });
            }
            Reply::NotHolder | Reply::Busy { .. } | Reply::Observed { .. } => {
                self.end(Phase::Lost, Event::Lost { fence: self.fence, reason: LostReason::Revoked })
            }
            Reply::Rejected(r) => {
                self.end(Phase::Lost, Event::Lost { fence: self.fence, reason: LostReason::Rejected(r) })
            }
            // A new grant in answer to a renewal is not this grant: not believed.
            Reply::Granted { .. }
            | Reply::GrantedAfterExpiry { .. }
            | Reply::Unavailable
            | Reply::Released => self.fail(now),
        }
    }

    fn on_release_reply(&mut self, now: Instant, reply: Reply) {
        match reply {
            Reply::Unavailable => self.fail(now),
            // Released, NotHolder (already gone), or anything else: the belief ended when
            // `release` was called, and the authority will expire whatever remains.
            _ => self.end(Phase::Released, Event::Released { fence: self.fence, acknowledged: true }),
        }
    }

    /// The request the current phase calls for. The request in flight is always this one, so
    /// it need not be stored.
    fn op(&self) -> Option<Op> {
        let ttl = self.config.ttl;
        Some(match self.phase {
            Phase::Acquiring { takeover: Some(o), .. } if o.ready => {
                Op::Takeover { version: o.sighting.version(), ttl }
            }
            Phase::Acquiring { .. } => Op::Acquire { ttl },
            Phase::Held { .. } => Op::Renew { fence: self.fence, ttl },
            Phase::Releasing { .. } => Op::Release { fence: self.fence },
            Phase::Idle | Phase::Lost | Phase::Released => return None,
        })
    }

    /// The newest request failed: back off and retry, or give up.
    fn fail(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let at = now + self.backoff();
        match self.phase {
            Phase::Acquiring { cancel: true, .. } => self.not_acquired(NotAcquired::Cancelled),
            Phase::Acquiring { give_up_at, ref mut flight, .. } => match last_chance(now, at, give_up_at) {
                Some(at) => *flight = Flight::Due { at },
                None => self.not_acquired(NotAcquired::Unavailable),
            },
            Phase::Held { ref mut flight, .. } | Phase::Releasing { ref mut flight, .. } => {
                *flight = Flight::Due { at }
            }
            Phase::Idle | Phase::Lost | Phase::Released => {}
        }
    }

    fn not_acquired(&mut self, reason: NotAcquired) {
        self.end(Phase::Idle, Event::NotAcquired { reason });
    }

    fn end(&mut self, phase: Phase, event: Event) {
        self.phase = phase;
        self.failures = 0;
        self.push(event);
    }

    fn push(&mut self, event: Event) {
        match self.events {
            [None, _] => self.events[0] = Some(event),
            [Some(_), None] => self.events[1] = Some(event),
            [Some(_), Some(_)] => self.events = [self.events[1], Some(event)],
        }
    }

    /// Where validity is counted from: the request's send time.
    #[allow(unused_variables)]
    fn anchor(&self, sent_at: Instant, received_at: Instant) -> Instant {
        #[cfg(feature = "fault-injection")]
        if self.config.fault == crate::config::Fault::AnchorAtReceive {
            return received_at;
        }
        sent_at
    }

    /// Exponential backoff with jitter in `[d/2, d]`.
    fn backoff(&mut self) -> Duration {
        let doublings = u32::from(self.failures.saturating_sub(1).min(20));
        let base = self.config.backoff_min.saturating_mul(1 << doublings).min(self.config.backoff_max);
        let half = base.mul_div_floor(1, 2);
        half + self.jitter(base - half)
    }

    /// Uniform in `[0, max]`.
    fn jitter(&mut self, max: Duration) -> Duration {
        // splitmix64: tiny, and good enough to spread retries.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Duration::from_micros(z % max.as_micros().saturating_add(1).max(1))
    }
}

/// A new request, made at `now`, for the caller to put in its phase.
fn make_request(next_id: &mut u32, now: Instant) -> Flight {
    let id = RequestId(*next_id);
    *next_id = next_id.wrapping_add(1);
    Flight::Unsent { id, at: now }
}

/// When an acquisition that gives up at `give_up_at` makes its next attempt, planned for `at`:
/// then, or at the deadline itself if `at` is later, so that a waiter keeps trying for its
/// whole allowance and its last attempt (honoured if granted, see
/// [`Lease::acquire_until`]) can still catch a release just before the deadline. `None` once
/// the deadline has come.
fn last_chance(now: Instant, at: Instant, give_up_at: Instant) -> Option<Instant> {
    (now < give_up_at).then_some(at.min(give_up_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    fn config() -> Config {
        let mut c = Config::new(TTL);
        c.drift = crate::Drift::from_ppm(10_000);
        c.margin = Duration::ZERO;
        c
    }
    fn ms(n: u64) -> Instant {
        Instant::from_millis(n)
    }
    /// First renewal of a lease acquired at 0: ttl/3.
    const RENEW: Instant = Instant::from_micros(3_333_333);
    fn lease() -> Lease {
        Lease::new(OwnerId(1), config()).unwrap()
    }
    fn reply(l: &mut Lease, now: Instant, req: &Request, reply: Reply) {
        l.handle_response(now, Response { id: req.id, owner: req.owner, reply });
    }
    fn granted(fence: u64) -> Reply {
        Reply::Granted { fence: Fence(fence), ttl: TTL }
    }
    /// Acquires with fence 1, sent at 0 and answered at `rtt` ms.
    fn held(rtt: u64) -> Lease {
        let mut l = lease();
        l.acquire(ms(0)).unwrap();
        let r = l.poll_transmit().unwrap();
        reply(&mut l, ms(rtt), &r, granted(1));
        l
    }

    #[test]
    fn validity_is_anchored_at_send_not_reply() {
        let mut l = held(3_000);
        assert_eq!(
            l.poll_event(),
            Some(Event::Acquired { fence: Fence(1), valid_until: ms(9_900), after_expiry: false })
        );
        assert_eq!(l.remaining(ms(3_000)), Some(Duration::from_millis(6_900)));
        assert_eq!(l.remaining(ms(9_899)), Some(Duration::from_millis(1)));
        assert_eq!(l.remaining(ms(9_900)), None);
    }

    #[test]
    fn a_reply_slower_than_the_validity_is_not_trusted() {
        let mut l = lease();
        l.acquire(ms(0)).unwrap();
        let r = l.poll_transmit().unwrap();
        // No timer ran in between (the request timeout would normally have fired).
        reply(&mut l, ms(9_950), &r, granted(1));
        assert_eq!(l.poll_event(), None);
        assert_eq!(l.state(), State::Acquiring);
        assert_eq!(l.remaining(ms(9_950)), None);
        // The retry gets a fresh grant with a newer fence.
        l.handle_timeout(l.poll_timeout().unwrap());
        let r = l.poll_transmit().unwrap();
        assert_eq!(r.op, Op::Acquire { ttl: TTL });
        reply(&mut l, ms(11_000), &r, granted(2));
        assert!(matches!(l.poll_event(), Some(Event::Acquired { fence: Fence(2), .. })));
    }

    #[test]
    fn renews_on_schedule_and_extends_from_the_renewal_send() {
        let mut l = held(10);
        l.poll_event();
        assert_eq!(l.poll_timeout(), Some(RENEW));
        l.handle_timeout(RENEW);
        let r = l.poll_transmit().unwrap();
        assert_eq!(r.op, Op::Renew { fence: Fence(1), ttl: TTL });
        reply(&mut l, ms(3_400), &r, granted(1));
        assert_eq!(
            l.poll_event(),
            Some(Event::Renewed { fence: Fence(1), valid_until: RENEW + Duration::from_millis(9_900) })
        );
        assert_eq!(l.poll_timeout(), Some(Instant::from_micros(6_666_666)));
        assert!(l.is_healthy(ms(3_400)));
    }

    #[test]
    fn failing_renewals_retry_then_lose_at_the_deadline() {
        let mut l = held(10);
        l.poll_event();
        let mut now = ms(0);
        let mut renewals = 0;
        loop {
            let t = l.poll_timeout().expect("a held lease always has a timer");
            assert!(t >= now, "poll_timeout went back in time");
            now = t;
            l.handle_timeout(now);
            while let Some(r) = l.poll_transmit() {
                renewals += 1;
                l.handle_transport_error(now, r.id);
            }
            if let Some(e) = l.poll_event() {
                assert_eq!(e, Event::Lost { fence: Fence(1), reason: LostReason::Expired });
                break;
            }
            if now > RENEW {
                assert_eq!(l.health(now), Health::Unknown);
            }
        }
        assert_eq!(now, ms(9_900), "Lost is reported exactly at the deadline");
        assert!(renewals > 3, "renewal was retried ({renewals})");
        assert_eq!(l.health(now), Health::Lost);
        assert_eq!(l.remaining(now), None);
        assert_eq!(l.fence(), None);
    }

    #[test]
    fn a_late_renewal_reply_cannot_resurrect_the_lease() {
        let mut l = held(10);
        l.poll_event();
        l.handle_timeout(RENEW);
        let r = l.poll_transmit().unwrap();
        // Reply arrives only after the deadline passed, with no timer call in between.
        reply(&mut l, ms(9_901), &r, granted(1));
        assert_eq!(l.poll_event(), Some(Event::Lost { fence: Fence(1), reason: LostReason::Expired }));
        assert_eq!(l.poll_event(), None);
        assert_eq!(l.remaining(ms(9_901)), None);
    }

    #[test]
    fn stale_duplicate_and_forged_replies_are_ignored() {
        let mut l = lease();
        l.acquire(ms(0)).unwrap();
        let r = l.poll_transmit().unwrap();
        let other_owner = Response { id: r.id, owner: OwnerId(99), reply: granted(1) };
        l.handle_response(ms(1), other_owner);
        l.handle_response(ms(1), Response { id: RequestId(r.id.0 + 1), owner: r.owner, reply: granted(1) });
        assert_eq!(l.poll_event(), None);
        reply(&mut l, ms(2), &r, granted(5));
        assert!(matches!(l.poll_event(), Some(Event::Acquired { fence: Fence(5), .. })));
        // A duplicate of the same reply changes nothing.
        reply(&mut l, ms(3), &r, granted(5));
        assert_eq!(l.poll_event(), None);
        // A renewal answered with a different fence is not believed.
        l.handle_timeout(RENEW);
        let r = l.poll_transmit().unwrap();
        reply(&mut l, ms(3_334), &r, granted(6));
        assert_eq!(l.poll_event(), None);
        assert_eq!(l.health(ms(3_334)), Health::Unknown);
        assert_eq!(l.remaining(ms(3_334)), Some(Duration::from_millis(9_900 - 3_334)));
    }

    #[test]
    fn an_old_fence_is_never_accepted_again() {
        let mut l = held(1);
        l.poll_event();
        l.release(ms(5)).unwrap();
        let r = l.poll_transmit().unwrap();
        reply(&mut l, ms(6), &r, Reply::Released);
        assert_eq!(l.poll_event(), Some(Event::Released { fence: Fence(1), acknowledged: true }));
        l.acquire(ms(7)).unwrap();
        let r = l.poll_transmit().unwrap();
        reply(&mut l, ms(8), &r, granted(1));
        assert_eq!(l.poll_event(), None);
        assert_eq!(l.state(), State::Acquiring);
    }

    #[test]
    fn busy_waits_for_the_holder_then_retries() {
        let mut l = lease();
        l.acquire(ms(0)).unwrap();
        let r = l.poll_transmit().unwrap();
        // A holder's remaining time shorter than the poll cap is waited out exactly...
        let short = Reply::Busy { retry_after: Duration::from_millis(400) };
        reply(&mut l, ms(1), &r, short);
        let t = l.poll_timeout().unwrap();
        let jitter_max = config().backoff_min;
        assert!(t >= ms(401) && t <= ms(401) + jitter_max, "{t}");
        l.handle_timeout(t);
        let r = l.poll_transmit().unwrap();
        assert_eq!(r.op, Op::Acquire { ttl: TTL });
        // ...a longer one is polled every backoff_max, in case the holder releases early.
        let long = Reply::Busy { retry_after: Duration::from_secs(9) };
        reply(&mut l, t, &r, long);
        let t2 = l.poll_timeout().unwrap();
        let cap = config().backoff_max;
        assert!(t2 >= t + cap && t2 <= t + cap + jitter_max, "{t2}");
    }

    #[test]
    fn try_acquire_gives_up_on_busy() {
        let mut l = lease();
        l.try_acquire(ms(0)).unwrap();
        let r = l.poll_transmit().unwrap();
        reply(&mut l, ms(1), &r, Reply::Busy { retry_after: Duration::from_secs(4) });
        assert_eq!(l.poll_event(), Some(Event::NotAcquired { reason: NotAcquired::Busy }));
        assert_eq!(l.state(), State::Idle);
        assert_eq!(l.poll_timeout(), None);
    }

    #[test]
    fn acquire_until_gives_up_when_unreachable_past_the_deadline() {
        let mut l = lease();
        l.acquire_until(ms(0), ms(2_000)).unwrap();
        let mut now = ms(0);
        let event = loop {
            if let Some(r) = l.poll_transmit() {
                l.handle_transport_error(now, r.id);
            }
            if let Some(e) = l.poll_event() {
                break e;
            }
            now = l.poll_timeout().unwrap();
            l.handle_timeout(now);
        };
        assert_eq!(event, Event::NotAcquired { reason: NotAcquired::Unavailable });
        assert_eq!(now, ms(2_000), "the last attempt is made at the deadline, not a backoff before it");
    }

    #[test]
    fn a_waiter_tries_until_its_deadline_and_its_last_attempt_can_win() {
        // The holder's grant has 14 s to go, far past the deadline: a retry planned at
        // `retry_after` would fall beyond it, yet the waiter must keep polling, and the attempt
        // made at the deadline itself must still be able to catch a release.
        let busy = Reply::Busy { retry_after: Duration::from_secs(14) };
        let deadline = ms(2_000);
        for released_before_last in [false, true] {
            let mut l = lease();
            l.acquire_until(ms(0), deadline).unwrap();
            let mut now = ms(0);
            let (mut attempts, mut last) = (0, None);
            let event = loop {
                if let Some(r) = l.poll_transmit() {
                    (attempts, last) = (attempts + 1, Some(now));
                    let answer = match released_before_last && now == deadline {
                        true => granted(1),
                        false => busy,
                    };
                    reply(&mut l, now + Duration::from_millis(1), &r, answer);
                }
                if let Some(e) = l.poll_event() {
                    break e;
                }
                now = l.poll_timeout().unwrap();
                l.handle_timeout(now);
            };
            assert!(attempts >= 2, "kept polling: {attempts} attempts");
            assert_eq!(last, Some(deadline), "the last attempt is made at the deadline");
            match released_before_last {
                true => assert!(matches!(event, Event::Acquired { fence: Fence(1), .. }), "{event:?}"),
                false => assert_eq!(event, Event::NotAcquired { reason: NotAcquired::Busy }),
            }
        }
    }

    #[test]
    fn a_deadline_before_the_takeover_is_due_never_takes_over() {
        // Observed at 50 ms, the takeover is due ttl·(1+ε) later (10.15 s); the deadline at
        // 9.99 s comes first, within one poll interval of it. Its last attempt may catch a
        // release, but must not take over.
        let mut l = lease();
        l.acquire_until(ms(0), ms(9_990)).unwrap();
        let r = l.poll_transmit().unwrap();
        reply(&mut l, ms(50), &r, Reply::Observed { version: 7, ttl: TTL });
        let (mut last, mut ended) = (None, None);
        for _ in 0..1_000 {
            if let Some(e) = l.poll_event() {
                ended = Some(e);
                break;
            }
            let now = l.poll_timeout().unwrap();
            l.handle_timeout(now);
            if let Some(r) = l.poll_transmit() {
                assert_eq!(r.op, Op::Acquire { ttl: TTL }, "at {now}: only polls before the takeover is due");
                last = Some(now);
                reply(&mut l, now + Duration::from_millis(100), &r, Reply::Observed { version: 7, ttl: TTL });
            }
        }
        assert_eq!(last, Some(ms(9_990)), "the last poll is at the deadline");
        assert_eq!(ended, Some(Event::NotAcquired { reason: NotAcquired::Busy }));
    }

    #[test]
    fn observe_and_wait_then_take_over_the_observed_version() {
        let mut l = lease();
        let poll = config().backoff_max;
        l.acquire(ms(0)).unwrap();
        let r = l.poll_transmit().unwrap();
        let seen = |version| Reply::Observed { version, ttl: TTL };
        reply(&mut l, ms(50), &r, seen(7));
        assert_eq!(l.state(), State::Waiting);
        // Polls (plain acquires) every backoff_max while version 7 stands still...
        let mut now;
        let mut replied = ms(50);
        loop {
            let t = l.poll_timeout().unwrap();
            assert!(t <= replied + poll, "polls at least every backoff_max");
            now = t;
            l.handle_timeout(now);
            let r = l.poll_transmit().unwrap();
            if let Op::Takeover { version, .. } = r.op {
                assert_eq!(version, 7);
                // ...and takes over exactly ttl·(1+ε) after the *first* sighting.
                assert_eq!(now, ms(50 + 10_100));
                reply(&mut l, now + Duration::from_millis(5), &r, granted(3));
                break;
            }
            assert_eq!(r.op, Op::Acquire { ttl: TTL });
            replied = now + Duration::from_millis(5);
            reply(&mut l, replied, &r, seen(7));
        }
        assert_eq!(
            l.poll_event(),
            Some(Event::Acquired {
                fence: Fence(3),
                valid_until: now + Duration::from_millis(9_900),
                after_expiry: false
            })
        );
    }

    #[test]
    fn a_renewed_record_restarts_the_wait() {
        let mut l = lease();
        l.acquire(ms(0)).unwrap();
        let r = l.poll_transmit().unwrap();
        reply(&mut l, ms(0), &r, Reply::Observed { version: 1, ttl: TTL });
        let t = l.poll_timeout().unwrap();
        l.handle_timeout(t);
        let r = l.poll_transmit().unwrap();
        assert_eq!(r.op, Op::Acquire { ttl: TTL });
        // The holder renewed: version 2 is a new sighting, counted from now.
        reply(&mut l, t, &r, Reply::Observed { version: 2, ttl: TTL });
        let mut now;
        let r = loop {
            now = l.poll_timeout().unwrap();
            l.handle_timeout(now);
            let r = l.poll_transmit().unwrap();
            if matches!(r.op, Op::Takeover { .. }) {
                break r;
            }
            reply(&mut l, now, &r, Reply::Observed { version: 2, ttl: TTL });
        };
        assert_eq!(r.op, Op::Takeover { version: 2, ttl: TTL });
        assert_eq!(now, t + Duration::from_millis(10_100));
    }

    #[test]
    fn a_poll_that_finds_the_key_free_is_granted_at_once() {
        let mut l = lease();
        l.acquire(ms(0)).unwrap();
        let r = l.poll_transmit().unwrap();
        reply(&mut l, ms(0), &r, Reply::Observed { version: 1, ttl: TTL });
        let t = l.poll_timeout().unwrap();
        assert!(t < ms(2_000));
        l.handle_timeout(t);
        let r = l.poll_transmit().unwrap();
        reply(&mut l, t, &r, granted(4));
        assert!(matches!(l.poll_event(), Some(Event::Acquired { fence: Fence(4), .. })));
    }

    #[test]
    fn a_grant_after_expiry_is_told_so() {
        let mut l = lease();
        l.acquire(ms(0)).unwrap();
        let r = l.poll_transmit().unwrap();
        reply(&mut l, ms(5), &r, Reply::GrantedAfterExpiry { fence: Fence(2), ttl: TTL });
        assert_eq!(
            l.poll_event(),
            Some(Event::Acquired { fence: Fence(2), valid_until: ms(9_900), after_expiry: true })
        );
        // A renewal answered as if it were a new grant is not believed.
        l.handle_timeout(RENEW);
        let r = l.poll_transmit().unwrap();
        reply(&mut l, ms(3_340), &r, Reply::GrantedAfterExpiry { fence: Fence(2), ttl: TTL });
        assert_eq!(l.poll_event(), None);
        assert_eq!(l.health(ms(3_340)), Health::Unknown);
    }

    #[test]
    fn revoked_renewal_loses_at_once() {
        let mut l = held(1);
        l.poll_event();
        l.handle_timeout(RENEW);
        let r = l.poll_transmit().unwrap();
        reply(&mut l, ms(3_340), &r, Reply::NotHolder);
        assert_eq!(l.poll_event(), Some(Event::Lost { fence: Fence(1), reason: LostReason::Revoked }));
        assert_eq!(l.remaining(ms(3_340)), None);
    }

    #[test]
    fn release_ends_belief_at_once_and_retries_until_acknowledged() {
        let mut l = held(1);
        l.poll_event();
        l.release(ms(100)).unwrap();
        assert_eq!(l.remaining(ms(100)), None);
        assert_eq!(l.health(ms(100)), Health::Released);
        let r = l.poll_transmit().unwrap();
        assert_eq!(r.op, Op::Release { fence: Fence(1) });
        reply(&mut l, ms(101), &r, Reply::Unavailable);
        l.handle_timeout(l.poll_timeout().unwrap());
        let r = l.poll_transmit().unwrap();
        assert_eq!(r.op, Op::Release { fence: Fence(1) });
        reply(&mut l, ms(900), &r, Reply::NotHolder);
        assert_eq!(l.poll_event(), Some(Event::Released { fence: Fence(1), acknowledged: true }));
        assert_eq!(l.release(ms(901)), Err(ReleaseError::NotHeld));
    }

    #[test]
    fn a_release_nobody_answers_ends_unacknowledged_when_the_grant_would_have_expired() {
        let mut l = held(1);
        l.poll_event();
        l.release(ms(100)).unwrap();
        let mut now = ms(100);
        let event = loop {
            if let Some(r) = l.poll_transmit() {
                l.handle_transport_error(now, r.id);
            }
            if let Some(e) = l.poll_event() {
                break e;
            }
            now = l.poll_timeout().unwrap();
            l.handle_timeout(now);
        };
        assert_eq!(event, Event::Released { fence: Fence(1), acknowledged: false });
        assert_eq!(now, ms(9_900), "gives up exactly when the belief would have ended");
    }

    #[test]
    fn a_permanent_error_ends_each_phase_at_once() {
        let mut l = lease();
        l.acquire(ms(0)).unwrap();
        let r = l.poll_transmit().unwrap();
        l.handle_permanent_error(ms(1), r.id);
        assert_eq!(l.poll_event(), Some(Event::NotAcquired { reason: NotAcquired::Unreachable }));
        assert_eq!(l.poll_timeout(), None, "no retry");

        let mut l = held(1);
        l.poll_event();
        l.handle_timeout(RENEW);
        let r = l.poll_transmit().unwrap();
        // An error for another request changes nothing.
        l.handle_permanent_error(RENEW, RequestId(r.id.0.wrapping_add(7)));
        assert_eq!(l.state(), State::Held);
        l.handle_permanent_error(RENEW, r.id);
        assert_eq!(l.poll_event(), Some(Event::Lost { fence: Fence(1), reason: LostReason::Unreachable }));
        assert_eq!(l.remaining(RENEW), None, "lost at once, not at the end of the validity");

        let mut l = held(1);
        l.poll_event();
        l.release(ms(5)).unwrap();
        let r = l.poll_transmit().unwrap();
        l.handle_permanent_error(ms(6), r.id);
        assert_eq!(l.poll_event(), Some(Event::Released { fence: Fence(1), acknowledged: false }));
    }

    #[test]
    fn release_during_acquire_gives_back_a_late_grant() {
        let mut l = lease();
        l.acquire(ms(0)).unwrap();
        let r = l.poll_transmit().unwrap();
        l.release(ms(1)).unwrap();
        reply(&mut l, ms(2), &r, granted(4));
        assert_eq!(l.poll_event(), None, "never told Acquired");
        assert_eq!(l.remaining(ms(2)), None);
        let r = l.poll_transmit().unwrap();
        assert_eq!(r.op, Op::Release { fence: Fence(4) });
        reply(&mut l, ms(3), &r, Reply::Released);
        assert_eq!(l.poll_event(), Some(Event::Released { fence: Fence(4), acknowledged: true }));
    }

    #[test]
    fn misuse_is_an_error_not_a_panic() {
        let mut l = held(1);
        assert_eq!(l.acquire(ms(2)), Err(AcquireError::AlreadyHeld));
        l.release(ms(3)).unwrap();
        assert_eq!(l.acquire(ms(4)), Err(AcquireError::Releasing));
        let mut idle = lease();
        assert_eq!(idle.release(ms(0)), Err(ReleaseError::NotHeld));
        idle.acquire(ms(0)).unwrap();
        assert_eq!(idle.acquire(ms(0)), Err(AcquireError::InProgress));
    }

    #[test]
    fn rejected_acquire_is_final() {
        let mut l = lease();
        l.acquire(ms(0)).unwrap();
        let r = l.poll_transmit().unwrap();
        reply(&mut l, ms(1), &r, Reply::Rejected(Reject::InvalidTtl));
        assert_eq!(
            l.poll_event(),
            Some(Event::NotAcquired { reason: NotAcquired::Rejected(Reject::InvalidTtl) })
        );
        assert_eq!(l.poll_timeout(), None);
    }

    #[test]
    fn a_request_never_handed_out_is_not_answerable_but_still_times_out() {
        let timeout = config().request_timeout;
        let mut l = lease();
        l.acquire(ms(0)).unwrap();
        // Made at 0 but not yet taken by poll_transmit: its id is 0 (the first request).
        let unsent = RequestId(0);
        assert_eq!(l.poll_timeout(), Some(ms(0) + timeout), "an unsent request times out too");
        l.handle_response(ms(1), Response { id: unsent, owner: OwnerId(1), reply: granted(1) });
        l.handle_transport_error(ms(1), unsent);
        l.handle_permanent_error(ms(1), unsent);
        assert_eq!(l.poll_event(), None, "nobody can have answered a request never handed out");
        assert_eq!(l.state(), State::Acquiring);
        // Its timeout fails it and backs off; the retry is a new request with a new id.
        l.handle_timeout(ms(0) + timeout);
        let retry_at = l.poll_timeout().unwrap();
        assert!(retry_at > ms(0) + timeout, "backs off: {retry_at}");
        assert_eq!(l.poll_transmit(), None, "nothing to send while backing off");
        l.handle_timeout(retry_at);
        let r = l.poll_transmit().unwrap();
        assert_eq!((r.id, r.op), (RequestId(1), Op::Acquire { ttl: TTL }));
        assert_eq!(l.poll_transmit(), None, "handed out once");
        assert_eq!(l.poll_timeout(), Some(retry_at + timeout));
        // Validity is anchored at when the retry was made.
        reply(&mut l, retry_at + Duration::from_millis(40), &r, granted(1));
        assert_eq!(
            l.poll_event(),
            Some(Event::Acquired {
                fence: Fence(1),
                valid_until: retry_at + Duration::from_millis(9_900),
                after_expiry: false
            })
        );
    }

    #[test]
    fn same_inputs_same_outputs() {
        let run = || {
            let mut l = lease();
            let mut out = [Instant::ZERO; 8];
            l.acquire(ms(0)).unwrap();
            for slot in out.iter_mut() {
                let r = l.poll_transmit().unwrap();
                l.handle_transport_error(ms(0), r.id);
                *slot = l.poll_timeout().unwrap();
                l.handle_timeout(*slot);
            }
            out
        };
        assert_eq!(run(), run());
    }
}
