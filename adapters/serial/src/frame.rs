//! Frames on the wire: `0x00 COBS(postcard(Header, Body)) 0x00`.
//!
//! postcard is not self-describing: fields are never reordered and enum variants only ever
//! appended. The header's layout (version first) is fixed forever, so any two versions can at
//! least tell each other apart. Golden-byte tests pin the encoding.

use leasehold_core::{Key, Request, Response};
use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;

/// The largest frame on the wire, both zero delimiters and COBS overhead included, so at most
/// `MAX_FRAME - 2` bytes between delimiters. The decoder's buffer is this size; longer runs are
/// counted as [`DecodeError::Oversize`](crate::DecodeError::Oversize). The largest frame this
/// version can produce (a takeover with a 64-byte key and maximal integers) is 114 bytes; an
/// acquire for a 4-byte key is about 20 (`cargo run --example frame_sizes`).
pub const MAX_FRAME: usize = 128;

/// Who sent a frame, and which one it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Header {
    /// Protocol version of the sender ([`VERSION`]).
    pub version: u8,
    /// Sender's frame counter; a response echoes its request's.
    pub seq: u16,
    /// The device the frame is from (request) or for (response).
    pub device: u32,
}

/// What a frame carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Body {
    /// Device to host: a core request for `key`.
    Request {
        /// The lease key.
        key: Key,
        /// The core's request.
        request: Request,
    },
    /// Host to device: the authority's response.
    Response(Response),
    /// The receiver speaks another protocol version.
    VersionMismatch {
        /// The version the receiver speaks.
        supported: u8,
    },
}

/// One frame. Serialized as its header then its body, with nothing between.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Frame {
    /// Version, sequence number, device.
    pub header: Header,
    /// Payload.
    pub body: Body,
}

/// A frame could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct EncodeError;

impl core::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("frame does not fit in MAX_FRAME bytes")
    }
}

impl core::error::Error for EncodeError {}

impl Frame {
    /// A frame of the current version.
    pub fn new(seq: u16, device: u32, body: Body) -> Frame {
        Frame { header: Header { version: VERSION, seq, device }, body }
    }

    /// Encodes into `buf`, framed by a zero byte on both sides (the leading one lets a
    /// receiver that saw line noise resynchronise at this very frame). Returns the bytes to send.
    ///
    /// Every frame of this version fits (keys are at most 64 bytes; the largest frame is 114
    /// bytes); the error only guards the buffer.
    pub fn encode<'b>(&self, buf: &'b mut [u8; MAX_FRAME]) -> Result<&'b [u8], EncodeError> {
        buf[0] = 0;
        let n = postcard::to_slice_cobs(self, &mut buf[1..]).map_err(|_| EncodeError)?.len();
        Ok(&buf[..n + 1])
    }
}
