//! The pump controller on protocol v2 (feature `sessions`): one session holds two keys,
//! "pump" and "valve", and one keepalive frame renews both.
//!
//! The device opens a session through the gateway, queues for "pump", and once it holds it
//! queues for "valve" (always in that order, so two devices can never each hold one and wait
//! for the other). While it holds both it commands both actuators every 100 ms, each command
//! under its key's fence, and gives both back after [`SESSION_ACTS_PER_HOLD`] actions. A device that
//! waits is pushed its grant by the gateway in the reply to a keepalive it holds open: the
//! firmware never polls for a key.
//!
//! Log lines (semihosting), read by `cli/tests/qemu.rs`:
//! - `OPENED S`: the session's id;
//! - `QUEUED KEY POSITION`;
//! - `ACQUIRED KEY FENCE after_us US`: since it asked for that key;
//! - `HOLDING pump F valve G`: both held;
//! - `ACT F G N`: the `N`-th action, under the pump's fence `F` and the valve's `G`;
//! - `RENEWED rtt_us US`: a keepalive reply extended the session (the round trip from the
//!   keepalive's sending, so a keepalive held open for a waiter shows its hold);
//! - `RELEASING pump F valve G`: about to send both releases (the gateway may push the
//!   pump to a waiter before `RELEASED pump F`, which waits for the release's answer);
//! - `RELEASED KEY FENCE`, `LOST KEY FENCE`, `SESSION LOST`, `REFUSED ...` (the actuators'),
//!   and the `BOOT`, `CLOCK` and `STACK` lines every firmware here writes.
//!
//! With REPLAY set on the command line, the first action of a later grant is followed by one
//! pump command under the previous grant's fence, as a command delayed in a queue would
//! arrive: the pump actuator must refuse it.

use cortex_m_rt::entry;
use embedded_io::{Read, ReadReady, Write};
use leasehold_core::session::SessionEvent;
use leasehold_core::{parse_key, Duration, Fence, Instant, Key, OwnerId};
use leasehold_serial::{Clock, SessionLink};

use crate::board;
use crate::support::{
    fail, paint_stack, pump_session, report, Actuator, Line, ACT_EVERY, ACT_GUARD, PAUSE,
    SESSION_ACTS_PER_HOLD, SESSION_KEYS, SESSION_OBSERVED,
};

/// The keys, in the order they are taken.
struct Keys {
    pump: Key,
    valve: Key,
}

/// What the controller is doing with its two keys.
enum Phase {
    /// Waiting for the session to open (or to open again after it was lost).
    Opening,
    /// Asked for the pump, since `asked_at`.
    TakingPump { asked_at: Instant },
    /// Holds the pump under `pump`; asked for the valve since `asked_at`.
    TakingValve { pump: Fence, asked_at: Instant },
    /// Holds both: `acts` actions done, the next at `next_act`.
    Holding { pump: Fence, valve: Fence, acts: u32, next_act: Instant },
    /// Gave back (or lost) its keys; waits for the releases to finish, then pauses until
    /// `resume_at` before asking again.
    Pausing { resume_at: Instant },
}

#[entry]
fn main() -> ! {
    paint_stack();
    let mut cp = cortex_m::Peripherals::take().unwrap_or_else(|| fail());
    let (uart, clock) = board::init(&mut cp);
    let (device, session, validity, replay) = pump_session(board::NAME, "");
    let (Ok(pump), Ok(valve)) = (parse_key("pump"), parse_key("valve")) else { fail() };
    let link = SessionLink::new(uart, clock, session, device);
    run(link, Keys { pump, valve }, validity, replay)
}

fn run<U: Read + ReadReady + Write, C: Clock>(
    mut link: SessionLink<U, C, SESSION_KEYS, SESSION_OBSERVED>,
    keys: Keys,
    validity: Duration,
    mut replay: bool,
) -> ! {
    let mut pump_actuator = Actuator::new("pump ");
    let mut valve_actuator = Actuator::new("valve ");
    let mut previous_pump: Option<Fence> = None;
    let mut last_pump: Option<Fence> = None;
    let mut phase = Phase::Opening;
    let _ = link.open();
    // The session's end of validity as last seen: when it moves on, a keepalive was answered.
    let mut valid_until = Instant::ZERO;
    let mut next_report = Instant::ZERO;
    loop {
        while let Ok(Some(event)) = link.poll() {
            let now = link.now();
            phase = on_event(&mut link, &keys, phase, event, now);
            if let Phase::Holding { pump, acts: 0, .. } = phase {
                if last_pump != Some(pump) {
                    previous_pump = last_pump;
                    last_pump = Some(pump);
                }
            }
        }
        let now = link.now();
        if let Some(until) = link.session().session_remaining(now).map(|r| now + r) {
            if until > valid_until {
                if valid_until != Instant::ZERO {
                    // valid_until = the keepalive's send time + validity: the exact round trip.
                    let sent = until - validity;
                    Line::new("RENEWED rtt_us ").num((now - sent).as_micros()).say();
                }
                valid_until = until;
            }
        }
        match phase {
            Phase::Holding { pump, valve, ref mut acts, ref mut next_act } if now >= *next_act => {
                *next_act = now + ACT_EVERY;
                let holder = OwnerId(link.session().id().map_or(0, |s| s.0));
                let left = |key: &Key| link.remaining(key).unwrap_or(Duration::ZERO);
                if *acts >= SESSION_ACTS_PER_HOLD {
                    // Given back one period after the last action, when it has finished; the
                    // valve first, so the next holder of the pump finds it free. Said before
                    // the frames go: a hand-off is timed from here.
                    Line::new("RELEASING pump ").num(pump.0).push(" valve ").num(valve.0).say();
                    let _ = link.release(&keys.valve);
                    let _ = link.release(&keys.pump);
                    phase = Phase::Pausing { resume_at: now + PAUSE };
                } else if left(&keys.pump) >= ACT_GUARD && left(&keys.valve) >= ACT_GUARD {
                    // Each fence goes with its actuator's command; acting needs validity to spare.
                    *acts += 1;
                    let n = *acts;
                    if pump_actuator.admit(pump, holder) && valve_actuator.admit(valve, holder) {
                        Line::new("ACT ")
                            .num(pump.0)
                            .push(" ")
                            .num(valve.0)
                            .push(" ")
                            .num(u64::from(n))
                            .say();
                    }
                    if let Some(old) = previous_pump.filter(|_| replay && n == 1) {
                        replay = false;
                        let _ = pump_actuator.admit(old, holder);
                    }
                }
            }
            Phase::Pausing { resume_at } if now >= resume_at && link.session().held().next().is_none() => {
                phase = match link.session().id() {
                    Some(_) => ask(&mut link, &keys.pump, now),
                    None => {
                        let _ = link.open();
                        Phase::Opening
                    }
                };
            }
            _ => {}
        }
        next_report = report(now, next_report);
        // The board's 1 kHz tick wakes us; UART bytes wait in its FIFO meanwhile.
        cortex_m::asm::wfi();
    }
}

