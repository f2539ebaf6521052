//! QEMU's lm3s6965evb (Cortex-M3, thumbv7m): UART0 is a PL011, the clock is SysTick's cycle
//! counter, and General-Purpose Timer 0A wakes the main loop at 1 kHz and calls the crate's
//! `on_tick()` (the embassy firmware runs its timers from there). Needs `crate::support`.
//!
//! Its clock is SysTick's cycle counter, whose interrupt only counts 1.34 s wraps: the lease's
//! safety needs a clock that never runs slow, and QEMU drops interrupts, not counter cycles.
//! Timer 0A's 1 kHz interrupt only wakes the main loop, where losing one is harmless.

use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m::peripheral::{NVIC, SCB, SYST};
use cortex_m_rt::exception;
use leasehold_core::Instant;
use leasehold_serial::Clock;

/// The name the firmware boots with.
pub const NAME: &str = "lm3s6965evb";

/// Starts the clock, the wake-up timer and the UART.
pub fn init(cp: &mut cortex_m::Peripherals) -> (Uart, SysTickClock) {
    let clock = SysTickClock::start(&mut cp.SYST);
    start_wakeup_timer(&mut cp.NVIC);
    (Uart::new(), clock)
}

use crate::support::{reg_read, reg_write};

// ----- UART0: a PL011 at 0x4000_C000 -----

const UART0: usize = 0x4000_C000;
const DR: usize = 0x00;
const FR: usize = 0x18;
const LCRH: usize = 0x2C;
const CR: usize = 0x30;
/// 8 data bits, FIFOs on. Without the FIFO QEMU's PL011 holds one byte, and the emulator hands
/// over the next only after the firmware took it, once per wake-up: a 16-byte reply took
/// 16 ms. With it, a whole frame waits in the 16-byte FIFO.
const LCRH_8BIT_FIFO: u32 = 0x70;
const FR_RXFE: u32 = 1 << 4;
const FR_TXFF: u32 = 1 << 5;

pub struct Uart;

impl Uart {
    fn new() -> Uart {
        reg_write(UART0 + LCRH, LCRH_8BIT_FIFO);
        // Enable UART, TX and RX.
        reg_write(UART0 + CR, 0x301);
        Uart
    }
    fn flags(&self) -> u32 {
        reg_read(UART0 + FR)
    }
}

impl embedded_io::ErrorType for Uart {
    type Error = core::convert::Infallible;
}

impl embedded_io::ReadReady for Uart {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        Ok(self.flags() & FR_RXFE == 0)
    }
}

impl embedded_io::Read for Uart {
    /// Blocks until at least one byte is there, then returns what the FIFO holds.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.flags() & FR_RXFE != 0 {}
        let mut n = 0;
        for slot in buf.iter_mut() {
            if self.flags() & FR_RXFE != 0 {
                break;
            }
            *slot = reg_read(UART0 + DR) as u8;
            n += 1;
        }
        Ok(n)
    }
}

