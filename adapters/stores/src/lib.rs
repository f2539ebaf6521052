#![doc = include_str!("../README.md")]

mod dynamodb;
mod etcd;
mod listing;

pub use aws_credential_types::Credentials;
pub use dynamodb::DynamoDbBackend;
pub use etcd::EtcdBackend;
pub use listing::{Filter, Holder, KeyStatus, ListError};
