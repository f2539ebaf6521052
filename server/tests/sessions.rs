//! Protocol v2 on the built-in server, over real HTTP on loopback: sessions, FIFO queues with
//! pushed grants, replay and forgery, expiry hand-off, restarts, bad input.

use std::net::SocketAddr;
use std::time::{Duration as StdDuration, Instant as StdInstant};

use leasehold_core::session::wire::{
    parse_label, Grant, Secret, Seq, SessionId, SessionOp, SessionReply, SessionRequest, SessionResponse,
};
use leasehold_core::{parse_key, Duration, Fence, Reject};
use serde_json::Value;

mod support;
use support::*;

/// A holder as the tests drive it by hand: its session, secret and next seq.
#[derive(Clone)]
struct Holder {
    addr: SocketAddr,
    id: SessionId,
    secret: Secret,
    seq: u64,
}

fn post_json(addr: SocketAddr, path: &str, body: &[u8]) -> Reply {
    request(addr, "POST", path, None, body)
}

fn response(r: &Reply) -> SessionResponse {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not a session response ({e}): {}", r.body))
}

fn open_request(ttl: Duration, label: &str) -> SessionRequest {
    SessionRequest {
        session: SessionId::NONE,
        secret: Secret::NONE,
        seq: Seq(1),
        op: SessionOp::Open { ttl, label: parse_label(label).unwrap() },
    }
}

fn open(addr: SocketAddr, ttl: Duration, label: &str) -> Holder {
    let r = post_json(addr, "/v2/sessions", &serde_json::to_vec(&open_request(ttl, label)).unwrap());
    assert_eq!(r.status, 200, "{}", r.body);
    let SessionReply::Opened { session, secret, ttl: granted } = response(&r).reply else {
        panic!("not opened: {}", r.body)
    };
    assert_eq!(granted, ttl);
    Holder { addr, id: session, secret, seq: 1 }
}

impl Holder {
    fn request(&mut self, op: SessionOp) -> SessionRequest {
        self.seq += 1;
        SessionRequest { session: self.id, secret: self.secret, seq: Seq(self.seq), op }
    }

    /// Sends `req` as it is; returns the status and the response.
    fn send_raw(&self, req: &SessionRequest, query: &str) -> (u16, SessionResponse) {
        let path = format!("/v2/sessions/{}{query}", req.session.0);
        let r = post_json(self.addr, &path, &serde_json::to_vec(req).unwrap());
        let resp = response(&r);
        assert_eq!((resp.session, resp.seq), (req.session, req.seq), "answers the request sent");
        (r.status, resp)
    }

    fn send(&mut self, op: SessionOp) -> SessionReply {
        let req = self.request(op);
        self.send_raw(&req, "").1.reply
    }

    /// A keepalive held up to `wait_ms` for news; returns the reply and how long it took.
    fn keepalive_waiting(&mut self, wait_ms: u64) -> (SessionReply, StdDuration) {
        let req = self.request(SessionOp::KeepAlive);
        let started = StdInstant::now();
        let (_, resp) = self.send_raw(&req, &format!("?wait_ms={wait_ms}"));
        (resp.reply, started.elapsed())
    }
}

fn acquire(key: &str, wait: bool) -> SessionOp {
    SessionOp::Acquire { key: parse_key(key).unwrap(), wait }
}

fn release(key: &str, fence: u64) -> SessionOp {
    SessionOp::Release { key: parse_key(key).unwrap(), fence: Fence(fence) }
}

fn granted(key: &str, fence: u64) -> SessionReply {
    SessionReply::Granted { key: parse_key(key).unwrap(), fence: Fence(fence) }
}

fn queued(key: &str, position: u16) -> SessionReply {
    SessionReply::Queued { key: parse_key(key).unwrap(), position }
}

/// The `GET /v2/leases` entry of `key`.
fn lease(addr: SocketAddr, key: &str) -> Value {
    leases(addr, &[key]).pop().unwrap()
}

