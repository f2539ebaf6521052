//! The holder's side of a session: one [`Session`] for many keys.

use core::fmt;

use heapless::Vec;

use super::wire::{
    Grant, Label, Observed, ObservedHolder, Secret, Seq, SessionId, SessionOp, SessionReply, SessionRequest,
    SessionResponse, Value,
};
use crate::config::{Config, ConfigError};
use crate::lease::{LostReason, NotAcquired};
use crate::time::{Duration, Instant};
use crate::wire::{Fence, Key, Reject};

/// A sans-IO session from the holder's side: open it, acquire and release keys, observe up to
/// `O` keys' holders, keep it alive, close it.
///
/// Driven like [`Lease`](crate::Lease): call a verb or feed an input (`handle_*`), then
/// drain [`poll_transmit`](Session::poll_transmit) (send each request at once),
/// [`poll_event`](Session::poll_event), and arm a timer for
/// [`poll_timeout`](Session::poll_timeout). The machine never reads a clock.
///
/// # Safety contract
///
/// The session, and every key it holds, is believed until `s + ttl·(1−ε) − margin` for the
/// latest local time `s` at which a keepalive (or the open) was *made* whose reply renewed
/// it. The authority keeps each key exactly as long as the session, on its own clock, from
/// a moment after `s`. When that time comes every key is lost at the same instant: one
/// [`SessionEvent::Lost`] per key, then [`SessionEvent::SessionLost`]. A key granted by a
/// reply or pushed in a keepalive's reply is believed only until the session's current end;
/// a report of a grant older than the key's current acquisition is not believed at all, and
/// one of a key with no acquisition under way is given back (once), never believed.
/// Replies to seqs the machine is not waiting for are ignored.
#[derive(Debug, Clone)]
pub struct Session<const K: usize, const O: usize = 16> {
    config: Config,
    label: Label,
    phase: Phase,
    slots: Vec<Slot, K>,
    /// Giving back a grant reported for a key we pursue no acquisition of, while `slots` had
    /// no room for it (every slot in use): the authority reports it in every keepalive's reply
    /// and lets no one else have it until it is given back. One is enough: it reports one
    /// grant at a time, the same one until it is settled.
    spare: Option<(Key, Fence, Flight)>,
    /// The keys observed.
    watches: Vec<WatchSlot, O>,
    /// The seq of the next request.
    next_seq: u64,
    /// A session-level event awaiting [`poll_event`](Session::poll_event), after the keys'.
    event: Option<SessionEvent>,
}

/// One request's life: due to be made, made but not handed out, handed out and awaiting
/// its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flight {
    /// To be made at `at` (a renewal's time, or a retry after a transport error).
    Due { at: Instant },
    /// Made at `at`, waiting in [`Session::poll_transmit`].
    Unsent { seq: Seq, at: Instant },
    /// Handed out at `at` (what validity is anchored at); retried after the request timeout.
    Sent { seq: Seq, at: Instant },
}

impl Flight {
    /// The seq being answered and its send time, if the request is out.
    fn sent(&self) -> Option<(Seq, Instant)> {
        match *self {
            Flight::Sent { seq, at } => Some((seq, at)),
            _ => None,
        }
    }

    fn deadline(&self, timeout: Duration) -> Option<Instant> {
        match *self {
            Flight::Due { at } => Some(at),
            Flight::Unsent { .. } => None,
            Flight::Sent { at, .. } => Some(at + timeout),
        }
    }

    /// Makes the request if it is due or its reply is overdue.
    fn tick(&mut self, now: Instant, timeout: Duration, next_seq: &mut u64) {
        if self.deadline(timeout).is_some_and(|d| now >= d) {
            *self = Flight::Unsent { seq: take_seq(next_seq), at: now };
        }
    }

    /// Hands out an unsent request's seq.
    fn transmit(&mut self) -> Option<Seq> {
        let Flight::Unsent { seq, at } = *self else { return None };
        *self = Flight::Sent { seq, at };
        Some(seq)
    }
}

fn take_seq(next: &mut u64) -> Seq {
    let seq = Seq(*next);
    *next += 1;
    seq
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Opening {
        flight: Flight,
    },
    Open {
        id: SessionId,
        secret: Secret,
        valid_until: Instant,
        keepalive: Flight,
        /// The keepalive the request timeout gave up on before `keepalive`, and when it was
        /// sent. Its reply still renews, anchored at its own send time: on a link whose round
        /// trip is always longer than the request timeout every reply answers a superseded
        /// keepalive, and ignoring them would lose a session the authority keeps alive.
        overdue: Option<(Seq, Instant)>,
    },
    /// Closing: every key was given up at once; `give_up_at` is when the authority will
    /// have expired the session anyway.
    Closing {
        id: SessionId,
        secret: Secret,
        give_up_at: Instant,
        flight: Flight,
    },
    Ended,
}

/// How the keys end when the session does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The holder closes the session: held keys are given up, not lost.
    Close,
    /// The session is gone.
    Lost(LostReason),
}

#[derive(Debug, Clone)]
struct Slot {
    key: Key,
    /// The seq of the first request of this acquisition: reports of grants asked for
    /// before it are of an older acquisition.
    start: Seq,
    /// How many sessions may hold the key at once, as asked (1: a lease).
    limit: u16,
    phase: KeyPhase,
    /// An event awaiting [`Session::poll_event`].
    event: Option<SessionEvent>,
    /// What observers are told with the holder (empty: nothing, a plain acquire).
    value: Value,
}

/// An observed key.
#[derive(Debug, Clone)]
struct WatchSlot {
    key: Key,
    /// The seq of this observation's first observe: a keepalive made before it reports, if
    /// anything, an observation of the key that ended before this one began.
    start: Seq,
    phase: WatchPhase,
    /// The highest change of the key reported to the application.
    seen: u64,
    /// The highest change the authority has acknowledged hearing we saw.
    acked: u64,
    /// The keepalive carrying our acknowledgement of a change, until its reply.
    carried: Option<(Seq, u64)>,
    /// An event awaiting [`Session::poll_event`]. A change is taken from a reply only when
    /// there is none, so none is overwritten: the authority repeats what we did not take.
    event: Option<SessionEvent>,
    /// The application asked for it. `false`: an observation the authority has and we do not
    /// want (a late, reordered observe registered it again after our unobserve), being undone
    /// without telling the application.
    asked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchPhase {
    /// Asking the authority to observe.
    Asking {
        flight: Flight,
    },
    /// Observing: changes come in keepalive replies.
    Watching,
    /// Asking the authority to stop.
    Leaving {
        flight: Flight,
    },
    Done,
}

impl WatchPhase {
    fn flight_mut(&mut self) -> Option<&mut Flight> {
        match self {
            WatchPhase::Asking { flight } | WatchPhase::Leaving { flight } => Some(flight),
            WatchPhase::Watching | WatchPhase::Done => None,
        }
    }

    fn flight(&self) -> Option<&Flight> {
        match self {
            WatchPhase::Asking { flight } | WatchPhase::Leaving { flight } => Some(flight),
            WatchPhase::Watching | WatchPhase::Done => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyPhase {
    Asking {
        wait: bool,
        flight: Flight,
    },
    Queued,
    /// `confirm`: a pushed grant's confirming acquire, until the authority has it.
    Held {
        fence: Fence,
        confirm: Option<Flight>,
    },
    /// Giving back `fence`, or with [`Fence::NONE`] leaving the queue.
    Releasing {
        fence: Fence,
        flight: Flight,
    },
    /// Giving back a grant the application never asked for (or no longer wants).
    GivingBack {
        fence: Fence,
        flight: Flight,
    },
    Done,
}

impl KeyPhase {
    /// Whether this key's request in flight ends a grant the authority reports in every
    /// keepalive's reply until the request lands: a pushed grant's confirmation, a give-back,
    /// or a release (of a grant whose confirmation it overtook, perhaps).
    fn settles_a_report(&self) -> bool {
        matches!(
            self,
            KeyPhase::Held { confirm: Some(_), .. }
                | KeyPhase::Releasing { .. }
                | KeyPhase::GivingBack { .. }
        )
    }

    fn flight(&self) -> Option<&Flight> {
        match self {
            KeyPhase::Asking { flight, .. }
            | KeyPhase::Releasing { flight, .. }
            | KeyPhase::GivingBack { flight, .. } => Some(flight),
            KeyPhase::Held { confirm, .. } => confirm.as_ref(),
            KeyPhase::Queued | KeyPhase::Done => None,
        }
    }

    fn flight_mut(&mut self) -> Option<&mut Flight> {
        match self {
            KeyPhase::Asking { flight, .. }
            | KeyPhase::Releasing { flight, .. }
            | KeyPhase::GivingBack { flight, .. } => Some(flight),
            KeyPhase::Held { confirm, .. } => confirm.as_mut(),
            KeyPhase::Queued | KeyPhase::Done => None,
        }
    }
}

/// What the session machine is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SessionState {
    /// Never opened.
    Idle,
    /// Waiting for the authority to open it.
    Opening,
    /// Open (possibly past its validity until the next call notices).
    Open,
    /// Closing.
    Closing,
    /// Lost, closed, or refused.
    Ended,
}

/// What the application must know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SessionEvent {
    /// The session is open until `valid_until` (local clock) unless kept alive.
    Opened {
        /// Its id.
        session: SessionId,
        /// End of the local validity.
        valid_until: Instant,
    },
    /// The authority refused to open the session.
    NotOpened {
        /// Why.
        reason: Reject,
    },
    /// `key` is ours under `fence`, for as long as the session: until `valid_until` unless
    /// kept alive.
    Acquired {
        /// The key.
        key: Key,
        /// Present it to every resource the key protects.
        fence: Fence,
        /// The session's current end of validity.
        valid_until: Instant,
    },
    /// `key` is held by another session; we wait at `position` (1: next).
    Queued {
        /// The key.
        key: Key,
        /// Place in the queue.
        position: u16,
    },
    /// An acquisition ended without a grant.
    NotAcquired {
        /// The key.
        key: Key,
        /// Why.
        reason: NotAcquired,
    },
    /// A release finished.
    Released {
        /// The key.
        key: Key,
        /// The fence given back.
        fence: Fence,
        /// The authority answered. `false`: the key frees when the authority handles the
        /// close or expires the session.
        acknowledged: bool,
    },
    /// `key` is gone; stop acting on `fence` now.
    Lost {
        /// The key.
        key: Key,
        /// The fence that must no longer be used.
        fence: Fence,
        /// Why.
        reason: LostReason,
    },
    /// The session is gone, and every key with it (each reported by its own event first).
    SessionLost {
        /// Why.
        reason: LostReason,
    },
    /// A close finished: acknowledged, or given up once the session expired anyway.
    Closed {
        /// The authority answered.
        acknowledged: bool,
    },
    /// An observed key changed holder (the first report of an observation: its holder now).
    Observed {
        /// The key.
        key: Key,
        /// The change's number at the authority (see [`Observed::change`]).
        change: u64,
        /// The holder now, or `None`: free.
        holder: Option<ObservedHolder>,
        /// Changes between the previous report and this one that the authority no longer had
        /// (the observer lagged more than [`OBSERVED_HISTORY`](super::wire::OBSERVED_HISTORY)
        /// changes behind); 0 in the normal case.
        missed: u64,
    },
    /// An observation ended: stopped ([`Session::unobserve`]), or the session ended (`reason`
    /// `None`), or the authority refused it.
    ObserveEnded {
        /// The key.
        key: Key,
        /// Why the authority refused it, if it did.
        reason: Option<Reject>,
    },
}

/// Misuse of [`Session::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum OpenError {
    /// The session is opening, open or closing.
    AlreadyOpen,
}

/// Misuse of [`Session::acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum AcquireError {
    /// The session is not open.
    NotOpen,
    /// The key is already held.
    AlreadyHeld,
    /// The key is being acquired (or waited for) already.
    InProgress,
    /// The key is being released; wait for its event.
    Releasing,
    /// The session already tracks as many keys as it can.
    Full,
    /// A holder limit of 0: no one could ever hold the key.
    InvalidLimit,
}

