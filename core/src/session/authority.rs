//! The authority's side of sessions: the whole rulebook, in one bounded in-memory table.
//!
//! [`SessionAuthority`] is what the built-in server and the simulator both drive, so the rules
//! exist once. Like [`Lease`](crate::Lease) it never reads a clock or a random number
//! generator: every `now` is the caller's reading of the authority's monotonic clock, and the
//! secret of a new session comes from the caller's CSPRNG.
//!
//! - A key is granted to a session and lives exactly as long as it: one keepalive renews
//!   every key, and a session that expires frees all of its keys at the same instant.
//! - A request must carry the session's secret (else `Rejected(Unauthorized)`, nothing
//!   changes) and a seq not seen before within a sliding window of [`REPLAY_WINDOW`] seqs
//!   (else `Replayed`, nothing changes), as IPsec's anti-replay window does.
//! - Waiters queue FIFO per key. On release, close or expiry the head of the queue is granted
//!   at once with a new fence; the grant is reported in the waiter's next `Alive` until the
//!   session confirms it with a fresh `Acquire` of the key.
//! - A session may observe keys: each change of an observed key's holder is numbered and
//!   reported in the session's `AliveObserved` replies until a `KeepAliveSeen` acknowledges
//!   it (the bookkeeping lives apart from the keys' records, in `observe.rs`, fed after every
//!   input with who holds each observed key).
//!
//! - A key may be a semaphore: acquired with [`SessionOp::AcquireWithLimit`], up to `limit`
//!   sessions hold it at once, each grant with its own fence, and every slot freed goes to
//!   the head of the queue. Every holder and waiter of a key asks for the same limit; a
//!   request with another while the key has any is `Rejected(LimitMismatch)`. A plain
//!   [`SessionOp::Acquire`] asks for a limit of 1.
//! - Holders and waiters of every key share one pool of claims, so one key may have
//!   thousands of waiters while the table's size is bounded by the total.

use core::fmt;

use heapless::index_map::FnvIndexMap;
use heapless::Vec;

use super::observe::{Current, Observations};
use super::wire::{Grant, Label, Secret, Seq, SessionId, SessionOp, SessionReply, SessionRequest, Value};
use crate::time::{Duration, Instant};
use crate::wire::{parse_key, Fence, Key, Reject};

/// How many seqs below the highest one seen a request may carry and still be accepted (if
/// its own seq was not seen): room for an honest holder's requests to be reordered.
pub const REPLAY_WINDOW: u64 = 64;

/// Deliberately broken rules, so tests can prove the simulator's checker catches them.
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum SessionFault {
    /// Correct behaviour.
    #[default]
    None,
    /// Hand a key with waiters to the head of its queue once its holder's session is within
    /// a quarter of its ttl of expiring, before it has expired.
    HandOffEarly,
    /// Leave an expired session's waits in the queues.
    KeepExpiredWaiters,
    /// Accept any seq, seen or not.
    AcceptReplays,
    /// Admit one holder more than a semaphore's limit (keys with a limit of 2 or more).
    OverAdmit,
    /// Take a request's limit as the key's even while the key has claims under another.
    IgnoreLimitMismatch,
    /// Do not tell observers that a key became free.
    HideFreeChanges,
    /// Hold a key for the other protocol ([`SessionAuthority::hold_external`]) even while
    /// sessions hold it or wait for it: a v1 grant beside a session's.
    ExternalOverSessions,
    /// Answer a hold for the other protocol with no fence floor: its grant may reuse a
    /// session's fence.
    ExternalBelowFloor,
    /// End a hold for the other protocol a quarter of its remaining time early.
    EndExternalEarly,
    /// Count an observer's acknowledgement even if it was made before its observation's
    /// observe (of an earlier observation of the key, reordered on the way).
    CountStaleAcks,
    /// Keep a held keepalive waiting ([`SessionAuthority::keepalive_due`]) though its session
    /// has a grant to be told of: a pushed grant waits for the hold's end.
    HoldPushedGrants,
    /// At [`SessionAuthority::recover`] (a restart's replay), forget the fence counter of every
    /// key no one holds: their next grants reuse fences granted before the restart.
    RecoverForgetsFences,
}

/// The ttls an authority accepts, and (in tests) a deliberate bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SessionLimits {
    /// Shortest session ttl granted.
    pub min_ttl: Duration,
    /// Longest session ttl granted.
    pub max_ttl: Duration,
    /// Test-only deliberate bug; see [`SessionFault`].
    #[cfg(feature = "fault-injection")]
    pub fault: SessionFault,
}

impl Default for SessionLimits {
    /// 10 ms to one day, as for single leases.
    fn default() -> Self {
        SessionLimits {
            min_ttl: Duration::from_millis(10),
            max_ttl: crate::config::MAX_TTL,
            #[cfg(feature = "fault-injection")]
            fault: SessionFault::None,
        }
    }
}

/// Where a seq stands against the seqs a session has used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freshness {
    /// Higher than every seq seen: the holder's newest request.
    Newest,
    /// Not seen, but below the highest: reordered on the way, or a late retry's original.
    Reordered,
    /// Seen already, or too old to tell.
    Replayed,
}

/// The seqs a session has used: the highest, and a bitmap of the [`REPLAY_WINDOW`] below it
/// (bit `i` set: seq `highest − i` was seen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct ReplayWindow {
    highest: u64,
    seen: u64,
}

impl ReplayWindow {
    fn check(&self, seq: Seq) -> Freshness {
        let s = seq.0;
        if s > self.highest {
            Freshness::Newest
        } else if self.highest - s >= REPLAY_WINDOW || self.seen & (1 << (self.highest - s)) != 0 {
            Freshness::Replayed
        } else {
            Freshness::Reordered
        }
    }

    /// Records `seq` as used; it must have passed [`check`](Self::check).
    fn mark(&mut self, seq: Seq) {
        let s = seq.0;
        if s > self.highest {
            let shift = s - self.highest;
            self.seen = if shift >= REPLAY_WINDOW { 0 } else { self.seen << shift };
            self.highest = s;
            self.seen |= 1;
        } else {
            self.seen |= 1 << (self.highest - s);
        }
    }
}

/// One session as the authority keeps it. Persist it whole (secret and window included) if
/// sessions must survive a restart: a window forgotten would accept old frames again.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct SessionRecord {
    id: SessionId,
    secret: Secret,
    label: Label,
    ttl: Duration,
    expires_at: Instant,
    window: ReplayWindow,
    /// Its grants and waits, on every key.
    claims: Chain,
}

/// Whether the holding session has heard of its grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
enum Notice {
    /// Answered to the session's newest request, or confirmed by a later one.
    Confirmed,
    /// Pushed (granted from the queue), or answered to a reordered request whose reply the
    /// holder ignores: reported in every `Alive` until confirmed.
    Reported,
}

/// A claim's place in the [`Claims`] pool.
type ClaimId = u32;

/// What a session has of a key: a place in its queue, or one of its `limit` grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
enum Stake {
    Waiting,
    Holding { fence: Fence, notice: Notice },
}

/// A claim's neighbours in one of the two chains it is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct Links {
    prev: Option<ClaimId>,
    next: Option<ClaimId>,
}

/// A doubly linked list of claims through the pool: a key's holders (in grant order) or
/// waiters (FIFO), or a session's claims on every key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct Chain {
    head: Option<ClaimId>,
    tail: Option<ClaimId>,
    len: u32,
}

/// Which of its two chains a claim is linked in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Thread {
    /// Its key's holders or waiters.
    Key,
    /// Its session's claims.
    Session,
}

/// One session's grant of, or wait for, one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct Claim {
    session: SessionId,
    /// The key's index in the authority's map (keys are never removed, so it is stable).
    key: u32,
    /// The seq of the acquire that asked for it.
    asked: Seq,
    stake: Stake,
    by_key: Links,
    by_session: Links,
}

impl Claim {
    fn links(&self, t: Thread) -> Links {
        match t {
            Thread::Key => self.by_key,
            Thread::Session => self.by_session,
        }
    }

    fn links_mut(&mut self, t: Thread) -> &mut Links {
        match t {
            Thread::Key => &mut self.by_key,
            Thread::Session => &mut self.by_session,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
enum Cell {
    Free { next: Option<ClaimId> },
    Used(Claim),
}

/// Every holder and waiter of every key, in one pool of `W` cells: a key may have as many
/// waiters as the pool has room for, and no key reserves room it does not use. Chains run
/// through the cells, so enqueue, dequeue and leaving a queue are O(1), and a session that
/// ends walks only its own claims.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct Claims<const W: usize> {
    cells: Vec<Cell, W>,
    /// The first free cell below `cells.len()`; the free cells are chained through `next`.
    free: Option<ClaimId>,
}

impl<const W: usize> Claims<W> {
    const fn new() -> Self {
        Claims { cells: Vec::new(), free: None }
    }

    fn get(&self, id: ClaimId) -> Option<&Claim> {
        match self.cells.get(id as usize)? {
            Cell::Used(c) => Some(c),
            Cell::Free { .. } => None,
        }
    }

    fn get_mut(&mut self, id: ClaimId) -> Option<&mut Claim> {
        match self.cells.get_mut(id as usize)? {
            Cell::Used(c) => Some(c),
            Cell::Free { .. } => None,
        }
    }

    /// Stores `claim`, unlinked; `None` when the pool is full.
    fn insert(&mut self, claim: Claim) -> Option<ClaimId> {
        match self.free {
            Some(id) => {
                let cell = self.cells.get_mut(id as usize)?;
                let Cell::Free { next } = *cell else { return None };
                *cell = Cell::Used(claim);
                self.free = next;
                Some(id)
            }
            None => {
                let id = ClaimId::try_from(self.cells.len()).ok()?;
                self.cells.push(Cell::Used(claim)).ok()?;
                Some(id)
            }
        }
    }

    /// Frees a claim's cell; it must be unlinked from both chains first.
    fn remove(&mut self, id: ClaimId) {
        if let Some(cell @ Cell::Used(_)) = self.cells.get_mut(id as usize) {
            *cell = Cell::Free { next: self.free };
            self.free = Some(id);
        }
    }

    fn push_back(&mut self, chain: &mut Chain, id: ClaimId, t: Thread) {
        let tail = chain.tail;
        let Some(c) = self.get_mut(id) else { return };
        *c.links_mut(t) = Links { prev: tail, next: None };
        match tail.and_then(|tl| self.get_mut(tl)) {
            Some(last) => last.links_mut(t).next = Some(id),
            None => chain.head = Some(id),
        }
        chain.tail = Some(id);
        chain.len += 1;
    }

    fn unlink(&mut self, chain: &mut Chain, id: ClaimId, t: Thread) {
        let Some(l) = self.get(id).map(|c| c.links(t)) else { return };
        match l.prev.and_then(|p| self.get_mut(p)) {
            Some(p) => p.links_mut(t).next = l.next,
            None => chain.head = l.next,
        }
        match l.next.and_then(|n| self.get_mut(n)) {
            Some(n) => n.links_mut(t).prev = l.prev,
            None => chain.tail = l.prev,
        }
        chain.len = chain.len.saturating_sub(1);
        if let Some(c) = self.get_mut(id) {
            *c.links_mut(t) = Links::default();
        }
    }

    /// The claims of a chain, head first.
    fn walk(&self, chain: &Chain, t: Thread) -> impl Iterator<Item = (ClaimId, &Claim)> + '_ {
        let mut cur = chain.head;
        core::iter::from_fn(move || {
            let id = cur?;
            let c = self.get(id)?;
            cur = c.links(t).next;
            Some((id, c))
        })
    }

    fn used(&self) -> impl Iterator<Item = (ClaimId, &Claim)> + '_ {
        self.cells.iter().enumerate().filter_map(|(i, c)| match c {
            Cell::Used(c) => Some((i as ClaimId, c)),
            Cell::Free { .. } => None,
        })
    }
}