/// The `GET /v2/leases` entries of `keys`, from one listing.
fn leases(addr: SocketAddr, keys: &[&str]) -> Vec<Value> {
    let list = get(addr, "/v2/leases").json();
    let all = list["leases"].as_array().unwrap();
    keys.iter().map(|k| all.iter().find(|l| l["key"] == *k).cloned().unwrap_or(Value::Null)).collect()
}

const TTL: Duration = Duration::from_secs(30);

#[test]
fn one_keepalive_renews_every_key_and_status_shows_labels_never_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let ttl = Duration::from_secs(10);
    let mut a = open(s.addr(), ttl, "worker-a");
    assert_eq!(a.send(acquire("x", false)), granted("x", 1));
    assert_eq!(a.send(acquire("y", false)), granted("y", 1));
    std::thread::sleep(StdDuration::from_secs(1));
    let before = leases(s.addr(), &["x", "y"]);
    let keepalives = metric(s.addr(), "leasehold_session_keepalives_total");
    assert_eq!(a.send(SessionOp::KeepAlive), SessionReply::Alive { ttl, granted: None, more: false });
    let after = leases(s.addr(), &["x", "y"]);
    assert_eq!(metric(s.addr(), "leasehold_session_keepalives_total"), keepalives + 1);
    for (b, a) in before.iter().zip(&after) {
        let remaining = |v: &Value| v["holder"]["remaining"].as_u64().unwrap();
        // Slept a second before the keepalive, asked at once after it.
        assert!(remaining(a) > remaining(b), "renewed by the one keepalive: {b} then {a}");
        assert_eq!(a["holder"]["label"], "worker-a");
        assert_eq!(a["holder"]["fence"], 1);
        assert_eq!(a["holder"]["ttl"], ttl.as_micros());
        assert_eq!(a["waiting"], 0);
    }
    assert_eq!(
        after[0]["holder"]["remaining"], after[1]["holder"]["remaining"],
        "the keys live as the session"
    );
    let list = get(s.addr(), "/v2/leases").body;
    assert!(!list.contains("secret"), "{list}");
    let secret_json = serde_json::to_string(&a.secret).unwrap();
    assert!(!list.contains(&secret_json[1..secret_json.len() - 1]), "{list}");
    // The v1 namespace is separate: the same key name is free there.
    let v1 = get(s.addr(), "/v1/leases/x");
    assert_eq!(v1.status, 404, "{}", v1.body);
}

#[test]
fn waiters_are_pushed_their_grants_in_fifo_order_and_held_keepalives_return_early() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let mut a = open(s.addr(), TTL, "a");
    let mut b = open(s.addr(), TTL, "b");
    let mut c = open(s.addr(), TTL, "c");
    assert_eq!(a.send(acquire("k", true)), granted("k", 1));
    let b_asked = Seq(b.seq + 1);
    assert_eq!(b.send(acquire("k", true)), queued("k", 1));
    let c_asked = Seq(c.seq + 1);
    assert_eq!(c.send(acquire("k", true)), queued("k", 2));
    assert_eq!(lease(s.addr(), "k")["waiting"], 2);

    // Without news a held keepalive waits out its bound (at least what was asked).
    let (reply, took) = b.keepalive_waiting(300);
    assert_eq!(reply, SessionReply::Alive { ttl: TTL, granted: None, more: false });
    assert!(took >= StdDuration::from_millis(300), "{took:?}");

    // Both waiters hold a keepalive for up to 10 s (a third of the ttl); each returns when the
    // key is handed to it, with the grant, in queue order.
    const WAIT_MS: u64 = 10_000;
    let (mut b2, mut c2) = (b.clone(), c.clone());
    let b_wait = std::thread::spawn(move || (b2.keepalive_waiting(WAIT_MS), b2));
    let c_wait = std::thread::spawn(move || (c2.keepalive_waiting(WAIT_MS), c2));
    std::thread::sleep(StdDuration::from_millis(200));
    assert_eq!(a.send(release("k", 1)), SessionReply::Released { key: parse_key("k").unwrap() });
    let ((reply, took), b2) = b_wait.join().unwrap();
    let pushed = Grant { key: parse_key("k").unwrap(), fence: Fence(2), asked: b_asked };
    assert_eq!(reply, SessionReply::Alive { ttl: TTL, granted: Some(pushed), more: false });
    assert!(
        took < StdDuration::from_millis(WAIT_MS),
        "returned early with the grant, not at its bound: {took:?}"
    );
    b = b2;
    assert_eq!(lease(s.addr(), "k")["holder"]["label"], "b");
    assert!(!c_wait.is_finished(), "c is still waiting: the key went to b");
    assert_eq!(b.send(acquire("k", true)), granted("k", 2), "confirmed with the pushed fence");
    assert_eq!(b.send(release("k", 2)), SessionReply::Released { key: parse_key("k").unwrap() });
    let ((reply, took), _) = c_wait.join().unwrap();
    let pushed = Grant { key: parse_key("k").unwrap(), fence: Fence(3), asked: c_asked };
    assert_eq!(reply, SessionReply::Alive { ttl: TTL, granted: Some(pushed), more: false });
    assert!(took < StdDuration::from_millis(WAIT_MS), "{took:?}");
    assert!(metric(s.addr(), "leasehold_session_pushed_total") >= 2);
}

