//! One key namespace for protocol v1 and v2: a key is never held under both at once, and its
//! fences strictly increase across both.
//!
//! v1 leases stay records in `leases.redb` (the [`Store`]), decided by the core's v1 rules;
//! v2 sessions stay the core's [`SessionAuthority`](leasehold_core::session::SessionAuthority)
//! with its log in `sessions.redb` (the [`Sessions`]). The session authority is told of every
//! v1 lease as an *external hold* of its key, through logged inputs, so its replay stays
//! exact. The rules of that composition (which request holds the key, v1's answer to a
//! refusal, the floor under v1's fences, the end and fence set) are core's
//! [`leasehold_core::namespace`], which the session simulator drives in the same order; this
//! module adds the I/O: the two stores, their fsyncs, the per-key turn and the retries. A v1
//! request that may grant or extend goes, one at a time per key:
//!
//! 1. **Hold** ([`Sessions::hold_external`]): the key is held for v1 with no end yet
//!    (`Pending`), refused if a session holds it (and, for an acquire, if sessions wait for
//!    it: they are first in line). The session writer answers this as soon as it is applied
//!    in memory, and logs it in its current group commit. A refusal is v1's answer at once:
//!    `Busy` (an acquire) or `NotHolder` (a renewal), nothing decided. Otherwise the answer
//!    carries the key's last v2 fence.
//! 2. **Decide** ([`Store::apply`]): v1's rules, with the v2 fence as a floor, so a v1 grant's
//!    fence is above every v2 fence of the key; committed with fsync *while the hold's commit
//!    is under way*, so the two fsyncs overlap.
//! 3. **Answer**: a grant or renewal only once both commits succeeded. If the hold's failed,
//!    the answer is `unavailable`, whatever v1 stored.
//! 4. **Set** ([`Sessions::set_external`]): the v1 record's end (its holder's expiry plus the
//!    lock-delay, or free) and its last fence, so v2 fences continue above v1's. A free key
//!    goes to the head of its v2 queue at once, and that grant is pushed; a held one at the
//!    end of the hold, by the session writer's timer. The key's turn goes once the set is
//!    applied in memory; if its commit fails, the key's turn is taken again and the sessions
//!    are told what the v1 store holds by then, until that is on disk.
//!
//! A release only decides, answers and sets. Sessions waiting behind a v1 lease are pushed the
//! grant when it is released or expires, never before: the hold's end is converted from the
//! v1 clock to the log's by sampling the v1 clock first, so it lands at or after the v1
//! expiry.
//!
//! **Crash atomicity without one transaction.** The two stores are two redb files, each
//! committed with fsync on its own, and the session log's commit that fails is followed by a
//! rebuild of the session table from the log on disk (see `sessions`), which drops every input
//! of the failed commit and after it that was applied in memory only. The argument needs two
//! things on disk before v1 answers a grant or a renewal: v1's record, and the hold (with every
//! log entry before it). Before a session is answered a grant of a key v1 might hold, its own
//! log entry is on disk, and with it every entry before it.
//! - *A v2 grant beside an answered v1 grant.* The hold was applied to the authority's memory
//!   before v1 decided, so every v2 grant the authority made from then on saw it and was
//!   refused; one made before it made the hold refused. A v2 grant is durable only with every
//!   entry before it: a durable one that the hold would have refused cannot follow a hold that
//!   vanished, since v1 answers only once the hold is durable.
//! - *Why the hold must be durable before v1 answers (the counter-example to a cheaper order).*
//!   If v1 answered once its own record was on disk, with the hold in memory only: the hold's
//!   commit fails, the next commit rebuilds the table without it, and a session is granted
//!   the key (v1's set cannot land while the disk stays full) while the v1 holder holds it.
//!   Re-applying lost holds after a rebuild does not mend it: the rebuilt table may be older
//!   than the one the hold was granted against. A session holding the key with a waiter on
//!   disk may have released it, and the waiter been granted and released it, in the failed
//!   commit: re-applied, the hold is refused, and the retried release hands the key to the
//!   waiter while v1's holder holds it. (Test: the planted
//!   `v1_answers_before_its_hold_is_durable`.)
//! - *A hold whose commit failed, with v1's grant stored.* v1 answered `unavailable`: no one
//!   believes in that grant. Until the set lands the key looks free to sessions, and one may
//!   be granted it, with a fence v1's unanswered grant may share; the set then holds the key
//!   until that record's end and raises the sessions' fence to it. v1's next grant of the key
//!   (its owner's retry included) needs a new hold, refused while the session holds it, and is
//!   above both fences.
//! - *A set whose commit failed.* The rebuilt table has the key held at least as long as the
//!   lost set would have: a grant's or renewal's durable `Pending` hold, or (for a release)
//!   the durable end of the grant before it. So the key's next request, logged after the
//!   set, decides no worse for having lost it, and v1's decisions do not read the set (their
//!   floor is the record's own fence too). The retry tells the sessions the record's truth
//!   under the key's turn, so an older retry never lands after a newer decision's set.
//! - *A crash* between any two steps: a hold or set may be missing from the log (or a
//!   `Pending` hold may have no set, or a hold reached the log and v1's record did not). At
//!   every start, before serving, [`Sessions::sync_external`] makes the authority's external
//!   holds exactly the live v1 records (re-armed for their full ttl by the v1 store's
//!   recovery, as v1 grants are), raises the fences of every v1 key, and raises the floor of
//!   keys it never saw to v1's store-wide floor (keys v1 forgot). What v1 has on disk is the
//!   truth for v1 leases, and it is re-applied as logged inputs. Nothing answered is lost:
//!   an answered grant had both its record and its hold on disk.
//! - *A v1 decision that failed* (the v1 store is down) may or may not be on disk: it is
//!   answered `unavailable`, and its key's hold stays `Pending` until the record can be read
//!   back, which then sets it.
//! - *Fences.* The floor is the key's last v2 fence in memory, at least its last durable one;
//!   a v2 fence lost in a rebuild was never answered.
//!
//! **The cost.** The hold's fsync now overlaps v1's own, and the set's no longer holds up the
//! key's next request. Measured (README, "one key namespace"): see the figures there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use leasehold_core::authority::{Decision, Record};
use leasehold_core::{namespace, Duration, Fence, Instant, Key, Request};

