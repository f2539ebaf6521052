//! Observers of keys, and the values holders set: the authority's bookkeeping for following a
//! key's holder without polling (issue 10 §3).
//!
//! Kept apart from the keys' records: the authority tells this table, after every input, who
//! holds each observed key now (through its public view of the keys), and the table turns
//! differences into numbered changes. So the rules of granting and queueing know nothing of
//! observers, and an observer can never change who gets a key.
//!
//! - Each observed key has a *watch*: its changes numbered from 1 (the state when its first
//!   observer came), the last [`OBSERVED_HISTORY`] of them kept. The watch ends with its last
//!   observer.
//! - Each observer has acknowledged the changes up to `acked`. A keepalive's reply carries the
//!   oldest change it has not (or, if it fell further behind than the history, the oldest
//!   kept, whose number shows the gap), until a [`KeepAliveSeen`](super::wire::SessionOp::KeepAliveSeen)
//!   acknowledges it: a lost or reordered reply is reported again, never skipped.
//! - A new observer's first report is the current state.
//! - A state is what holds after a whole input: a release that hands the key straight to the
//!   head of its queue is one change (to the new holder), never an instant of "free".

use heapless::{Deque, Vec};

use super::wire::{Label, Observed, ObservedHolder, Seq, SessionId, Value, OBSERVED_HISTORY};
use crate::wire::{Fence, Key};

/// One change of a watched key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct Change {
    change: u64,
    holder: Option<ObservedHolder>,
}

/// A key with at least one observer, and its recent changes (oldest first, never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct Watch {
    key: Key,
    changes: Deque<Change, OBSERVED_HISTORY>,
}

impl Watch {
    fn latest(&self) -> Option<&Change> {
        self.changes.back()
    }

    fn latest_change(&self) -> u64 {
        self.latest().map_or(0, |c| c.change)
    }

    /// The first change after `acked` still kept.
    fn after(&self, acked: u64) -> Option<&Change> {
        self.changes.iter().find(|c| c.change > acked)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct Observer {
    session: SessionId,
    key: Key,
    /// The highest change of the key this observer acknowledged.
    acked: u64,
    /// The key's latest change (its watch's, copied here so that finding the observers
    /// behind costs one pass, not one watch lookup each).
    latest: u64,
    /// The seq of the observe that registered it: an unobserve older than that (reordered on
    /// the way, or a late retry's original) is not for this observation.
    since: Seq,
}

/// The value a session acquired (or queued for) a key with.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
struct HeldValue {
    session: SessionId,
    key: Key,
    value: Value,
}

/// The table is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Full;

/// Up to `O` observers (and so at most `O` watched keys), and up to `V` values of holdings and
/// waits.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub(super) struct Observations<const O: usize, const V: usize> {
    observers: Vec<Observer, O>,
    watches: Vec<Watch, O>,
    values: Vec<HeldValue, V>,
}

impl<const O: usize, const V: usize> Default for Observations<O, V> {
    fn default() -> Self {
        Observations { observers: Vec::new(), watches: Vec::new(), values: Vec::new() }
    }
}

/// Who holds a key now, as the authority tells the table: the holding session, its label and
/// its fence.
pub(super) type Current<'a> = Option<(SessionId, &'a Label, Fence)>;

impl<const O: usize, const V: usize> Observations<O, V> {
    // ----- values -----

    /// The value `session` acquired `key` with; empty if none.
    pub(super) fn value(&self, session: SessionId, key: &Key) -> Value {
        self.values
            .iter()
            .find(|v| v.session == session && v.key == *key)
            .map_or_else(Value::new, |v| v.value.clone())
    }

    /// Records `value` (or, with `None`, no value) for `session`'s new holding of, or wait for,
    /// `key`.
    pub(super) fn set_value(
        &mut self,
        session: SessionId,
        key: &Key,
        value: Option<&Value>,
    ) -> Result<(), Full> {
        self.values.retain(|v| !(v.session == session && v.key == *key));
        let Some(value) = value.filter(|v| !v.is_empty()) else { return Ok(()) };
        let record = HeldValue { session, key: key.clone(), value: value.clone() };
        self.values.push(record).map_err(|_| Full)
    }

    pub(super) fn values_full(&self) -> bool {
        self.values.is_full()
    }

    /// The session and key of the `i`th value.
    pub(super) fn value_at(&self, i: usize) -> Option<(SessionId, Key)> {
        self.values.get(i).map(|v| (v.session, v.key.clone()))
    }

    pub(super) fn remove_value(&mut self, i: usize) {
        if i < self.values.len() {
            self.values.swap_remove(i);
        }
    }

