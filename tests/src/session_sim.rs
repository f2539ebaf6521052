//! Deterministic simulation of sessions: many [`Session`] holders, one [`SessionAuthority`],
//! a seeded faulty network and drifting clocks.
//!
//! Built like [`crate::sim`] (true time in µs that only the simulator sees; [`World::step`]
//! jumps to the earliest deadline; a failing seed prints its trace and replays exactly), on the
//! same clocks and network: rates drawn at the extremes of ±ε three times in four, delay,
//! reordering, duplication, Gilbert-Elliott burst loss and partitions one way or both. After
//! every step the checker asserts, on true time:
//! - at most N holders believe each key, N being its limit (1 for a lease; some keys are
//!   semaphores of 2 or 3), and the authority never has more than N holders of it;
//! - each key's grants carry strictly increasing fences across all of its holders, and no
//!   holder is told a fence at or below one it was told before;
//! - a key moves only when its holder released it, closed, or expired, never before;
//! - a queued key goes to the first waiter still alive (a semaphore's freed slots to the first
//!   ones, in order), and never to an expired session;
//! - a contender asking with another limit (one in 16 acquires asks one more) is refused
//!   `LimitMismatch` only while the key has holders or waiters under another limit;
//! - replayed and forged requests (injected copies of requests the authority has handled,
//!   as they are or with a wrong secret) leave the authority's state as it was;
//! - observers (sessions that only observe every key) are told the key's true holder
//!   history in order: the first report of a session is the holder when its observe was
//!   handled, and the report numbered `n` is the state `n − n₀` changes after that one, so
//!   no change is lost, repeated or reordered, and a reported fence never goes down;
//! - once the network heals (after `run_for`: no loss, no faults, no new acquisitions) each
//!   observer's last report is the key's holder at the end.
//!
//! Beside the sessions, up to two v1 clients (core's [`Lease`] machine, each for one of the
//! keys, crashed, restarted and partitioned like the holders) contend for the same keys in one
//! namespace, as on the built-in server: the authority composes v1's rules with the session
//! authority through [`leasehold_core::namespace`], the same calls in the same order as
//! `server/src/namespace.rs`. The checker adds:
//! - a v1 believer counts like a session holder, and holds its key alone: with one, the key
//!   has no other believer at any true instant;
//! - each key's fences strictly increase across both protocols' grants;
//! - no v1 grant while a session holds the key, the sessions hold the key for v1 whenever v1
//!   keeps it (its grant, or the lock-delay after one), and never beside a session's grant;
//! - no session (a queued waiter included) is granted a key before v1's grant of it, and its
//!   lock-delay, ended on the authority's clock. Send-anchoring is what the believers check
//!   covers: a v1 client believes from its request's send, before the authority's decision.
//!
//! As on the server, v1's set lands after its decision and answer (here up to the network's
//! largest delay later), and the key's next v1 requests wait for it, so sessions meet holds
//! still `Pending` and releases already answered.
//!
//! A third of the seeds have no v1 client; they draw exactly what they drew before v1 clients
//! existed, so their runs (and traces) are unchanged.
//!
//! **Held keepalives** (half the seeds). The authority holds each keepalive, as the built-in
//! server's writer does, until core's rule ([`SessionAuthority::keepalive_due`]) says its
//! session has news (a pushed grant, an observed change) or is gone, or its hold ends: what
//! the holder asked (`Options::session`'s `min(renew_every, 0.75 × request timeout)`, the
//! holders timed as it times them), at most a third of the session's ttl and half its time
//! left. Which are due is decided for all held keepalives before any is handled, after every
//! batch, until none is. The checker adds:
//! - once the network is healed and what was in flight has landed (two ttls), the holders let
//!   go of their keys one at a time, and a waiter handed a key hears of it within five of the
//!   network's largest delays plus 4ε of a hold (see `World::tell_bound`), where a keepalive
//!   held to its hold's end would take up to a whole hold more.
//!
//! **A durable authority** (a quarter of the seeds, all without v1 clients). Every input is
//! logged with the authority's clock, and each step's inputs are one batch (the server's group
//! commit), answered only once committed. Now and then (one batch in 400) the commit fails:
//! its replies are dropped (the server answers them unavailable) and the authority is rebuilt
//! from the log, the checker's record of grants, holder history and observations with it. A
//! few times a run the authority crashes between batches (its held keepalives go with their
//! connections, nothing reaches it while down) and restarts as `Sessions::open` does: the
//! snapshot and the log after it replayed, the clock continuing 1 µs after the last time logged
//! (`LogClock`), then `Recover` re-arms every session, and a snapshot is taken. The checker adds:
//! - the table rebuilt after a failed commit is the one before the batch, and the one replayed
//!   at a restart is the one that crashed;
//! - everything above holds across restarts and failed commits, and each key's fences strictly
//!   increase across restarts too (a session granted a key before the crash holds it after, so
//!   nobody else is granted it while its holder may believe).
//!
//! Seeds that draw neither draw exactly what they drew before (the new draws come last, and
//! from a generator of their own).

use std::collections::BTreeMap;
use std::fmt;

use crate::netem::{Clock, Direction, Net, Port, Wire};
use leasehold_core::authority::{Limits, Outcome, Record};
use leasehold_core::namespace::{self, V1Claim};
use leasehold_core::session::authority::{
    ExternalHold, KeyHolder, KeyStatus, SessionFault, SessionInput as Input, SessionStatus,
};
use leasehold_core::session::wire::{
    parse_label, Secret, SessionId, SessionOp, SessionReply, SessionRequest, SessionResponse,
};
use leasehold_core::session::{Session, SessionAuthority, SessionEvent, SessionLimits, SessionState};
use leasehold_core::{
    parse_key, Config, Drift, Duration, Event, Fault, Fence, Instant, Key, Lease, OwnerId, Reject, Request,
    Response,
};

/// Sessions the authority can track: clients plus the orphans of duplicated opens. Claims:
/// every client on every key (5 × 3) with room to spare.
type Authority = SessionAuthority<32, 4, 32>;
type Holder = Session<4>;

/// Everything that varies between runs, drawn from the seed.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// The seed everything is drawn from.
    pub seed: u64,
    /// Number of holders.
    pub clients: usize,
    /// Number of keys they contend for.
    pub keys: usize,
    /// Each key's holder limit (1: a lease; more: a semaphore); the first `keys` are used.
    pub limits: [u16; 3],
    /// Session timing shared by all holders.
    pub config: Config,
    /// The network: delay, loss (with bursts) and duplication.
    pub net: Net,
    /// The authority's deliberate bug, if any.
    pub fault: SessionFault,
    /// Simulated true time to run (µs).
    pub run_for: u64,
    /// Number of observer sessions, after the holders.
    pub observers: usize,
    /// Number of v1 clients (core's [`Lease`] machine), each contending for one of the keys
    /// beside the sessions, in the same namespace (none: the run is as before they existed).
    pub v1_clients: usize,
    /// The v1 rules' lock-delay after an expiry.
    pub lock_delay: Duration,
    /// The authority holds keepalives until their session has news or their hold ends, as the
    /// built-in server does, and the holders are timed as `Options::session` times them
    /// (renewing every ttl/4, a request timeout of ttl/3), each keepalive asking a hold of
    /// `min(renew_every, 0.75 × request timeout)`.
    pub held_keepalives: bool,
    /// The authority logs its inputs and commits them a batch at a time, now and then a
    /// commit fails (its batch never happened: rebuilt from the log), and a few times a run it
    /// crashes and restarts from its log. Only in runs without v1 clients.
    pub durable: bool,
    /// A deliberate bug of the simulated server (not of core's rules), if any.
    pub server_fault: ServerFault,
}

/// Deliberate bugs of the simulated server's log, so tests prove the checker catches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerFault {
    /// As the built-in server does.
    #[default]
    None,
    /// Send a batch's replies before its commit: when the commit fails, holders believe
    /// grants that never happened.
    ReplyBeforeCommit,
}

impl Params {
    /// Draws a run's parameters from `seed`, with `fault` planted in the authority.
    pub fn from_seed(seed: u64, fault: SessionFault) -> Params {
        let mut rng = fastrand::Rng::with_seed(seed);
        let ttl = Duration::from_millis(rng.u64(200..=2_000));
        let mut config = Config::new(ttl);
        config.drift = Drift::from_ppm(*rng.choice(&[1_000, 10_000, 50_000]).unwrap_or(&10_000));
        // The safety argument must hold with no margin at all.
        config.margin = Duration::ZERO;
        let max_delay = rng.u64(1..=ttl.as_micros() / 10);
        // Drawn in the order of the seeds' first runs, so a seed still replays the same run.
        let clients = rng.usize(2..=5);
        let keys = rng.usize(1..=3);
        // Half the keys are semaphores, which need a client more than their limit to queue.
        let limits = [(); 3].map(|_| if rng.bool() { 1 } else { rng.u16(2..=3) });
        let min_delay = rng.u64(0..=max_delay / 4);
        let (loss, duplication) = (rng.f64() * 0.2, rng.f64() * 0.1);
        // Drawn after the network's first numbers, as in runs before observers existed.
        let observers = rng.usize(1..=2);
        let (burst_start, burst_end, burst_loss) =
            (rng.f64() * 0.05, 0.1 + rng.f64() * 0.4, 0.5 + rng.f64() * 0.5);
        // Drawn last again: a third of the seeds run without v1 clients, as before them.
        let v1_clients = rng.usize(0..=2);
        let lock_delay = match rng.u8(0..3) {
            0 => Duration::from_micros(rng.u64(0..=ttl.as_micros() / 2)),
            _ => Duration::ZERO,
        };
        // Drawn after everything else, so runs with neither are as before these existed.
        let held_keepalives = rng.bool();
        let durable = v1_clients == 0 && rng.u8(0..4) != 0;
        if held_keepalives {
            // `Options::session`: a keepalive held at the authority at almost every moment.
            config.request_timeout = ttl.mul_div_floor(1, 3);
            config.renew_every = ttl.mul_div_floor(1, 4);
        }
        Params {
            seed,
            clients,
            keys,
            limits,
            config,
            net: Net { loss, burst_start, burst_end, burst_loss, min_delay, max_delay, duplication },
            fault,
            run_for: ttl.as_micros() * 30,
            observers,
            v1_clients,
            lock_delay,
            held_keepalives,
            durable,
            server_fault: ServerFault::None,
        }
    }