use crate::sessions::{SessionStoreError, Sessions};
use crate::store::{Store, StoreError};
use crate::Clock;

/// Why a v1 request could not be decided.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum V1Error {
    /// The v1 store failed.
    #[error(transparent)]
    Store(Arc<StoreError>),
    /// The session log failed, so the key could not be held for v1; nothing was decided.
    #[error(transparent)]
    Sessions(Arc<SessionStoreError>),
    /// An earlier v1 request of the key is still waiting for its outcome to be on disk (the
    /// session log is failing): nothing was decided.
    #[error("an earlier request of key {0:?} is still being made durable; try again")]
    Stalled(Key),
}

/// The v1 store and the sessions, kept in one namespace.
#[derive(Clone)]
pub(crate) struct Namespace {
    store: Store,
    sessions: Sessions,
    /// The v1 store's clock.
    clock: Clock,
    lock_delay: Duration,
    turns: Arc<KeyTurns>,
    /// To the runner, which decides each v1 request on a task of its own.
    jobs: async_channel::Sender<Job>,
    /// Planted bug: a grant is answered before its hold is durable.
    #[cfg(feature = "fault-injection")]
    answer_early: bool,
}

struct Job {
    key: Key,
    request: Request,
    answer: async_channel::Sender<Result<Decision, V1Error>>,
}

/// Retries of a set (or a read-back) back off from this to [`RETRY_MAX`].
const RETRY_MIN: StdDuration = StdDuration::from_millis(20);
const RETRY_MAX: StdDuration = StdDuration::from_secs(1);
/// Longest a v1 request waits for its key's turn before it is answered unavailable: a turn is
/// held across fsyncs only, unless the session log is failing, and then the request must not
/// hang with it.
const TURN_WAIT: StdDuration = StdDuration::from_secs(2);

