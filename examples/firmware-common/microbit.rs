//! QEMU's microbit (BBC micro:bit, nRF51822, Cortex-M0, thumbv6m): UART0 by its raw
//! registers, the clock is TIMER0 as a free-running 1 MHz counter, and SysTick wakes the main
//! loop at 1 kHz and calls the crate's `on_tick()`. Needs `crate::support`.
//!
//! The clock is read from the counter, never counted from interrupts: QEMU's SysTick model
//! loses ticks (992 Hz for 1 kHz, 854 Hz under load), which is harmless for wake-ups and the
//! one thing a lease holder's clock must never do. The counter is 32 bits wide and wraps every
//! 71.6 minutes; [`TimerClock`] extends it to 64 bits, which needs a read at least that often
//! (the main loop reads it every millisecond). ARMv6-M has no atomic read-modify-write, and
//! none is needed: only the main loop reads the clock.

use core::cell::Cell;

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::exception;
use leasehold_core::Instant;
use leasehold_serial::Clock;

use crate::support::{reg_read, reg_write};

/// The name the firmware boots with.
pub const NAME: &str = "microbit";

/// Starts the clock, the wake-up tick and the UART.
pub fn init(cp: &mut cortex_m::Peripherals) -> (Uart, TimerClock) {
    // The counter first: without a running timer QEMU's loop is not woken for UART input,
    // and the first byte can take a second to arrive.
    let clock = TimerClock::start();
    let syst = &mut cp.SYST;
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(CORE_HZ / 1_000 - 1);
    syst.clear_current();
    syst.enable_interrupt();
    syst.enable_counter();
    (Uart::new(), clock)
}

/// The nRF51's core clock as QEMU models SysTick.
const CORE_HZ: u32 = 16_000_000;

#[exception]
fn SysTick() {
    // Wakes the main loop from `wfi`.
    crate::on_tick();
}

// ----- UART0 at 0x4000_2000 -----

const UART0: usize = 0x4000_2000;
const STARTRX: usize = 0x000;
const STARTTX: usize = 0x008;
const EVENTS_RXDRDY: usize = 0x108;
const EVENTS_TXDRDY: usize = 0x11C;
const ENABLE: usize = 0x500;
const RXD: usize = 0x518;
const TXD: usize = 0x51C;
/// ENABLE's value for "UART" (until it is written, the peripheral ignores everything).
const ENABLE_UART: u32 = 4;

/// UART0, polled. Pin selection and baud rate are only stored by QEMU, so they are not set.
pub struct Uart;

impl Uart {
    fn new() -> Uart {
        reg_write(UART0 + ENABLE, ENABLE_UART);
        reg_write(UART0 + STARTRX, 1);
        reg_write(UART0 + STARTTX, 1);
        Uart
    }
    fn rx_ready() -> bool {
        reg_read(UART0 + EVENTS_RXDRDY) != 0
    }
}

impl embedded_io::ErrorType for Uart {
    type Error = core::convert::Infallible;
}

impl embedded_io::ReadReady for Uart {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        Ok(Uart::rx_ready())
    }
}

impl embedded_io::Read for Uart {
    /// Blocks until at least one byte is there, then returns what has arrived. The event is
    /// cleared *before* RXD is read, so a byte that lands in between raises it again.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        if buf.is_empty() {
            return Ok(0);
        }
        while !Uart::rx_ready() {}
        let mut n = 0;
        for slot in buf.iter_mut() {
            if !Uart::rx_ready() {
                break;
            }
            reg_write(UART0 + EVENTS_RXDRDY, 0);
            *slot = reg_read(UART0 + RXD) as u8;
            n += 1;
        }
        Ok(n)
    }
}

impl embedded_io::Write for Uart {
    /// One byte at a time: a write to TXD while a byte is pending is dropped.
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        for &b in buf {
            reg_write(UART0 + EVENTS_TXDRDY, 0);
            reg_write(UART0 + TXD, u32::from(b));
            while reg_read(UART0 + EVENTS_TXDRDY) == 0 {}
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

// ----- Clock: TIMER0 as a 32-bit counter at 1 MHz -----

const TIMER0: usize = 0x4000_8000;
const TASKS_START: usize = 0x000;
const TASKS_CAPTURE0: usize = 0x040;
const BITMODE: usize = 0x508;
const PRESCALER: usize = 0x510;
const CC0: usize = 0x540;
/// 16 MHz >> 4.
const PRESCALE_1MHZ: u32 = 4;
const BITMODE_32: u32 = 3;

/// Microseconds from TIMER0, extended to 64 bits by counting wraps as they are observed.
pub struct TimerClock {
    /// (wraps seen, last raw reading).
    last: Cell<(u32, u32)>,
}

impl TimerClock {
    fn start() -> TimerClock {
        reg_write(TIMER0 + PRESCALER, PRESCALE_1MHZ);
        reg_write(TIMER0 + BITMODE, BITMODE_32);
        reg_write(TIMER0 + TASKS_START, 1);
        TimerClock { last: Cell::new((0, 0)) }
    }
}

impl Clock for TimerClock {
    fn now(&self) -> Instant {
        reg_write(TIMER0 + TASKS_CAPTURE0, 1);
        let raw = reg_read(TIMER0 + CC0);
        let (mut wraps, last) = self.last.get();
        if raw < last {
            wraps = wraps.wrapping_add(1);
        }
        self.last.set((wraps, raw));
        Instant::from_micros((u64::from(wraps) << 32) | u64::from(raw))
    }
}
