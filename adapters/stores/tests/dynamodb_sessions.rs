//! Protocol v2 on DynamoDB: `SessionClient` (and the backend called directly, where the test
//! must control the holder's timing) over `DynamoSessions` against real dynalite on loopback
//! (`cd tools/dynalite && npm ci`), with the table read directly to see what it keeps.

use std::time::{Duration, Instant};

use futures_lite::future;
use leasehold_core::session::wire::{
    parse_label, Secret, Seq, SessionId, SessionOp, SessionReply, SessionRequest,
};
use leasehold_core::{
    parse_key, Duration as LDuration, Fence, Op, OwnerId, Reject, Reply, Request, RequestId,
};
use leasehold_http::{AcquireError, Backend, Health, LostReason, Options, SessionBackend, SessionClient};
use leasehold_stores::{DynamoDbBackend, DynamoFault, DynamoSessions};
use leasehold_test_servers::dynalite;
use serde_json::{json, Value};

mod common;
use common::{creds, dynamo_raw, sleep, within};

const TABLE: &str = "leases";

fn sessions(url: &str, ttl_ms: u64, fault: Option<DynamoFault>) -> (DynamoSessions, Options) {
    let options = Options::session(Duration::from_millis(ttl_ms));
    let mut b = DynamoSessions::new(url, "us-east-1", TABLE, creds(), &options.config).unwrap();
    if let Some(f) = fault {
        b = b.with_fault(f);
    }
    (b, options)
}

fn client_with(url: &str, label: &str, ttl_ms: u64, fault: Option<DynamoFault>) -> SessionClient {
    let (b, options) = sessions(url, ttl_ms, fault);
    SessionClient::new(b, label, options).unwrap()
}

fn client(url: &str, label: &str, ttl_ms: u64) -> SessionClient {
    client_with(url, label, ttl_ms, None)
}

fn v1(url: &str) -> DynamoDbBackend {
    DynamoDbBackend::new(url, "us-east-1", TABLE, creds(), Duration::from_secs(2)).unwrap()
}

/// Makes the table (once per dynalite).
fn setup(url: &str) {
    smol::block_on(v1(url).create_table()).unwrap();
}

/// `key`'s item as the table has it.
async fn item(url: &str, key: &str) -> Value {
    let body = json!({"TableName": TABLE, "Key": {"key": {"S": key}}, "ConsistentRead": true});
    let (status, v) = dynamo_raw(url, "GetItem", body).await;
    assert_eq!(status, 200);
    v["Item"].clone()
}

fn n(v: &Value, attr: &str) -> u64 {
    v[attr]["N"].as_str().unwrap_or_else(|| panic!("{attr} in {v}")).parse().unwrap()
}

/// A session driven by hand, so a test decides when (and whether) it keeps alive.
struct Raw<'a> {
    backend: &'a DynamoSessions,
    session: SessionId,
    secret: Secret,
    seq: u64,
}