/// Misuse of [`Session::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ReleaseError {
    /// The key is neither held nor being acquired.
    NotHeld,
}

/// Misuse of [`Session::observe`] and [`Session::unobserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ObserveError {
    /// The session is not open.
    NotOpen,
    /// The key is observed (or being asked for) already.
    AlreadyObserved,
    /// The key is not observed.
    NotObserved,
    /// The session already observes as many keys as it can.
    Full,
}

impl fmt::Display for ObserveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObserveError::NotOpen => "session is not open",
            ObserveError::AlreadyObserved => "key is already observed",
            ObserveError::NotObserved => "key is not observed",
            ObserveError::Full => "session observes as many keys as it can",
        })
    }
}
impl core::error::Error for ObserveError {}

/// Misuse of [`Session::close`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum CloseError {
    /// The session is not open.
    NotOpen,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("session is already opening, open or closing")
    }
}
impl core::error::Error for OpenError {}

impl fmt::Display for AcquireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AcquireError::NotOpen => "session is not open",
            AcquireError::AlreadyHeld => "key is already held",
            AcquireError::InProgress => "key is already being acquired",
            AcquireError::Releasing => "key is being released",
            AcquireError::Full => "session tracks as many keys as it can",
            AcquireError::InvalidLimit => "a holder limit must be at least 1",
        })
    }
}
impl core::error::Error for AcquireError {}

impl fmt::Display for ReleaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("key is neither held nor being acquired")
    }
}
impl core::error::Error for ReleaseError {}

impl fmt::Display for CloseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("session is not open")
    }
}
impl core::error::Error for CloseError {}

