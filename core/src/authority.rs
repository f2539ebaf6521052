//! The authority's side: who holds each key, until when, under which fence.
//!
//! [`decide`] is the whole rulebook as a pure function of one key's [`Record`], the authority's
//! clock and a request. The built-in server stores records in a database and the simulator in
//! memory; both call `decide`, so the rules exist once. [`LeaseTable`] is a bounded in-memory
//! store for small authorities (and tests).

use heapless::index_map::FnvIndexMap;

use crate::time::{Duration, Instant};
use crate::wire::{Fence, Key, Op, OwnerId, Reject, Reply, Request};

pub mod cas;

/// Everything an authority keeps about one key. Persist it whole: `last_fence` must survive
/// restarts so fences never repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Record {
    /// The current grant, if any (it may have expired; [`decide`] clears it lazily).
    pub holder: Option<Holder>,
    /// The highest fence ever issued for this key.
    pub last_fence: Fence,
    /// When the last grant ended by *expiry* (authority clock); `None` while a grant is live
    /// or if the last one was released. It makes the next grant [`Reply::GrantedAfterExpiry`]
    /// and starts the lock-delay ([`Limits::lock_delay`]). Kept in the record because the
    /// expired grant may be cleared by a late renewal or release before anyone acquires.
    #[cfg_attr(feature = "serde", serde(default))]
    pub expired_at: Option<Instant>,
}

/// A grant as the authority sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Holder {
    /// Who holds it.
    pub owner: OwnerId,
    /// Under which fence.
    pub fence: Fence,
    /// The ttl granted; needed to re-arm expiry after a restart.
    pub ttl: Duration,
    /// When it expires, on the authority's clock.
    pub expires_at: Instant,
}

/// The ttls an authority accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Limits {
    /// Shortest ttl granted.
    pub min_ttl: Duration,
    /// Longest ttl granted.
    pub max_ttl: Duration,
    /// Lock-delay (Chubby, Consul): after a grant *expires* (not after a release), the key is
    /// granted to nobody for this long, so that writes the dead holder still had in flight
    /// land before anyone else acts, for resources that cannot check fences. Zero: off.
    #[cfg_attr(feature = "serde", serde(default))]
    pub lock_delay: Duration,
}

impl Default for Limits {
    /// 10 ms to one day, no lock-delay.
    fn default() -> Self {
        Limits {
            min_ttl: Duration::from_millis(10),
            max_ttl: crate::config::MAX_TTL,
            lock_delay: Duration::ZERO,
        }
    }
}

/// What a request did to a key; for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Outcome {
    /// A new grant (new fence).
    Granted,
    /// A grant extended.
    Renewed,
    /// A grant given back.
    Released,
    /// Refused: held by someone else, in lock-delay, or not the asker's grant.
    Refused,
    /// Refused outright: invalid request.
    Rejected,
}

/// The result of [`decide`]: the record to store, the reply to send, and what happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The key's record after the request. Store it (durably) before sending `reply`.
    pub record: Record,
    /// The answer.
    pub reply: Reply,
    /// What happened.
    pub outcome: Outcome,
    /// A grant had expired and was cleared on the way.
    pub expired: bool,
}

impl Decision {
    /// Whether `record` differs from the one passed in, i.e. whether a write is needed.
    pub fn changed(&self, before: &Record) -> bool {
        self.record != *before
    }
}

