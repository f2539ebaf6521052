//! The embassy pump on protocol v1 (the default): one lease on "pump" through the
//! [`AsyncDeviceLink`], and the two tasks the crate docs describe.

use embassy_executor::Spawner;
use embassy_futures::select::{select3, Either3};
use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;
use embassy_sync::signal::Signal;
use embassy_time::{Delay, Timer};
use leasehold_core::{Duration, Instant};
use leasehold_serial::{AsyncDeviceLink, LeaseWatch};

use crate::support::{fail, log_event, pump_lease, report, Line, ACTS_PER_HOLD, ACT_EVERY, ACT_GUARD};
use crate::{at, board, now, AsyncUart};

type Link = AsyncDeviceLink<AsyncUart, board::SysTickClock, Delay>;

static WATCH: LeaseWatch = LeaseWatch::new();
static RELEASE: Signal<CriticalSectionRawMutex, ()> = Signal::new();

#[embassy_executor::task]
async fn link_task(mut link: Link, validity: Duration) -> ! {
    link.publish_to(&WATCH);
    let _ = link.acquire();
    let mut asked_at = now();
    let mut reacquire_at: Option<Instant> = None;
    loop {
        let again = async {
            match reacquire_at {
                Some(t) => Timer::at(at(t)).await,
                None => core::future::pending().await,
            }
        };
        // Losing this race drops `next_event` mid-wait, which it is built for.
        match select3(link.next_event(), RELEASE.wait(), again).await {
            Either3::First(event) => {
                let Ok(event) = event;
                if let Some(t) = log_event(&event, now(), asked_at, validity) {
                    reacquire_at = Some(t);
                }
            }
            Either3::Second(()) => {
                let _ = link.release();
            }
            Either3::Third(()) => {
                reacquire_at = None;
                asked_at = now();
                let _ = link.acquire();
            }
        }
    }
}

#[embassy_executor::task]
async fn pump_task() -> ! {
    // (fence, actions under it)
    let mut acting = (0, 0);
    let mut next_report = Instant::ZERO;
    loop {
        Timer::after_micros(ACT_EVERY.as_micros()).await;
        let now = now();
        // The fence goes with every action; acting needs validity to spare.
        if let Some((fence, left)) = WATCH.held(now) {
            if fence.0 != acting.0 {
                acting = (fence.0, 0);
            }
            if acting.1 == ACTS_PER_HOLD {
                // Released one period after the last action, when it has finished.
                acting.1 += 1;
                RELEASE.signal(());
            } else if left >= ACT_GUARD && acting.1 < ACTS_PER_HOLD {
                acting.1 += 1;
                Line::new("ACT ").num(fence.0).push(" ").num(u64::from(acting.1)).say();
            }
        }
        next_report = report(now, next_report);
    }
}

/// Starts the link and the pump.
pub fn spawn(spawner: Spawner, uart: AsyncUart, clock: board::SysTickClock) {
    let (device, lease, key, validity) = pump_lease(board::NAME, " embassy");
    let link = AsyncDeviceLink::new(uart, clock, Delay, lease, key, device);
    spawner.spawn(link_task(link, validity).unwrap_or_else(|_| fail()));
    spawner.spawn(pump_task().unwrap_or_else(|_| fail()));
}
