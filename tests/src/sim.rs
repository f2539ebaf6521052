//! Deterministic simulation: a [`World`] of clients, one authority, resources and a seeded
//! network.
//!
//! True time is a `u64` of microseconds that only the simulator sees. Every party reads its
//! own clock, piecewise `base + (t − t₀)·rate`, with rates drawn per party (at the extremes
//! ±δ three times in four) so that any two rates differ by at most the factor `1+ε` the core
//! is configured for; a rate may wander within that bound during a run. [`World::step`] jumps
//! true time to the earliest pending deadline (a message delivery, a lease timer, an
//! application action, a write, a fault) and handles it. Holders send writes carrying their
//! fence to the resources over the same network as everything else (delay, Gilbert-Elliott
//! burst loss, duplication, reordering, partitions in one direction or both), so writes can
//! arrive long after their sender stopped believing. Each resource admits writes through
//! [`HighWater::admit`]. The checker asserts, on true time:
//! - at most one client believes it holds the key (`remaining(its local now)` is `Some`);
//! - refinement: every believer is the authority's current holder under the same fence, and
//!   (server-timed) the authority's expiry is at or after the end of the belief;
//! - the authority's grants carry strictly increasing fences, and no client is told
//!   `Acquired` with a fence at or below one already told to anyone;
//! - no resource accepts a write whose fence is below the highest it has accepted, nor writes
//!   of two holders under one fence, nor a write sent while its sender did not believe.

use std::fmt;

use crate::netem::{draw_rate, Clock, Direction, Net, Port, Wire};
use leasehold_core::authority::cas::CasRecord;
use leasehold_core::authority::{self, Limits, Outcome, Record};
use leasehold_core::resource::{AdmitError, HighWater};
use leasehold_core::{
    Config, Drift, Duration, Event, Fault, Fence, Instant, Lease, OwnerId, Reply, Request, Response,
};

/// A deliberate bug outside the core, to prove the checker notices it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Bug {
    /// Everything as shipped.
    #[default]
    None,
    /// Resources accept every write, whatever its fence.
    ResourceIgnoresFence,
    /// Resources compare fences only, so a tie from another holder is admitted. Runs with an
    /// authority whose store resets its fence counter on release (the only way two holders
    /// can ever present one fence).
    ResourceAdmitsEqualFence,
    /// The same fence-reusing authority, with resources as shipped: they must refuse the
    /// second holder of a fence.
    AuthorityReusesFences,
    /// Holders keep writing for a while after their lease is lost (a paused process that
    /// wakes up and finishes its batch without looking at `remaining()`).
    WritesAfterLoss,
}

impl Bug {
    /// The name used in `LEASEHOLD_SIM_BUG`.
    pub const fn name(self) -> &'static str {
        match self {
            Bug::None => "none",
            Bug::ResourceIgnoresFence => "resource-ignores-fence",
            Bug::ResourceAdmitsEqualFence => "resource-admits-equal-fence",
            Bug::AuthorityReusesFences => "authority-reuses-fences",
            Bug::WritesAfterLoss => "writes-after-loss",
        }
    }

    /// The bug named `name` (see [`Bug::name`]).
    pub fn from_name(name: &str) -> Option<Bug> {
        [
            Bug::None,
            Bug::ResourceIgnoresFence,
            Bug::ResourceAdmitsEqualFence,
            Bug::AuthorityReusesFences,
            Bug::WritesAfterLoss,
        ]
        .into_iter()
        .find(|b| b.name() == name)
    }

    /// Whether the authority's store resets its fence counter on release.
    const fn reuses_fences(self) -> bool {
        matches!(self, Bug::ResourceAdmitsEqualFence | Bug::AuthorityReusesFences)
    }
}

/// How the authority times leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discipline {
    /// The authority expires grants on its own clock (built-in server, etcd).
    ServerTimed,
    /// A compare-and-set record store without a clock (DynamoDB): contenders observe, wait
    /// `ttl·(1+ε)` and take over the observed version.
    CompareAndSet,
}

/// Everything that varies between runs, drawn from the seed.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// The seed everything is drawn from.
    pub seed: u64,
    /// Number of clients contending for the key.
    pub clients: usize,
    /// How the authority times leases.
    pub discipline: Discipline,
    /// Lease timing shared by all clients.
    pub config: Config,
    /// The network: delay, loss (with bursts) and duplication.
    pub net: Net,
    /// Whether clients crash, partitions happen and the authority restarts.
    pub faults: bool,
    /// Simulated true time to run (µs).
    pub run_for: u64,
    /// Number of resources the lease protects.
    pub resources: usize,
    /// The authority's lock-delay (server-timed only; zero: off).
    pub lock_delay: Duration,
    /// The deliberate bug outside the core.
    pub bug: Bug,
}

