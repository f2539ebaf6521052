//! What a request's timeout costs when the request answers in time: arming a deadline, polling
//! it once, and dropping it unfired, for [`leasehold_timer::Deadline`] and async-io's `Timer`,
//! while another thread sleeps in async-io's reactor (as a client's or the server's does).
//! Timeouts are made 50 µs apart, as a busy server's requests come. Prints the time per
//! timeout and the context switches the process made per timeout.
//!
//! ```text
//! cargo bench -p leasehold-timer --bench arm
//! ```

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

const N: u32 = 20_000;
/// Between two timeouts, as between a busy server's requests: long enough for the reactor's
/// thread to have gone back to sleep.
const GAP: Duration = Duration::from_micros(50);

/// The voluntary and involuntary context switches of all the process's threads so far.
fn switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

fn measure<F: Future>(name: &str, make: impl Fn() -> F) {
    let waker = Waker::noop();
    let mut cx = Context::from_waker(waker);
    let (mut took, before) = (Duration::ZERO, switches());
    for _ in 0..N {
        let start = Instant::now();
        {
            let f = pin!(make());
            assert!(matches!(f.poll(&mut cx), Poll::Pending));
        }
        took += start.elapsed();
        // Busy, not asleep: this thread's own sleeps would count as switches.
        let idle = Instant::now();
        while idle.elapsed() < GAP {
            std::hint::spin_loop();
        }
    }
    let switched = switches() - before;
    println!(
        "{name:<22} {:>7.0} ns per timeout  {:>6.3} context switches per timeout",
        took.as_nanos() as f64 / f64::from(N),
        switched as f64 / f64::from(N)
    );
}

fn main() {
    // A thread blocked in the reactor, as an executor thread with nothing to do is.
    std::thread::spawn(|| async_io::block_on(futures_lite::future::pending::<()>()));
    std::thread::sleep(Duration::from_millis(50));
    for _ in 0..2 {
        measure("async_io::Timer", || async_io::Timer::after(Duration::from_secs(5)));
        measure("leasehold_timer", || leasehold_timer::Deadline::after(Duration::from_secs(5)));
    }
}
