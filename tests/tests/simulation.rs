//! Deterministic simulation of many clients, a faulty network and drifting clocks.
//!
//! `LEASEHOLD_SIM_SEEDS=N` runs N seeds instead of the CI budget;
//! `LEASEHOLD_SIM_SEED=S` replays one seed with its full trace (test `replay`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant as WallClock;

use leasehold_core::Fault;
use leasehold_tests::sim::{run_seed, Params, Stats, Violation, World};

/// About 7 s on two cores; the issue asks for at least 10 000.
const CI_SEEDS: u64 = 100_000;

fn seeds() -> u64 {
    std::env::var("LEASEHOLD_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(CI_SEEDS)
}

/// Runs `seeds` seeds on all cores; returns the first violation (lowest seed) and totals.
fn run_many(seeds: std::ops::Range<u64>, fault: Fault) -> (Option<Box<Violation>>, Stats) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let next = AtomicU64::new(seeds.start);
    let results: Vec<(Option<Box<Violation>>, Stats)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut total = Stats::default();
                    let mut first: Option<Box<Violation>> = None;
                    loop {
                        let seed = next.fetch_add(1, Ordering::Relaxed);
                        if seed >= seeds.end || first.as_ref().is_some_and(|v| v.params.seed < seed) {
                            break;
                        }
                        match run_seed(seed, fault) {
                            Ok(st) => add(&mut total, &st),
                            Err(v) => {
                                if first.as_ref().is_none_or(|f| v.params.seed < f.params.seed) {
                                    first = Some(v);
                                }
                                // Stop the other threads early too.
                                next.store(seeds.end, Ordering::Relaxed);
                            }
                        }
                    }
                    (first, total)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("simulation thread panicked")).collect()
    });
    let mut total = Stats::default();
    let mut first: Option<Box<Violation>> = None;
    for (v, st) in results {
        add(&mut total, &st);
        if let Some(v) = v {
            if first.as_ref().is_none_or(|f| v.params.seed < f.params.seed) {
                first = Some(v);
            }
        }
    }
    (first, total)
}

fn add(total: &mut Stats, s: &Stats) {
    total.steps += s.steps;
    total.grants += s.grants;
    total.acquired += s.acquired;
    total.renewed += s.renewed;
    total.lost += s.lost;
    total.released += s.released;
    total.dropped += s.dropped;
}

#[test]
fn safety_holds_across_seeds() {
    let n = seeds();
    let started = WallClock::now();
    let (violation, total) = run_many(0..n, Fault::None);
    let secs = started.elapsed().as_secs_f64();
    if let Some(v) = violation {
        panic!("{v}");
    }
    println!(
        "{n} seeds in {secs:.2}s ({:.0} seeds/s, {:.0} steps/s): {total:?}",
        n as f64 / secs,
        total.steps as f64 / secs
    );
    // The runs must have exercised what they claim to check.
    assert!(total.acquired > n, "too few acquisitions: {total:?}");
    assert!(total.renewed > n, "too few renewals: {total:?}");
    assert!(total.lost > 0 && total.released > 0 && total.dropped > 0, "{total:?}");
}

#[test]
fn anchoring_at_receive_is_caught() {
    // Within the smallest budget CI may be configured to run.
    let (violation, _) = run_many(0..10_000, Fault::AnchorAtReceive);
    let v = violation.expect("the checker missed validity anchored at the reply");
    println!("caught at seed {}: {}", v.params.seed, v.message);
    assert!(v.message.contains("two holders"), "{}", v.message);
}

#[test]
fn ignoring_drift_is_caught() {
    let (violation, _) = run_many(0..10_000, Fault::IgnoreDrift);
    let v = violation.expect("the checker missed validity that ignores clock drift");
    println!("caught at seed {}: {}", v.params.seed, v.message);
    assert!(v.message.contains("two holders"), "{}", v.message);
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [1, 42, 4242] {
        let a: Vec<String> = trace_of(seed);
        let b: Vec<String> = trace_of(seed);
        assert!(a.len() > 100, "seed {seed} did little: {} entries", a.len());
        assert_eq!(a, b, "seed {seed} did not replay");
    }
    assert_ne!(trace_of(1), trace_of(2));
}

fn trace_of(seed: u64) -> Vec<String> {
    let mut w = World::new(Params::from_seed(seed, Fault::None));
    for _ in 0..2_000 {
        if !w.step().expect("no violation") {
            break;
        }
    }
    w.trace().collect()
}

/// `LEASEHOLD_SIM_SEED=S cargo test -p leasehold-tests --test simulation replay -- --nocapture`
#[test]
fn replay() {
    let Some(seed) = std::env::var("LEASEHOLD_SIM_SEED").ok().and_then(|s| s.parse().ok()) else {
        return;
    };
    let fault = match std::env::var("LEASEHOLD_SIM_FAULT").as_deref() {
        Ok("anchor-at-receive") => Fault::AnchorAtReceive,
        Ok("ignore-drift") => Fault::IgnoreDrift,
        _ => Fault::None,
    };
    let params = Params::from_seed(seed, fault);
    println!("{params:?}");
    let mut w = World::new(params);
    while w.now() < w.params().run_for {
        match w.step() {
            Ok(true) => {}
            Ok(false) => break,
            Err(v) => panic!("{v}"),
        }
    }
    for line in w.trace() {
        println!("{line}");
    }
}