impl Params {
    /// Draws a run's parameters from `seed`. `fault` is the deliberate bug to inject
    /// ([`Fault::None`] for the real machine).
    pub fn from_seed(seed: u64, fault: Fault) -> Params {
        let mut rng = fastrand::Rng::with_seed(seed);
        let ttl = Duration::from_millis(rng.u64(200..=2_000));
        let mut config = Config::new(ttl);
        config.drift = Drift::from_ppm(*rng.choice(&[1_000, 10_000, 50_000]).unwrap_or(&10_000));
        // The safety argument must hold with no margin at all.
        config.margin = Duration::ZERO;
        config.jitter_seed = rng.u64(..);
        config.fault = fault;
        let max_delay = rng.u64(1..=ttl.as_micros() / 10);
        let lock_delay = if rng.u8(..4) == 0 {
            Duration::from_micros(rng.u64(0..ttl.as_micros() / 2))
        } else {
            Duration::ZERO
        };
        // Drawn in the order of the seeds' first runs, so a seed still replays the same run.
        let clients = rng.usize(3..=5);
        let discipline = if rng.bool() { Discipline::ServerTimed } else { Discipline::CompareAndSet };
        let min_delay = rng.u64(0..=max_delay / 4);
        let (loss, duplication) = (rng.f64() * 0.2, rng.f64() * 0.1);
        let faults = rng.u8(..) < 200;
        let resources = rng.usize(1..=2);
        let (burst_start, burst_end, burst_loss) =
            (rng.f64() * 0.05, 0.1 + rng.f64() * 0.4, 0.5 + rng.f64() * 0.5);
        Params {
            seed,
            clients,
            discipline,
            config,
            net: Net { loss, burst_start, burst_end, burst_loss, min_delay, max_delay, duplication },
            faults,
            run_for: ttl.as_micros() * 30,
            resources,
            lock_delay,
            bug: Bug::None,
        }
    }

    /// As [`Params::from_seed`] with the real core and `bug` planted.
    pub fn planted(seed: u64, bug: Bug) -> Params {
        Params { bug, ..Params::from_seed(seed, Fault::None) }
    }
}

/// What happened, kept compactly and formatted only when a run fails.
#[derive(Debug, Clone, Copy)]
enum What {
    AppAcquire(usize, &'static str),
    AppRelease(usize),
    Send(usize, Request),
    Dropped(&'static str),
    AuthorityHandles(usize, Request, Reply),
    ClientReceives(usize, Response),
    Timeout(usize),
    ClientEvent(usize, Event),
    Crash(usize),
    Restart(usize, OwnerId),
    Partition(usize, u64, Direction),
    AuthorityDown(u64),
    AuthorityUp,
    WriteSent(usize, usize, Fence, bool),
    WriteAdmitted(usize, usize, Fence, Result<(), AdmitError>),
    Rate(Option<usize>, i64),
}

/// One line of a run's trace.
#[derive(Debug, Clone, Copy)]
pub struct TraceEntry {
    t: u64,
    what: What,
}

impl fmt::Display for TraceEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t={:>10.3}ms ", self.t as f64 / 1000.0)?;
        match self.what {
            What::AppAcquire(c, how) => write!(f, "c{c} app: {how}"),
            What::AppRelease(c) => write!(f, "c{c} app: release"),
            What::Send(c, r) => write!(f, "c{c} sends {:?} id={} as {}", r.op, r.id.0, r.owner),
            What::Dropped(why) => write!(f, "   network drops a message ({why})"),
            What::AuthorityHandles(c, r, reply) => {
                write!(f, "authority: c{c} {:?} id={} -> {:?}", r.op, r.id.0, reply)
            }
            What::ClientReceives(c, r) => write!(f, "c{c} receives id={} {:?}", r.id.0, r.reply),
            What::Timeout(c) => write!(f, "c{c} timer"),
            What::ClientEvent(c, e) => write!(f, "c{c} EVENT {e:?}"),
            What::Crash(c) => write!(f, "c{c} CRASHES"),
            What::Restart(c, o) => write!(f, "c{c} restarts as {o}"),
            What::Partition(c, until, dir) => {
                write!(f, "c{c} partitioned ({dir:?}) until {:.3}ms", until as f64 / 1000.0)
            }
            What::WriteSent(c, r, fence, believed) => {
                write!(f, "c{c} writes to r{r} under fence {fence} (believes: {believed})")
            }
            What::WriteAdmitted(c, r, fence, Ok(())) => {
                write!(f, "r{r} ACCEPTS c{c}'s write under fence {fence}")
            }
            What::WriteAdmitted(c, r, fence, Err(e)) => {
                write!(f, "r{r} refuses c{c}'s write under {fence}: {e}")
            }
            What::Rate(None, ppm) => write!(f, "authority clock rate now {ppm:+} ppm"),
            What::Rate(Some(c), ppm) => write!(f, "c{c} clock rate now {ppm:+} ppm"),
            What::AuthorityDown(until) => {
                write!(f, "authority DOWN until {:.3}ms", until as f64 / 1000.0)
            }
            What::AuthorityUp => write!(f, "authority restarts; grants re-armed"),
        }
    }
}

