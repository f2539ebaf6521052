//! Turning a byte stream back into frames, whatever the line does.

use heapless::Vec;

use crate::frame::{Body, Frame, Header, MAX_FRAME, VERSION};

/// Why bytes between two delimiters were not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DecodeError {
    /// More than [`MAX_FRAME`] bytes without a delimiter.
    Oversize,
    /// Not valid COBS (a truncated frame, line noise).
    Cobs,
    /// Valid COBS, but not a frame of this protocol.
    Malformed,
    /// A frame of another protocol version; its header is here so a reply can be addressed.
    WrongVersion(Header),
}

/// Counts of everything the decoder saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DecodeStats {
    /// Frames decoded.
    pub frames: u32,
    /// Runs longer than [`MAX_FRAME`].
    pub oversize: u32,
    /// Invalid COBS.
    pub cobs: u32,
    /// Undecodable payloads.
    pub malformed: u32,
    /// Frames of another version.
    pub wrong_version: u32,
}

/// Accumulates bytes up to each zero delimiter and decodes what is between.
///
/// Garbage, truncated frames and oversize runs cost only the bytes up to the next delimiter:
/// the decoder resynchronises there, counts the error and never panics.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8, MAX_FRAME>,
    overflow: bool,
    stats: DecodeStats,
}

impl FrameDecoder {
    /// An empty decoder.
    pub const fn new() -> Self {
        FrameDecoder {
            buf: Vec::new(),
            overflow: false,
            stats: DecodeStats { frames: 0, oversize: 0, cobs: 0, malformed: 0, wrong_version: 0 },
        }
    }

    /// What has been seen so far.
    pub fn stats(&self) -> DecodeStats {
        self.stats
    }

    /// Feeds one byte; returns a frame (or why there was none) when a delimiter ends a run.
    pub fn push(&mut self, byte: u8) -> Option<Result<Frame, DecodeError>> {
        if byte != 0 {
            if !self.overflow && self.buf.push(byte).is_err() {
                self.overflow = true;
            }
            return None;
        }
        if self.overflow {
            self.overflow = false;
            self.buf.clear();
            self.stats.oversize += 1;
            return Some(Err(DecodeError::Oversize));
        }
        if self.buf.is_empty() {
            // Back-to-back delimiters: an idle line or a sender resynchronising.
            return None;
        }
        let result = decode(&mut self.buf);
        self.buf.clear();
        match result {
            Ok(_) => self.stats.frames += 1,
            Err(DecodeError::Cobs) => self.stats.cobs += 1,
            Err(DecodeError::Malformed) => self.stats.malformed += 1,
            Err(DecodeError::WrongVersion(_)) => self.stats.wrong_version += 1,
            Err(DecodeError::Oversize) => self.stats.oversize += 1,
        }
        Some(result)
    }
}

fn decode(raw: &mut [u8]) -> Result<Frame, DecodeError> {
    let n = cobs::decode_in_place(raw).map_err(|_| DecodeError::Cobs)?;
    let (header, rest) =
        postcard::take_from_bytes::<Header>(&raw[..n]).map_err(|_| DecodeError::Malformed)?;
    if header.version != VERSION {
        return Err(DecodeError::WrongVersion(header));
    }
    let (body, rest) = postcard::take_from_bytes::<Body>(rest).map_err(|_| DecodeError::Malformed)?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed);
    }
    Ok(Frame { header, body })
}
