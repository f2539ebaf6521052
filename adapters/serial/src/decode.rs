//! Turning a byte stream back into frames, whatever the line does.

use core::fmt;

#[cfg(feature = "sessions")]
use crate::frame::{string_from, SessionRefusal};
#[cfg(feature = "sessions")]
use leasehold_core::session::wire::{
    Grant, Secret, Seq, SessionId, SessionOp, SessionReply, SessionRequest, SessionResponse,
};
use leasehold_core::{Duration, Fence, Key, Op, OwnerId, Reply, Request, RequestId, Response};

use crate::frame::{key_from, reject_from_index, Body, Frame, Header, MAX_FRAME, VERSION};

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

/// The longest run between delimiters; the encoder never produces more (see [`Frame::encode`]).
const RUN_MAX: usize = MAX_FRAME - 2;

/// Accumulates bytes up to each zero delimiter and decodes what is between.
///
/// Garbage, truncated frames and oversize runs cost only the bytes up to the next delimiter:
/// the decoder resynchronises there, counts the error by kind ([`stats`](FrameDecoder::stats))
/// and never panics (it has no panic path at all: every index is checked with `get`). Memory:
/// one `MAX_FRAME - 2`-byte buffer, decoded in place.
pub struct FrameDecoder {
    buf: [u8; RUN_MAX],
    /// Bytes of the current run (since the last delimiter) held in `buf`.
    run: usize,
    /// The current run overflowed; skip to the next delimiter.
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
            buf: [0; RUN_MAX],
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
        if byte != 0 {
            match self.buf.get_mut(self.run) {
                Some(slot) => {
                    *slot = byte;
                    self.run += 1;
                }
                None => {
                    self.run = 0;
                    self.skipping = true;
                }
            }
            return None;
        }
        if self.run == 0 {
            // Back-to-back delimiters: an idle line, or the leading zero of a frame.
            return None;
        }
        let run = core::mem::take(&mut self.run);
        let result = match self.buf.get_mut(..run).and_then(cobs_decode_in_place) {
            None => Err(DecodeError::Cobs),
            Some(payload) => parse(payload),
        };
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

/// Decodes a COBS run (no zero bytes, delimiters stripped) in place; `None` if a block's code
/// points past the run's end. Decoded bytes never overtake the ones still to be read.
pub(crate) fn cobs_decode_in_place(buf: &mut [u8]) -> Option<&[u8]> {
    let n = buf.len();
    let (mut read, mut write) = (0, 0);
    while read < n {
        let code = usize::from(*buf.get(read)?);
        let end = read + code;
        if end > n {
            return None;
        }
        for i in read + 1..end {
            *buf.get_mut(write)? = *buf.get(i)?;
            write += 1;
        }
        read = end;
        // Each block but the last ends with a zero, unless its code says it was full (0xFF).
        if code != 0xFF && read < n {
            *buf.get_mut(write)? = 0;
            write += 1;
        }
    }
    buf.get(..write)
}

/// A decoded payload: a frame of this version, one of another version, or not a frame.
fn parse(payload: &[u8]) -> Result<Frame, DecodeError> {
    let mut r = Reader(payload);
    let header = r.header().ok_or(DecodeError::Malformed)?;
    if header.version != VERSION {
        return Err(DecodeError::WrongVersion(header));
    }
    let body = r.body().ok_or(DecodeError::Malformed)?;
    // Exactly one frame: trailing bytes make it malformed.
    match r.0 {
        [] => Ok(Frame { header, body }),
        _ => Err(DecodeError::Malformed),
    }
}

/// Reads what [`Frame::encode`] writes, with postcard's rules: a varint is at most
/// ceil(bits / 7) bytes and its last byte must not overflow the type (non-minimal
/// encodings are accepted, as postcard accepts them).
struct Reader<'b>(&'b [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    /// A varint of a `bits`-bit unsigned integer.
    fn varint(&mut self, bits: u32) -> Option<u64> {
        let max_len = bits.div_ceil(7);
        let mut v = 0u64;
        for i in 0..max_len {
            let b = self.byte()?;
            v |= u64::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                let last_bits = bits - 7 * (max_len - 1);
                return (i + 1 < max_len || u32::from(b) >> last_bits == 0).then_some(v);
            }
        }
        None
    }

    fn u16(&mut self) -> Option<u16> {
        self.varint(16).map(|v| v as u16)
    }

    fn u32(&mut self) -> Option<u32> {
        self.varint(32).map(|v| v as u32)
    }

    fn u64(&mut self) -> Option<u64> {
        self.varint(64)
    }

    fn duration(&mut self) -> Option<Duration> {
        self.u64().map(Duration::from_micros)
    }

    fn fence(&mut self) -> Option<Fence> {
        self.u64().map(Fence)
    }

    fn header(&mut self) -> Option<Header> {
        Some(Header { version: self.byte()?, seq: self.u16()?, device: self.u32()? })
    }

