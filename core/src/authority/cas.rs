//! The compare-and-set discipline's rules, for stores without a clock (DynamoDB).
//!
//! Such a store keeps one record per key and applies conditional writes; it never expires
//! anything. Contenders that find the key held get [`Reply::Observed`], wait `ttl·(1+ε)` on
//! their own clock, and take over *the version they saw*, which succeeds only if the holder
//! has not written (renewed or released) since. [`CasRecord::apply`] is those conditional
//! writes as a pure function, the executable spec of what the DynamoDB backend's condition
//! expressions say; the simulator runs it as its store.
//!
//! [`Sighting`] is the contender's half: when a takeover of an observed version is due. The
//! core [`Lease`](crate::Lease) waits with it, and so does a session backend on such a store
//! (DynamoDB), so the waiting rule exists once.
//!
//! ```
//! use leasehold_core::authority::cas::Sighting;
//! use leasehold_core::{Config, Duration, Instant};
//!
//! let config = Config::new(Duration::from_secs(10));
//! let ttl = Duration::from_secs(10);
//! let first = Sighting::new(&config, Instant::from_millis(0), 7, ttl);
//! assert!(!first.is_due(Instant::from_millis(10_000)), "ttl alone is not enough: clocks drift");
//! // Seen again unchanged: the wait still counts from the first sighting.
//! let again = first.again(&config, Instant::from_millis(5_000), 7, ttl);
//! assert_eq!(again, first);
//! assert!(again.is_due(Instant::from_millis(0) + config.observe_wait(ttl)));
//! // The holder wrote meanwhile (a renewal): the wait starts over.
//! let renewed = again.again(&config, Instant::from_millis(6_000), 8, ttl);
//! assert_eq!(renewed.due(), Instant::from_millis(6_000) + config.observe_wait(ttl));
//! ```

use crate::authority::{grants_to, Outcome};
use crate::config::Config;
use crate::time::{Duration, Instant};
use crate::wire::{Fence, Op, OwnerId, Reject, Reply, Request};

/// One key's record in a compare-and-set store. Every successful write bumps `version`, so a
/// contender can tell whether the holder has been alive since it looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct CasRecord {
    /// The holder; `None` while free. Kept apart from `fence` so that releasing keeps the
    /// counter.
    pub owner: Option<OwnerId>,
    /// The fence of the current (or last) grant: the highest ever issued for this key.
    pub fence: Fence,
    /// Bumped by every successful write.
    pub version: u64,
    /// The holder's lease length, as observers must wait it out.
    pub ttl: Duration,
}

/// The result of [`CasRecord::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CasDecision {
    /// The record after the request (unchanged if its condition failed).
    pub record: CasRecord,
    /// The answer.
    pub reply: Reply,
    /// What happened.
    pub outcome: Outcome,
}

impl CasRecord {
    /// Applies one request as the store evaluates its conditional write.
    ///
    /// - Acquire: if free or already the asker's ([`grants_to`]), the asker holds it under a
    ///   new fence; otherwise `Observed` with the version and ttl as they are.
    /// - Takeover of `version`: as Acquire, or also if the record is still at `version`; a
    ///   takeover from another holder is [`Reply::GrantedAfterExpiry`], since waiting it out
    ///   is how this discipline expires a lease.
    /// - Renew, Release: only the asker's own grant of exactly that fence; otherwise
    ///   `NotHolder`. Release frees the record but keeps its fence.
    pub fn apply(&self, request: &Request) -> CasDecision {
        let mut rec = *self;
        let asker = request.owner;
        let mine = rec.owner == Some(asker);
        let decision = |record, reply, outcome| CasDecision { record, reply, outcome };
        match request.op {
            Op::Acquire { ttl } | Op::Takeover { ttl, .. } => {
                let free = grants_to(rec.owner, asker);
                let waited_out = matches!(request.op, Op::Takeover { version, .. } if version == rec.version);
                if !free && !waited_out {
                    let observed = Reply::Observed { version: rec.version, ttl: rec.ttl };
                    return decision(rec, observed, Outcome::Refused);
                }
                let Some(fence) = rec.fence.next() else {
                    return decision(rec, Reply::Rejected(Reject::FenceExhausted), Outcome::Rejected);
                };
                let reply = if free {
                    Reply::Granted { fence, ttl }
                } else {
                    Reply::GrantedAfterExpiry { fence, ttl }
                };
                rec = CasRecord { owner: Some(asker), fence, version: rec.version.wrapping_add(1), ttl };
                decision(rec, reply, Outcome::Granted)
            }
            Op::Renew { fence, ttl } if mine && fence == rec.fence => {
                rec.version = rec.version.wrapping_add(1);
                rec.ttl = ttl;
                decision(rec, Reply::Granted { fence, ttl }, Outcome::Renewed)
            }
            Op::Release { fence } if mine && fence == rec.fence => {
                rec.version = rec.version.wrapping_add(1);
                rec.owner = None;
                decision(rec, Reply::Released, Outcome::Released)
            }
            Op::Renew { .. } | Op::Release { .. } => decision(rec, Reply::NotHolder, Outcome::Refused),
        }
    }
}

