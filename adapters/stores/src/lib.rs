#![doc = include_str!("../README.md")]

mod dynamodb;
mod dynamodb_sessions;
mod etcd;
mod etcd_sessions;
mod listing;
mod session_exchange;

pub use aws_credential_types::Credentials;
pub use dynamodb::DynamoDbBackend;
#[cfg(feature = "fault-injection")]
pub use dynamodb_sessions::DynamoFault;
pub use dynamodb_sessions::DynamoSessions;
pub use etcd::EtcdBackend;
#[cfg(feature = "fault-injection")]
pub use etcd_sessions::EtcdFault;
pub use etcd_sessions::{EtcdSessions, QueueStatus, SlotHolder, V1Holder, MAX_OBSERVED, MAX_WATCHES};
pub use listing::{Filter, Holder, KeyStatus, ListError};
