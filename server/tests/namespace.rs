//! v1 leases and v2 sessions share one key namespace on the built-in server, over real HTTP
//! on loopback: a key is never held under both, v2 waiters queue behind a v1 lease and are
//! pushed the grant at its release or expiry, and fences increase across both protocols and
//! across restarts.

use std::net::SocketAddr;
use std::time::{Duration as StdDuration, Instant as StdInstant};

use leasehold_core::session::wire::{
    parse_label, Grant, Secret, Seq, SessionId, SessionOp, SessionReply, SessionRequest, SessionResponse,
};
use leasehold_core::{parse_key, Duration, Fence};
use serde_json::{json, Value};

mod support;
use support::*;

/// A session driven by hand.
struct Holder {
    addr: SocketAddr,
    id: SessionId,
    secret: Secret,
    seq: u64,
}

fn post_json(addr: SocketAddr, path: &str, body: &[u8]) -> Reply {
    request(addr, "POST", path, None, body)
}

fn open(addr: SocketAddr, ttl: Duration, label: &str) -> Holder {
    let open = SessionRequest {
        session: SessionId::NONE,
        secret: Secret::NONE,
        seq: Seq(1),
        op: SessionOp::Open { ttl, label: parse_label(label).unwrap() },
    };
    let r = post_json(addr, "/v2/sessions", &serde_json::to_vec(&open).unwrap());
    let resp: SessionResponse = serde_json::from_str(&r.body).unwrap();
    let SessionReply::Opened { session, secret, .. } = resp.reply else { panic!("not opened: {}", r.body) };
    Holder { addr, id: session, secret, seq: 1 }
}

impl Holder {
    fn next(&mut self, op: SessionOp) -> SessionRequest {
        self.seq += 1;
        SessionRequest { session: self.id, secret: self.secret, seq: Seq(self.seq), op }
    }

