//! A pump controller on an emulated board. It acts ("pump on") only while it holds the lease
//! "pump", which it takes through leasehold-serial over UART0 and a host gateway.
//! Semihosting carries its log to the emulator's stdout and its device id in.
//!
//! Two boards, chosen by feature (each has its own module in ../firmware-common: UART, clock,
//! wake-ups):
//! - `lm3s6965evb` (default): QEMU's lm3s6965evb, Cortex-M3, `thumbv7m-none-eabi`;
//! - `microbit`: QEMU's microbit (nRF51822), Cortex-M0, `thumbv6m-none-eabi`:
//!   `cargo build --release --no-default-features --features microbit --target thumbv6m-none-eabi`.
//!
//! With the `sessions` feature the pump runs on protocol v2 instead: one session holding
//! "pump" and "valve", renewed by one keepalive (src/sessions.rs). Build it into its own
//! target directory so it never overwrites the v1 ELF:
//! `cargo build --release --features sessions --target-dir target/sessions`.
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

#[cfg_attr(feature = "microbit", path = "../../firmware-common/microbit.rs")]
#[cfg_attr(not(feature = "microbit"), path = "../../firmware-common/lm3s6965evb.rs")]
mod board;
#[cfg(feature = "sessions")]
mod sessions;
// The session pump uses only part of it.
#[cfg_attr(feature = "sessions", allow(dead_code))]
#[path = "../../firmware-common/support.rs"]
mod support;

use leasehold_core::resource::{AdmitError, HighWater};
use leasehold_core::{Fence, OwnerId};
use support::Line;

/// The pump's actuator: the resource the fence protects. The controller's lease says when it
/// may command; the actuator keeps, in RAM, the highest fence it has obeyed and refuses a
/// command under a lower one (a command that sat in a queue, or was replayed), by core's rule
/// (`HighWater::admit`), the one the SQL adapter and the demo apply too.
struct Actuator {
    /// What it drives, for its refusals in the log ("" on the v1 pump, which has one).
    name: &'static str,
    mark: HighWater,
}

impl Actuator {
    const fn new(name: &'static str) -> Actuator {
        Actuator { name, mark: HighWater::NONE }
    }

    /// Admits a command of `holder`'s grant `fence`, or refuses it and says so ("REFUSED
    /// [NAME ]fence F below M", or "REFUSED [NAME ]fence F" when no grant could have sent it).
    fn admit(&mut self, fence: Fence, holder: OwnerId) -> bool {
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

/// Called by the board's 1 kHz wake-up interrupt; the main loop needs nothing more than the
/// wake-up itself.
fn on_tick() {}

#[cfg(not(feature = "sessions"))]
mod lease {
    use cortex_m_rt::entry;
    use leasehold_core::{Event, Fence, Instant};
    use leasehold_serial::DeviceLink;

    use crate::support::{
        boot_args, fail, log_event, paint_stack, pump_lease, report, Line, ACTS_PER_HOLD, ACT_EVERY,
        ACT_GUARD,
    };
    use crate::{board, Actuator};

    /// Runs the `n`-th action of `holder`'s grant `fence` ("ACT F N"), unless the actuator
    /// refuses it.
    fn command(actuator: &mut Actuator, fence: Fence, holder: leasehold_core::OwnerId, n: u32) {
        if actuator.admit(fence, holder) {
            Line::new("ACT ").num(fence.0).push(" ").num(u64::from(n)).say();
        }
    }

    #[entry]
    fn main() -> ! {
        paint_stack();
        let mut cp = cortex_m::Peripherals::take().unwrap_or_else(|| fail());
        let (uart, clock) = board::init(&mut cp);
        let (device, lease, key, validity) = pump_lease(board::NAME, "");
        let holder = lease.owner();
        let mut link = DeviceLink::new(uart, clock, lease, key, device);
        let mut actuator = Actuator::new("");
        // With REPLAY set, the first action of a later grant is followed by one command under the
        // previous grant's fence, as a command delayed in a queue would arrive: it must be refused.
        let mut replay = boot_args()[2] == 1;
        let (mut previous_fence, mut last_grant): (Option<u64>, Option<u64>) = (None, None);

        let _ = link.acquire();
        let mut asked_at = link.now();
        let mut holding: Option<u64> = None;
        let mut acts = 0;
        let mut next_act = Instant::ZERO;
        let mut reacquire_at: Option<Instant> = None;
        let mut next_report = Instant::ZERO;
        loop {
            let Ok(event) = link.poll();
            let now = link.now();
            if let Some(event) = event {
                if let Some(t) = log_event(&event, now, asked_at, validity) {
                    reacquire_at = Some(t);
                }
                match event {
                    Event::Acquired { fence, .. } => {
                        previous_fence = last_grant;
                        last_grant = Some(fence.0);
                        holding = Some(fence.0);
                        acts = 0;
                        next_act = now;
                    }
                    Event::Lost { .. } => holding = None,
                    _ => {}
                }
            }
            if let Some(fence) = holding {
                if now >= next_act {
                    next_act = now + ACT_EVERY;
                    if acts >= ACTS_PER_HOLD {
                        // Released one period after the last action, when it has finished.
                        holding = None;
                        let _ = link.release();
                    } else if link.remaining().is_some_and(|r| r >= ACT_GUARD) {
                        // The fence goes with every action; acting needs validity to spare.
                        acts += 1;
                        command(&mut actuator, Fence(fence), holder, acts);
                        if let Some(old) = previous_fence.filter(|_| replay && acts == 1) {
                            replay = false;
                            command(&mut actuator, Fence(old), holder, acts);
                        }
                    }
                }
            }
            if reacquire_at.is_some_and(|t| now >= t) {
                reacquire_at = None;
                asked_at = now;
                let _ = link.acquire();
            }
            next_report = report(now, next_report);
            // The board's 1 kHz tick wakes us; UART bytes wait in its FIFO meanwhile.
            cortex_m::asm::wfi();
        }
    }
}
