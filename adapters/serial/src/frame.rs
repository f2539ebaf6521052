//! Frames on the wire: `0x00 COBS(postcard(Header, Body)) 0x00`.
//!
//! postcard is not self-describing: fields are never reordered and enum variants only ever
//! appended. The header's layout (version first) is fixed forever, so any two versions can at
//! least tell each other apart. Golden-byte tests pin the encoding.
//!
//! The bytes are postcard's, but written here by hand: postcard's serializer and the `cobs`
//! crate index slices with checks a device cannot afford (each one links a panic path and
//! `core::fmt`), and serde's generic machinery was half of a device's serial layer. Every
//! write below goes through `get_mut`, so a buffer too small is an `Err`, never a panic. With
//! the `serde` feature the types also derive serde's traits, and the tests check that
//! `postcard` produces and accepts exactly these bytes.

#[cfg(feature = "sessions")]
use leasehold_core::session::wire::{
    Grant, Secret, Seq, SessionId, SessionOp, SessionReply, SessionRequest, SessionResponse,
};
use leasehold_core::{Key, Op, Reject, Reply, Request, Response};

/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;

/// The largest frame on the wire, both zero delimiters and COBS overhead included, so at most
/// `MAX_FRAME - 2` bytes between delimiters, the size of the decoder's buffer; longer runs are
/// counted as [`DecodeError::Oversize`](crate::DecodeError::Oversize). The largest frame this
/// version can produce (a session keepalive's reply pushing a grant of a 64-byte key, every
/// integer at its maximum) is 131 bytes; a v1 acquire for a 4-byte key is about 20, a session
/// keepalive about 33 (`cargo run --example frame_sizes`). It was 128 before sessions: a
/// device built then never receives a session frame, so it never meets a longer one.
pub const MAX_FRAME: usize = 136;

/// Who sent a frame, and which one it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Header {
    /// Protocol version of the sender ([`VERSION`]).
    pub version: u8,
    /// Sender's frame counter; a response echoes its request's.
    pub seq: u16,
    /// The device the frame is from (request) or for (response).
    pub device: u32,
}

/// What a frame carries.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
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
    /// Device to host: a request of a protocol-v2 session (its secret and seq inside).
    /// Feature `sessions`, like the two below: a device that speaks only v1 links none of
    /// their code (3.5 KiB of flash on a Cortex-M0).
    #[cfg(feature = "sessions")]
    SessionRequest(SessionRequest),
    /// Host to device: the authority's response within a session.
    #[cfg(feature = "sessions")]
    SessionResponse(SessionResponse),
    /// Host to device: the gateway did not bring this session request an answer from the
    /// authority, and says why instead of leaving the device to time out.
    #[cfg(feature = "sessions")]
    SessionRefused {
        /// The session named by the request.
        session: SessionId,
        /// The request's seq.
        seq: Seq,
        /// Why.
        why: SessionRefusal,
    },
}

/// Why a gateway answered a session request with [`Body::SessionRefused`].
#[cfg(feature = "sessions")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum SessionRefusal {
    /// Not forwarded: this link did not open the session (another link did, or this link
    /// reconnected since). Nothing changed at the authority.
    WrongLink,
    /// Forwarded, but no answer came back: it may or may not have reached the authority.
    Unreachable,
    /// The authority refused the request's secret. Its reply is withheld, so a forged frame
    /// cannot answer the real holder's request of the same seq; nothing changed at the
    /// authority.
    Forged,
}

