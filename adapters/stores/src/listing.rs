//! What a store holds, as `leasehold status` shows it: every lease key under a prefix, or one.

use std::time::Duration;

use leasehold_core::{Fence, OwnerId};
use leasehold_http::TransportError;

/// One lease key as a store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    /// The lease key, without any prefix the store keeps it under.
    pub key: String,
    /// Who holds it now; `None` while it is free.
    pub holder: Option<Holder>,
    /// The newest fence granted on the key (the holder's, while it is held).
    pub last_fence: Fence,
}

/// The holder of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Who holds it.
    pub owner: OwnerId,
    /// The fence of its grant.
    pub fence: Fence,
    /// The ttl the grant runs for, where the store keeps it.
    pub ttl: Option<Duration>,
    /// How long the store keeps the grant without a renewal; `None` where nobody can tell
    /// (DynamoDB keeps no clock: a contender measures the ttl on its own).
    pub remaining: Option<Duration>,
    /// The holder's public label, where the store keeps one (a protocol v2 session on
    /// DynamoDB); `None` for v1 holders.
    pub label: Option<String>,
}

/// Which keys a listing returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only keys that start with this (all keys when empty).
    pub prefix: String,
    /// Only keys held now.
    pub held_only: bool,
}

impl Filter {
    /// Whether `k` passes.
    pub fn admits(&self, k: &KeyStatus) -> bool {
        k.key.starts_with(&self.prefix) && (!self.held_only || k.holder.is_some())
    }
}

/// How many records a listing asks the store for per request, unless told otherwise.
pub(crate) const DEFAULT_PAGE: u32 = 1000;

/// Why a listing or a key's status could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListError {
    /// No answer from the store: it cannot be reached, did not answer in time, TLS failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The store answered with an error (wrong credentials, missing table, not the store's API).
    #[error("{operation} refused: HTTP {status}: {message}")]
    Refused {
        /// What was asked, e.g. `etcd /v3/kv/range` or `DynamoDB Scan`.
        operation: String,
        /// The HTTP status of the answer.
        status: u16,
        /// What the store said.
        message: String,
    },
    /// The answer could not be read.
    #[error("{operation}: unreadable answer: {detail}")]
    Malformed {
        /// What was asked.
        operation: String,
        /// What was wrong with it.
        detail: String,
    },
}
