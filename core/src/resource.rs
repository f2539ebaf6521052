//! The resource's side: refusing writes from holders that have lost their lease.
//!
//! A holder can stop believing in its lease on time and still have a write in flight, or be
//! paused (GC, SIGSTOP, a slow disk) between checking [`Lease::remaining`](crate::Lease::remaining)
//! and writing. Only the resource can refuse such a write, and only by its fence: every grant
//! of a key carries a fence higher than every earlier grant, so a resource that remembers the
//! highest fence it has admitted and refuses lower ones is safe from every earlier holder.
//!
//! [`HighWater`] is that memory as a value, not a store: the caller reads the stored mark,
//! asks [`HighWater::admit`], and stores the mark it returns *in the same atomic step as the
//! write* (one RAM variable on a device, one row inside a database transaction). Without that
//! atomicity two writes could both be checked against the old mark.
//!
//! # Equal fences
//!
//! A write whose fence equals the mark is admitted if it comes from the same holder: a holder
//! writes many times under one grant, and renewals keep the fence. Fences are unique per
//! grant, so a *different* holder with an equal fence cannot exist while the authority keeps
//! its promise. If it does appear (an authority restored from a stale backup, a store that
//! resets its counter on release), the second holder is refused with
//! [`AdmitError::Reused`] rather than interleaved with the first: the broken premise surfaces
//! as a refusal instead of as corrupt data. That is why the mark records the holder too.

use core::fmt;

use crate::wire::{Fence, OwnerId};

/// The highest fence a resource has admitted, and whose write it was. Persist it whole; a
/// resource never written has [`HighWater::NONE`] (also its `Default`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct HighWater {
    /// The highest fence admitted ([`Fence::NONE`]: none yet).
    pub fence: Fence,
    /// The holder whose write set it.
    pub holder: OwnerId,
}

/// Why a resource refused a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum AdmitError {
    /// The write carries [`Fence::NONE`]: it was made without a grant.
    NoFence,
    /// A later grant has written: this holder's lease has ended, whatever it believes.
    Stale {
        /// The fence the write carried.
        fence: Fence,
        /// The highest fence admitted so far.
        high_water: Fence,
    },
    /// Another holder has already written under this same fence. Fences are unique per grant,
    /// so the authority (or whatever handed out this fence) broke its promise.
    Reused {
        /// The fence both holders presented.
        fence: Fence,
    },
}

impl fmt::Display for AdmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdmitError::NoFence => f.write_str("write refused: it carries no fence"),
            AdmitError::Stale { fence, high_water } => write!(
                f,
                "write refused: fence {fence} is stale, the resource has admitted fence {high_water}"
            ),
            AdmitError::Reused { fence } => {
                write!(f, "write refused: fence {fence} was already used by another holder")
            }
        }
    }
}

impl core::error::Error for AdmitError {}

impl HighWater {
    /// Nothing admitted yet.
    pub const NONE: HighWater = HighWater { fence: Fence::NONE, holder: OwnerId(0) };

    /// Whether a write by `holder` under `fence` may go ahead against this stored mark; if so,
    /// the mark to store with the write (unchanged for a repeat write of the same grant).
    pub const fn admit(self, fence: Fence, holder: OwnerId) -> Result<HighWater, AdmitError> {
        if fence.0 == Fence::NONE.0 {
            return Err(AdmitError::NoFence);
        }
        if fence.0 < self.fence.0 {
            return Err(AdmitError::Stale { fence, high_water: self.fence });
        }
        if fence.0 == self.fence.0 && holder.0 != self.holder.0 {
            return Err(AdmitError::Reused { fence });
        }
        Ok(HighWater { fence, holder })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: OwnerId = OwnerId(1);
    const B: OwnerId = OwnerId(2);
    const C: OwnerId = OwnerId(3);

    #[test]
    fn a_paused_holder_is_refused_once_its_successor_has_written() {
        let mut mark = HighWater::NONE;
        // A holds fence 1 and writes twice (the same grant may write again).
        mark = mark.admit(Fence(1), A).unwrap();
        mark = mark.admit(Fence(1), A).unwrap();
        assert_eq!(mark, HighWater { fence: Fence(1), holder: A });
        // A pauses; its lease expires; B is granted fence 2 and writes.
        mark = mark.admit(Fence(2), B).unwrap();
        // A wakes up and writes under its old fence: refused, and the mark is untouched.
        assert_eq!(mark.admit(Fence(1), A), Err(AdmitError::Stale { fence: Fence(1), high_water: Fence(2) }));
        assert_eq!(mark, HighWater { fence: Fence(2), holder: B });
        // B keeps writing.
        assert_eq!(mark.admit(Fence(2), B), Ok(mark));
    }

    #[test]
    fn a_fence_may_skip_grants_that_never_wrote() {
        let mark = HighWater::NONE.admit(Fence(3), A).unwrap();
        // Grants 4..=8 never reached this resource; 9 is admitted, then 5 is stale.
        let mark = mark.admit(Fence(9), C).unwrap();
        assert_eq!(mark.admit(Fence(5), B), Err(AdmitError::Stale { fence: Fence(5), high_water: Fence(9) }));
    }

    #[test]
    fn an_equal_fence_from_another_holder_is_refused() {
        let mark = HighWater::NONE.admit(Fence(4), A).unwrap();
        assert_eq!(mark.admit(Fence(4), B), Err(AdmitError::Reused { fence: Fence(4) }));
        // The first holder of the fence is unaffected.
        assert_eq!(mark.admit(Fence(4), A), Ok(mark));
    }

    #[test]
    fn a_write_without_a_grant_is_refused() {
        assert_eq!(HighWater::NONE.admit(Fence::NONE, A), Err(AdmitError::NoFence));
        assert_eq!(HighWater::default(), HighWater::NONE);
    }

    #[test]
    fn refusals_say_why() {
        use core::fmt::Write;
        let mut s = heapless::String::<96>::new();
        write!(s, "{}", AdmitError::Stale { fence: Fence(1), high_water: Fence(2) }).unwrap();
        assert_eq!(s.as_str(), "write refused: fence 1 is stale, the resource has admitted fence 2");
    }
}