/// A safety violation, with everything needed to replay it.
#[derive(Debug)]
pub struct Violation {
    /// The run's parameters (the seed replays it).
    pub params: Params,
    /// True time of the violation (µs).
    pub at: u64,
    /// What was violated.
    pub message: String,
    /// The run's trace up to the violation.
    pub trace: Vec<TraceEntry>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "SAFETY VIOLATION with seed {} at t={}us: {}", self.params.seed, self.at, self.message)?;
        writeln!(f, "params: {:?}", self.params)?;
        let skip = self.trace.len().saturating_sub(400);
        writeln!(f, "trace (last {} of {} entries):", self.trace.len() - skip, self.trace.len())?;
        for e in &self.trace[skip..] {
            writeln!(f, "  {e}")?;
        }
        let fault = match self.params.config.fault {
            Fault::AnchorAtReceive => "LEASEHOLD_SIM_FAULT=anchor-at-receive ",
            Fault::IgnoreDrift => "LEASEHOLD_SIM_FAULT=ignore-drift ",
            _ => "",
        };
        let bug = match self.params.bug {
            Bug::None => String::new(),
            b => format!("LEASEHOLD_SIM_BUG={} ", b.name()),
        };
        write!(
            f,
            "replay: {fault}{bug}LEASEHOLD_SIM_SEED={} cargo test -p leasehold-tests --test simulation replay -- --nocapture",
            self.params.seed
        )
    }
}

/// What a run did, for figures and for tests that the run exercised something.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Steps taken.
    pub steps: u64,
    /// Grants the authority made.
    pub grants: u64,
    /// `Acquired` events told to clients.
    pub acquired: u64,
    /// `Renewed` events.
    pub renewed: u64,
    /// `Lost` events.
    pub lost: u64,
    /// `Released` events.
    pub released: u64,
    /// Messages dropped by loss, partitions, crashes or authority downtime.
    pub dropped: u64,
    /// Grants that followed an expiry (`GrantedAfterExpiry`), as told to clients.
    pub acquired_after_expiry: u64,
    /// Writes sent to resources.
    pub writes: u64,
    /// Writes resources accepted.
    pub accepted: u64,
    /// Writes refused as stale (a later grant had written).
    pub refused_stale: u64,
    /// Writes refused because another holder had written under the same fence.
    pub refused_reused: u64,
    /// Acquires refused by the lock-delay.
    pub lock_delayed: u64,
}

