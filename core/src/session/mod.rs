//! Protocol v2: sessions. One keepalive renews every key a session holds, waiters queue FIFO
//! and are pushed their grants, and every request is authenticated and replay-proof.
//!
//! - [`wire`]: the requests and replies of a session.
//! - [`authority`]: the authority's rules, in a bounded in-memory [`SessionAuthority`].
//! - [`holder`]: the holder's side, a sans-IO [`Session`] for many keys.
//!
//! The per-key [`Lease`](crate::Lease) and its protocol are unchanged.

pub mod authority;
pub mod holder;
pub mod wire;

pub use authority::{SessionAuthority, SessionLimits};
pub use holder::{Session, SessionEvent, SessionState};
