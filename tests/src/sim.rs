//! Deterministic simulation: a [`World`] of clients, one authority and a seeded network.
//!
//! True time is a `u64` of microseconds that only the simulator sees. Every party reads its
//! own clock, `offset + t·rate`, with a rate drawn per party so that any two rates differ by at
//! most the factor `1+ε` the core is configured for. [`World::step`] jumps true time to the
//! earliest pending deadline (a message delivery, a lease timer, an application action, a
//! fault) and handles it; the checker then asserts, on true time:
//! - at most one client believes it holds the key (`remaining(its local now)` is `Some`);
//! - the authority's grants carry strictly increasing fences;
//! - no client is told `Acquired` with a fence at or below one already told to anyone.

use std::collections::BTreeMap;
use std::fmt;

use leasehold_core::authority::{self, Limits, Outcome, Record};
use leasehold_core::{
    Config, Drift, Duration, Event, Fault, Fence, Instant, Lease, Op, OwnerId, Reply, Request, Response,
};

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
    /// Smallest one-way network delay (µs).
    pub min_delay: u64,
    /// Largest one-way network delay (µs).
    pub max_delay: u64,
    /// Per-message loss probability.
    pub loss: f64,
    /// Per-message duplication probability.
    pub duplication: f64,
    /// Whether clients crash, partitions happen and the authority restarts.
    pub faults: bool,
    /// Simulated true time to run (µs).
    pub run_for: u64,
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
        Params {
            seed,
            clients: rng.usize(3..=5),
            discipline: if rng.bool() { Discipline::ServerTimed } else { Discipline::CompareAndSet },
            config,
            min_delay: rng.u64(0..=max_delay / 4),
            max_delay,
            loss: rng.f64() * 0.2,
            duplication: rng.f64() * 0.1,
            faults: rng.u8(..) < 200,
            run_for: ttl.as_micros() * 30,
        }
    }
}

/// A party's local clock: `offset + t·(1 + dev_ppm/10⁶)`, rounded down.
#[derive(Debug, Clone, Copy)]
struct Clock {
    offset: u64,
    dev_ppm: i64,
}

const PPM: i128 = 1_000_000;

impl Clock {
    fn random(rng: &mut fastrand::Rng, drift: Drift) -> Clock {
        // Any two rates in [1−δ, 1+δ] differ by at most (1+δ)/(1−δ) = 1+ε when δ = ε/(2+ε).
        let eps = i128::from(drift.as_ppm());
        let delta = (eps * PPM / (2 * PPM + eps)) as i64;
        Clock { offset: rng.u64(0..1 << 40), dev_ppm: rng.i64(-delta..=delta) }
    }

    fn local(&self, t: u64) -> Instant {
        let scaled = i128::from(t) * (PPM + i128::from(self.dev_ppm)) / PPM;
        Instant::from_micros(self.offset + scaled as u64)
    }

