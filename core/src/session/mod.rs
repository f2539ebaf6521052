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
//!
//! Following a key's holder, as a transport drives the authority (a holder's [`Session`] does
//! the follower's part itself: [`Session::observe`], [`SessionEvent::Observed`]):
//!
//! ```
//! use leasehold_core::session::wire::*;
//! use leasehold_core::session::{SessionAuthority, SessionLimits};
//! use leasehold_core::{parse_key, Duration, Fence, Instant};
//!
//! type Authority = SessionAuthority<4, 4, 2>;
//! let mut authority = Authority::new(SessionLimits::default());
//! let now = Instant::from_millis(0);
//! let mut open = |name: &str, b: u8| {
//!     let secret = Secret::from_bytes([b; 16]);
//!     match authority.open(now, Duration::from_secs(10), &parse_label(name).unwrap(), secret) {
//!         SessionReply::Opened { session, .. } => move |seq: u64, op| SessionRequest { session, secret, seq: Seq(seq), op },
//!         other => panic!("{other:?}"),
//!     }
//! };
//! let (leader, follower) = (open("leader", 1), open("follower", 2));
//! let key = parse_key("leader").unwrap();
//! let value = parse_value("10.0.0.7:8080").unwrap();
//! authority.handle(now, &leader(2, SessionOp::AcquireWithValue { key: key.clone(), wait: true, value }));
//! authority.handle(now, &follower(2, SessionOp::Observe { key: key.clone() }));
//! // The follower's next keepalive carries the holder...
//! let SessionReply::AliveObserved { observed, .. } = authority.handle(now, &follower(3, SessionOp::KeepAlive))
//! else {
//!     panic!("no report")
//! };
//! let holder = observed.holder.unwrap();
//! assert_eq!((holder.label.as_str(), holder.fence, holder.value.as_str()), ("leader", Fence(1), "10.0.0.7:8080"));
//! // ...and, until the follower acknowledges it, every one after.
//! let ack = SessionOp::KeepAliveSeen { key: key.clone(), change: observed.change };
//! assert!(matches!(authority.handle(now, &follower(4, ack)), SessionReply::Alive { .. }));
//! // The leader goes: the change (free) is the follower's news.
//! authority.handle(now, &leader(3, SessionOp::Close));
//! assert_eq!(authority.observers_behind().count(), 1);
//! ```

pub mod authority;
pub mod holder;
mod observe;
pub mod wire;

pub use authority::{SessionAuthority, SessionLimits};
pub use holder::{Session, SessionEvent, SessionState};
