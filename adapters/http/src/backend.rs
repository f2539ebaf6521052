//! The seam between the lease driver and an authority.

use std::future::Future;

use leasehold_core::{Key, Reply, Request};

use crate::error::TransportError;

/// Carries one core request for one key to an authority and brings back its reply.
///
/// Implementations translate between the core's [`Request`]/[`Reply`] and a store's API; they
/// hold no lease logic (no validity, no retry policy: the core decides both).
pub trait Backend: Send + Sync + 'static {
    /// Sends `request` for `key`. An `Err` means the request may or may not have reached the
    /// authority; the core treats it as a failed attempt and retries with backoff, unless the
    /// error [is permanent](TransportError::is_permanent).
    fn call(&self, key: &Key, request: Request)
        -> impl Future<Output = Result<Reply, TransportError>> + Send;
}