/// One key: its holders (at most `limit`), its fence counter and its queue. Keys are never
/// evicted, because an evicted key would forget its fence counter.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct KeyRecord {
    /// How many sessions may hold it at once: set by the first claim while it has none,
    /// and every later claim must ask for the same.
    limit: u16,
    last_fence: Fence,
    holders: Chain,
    waiters: Chain,
    /// Held under another protocol (see [`SessionAuthority::hold_external`]): no session is
    /// granted it meanwhile. Absent from snapshots written before it existed.
    #[cfg_attr(feature = "serde", serde(default))]
    external: Option<ExternalHold>,
}

/// A key held outside the sessions, under another protocol sharing the key namespace (the
/// built-in server's v1 leases): while it lasts, no session is granted the key, and waiters
/// queue behind it as behind a session's grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum ExternalHold {
    /// Until the caller says otherwise with [`SessionAuthority::set_external`]: while the
    /// other protocol decides, and its decision (and so its expiry) is not known yet.
    Pending,
    /// Until this instant (the other grant's expiry, on this authority's clock), or until
    /// [`SessionAuthority::set_external`] ends it earlier.
    Until(Instant),
}

/// One input to a [`SessionAuthority`], as a store logs it: the authority is deterministic, so
/// its table is exactly the result of its inputs, and a log of them (each with its `now`)
/// replays it exactly through [`SessionAuthority::apply`]. The built-in server's write-ahead
/// log holds these; the simulator's model of it too.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum SessionInput {
    /// [`SessionAuthority::open`], with the secret drawn for it.
    Open {
        /// The ttl asked.
        ttl: Duration,
        /// The holder's label.
        label: Label,
        /// The secret drawn for the session.
        secret: Secret,
    },
    /// [`SessionAuthority::handle`].
    Request(SessionRequest),
    /// [`SessionAuthority::handle_timeout`].
    Timeout,
    /// [`SessionAuthority::recover`]: the store (re)started.
    Recover,
    /// [`SessionAuthority::hold_external`], for another protocol's request about to be decided.
    HoldExternal {
        /// The key.
        key: Key,
        /// Until when.
        hold: ExternalHold,
        /// A new grant rather than an extension.
        exclusive: bool,
    },
    /// [`SessionAuthority::set_external`]: what the other protocol decided.
    SetExternal {
        /// The key.
        key: Key,
        /// Held until then (`None`: free).
        until: Option<Instant>,
        /// The highest fence it granted the key.
        fence: Fence,
    },
    /// [`SessionAuthority::raise_fence_floor`].
    FenceFloor {
        /// The floor.
        floor: Fence,
    },
}

/// Why [`SessionAuthority::hold_external`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ExternalRefusal {
    /// A session holds the key, or (for an exclusive hold) sessions wait for it.
    Busy {
        /// When the first session's grant of it ends, from now, if it is known.
        retry_after: Duration,
    },
    /// The key table is full.
    Capacity,
}

impl KeyRecord {
    /// A key first seen now, whose fences continue above `floor`.
    const fn fresh(floor: Fence) -> Self {
        KeyRecord { limit: 1, last_fence: floor, holders: Chain::NONE, waiters: Chain::NONE, external: None }
    }

    fn is_claimed(&self) -> bool {
        self.holders.len > 0 || self.waiters.len > 0
    }
}

impl Chain {
    const NONE: Chain = Chain { head: None, tail: None, len: 0 };
}

/// A session as status endpoints may show it: nothing here authorises.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SessionStatus {
    /// The session.
    pub id: SessionId,
    /// Its holder's public name.
    pub label: Label,
    /// Its ttl.
    pub ttl: Duration,
    /// When it expires unless kept alive, on the authority's clock.
    pub expires_at: Instant,
}

/// A key's holder as status endpoints may show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct KeyHolder {
    /// The holding session.
    pub session: SessionId,
    /// The grant's fence.
    pub fence: Fence,
}

/// A key as status endpoints may show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct KeyStatus {
    /// The oldest current grant, if any (with a limit of 1, the grant). It lasts as long as
    /// the holder's session; [`SessionAuthority::holders`] lists them all.
    pub holder: Option<KeyHolder>,
    /// How many sessions hold the key now, at most `limit`.
    pub holders: usize,
    /// How many sessions may hold it at once (1: a lease; more: a semaphore), as its
    /// holders and waiters asked. Meaningless while it has neither.
    pub limit: u16,
    /// The highest fence ever issued for the key. Persist it: fences must never repeat.
    pub last_fence: Fence,
    /// How many sessions wait for the key.
    pub waiting: usize,
}

/// Why a session could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum OpenError {
    /// The ttl is outside the authority's [`SessionLimits`].
    InvalidTtl,
    /// The authority cannot track more sessions.
    Capacity,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpenError::InvalidTtl => "session ttl out of the authority's accepted range",
            OpenError::Capacity => "authority cannot track more sessions",
        })
    }
}

impl core::error::Error for OpenError {}

impl From<OpenError> for Reject {
    fn from(e: OpenError) -> Reject {
        match e {
            OpenError::InvalidTtl => Reject::InvalidTtl,
            OpenError::Capacity => Reject::Capacity,
        }
    }
}

/// A bounded in-memory session authority: up to `S` sessions, `K` keys (a power of two),
/// `W` claims in all (a claim is one session's grant of, or place in the queue for, one key),
/// shared by every key: one key may have thousands of waiters while memory stays bounded by
/// the total), and `O` observers of keys (see [`SessionOp::Observe`]; one more is
/// `Rejected(Capacity)`). Up to `S` holdings and waits at once may carry a value
/// ([`SessionOp::AcquireWithValue`]); one more is `Rejected(Capacity)`.
///
/// Drive it like this: answer [`SessionOp::Open`] with [`open`](Self::open) (it needs a fresh
/// secret) and every other request with [`handle`](Self::handle); call
/// [`handle_timeout`](Self::handle_timeout) at [`poll_timeout`](Self::poll_timeout), so that an
/// expired session's keys go to their waiters at once rather than at the next request.
///
/// A key acquired with [`SessionOp::AcquireWithLimit`] is a semaphore: up to `limit` sessions
/// hold it at once, each grant with its own fence, fences strictly increasing per key across
/// all of its holders; every slot freed goes to the head of the queue.
///
/// ```
/// use leasehold_core::session::wire::{parse_label, Secret, Seq, SessionOp, SessionReply, SessionRequest};
/// use leasehold_core::session::{SessionAuthority, SessionLimits};
/// use leasehold_core::{parse_key, Duration, Fence, Instant};
///
/// let mut a = SessionAuthority::<4, 4, 8>::new(SessionLimits::default());
/// let now = Instant::from_millis(0);
/// let key = parse_key("pool").unwrap();
/// let mut ask = |a: &mut SessionAuthority<4, 4, 8>, byte: u8| {
///     let secret = Secret::from_bytes([byte; 16]);
///     let SessionReply::Opened { session, .. } =
///         a.open(now, Duration::from_secs(10), &parse_label("worker").unwrap(), secret)
///     else { unreachable!() };
///     let op = SessionOp::AcquireWithLimit { key: key.clone(), wait: true, limit: 2 };
///     a.handle(now, &SessionRequest { session, secret, seq: Seq(2), op })
/// };
/// assert_eq!(ask(&mut a, 1), SessionReply::Granted { key: key.clone(), fence: Fence(1) });
/// assert_eq!(ask(&mut a, 2), SessionReply::Granted { key: key.clone(), fence: Fence(2) });
/// assert_eq!(ask(&mut a, 3), SessionReply::Queued { key: key.clone(), position: 1 });
/// assert_eq!(a.key(&key).unwrap().holders, 2);
/// ```
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SessionAuthority<const S: usize, const K: usize, const W: usize, const O: usize = 16> {
    sessions: Vec<SessionRecord, S>,
    keys: FnvIndexMap<Key, KeyRecord, K>,
    claims: Claims<W>,
    /// The id the next session gets. Persist it: ids must never repeat.
    next_id: u64,
    /// Not part of a snapshot: configuration, set again with [`set_limits`](Self::set_limits).
    #[cfg_attr(feature = "serde", serde(skip))]
    limits: SessionLimits,
    /// Observers and values; absent from snapshots written before they existed.
    #[cfg_attr(feature = "serde", serde(default))]
    observations: Observations<O, S>,
    /// No earlier than the first [`ExternalHold::Until`] of any key (it may be earlier: a
    /// stale value only costs a scan); `None` if there is none.
    #[cfg_attr(feature = "serde", serde(default))]
    next_external: Option<Instant>,
    /// Fences of keys first seen from now on continue above this: see
    /// [`raise_fence_floor`](Self::raise_fence_floor).
    #[cfg_attr(feature = "serde", serde(default))]
    fence_floor: Fence,
}

impl<const S: usize, const K: usize, const W: usize, const O: usize> SessionAuthority<S, K, W, O> {
    /// An empty authority whose first session is `s1`.
    pub fn new(limits: SessionLimits) -> Self {
        Self::resume(limits, SessionId(1))
    }

    /// An empty authority that continues a persisted session counter: `next` is the value
    /// [`next_session`](Self::next_session) had.
    pub fn resume(limits: SessionLimits, next: SessionId) -> Self {
        SessionAuthority {
            sessions: Vec::new(),
            keys: FnvIndexMap::new(),
            claims: Claims::new(),
            next_id: next.0.max(1),
            limits,
            observations: Observations::default(),
            next_external: None,
            fence_floor: Fence::NONE,
        }
    }

    /// Sets the ttls accepted from now on: for a table restored from a snapshot (with `serde`,
    /// the table serialises whole, secrets and replay windows included, limits excluded).
    pub fn set_limits(&mut self, limits: SessionLimits) {
        self.limits = limits;
    }

    // ----- inputs -----