    /// The hold a holder asks for its keepalives, as `SessionClient` does.
    fn hold(&self) -> Duration {
        let timeout = self.config.request_timeout;
        self.config.renew_every.min(Duration::from_micros(timeout.as_micros() * 3 / 4))
    }
}

/// What happened, formatted only when a run fails.
#[derive(Debug, Clone)]
enum What {
    Send(usize, SessionRequest),
    Dropped(&'static str),
    Handles(usize, SessionRequest, SessionReply),
    Receives(usize, SessionResponse),
    Event(usize, SessionEvent),
    AuthorityTimer,
    Crash(usize),
    Restart(usize),
    Partition(usize, u64, Direction),
    Injected(&'static str, SessionRequest, SessionReply),
    V1App(usize, &'static str),
    V1Send(usize, Request),
    V1Handles(usize, Key, Request, leasehold_core::Reply),
    V1Receives(usize, Response),
    V1Event(usize, Event),
    V1Crash(usize),
    V1Restart(usize, OwnerId),
    V1Partition(usize, u64, Direction),
    V1Waits(usize, Key),
    V1Set(Key, Option<Instant>),
    Parked(usize, SessionRequest, u64),
    CommitFailed(usize, usize),
    AuthorityCrash(u64),
    AuthorityRestart(Instant),
}

/// One line of a run's trace.
#[derive(Debug, Clone)]
pub struct TraceEntry {
    t: u64,
    what: What,
}

impl fmt::Display for TraceEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t={:>10.3}ms ", self.t as f64 / 1000.0)?;
        match &self.what {
            What::Send(c, r) => write!(f, "c{c} sends {} seq={} {:?}", r.session, r.seq.0, r.op),
            What::Dropped(why) => write!(f, "   network drops a message ({why})"),
            What::Handles(c, r, reply) => {
                write!(f, "authority: c{c} {} seq={} {:?} -> {reply:?}", r.session, r.seq.0, r.op)
            }
            What::Receives(c, r) => write!(f, "c{c} receives {} seq={} {:?}", r.session, r.seq.0, r.reply),
            What::Event(c, e) => write!(f, "c{c} EVENT {e:?}"),
            What::AuthorityTimer => write!(f, "authority timer"),
            What::Crash(c) => write!(f, "c{c} CRASHES"),
            What::Restart(c) => write!(f, "c{c} restarts"),
            What::Partition(c, until, dir) => {
                write!(f, "c{c} partitioned ({dir:?}) until {:.3}ms", *until as f64 / 1000.0)
            }
            What::Injected(how, r, reply) => {
                write!(f, "INJECTED {how}: {} seq={} {:?} -> {reply:?}", r.session, r.seq.0, r.op)
            }
            What::V1App(j, how) => write!(f, "v{j} app: {how}"),
            What::V1Send(j, r) => write!(f, "v{j} sends v1 {:?} id={} owner={:x}", r.op, r.id.0, r.owner.0),
            What::V1Handles(j, k, r, reply) => {
                write!(f, "authority: v{j} v1 {k} {:?} id={} -> {reply:?}", r.op, r.id.0)
            }
            What::V1Receives(j, r) => write!(f, "v{j} receives v1 id={} {:?}", r.id.0, r.reply),
            What::V1Event(j, e) => write!(f, "v{j} EVENT {e:?}"),
            What::V1Crash(j) => write!(f, "v{j} CRASHES"),
            What::V1Restart(j, o) => write!(f, "v{j} restarts as owner {:x}", o.0),
            What::V1Partition(j, until, dir) => {
                write!(f, "v{j} partitioned ({dir:?}) until {:.3}ms", *until as f64 / 1000.0)
            }
            What::V1Waits(j, k) => write!(f, "authority: v{j} v1 {k} waits for the key's turn"),
            What::V1Set(k, until) => write!(f, "authority: sessions told v1 keeps {k} until {until:?}"),
            What::Parked(c, r, until) => write!(
                f,
                "authority: holds c{c} {} seq={} {:?} until {:.3}ms",
                r.session,
                r.seq.0,
                r.op,
                *until as f64 / 1000.0
            ),
            What::CommitFailed(entries, replies) => {
                write!(
                    f,
                    "authority: COMMIT FAILS ({entries} inputs, {replies} replies answered unavailable)"
                )
            }
            What::AuthorityCrash(until) => {
                write!(f, "authority CRASHES, down until {:.3}ms", *until as f64 / 1000.0)
            }
            What::AuthorityRestart(base) => write!(f, "authority restarts from its log, clock at {base:?}"),
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
        writeln!(
            f,
            "SESSION SAFETY VIOLATION with seed {} at t={}us: {}",
            self.params.seed, self.at, self.message
        )?;
        writeln!(f, "params: {:?}", self.params)?;
        let skip = self.trace.len().saturating_sub(300);
        writeln!(f, "trace (last {} of {} entries):", self.trace.len() - skip, self.trace.len())?;
        for e in &self.trace[skip..] {
            writeln!(f, "  {e}")?;
        }
        let fault = match (self.params.fault, self.params.config.fault) {
            (SessionFault::HandOffEarly, _) => "LEASEHOLD_SIM_FAULT=hand-off-early ",
            (SessionFault::KeepExpiredWaiters, _) => "LEASEHOLD_SIM_FAULT=keep-expired-waiters ",
            (SessionFault::AcceptReplays, _) => "LEASEHOLD_SIM_FAULT=accept-replays ",
            (SessionFault::OverAdmit, _) => "LEASEHOLD_SIM_FAULT=over-admit ",
            (SessionFault::IgnoreLimitMismatch, _) => "LEASEHOLD_SIM_FAULT=ignore-limit-mismatch ",
            (SessionFault::HideFreeChanges, _) => "LEASEHOLD_SIM_FAULT=hide-free-changes ",
            (SessionFault::ExternalOverSessions, _) => "LEASEHOLD_SIM_FAULT=external-over-sessions ",
            (SessionFault::ExternalBelowFloor, _) => "LEASEHOLD_SIM_FAULT=external-below-floor ",
            (SessionFault::EndExternalEarly, _) => "LEASEHOLD_SIM_FAULT=end-external-early ",
            (SessionFault::CountStaleAcks, _) => "LEASEHOLD_SIM_FAULT=count-stale-acks ",
            (SessionFault::HoldPushedGrants, _) => "LEASEHOLD_SIM_FAULT=hold-pushed-grants ",
            (SessionFault::RecoverForgetsFences, _) => "LEASEHOLD_SIM_FAULT=recover-forgets-fences ",
            _ if self.params.server_fault == ServerFault::ReplyBeforeCommit => {
                "LEASEHOLD_SIM_FAULT=reply-before-commit "
            }
            (_, Fault::AnchorAtReceive) => "LEASEHOLD_SIM_FAULT=anchor-at-receive ",
            _ => "",
        };
        write!(
            f,
            "replay: {fault}LEASEHOLD_SIM_SEED={} cargo test -p leasehold-tests --test sessions replay -- --nocapture",
            self.params.seed
        )
    }
}

/// What a run did, so tests can check it exercised what the checker checks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Steps taken.
    pub steps: u64,
    /// Grants the authority made.
    pub grants: u64,
    /// Of those, hand-offs to the head of a queue.
    pub hand_offs: u64,
    /// `Acquired` events told to holders.
    pub acquired: u64,
    /// `Queued` events.
    pub queued: u64,
    /// Keys `Lost` by holders.
    pub lost: u64,
    /// Keys `Released` by holders.
    pub released: u64,
    /// Replayed and forged requests injected.
    pub injected: u64,
    /// Messages dropped.
    pub dropped: u64,
    /// Steps after which two or more holders believed the same semaphore key.
    pub shared: u64,
    /// Acquires refused for asking another limit than the key's holders and waiters.
    pub mismatched: u64,
    /// Changes of observed keys told to observers.
    pub observed: u64,
    /// v1 grants.
    pub v1_grants: u64,
    /// v1 acquires and renewals refused because sessions held or waited for the key.
    pub v1_refused: u64,
    /// Session grants of a key whose last grant was v1's.
    pub v2_after_v1: u64,
    /// Of those, hand-offs to sessions that queued behind v1's grant.
    pub queued_behind_v1: u64,
    /// Keepalives the authority held.
    pub held: u64,
    /// Of those, answered before their hold's end (their session had news or ended).
    pub held_answered_early: u64,
    /// Hand-offs after the heal whose waiter was checked to be told within the bound.
    pub prompt: u64,
    /// Commits that failed (their batch rebuilt away).
    pub failed_commits: u64,
    /// Authority restarts from its log.
    pub restarts: u64,
    /// Keys granted after a restart that had been granted before it.
    pub granted_across_restarts: u64,
}

impl Stats {
    /// Adds `other` into `self`.
    pub fn add(&mut self, o: &Stats) {
        self.steps += o.steps;
        self.grants += o.grants;
        self.hand_offs += o.hand_offs;
        self.acquired += o.acquired;
        self.queued += o.queued;
        self.lost += o.lost;
        self.released += o.released;
        self.injected += o.injected;
        self.dropped += o.dropped;
        self.shared += o.shared;
        self.mismatched += o.mismatched;
        self.observed += o.observed;
        self.v1_grants += o.v1_grants;
        self.v1_refused += o.v1_refused;
        self.v2_after_v1 += o.v2_after_v1;
        self.queued_behind_v1 += o.queued_behind_v1;
        self.held += o.held;
        self.held_answered_early += o.held_answered_early;
        self.prompt += o.prompt;
        self.failed_commits += o.failed_commits;
        self.restarts += o.restarts;
        self.granted_across_restarts += o.granted_across_restarts;
    }
}

struct Client {
    /// Observes every key instead of acquiring.
    observer: bool,
    clock: Clock,
    session: Option<Holder>,
    app_at: Option<u64>,
    restart_at: Option<u64>,
    port: Port,
}

/// A key's v1 turn, from a v1 decision to its set: what to tell the sessions, when, and the
/// key's v1 requests that arrived meanwhile.
struct V1Turn {
    set_at: u64,
    record: Record,
    floor: Fence,
    backlog: Vec<(usize, Request)>,
}

/// A v1 client: core's [`Lease`] machine for one key, as the v1 simulator drives it.
struct V1Client {
    /// Index into the world's keys.
    key: usize,
    clock: Clock,
    lease: Option<Lease>,
    incarnation: u32,
    /// Asked for the key and not yet answered by an event.
    acquiring: bool,
    app_at: Option<u64>,
    restart_at: Option<u64>,
    port: Port,
}

#[derive(Debug, Clone)]
enum Msg {
    ToAuthority { client: usize, request: SessionRequest },
    ToClient { client: usize, response: SessionResponse },
    V1ToAuthority { client: usize, key: Key, request: Request },
    V1ToClient { client: usize, response: Response },
}

/// A logged input: the authority's clock when it was applied, and the input.
#[derive(Debug, Clone)]
struct Logged {
    now: Instant,
    input: Input,
}

fn apply(a: &mut Authority, e: &Logged) -> Option<SessionReply> {
    a.apply(e.now, &e.input)
}

/// A keepalive the authority holds: whose, and until when (true time).
#[derive(Debug, Clone)]
struct Parked {
    client: usize,
    request: SessionRequest,
    until: u64,
}

/// The durable log: a snapshot and the committed inputs after it, as the server keeps them.
struct Log {
    snapshot: Box<Authority>,
    entries: Vec<Logged>,
    /// The latest time logged (the server's `last`): a restart's clock continues from it.
    last: Instant,
}

/// Entries after which the log is cut under a new snapshot (the server's `SNAPSHOT_EVERY`,
/// smaller, so runs restart from a snapshot and a log both).
const SNAPSHOT_EVERY: usize = 256;
/// One batch in this many fails to commit, in durable runs.
const FAIL_ONE_IN: u16 = 400;

/// The checker's state as of the last commit, kept while a batch drawn to fail runs: the
/// rebuilt authority forgot the batch, and so does the checker.
struct Checkpoint {
    authority: View,
    granted: BTreeMap<Key, (Fence, u64)>,
    history: Vec<usize>,
    observing: BTreeMap<(SessionId, Key), (usize, u64)>,
    handled: Vec<SessionRequest>,
    pending_tells: Vec<Tell>,
}

/// A hand-off after the heal that its waiter must hear of by `by` (true time).
#[derive(Debug, Clone)]
struct Tell {
    client: usize,
    session: SessionId,
    key: Key,
    fence: Fence,
    granted_at: u64,
    by: u64,
}

/// What the checker compares around each authority step: everything but the replay windows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct View {
    sessions: Vec<SessionStatus>,
    keys: Vec<KeyView>,
    next: SessionId,
}

