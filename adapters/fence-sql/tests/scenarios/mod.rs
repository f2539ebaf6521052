//! The same scenarios against every backend: each test file implements [`Db`] for one
//! database and calls these.
//!
//! The caller's data is one counter row and a log of admitted writes: a fenced write adds one
//! to the counter by reading it and writing it back (so a lost update shows as a counter
//! below the log's length) and appends its fence to the log, all in its transaction.

use std::error::Error as _;
use std::sync::{Arc, Barrier};

use leasehold_core::resource::{AdmitError, HighWater};
use leasehold_core::wire::{Fence, OwnerId};
use leasehold_fence_sql::FenceError;

pub(crate) const A: OwnerId = OwnerId(1);
/// Above `i64::MAX`, as half of all random owner ids are.
pub(crate) const B: OwnerId = OwnerId(u64::MAX - 6);

/// One connection to a test's own database, with the caller's tables and the fence table made.
pub(crate) trait Db: Sized {
    type Driver: std::error::Error + Send + Sync + 'static;
    /// Another connection to the same database.
    fn connect(&self) -> Self;
    /// Through the crate's own transaction helper: the fence check, then the counter's
    /// read-modify-write and the log append. `Ok`: the counter's new value.
    fn fenced_increment(
        &mut self,
        resource: &str,
        fence: Fence,
        holder: OwnerId,
    ) -> Result<i64, FenceError<Self::Driver>>;
    /// In a transaction of the caller's: the caller's write first (the counter set to
    /// `value`), then the check; committed if admitted, dropped (rolled back) if not.
    fn write_then_admit(
        &mut self,
        resource: &str,
        fence: Fence,
        holder: OwnerId,
        value: i64,
    ) -> Result<HighWater, FenceError<Self::Driver>>;
    /// The check on a connection with no transaction open, if the backend's types allow that
    /// mistake at all (`None` if they do not).
    fn admit_outside_transaction(&mut self, resource: &str, fence: Fence)
        -> Option<FenceError<Self::Driver>>;
    /// Stores a raw row in the fence table, as a careless hand would, bypassing its CHECK.
    fn store_raw_mark(&mut self, resource: &str, fence: i64, holder: i64);
    fn counter(&mut self) -> i64;
    /// The fences of the admitted writes in commit order.
    fn log(&mut self) -> Vec<u64>;
    /// The stored mark's row, raw.
    fn mark(&mut self, resource: &str) -> Option<(i64, i64)>;
}

/// Called by the writes between their steps: a pause that gives the other thread time to
/// interleave, so that a check not atomic with its write would be caught. It asserts nothing
/// about time: with a correct check the pause only holds the lock longer.
pub(crate) fn widen_races() {
    std::thread::sleep(std::time::Duration::from_micros(300));
}

fn stale(fence: u64, high_water: u64) -> AdmitError {
    AdmitError::Stale { fence: Fence(fence), high_water: Fence(high_water) }
}

/// Two holders: A (fence 1) writes, B (fence 2) writes, A writes again under fence 1 and is
/// refused, both through the helper and in a transaction of its own whose change rolls back.
pub(crate) fn a_stale_holder_is_refused_and_its_change_rolls_back<D: Db>(mut db: D) {
    assert_eq!(db.fenced_increment("pump", Fence(1), A).unwrap(), 1);
    assert_eq!(db.fenced_increment("pump", Fence(2), B).unwrap(), 2);
    let refused = db.fenced_increment("pump", Fence(1), A).unwrap_err();
    assert_eq!(refused.refusal(), Some(stale(1, 2)), "{refused:?}");
    assert_eq!(refused.resource(), "pump");
    // Says where, and its source says why.
    assert_eq!(refused.to_string(), "resource \"pump\" refused the write");
    assert_eq!(
        refused.source().map(|s| s.to_string()).as_deref(),
        Some("write refused: fence 1 is stale, the resource has admitted fence 2")
    );
    // The caller wrote first in its own transaction; the refusal rolled that back.
    let refused = db.write_then_admit("pump", Fence(1), A, 999).unwrap_err();
    assert_eq!(refused.refusal(), Some(stale(1, 2)));
    assert_eq!(db.counter(), 2, "the stale holder's write must have rolled back");
    assert_eq!(db.log(), [1, 2]);
    assert_eq!(db.mark("pump"), Some((2, B.0 as i64)));
    // B's grant keeps writing; a later grant (fence 3) through the caller's own transaction.
    assert_eq!(db.fenced_increment("pump", Fence(2), B).unwrap(), 3);
    assert_eq!(
        db.write_then_admit("pump", Fence(3), A, 10).unwrap(),
        HighWater { fence: Fence(3), holder: A }
    );
    assert_eq!(db.counter(), 10);
    assert_eq!(db.mark("pump"), Some((3, A.0 as i64)));
}