    /// Opens a session of `ttl` for `label`, with `secret` drawn by the caller from a CSPRNG.
    /// The reply is [`SessionReply::Opened`] or [`SessionReply::Rejected`].
    pub fn open(&mut self, now: Instant, ttl: Duration, label: &Label, secret: Secret) -> SessionReply {
        let before = self.sessions.len();
        let reply = match self.try_open(now, ttl, label, secret) {
            Ok(session) => SessionReply::Opened { session, secret, ttl },
            Err(e) => SessionReply::Rejected(e.into()),
        };
        self.note_changes(self.sessions.len() <= before);
        reply
    }

    /// Answers any request but [`SessionOp::Open`] (which needs [`open`](Self::open), and is
    /// answered `Rejected(Malformed)` here).
    pub fn handle(&mut self, now: Instant, request: &SessionRequest) -> SessionReply {
        let before = self.sessions.len();
        // Expiries first, so that a keepalive's reply reports the changes they made.
        self.expire(now);
        self.note_changes(self.sessions.len() < before);
        let reply = self.handle_request(now, request);
        self.note_changes(self.sessions.len() < before);
        reply
    }

    fn handle_request(&mut self, now: Instant, request: &SessionRequest) -> SessionReply {
        self.expire(now);
        if let SessionOp::Open { .. } = request.op {
            return SessionReply::Rejected(Reject::Malformed);
        }
        let sid = request.session;
        let Some(s) = self.sessions.iter_mut().find(|s| s.id == sid) else {
            return SessionReply::Expired;
        };
        if !s.secret.ct_eq(&request.secret) {
            return SessionReply::Rejected(Reject::Unauthorized);
        }
        let freshness = match s.window.check(request.seq) {
            #[cfg(feature = "fault-injection")]
            _ if self.limits.fault == SessionFault::AcceptReplays => Freshness::Newest,
            Freshness::Replayed => return SessionReply::Replayed,
            f => f,
        };
        s.window.mark(request.seq);
        let newest = freshness == Freshness::Newest;
        match &request.op {
            SessionOp::Open { .. } => SessionReply::Rejected(Reject::Malformed),
            SessionOp::KeepAlive | SessionOp::KeepAliveSeen { .. } => {
                s.expires_at = now + s.ttl;
                let ttl = s.ttl;
                if let SessionOp::KeepAliveSeen { key, change } = &request.op {
                    #[cfg(feature = "fault-injection")]
                    let seq = match self.limits.fault {
                        SessionFault::CountStaleAcks => Seq(u64::MAX),
                        _ => request.seq,
                    };
                    #[cfg(not(feature = "fault-injection"))]
                    let seq = request.seq;
                    self.observations.ack(sid, key, *change, seq);
                }
                let chain = s.claims;
                let keys = &self.keys;
                let mut reported =
                    self.claims.walk(&chain, Thread::Session).filter_map(|(_, c)| match c.stake {
                        Stake::Holding { fence, notice: Notice::Reported } => {
                            let (key, _) = keys.get_index(c.key as usize)?;
                            Some(Grant { key: key.clone(), fence, asked: c.asked })
                        }
                        _ => None,
                    });
                let granted = reported.next();
                let more = reported.next().is_some();
                match self.observations.report(sid) {
                    Some((observed, more_observed)) => {
                        SessionReply::AliveObserved { ttl, granted, more: more || more_observed, observed }
                    }
                    None => SessionReply::Alive { ttl, granted, more },
                }
            }
            SessionOp::Acquire { key, wait } => {
                self.acquire_with(now, sid, request.seq, newest, key, *wait, 1, None)
            }
            SessionOp::AcquireWithValue { key, wait, value } => {
                self.acquire_with(now, sid, request.seq, newest, key, *wait, 1, Some(value))
            }
            SessionOp::Observe { key } => self.observe(sid, request.seq, key),
            SessionOp::Unobserve { key } => {
                self.observations.unobserve(sid, key, request.seq);
                SessionReply::Unobserved { key: key.clone() }
            }
            SessionOp::Release { key, fence } => self.release(sid, key, *fence),
            SessionOp::Close => {
                self.end_sessions(|s| s.id == sid);
                SessionReply::Closed
            }
            SessionOp::AcquireWithLimit { key, wait, limit } => {
                self.acquire_with(now, sid, request.seq, newest, key, *wait, *limit, None)
            }
        }
    }