/// Queues for `key` (the machine says `Queued`, then `Acquired` when it is pushed to us).
fn ask<U: Read + ReadReady + Write, C: Clock>(
    link: &mut SessionLink<U, C, SESSION_KEYS, SESSION_OBSERVED>,
    key: &Key,
    now: Instant,
) -> Phase {
    match link.acquire(key.clone(), true) {
        Ok(()) => Phase::TakingPump { asked_at: now },
        Err(_) => Phase::Pausing { resume_at: now + PAUSE },
    }
}

fn on_event<U: Read + ReadReady + Write, C: Clock>(
    link: &mut SessionLink<U, C, SESSION_KEYS, SESSION_OBSERVED>,
    keys: &Keys,
    phase: Phase,
    event: SessionEvent,
    now: Instant,
) -> Phase {
    let name = |key: &Key| if *key == keys.pump { "pump " } else { "valve " };
    match event {
        SessionEvent::Opened { session, .. } => {
            Line::new("OPENED ").num(session.0).say();
            ask(link, &keys.pump, now)
        }
        SessionEvent::NotOpened { .. } => {
            Line::new("NOT OPENED").say();
            Phase::Pausing { resume_at: now + PAUSE }
        }
        SessionEvent::Queued { key, position } => {
            Line::new("QUEUED ").push(name(&key)).num(u64::from(position)).say();
            phase
        }
        SessionEvent::Acquired { key, fence, .. } => {
            let asked_at = match phase {
                Phase::TakingPump { asked_at } | Phase::TakingValve { asked_at, .. } => asked_at,
                _ => now,
            };
            Line::new("ACQUIRED ")
                .push(name(&key))
                .num(fence.0)
                .push(" after_us ")
                .num((now - asked_at).as_micros())
                .say();
            match phase {
                Phase::TakingPump { .. } if key == keys.pump => {
                    match link.acquire(keys.valve.clone(), true) {
                        Ok(()) => Phase::TakingValve { pump: fence, asked_at: now },
                        Err(_) => give_back(link, keys, now),
                    }
                }
                Phase::TakingValve { pump, .. } if key == keys.valve => {
                    Line::new("HOLDING pump ").num(pump.0).push(" valve ").num(fence.0).say();
                    Phase::Holding { pump, valve: fence, acts: 0, next_act: now }
                }
                // A grant we no longer want (we gave up meanwhile): give it back.
                _ => {
                    let _ = link.release(&key);
                    phase
                }
            }
        }
        SessionEvent::NotAcquired { key, .. } => {
            Line::new("NOT ACQUIRED ").push(name(&key)).say();
            give_back(link, keys, now)
        }
        SessionEvent::Released { key, fence, .. } => {
            Line::new("RELEASED ").push(name(&key)).num(fence.0).say();
            phase
        }
        SessionEvent::Lost { key, fence, .. } => {
            Line::new("LOST ").push(name(&key)).num(fence.0).say();
            give_back(link, keys, now)
        }
        SessionEvent::SessionLost { .. } => {
            Line::new("SESSION LOST").say();
            Phase::Pausing { resume_at: now + PAUSE }
        }
        _ => phase,
    }
}

/// Stops acting, gives back whatever is held or asked for, and pauses.
fn give_back<U: Read + ReadReady + Write, C: Clock>(
    link: &mut SessionLink<U, C, SESSION_KEYS, SESSION_OBSERVED>,
    keys: &Keys,
    now: Instant,
) -> Phase {
    let _ = link.release(&keys.valve);
    let _ = link.release(&keys.pump);
    Phase::Pausing { resume_at: now + PAUSE }
}