/// One grant writes many times; another holder presenting the same fence is refused.
pub(crate) fn the_same_holder_writes_twice_and_a_reused_fence_is_refused<D: Db>(mut db: D) {
    assert_eq!(db.fenced_increment("tank", Fence(5), B).unwrap(), 1);
    assert_eq!(db.fenced_increment("tank", Fence(5), B).unwrap(), 2);
    let reused = db.fenced_increment("tank", Fence(5), A).unwrap_err();
    assert_eq!(reused.refusal(), Some(AdmitError::Reused { fence: Fence(5) }));
    assert_eq!(db.counter(), 2);
    assert_eq!(db.mark("tank"), Some((5, B.0 as i64)));
    // Marks are per resource: fence 1 on another resource is not stale.
    assert_eq!(db.fenced_increment("valve", Fence(1), A).unwrap(), 3);
}

/// Two connections on two threads race through many grants: A holds the odd fences, B the
/// even ones, and each writes under fence `f` only after both have finished with `f - 2`,
/// so the two always contend. Both queue for the lock (no database error: no retries), no
/// update may be lost (the counter equals the number of
/// admitted writes), the log's fences never go down, and every refusal is a stale fence.
pub(crate) fn concurrent_writers_lose_no_update<D: Db + Send + 'static>(db: D) {
    const ROUNDS: u64 = 40;
    const WRITES: u64 = 3;
    let barrier = Arc::new(Barrier::new(2));
    let mut threads = Vec::new();
    for (holder, first) in [(A, 1), (B, 2)] {
        let mut conn = db.connect();
        let barrier = barrier.clone();
        threads.push(std::thread::spawn(move || {
            let (mut admitted, mut refused) = (0u64, 0u64);
            for round in 0..ROUNDS {
                let fence = Fence(first + 2 * round);
                barrier.wait();
                for _ in 0..WRITES {
                    match conn.fenced_increment("mixer", fence, holder) {
                        Ok(_) => admitted += 1,
                        Err(FenceError::Refused {
                            reason: AdmitError::Stale { fence: f, high_water },
                            ..
                        }) => {
                            assert!(f == fence && high_water > fence);
                            refused += 1;
                        }
                        Err(e) => panic!("holder {holder} fence {fence}: {e:?}"),
                    }
                }
            }
            (admitted, refused)
        }));
    }
    let counts: Vec<(u64, u64)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let admitted: u64 = counts.iter().map(|c| c.0).sum();
    let refused: u64 = counts.iter().map(|c| c.1).sum();
    assert_eq!(admitted + refused, 2 * ROUNDS * WRITES);
    let mut db = db;
    let log = db.log();
    assert_eq!(db.counter(), admitted as i64, "lost updates: the counter is behind the admitted writes");
    assert_eq!(log.len() as u64, admitted);
    assert!(log.windows(2).all(|w| w[0] <= w[1]), "a lower fence was admitted after a higher one: {log:?}");
    // The last round's higher fence always gets through, so the final mark is B's.
    assert_eq!(db.mark("mixer"), Some(((2 * ROUNDS) as i64, B.0 as i64)));
    eprintln!("{admitted} writes admitted, {refused} refused as stale");
}

/// Input no grant produces: no fence, a fence beyond the column, a corrupt stored mark, no
/// transaction. Each is its own typed error and writes nothing.
pub(crate) fn bad_input_is_a_typed_error_and_writes_nothing<D: Db>(mut db: D) {
    let none = db.fenced_increment("pump", Fence::NONE, A).unwrap_err();
    assert_eq!(none.refusal(), Some(AdmitError::NoFence));
    let none = db.write_then_admit("pump", Fence::NONE, A, 5).unwrap_err();
    assert_eq!(none.refusal(), Some(AdmitError::NoFence));

    let huge = db.fenced_increment("pump", Fence(u64::MAX), A).unwrap_err();
    assert!(matches!(huge, FenceError::FenceOutOfRange { fence: Fence(u64::MAX), .. }), "{huge:?}");
    assert_eq!((db.counter(), db.mark("pump")), (0, None));

    if let Some(e) = db.admit_outside_transaction("pump", Fence(1)) {
        assert!(matches!(e, FenceError::NoTransaction { .. }), "{e:?}");
        assert_eq!(db.mark("pump"), None);
    }

    for bad in [0, -3] {
        db.store_raw_mark("broken", bad, 0);
        let corrupt = db.fenced_increment("broken", Fence(9), A).unwrap_err();
        assert!(
            matches!(corrupt, FenceError::CorruptMark { stored_fence, .. } if stored_fence == bad),
            "{corrupt:?}"
        );
    }
    assert_eq!(db.counter(), 0);
    assert!(db.log().is_empty());
}