impl<'a> Raw<'a> {
    async fn open(backend: &'a DynamoSessions, ttl_ms: u64, label: &str) -> Raw<'a> {
        let mut raw = Raw { backend, session: SessionId::NONE, secret: Secret::NONE, seq: 0 };
        let op = SessionOp::Open { ttl: LDuration::from_millis(ttl_ms), label: parse_label(label).unwrap() };
        let SessionReply::Opened { session, secret, .. } = raw.call(op).await else { panic!("not opened") };
        (raw.session, raw.secret) = (session, secret);
        raw
    }

    async fn call(&mut self, op: SessionOp) -> SessionReply {
        self.seq += 1;
        let req = SessionRequest { session: self.session, secret: self.secret, seq: Seq(self.seq), op };
        let resp = self.backend.call(req, Duration::ZERO).await.expect("dynalite answers");
        assert_eq!(resp.seq, Seq(self.seq));
        resp.reply
    }

    async fn acquire(&mut self, key: &str) -> Fence {
        match self.call(SessionOp::Acquire { key: parse_key(key).unwrap(), wait: false }).await {
            SessionReply::Granted { fence, .. } => fence,
            other => panic!("acquire {key}: {other:?}"),
        }
    }
}

#[test]
fn sessions_exclude_each_other_and_a_release_reaches_a_polling_waiter_within_its_poll() {
    let server = dynalite();
    let url = server.url();
    setup(url);
    smol::block_on(async {
        let a = client(url, "a", 2_000);
        let b = client(url, "b", 2_000);
        let la = a.acquire("job").await.unwrap();
        assert_eq!(la.owner().0, a.session_id().unwrap());
        let held = item(url, "job").await;
        assert_eq!(held["owner"]["S"], a.session_id().unwrap().to_string(), "the owner names the session");
        assert_eq!(held["label"]["S"], "a", "the public label, for status");
        assert_eq!(n(&held, "ttl_us"), 2_000_000, "the item's ttl is the session's");
        assert_eq!(b.try_acquire("job").await.unwrap_err(), AcquireError::Busy);
        let fa = la.fence().unwrap();
        // b waits: its held keepalives poll every U[0.5, 1]·ttl/8 = 125–250 ms.
        let waiter = smol::spawn(async move {
            let l = b.acquire("job").await;
            (l, Instant::now(), b)
        });
        sleep(600).await;
        assert_eq!(la.health(), Health::Held, "no takeover of a live holder");
        let a_owner = la.owner().0.to_string();
        let released = Instant::now();
        la.release().await.expect("release acknowledged");
        // Free, unless the waiter's poll got there first: not a's any more, and the fence
        // counter kept (the item is not deleted).
        let after = item(url, "job").await;
        match after["owner"]["S"].as_str() {
            None => {
                assert_eq!(after.get("label"), None, "a release removes the label too");
                assert_eq!(Fence(n(&after, "fence")), fa, "and keeps the fence counter");
            }
            Some(o) => {
                assert_ne!(o, a_owner, "released: {after}");
                assert_eq!((after["label"]["S"].as_str(), n(&after, "fence")), (Some("b"), fa.0 + 1));
            }
        }
        let (lb, got, b) = within(5_000, "the waiter's grant", waiter).await;
        let lb = lb.expect("granted once released");
        let took = got - released;
        // Its next poll after the release: within the poll interval (250 ms), the keepalive
        // turnaround and one request; 1.5 s leaves room for a loaded machine.
        assert!(took < Duration::from_millis(1_500), "hand-off by polling took {took:?}");
        println!("release to polled grant: {took:?}");
        assert!(lb.fence().unwrap() > fa, "every grant a higher fence");
        assert_eq!(item(url, "job").await["owner"]["S"], b.session_id().unwrap().to_string());
        lb.release().await.unwrap();
        a.close().await;
        b.close().await;
    });
}

#[test]
fn one_keepalive_renews_every_key_of_the_session_one_write_each() {
    let server = dynalite();
    let url = server.url();
    setup(url);
    let (backend, _) = sessions(url, 3_000, None);
    smol::block_on(async {
        let mut s = Raw::open(&backend, 3_000, "many").await;
        let keys = ["k1", "k2", "k3"];
        let mut fences = Vec::new();
        for k in keys {
            fences.push(s.acquire(k).await);
        }
        let mut before = Vec::new();
        for k in keys {
            before.push(item(url, k).await);
        }
        let reply = s.call(SessionOp::KeepAlive).await;
        assert_eq!(reply, SessionReply::Alive { ttl: LDuration::from_secs(3), granted: None, more: false });
        for (i, k) in keys.iter().enumerate() {
            let after = item(url, k).await;
            assert_eq!(n(&after, "version"), n(&before[i], "version") + 1, "{k}: one renewal write");
            assert_eq!(Fence(n(&after, "fence")), fences[i], "{k}: renewed under the same fence");
            assert_eq!(after["owner"], before[i]["owner"]);
        }
        // Asking again for a key the session holds keeps its fence and writes nothing.
        assert_eq!(s.acquire("k2").await, fences[1]);
        assert_eq!(n(&item(url, "k2").await, "version"), n(&before[1], "version") + 1);
        assert_eq!(s.call(SessionOp::Close).await, SessionReply::Closed);
        for k in keys {
            assert_eq!(item(url, k).await.get("owner"), None, "close releases {k}");
        }
        assert_eq!(s.call(SessionOp::KeepAlive).await, SessionReply::Expired, "closed is gone");
    });
}

#[test]
fn a_dead_sessions_keys_are_taken_over_only_after_ttl_times_one_plus_epsilon() {
    let server = dynalite();
    let url = server.url();
    setup(url);
    let ttl_ms = 2_000;
    let (dead_backend, _) = sessions(url, ttl_ms, None);
    smol::block_on(async {
        let mut dead = Raw::open(&dead_backend, ttl_ms, "dead").await;
        let fx = dead.acquire("x").await;
        let fy = dead.acquire("y").await;
        // `dead` never keeps alive again. The waiter's first sighting comes after that last
        // write, so its takeover is due observe_wait(ttl) = ttl·(1+ε) + margin after it.
        let options = Options::session(Duration::from_millis(ttl_ms));
        let wait: Duration = options.config.observe_wait(LDuration::from_millis(ttl_ms)).into();
        let c = client(url, "c", ttl_ms);
        let started = Instant::now();
        let lx = within(wait.as_millis() as u64 + 5_000, "takeover of x", c.acquire("x")).await.unwrap();
        let took = started.elapsed();
        println!("takeover after {took:?} (observe_wait {wait:?})");
        assert!(took >= wait, "taken over after {took:?}, before ttl·(1+ε) + margin = {wait:?}");
        // Upper bound: the wait, a poll interval, a keepalive turnaround, room for load 5.
        assert!(took < wait + Duration::from_millis(3_000), "took {took:?}");
        assert!(lx.fence().unwrap() > fx, "the fence rises across the hand-off");
        let ly = c.acquire("y").await.unwrap();
        assert!(ly.fence().unwrap() > fy);
        // The dead session's keepalive, if it came back, finds its keys gone.
        assert_eq!(dead.call(SessionOp::KeepAlive).await, SessionReply::Expired);
        lx.release().await.unwrap();
        ly.release().await.unwrap();
        c.close().await;
    });
}

#[test]
fn a_rivals_takeover_expires_the_old_session_and_its_other_keys_are_released() {
    let server = dynalite();
    let url = server.url();
    setup(url);
    let (backend, _) = sessions(url, 5_000, None);
    smol::block_on(async {
        let mut s = Raw::open(&backend, 5_000, "old").await;
        s.acquire("p").await;
        let fq = s.acquire("q").await;
        // A rival (here a v1 client: the same items, the same discipline) takes over p's
        // current version, as it may once it has waited that version out.
        let rival = v1(url);
        let key = parse_key("p").unwrap();
        let req = |op| Request { id: RequestId(1), owner: OwnerId(77), op };
        let ttl = LDuration::from_secs(5);
        let Ok(Reply::Observed { version, .. }) = rival.call(&key, req(Op::Acquire { ttl })).await else {
            panic!("a v1 contender sees the v2 session's item held")
        };
        let Ok(Reply::GrantedAfterExpiry { .. }) = rival.call(&key, req(Op::Takeover { version, ttl })).await
        else {
            panic!("takeover")
        };
        // The old holder's next keepalive: the session has expired, and q was given back.
        assert_eq!(s.call(SessionOp::KeepAlive).await, SessionReply::Expired);
        let q = item(url, "q").await;
        assert_eq!(q.get("owner"), None, "the session's other key is released: {q}");
        assert_eq!(Fence(n(&q, "fence")), fq);
        assert_eq!(item(url, "p").await["owner"]["S"], "77", "the rival's grant is untouched");
    });
}

#[test]
fn a_session_client_loses_every_key_at_once_when_one_is_taken_over() {
    let server = dynalite();
    let url = server.url();
    setup(url);
    smol::block_on(async {
        let c = client(url, "c", 3_000);
        let leases = [c.acquire("x").await.unwrap(), c.acquire("y").await.unwrap()];
        let rival = v1(url);
        let key = parse_key("x").unwrap();
        let req = |op| Request { id: RequestId(1), owner: OwnerId(5), op };
        let ttl = LDuration::from_secs(3);
        let Ok(Reply::Observed { version, .. }) = rival.call(&key, req(Op::Acquire { ttl })).await else {
            panic!()
        };
        let Ok(Reply::GrantedAfterExpiry { .. }) = rival.call(&key, req(Op::Takeover { version, ttl })).await
        else {
            panic!()
        };
        for l in &leases {
            assert_eq!(within(3_000, "lost", l.lost()).await, LostReason::Revoked);
            assert_eq!(l.fence(), None);
        }
        assert_eq!(item(url, "y").await.get("owner"), None);
    });
}

#[test]
fn v1_and_v2_clients_of_one_key_exclude_each_other() {
    let server = dynalite();
    let url = server.url();
    setup(url);
    let v1 = v1(url);
    let key = parse_key("shared").unwrap();
    let ttl = LDuration::from_secs(2);
    let req = |op| Request { id: RequestId(1), owner: OwnerId(9), op };
    smol::block_on(async {
        let c = client(url, "v2", 2_000);
        let l = c.acquire("shared").await.unwrap();
        assert!(matches!(v1.call(&key, req(Op::Acquire { ttl })).await, Ok(Reply::Observed { .. })));
        let f = l.fence().unwrap();
        l.release().await.unwrap();
        let Ok(Reply::Granted { fence, .. }) = v1.call(&key, req(Op::Acquire { ttl })).await else {
            panic!()
        };
        assert!(fence > f, "one fence counter for both protocols");
        assert_eq!(c.try_acquire("shared").await.unwrap_err(), AcquireError::Busy);
        assert_eq!(item(url, "shared").await.get("label"), None, "a v1 holder has no label");
        assert_eq!(v1.call(&key, req(Op::Release { fence })).await, Ok(Reply::Released));
        c.try_acquire("shared").await.unwrap().release().await.unwrap();
        c.close().await;
    });
}

#[test]
fn semaphores_observers_and_a_wrong_secret_are_refused_by_type() {
    let server = dynalite();
    let url = server.url();
    setup(url);
    let (backend, _) = sessions(url, 2_000, None);
    smol::block_on(async {
        let mut s = Raw::open(&backend, 2_000, "s").await;
        let key = parse_key("sem").unwrap();
        assert_eq!(
            s.call(SessionOp::AcquireWithLimit { key: key.clone(), wait: true, limit: 3 }).await,
            SessionReply::Rejected(Reject::UnsupportedVersion)
        );
        assert_eq!(
            s.call(SessionOp::Observe { key: key.clone() }).await,
            SessionReply::Rejected(Reject::Malformed)
        );
        let mut forged =
            Raw { backend: &backend, session: s.session, secret: Secret::from_bytes([7; 16]), seq: 9 };
        assert_eq!(forged.call(SessionOp::Close).await, SessionReply::Rejected(Reject::Unauthorized));
        assert_eq!(
            s.call(SessionOp::KeepAlive).await,
            SessionReply::Alive { ttl: LDuration::from_secs(2), granted: None, more: false }
        );
    });
}

/// Whether a waiter leaves a live holder's key alone for 3 s (1.5 ttl).
fn waiter_leaves_a_live_holder_alone(url: &str, fault: Option<DynamoFault>) -> Result<(), String> {
    let a = client(url, "a", 2_000);
    let b = client_with(url, "b", 2_000, fault);
    smol::block_on(async {
        let held = a.acquire("exclusive").await.unwrap();
        // A live holder keeps alive every ttl/4: a correct waiter's takeover is never due, since
        // every renewal changes the version it saw.
        let second = future::or(async { Some(b.acquire("exclusive").await) }, async {
            sleep(3_000).await;
            None
        })
        .await;
        let verdict = match &second {
            None => Ok(()),
            Some(r) => Err(format!(
                "a waiter was answered {:?} while the holder lived (holder: {:?})",
                r.as_ref().map(|l| l.fence()),
                held.health()
            )),
        };
        let _ = held.release().await;
        if let Some(Ok(l)) = second {
            let _ = l.release().await;
        }
        verdict
    })
}

#[test]
fn planted_takeover_without_waiting_is_caught_by_the_exclusion_check() {
    let server = dynalite();
    let url = server.url();
    setup(url);
    assert_eq!(waiter_leaves_a_live_holder_alone(url, None), Ok(()));
    assert!(waiter_leaves_a_live_holder_alone(url, Some(DynamoFault::TakeOverAtOnce)).is_err());
}

#[test]
fn a_keepalive_is_one_request_per_held_key_and_an_unreachable_store_is_a_transient_error() {
    let server = dynalite();
    setup(server.url());
    let upstream = server.url().trim_start_matches("http://").parse().unwrap();
    // Every request on a connection of its own, counted.
    let proxy = leasehold_test_servers::ClosingProxy::start(upstream);
    let (backend, _) = sessions(&proxy.url(), 3_000, None);
    smol::block_on(async {
        let mut s = Raw::open(&backend, 3_000, "counted").await;
        for k in ["a", "b", "c"] {
            s.acquire(k).await;
        }
        let before = proxy.served();
        assert!(matches!(s.call(SessionOp::KeepAlive).await, SessionReply::Alive { .. }));
        assert_eq!(proxy.served() - before, 3, "one conditional write per held key, nothing else");
        // The store out of reach: the holder is told to retry, not that the session ended.
        drop(proxy);
        let req =
            SessionRequest { session: s.session, secret: s.secret, seq: Seq(100), op: SessionOp::KeepAlive };
        let err = backend.call(req, Duration::ZERO).await.expect_err("nobody answers");
        assert!(!err.is_permanent(), "transient: {err}");
    });
}

#[test]
fn a_keepalive_of_many_keys_renews_each_exactly_once() {
    let server = dynalite();
    let url = server.url();
    setup(url);
    let (backend, _) = sessions(url, 15_000, None);
    smol::block_on(async {
        let mut s = Raw::open(&backend, 15_000, "many").await;
        let keys: Vec<String> = (0..64).map(|i| format!("many/{i}")).collect();
        for k in &keys {
            s.acquire(k).await;
        }
        let started = Instant::now();
        assert!(matches!(s.call(SessionOp::KeepAlive).await, SessionReply::Alive { .. }));
        println!("keepalive of {} keys: {:?}", keys.len(), started.elapsed());
        for k in &keys {
            assert_eq!(n(&item(url, k).await, "version"), 2, "{k}: granted, then renewed once");
        }
    });
}
