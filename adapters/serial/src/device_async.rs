//! The device side over `embedded-io-async`, for embassy and other async executors.

use embassy_futures::select::{select, Either};
use embedded_hal_async::delay::DelayNs;
use embedded_io_async::{Read, Write};
use leasehold_core::{AcquireError, Duration, Event, Instant, Key, Lease, ReleaseError, RequestId};

use crate::decode::DecodeStats;
use crate::device::{Clock, Core, LinkStats};
use crate::frame::MAX_FRAME;
use crate::outbox::{send_all, Sending};
use crate::watch::LeaseWatch;

/// A device's lease over an async UART (`embedded_io_async::{Read, Write}`, e.g. embassy's
/// `BufferedUart`: embassy-nrf 0.11, embassy-stm32 0.6 and embassy-rp 0.10 implement
/// embedded-io-async 0.7, this crate's version). [`next_event`](AsyncDeviceLink::next_event)
/// runs the link until the machine has something to tell the application.
///
/// Other tasks read the lease's validity through a [`LeaseWatch`] the link publishes to
/// ([`publish_to`](AsyncDeviceLink::publish_to)), since `next_event` holds `&mut self`.
#[derive(Debug)]
pub struct AsyncDeviceLink<U, C, D> {
    uart: U,
    clock: C,
    delay: D,
    core: Core,
    tx: [u8; MAX_FRAME],
    /// The frame in `tx` still being written: its request, its length, bytes written so far.
    /// Kept across calls so that a cancelled `next_event` resumes it instead of losing it.
    sending: Sending<RequestId>,
    watch: Option<&'static LeaseWatch>,
}

impl<U: Read + Write, C: Clock, D: DelayNs> AsyncDeviceLink<U, C, D> {
    /// A link for `lease` on `key`, identifying itself as `device`; `delay` sleeps until the
    /// machine's next deadline.
    pub fn new(uart: U, clock: C, delay: D, lease: Lease, key: Key, device: u32) -> Self {
        AsyncDeviceLink {
            uart,
            clock,
            delay,
            core: Core::new(lease, key, device),
            tx: [0; MAX_FRAME],
            sending: None,
            watch: None,
        }
    }

    /// From now on, keeps `watch` up to date with the lease's fence and validity, for other
    /// tasks to read while this one waits in [`next_event`](AsyncDeviceLink::next_event).
    pub fn publish_to(&mut self, watch: &'static LeaseWatch) {
        self.watch = Some(watch);
        self.publish();
    }

    /// The lease machine, for its getters.
    pub fn lease(&self) -> &Lease {
        &self.core.lease
    }

    /// How long the lease may still be relied on.
    pub fn remaining(&self) -> Option<Duration> {
        self.core.lease.remaining(self.clock.now())
    }

    /// Starts acquiring; see [`Lease::acquire`].
    pub fn acquire(&mut self) -> Result<(), AcquireError> {
        let r = self.core.lease.acquire(self.clock.now());
        self.publish();
        r
    }

    /// Gives the lease back; see [`Lease::release`]. The [`LeaseWatch`] stops showing it at once.
    pub fn release(&mut self) -> Result<(), ReleaseError> {
        let r = self.core.lease.release(self.clock.now());
        self.publish();
        r
    }

    /// What the decoder has seen.
    pub fn stats(&self) -> DecodeStats {
        self.core.stats().decoder
    }

    /// The decoder's counts and the link's own (foreign frames, version mismatches, failed writes).
    pub fn link_stats(&self) -> LinkStats {
        self.core.stats()
    }

    fn publish(&self) {
        if let Some(w) = self.watch {
            w.publish(&self.core.lease, self.clock.now());
        }
    }

    /// Drives the link until the next event.
    ///
    /// **Cancel-safe** if the UART's `read` and `write` are (drop them and no byte is lost or
    /// half-written; embedded-io-async asks implementations to be, and embassy's buffered
    /// UARTs are): dropping this future, say in a `select` against another task's signal,
    /// loses no event, no received byte and no request. Events leave the machine only when
    /// returned; bytes are fed to it as soon as a read completes; a frame being sent stays in
    /// the link and the next call finishes it. With a `write` that is not cancel-safe, a
    /// dropped call can cut a frame short: the gateway skips the fragment and the machine
    /// retries the request after its request timeout, so it costs time, never safety.
    pub async fn next_event(&mut self) -> Result<Event, U::Error> {
        let mut chunk = [0u8; 32];
        loop {
            let now = self.clock.now();
            self.core.due(now);
            self.publish();
            self.send(now).await?;
            if let Some(e) = self.core.lease.poll_event() {
                return Ok(e);
            }
            // Sleep until a byte arrives or the machine's deadline, whichever is first.
            let wait = self.core.lease.poll_timeout().map(|t| t.saturating_duration_since(now));
            let wait_us = wait.map_or(u32::MAX, |d| d.as_micros().min(u64::from(u32::MAX)) as u32);
            match select(self.uart.read(&mut chunk), self.delay.delay_us(wait_us)).await {
                Either::First(Ok(n)) => {
                    let now = self.clock.now();
                    self.core.feed(now, chunk.get(..n).unwrap_or(&chunk));
                    self.publish();
                }
                Either::First(Err(e)) => return Err(e),
                Either::Second(()) => {}
            }
        }
    }

    /// Writes the frame in progress, then every frame the machine wants sent.
    async fn send(&mut self, now: Instant) -> Result<(), U::Error> {
        send_all(&mut self.uart, &mut self.tx, &mut self.sending, &mut self.core, now).await
    }
}