impl Stats {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Stats) {
        self.steps += other.steps;
        self.grants += other.grants;
        self.acquired += other.acquired;
        self.renewed += other.renewed;
        self.lost += other.lost;
        self.released += other.released;
        self.dropped += other.dropped;
        self.acquired_after_expiry += other.acquired_after_expiry;
        self.writes += other.writes;
        self.accepted += other.accepted;
        self.refused_stale += other.refused_stale;
        self.refused_reused += other.refused_reused;
        self.lock_delayed += other.lock_delayed;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum App {
    Idle,
    Acquiring,
    Holding,
}

struct Client {
    clock: Clock,
    lease: Option<Lease>,
    incarnation: u32,
    app: App,
    app_at: Option<u64>,
    restart_at: Option<u64>,
    port: Port,
    /// The next write to a resource while holding.
    write_at: Option<u64>,
    /// [`Bug::WritesAfterLoss`]: the lost fence it keeps writing under, and until when.
    stale: Option<(Fence, u64)>,
}

impl Client {
    fn cut(&self, now: u64, dir: Direction) -> bool {
        self.port.cut(now, dir)
    }
}

/// A resource the lease protects. It stores only its high-water mark; the checker keeps its
/// own record of what was accepted.
#[derive(Debug, Clone, Copy, Default)]
struct Resource {
    mark: HighWater,
    /// The checker's view: the highest fence accepted, and whose write first set it.
    highest: Option<(Fence, OwnerId)>,
}

/// A write as it travels: what the resource sees, and what only the checker knows.
#[derive(Debug, Clone, Copy)]
struct Write {
    client: usize,
    resource: usize,
    owner: OwnerId,
    fence: Fence,
    /// Whether the sender believed it held the lease when it sent the write.
    believed: bool,
}

enum Store {
    ServerTimed(Record),
    CompareAndSet(CasRecord),
}

struct Authority {
    clock: Clock,
    store: Store,
    down_until: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
enum Msg {
    Request { client: usize, request: Request },
    Response { client: usize, response: Response },
    Write(Write),
}

impl Msg {
    /// The client at the other end, and which way the message goes from its side.
    fn link(&self) -> (usize, Direction) {
        match *self {
            Msg::Request { client, .. } => (client, Direction::Outbound),
            Msg::Write(w) => (w.client, Direction::Outbound),
            Msg::Response { client, .. } => (client, Direction::Inbound),
        }
    }
}

/// The simulated world.
pub struct World {
    params: Params,
    rng: fastrand::Rng,
    now: u64,
    clients: Vec<Client>,
    authority: Authority,
    resources: Vec<Resource>,
    network: Wire<Msg>,
    next_fault: u64,
    limits: Limits,
    last_grant: Fence,
    last_acquired: Fence,
    trace: Vec<TraceEntry>,
    stats: Stats,
}

impl World {
    /// A world for `params`, at true time zero, all clients idle.
    pub fn new(params: Params) -> World {
        let mut rng = fastrand::Rng::with_seed(params.seed ^ 0x5EED);
        let drift = params.config.drift;
        let clients = (0..params.clients)
            .map(|i| Client {
                clock: Clock::random(&mut rng, drift),
                lease: Some(Lease::new(owner(i, 0), params.config).expect("sim config is valid")),
                incarnation: 0,
                app: App::Idle,
                app_at: Some(rng.u64(0..params.config.ttl.as_micros())),
                restart_at: None,
                port: Port::default(),
                write_at: None,
                stale: None,
            })
            .collect();
        let authority = Authority {
            clock: Clock::random(&mut rng, drift),
            store: match params.discipline {
                Discipline::ServerTimed => Store::ServerTimed(Record::default()),
                Discipline::CompareAndSet => Store::CompareAndSet(CasRecord::default()),
            },
            down_until: None,
        };
        let next_fault = if params.faults { rng.u64(0..params.run_for / 4) } else { u64::MAX };
        World {
            params,
            rng,
            now: 0,
            clients,
            authority,
            resources: vec![Resource::default(); params.resources],
            network: Wire::new(),
            next_fault,
            limits: Limits { lock_delay: params.lock_delay, ..Limits::default() },
            last_grant: Fence::NONE,
            last_acquired: Fence::NONE,
            trace: Vec::with_capacity(4096),
            stats: Stats::default(),
        }
    }

    /// Runs until `params.run_for`, checking after every step.
    pub fn run(mut self) -> Result<Stats, Box<Violation>> {
        while self.now < self.params.run_for {
            if !self.step()? {
                break;
            }
        }
        Ok(self.stats)
    }

    /// True time now (µs).
    pub fn now(&self) -> u64 {
        self.now
    }

    /// The run's parameters.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The trace so far, one line per entry.
    pub fn trace(&self) -> impl Iterator<Item = String> + '_ {
        self.trace.iter().map(|e| e.to_string())
    }

