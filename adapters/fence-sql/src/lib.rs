#![doc = include_str!("../README.md")]

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use leasehold_core::resource::{AdmitError, HighWater};
use leasehold_core::wire::{Fence, OwnerId};

/// The table that holds one high-water mark per resource; [`CREATE_TABLE`] makes it.
///
/// `fence` is the fence as a number (at most `i64::MAX`, the column's range); `holder` is the
/// owner id's 64 bits read as a signed integer, so ids above `i64::MAX` show as negative
/// numbers: only equality matters for a holder.
pub const TABLE: &str = "leasehold_fences";

/// The statement that creates [`TABLE`] if it does not exist, the same for both backends
/// (`sqlite::create_table`, `postgres::create_table` run it).
pub const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS leasehold_fences (
    resource TEXT PRIMARY KEY,
    fence    BIGINT NOT NULL CHECK (fence > 0),
    holder   BIGINT NOT NULL
)";

/// Why a fenced write did not happen. In every case the transaction must not commit: the
/// helpers that own their transaction roll it back, and a caller that owns it drops it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FenceError<D> {
    /// The fence check refused the write (the source says why: a stale fence, no fence, a
    /// fence reused by another holder). Retrying with the same fence cannot help.
    #[error("resource {resource:?} refused the write")]
    Refused {
        /// The resource named in the write.
        resource: String,
        /// The check's verdict.
        #[source]
        reason: AdmitError,
    },
    /// The fence is above `i64::MAX`, more than the database's integer column can hold. No
    /// authority of this project counts that far; a fence that large is corrupt input.
    #[error("resource {resource:?}: fence {fence} does not fit the database's 64-bit signed integer")]
    FenceOutOfRange {
        /// The resource named in the write.
        resource: String,
        /// The fence the write carried.
        fence: Fence,
    },
    /// The stored mark is not one this crate writes (a fence of zero or below): someone else
    /// wrote the row. Nothing is admitted until it is repaired.
    #[error("resource {resource:?}: the stored mark has fence {stored_fence}, which no grant carries")]
    CorruptMark {
        /// The resource whose row is corrupt.
        resource: String,
        /// The fence column's value.
        stored_fence: i64,
    },
    /// The resource's mark row was deleted while this write was being checked: something
    /// other than this crate deletes rows of the fence table, which would also forget marks.
    #[error("resource {resource:?}: its mark row was deleted during the check")]
    MarkDeleted {
        /// The resource named in the write.
        resource: String,
    },
    /// The helper was handed a connection outside any transaction, where the check and the
    /// write could not be atomic.
    #[error("resource {resource:?}: a fenced write needs a transaction, and the connection has none open")]
    NoTransaction {
        /// The resource named in the write.
        resource: String,
    },
    /// The database failed: loading or storing the mark, the caller's own write, or the
    /// commit. [`FenceError::is_transient`] tells whether retrying the transaction may help.
    #[error("resource {resource:?}: database error in a fenced write")]
    Database {
        /// The resource named in the write.
        resource: String,
        /// The driver's error.
        #[source]
        source: D,
    },
}

impl<D> FenceError<D> {
    /// The resource the write was for.
    pub fn resource(&self) -> &str {
        match self {
            FenceError::Refused { resource, .. }
            | FenceError::FenceOutOfRange { resource, .. }
            | FenceError::CorruptMark { resource, .. }
            | FenceError::NoTransaction { resource }
            | FenceError::MarkDeleted { resource }
            | FenceError::Database { resource, .. } => resource,
        }
    }

    /// The fence check's refusal, if that is what this is.
    pub fn refusal(&self) -> Option<AdmitError> {
        match self {
            FenceError::Refused { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

/// How a backend stores the mark, in the row's two integers. Shared so that both backends
/// agree on what a row means.
pub(crate) mod row {
    use super::*;

    /// The fence as the column holds it, or why it cannot.
    pub(crate) fn fence_column<D>(resource: &str, fence: Fence) -> Result<i64, FenceError<D>> {
        i64::try_from(fence.0)
            .map_err(|_| FenceError::FenceOutOfRange { resource: resource.to_owned(), fence })
    }

    /// The owner id's bits as a signed integer (ids are random 64-bit numbers; half of them
    /// are above `i64::MAX`).
    pub(crate) fn holder_column(holder: OwnerId) -> i64 {
        i64::from_ne_bytes(holder.0.to_ne_bytes())
    }

    /// The mark a stored row says, checked.
    pub(crate) fn mark<D>(resource: &str, fence: i64, holder: i64) -> Result<HighWater, FenceError<D>> {
        match u64::try_from(fence) {
            Ok(f) if f > 0 => {
                Ok(HighWater { fence: Fence(f), holder: OwnerId(u64::from_ne_bytes(holder.to_ne_bytes())) })
            }
            _ => Err(FenceError::CorruptMark { resource: resource.to_owned(), stored_fence: fence }),
        }
    }

    /// Core's decision on a write against the stored mark (`None`: no row yet), as the helper
    /// reports it.
    pub(crate) fn admit<D>(
        resource: &str,
        stored: Option<HighWater>,
        fence: Fence,
        holder: OwnerId,
    ) -> Result<HighWater, FenceError<D>> {
        stored
            .unwrap_or(HighWater::NONE)
            .admit(fence, holder)
            .map_err(|reason| FenceError::Refused { resource: resource.to_owned(), reason })
    }

    pub(crate) fn database<D>(resource: &str) -> impl FnOnce(D) -> FenceError<D> + '_ {
        move |source| FenceError::Database { resource: resource.to_owned(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_ids_above_i64_max_round_trip_through_the_holder_column() {
        for id in [0, 1, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
            let column = row::holder_column(OwnerId(id));
            let mark = row::mark::<()>("r", 1, column).unwrap();
            assert_eq!(mark.holder, OwnerId(id));
        }
    }

    #[test]
    fn a_fence_beyond_the_column_is_a_typed_error() {
        assert!(matches!(
            row::fence_column::<()>("r", Fence(i64::MAX as u64 + 1)),
            Err(FenceError::FenceOutOfRange { fence: Fence(f), .. }) if f == i64::MAX as u64 + 1
        ));
        assert_eq!(row::fence_column::<()>("r", Fence(i64::MAX as u64)).ok(), Some(i64::MAX));
    }

    #[test]
    fn a_stored_fence_no_grant_carries_is_corrupt() {
        for bad in [0, -1, i64::MIN] {
            assert!(matches!(
                row::mark::<()>("r", bad, 7),
                Err(FenceError::CorruptMark { stored_fence, .. }) if stored_fence == bad
            ));
        }
    }
}