    // ----- observers -----

    /// `session` observes `key`, whose holder is `current` now (with its value looked up here).
    /// Observing again changes nothing.
    pub(super) fn observe(
        &mut self,
        session: SessionId,
        key: &Key,
        seq: Seq,
        current: Current<'_>,
    ) -> Result<(), Full> {
        if let Some(o) = self.observers.iter_mut().find(|o| o.session == session && o.key == *key) {
            // Asked again, by a later request: the session starts a new watch, whose first
            // report must be the current state even if it acknowledged that state before
            // (an Observe overtaken by its own Unobserve left this observer behind).
            if o.since < seq {
                o.acked = o.latest - 1;
                o.since = seq;
            }
            return Ok(());
        }
        if self.observers.is_full() {
            return Err(Full);
        }
        let latest = match self.watches.iter().find(|w| w.key == *key) {
            Some(w) => w.latest_change(),
            None => {
                let mut changes = Deque::new();
                let _ = changes.push_back(Change { change: 1, holder: self.describe(key, current) });
                // Cannot fail: there are fewer watches than observers, and observers has room.
                self.watches.push(Watch { key: key.clone(), changes }).map_err(|_| Full)?;
                1
            }
        };
        // Its first report is the current state.
        let observer = Observer { session, key: key.clone(), acked: latest - 1, latest, since: seq };
        self.observers.push(observer).map_err(|_| Full)
    }

    /// `session` no longer observes `key`, if it observed it since before `seq`.
    pub(super) fn unobserve(&mut self, session: SessionId, key: &Key, seq: Seq) {
        self.observers.retain(|o| !(o.session == session && o.key == *key && o.since < seq));
        self.drop_unwatched();
    }

    /// `session` acknowledges, in its request `seq`, the changes of `key` up to `change` (never
    /// past the latest, so a forged or confused number cannot skip changes yet to come). An
    /// acknowledgement made before this observation's observe is of an earlier observation of
    /// the key (reordered after the observe that began this one): counting it would skip
    /// this one's first reports.
    pub(super) fn ack(&mut self, session: SessionId, key: &Key, change: u64, seq: Seq) {
        let this = |o: &&mut Observer| o.session == session && o.key == *key && o.since < seq;
        if let Some(o) = self.observers.iter_mut().find(this) {
            o.acked = o.acked.max(change.min(o.latest));
        }
    }

    /// The oldest change `session` has not acknowledged, and whether more wait after it.
    pub(super) fn report(&self, session: SessionId) -> Option<(Observed, bool)> {
        let mut behind =
            self.observers.iter().filter(|o| o.session == session && o.acked < o.latest).filter_map(|o| {
                let w = self.watches.iter().find(|w| w.key == o.key)?;
                let c = w.after(o.acked)?;
                Some((w, c))
            });
        let (w, c) = behind.next()?;
        let more = c.change < w.latest_change() || behind.next().is_some();
        Some((Observed { key: w.key.clone(), change: c.change, holder: c.holder.clone() }, more))
    }

    /// Every observer with changes it has not acknowledged: its session, key, the change it
    /// acknowledged and the latest.
    pub(super) fn behind(&self) -> impl Iterator<Item = (SessionId, &Key, u64, u64)> + '_ {
        self.observers.iter().filter(|o| o.acked < o.latest).map(|o| (o.session, &o.key, o.acked, o.latest))
    }

    /// The latest change of `key`, if it is observed.
    pub(super) fn latest(&self, key: &Key) -> Option<u64> {
        self.watches.iter().find(|w| w.key == *key).map(Watch::latest_change)
    }

    /// Whether `session` observes `key`.
    pub(super) fn observes(&self, session: SessionId, key: &Key) -> bool {
        self.observers.iter().any(|o| o.session == session && o.key == *key)
    }

    /// Whether any key is observed.
    pub(super) fn any(&self) -> bool {
        !self.observers.is_empty()
    }

    /// Records a change of every watched key whose holder differs from its latest state;
    /// `current` says who holds a key now. With `record_free` false (a planted bug), a key
    /// becoming free is not recorded.
    pub(super) fn note<'a>(&mut self, current: impl Fn(&Key) -> Current<'a>, record_free: bool) {
        for i in 0..self.watches.len() {
            let now = current(&self.watches[i].key);
            let same = match (self.watches[i].latest().and_then(|c| c.holder.as_ref()), now) {
                (None, None) => true,
                (Some(h), Some((session, _, fence))) => h.session == session && h.fence == fence,
                _ => false,
            };
            if same || (now.is_none() && !record_free) {
                continue;
            }
            let holder = self.describe(&self.watches[i].key, now);
            let w = &mut self.watches[i];
            let change = w.latest_change() + 1;
            if w.changes.is_full() {
                w.changes.pop_front();
            }
            let _ = w.changes.push_back(Change { change, holder });
            let key = &self.watches[i].key;
            for o in self.observers.iter_mut().filter(|o| o.key == *key) {
                o.latest = change;
            }
        }
    }

    /// Forgets the observers and values of sessions that `alive` rejects.
    pub(super) fn forget(&mut self, alive: impl Fn(SessionId) -> bool) {
        let before = self.observers.len();
        self.observers.retain(|o| alive(o.session));
        if self.observers.len() != before {
            self.drop_unwatched();
        }
        self.values.retain(|v| alive(v.session));
    }

    fn drop_unwatched(&mut self) {
        let observers = &self.observers;
        self.watches.retain(|w| observers.iter().any(|o| o.key == w.key));
    }

    fn describe(&self, key: &Key, current: Current<'_>) -> Option<ObservedHolder> {
        let (session, label, fence) = current?;
        Some(ObservedHolder { session, label: label.clone(), fence, value: self.value(session, key) })
    }
}