/// Applies one request to one key at authority time `now`.
///
/// - Acquire (and Takeover, which a server-timed authority treats the same): granted with a
///   new fence if the key is free, expired, or already the asker's (see [`grants_to`]);
///   otherwise `Busy` with the holder's remaining time. A grant that follows an expiry is
///   [`Reply::GrantedAfterExpiry`]; within [`Limits::lock_delay`] of that expiry the key is
///   `Busy` for everyone.
/// - Renew: extended to `now + ttl` if the asker holds exactly that fence; otherwise
///   `NotHolder`.
/// - Release: cleared if the asker holds exactly that fence; otherwise `NotHolder` (repeat
///   releases are harmless). The fence counter is kept.
pub fn decide(record: &Record, now: Instant, request: &Request, limits: &Limits) -> Decision {
    let mut rec = *record;
    let expired = match rec.holder {
        Some(h) if rec.live_holder(now).is_none() => {
            rec.holder = None;
            rec.expired_at = Some(h.expires_at);
            true
        }
        _ => false,
    };
    let owner = request.owner;
    let decision = |record, reply, outcome| Decision { record, reply, outcome, expired };

    let ttl = match request.op {
        Op::Acquire { ttl } | Op::Takeover { ttl, .. } | Op::Renew { ttl, .. } => Some(ttl),
        Op::Release { .. } => None,
    };
    if let Some(ttl) = ttl {
        if ttl < limits.min_ttl || ttl > limits.max_ttl {
            return decision(rec, Reply::Rejected(Reject::InvalidTtl), Outcome::Rejected);
        }
    }

    match request.op {
        Op::Acquire { ttl } | Op::Takeover { ttl, .. } => match rec.holder {
            Some(h) if !grants_to(Some(h.owner), owner) => {
                decision(rec, Reply::Busy { retry_after: h.expires_at - now }, Outcome::Refused)
            }
            _ => {
                if let Some(at) = rec.expired_at {
                    let free_at = at + limits.lock_delay;
                    if now < free_at {
                        return decision(rec, Reply::Busy { retry_after: free_at - now }, Outcome::Refused);
                    }
                }
                let Some(fence) = rec.last_fence.next() else {
                    return decision(rec, Reply::Rejected(Reject::FenceExhausted), Outcome::Rejected);
                };
                let reply = match rec.expired_at.take() {
                    Some(_) => Reply::GrantedAfterExpiry { fence, ttl },
                    None => Reply::Granted { fence, ttl },
                };
                rec.last_fence = fence;
                rec.holder = Some(Holder { owner, fence, ttl, expires_at: now + ttl });
                decision(rec, reply, Outcome::Granted)
            }
        },
        Op::Renew { fence, ttl } => match rec.holder {
            Some(ref mut h) if h.owner == owner && h.fence == fence => {
                h.ttl = ttl;
                h.expires_at = now + ttl;
                decision(rec, Reply::Granted { fence, ttl }, Outcome::Renewed)
            }
            _ => decision(rec, Reply::NotHolder, Outcome::Refused),
        },
        Op::Release { fence } => match rec.holder {
            Some(h) if h.owner == owner && h.fence == fence => {
                rec.holder = None;
                decision(rec, Reply::Released, Outcome::Released)
            }
            _ => decision(rec, Reply::NotHolder, Outcome::Refused),
        },
    }
}

/// The acquire rule every discipline shares: a key whose current holder is `holder` (`None`:
/// free, or its grant has ended) may be granted, *with a new fence*, to `asker`. "Already
/// mine" is granted anew rather than answered with the old fence: an asker that re-acquires
/// has lost track of its grant (a restart, a lost reply), and a fresh fence makes every write
/// it may still have in flight under the old one refusable. The etcd and DynamoDB backends
/// express the same rule in their stores' own condition languages.
pub const fn grants_to(holder: Option<OwnerId>, asker: OwnerId) -> bool {
    match holder {
        None => true,
        Some(h) => h.0 == asker.0,
    }
}

impl Record {
    /// The record of a key the store has no record of: free, with fences continuing above
    /// `floor`. An authority that deletes idle records must pass a floor at least as high as
    /// every fence it ever issued for a deleted key (a store-wide maximum will do), so that a
    /// key's fences still strictly increase after its record was deleted.
    pub fn fresh(floor: Fence) -> Record {
        Record { holder: None, last_fence: floor, expired_at: None }
    }

    /// The grant in force at `now`: `None` if free or expired.
    pub fn live_holder(&self, now: Instant) -> Option<Holder> {
        self.holder.filter(|h| now < h.expires_at)
    }

    /// Whether the record may be deleted at `now` without losing anything but its fence
    /// counter, which the caller must fold into the floor it passes to [`Record::fresh`].
    pub fn reclaimable(&self, now: Instant) -> bool {
        self.live_holder(now).is_none()
    }

