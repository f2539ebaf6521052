//! What the simulators share: party clocks whose rates drift within ±ε, and a faulty network
//! (delay, reordering, duplication, Gilbert-Elliott burst loss, partitions one way or both).
//!
//! Both draw from the run's one seeded generator in a fixed order, so a seed replays exactly.

use std::collections::BTreeMap;

use leasehold_core::{Drift, Instant};

/// A party's local clock, `base_local + (t − base_true)·(1 + dev_ppm/10⁶)` rounded down; a
/// rate change starts a new segment where the old one ended, so the clock stays continuous
/// and monotonic.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    base_true: u64,
    base_local: u64,
    dev_ppm: i64,
}

const PPM: i128 = 1_000_000;

/// δ: any two rates in `[1−δ, 1+δ]` differ by at most `(1+δ)/(1−δ) = 1+ε` when `δ = ε/(2+ε)`.
fn delta_ppm(drift: Drift) -> i64 {
    let eps = i128::from(drift.as_ppm());
    (eps * PPM / (2 * PPM + eps)) as i64
}

/// A rate deviation within ±δ: at an extreme three times in four, since the extremes are where
/// a timing bug shows.
pub(crate) fn draw_rate(rng: &mut fastrand::Rng, drift: Drift) -> i64 {
    let delta = delta_ppm(drift);
    match rng.u8(..4) {
        0 => delta,
        1 => -delta,
        2 => *rng.choice(&[delta, -delta]).unwrap_or(&0),
        _ => rng.i64(-delta..=delta),
    }
}

impl Clock {
    pub(crate) fn random(rng: &mut fastrand::Rng, drift: Drift) -> Clock {
        Clock { base_true: 0, base_local: rng.u64(0..1 << 40), dev_ppm: draw_rate(rng, drift) }
    }

    pub(crate) fn local(&self, t: u64) -> Instant {
        let dt = i128::from(t.saturating_sub(self.base_true));
        let scaled = dt * (PPM + i128::from(self.dev_ppm)) / PPM;
        Instant::from_micros(self.base_local + scaled as u64)
    }

    /// The earliest true time at which this clock reads `at` or later, if its rate stays.
    pub(crate) fn true_time_of(&self, at: Instant) -> u64 {
        if at.as_micros() <= self.base_local {
            return self.base_true;
        }
        let l = i128::from(at.as_micros() - self.base_local);
        let rate = PPM + i128::from(self.dev_ppm);
        let dt = ((l * PPM + rate - 1) / rate).min(i128::from(u64::MAX / 4)) as u64;
        let mut t = self.base_true + dt;
        while t > self.base_true && self.local(t - 1) >= at {
            t -= 1;
        }
        while self.local(t) < at {
            t += 1;
        }
        t
    }

    /// From true time `t` on, runs at `dev_ppm`.
    pub(crate) fn set_rate(&mut self, t: u64, dev_ppm: i64) {
        self.base_local = self.local(t).as_micros();
        self.base_true = t;
        self.dev_ppm = dev_ppm;
    }

    /// A restarted process's monotonic clock: a new origin from true time `t` on.
    pub(crate) fn restart(&mut self, t: u64, origin: u64) {
        self.base_true = t;
        self.base_local = origin;
    }
}

/// Which way a partition cuts a client off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Nothing in or out.
    Both,
    /// Its messages are lost; it still hears the others.
    Outbound,
    /// It cannot hear; its messages still arrive.
    Inbound,
}

impl Direction {
    pub(crate) fn draw(rng: &mut fastrand::Rng) -> Direction {
        *rng.choice(&[Direction::Both, Direction::Outbound, Direction::Inbound]).unwrap_or(&Direction::Both)
    }
}

/// How a run's network treats messages: loss per message while a link is good, Gilbert-Elliott
/// spells of burst loss, delay and duplication.
#[derive(Debug, Clone, Copy)]
pub struct Net {
    /// Per-message loss probability while a link is good (see `burst_*` for bad spells).
    pub loss: f64,
    /// Gilbert-Elliott burst loss: per-message chance that a good link turns bad...
    pub burst_start: f64,
    /// ...and that a bad link recovers...
    pub burst_end: f64,
    /// ...and the loss probability while it is bad.
    pub burst_loss: f64,
    /// Smallest one-way delay (µs).
    pub min_delay: u64,
    /// Largest one-way delay (µs).
    pub max_delay: u64,
    /// Per-message duplication probability.
    pub duplication: f64,
}

/// A client's end of the network: its partition, and each direction's burst state.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Port {
    partitioned_until: u64,
    partition: Direction,
    /// Whether `[outbound, inbound]` is in a bad spell.
    bad: [bool; 2],
}

impl Default for Port {
    fn default() -> Port {
        Port { partitioned_until: 0, partition: Direction::Both, bad: [false; 2] }
    }
}

impl Port {
    /// Whether a partition cuts `dir` at `now`.
    pub(crate) fn cut(&self, now: u64, dir: Direction) -> bool {
        self.partitioned_until > now && (self.partition == Direction::Both || self.partition == dir)
    }

    pub(crate) fn partition(&mut self, until: u64, dir: Direction) {
        self.partitioned_until = until;
        self.partition = dir;
    }

    pub(crate) fn heal(&mut self) {
        self.partitioned_until = 0;
        self.bad = [false; 2];
    }

    /// Whether a message sent `dir` at `now` is lost, and why.
    fn drops(&mut self, rng: &mut fastrand::Rng, now: u64, dir: Direction, p: Net) -> Option<&'static str> {
        if self.cut(now, dir) {
            return Some("partition");
        }
        let bad = &mut self.bad[usize::from(dir == Direction::Inbound)];
        let flip = if *bad { p.burst_end } else { p.burst_start };
        if rng.f64() < flip {
            *bad = !*bad;
        }
        let loss = if *bad { p.burst_loss } else { p.loss };
        (rng.f64() < loss).then_some(if *bad { "burst loss" } else { "loss" })
    }
}

/// Messages in flight, in delivery order: delayed, reordered and sometimes duplicated.
#[derive(Debug)]
pub(crate) struct Wire<M> {
    queue: BTreeMap<(u64, u64), M>,
    next: u64,
}

impl<M: Clone> Wire<M> {
    pub(crate) fn new() -> Wire<M> {
        Wire { queue: BTreeMap::new(), next: 0 }
    }

    /// Sends `msg` at `now` through `port` one way: lost (and why), or on the wire, arriving
    /// after a delay, perhaps twice.
    pub(crate) fn send(
        &mut self,
        rng: &mut fastrand::Rng,
        now: u64,
        port: &mut Port,
        dir: Direction,
        net: Net,
        msg: M,
    ) -> Result<(), &'static str> {
        if let Some(why) = port.drops(rng, now, dir, net) {
            return Err(why);
        }
        let copies = if rng.f64() < net.duplication { 2 } else { 1 };
        for _ in 0..copies {
            let at = now + rng.u64(net.min_delay..=net.max_delay);
            self.queue.insert((at, self.next), msg.clone());
            self.next += 1;
        }
        Ok(())
    }

    /// When the next message arrives.
    pub(crate) fn next_at(&self) -> Option<u64> {
        self.queue.first_key_value().map(|(&(t, _), _)| t)
    }

    /// The next message to arrive.
    pub(crate) fn pop(&mut self) -> Option<M> {
        self.queue.pop_first().map(|(_, m)| m)
    }
}
