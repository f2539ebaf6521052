#![doc = include_str!("../README.md")]

mod backend;
mod builtin;
mod client;
mod error;
mod http;
mod session;
#[cfg(feature = "tls")]
mod tls;
mod turns;

pub use backend::Backend;
pub use builtin::BuiltinBackend;
pub use client::{now, AcquireError, Client, Lease, Options, ReleaseError, Unreachable, Waiting};
pub use error::{Cause, Report, TransportError};
pub use http::{HttpClient, HttpResponse, Resolver, DEFAULT_MAX_CONNECTIONS};
pub use session::{
    Observation, Observations, ObserveError, SessionClient, SessionSetupError, MAX_OBSERVED_KEYS,
    MAX_SESSION_KEYS,
};
// What the API's signatures and errors name, so matching an error or tuning a config needs
// no direct dependency on leasehold-core.
pub use leasehold_core::{
    Config, ConfigError, Drift, Fence, Health, Key, KeyError, LostReason, NotAcquired, OwnerId, Reject,
};
#[cfg(feature = "tls")]
pub use tls::TlsConfig;
