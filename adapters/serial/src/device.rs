//! The device side: a lease machine talking to a host gateway over a UART.

use embedded_io::{Read, ReadReady, Write};
use leasehold_core::{AcquireError, Duration, Event, Instant, Key, Lease, ReleaseError};

use crate::decode::{DecodeError, DecodeStats, FrameDecoder};
use crate::fmt::{debug, warning};
use crate::frame::{Body, Frame, MAX_FRAME};

/// The device's monotonic clock. embedded-hal 1.0 has none, so the board provides it (a
/// SysTick counter, an RTC, embassy-time...).
pub trait Clock {
    /// Now, in microseconds since an arbitrary origin; never goes backwards.
    fn now(&self) -> Instant;
}

/// State shared by the blocking and async links: the machine, the key, the codec.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) lease: Lease,
    key: Key,
    device: u32,
    seq: u16,
    decoder: FrameDecoder,
    /// Response frames for other devices on a shared line, and similar.
    foreign: u32,
}

impl Core {
    pub(crate) fn new(lease: Lease, key: Key, device: u32) -> Self {
        Core { lease, key, device, seq: 0, decoder: FrameDecoder::new(), foreign: 0 }
    }

    pub(crate) fn feed(&mut self, now: Instant, bytes: &[u8]) {
        for &b in bytes {
            match self.decoder.push(b) {
                Some(Ok(Frame { header, body: Body::Response(r) })) if header.device == self.device => {
                    self.lease.handle_response(now, r)
                }
                Some(Ok(Frame { body: Body::VersionMismatch { supported }, .. })) => {
                    warning!("gateway speaks protocol version {}", supported);
                    let _ = supported;
                }
                Some(Ok(_)) => self.foreign += 1,
                Some(Err(DecodeError::WrongVersion(h))) => {
                    warning!("frame of protocol version {}", h.version);
                    let _ = h;
                }
                Some(Err(_)) | None => {}
            }
        }
    }

    pub(crate) fn decoder_stats(&self) -> DecodeStats {
        self.decoder.stats()
    }

    pub(crate) fn due(&mut self, now: Instant) {
        if self.lease.poll_timeout().is_some_and(|t| t <= now) {
            self.lease.handle_timeout(now);
        }
    }

    /// The next request as a frame, if the machine has one.
    pub(crate) fn next_frame<'b>(
        &mut self,
        buf: &'b mut [u8; MAX_FRAME],
    ) -> Option<(leasehold_core::RequestId, &'b [u8])> {
        let request = self.lease.poll_transmit()?;
        self.seq = self.seq.wrapping_add(1);
        let frame = Frame::new(self.seq, self.device, Body::Request { key: self.key.clone(), request });
        debug!("sending request {} as frame {}", request.id.0, self.seq);
        match frame.encode(buf) {
            Ok(bytes) => Some((request.id, bytes)),
            // Cannot happen with a key of at most 64 bytes; treated as a lost request.
            Err(_) => None,
        }
    }
}

/// A device's lease over a blocking UART (`embedded_io::{Read, ReadReady, Write}`).
///
/// Call [`poll`](DeviceLink::poll) often (from the main loop, or when the UART interrupt or
/// the timer at [`poll_timeout`](DeviceLink::poll_timeout) fires). It moves bytes, time and
/// wake-ups between the UART and the core machine; all lease decisions are the machine's.
#[derive(Debug)]
pub struct DeviceLink<U, C> {
    uart: U,
    clock: C,
    core: Core,
    tx: [u8; MAX_FRAME],
}

impl<U: Read + ReadReady + Write, C: Clock> DeviceLink<U, C> {
    /// A link for `lease` on `key`, identifying itself as `device`.
    pub fn new(uart: U, clock: C, lease: Lease, key: Key, device: u32) -> Self {
        DeviceLink { uart, clock, core: Core::new(lease, key, device), tx: [0; MAX_FRAME] }
    }

    /// The lease machine, for its getters.
    pub fn lease(&self) -> &Lease {
        &self.core.lease
    }

    /// The clock's reading now.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// How long the lease may still be relied on.
    pub fn remaining(&self) -> Option<Duration> {
        self.core.lease.remaining(self.clock.now())
    }

    /// Starts acquiring; see [`Lease::acquire`].
    pub fn acquire(&mut self) -> Result<(), AcquireError> {
        self.core.lease.acquire(self.clock.now())
    }

    /// Gives the lease back; see [`Lease::release`].
    pub fn release(&mut self) -> Result<(), ReleaseError> {
        self.core.lease.release(self.clock.now())
    }

    /// When `poll` must next run even if no byte arrives.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.core.lease.poll_timeout()
    }

    /// What the decoder has seen (frames, and errors by kind).
    pub fn stats(&self) -> DecodeStats {
        self.core.decoder_stats()
    }

    /// Reads what the UART has, fires due timers, sends what the machine wants sent, and
    /// returns the next event for the application. Never blocks on reading.
    pub fn poll(&mut self) -> Result<Option<Event>, U::Error> {
        let now = self.clock.now();
        let mut chunk = [0u8; 32];
        while self.uart.read_ready()? {
            let n = self.uart.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            self.core.feed(now, &chunk[..n]);
        }
        self.core.due(now);
        while let Some((id, bytes)) = self.core.next_frame(&mut self.tx) {
            if let Err(e) = self.uart.write_all(bytes).and_then(|_| self.uart.flush()) {
                self.core.lease.handle_transport_error(now, id);
                return Err(e);
            }
        }
        Ok(self.core.lease.poll_event())
    }
}