#[test]
fn replays_change_nothing_and_a_forged_secret_is_unauthorized() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let mut a = open(s.addr(), TTL, "a");
    let acq = a.request(acquire("k", false));
    assert_eq!(a.send_raw(&acq, "").1.reply, granted("k", 1));
    assert_eq!(a.send(release("k", 1)), SessionReply::Released { key: parse_key("k").unwrap() });
    // The acquire again, byte for byte: ignored, the key stays free.
    let (status, resp) = a.send_raw(&acq, "");
    assert_eq!((status, resp.reply), (200, SessionReply::Replayed));
    assert_eq!(lease(s.addr(), "k")["holder"], Value::Null);
    assert_eq!(lease(s.addr(), "k")["last_fence"], 1);

    let mut b = open(s.addr(), TTL, "b");
    assert_eq!(b.send(acquire("k", false)), granted("k", 2));
    // a session id with a secret that is not its own: refused, nothing changes.
    let mut forged = a.request(release("k", 2));
    forged.session = b.id;
    forged.secret = Secret::from_bytes([7; 16]);
    let (status, resp) = a.send_raw(&forged, "");
    assert_eq!((status, resp.reply), (401, SessionReply::Rejected(Reject::Unauthorized)));
    let mut forged_close = forged.clone();
    forged_close.op = SessionOp::Close;
    assert_eq!(a.send_raw(&forged_close, "").1.reply, SessionReply::Rejected(Reject::Unauthorized));
    assert_eq!(lease(s.addr(), "k")["holder"]["label"], "b");
    assert_eq!(b.send(SessionOp::KeepAlive), SessionReply::Alive { ttl: TTL, granted: None, more: false });
}

#[test]
fn a_dead_sessions_keys_go_to_the_next_waiter_at_its_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let mut dead = open(s.addr(), Duration::from_millis(500), "dead");
    let mut b = open(s.addr(), TTL, "b");
    assert_eq!(dead.send(acquire("k1", false)), granted("k1", 1));
    assert_eq!(dead.send(acquire("k2", false)), granted("k2", 1));
    let asked = Seq(b.seq + 1);
    assert_eq!(b.send(acquire("k1", true)), queued("k1", 1));
    // `dead` never keeps alive: at its expiry both keys free at once and k1 is pushed to b.
    let (reply, took) = b.keepalive_waiting(10_000);
    let pushed = Grant { key: parse_key("k1").unwrap(), fence: Fence(2), asked };
    assert_eq!(reply, SessionReply::Alive { ttl: TTL, granted: Some(pushed), more: false });
    assert!(took < StdDuration::from_secs(10), "pushed at the expiry, not at the bound: {took:?}");
    assert_eq!(lease(s.addr(), "k2")["holder"], Value::Null);
    assert_eq!(dead.send(SessionOp::KeepAlive), SessionReply::Expired);
    assert!(metric(s.addr(), "leasehold_session_expiries_total") >= 1);
}