/// One frame. Serialized as its header then its body, with nothing between.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
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
        // postcard's bytes go to buf[2..]; buf[0] is the leading delimiter and buf[1] the first
        // COBS code. COBS then works in place: each data byte stays where it is and each zero
        // becomes the code of the block after it.
        let [_, _, raw @ ..] = buf;
        let mut w = Writer { buf: raw, len: 0 };
        self.write(&mut w)?;
        let n = w.len;
        cobs_in_place(buf, n)
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        let Header { version, seq, device } = self.header;
        w.byte(version)?;
        w.varint(seq.into())?;
        w.varint(device.into())?;
        match &self.body {
            Body::Request { key, request } => {
                w.varint(0)?;
                w.varint(key.len() as u64)?;
                for &b in key.as_bytes() {
                    w.byte(b)?;
                }
                w.request(request)
            }
            Body::Response(response) => {
                w.varint(1)?;
                w.response(response)
            }
            Body::VersionMismatch { supported } => {
                w.varint(2)?;
                w.byte(*supported)
            }
            #[cfg(feature = "sessions")]
            Body::SessionRequest(r) => {
                w.varint(3)?;
                w.session_request(r)
            }
            #[cfg(feature = "sessions")]
            Body::SessionResponse(r) => {
                w.varint(4)?;
                w.session_response(r)
            }
            #[cfg(feature = "sessions")]
            Body::SessionRefused { session, seq, why } => {
                w.varint(5)?;
                w.varint(session.0)?;
                w.varint(seq.0)?;
                w.varint(match why {
                    SessionRefusal::WrongLink => 0,
                    SessionRefusal::Unreachable => 1,
                    SessionRefusal::Forged => 2,
                })
            }
        }
    }
}

/// Zero-delimited COBS of `buf[2..2 + n]`, in place: `buf[..n + 3]`.
fn cobs_in_place(buf: &mut [u8; MAX_FRAME], n: usize) -> Result<&[u8], EncodeError> {
    // The trailing delimiter's slot; it must exist. Then no block is longer than
    // MAX_FRAME - 2 < 254 bytes, so COBS never needs its 0xFF "no zero follows" code.
    let end = n.checked_add(2).ok_or(EncodeError)?;
    *buf.get_mut(end).ok_or(EncodeError)? = 0;
    buf[0] = 0;
    let mut code_at = 1;
    for i in 2..end {
        if buf.get(i) == Some(&0) {
            set_code(buf, code_at, i)?;
            code_at = i;
        }
    }
    set_code(buf, code_at, end)?;
    buf.get(..=end).ok_or(EncodeError)
}

/// The COBS code at `at` for a block that ends at `next` (the next code or the delimiter).
fn set_code(buf: &mut [u8], at: usize, next: usize) -> Result<(), EncodeError> {
    let code = u8::try_from(next.wrapping_sub(at)).map_err(|_| EncodeError)?;
    *buf.get_mut(at).ok_or(EncodeError)? = code;
    Ok(())
}