impl Namespace {
    /// The namespace, and the runner of its v1 requests, which the caller must run with the
    /// server (dropping it cancels the requests in progress: see the module docs for why a
    /// start repairs that).
    pub(crate) fn new(
        store: Store,
        sessions: Sessions,
        clock: Clock,
        lock_delay: Duration,
        #[cfg(feature = "fault-injection")] answer_early: bool,
    ) -> (Namespace, impl std::future::Future<Output = ()> + Send) {
        let (jobs, queued) = async_channel::bounded::<Job>(1024);
        let namespace = Namespace {
            store,
            sessions,
            clock,
            lock_delay,
            turns: Arc::default(),
            jobs,
            #[cfg(feature = "fault-injection")]
            answer_early,
        };
        let this = namespace.clone();
        let runner = async move {
            let ex = smol::Executor::new();
            ex.run(async {
                while let Ok(job) = queued.recv().await {
                    ex.spawn(this.clone().decide(job.key, job.request, job.answer)).detach();
                }
            })
            .await
        };
        (namespace, runner)
    }

    /// Tells the sessions what the v1 store holds, at a start (see the module docs).
    pub(crate) async fn sync(&self) -> Result<(), crate::ServerError> {
        let records = self.store.all().await?;
        let floor = Fence(self.store.stats().fence_floor.load(std::sync::atomic::Ordering::Relaxed));
        let now = self.clock.now();
        let mut held = Vec::new();
        let mut fences = Vec::new();
        for (key, rec) in records {
            let Ok(key) = leasehold_core::parse_key(&key) else { continue };
            match self.remaining(&rec, now) {
                Some(left) => held.push((key, left, rec.last_fence)),
                None => fences.push((key, rec.last_fence)),
            }
        }
        self.sessions.sync_external(&held, &fences, floor)?;
        Ok(())
    }

    /// Decides a v1 request, once its key is held for v1 in the sessions. The work runs on a
    /// task of the runner's, so that a client hanging up cannot leave the key held with no end.
    pub(crate) async fn apply(&self, key: Key, request: Request) -> Result<Decision, V1Error> {
        let stopped = || V1Error::Store(Arc::new(StoreError::Stopped));
        let (answer, answered) = async_channel::bounded(1);
        self.jobs.send(Job { key, request, answer }).await.map_err(|_| stopped())?;
        answered.recv().await.unwrap_or_else(|_| Err(stopped()))
    }

    async fn decide(
        self,
        key: Key,
        request: Request,
        answer: async_channel::Sender<Result<Decision, V1Error>>,
    ) {
        let turn = futures_lite::future::or(async { Some(self.turns.take(&key).await) }, async {
            async_io::Timer::after(TURN_WAIT).await;
            None
        })
        .await;
        let Some(turn) = turn else {
            let _ = answer.try_send(Err(V1Error::Stalled(key)));
            return;
        };
        let claim = namespace::V1Claim::of(&request.op);
        let mut floor = Fence::NONE;
        let mut hold = None;
        if let Some(claim) = claim {
            match self.sessions.hold_external(key.clone(), claim.exclusive()).await {
                Err(e) => {
                    let _ = answer.try_send(Err(V1Error::Sessions(e)));
                    return;
                }
                Ok((Ok(fence), commit)) => (floor, hold) = (fence, Some(commit)),
                // A refusal may be answered before it is on disk: refusing is always safe.
                Ok((Err(refusal), _)) => {
                    let _ = answer.try_send(Ok(claim.refused(refusal)));
                    return;
                }
            }
        }
        // v1 decides and commits while the hold's commit is under way: the two fsyncs overlap.
        let decided = self.store.apply(key.clone(), request, floor).await;
        let record = decided.as_ref().ok().map(|d| d.record);
        let decided = decided.map_err(V1Error::Store);
        #[cfg(feature = "fault-injection")]
        if self.answer_early {
            let _ = answer.try_send(decided.clone());
        }
        // A grant only once its hold is on disk too: a failed session commit rebuilds the
        // table from the log, which then lacks the hold (see the module docs).
        let held = match hold {
            Some(commit) => commit.durable().await.map_err(V1Error::Sessions),
            None => Ok(()),
        };
        let _ = answer.try_send(held.and(decided));
        let record = match record {
            Some(r) => r,
            // A failed release changed nothing the sessions need to know early: their hold
            // still ends no sooner than the lease did.
            None if claim.is_none() => return,
            None => match self.read_back(&key).await {
                Some(r) => r,
                None => return,
            },
        };
        self.set(key, record, floor, turn).await;
    }

