//! The embassy pump on protocol v2 (feature `sessions`): firmware-pump's session storyline
//! (one session holding "pump" then "valve", queued for in the FIFO and pushed each grant,
//! each actuator command under its key's fence, both given back after
//! [`SESSION_ACTS_PER_HOLD`] actions) on the async [`AsyncSessionLink`], in three tasks:
//!
//! - the link task owns the link and waits in `next_event` (cancel-safe), in a `select`
//!   against the pump task's release request and the end of its pause; it takes the keys in
//!   order and logs the session's events;
//! - the pump task acts every 100 ms while both keys are held with validity to spare, reading
//!   their fences and the session's validity from a [`SessionWatch`] the link publishes to;
//! - the renewal task waits on the watch and logs each renewal as the link sees it (the
//!   session machine has no renewal event: a keepalive's answer only moves its validity).
//!
//! It logs the lines firmware-pump's session build does (`OPENED`, `QUEUED`, `ACQUIRED`,
//! `HOLDING`, `ACT`, `RENEWED`, `RELEASING`, `RELEASED`, `LOST`, `SESSION LOST`, `REFUSED`),
//! which `cli/tests/qemu.rs` reads, and with REPLAY set replays one stale pump command as that
//! firmware does. Build it into its own target directory:
//! `cargo build --release --features sessions --target-dir target/sessions`.

use embassy_executor::Spawner;
use embassy_futures::select::{select3, Either3};
use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;
use embassy_sync::signal::Signal;
use embassy_time::{Delay, Timer};
use leasehold_core::session::SessionEvent;
use leasehold_core::{parse_key, Duration, Fence, Instant, Key, OwnerId};
use leasehold_serial::{AsyncSessionLink, SessionWatch};

use crate::support::{
    fail, pump_session, report, Actuator, Line, ACT_EVERY, ACT_GUARD, PAUSE, SESSION_ACTS_PER_HOLD,
    SESSION_KEYS, SESSION_OBSERVED,
};
use crate::{at, board, now, AsyncUart};

type Link = AsyncSessionLink<AsyncUart, board::SysTickClock, Delay, SESSION_KEYS, SESSION_OBSERVED>;

static WATCH: SessionWatch<SESSION_KEYS> = SessionWatch::new();
/// The pump task's request to give both keys back.
static RELEASE: Signal<CriticalSectionRawMutex, ()> = Signal::new();

/// The keys, in the order they are taken.
#[derive(Clone)]
struct Keys {
    pump: Key,
    valve: Key,
}

/// What the link task is doing with the two keys.
enum Phase {
    /// Waiting for the session to open (or to open again after it was lost).
    Opening,
    /// Asked for the pump, since `asked_at`.
    TakingPump { asked_at: Instant },
    /// Holds the pump under `pump`; asked for the valve since `asked_at`.
    TakingValve { pump: Fence, asked_at: Instant },
    /// Holds both; the pump task acts.
    Holding { pump: Fence, valve: Fence },
    /// Gave back (or lost) its keys; waits for the releases to finish, then pauses until
    /// `resume_at` before asking again.
    Pausing { resume_at: Instant },
}

#[embassy_executor::task]
async fn link_task(mut link: Link, keys: Keys) -> ! {
    link.publish_to(&WATCH);
    let _ = link.open();
    let mut phase = Phase::Opening;
    loop {
        // The pause ends at its time once every release has finished (each finished release
        // is an event, which comes back here).
        let resume_at = match phase {
            Phase::Pausing { resume_at } if link.session().held().next().is_none() => Some(resume_at),
            _ => None,
        };
        let resume = async {
            match resume_at {
                Some(t) => Timer::at(at(t)).await,
                None => core::future::pending().await,
            }
        };
        // Losing this race drops `next_event` mid-wait, which it is built for.
        match select3(link.next_event(), RELEASE.wait(), resume).await {
            Either3::First(event) => {
                let Ok(event) = event;
                phase = on_event(&mut link, &keys, phase, event, now());
            }
            Either3::Second(()) => {
                if let Phase::Holding { pump, valve } = phase {
                    // Said before the frames go: a hand-off is timed from here. The valve
                    // first, so the next holder of the pump finds it free.
                    Line::new("RELEASING pump ").num(pump.0).push(" valve ").num(valve.0).say();
                    phase = give_back(&mut link, &keys, now());
                }
            }
            Either3::Third(()) => {
                phase = match link.session().id() {
                    Some(_) => ask(&mut link, &keys.pump, now()),
                    None => {
                        let _ = link.open();
                        Phase::Opening
                    }
                };
            }
        }
    }
}

