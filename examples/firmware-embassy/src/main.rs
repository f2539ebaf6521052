//! The pump controller of firmware-pump on embassy, on QEMU's lm3s6965evb (Cortex-M3): tasks
//! on `embassy-executor`, and an `embassy-time` driver over the board's clock.
//!
//! On protocol v1 (the default, src/lease.rs), two tasks:
//! - The link task owns the `AsyncDeviceLink` and waits in `next_event`, in a `select`
//!   against a release request and its re-acquire timer: `next_event` is cancel-safe, so
//!   losing that race costs nothing.
//! - The pump task acts every 100 ms while the lease is valid, reading the validity and the
//!   fence from a `LeaseWatch` the link publishes to, since the link itself is borrowed by
//!   its waiting task. A period after its eighth action it asks the link task to release.
//!
//! With the `sessions` feature it runs protocol v2 instead (src/sessions.rs): firmware-pump's
//! session storyline, "pump" then "valve" in one session, on the async `AsyncSessionLink`,
//! with a `SessionWatch` in place of the `LeaseWatch` and a third task logging renewals. Build
//! it into its own target directory so it never overwrites the v1 ELF:
//! `cargo build --release --features sessions --target-dir target/sessions`.
//!
//! Time: `embassy-time`'s driver reads SysTick's cycle counter (the same clock as
//! firmware-pump, `firmware-common/lm3s6965evb.rs`) at 1 MHz, and wakes expired timers from
//! Timer 0A's 1 kHz interrupt, which also wakes the UART reader when bytes wait in the FIFO:
//! timers and reads are late by at most a millisecond, and the lease's validity never depends
//! on them (it is computed from the clock).
//!
//! Run it as firmware-pump, with `target/thumbv7m-none-eabi/release/firmware-embassy`.

#![no_std]
#![no_main]

#[path = "../../firmware-common/lm3s6965evb.rs"]
mod board;
// Each build uses only part of it.
#[allow(dead_code)]
#[path = "../../firmware-common/support.rs"]
mod support;

use core::cell::RefCell;
use core::convert::Infallible;
use core::task::{Poll, Waker};

use cortex_m_rt::entry;
use critical_section::Mutex;
use embassy_executor::Executor;
use embassy_sync::waitqueue::AtomicWaker;
use embassy_time_driver::Driver;
use leasehold_core::Instant;
use leasehold_serial::Clock;
use support::{fail, paint_stack};

// ----- embassy-time: SysTick's counter for now(), Timer 0A's tick for alarms -----

/// Timers waiting at once: the pump's `Timer`, the link's `Delay` and its re-acquire (or, on
/// sessions, end-of-pause) `Timer`.
const TIMERS: usize = 4;

/// The timer queue: who to wake, and when. A fixed table rather than embassy-time-queue-utils:
/// its integrated queue panics on a waker not made by embassy-executor, and its generic one
/// unwraps, while a full table here only wakes a timer early (which embassy allows: a woken
/// timer that is not due yet registers again).
struct Alarms([Option<(u64, Waker)>; TIMERS]);

impl Alarms {
    fn schedule(&mut self, at: u64, waker: &Waker) {
        if let Some(slot) = self.0.iter_mut().flatten().find(|(_, w)| w.will_wake(waker)) {
            slot.0 = slot.0.min(at);
            return;
        }
        // A free slot, or else the earliest timer's, which is woken now.
        let free = self.0.iter().position(Option::is_none);
        let earliest = || {
            let due = self.0.iter().enumerate().min_by_key(|(_, s)| s.as_ref().map_or(0, |(t, _)| *t));
            due.map_or(0, |(i, _)| i)
        };
        let i = free.unwrap_or_else(earliest);
        if let Some(slot) = self.0.get_mut(i) {
            if let Some((_, displaced)) = slot.replace((at, waker.clone())) {
                displaced.wake();
            }
        }
    }

    /// Wakes every timer due at `now`.
    fn expire(&mut self, now: u64) {
        for slot in self.0.iter_mut() {
            if slot.as_ref().is_some_and(|(at, _)| *at <= now) {
                if let Some((_, w)) = slot.take() {
                    w.wake();
                }
            }
        }
    }
}

struct TimeDriver {
    alarms: Mutex<RefCell<Alarms>>,
}

impl Driver for TimeDriver {
    fn now(&self) -> u64 {
        board::SysTickClock.now().as_micros()
    }

    fn schedule_wake(&self, at: u64, waker: &Waker) {
        critical_section::with(|cs| {
            // Inside a critical section nothing else holds the table; try_borrow_mut only
            // avoids RefCell's panic path.
            if let Ok(mut alarms) = self.alarms.borrow(cs).try_borrow_mut() {
                alarms.schedule(at, waker);
            }
        });
    }
}

embassy_time_driver::time_driver_impl!(static DRIVER: TimeDriver = TimeDriver {
    alarms: Mutex::new(RefCell::new(Alarms([const { None }; TIMERS]))),
});

/// From the board's 1 kHz interrupt: wakes expired timers and a reader whose bytes have come.
fn on_tick() {
    let now = DRIVER.now();
    critical_section::with(|cs| {
        if let Ok(mut alarms) = DRIVER.alarms.borrow(cs).try_borrow_mut() {
            alarms.expire(now);
        }
    });
    if embedded_io::ReadReady::read_ready(&mut board::Uart).unwrap_or(false) {
        RX_WAKER.wake();
    }
}

fn now() -> Instant {
    Instant::from_micros(embassy_time::Instant::now().as_micros())
}

fn at(t: Instant) -> embassy_time::Instant {
    embassy_time::Instant::from_micros(t.as_micros())
}

// ----- UART0 for embedded-io-async: reads wait for the tick to see bytes in the FIFO -----

static RX_WAKER: AtomicWaker = AtomicWaker::new();

struct AsyncUart(board::Uart);

impl embedded_io::ErrorType for AsyncUart {
    type Error = Infallible;
}

impl embedded_io_async::Read for AsyncUart {
    /// Cancel-safe: bytes leave the FIFO only in the poll that returns them.
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Infallible> {
        use embedded_io::{Read, ReadReady};
        core::future::poll_fn(|cx| {
            // Register first, then look: a byte that lands in between still wakes us.
            RX_WAKER.register(cx.waker());
            match self.0.read_ready() {
                Ok(true) => Poll::Ready(self.0.read(buf)),
                _ => Poll::Pending,
            }
        })
        .await
    }
}

impl embedded_io_async::Write for AsyncUart {
    /// The PL011's transmit FIFO drains at once in QEMU: writing blocks for microseconds at
    /// most, and a write is never left half done.
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Infallible> {
        embedded_io::Write::write(&mut self.0, buf)
    }
    async fn flush(&mut self) -> Result<(), Infallible> {
        Ok(())
    }
}

// ----- The tasks: protocol v1 (src/lease.rs) or v2 sessions (src/sessions.rs) -----

#[cfg(not(feature = "sessions"))]
mod lease;
#[cfg(not(feature = "sessions"))]
use lease as tasks;
#[cfg(feature = "sessions")]
mod sessions;
#[cfg(feature = "sessions")]
use sessions as tasks;

#[entry]
fn main() -> ! {
    paint_stack();
    let mut cp = cortex_m::Peripherals::take().unwrap_or_else(|| fail());
    let (uart, clock) = board::init(&mut cp);
    let executor = cortex_m::singleton!(: Executor = Executor::new()).unwrap_or_else(|| fail());
    executor.run(|spawner| tasks::spawn(spawner, AsyncUart(uart), clock))
}
