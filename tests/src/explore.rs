//! Exhaustive bounded model check: two [`Lease`] machines and one key's authority (either
//! discipline), every interleaving up to a depth.
//!
//! The seeded simulator samples long runs with many clients; this explorer instead tries
//! *every* order of the actions below from a fresh start, up to `depth` actions and a true-time
//! `horizon`, deduplicating states it has seen. Actions:
//! - a client's application acquires (when idle) or releases (when holding), a bounded number
//!   of times;
//! - a client handles its timer, if it is due (it may also never do so: a paused process);
//! - any message ever sent is delivered (again): the network is a set that only grows, so
//!   together with time passing in between this is every delay, duplication and reordering,
//!   and a message never delivered is a lost one;
//! - true time advances to the next multiple of `quantum`, to any client's next timer, or to
//!   the authority's expiry of the current grant, whichever the branch picks.
//!
//! Clock rates are fixed per exploration; [`explore_extremes`] runs all eight assignments of
//! ±δ to the two clients and the authority. After every action the checker asserts that at
//! most one client believes it holds the key, and refinement: a believer is the authority's
//! holder under its fence, and (server-timed) the grant ends no earlier than the belief, in
//! true time.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::hash::Hasher;

use leasehold_core::authority::cas::CasRecord;
use leasehold_core::authority::{self, Limits, Record};
use leasehold_core::{
    Config, Drift, Duration, Fault, Instant, Lease, OwnerId, Request, Response, State as Phase,
};

pub use crate::sim::Discipline;

/// How far to explore.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Most actions on any path from the start.
    pub depth: u32,
    /// True time never passes this (µs).
    pub horizon: u64,
    /// The regular time step (µs); timers and the authority's expiry are reached exactly.
    pub quantum: u64,
    /// Application calls (acquire or release) per client on one path.
    pub app_calls: u8,
}

/// One exploration: the discipline, the lease timing, the clock rates and the bounds.
#[derive(Debug, Clone, Copy)]
pub struct Model {
    /// How the authority times leases.
    pub discipline: Discipline,
    /// Both clients' lease timing (including any injected [`Fault`]).
    pub config: Config,
    /// Clock rate deviations in ppm: client 0, client 1, authority.
    pub rates: [i64; 3],
    /// How far to explore.
    pub bounds: Bounds,
    /// Check refinement as well as mutual exclusion. Without it a timing bug is only found
    /// once a second client is actually granted the key, which shows what the bug does.
    pub refinement: bool,
}

impl Model {
    /// 2 clients, ttl 8 ms, ε = 1 %, no margin; depth `depth`, horizon 1.5·ttl, steps of ttl/8.
    pub fn small(discipline: Discipline, fault: Fault, depth: u32) -> Model {
        let ttl = Duration::from_millis(8);
        let mut config = Config::new(ttl);
        config.drift = Drift::from_ppm(10_000);
        config.margin = Duration::ZERO;
        config.fault = fault;
        let bounds = Bounds { depth, horizon: 12_000, quantum: 1_000, app_calls: 2 };
        Model { discipline, config, rates: [0; 3], bounds, refinement: true }
    }
}

/// What an exploration found.
#[derive(Debug, Default)]
pub struct Report {
    /// Distinct states reached (including the start).
    pub states: u64,
    /// Transitions taken (edges, including those into states already seen).
    pub transitions: u64,
    /// States in which each client believed it held the key: proof that the exploration
    /// reached grants at all.
    pub believing: [u64; 2],
    /// The first violation found (breadth-first: a shortest one), with the path to it.
    pub violation: Option<Counterexample>,
}

/// A path to a violation.
#[derive(Debug)]
pub struct Counterexample {
    /// What was violated.
    pub message: String,
    /// The actions from the start, one per line, with true time.
    pub path: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Msg {
    Request(usize, Request),
    Response(usize, Response),
}

#[derive(Debug, Clone, Copy)]
enum Store {
    ServerTimed(Record),
    CompareAndSet(CasRecord),
}

#[derive(Debug, Clone)]
struct State {
    t: u64,
    leases: [Lease; 2],
    store: Store,
    /// Every message sent so far, once each.
    net: Vec<Msg>,
    app_left: [u8; 2],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    App(usize),
    Timer(usize),
    Deliver(Msg),
    Advance(u64),
}

/// Feeds formatted text straight into a hasher.
struct HashWriter(DefaultHasher);

impl std::fmt::Write for HashWriter {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.write(s.as_bytes());
        Ok(())
    }
}

fn debug_hash(v: &impl std::fmt::Debug) -> u64 {
    let mut h = HashWriter(DefaultHasher::new());
    let _ = write!(h, "{v:?}");
    h.0.finish()
}

/// Distinct origins per party: clocks are never synchronised.
const ORIGIN: [u64; 3] = [1_000_000, 5_000_000, 9_000_000];
const PPM: i128 = 1_000_000;