/// A key as the checker sees it: its status, holders (oldest grant first) and queue.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyView {
    key: Key,
    status: KeyStatus,
    holders: Vec<KeyHolder>,
    waiters: Vec<SessionId>,
    /// Held by v1.
    external: Option<ExternalHold>,
}

impl View {
    fn of(a: &Authority) -> View {
        View {
            sessions: a.sessions().collect(),
            keys: a
                .keys()
                .map(|(k, status)| KeyView {
                    key: k.clone(),
                    status,
                    holders: a.holders(k).collect(),
                    waiters: a.waiters(k).collect(),
                    external: a.external_hold(k),
                })
                .collect(),
            next: a.next_session(),
        }
    }

    fn key(&self, k: &Key) -> Option<&KeyView> {
        self.keys.iter().find(|v| v.key == *k)
    }

    fn alive(&self, s: SessionId) -> bool {
        self.sessions.iter().any(|x| x.id == s)
    }
}

/// The simulated world.
pub struct World {
    params: Params,
    rng: fastrand::Rng,
    now: u64,
    keys: Vec<Key>,
    clients: Vec<Client>,
    clock: Clock,
    authority: Authority,
    network: Wire<Msg>,
    next_fault: u64,
    /// Requests the authority has handled, for replay.
    handled: Vec<SessionRequest>,
    /// Per key: the highest fence granted, and how many authority restarts came before it.
    granted: BTreeMap<Key, (Fence, u64)>,
    /// Per key (and per client, for a semaphore).
    told: BTreeMap<(Key, Option<usize>), Fence>,
    trace: Vec<TraceEntry>,
    stats: Stats,
    /// Per key, its holder after every authority step that changed it (free first).
    history: BTreeMap<Key, Vec<Option<(SessionId, Fence)>>>,
    /// Per observing session and key: the history index and change number when its observe
    /// was handled.
    observing: BTreeMap<(SessionId, Key), (usize, u64)>,
    /// Per observer client and key: its session, and the last report's change and history
    /// index.
    reported: BTreeMap<(usize, Key), (SessionId, u64, usize)>,
    /// Per observer client and key: the highest fence reported.
    reported_fence: BTreeMap<(usize, Key), Fence>,
    /// After `run_for`: no loss, no faults, no new acquisitions.
    healed: bool,
    /// When the heal came (true time).
    healed_at: Option<u64>,
    v1: Vec<V1Client>,
    /// The v1 rules' records (the server's `leases.redb`), on the authority's clock.
    v1_records: BTreeMap<Key, Record>,
    v1_limits: Limits,
    /// Keys whose last grant was v1's.
    v1_granted_last: BTreeMap<Key, bool>,
    /// Per key (index): its v1 turn in progress.
    v1_turns: Vec<Option<V1Turn>>,
    /// Draws for held keepalives, commits and restarts, apart from `rng`, so that runs with
    /// none of them draw what they drew before these existed.
    extra: fastrand::Rng,
    /// Keepalives held by the authority, in arrival order.
    parked: Vec<Parked>,
    /// Durable runs: the committed log.
    log: Option<Log>,
    /// Inputs of the batch in progress, applied in memory, not yet committed.
    batch: Vec<Logged>,
    /// Replies of the batch in progress: sent at its commit, dropped if it fails.
    outbox: Vec<(usize, SessionResponse)>,
    /// Nesting of [`World::batch`].
    batch_depth: u32,
    /// The batch in progress will fail: the state to return to.
    failing: Option<Box<Checkpoint>>,
    /// When the authority next crashes (true time).
    next_crash: u64,
    /// Down until then (true time), and its state when it went down.
    down: Option<(u64, View)>,
    /// Authority restarts so far.
    restarts: u64,
    /// Hand-offs after the heal not yet told to their waiters.
    tells: Vec<Tell>,
}

impl World {
    /// A world for `params`, at true time zero, no session open yet.
    pub fn new(params: Params) -> World {
        let mut rng = fastrand::Rng::with_seed(params.seed ^ 0x5E55_1085);
        let drift = params.config.drift;
        let mut clients: Vec<Client> = (0..params.clients)
            .map(|i| Client {
                observer: false,
                clock: Clock::random(&mut rng, drift),
                session: Some(holder(i, params.config)),
                app_at: Some(rng.u64(0..params.config.ttl.as_micros())),
                restart_at: None,
                port: Port::default(),
            })
            .collect();
        let clock = Clock::random(&mut rng, drift);
        for i in params.clients..params.clients + params.observers {
            clients.push(Client {
                observer: true,
                clock: Clock::random(&mut rng, drift),
                session: Some(holder(i, params.config)),
                app_at: Some(rng.u64(0..params.config.ttl.as_micros())),
                restart_at: None,
                port: Port::default(),
            });
        }
        let keys: Vec<Key> =
            (0..params.keys).map(|k| parse_key(&format!("k{k}")).expect("valid key")).collect();
        let limits = SessionLimits { fault: params.fault, ..SessionLimits::default() };
        let mut extra = fastrand::Rng::with_seed(params.seed ^ 0xD15C_FA11);
        let (durable, run_for) = (params.durable, params.run_for);
        let next_fault = rng.u64(0..params.run_for / 8);
        // After every draw of the runs before v1 clients existed.
        let v1 = (0..params.v1_clients)
            .map(|j| V1Client {
                key: rng.usize(0..params.keys),
                clock: Clock::random(&mut rng, drift),
                lease: Some(Lease::new(v1_owner(j, 0), params.config).expect("sim config is valid")),
                incarnation: 0,
                acquiring: false,
                app_at: Some(rng.u64(0..params.config.ttl.as_micros())),
                restart_at: None,
                port: Port::default(),
            })
            .collect();
        World {
            v1,
            v1_records: BTreeMap::new(),
            v1_limits: Limits { lock_delay: params.lock_delay, ..Limits::default() },
            v1_granted_last: BTreeMap::new(),
            v1_turns: (0..params.keys).map(|_| None).collect(),
            history: keys.iter().map(|k| (k.clone(), vec![None])).collect(),
            keys,
            observing: BTreeMap::new(),
            reported: BTreeMap::new(),
            reported_fence: BTreeMap::new(),
            healed: false,
            healed_at: None,
            next_fault,
            params,
            rng,
            now: 0,
            clients,
            clock,
            authority: Authority::new(limits),
            network: Wire::new(),
            handled: Vec::new(),
            granted: BTreeMap::new(),
            told: BTreeMap::new(),
            trace: Vec::with_capacity(4096),
            stats: Stats::default(),
            next_crash: if durable { extra.u64(0..run_for / 2) } else { u64::MAX },
            log: durable.then(|| Log {
                snapshot: Box::new(Authority::new(limits)),
                entries: Vec::new(),
                last: Instant::from_micros(0),
            }),
            extra,
            parked: Vec::new(),
            batch: Vec::new(),
            outbox: Vec::new(),
            batch_depth: 0,
            failing: None,
            down: None,
            restarts: 0,
            tells: Vec::new(),
        }
    }

