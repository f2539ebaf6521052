//! A pump controller on an emulated board. It acts ("pump on") only while it holds the lease
//! "pump", which it takes through leasehold-serial over UART0 and a host gateway.
//! Semihosting carries its log to the emulator's stdout and its device id in.
//!
//! Two boards, chosen by feature (each has its own module: UART, clock, wake-ups):
//! - `lm3s6965evb` (default): QEMU's lm3s6965evb, Cortex-M3, `thumbv7m-none-eabi`;
//! - `microbit`: QEMU's microbit (nRF51822), Cortex-M0, `thumbv6m-none-eabi`:
//!   `cargo build --release --no-default-features --features microbit --target thumbv6m-none-eabi`.
//!
//! The release build has no panic path: nothing in it can reach the panic handler, and the
//! end-to-end test (`cli/tests/qemu.rs`) reads the ELF's symbols to prove it.
//!
//! Run: `qemu-system-arm -M lm3s6965evb -nographic -monitor none
//!   -semihosting-config enable=on,target=native -serial tcp:127.0.0.1:PORT,server=on,wait=on,nodelay=on
//!   -kernel target/thumbv7m-none-eabi/release/firmware-pump -append "DEVICE NONCE"`
//! (or `-M microbit` and the thumbv6m build), then
//! `leasehold gateway --link tcp:127.0.0.1:PORT --server URL`.

#![no_std]
#![no_main]

#[cfg(all(feature = "lm3s6965evb", feature = "microbit"))]
compile_error!("choose one board: `--no-default-features --features microbit` for the micro:bit");

#[cfg_attr(feature = "microbit", path = "microbit.rs")]
#[cfg_attr(not(feature = "microbit"), path = "lm3s6965evb.rs")]
mod board;

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hio, nr};
use leasehold_core::{parse_key, Config, Duration, Event, Instant, Lease, OwnerId};
use leasehold_serial::DeviceLink;

const TTL: Duration = Duration::from_millis(1_000);
/// One pump action every 100 ms while holding, eight per holding, then a pause.
const ACT_EVERY: Duration = Duration::from_millis(100);
const ACTS_PER_HOLD: u32 = 8;
const PAUSE: Duration = Duration::from_millis(300);
/// Act only with at least this much validity left.
const ACT_GUARD: Duration = Duration::from_millis(50);

// ----- Memory-mapped peripheral registers -----