    /// Jumps to the earliest deadline and handles it. Returns `false` when nothing is pending.
    pub fn step(&mut self) -> Result<bool, Box<Violation>> {
        #[derive(Clone, Copy)]
        enum Next {
            Deliver,
            Timer(usize),
            App(usize),
            Restart(usize),
            Write(usize),
            AuthorityUp,
            Fault,
        }
        let mut best: Option<(u64, Next)> = None;
        let mut consider = |t: u64, n: Next| {
            if best.is_none_or(|(b, _)| t < b) {
                best = Some((t, n));
            }
        };
        if let Some(t) = self.network.next_at() {
            consider(t, Next::Deliver);
        }
        for (i, c) in self.clients.iter().enumerate() {
            if let Some(at) = c.lease.as_ref().and_then(Lease::poll_timeout) {
                consider(c.clock.true_time_of(at).max(self.now), Next::Timer(i));
            }
            if let Some(t) = c.app_at {
                consider(t, Next::App(i));
            }
            if let Some(t) = c.restart_at {
                consider(t, Next::Restart(i));
            }
            if let Some(t) = c.write_at {
                consider(t, Next::Write(i));
            }
        }
        if let Some(t) = self.authority.down_until {
            consider(t, Next::AuthorityUp);
        }
        consider(self.next_fault, Next::Fault);
        let Some((t, next)) = best else {
            return Ok(false);
        };
        if t == u64::MAX {
            return Ok(false);
        }
        debug_assert!(t >= self.now, "time went backwards");
        self.now = t;
        self.stats.steps += 1;
        match next {
            Next::Deliver => {
                if let Some(msg) = self.network.pop() {
                    self.deliver(msg)?;
                }
            }
            Next::Timer(i) => {
                self.log(What::Timeout(i));
                let local = self.local(i);
                if let Some(l) = self.clients[i].lease.as_mut() {
                    l.handle_timeout(local);
                }
                self.drain(i)?;
            }
            Next::App(i) => self.app(i)?,
            Next::Write(i) => {
                // Sending a write changes no belief, grant or clock: nothing to check.
                self.write(i);
                return Ok(true);
            }
            Next::Restart(i) => {
                let c = &mut self.clients[i];
                c.incarnation += 1;
                c.restart_at = None;
                let o = owner(i, c.incarnation);
                c.lease = Some(Lease::new(o, self.params.config).expect("sim config is valid"));
                c.app = App::Idle;
                c.app_at = Some(self.now + self.rng.u64(0..self.params.config.ttl.as_micros()));
                c.write_at = None;
                c.stale = None;
                self.log(What::Restart(i, o));
            }
            Next::AuthorityUp => {
                self.authority.down_until = None;
                // A restarted process's monotonic clock has a new origin.
                let origin = self.rng.u64(0..1 << 40);
                self.authority.clock.restart(self.now, origin);
                let now = self.authority.clock.local(self.now);
                if let Store::ServerTimed(ref mut r) = self.authority.store {
                    *r = r.recover(now);
                }
                self.log(What::AuthorityUp);
            }
            Next::Fault => self.fault(),
        }
        self.check()?;
        Ok(true)
    }

    fn local(&self, i: usize) -> Instant {
        self.clients[i].clock.local(self.now)
    }

    fn log(&mut self, what: What) {
        self.trace.push(TraceEntry { t: self.now, what });
    }

    fn violation(&self, message: String) -> Box<Violation> {
        Box::new(Violation { params: self.params, at: self.now, message, trace: self.trace.clone() })
    }

    fn app(&mut self, i: usize) -> Result<(), Box<Violation>> {
        let local = self.local(i);
        let ttl = self.params.config.ttl.as_micros();
        let roll = self.rng.u8(..);
        let until = local + Duration::from_micros(self.rng.u64(0..2 * ttl));
        let c = &mut self.clients[i];
        c.app_at = None;
        let Some(lease) = c.lease.as_mut() else {
            return Ok(());
        };
        match c.app {
            App::Idle => {
                c.app = App::Acquiring;
                let (how, r) = match roll {
                    0..=179 => ("acquire", lease.acquire(local)),
                    180..=217 => ("try_acquire", lease.try_acquire(local)),
                    _ => ("acquire_until", lease.acquire_until(local, until)),
                };
                if let Err(e) = r {
                    return Err(self.violation(format!("c{i} {how} refused while idle: {e}")));
                }
                self.log(What::AppAcquire(i, how));
            }
            App::Holding => {
                // A holder's last write goes out just before its release, so that it races
                // the next holder's first one.
                if let (Some(_), Some(fence)) = (lease.remaining(local), lease.fence()) {
                    let owner = lease.owner();
                    self.send_write(i, owner, fence, true);
                }
                let c = &mut self.clients[i];
                let Some(lease) = c.lease.as_mut() else { return Ok(()) };
                c.app = App::Idle;
                c.write_at = None;
                let r = lease.release(local);
                self.log(What::AppRelease(i));
                if r.is_err() {
                    // The lease was lost and the event not yet seen; nothing to release.
                    self.clients[i].app = App::Holding;
                }
            }
            App::Acquiring => {}
        }
        self.drain(i)
    }

