//! What every firmware here needs besides its board: register access, the stack's
//! high-water mark, a log over semihosting without `core::fmt`, the device id from the
//! emulator's command line, and the panic handler. Included by each firmware's main.rs as
//! `mod support` (`#[path]`); every index is checked (`get`), so none of it links a panic path.

use cortex_m_semihosting::{debug, hio, nr};
use leasehold_core::resource::{AdmitError, HighWater};
use leasehold_core::session::wire::{parse_label, Label};
use leasehold_core::session::Session;
use leasehold_core::{parse_key, Config, Duration, Event, Fence, Instant, Key, Lease, OwnerId};

// ----- The pump: the same policy on every firmware, so the end-to-end test reads all alike -----

pub const TTL: Duration = Duration::from_millis(1_000);
/// One pump action every 100 ms while holding, eight per holding, a release one period after
/// the last (so the action has finished), then a pause.
pub const ACT_EVERY: Duration = Duration::from_millis(100);
pub const ACTS_PER_HOLD: u32 = 8;
pub const PAUSE: Duration = Duration::from_millis(300);
/// Act only with at least this much validity left.
pub const ACT_GUARD: Duration = Duration::from_millis(50);

/// The device's lease on "pump": its id and a nonce from the command line make the owner.
/// Returns the device id, the lease, the key and the lease's validity per grant. Logs BOOT.
pub fn pump_lease(board: &str, runtime: &str) -> (u32, Lease, Key, Duration) {
    let [device, nonce, _] = boot_args();
    let owner = OwnerId((u64::from(device) << 32) | u64::from(nonce));
    let mut config = Config::new(TTL);
    config.jitter_seed = u64::from(nonce) ^ u64::from(device);
    let Ok(lease) = Lease::new(owner, config) else { fail() };
    let Ok(key) = parse_key("pump") else { fail() };
    Line::new("BOOT device ").num(u64::from(device)).push(" board ").push(board).push(runtime).say();
    (device, lease, key, config.validity(TTL))
}

/// Logs a lease event; returns when to ask again if the lease is gone or was not granted.
/// `asked_at` is when we last asked (ask-to-grant time is the round trip when the key is free).
pub fn log_event(event: &Event, now: Instant, asked_at: Instant, validity: Duration) -> Option<Instant> {
    match *event {
        Event::Acquired { fence, .. } => {
            Line::new("ACQUIRED ").num(fence.0).push(" after_us ").num((now - asked_at).as_micros()).say();
            None
        }
        Event::Lost { fence, .. } => {
            Line::new("LOST ").num(fence.0).say();
            Some(now + PAUSE)
        }
        Event::Released { fence, .. } => {
            Line::new("RELEASED ").num(fence.0).say();
            Some(now + PAUSE)
        }
        Event::NotAcquired { .. } => Some(now + PAUSE),
        Event::Renewed { valid_until, .. } => {
            // valid_until = renewal send time + validity, so this is the exact round trip.
            let sent = valid_until - validity;
            Line::new("RENEWED rtt_us ").num((now - sent).as_micros()).say();
            None
        }
    }
}

/// Logs the clock and the stack's high-water mark once a second; returns the next time.
pub fn report(now: Instant, due: Instant) -> Instant {
    if now < due {
        return due;
    }
    Line::new("CLOCK ").num(now.as_micros()).say();
    Line::new("STACK ").num(stack_high_water() as u64).say();
    now + Duration::from_secs(1)
}

// ----- The pump's actuator -----

/// The pump's actuator: the resource the fence protects. The controller's lease says when it
/// may command; the actuator keeps, in RAM, the highest fence it has obeyed and refuses a
/// command under a lower one (a command that sat in a queue, or was replayed), by core's rule
/// (`HighWater::admit`), the one the SQL adapter and the demo apply too.
pub struct Actuator {
    /// What it drives, for its refusals in the log ("" on the v1 pump, which has one).
    name: &'static str,
    mark: HighWater,
}

impl Actuator {
    pub const fn new(name: &'static str) -> Actuator {
        Actuator { name, mark: HighWater::NONE }
    }

    /// Admits a command of `holder`'s grant `fence`, or refuses it and says so ("REFUSED
    /// [NAME ]fence F below M", or "REFUSED [NAME ]fence F" when no grant could have sent it).
    pub fn admit(&mut self, fence: Fence, holder: OwnerId) -> bool {
        match self.mark.admit(fence, holder) {
            Ok(mark) => {
                self.mark = mark;
                return true;
            }
            Err(AdmitError::Stale { high_water, .. }) => {
                Line::new("REFUSED ")
                    .push(self.name)
                    .push("fence ")
                    .num(fence.0)
                    .push(" below ")
                    .num(high_water.0)
                    .say();
            }
            Err(_) => {
                Line::new("REFUSED ").push(self.name).push("fence ").num(fence.0).say();
            }
        }
        false
    }
}