fn local(party: usize, rate: i64, t: u64) -> Instant {
    let scaled = i128::from(t) * (PPM + i128::from(rate)) / PPM;
    Instant::from_micros(ORIGIN[party] + scaled as u64)
}

fn true_time(party: usize, rate: i64, at: Instant) -> u64 {
    let l = i128::from(at.as_micros().saturating_sub(ORIGIN[party]));
    let r = PPM + i128::from(rate);
    let mut t = ((l * PPM + r - 1) / r) as u64;
    while t > 0 && local(party, rate, t - 1) >= at {
        t -= 1;
    }
    while local(party, rate, t) < at {
        t += 1;
    }
    t
}

impl Model {
    fn local(&self, party: usize, t: u64) -> Instant {
        local(party, self.rates[party], t)
    }

    fn start(&self) -> State {
        let lease = |i: u64| Lease::new(OwnerId(i + 1), self.config).expect("model config is valid");
        State {
            t: 0,
            leases: [lease(0), lease(1)],
            store: match self.discipline {
                Discipline::ServerTimed => Store::ServerTimed(Record::default()),
                Discipline::CompareAndSet => Store::CompareAndSet(CasRecord::default()),
            },
            net: Vec::new(),
            app_left: [self.bounds.app_calls; 2],
        }
    }

    /// A key for the visited set: everything that determines the future, with the network as
    /// a set.
    fn key(s: &State) -> u64 {
        // The machine has no `Hash`; its `Debug` output says everything it holds. It is fed to
        // the hasher as it is formatted, never collected into a string.
        let mut net: Vec<u64> = s.net.iter().map(debug_hash).collect();
        net.sort_unstable();
        let mut h = HashWriter(DefaultHasher::new());
        let _ = write!(h, "{}|{:?}|{:?}|{:?}|{:?}", s.t, s.leases, s.store, net, s.app_left);
        h.0.finish()
    }

    fn send(s: &mut State, m: Msg) {
        if !s.net.contains(&m) {
            s.net.push(m);
        }
    }

    fn drain(s: &mut State, i: usize) {
        while let Some(r) = s.leases[i].poll_transmit() {
            Model::send(s, Msg::Request(i, r));
        }
        while s.leases[i].poll_event().is_some() {}
    }

    fn deliver(&self, s: &mut State, m: Msg) {
        match m {
            Msg::Request(i, request) => {
                let reply = match s.store {
                    Store::ServerTimed(ref mut rec) => {
                        // The model's short ttl is below the default minimum.
                        let limits = Limits { min_ttl: Duration::from_micros(1), ..Limits::default() };
                        let d = authority::decide(rec, self.local(2, s.t), &request, &limits);
                        *rec = d.record;
                        d.reply
                    }
                    Store::CompareAndSet(ref mut rec) => {
                        let d = rec.apply(&request);
                        *rec = d.record;
                        d.reply
                    }
                };
                Model::send(s, Msg::Response(i, Response { id: request.id, owner: request.owner, reply }));
            }
            Msg::Response(i, response) => {
                let now = self.local(i, s.t);
                s.leases[i].handle_response(now, response);
                Model::drain(s, i);
            }
        }
    }

    fn apply(&self, s: &State, a: Action) -> Option<State> {
        let mut s = s.clone();
        match a {
            Action::App(i) => {
                if s.app_left[i] == 0 {
                    return None;
                }
                s.app_left[i] -= 1;
                let now = self.local(i, s.t);
                let l = &mut s.leases[i];
                match l.state() {
                    Phase::Idle => l.acquire(now).ok()?,
                    Phase::Held if l.remaining(now).is_some() => l.release(now).ok()?,
                    _ => return None,
                }
                Model::drain(&mut s, i);
            }
            Action::Timer(i) => {
                let now = self.local(i, s.t);
                if s.leases[i].poll_timeout().is_none_or(|at| at > now) {
                    return None;
                }
                s.leases[i].handle_timeout(now);
                Model::drain(&mut s, i);
            }
            Action::Deliver(m) => self.deliver(&mut s, m),
            Action::Advance(t) => s.t = t,
        }
        Some(s)
    }

    fn actions(&self, s: &State, out: &mut Vec<Action>) {
        out.clear();
        for i in 0..2 {
            out.push(Action::App(i));
            out.push(Action::Timer(i));
        }
        out.extend(s.net.iter().map(|&m| Action::Deliver(m)));
        let b = self.bounds;
        let mut targets = vec![(s.t / b.quantum + 1) * b.quantum];
        for (i, l) in s.leases.iter().enumerate() {
            if let Some(at) = l.poll_timeout() {
                targets.push(true_time(i, self.rates[i], at));
            }
        }
        if let Store::ServerTimed(Record { holder: Some(h), .. }) = s.store {
            targets.push(true_time(2, self.rates[2], h.expires_at));
        }
        targets.sort_unstable();
        targets.dedup();
        out.extend(targets.into_iter().filter(|&t| t > s.t && t <= b.horizon).map(Action::Advance));
    }

