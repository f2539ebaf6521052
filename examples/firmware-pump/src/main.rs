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
mod lease;