#[test]
fn a_restart_keeps_fences_increasing_and_sessions_recoverable() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b, old_acquire);
    {
        let s = server(dir.path());
        a = open(s.addr(), TTL, "a");
        b = open(s.addr(), TTL, "b");
        assert_eq!(a.send(acquire("k", false)), granted("k", 1));
        assert_eq!(a.send(release("k", 1)), SessionReply::Released { key: parse_key("k").unwrap() });
        old_acquire = a.request(acquire("k", false));
        assert_eq!(a.send_raw(&old_acquire, "").1.reply, granted("k", 2));
        assert_eq!(b.send(acquire("k", true)), queued("k", 1));
    }
    let s = server(dir.path());
    (a.addr, b.addr) = (s.addr(), s.addr());
    let k = lease(s.addr(), "k");
    assert_eq!(
        (k["holder"]["label"].clone(), k["holder"]["fence"].clone(), k["waiting"].clone()),
        ("a".into(), 2.into(), 1.into())
    );
    // Re-armed for a full ttl from the restart, and the replay window survived it.
    assert_eq!(a.send(SessionOp::KeepAlive), SessionReply::Alive { ttl: TTL, granted: None, more: false });
    assert_eq!(a.send_raw(&old_acquire, "").1.reply, SessionReply::Replayed);
    assert_eq!(a.send(release("k", 2)), SessionReply::Released { key: parse_key("k").unwrap() });
    assert_eq!(lease(s.addr(), "k")["holder"]["fence"], 3, "handed to b with the next fence");
    assert_eq!(b.send(acquire("k", true)), granted("k", 3));
    let c = open(s.addr(), TTL, "c");
    assert!(c.id.0 > b.id.0, "session ids never repeat: {:?} after {:?}", c.id, b.id);
    drop(s);
    // A second restart replays the first restart's inputs too.
    let s = server(dir.path());
    b.addr = s.addr();
    assert_eq!(lease(s.addr(), "k")["holder"]["fence"], 3);
    assert_eq!(b.send(release("k", 3)), SessionReply::Released { key: parse_key("k").unwrap() });
    let mut d = open(s.addr(), TTL, "d");
    assert_eq!(d.send(acquire("k", false)), granted("k", 4));
}