    /// The record as an authority must see it after a restart at `now`: every grant counts as
    /// made just now. The old expiry was on a clock that did not survive the restart, and a
    /// grant acknowledged just before the crash must not be handed to anyone else early. For
    /// the same reason a lock-delay in progress starts again from `now`.
    pub fn recover(&self, now: Instant) -> Record {
        let mut rec = *self;
        if let Some(ref mut h) = rec.holder {
            h.expires_at = now + h.ttl;
        }
        if rec.expired_at.is_some() {
            rec.expired_at = Some(now);
        }
        rec
    }
}

/// A bounded in-memory authority for up to `N` keys (`N` a power of two). Records are never
/// evicted, because an evicted record would forget its fence counter.
#[derive(Debug, Default)]
pub struct LeaseTable<const N: usize> {
    records: FnvIndexMap<Key, Record, N>,
    limits: Limits,
}

impl<const N: usize> LeaseTable<N> {
    /// An empty table.
    pub fn new(limits: Limits) -> Self {
        LeaseTable { records: FnvIndexMap::new(), limits }
    }

    /// Applies `request` to `key` at authority time `now`.
    pub fn handle(&mut self, now: Instant, key: &Key, request: &Request) -> Decision {
        let before = self.records.get(key).copied().unwrap_or_default();
        let d = decide(&before, now, request, &self.limits);
        if d.changed(&before) && self.records.insert(key.clone(), d.record).is_err() {
            return Decision {
                record: before,
                reply: Reply::Rejected(Reject::Capacity),
                outcome: Outcome::Rejected,
                expired: false,
            };
        }
        d
    }

    /// The record of `key`, if the table has one.
    pub fn get(&self, key: &Key) -> Option<&Record> {
        self.records.get(key)
    }

