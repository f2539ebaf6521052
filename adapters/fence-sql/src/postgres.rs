//! PostgreSQL, through the synchronous `postgres` client.
//!
//! [`admit`] locks the resource's mark row with `SELECT … FOR UPDATE` before it reads it, so
//! concurrent fenced writes to one resource queue behind each other until the holder of the
//! lock commits or rolls back, and each reads the mark its predecessor stored. A resource's
//! first write has no row to lock: it inserts one with `ON CONFLICT DO NOTHING`, and if a
//! concurrent transaction inserted first (and committed), it locks and reads that row
//! instead.
//!
//! Under the default `READ COMMITTED` isolation that never fails. Under `REPEATABLE READ` or
//! `SERIALIZABLE`, PostgreSQL refuses to lock a row changed since the transaction's snapshot
//! (SQLSTATE 40001); [`FenceError::is_transient`] says to run the transaction again.
//!
//! Statements go out with their parameter types (`query_typed`), one round trip each with
//! nothing to prepare: two for a write under a fence already stored (lock and read; the mark
//! is unchanged), three under a new one.

use leasehold_core::resource::HighWater;
use leasehold_core::wire::{Fence, OwnerId};
use postgres::error::SqlState;
use postgres::types::Type;
use postgres::{Client, GenericClient, Transaction};

use crate::{row, FenceError};

/// The errors of this backend.
pub type Error = FenceError<postgres::Error>;

/// Creates [`TABLE`](crate::TABLE) if it does not exist ([`CREATE_TABLE`](crate::CREATE_TABLE)).
pub fn create_table(client: &mut impl GenericClient) -> Result<(), postgres::Error> {
    client.batch_execute(crate::CREATE_TABLE)
}

/// The fence check inside the caller's transaction: locks and reads `resource`'s mark, asks
/// [`HighWater::admit`], and stores the new mark, all in `tx`. `Ok` gives the mark now stored:
/// commit `tx` with the write. `Err`: drop `tx`, which rolls back whatever the caller wrote in
/// it.
///
/// Call it first in the transaction: the row lock then orders every fenced writer of the
/// resource before any of them touches other rows, so they cannot deadlock on those.
pub fn admit(
    tx: &mut Transaction<'_>,
    resource: &str,
    fence: Fence,
    holder: OwnerId,
) -> Result<HighWater, Error> {
    let fence_column = row::fence_column(resource, fence)?;
    let holder_column = row::holder_column(holder);
    // Twice at most: the second time, the row a concurrent first write inserted is there.
    for _ in 0..2 {
        let stored = tx
            .query_typed_opt(
                "SELECT fence, holder FROM leasehold_fences WHERE resource = $1 FOR UPDATE",
                &[(&resource, Type::TEXT)],
            )
            .map_err(row::database(resource))?
            .map(|r| row::mark(resource, r.get(0), r.get(1)))
            .transpose()?;
        let mark = row::admit(resource, stored, fence, holder)?;
        let params: [(&(dyn postgres::types::ToSql + Sync), Type); 3] =
            [(&resource, Type::TEXT), (&fence_column, Type::INT8), (&holder_column, Type::INT8)];
        match stored {
            // The same grant writing again: the mark stays, and an UPDATE would only write
            // a new row version.
            Some(old) if old == mark => return Ok(mark),
            Some(_) => {
                tx.execute_typed(
                    "UPDATE leasehold_fences SET fence = $2, holder = $3 WHERE resource = $1",
                    &params,
                )
                .map_err(row::database(resource))?;
                return Ok(mark);
            }
            None => {
                let inserted = tx
                    .execute_typed(
                        "INSERT INTO leasehold_fences (resource, fence, holder) VALUES ($1, $2, $3) \
                         ON CONFLICT (resource) DO NOTHING",
                        &params,
                    )
                    .map_err(row::database(resource))?;
                if inserted == 1 {
                    return Ok(mark);
                }
            }
        }
    }
    // Inserted by someone else, then deleted before this transaction could lock it.
    Err(FenceError::MarkDeleted { resource: resource.to_owned() })
}

/// `write` as a fenced write: in one transaction, [`admit`] and then `write`, committed only
/// if both succeed. A refused fence rolls back and `write` is never called.
pub fn fenced_write<T>(
    client: &mut Client,
    resource: &str,
    fence: Fence,
    holder: OwnerId,
    write: impl FnOnce(&mut Transaction<'_>) -> Result<T, postgres::Error>,
) -> Result<T, Error> {
    let mut tx = client.transaction().map_err(row::database(resource))?;
    admit(&mut tx, resource, fence, holder)?;
    let out = write(&mut tx).map_err(row::database(resource))?;
    tx.commit().map_err(row::database(resource))?;
    Ok(out)
}

impl FenceError<postgres::Error> {
    /// Whether running the transaction again may succeed: a serialisation failure or a
    /// deadlock PostgreSQL broke, or a lost connection. Refusals never are.
    pub fn is_transient(&self) -> bool {
        match self {
            FenceError::Database { source, .. } => {
                source.is_closed()
                    || matches!(
                        source.code(),
                        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
                    )
            }
            _ => false,
        }
    }
}