    fn body(&mut self) -> Option<Body> {
        Some(match self.u32()? {
            0 => Body::Request { key: self.key()?, request: self.request()? },
            1 => Body::Response(self.response()?),
            2 => Body::VersionMismatch { supported: self.byte()? },
            #[cfg(feature = "sessions")]
            3 => Body::SessionRequest(self.session_request()?),
            #[cfg(feature = "sessions")]
            4 => Body::SessionResponse(self.session_response()?),
            #[cfg(feature = "sessions")]
            5 => Body::SessionRefused {
                session: SessionId(self.u64()?),
                seq: Seq(self.u64()?),
                why: match self.u32()? {
                    0 => SessionRefusal::WrongLink,
                    1 => SessionRefusal::Unreachable,
                    2 => SessionRefusal::Forged,
                    _ => return None,
                },
            },
            _ => return None,
        })
    }

    /// A string's bytes: a varint length (a usize; 64 bits is what postcard accepts on a
    /// host), then that many bytes.
    fn str_bytes(&mut self) -> Option<&[u8]> {
        let len = usize::try_from(self.u64()?).ok()?;
        let bytes = self.0.get(..len)?;
        self.0 = self.0.get(len..)?;
        Some(bytes)
    }

    fn key(&mut self) -> Option<Key> {
        key_from(self.str_bytes()?)
    }

    /// postcard's bool: exactly 0 or 1.
    #[cfg(feature = "sessions")]
    fn bool(&mut self) -> Option<bool> {
        match self.byte()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    #[cfg(feature = "sessions")]
    fn secret(&mut self) -> Option<Secret> {
        let mut bytes = [0u8; 16];
        for b in bytes.iter_mut() {
            *b = self.byte()?;
        }
        Some(Secret::from_bytes(bytes))
    }

    #[cfg(feature = "sessions")]
    fn session_request(&mut self) -> Option<SessionRequest> {
        let session = SessionId(self.u64()?);
        let secret = self.secret()?;
        let seq = Seq(self.u64()?);
        let op = match self.u32()? {
            0 => SessionOp::Open { ttl: self.duration()?, label: string_from(self.str_bytes()?)? },
            1 => SessionOp::KeepAlive,
            2 => SessionOp::Acquire { key: self.key()?, wait: self.bool()? },
            3 => SessionOp::Release { key: self.key()?, fence: self.fence()? },
            4 => SessionOp::Close,
            _ => return None,
        };
        Some(SessionRequest { session, secret, seq, op })
    }

    #[cfg(feature = "sessions")]
    fn session_response(&mut self) -> Option<SessionResponse> {
        let session = SessionId(self.u64()?);
        let seq = Seq(self.u64()?);
        let reply = match self.u32()? {
            0 => SessionReply::Opened {
                session: SessionId(self.u64()?),
                secret: self.secret()?,
                ttl: self.duration()?,
            },
            1 => {
                let ttl = self.duration()?;
                let granted = match self.byte()? {
                    0 => None,
                    1 => Some(Grant { key: self.key()?, fence: self.fence()?, asked: Seq(self.u64()?) }),
                    _ => return None,
                };
                SessionReply::Alive { ttl, granted, more: self.bool()? }
            }
            2 => SessionReply::Granted { key: self.key()?, fence: self.fence()? },
            3 => SessionReply::Queued { key: self.key()?, position: self.u16()? },
            4 => SessionReply::Busy { key: self.key()?, expires_in: self.duration()? },
            5 => SessionReply::Released { key: self.key()? },
            6 => SessionReply::NotHolder { key: self.key()? },
            7 => SessionReply::Closed,
            8 => SessionReply::Expired,
            9 => SessionReply::Replayed,
            10 => SessionReply::Rejected(reject_from_index(self.u32()?)?),
            _ => return None,
        };
        Some(SessionResponse { session, seq, reply })
    }

    fn request(&mut self) -> Option<Request> {
        let id = RequestId(self.u32()?);
        let owner = OwnerId(self.u64()?);
        let op = match self.u32()? {
            0 => Op::Acquire { ttl: self.duration()? },
            1 => Op::Takeover { version: self.u64()?, ttl: self.duration()? },
            2 => Op::Renew { fence: self.fence()?, ttl: self.duration()? },
            3 => Op::Release { fence: self.fence()? },
            _ => return None,
        };
        Some(Request { id, owner, op })
    }

    fn response(&mut self) -> Option<Response> {
        let id = RequestId(self.u32()?);
        let owner = OwnerId(self.u64()?);
        let reply = match self.u32()? {
            0 => Reply::Granted { fence: self.fence()?, ttl: self.duration()? },
            1 => Reply::Busy { retry_after: self.duration()? },
            2 => Reply::Observed { version: self.u64()?, ttl: self.duration()? },
            3 => Reply::NotHolder,
            4 => Reply::Released,
            5 => Reply::Rejected(reject_from_index(self.u32()?)?),
            6 => Reply::Unavailable,
            7 => Reply::GrantedAfterExpiry { fence: self.fence()?, ttl: self.duration()? },
            _ => return None,
        };
        Some(Response { id, owner, reply })
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