    fn send_query(&mut self, op: SessionOp, query: &str) -> SessionReply {
        let req = self.next(op);
        let r = post_json(
            self.addr,
            &format!("/v2/sessions/{}{query}", self.id.0),
            &serde_json::to_vec(&req).unwrap(),
        );
        let resp: SessionResponse = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("not a session response ({e}): {}", r.body));
        resp.reply
    }

    fn send(&mut self, op: SessionOp) -> SessionReply {
        self.send_query(op, "")
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

/// A v1 request's reply.
fn v1(addr: SocketAddr, key: &str, owner: u64, op: Value) -> Value {
    let body = json!({"id": 1, "owner": owner, "op": op});
    let r = request(addr, "POST", &format!("/v1/leases/{key}"), None, body.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["reply"].clone()
}

fn v1_acquire(addr: SocketAddr, key: &str, owner: u64, ttl: StdDuration) -> Value {
    v1(addr, key, owner, json!({"acquire": {"ttl": ttl.as_micros() as u64}}))
}

fn v1_release(addr: SocketAddr, key: &str, owner: u64, fence: u64) -> Value {
    v1(addr, key, owner, json!({"release": {"fence": fence}}))
}

/// The fence of a v1 grant.
fn v1_fence(reply: &Value) -> u64 {
    reply["granted"]["fence"]
        .as_u64()
        .or(reply["granted_after_expiry"]["fence"].as_u64())
        .unwrap_or_else(|| panic!("not granted: {reply}"))
}

const TTL: Duration = Duration::from_secs(60);
const V1_TTL: StdDuration = StdDuration::from_secs(30);

#[test]
fn a_v1_lease_and_a_v2_session_exclude_each_other_in_both_orders() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let mut a = open(s.addr(), TTL, "a");

    // v1 first: the session is refused, told how long the lease has left.
    assert_eq!(v1_fence(&v1_acquire(s.addr(), "k", 7, V1_TTL)), 1);
    let SessionReply::Busy { expires_in, .. } = a.send(acquire("k", false)) else {
        panic!("granted under v1")
    };
    assert!(expires_in > Duration::ZERO && expires_in <= V1_TTL.into(), "{expires_in:?}");
    assert_eq!(v1_release(s.addr(), "k", 7, 1), json!("released"));

    // v2 first: v1 is refused, and its fence continues above v1's.
    assert_eq!(a.send(acquire("k", false)), granted("k", 2));
    let busy = v1_acquire(s.addr(), "k", 8, V1_TTL);
    let retry = busy["busy"]["retry_after"].as_u64().unwrap_or_else(|| panic!("v1 granted under v2: {busy}"));
    assert!(retry > 0 && retry <= TTL.as_micros(), "{busy}");
    // A renewal of a lease a session holds is refused too.
    assert_eq!(v1(s.addr(), "k", 7, json!({"renew": {"fence": 1, "ttl": 1_000_000}})), json!("not_holder"));
    assert_eq!(a.send(release("k", 2)), SessionReply::Released { key: parse_key("k").unwrap() });
    assert_eq!(v1_fence(&v1_acquire(s.addr(), "k", 8, V1_TTL)), 3, "above the v2 fence");

    // Sessions queued behind a v1 lease are first in line: a second v1 owner is busy, and the
    // v1 holder's release goes to the queue.
    let mut b = open(s.addr(), TTL, "b");
    assert_eq!(
        b.send(acquire("k", true)),
        SessionReply::Queued { key: parse_key("k").unwrap(), position: 1 }
    );
    assert!(v1_acquire(s.addr(), "k", 9, V1_TTL)["busy"].is_object());
    assert_eq!(v1_release(s.addr(), "k", 8, 3), json!("released"));
    assert_eq!(b.send(acquire("k", true)), granted("k", 4));
    assert!(v1_acquire(s.addr(), "k", 9, V1_TTL)["busy"].is_object(), "v2 holds it now");
}

#[test]
fn a_v2_waiter_is_pushed_the_grant_when_a_v1_holder_releases() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let addr = s.addr();
    assert_eq!(v1_fence(&v1_acquire(addr, "k", 7, V1_TTL)), 1);
    let mut b = open(addr, TTL, "b");
    let asked = Seq(b.seq + 1);
    assert_eq!(
        b.send(acquire("k", true)),
        SessionReply::Queued { key: parse_key("k").unwrap(), position: 1 }
    );
    // The keepalive is held (up to 20 s) until the grant is pushed; the release comes
    // from another thread, before or while it is held.
    let waiter = std::thread::spawn(move || {
        let started = StdInstant::now();
        let reply = b.send_query(SessionOp::KeepAlive, "?wait_ms=20000");
        (reply, started.elapsed())
    });
    assert_eq!(v1_release(addr, "k", 7, 1), json!("released"));
    let (reply, took) = waiter.join().unwrap();
    let pushed = Grant { key: parse_key("k").unwrap(), fence: Fence(2), asked };
    assert_eq!(reply, SessionReply::Alive { ttl: TTL, granted: Some(pushed), more: false });
    assert!(took < StdDuration::from_secs(15), "pushed at the release, not at the hold's end: {took:?}");
}

