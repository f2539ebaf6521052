//! The host side (feature `std`): the same codec over std or async byte streams.

use std::collections::VecDeque;
use std::io;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use leasehold_core::{Key, Reply, Request, Response};

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

/// A request a device sent, with what is needed to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRequest {
    /// The frame's header: which device, which frame.
    pub header: Header,
    /// The key the device's lease is for.
    pub key: Key,
    /// The core request, to be forwarded to a lease authority.
    pub request: Request,
}

impl DeviceRequest {
    /// The frame answering this request with `reply`.
    pub fn answer(&self, reply: Reply) -> Frame {
        response_to(&self.header, Response { id: self.request.id, owner: self.request.owner, reply })
    }
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
            let n = match self.stream.read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => r?,
            };
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

    /// The next request from a device; `None` at end of stream. Frames of another protocol
    /// version are answered with a version-mismatch frame here, and other bad frames are
    /// skipped (and counted in [`stats`](HostLink::stats)).
    pub fn next_request(&mut self) -> io::Result<Option<DeviceRequest>> {
        while let Some(frame) = self.read_frame()? {
            match frame {
                Ok(Frame { header, body: Body::Request { key, request } }) => {
                    return Ok(Some(DeviceRequest { header, key, request }));
                }
                Err(DecodeError::WrongVersion(h)) => self.write_frame(&version_mismatch(&h))?,
                // Responses or notices echoed back, line noise: nothing to answer.
                Ok(_) | Err(_) => {}
            }
        }
        Ok(None)
    }

    /// Answers `request` with `reply`.
    pub fn answer(&mut self, request: &DeviceRequest, reply: Reply) -> io::Result<()> {
        self.write_frame(&request.answer(reply))
    }

    /// What the decoder has seen.
    pub fn stats(&self) -> DecodeStats {
        self.decoder.stats()
    }

    /// The stream, e.g. to set a timeout on it.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }
}

/// How much work [`AsyncHostLink::read_frame`] does before it yields to the executor: one unit
/// per read from the stream and one per frame (or decode error) handed out. 32 reads are 8 KiB.
const BUDGET: u32 = 32;

/// Frames over an async byte stream (futures-io `AsyncRead + AsyncWrite`).
///
/// Cooperative: a stream that is always ready (a peer sending unpaced bytes) never makes a read
/// wait, so [`read_frame`](AsyncHostLink::read_frame) yields to the executor after every
/// `BUDGET` (32) reads or frames. Without that, one flooding link would keep every other task on
/// a single-threaded executor from running.
#[derive(Debug)]
pub struct AsyncHostLink<S> {
    stream: S,
    decoder: FrameDecoder,
    pending: VecDeque<Result<Frame, DecodeError>>,
    /// Work left before the next yield.
    budget: u32,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncHostLink<S> {
    /// A link over `stream`.
    pub fn new(stream: S) -> Self {
        AsyncHostLink { stream, decoder: FrameDecoder::new(), pending: VecDeque::new(), budget: BUDGET }
    }

    /// The next frame, or why the bytes were not one; `None` at end of stream. Yields to the
    /// executor once its budget is spent, however much the stream has ready.
    pub async fn read_frame(&mut self) -> io::Result<Option<Result<Frame, DecodeError>>> {
        let mut buf = [0u8; 256];
        loop {
            // Spent before anything is taken, so a future dropped at the yield loses nothing.
            self.spend().await;
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

    /// Takes one unit of work from the budget; when it is spent, lets other tasks run first.
    async fn spend(&mut self) {
        self.budget = self.budget.saturating_sub(1);
        if self.budget == 0 {
            self.budget = BUDGET;
            futures_lite::future::yield_now().await;
        }
    }

    /// Sends one frame.
    pub async fn write_frame(&mut self, frame: &Frame) -> io::Result<()> {
        let (buf, n) = encode(frame)?;
        self.stream.write_all(&buf[..n]).await?;
        self.stream.flush().await
    }

    /// The next request from a device; `None` at end of stream. Frames of another protocol
    /// version are answered with a version-mismatch frame here, and other bad frames are
    /// skipped (and counted in [`stats`](AsyncHostLink::stats)).
    pub async fn next_request(&mut self) -> io::Result<Option<DeviceRequest>> {
        while let Some(frame) = self.read_frame().await? {
            match frame {
                Ok(Frame { header, body: Body::Request { key, request } }) => {
                    return Ok(Some(DeviceRequest { header, key, request }));
                }
                Err(DecodeError::WrongVersion(h)) => self.write_frame(&version_mismatch(&h)).await?,
                // Responses or notices echoed back, line noise: nothing to answer.
                Ok(_) | Err(_) => {}
            }
        }
        Ok(None)
    }

    /// Answers `request` with `reply`.
    pub async fn answer(&mut self, request: &DeviceRequest, reply: Reply) -> io::Result<()> {
        self.write_frame(&request.answer(reply)).await
    }

    /// What the decoder has seen.
    pub fn stats(&self) -> DecodeStats {
        self.decoder.stats()
    }

    /// The stream, e.g. to set a timeout on it.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }
}