    /// The record of `key` as the v1 store has it on disk, once it can be read; `None` if the
    /// server stopped first.
    async fn read_back(&self, key: &Key) -> Option<Record> {
        let mut delay = RETRY_MIN;
        while !self.sessions.stopped() {
            match self.store.get(key.clone()).await {
                Ok(r) => return Some(r.unwrap_or_default()),
                Err(e) => tracing::debug!("reading {key:?} back after a failed v1 decision: {e}"),
            }
            async_io::Timer::after(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
        None
    }

    /// Tells the sessions `record`'s end and fence. The key's turn goes once that is applied
    /// in memory: the key's next request is logged after it, so it sees it. If its commit then
    /// fails, the rebuilt table lacks it (and has the key held at least as long: see the
    /// module docs), and [`reset`](Self::reset) tells the sessions what the v1 store holds by
    /// then, under the key's turn again.
    async fn set(&self, key: Key, record: Record, floor: Fence, turn: Turn<'_>) {
        // The v1 clock first: the end lands no earlier than the v1 one.
        let remaining = self.remaining(&record, self.clock.now());
        let applied =
            self.sessions.set_external(key.clone(), remaining, namespace::set_fence(&record, floor)).await;
        let stopped = |e: &SessionStoreError| matches!(e, SessionStoreError::Stopped);
        let _turn = match applied {
            Ok(commit) => {
                drop(turn);
                let Err(e) = commit.durable().await else { return };
                if stopped(&e) {
                    return;
                }
                tracing::warn!("telling the sessions of v1's decision on {key:?} failed, retrying: {e}");
                async_io::Timer::after(RETRY_MIN).await;
                self.turns.take(&key).await
            }
            // Never applied: the turn is still this request's.
            Err(e) if stopped(&e) => return,
            Err(e) => {
                tracing::warn!("telling the sessions of v1's decision on {key:?} failed, retrying: {e}");
                turn
            }
        };
        self.reset(&key).await;
    }

    /// Tells the sessions what the v1 store holds for `key`, until that is on disk; under the
    /// key's turn, so no v1 decision of the key is under way and the record is its truth.
    async fn reset(&self, key: &Key) {
        let mut delay = RETRY_MIN;
        while let Some(record) = self.read_back(key).await {
            let remaining = self.remaining(&record, self.clock.now());
            // The record's own last fence: the sessions' floor under it is on disk, or was
            // never answered.
            let set = self.sessions.set_external(key.clone(), remaining, record.last_fence).await;
            let failed = match set {
                Ok(commit) => match commit.durable().await {
                    Ok(()) => return,
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if matches!(*failed, SessionStoreError::Stopped) {
                return;
            }
            tracing::warn!("telling the sessions what v1 holds for {key:?} failed, retrying: {failed}");
            async_io::Timer::after(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    /// How long from `now` (the v1 clock) `record` keeps its key from anyone else: to its
    /// holder's expiry, or to the end of a lock-delay; `None` if it is free.
    fn remaining(&self, record: &Record, now: Instant) -> Option<StdDuration> {
        namespace::remaining(record, self.lock_delay, now)
            .map(|left| StdDuration::from_micros(left.as_micros()))
    }
}

/// One v1 request at a time per key, between its hold and its set.
#[derive(Default)]
struct KeyTurns {
    keys: Mutex<HashMap<Key, Arc<smol::lock::Mutex<()>>>>,
}

/// A key's turn; the next request of the key waits until it is dropped.
struct Turn<'a> {
    turns: &'a KeyTurns,
    key: Key,
    _guard: smol::lock::MutexGuardArc<()>,
}

impl KeyTurns {
    async fn take(&self, key: &Key) -> Turn<'_> {
        let lock =
            self.keys.lock().unwrap_or_else(|e| e.into_inner()).entry(key.clone()).or_default().clone();
        Turn { turns: self, key: key.clone(), _guard: lock.lock_arc().await }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut keys = self.turns.keys.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map and this turn have it: nobody waits, so the entry goes (a newcomer
        // needs the map's lock to take a copy).
        if keys.get(&self.key).is_some_and(|l| Arc::strong_count(l) == 2) {
            keys.remove(&self.key);
        }
    }
}
