//! The device side: a lease machine talking to a host gateway over a UART.

use embedded_io::{Read, ReadReady, Write};
use leasehold_core::{AcquireError, Duration, Event, Instant, Key, Lease, ReleaseError, RequestId};

use crate::decode::{DecodeError, DecodeStats, FrameDecoder};
use crate::frame::{Body, Frame, MAX_FRAME};

/// The device's monotonic clock. embedded-hal 1.0 has none, so the board provides it (a
/// SysTick counter, an RTC, embassy-time...).
pub trait Clock {
    /// Now, in microseconds since an arbitrary origin; never goes backwards.
    fn now(&self) -> Instant;
}

/// What a device link saw besides decoded frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub struct LinkStats {
    /// The decoder's counts (frames, and errors by kind).
    pub decoder: DecodeStats,
    /// Well-formed frames not for this device (another device's responses on a shared line,
    /// requests echoed back).
    pub foreign: u32,
    /// Explicit "I speak another protocol version" replies from the gateway.
    pub version_mismatches: u32,
    /// Requests whose frame could not be written (reported to the lease as transport errors).
    pub write_errors: u32,
}

/// State shared by the blocking and async links: the machine, the key, the codec.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) lease: Lease,
    key: Key,
    device: u32,
    seq: u16,
    /// The last request sent, by frame sequence number, so a version-mismatch reply (which
    /// echoes the frame, not the request) can be reported against it.
    sent: Option<(u16, RequestId)>,
    decoder: FrameDecoder,
    stats: LinkStats,
}

impl Core {
    pub(crate) fn new(lease: Lease, key: Key, device: u32) -> Self {
        Core {
            lease,
            key,
            device,
            seq: 0,
            sent: None,
            decoder: FrameDecoder::new(),
            stats: LinkStats::default(),
        }
    }

    pub(crate) fn feed(&mut self, now: Instant, bytes: &[u8]) {
        for &b in bytes {
            match self.decoder.push(b) {
                Some(Ok(Frame { header, body: Body::Response(r) })) if header.device == self.device => {
                    self.lease.handle_response(now, r)
                }
                Some(Ok(Frame { header, body: Body::VersionMismatch { supported } }))
                    if header.device == self.device =>
                {
                    warn!("gateway speaks protocol version {}", supported);
                    let _ = supported;
                    self.stats.version_mismatches = self.stats.version_mismatches.wrapping_add(1);
                    // The request will never be answered: say so now rather than let the
                    // machine wait out its request timeout. What happens next is its call.
                    if let Some((seq, id)) = self.sent.filter(|(seq, _)| *seq == header.seq) {
                        let _ = seq;
                        self.lease.handle_transport_error(now, id);
                    }
                }
                Some(Ok(_)) => self.stats.foreign = self.stats.foreign.wrapping_add(1),
                Some(Err(DecodeError::WrongVersion(h))) => {
                    warn!("frame of protocol version {}", h.version);
                    let _ = h;
                }
                Some(Err(_)) | None => {}
            }
        }
    }

    pub(crate) fn stats(&self) -> LinkStats {
        LinkStats { decoder: self.decoder.stats(), ..self.stats }
    }

    pub(crate) fn due(&mut self, now: Instant) {
        if self.lease.poll_timeout().is_some_and(|t| t <= now) {
            self.lease.handle_timeout(now);
        }
    }

    /// The next request as a frame, if the machine has one.
    pub(crate) fn next_frame<'b>(
        &mut self,
        now: Instant,
        buf: &'b mut [u8; MAX_FRAME],
    ) -> Option<(RequestId, &'b [u8])> {
        loop {
            let request = self.lease.poll_transmit()?;
            self.seq = self.seq.wrapping_add(1);
            let frame = Frame::new(self.seq, self.device, Body::Request { key: self.key.clone(), request });
            debug!("sending request {} as frame {}", request.id.0, self.seq);
            // Only a bug could make a frame not fit (keys are bounded); if it happens the
            // request is reported lost, as if the line had dropped it.
            let n = match frame.encode(buf) {
                Ok(bytes) => bytes.len(),
                Err(_) => {
                    self.write_failed(now, request.id);
                    continue;
                }
            };
            self.sent = Some((self.seq, request.id));
            return Some((request.id, &buf[..n]));
        }
    }

    pub(crate) fn write_failed(&mut self, now: Instant, id: RequestId) {
        warn!("request {} not sent", id.0);
        self.stats.write_errors = self.stats.write_errors.wrapping_add(1);
        self.lease.handle_transport_error(now, id);
    }
}

impl crate::outbox::Outbox for Core {
    type Tag = RequestId;

    fn next_frame<'b>(
        &mut self,
        now: Instant,
        buf: &'b mut [u8; MAX_FRAME],
    ) -> Option<(RequestId, &'b [u8])> {
        Core::next_frame(self, now, buf)
    }

    fn write_failed(&mut self, now: Instant, id: RequestId) {
        Core::write_failed(self, now, id)
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
        self.core.stats().decoder
    }

    /// The decoder's counts and the link's own (foreign frames, version mismatches, failed writes).
    pub fn link_stats(&self) -> LinkStats {
        self.core.stats()
    }

    /// Reads what the UART has, fires due timers, sends what the machine wants sent, and
    /// returns the next event for the application. Never blocks on reading.
    ///
    /// Events come one per call: call again while it returns `Ok(Some(_))`, then sleep until
    /// a byte arrives or [`poll_timeout`](DeviceLink::poll_timeout). A UART error is returned
    /// after the timers and transmissions of this call have run, so a noisy line cannot stall
    /// the machine; a failed write is also reported to the machine as a lost request.
    pub fn poll(&mut self) -> Result<Option<Event>, U::Error> {
        let now = self.clock.now();
        let read_error = self.read_available(now).err();
        self.core.due(now);
        while let Some((id, bytes)) = self.core.next_frame(now, &mut self.tx) {
            if let Err(e) = self.uart.write_all(bytes).and_then(|_| self.uart.flush()) {
                self.core.write_failed(now, id);
                return Err(e);
            }
        }
        match read_error {
            Some(e) => Err(e),
            None => Ok(self.core.lease.poll_event()),
        }
    }

    fn read_available(&mut self, now: Instant) -> Result<(), U::Error> {
        let mut chunk = [0u8; 32];
        while self.uart.read_ready()? {
            let n = self.uart.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            self.core.feed(now, &chunk[..n]);
        }
        Ok(())
    }
}
