#![no_std]
#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

#[cfg(feature = "std")]
extern crate std;

pub mod authority;
mod config;
mod lease;
pub mod namespace;
pub mod resource;
pub mod session;
mod time;
pub mod wire;

#[cfg(feature = "fault-injection")]
pub use config::Fault;
pub use config::{Config, ConfigError, Drift, MAX_DRIFT, MAX_TTL};
pub use lease::{AcquireError, Event, Health, Lease, LostReason, NotAcquired, ReleaseError, State};
pub use time::{Duration, Instant};
pub use wire::{parse_key, Fence, Key, KeyError, Op, OwnerId, Reject, Reply, Request, RequestId, Response};
