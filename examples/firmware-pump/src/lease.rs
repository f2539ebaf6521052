//! The pump controller on protocol v1 (the default): one lease on "pump" through the
//! blocking `DeviceLink`.

use cortex_m_rt::entry;
use leasehold_core::{Event, Fence, Instant};
use leasehold_serial::DeviceLink;

use crate::board;
use crate::support::Actuator;
use crate::support::{
    boot_args, fail, log_event, paint_stack, pump_lease, report, Line, ACTS_PER_HOLD, ACT_EVERY, ACT_GUARD,
};

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