#[test]
fn bad_input_gets_typed_errors_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let a = s.addr();
    let code = |r: Reply| (r.status, r.error_code());
    assert_eq!(code(post_json(a, "/v2/sessions", b"{not json")), (400, "malformed_json".into()));
    assert_eq!(code(post_json(a, "/v2/sessions", br#"{"ttl":1}"#)), (400, "malformed_json".into()));
    // An absurd ttl, and none at all: the core's refusal, in its own schema.
    for ttl in [Duration::MAX, Duration::ZERO, Duration::from_secs(24 * 3600)] {
        let r = post_json(a, "/v2/sessions", &serde_json::to_vec(&open_request(ttl, "x")).unwrap());
        assert_eq!(
            (r.status, response(&r).reply),
            (400, SessionReply::Rejected(Reject::InvalidTtl)),
            "{ttl:?}"
        );
    }
    let mut h = open(a, TTL, "h");
    let ka = h.request(SessionOp::KeepAlive);
    let body = serde_json::to_vec(&ka).unwrap();
    let other = format!("/v2/sessions/{}", h.id.0 + 1);
    assert_eq!(code(post_json(a, &other, &body)), (400, "session_mismatch".into()));
    assert_eq!(code(post_json(a, "/v2/sessions", &body)), (400, "malformed_json".into()));
    let open_body = serde_json::to_vec(&open_request(TTL, "x")).unwrap();
    assert_eq!(
        code(post_json(a, &format!("/v2/sessions/{}", h.id.0), &open_body)),
        (400, "malformed_json".into())
    );
    assert_eq!(code(post_json(a, "/v2/sessions/abc", &body)), (404, "not_found".into()));
    assert_eq!(code(post_json(a, "/v2/sessions/0", &body)), (404, "not_found".into()));
    assert_eq!(code(get(a, "/v2/sessions")), (405, "method_not_allowed".into()));
    let path = format!("/v2/sessions/{}?wait_ms=soon", h.id.0);
    assert_eq!(code(post_json(a, &path, &body)), (400, "invalid_query".into()));
    assert_eq!(code(get(a, "/v2/leases?held=maybe")), (400, "invalid_query".into()));
    let huge = vec![b'x'; leasehold_server::MAX_BODY + 1];
    assert_eq!(code(post_json(a, "/v2/sessions", &huge)), (413, "body_too_large".into()));
    // A session that never existed.
    let mut ghost = h.clone();
    ghost.id = SessionId(9_999);
    assert_eq!(ghost.send(SessionOp::KeepAlive), SessionReply::Expired);
    // None of that burnt the holder's seqs or changed its session.
    assert_eq!(h.send_raw(&ka, "").1.reply, SessionReply::Alive { ttl: TTL, granted: None, more: false });
    let mut bad_key = leasehold_core::Key::new();
    bad_key.push_str("a b").unwrap();
    let (status, resp) = {
        let req = h.request(SessionOp::Acquire { key: bad_key, wait: false });
        h.send_raw(&req, "")
    };
    assert_eq!((status, resp.reply), (400, SessionReply::Rejected(Reject::InvalidKey)));
    assert_eq!(get(a, "/v2/leases").json()["leases"], serde_json::json!([]));
}

#[test]
fn a_flood_of_opens_is_refused_with_capacity_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let addr = s.addr();
    let max = leasehold_server::MAX_SESSIONS;
    const THREADS: usize = 32;
    let per_thread = max / THREADS + 8;
    // Long enough that no session expires during the flood (it took 69 s at load 13 on 2
    // cores, past a 30 s ttl): every open past the capacity must be refused.
    let body = serde_json::to_vec(&open_request(Duration::from_secs(240), "flood")).unwrap();
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || {
                let (mut opened, mut refused) = (0usize, 0usize);
                for _ in 0..per_thread {
                    let r = post_json(addr, "/v2/sessions", &body);
                    match (r.status, response(&r).reply) {
                        (200, SessionReply::Opened { .. }) => opened += 1,
                        (507, SessionReply::Rejected(Reject::Capacity)) => refused += 1,
                        other => panic!("unexpected answer to an open: {other:?}"),
                    }
                }
                (opened, refused)
            })
        })
        .collect();
    let (opened, refused) =
        threads.into_iter().map(|t| t.join().unwrap()).fold((0, 0), |(o, r), (a, b)| (o + a, r + b));
    assert_eq!(opened, max, "exactly the capacity opened");
    assert_eq!(refused, THREADS * per_thread - max);
    assert_eq!(metric(addr, "leasehold_sessions_live"), max as u64);
    assert_eq!(get(addr, "/healthz").status, 200, "still serving");
}

fn acquire_n(key: &str, wait: bool, limit: u16) -> SessionOp {
    SessionOp::AcquireWithLimit { key: parse_key(key).unwrap(), wait, limit }
}