/// postcard's encoding, by hand: integers above u8 as LEB128 varints, enums as a varint
/// variant index then their fields, structs as their fields in order, strings as a varint
/// length then their bytes.
struct Writer<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl Writer<'_> {
    fn byte(&mut self, b: u8) -> Result<(), EncodeError> {
        *self.buf.get_mut(self.len).ok_or(EncodeError)? = b;
        self.len += 1;
        Ok(())
    }

    fn varint(&mut self, mut v: u64) -> Result<(), EncodeError> {
        while v >= 0x80 {
            self.byte(v as u8 | 0x80)?;
            v >>= 7;
        }
        self.byte(v as u8)
    }

    /// An enum variant: its index, then its integer fields.
    fn variant(&mut self, index: u32, fields: &[u64]) -> Result<(), EncodeError> {
        self.varint(index.into())?;
        for &f in fields {
            self.varint(f)?;
        }
        Ok(())
    }

    #[cfg(feature = "sessions")]
    fn str(&mut self, s: &str) -> Result<(), EncodeError> {
        self.varint(s.len() as u64)?;
        for &b in s.as_bytes() {
            self.byte(b)?;
        }
        Ok(())
    }

    #[cfg(feature = "sessions")]
    fn secret(&mut self, s: &Secret) -> Result<(), EncodeError> {
        // A fixed-size array: postcard writes its bytes with no length.
        for b in s.to_bytes() {
            self.byte(b)?;
        }
        Ok(())
    }

    #[cfg(feature = "sessions")]
    fn session_request(&mut self, r: &SessionRequest) -> Result<(), EncodeError> {
        self.varint(r.session.0)?;
        self.secret(&r.secret)?;
        self.varint(r.seq.0)?;
        match &r.op {
            SessionOp::Open { ttl, label } => {
                self.variant(0, &[ttl.as_micros()])?;
                self.str(label)
            }
            SessionOp::KeepAlive => self.variant(1, &[]),
            SessionOp::Acquire { key, wait } => {
                self.variant(2, &[])?;
                self.str(key)?;
                self.byte(u8::from(*wait))
            }
            SessionOp::Release { key, fence } => {
                self.variant(3, &[])?;
                self.str(key)?;
                self.varint(fence.0)
            }
            SessionOp::Close => self.variant(4, &[]),
            SessionOp::AcquireWithLimit { key, wait, limit } => {
                self.variant(5, &[])?;
                self.str(key)?;
                self.byte(u8::from(*wait))?;
                self.varint((*limit).into())
            }
            // Observing is for hosts, over HTTP: not carried on a device link (a reply with a
            // change, a label and a value would not fit a device's frame).
            SessionOp::AcquireWithValue { .. }
            | SessionOp::Observe { .. }
            | SessionOp::Unobserve { .. }
            | SessionOp::KeepAliveSeen { .. } => Err(EncodeError),
        }
    }

    #[cfg(feature = "sessions")]
    fn session_response(&mut self, r: &SessionResponse) -> Result<(), EncodeError> {
        self.varint(r.session.0)?;
        self.varint(r.seq.0)?;
        match &r.reply {
            SessionReply::Opened { session, secret, ttl } => {
                self.variant(0, &[session.0])?;
                self.secret(secret)?;
                self.varint(ttl.as_micros())
            }
            SessionReply::Alive { ttl, granted, more } => {
                self.variant(1, &[ttl.as_micros()])?;
                match granted {
                    None => self.byte(0)?,
                    Some(Grant { key, fence, asked }) => {
                        self.byte(1)?;
                        self.str(key)?;
                        self.varint(fence.0)?;
                        self.varint(asked.0)?;
                    }
                }
                self.byte(u8::from(*more))
            }
            SessionReply::Granted { key, fence } => {
                self.variant(2, &[])?;
                self.str(key)?;
                self.varint(fence.0)
            }
            SessionReply::Queued { key, position } => {
                self.variant(3, &[])?;
                self.str(key)?;
                self.varint((*position).into())
            }
            SessionReply::Busy { key, expires_in } => {
                self.variant(4, &[])?;
                self.str(key)?;
                self.varint(expires_in.as_micros())
            }
            SessionReply::Released { key } => {
                self.variant(5, &[])?;
                self.str(key)
            }
            SessionReply::NotHolder { key } => {
                self.variant(6, &[])?;
                self.str(key)
            }
            SessionReply::Closed => self.variant(7, &[]),
            SessionReply::Expired => self.variant(8, &[]),
            SessionReply::Replayed => self.variant(9, &[]),
            SessionReply::Rejected(reject) => self.variant(10, &[reject_index(*reject).into()]),
            // Answers to requests a device link does not carry (see session_request).
            SessionReply::AliveObserved { .. }
            | SessionReply::Observing { .. }
            | SessionReply::Unobserved { .. } => Err(EncodeError),
        }
    }

    fn request(&mut self, r: &Request) -> Result<(), EncodeError> {
        self.varint(r.id.0.into())?;
        self.varint(r.owner.0)?;
        match r.op {
            Op::Acquire { ttl } => self.variant(0, &[ttl.as_micros()]),
            Op::Takeover { version, ttl } => self.variant(1, &[version, ttl.as_micros()]),
            Op::Renew { fence, ttl } => self.variant(2, &[fence.0, ttl.as_micros()]),
            Op::Release { fence } => self.variant(3, &[fence.0]),
        }
    }

    fn response(&mut self, r: &Response) -> Result<(), EncodeError> {
        self.varint(r.id.0.into())?;
        self.varint(r.owner.0)?;
        match r.reply {
            Reply::Granted { fence, ttl } => self.variant(0, &[fence.0, ttl.as_micros()]),
            Reply::Busy { retry_after } => self.variant(1, &[retry_after.as_micros()]),
            Reply::Observed { version, ttl } => self.variant(2, &[version, ttl.as_micros()]),
            Reply::NotHolder => self.variant(3, &[]),
            Reply::Released => self.variant(4, &[]),
            Reply::Rejected(reject) => self.variant(5, &[reject_index(reject).into()]),
            Reply::Unavailable => self.variant(6, &[]),
            Reply::GrantedAfterExpiry { fence, ttl } => self.variant(7, &[fence.0, ttl.as_micros()]),
        }
    }
}

