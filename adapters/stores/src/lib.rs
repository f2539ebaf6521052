#![doc = include_str!("../README.md")]

mod dynamodb;
mod etcd;
mod etcd_sessions;
mod listing;

pub use aws_credential_types::Credentials;
pub use dynamodb::DynamoDbBackend;
pub use etcd::EtcdBackend;
#[cfg(feature = "fault-injection")]
pub use etcd_sessions::EtcdFault;
pub use etcd_sessions::{EtcdSessions, QueueStatus, SlotHolder, MAX_OBSERVED, MAX_WATCHES};
pub use listing::{Filter, Holder, KeyStatus, ListError};