/// A compare-and-set record seen held at `version`, and from when a takeover of that version
/// is safe.
///
/// Due `ttl·(1+ε) + margin` ([`Config::observe_wait`]) after the *receipt* of the first reply
/// showing `version`: the holder wrote that version before the reply was read, after sending
/// the request its validity counts from, so its belief ends `ttl·(1−ε) − margin` (holder's
/// clock) after a moment before the sighting, and by then this clock has run at least that
/// long. A different version means the holder (or another contender) wrote since: the wait
/// starts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Sighting {
    version: u64,
    due: Instant,
}

impl Sighting {
    /// The first sighting of `version` (held, with the holder's `ttl`), received at `now`.
    pub fn new(config: &Config, now: Instant, version: u64, ttl: Duration) -> Sighting {
        Sighting { version, due: now + config.observe_wait(ttl) }
    }

    /// The record seen again at `now`: unchanged, the wait goes on from the first sighting;
    /// at another version, it restarts.
    pub fn again(self, config: &Config, now: Instant, version: u64, ttl: Duration) -> Sighting {
        if version == self.version {
            self
        } else {
            Sighting::new(config, now, version, ttl)
        }
    }

    /// The version seen: what a takeover names ([`Op::Takeover`]'s `version`).
    pub const fn version(&self) -> u64 {
        self.version
    }

    /// From when the takeover of [`version`](Self::version) is safe.
    pub const fn due(&self) -> Instant {
        self.due
    }

    /// Whether the takeover is safe at `now`.
    pub fn is_due(&self, now: Instant) -> bool {
        now >= self.due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::tests::{req, A, B, TTL};

    #[test]
    fn observe_wait_take_over_and_the_renewal_that_beats_it() {
        let r0 = CasRecord::default();
        let a = r0.apply(&req(A, Op::Acquire { ttl: TTL }));
        assert_eq!(a.reply, Reply::Granted { fence: Fence(1), ttl: TTL });
        let seen = a.record.apply(&req(B, Op::Acquire { ttl: TTL }));
        assert_eq!(seen.reply, Reply::Observed { version: 1, ttl: TTL });
        assert_eq!(seen.record, a.record, "a failed condition writes nothing");
        // A renews while B waits: B's takeover of version 1 fails and shows version 2.
        let renewed = a.record.apply(&req(A, Op::Renew { fence: Fence(1), ttl: TTL }));
        assert_eq!(renewed.outcome, Outcome::Renewed);
        let late = renewed.record.apply(&req(B, Op::Takeover { version: 1, ttl: TTL }));
        assert_eq!(late.reply, Reply::Observed { version: 2, ttl: TTL });
        // A falls silent; B's takeover of version 2 wins, flagged as after an expiry.
        let b = renewed.record.apply(&req(B, Op::Takeover { version: 2, ttl: TTL }));
        assert_eq!(b.reply, Reply::GrantedAfterExpiry { fence: Fence(2), ttl: TTL });
        // A's renewal and release of its old fence are refused.
        assert_eq!(b.record.apply(&req(A, Op::Renew { fence: Fence(1), ttl: TTL })).reply, Reply::NotHolder);
        assert_eq!(b.record.apply(&req(A, Op::Release { fence: Fence(1) })).reply, Reply::NotHolder);
    }

    #[test]
    fn release_keeps_the_counter_and_already_mine_gets_a_new_fence() {
        let a = CasRecord::default().apply(&req(A, Op::Acquire { ttl: TTL }));
        let again = a.record.apply(&req(A, Op::Acquire { ttl: TTL }));
        assert_eq!(again.reply, Reply::Granted { fence: Fence(2), ttl: TTL });
        let rel = again.record.apply(&req(A, Op::Release { fence: Fence(2) }));
        assert_eq!(rel.reply, Reply::Released);
        assert_eq!(rel.record.owner, None);
        let b = rel.record.apply(&req(B, Op::Takeover { version: 0, ttl: TTL }));
        assert_eq!(b.reply, Reply::Granted { fence: Fence(3), ttl: TTL }, "free, not expired");
    }

    #[test]
    fn a_takeover_is_due_after_the_stretched_ttl_from_the_first_sighting_of_a_version() {
        let mut config = Config::new(TTL);
        config.drift = crate::Drift::from_ppm(100_000);
        config.margin = Duration::from_millis(10);
        let ms = Instant::from_millis;
        let s = Sighting::new(&config, ms(1_000), 3, Duration::from_secs(2));
        // 2 s · 1.1 + 10 ms.
        assert_eq!(s.due(), ms(1_000 + 2_210));
        assert!(!s.is_due(ms(3_209)));
        assert!(s.is_due(ms(3_210)));
        assert_eq!(s.again(&config, ms(3_000), 3, Duration::from_secs(2)), s);
        let moved = s.again(&config, ms(3_000), 4, Duration::from_secs(1));
        assert_eq!((moved.version(), moved.due()), (4, ms(3_000 + 1_110)));
    }

    #[test]
    fn fence_exhaustion_is_an_error_not_a_wrap() {
        let rec = CasRecord { fence: Fence(u64::MAX), ..CasRecord::default() };
        let d = rec.apply(&req(A, Op::Acquire { ttl: TTL }));
        assert_eq!(d.reply, Reply::Rejected(Reject::FenceExhausted));
        assert_eq!(d.record, rec);
    }
}
