#![doc = include_str!("../README.md")]

mod dynamodb;
mod etcd;

pub use aws_credential_types::Credentials;
pub use dynamodb::DynamoDbBackend;
pub use etcd::EtcdBackend;
