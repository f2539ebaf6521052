//! Turning a byte stream back into frames, whatever the line does.

use core::fmt;

use postcard::accumulator::{CobsAccumulator, FeedResult};
use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};

use crate::frame::{Body, Frame, Header, MAX_FRAME, VERSION};

/// Why bytes between two delimiters were not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DecodeError {
    /// More than `MAX_FRAME - 2` bytes without a delimiter.
    Oversize,
    /// Not valid COBS (a truncated frame, line noise).
    Cobs,
    /// Valid COBS, but not a frame of this protocol (or with trailing bytes).
    Malformed,
    /// A frame of another protocol version; its header is here so a reply can be addressed.
    WrongVersion(Header),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Oversize => write!(f, "more than {} bytes without a delimiter", MAX_FRAME - 2),
            DecodeError::Cobs => f.write_str("invalid COBS (a truncated frame or line noise)"),
            DecodeError::Malformed => f.write_str("not a frame of this protocol"),
            DecodeError::WrongVersion(h) => write!(
                f,
                "device {} speaks protocol version {} (this side speaks {VERSION})",
                h.device, h.version
            ),
        }
    }
}

impl core::error::Error for DecodeError {}

/// Counts of everything the decoder saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DecodeStats {
    /// Frames decoded.
    pub frames: u32,
    /// Runs longer than `MAX_FRAME - 2` bytes.
    pub oversize: u32,
    /// Invalid COBS.
    pub cobs: u32,
    /// Undecodable payloads.
    pub malformed: u32,
    /// Frames of another version.
    pub wrong_version: u32,
}

impl DecodeStats {
    /// All errors, of every kind.
    pub fn errors(&self) -> u32 {
        self.oversize
            .saturating_add(self.cobs)
            .saturating_add(self.malformed)
            .saturating_add(self.wrong_version)
    }
}

/// The accumulator holds one run between delimiters plus its closing zero; the encoder never
/// produces more (see [`Frame::encode`]).
const RUN_BUF: usize = MAX_FRAME - 1;

/// Accumulates bytes up to each zero delimiter and decodes what is between.
///
/// Bytes go through postcard's [`CobsAccumulator`]. Garbage, truncated frames and oversize runs
/// cost only the bytes up to the next delimiter: the decoder resynchronises there, counts the
/// error by kind ([`stats`](FrameDecoder::stats)) and never panics. Memory: one
/// `MAX_FRAME`-byte buffer.
pub struct FrameDecoder {
    acc: CobsAccumulator<RUN_BUF>,
    /// Bytes of the current run (since the last delimiter) held by `acc`.
    run: usize,
    /// The current run overflowed; skip to the next delimiter. (The accumulator alone would
    /// restart mid-run and report the tail as a second, garbage frame.)
    skipping: bool,
    stats: DecodeStats,
}

impl fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("run", &self.run)
            .field("skipping", &self.skipping)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// An empty decoder.
    pub const fn new() -> Self {
        FrameDecoder {
            acc: CobsAccumulator::new(),
            run: 0,
            skipping: false,
            stats: DecodeStats { frames: 0, oversize: 0, cobs: 0, malformed: 0, wrong_version: 0 },
        }
    }

    /// What has been seen so far.
    pub fn stats(&self) -> DecodeStats {
        self.stats
    }

    /// Feeds one byte; returns a frame (or why there was none) when a delimiter ends a run.
    pub fn push(&mut self, byte: u8) -> Option<Result<Frame, DecodeError>> {
        if self.skipping {
            if byte != 0 {
                return None;
            }
            self.skipping = false;
            return Some(self.count(Err(DecodeError::Oversize)));
        }
        if byte == 0 && self.run == 0 {
            // Back-to-back delimiters: an idle line, or the leading zero of a frame.
            return None;
        }
        let result = match self.acc.feed::<Incoming>(&[byte]) {
            FeedResult::Consumed => {
                self.run += 1;
                return None;
            }
            FeedResult::OverFull(_) if byte != 0 => {
                self.run = 0;
                self.skipping = true;
                return None;
            }
            FeedResult::OverFull(_) => Err(DecodeError::Oversize),
            FeedResult::DeserError(_) => Err(DecodeError::Cobs),
            FeedResult::Success { data: Incoming::Frame(f), .. } => Ok(f),
            FeedResult::Success { data: Incoming::WrongVersion(h), .. } => Err(DecodeError::WrongVersion(h)),
            FeedResult::Success { data: Incoming::Malformed, .. } => Err(DecodeError::Malformed),
        };
        self.run = 0;
        Some(self.count(result))
    }

    /// Feeds bytes, calling `on_frame` for every run a delimiter ends.
    pub fn push_slice(&mut self, bytes: &[u8], mut on_frame: impl FnMut(Result<Frame, DecodeError>)) {
        for &b in bytes {
            if let Some(r) = self.push(b) {
                on_frame(r);
            }
        }
    }

    fn count(&mut self, result: Result<Frame, DecodeError>) -> Result<Frame, DecodeError> {
        let s = &mut self.stats;
        let counter = match &result {
            Ok(_) => &mut s.frames,
            Err(DecodeError::Oversize) => &mut s.oversize,
            Err(DecodeError::Cobs) => &mut s.cobs,
            Err(DecodeError::Malformed) => &mut s.malformed,
            Err(DecodeError::WrongVersion(_)) => &mut s.wrong_version,
        };
        *counter = counter.wrapping_add(1);
        result
    }
}

