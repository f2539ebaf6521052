#![no_std]
#![doc = include_str!("../README.md")]

#[cfg(feature = "std")]
extern crate std;

mod decode;
mod device;
mod device_async;
mod fmt;
mod frame;
#[cfg(feature = "std")]
pub mod host;

pub use decode::{DecodeError, DecodeStats, FrameDecoder};
pub use device::{Clock, DeviceLink};
pub use device_async::AsyncDeviceLink;
pub use frame::{Body, EncodeError, Frame, Header, MAX_FRAME, VERSION};
