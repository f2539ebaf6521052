#![doc = include_str!("../README.md")]

mod backend;
mod client;

pub use backend::{Backend, BuiltinBackend, HttpClient, HttpResponse, TransportError};
pub use client::{now, AcquireError, Client, Lease, Options};
pub use leasehold_core::{Fence, Health, LostReason};
