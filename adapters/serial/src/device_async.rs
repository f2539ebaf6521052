//! The device side over `embedded-io-async`, for embassy and other async executors.

use embassy_futures::select::{select, Either};
use embedded_hal_async::delay::DelayNs;
use embedded_io_async::{Read, Write};
use leasehold_core::{AcquireError, Duration, Event, Key, Lease, ReleaseError};

use crate::decode::DecodeStats;
use crate::device::{Clock, Core, LinkStats};
use crate::frame::MAX_FRAME;

/// A device's lease over an async UART (`embedded_io_async::{Read, Write}`, e.g. embassy's
/// `BufferedUart`). [`next_event`](AsyncDeviceLink::next_event) runs the link until the
/// machine has something to tell the application.
///
/// A pending read is dropped when the machine's deadline comes first, so the UART's `read`
/// must be cancel-safe (lose no bytes when dropped), as embedded-io-async encourages.
#[derive(Debug)]
pub struct AsyncDeviceLink<U, C, D> {
    uart: U,
    clock: C,
    delay: D,
    core: Core,
    tx: [u8; MAX_FRAME],
}

impl<U: Read + Write, C: Clock, D: DelayNs> AsyncDeviceLink<U, C, D> {
    /// A link for `lease` on `key`, identifying itself as `device`; `delay` sleeps until the
    /// machine's next deadline.
    pub fn new(uart: U, clock: C, delay: D, lease: Lease, key: Key, device: u32) -> Self {
        AsyncDeviceLink { uart, clock, delay, core: Core::new(lease, key, device), tx: [0; MAX_FRAME] }
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
        self.core.lease.acquire(self.clock.now())
    }

    /// Gives the lease back; see [`Lease::release`].
    pub fn release(&mut self) -> Result<(), ReleaseError> {
        self.core.lease.release(self.clock.now())
    }

    /// What the decoder has seen.
    pub fn stats(&self) -> DecodeStats {
        self.core.stats().decoder
    }

    /// The decoder's counts and the link's own (foreign frames, version mismatches, failed writes).
    pub fn link_stats(&self) -> LinkStats {
        self.core.stats()
    }

    /// Drives the link until the next event.
    pub async fn next_event(&mut self) -> Result<Event, U::Error> {
        let mut chunk = [0u8; 32];
        loop {
            let now = self.clock.now();
            self.core.due(now);
            while let Some((id, bytes)) = self.core.next_frame(now, &mut self.tx) {
                if let Err(e) = self.uart.write_all(bytes).await {
                    self.core.write_failed(now, id);
                    return Err(e);
                }
            }
            if let Some(e) = self.core.lease.poll_event() {
                return Ok(e);
            }
            // Sleep until a byte arrives or the machine's deadline, whichever is first.
            let wait = self.core.lease.poll_timeout().map(|t| t.saturating_duration_since(now));
            let wait_us = wait.map_or(u32::MAX, |d| d.as_micros().min(u64::from(u32::MAX)) as u32);
            match select(self.uart.read(&mut chunk), self.delay.delay_us(wait_us)).await {
                Either::First(Ok(n)) => {
                    let now = self.clock.now();
                    self.core.feed(now, &chunk[..n]);
                }
                Either::First(Err(e)) => return Err(e),
                Either::Second(()) => {}
            }
        }
    }
}