    /// Runs until `params.run_for`, checking after every step; then heals the network for six
    /// ttls and checks that every observer ends at each key's holder.
    pub fn run(mut self) -> Result<Stats, Box<Violation>> {
        self.run_to_end()?;
        Ok(self.stats)
    }

    /// [`run`](Self::run), keeping the world for its trace.
    pub fn run_to_end(&mut self) -> Result<(), Box<Violation>> {
        while self.now < self.params.run_for {
            if !self.step()? {
                break;
            }
        }
        self.heal();
        let end = self.now + 6 * self.params.config.ttl.as_micros();
        while self.now < end {
            if !self.step()? {
                break;
            }
        }
        self.check_observers_caught_up()
    }

    /// No more loss, duplication, partitions or faults, and the holders stop asking for keys.
    fn heal(&mut self) {
        self.healed = true;
        self.healed_at = Some(self.now);
        self.next_crash = u64::MAX;
        self.params.net.loss = 0.0;
        self.params.net.burst_start = 0.0;
        self.params.net.duplication = 0.0;
        self.next_fault = u64::MAX;
        let ttl = self.params.config.ttl.as_micros();
        for c in self.clients.iter_mut() {
            c.port.heal();
            if !c.observer {
                // With held keepalives, the holders let go of their keys one at a time once
                // settled, so their waiters are handed them while the bound on telling them
                // is checked.
                c.app_at = self.params.held_keepalives.then(|| self.now + 2 * ttl + self.extra.u64(0..ttl));
            }
        }
        for c in self.v1.iter_mut() {
            c.port.heal();
            c.app_at = None;
        }
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
            AuthorityTimer,
            Fault,
            V1Timer(usize),
            V1App(usize),
            V1Restart(usize),
            V1Set(usize),
            HoldEnds,
            AuthorityCrash,
            AuthorityRestart,
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
            if let Some(at) = c.session.as_ref().and_then(Holder::poll_timeout) {
                consider(c.clock.true_time_of(at).max(self.now), Next::Timer(i));
            }
            if let Some(t) = c.app_at {
                consider(t, Next::App(i));
            }
            if let Some(t) = c.restart_at {
                consider(t, Next::Restart(i));
            }
        }
        match &self.down {
            Some((until, _)) => consider(*until, Next::AuthorityRestart),
            None => {
                if let Some(at) = self.authority.poll_timeout() {
                    consider(self.clock.true_time_of(at).max(self.now), Next::AuthorityTimer);
                }
                if let Some(t) = self.parked.iter().map(|p| p.until).min() {
                    consider(t, Next::HoldEnds);
                }
                consider(self.next_crash, Next::AuthorityCrash);
            }
        }
        consider(self.next_fault, Next::Fault);
        for (j, c) in self.v1.iter().enumerate() {
            if let Some(at) = c.lease.as_ref().and_then(Lease::poll_timeout) {
                consider(c.clock.true_time_of(at).max(self.now), Next::V1Timer(j));
            }
            if let Some(t) = c.app_at {
                consider(t, Next::V1App(j));
            }
            if let Some(t) = c.restart_at {
                consider(t, Next::V1Restart(j));
            }
        }
        for (k, t) in self.v1_turns.iter().enumerate() {
            if let Some(t) = t {
                consider(t.set_at, Next::V1Set(k));
            }
        }
        let Some((t, next)) = best else { return Ok(false) };
        self.now = t;
        self.stats.steps += 1;
        match next {
            Next::Deliver => {
                if let Some(msg) = self.network.pop() {
                    self.deliver(msg)?;
                }
            }
            Next::Timer(i) => {
                let local = self.local(i);
                if let Some(s) = self.clients[i].session.as_mut() {
                    s.handle_timeout(local);
                }
                self.drain(i)?;
            }
            Next::App(i) => self.app(i)?,
            Next::Restart(i) => {
                let c = &mut self.clients[i];
                c.restart_at = None;
                c.session = Some(holder(i, self.params.config));
                c.app_at = (c.observer || !self.healed).then_some(self.now);
                self.log(What::Restart(i));
            }
            Next::AuthorityTimer => self.batch(Self::authority_timer)?,
            Next::HoldEnds => self.batch(|_| Ok(()))?,
            Next::AuthorityCrash => self.crash_authority(),
            Next::AuthorityRestart => self.restart_authority()?,
            Next::Fault => self.fault()?,
            Next::V1Timer(j) => {
                let local = self.v1[j].clock.local(self.now);
                if let Some(l) = self.v1[j].lease.as_mut() {
                    l.handle_timeout(local);
                }
                self.v1_drain(j)?;
            }
            Next::V1App(j) => self.v1_app(j)?,
            Next::V1Set(k) => self.batch(|w| w.v1_set(k))?,
            Next::V1Restart(j) => {
                let c = &mut self.v1[j];
                c.incarnation += 1;
                c.restart_at = None;
                let o = v1_owner(j, c.incarnation);
                c.lease = Some(Lease::new(o, self.params.config).expect("sim config is valid"));
                c.acquiring = false;
                c.app_at = (!self.healed).then_some(self.now);
                self.log(What::V1Restart(j, o));
            }
        }
        self.check_beliefs()?;
        self.check_tells()?;
        Ok(true)
    }

    fn local(&self, i: usize) -> Instant {
        self.clients[i].clock.local(self.now)
    }

    /// A request reaches the authority: a keepalive is held (in runs that hold them) while its
    /// session lives, as the server's `held_keepalive` does; anything else is handled now.
    fn arrive(&mut self, client: usize, request: SessionRequest) -> Result<(), Box<Violation>> {
        let keepalive = matches!(request.op, SessionOp::KeepAlive | SessionOp::KeepAliveSeen { .. });
        let now = self.clock.local(self.now);
        let session = self.authority.session(request.session);
        match session.filter(|_| keepalive && self.params.held_keepalives) {
            Some(s) => {
                // Never long enough for the session to run out while its keepalive waits.
                let bound = self
                    .params
                    .hold()
                    .min(s.ttl.mul_div_floor(1, 3))
                    .min((s.expires_at - now).mul_div_floor(1, 2));
                let until = self.clock.true_time_of(now + bound).max(self.now);
                self.stats.held += 1;
                self.log(What::Parked(client, request.clone(), until));
                self.parked.push(Parked { client, request, until });
                Ok(())
            }
            None => self.handle_request(client, request),
        }
    }

    /// The authority handles `request` of `client` now and answers it (at the batch's commit).
    fn handle_request(&mut self, client: usize, request: SessionRequest) -> Result<(), Box<Violation>> {
        let now = self.clock.local(self.now);
        // A request handled at the instant a session expires expires it first, then
        // may hand its key on: two changes in one step, which the history must see
        // apart. The timer's step first changes nothing else (the request's handling
        // starts with the same expiry).
        if self.authority.poll_timeout().is_some_and(|at| at <= now) {
            self.authority_timer()?;
        }
        let before = View::of(&self.authority);
        let reply = match request.op {
            SessionOp::Open { ttl, ref label } => {
                let secret = Secret::from_bytes(self.rng.u128(..).to_le_bytes());
                self.apply(Input::Open { ttl, label: label.clone(), secret })
            }
            _ => self.apply(Input::Request(request.clone())),
        };
        self.record_history();
        if let SessionOp::Observe { key } | SessionOp::Unobserve { key } = &request.op {
            // Registered: note where its numbering starts; gone: observed again, it
            // starts afresh.
            let at = (request.session, key.clone());
            match (self.authority.observes(request.session, key), self.observing.contains_key(&at)) {
                (true, false) => {
                    let index = self.history.get(key).map_or(0, |h| h.len() - 1);
                    let change = self.authority.latest_change(key).unwrap_or_default();
                    self.observing.insert(at, (index, change));
                }
                (false, true) => {
                    self.observing.remove(&at);
                }
                _ => {}
            }
        }
        self.log(What::Handles(client, request.clone(), reply.clone()));
        self.check_authority(&before, Some(&request))?;
        self.check_limit_refusal(&before, &request, &reply)?;
        let response = request.answer(reply);
        if !matches!(request.op, SessionOp::Open { .. }) {
            if self.handled.len() >= 256 {
                self.handled.swap_remove(self.rng.usize(0..256));
            }
            self.handled.push(request);
        }
        self.reply(client, response);
        Ok(())
    }

    fn authority_timer(&mut self) -> Result<(), Box<Violation>> {
        self.log(What::AuthorityTimer);
        let before = View::of(&self.authority);
        self.apply(Input::Timeout);
        self.record_history();
        self.check_authority(&before, None)
    }

    /// Applies `input` to the authority now, as part of the batch in progress; its reply
    /// (`Expired` for an input without one, as the server answers it).
    fn apply(&mut self, input: Input) -> SessionReply {
        let e = Logged { now: self.clock.local(self.now), input };
        let reply = apply(&mut self.authority, &e).unwrap_or(SessionReply::Expired);
        if self.log.is_some() {
            self.batch.push(e);
        }
        reply
    }

    /// Logs `input`, applied to the authority by the caller (for the inputs whose outcome
    /// the caller needs whole).
    fn record(&mut self, input: Input) {
        if self.log.is_some() {
            self.batch.push(Logged { now: self.clock.local(self.now), input });
        }
    }

    /// Answers `client`: in durable runs at the batch's commit, as the server answers only
    /// after its fsync.
    fn reply(&mut self, client: usize, response: SessionResponse) {
        if self.log.is_some() && self.params.server_fault != ServerFault::ReplyBeforeCommit {
            self.outbox.push((client, response));
        } else {
            self.send(client, Msg::ToClient { client, response });
        }
    }

    /// One batch of the authority's inputs, as the server's writer makes one: `f`'s, then the
    /// held keepalives that are due; then (durable runs) the commit. A batch drawn to fail is
    /// applied in memory like any other, then its replies are dropped (the server answers
    /// them unavailable) and the authority is rebuilt from the committed log.
    fn batch(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<(), Box<Violation>>,
    ) -> Result<(), Box<Violation>> {
        if self.batch_depth > 0 {
            return f(self);
        }
        if self.log.is_some() && !self.healed && self.extra.u16(0..FAIL_ONE_IN) == 0 {
            self.failing = Some(Box::new(Checkpoint {
                authority: View::of(&self.authority),
                granted: self.granted.clone(),
                history: self.keys.iter().map(|k| self.history[k].len()).collect(),
                observing: self.observing.clone(),
                handled: self.handled.clone(),
                pending_tells: self.tells.clone(),
            }));
        }
        self.batch_depth += 1;
        let r = f(self).and_then(|()| self.serve_held());
        self.batch_depth -= 1;
        r?;
        self.commit()
    }

    /// Handles the held keepalives that are due (core's rule, or their hold is over), until
    /// none is: handling one may expire sessions and hand their keys to others' sessions. As
    /// the server does, which are due is decided for all before any is handled.
    fn serve_held(&mut self) -> Result<(), Box<Violation>> {
        while !self.parked.is_empty() {
            let (now, a) = (self.now, &self.authority);
            let due = |p: &Parked| p.until <= now || a.keepalive_due(p.request.session, &p.request.op);
            let (now_due, still): (Vec<Parked>, Vec<Parked>) = self.parked.drain(..).partition(due);
            self.parked = still;
            if now_due.is_empty() {
                break;
            }
            for p in now_due {
                if p.until > self.now {
                    self.stats.held_answered_early += 1;
                }
                self.handle_request(p.client, p.request)?;
            }
        }
        Ok(())
    }

    /// Commits the batch in progress, or fails it (see [`batch`](Self::batch)).
    fn commit(&mut self) -> Result<(), Box<Violation>> {
        let entries = std::mem::take(&mut self.batch);
        let failing = self.failing.take();
        let Some(log) = self.log.as_mut() else { return Ok(()) };
        match failing {
            // An empty batch writes nothing, so it cannot fail.
            Some(cp) if !entries.is_empty() => {
                self.stats.failed_commits += 1;
                let replies = self.outbox.len();
                self.outbox.clear();
                self.log(What::CommitFailed(entries.len(), replies));
                let rebuilt = self.replay();
                let view = View::of(&rebuilt);
                if view != cp.authority {
                    return Err(self.violation(format!(
                        "the table rebuilt from the log after a failed commit is not the one before \
                         the batch:\n  before {:?}\n  rebuilt {view:?}",
                        cp.authority
                    )));
                }
                self.authority = rebuilt;
                let Checkpoint { granted, history, observing, handled, pending_tells, .. } = *cp;
                for (k, len) in self.keys.iter().zip(history) {
                    if let Some(h) = self.history.get_mut(k) {
                        h.truncate(len);
                    }
                }
                (self.granted, self.observing, self.handled, self.tells) =
                    (granted, observing, handled, pending_tells);
            }
            _ => {
                for e in entries {
                    log.last = log.last.max(e.now);
                    log.entries.push(e);
                }
                if log.entries.len() >= SNAPSHOT_EVERY {
                    // The server's snapshot: the table as of the log's end, and the log cut.
                    *log.snapshot = self.authority.clone();
                    log.entries.clear();
                }
                for (client, response) in std::mem::take(&mut self.outbox) {
                    self.send(client, Msg::ToClient { client, response });
                }
            }
        }
        Ok(())
    }

    /// The table the committed log rebuilds: its snapshot, then its entries replayed.
    fn replay(&self) -> Authority {
        let Some(log) = &self.log else { return self.authority.clone() };
        let mut a = (*log.snapshot).clone();
        for e in &log.entries {
            apply(&mut a, e);
        }
        a
    }

    /// The authority process dies between two batches: its held keepalives go with their
    /// connections, and nothing reaches it until it restarts.
    fn crash_authority(&mut self) {
        let ttl = self.params.config.ttl.as_micros();
        let until = self.now + self.extra.u64(0..ttl);
        self.next_crash = until + self.extra.u64(0..self.params.run_for / 2);
        self.parked.clear();
        self.down = Some((until, View::of(&self.authority)));
        self.log(What::AuthorityCrash(until));
    }

    /// The authority starts again as the server does (`Sessions::open`): the table replayed
    /// from the log, its clock continuing 1 µs after the last time logged (`LogClock`), every
    /// session re-armed from then (`Recover`, logged), and a snapshot written.
    fn restart_authority(&mut self) -> Result<(), Box<Violation>> {
        let Some((_, before)) = self.down.take() else { return Ok(()) };
        self.restarts += 1;
        self.stats.restarts += 1;
        let rebuilt = self.replay();
        let view = View::of(&rebuilt);
        if view != before {
            return Err(self.violation(format!(
                "the table replayed at the restart is not the one that crashed:\n  crashed {before:?}\n  \
                 replayed {view:?}"
            )));
        }
        self.authority = rebuilt;
        let last = self.log.as_ref().map_or(Instant::from_micros(0), |l| l.last);
        let base = last + Duration::from_micros(1);
        self.clock.restart(self.now, base.as_micros());
        self.log(What::AuthorityRestart(base));
        self.apply(Input::Recover);
        self.record_history();
        self.check_authority(&before, None)?;
        if let Some(log) = self.log.as_mut() {
            let entries = std::mem::take(&mut self.batch);
            log.last = entries.iter().map(|e| e.now).fold(log.last, Instant::max);
            *log.snapshot = self.authority.clone();
            log.entries.clear();
        }
        Ok(())
    }

    /// After the heal, once what was in flight has landed or been retried: two ttls on.
    fn settled(&self) -> bool {
        self.healed_at.is_some_and(|t| self.now >= t + 2 * self.params.config.ttl.as_micros())
            && self.params.held_keepalives
    }

    /// The holder client whose session `session` is now.
    fn client_of(&self, session: SessionId) -> Option<usize> {
        self.clients
            .iter()
            .position(|c| !c.observer && c.session.as_ref().and_then(Holder::id) == Some(session))
    }

    /// How long after a hand-off its waiter hears of it, at most, once the network is healed,
    /// with keepalives held: each holder sends its next keepalive when the last one's reply
    /// lands (its renewal interval is the hold), so one is held at the authority at almost
    /// every moment. The grant finds one held (answered at once: one way), or on its way
    /// (a round trip), or its reply on the way back, the next sent on arrival (a way and a
    /// round trip), or, just after another key's pushed grant, that grant's confirmation
    /// out, the next keepalive made when it lands (two ways, then a round trip): at most five
    /// of the network's largest delays. Plus the clocks: the holder's renewal interval and
    /// the authority's hold are the same length on two clocks each off by up to ε, and the
    /// authority's hold is cut to whole µs (4ε of a hold covers both). A keepalive held until
    /// its hold's end though the grant was made (a renewal later, as with the planted
    /// `HoldPushedGrants`) takes up to a whole hold more.
    fn tell_bound(&self) -> u64 {
        let hold = self.params.hold().as_micros();
        let eps = u64::from(self.params.config.drift.as_ppm());
        5 * self.params.net.max_delay + hold * 4 * eps / 1_000_000 + 2
    }

    /// Every hand-off after the heal told to its waiter in time (a waiter whose session ended
    /// meanwhile is not owed it). A waiter that no longer wants the key (its confirmation of
    /// an earlier push was overtaken by its release, which queued it again) gives it back when
    /// told: the grant ending at the authority is its answer too.
    fn check_tells(&mut self) -> Result<(), Box<Violation>> {
        if self.tells.is_empty() {
            return Ok(());
        }
        let before = self.tells.len();
        let a = &self.authority;
        self.tells.retain(|t| a.holders(&t.key).any(|h| h.session == t.session && h.fence == t.fence));
        self.stats.prompt += (before - self.tells.len()) as u64;
        let now = self.now;
        let late = self.tells.iter().find(|t| {
            t.by < now && self.clients[t.client].session.as_ref().and_then(Holder::id) == Some(t.session)
        });
        if let Some(t) = late {
            return Err(self.violation(format!(
                "c{} was handed {} (fence {}) at {:.3}ms after the heal and not told within {:.3}ms \
                 (held keepalives: told a renewal later?)",
                t.client,
                t.key,
                t.fence,
                t.granted_at as f64 / 1000.0,
                self.tell_bound() as f64 / 1000.0
            )));
        }
        self.tells.retain(|t| t.by >= now);
        Ok(())
    }

    fn log(&mut self, what: What) {
        self.trace.push(TraceEntry { t: self.now, what });
    }

    fn violation(&self, message: String) -> Box<Violation> {
        Box::new(Violation { params: self.params, at: self.now, message, trace: self.trace.clone() })
    }

    /// The application: open when there is no session; otherwise release a held key, ask
    /// for another (mostly waiting in line), or now and then close.
    fn app(&mut self, i: usize) -> Result<(), Box<Violation>> {
        let local = self.local(i);
        let ttl = self.params.config.ttl.as_micros();
        let roll = self.rng.u8(..);
        let k = self.rng.usize(0..self.keys.len());
        let (key, limit) = (self.keys[k].clone(), self.params.limits[k]);
        self.clients[i].app_at = Some(self.now + self.rng.u64(0..ttl));
        let observer = self.clients[i].observer;
        if self.healed && !observer {
            // Held-keepalive runs only: let go of one key, if any is held.
            let Some(s) = self.clients[i].session.as_mut() else { return Ok(()) };
            let key = s.held().map(|(k, _)| k.clone()).next();
            if let Some(key) = key {
                let _ = s.release(local, &key);
            }
            return self.drain(i);
        }
        let Some(s) = self.clients[i].session.as_mut() else { return Ok(()) };
        if observer {
            match s.state() {
                SessionState::Idle | SessionState::Ended => {
                    let _ = s.open(local);
                }
                // Now and then stop observing a key (observed again at a later turn).
                SessionState::Open if !self.healed && roll < 24 && s.observed().any(|o| *o == key) => {
                    let _ = s.unobserve(local, &key);
                }
                SessionState::Open => {
                    for k in &self.keys {
                        if !s.observed().any(|o| o == k) {
                            let _ = s.observe(local, k.clone());
                        }
                    }
                }
                SessionState::Opening | SessionState::Closing => {}
            }
            return self.drain(i);
        }
        match s.state() {
            SessionState::Idle | SessionState::Ended => {
                let _ = s.open(local);
            }
            SessionState::Open if roll < 8 => {
                let _ = s.close(local);
            }
            SessionState::Open if s.fence(&key).is_some() => {
                let _ = s.release(local, &key);
            }
            SessionState::Open => {
                // Now and then a contender misconfigured with another limit: refused while the
                // key has claims; if it has none, its limit holds until they are all gone.
                let limit = if roll % 16 == 1 { limit + 1 } else { limit };
                let _ = s.acquire_with_limit(local, key, !roll.is_multiple_of(5), limit);
            }
            SessionState::Opening | SessionState::Closing => {}
        }
        self.drain(i)
    }

    fn drain(&mut self, i: usize) -> Result<(), Box<Violation>> {
        while let Some(request) = self.clients[i].session.as_mut().and_then(Holder::poll_transmit) {
            self.log(What::Send(i, request.clone()));
            self.send(i, Msg::ToAuthority { client: i, request });
        }
        while let Some(e) = self.clients[i].session.as_mut().and_then(Holder::poll_event) {
            match &e {
                SessionEvent::Acquired { key, fence, .. } => {
                    self.stats.acquired += 1;
                    if !self.tells.is_empty() {
                        let before = self.tells.len();
                        self.tells.retain(|t| !(t.client == i && t.key == *key && t.fence == *fence));
                        self.stats.prompt += (before - self.tells.len()) as u64;
                    }
                    // A lease's fences rise across all holders in the order they are told; a
                    // semaphore's holders may hear of their grants in any order, each its own
                    // rising.
                    let shared = self.limit_of(key) > 1 || self.limit_in_force(key).is_some_and(|l| l > 1);
                    let teller = shared.then_some(i);
                    let told = self.told.entry((key.clone(), teller)).or_default();
                    if *fence <= *told {
                        let msg =
                            format!("c{i} told Acquired {key} fence {fence} after fence {told} was told");
                        self.log(What::Event(i, e));
                        return Err(self.violation(msg));
                    }
                    *told = *fence;
                }
                SessionEvent::Queued { .. } => self.stats.queued += 1,
                SessionEvent::Observed { key, change, holder, missed } => {
                    self.stats.observed += 1;
                    let state = holder.as_ref().map(|h| (h.session, h.fence));
                    if let Err(msg) = self.check_report(i, key, *change, state, *missed) {
                        self.log(What::Event(i, e));
                        return Err(self.violation(msg));
                    }
                }
                SessionEvent::ObserveEnded { key, .. } => {
                    self.reported.remove(&(i, key.clone()));
                }
                SessionEvent::Lost { .. } => self.stats.lost += 1,
                SessionEvent::Released { .. } => self.stats.released += 1,
                _ => {}
            }
            self.log(What::Event(i, e));
        }
        Ok(())
    }

    fn send(&mut self, client: usize, msg: Msg) {
        let (dir, port) = match msg {
            Msg::ToAuthority { .. } => (Direction::Outbound, &mut self.clients[client].port),
            Msg::ToClient { .. } => (Direction::Inbound, &mut self.clients[client].port),
            Msg::V1ToAuthority { .. } => (Direction::Outbound, &mut self.v1[client].port),
            Msg::V1ToClient { .. } => (Direction::Inbound, &mut self.v1[client].port),
        };
        if let Err(why) = self.network.send(&mut self.rng, self.now, port, dir, self.params.net, msg) {
            self.stats.dropped += 1;
            self.log(What::Dropped(why));
        }
    }

    fn deliver(&mut self, msg: Msg) -> Result<(), Box<Violation>> {
        match msg {
            Msg::ToAuthority { client, request } => {
                if self.down.is_some() {
                    self.stats.dropped += 1;
                    self.log(What::Dropped("authority down"));
                    return Ok(());
                }
                self.batch(|w| w.arrive(client, request))?;
            }
            Msg::ToClient { client, response } => {
                let c = &self.clients[client];
                if c.port.cut(self.now, Direction::Inbound) || c.session.is_none() {
                    self.stats.dropped += 1;
                    self.log(What::Dropped("client unreachable"));
                    return Ok(());
                }
                let local = self.local(client);
                if let Some(s) = self.clients[client].session.as_mut() {
                    s.handle_response(local, &response);
                }
                self.log(What::Receives(client, response));
                self.drain(client)?;
            }
            Msg::V1ToAuthority { client, key, request } => {
                self.batch(|w| w.v1_decide(client, key, request))?
            }
            Msg::V1ToClient { client, response } => {
                let c = &self.v1[client];
                if c.port.cut(self.now, Direction::Inbound) || c.lease.is_none() {
                    self.stats.dropped += 1;
                    self.log(What::Dropped("client unreachable"));
                    return Ok(());
                }
                let local = c.clock.local(self.now);
                if let Some(l) = self.v1[client].lease.as_mut() {
                    l.handle_response(local, response);
                }
                self.log(What::V1Receives(client, response));
                self.v1_drain(client)?;
            }
        }
        Ok(())
    }

    /// The v1 application: acquire the key (mostly waiting for it), hold it a while, release.
    fn v1_app(&mut self, j: usize) -> Result<(), Box<Violation>> {
        let c = &mut self.v1[j];
        let local = c.clock.local(self.now);
        let ttl = self.params.config.ttl.as_micros();
        let roll = self.rng.u8(..);
        c.app_at = None;
        let Some(lease) = c.lease.as_mut() else { return Ok(()) };
        let how = if lease.fence().is_some() {
            let _ = lease.release(local);
            "release"
        } else if c.acquiring {
            return Ok(());
        } else {
            c.acquiring = true;
            let (how, r) = match roll {
                0..=191 => ("acquire", lease.acquire(local)),
                _ => ("try_acquire", lease.try_acquire(local)),
            };
            if r.is_err() {
                // Still releasing (or losing) its last grant: try again later.
                c.acquiring = false;
                c.app_at = Some(self.now + self.rng.u64(0..ttl));
                return Ok(());
            }
            how
        };
        if how == "release" {
            // In case the release's outcome is never told (a crash of the reply's way).
            c.app_at = Some(self.now + self.rng.u64(0..ttl));
        }
        self.log(What::V1App(j, how));
        self.v1_drain(j)
    }

    fn v1_drain(&mut self, j: usize) -> Result<(), Box<Violation>> {
        let key = self.keys[self.v1[j].key].clone();
        while let Some(request) = self.v1[j].lease.as_mut().and_then(Lease::poll_transmit) {
            self.log(What::V1Send(j, request));
            self.send(j, Msg::V1ToAuthority { client: j, key: key.clone(), request });
        }
        let ttl = self.params.config.ttl.as_micros();
        while let Some(e) = self.v1[j].lease.as_mut().and_then(Lease::poll_event) {
            self.log(What::V1Event(j, e));
            match e {
                Event::Acquired { fence, .. } => {
                    self.stats.acquired += 1;
                    let shared = self.limit_of(&key) > 1 || self.limit_in_force(&key).is_some_and(|l| l > 1);
                    let teller = shared.then_some(self.clients.len() + j);
                    let told = self.told.entry((key.clone(), teller)).or_default();
                    if fence <= *told {
                        let msg =
                            format!("v{j} told Acquired {key} fence {fence} after fence {told} was told");
                        return Err(self.violation(msg));
                    }
                    *told = fence;
                    let c = &mut self.v1[j];
                    c.acquiring = false;
                    if !self.healed {
                        c.app_at = Some(self.now + self.rng.u64(0..3 * ttl));
                    }
                }
                Event::NotAcquired { .. } | Event::Lost { .. } | Event::Released { .. } => {
                    if matches!(e, Event::Lost { .. }) {
                        self.stats.lost += 1;
                    }
                    let c = &mut self.v1[j];
                    c.acquiring = false;
                    if !self.healed {
                        c.app_at = Some(self.now + self.rng.u64(0..ttl));
                    }
                }
                Event::Renewed { .. } => {}
            }
        }
        Ok(())
    }

    /// The authority's v1 side, composed with the sessions as the built-in server does it
    /// (`server/src/namespace.rs`): the same core calls in the same order, on one clock, with
    /// nothing between them (the server's fsyncs do not reorder them: a key's v1 requests
    /// take turns).
    fn v1_decide(&mut self, j: usize, key: Key, request: Request) -> Result<(), Box<Violation>> {
        let k = self.keys.iter().position(|x| *x == key).unwrap_or_default();
        if let Some(turn) = self.v1_turns[k].as_mut() {
            turn.backlog.push((j, request));
            self.log(What::V1Waits(j, key));
            return Ok(());
        }
        let now = self.clock.local(self.now);
        let before = View::of(&self.authority);
        let record = self.v1_records.get(&key).copied().unwrap_or_default();
        let claim = V1Claim::of(&request.op);
        let held = match claim {
            Some(c) => {
                let (hold, exclusive) = (ExternalHold::Pending, c.exclusive());
                self.record(Input::HoldExternal { key: key.clone(), hold, exclusive });
                self.authority.hold_external(now, &key, hold, exclusive).map_err(|r| (c, r))
            }
            None => Ok(Fence::NONE),
        };
        let d = match held {
            Err((c, refusal)) => {
                self.stats.v1_refused += 1;
                c.refused(refusal)
            }
            Ok(floor) => {
                let d = namespace::decide_above(&record, floor, now, &request, &self.v1_limits);
                if d.changed(&record) {
                    self.v1_records.insert(key.clone(), d.record);
                }
                // The set lands later, after the v1 commit and its answer (the server's order);
                // the key's next v1 request waits for it.
                let at = self.now + self.rng.u64(0..=self.params.net.max_delay);
                self.v1_turns[k] = Some(V1Turn { set_at: at, record: d.record, floor, backlog: Vec::new() });
                d
            }
        };
        self.record_history();
        self.log(What::V1Handles(j, key.clone(), request, d.reply));
        if d.outcome == Outcome::Granted {
            self.stats.v1_grants += 1;
            let fence = d.record.last_fence;
            let (last, _) = self.granted.insert(key.clone(), (fence, self.restarts)).unwrap_or_default();
            if fence <= last {
                return Err(
                    self.violation(format!("{key} granted to v1 with fence {fence} after fence {last}"))
                );
            }
            if let Some(v) = before.key(&key).filter(|v| !v.holders.is_empty()) {
                return Err(self.violation(format!(
                    "{key} granted to v1 client v{j} (fence {fence}) while sessions held it: {:?}",
                    v.holders
                )));
            }
            self.v1_granted_last.insert(key.clone(), true);
        }
        self.check_authority(&before, None)?;
        let response = Response { id: request.id, owner: request.owner, reply: d.reply };
        self.send(j, Msg::V1ToClient { client: j, response });
        Ok(())
    }

    /// v1's decision on `keys[k]` told to the sessions: its end (from v1's clock now, as the
    /// server samples it at the set) and fence; then the requests that waited for the turn.
    fn v1_set(&mut self, k: usize) -> Result<(), Box<Violation>> {
        let Some(turn) = self.v1_turns[k].take() else { return Ok(()) };
        let key = self.keys[k].clone();
        let now = self.clock.local(self.now);
        let before = View::of(&self.authority);
        let until = namespace::remaining(&turn.record, self.v1_limits.lock_delay, now).map(|left| now + left);
        let fence = namespace::set_fence(&turn.record, turn.floor);
        self.record(Input::SetExternal { key: key.clone(), until, fence });
        self.authority.set_external(now, &key, until, fence);
        self.record_history();
        self.log(What::V1Set(key.clone(), until));
        self.check_authority(&before, None)?;
        let mut backlog = turn.backlog.into_iter();
        while let Some((j, request)) = backlog.next() {
            self.v1_decide(j, key.clone(), request)?;
            if let Some(t) = self.v1_turns[k].as_mut() {
                t.backlog.extend(backlog);
                break;
            }
        }
        Ok(())
    }

    fn fault(&mut self) -> Result<(), Box<Violation>> {
        let ttl = self.params.config.ttl.as_micros();
        self.next_fault = self.now + self.rng.u64(0..ttl);
        // Runs without v1 clients draw nothing more, so they stay as they were.
        if !self.v1.is_empty() && self.rng.u8(0..4) == 0 {
            let j = self.rng.usize(0..self.v1.len());
            if self.rng.bool() {
                let c = &mut self.v1[j];
                if c.lease.is_some() {
                    c.lease = None;
                    c.acquiring = false;
                    c.app_at = None;
                    c.restart_at = Some(self.now + self.rng.u64(0..2 * ttl));
                    self.log(What::V1Crash(j));
                }
            } else {
                let until = self.now + self.rng.u64(0..2 * ttl);
                let dir = Direction::draw(&mut self.rng);
                self.v1[j].port.partition(until, dir);
                self.log(What::V1Partition(j, until, dir));
            }
            return Ok(());
        }
        let i = self.rng.usize(0..self.clients.len());
        match self.rng.u8(0..6) {
            0 if self.clients[i].session.is_some() => {
                let c = &mut self.clients[i];
                c.session = None;
                c.app_at = None;
                c.restart_at = Some(self.now + self.rng.u64(0..2 * ttl));
                self.log(What::Crash(i));
            }
            1 => {
                let until = self.now + self.rng.u64(0..2 * ttl);
                let dir = Direction::draw(&mut self.rng);
                self.clients[i].port.partition(until, dir);
                self.log(What::Partition(i, until, dir));
            }
            n @ 2..=5 if !self.handled.is_empty() => {
                let mut request = self.handled[self.rng.usize(0..self.handled.len())].clone();
                let how = if n == 5 {
                    let mut bytes = request.secret.to_bytes();
                    bytes[self.rng.usize(0..16)] ^= 1 << self.rng.u8(0..8);
                    request.secret = Secret::from_bytes(bytes);
                    "forged"
                } else {
                    "replay"
                };
                self.batch(|w| w.inject(how, request))?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Hands the authority a request it has seen (or a forgery of one) and checks that its
    /// state did not change. Expiry due by now happens first: that change is not the replay's.
    fn inject(&mut self, how: &'static str, request: SessionRequest) -> Result<(), Box<Violation>> {
        if self.down.is_some() {
            return Ok(());
        }
        self.stats.injected += 1;
        let before = View::of(&self.authority);
        self.apply(Input::Timeout);
        self.record_history();
        self.check_authority(&before, None)?;
        let before = View::of(&self.authority);
        let reply = self.apply(Input::Request(request.clone()));
        self.record_history();
        self.log(What::Injected(how, request, reply));
        let after = View::of(&self.authority);
        if after != before {
            return Err(self.violation(format!(
                "a {how} request changed the authority's state:\n  before {before:?}\n  after  {after:?}"
            )));
        }
        Ok(())
    }

    /// A `LimitMismatch` refusal only of a request whose limit differs from that of the key's
    /// holders and waiters (it had some before the request; expiry only removes them).
    fn check_limit_refusal(
        &mut self,
        before: &View,
        request: &SessionRequest,
        reply: &SessionReply,
    ) -> Result<(), Box<Violation>> {
        if *reply != SessionReply::Rejected(Reject::LimitMismatch) {
            return Ok(());
        }
        self.stats.mismatched += 1;
        let (key, asked) = match &request.op {
            SessionOp::Acquire { key, .. } => (key, 1),
            SessionOp::AcquireWithLimit { key, limit, .. } => (key, *limit),
            _ => return Err(self.violation(format!("LimitMismatch for {:?}", request.op))),
        };
        match before.key(key) {
            Some(v) if (v.status.holders > 0 || v.status.waiting > 0) && v.status.limit != asked => Ok(()),
            other => Err(self.violation(format!(
                "{key} refused for limit {asked} (LimitMismatch) though it stood {:?}",
                other.map(|v| (&v.status, &v.holders, &v.waiters))
            ))),
        }
    }

    /// The limit its holders and waiters asked for, while it has any.
    fn limit_in_force(&self, key: &Key) -> Option<usize> {
        let s = self.authority.key(key).filter(|s| s.holders > 0 || s.waiting > 0)?;
        Some(usize::from(s.limit))
    }

    /// A key's holder limit.
    fn limit_of(&self, key: &Key) -> usize {
        self.keys.iter().position(|k| k == key).map_or(1, |k| usize::from(self.params.limits[k]))
    }

    /// Checks every grant the last authority step made. `request` is the request it handled
    /// (`None`: its timer).
    fn check_authority(
        &mut self,
        before: &View,
        request: Option<&SessionRequest>,
    ) -> Result<(), Box<Violation>> {
        let after = View::of(&self.authority);
        let now = self.clock.local(self.now);
        for kv in &after.keys {
            let key = &kv.key;
            // One namespace: while v1 keeps the key (its grant, or a lock-delay after one), the
            // sessions have it held, and never beside a session's grant.
            let v1 =
                self.v1_records.get(key).and_then(|r| namespace::remaining(r, self.params.lock_delay, now));
            if v1.is_some() && kv.external.is_none() {
                return Err(self.violation(format!(
                    "{key} is kept by v1 for {v1:?} but the sessions do not hold it for v1"
                )));
            }
            if kv.external.is_some() && !kv.holders.is_empty() {
                return Err(self.violation(format!(
                    "{key} is held for v1 ({:?}) and by sessions {:?} at once",
                    kv.external, kv.holders
                )));
            }
            // The limit in force is the one its holders and waiters asked for: the key's, or
            // one more while a misconfigured contender's claims hold it.
            let limit = usize::from(kv.status.limit);
            let configured = self.limit_of(key);
            let claimed = !kv.holders.is_empty() || !kv.waiters.is_empty();
            if claimed && !(configured..=configured + 1).contains(&limit) {
                return Err(
                    self.violation(format!("{key} has limit {limit}, asked {configured} or one more"))
                );
            }
            // A limit changes only while the key has no claims at all.
            let was = before.key(key).filter(|v| !v.holders.is_empty() || !v.waiters.is_empty());
            if let Some(v) = was.filter(|v| claimed && v.status.limit != kv.status.limit) {
                return Err(self.violation(format!(
                    "{key} went from limit {} to {limit} while it had holders or waiters",
                    v.status.limit
                )));
            }
            if kv.holders.len() > limit {
                return Err(self.violation(format!(
                    "{key} has {} holders at the authority, limit {limit}: {:?}",
                    kv.holders.len(),
                    kv.holders
                )));
            }
            let old = before.key(key);
            let old_holders = old.map(|v| v.holders.as_slice()).unwrap_or_default();
            let mut new: Vec<KeyHolder> =
                kv.holders.iter().filter(|h| !old_holders.contains(h)).copied().collect();
            let had_waiters = old.is_some_and(|v| !v.waiters.is_empty());
            new.sort_by_key(|h| h.fence);
            for h in old_holders.iter().filter(|h| !kv.holders.contains(h)) {
                let gave_up = request.is_some_and(|r| {
                    r.session == h.session
                        && match &r.op {
                            SessionOp::Release { key: k, fence } => k == key && *fence == h.fence,
                            SessionOp::Close => true,
                            _ => false,
                        }
                });
                if after.alive(h.session) && !gave_up {
                    let to = new.first().map_or("nobody".to_string(), |n| n.session.to_string());
                    return Err(self.violation(format!(
                        "{key} passed from {} to {to} while {} was alive and had not released",
                        h.session, h.session
                    )));
                }
            }
            if let (Some(g), Some(left)) = (new.first(), v1) {
                return Err(self
                    .violation(format!("{key} granted to {} while v1 keeps it for {left} more", g.session)));
            }
            if !new.is_empty() && self.v1_granted_last.insert(key.clone(), false) == Some(true) {
                self.stats.v2_after_v1 += 1;
                if old.is_some_and(|v| !v.waiters.is_empty()) {
                    self.stats.queued_behind_v1 += 1;
                }
            }
            for g in &new {
                self.stats.grants += 1;
                let (last, then) =
                    self.granted.insert(key.clone(), (g.fence, self.restarts)).unwrap_or_default();
                // Fences strictly increase per key, across authority restarts too: the fence
                // counter is replayed from the log like everything else.
                if then < self.restarts && last > Fence::NONE {
                    self.stats.granted_across_restarts += 1;
                    if g.fence <= last {
                        return Err(self.violation(format!(
                            "{key} granted with fence {} across {} authority restart(s) after fence {last}",
                            g.fence,
                            self.restarts - then
                        )));
                    }
                }
                if g.fence <= last {
                    return Err(
                        self.violation(format!("{key} granted with fence {} after fence {last}", g.fence))
                    );
                }
                // After the heal, a waiter handed the key is told within the bound (see
                // `tell_bound`).
                if had_waiters && self.settled() {
                    if let Some(client) = self.client_of(g.session) {
                        let by = self.now + self.tell_bound();
                        self.tells.push(Tell {
                            client,
                            session: g.session,
                            key: key.clone(),
                            fence: g.fence,
                            granted_at: self.now,
                            by,
                        });
                    }
                }
                if !after.alive(g.session) {
                    return Err(
                        self.violation(format!("{key} granted to {} after its session expired", g.session))
                    );
                }
            }
            let queued = old.map(|v| v.waiters.as_slice()).unwrap_or_default();
            if !new.is_empty() && !queued.is_empty() {
                self.stats.hand_offs += new.len() as u64;
                // The slots freed go to the first waiters still alive, in queue order.
                let heads: Vec<SessionId> =
                    queued.iter().copied().filter(|s| after.alive(*s)).take(new.len()).collect();
                let got: Vec<SessionId> = new.iter().map(|h| h.session).collect();
                if heads != got {
                    return Err(self.violation(format!(
                        "{key} granted to {got:?} out of turn: the queue was {queued:?}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Appends each key's holder to its history if it changed.
    fn record_history(&mut self) {
        for key in &self.keys {
            let now = self.authority.key(key).and_then(|s| s.holder).map(|h| (h.session, h.fence));
            let h = self.history.entry(key.clone()).or_insert_with(|| vec![None]);
            if h.last() != Some(&now) {
                h.push(now);
            }
        }
    }

    /// Checks observer `i`'s report of change `change` of `key` against the true history.
    fn check_report(
        &mut self,
        i: usize,
        key: &Key,
        change: u64,
        state: Option<(SessionId, Fence)>,
        missed: u64,
    ) -> Result<(), String> {
        let session = self.clients[i].session.as_ref().and_then(Holder::id).unwrap_or_default();
        let Some(&(base_index, base_change)) = self.observing.get(&(session, key.clone())) else {
            return Err(format!("c{i} ({session}) told of {key} before the authority handled its observe"));
        };
        let prev = self.reported.get(&(i, key.clone())).copied().filter(|(s, _, _)| *s == session);
        if let Some((_, prev_change, _)) = prev {
            if change <= prev_change {
                return Err(format!("c{i} told change {change} of {key} after change {prev_change}"));
            }
            if missed != change - prev_change - 1 {
                return Err(format!(
                    "c{i} told change {change} of {key} after {prev_change} with {missed} missed"
                ));
            }
        }
        let index =
            (change.checked_sub(base_change)).and_then(|d| usize::try_from(d).ok()).map(|d| base_index + d);
        let history = &self.history[key];
        let truth = index.and_then(|x| history.get(x));
        if truth != Some(&state) {
            return Err(format!(
                "c{i} told {key} is {state:?} as change {change}, but the true history (observed from \
                 index {base_index} = change {base_change}) has {truth:?} there: {history:?}"
            ));
        }
        let index = index.unwrap_or_default();
        if let Some((_, fence)) = state {
            let highest = self.reported_fence.entry((i, key.clone())).or_default();
            if fence < *highest {
                return Err(format!("c{i} told {key} fence {fence} after fence {highest}"));
            }
            *highest = fence;
        }
        self.reported.insert((i, key.clone()), (session, change, index));
        Ok(())
    }

    /// After the heal: every observer's last report of each key is its holder now.
    fn check_observers_caught_up(&self) -> Result<(), Box<Violation>> {
        for (i, c) in self.clients.iter().enumerate().filter(|(_, c)| c.observer) {
            let session = c.session.as_ref().and_then(Holder::id);
            for key in &self.keys {
                let truth = self.history[key].last().copied().flatten();
                let last = self.reported.get(&(i, key.clone())).filter(|(s, _, _)| Some(*s) == session);
                let told = last.map(|&(_, _, index)| self.history[key][index]);
                if told != Some(truth) {
                    return Err(self.violation(format!(
                        "after the heal, observer c{i} ({session:?}) last told {key} is {told:?}, but it is {truth:?}"
                    )));
                }
            }
        }
        Ok(())
    }

    fn check_beliefs(&mut self) -> Result<(), Box<Violation>> {
        for (k, key) in self.keys.iter().enumerate() {
            // No holder believes a grant the authority has ended, so the limit in force there
            // (or the key's own, when it has no claims) bounds the believers.
            let configured = usize::from(self.params.limits[k]);
            let limit = self.limit_in_force(key).map_or(configured, |l| l.max(configured));
            // Who (a session client `c`, a v1 client `v`), its fence, its time left.
            let mut believers: Vec<(char, usize, Fence, Duration)> = self
                .clients
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let s = c.session.as_ref()?;
                    let rem = s.remaining(c.clock.local(self.now), key)?;
                    Some(('c', i, s.fence(key).unwrap_or_default(), rem))
                })
                .collect();
            // A v1 believer excludes everyone else: v1 holds a key alone.
            let sessions = believers.len();
            believers.extend(self.v1.iter().enumerate().filter(|(_, c)| c.key == k).filter_map(|(j, c)| {
                let l = c.lease.as_ref()?;
                let rem = l.remaining(c.clock.local(self.now))?;
                Some(('v', j, l.fence().unwrap_or_default(), rem))
            }));
            let limit = if believers.len() > sessions { 1 } else { limit };
            if believers.len() > limit {
                let who: Vec<String> =
                    believers.iter().map(|(p, i, f, r)| format!("{p}{i} (fence {f}, {r} left)")).collect();
                let n = match believers.len() {
                    2 => "two".to_string(),
                    n => n.to_string(),
                };
                return Err(self
                    .violation(format!("{n} holders of {key} at once (limit {limit}): {}", who.join(", "))));
            }
            if believers.len() >= 2 {
                self.stats.shared += 1;
            }
        }
        Ok(())
    }
}

fn v1_owner(client: usize, incarnation: u32) -> OwnerId {
    OwnerId(((client as u64 + 1) << 32) | u64::from(incarnation))
}

fn holder(i: usize, config: Config) -> Holder {
    Session::new(parse_label(&format!("c{i}")).expect("valid label"), config).expect("sim config is valid")
}

/// Runs one seed with `fault` planted in the authority ([`SessionFault::None`]: the real rules).
pub fn run_seed(seed: u64, fault: SessionFault) -> Result<Stats, Box<Violation>> {
    World::new(Params::from_seed(seed, fault)).run()
}