    fn drain(&mut self, i: usize) -> Result<(), Box<Violation>> {
        while let Some(request) = self.clients[i].lease.as_mut().and_then(Lease::poll_transmit) {
            self.log(What::Send(i, request));
            self.send(i, Msg::Request { client: i, request });
        }
        while let Some(e) = self.clients[i].lease.as_mut().and_then(Lease::poll_event) {
            self.log(What::ClientEvent(i, e));
            let ttl = self.params.config.ttl.as_micros();
            let c = &mut self.clients[i];
            match e {
                Event::Acquired { fence, after_expiry, .. } => {
                    self.stats.acquired += 1;
                    self.stats.acquired_after_expiry += u64::from(after_expiry);
                    if fence <= self.last_acquired && !self.params.bug.reuses_fences() {
                        return Err(self.violation(format!(
                            "c{i} told Acquired with fence {fence} after fence {} was told",
                            self.last_acquired
                        )));
                    }
                    self.last_acquired = fence;
                    c.app = App::Holding;
                    c.app_at = Some(self.now + self.rng.u64(0..3 * ttl));
                    // The first write at once: it is the one most likely to overtake a predecessor's late one.
                    c.write_at = Some(self.now);
                    c.stale = None;
                }
                Event::Renewed { .. } => self.stats.renewed += 1,
                Event::Lost { .. } | Event::NotAcquired { .. } | Event::Released { .. } => {
                    match e {
                        Event::Lost { fence, .. } => {
                            self.stats.lost += 1;
                            if self.params.bug == Bug::WritesAfterLoss {
                                c.stale = Some((fence, self.now + self.rng.u64(0..ttl)));
                            } else {
                                c.write_at = None;
                            }
                        }
                        Event::Released { .. } => self.stats.released += 1,
                        _ => {}
                    }
                    c.app = App::Idle;
                    c.app_at = Some(self.now + self.rng.u64(0..ttl));
                }
            }
        }
        Ok(())
    }

    fn send(&mut self, client: usize, msg: Msg) {
        let (_, dir) = msg.link();
        let port = &mut self.clients[client].port;
        if let Err(why) = self.network.send(&mut self.rng, self.now, port, dir, self.params.net, msg) {
            self.stats.dropped += 1;
            self.log(What::Dropped(why));
        }
    }

    /// A holder's periodic write: under its fence while it believes; under its lost fence
    /// too with [`Bug::WritesAfterLoss`].
    fn write(&mut self, i: usize) {
        let local = self.local(i);
        let ttl = self.params.config.ttl.as_micros();
        let c = &mut self.clients[i];
        c.write_at = None;
        let Some(lease) = c.lease.as_ref() else { return };
        let owner = lease.owner();
        let believed = lease.remaining(local).is_some();
        let fence = match (believed, lease.fence(), c.stale) {
            (true, Some(f), _) => Some(f),
            (false, _, Some((f, until))) if self.now < until => Some(f),
            _ => None,
        };
        if fence.is_some() || lease.fence().is_some() {
            c.write_at = Some(self.now + self.rng.u64(0..ttl / 2));
        }
        if let Some(fence) = fence {
            self.send_write(i, owner, fence, believed);
        }
    }

    fn send_write(&mut self, client: usize, owner: OwnerId, fence: Fence, believed: bool) {
        let resource = self.rng.usize(0..self.resources.len());
        self.stats.writes += 1;
        self.log(What::WriteSent(client, resource, fence, believed));
        self.send(client, Msg::Write(Write { client, resource, owner, fence, believed }));
    }