impl embedded_io::Write for Uart {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        for &b in buf {
            while self.flags() & FR_TXFF != 0 {}
            reg_write(UART0 + DR, u32::from(b));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

// ----- Clock: SysTick's cycle counter; its interrupt only counts wraps -----

/// The lm3s6965 core clock after reset as QEMU models it (PLL 200 MHz / 16). Measured: with
/// 12 MHz assumed, the device counted 1.000 s per 0.961 s of host time. The QEMU end-to-end
/// test checks the rate stays within ε of the host's, since the lease's safety depends on it.
const CORE_HZ: u32 = 12_500_000;
/// SysTick's largest reload: it wraps every 2^24 cycles, 1.34 s at CORE_HZ.
const SYST_RELOAD: u32 = 0x00FF_FFFF;
static WRAPS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    // Load and store, not `fetch_add` (which ARMv6-M lacks): this handler is the only writer,
    // and it cannot preempt itself.
    WRAPS.store(WRAPS.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

/// Time is read from the down-counter, which QEMU computes from its virtual clock, so it never
/// falls behind. Counting interrupts does: QEMU merges those that come due while the vCPU is
/// busy or stalled (semihosting writes, UART traffic), and counting a 1 kHz tick ran at 0.989
/// of host time, the unsafe direction for a lease holder. Interrupts now only carry the count
/// past 2^24 cycles; merging two of them would take a 1.34 s stall.
pub struct SysTickClock;

impl SysTickClock {
    /// Starts SysTick; the clock is valid once it returns.
    fn start(syst: &mut SYST) -> SysTickClock {
        syst.set_clock_source(SystClkSource::Core);
        syst.set_reload(SYST_RELOAD);
        syst.clear_current();
        syst.enable_interrupt();
        syst.enable_counter();
        // The counter reads 0 until it first loads SYST_RELOAD, and that load is no wrap. Real
        // hardware takes one cycle; QEMU waits for its main loop, which can take milliseconds
        // under load, and a 0 read meanwhile would put time 1.34 s ahead, then back.
        while SYST::get_current() == 0 {}
        SysTickClock
    }
}

impl Clock for SysTickClock {
    fn now(&self) -> Instant {
        // Masked, so the handler cannot count a wrap between the reads.
        let cycles = cortex_m::interrupt::free(|_| {
            let mut wraps = u64::from(WRAPS.load(Ordering::Relaxed));
            let mut val = SYST::get_current();
            // A wrap the handler has not counted yet (masked by us, or just happened): re-read,
            // since `val` may be from before it, and count it, unless the counter still reads
            // 0: hardware pends as it reaches 0, one cycle before reloading (QEMU on reload).
            if SCB::is_pendst_pending() {
                val = SYST::get_current();
                if val != 0 {
                    wraps += 1;
                }
            }
            wraps * u64::from(SYST_RELOAD + 1) + u64::from(SYST_RELOAD - val)
        });
        // From total cycles, so rounding never accumulates; split so it cannot overflow.
        let hz = u64::from(CORE_HZ);
        Instant::from_micros(cycles / hz * 1_000_000 + cycles % hz * 1_000_000 / hz)
    }
}

// ----- Wake-ups: General-Purpose Timer 0A, periodic at 1 kHz -----
//
// The main loop sleeps in `wfi` and polls the UART and its deadlines when woken. A lost or
// merged wake-up only delays that poll; time comes from SysTick above. QEMU runs the GPTM
// from the same system clock, and its interrupt is a level, held until cleared.

const SYSCTL_RCGC1: usize = 0x400F_E104;
const RCGC1_TIMER0: u32 = 1 << 16;
const TIMER0: usize = 0x4003_0000;
const GPTMCFG: usize = 0x000;
const GPTMTAMR: usize = 0x004;
const GPTMCTL: usize = 0x00C;
const GPTMIMR: usize = 0x018;
const GPTMICR: usize = 0x024;
const GPTMTAILR: usize = 0x028;
const TAMR_PERIODIC: u32 = 0x2;
const CTL_TAEN: u32 = 1 << 0;
const TATO: u32 = 1 << 0;
/// "Timer 0A" in the LM3S6965's interrupt table.
const TIMER0A_IRQ: usize = 19;

fn start_wakeup_timer(nvic: &mut NVIC) {
    reg_write(SYSCTL_RCGC1, reg_read(SYSCTL_RCGC1) | RCGC1_TIMER0);
    reg_write(TIMER0 + GPTMCTL, 0);
    reg_write(TIMER0 + GPTMCFG, 0); // one 32-bit timer
    reg_write(TIMER0 + GPTMTAMR, TAMR_PERIODIC);
    reg_write(TIMER0 + GPTMTAILR, CORE_HZ / 1_000 - 1);
    reg_write(TIMER0 + GPTMIMR, TATO);
    reg_write(TIMER0 + GPTMCTL, CTL_TAEN);
    unsafe { nvic.iser[TIMER0A_IRQ / 32].write(1 << (TIMER0A_IRQ % 32)) };
}

extern "C" fn timer0a() {
    reg_write(TIMER0 + GPTMICR, TATO);
    crate::on_tick();
}

// No device crate: this is the device-specific part of the vector table, up to the one
// interrupt we use (cortex-m-rt's `device` feature; build.rs provides an empty device.x).
extern "C" {
    fn DefaultHandler();
}

#[link_section = ".vector_table.interrupts"]
#[no_mangle]
static __INTERRUPTS: [unsafe extern "C" fn(); TIMER0A_IRQ + 1] = {
    let mut v: [unsafe extern "C" fn(); TIMER0A_IRQ + 1] = [DefaultHandler; TIMER0A_IRQ + 1];
    v[TIMER0A_IRQ] = timer0a;
    v
};
