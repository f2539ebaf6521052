//! The host side (feature `std`): the same codec over std or async byte streams.

use std::collections::VecDeque;
use std::io;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use leasehold_core::Response;

use crate::decode::{DecodeError, DecodeStats, FrameDecoder};
use crate::frame::{Body, Frame, Header, MAX_FRAME, VERSION};

/// The frame that answers `request` with `response` (same sequence number and device).
pub fn response_to(request: &Header, response: Response) -> Frame {
    Frame::new(request.seq, request.device, Body::Response(response))
}

/// The frame that tells a sender of another version which one we speak.
pub fn version_mismatch(request: &Header) -> Frame {
    Frame::new(request.seq, request.device, Body::VersionMismatch { supported: VERSION })
}

fn encode(frame: &Frame) -> io::Result<([u8; MAX_FRAME], usize)> {
    let mut buf = [0u8; MAX_FRAME];
    let n = frame.encode(&mut buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?.len();
    Ok((buf, n))
}

/// Frames over a blocking byte stream (a serial device file, a TCP stream).
#[derive(Debug)]
pub struct HostLink<S> {
    stream: S,
    decoder: FrameDecoder,
    pending: VecDeque<Result<Frame, DecodeError>>,
}

impl<S: io::Read + io::Write> HostLink<S> {
    /// A link over `stream`.
    pub fn new(stream: S) -> Self {
        HostLink { stream, decoder: FrameDecoder::new(), pending: VecDeque::new() }
    }

    /// The next frame, or why the bytes were not one; `None` at end of stream.
    pub fn read_frame(&mut self) -> io::Result<Option<Result<Frame, DecodeError>>> {
        let mut buf = [0u8; 256];
        loop {
            if let Some(f) = self.pending.pop_front() {
                return Ok(Some(f));
            }
            let n = self.stream.read(&mut buf)?;
            if n == 0 {
                return Ok(None);
            }
            self.pending.extend(buf[..n].iter().filter_map(|&b| self.decoder.push(b)));
        }
    }

    /// Sends one frame.
    pub fn write_frame(&mut self, frame: &Frame) -> io::Result<()> {
        let (buf, n) = encode(frame)?;
        self.stream.write_all(&buf[..n])?;
        self.stream.flush()
    }

    /// What the decoder has seen.
    pub fn stats(&self) -> DecodeStats {
        self.decoder.stats()
    }
}

/// Frames over an async byte stream (futures-io `AsyncRead + AsyncWrite`).
#[derive(Debug)]
pub struct AsyncHostLink<S> {
    stream: S,
    decoder: FrameDecoder,
    pending: VecDeque<Result<Frame, DecodeError>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncHostLink<S> {
    /// A link over `stream`.
    pub fn new(stream: S) -> Self {
        AsyncHostLink { stream, decoder: FrameDecoder::new(), pending: VecDeque::new() }
    }

    /// The next frame, or why the bytes were not one; `None` at end of stream.
    pub async fn read_frame(&mut self) -> io::Result<Option<Result<Frame, DecodeError>>> {
        let mut buf = [0u8; 256];
        loop {
            if let Some(f) = self.pending.pop_front() {
                return Ok(Some(f));
            }
            let n = self.stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(None);
            }
            self.pending.extend(buf[..n].iter().filter_map(|&b| self.decoder.push(b)));
        }
    }

    /// Sends one frame.
    pub async fn write_frame(&mut self, frame: &Frame) -> io::Result<()> {
        let (buf, n) = encode(frame)?;
        self.stream.write_all(&buf[..n]).await?;
        self.stream.flush().await
    }

    /// What the decoder has seen.
    pub fn stats(&self) -> DecodeStats {
        self.decoder.stats()
    }
}
