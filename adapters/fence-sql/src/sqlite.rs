//! SQLite, through `rusqlite`.
//!
//! SQLite runs one write transaction at a time, so the mark needs no row lock: a transaction
//! that began with `BEGIN IMMEDIATE` holds the database's write lock from its first statement,
//! and nobody else can change the mark between [`admit`]'s read and the commit.
//! [`fenced_write`] opens its transaction that way. A caller's own transaction opened with
//! plain `BEGIN` (deferred) is still safe, since SQLite transactions are serialisable, but it
//! may fail with `SQLITE_BUSY` where an immediate one would have waited
//! ([`FenceError::is_transient`] says so).

use leasehold_core::resource::HighWater;
use leasehold_core::wire::{Fence, OwnerId};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::{row, FenceError};

/// The errors of this backend.
pub type Error = FenceError<rusqlite::Error>;

/// Creates [`TABLE`](crate::TABLE) if it does not exist ([`CREATE_TABLE`](crate::CREATE_TABLE)).
pub fn create_table(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(crate::CREATE_TABLE)
}

/// The fence check inside the caller's open transaction on `conn` (a [`Transaction`] or
/// [`Savepoint`](rusqlite::Savepoint) derefs to one): reads `resource`'s mark, asks
/// [`HighWater::admit`], and stores the new mark, all in that transaction. `Ok` gives the mark
/// now stored: commit the transaction with the write. `Err`: drop the transaction, which rolls
/// back whatever the caller wrote in it.
///
/// Call it before the write, so that a refused write is never attempted; called after it, the
/// rollback undoes the write just as well.
pub fn admit(conn: &Connection, resource: &str, fence: Fence, holder: OwnerId) -> Result<HighWater, Error> {
    if conn.is_autocommit() {
        return Err(FenceError::NoTransaction { resource: resource.to_owned() });
    }
    let fence_column = row::fence_column(resource, fence)?;
    let db = row::database(resource);
    let stored = conn
        .prepare_cached("SELECT fence, holder FROM leasehold_fences WHERE resource = ?1")
        .and_then(|mut s| {
            s.query_row([resource], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))).optional()
        })
        .map_err(db)?
        .map(|(f, h)| row::mark(resource, f, h))
        .transpose()?;
    let mark = row::admit(resource, stored, fence, holder)?;
    let sql = match stored {
        // The same grant writing again: the mark stays as it is, and storing it would only
        // cost a page write.
        Some(old) if old == mark => return Ok(mark),
        Some(_) => "UPDATE leasehold_fences SET fence = ?2, holder = ?3 WHERE resource = ?1",
        None => "INSERT INTO leasehold_fences (resource, fence, holder) VALUES (?1, ?2, ?3)",
    };
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute(rusqlite::params![resource, fence_column, row::holder_column(holder)]))
        .map_err(row::database(resource))?;
    Ok(mark)
}

/// `write` as a fenced write: in one `BEGIN IMMEDIATE` transaction, [`admit`] and then
/// `write`, committed only if both succeed. A refused fence rolls back and `write` is never
/// called.
pub fn fenced_write<T>(
    conn: &mut Connection,
    resource: &str,
    fence: Fence,
    holder: OwnerId,
    write: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
) -> Result<T, Error> {
    let tx =
        conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(row::database(resource))?;
    admit(&tx, resource, fence, holder)?;
    let out = write(&tx).map_err(row::database(resource))?;
    tx.commit().map_err(row::database(resource))?;
    Ok(out)
}

impl FenceError<rusqlite::Error> {
    /// Whether running the transaction again may succeed: the database was busy or locked
    /// (another connection's write transaction, beyond the busy timeout). Refusals never are.
    pub fn is_transient(&self) -> bool {
        match self {
            FenceError::Database { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            _ => false,
        }
    }
}