    /// All records.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Record)> {
        self.records.iter()
    }

    /// Re-arms every grant as of `now`, as after a restart (see [`Record::recover`]).
    pub fn recover(&mut self, now: Instant) {
        for (_, r) in self.records.iter_mut() {
            *r = r.recover(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::RequestId;

    // Shared with the compare-and-set rules' tests.
    pub(super) const A: OwnerId = OwnerId(1);
    pub(super) const B: OwnerId = OwnerId(2);
    pub(super) const TTL: Duration = Duration::from_secs(10);

    pub(super) fn req(owner: OwnerId, op: Op) -> Request {
        Request { id: RequestId(0), owner, op }
    }
    fn at(s: u64) -> Instant {
        Instant::from_secs(s)
    }

    #[test]
    fn grant_busy_expire_regrant() {
        let l = Limits::default();
        let r0 = Record::default();
        let d = decide(&r0, at(0), &req(A, Op::Acquire { ttl: TTL }), &l);
        assert_eq!(d.reply, Reply::Granted { fence: Fence(1), ttl: TTL });
        let d2 = decide(&d.record, at(4), &req(B, Op::Acquire { ttl: TTL }), &l);
        assert_eq!(d2.reply, Reply::Busy { retry_after: Duration::from_secs(6) });
        assert!(!d2.changed(&d.record));
        let d3 = decide(&d2.record, at(10), &req(B, Op::Acquire { ttl: TTL }), &l);
        assert_eq!(d3.reply, Reply::GrantedAfterExpiry { fence: Fence(2), ttl: TTL });
        assert!(d3.expired);
        // A's renewal of its expired fence is refused.
        let d4 = decide(&d3.record, at(11), &req(A, Op::Renew { fence: Fence(1), ttl: TTL }), &l);
        assert_eq!(d4.reply, Reply::NotHolder);
    }

    #[test]
    fn reacquire_by_holder_gets_a_new_fence() {
        let l = Limits::default();
        let d = decide(&Record::default(), at(0), &req(A, Op::Acquire { ttl: TTL }), &l);
        let d2 = decide(&d.record, at(1), &req(A, Op::Acquire { ttl: TTL }), &l);
        assert_eq!(d2.reply, Reply::Granted { fence: Fence(2), ttl: TTL });
    }

    #[test]
    fn release_is_fenced_and_keeps_the_counter() {
        let l = Limits::default();
        let d = decide(&Record::default(), at(0), &req(A, Op::Acquire { ttl: TTL }), &l);
        let wrong = decide(&d.record, at(1), &req(B, Op::Release { fence: Fence(1) }), &l);
        assert_eq!(wrong.reply, Reply::NotHolder);
        let stale = decide(&d.record, at(1), &req(A, Op::Release { fence: Fence(7) }), &l);
        assert_eq!(stale.reply, Reply::NotHolder);
        let ok = decide(&d.record, at(1), &req(A, Op::Release { fence: Fence(1) }), &l);
        assert_eq!(ok.reply, Reply::Released);
        assert_eq!(ok.record.holder, None);
        assert_eq!(ok.record.last_fence, Fence(1));
        let again = decide(&ok.record, at(2), &req(A, Op::Release { fence: Fence(1) }), &l);
        assert_eq!(again.reply, Reply::NotHolder);
        let next = decide(&ok.record, at(2), &req(B, Op::Acquire { ttl: TTL }), &l);
        assert_eq!(next.reply, Reply::Granted { fence: Fence(2), ttl: TTL });
    }

    #[test]
    fn a_grant_after_a_release_is_plain_after_an_expiry_is_flagged() {
        let l = Limits::default();
        let d = decide(&Record::default(), at(0), &req(A, Op::Acquire { ttl: TTL }), &l);
        let released = decide(&d.record, at(1), &req(A, Op::Release { fence: Fence(1) }), &l);
        let b = decide(&released.record, at(2), &req(B, Op::Acquire { ttl: TTL }), &l);
        assert_eq!(b.reply, Reply::Granted { fence: Fence(2), ttl: TTL });
        // B's grant expires at 12; B's own late renewal clears it at 13 before anyone asks...
        let late = decide(&b.record, at(13), &req(B, Op::Renew { fence: Fence(2), ttl: TTL }), &l);
        assert_eq!(late.reply, Reply::NotHolder);
        assert_eq!(late.record.holder, None);
        assert_eq!(late.record.expired_at, Some(at(12)));
        // ...and the next holder still learns that B's lease expired, and only it does.
        let a = decide(&late.record, at(14), &req(A, Op::Acquire { ttl: TTL }), &l);
        assert_eq!(a.reply, Reply::GrantedAfterExpiry { fence: Fence(3), ttl: TTL });
        let a2 = decide(&a.record, at(15), &req(A, Op::Acquire { ttl: TTL }), &l);
        assert_eq!(a2.reply, Reply::Granted { fence: Fence(4), ttl: TTL }, "re-acquire of a live grant");
    }

    #[test]
    fn lock_delay_holds_the_key_after_an_expiry_but_not_after_a_release() {
        let l = Limits { lock_delay: Duration::from_secs(5), ..Limits::default() };
        let d = decide(&Record::default(), at(0), &req(A, Op::Acquire { ttl: TTL }), &l);
        // A dies; its grant expires at 10; nobody may have the key until 15.
        let b = decide(&d.record, at(10), &req(B, Op::Acquire { ttl: TTL }), &l);
        assert_eq!(b.reply, Reply::Busy { retry_after: Duration::from_secs(5) });
        assert_eq!(b.outcome, Outcome::Refused);
        let b = decide(&b.record, at(14), &req(A, Op::Acquire { ttl: TTL }), &l);
        assert_eq!(b.reply, Reply::Busy { retry_after: Duration::from_secs(1) }, "not even the old owner");
        let b = decide(&b.record, at(15), &req(B, Op::Acquire { ttl: TTL }), &l);
        assert_eq!(b.reply, Reply::GrantedAfterExpiry { fence: Fence(2), ttl: TTL });
        // B releases at 16: the next acquire is granted at once.
        let r = decide(&b.record, at(16), &req(B, Op::Release { fence: Fence(2) }), &l);
        let a = decide(&r.record, at(16), &req(A, Op::Acquire { ttl: TTL }), &l);
        assert_eq!(a.reply, Reply::Granted { fence: Fence(3), ttl: TTL });
        // Off by default.
        let d = decide(&d.record, at(10), &req(B, Op::Acquire { ttl: TTL }), &Limits::default());
        assert_eq!(d.reply, Reply::GrantedAfterExpiry { fence: Fence(2), ttl: TTL });
    }

    #[test]
    fn a_restart_restarts_the_lock_delay() {
        let l = Limits { lock_delay: Duration::from_secs(5), ..Limits::default() };
        let d = decide(&Record::default(), at(100), &req(A, Op::Acquire { ttl: TTL }), &l);
        let busy = decide(&d.record, at(111), &req(B, Op::Acquire { ttl: TTL }), &l);
        assert_eq!(busy.record.expired_at, Some(at(110)));
        // The restarted clock starts near zero; the delay counts from the restart.
        let rec = busy.record.recover(at(1));
        let b = decide(&rec, at(5), &req(B, Op::Acquire { ttl: TTL }), &l);
        assert_eq!(b.reply, Reply::Busy { retry_after: Duration::from_secs(1) });
        let b = decide(&rec, at(6), &req(B, Op::Acquire { ttl: TTL }), &l);
        assert_eq!(b.reply, Reply::GrantedAfterExpiry { fence: Fence(2), ttl: TTL });
    }

    #[test]
    fn absurd_ttls_are_rejected_without_change() {
        let l = Limits::default();
        for ttl in [Duration::ZERO, Duration::from_micros(1), Duration::MAX] {
            let d = decide(&Record::default(), at(0), &req(A, Op::Acquire { ttl }), &l);
            assert_eq!(d.reply, Reply::Rejected(Reject::InvalidTtl));
            assert!(!d.changed(&Record::default()));
        }
    }

    #[test]
    fn fence_exhaustion_is_an_error_not_a_wrap() {
        let rec = Record { holder: None, last_fence: Fence(u64::MAX), expired_at: None };
        let d = decide(&rec, at(0), &req(A, Op::Acquire { ttl: TTL }), &Limits::default());
        assert_eq!(d.reply, Reply::Rejected(Reject::FenceExhausted));
    }

    #[test]
    fn a_record_deleted_under_a_floor_continues_above_every_old_fence() {
        let l = Limits::default();
        let d = decide(&Record::default(), at(0), &req(A, Op::Acquire { ttl: TTL }), &l);
        assert!(!d.record.reclaimable(at(5)), "held: never reclaimable");
        assert!(d.record.reclaimable(at(10)), "expired: reclaimable");
        let released = decide(&d.record, at(1), &req(A, Op::Release { fence: Fence(1) }), &l).record;
        assert!(released.reclaimable(at(1)));
        // The key's record is deleted; the floor keeps its counter.
        let next = decide(&Record::fresh(released.last_fence), at(2), &req(B, Op::Acquire { ttl: TTL }), &l);
        assert_eq!(next.reply, Reply::Granted { fence: Fence(2), ttl: TTL });
    }

    #[test]
    fn recovery_rearms_expiry_from_restart() {
        let mut t: LeaseTable<4> = LeaseTable::new(Limits::default());
        let k = crate::wire::parse_key("k").unwrap();
        t.handle(at(100), &k, &req(A, Op::Acquire { ttl: TTL }));
        // The restarted authority's clock starts again near zero.
        t.recover(at(1));
        let d = t.handle(at(5), &k, &req(B, Op::Acquire { ttl: TTL }));
        assert_eq!(d.reply, Reply::Busy { retry_after: Duration::from_secs(6) });
        let d = t.handle(at(11), &k, &req(B, Op::Acquire { ttl: TTL }));
        assert_eq!(d.reply, Reply::GrantedAfterExpiry { fence: Fence(2), ttl: TTL });
    }

    #[test]
    fn a_full_table_refuses_new_keys_but_serves_old_ones() {
        let mut t: LeaseTable<2> = LeaseTable::new(Limits::default());
        let k = |s| crate::wire::parse_key(s).unwrap();
        assert!(matches!(
            t.handle(at(0), &k("a"), &req(A, Op::Acquire { ttl: TTL })).reply,
            Reply::Granted { .. }
        ));
        assert!(matches!(
            t.handle(at(0), &k("b"), &req(A, Op::Acquire { ttl: TTL })).reply,
            Reply::Granted { .. }
        ));
        assert_eq!(
            t.handle(at(0), &k("c"), &req(A, Op::Acquire { ttl: TTL })).reply,
            Reply::Rejected(Reject::Capacity)
        );
        assert_eq!(t.handle(at(0), &k("a"), &req(A, Op::Release { fence: Fence(1) })).reply, Reply::Released);
    }
}