#[test]
fn a_v2_waiter_is_pushed_the_grant_when_a_v1_lease_expires_and_not_before() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let addr = s.addr();
    let mut b = open(addr, TTL, "b");
    let v1_ttl = StdDuration::from_millis(1500);
    let sent = StdInstant::now();
    assert_eq!(v1_fence(&v1_acquire(addr, "k", 7, v1_ttl)), 1);
    let asked = Seq(b.seq + 1);
    assert_eq!(
        b.send(acquire("k", true)),
        SessionReply::Queued { key: parse_key("k").unwrap(), position: 1 }
    );
    // Held keepalives until the grant comes (each hold ends by 20 s at most).
    let reply =
        within(30, "the grant is pushed", || match b.send_query(SessionOp::KeepAlive, "?wait_ms=20000") {
            r @ SessionReply::Alive { granted: Some(_), .. } => Some(r),
            _ => None,
        });
    let pushed_by = sent.elapsed();
    let pushed = Grant { key: parse_key("k").unwrap(), fence: Fence(2), asked };
    assert_eq!(reply, SessionReply::Alive { ttl: TTL, granted: Some(pushed), more: false });
    // The v1 lease ran from when the server decided, after `sent`: it had not expired before
    // `sent + ttl`, and the grant was made, then answered, after its expiry.
    assert!(
        pushed_by >= v1_ttl,
        "granted {pushed_by:?} after the v1 acquire was sent, before its {v1_ttl:?} expiry"
    );
    // The late v1 holder can neither renew nor take it back.
    assert_eq!(v1(addr, "k", 7, json!({"renew": {"fence": 1, "ttl": 1_000_000}})), json!("not_holder"));
    assert!(v1_acquire(addr, "k", 7, V1_TTL)["busy"].is_object());
}

#[test]
fn fences_increase_across_both_protocols_and_restarts_and_a_v1_lease_survives_one() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = server(dir.path());
        assert_eq!(v1_fence(&v1_acquire(s.addr(), "k", 7, V1_TTL)), 1);
        assert_eq!(v1_release(s.addr(), "k", 7, 1), json!("released"));
        let mut a = open(s.addr(), TTL, "a");
        assert_eq!(a.send(acquire("k", false)), granted("k", 2));
        assert_eq!(a.send(release("k", 2)), SessionReply::Released { key: parse_key("k").unwrap() });
    }
    {
        let s = server(dir.path());
        assert_eq!(v1_fence(&v1_acquire(s.addr(), "k", 8, V1_TTL)), 3, "above the v2 fence, after a restart");
        // Held under v1 across the next restart.
    }
    let s = server(dir.path());
    let mut c = open(s.addr(), TTL, "c");
    assert!(
        matches!(c.send(acquire("k", false)), SessionReply::Busy { .. }),
        "the v1 lease survived the restart, for v2 too"
    );
    assert_eq!(v1_release(s.addr(), "k", 8, 3), json!("released"));
    assert_eq!(c.send(acquire("k", false)), granted("k", 4));
    assert_eq!(c.send(release("k", 4)), SessionReply::Released { key: parse_key("k").unwrap() });
    drop(s);
    let s = server(dir.path());
    assert_eq!(v1_fence(&v1_acquire(s.addr(), "k", 9, V1_TTL)), 5, "above the v2 fence of a session gone");
}

#[test]
fn a_start_tells_the_sessions_what_v1_holds_even_with_the_session_log_gone() {
    // What a crash between a v1 grant and its hold reaching the session log leaves, at its
    // worst: the session log knows nothing of v1. The start rebuilds that from v1's records.
    let dir = tempfile::tempdir().unwrap();
    {
        let s = server(dir.path());
        assert_eq!(v1_fence(&v1_acquire(s.addr(), "held", 7, V1_TTL)), 1);
        assert_eq!(v1_fence(&v1_acquire(s.addr(), "free", 7, V1_TTL)), 1);
        assert_eq!(v1_fence(&v1_acquire(s.addr(), "free", 7, V1_TTL)), 2, "re-acquired: a new fence");
        assert_eq!(v1_release(s.addr(), "free", 7, 2), json!("released"));
    }
    std::fs::remove_file(dir.path().join("sessions.redb")).unwrap();
    let s = server(dir.path());
    let mut a = open(s.addr(), TTL, "a");
    assert!(matches!(a.send(acquire("held", false)), SessionReply::Busy { .. }), "granted under v1's lease");
    assert_eq!(a.send(acquire("free", false)), granted("free", 3), "above v1's fences");
    assert_eq!(v1_release(s.addr(), "held", 7, 1), json!("released"));
    assert_eq!(a.send(acquire("held", false)), granted("held", 2));
}