// ----- The pump on sessions (protocol v2): the same policy on every session firmware -----

/// The session's ttl. Keepalives go every ttl/4 = 1 s, and a waiter's keepalive is held at
/// most as long: a pushed hand-off is milliseconds, a polled one would average half a second.
pub const SESSION_TTL: Duration = Duration::from_millis(4_000);
/// Actions per holding of both keys: 5 s of holding, longer than the ttl, so the keys must be
/// renewed.
pub const SESSION_ACTS_PER_HOLD: u32 = 50;
/// The keys a session pump holds at once: "pump", then "valve".
pub const SESSION_KEYS: usize = 2;
/// Keys it observes: none. The session machine's room for observations is most of its size
/// (7.4 KB of stack for 16, 1.3 KB for none).
pub const SESSION_OBSERVED: usize = 0;

/// The session pump's machine (not yet opened), labelled "pump-DEVICE", configured as
/// `leasehold_client::Options::session`. Returns the device id, the machine, its validity per
/// ttl and whether REPLAY was asked for. Logs BOOT.
pub fn pump_session(
    board: &str,
    runtime: &str,
) -> (u32, Session<SESSION_KEYS, SESSION_OBSERVED>, Duration, bool) {
    let [device, nonce, replay] = boot_args();
    let mut config = Config::new(SESSION_TTL);
    // A keepalive every ttl/4 (also the longest the gateway holds one), a request timeout of
    // ttl/3, longer than that hold.
    config.renew_every = SESSION_TTL.mul_div_floor(1, 4);
    config.request_timeout = SESSION_TTL.mul_div_floor(1, 3);
    config.jitter_seed = u64::from(nonce) ^ u64::from(device);
    let Ok(session) = Session::new(session_label(device), config) else { fail() };
    Line::new("BOOT device ")
        .num(u64::from(device))
        .push(" board ")
        .push(board)
        .push(runtime)
        .push(" sessions")
        .say();
    (device, session, config.validity(SESSION_TTL), replay == 1)
}

/// The session's label: "pump-DEVICE" (the end-to-end test finds a board's session by it).
fn session_label(device: u32) -> Label {
    let mut line = Line::new("pump-");
    line.num(u64::from(device));
    let text = line.buf.get(..line.len).and_then(|b| core::str::from_utf8(b).ok()).unwrap_or("pump");
    parse_label(text).unwrap_or_else(|_| fail())
}

// ----- Memory-mapped peripheral registers -----

pub fn reg_read(addr: usize) -> u32 {
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

pub fn reg_write(addr: usize, value: u32) {
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
pub fn paint_stack() {
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

pub struct Line {
    buf: [u8; 64],
    len: usize,
}

impl Line {
    pub fn new(s: &str) -> Line {
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
    pub fn push(&mut self, s: &str) -> &mut Line {
        for &b in s.as_bytes() {
            self.byte(b);
        }
        self
    }
    pub fn num(&mut self, mut n: u64) -> &mut Line {
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
    pub fn say(&mut self) {
        self.push("\n");
        if let (Ok(mut out), Some(line)) = (hio::hstdout(), self.buf.get(..self.len)) {
            let _ = out.write_all(line);
        }
    }
}

/// "DEVICE NONCE [REPLAY]" from the emulator's `-append` (QEMU puts the kernel path first):
/// device 1 and nonce 0 if missing, REPLAY 0 if missing. A REPLAY of 1 asks the pump firmware
/// to replay one stale actuator command (see its main.rs).
pub fn boot_args() -> [u32; 3] {
    let mut buf = [0u8; 128];
    let mut block = [buf.as_mut_ptr() as usize, buf.len()];
    let r = unsafe { cortex_m_semihosting::syscall1(nr::GET_CMDLINE, block.as_mut_ptr() as usize) };
    if r != 0 {
        return [1, 0, 0];
    }
    let len = unsafe { core::ptr::read_volatile(&block[1]) };
    let mut nums = buf.get(..len).unwrap_or(&[]).split(|&b| b == b' ').filter_map(|w| {
        if w.is_empty() || !w.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(w.iter().fold(0u32, |a, &d| a.wrapping_mul(10).wrapping_add(u32::from(d - b'0'))))
    });
    [nums.next().unwrap_or(1), nums.next().unwrap_or(0), nums.next().unwrap_or(0)]
}

/// Ends the emulator with a failure exit status.
pub fn fail() -> ! {
    debug::exit(debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::wfi();
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    fail()
}
