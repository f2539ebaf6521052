//! One key namespace for v1 leases ([`authority::decide`]) and v2 sessions
//! ([`SessionAuthority`]): the rules of their composition, written once for the built-in
//! server and the simulator.
//!
//! A key is never held under both protocols at once, and its fences strictly increase across
//! both. The session authority is told of every v1 lease as an *external hold* of its key. A
//! v1 request goes, one at a time per key:
//!
//! 1. **Hold**: if it may grant or extend ([`V1Claim::of`]), the key is held for v1 with no end
//!    yet ([`ExternalHold::Pending`]) by [`SessionAuthority::hold_external`]. A refusal (a
//!    session holds the key, or, for a new grant, sessions wait for it) is v1's answer
//!    ([`V1Claim::refused`]), and nothing is decided. Otherwise the hold answers the key's last
//!    v2 fence: the floor.
//! 2. **Decide** ([`decide_above`]): v1's rules, with its fences continuing above the floor.
//! 3. **Set**: [`SessionAuthority::set_external`] with the record's end ([`remaining`]: its
//!    holder's expiry, or its last grant's expiry, plus the lock-delay) and its last fence
//!    ([`set_fence`]), so that v2's fences continue above v1's and a key v1 frees goes to the
//!    head of its v2 queue.
//!
//! A release only decides and sets. The server puts durable commits (and its two stores)
//! between these steps; an in-memory authority may make them one after another.
//!
//! ```
//! use leasehold_core::authority::{Limits, Record};
//! use leasehold_core::namespace::{self, V1Claim};
//! use leasehold_core::session::authority::ExternalHold;
//! use leasehold_core::session::{SessionAuthority, SessionLimits};
//! use leasehold_core::{parse_key, Duration, Instant, Op, OwnerId, Reply, Request, RequestId};
//!
//! let mut sessions = SessionAuthority::<4, 4, 8>::new(SessionLimits::default());
//! let limits = Limits::default();
//! let key = parse_key("job").unwrap();
//! let now = Instant::from_secs(1);
//! let ttl = Duration::from_secs(5);
//! let request = Request { id: RequestId(1), owner: OwnerId(7), op: Op::Acquire { ttl } };
//!
//! let claim = V1Claim::of(&request.op).expect("an acquire may grant");
//! let floor = sessions.hold_external(now, &key, ExternalHold::Pending, claim.exclusive()).unwrap();
//! let d = namespace::decide_above(&Record::default(), floor, now, &request, &limits);
//! assert!(matches!(d.reply, Reply::Granted { .. }));
//! let until = namespace::remaining(&d.record, limits.lock_delay, now).map(|left| now + left);
//! sessions.set_external(now, &key, until, namespace::set_fence(&d.record, floor));
//! assert_eq!(sessions.external_hold(&key), Some(ExternalHold::Until(now + ttl)));
//! ```

use crate::authority::{self, Decision, Limits, Outcome, Record};
#[cfg(doc)]
use crate::session::authority::ExternalHold;
use crate::session::authority::ExternalRefusal;
#[cfg(doc)]
use crate::session::SessionAuthority;
use crate::time::{Duration, Instant};
use crate::wire::{Fence, Op, Reject, Reply, Request};

/// What a v1 request that may grant or extend claims in the session authority before v1
/// decides it (a release claims nothing: it can only free the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum V1Claim {
    /// An acquire (or takeover): a new grant, behind sessions already waiting for the key.
    Grant,
    /// A renewal: an extension of a grant sessions already wait behind.
    Extend,
}

impl V1Claim {
    /// The claim `op` makes; `None` for a release.
    pub const fn of(op: &Op) -> Option<V1Claim> {
        match op {
            Op::Acquire { .. } | Op::Takeover { .. } => Some(V1Claim::Grant),
            Op::Renew { .. } => Some(V1Claim::Extend),
            Op::Release { .. } => None,
        }
    }

    /// Whether sessions waiting for the key refuse it (the `exclusive` of
    /// [`SessionAuthority::hold_external`]): they are first in line for a new grant, but an
    /// extension is of a grant they already queued behind.
    pub const fn exclusive(self) -> bool {
        matches!(self, V1Claim::Grant)
    }

    /// v1's answer when the session authority refused to hold the key for this claim; the
    /// v1 record is left as it was (the decision's `record` is a default one: do not store
    /// it).
    pub const fn refused(self, refusal: ExternalRefusal) -> Decision {
        let (reply, outcome) = match (refusal, self) {
            (ExternalRefusal::Busy { retry_after }, V1Claim::Grant) => {
                (Reply::Busy { retry_after }, Outcome::Refused)
            }
            // A renewal of a key a session holds: the v1 lease ended before that grant.
            (ExternalRefusal::Busy { .. }, V1Claim::Extend) => (Reply::NotHolder, Outcome::Refused),
            (ExternalRefusal::Capacity, _) => (Reply::Rejected(Reject::Capacity), Outcome::Rejected),
        };
        Decision {
            record: Record { holder: None, last_fence: Fence::NONE, expired_at: None },
            reply,
            outcome,
            expired: false,
        }
    }
}

