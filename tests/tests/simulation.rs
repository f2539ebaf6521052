//! Deterministic simulation of many clients, a faulty network and drifting clocks.
//!
//! `LEASEHOLD_SIM_SEEDS=N` runs N seeds instead of the CI budget;
//! `LEASEHOLD_SIM_SEED=S` replays one seed with its full trace (test `replay`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant as WallClock;

use leasehold_core::Fault;
use leasehold_tests::sim::{run_planted, run_seed, Bug, Params, Stats, Violation, World};

/// About 36 s for this whole file on a busy 2-core VM (dev profile, opt-level 2); the issue
/// asks for at least 10 000.
const CI_SEEDS: u64 = 100_000;

fn seeds() -> u64 {
    std::env::var("LEASEHOLD_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(CI_SEEDS)
}

/// Runs `seeds` seeds on all cores; returns the first violation (lowest seed) and totals.
fn run_many(seeds: std::ops::Range<u64>, fault: Fault) -> (Option<Box<Violation>>, Stats) {
    run_many_with(seeds, |seed| run_seed(seed, fault))
}

/// As [`run_many`], with `bug` planted outside the core.
fn run_bug(seeds: std::ops::Range<u64>, bug: Bug) -> (Option<Box<Violation>>, Stats) {
    run_many_with(seeds, |seed| run_planted(seed, bug))
}

fn run_many_with(
    seeds: std::ops::Range<u64>,
    run: impl Fn(u64) -> Result<Stats, Box<Violation>> + Sync,
) -> (Option<Box<Violation>>, Stats) {
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
                        match run(seed) {
                            Ok(st) => total.add(&st),
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
        total.add(&st);
        if let Some(v) = v {
            if first.as_ref().is_none_or(|f| v.params.seed < f.params.seed) {
                first = Some(v);
            }
        }
    }
    (first, total)
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
    // Writes reached the resources, and late ones from ended grants were refused there.
    assert!(total.accepted > n && total.refused_stale > 0, "{total:?}");
    assert!(total.acquired_after_expiry > 0 && total.lock_delayed > 0, "{total:?}");
    // Fences are unique per grant, so no resource ever sees two holders under one fence.
    assert_eq!(total.refused_reused, 0, "{total:?}");
}

/// The planted bugs outside the core, each caught within this many seeds.
const BUG_SEEDS: u64 = 10_000;

fn caught(bug: Bug, expect: &str) {
    let (violation, _) = run_bug(0..BUG_SEEDS, bug);
    let v = violation.unwrap_or_else(|| panic!("the checker missed {}", bug.name()));
    println!("{} caught at seed {}: {}", bug.name(), v.params.seed, v.message);
    assert!(v.message.contains(expect), "{}", v.message);
}

#[test]
fn a_resource_that_does_not_check_fences_is_caught() {
    caught(Bug::ResourceIgnoresFence, "below its highest accepted fence");
}

#[test]
fn a_resource_that_admits_an_equal_fence_from_another_holder_is_caught() {
    caught(Bug::ResourceAdmitsEqualFence, "two holders under the same fence");
}

#[test]
fn a_holder_that_writes_after_its_lease_is_lost_is_caught() {
    caught(Bug::WritesAfterLoss, "sent while not believing");
}

#[test]
fn the_fence_check_refuses_a_reused_fence() {
    // The same fence-reusing authority that exposes the tie bug above, with resources as
    // shipped: the second holder of a fence is refused, and nothing else breaks.
    let (violation, total) = run_bug(0..BUG_SEEDS / 10, Bug::AuthorityReusesFences);
    if let Some(v) = violation {
        panic!("{v}");
    }
    assert!(total.refused_reused > 0, "no fence was ever reused: {total:?}");
}

#[test]
fn anchoring_at_receive_is_caught() {
    // Within the smallest budget CI may be configured to run.
    let (violation, _) = run_many(0..10_000, Fault::AnchorAtReceive);
    let v = violation.expect("the checker missed validity anchored at the reply");
    println!("caught at seed {}: {}", v.params.seed, v.message);
    // The refinement check (the authority's grant ends before the belief) usually fires first.
    assert!(
        v.message.contains("two holders") || v.message.contains("before the belief's end"),
        "{}",
        v.message
    );
}

#[test]
fn ignoring_drift_is_caught() {
    let (violation, _) = run_many(0..10_000, Fault::IgnoreDrift);
    let v = violation.expect("the checker missed validity that ignores clock drift");
    println!("caught at seed {}: {}", v.params.seed, v.message);
    // The refinement check (the authority's grant ends before the belief) usually fires first.
    assert!(
        v.message.contains("two holders") || v.message.contains("before the belief's end"),
        "{}",
        v.message
    );
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
    let bug = std::env::var("LEASEHOLD_SIM_BUG").ok().and_then(|b| Bug::from_name(&b)).unwrap_or_default();
    let params = Params { bug, ..Params::from_seed(seed, fault) };
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