#[test]
fn a_semaphore_admits_its_limit_pushes_freed_slots_in_order_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b, mut c, mut d);
    let c_asked;
    {
        let s = server(dir.path());
        a = open(s.addr(), TTL, "a");
        b = open(s.addr(), TTL, "b");
        c = open(s.addr(), TTL, "c");
        d = open(s.addr(), TTL, "d");
        assert_eq!(a.send(acquire_n("pool", true, 2)), granted("pool", 1));
        assert_eq!(b.send(acquire_n("pool", true, 2)), granted("pool", 2));
        c_asked = Seq(c.seq + 1);
        assert_eq!(c.send(acquire_n("pool", true, 2)), queued("pool", 1));
        // Another limit, or a plain lease of the key, is refused while it has holders.
        for op in [acquire_n("pool", true, 3), acquire("pool", true)] {
            let req = d.request(op);
            let (status, resp) = d.send_raw(&req, "");
            assert_eq!((status, resp.reply), (409, SessionReply::Rejected(Reject::LimitMismatch)));
        }
        let pool = lease(s.addr(), "pool");
        assert_eq!((pool["limit"].clone(), pool["waiting"].clone()), (2.into(), 1.into()));
        let fences: Vec<_> = pool["holders"].as_array().unwrap().iter().map(|h| h["fence"].clone()).collect();
        assert_eq!(fences, [Value::from(1), Value::from(2)]);
        assert_eq!(pool["holder"]["label"], "a", "the oldest grant");
    }
    // The log replays the semaphore: both holders, the queue, the fence counter.
    let s = server(dir.path());
    for h in [&mut a, &mut b, &mut c, &mut d] {
        h.addr = s.addr();
    }
    let pool = lease(s.addr(), "pool");
    let labels: Vec<_> = pool["holders"].as_array().unwrap().iter().map(|h| h["label"].clone()).collect();
    assert_eq!(labels, [Value::from("a"), Value::from("b")]);
    assert_eq!(pool["waiting"], 1);
    // c's held keepalive returns with the slot b frees, under the next fence.
    let mut c2 = c.clone();
    let c_wait = std::thread::spawn(move || c2.keepalive_waiting(10_000));
    std::thread::sleep(StdDuration::from_millis(200));
    assert_eq!(b.send(release("pool", 2)), SessionReply::Released { key: parse_key("pool").unwrap() });
    let (reply, took) = c_wait.join().unwrap();
    let pushed = Grant { key: parse_key("pool").unwrap(), fence: Fence(3), asked: c_asked };
    assert_eq!(reply, SessionReply::Alive { ttl: TTL, granted: Some(pushed), more: false });
    assert!(took < StdDuration::from_secs(10), "pushed, not at the bound: {took:?}");
    c.seq += 1;
    assert_eq!(c.send(acquire_n("pool", true, 2)), granted("pool", 3), "confirmed with the limit");
    assert!(matches!(d.send(acquire_n("pool", false, 2)), SessionReply::Busy { .. }), "both slots held");
}

#[test]
fn one_key_queues_more_waiters_than_a_key_record_used_to_hold() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let mut holder = open(s.addr(), TTL, "holder");
    assert_eq!(holder.send(acquire("k", true)), granted("k", 1));
    // 32 waiters per key was the inline limit; the shared pool takes 200 and more.
    let mut waiters: Vec<Holder> = (0..200).map(|i| open(s.addr(), TTL, &format!("w{i}"))).collect();
    for (i, w) in waiters.iter_mut().enumerate() {
        assert_eq!(w.send(acquire("k", true)), queued("k", i as u16 + 1));
    }
    assert_eq!(lease(s.addr(), "k")["waiting"], 200);
    assert_eq!(holder.send(release("k", 1)), SessionReply::Released { key: parse_key("k").unwrap() });
    assert_eq!(lease(s.addr(), "k")["holder"]["label"], "w0", "the head of the queue");
    assert_eq!(waiters[0].send(acquire("k", true)), granted("k", 2));
}

fn observe(key: &str) -> SessionOp {
    SessionOp::Observe { key: parse_key(key).unwrap() }
}

/// The change an `AliveObserved` carries: its number and the holder's label, fence and value.
fn change_of(reply: &SessionReply) -> (u64, Option<(String, u64, String)>) {
    let SessionReply::AliveObserved { observed, .. } = reply else { panic!("no change: {reply:?}") };
    let holder = observed.holder.as_ref().map(|h| (h.label.to_string(), h.fence.0, h.value.to_string()));
    (observed.change, holder)
}

impl Holder {
    /// A keepalive acknowledging `change` of `key`, held up to `wait_ms` for the next change.
    fn seen_waiting(&mut self, key: &str, change: u64, wait_ms: u64) -> (SessionReply, StdDuration) {
        let req = self.request(SessionOp::KeepAliveSeen { key: parse_key(key).unwrap(), change });
        let started = StdInstant::now();
        let (_, resp) = self.send_raw(&req, &format!("?wait_ms={wait_ms}"));
        (resp.reply, started.elapsed())
    }
}

