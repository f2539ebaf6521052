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
// Each build uses only part of it.
#[allow(dead_code)]
#[path = "../../firmware-common/support.rs"]
mod support;

/// Called by the board's 1 kHz wake-up interrupt; the main loop needs nothing more than the
/// wake-up itself.
fn on_tick() {}

#[cfg(not(feature = "sessions"))]
mod lease;