/// Failures of the session log between a v1 hold and v1's answer, and the order they rule out
/// (see the server's `namespace` module): `cargo test -p leasehold-server --features
/// fault-injection --test namespace faults`.
#[cfg(feature = "fault-injection")]
mod faults {
    use super::*;
    use leasehold_server::{RunningServer, Server, ServerConfig, ServerFaults};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A v1 acquire's reply: its HTTP status and body.
    fn v1_try_acquire(addr: SocketAddr, key: &str, owner: u64) -> Reply {
        let body = json!({"id": 1, "owner": owner, "op": {"acquire": {"ttl": V1_TTL.as_micros() as u64}}});
        request(addr, "POST", &format!("/v1/leases/{key}"), None, body.to_string().as_bytes())
    }

    impl Holder {
        /// `op`'s reply, or `None` while the session log answers unavailable.
        fn try_send(&mut self, op: SessionOp) -> Option<SessionReply> {
            let req = self.next(op);
            let path = format!("/v2/sessions/{}", self.id.0);
            let r = post_json(self.addr, &path, &serde_json::to_vec(&req).unwrap());
            match r.status {
                200 => Some(serde_json::from_str::<SessionResponse>(&r.body).unwrap().reply),
                503 => None,
                other => panic!("{other}: {}", r.body),
            }
        }
    }

    /// A server whose session-log commits of v1 holds and sets fail while the switch is on.
    fn faulty(dir: &std::path::Path, plant: bool) -> (RunningServer, Arc<AtomicBool>) {
        let switch = Arc::new(AtomicBool::new(false));
        let faults = ServerFaults {
            fail_v1_session_commits: switch.clone(),
            v1_answers_before_its_hold_is_durable: plant,
        };
        (server_with(dir, |c| c.faults = faults), switch)
    }

    /// The failure a cheaper order must survive: the hold's commit fails, so the session table
    /// is rebuilt from its log without the hold, and a session is granted the key before v1's
    /// set can land. v1 decided (and may have stored) a grant meanwhile: it must not have
    /// answered it. Returns v1's reply and the session's grant.
    fn hold_lost_in_a_rebuild(plant: bool) -> (Reply, SessionReply) {
        let dir = tempfile::tempdir().unwrap();
        let (s, switch) = faulty(dir.path(), plant);
        let mut a = open(s.addr(), TTL, "a");
        switch.store(true, Ordering::Relaxed);
        let v1 = v1_try_acquire(s.addr(), "k", 7);
        // The rebuilt table lacks the hold, and v1's set keeps failing: the key looks free.
        let session = within(10, "the session's acquire answered", || a.try_send(acquire("k", false)));
        switch.store(false, Ordering::Relaxed);
        (v1, session)
    }

    #[test]
    fn faults_a_v1_grant_is_answered_only_once_its_hold_is_durable() {
        let (v1, session) = hold_lost_in_a_rebuild(false);
        assert_eq!(session, granted("k", 1), "the rebuilt table lacks the failed hold");
        assert_eq!(v1.status, 503, "v1 answered while its hold was not on disk: {}", v1.body);
        assert_eq!(v1.error_code(), "unavailable", "{}", v1.body);
    }

    #[test]
    fn faults_planted_a_v1_grant_answered_before_its_hold_is_durable_is_caught() {
        let (v1, session) = hold_lost_in_a_rebuild(true);
        assert_eq!(v1.status, 200, "{}", v1.body);
        let both =
            v1.json()["reply"]["granted"].is_object() && matches!(session, SessionReply::Granted { .. });
        assert!(
            both,
            "the planted bug should grant the key under both protocols: v1 {}, v2 {session:?}",
            v1.body
        );
    }