    /// The earliest true time at which this clock reads `at` or later.
    fn true_time_of(&self, at: Instant) -> u64 {
        let l = i128::from(at.as_micros().saturating_sub(self.offset));
        let rate = PPM + i128::from(self.dev_ppm);
        let mut t = ((l * PPM + rate - 1) / rate).min(i128::from(u64::MAX / 2)) as u64;
        while t > 0 && self.local(t - 1) >= at {
            t -= 1;
        }
        while self.local(t) < at {
            t += 1;
        }
        t
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
    Partition(usize, u64),
    AuthorityDown(u64),
    AuthorityUp,
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
            What::Partition(c, until) => {
                write!(f, "c{c} partitioned until {:.3}ms", until as f64 / 1000.0)
            }
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
        write!(
            f,
            "replay: {fault}LEASEHOLD_SIM_SEED={} cargo test -p leasehold-tests --test simulation replay -- --nocapture",
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
    partitioned_until: u64,
}

/// A compare-and-set record as a DynamoDB item holds it.
#[derive(Debug, Clone, Copy, Default)]
struct CasRecord {
    owner: Option<OwnerId>,
    fence: Fence,
    version: u64,
    ttl: Duration,
}

impl CasRecord {
    /// The conditional writes the DynamoDB backend issues, as the store evaluates them.
    fn apply(&mut self, req: &Request) -> (Reply, bool) {
        let mine = self.owner == Some(req.owner);
        let observed = Reply::Observed { version: self.version, ttl: self.ttl };
        match req.op {
            Op::Acquire { ttl } | Op::Takeover { ttl, .. } => {
                let allowed = match req.op {
                    Op::Takeover { version, .. } => self.owner.is_none() || mine || version == self.version,
                    _ => self.owner.is_none() || mine,
                };
                if !allowed {
                    return (observed, false);
                }
                self.fence = Fence(self.fence.0 + 1);
                self.version += 1;
                self.owner = Some(req.owner);
                self.ttl = ttl;
                (Reply::Granted { fence: self.fence, ttl }, true)
            }
            Op::Renew { fence, ttl } if mine && fence == self.fence => {
                self.version += 1;
                self.ttl = ttl;
                (Reply::Granted { fence, ttl }, false)
            }
            Op::Release { fence } if mine && fence == self.fence => {
                self.version += 1;
                self.owner = None;
                (Reply::Released, false)
            }
            Op::Renew { .. } | Op::Release { .. } => (Reply::NotHolder, false),
        }
    }
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
    ToAuthority { client: usize, request: Request },
    ToClient { client: usize, response: Response },
}

/// The simulated world.
pub struct World {
    params: Params,
    rng: fastrand::Rng,
    now: u64,
    clients: Vec<Client>,
    authority: Authority,
    network: BTreeMap<(u64, u64), Msg>,
    next_msg: u64,
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
                partitioned_until: 0,
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
            network: BTreeMap::new(),
            next_msg: 0,
            next_fault,
            limits: Limits::default(),
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
            AuthorityUp,
            Fault,
        }
        let mut best: Option<(u64, Next)> = None;
        let mut consider = |t: u64, n: Next| {
            if best.is_none_or(|(b, _)| t < b) {
                best = Some((t, n));
            }
        };
        if let Some((&(t, _), _)) = self.network.first_key_value() {
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
                if let Some((_, msg)) = self.network.pop_first() {
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
            Next::Restart(i) => {
                let c = &mut self.clients[i];
                c.incarnation += 1;
                c.restart_at = None;
                let o = owner(i, c.incarnation);
                c.lease = Some(Lease::new(o, self.params.config).expect("sim config is valid"));
                c.app = App::Idle;
                c.app_at = Some(self.now + self.rng.u64(0..self.params.config.ttl.as_micros()));
                self.log(What::Restart(i, o));
            }
            Next::AuthorityUp => {
                self.authority.down_until = None;
                // A restarted process's monotonic clock has a new origin.
                self.authority.clock.offset = self.rng.u64(0..1 << 40);
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
                c.app = App::Idle;
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
            self.send(i, Msg::ToAuthority { client: i, request });
        }
        while let Some(e) = self.clients[i].lease.as_mut().and_then(Lease::poll_event) {
            self.log(What::ClientEvent(i, e));
            let ttl = self.params.config.ttl.as_micros();
            let c = &mut self.clients[i];
            match e {
                Event::Acquired { fence, .. } => {
                    self.stats.acquired += 1;
                    if fence <= self.last_acquired {
                        return Err(self.violation(format!(
                            "c{i} told Acquired with fence {fence} after fence {} was told",
                            self.last_acquired
                        )));
                    }
                    self.last_acquired = fence;
                    c.app = App::Holding;
                    c.app_at = Some(self.now + self.rng.u64(0..3 * ttl));
                }
                Event::Renewed { .. } => self.stats.renewed += 1,
                Event::Lost { .. } | Event::NotAcquired { .. } | Event::Released { .. } => {
                    match e {
                        Event::Lost { .. } => self.stats.lost += 1,
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
        if self.clients[client].partitioned_until > self.now {
            self.stats.dropped += 1;
            return self.log(What::Dropped("partition"));
        }
        if self.rng.f64() < self.params.loss {
            self.stats.dropped += 1;
            return self.log(What::Dropped("loss"));
        }
        let copies = if self.rng.f64() < self.params.duplication { 2 } else { 1 };
        for _ in 0..copies {
            let at = self.now + self.rng.u64(self.params.min_delay..=self.params.max_delay);
            self.network.insert((at, self.next_msg), msg);
            self.next_msg += 1;
        }
    }

    fn deliver(&mut self, msg: Msg) -> Result<(), Box<Violation>> {
        match msg {
            Msg::ToAuthority { client, request } => {
                if self.authority.down_until.is_some() {
                    self.stats.dropped += 1;
                    self.log(What::Dropped("authority down"));
                    return Ok(());
                }
                let now = self.authority.clock.local(self.now);
                let (reply, granted) = match self.authority.store {
                    Store::ServerTimed(ref mut rec) => {
                        let d = authority::decide(rec, now, &request, &self.limits);
                        *rec = d.record;
                        (d.reply, d.outcome == Outcome::Granted)
                    }
                    Store::CompareAndSet(ref mut rec) => rec.apply(&request),
                };
                self.log(What::AuthorityHandles(client, request, reply));
                if granted {
                    self.stats.grants += 1;
                    if let Reply::Granted { fence, .. } = reply {
                        if fence <= self.last_grant {
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
                self.send(client, Msg::ToClient { client, response });
            }
            Msg::ToClient { client, response } => {
                let c = &self.clients[client];
                if c.partitioned_until > self.now || c.lease.is_none() {
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

    fn fault(&mut self) {
        let ttl = self.params.config.ttl.as_micros();
        self.next_fault = self.now + self.rng.u64(0..4 * ttl);
        let i = self.rng.usize(0..self.clients.len());
        match self.rng.u8(0..3) {
            0 if self.clients[i].lease.is_some() => {
                let c = &mut self.clients[i];
                c.lease = None;
                c.app_at = None;
                c.restart_at = Some(self.now + self.rng.u64(0..2 * ttl));
                self.log(What::Crash(i));
            }
            1 => {
                let until = self.now + self.rng.u64(0..2 * ttl);
                self.clients[i].partitioned_until = until;
                self.log(What::Partition(i, until));
            }
            2 if self.authority.down_until.is_none() => {
                let until = self.now + self.rng.u64(0..ttl);
                self.authority.down_until = Some(until);
                self.log(What::AuthorityDown(until));
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
