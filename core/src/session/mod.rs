//! Protocol v2: sessions. One keepalive renews every key a session holds, waiters queue FIFO
//! and are pushed their grants, and every request is authenticated and replay-proof.
//!
//! - [`wire`]: the requests and replies of a session.
//! - [`authority`]: the authority's rules, in a bounded in-memory [`SessionAuthority`].
//! - [`holder`]: the holder's side, a sans-IO [`Session`] for many keys.
//! - observers: a session may follow a key's holder ([`wire::SessionOp::Observe`]); each
//!   change comes in its keepalive replies, in order, acknowledged like pushed grants.
//!
//! The per-key [`Lease`](crate::Lease) and its protocol are unchanged.

pub mod authority;
pub mod holder;
mod observe;
pub mod wire;

pub use authority::{SessionAuthority, SessionLimits};
pub use holder::{Session, SessionEvent, SessionState};