    #[test]
    fn faults_after_a_lost_hold_v1_record_and_sessions_agree_again_and_fences_rise() {
        let dir = tempfile::tempdir().unwrap();
        let (s, switch) = faulty(dir.path(), false);
        let mut a = open(s.addr(), TTL, "a");
        switch.store(true, Ordering::Relaxed);
        assert_eq!(v1_try_acquire(s.addr(), "k", 7).status, 503);
        let fence = match within(10, "the session's acquire answered", || a.try_send(acquire("k", false))) {
            SessionReply::Granted { fence, .. } => fence.0,
            other => panic!("{other:?}"),
        };
        switch.store(false, Ordering::Relaxed);
        // v1 stored an unanswered grant of fence 1 for owner 7; its set lands now, beside the
        // session's grant. Neither v1 owner may have the key while the session holds it.
        let r = within(10, "v1's set on disk", || {
            let r = v1_try_acquire(s.addr(), "k", 7);
            (r.status == 200).then_some(r)
        });
        assert!(r.json()["reply"]["busy"].is_object(), "{}", r.body);
        assert!(v1_acquire(s.addr(), "k", 8, V1_TTL)["busy"].is_object());
        assert_eq!(a.send(release("k", fence)), SessionReply::Released { key: parse_key("k").unwrap() });
        // Owner 7's record says it holds the key: its acquire is granted again, above both.
        let again = v1_fence(&v1_acquire(s.addr(), "k", 7, V1_TTL));
        assert!(again > fence && again > 1, "fence {again} not above v2's {fence} and v1's 1");
    }

    #[test]
    fn faults_a_set_whose_commit_failed_keeps_the_key_from_sessions_until_v1_truth_lands() {
        let dir = tempfile::tempdir().unwrap();
        let (s, switch) = faulty(dir.path(), false);
        let mut a = open(s.addr(), TTL, "a");
        assert_eq!(v1_fence(&v1_acquire(s.addr(), "k", 7, V1_TTL)), 1);
        switch.store(true, Ordering::Relaxed);
        // Answered before its set, whose commit then fails (and its retries, while the switch
        // is on): the rebuilt table still has the grant's hold, so sessions are refused.
        assert_eq!(v1_release(s.addr(), "k", 7, 1), json!("released"));
        within(10, "a failed session commit", || {
            (metric(s.addr(), "leasehold_session_log_failures_total") > 0).then_some(())
        });
        let busy = within(10, "the session's acquire answered", || a.try_send(acquire("k", false)));
        assert!(
            matches!(busy, SessionReply::Busy { .. }),
            "granted before v1's release reached the log: {busy:?}"
        );
        switch.store(false, Ordering::Relaxed);
        // The retry tells the sessions what v1 holds by then: free, well before the lease's 30 s.
        let fence = within(10, "the key free for sessions", || match a.try_send(acquire("k", false)) {
            Some(SessionReply::Granted { fence, .. }) => Some(fence),
            _ => None,
        });
        assert_eq!(fence, Fence(2));
        assert!(v1_acquire(s.addr(), "k", 8, V1_TTL)["busy"].is_object());
    }

    #[test]
    fn faults_a_restart_after_a_hold_that_never_reached_the_log_restores_it_from_v1() {
        // The crash between v1's commit and its hold's: v1's record is on disk, the log has
        // neither the hold nor the set.
        let dir = tempfile::tempdir().unwrap();
        {
            let (s, switch) = faulty(dir.path(), false);
            switch.store(true, Ordering::Relaxed);
            assert_eq!(v1_try_acquire(s.addr(), "k", 7).status, 503);
        }
        // A commit the stopped server's session writer had under way on the blocking pool
        // (a rebuild of the table, failing again) may keep the log open a moment longer.
        let s = within(10, "the stopped server's logs closed", || {
            Server::spawn(ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap())).ok()
        });
        let mut a = open(s.addr(), TTL, "a");
        assert!(
            matches!(a.send(acquire("k", false)), SessionReply::Busy { .. }),
            "granted under v1's record"
        );
        let fence = v1_fence(&v1_acquire(s.addr(), "k", 7, V1_TTL));
        assert_eq!(v1_release(s.addr(), "k", 7, fence), json!("released"));
        assert_eq!(a.send(acquire("k", false)), granted("k", fence + 1));
    }
}