    /// The time from [`poll_timeout`](Self::poll_timeout) came: expire what is due and hand
    /// its keys on. Early or spurious calls are harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        let before = self.sessions.len();
        self.expire(now);
        self.note_changes(self.sessions.len() < before);
    }

    /// Re-arms every session as of `now`, as after a restart whose clock has a new origin: a
    /// session acknowledged just before the crash must not lose its keys early.
    pub fn recover(&mut self, now: Instant) {
        for s in self.sessions.iter_mut() {
            s.expires_at = now + s.ttl;
        }
        #[cfg(feature = "fault-injection")]
        if self.limits.fault == SessionFault::RecoverForgetsFences {
            for (_, r) in self.keys.iter_mut().filter(|(_, r)| r.holders.len == 0 && r.external.is_none()) {
                r.last_fence = Fence::NONE;
            }
        }
    }

    /// Holds `key` for another protocol that shares this authority's key namespace (the
    /// built-in server's v1 leases), as of `now`, until `hold` ends; returns the key's last
    /// fence, above which the other protocol's grant must be. Refused while a session holds
    /// the key, or, if `exclusive` (a new grant, not an extension of one), while sessions wait
    /// for it: they are first in line. Waiters queue behind the hold; it ends at its
    /// [`ExternalHold::Until`], or by [`set_external`](Self::set_external). A second hold of a
    /// held key keeps the later end of the two.
    ///
    /// An input like any other: log it, for replay to be exact.
    ///
    /// ```
    /// use leasehold_core::session::authority::{ExternalHold, ExternalRefusal};
    /// use leasehold_core::session::{SessionAuthority, SessionLimits};
    /// use leasehold_core::{parse_key, Duration, Fence, Instant};
    ///
    /// let mut a = SessionAuthority::<4, 4, 8>::new(SessionLimits::default());
    /// let key = parse_key("job").unwrap();
    /// let now = Instant::from_millis(0);
    /// assert_eq!(a.hold_external(now, &key, ExternalHold::Pending, true), Ok(Fence::NONE));
    /// // The other protocol granted fence 1, for 5 s.
    /// a.set_external(now, &key, Some(Instant::from_secs(5)), Fence(1));
    /// assert_eq!(a.external_hold(&key), Some(ExternalHold::Until(Instant::from_secs(5))));
    /// assert_eq!(a.poll_timeout(), Some(Instant::from_secs(5)));
    /// a.handle_timeout(Instant::from_secs(5));
    /// assert_eq!(a.external_hold(&key), None);
    /// assert_eq!(a.key(&key).unwrap().last_fence, Fence(1), "a session's next grant is fence 2");
    /// ```
    pub fn hold_external(
        &mut self,
        now: Instant,
        key: &Key,
        hold: ExternalHold,
        exclusive: bool,
    ) -> Result<Fence, ExternalRefusal> {
        let before = self.sessions.len();
        self.expire(now);
        self.note_changes(self.sessions.len() < before);
        let ki = self.key_index(key).ok_or(ExternalRefusal::Capacity)?;
        let Some((_, r)) = self.keys.get_index(ki as usize) else { return Err(ExternalRefusal::Capacity) };
        let busy = r.holders.len > 0 || (exclusive && r.waiters.len > 0);
        #[cfg(feature = "fault-injection")]
        let busy = busy && self.limits.fault != SessionFault::ExternalOverSessions;
        if busy {
            return Err(ExternalRefusal::Busy { retry_after: self.first_slot_free(r, now) - now });
        }
        let merged = match (r.external, hold) {
            (Some(ExternalHold::Pending), _) | (_, ExternalHold::Pending) => ExternalHold::Pending,
            (Some(ExternalHold::Until(a)), ExternalHold::Until(b)) => ExternalHold::Until(a.max(b)),
            (None, h) => h,
        };
        let last_fence = r.last_fence;
        #[cfg(feature = "fault-injection")]
        let last_fence =
            if self.limits.fault == SessionFault::ExternalBelowFloor { Fence::NONE } else { last_fence };
        if let Some((_, r)) = self.keys.get_index_mut(ki as usize) {
            r.external = Some(merged);
        }
        if let ExternalHold::Until(t) = merged {
            self.next_external = Some(self.next_external.map_or(t, |n| n.min(t)));
        }
        Ok(last_fence)
    }

    /// What the other protocol decided for `key` (see [`hold_external`](Self::hold_external)):
    /// held until `until` (`None`, or a time not after `now`: free), with `fence` the highest
    /// fence it ever granted the key, which sessions' fences continue above. A key it frees
    /// goes to the head of its queue at once. The table being full, a new key is not recorded
    /// (no session could be granted it either).
    pub fn set_external(&mut self, now: Instant, key: &Key, until: Option<Instant>, fence: Fence) {
        #[cfg(feature = "fault-injection")]
        let until = match until {
            Some(t) if self.limits.fault == SessionFault::EndExternalEarly && t > now => {
                Some(now + Duration::from_micros((t - now).as_micros() * 3 / 4))
            }
            u => u,
        };
        let before = self.sessions.len();
        self.expire(now);
        let Some(ki) = self.key_index(key) else { return };
        let Some((_, r)) = self.keys.get_index_mut(ki as usize) else { return };
        r.last_fence = r.last_fence.max(fence);
        match until.filter(|t| *t > now) {
            Some(t) => {
                r.external = Some(ExternalHold::Until(t));
                self.next_external = Some(self.next_external.map_or(t, |n| n.min(t)));
            }
            None => {
                r.external = None;
                self.hand_off(ki);
            }
        }
        self.note_changes(self.sessions.len() < before);
    }

    /// Keys first seen from now on get fences above `floor` (it never goes down): for a store
    /// whose other protocol forgets idle keys' records and keeps one floor above all their
    /// fences instead.
    pub fn raise_fence_floor(&mut self, floor: Fence) {
        self.fence_floor = self.fence_floor.max(floor);
    }

    /// Applies a logged `input` as of `now`: what replaying a log calls for each entry. Its
    /// reply, for the inputs that have one; a hold for the other protocol is answered in the
    /// session protocol's terms, so that one reply type serves every input: `Granted` carries
    /// the key's last fence, `Busy` the refusal, `Rejected(Capacity)` a full table.
    pub fn apply(&mut self, now: Instant, input: &SessionInput) -> Option<SessionReply> {
        match input {
            SessionInput::Open { ttl, label, secret } => Some(self.open(now, *ttl, label, *secret)),
            SessionInput::Request(r) => Some(self.handle(now, r)),
            SessionInput::Timeout => {
                self.handle_timeout(now);
                None
            }
            SessionInput::Recover => {
                self.recover(now);
                None
            }
            SessionInput::HoldExternal { key, hold, exclusive } => {
                Some(match self.hold_external(now, key, *hold, *exclusive) {
                    Ok(fence) => SessionReply::Granted { key: key.clone(), fence },
                    Err(ExternalRefusal::Busy { retry_after }) => {
                        SessionReply::Busy { key: key.clone(), expires_in: retry_after }
                    }
                    Err(ExternalRefusal::Capacity) => SessionReply::Rejected(Reject::Capacity),
                })
            }
            SessionInput::SetExternal { key, until, fence } => {
                self.set_external(now, key, *until, *fence);
                None
            }
            SessionInput::FenceFloor { floor } => {
                self.raise_fence_floor(*floor);
                None
            }
        }
    }

    // ----- outputs -----

    /// When [`handle_timeout`](Self::handle_timeout) must next be called: the next session
    /// expiry.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let next = self.sessions.iter().map(|s| s.expires_at).chain(self.next_external).min();
        #[cfg(feature = "fault-injection")]
        if self.limits.fault == SessionFault::HandOffEarly {
            let early = self.early_hand_offs().min();
            return next.into_iter().chain(early).min();
        }
        next
    }

    // ----- getters -----

    /// The id the next session will get: persist it with the keys' fences.
    pub fn next_session(&self) -> SessionId {
        SessionId(self.next_id)
    }

    /// A live session's public status.
    pub fn session(&self, id: SessionId) -> Option<SessionStatus> {
        self.sessions.iter().find(|s| s.id == id).map(Self::status_of)
    }

    /// Every live session's public status.
    pub fn sessions(&self) -> impl Iterator<Item = SessionStatus> + '_ {
        self.sessions.iter().map(Self::status_of)
    }

    /// A key's status, if the authority has seen it.
    pub fn key(&self, key: &Key) -> Option<KeyStatus> {
        self.keys.get(key).map(|r| self.key_status_of(r))
    }

    /// Every key's status.
    pub fn keys(&self) -> impl Iterator<Item = (&Key, KeyStatus)> + '_ {
        self.keys.iter().map(|(k, r)| (k, self.key_status_of(r)))
    }

    /// The sessions holding `key`, oldest grant first.
    pub fn holders(&self, key: &Key) -> impl Iterator<Item = KeyHolder> + '_ {
        self.keys.get(key).into_iter().flat_map(|r| {
            self.claims.walk(&r.holders, Thread::Key).filter_map(|(_, c)| match c.stake {
                Stake::Holding { fence, .. } => Some(KeyHolder { session: c.session, fence }),
                Stake::Waiting => None,
            })
        })
    }

    /// The sessions waiting for `key`, head first.
    pub fn waiters(&self, key: &Key) -> impl Iterator<Item = SessionId> + '_ {
        self.keys
            .get(key)
            .into_iter()
            .flat_map(|r| self.claims.walk(&r.waiters, Thread::Key).map(|(_, c)| c.session))
    }

    /// How `key` is held under another protocol, if it is (see
    /// [`hold_external`](Self::hold_external)).
    pub fn external_hold(&self, key: &Key) -> Option<ExternalHold> {
        self.keys.get(key).and_then(|r| r.external)
    }

    /// Every key held under another protocol, with its hold.
    pub fn external_holds(&self) -> impl Iterator<Item = (&Key, ExternalHold)> + '_ {
        self.keys.iter().filter_map(|(k, r)| Some((k, r.external?)))
    }

    /// The label of `key`'s (oldest) holder: what a status endpoint shows as "held by".
    pub fn holder_label(&self, key: &Key) -> Option<&Label> {
        let h = self.holders(key).next()?;
        self.sessions.iter().find(|s| s.id == h.session).map(|s| &s.label)
    }

    /// Whether `session` has a grant it has not been told of: a transport that holds
    /// keepalives open (long polling) answers this session's at once.
    pub fn has_news(&self, session: SessionId) -> bool {
        let Some(s) = self.sessions.iter().find(|s| s.id == session) else { return false };
        self.claims
            .walk(&s.claims, Thread::Session)
            .any(|(_, c)| matches!(c.stake, Stake::Holding { notice: Notice::Reported, .. }))
    }

    /// Every session that [`has_news`](Self::has_news), in one pass over the claims (a session
    /// may appear once per key it has news of): for a transport holding many keepalives, so
    /// that finding which to answer costs one pass, not one per held keepalive.
    pub fn sessions_with_news(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.claims.used().filter_map(|(_, c)| match c.stake {
            Stake::Holding { notice: Notice::Reported, .. } => Some(c.session),
            _ => None,
        })
    }

    /// Whether a keepalive of `session` that a transport holds open (long polling) is to be
    /// handled now rather than at its hold's end: the session has a grant it has not been told
    /// of ([`has_news`](Self::has_news)), an observed key with a change to report, or is gone.
    /// `op` is the keepalive's: a [`SessionOp::KeepAliveSeen`] counts its acknowledgement, so
    /// a keepalive acknowledging the latest change is held for the next. The hold's end is the
    /// transport's to time. Costs a pass over the session's claims and the observers; a
    /// transport holding many keepalives gathers the facts for all of them in one pass and
    /// asks [`keepalive_due_given`](Self::keepalive_due_given).
    pub fn keepalive_due(&self, session: SessionId, op: &SessionOp) -> bool {
        let behind = self.observers_behind().filter(|(s, ..)| *s == session).map(|(_, k, a, l)| (k, a, l));
        self.keepalive_due_given(self.session(session).is_some(), self.has_news(session), behind, op)
    }

    /// The rule of [`keepalive_due`](Self::keepalive_due) on facts gathered beforehand: `live`,
    /// whether the session is alive; `news`, whether it [`has_news`](Self::has_news); `behind`,
    /// its entries of [`observers_behind`](Self::observers_behind) (key, change acknowledged,
    /// latest change).
    pub fn keepalive_due_given<'k>(
        &self,
        live: bool,
        news: bool,
        behind: impl IntoIterator<Item = (&'k Key, u64, u64)>,
        op: &SessionOp,
    ) -> bool {
        #[cfg(feature = "fault-injection")]
        let news = news && self.limits.fault != SessionFault::HoldPushedGrants;
        if !live || news {
            return true;
        }
        let ack = match op {
            SessionOp::KeepAliveSeen { key, change } => Some((key, *change)),
            _ => None,
        };
        behind.into_iter().any(|(key, acked, latest)| match ack {
            Some((k, change)) if k == key => acked.max(change) < latest,
            _ => acked < latest,
        })
    }

    /// The value `session` acquired (or queued for) `key` with; empty if none.
    pub fn value(&self, session: SessionId, key: &Key) -> Value {
        self.observations.value(session, key)
    }

    /// Whether `session` observes `key`.
    pub fn observes(&self, session: SessionId, key: &Key) -> bool {
        self.observations.observes(session, key)
    }

    /// The number of the latest change of `key`'s holder (see [`Observed::change`](super::wire::Observed::change)),
    /// if anyone observes it.
    pub fn latest_change(&self, key: &Key) -> Option<u64> {
        self.observations.latest(key)
    }

    /// Every observer with changes of its key it has not acknowledged: its session, the key,
    /// the highest change it acknowledged, and the key's latest change. A transport holding a
    /// keepalive open answers it at once if its session is here, unless the keepalive itself
    /// ([`SessionOp::KeepAliveSeen`]) acknowledges up to the latest.
    pub fn observers_behind(&self) -> impl Iterator<Item = (SessionId, &Key, u64, u64)> + '_ {
        self.observations.behind()
    }

    // ----- internals -----

    /// Whether `session` holds or waits for `key`.
    fn involved(&self, session: SessionId, key: &Key) -> bool {
        self.keys.get_index_of(key).is_some_and(|ki| self.find_claim(session, ki as u32).is_some())
    }

    /// [`acquire`](Self::acquire), and a value for the holding or wait it starts (`None`: no
    /// value, which also forgets one of an earlier holding).
    #[allow(clippy::too_many_arguments)]
    fn acquire_with(
        &mut self,
        now: Instant,
        sid: SessionId,
        seq: Seq,
        newest: bool,
        key: &Key,
        wait: bool,
        limit: u16,
        value: Option<&Value>,
    ) -> SessionReply {
        let before = self.involved(sid, key);
        if !before && value.is_some_and(|v| !v.is_empty()) && parse_key(key).is_ok() {
            // Room for the value first, so that a grant is never made without it.
            if self.observations.values_full() {
                self.drop_unused_values();
            }
            if self.observations.set_value(sid, key, value).is_err() {
                return SessionReply::Rejected(Reject::Capacity);
            }
        }
        let reply = self.acquire(now, sid, seq, newest, key, wait, limit);
        if !before && (value.is_none_or(|v| v.is_empty()) || !self.involved(sid, key)) {
            let _ = self.observations.set_value(sid, key, None);
        }
        reply
    }

    /// Forgets the values of holdings and waits that ended.
    fn drop_unused_values(&mut self) {
        let mut i = 0;
        while let Some((session, key)) = self.observations.value_at(i) {
            if self.involved(session, &key) {
                i += 1;
            } else {
                self.observations.remove_value(i);
            }
        }
    }

    fn observe(&mut self, sid: SessionId, seq: Seq, key: &Key) -> SessionReply {
        if parse_key(key).is_err() {
            return SessionReply::Rejected(Reject::InvalidKey);
        }
        let holder = self.key(key).and_then(|k| k.holder);
        let label = holder.and_then(|h| self.sessions.iter().find(|s| s.id == h.session)).map(|s| &s.label);
        let current: Current<'_> = match (holder, label) {
            (Some(h), Some(label)) => Some((h.session, label, h.fence)),
            _ => None,
        };
        match self.observations.observe(sid, key, seq, current) {
            Ok(()) => SessionReply::Observing { key: key.clone() },
            Err(_) => SessionReply::Rejected(Reject::Capacity),
        }
    }

    /// Tells the observations who holds each observed key now; with `ended`, some session
    /// ended, and its observers and values are forgotten.
    fn note_changes(&mut self, ended: bool) {
        let sessions = &self.sessions;
        if ended {
            // Sessions are kept in the order of their ids (pushed with a counter, removed in place).
            self.observations.forget(|id| sessions.binary_search_by_key(&id, |s| s.id).is_ok());
        }
        if !self.observations.any() {
            return;
        }
        #[cfg(feature = "fault-injection")]
        let record_free = self.limits.fault != SessionFault::HideFreeChanges;
        #[cfg(not(feature = "fault-injection"))]
        let record_free = true;
        let (keys, claims) = (&self.keys, &self.claims);
        // Observers follow a key's oldest grant: a lease's holder, a semaphore's longest-held
        // slot.
        let current = |key: &Key| -> Current<'_> {
            let record = keys.get(key)?;
            let (session, fence) =
                claims.walk(&record.holders, Thread::Key).find_map(|(_, c)| match c.stake {
                    Stake::Holding { fence, .. } => Some((c.session, fence)),
                    Stake::Waiting => None,
                })?;
            let s = sessions.iter().find(|s| s.id == session)?;
            Some((session, &s.label, fence))
        };
        self.observations.note(current, record_free);
    }

    fn try_open(
        &mut self,
        now: Instant,
        ttl: Duration,
        label: &Label,
        secret: Secret,
    ) -> Result<SessionId, OpenError> {
        self.expire(now);
        if ttl < self.limits.min_ttl || ttl > self.limits.max_ttl {
            return Err(OpenError::InvalidTtl);
        }
        let id = SessionId(self.next_id);
        let record = SessionRecord {
            id,
            secret,
            label: label.clone(),
            ttl,
            expires_at: now + ttl,
            window: ReplayWindow::default(),
            claims: Chain::NONE,
        };
        self.sessions.push(record).map_err(|_| OpenError::Capacity)?;
        self.next_id += 1;
        Ok(id)
    }

    /// The claim of session `sid` on the key at index `ki`, found by walking the shorter of
    /// the session's claims and the key's holders and waiters.
    fn find_claim(&self, sid: SessionId, ki: u32) -> Option<ClaimId> {
        let s = self.sessions.iter().find(|s| s.id == sid)?;
        let (_, r) = self.keys.get_index(ki as usize)?;
        if s.claims.len <= r.holders.len + r.waiters.len {
            self.claims.walk(&s.claims, Thread::Session).find(|(_, c)| c.key == ki).map(|(id, _)| id)
        } else {
            let of_session = |(id, c): (ClaimId, &Claim)| (c.session == sid).then_some(id);
            let held = self.claims.walk(&r.holders, Thread::Key).find_map(of_session);
            held.or_else(|| self.claims.walk(&r.waiters, Thread::Key).find_map(of_session))
        }
    }

    /// Stores a new claim and links it at the back of its key's `holders` or `waiters` and of
    /// its session's claims. `false` when the pool is full.
    fn add_claim(&mut self, claim: Claim) -> bool {
        let Some(id) = self.claims.insert(claim) else { return false };
        let Some((_, r)) = self.keys.get_index_mut(claim.key as usize) else { return false };
        let chain = match claim.stake {
            Stake::Holding { .. } => &mut r.holders,
            Stake::Waiting => &mut r.waiters,
        };
        self.claims.push_back(chain, id, Thread::Key);
        if let Some(s) = self.sessions.iter_mut().find(|s| s.id == claim.session) {
            self.claims.push_back(&mut s.claims, id, Thread::Session);
        }
        true
    }

    /// Unlinks a claim from its key's chain and its session's (if the session is still in
    /// the table) and frees its cell. Returns it.
    fn drop_claim(&mut self, id: ClaimId) -> Option<Claim> {
        let claim = *self.claims.get(id)?;
        if let Some((_, r)) = self.keys.get_index_mut(claim.key as usize) {
            let chain = match claim.stake {
                Stake::Holding { .. } => &mut r.holders,
                Stake::Waiting => &mut r.waiters,
            };
            self.claims.unlink(chain, id, Thread::Key);
        }
        if let Some(s) = self.sessions.iter_mut().find(|s| s.id == claim.session) {
            self.claims.unlink(&mut s.claims, id, Thread::Session);
        }
        self.claims.remove(id);
        Some(claim)
    }

    #[allow(clippy::too_many_arguments)]
    fn acquire(
        &mut self,
        now: Instant,
        sid: SessionId,
        seq: Seq,
        newest: bool,
        key: &Key,
        wait: bool,
        limit: u16,
    ) -> SessionReply {
        if parse_key(key).is_err() {
            return SessionReply::Rejected(Reject::InvalidKey);
        }
        if limit == 0 {
            return SessionReply::Rejected(Reject::Malformed);
        }
        let Some(ki) = self.key_index(key) else {
            return SessionReply::Rejected(Reject::Capacity);
        };
        let key = key.clone();
        let Some((_, r)) = self.keys.get_index(ki as usize) else {
            return SessionReply::Rejected(Reject::Capacity);
        };
        #[cfg(feature = "fault-injection")]
        let checks_limit = self.limits.fault != SessionFault::IgnoreLimitMismatch;
        #[cfg(not(feature = "fault-injection"))]
        let checks_limit = true;
        if checks_limit && r.is_claimed() && r.limit != limit {
            return SessionReply::Rejected(Reject::LimitMismatch);
        }
        // The holder's newest request is answered to a reply it awaits; a reordered one is
        // not, so a grant it makes must be reported too.
        let notice = if newest { Notice::Confirmed } else { Notice::Reported };
        if let Some(id) = self.find_claim(sid, ki) {
            let position = self.claims.walk(&r.waiters, Thread::Key).position(|(i, _)| i == id);
            let Some(c) = self.claims.get_mut(id) else { return SessionReply::Rejected(Reject::Capacity) };
            // The holder's newest acquire of the key owns the claim: its grant is reported as
            // asked by it. Left at an older seq, a holder that gave up that acquisition (a
            // confirmation overtaken by its release, or a held-up acquire landing after a
            // stop, queues the session again) and then asked anew would take the grant as
            // stale and ignore it, and the key would stay with a session that never uses it.
            // The highest seq, not the last to land: the newest acquire may land before an
            // older one, or after a later keepalive (then it is not the newest request).
            c.asked = c.asked.max(seq);
            return match c.stake {
                Stake::Holding { fence, ref mut notice } => {
                    if newest {
                        *notice = Notice::Confirmed;
                    }
                    SessionReply::Granted { key, fence }
                }
                Stake::Waiting => {
                    SessionReply::Queued { key, position: queue_position(position.unwrap_or(0)) }
                }
            };
        }
        // A free slot goes to a newcomer only if nobody is queued before it (a queue can stand
        // beside a free slot only while the fence counter is exhausted).
        // A key held under the other protocol has no free slot.
        let (free_slot, queue, last_fence) =
            (r.holders.len < self.admits(limit) && r.external.is_none(), r.waiters.len, r.last_fence);
        if free_slot && queue == 0 {
            let Some(fence) = last_fence.next() else {
                return SessionReply::Rejected(Reject::FenceExhausted);
            };
            let stake = Stake::Holding { fence, notice };
            if !self.add_claim(Claim::new(sid, ki, seq, stake)) {
                return SessionReply::Rejected(Reject::Capacity);
            }
            if let Some((_, r)) = self.keys.get_index_mut(ki as usize) {
                r.last_fence = fence;
                r.limit = limit;
            }
            return SessionReply::Granted { key, fence };
        }
        if wait {
            if !self.add_claim(Claim::new(sid, ki, seq, Stake::Waiting)) {
                return SessionReply::Rejected(Reject::Capacity);
            }
            if let Some((_, r)) = self.keys.get_index_mut(ki as usize) {
                r.limit = limit;
            }
            return SessionReply::Queued { key, position: queue_position(queue as usize) };
        }
        SessionReply::Busy { key, expires_in: self.first_slot_free(r, now) - now }
    }

    /// When `r`'s first slot comes free at the latest: the soonest end of its holders'
    /// sessions, or of its hold by the other protocol.
    fn first_slot_free(&self, r: &KeyRecord, now: Instant) -> Instant {
        self.claims
            .walk(&r.holders, Thread::Key)
            .filter_map(|(_, c)| self.sessions.iter().find(|s| s.id == c.session).map(|s| s.expires_at))
            .chain(external_until(r.external, now))
            .min()
            .unwrap_or(now)
    }

    fn release(&mut self, sid: SessionId, key: &Key, fence: Fence) -> SessionReply {
        let key = key.clone();
        let Some(ki) = self.keys.get_index_of(&key).and_then(|i| u32::try_from(i).ok()) else {
            return match fence {
                Fence::NONE => SessionReply::Released { key },
                _ => SessionReply::NotHolder { key },
            };
        };
        let claim = self.find_claim(sid, ki);
        match claim.and_then(|id| Some((id, self.claims.get(id)?.stake))) {
            // "Stop waiting" never releases a grant: a late copy of it, still unseen in the
            // window, must not free a key granted since. The holder learns the fence instead.
            Some((_, Stake::Holding { fence: held, .. })) if fence == Fence::NONE => {
                SessionReply::Granted { key, fence: held }
            }
            Some((id, Stake::Holding { fence: held, .. })) if held == fence => {
                self.drop_claim(id);
                self.hand_off(ki);
                SessionReply::Released { key }
            }
            Some((id, Stake::Waiting)) if fence == Fence::NONE => {
                self.drop_claim(id);
                SessionReply::Released { key }
            }
            None if fence == Fence::NONE => SessionReply::Released { key },
            _ => SessionReply::NotHolder { key },
        }
    }

    /// How many holders a key of `limit` admits: `limit`, unless a bug is planted.
    fn admits(&self, limit: u16) -> u32 {
        #[cfg(feature = "fault-injection")]
        if self.limits.fault == SessionFault::OverAdmit && limit >= 2 {
            return u32::from(limit) + 1;
        }
        u32::from(limit)
    }

    /// Grants every free slot of the key at index `ki` to the head of its queue in turn.
    fn hand_off(&mut self, ki: u32) {
        let Some(limit) = self.keys.get_index(ki as usize).map(|(_, r)| self.admits(r.limit)) else { return };
        let Some((_, r)) = self.keys.get_index_mut(ki as usize) else { return };
        if r.external.is_some() {
            return;
        }
        while r.holders.len < limit {
            let Some(id) = r.waiters.head else { return };
            // An exhausted counter leaves the waiters queued: no fence may repeat.
            let Some(fence) = r.last_fence.next() else { return };
            self.claims.unlink(&mut r.waiters, id, Thread::Key);
            let Some(c) = self.claims.get_mut(id) else { return };
            c.stake = Stake::Holding { fence, notice: Notice::Reported };
            r.last_fence = fence;
            self.claims.push_back(&mut r.holders, id, Thread::Key);
        }
    }

    /// Ends every session whose time is up, then hands their keys on. All expired sessions
    /// leave the queues before any key moves, so no key goes to a session that expired at
    /// the same instant.
    fn expire(&mut self, now: Instant) {
        #[cfg(feature = "fault-injection")]
        if self.limits.fault == SessionFault::HandOffEarly {
            self.hand_off_early(now);
        }
        if self.sessions.iter().any(|s| s.expires_at <= now) {
            self.end_sessions(|s| s.expires_at <= now);
        }
        // After the sessions: a waiter whose session expired at the same instant leaves the
        // queue before the key moves.
        if self.next_external.is_some_and(|t| t <= now) {
            self.end_external(now);
        }
    }

    /// Ends every external hold that is up and hands its key to its queue; re-computes the
    /// next external expiry.
    fn end_external(&mut self, now: Instant) {
        let mut next: Option<Instant> = None;
        for ki in 0..self.keys.len() {
            let Some((_, r)) = self.keys.get_index_mut(ki) else { break };
            match r.external {
                Some(ExternalHold::Until(t)) if t <= now => {
                    r.external = None;
                    self.hand_off(ki as u32);
                }
                Some(ExternalHold::Until(t)) => next = Some(next.map_or(t, |n| n.min(t))),
                _ => {}
            }
        }
        self.next_external = next;
    }

    /// The index of `key`, which is added (fences above the floor) if it is new; `None` if
    /// the table is full.
    fn key_index(&mut self, key: &Key) -> Option<u32> {
        if !self.keys.contains_key(key)
            && self.keys.insert(key.clone(), KeyRecord::fresh(self.fence_floor)).is_err()
        {
            return None;
        }
        self.keys.get_index_of(key).and_then(|i| u32::try_from(i).ok())
    }

    /// Ends the sessions `ending` picks: first every one of them leaves every queue, then
    /// their grants are freed and handed to the heads of the queues. Walks only their claims.
    fn end_sessions(&mut self, ending: impl Fn(&SessionRecord) -> bool) {
        #[cfg(feature = "fault-injection")]
        let keep_waiters = self.limits.fault == SessionFault::KeepExpiredWaiters;
        #[cfg(not(feature = "fault-injection"))]
        let keep_waiters = false;
        for waits in [true, false] {
            if waits && keep_waiters {
                continue;
            }
            for i in 0..self.sessions.len() {
                let Some(s) = self.sessions.get(i).filter(|s| ending(s)) else { continue };
                let mut cur = s.claims.head;
                while let Some(id) = cur {
                    let Some(c) = self.claims.get(id).copied() else { break };
                    cur = c.by_session.next;
                    let holding = matches!(c.stake, Stake::Holding { .. });
                    if holding != waits {
                        self.drop_claim(id);
                        if holding {
                            self.hand_off(c.key);
                        }
                    }
                }
            }
        }
        self.sessions.retain(|s| !ending(s));
    }

    #[cfg(feature = "fault-injection")]
    fn early_hand_offs(&self) -> impl Iterator<Item = Instant> + '_ {
        self.claims.used().filter_map(|(_, c)| {
            let Stake::Holding { .. } = c.stake else { return None };
            let (_, r) = self.keys.get_index(c.key as usize)?;
            if r.waiters.len == 0 {
                return None;
            }
            let s = self.sessions.iter().find(|s| s.id == c.session)?;
            Some(s.expires_at.saturating_sub(s.ttl.mul_div_floor(1, 4)))
        })
    }

    #[cfg(feature = "fault-injection")]
    fn hand_off_early(&mut self, now: Instant) {
        for id in 0..self.claims.cells.len() as ClaimId {
            let Some(c) = self.claims.get(id).copied() else { continue };
            let Stake::Holding { .. } = c.stake else { continue };
            let Some((_, r)) = self.keys.get_index(c.key as usize) else { continue };
            let Some(s) = self.sessions.iter().find(|s| s.id == c.session) else { continue };
            if r.waiters.len > 0 && now >= s.expires_at.saturating_sub(s.ttl.mul_div_floor(1, 4)) {
                self.drop_claim(id);
                self.hand_off(c.key);
            }
        }
    }

    fn status_of(s: &SessionRecord) -> SessionStatus {
        SessionStatus { id: s.id, label: s.label.clone(), ttl: s.ttl, expires_at: s.expires_at }
    }

    fn key_status_of(&self, r: &KeyRecord) -> KeyStatus {
        let holder = self.claims.walk(&r.holders, Thread::Key).find_map(|(_, c)| match c.stake {
            Stake::Holding { fence, .. } => Some(KeyHolder { session: c.session, fence }),
            Stake::Waiting => None,
        });
        KeyStatus {
            holder,
            holders: r.holders.len as usize,
            limit: r.limit,
            last_fence: r.last_fence,
            waiting: r.waiters.len as usize,
        }
    }
}