/// What a COBS-valid run turned out to be.
///
/// Decoding never fails at the postcard level: the visitor turns element errors into
/// `Malformed`, so the accumulator's own `DeserError` means bad COBS and nothing else, and a
/// frame of another version is recognised from its header before its body is touched.
enum Incoming {
    Frame(Frame),
    WrongVersion(Header),
    Malformed,
}

impl<'de> Deserialize<'de> for Incoming {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // postcard encodes a tuple as its elements in order, exactly as the `Frame` struct;
        // the third element only probes for trailing bytes.
        d.deserialize_tuple(3, IncomingVisitor)
    }
}

struct IncomingVisitor;

impl<'de> Visitor<'de> for IncomingVisitor {
    type Value = Incoming;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a leasehold serial frame")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Incoming, A::Error> {
        let Ok(Some(header)) = seq.next_element::<Header>() else { return Ok(Incoming::Malformed) };
        if header.version != VERSION {
            return Ok(Incoming::WrongVersion(header));
        }
        let Ok(Some(body)) = seq.next_element::<Body>() else { return Ok(Incoming::Malformed) };
        match seq.next_element::<u8>() {
            // Nothing left: exactly one frame.
            Err(_) => Ok(Incoming::Frame(Frame { header, body })),
            Ok(_) => Ok(Incoming::Malformed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_core::{Fence, Op, OwnerId, Request, RequestId};

    fn release_frame() -> Frame {
        let request = Request { id: RequestId(2), owner: OwnerId(7), op: Op::Release { fence: Fence(3) } };
        Frame::new(5, 42, Body::Request { key: leasehold_core::parse_key("pump").unwrap(), request })
    }

    fn feed(d: &mut FrameDecoder, bytes: &[u8]) -> [Option<Result<Frame, DecodeError>>; 4] {
        let mut out = [None, None, None, None];
        let mut i = 0;
        d.push_slice(bytes, |r| {
            out[i] = Some(r);
            i += 1;
        });
        out
    }

    #[test]
    fn idle_delimiters_are_not_errors() {
        let mut d = FrameDecoder::new();
        assert_eq!(feed(&mut d, &[0, 0, 0]), [None, None, None, None]);
        assert_eq!(d.stats(), DecodeStats::default());
    }

    #[test]
    fn a_run_of_exactly_the_limit_is_decoded_and_one_more_byte_is_oversize() {
        let mut d = FrameDecoder::new();
        // MAX_FRAME - 2 non-zero bytes: fits (it is not a valid frame, but it is not oversize).
        let mut run = [0x01u8; MAX_FRAME - 1];
        run[MAX_FRAME - 2] = 0;
        let first = feed(&mut d, &run)[0].clone();
        assert!(matches!(first, Some(Err(e)) if e != DecodeError::Oversize), "{first:?}");
        let mut run = [0x01u8; MAX_FRAME];
        run[MAX_FRAME - 1] = 0;
        assert_eq!(feed(&mut d, &run)[0], Some(Err(DecodeError::Oversize)));
        // An oversize run that is very long still costs one error, then a frame gets through.
        let mut buf = [0u8; MAX_FRAME];
        let good = release_frame().encode(&mut buf).unwrap();
        for _ in 0..1000 {
            assert_eq!(d.push(0x55), None);
        }
        let out = feed(&mut d, good);
        assert_eq!(out[0], Some(Err(DecodeError::Oversize)));
        assert_eq!(out[1], Some(Ok(release_frame())));
        let s = d.stats();
        assert_eq!((s.frames, s.oversize, s.errors()), (1, 2, 3));
    }

    #[test]
    fn trailing_bytes_make_a_frame_malformed() {
        let mut raw = [0u8; MAX_FRAME];
        let used = postcard::to_slice(&release_frame(), &mut raw).unwrap().len();
        raw[used] = 9;
        let mut enc = [0u8; MAX_FRAME];
        let n = cobs_encode(&raw[..used + 1], &mut enc);
        let mut d = FrameDecoder::new();
        assert_eq!(feed(&mut d, &enc[..n])[0], Some(Err(DecodeError::Malformed)));
        let n = cobs_encode(&raw[..used], &mut enc);
        assert_eq!(feed(&mut d, &enc[..n])[0], Some(Ok(release_frame())));
    }

    /// Plain COBS with a closing zero, written out so the test does not trust the encoder.
    fn cobs_encode(src: &[u8], dst: &mut [u8]) -> usize {
        let (mut code_at, mut out, mut code) = (0, 1, 1u8);
        for &b in src {
            if b == 0 {
                dst[code_at] = code;
                code_at = out;
                out += 1;
                code = 1;
            } else {
                dst[out] = b;
                out += 1;
                code += 1;
                if code == 0xff {
                    dst[code_at] = code;
                    code_at = out;
                    out += 1;
                    code = 1;
                }
            }
        }
        dst[code_at] = code;
        dst[out] = 0;
        out + 1
    }
}
