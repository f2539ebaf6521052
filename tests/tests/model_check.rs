//! Exhaustive bounded model check of two `Lease` machines and one key's authority.
//!
//! `LEASEHOLD_MC_DEPTH=N` explores to depth N instead of the CI depth.

use std::time::Instant as WallClock;

use leasehold_core::Fault;
use leasehold_tests::explore::{explore_extremes, Discipline, Model, Report};

/// One full handover (acquire, grant, expiry or release, the other's acquire and grant) fits
/// in 8 actions; each level deeper costs about five times the states.
const CI_DEPTH: u32 = 8;

fn depth() -> u32 {
    std::env::var("LEASEHOLD_MC_DEPTH").ok().and_then(|s| s.parse().ok()).unwrap_or(CI_DEPTH)
}

fn run(discipline: Discipline, fault: Fault, depth: u32) -> Report {
    let started = WallClock::now();
    let r = explore_extremes(Model::small(discipline, fault, depth));
    println!(
        "{discipline:?} {fault:?} depth {depth}: {} states, {} transitions, believing {:?}, {:.2}s",
        r.states,
        r.transitions,
        r.believing,
        started.elapsed().as_secs_f64()
    );
    r
}

fn safe(discipline: Discipline) {
    let r = run(discipline, Fault::None, depth());
    if let Some(v) = r.violation {
        panic!("{}\n{}", v.message, v.path.join("\n"));
    }
    assert!(r.states > 10_000 && r.believing.iter().all(|&n| n > 0), "explored too little: {r:?}");
}

#[test]
fn every_interleaving_is_safe_server_timed() {
    safe(Discipline::ServerTimed);
}

#[test]
fn every_interleaving_is_safe_compare_and_set() {
    safe(Discipline::CompareAndSet);
}

/// Explores with `fault` in the core; the first violation found must mention `expect`.
fn found(fault: Fault, expect: &[&str]) {
    let r = run(Discipline::ServerTimed, fault, CI_DEPTH);
    let v = r.violation.unwrap_or_else(|| panic!("the explorer missed {fault:?}"));
    println!("{}\n{}", v.message, v.path.join("\n"));
    assert!(expect.iter().any(|e| v.message.contains(e)), "{}", v.message);
}

#[test]
fn the_receive_anchored_bug_is_found() {
    found(Fault::AnchorAtReceive, &["two holders", "the grant ends"]);
}

#[test]
fn the_receive_anchored_bug_gives_the_key_to_two_holders() {
    // Mutual exclusion alone: the explorer must build the whole handover.
    let model = Model {
        refinement: false,
        ..Model::small(Discipline::ServerTimed, Fault::AnchorAtReceive, CI_DEPTH)
    };
    let started = WallClock::now();
    let r = explore_extremes(model);
    let v = r.violation.expect("the explorer missed two holders under receive-anchoring");
    println!(
        "{} states, {:.2}s: {}\n{}",
        r.states,
        started.elapsed().as_secs_f64(),
        v.message,
        v.path.join("\n")
    );
    assert!(v.message.contains("two holders"), "{}", v.message);
}

#[test]
fn ignoring_drift_is_found() {
    found(Fault::IgnoreDrift, &["the grant ends"]);
}