#[cfg(test)]
mod tests {
    use crate::session::authority::{SessionAuthority, SessionLimits};
    use crate::session::wire::*;
    use crate::time::{Duration, Instant};
    use crate::wire::{parse_key, Fence, Key, Reject};

    const TTL: Duration = Duration::from_secs(10);
    /// Two observers at most.
    type Table = SessionAuthority<4, 4, 2, 2>;

    fn at(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }
    fn key(s: &str) -> Key {
        parse_key(s).unwrap()
    }

    struct Client {
        id: SessionId,
        secret: Secret,
        seq: u64,
    }

    impl Client {
        fn open(t: &mut Table, now: Instant, name: &str) -> Client {
            let secret = Secret::from_bytes([name.as_bytes()[0]; 16]);
            let SessionReply::Opened { session, .. } = t.open(now, TTL, &parse_label(name).unwrap(), secret)
            else {
                panic!("not opened")
            };
            Client { id: session, secret, seq: 1 }
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

    fn acquire_valued(k: &str, value: &str) -> SessionOp {
        SessionOp::AcquireWithValue { key: key(k), wait: true, value: parse_value(value).unwrap() }
    }
    /// A reported change: its number, and the holder's label, fence and value.
    type Report<'a> = (u64, Option<(&'a str, u64, &'a str)>);

    fn observed(reply: &SessionReply) -> Option<Report<'_>> {
        match reply {
            SessionReply::AliveObserved { observed, .. } => Some((
                observed.change,
                observed.holder.as_ref().map(|h| (h.label.as_str(), h.fence.0, h.value.as_str())),
            )),
            _ => None,
        }
    }
    fn seen(k: &str, change: u64) -> SessionOp {
        SessionOp::KeepAliveSeen { key: key(k), change }
    }