#[test]
fn an_observers_held_keepalive_returns_early_with_each_change_and_observing_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let value = |v: &str| leasehold_core::session::wire::parse_value(v).unwrap();
    let mut o;
    let mut b;
    {
        let s = server(dir.path());
        let mut a = open(s.addr(), TTL, "a");
        b = open(s.addr(), TTL, "b");
        o = open(s.addr(), TTL, "o");
        let op =
            SessionOp::AcquireWithValue { key: parse_key("k").unwrap(), wait: true, value: value("a:1") };
        assert_eq!(a.send(op), granted("k", 1));
        assert_eq!(lease(s.addr(), "k")["holder"]["value"], "a:1");
        let op =
            SessionOp::AcquireWithValue { key: parse_key("k").unwrap(), wait: true, value: value("b:2") };
        assert_eq!(b.send(op), queued("k", 1));
        assert_eq!(o.send(observe("k")), SessionReply::Observing { key: parse_key("k").unwrap() });
        // Not acknowledged yet: a held keepalive answers at once with the current holder.
        let (reply, took) = o.keepalive_waiting(10_000);
        assert_eq!(change_of(&reply), (1, Some(("a".into(), 1, "a:1".into()))));
        assert!(took < StdDuration::from_millis(10_000), "{took:?}");
        // Acknowledged: held until the next change, which comes when a releases.
        const WAIT_MS: u64 = 10_000;
        let mut o2 = o.clone();
        let wait = std::thread::spawn(move || (o2.seen_waiting("k", 1, WAIT_MS), o2));
        std::thread::sleep(StdDuration::from_millis(200));
        assert!(!wait.is_finished(), "held: nothing changed yet");
        assert_eq!(a.send(release("k", 1)), SessionReply::Released { key: parse_key("k").unwrap() });
        let ((reply, took), o2) = wait.join().unwrap();
        o = o2;
        assert_eq!(change_of(&reply), (2, Some(("b".into(), 2, "b:2".into()))));
        assert!(took < StdDuration::from_millis(WAIT_MS), "returned early with the change: {took:?}");
        assert!(metric(s.addr(), "leasehold_session_observed_total") >= 2);
    }
    // The observer is part of the logged state: after a restart the next change still comes.
    let s = server(dir.path());
    (o.addr, b.addr) = (s.addr(), s.addr());
    assert_eq!(b.send(acquire("k", true)), granted("k", 2));
    assert_eq!(b.send(release("k", 2)), SessionReply::Released { key: parse_key("k").unwrap() });
    let (reply, _) = o.seen_waiting("k", 2, 10_000);
    assert_eq!(change_of(&reply), (3, None), "free after b's release");
    let (reply, took) = o.seen_waiting("k", 3, 300);
    assert_eq!(reply, SessionReply::Alive { ttl: TTL, granted: None, more: false });
    assert!(took >= StdDuration::from_millis(300), "held its whole bound without a change: {took:?}");
}

#[test]
fn a_server_on_several_threads_grants_a_key_once_among_racing_sessions_and_closes_its_store_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let racers = 16;
    let winners = {
        let s = server_with(dir.path(), |c| c.threads = 4);
        let addr = s.addr();
        let holders: Vec<Holder> = (0..racers).map(|i| open(addr, TTL, &format!("r{i}"))).collect();
        // Each on its own connection and thread, so the server's threads parse them at once.
        let replies: Vec<SessionReply> = std::thread::scope(|scope| {
            let runs: Vec<_> = holders
                .into_iter()
                .map(|mut h| scope.spawn(move || (h.send(acquire("contested", false)), h)))
                .collect();
            runs.into_iter().map(|r| r.join().unwrap().0).collect()
        });
        let winners: Vec<&SessionReply> =
            replies.iter().filter(|r| matches!(r, SessionReply::Granted { .. })).collect();
        assert_eq!(winners.len(), 1, "one grant among racers: {replies:?}");
        assert_eq!(*winners[0], granted("contested", 1));
        assert!(
            replies.iter().all(|r| matches!(r, SessionReply::Granted { .. } | SessionReply::Busy { .. })),
            "the others are refused Busy: {replies:?}"
        );
        winners.len()
    };
    // The dropped server's worker threads are joined and its log closed: redb refuses to open
    // a file this process still has open, so a second server on the directory proves it.
    let s = server(dir.path());
    let k = lease(s.addr(), "contested");
    assert_eq!((k["holder"]["fence"].clone(), winners), (1.into(), 1));
}
