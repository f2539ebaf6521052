#![doc = include_str!("../README.md")]

mod backend;
mod client;
mod clock;
mod error;
mod session;
mod turns;

pub use backend::{Backend, SessionBackend};
pub use client::{AcquireError, Client, Lease, Options, ReleaseError, Unreachable, Waiting};
pub use clock::{now, Clock, ManualClock, SystemClock};
pub use error::{Cause, Report, TransportError};
pub use session::{
    Observation, Observations, ObserveError, SessionClient, SessionSetupError, MAX_IN_FLIGHT,
    MAX_OBSERVED_KEYS, MAX_SESSION_KEYS,
};
// What the API's signatures and errors name, so matching an error or tuning a config needs
// no direct dependency on leasehold-core.
pub use leasehold_core::{
    Config, ConfigError, Drift, Fence, Health, Key, KeyError, LostReason, NotAcquired, OwnerId, Reject,
};