    fn check(&self, s: &State) -> Result<(), String> {
        let mut believer = None;
        for (i, l) in s.leases.iter().enumerate() {
            let now = self.local(i, s.t);
            let Some(rem) = l.remaining(now) else { continue };
            let fence = l.fence().unwrap_or_default();
            if let Some(j) = believer {
                return Err(format!("two holders at once: c{j} and c{i}"));
            }
            believer = Some(i);
            if !self.refinement {
                continue;
            }
            match s.store {
                Store::ServerTimed(rec) => {
                    let Some(h) = rec.holder.filter(|h| h.owner == l.owner() && h.fence >= fence) else {
                        return Err(format!(
                            "c{i} believes fence {fence}; the authority's holder is {:?}",
                            rec.holder
                        ));
                    };
                    let belief_end = true_time(i, self.rates[i], now + rem);
                    let grant_end = true_time(2, self.rates[2], h.expires_at);
                    if grant_end < belief_end {
                        return Err(format!(
                            "c{i} believes fence {fence} until t={belief_end}us; the grant ends at t={grant_end}us"
                        ));
                    }
                }
                Store::CompareAndSet(rec) => {
                    if rec.owner != Some(l.owner()) || rec.fence < fence {
                        return Err(format!("c{i} believes fence {fence}; the record is {rec:?}"));
                    }
                }
            }
        }
        Ok(())
    }

    fn describe(&self, s: &State, a: Action) -> String {
        let mut line = format!("t={:>6}us ", s.t);
        let _ = match a {
            Action::App(i) => write!(
                line,
                "c{i} app {}",
                if s.leases[i].state() == Phase::Idle { "acquire" } else { "release" }
            ),
            Action::Timer(i) => write!(line, "c{i} timer"),
            Action::Deliver(m) => write!(line, "deliver {m:?}"),
            Action::Advance(t) => write!(line, "time passes to {t}us"),
        };
        line
    }

    /// Breadth-first over every interleaving within the bounds; stops at the first violation.
    pub fn explore(&self) -> Report {
        let start = self.start();
        let mut report = Report::default();
        let mut visited: HashSet<u64> = HashSet::new();
        // state -> (parent, action taken): the path to a violation is replayed from these.
        let mut parent: HashMap<u64, (u64, Action)> = HashMap::new();
        let k0 = Model::key(&start);
        visited.insert(k0);
        let mut frontier = VecDeque::from([(start, k0, 0u32)]);
        let mut actions = Vec::new();
        while let Some((s, k, depth)) = frontier.pop_front() {
            report.states += 1;
            if depth >= self.bounds.depth {
                continue;
            }
            self.actions(&s, &mut actions);
            for &a in &actions {
                let Some(next) = self.apply(&s, a) else { continue };
                report.transitions += 1;
                let nk = Model::key(&next);
                if !visited.insert(nk) {
                    continue;
                }
                parent.insert(nk, (k, a));
                for (i, l) in next.leases.iter().enumerate() {
                    report.believing[i] += u64::from(l.remaining(self.local(i, next.t)).is_some());
                }
                if let Err(message) = self.check(&next) {
                    report.violation = Some(Counterexample { message, path: self.path(nk, &parent) });
                    return report;
                }
                frontier.push_back((next, nk, depth + 1));
            }
        }
        report
    }

    /// The actions from the start to state `k`, replayed to describe each one.
    fn path(&self, mut k: u64, parent: &HashMap<u64, (u64, Action)>) -> Vec<String> {
        let mut actions = Vec::new();
        while let Some(&(p, a)) = parent.get(&k) {
            actions.push(a);
            k = p;
        }
        actions.reverse();
        let mut s = self.start();
        let mut path = Vec::new();
        for a in actions {
            path.push(self.describe(&s, a));
            match self.apply(&s, a) {
                Some(next) => s = next,
                None => break,
            }
        }
        path
    }
}

/// Explores `model` under all eight assignments of the extreme rates ±δ (for ε) to the two
/// clients and the authority; sums the reports, stopping at the first violation.
pub fn explore_extremes(model: Model) -> Report {
    let eps = i128::from(model.config.drift.as_ppm());
    let delta = (eps * PPM / (2 * PPM + eps)) as i64;
    let mut total = Report::default();
    for bits in 0..8u8 {
        let rate = |b: u8| if bits & (1 << b) != 0 { delta } else { -delta };
        let m = Model { rates: [rate(0), rate(1), rate(2)], ..model };
        let r = m.explore();
        total.states += r.states;
        total.transitions += r.transitions;
        total.believing[0] += r.believing[0];
        total.believing[1] += r.believing[1];
        if let Some(mut v) = r.violation {
            v.message = format!("{} (rates {:?} ppm)", v.message, m.rates);
            total.violation = Some(v);
            break;
        }
    }
    total
}
