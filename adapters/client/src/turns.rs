//! This process's turn at each key: the local guard that acquisitions of one key through one
//! client (and its clones) queue on, so a process does not contend with itself at the
//! authority. Shared by the per-key [`Client`](crate::Client) and the
//! [`SessionClient`](crate::SessionClient).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_lock::{Mutex as AsyncMutex, MutexGuardArc};
use futures_lite::future;
use leasehold_core::Key;

use crate::backend::Boxed;
use crate::client::AcquireError;

/// One async mutex per key someone in this process holds or waits for.
#[derive(Default)]
pub(crate) struct LocalTurns(Mutex<HashMap<Key, Arc<AsyncMutex<()>>>>);

impl LocalTurns {
    fn of(&self, key: &Key) -> Arc<AsyncMutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Forget keys nobody holds or waits for (guards and waiters own a clone), so a client
        // that touches many keys over its life does not keep a lock for each.
        map.retain(|k, m| k == key || Arc::strong_count(m) > 1);
        map.entry(key.clone()).or_default().clone()
    }

    /// The turn at `key` now, or `Busy` if this process already holds or waits for it.
    pub(crate) fn try_take(&self, key: &Key) -> Result<MutexGuardArc<()>, AcquireError> {
        self.of(key).try_lock_arc().ok_or(AcquireError::Busy)
    }

    /// The turn at `key` once earlier local acquisitions are done; `Busy` if `deadline` (a
    /// [`Clock`](crate::Clock)'s sleep) comes first.
    pub(crate) async fn take(
        &self,
        key: &Key,
        deadline: Option<Boxed<'static, ()>>,
    ) -> Result<MutexGuardArc<()>, AcquireError> {
        let turn = self.of(key);
        let Some(deadline) = deadline else {
            return Ok(turn.lock_arc().await);
        };
        future::or(async { Some(turn.lock_arc().await) }, async {
            deadline.await;
            None
        })
        .await
        .ok_or(AcquireError::Busy)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// A key the core accepts, or the typed reason it does not.
pub(crate) fn parse(key: &str) -> Result<Key, AcquireError> {
    leasehold_core::parse_key(key).map_err(AcquireError::InvalidKey)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_of_unused_keys_are_forgotten() {
        let turns = LocalTurns::default();
        let key = |i: u32| parse(&format!("k{i}")).unwrap();
        let held = turns.try_take(&key(0)).unwrap();
        for i in 1..100 {
            drop(turns.try_take(&key(i)).unwrap());
        }
        assert_eq!(turns.try_take(&key(0)).unwrap_err(), AcquireError::Busy, "a held key keeps its turn");
        assert_eq!(turns.len(), 1, "only the held key's turn is left");
        drop(held);
        assert!(turns.try_take(&key(0)).is_ok());
    }
}