impl Claim {
    const fn new(session: SessionId, key: u32, asked: Seq, stake: Stake) -> Claim {
        Claim {
            session,
            key,
            asked,
            stake,
            by_key: Links { prev: None, next: None },
            by_session: Links { prev: None, next: None },
        }
    }
}

/// 1 for the head of the queue.
/// When an external hold ends, as far as a `Busy` can say: a pending one at once (it lasts
/// only while the other protocol decides).
fn external_until(hold: Option<ExternalHold>, now: Instant) -> Option<Instant> {
    match hold? {
        ExternalHold::Pending => Some(now),
        ExternalHold::Until(t) => Some(t),
    }
}

fn queue_position(index: usize) -> u16 {
    u16::try_from(index + 1).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::wire::parse_label;
    extern crate std;

    const TTL: Duration = Duration::from_secs(10);
    type Table = SessionAuthority<4, 4, 3>;

    fn at(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }
    fn key(s: &str) -> Key {
        parse_key(s).unwrap()
    }
    fn secret(b: u8) -> Secret {
        Secret::from_bytes([b; 16])
    }

    /// A holder's view for the tests: its session, secret and next seq.
    struct Client {
        id: SessionId,
        secret: Secret,
        seq: u64,
    }

    impl Client {
        fn open(t: &mut Table, now: Instant, b: u8) -> Client {
            let SessionReply::Opened { session, .. } =
                t.open(now, TTL, &parse_label("host").unwrap(), secret(b))
            else {
                panic!("not opened")
            };
            Client { id: session, secret: secret(b), seq: 1 }
        }
        fn req(&mut self, op: SessionOp) -> SessionRequest {
            self.seq += 1;
            SessionRequest { session: self.id, secret: self.secret, seq: Seq(self.seq), op }
        }
        fn send(&mut self, t: &mut Table, now: Instant, op: SessionOp) -> SessionReply {
            let r = self.req(op);
            t.handle(now, &r)
        }
    }

    fn acquire(k: &str, wait: bool) -> SessionOp {
        SessionOp::Acquire { key: key(k), wait }
    }
    fn release(k: &str, fence: u64) -> SessionOp {
        SessionOp::Release { key: key(k), fence: Fence(fence) }
    }
    fn granted(k: &str, fence: u64) -> SessionReply {
        SessionReply::Granted { key: key(k), fence: Fence(fence) }
    }

    #[test]
    fn one_keepalive_renews_every_key_and_expiry_frees_them_together() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(0), 1);
        assert_eq!(a.send(&mut t, at(1), acquire("x", false)), granted("x", 1));
        assert_eq!(a.send(&mut t, at(2), acquire("y", false)), granted("y", 1));
        assert_eq!(t.poll_timeout(), Some(at(10_000)));
        assert_eq!(
            a.send(&mut t, at(6_000), SessionOp::KeepAlive),
            SessionReply::Alive { ttl: TTL, granted: None, more: false }
        );
        assert_eq!(t.poll_timeout(), Some(at(16_000)));
        t.handle_timeout(at(15_999));
        assert!(t.key(&key("x")).unwrap().holder.is_some(), "renewed with the session");
        t.handle_timeout(at(16_000));
        assert_eq!(t.key(&key("x")).unwrap().holder, None);
        assert_eq!(t.key(&key("y")).unwrap().holder, None);
        assert_eq!(t.poll_timeout(), None);
        assert_eq!(a.send(&mut t, at(16_001), SessionOp::KeepAlive), SessionReply::Expired);
        // The fence counter survives the holder.
        let mut b = Client::open(&mut t, at(16_002), 2);
        assert_eq!(b.send(&mut t, at(16_003), acquire("x", false)), granted("x", 2));
    }

    #[test]
    fn waiters_are_granted_fifo_and_told_in_their_next_keepalive() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(0), 1);
        let mut b = Client::open(&mut t, at(0), 2);
        let mut c = Client::open(&mut t, at(0), 3);
        a.send(&mut t, at(1), acquire("x", true));
        assert_eq!(
            b.send(&mut t, at(2), acquire("x", true)),
            SessionReply::Queued { key: key("x"), position: 1 }
        );
        assert_eq!(
            c.send(&mut t, at(3), acquire("x", true)),
            SessionReply::Queued { key: key("x"), position: 2 }
        );
        // Asking again keeps the place, and the newest acquire owns the wait: the grant is
        // reported as asked by it, so a holder that asked anew does not take it as stale.
        assert_eq!(
            b.send(&mut t, at(4), acquire("x", true)),
            SessionReply::Queued { key: key("x"), position: 1 }
        );
        let c_asked = Seq(c.seq + 1);
        assert_eq!(
            c.send(&mut t, at(4), acquire("x", false)),
            SessionReply::Queued { key: key("x"), position: 2 }
        );
        // b gives up its place; on release the key goes straight to c.
        assert_eq!(b.send(&mut t, at(5), release("x", 0)), SessionReply::Released { key: key("x") });
        assert_eq!(a.send(&mut t, at(6), release("x", 1)), SessionReply::Released { key: key("x") });
        assert_eq!(t.key(&key("x")).unwrap().holder, Some(KeyHolder { session: c.id, fence: Fence(2) }));
        assert!(t.has_news(c.id));
        assert_eq!(t.sessions_with_news().collect::<Vec<_, 4>>().as_slice(), &[c.id]);
        let pushed = Grant { key: key("x"), fence: Fence(2), asked: c_asked };
        let alive = SessionReply::Alive { ttl: TTL, granted: Some(pushed), more: false };
        assert_eq!(c.send(&mut t, at(7), SessionOp::KeepAlive), alive);
        // Reported until confirmed by a fresh acquire, which returns the same fence.
        assert_eq!(c.send(&mut t, at(8), SessionOp::KeepAlive), alive);
        assert_eq!(c.send(&mut t, at(9), acquire("x", true)), granted("x", 2));
        assert!(!t.has_news(c.id));
        assert_eq!(
            c.send(&mut t, at(10), SessionOp::KeepAlive),
            SessionReply::Alive { ttl: TTL, granted: None, more: false }
        );
    }

    #[test]
    fn a_held_keepalive_is_due_when_its_session_has_news_or_is_gone() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(0), 1);
        let mut b = Client::open(&mut t, at(0), 2);
        let mut o = Client::open(&mut t, at(0), 3);
        a.send(&mut t, at(1), acquire("x", false));
        b.send(&mut t, at(2), acquire("x", true));
        let observing = SessionReply::Observing { key: key("x") };
        assert_eq!(o.send(&mut t, at(3), SessionOp::Observe { key: key("x") }), observing);
        assert!(!t.keepalive_due(b.id, &SessionOp::KeepAlive), "nothing to tell the waiter yet");
        // The observer is told the holder it observed first.
        let first = match o.send(&mut t, at(4), SessionOp::KeepAlive) {
            SessionReply::AliveObserved { observed, .. } => observed.change,
            r => panic!("{r:?}"),
        };
        let seen = SessionOp::KeepAliveSeen { key: key("x"), change: first };
        assert!(t.keepalive_due(o.id, &SessionOp::KeepAlive), "not acknowledged yet");
        assert!(!t.keepalive_due(o.id, &seen), "a keepalive acknowledging the latest waits for the next");
        a.send(&mut t, at(5), release("x", 1));
        assert!(t.keepalive_due(b.id, &SessionOp::KeepAlive), "b has a grant to be pushed");
        assert!(t.keepalive_due(o.id, &seen), "the observer has a change to hear of");
        assert!(!t.keepalive_due(a.id, &SessionOp::KeepAlive), "a has no news");
        a.send(&mut t, at(6), SessionOp::Close);
        assert!(t.keepalive_due(a.id, &SessionOp::KeepAlive), "a's session is gone");
        #[cfg(feature = "fault-injection")]
        {
            t.set_limits(SessionLimits { fault: SessionFault::HoldPushedGrants, ..SessionLimits::default() });
            assert!(!t.keepalive_due(b.id, &SessionOp::KeepAlive), "the planted bug holds the push back");
        }
    }

    #[test]
    fn busy_says_how_long_and_queues_are_bounded() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(0), 1);
        let mut b = Client::open(&mut t, at(0), 2);
        let mut c = Client::open(&mut t, at(0), 3);
        let mut d = Client::open(&mut t, at(0), 4);
        a.send(&mut t, at(0), acquire("x", false));
        assert_eq!(
            b.send(&mut t, at(4_000), acquire("x", false)),
            SessionReply::Busy { key: key("x"), expires_in: Duration::from_secs(6) }
        );
        assert!(matches!(b.send(&mut t, at(4_000), acquire("x", true)), SessionReply::Queued { .. }));
        assert!(matches!(c.send(&mut t, at(4_000), acquire("x", true)), SessionReply::Queued { .. }));
        assert_eq!(d.send(&mut t, at(4_000), acquire("x", true)), SessionReply::Rejected(Reject::Capacity));
        assert_eq!(t.open(at(0), TTL, &Label::new(), secret(5)), SessionReply::Rejected(Reject::Capacity));
    }

    #[test]
    fn an_expired_session_leaves_every_queue_before_any_key_moves() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(0), 1);
        let mut b = Client::open(&mut t, at(0), 2);
        let mut c = Client::open(&mut t, at(5_000), 3);
        a.send(&mut t, at(0), acquire("x", false));
        b.send(&mut t, at(0), acquire("x", true));
        c.send(&mut t, at(5_000), acquire("x", true));
        // a and b expire at the same instant: the key skips b and goes to c.
        t.handle_timeout(at(10_000));
        assert_eq!(t.key(&key("x")).unwrap().holder, Some(KeyHolder { session: c.id, fence: Fence(2) }));
        assert_eq!(t.waiters(&key("x")).count(), 0);
        assert_eq!(t.sessions().map(|s| s.id).collect::<Vec<_, 4>>().as_slice(), &[c.id]);
    }

    #[test]
    fn close_frees_every_key_and_hands_them_on() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(0), 1);
        let mut b = Client::open(&mut t, at(0), 2);
        a.send(&mut t, at(0), acquire("x", false));
        a.send(&mut t, at(0), acquire("y", false));
        b.send(&mut t, at(0), acquire("y", true));
        assert_eq!(a.send(&mut t, at(1), SessionOp::Close), SessionReply::Closed);
        assert_eq!(t.key(&key("x")).unwrap().holder, None);
        assert_eq!(t.key(&key("y")).unwrap().holder, Some(KeyHolder { session: b.id, fence: Fence(2) }));
        assert_eq!(a.send(&mut t, at(2), SessionOp::KeepAlive), SessionReply::Expired);
    }

    #[test]
    fn replays_and_forgeries_change_nothing() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(0), 1);
        let keepalive = a.req(SessionOp::KeepAlive);
        assert!(matches!(t.handle(at(1_000), &keepalive), SessionReply::Alive { .. }));
        let rel = a.req(release("x", 1));
        let acq = a.req(acquire("x", false));
        // Reordered on the way: the newer acquire first, then the release (within the window).
        assert_eq!(t.handle(at(1_001), &acq), granted("x", 1));
        assert_eq!(t.handle(at(1_002), &rel), SessionReply::Released { key: key("x") });
        let before = t.clone();
        let snapshot = |t: &Table| (t.sessions().collect::<Vec<_, 4>>(), t.key(&key("x")), t.next_session());
        // The same frames again, later: ignored.
        assert_eq!(t.handle(at(5_000), &keepalive), SessionReply::Replayed);
        assert_eq!(t.handle(at(5_000), &acq), SessionReply::Replayed);
        assert_eq!(t.handle(at(5_000), &rel), SessionReply::Replayed);
        // Forged: right session, wrong secret.
        let mut forged = a.req(acquire("x", false));
        forged.secret = secret(9);
        assert_eq!(t.handle(at(5_000), &forged), SessionReply::Rejected(Reject::Unauthorized));
        assert_eq!(snapshot(&t), snapshot(&before));
        assert_eq!(t.session(a.id).unwrap().expires_at, at(11_000));
        // The forged frame did not burn its seq: the holder's own request with it succeeds.
        forged.secret = a.secret;
        assert_eq!(t.handle(at(5_001), &forged), granted("x", 2));
    }

    #[test]
    fn the_replay_window_slides() {
        let mut w = ReplayWindow::default();
        for s in [5, 3, 4, 70] {
            assert_ne!(w.check(Seq(s)), Freshness::Replayed, "{s}");
            w.mark(Seq(s));
        }
        assert_eq!(w.check(Seq(70)), Freshness::Replayed);
        assert_eq!(w.check(Seq(6)), Freshness::Replayed, "64 below the highest: too old to tell");
        assert_eq!(w.check(Seq(7)), Freshness::Reordered);
        assert_eq!(w.check(Seq(71)), Freshness::Newest);
        w.mark(Seq(1_000));
        assert_eq!(w.check(Seq(999)), Freshness::Reordered);
        assert_eq!(w.check(Seq(70)), Freshness::Replayed);
    }

    #[test]
    fn a_reordered_acquire_is_reported_and_a_stop_waiting_never_releases() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(0), 1);
        let late = a.req(acquire("x", true));
        let cancel = a.req(release("x", 0));
        assert_eq!(t.handle(at(1), &cancel), SessionReply::Released { key: key("x") });
        // The older acquire arrives after its own cancellation: granted, but the holder
        // ignores this reply, so the grant is reported...
        assert_eq!(t.handle(at(2), &late), granted("x", 1));
        let alive = a.send(&mut t, at(3), SessionOp::KeepAlive);
        let pushed = Grant { key: key("x"), fence: Fence(1), asked: late.seq };
        assert_eq!(alive, SessionReply::Alive { ttl: TTL, granted: Some(pushed), more: false });
        // ...a stop-waiting answers with the fence instead of releasing...
        assert_eq!(a.send(&mut t, at(4), release("x", 0)), granted("x", 1));
        // ...and the fenced release frees it.
        assert_eq!(a.send(&mut t, at(5), release("x", 1)), SessionReply::Released { key: key("x") });
        assert_eq!(t.key(&key("x")).unwrap().holder, None);
    }

    #[test]
    fn a_claim_is_reported_as_asked_by_the_highest_acquire_whatever_order_they_land_in() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(0), 1);
        let mut b = Client::open(&mut t, at(0), 2);
        a.send(&mut t, at(1), acquire("x", false));
        a.send(&mut t, at(1), acquire("y", false));
        let reported =
            |b: &mut Client, t: &mut Table, k: &str, fence: u64| match b.send(t, at(9), SessionOp::KeepAlive)
            {
                SessionReply::Alive { granted: Some(g), .. }
                    if g.key == key(k) && g.fence == Fence(fence) =>
                {
                    g.asked
                }
                other => panic!("{other:?}"),
            };
        // x: the newer acquire lands first, the older after it.
        let older = b.req(acquire("x", true));
        let newer = b.req(acquire("x", true));
        assert!(matches!(t.handle(at(2), &newer), SessionReply::Queued { .. }));
        assert!(matches!(t.handle(at(3), &older), SessionReply::Queued { .. }));
        a.send(&mut t, at(4), release("x", 1));
        assert_eq!(reported(&mut b, &mut t, "x", 2), newer.seq);
        b.send(&mut t, at(5), release("x", 2));
        // y: a stale claim (an acquire held up past its stop) stands when b asks anew, and a
        // keepalive overtakes that acquire, so it lands as a reordered request.
        let stale = b.req(acquire("y", true));
        assert_eq!(b.send(&mut t, at(6), release("y", 0)), SessionReply::Released { key: key("y") });
        assert!(matches!(t.handle(at(6), &stale), SessionReply::Queued { .. }));
        let anew = b.req(acquire("y", true));
        b.send(&mut t, at(7), SessionOp::KeepAlive);
        assert!(matches!(t.handle(at(7), &anew), SessionReply::Queued { .. }));
        a.send(&mut t, at(8), release("y", 1));
        assert_eq!(reported(&mut b, &mut t, "y", 2), anew.seq, "not the stale acquire's seq");
        // The same for a claim granted already: a reordered acquire answered with the grant
        // makes its seq the one the report carries, so the holder can confirm it.
        let again = b.req(acquire("y", true));
        b.send(&mut t, at(9), SessionOp::KeepAlive);
        assert_eq!(t.handle(at(9), &again), granted("y", 2));
        assert_eq!(reported(&mut b, &mut t, "y", 2), again.seq);
    }

    #[test]
    fn a_restart_rearms_sessions_and_continues_the_counter() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(50_000), 1);
        a.send(&mut t, at(50_000), acquire("x", false));
        t.recover(at(3));
        assert_eq!(t.session(a.id).unwrap().expires_at, at(10_003));
        let resumed = Table::resume(SessionLimits::default(), t.next_session());
        assert_eq!(resumed.next_session(), SessionId(2));
        assert_eq!(t.holder_label(&key("x")).map(|l| l.as_str()), Some("host"));
    }

    #[test]
    fn open_checks_the_ttl_and_handle_refuses_open() {
        let mut t = Table::new(SessionLimits::default());
        assert_eq!(
            t.open(at(0), Duration::ZERO, &Label::new(), secret(1)),
            SessionReply::Rejected(Reject::InvalidTtl)
        );
        let open = SessionRequest {
            session: SessionId::NONE,
            secret: Secret::NONE,
            seq: Seq(1),
            op: SessionOp::Open { ttl: TTL, label: Label::new() },
        };
        assert_eq!(t.handle(at(0), &open), SessionReply::Rejected(Reject::Malformed));
        assert_eq!(t.sessions().count(), 0);
    }

    #[test]
    fn bad_keys_are_refused() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(0), 1);
        let mut bad = Key::new();
        bad.push_str("a b").unwrap();
        let reply = a.send(&mut t, at(0), SessionOp::Acquire { key: bad, wait: false });
        assert_eq!(reply, SessionReply::Rejected(Reject::InvalidKey));
        assert_eq!(t.keys().count(), 0);
    }

    fn acquire_n(k: &str, wait: bool, limit: u16) -> SessionOp {
        SessionOp::AcquireWithLimit { key: key(k), wait, limit }
    }

    #[test]
    fn a_semaphore_admits_n_holders_with_their_own_fences_and_queues_the_rest() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(0), 1);
        let mut b = Client::open(&mut t, at(0), 2);
        let mut c = Client::open(&mut t, at(0), 3);
        assert_eq!(a.send(&mut t, at(1), acquire_n("x", true, 2)), granted("x", 1));
        assert_eq!(b.send(&mut t, at(2), acquire_n("x", true, 2)), granted("x", 2));
        let c_asked = Seq(c.seq + 1);
        assert_eq!(
            c.send(&mut t, at(3), acquire_n("x", true, 2)),
            SessionReply::Queued { key: key("x"), position: 1 }
        );
        let st = t.key(&key("x")).unwrap();
        assert_eq!((st.holders, st.limit, st.waiting), (2, 2, 1));
        let holders = |t: &Table| t.holders(&key("x")).map(|h| (h.session, h.fence)).collect::<Vec<_, 4>>();
        assert_eq!(holders(&t).as_slice(), &[(a.id, Fence(1)), (b.id, Fence(2))]);
        // Asking again (the holder's confirmation) keeps the grant and its fence.
        assert_eq!(a.send(&mut t, at(4), acquire_n("x", true, 2)), granted("x", 1));
        // The slot b frees goes to the head of the queue with the next fence, pushed.
        assert_eq!(b.send(&mut t, at(5), release("x", 2)), SessionReply::Released { key: key("x") });
        assert_eq!(holders(&t).as_slice(), &[(a.id, Fence(1)), (c.id, Fence(3))]);
        let pushed = Grant { key: key("x"), fence: Fence(3), asked: c_asked };
        assert_eq!(
            c.send(&mut t, at(6), SessionOp::KeepAlive),
            SessionReply::Alive { ttl: TTL, granted: Some(pushed), more: false }
        );
        // Busy says when the first slot can come free: the earliest holder's expiry.
        b.send(&mut t, at(7_000), SessionOp::KeepAlive);
        assert_eq!(
            b.send(&mut t, at(7_000), acquire_n("x", false, 2)),
            SessionReply::Busy { key: key("x"), expires_in: Duration::from_secs(3) }
        );
    }

    #[test]
    fn every_holder_and_waiter_of_a_key_must_ask_for_the_same_limit() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(0), 1);
        let mut b = Client::open(&mut t, at(0), 2);
        assert_eq!(a.send(&mut t, at(1), acquire_n("x", true, 3)), granted("x", 1));
        let mismatch = SessionReply::Rejected(Reject::LimitMismatch);
        assert_eq!(b.send(&mut t, at(2), acquire_n("x", true, 2)), mismatch);
        assert_eq!(b.send(&mut t, at(2), acquire("x", true)), mismatch, "a plain acquire asks for 1");
        assert_eq!(a.send(&mut t, at(3), acquire("x", true)), mismatch, "the holder too");
        assert_eq!(b.send(&mut t, at(4), acquire_n("x", true, 0)), SessionReply::Rejected(Reject::Malformed));
        assert_eq!(t.key(&key("x")).unwrap().holders, 1, "refusals change nothing");
        // Once the key has no holder and no waiter, the next claim sets its limit.
        assert_eq!(a.send(&mut t, at(5), release("x", 1)), SessionReply::Released { key: key("x") });
        assert_eq!(b.send(&mut t, at(6), acquire("x", false)), granted("x", 2));
        assert_eq!(t.key(&key("x")).unwrap().limit, 1);
        assert_eq!(
            a.send(&mut t, at(7), acquire("x", false)),
            SessionReply::Busy { key: key("x"), expires_in: Duration::from_millis(9_993) }
        );
    }

    #[test]
    fn an_ending_session_frees_its_slots_to_the_queue_in_order() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(0), 1);
        let mut b = Client::open(&mut t, at(1_000), 2);
        let mut c = Client::open(&mut t, at(1_000), 3);
        assert_eq!(a.send(&mut t, at(0), acquire_n("x", true, 2)), granted("x", 1));
        assert_eq!(a.send(&mut t, at(0), acquire_n("y", true, 2)), granted("y", 1));
        assert!(matches!(b.send(&mut t, at(1_000), acquire_n("x", true, 2)), SessionReply::Granted { .. }));
        // The pool (3 claims) is full: a third claim is refused, not a panic.
        assert_eq!(
            c.send(&mut t, at(1_000), acquire_n("x", true, 2)),
            SessionReply::Rejected(Reject::Capacity)
        );
        assert_eq!(a.send(&mut t, at(1_001), SessionOp::Close), SessionReply::Closed);
        assert_eq!(t.key(&key("y")).unwrap().holders, 0);
        // a's cells are free again, and its slot of x: c takes it at once.
        assert_eq!(c.send(&mut t, at(1_002), acquire_n("x", true, 2)), granted("x", 3));
        assert_eq!(t.key(&key("x")).unwrap().last_fence, Fence(3));
    }

    #[test]
    fn one_key_can_have_a_thousand_waiters_in_a_pool_bounded_in_total() {
        type Big = SessionAuthority<1_024, 2, 1_001>;
        let mut t: std::boxed::Box<Big> = std::boxed::Box::new(Big::new(SessionLimits::default()));
        let label = parse_label("w").unwrap();
        let open = |t: &mut Big, i: u32| {
            let secret = Secret::from_bytes([i as u8; 16]);
            let SessionReply::Opened { session, .. } = t.open(at(0), TTL, &label, secret) else { panic!() };
            (session, secret)
        };
        let ask = |t: &mut Big, (session, secret): (SessionId, Secret), op| {
            t.handle(at(1), &SessionRequest { session, secret, seq: Seq(2), op })
        };
        let ids: std::vec::Vec<_> = (0..1_002).map(|i| open(&mut t, i)).collect();
        assert_eq!(ask(&mut t, ids[0], acquire("x", true)), granted("x", 1));
        for (n, id) in ids[1..1_001].iter().enumerate() {
            let reply = ask(&mut t, *id, acquire("x", true));
            assert_eq!(reply, SessionReply::Queued { key: key("x"), position: n as u16 + 1 });
        }
        // The pool is full (1 holder + 1,000 waiters): the next claim, on any key, is refused.
        assert_eq!(ask(&mut t, ids[1_001], acquire("y", true)), SessionReply::Rejected(Reject::Capacity));
        let waiters: std::vec::Vec<_> = t.waiters(&key("x")).collect();
        assert_eq!(waiters, ids[1..1_001].iter().map(|(s, _)| *s).collect::<std::vec::Vec<_>>());
        // A waiter in the middle leaves; the holder releases: the head gets it, FIFO.
        let leave =
            SessionRequest { session: ids[500].0, secret: ids[500].1, seq: Seq(3), op: release("x", 0) };
        assert_eq!(t.handle(at(2), &leave), SessionReply::Released { key: key("x") });
        let give_back =
            SessionRequest { session: ids[0].0, secret: ids[0].1, seq: Seq(3), op: release("x", 1) };
        assert_eq!(t.handle(at(3), &give_back), SessionReply::Released { key: key("x") });
        assert_eq!(t.key(&key("x")).unwrap().holder, Some(KeyHolder { session: ids[1].0, fence: Fence(2) }));
        assert_eq!(t.waiters(&key("x")).count(), 998);
        assert_eq!(t.waiters(&key("x")).nth(498), Some(ids[501].0), "the one who left is skipped");
        // Freed cells are reused: the refused session now gets y.
        let again = SessionRequest {
            session: ids[1_001].0,
            secret: ids[1_001].1,
            seq: Seq(3),
            op: acquire("y", true),
        };
        assert_eq!(t.handle(at(4), &again), granted("y", 1));
    }

    #[test]
    fn an_external_hold_queues_sessions_and_its_end_hands_the_key_on_above_its_fence() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(0), 1);
        let k = key("k");
        assert_eq!(t.hold_external(at(0), &k, ExternalHold::Pending, true), Ok(Fence::NONE));
        // Pending: no session gets it, and no timer runs for it.
        assert_eq!(
            a.send(&mut t, at(1), acquire("k", false)),
            SessionReply::Busy { key: k.clone(), expires_in: Duration::ZERO }
        );
        assert_eq!(
            a.send(&mut t, at(1), acquire("k", true)),
            SessionReply::Queued { key: k.clone(), position: 1 }
        );
        assert_eq!(t.poll_timeout(), Some(at(0) + TTL), "only the session's expiry");
        // The other protocol granted fence 7 until 3 s.
        t.set_external(at(2), &k, Some(at(3000)), Fence(7));
        assert_eq!(t.poll_timeout(), Some(at(3000)));
        t.handle_timeout(at(2999));
        assert_eq!(t.holders(&k).count(), 0, "not before the hold ends");
        t.handle_timeout(at(3000));
        assert_eq!(t.holders(&k).next(), Some(KeyHolder { session: a.id, fence: Fence(8) }));
        assert!(t.has_news(a.id), "the grant is pushed");
        // Now a session holds it: the other protocol is refused, exclusive or not.
        let refused = Err(ExternalRefusal::Busy { retry_after: Duration::from_millis(7000) });
        assert_eq!(t.hold_external(at(3000), &k, ExternalHold::Pending, true), refused);
        assert_eq!(t.hold_external(at(3000), &k, ExternalHold::Pending, false), refused);
    }

    #[test]
    fn an_exclusive_external_hold_waits_its_turn_and_a_free_hands_off_at_once() {
        let mut t = Table::new(SessionLimits::default());
        let (mut a, mut b) = (Client::open(&mut t, at(0), 1), Client::open(&mut t, at(0), 2));
        let k = key("k");
        t.raise_fence_floor(Fence(40));
        assert_eq!(t.hold_external(at(0), &k, ExternalHold::Until(at(500)), true), Ok(Fence(40)));
        t.set_external(at(0), &k, Some(at(500)), Fence(41));
        assert_eq!(
            a.send(&mut t, at(1), acquire("k", true)),
            SessionReply::Queued { key: k.clone(), position: 1 }
        );
        // Sessions wait: a new external grant is refused, an extension of the current one is not.
        assert!(matches!(
            t.hold_external(at(2), &k, ExternalHold::Pending, true),
            Err(ExternalRefusal::Busy { .. })
        ));
        assert_eq!(t.hold_external(at(2), &k, ExternalHold::Pending, false), Ok(Fence(41)));
        t.set_external(at(3), &k, None, Fence(41));
        assert_eq!(t.holders(&k).next(), Some(KeyHolder { session: a.id, fence: Fence(42) }));
        assert_eq!(
            b.send(&mut t, at(4), acquire("k", false)),
            SessionReply::Busy { key: k.clone(), expires_in: TTL - Duration::from_millis(4) }
        );
    }
}