fn reg_read(addr: usize) -> u32 {
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn reg_write(addr: usize, value: u32) {
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

// ----- Stack high-water mark: paint the free stack at boot, find the deepest overwrite -----

const PAINT: u32 = 0xACCE_55ED;

extern "C" {
    /// cortex-m-rt's linker script: the top of the stack and its lowest address (the end of
    /// .bss/.uninit; nothing else lives between).
    static _stack_start: u32;
    static _stack_end: u32;
}

fn stack_bounds() -> (usize, usize) {
    (core::ptr::addr_of!(_stack_end) as usize, core::ptr::addr_of!(_stack_start) as usize)
}

/// Paints from the stack's lowest address up to a little below the current frame.
fn paint_stack() {
    let (bottom, _) = stack_bounds();
    let below_us = (cortex_m::register::msp::read() as usize).saturating_sub(64) & !3;
    let mut p = bottom;
    while p < below_us {
        unsafe { core::ptr::write_volatile(p as *mut u32, PAINT) };
        p += 4;
    }
}

/// The most stack ever used, in bytes: from the top down to the lowest word not still painted.
fn stack_high_water() -> usize {
    let (bottom, top) = stack_bounds();
    let mut p = bottom;
    while p < top && unsafe { core::ptr::read_volatile(p as *const u32) } == PAINT {
        p += 4;
    }
    top - p
}

// ----- Output over semihosting, without core::fmt -----

struct Line {
    buf: [u8; 64],
    len: usize,
}

impl Line {
    fn new(s: &str) -> Line {
        let mut l = Line { buf: [0; 64], len: 0 };
        l.push(s);
        l
    }
    /// Bytes past the buffer are dropped. Every index here is checked with `get`: a bounds
    /// check the compiler cannot remove would link a panic path (see the crate docs).
    fn byte(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }
    fn push(&mut self, s: &str) -> &mut Line {
        for &b in s.as_bytes() {
            self.byte(b);
        }
        self
    }
    fn num(&mut self, mut n: u64) -> &mut Line {
        // Least significant first, then pushed in reverse.
        let mut digits = [0u8; 20];
        let mut len = 0;
        for d in digits.iter_mut() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
            len += 1;
            if n == 0 {
                break;
            }
        }
        for &d in digits.iter().take(len).rev() {
            self.byte(d);
        }
        self
    }
    fn say(&mut self) {
        self.push("\n");
        if let (Ok(mut out), Some(line)) = (hio::hstdout(), self.buf.get(..self.len)) {
            let _ = out.write_all(line);
        }
    }
}

/// "DEVICE NONCE" from the emulator's `-append`; QEMU puts the kernel path first.
fn device_and_nonce() -> (u32, u32) {
    let mut buf = [0u8; 128];
    let mut block = [buf.as_mut_ptr() as usize, buf.len()];
    let r = unsafe { cortex_m_semihosting::syscall1(nr::GET_CMDLINE, block.as_mut_ptr() as usize) };
    if r != 0 {
        return (1, 0);
    }
    let len = unsafe { core::ptr::read_volatile(&block[1]) };
    let mut nums = buf.get(..len).unwrap_or(&[]).split(|&b| b == b' ').filter_map(|w| {
        if w.is_empty() || !w.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(w.iter().fold(0u32, |a, &d| a.wrapping_mul(10).wrapping_add(u32::from(d - b'0'))))
    });
    (nums.next().unwrap_or(1), nums.next().unwrap_or(0))
}

#[entry]
fn main() -> ! {
    paint_stack();
    let mut cp = cortex_m::Peripherals::take().unwrap_or_else(|| fail());
    let (uart, clock) = board::init(&mut cp);

    let (device, nonce) = device_and_nonce();
    let owner = OwnerId((u64::from(device) << 32) | u64::from(nonce));
    let mut config = Config::new(TTL);
    config.jitter_seed = u64::from(nonce) ^ u64::from(device);
    let Ok(lease) = Lease::new(owner, config) else { fail() };
    let Ok(key) = parse_key("pump") else { fail() };
    let mut link = DeviceLink::new(uart, clock, lease, key, device);
    Line::new("BOOT device ").num(u64::from(device)).push(" board ").push(board::NAME).say();

    let _ = link.acquire();
    // When we last asked: ask-to-grant time is the round trip when the key is free.
    let mut asked_at = link.now();
    let mut holding: Option<u64> = None;
    let mut acts = 0;
    let mut next_act = Instant::ZERO;
    let mut reacquire_at: Option<Instant> = None;
    let mut next_clock_report = Instant::ZERO;
    loop {
        let Ok(event) = link.poll();
        let now = link.now();
        match event {
            Some(Event::Acquired { fence, .. }) => {
                Line::new("ACQUIRED ")
                    .num(fence.0)
                    .push(" after_us ")
                    .num((now - asked_at).as_micros())
                    .say();
                holding = Some(fence.0);
                acts = 0;
                next_act = now;
            }
            Some(Event::Lost { fence, .. }) => {
                Line::new("LOST ").num(fence.0).say();
                holding = None;
                reacquire_at = Some(now + PAUSE);
            }
            Some(Event::Released { fence }) => {
                Line::new("RELEASED ").num(fence.0).say();
                reacquire_at = Some(now + PAUSE);
            }
            Some(Event::NotAcquired { .. }) => reacquire_at = Some(now + PAUSE),
            Some(Event::Renewed { valid_until, .. }) => {
                // valid_until = renewal send time + validity, so this is the exact round trip.
                let sent = valid_until - config.validity(TTL);
                Line::new("RENEWED rtt_us ").num((now - sent).as_micros()).say();
            }
            None => {}
        }
        if let Some(fence) = holding {
            if now >= next_act {
                next_act = now + ACT_EVERY;
                // The fence goes with every action; acting needs validity to spare.
                if link.remaining().is_some_and(|r| r >= ACT_GUARD) {
                    acts += 1;
                    Line::new("ACT ").num(fence).push(" ").num(u64::from(acts)).say();
                }
                if acts >= ACTS_PER_HOLD {
                    holding = None;
                    let _ = link.release();
                }
            }
        }
        if reacquire_at.is_some_and(|t| now >= t) {
            reacquire_at = None;
            asked_at = now;
            let _ = link.acquire();
        }
        if now >= next_clock_report {
            Line::new("CLOCK ").num(now.as_micros()).say();
            Line::new("STACK ").num(stack_high_water() as u64).say();
            next_clock_report = now + Duration::from_secs(1);
        }
        // The board's 1 kHz tick wakes us; UART bytes wait in its FIFO meanwhile.
        cortex_m::asm::wfi();
    }
}

fn fail() -> ! {
    debug::exit(debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::wfi();
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    fail()
}