/// Queues for `key` (the machine says `Queued`, then `Acquired` when it is pushed to us).
fn ask(link: &mut Link, key: &Key, now: Instant) -> Phase {
    match link.acquire(key.clone(), true) {
        Ok(()) => Phase::TakingPump { asked_at: now },
        Err(_) => Phase::Pausing { resume_at: now + PAUSE },
    }
}

fn on_event(link: &mut Link, keys: &Keys, phase: Phase, event: SessionEvent, now: Instant) -> Phase {
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
                    // A request the pump task made for an earlier holding is not for this one.
                    RELEASE.reset();
                    Phase::Holding { pump, valve: fence }
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

/// Gives back whatever is held or asked for, and pauses (the pump task stops acting as the
/// watch stops showing the keys).
fn give_back(link: &mut Link, keys: &Keys, now: Instant) -> Phase {
    let _ = link.release(&keys.valve);
    let _ = link.release(&keys.pump);
    Phase::Pausing { resume_at: now + PAUSE }
}

#[embassy_executor::task]
async fn pump_task(keys: Keys, device: u32, mut replay: bool) -> ! {
    let mut pump_actuator = Actuator::new("pump ");
    let mut valve_actuator = Actuator::new("valve ");
    // The actuators' writer is this controller, whichever session it is on.
    let holder = OwnerId(u64::from(device));
    // (pump fence, valve fence, actions under them) of the latest holding seen.
    let mut acting: Option<(Fence, Fence, u32)> = None;
    let mut previous_pump: Option<Fence> = None;
    let mut next_report = Instant::ZERO;
    loop {
        Timer::after_micros(ACT_EVERY.as_micros()).await;
        let now = now();
        if let (Some((pump, pump_left)), Some((valve, valve_left))) =
            (WATCH.held(now, &keys.pump), WATCH.held(now, &keys.valve))
        {
            let acts = match acting {
                Some((p, v, n)) if (p, v) == (pump, valve) => n,
                _ => {
                    previous_pump = acting.map(|a| a.0);
                    0
                }
            };
            if acts == SESSION_ACTS_PER_HOLD {
                // Given back one period after the last action, when it has finished.
                RELEASE.signal(());
                acting = Some((pump, valve, acts + 1));
            } else if acts < SESSION_ACTS_PER_HOLD && pump_left >= ACT_GUARD && valve_left >= ACT_GUARD {
                // Each fence goes with its actuator's command; acting needs validity to spare.
                let n = acts + 1;
                acting = Some((pump, valve, n));
                if pump_actuator.admit(pump, holder) && valve_actuator.admit(valve, holder) {
                    Line::new("ACT ").num(pump.0).push(" ").num(valve.0).push(" ").num(u64::from(n)).say();
                }
                if let Some(old) = previous_pump.filter(|_| replay && n == 1) {
                    replay = false;
                    let _ = pump_actuator.admit(old, holder);
                }
            } else {
                acting = Some((pump, valve, acts));
            }
        }
        next_report = report(now, next_report);
    }
}

#[embassy_executor::task]
async fn renewal_task(validity: Duration) -> ! {
    let mut seen = WATCH.renewed();
    loop {
        let latest = WATCH.changed(seen).await;
        if let (Some(before), Some(r)) = (seen, latest) {
            if r.valid_until > before.valid_until {
                // valid_until = the keepalive's send time + validity: the exact round trip.
                let sent = r.valid_until - validity;
                Line::new("RENEWED rtt_us ").num((r.seen_at - sent).as_micros()).say();
            }
        }
        seen = latest;
    }
}

/// Starts the link, the pump and the renewal log.
pub fn spawn(spawner: Spawner, uart: AsyncUart, clock: board::SysTickClock) {
    let (device, session, validity, replay) = pump_session(board::NAME, " embassy");
    let (Ok(pump), Ok(valve)) = (parse_key("pump"), parse_key("valve")) else { fail() };
    let keys = Keys { pump, valve };
    let link = AsyncSessionLink::new(uart, clock, Delay, session, device);
    spawner.spawn(link_task(link, keys.clone()).unwrap_or_else(|_| fail()));
    spawner.spawn(pump_task(keys, device, replay).unwrap_or_else(|_| fail()));
    spawner.spawn(renewal_task(validity).unwrap_or_else(|_| fail()));
}
