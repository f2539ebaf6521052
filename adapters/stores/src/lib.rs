#![doc = include_str!("../README.md")]

mod etcd;

pub use etcd::EtcdBackend;