    /// The resource admits (or refuses) a write; the checker judges what it accepted.
    fn admit(&mut self, w: Write) -> Result<(), Box<Violation>> {
        let r = &mut self.resources[w.resource];
        let verdict = match self.params.bug {
            Bug::ResourceIgnoresFence => Ok(HighWater { fence: w.fence.max(r.mark.fence), holder: w.owner }),
            Bug::ResourceAdmitsEqualFence if w.fence >= r.mark.fence && w.fence != Fence::NONE => {
                Ok(HighWater { fence: w.fence, holder: w.owner })
            }
            _ => r.mark.admit(w.fence, w.owner),
        };
        let accepted = verdict.is_ok();
        match verdict {
            Ok(mark) => {
                r.mark = mark;
                self.stats.accepted += 1;
            }
            Err(AdmitError::Stale { .. }) => self.stats.refused_stale += 1,
            Err(AdmitError::Reused { .. }) => self.stats.refused_reused += 1,
            Err(_) => {}
        }
        self.log(What::WriteAdmitted(w.client, w.resource, w.fence, verdict.map(|_| ())));
        if !accepted {
            return Ok(());
        }
        let r = &mut self.resources[w.resource];
        let (c, res) = (w.client, w.resource);
        match r.highest {
            Some((f, _)) if w.fence < f => {
                return Err(self.violation(format!(
                    "r{res} accepted c{c}'s write under fence {} below its highest accepted fence {f}",
                    w.fence
                )))
            }
            Some((f, o)) if w.fence == f && o != w.owner => {
                return Err(self.violation(format!(
                    "r{res} accepted writes of two holders under the same fence {f}: {o} and c{c} as {}",
                    w.owner
                )))
            }
            Some((f, _)) if w.fence == f => {}
            _ => r.highest = Some((w.fence, w.owner)),
        }
        if !w.believed {
            return Err(self.violation(format!(
                "r{res} accepted c{c}'s write under fence {}, sent while not believing it held the lease",
                w.fence
            )));
        }
        Ok(())
    }

    fn deliver(&mut self, msg: Msg) -> Result<(), Box<Violation>> {
        match msg {
            Msg::Request { client, request } => {
                if self.authority.down_until.is_some() {
                    self.stats.dropped += 1;
                    self.log(What::Dropped("authority down"));
                    return Ok(());
                }
                let now = self.authority.clock.local(self.now);
                let reuse = self.params.bug.reuses_fences();
                let (reply, outcome) = match self.authority.store {
                    Store::ServerTimed(ref mut rec) => {
                        let d = authority::decide(rec, now, &request, &self.limits);
                        *rec = d.record;
                        if reuse && d.outcome == Outcome::Released {
                            rec.last_fence = Fence(rec.last_fence.0 - 1);
                        }
                        (d.reply, d.outcome)
                    }
                    Store::CompareAndSet(ref mut rec) => {
                        let d = rec.apply(&request);
                        *rec = d.record;
                        if reuse && d.outcome == Outcome::Released {
                            rec.fence = Fence(rec.fence.0 - 1);
                        }
                        (d.reply, d.outcome)
                    }
                };
                self.log(What::AuthorityHandles(client, request, reply));
                if outcome == Outcome::Refused && matches!(reply, Reply::Busy { .. }) && self.lock_delayed() {
                    self.stats.lock_delayed += 1;
                }
                if outcome == Outcome::Granted {
                    self.stats.grants += 1;
                    if let Some((fence, _)) = reply.grant() {
                        if fence <= self.last_grant && !reuse {
                            return Err(self.violation(format!(
                                "authority granted fence {fence} after fence {}",
                                self.last_grant
                            )));
                        }
                        self.last_grant = fence;
                    }
                }
                // The reply goes to whichever incarnation is live when it arrives (as on a
                // serial link): a restarted client must ignore replies meant for its old self.
                let response = Response { id: request.id, owner: request.owner, reply };
                self.send(client, Msg::Response { client, response });
            }
            Msg::Write(w) => self.admit(w)?,
            Msg::Response { client, response } => {
                let c = &self.clients[client];
                if c.cut(self.now, Direction::Inbound) || c.lease.is_none() {
                    self.stats.dropped += 1;
                    self.log(What::Dropped("client unreachable"));
                    return Ok(());
                }
                self.log(What::ClientReceives(client, response));
                let local = self.local(client);
                if let Some(l) = self.clients[client].lease.as_mut() {
                    l.handle_response(local, response);
                }
                self.drain(client)?;
            }
        }
        Ok(())
    }

    /// Whether the server-timed record is free but inside its lock-delay.
    fn lock_delayed(&self) -> bool {
        let Store::ServerTimed(ref rec) = self.authority.store else { return false };
        rec.holder.is_none() && rec.expired_at.is_some() && !self.params.lock_delay.is_zero()
    }

