#![doc = include_str!("../README.md")]

mod backend;
mod client;
#[cfg(feature = "tls")]
mod tls;

pub use backend::{Backend, BuiltinBackend, HttpClient, HttpResponse, TransportError};
pub use client::{now, AcquireError, Client, Lease, Options};
pub use leasehold_core::{Fence, Health, LostReason};
#[cfg(feature = "tls")]
pub use tls::TlsConfig;