/// v1's rules ([`authority::decide`]) for a key whose last v2 fence is `floor`: a grant's
/// fence is above both the record's and the floor. The record keeps the floor only if the
/// decision writes it (a grant), so a refusal still leaves it unchanged.
pub fn decide_above(
    record: &Record,
    floor: Fence,
    now: Instant,
    request: &Request,
    limits: &Limits,
) -> Decision {
    let mut before = *record;
    before.last_fence = before.last_fence.max(floor);
    let d = authority::decide(&before, now, request, limits);
    if d.changed(&before) {
        d
    } else {
        Decision { record: *record, ..d }
    }
}

/// How long from `now` (v1's clock) `record` keeps its key from anyone else: to its holder's
/// expiry, or to the end of a lock-delay after an expiry, plus `lock_delay` (a live grant's
/// expiry starts one); `None` if it is free now.
pub fn remaining(record: &Record, lock_delay: Duration, now: Instant) -> Option<Duration> {
    let end = match (record.holder, record.expired_at) {
        (Some(h), _) => h.expires_at,
        (None, Some(at)) => at,
        (None, None) => return None,
    } + lock_delay;
    (end > now).then(|| end - now)
}

/// The fence to tell [`SessionAuthority::set_external`] after v1 decided `record` above
/// `floor`: the highest either protocol issued, which v2's next grant must be above.
pub fn set_fence(record: &Record, floor: Fence) -> Fence {
    record.last_fence.max(floor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::Holder;
    use crate::wire::{OwnerId, RequestId};

    const TTL: Duration = Duration::from_secs(10);

    fn req(op: Op) -> Request {
        Request { id: RequestId(0), owner: OwnerId(1), op }
    }

    #[test]
    fn a_grant_is_above_the_session_floor_and_a_refusal_keeps_the_record() {
        let limits = Limits::default();
        let now = Instant::from_secs(1);
        let d =
            decide_above(&Record::fresh(Fence(3)), Fence(9), now, &req(Op::Acquire { ttl: TTL }), &limits);
        assert_eq!(d.reply, Reply::Granted { fence: Fence(10), ttl: TTL });
        assert_eq!(set_fence(&d.record, Fence(9)), Fence(10));
        // Not the holder: nothing written, the floor not kept.
        let rec = Record::fresh(Fence(3));
        let d = decide_above(&rec, Fence(9), now, &req(Op::Release { fence: Fence(4) }), &limits);
        assert_eq!((d.reply, d.record), (Reply::NotHolder, rec));
        assert_eq!(set_fence(&d.record, Fence(9)), Fence(9));
    }

    #[test]
    fn a_record_keeps_its_key_to_its_expiry_plus_the_lock_delay() {
        let delay = Duration::from_secs(2);
        let at = Instant::from_secs;
        let holder = Holder { owner: OwnerId(1), fence: Fence(1), ttl: TTL, expires_at: at(10) };
        let held = Record { holder: Some(holder), last_fence: Fence(1), expired_at: None };
        assert_eq!(remaining(&held, delay, at(4)), Some(Duration::from_secs(8)));
        assert_eq!(remaining(&held, Duration::ZERO, at(10)), None);
        let delayed = Record { holder: None, last_fence: Fence(1), expired_at: Some(at(10)) };
        assert_eq!(remaining(&delayed, delay, at(11)), Some(Duration::from_secs(1)));
        assert_eq!(remaining(&Record::default(), delay, at(0)), None);
    }

    #[test]
    fn only_grants_are_exclusive_and_a_refused_renewal_is_not_holder() {
        assert_eq!(V1Claim::of(&Op::Release { fence: Fence(1) }), None);
        let grant = V1Claim::of(&Op::Acquire { ttl: TTL }).unwrap();
        let extend = V1Claim::of(&Op::Renew { fence: Fence(1), ttl: TTL }).unwrap();
        assert!(grant.exclusive() && !extend.exclusive());
        let busy = ExternalRefusal::Busy { retry_after: TTL };
        assert_eq!(grant.refused(busy).reply, Reply::Busy { retry_after: TTL });
        assert_eq!(extend.refused(busy).reply, Reply::NotHolder);
        assert_eq!(extend.refused(ExternalRefusal::Capacity).outcome, Outcome::Rejected);
    }
}
