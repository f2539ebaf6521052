//! Cross-crate tests for leasehold, and the deterministic simulator they share.
//!
//! [`sim`] runs several [`leasehold_core::Lease`] clients against one authority over a
//! seeded, faulty network, with clocks whose rates drift within ε, and checks the safety
//! invariants on true (simulated) time after every step. A seed replays exactly.

pub mod explore;
pub mod load;
mod netem;
pub mod session_sim;
pub mod sim;