/// A [`Reject`]'s postcard variant index; [`reject_from_index`] is its inverse.
pub(crate) fn reject_index(r: Reject) -> u32 {
    match r {
        Reject::InvalidTtl => 0,
        Reject::InvalidKey => 1,
        Reject::Unauthorized => 2,
        Reject::Malformed => 3,
        Reject::UnsupportedVersion => 4,
        Reject::Capacity => 5,
        Reject::FenceExhausted => 6,
        Reject::Misconfigured => 7,
        Reject::LimitMismatch => 8,
    }
}

pub(crate) fn reject_from_index(i: u32) -> Option<Reject> {
    Some(match i {
        0 => Reject::InvalidTtl,
        1 => Reject::InvalidKey,
        2 => Reject::Unauthorized,
        3 => Reject::Malformed,
        4 => Reject::UnsupportedVersion,
        5 => Reject::Capacity,
        6 => Reject::FenceExhausted,
        7 => Reject::Misconfigured,
        8 => Reject::LimitMismatch,
        _ => return None,
    })
}

/// For [`Body::Request`]'s key on the decoding side.
pub(crate) fn key_from(bytes: &[u8]) -> Option<Key> {
    string_from(bytes)
}

/// A bounded string (a key, a label) on the decoding side: valid UTF-8 that fits, or nothing.
pub(crate) fn string_from<const N: usize>(bytes: &[u8]) -> Option<heapless::String<N>> {
    let s = core::str::from_utf8(bytes).ok()?;
    let mut out = heapless::String::new();
    out.push_str(s).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cobs_in_place_fills_the_buffer_exactly_and_refuses_one_more_byte() {
        let mut buf = [0u8; MAX_FRAME];
        // The most postcard bytes a frame buffer holds: both delimiters and one code besides.
        let most = MAX_FRAME - 3;
        for (i, b) in buf.iter_mut().enumerate().skip(2).take(most) {
            *b = if i % 50 == 0 { 0 } else { i as u8 | 1 };
        }
        let raw = buf[2..2 + most].to_vec();
        let mut framed = cobs_in_place(&mut buf, most).unwrap().to_vec();
        assert_eq!(framed.len(), MAX_FRAME);
        assert_eq!((framed[0], framed[MAX_FRAME - 1]), (0, 0));
        assert!(framed[1..MAX_FRAME - 1].iter().all(|&b| b != 0), "{framed:?}");
        let decoded = crate::decode::cobs_decode_in_place(&mut framed[1..MAX_FRAME - 1]).unwrap();
        assert_eq!(decoded, raw);
        assert_eq!(cobs_in_place(&mut buf, most + 1), Err(EncodeError));
        assert_eq!(cobs_in_place(&mut buf, usize::MAX), Err(EncodeError));
    }
}
