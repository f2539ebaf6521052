//! The seam between the drivers and an authority: what a store's adapter implements.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use leasehold_core::session::wire::{SessionRequest, SessionResponse};
use leasehold_core::{Key, Reply, Request};

use crate::error::TransportError;

/// Carries one core request for one key to an authority and brings back its reply
/// (protocol v1: one lease per key, each renewed on its own).
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

/// Carries one request of a session to an authority and brings back its response
/// (protocol v2: sessions, FIFO waiters, pushed grants).
///
/// Like [`Backend`], an implementation translates and decides nothing: the core's
/// [`Session`](leasehold_core::session::Session) machine makes every request and judges every
/// response, and the authority (the built-in server's
/// [`SessionAuthority`](leasehold_core::session::SessionAuthority), or a store's own
/// primitives) keeps the rules.
pub trait SessionBackend: Send + Sync + 'static {
    /// Sends `request`. For a [`KeepAlive`](leasehold_core::session::wire::SessionOp::KeepAlive)
    /// (or a [`KeepAliveSeen`](leasehold_core::session::wire::SessionOp::KeepAliveSeen))
    /// the authority may hold the answer up to `hold` while it has nothing to push (a grant of
    /// a waited key, a change of an observed key), and answers at once when it has: that is how a hand-off reaches a waiter
    /// without polling. The driver makes `hold` shorter than its request timeout.
    ///
    /// An `Err` means the request may or may not have reached the authority: the machine
    /// retries with a new seq, unless the error [is permanent](TransportError::is_permanent).
    fn call(
        &self,
        request: SessionRequest,
        hold: Duration,
    ) -> impl Future<Output = Result<SessionResponse, TransportError>> + Send;
}

/// A future the driver can keep beside others of any backend.
pub(crate) type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// [`SessionBackend`] behind a pointer, so one driver type serves every backend.
pub(crate) trait ErasedSessionBackend: Send + Sync + 'static {
    fn call(
        &self,
        request: SessionRequest,
        hold: Duration,
    ) -> Boxed<'_, Result<SessionResponse, TransportError>>;
}

impl<B: SessionBackend> ErasedSessionBackend for B {
    fn call(
        &self,
        request: SessionRequest,
        hold: Duration,
    ) -> Boxed<'_, Result<SessionResponse, TransportError>> {
        Box::pin(SessionBackend::call(self, request, hold))
    }
}