    #[test]
    fn an_observer_hears_every_change_in_order_until_it_acknowledges_each() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(0), "a");
        let mut b = Client::open(&mut t, at(0), "b");
        let mut o = Client::open(&mut t, at(0), "o");
        assert!(matches!(
            a.send(&mut t, at(1), acquire_valued("x", "10.0.0.1:80")),
            SessionReply::Granted { .. }
        ));
        assert!(matches!(
            b.send(&mut t, at(2), acquire_valued("x", "10.0.0.2:80")),
            SessionReply::Queued { .. }
        ));
        assert_eq!(
            o.send(&mut t, at(3), SessionOp::Observe { key: key("x") }),
            SessionReply::Observing { key: key("x") }
        );
        // The first report is the current state, and it is repeated until acknowledged (a
        // lost reply loses nothing).
        let first = Some((1, Some(("a", 1, "10.0.0.1:80"))));
        assert_eq!(observed(&o.send(&mut t, at(4), SessionOp::KeepAlive)), first);
        assert_eq!(observed(&o.send(&mut t, at(5), SessionOp::KeepAlive)), first);
        assert!(t.observers_behind().any(|(s, _, _, _)| s == o.id));
        assert_eq!(
            o.send(&mut t, at(6), seen("x", 1)),
            SessionReply::Alive { ttl: TTL, granted: None, more: false }
        );
        assert_eq!(t.observers_behind().count(), 0);
        // a releases: the key goes straight to b, one change; then b closes: free.
        assert!(matches!(
            a.send(&mut t, at(7), SessionOp::Release { key: key("x"), fence: Fence(1) }),
            SessionReply::Released { .. }
        ));
        assert!(matches!(b.send(&mut t, at(8), SessionOp::Close), SessionReply::Closed));
        let r = o.send(&mut t, at(9), SessionOp::KeepAlive);
        assert_eq!(observed(&r), Some((2, Some(("b", 2, "10.0.0.2:80")))));
        assert!(matches!(r, SessionReply::AliveObserved { more: true, .. }), "{r:?}");
        // A stale acknowledgement changes nothing; a too-high one stops at the latest.
        assert_eq!(observed(&o.send(&mut t, at(10), seen("x", 1))).map(|c| c.0), Some(2));
        assert_eq!(observed(&o.send(&mut t, at(11), seen("x", 2))), Some((3, None)));
        assert_eq!(
            o.send(&mut t, at(12), seen("x", 99)),
            SessionReply::Alive { ttl: TTL, granted: None, more: false }
        );
        // A plain acquire has no value, even for a session that once had one.
        let mut c = Client::open(&mut t, at(13), "c");
        c.send(&mut t, at(14), SessionOp::Acquire { key: key("x"), wait: false });
        assert_eq!(observed(&o.send(&mut t, at(15), SessionOp::KeepAlive)), Some((4, Some(("c", 3, "")))));
    }

    #[test]
    fn an_observe_overtaken_by_its_unobserve_is_reported_again_when_observed_anew() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(0), "a");
        let mut o = Client::open(&mut t, at(0), "o");
        assert!(matches!(a.send(&mut t, at(1), acquire_valued("x", "v")), SessionReply::Granted { .. }));
        // The observer asks, then changes its mind; the network delivers the two reversed:
        // the unobserve finds nothing to end, and the observe registers after it.
        let observe = o.req(SessionOp::Observe { key: key("x") });
        let unobserve = o.req(SessionOp::Unobserve { key: key("x") });
        assert_eq!(t.handle(at(2), &unobserve), SessionReply::Unobserved { key: key("x") });
        assert_eq!(t.handle(at(3), &observe), SessionReply::Observing { key: key("x") });
        // Its keepalive hears the holder and acknowledges it (the holder, no longer watching,
        // acknowledges whatever it is told).
        assert_eq!(observed(&o.send(&mut t, at(4), SessionOp::KeepAlive)), Some((1, Some(("a", 1, "v")))));
        assert!(matches!(o.send(&mut t, at(5), seen("x", 1)), SessionReply::Alive { .. }));
        // Observed anew: its new watch's first report is the current state, not silence.
        let late = o.req(SessionOp::Observe { key: key("x") });
        assert_eq!(
            o.send(&mut t, at(6), SessionOp::Observe { key: key("x") }),
            SessionReply::Observing { key: key("x") }
        );
        assert_eq!(observed(&o.send(&mut t, at(7), SessionOp::KeepAlive)), Some((1, Some(("a", 1, "v")))));
        assert!(matches!(o.send(&mut t, at(8), seen("x", 1)), SessionReply::Alive { .. }));
        // An older observe arriving after it does not start it over.
        assert!(late.seq < Seq(o.seq));
        assert_eq!(t.handle(at(9), &late), SessionReply::Observing { key: key("x") });
        assert!(matches!(o.send(&mut t, at(10), SessionOp::KeepAlive), SessionReply::Alive { .. }));
    }

    #[test]
    fn an_acknowledgement_of_an_earlier_observation_reordered_after_a_new_observe_skips_nothing() {
        let mut t = Table::new(SessionLimits::default());
        let mut a = Client::open(&mut t, at(0), "a");
        let mut o = Client::open(&mut t, at(0), "o");
        let observing = SessionReply::Observing { key: key("x") };
        assert_eq!(o.send(&mut t, at(1), SessionOp::Observe { key: key("x") }), observing);
        assert_eq!(observed(&o.send(&mut t, at(2), SessionOp::KeepAlive)), Some((1, None)));
        assert!(matches!(a.send(&mut t, at(3), acquire_valued("x", "v")), SessionReply::Granted { .. }));
        assert_eq!(observed(&o.send(&mut t, at(4), seen("x", 1))), Some((2, Some(("a", 1, "v")))));
        // Told change 2 as it leaves, the observer acknowledges it in a keepalive, which its
        // next observe (a new observation) overtakes on the way.
        let unobserved = o.send(&mut t, at(5), SessionOp::Unobserve { key: key("x") });
        assert_eq!(unobserved, SessionReply::Unobserved { key: key("x") });
        let old_ack = o.req(seen("x", 2));
        assert_eq!(o.send(&mut t, at(6), SessionOp::Observe { key: key("x") }), observing);
        t.handle(at(7), &old_ack);
        // The new observation's first report (of its own watch: numbered afresh) is still the
        // current state, not silence (its holder does not believe a report in the reply to a
        // keepalive older than its observe).
        assert_eq!(observed(&o.send(&mut t, at(8), SessionOp::KeepAlive)), Some((1, Some(("a", 1, "v")))));
    }

    #[test]
    fn observers_are_bounded_forgotten_with_their_session_and_a_lag_shows_as_a_gap() {
        let mut t = Table::new(SessionLimits::default());
        let mut o = Client::open(&mut t, at(0), "o");
        let mut p = Client::open(&mut t, at(0), "p");
        let mut h = Client::open(&mut t, at(0), "h");
        assert!(matches!(
            o.send(&mut t, at(1), SessionOp::Observe { key: key("x") }),
            SessionReply::Observing { .. }
        ));
        assert!(
            matches!(
                o.send(&mut t, at(1), SessionOp::Observe { key: key("x") }),
                SessionReply::Observing { .. }
            ),
            "again: no second observer"
        );
        assert!(matches!(
            p.send(&mut t, at(1), SessionOp::Observe { key: key("x") }),
            SessionReply::Observing { .. }
        ));
        assert_eq!(
            h.send(&mut t, at(1), SessionOp::Observe { key: key("y") }),
            SessionReply::Rejected(Reject::Capacity)
        );
        let mut bad = Key::new();
        bad.push_str("a b").unwrap();
        assert_eq!(
            p.send(&mut t, at(1), SessionOp::Observe { key: bad }),
            SessionReply::Rejected(Reject::InvalidKey)
        );
        // o lags: more changes than the history keeps.
        for i in 0..OBSERVED_HISTORY as u64 + 2 {
            let fence = i + 1;
            h.send(&mut t, at(2), SessionOp::Acquire { key: key("x"), wait: false });
            h.send(&mut t, at(2), SessionOp::Release { key: key("x"), fence: Fence(fence) });
        }
        let latest = 1 + 2 * (OBSERVED_HISTORY as u64 + 2);
        let (change, _) = observed(&o.send(&mut t, at(3), SessionOp::KeepAlive)).unwrap();
        assert_eq!(change, latest - OBSERVED_HISTORY as u64 + 1, "the oldest kept: its number shows the gap");
        // o's session ends: its observer goes, and there is room for h's.
        t.handle_timeout(at(20_001));
        assert!(t.sessions().all(|s| s.id != o.id));
        assert_eq!(t.sessions().count(), 0);
        let mut q = Client::open(&mut t, at(20_002), "q");
        let mut r = Client::open(&mut t, at(20_002), "r");
        assert!(matches!(
            q.send(&mut t, at(20_003), SessionOp::Observe { key: key("y") }),
            SessionReply::Observing { .. }
        ));
        assert!(matches!(
            r.send(&mut t, at(20_003), SessionOp::Observe { key: key("x") }),
            SessionReply::Observing { .. }
        ));
        assert_eq!(
            observed(&r.send(&mut t, at(20_004), SessionOp::KeepAlive)),
            Some((1, None)),
            "a new watch counts from 1"
        );
        assert_eq!(
            r.send(&mut t, at(20_005), SessionOp::Unobserve { key: key("x") }),
            SessionReply::Unobserved { key: key("x") }
        );
        assert_eq!(
            r.send(&mut t, at(20_006), SessionOp::KeepAlive),
            SessionReply::Alive { ttl: TTL, granted: None, more: false }
        );
    }

    #[test]
    fn an_unobserve_older_than_the_observe_leaves_the_observer_alone() {
        let mut t = Table::new(SessionLimits::default());
        let mut o = Client::open(&mut t, at(0), "o");
        let stale = o.req(SessionOp::Unobserve { key: key("x") });
        assert!(matches!(
            o.send(&mut t, at(1), SessionOp::Observe { key: key("x") }),
            SessionReply::Observing { .. }
        ));
        // Reordered on the way: the older unobserve arrives after the observe.
        assert_eq!(t.handle(at(2), &stale), SessionReply::Unobserved { key: key("x") });
        assert!(t.observes(o.id, &key("x")), "still observed");
        assert_eq!(
            o.send(&mut t, at(3), SessionOp::Unobserve { key: key("x") }),
            SessionReply::Unobserved { key: key("x") }
        );
        assert!(!t.observes(o.id, &key("x")));
    }
}
