#![no_std]
#![doc = include_str!("../README.md")]

#[cfg(feature = "std")]
extern crate std;

#[macro_use]
mod fmt;

mod decode;
mod device;
mod device_async;
mod frame;
#[cfg(feature = "std")]
pub mod host;
mod outbox;
#[cfg(feature = "sessions")]
mod session;
mod watch;

pub use decode::{DecodeError, DecodeStats, FrameDecoder};
pub use device::{Clock, DeviceLink, LinkStats};
pub use device_async::AsyncDeviceLink;
#[cfg(feature = "sessions")]
pub use frame::SessionRefusal;
pub use frame::{Body, EncodeError, Frame, Header, MAX_FRAME, VERSION};
#[cfg(feature = "sessions")]
pub use session::{AsyncSessionLink, SessionLink, SessionLinkStats};
pub use watch::LeaseWatch;
#[cfg(feature = "sessions")]
pub use watch::{Renewal, SessionWatch};