impl<const K: usize, const O: usize> Session<K, O> {
    /// A session, not yet opened, for the holder called `label`, timed by `config` (its
    /// `ttl` is the session's; `renew_every` the keepalive interval).
    pub fn new(label: Label, config: Config) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Session {
            config,
            label,
            phase: Phase::Idle,
            slots: Vec::new(),
            spare: None,
            watches: Vec::new(),
            next_seq: 1,
            event: None,
        })
    }

    // ----- getters -----

    /// What the machine is doing.
    pub const fn state(&self) -> SessionState {
        match self.phase {
            Phase::Idle => SessionState::Idle,
            Phase::Opening { .. } => SessionState::Opening,
            Phase::Open { .. } => SessionState::Open,
            Phase::Closing { .. } => SessionState::Closing,
            Phase::Ended => SessionState::Ended,
        }
    }

    /// The session's id, once open.
    pub const fn id(&self) -> Option<SessionId> {
        match self.phase {
            Phase::Open { id, .. } | Phase::Closing { id, .. } => Some(id),
            _ => None,
        }
    }

    /// How long the session (and so every key it holds) may still be relied on at `now`.
    pub fn session_remaining(&self, now: Instant) -> Option<Duration> {
        match self.phase {
            Phase::Open { valid_until, .. } if now < valid_until => Some(valid_until - now),
            _ => None,
        }
    }

    /// How long `key` may still be relied on at `now`; `None` once it may not.
    pub fn remaining(&self, now: Instant, key: &Key) -> Option<Duration> {
        self.fence(key)?;
        self.session_remaining(now)
    }

    /// The fence under which `key` is held now, if it is.
    pub fn fence(&self, key: &Key) -> Option<Fence> {
        match self.slots.iter().find(|s| s.key == *key && s.phase != KeyPhase::Done)?.phase {
            KeyPhase::Held { fence, .. } => Some(fence),
            _ => None,
        }
    }

    /// The keys held now, with their fences.
    pub fn held(&self) -> impl Iterator<Item = (&Key, Fence)> + '_ {
        self.slots.iter().filter_map(|s| match s.phase {
            KeyPhase::Held { fence, .. } => Some((&s.key, fence)),
            _ => None,
        })
    }

    // ----- verbs -----

    /// Ask the authority for a session.
    pub fn open(&mut self, now: Instant) -> Result<(), OpenError> {
        match self.phase {
            Phase::Idle | Phase::Ended => {
                self.slots.clear();
                self.spare = None;
                self.watches.clear();
                self.phase =
                    Phase::Opening { flight: Flight::Unsent { seq: take_seq(&mut self.next_seq), at: now } };
                Ok(())
            }
            _ => Err(OpenError::AlreadyOpen),
        }
    }

    /// Acquire `key`; if it is held, queue for it (`wait`: told by [`SessionEvent::Queued`],
    /// then [`SessionEvent::Acquired`] when it is handed to us) or end with
    /// [`SessionEvent::NotAcquired`].
    pub fn acquire(&mut self, now: Instant, key: Key, wait: bool) -> Result<(), AcquireError> {
        self.acquire_slot(now, key, wait, 1, Value::new())
    }

    /// [`acquire`](Self::acquire) one of `limit` slots of a semaphore: up to `limit` sessions
    /// hold `key` at once, each under its own fence. Every holder and waiter of the key must
    /// ask for the same `limit`, else the acquisition ends with
    /// [`NotAcquired::Rejected`]`(`[`Reject::LimitMismatch`]`)`. A `limit` of 1 is
    /// [`acquire`](Self::acquire); 0 is refused as [`AcquireError::InvalidLimit`].
    pub fn acquire_with_limit(
        &mut self,
        now: Instant,
        key: Key,
        wait: bool,
        limit: u16,
    ) -> Result<(), AcquireError> {
        if limit == 0 {
            return Err(AcquireError::InvalidLimit);
        }
        self.acquire_slot(now, key, wait, limit, Value::new())
    }

    /// [`acquire`](Self::acquire), and the holding carries `value`: observers of the key are
    /// told it with the holder (an address, say; empty: none). Needs an authority that knows
    /// [`SessionOp::AcquireWithValue`] when not empty.
    pub fn acquire_with_value(
        &mut self,
        now: Instant,
        key: Key,
        wait: bool,
        value: Value,
    ) -> Result<(), AcquireError> {
        self.acquire_slot(now, key, wait, 1, value)
    }

    /// One acquisition, of one of `limit` slots, carrying `value` (observed keys of one
    /// holder only: a semaphore's slots carry none).
    fn acquire_slot(
        &mut self,
        now: Instant,
        key: Key,
        wait: bool,
        limit: u16,
        value: Value,
    ) -> Result<(), AcquireError> {
        if self.expire(now) || !matches!(self.phase, Phase::Open { .. }) {
            return Err(AcquireError::NotOpen);
        }
        self.forget_done();
        // A slot that ended, its event untaken, is left beside the new one (both events are
        // told, in order); it is not the key's slot any more.
        match self.slots.iter().find(|s| s.key == key && s.phase != KeyPhase::Done).map(|s| s.phase) {
            Some(KeyPhase::Held { .. }) => return Err(AcquireError::AlreadyHeld),
            Some(KeyPhase::Asking { .. } | KeyPhase::Queued) => return Err(AcquireError::InProgress),
            Some(KeyPhase::Releasing { .. } | KeyPhase::GivingBack { .. }) => {
                return Err(AcquireError::Releasing)
            }
            Some(KeyPhase::Done) | None if self.spares(&key) => return Err(AcquireError::Releasing),
            Some(KeyPhase::Done) | None => {}
        }
        let start = take_seq(&mut self.next_seq);
        let phase = KeyPhase::Asking { wait, flight: Flight::Unsent { seq: start, at: now } };
        self.slots.push(Slot { key, start, limit, phase, event: None, value }).map_err(|_| AcquireError::Full)
    }

    /// Stop believing in `key` at once and give it back; or stop acquiring or waiting for it.
    /// Ends with [`SessionEvent::Released`] (or [`SessionEvent::NotAcquired`]).
    pub fn release(&mut self, now: Instant, key: &Key) -> Result<(), ReleaseError> {
        self.expire(now);
        let next_seq = &mut self.next_seq;
        let slot = self
            .slots
            .iter_mut()
            .find(|s| s.key == *key && s.phase != KeyPhase::Done)
            .ok_or(ReleaseError::NotHeld)?;
        let fence = match slot.phase {
            KeyPhase::Held { fence, .. } => fence,
            KeyPhase::Asking { .. } | KeyPhase::Queued => Fence::NONE,
            KeyPhase::Releasing { .. } | KeyPhase::GivingBack { .. } => return Ok(()),
            KeyPhase::Done => return Err(ReleaseError::NotHeld),
        };
        slot.phase =
            KeyPhase::Releasing { fence, flight: Flight::Unsent { seq: take_seq(next_seq), at: now } };
        Ok(())
    }

    /// End the session: every key is given up at once (one event each), then the authority is
    /// told. Ends with [`SessionEvent::Closed`].
    pub fn close(&mut self, now: Instant) -> Result<(), CloseError> {
        if self.expire(now) {
            return Err(CloseError::NotOpen);
        }
        let Phase::Open { id, secret, valid_until, .. } = self.phase else {
            return Err(CloseError::NotOpen);
        };
        self.end_keys(Ending::Close);
        self.end_watches();
        let flight = Flight::Unsent { seq: take_seq(&mut self.next_seq), at: now };
        self.phase = Phase::Closing { id, secret, give_up_at: valid_until, flight };
        Ok(())
    }

    /// Keep the session alive now rather than at the next renewal: for a transport whose
    /// authority holds a keepalive open until it has a grant to push (HTTP long polling), so
    /// that a key just queued for has a keepalive out to bring its grant at once. A keepalive
    /// already out is left alone. Renewing early is always safe.
    ///
    /// After a pushed grant, while other keys still wait, the machine makes the next keepalive
    /// itself once the grant's confirmation is answered: one made before could overtake the
    /// confirmation on the way and be answered at once with the same grant again.
    pub fn keep_alive_now(&mut self, now: Instant) {
        if self.expire(now) {
            return;
        }
        if let Phase::Open { keepalive: Flight::Due { ref mut at }, .. } = self.phase {
            *at = (*at).min(now);
        }
    }

    /// Follow `key`'s holder: [`SessionEvent::Observed`] for its holder now, then for each
    /// change, in order, until [`unobserve`](Self::unobserve) or the session ends
    /// ([`SessionEvent::ObserveEnded`]). Changes come in keepalive replies, so a transport whose
    /// authority holds keepalives open (HTTP long polling) hears of them at once.
    pub fn observe(&mut self, now: Instant, key: Key) -> Result<(), ObserveError> {
        if self.expire(now) || !matches!(self.phase, Phase::Open { .. }) {
            return Err(ObserveError::NotOpen);
        }
        self.forget_done();
        if self.watches.iter().any(|w| w.key == key) {
            return Err(ObserveError::AlreadyObserved);
        }
        let start = take_seq(&mut self.next_seq);
        let flight = Flight::Unsent { seq: start, at: now };
        let watch = WatchSlot {
            key,
            start,
            phase: WatchPhase::Asking { flight },
            seen: 0,
            acked: 0,
            carried: None,
            event: None,
            asked: true,
        };
        self.watches.push(watch).map_err(|_| ObserveError::Full)
    }

    /// Stop following `key`; ends with [`SessionEvent::ObserveEnded`].
    pub fn unobserve(&mut self, now: Instant, key: &Key) -> Result<(), ObserveError> {
        self.expire(now);
        let next_seq = &mut self.next_seq;
        let w = self
            .watches
            .iter_mut()
            .find(|w| w.key == *key && matches!(w.phase, WatchPhase::Asking { .. } | WatchPhase::Watching))
            .ok_or(ObserveError::NotObserved)?;
        w.phase = WatchPhase::Leaving { flight: Flight::Unsent { seq: take_seq(next_seq), at: now } };
        Ok(())
    }

    /// The keys observed (or being asked for).
    pub fn observed(&self) -> impl Iterator<Item = &Key> + '_ {
        self.watches
            .iter()
            .filter(|w| matches!(w.phase, WatchPhase::Asking { .. } | WatchPhase::Watching))
            .map(|w| &w.key)
    }

    // ----- inputs -----

    /// Feed a reply from the authority. Replies to requests the machine is not waiting for
    /// are ignored.
    pub fn handle_response(&mut self, now: Instant, response: &SessionResponse) {
        if self.expire(now) {
            return;
        }
        let seq = response.seq;
        let reply = &response.reply;
        match self.phase {
            Phase::Opening { flight } => {
                if let Some((s, at)) = flight.sent() {
                    if s == seq {
                        self.on_open_reply(now, at, reply);
                    }
                }
            }
            Phase::Open { id, keepalive, overdue, .. } if id == response.session => {
                let answers = |f: Option<(Seq, Instant)>| f.filter(|(s, _)| *s == seq);
                if let Some((_, at)) = answers(keepalive.sent()).or(answers(overdue)) {
                    return self.on_alive_reply(now, seq, at, reply);
                }
                let found = self.slots.iter().position(|slot| {
                    slot.phase.flight().and_then(Flight::sent).is_some_and(|(s, _)| s == seq)
                });
                if let Some(i) = found {
                    let settling = self.slots[i].phase.settles_a_report();
                    self.on_key_reply(now, i, reply);
                    if settling && !self.slots.get(i).is_some_and(|s| s.phase.settles_a_report()) {
                        self.keep_alive_for_waiters(now);
                    }
                }
                if self.spare.as_ref().and_then(|(_, _, f)| f.sent()).is_some_and(|(s, _)| s == seq) {
                    match reply {
                        SessionReply::Expired => return self.lose(LostReason::Revoked),
                        SessionReply::Released { .. }
                        | SessionReply::NotHolder { .. }
                        | SessionReply::Rejected(_) => {
                            self.spare = None;
                            self.keep_alive_for_waiters(now);
                        }
                        // Replayed or confused: the timeout retries.
                        _ => {}
                    }
                }
                let watch = self
                    .watches
                    .iter()
                    .position(|w| w.phase.flight().and_then(Flight::sent).is_some_and(|(s, _)| s == seq));
                if let Some(i) = watch {
                    self.on_watch_reply(i, reply);
                }
            }
            Phase::Closing { id, flight, .. }
                if id == response.session
                    && flight.sent().is_some_and(|(s, _)| s == seq)
                    && *reply != SessionReply::Replayed =>
            {
                self.phase = Phase::Ended;
                self.event = Some(SessionEvent::Closed { acknowledged: true });
            }
            _ => {}
        }
    }

    /// The request `seq` could not be delivered or answered; it is retried after
    /// `backoff_min`.
    pub fn handle_transport_error(&mut self, now: Instant, seq: Seq) {
        if self.expire(now) {
            return;
        }
        let retry = Flight::Due { at: now + self.config.backoff_min };
        let fail = |f: &mut Flight| {
            if f.sent().is_some_and(|(s, _)| s == seq) {
                *f = retry;
            }
        };
        match &mut self.phase {
            Phase::Opening { flight } | Phase::Closing { flight, .. } => fail(flight),
            Phase::Open { keepalive, .. } => fail(keepalive),
            Phase::Idle | Phase::Ended => {}
        }
        let spare = self.spare.as_mut().map(|(_, _, f)| f);
        for f in self.slots.iter_mut().filter_map(|s| s.phase.flight_mut()).chain(spare) {
            fail(f);
        }
        for w in self.watches.iter_mut() {
            if let Some(f) = w.phase.flight_mut() {
                fail(f);
            }
        }
    }

    /// The time from [`poll_timeout`](Session::poll_timeout) came (early or spurious calls are
    /// harmless): keepalives, retries and the end of validity.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.expire(now) {
            return;
        }
        let timeout = self.config.request_timeout;
        let next_seq = &mut self.next_seq;
        match &mut self.phase {
            Phase::Opening { flight } | Phase::Closing { flight, .. } => flight.tick(now, timeout, next_seq),
            Phase::Open { keepalive, overdue, .. } => {
                let sent = keepalive.sent();
                keepalive.tick(now, timeout, next_seq);
                if matches!(keepalive, Flight::Unsent { .. }) && sent.is_some() {
                    *overdue = sent;
                }
            }
            Phase::Idle | Phase::Ended => {}
        }
        let spare = self.spare.as_mut().map(|(_, _, f)| f);
        for f in self.slots.iter_mut().filter_map(|s| s.phase.flight_mut()).chain(spare) {
            f.tick(now, timeout, next_seq);
        }
        for w in self.watches.iter_mut() {
            if let Some(f) = w.phase.flight_mut() {
                f.tick(now, timeout, next_seq);
            }
        }
    }

    // ----- outputs -----

    /// The next request to send, if any.
    pub fn poll_transmit(&mut self) -> Option<SessionRequest> {
        let (session, secret) = match &mut self.phase {
            Phase::Opening { flight } => {
                let seq = flight.transmit()?;
                let op = SessionOp::Open { ttl: self.config.ttl, label: self.label.clone() };
                return Some(SessionRequest { session: SessionId::NONE, secret: Secret::NONE, seq, op });
            }
            Phase::Open { id, secret, keepalive, .. } => {
                if let Some(seq) = keepalive.transmit() {
                    // Acknowledge one observed key's changes: the authority reports the next.
                    let op = match self.watches.iter_mut().find(|w| w.seen > w.acked) {
                        Some(w) => {
                            w.carried = Some((seq, w.seen));
                            SessionOp::KeepAliveSeen { key: w.key.clone(), change: w.seen }
                        }
                        None => SessionOp::KeepAlive,
                    };
                    return Some(SessionRequest { session: *id, secret: *secret, seq, op });
                }
                (*id, *secret)
            }
            Phase::Closing { id, secret, flight, .. } => {
                let seq = flight.transmit()?;
                return Some(SessionRequest { session: *id, secret: *secret, seq, op: SessionOp::Close });
            }
            Phase::Idle | Phase::Ended => return None,
        };
        let watch = self.watches.iter_mut().find_map(|w| {
            let seq = w.phase.flight_mut()?.transmit()?;
            let key = w.key.clone();
            let op = match w.phase {
                WatchPhase::Asking { .. } => SessionOp::Observe { key },
                _ => SessionOp::Unobserve { key },
            };
            Some(SessionRequest { session, secret, seq, op })
        });
        if watch.is_some() {
            return watch;
        }
        let key = self.slots.iter_mut().find_map(|slot| {
            let seq = slot.phase.flight_mut()?.transmit()?;
            let key = slot.key.clone();
            // A lease asks with the original form, which every authority understands.
            let acquire = |key, wait| match slot.limit {
                1 => SessionOp::Acquire { key, wait },
                limit => SessionOp::AcquireWithLimit { key, wait, limit },
            };
            let op = match slot.phase {
                KeyPhase::Asking { wait, .. } if !slot.value.is_empty() => {
                    SessionOp::AcquireWithValue { key, wait, value: slot.value.clone() }
                }
                KeyPhase::Asking { wait, .. } => acquire(key, wait),
                KeyPhase::Held { .. } => acquire(key, true),
                KeyPhase::Releasing { fence, .. } | KeyPhase::GivingBack { fence, .. } => {
                    SessionOp::Release { key, fence }
                }
                KeyPhase::Queued | KeyPhase::Done => return None,
            };
            Some(SessionRequest { session, secret, seq, op })
        });
        key.or_else(|| {
            let (key, fence, flight) = self.spare.as_mut()?;
            let op = SessionOp::Release { key: key.clone(), fence: *fence };
            Some(SessionRequest { session, secret, seq: flight.transmit()?, op })
        })
    }

    /// The next event for the application, if any: the keys' first, in the order they were
    /// asked for, then the session's.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        let event = self
            .slots
            .iter_mut()
            .find_map(|s| s.event.take())
            .or_else(|| self.watches.iter_mut().find_map(|w| w.event.take()))
            .or_else(|| self.event.take());
        self.forget_done();
        event
    }

    /// When [`handle_timeout`](Session::handle_timeout) must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timeout = self.config.request_timeout;
        let session = match self.phase {
            Phase::Opening { flight } => flight.deadline(timeout),
            Phase::Open { valid_until, keepalive, .. } => {
                Some(keepalive.deadline(timeout).map_or(valid_until, |d| d.min(valid_until)))
            }
            Phase::Closing { give_up_at, flight, .. } => {
                Some(flight.deadline(timeout).map_or(give_up_at, |d| d.min(give_up_at)))
            }
            Phase::Idle | Phase::Ended => None,
        };
        let spare = self.spare.as_ref().map(|(_, _, f)| f);
        let keys = self
            .slots
            .iter()
            .filter_map(|s| s.phase.flight())
            .chain(spare)
            .filter_map(|f| f.deadline(timeout));
        let watches = self.watches.iter().filter_map(|w| w.phase.flight().and_then(|f| f.deadline(timeout)));
        session.into_iter().chain(keys).chain(watches).min()
    }

    // ----- internals -----

    /// Ends a session whose time is up. Returns whether it did.
    fn expire(&mut self, now: Instant) -> bool {
        match self.phase {
            Phase::Open { valid_until, .. } if now >= valid_until => {
                self.lose(LostReason::Expired);
                true
            }
            Phase::Closing { give_up_at, .. } if now >= give_up_at => {
                self.phase = Phase::Ended;
                self.event = Some(SessionEvent::Closed { acknowledged: false });
                true
            }
            _ => false,
        }
    }

    /// The session is gone: every key with it, at this instant.
    fn lose(&mut self, reason: LostReason) {
        self.end_keys(Ending::Lost(reason));
        self.end_watches();
        self.phase = Phase::Ended;
        self.event = Some(SessionEvent::SessionLost { reason });
    }

    /// Ends every key with its event, all at this instant.
    fn end_keys(&mut self, how: Ending) {
        self.spare = None;
        for slot in self.slots.iter_mut() {
            let key = slot.key.clone();
            let event = match (slot.phase, how) {
                (KeyPhase::Held { fence, .. }, Ending::Close) => {
                    Some(SessionEvent::Released { key, fence, acknowledged: false })
                }
                (KeyPhase::Held { fence, .. }, Ending::Lost(reason)) => {
                    Some(SessionEvent::Lost { key, fence, reason })
                }
                (
                    KeyPhase::Releasing { fence: Fence::NONE, .. }
                    | KeyPhase::Asking { .. }
                    | KeyPhase::Queued,
                    _,
                ) => {
                    let reason = match how {
                        Ending::Close => NotAcquired::Cancelled,
                        Ending::Lost(_) => NotAcquired::Unavailable,
                    };
                    Some(SessionEvent::NotAcquired { key, reason })
                }
                (KeyPhase::Releasing { fence, .. }, _) => {
                    Some(SessionEvent::Released { key, fence, acknowledged: false })
                }
                (KeyPhase::GivingBack { .. } | KeyPhase::Done, _) => None,
            };
            slot.phase = KeyPhase::Done;
            if event.is_some() {
                slot.event = event;
            }
        }
    }

    fn on_open_reply(&mut self, now: Instant, sent_at: Instant, reply: &SessionReply) {
        match *reply {
            SessionReply::Opened { session, secret, ttl } => {
                let valid_until =
                    self.config.anchor(sent_at, now) + self.config.validity(ttl.min(self.config.ttl));
                if valid_until <= now {
                    // Too late to rely on; that session expires unused. Ask for another.
                    let seq = take_seq(&mut self.next_seq);
                    self.phase = Phase::Opening { flight: Flight::Unsent { seq, at: now } };
                    return;
                }
                let keepalive = Flight::Due { at: (sent_at + self.config.renew_every).max(now) };
                self.phase = Phase::Open { id: session, secret, valid_until, keepalive, overdue: None };
                self.event = Some(SessionEvent::Opened { session, valid_until });
            }
            SessionReply::Rejected(reason) => {
                self.phase = Phase::Ended;
                self.event = Some(SessionEvent::NotOpened { reason });
            }
            // Anything else is not an answer to an open; the timeout retries.
            _ => {}
        }
    }

    fn on_alive_reply(&mut self, now: Instant, seq: Seq, sent_at: Instant, reply: &SessionReply) {
        let anchor = self.config.anchor(sent_at, now);
        let Phase::Open { ref mut valid_until, ref mut keepalive, ref mut overdue, .. } = self.phase else {
            return;
        };
        let answered = Some(seq);
        let (ttl, granted, more, observed) = match reply {
            SessionReply::Alive { ttl, granted, more } => (ttl, granted, more, None),
            SessionReply::AliveObserved { ttl, granted, more, observed } => {
                (ttl, granted, more, Some(observed))
            }
            _ => (&Duration::ZERO, &None, &false, None),
        };
        match reply {
            SessionReply::Alive { .. } | SessionReply::AliveObserved { .. } => {
                let until = anchor + self.config.validity((*ttl).min(self.config.ttl));
                *valid_until = (*valid_until).max(until);
                // More grants wait for us: ask again at once rather than at the next renewal.
                let at = if *more { now } else { (sent_at + self.config.renew_every).max(now) };
                *keepalive = Flight::Due { at };
                *overdue = None;
                if let Some(g) = granted {
                    self.on_report(now, g);
                }
                // Not at once while the confirmation of the grant just reported is out: made
                // beside it, the keepalive may overtake it and be answered with that same
                // grant again (a confirmation landing after a later seq confirms nothing), as
                // often as the two race, and the next key's grant waits behind it. The
                // keepalive is made when the confirmation lands (`keep_alive_for_waiters`).
                let settling = self.settling();
                if *more && settling && self.slots.iter().any(|s| s.phase == KeyPhase::Queued) {
                    if let Phase::Open { keepalive: Flight::Due { ref mut at }, .. } = self.phase {
                        *at = (sent_at + self.config.renew_every).max(now);
                    }
                }
                self.on_observed(now, answered, observed);
            }
            SessionReply::Expired => self.lose(LostReason::Revoked),
            SessionReply::Rejected(r) => self.lose(LostReason::Rejected(*r)),
            // Replayed (a duplicate of ours got there first) or confused: the timeout retries.
            _ => {}
        }
    }

    /// A keepalive's reply reports a grant the authority has not seen us confirm.
    fn on_report(&mut self, now: Instant, g: &Grant) {
        let Phase::Open { valid_until, .. } = self.phase else { return };
        let spared = self.spares(&g.key);
        let next_seq = &mut self.next_seq;
        let mut fresh = || Flight::Unsent { seq: take_seq(next_seq), at: now };
        // The key's acquisition under way, before one that ended with its event still untaken
        // (an acquisition asked since stands beside it).
        let i = self.slots.iter().position(|s| s.key == g.key && s.phase != KeyPhase::Done);
        match i.or_else(|| self.slots.iter().position(|s| s.key == g.key)).and_then(|i| self.slots.get_mut(i))
        {
            // No acquisition of the key under way, so none that this fence could answer: give
            // it back as below. The slot keeps its event, and a new acquisition waits for the
            // give-back (`AcquireError::Releasing`), so it cannot be granted this fence and
            // then lose it to the give-back.
            Some(slot) if slot.phase == KeyPhase::Done => {
                slot.phase = KeyPhase::GivingBack { fence: g.fence, flight: fresh() };
            }
            Some(slot) if g.asked >= slot.start => match slot.phase {
                KeyPhase::Asking { .. } | KeyPhase::Queued => {
                    slot.phase = KeyPhase::Held { fence: g.fence, confirm: Some(fresh()) };
                    let (key, fence) = (g.key.clone(), g.fence);
                    slot.event = Some(SessionEvent::Acquired { key, fence, valid_until });
                }
                // Our confirmation has not reached the authority yet (or was lost).
                KeyPhase::Held { fence, confirm: None } if fence == g.fence => {
                    slot.phase = KeyPhase::Held { fence, confirm: Some(fresh()) };
                }
                // We stopped waiting while it was granted: give it back by its fence.
                KeyPhase::Releasing { fence: Fence::NONE, .. } => {
                    slot.phase = KeyPhase::Releasing { fence: g.fence, flight: fresh() };
                }
                _ => {}
            },
            // A grant from an acquisition we no longer pursue: the key is ours at the
            // authority though, so give it back rather than block it until we expire.
            None if !spared => {
                let phase = KeyPhase::GivingBack { fence: g.fence, flight: fresh() };
                let slot = Slot {
                    key: g.key.clone(),
                    start: Seq(0),
                    limit: 1,
                    phase,
                    event: None,
                    value: Value::new(),
                };
                // Every slot in use: the spare, if free (else at a later report).
                if let Err(Slot { key, phase: KeyPhase::GivingBack { fence, flight }, .. }) =
                    self.slots.push(slot)
                {
                    self.spare = self.spare.take().or(Some((key, fence, flight)));
                }
            }
            // Being given back already (`spare`), or a stale report.
            None | Some(_) => {}
        }
    }

    fn on_key_reply(&mut self, now: Instant, i: usize, reply: &SessionReply) {
        let Phase::Open { valid_until, .. } = self.phase else { return };
        if let SessionReply::Expired = reply {
            return self.lose(LostReason::Revoked);
        }
        let next_seq = &mut self.next_seq;
        let slot = &mut self.slots[i];
        let key = slot.key.clone();
        let (phase, event) = match (slot.phase, reply) {
            (KeyPhase::Asking { .. }, SessionReply::Granted { fence, .. }) => (
                KeyPhase::Held { fence: *fence, confirm: None },
                Some(SessionEvent::Acquired { key, fence: *fence, valid_until }),
            ),
            (KeyPhase::Asking { .. }, SessionReply::Queued { position, .. }) => {
                (KeyPhase::Queued, Some(SessionEvent::Queued { key, position: *position }))
            }
            (KeyPhase::Asking { .. }, SessionReply::Busy { .. }) => {
                (KeyPhase::Done, Some(SessionEvent::NotAcquired { key, reason: NotAcquired::Busy }))
            }
            (KeyPhase::Asking { .. }, SessionReply::Rejected(r)) => {
                (KeyPhase::Done, Some(SessionEvent::NotAcquired { key, reason: NotAcquired::Rejected(*r) }))
            }
            (KeyPhase::Held { fence, .. }, SessionReply::Granted { fence: f, .. }) if *f == fence => {
                (KeyPhase::Held { fence, confirm: None }, None)
            }
            // The authority does not see our grant as we do: believe it no longer.
            (KeyPhase::Held { fence, .. }, SessionReply::Granted { .. } | SessionReply::Queued { .. }) => {
                (KeyPhase::Done, Some(SessionEvent::Lost { key, fence, reason: LostReason::Revoked }))
            }
            (KeyPhase::Releasing { fence: Fence::NONE, .. }, SessionReply::Granted { fence, .. }) => {
                let flight = Flight::Unsent { seq: take_seq(next_seq), at: now };
                (KeyPhase::Releasing { fence: *fence, flight }, None)
            }
            (
                KeyPhase::Releasing { fence, .. },
                SessionReply::Released { .. } | SessionReply::NotHolder { .. } | SessionReply::Rejected(_),
            ) => {
                let event = match fence {
                    Fence::NONE => SessionEvent::NotAcquired { key, reason: NotAcquired::Cancelled },
                    _ => SessionEvent::Released { key, fence, acknowledged: true },
                };
                (KeyPhase::Done, Some(event))
            }
            (
                KeyPhase::GivingBack { .. },
                SessionReply::Released { .. } | SessionReply::NotHolder { .. } | SessionReply::Rejected(_),
            ) => (KeyPhase::Done, None),
            // Replayed or confused: the timeout retries.
            (phase, _) => (phase, None),
        };
        slot.phase = phase;
        if event.is_some() {
            slot.event = event;
        }
    }

    /// A request that settled a reported grant was answered. A key still waits for its grant,
    /// which only a keepalive's reply brings, and the keepalive may have been answered early
    /// with that very report (it overtook the request on another connection, or the request
    /// was reordered after a release and granted the key again): have one out now, not at
    /// the next renewal, or a grant pushed meanwhile waits for that. Not while another such
    /// request is out, for until it lands every keepalive is answered at once with its report.
    fn keep_alive_for_waiters(&mut self, now: Instant) {
        let waiting = self.slots.iter().any(|s| s.phase == KeyPhase::Queued);
        if !waiting || self.settling() {
            return;
        }
        if let Phase::Open { keepalive: Flight::Due { ref mut at }, .. } = self.phase {
            *at = (*at).min(now);
        }
    }

    /// Whether `key` is being given back by the spare.
    fn spares(&self, key: &Key) -> bool {
        self.spare.as_ref().is_some_and(|(k, ..)| k == key)
    }

    /// Whether a request that settles a reported grant is out (see
    /// [`KeyPhase::settles_a_report`]): until it lands, every keepalive is answered with it.
    fn settling(&self) -> bool {
        self.spare.is_some() || self.slots.iter().any(|s| s.phase.settles_a_report())
    }

    fn forget_done(&mut self) {
        self.slots.retain(|s| s.phase != KeyPhase::Done || s.event.is_some());
        self.watches.retain(|w| w.phase != WatchPhase::Done || w.event.is_some());
    }

    /// Ends every observation, all at this instant.
    fn end_watches(&mut self) {
        for w in self.watches.iter_mut() {
            if w.phase != WatchPhase::Done {
                w.phase = WatchPhase::Done;
                if w.asked {
                    w.event = Some(SessionEvent::ObserveEnded { key: w.key.clone(), reason: None });
                }
            }
        }
    }

    fn on_watch_reply(&mut self, i: usize, reply: &SessionReply) {
        let w = &mut self.watches[i];
        let key = w.key.clone();
        match (w.phase, reply) {
            (WatchPhase::Asking { .. }, SessionReply::Observing { .. }) => w.phase = WatchPhase::Watching,
            (WatchPhase::Asking { .. }, SessionReply::Rejected(r)) => {
                w.phase = WatchPhase::Done;
                w.event = Some(SessionEvent::ObserveEnded { key, reason: Some(*r) });
            }
            (WatchPhase::Leaving { .. }, SessionReply::Unobserved { .. } | SessionReply::Rejected(_)) => {
                w.phase = WatchPhase::Done;
                if w.asked {
                    w.event = Some(SessionEvent::ObserveEnded { key, reason: None });
                }
            }
            (_, SessionReply::Expired) => self.lose(LostReason::Revoked),
            // Replayed or confused: the timeout retries.
            _ => {}
        }
    }

    /// A keepalive's reply was handled: the acknowledgement it carried is the authority's now,
    /// and `observed` (if any) is the next change it has for us.
    fn on_observed(&mut self, now: Instant, answered: Option<Seq>, observed: Option<&Observed>) {
        for w in self.watches.iter_mut() {
            if let Some((_, change)) = w.carried.filter(|(seq, _)| Some(*seq) == answered) {
                w.acked = w.acked.max(change);
                w.carried = None;
            }
        }
        // A report to a keepalive made before this observation's observe is about one that
        // ended before it began: not believed.
        let fresh = |w: &WatchSlot| answered.is_some_and(|a| a > w.start);
        if let Some(o) = observed.filter(|o| self.watches.iter().all(|w| w.key != o.key || fresh(w))) {
            let mut w = self.watches.iter_mut().find(|w| w.key == o.key && w.phase != WatchPhase::Done);
            if let Some(w) = w.as_deref_mut().filter(|w| matches!(w.phase, WatchPhase::Leaving { .. })) {
                // Not for the application any more, but acknowledged, so the authority does not
                // report it again (at once, if more wait) until our unobserve reaches it.
                w.seen = w.seen.max(o.change);
            } else if w.is_none() {
                // Observed at the authority but not by us: undo it, as a grant we no longer
                // pursue is given back, rather than hear of it in every keepalive.
                let flight = Flight::Unsent { seq: take_seq(&mut self.next_seq), at: now };
                let orphan = WatchSlot {
                    key: o.key.clone(),
                    start: Seq(0),
                    phase: WatchPhase::Leaving { flight },
                    seen: o.change,
                    acked: 0,
                    carried: None,
                    event: None,
                    asked: false,
                };
                let _ = self.watches.push(orphan);
            } else if let Some(w) = w {
                if o.change <= w.seen {
                    // Told again what we were told: the authority holds an older
                    // acknowledgement than ours (a retried observe starts the report over), so
                    // acknowledge again rather than hear it in every keepalive.
                    w.acked = w.acked.min(o.change.saturating_sub(1));
                } else if w.event.is_none() {
                    let missed = if w.seen == 0 { 0 } else { o.change - w.seen - 1 };
                    w.seen = o.change;
                    w.event = Some(SessionEvent::Observed {
                        key: o.key.clone(),
                        change: o.change,
                        holder: o.holder.clone(),
                        missed,
                    });
                }
            }
        }
        // An acknowledgement to carry: keep alive again at once, so the next change (held at
        // the authority until it comes) is asked for now.
        if self.watches.iter().any(|w| w.seen > w.acked) {
            if let Phase::Open { keepalive: Flight::Due { ref mut at }, .. } = self.phase {
                *at = (*at).min(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::authority::{SessionAuthority, SessionLimits};
    use crate::session::wire::parse_label;
    use crate::wire::parse_key;

    const TTL: Duration = Duration::from_secs(9);
    /// The authority's clock reads this much more than the holders'.
    const SKEW: Duration = Duration::from_secs(1_000);

    type Authority = SessionAuthority<4, 4, 4>;
    type Holder = Session<4>;

    fn config() -> Config {
        let mut c = Config::new(TTL);
        c.drift = crate::Drift::from_ppm(10_000);
        c.margin = Duration::ZERO;
        c
    }
    fn ms(n: u64) -> Instant {
        Instant::from_millis(n)
    }
    fn key(s: &str) -> Key {
        parse_key(s).unwrap()
    }
    fn holder(label: &str) -> Holder {
        Session::new(parse_label(label).unwrap(), config()).unwrap()
    }

    /// Carries every request `h` has to the authority and the replies straight back, at `now`
    /// (no delay). Returns the requests carried.
    fn exchange<const S: usize, const AK: usize, const W: usize>(
        h: &mut Holder,
        a: &mut SessionAuthority<S, AK, W>,
        now: Instant,
    ) -> usize {
        let mut n = 0;
        while let Some(r) = h.poll_transmit() {
            n += 1;
            let reply = match r.op {
                SessionOp::Open { ttl, ref label } => {
                    let secret = Secret::from_bytes([n as u8 + 7; 16]);
                    a.open(now + SKEW, ttl, label, secret)
                }
                _ => a.handle(now + SKEW, &r),
            };
            h.handle_response(now, &r.answer(reply));
        }
        n
    }
    fn events(h: &mut Holder) -> std::vec::Vec<SessionEvent> {
        core::iter::from_fn(|| h.poll_event()).collect()
    }
    fn opened<const S: usize, const AK: usize, const W: usize>(
        a: &mut SessionAuthority<S, AK, W>,
        label: &str,
    ) -> Holder {
        let mut h = holder(label);
        h.open(ms(0)).unwrap();
        exchange(&mut h, a, ms(0));
        assert!(
            matches!(h.poll_event(), Some(SessionEvent::Opened { valid_until, .. }) if valid_until == ms(8_910))
        );
        h
    }

    extern crate std;

    #[test]
    fn one_keepalive_keeps_every_key_and_they_are_lost_together() {
        let mut a = Authority::new(SessionLimits::default());
        let mut h = opened(&mut a, "h");
        h.acquire(ms(10), key("x"), false).unwrap();
        h.acquire(ms(10), key("y"), false).unwrap();
        assert_eq!(exchange(&mut h, &mut a, ms(10)), 2);
        let held = events(&mut h);
        assert!(
            matches!(held[..], [SessionEvent::Acquired { .. }, SessionEvent::Acquired { .. }]),
            "{held:?}"
        );
        // Renews every ttl/3 with one request for both keys, anchored at its send.
        assert_eq!(h.poll_timeout(), Some(ms(3_000)));
        h.handle_timeout(ms(3_000));
        assert_eq!(exchange(&mut h, &mut a, ms(3_000)), 1);
        assert_eq!(h.remaining(ms(3_000), &key("x")), Some(Duration::from_millis(8_910)));
        assert_eq!(h.remaining(ms(3_000), &key("y")), Some(Duration::from_millis(8_910)));
        // Then the authority becomes unreachable: retries, and at the end both go at once.
        let mut now;
        let lost = loop {
            now = h.poll_timeout().unwrap();
            h.handle_timeout(now);
            while let Some(r) = h.poll_transmit() {
                h.handle_transport_error(now, r.seq);
            }
            let e = events(&mut h);
            if !e.is_empty() {
                break e;
            }
        };
        assert_eq!(now, ms(3_000 + 8_910), "lost exactly when the last keepalive's validity ends");
        let reason = LostReason::Expired;
        assert_eq!(
            lost,
            [
                SessionEvent::Lost { key: key("x"), fence: Fence(1), reason },
                SessionEvent::Lost { key: key("y"), fence: Fence(1), reason },
                SessionEvent::SessionLost { reason },
            ]
        );
        assert_eq!(h.remaining(now, &key("x")), None);
        assert_eq!(h.state(), SessionState::Ended);
        // The authority frees both a little later, on its own clock.
        a.handle_timeout(ms(3_000 + 9_000) + SKEW);
        assert_eq!(a.key(&key("x")).unwrap().holder, None);
    }

    #[test]
    fn a_reply_to_a_keepalive_retried_by_its_timeout_still_renews() {
        // Every reply arrives just after the request timeout made the next attempt: the
        // session must live on, each renewal anchored at the attempt it answers.
        let mut a = Authority::new(SessionLimits::default());
        let mut h = opened(&mut a, "h");
        h.acquire(ms(10), key("x"), false).unwrap();
        exchange(&mut h, &mut a, ms(10));
        events(&mut h);
        let timeout = config().request_timeout;
        let late = timeout + Duration::from_millis(1);
        let mut replies = 0;
        let mut now = ms(10);
        while now < ms(60_000) {
            now = h.poll_timeout().unwrap();
            h.handle_timeout(now);
            let Some(first) = h.poll_transmit() else { continue };
            assert!(matches!(first.op, SessionOp::KeepAlive), "{first:?}");
            let reply = first.answer(a.handle(now + SKEW, &first));
            // Nothing comes back within the timeout: the keepalive is made again.
            assert_eq!(h.poll_timeout(), Some(now + timeout));
            h.handle_timeout(now + timeout);
            let second = h.poll_transmit().expect("a retry");
            assert!(second.seq > first.seq);
            // The first attempt's reply arrives now, the retry's never.
            h.handle_response(now + late, &reply);
            replies += 1;
            assert_eq!(
                h.remaining(now + late, &key("x")),
                Some(Duration::from_millis(8_910) - late),
                "renewed from the answered attempt's send"
            );
            drop(second);
        }
        assert!(replies > 15, "{replies} renewals in a minute");
        assert!(events(&mut h).is_empty(), "the session lived on");
        assert_eq!(h.state(), SessionState::Open);
    }

    #[test]
    fn keep_alive_now_sends_the_keepalive_at_once_unless_one_is_out() {
        let mut a = Authority::new(SessionLimits::default());
        let mut h = opened(&mut a, "h");
        assert_eq!(h.poll_timeout(), Some(ms(3_000)));
        h.keep_alive_now(ms(5));
        assert_eq!(h.poll_timeout(), Some(ms(5)));
        h.handle_timeout(ms(5));
        let ka = h.poll_transmit().expect("a keepalive");
        assert_eq!(ka.op, SessionOp::KeepAlive);
        // Out already: nothing more, and its request timeout still stands.
        h.keep_alive_now(ms(6));
        assert_eq!(h.poll_transmit(), None);
        assert_eq!(h.poll_timeout(), Some(ms(5) + config().request_timeout));
        h.handle_response(ms(7), &ka.answer(a.handle(ms(7) + SKEW, &ka)));
        assert_eq!(h.poll_timeout(), Some(ms(5) + config().renew_every), "the next renewal from its send");
    }

    #[test]
    fn a_waiter_is_pushed_its_grant_and_confirms_it() {
        let mut a = Authority::new(SessionLimits::default());
        let mut first = opened(&mut a, "first");
        let mut second = opened(&mut a, "second");
        first.acquire(ms(1), key("x"), true).unwrap();
        exchange(&mut first, &mut a, ms(1));
        second.acquire(ms(2), key("x"), true).unwrap();
        exchange(&mut second, &mut a, ms(2));
        assert_eq!(events(&mut second)[..], [SessionEvent::Queued { key: key("x"), position: 1 }]);
        assert_eq!(second.poll_timeout(), Some(ms(3_000)), "a waiter does not poll; it keeps alive");
        first.release(ms(100), &key("x")).unwrap();
        assert_eq!(first.remaining(ms(100), &key("x")), None, "belief ends at the release call");
        exchange(&mut first, &mut a, ms(100));
        let released = SessionEvent::Released { key: key("x"), fence: Fence(1), acknowledged: true };
        assert_eq!(events(&mut first)[..], [released]);
        // The next keepalive brings the grant; the confirming acquire follows in the same
        // exchange, and the authority stops reporting it.
        second.handle_timeout(ms(3_000));
        assert_eq!(exchange(&mut second, &mut a, ms(3_000)), 2);
        let got = SessionEvent::Acquired { key: key("x"), fence: Fence(2), valid_until: ms(3_000 + 8_910) };
        assert_eq!(events(&mut second)[..], [got]);
        assert!(!a.has_news(second.id().unwrap()));
        assert_eq!(second.fence(&key("x")), Some(Fence(2)));
    }

    #[test]
    fn a_pushed_grant_with_more_to_come_is_confirmed_before_the_next_keepalive() {
        let mut a = Authority::new(SessionLimits::default());
        let mut first = opened(&mut a, "first");
        let mut second = opened(&mut a, "second");
        for k in ["x", "y"] {
            first.acquire(ms(1), key(k), false).unwrap();
        }
        exchange(&mut first, &mut a, ms(1));
        for k in ["x", "y"] {
            second.acquire(ms(2), key(k), true).unwrap();
        }
        exchange(&mut second, &mut a, ms(2));
        for k in ["x", "y"] {
            first.release(ms(3), &key(k)).unwrap();
        }
        exchange(&mut first, &mut a, ms(3));
        events(&mut second);
        second.keep_alive_now(ms(4));
        second.handle_timeout(ms(4));
        let ka = second.poll_transmit().unwrap();
        let reply = a.handle(ms(4), &ka);
        assert!(matches!(reply, SessionReply::Alive { granted: Some(_), more: true, .. }), "{reply:?}");
        second.handle_response(ms(5), &ka.answer(reply));
        assert!(matches!(events(&mut second)[..], [SessionEvent::Acquired { .. }]));
        // Only the confirmation goes out: a keepalive beside it could overtake it and be
        // answered with the same grant again, for as long as the two race.
        let confirm = second.poll_transmit().unwrap();
        assert!(matches!(confirm.op, SessionOp::Acquire { .. }), "{:?}", confirm.op);
        assert_eq!(second.poll_transmit(), None);
        assert!(second.poll_timeout().is_some_and(|t| t > ms(5)), "no keepalive due at once");
        // Once it lands, the keepalive brings the other grant.
        let reply = a.handle(ms(6), &confirm);
        second.handle_response(ms(7), &confirm.answer(reply));
        assert_eq!(second.poll_timeout(), Some(ms(7)));
        second.handle_timeout(ms(7));
        let ka = second.poll_transmit().unwrap();
        let reply = a.handle(ms(7), &ka);
        second.handle_response(ms(8), &ka.answer(reply));
        assert!(matches!(events(&mut second)[..], [SessionEvent::Acquired { .. }]));
        assert_eq!(second.held().count(), 2);
    }

    #[test]
    fn unknown_seqs_and_stale_reports_are_not_believed() {
        let mut a = Authority::new(SessionLimits::default());
        let mut h = opened(&mut a, "h");
        let id = h.id().unwrap();
        h.acquire(ms(1), key("x"), true).unwrap();
        let r = h.poll_transmit().unwrap();
        // A reply to a seq never sent, and one for another session, change nothing.
        let forged = SessionReply::Granted { key: key("x"), fence: Fence(9) };
        h.handle_response(
            ms(2),
            &SessionResponse { session: id, seq: Seq(r.seq.0 + 5), reply: forged.clone() },
        );
        h.handle_response(
            ms(2),
            &SessionResponse { session: SessionId(id.0 + 1), seq: r.seq, reply: forged },
        );
        assert_eq!(h.poll_event(), None);
        assert_eq!(h.fence(&key("x")), None);
        // The real answer: queued.
        let queued = SessionReply::Queued { key: key("x"), position: 1 };
        h.handle_response(ms(3), &r.answer(queued));
        assert!(matches!(h.poll_event(), Some(SessionEvent::Queued { .. })));
        // A keepalive's reply reporting a grant asked for before this acquisition began (a
        // reordered reply from an earlier holding of x) is not believed...
        h.handle_timeout(ms(3_000));
        let ka = h.poll_transmit().unwrap();
        let stale = Grant { key: key("x"), fence: Fence(1), asked: Seq(r.seq.0 - 1) };
        h.handle_response(
            ms(3_001),
            &ka.answer(SessionReply::Alive { ttl: TTL, granted: Some(stale), more: false }),
        );
        assert_eq!(h.poll_event(), None);
        assert_eq!(h.fence(&key("x")), None);
        // ...but the grant this acquisition asked for is.
        h.handle_timeout(ms(6_001));
        let ka = h.poll_transmit().unwrap();
        let fresh = Grant { key: key("x"), fence: Fence(2), asked: r.seq };
        h.handle_response(
            ms(6_002),
            &ka.answer(SessionReply::Alive { ttl: TTL, granted: Some(fresh), more: true }),
        );
        assert!(matches!(h.poll_event(), Some(SessionEvent::Acquired { fence: Fence(2), .. })));
        // `more`: keep alive again at once.
        assert_eq!(h.poll_timeout(), Some(ms(6_002)));
    }

    #[test]
    fn stopping_a_wait_that_was_granted_meanwhile_gives_the_key_back() {
        let mut a = Authority::new(SessionLimits::default());
        let mut first = opened(&mut a, "first");
        let mut second = opened(&mut a, "second");
        first.acquire(ms(1), key("x"), false).unwrap();
        exchange(&mut first, &mut a, ms(1));
        second.acquire(ms(2), key("x"), true).unwrap();
        exchange(&mut second, &mut a, ms(2));
        events(&mut second);
        // The key passes to `second` before its cancellation arrives.
        first.release(ms(3), &key("x")).unwrap();
        exchange(&mut first, &mut a, ms(3));
        second.release(ms(4), &key("x")).unwrap();
        // The stop-waiting is answered with the fence (2); the fenced release follows.
        assert_eq!(exchange(&mut second, &mut a, ms(4)), 2);
        assert_eq!(
            events(&mut second)[..],
            [SessionEvent::Released { key: key("x"), fence: Fence(2), acknowledged: true }]
        );
        assert_eq!(a.key(&key("x")).unwrap().holder, None);
    }

    #[test]
    fn close_gives_up_every_key_at_once() {
        let mut a = Authority::new(SessionLimits::default());
        let mut h = opened(&mut a, "h");
        h.acquire(ms(1), key("x"), false).unwrap();
        exchange(&mut h, &mut a, ms(1));
        events(&mut h);
        h.close(ms(5)).unwrap();
        assert_eq!(h.remaining(ms(5), &key("x")), None);
        exchange(&mut h, &mut a, ms(5));
        assert_eq!(
            events(&mut h)[..],
            [
                SessionEvent::Released { key: key("x"), fence: Fence(1), acknowledged: false },
                SessionEvent::Closed { acknowledged: true },
            ]
        );
        assert_eq!(a.sessions().count(), 0);
        assert_eq!(a.key(&key("x")).unwrap().holder, None);
        assert_eq!(h.poll_timeout(), None);
    }

    #[test]
    fn misuse_is_an_error_not_a_panic() {
        let mut a = Authority::new(SessionLimits::default());
        let mut idle = holder("h");
        assert_eq!(idle.acquire(ms(0), key("x"), false), Err(AcquireError::NotOpen));
        assert_eq!(idle.close(ms(0)), Err(CloseError::NotOpen));
        let mut h = opened(&mut a, "h");
        assert_eq!(h.open(ms(1)), Err(OpenError::AlreadyOpen));
        h.acquire(ms(1), key("x"), false).unwrap();
        assert_eq!(h.acquire(ms(1), key("x"), false), Err(AcquireError::InProgress));
        exchange(&mut h, &mut a, ms(1));
        assert_eq!(h.acquire(ms(1), key("x"), false), Err(AcquireError::AlreadyHeld));
        for k in ["a", "b", "c"] {
            h.acquire(ms(2), key(k), false).unwrap();
        }
        assert_eq!(h.acquire(ms(2), key("d"), false), Err(AcquireError::Full));
        assert_eq!(h.release(ms(2), &key("d")), Err(ReleaseError::NotHeld));
        h.release(ms(2), &key("x")).unwrap();
        assert_eq!(h.acquire(ms(2), key("x"), false), Err(AcquireError::Releasing));
    }

    #[test]
    fn a_refused_open_ends_the_session() {
        let mut a = SessionAuthority::<4, 4, 4>::new(SessionLimits {
            max_ttl: Duration::from_secs(1),
            ..Default::default()
        });
        let mut h = holder("h");
        h.open(ms(0)).unwrap();
        exchange(&mut h, &mut a, ms(0));
        assert_eq!(h.poll_event(), Some(SessionEvent::NotOpened { reason: Reject::InvalidTtl }));
        assert_eq!(h.state(), SessionState::Ended);
    }

    #[test]
    fn a_semaphore_slot_is_acquired_queued_for_and_confirmed_with_its_limit() {
        let mut a = Authority::new(SessionLimits::default());
        let mut holders: std::vec::Vec<Holder> = ["a", "b", "c"].iter().map(|l| opened(&mut a, l)).collect();
        for (i, h) in holders.iter_mut().enumerate() {
            h.acquire_with_limit(ms(1), key("x"), true, 2).unwrap();
            exchange(h, &mut a, ms(1));
            let expected = match i {
                2 => SessionEvent::Queued { key: key("x"), position: 1 },
                _ => SessionEvent::Acquired {
                    key: key("x"),
                    fence: Fence(i as u64 + 1),
                    valid_until: ms(8_910),
                },
            };
            assert_eq!(events(h)[..], [expected]);
        }
        holders[0].release(ms(100), &key("x")).unwrap();
        exchange(&mut holders[0], &mut a, ms(100));
        assert!(matches!(events(&mut holders[0])[..], [SessionEvent::Released { fence: Fence(1), .. }]));
        // The pushed grant's confirmation asks with the same limit, or it would be refused.
        holders[2].handle_timeout(ms(3_000));
        assert_eq!(exchange(&mut holders[2], &mut a, ms(3_000)), 2);
        let got = SessionEvent::Acquired { key: key("x"), fence: Fence(3), valid_until: ms(3_000 + 8_910) };
        assert_eq!(events(&mut holders[2])[..], [got]);
        assert!(!a.has_news(holders[2].id().unwrap()));
        assert_eq!(holders[2].fence(&key("x")), Some(Fence(3)));
        // A lease of the same key is refused while the semaphore has holders.
        holders[0].acquire(ms(3_001), key("x"), true).unwrap();
        exchange(&mut holders[0], &mut a, ms(3_001));
        let refused = NotAcquired::Rejected(Reject::LimitMismatch);
        assert_eq!(
            events(&mut holders[0])[..],
            [SessionEvent::NotAcquired { key: key("x"), reason: refused }]
        );
        assert_eq!(
            holders[0].acquire_with_limit(ms(3_002), key("x"), true, 0),
            Err(AcquireError::InvalidLimit)
        );
    }

    #[test]
    fn an_observer_hears_the_holder_and_each_change_with_its_value_even_when_replies_are_lost() {
        let mut a = Authority::new(SessionLimits::default());
        let mut first = opened(&mut a, "first");
        let mut second = opened(&mut a, "second");
        let mut watcher = opened(&mut a, "watcher");
        let value = |v: &str| crate::session::wire::parse_value(v).unwrap();
        first.acquire_with_value(ms(1), key("x"), true, value("10.0.0.1:7")).unwrap();
        exchange(&mut first, &mut a, ms(1));
        second.acquire_with_value(ms(1), key("x"), true, value("10.0.0.2:7")).unwrap();
        exchange(&mut second, &mut a, ms(1));
        events(&mut first);
        events(&mut second);
        watcher.observe(ms(2), key("x")).unwrap();
        assert_eq!(watcher.observe(ms(2), key("x")), Err(ObserveError::AlreadyObserved));
        exchange(&mut watcher, &mut a, ms(2));
        assert_eq!(watcher.observed().count(), 1);
        let holder = |ev: &SessionEvent| match ev {
            SessionEvent::Observed { holder, missed: 0, .. } => holder.as_ref().map(|h| {
                (
                    std::string::String::from(h.label.as_str()),
                    h.fence.0,
                    std::string::String::from(h.value.as_str()),
                )
            }),
            other => panic!("{other:?}"),
        };
        // The first report (the holder now) comes in the next keepalive's reply...
        watcher.keep_alive_now(ms(3));
        watcher.handle_timeout(ms(3));
        exchange(&mut watcher, &mut a, ms(3));
        let got = events(&mut watcher);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(holder(&got[0]), Some(("first".into(), 1, "10.0.0.1:7".into())));
        // ...and is acknowledged in the one after, which goes at once.
        assert_eq!(watcher.poll_timeout(), Some(ms(3)));
        // The key passes to `second`; the keepalive bringing the change is lost.
        first.release(ms(4), &key("x")).unwrap();
        exchange(&mut first, &mut a, ms(4));
        watcher.handle_timeout(ms(4));
        let ka = watcher.poll_transmit().unwrap();
        assert_eq!(ka.op, SessionOp::KeepAliveSeen { key: key("x"), change: 1 });
        let lost = a.handle(ms(4) + SKEW, &ka);
        assert!(matches!(lost, SessionReply::AliveObserved { .. }), "{lost:?}");
        watcher.handle_transport_error(ms(5), ka.seq);
        // The retry hears it again.
        let retry_at = watcher.poll_timeout().unwrap();
        watcher.handle_timeout(retry_at);
        exchange(&mut watcher, &mut a, retry_at);
        let got = events(&mut watcher);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(holder(&got[0]), Some(("second".into(), 2, "10.0.0.2:7".into())));
        // The second closes: free. Then the watcher stops.
        second.close(ms(2_000)).unwrap();
        exchange(&mut second, &mut a, ms(2_000));
        watcher.handle_timeout(ms(2_000));
        exchange(&mut watcher, &mut a, ms(2_000));
        let got = events(&mut watcher);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(holder(&got[0]), None);
        watcher.unobserve(ms(2_001), &key("x")).unwrap();
        exchange(&mut watcher, &mut a, ms(2_001));
        assert_eq!(events(&mut watcher)[..], [SessionEvent::ObserveEnded { key: key("x"), reason: None }]);
        assert_eq!(a.observers_behind().count(), 0);
        assert_eq!(watcher.observed().count(), 0);
    }

    #[test]
    fn a_retried_observe_that_starts_the_report_over_is_acknowledged_again_without_a_second_event() {
        let mut a = Authority::new(SessionLimits::default());
        let mut first = opened(&mut a, "first");
        let mut watcher = opened(&mut a, "watcher");
        first.acquire(ms(1), key("x"), true).unwrap();
        exchange(&mut first, &mut a, ms(1));
        watcher.observe(ms(2), key("x")).unwrap();
        // The observe reaches the authority; its reply is lost.
        let observe = watcher.poll_transmit().unwrap();
        a.handle(ms(2) + SKEW, &observe);
        // A keepalive hears the holder, and the next acknowledges it.
        watcher.keep_alive_now(ms(3));
        watcher.handle_timeout(ms(3));
        exchange(&mut watcher, &mut a, ms(3));
        assert!(matches!(events(&mut watcher)[..], [SessionEvent::Observed { change: 1, .. }]));
        watcher.handle_timeout(ms(3));
        exchange(&mut watcher, &mut a, ms(3));
        assert_eq!(a.observers_behind().count(), 0);
        // The observe's request timeout retries it with a later seq: the authority starts
        // the report over, and the watcher is told change 1 again.
        let retry_at = ms(2) + config().request_timeout;
        watcher.handle_timeout(retry_at);
        exchange(&mut watcher, &mut a, retry_at);
        assert_eq!(a.observers_behind().count(), 1);
        watcher.keep_alive_now(retry_at);
        watcher.handle_timeout(retry_at);
        exchange(&mut watcher, &mut a, retry_at);
        // Not news for the application, but acknowledged at once, so it is not repeated.
        assert!(events(&mut watcher).is_empty());
        watcher.handle_timeout(retry_at);
        let ka = watcher.poll_transmit().expect("an acknowledgement");
        assert_eq!(ka.op, SessionOp::KeepAliveSeen { key: key("x"), change: 1 });
        watcher.handle_response(retry_at, &ka.answer(a.handle(retry_at + SKEW, &ka)));
        assert_eq!(a.observers_behind().count(), 0);
    }

    #[test]
    fn an_observer_refused_for_capacity_is_told_why_and_observing_is_bounded() {
        let mut a = SessionAuthority::<4, 4, 4, 1>::new(SessionLimits::default());
        let mut first = holder("first");
        first.open(ms(0)).unwrap();
        let mut second: Session<4, 1> = Session::new(parse_label("second").unwrap(), config()).unwrap();
        second.open(ms(0)).unwrap();
        while let Some(r) = second.poll_transmit() {
            let SessionOp::Open { ttl, ref label } = r.op else { unreachable!() };
            let reply = a.open(ms(0) + SKEW, ttl, label, Secret::from_bytes([3; 16]));
            second.handle_response(ms(0), &r.answer(reply));
        }
        while let Some(r) = first.poll_transmit() {
            let SessionOp::Open { ttl, ref label } = r.op else { unreachable!() };
            let reply = a.open(ms(0) + SKEW, ttl, label, Secret::from_bytes([4; 16]));
            first.handle_response(ms(0), &r.answer(reply));
        }
        events(&mut first);
        while second.poll_event().is_some() {}
        second.observe(ms(1), key("x")).unwrap();
        assert_eq!(second.observe(ms(1), key("y")), Err(ObserveError::Full), "one observation at most");
        while let Some(r) = second.poll_transmit() {
            let reply = a.handle(ms(1) + SKEW, &r);
            second.handle_response(ms(1), &r.answer(reply));
        }
        // The authority follows one observer: the next is refused, and told why.
        first.observe(ms(2), key("y")).unwrap();
        while let Some(r) = first.poll_transmit() {
            let reply = a.handle(ms(2) + SKEW, &r);
            first.handle_response(ms(2), &r.answer(reply));
        }
        assert_eq!(
            events(&mut first)[..],
            [SessionEvent::ObserveEnded { key: key("y"), reason: Some(Reject::Capacity) }]
        );
        assert_eq!(first.observed().count(), 0);
        // A session's end ends its observations.
        second.close(ms(3)).unwrap();
        assert_eq!(second.poll_event(), Some(SessionEvent::ObserveEnded { key: key("x"), reason: None }));
    }

    #[test]
    fn a_change_reported_while_leaving_is_acknowledged_not_told() {
        let mut a = Authority::new(SessionLimits::default());
        let mut h = opened(&mut a, "h");
        let mut watcher = opened(&mut a, "watcher");
        watcher.observe(ms(1), key("x")).unwrap();
        exchange(&mut watcher, &mut a, ms(1));
        // The first report (free) is told...
        watcher.keep_alive_now(ms(2));
        watcher.handle_timeout(ms(2));
        exchange(&mut watcher, &mut a, ms(2));
        assert!(matches!(events(&mut watcher)[..], [SessionEvent::Observed { holder: None, .. }]));
        // ...then the key changes while the watcher's unobserve is still unsent.
        h.acquire(ms(3), key("x"), false).unwrap();
        exchange(&mut h, &mut a, ms(3));
        watcher.unobserve(ms(4), &key("x")).unwrap();
        let leave = watcher.poll_transmit().expect("the unobserve");
        assert_eq!(leave.op, SessionOp::Unobserve { key: key("x") });
        watcher.keep_alive_now(ms(4));
        watcher.handle_timeout(ms(4));
        let ka = watcher.poll_transmit().expect("a keepalive");
        let reply = a.handle(ms(4) + SKEW, &ka);
        assert!(matches!(reply, SessionReply::AliveObserved { .. }), "{reply:?}");
        watcher.handle_response(ms(4), &ka.answer(reply));
        assert_eq!(events(&mut watcher)[..], [], "not told: it is leaving");
        // The next keepalive acknowledges it, so the authority stops reporting it.
        watcher.handle_timeout(ms(4));
        let ka = watcher.poll_transmit().expect("an acknowledging keepalive");
        assert_eq!(ka.op, SessionOp::KeepAliveSeen { key: key("x"), change: 2 });
        a.handle(ms(5) + SKEW, &ka);
        assert_eq!(a.observers_behind().count(), 0);
        let left = a.handle(ms(5) + SKEW, &leave);
        watcher.handle_response(ms(5), &leave.answer(left));
        assert_eq!(events(&mut watcher)[..], [SessionEvent::ObserveEnded { key: key("x"), reason: None }]);
    }

    #[test]
    fn an_observe_reordered_after_its_unobserve_is_undone_without_a_word() {
        let mut a = Authority::new(SessionLimits::default());
        let mut watcher = opened(&mut a, "watcher");
        watcher.observe(ms(1), key("x")).unwrap();
        let late = watcher.poll_transmit().expect("the observe");
        watcher.unobserve(ms(1), &key("x")).unwrap();
        // The unobserve overtakes the observe on the way.
        exchange(&mut watcher, &mut a, ms(2));
        assert_eq!(events(&mut watcher)[..], [SessionEvent::ObserveEnded { key: key("x"), reason: None }]);
        let reply = a.handle(ms(3) + SKEW, &late);
        assert_eq!(reply, SessionReply::Observing { key: key("x") }, "registered again at the authority");
        watcher.handle_response(ms(3), &late.answer(reply));
        // The next keepalive reports it; the machine undoes it instead of hearing of it forever.
        watcher.keep_alive_now(ms(4));
        watcher.handle_timeout(ms(4));
        exchange(&mut watcher, &mut a, ms(4));
        watcher.handle_timeout(ms(4));
        exchange(&mut watcher, &mut a, ms(4));
        assert_eq!(events(&mut watcher)[..], [], "the application never asked for it");
        assert_eq!(a.observers_behind().count(), 0);
        assert_eq!(watcher.observed().count(), 0);
        watcher.keep_alive_now(ms(5));
        watcher.handle_timeout(ms(5));
        let ka = watcher.poll_transmit().unwrap();
        assert_eq!(a.handle(ms(5) + SKEW, &ka), SessionReply::Alive { ttl: TTL, granted: None, more: false });
    }

    /// `waiter` queued for x and y, both held by `holder`; the waiter's keepalive is out (held
    /// at the authority) when `holder` releases y, so its reply pushes y. Returns the two,
    /// and the waiter's confirmation of y, not yet sent.
    fn pushed_one_of_two(a: &mut Authority) -> (Holder, Holder, SessionRequest) {
        let mut holder = opened(a, "holder");
        let mut waiter = opened(a, "waiter");
        for k in ["x", "y"] {
            holder.acquire(ms(1), key(k), false).unwrap();
            waiter.acquire(ms(2), key(k), true).unwrap();
        }
        exchange(&mut holder, a, ms(1));
        exchange(&mut waiter, a, ms(2));
        events(&mut holder);
        assert!(matches!(
            events(&mut waiter)[..],
            [SessionEvent::Queued { .. }, SessionEvent::Queued { .. }]
        ));
        waiter.keep_alive_now(ms(3));
        waiter.handle_timeout(ms(3));
        let held = waiter.poll_transmit().unwrap();
        assert_eq!(held.op, SessionOp::KeepAlive);
        holder.release(ms(10), &key("y")).unwrap();
        exchange(&mut holder, a, ms(10));
        events(&mut holder);
        waiter.handle_response(ms(11), &held.answer(a.handle(ms(11) + SKEW, &held)));
        assert!(matches!(events(&mut waiter)[..], [SessionEvent::Acquired { .. }]));
        let confirm = waiter.poll_transmit().unwrap();
        assert_eq!(confirm.op, SessionOp::Acquire { key: key("y"), wait: true });
        (holder, waiter, confirm)
    }

    /// Runs `waiter` from `from` ms, a millisecond a step, against an authority that holds a
    /// keepalive while it has nothing to report and answers everything else at once, until a
    /// keepalive is held: that one, and how many keepalives were answered at once before it.
    fn until_held(waiter: &mut Holder, a: &mut Authority, from: u64) -> (SessionRequest, usize) {
        let id = waiter.id().unwrap();
        let mut early = 0;
        // A renewal is 3 s away: a keepalive held within these steps was made for the waiter.
        for t in from..from + 20 {
            waiter.handle_timeout(ms(t));
            while let Some(r) = waiter.poll_transmit() {
                if r.op == SessionOp::KeepAlive && !a.has_news(id) {
                    return (r, early);
                }
                early += usize::from(r.op == SessionOp::KeepAlive);
                waiter.handle_response(ms(t), &r.answer(a.handle(ms(t) + SKEW, &r)));
            }
        }
        panic!("no keepalive out for x's grant from {from} ms to {} ms", from + 20);
    }

    /// `holder` lets x go while `held` is held: its reply pushes x to `waiter`.
    fn x_is_pushed(
        holder: &mut Holder,
        waiter: &mut Holder,
        a: &mut Authority,
        held: SessionRequest,
        at: u64,
    ) {
        holder.release(ms(at), &key("x")).unwrap();
        exchange(holder, a, ms(at));
        waiter.handle_response(ms(at), &held.answer(a.handle(ms(at) + SKEW, &held)));
        let got = events(waiter);
        assert!(
            matches!(&got[..], [SessionEvent::Acquired { key: k, .. }] if *k == key("x")),
            "x pushed in the held keepalive's reply: {got:?}"
        );
    }

    #[test]
    fn a_keepalive_that_overtook_a_confirmation_is_made_again_when_the_confirmation_lands() {
        let mut a = Authority::new(SessionLimits::default());
        let (mut holder, mut waiter, confirm) = pushed_one_of_two(&mut a);
        // A keepalive made before the confirmation landed overtakes it (another connection):
        // the authority still reports y, so it is answered at once, with y again.
        waiter.keep_alive_now(ms(12));
        waiter.handle_timeout(ms(12));
        let overtaking = waiter.poll_transmit().unwrap();
        assert_eq!(overtaking.op, SessionOp::KeepAlive);
        let reply = a.handle(ms(12) + SKEW, &overtaking);
        assert!(
            matches!(&reply, SessionReply::Alive { granted: Some(g), .. } if g.key == key("y")),
            "{reply:?}"
        );
        waiter.handle_response(ms(13), &overtaking.answer(reply));
        assert_eq!(events(&mut waiter)[..], []);
        // The confirmation lands (reordered, so the authority reports y until a newer one).
        waiter.handle_response(ms(14), &confirm.answer(a.handle(ms(14) + SKEW, &confirm)));
        assert_eq!(waiter.poll_timeout(), Some(ms(14)), "x waits: keep alive at once, not at the renewal");
        let (held, early) = until_held(&mut waiter, &mut a, 14);
        assert!(early <= 1, "{early} keepalives answered at once before one was held");
        x_is_pushed(&mut holder, &mut waiter, &mut a, held, 100);
        assert_eq!(waiter.fence(&key("y")), Some(Fence(2)), "y still held");
    }

    #[test]
    fn a_grant_made_again_by_a_confirmation_that_a_release_overtook_is_given_back_and_a_keepalive_held() {
        let mut a = Authority::new(SessionLimits::default());
        let (mut holder, mut waiter, confirm) = pushed_one_of_two(&mut a);
        waiter.release(ms(12), &key("y")).unwrap();
        let release = waiter.poll_transmit().unwrap();
        waiter.handle_response(ms(13), &release.answer(a.handle(ms(13) + SKEW, &release)));
        let released = SessionEvent::Released { key: key("y"), fence: Fence(2), acknowledged: true };
        assert_eq!(events(&mut waiter)[..], [released]);
        // The confirmation, overtaken by the release, lands after it: as a reordered acquire it
        // grants y again, and the authority reports that grant until it is given back.
        let again = a.handle(ms(14) + SKEW, &confirm);
        assert_eq!(again, SessionReply::Granted { key: key("y"), fence: Fence(3) });
        waiter.handle_response(ms(14), &confirm.answer(again));
        let (held, early) = until_held(&mut waiter, &mut a, 14);
        assert_eq!(early, 1, "the keepalive that brought the grant to give back");
        assert_eq!(a.key(&key("y")).unwrap().holder, None, "given back");
        x_is_pushed(&mut holder, &mut waiter, &mut a, held, 100);
    }

    /// `h` and `other` open, `other` holding x; `h` asks for x with `wait`, and that acquire
    /// is held up on the way while its request timeout makes the next attempt, which is
    /// answered (queued, or busy). Returns `h` and the held-up acquire, and the time.
    fn acquire_held_up<const S: usize, const AK: usize, const W: usize>(
        a: &mut SessionAuthority<S, AK, W>,
        wait: bool,
    ) -> (Holder, Holder, SessionRequest, Instant) {
        let mut other = opened(a, "other");
        let mut h = opened(a, "h");
        other.acquire(ms(1), key("x"), false).unwrap();
        exchange(&mut other, a, ms(1));
        events(&mut other);
        h.acquire(ms(2), key("x"), wait).unwrap();
        let late = h.poll_transmit().unwrap();
        let retry_at = ms(2) + config().request_timeout;
        h.handle_timeout(retry_at);
        assert_eq!(exchange(&mut h, a, retry_at), 1, "only the retry");
        (other, h, late, retry_at)
    }

    #[test]
    fn a_grant_reported_for_an_acquisition_that_ended_is_given_back_once() {
        let mut a = Authority::new(SessionLimits::default());
        let (mut other, mut h, late, t) = acquire_held_up(&mut a, false);
        // The retry was answered busy: the acquisition is over (its event not yet taken).
        other.release(t, &key("x")).unwrap();
        exchange(&mut other, &mut a, t);
        // The held-up acquire lands on a free key: a reordered acquire, so its grant is
        // reported, and its reply is ignored (h awaits no such seq).
        let again = a.handle(t + SKEW, &late);
        assert_eq!(again, SessionReply::Granted { key: key("x"), fence: Fence(2) });
        h.handle_response(t, &late.answer(again));
        h.keep_alive_now(t);
        h.handle_timeout(t);
        let ka = h.poll_transmit().unwrap();
        let reply = a.handle(t + SKEW, &ka);
        assert!(
            matches!(&reply, SessionReply::Alive { granted: Some(g), .. } if g.key == key("x")),
            "{reply:?}"
        );
        h.handle_response(t, &ka.answer(reply));
        // Given back at once, by its fence, and never believed.
        let back = h.poll_transmit().expect("a give-back");
        assert_eq!(back.op, SessionOp::Release { key: key("x"), fence: Fence(2) });
        assert_eq!(h.poll_transmit(), None);
        assert_eq!(h.fence(&key("x")), None);
        assert_eq!(
            events(&mut h)[..],
            [SessionEvent::NotAcquired { key: key("x"), reason: NotAcquired::Busy }],
            "the application hears of the acquisition only"
        );
        // Reported again while the give-back is out: no second one.
        h.keep_alive_now(t);
        h.handle_timeout(t);
        let ka = h.poll_transmit().unwrap();
        assert_eq!(ka.op, SessionOp::KeepAlive);
        h.handle_response(t, &ka.answer(a.handle(t + SKEW, &ka)));
        assert_eq!(h.poll_transmit(), None);
        h.handle_response(t, &back.answer(a.handle(t + SKEW, &back)));
        assert_eq!(a.key(&key("x")).unwrap().holder, None, "free again");
        assert!(!a.has_news(h.id().unwrap()));
        assert_eq!(events(&mut h)[..], []);
        // And the key can be asked for again.
        h.acquire(t, key("x"), false).unwrap();
        exchange(&mut h, &mut a, t);
        assert!(matches!(events(&mut h)[..], [SessionEvent::Acquired { fence: Fence(3), .. }]));
    }

    #[test]
    fn a_grant_asked_anew_by_an_acquire_that_a_keepalive_overtook_is_believed() {
        let mut a = Authority::new(SessionLimits::default());
        let (mut other, mut h, late, t) = acquire_held_up(&mut a, true);
        // The retry queued h; h stops waiting.
        assert_eq!(events(&mut h)[..], [SessionEvent::Queued { key: key("x"), position: 1 }]);
        h.release(t, &key("x")).unwrap();
        exchange(&mut h, &mut a, t);
        let cancelled = SessionEvent::NotAcquired { key: key("x"), reason: NotAcquired::Cancelled };
        assert_eq!(events(&mut h)[..], [cancelled]);
        // The held-up acquire lands after the stop: reordered, it queues h again, as asked by
        // its own (old) seq. Its reply is ignored.
        let again = a.handle(t + SKEW, &late);
        assert!(matches!(again, SessionReply::Queued { .. }), "{again:?}");
        h.handle_response(t, &late.answer(again));
        // h asks anew, and a keepalive made after that acquire overtakes it on the way, so
        // the acquire lands reordered too.
        h.acquire(t, key("x"), true).unwrap();
        let anew = h.poll_transmit().unwrap();
        h.keep_alive_now(t);
        h.handle_timeout(t);
        let ka = h.poll_transmit().unwrap();
        assert_eq!(ka.op, SessionOp::KeepAlive);
        h.handle_response(t, &ka.answer(a.handle(t + SKEW, &ka)));
        h.handle_response(t, &anew.answer(a.handle(t + SKEW, &anew)));
        assert_eq!(events(&mut h)[..], [SessionEvent::Queued { key: key("x"), position: 1 }]);
        // x passes to h: its grant must be reported as asked by this acquisition, or h takes
        // it as stale, and x stays with a session that never uses it.
        other.release(t, &key("x")).unwrap();
        exchange(&mut other, &mut a, t);
        h.keep_alive_now(t);
        h.handle_timeout(t);
        exchange(&mut h, &mut a, t);
        assert!(
            matches!(events(&mut h)[..], [SessionEvent::Acquired { fence: Fence(2), .. }]),
            "the pushed grant is believed"
        );
        assert!(!a.has_news(h.id().unwrap()), "and confirmed");
    }

    #[test]
    fn an_acquisition_asked_before_the_last_ones_event_was_taken_is_the_keys_slot() {
        let mut a = Authority::new(SessionLimits::default());
        let (mut other, mut h, _lost, t) = acquire_held_up(&mut a, false);
        // Busy, and before that event is taken the application asks again, to wait this time.
        h.acquire(t, key("x"), true).unwrap();
        assert_eq!(h.acquire(t, key("x"), true), Err(AcquireError::InProgress));
        exchange(&mut h, &mut a, t);
        other.release(t, &key("x")).unwrap();
        exchange(&mut other, &mut a, t);
        h.keep_alive_now(t);
        h.handle_timeout(t);
        exchange(&mut h, &mut a, t);
        // The pushed grant is the new acquisition's, and confirmed, though the ended one is
        // still there for its event.
        assert!(!a.has_news(h.id().unwrap()), "confirmed");
        assert_eq!(h.fence(&key("x")), Some(Fence(2)));
        let got = events(&mut h);
        assert!(
            matches!(
                got[..],
                [
                    SessionEvent::NotAcquired { reason: NotAcquired::Busy, .. },
                    SessionEvent::Acquired { fence: Fence(2), .. }
                ]
            ),
            "{got:?}"
        );
        h.release(t, &key("x")).unwrap();
        exchange(&mut h, &mut a, t);
        assert_eq!(a.key(&key("x")).unwrap().holder, None);
    }

    #[test]
    fn a_grant_reported_while_every_slot_is_in_use_is_given_back_all_the_same() {
        // Room at the authority for x and the four keys h tracks.
        let mut a = SessionAuthority::<4, 8, 8>::new(SessionLimits::default());
        let (mut other, mut h, late, t) = acquire_held_up(&mut a, false);
        events(&mut h);
        // Busy and forgotten; then the application tracks as many keys as the machine can.
        for k in ["a", "b", "c", "d"] {
            h.acquire(t, key(k), false).unwrap();
        }
        exchange(&mut h, &mut a, t);
        assert_eq!(h.held().count(), 4);
        assert_eq!(events(&mut h).len(), 4);
        other.release(t, &key("x")).unwrap();
        exchange(&mut other, &mut a, t);
        // The held-up acquire lands: x is h's at the authority, and reported.
        let again = a.handle(t + SKEW, &late);
        assert_eq!(again, SessionReply::Granted { key: key("x"), fence: Fence(2) });
        h.handle_response(t, &late.answer(again));
        for round in 0..2 {
            h.keep_alive_now(t);
            h.handle_timeout(t);
            let ka = h.poll_transmit().unwrap();
            assert_eq!(ka.op, SessionOp::KeepAlive);
            h.handle_response(t, &ka.answer(a.handle(t + SKEW, &ka)));
            if round == 0 {
                let back = h.poll_transmit().expect("a give-back");
                assert_eq!(back.op, SessionOp::Release { key: key("x"), fence: Fence(2) });
            }
            assert_eq!(h.poll_transmit(), None, "one give-back at a time, however often reported");
            assert_eq!(h.fence(&key("x")), None);
        }
        // x is not asked for while it is being given back: its grant could be this fence.
        h.release(t, &key("a")).unwrap();
        assert_eq!(h.acquire(t, key("x"), false), Err(AcquireError::Releasing));
        // The give-back is lost: its request timeout makes it again, under a new seq.
        let retry_at = t + config().request_timeout;
        h.handle_timeout(retry_at);
        exchange(&mut h, &mut a, retry_at);
        assert_eq!(a.key(&key("x")).unwrap().holder, None, "x is free again, not stuck with h");
        assert!(!a.has_news(h.id().unwrap()));
        assert_eq!(
            events(&mut h)[..],
            [SessionEvent::Released { key: key("a"), fence: Fence(1), acknowledged: true }]
        );
        assert_eq!(h.held().count(), 3);
        h.acquire(retry_at, key("x"), false).unwrap();
        exchange(&mut h, &mut a, retry_at);
        assert!(matches!(events(&mut h)[..], [SessionEvent::Acquired { fence: Fence(3), .. }]));
    }
}