    fn fault(&mut self) {
        let ttl = self.params.config.ttl.as_micros();
        self.next_fault = self.now + self.rng.u64(0..4 * ttl);
        let i = self.rng.usize(0..self.clients.len());
        match self.rng.u8(0..5) {
            0 if self.clients[i].lease.is_some() => {
                let c = &mut self.clients[i];
                c.lease = None;
                c.app_at = None;
                c.write_at = None;
                c.stale = None;
                c.restart_at = Some(self.now + self.rng.u64(0..2 * ttl));
                self.log(What::Crash(i));
            }
            1 => {
                let until = self.now + self.rng.u64(0..2 * ttl);
                let dir = Direction::draw(&mut self.rng);
                self.clients[i].port.partition(until, dir);
                self.log(What::Partition(i, until, dir));
            }
            2 if self.authority.down_until.is_none() => {
                let until = self.now + self.rng.u64(0..ttl);
                self.authority.down_until = Some(until);
                self.log(What::AuthorityDown(until));
            }
            // A clock's rate wanders, within the bound.
            3 => {
                let dev = draw_rate(&mut self.rng, self.params.config.drift);
                self.clients[i].clock.set_rate(self.now, dev);
                self.log(What::Rate(Some(i), dev));
            }
            4 => {
                let dev = draw_rate(&mut self.rng, self.params.config.drift);
                self.authority.clock.set_rate(self.now, dev);
                self.log(What::Rate(None, dev));
            }
            _ => {}
        }
    }

    fn check(&self) -> Result<(), Box<Violation>> {
        let mut holder: Option<(usize, Fence, Duration)> = None;
        for (i, c) in self.clients.iter().enumerate() {
            let Some(l) = c.lease.as_ref() else { continue };
            if let Some(rem) = l.remaining(c.clock.local(self.now)) {
                let fence = l.fence().unwrap_or_default();
                if let Some((j, f, r)) = holder {
                    return Err(self.violation(format!(
                        "two holders at once: c{j} (fence {f}, {r} left) and c{i} (fence {fence}, {rem} left)"
                    )));
                }
                holder = Some((i, fence, rem));
                self.refines(i, l, fence, rem)?;
            }
        }
        Ok(())
    }

    /// Refinement: a believer is the authority's current holder under its fence, and the
    /// authority's grant lasts at least as long as the belief, in true time (both projected
    /// at today's rates; a later rate change is a step, and is checked again then).
    fn refines(&self, i: usize, l: &Lease, fence: Fence, rem: Duration) -> Result<(), Box<Violation>> {
        let me = l.owner();
        let fail = |what: String| Err(self.violation(format!("c{i} believes fence {fence} but {what}")));
        match self.authority.store {
            Store::ServerTimed(ref rec) => {
                let Some(h) = rec.holder else { return fail("the authority has no holder".into()) };
                if h.owner != me || h.fence < fence {
                    return fail(format!("the authority's holder is {} under fence {}", h.owner, h.fence));
                }
                // A higher fence for the same owner: a duplicated, stale acquire of this very
                // lease was granted anew ("already mine → new fence"). Nobody is told that
                // fence, and this lease's next renewal is refused.
                let c = &self.clients[i];
                let belief_end = c.clock.true_time_of(c.clock.local(self.now) + rem);
                let grant_end = self.authority.clock.true_time_of(h.expires_at);
                if grant_end < belief_end {
                    return fail(format!(
                        "the authority's grant ends at t={grant_end}us, before the belief's end at t={belief_end}us"
                    ));
                }
            }
            Store::CompareAndSet(ref rec) => {
                if rec.owner != Some(me) || rec.fence < fence {
                    return fail(format!("the record is held by {:?} under fence {}", rec.owner, rec.fence));
                }
            }
        }
        Ok(())
    }
}

fn owner(client: usize, incarnation: u32) -> OwnerId {
    OwnerId(((client as u64 + 1) << 32) | u64::from(incarnation))
}

/// Runs one seed with the real machine (or with `fault` injected).
pub fn run_seed(seed: u64, fault: Fault) -> Result<Stats, Box<Violation>> {
    World::new(Params::from_seed(seed, fault)).run()
}

/// Runs one seed with the real machine and `bug` planted outside it.
pub fn run_planted(seed: u64, bug: Bug) -> Result<Stats, Box<Violation>> {
    World::new(Params::planted(seed, bug)).run()
}
