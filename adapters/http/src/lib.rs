#![doc = include_str!("../README.md")]

mod builtin;
mod http;
mod sessions;
#[cfg(feature = "tls")]
mod tls;

pub use builtin::BuiltinBackend;
pub use http::{HttpClient, HttpResponse, HttpStream, Resolver, DEFAULT_MAX_CONNECTIONS};
pub use sessions::BuiltinSessions;
#[cfg(feature = "tls")]
pub use tls::TlsConfig;
// The drivers and the seam, so a user of the built-in server needs one dependency.
pub use leasehold_client::*;
