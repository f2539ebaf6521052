//! v1 (`EtcdBackend`) and v2 (`EtcdSessions`) share one key namespace on etcd: against a real
//! etcd on loopback (`apt-get install -y etcd-server`), a v1 holder and a session of one key
//! exclude each other, their fences increase together, and a session waiting behind a v1 holder
//! is pushed the key at its release or expiry.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures_lite::future;
use http_body_util::Full;
use hyper::body::Bytes;
use leasehold_core::{parse_key, Duration as LDuration, Fence, Op, OwnerId, Reply, Request, RequestId};
use leasehold_http::{AcquireError, Backend, HttpClient, Lease, Options, SessionClient};
use leasehold_stores::{EtcdBackend, EtcdFault, EtcdSessions, Filter};
use leasehold_test_servers::etcd;
use serde_json::{json, Value};

const PREFIX: &str = "leasehold/";

/// A session's ttl long enough that its keepalives are seconds apart: a hand-off within
/// [`PUSH_BOUND`] is a push, not a keepalive that happened to come.
const SESSION_TTL_MS: u64 = 20_000;
const PUSH_BOUND: Duration = Duration::from_millis(1_000);

fn v1(url: &str) -> EtcdBackend {
    EtcdBackend::new(url, PREFIX, Duration::from_secs(2)).unwrap()
}

fn session(url: &str, label: &str) -> SessionClient {
    let options = Options::session(Duration::from_millis(SESSION_TTL_MS));
    let backend = EtcdSessions::new(url, PREFIX, options.config.request_timeout.into()).unwrap();
    SessionClient::new(backend, label, options).unwrap()
}

async fn call(b: &EtcdBackend, key: &str, owner: u64, op: Op) -> Reply {
    let request = Request { id: RequestId(1), owner: OwnerId(owner), op };
    b.call(&parse_key(key).unwrap(), request).await.unwrap()
}

async fn v1_acquire(b: &EtcdBackend, key: &str, owner: u64, ttl: LDuration) -> Reply {
    call(b, key, owner, Op::Acquire { ttl }).await
}

async fn v1_grant(b: &EtcdBackend, key: &str, owner: u64, ttl: LDuration) -> Fence {
    match v1_acquire(b, key, owner, ttl).await {
        Reply::Granted { fence, .. } => fence,
        other => panic!("expected a v1 grant for {owner} on {key}, got {other:?}"),
    }
}

async fn sleep(ms: u64) {
    async_io::Timer::after(Duration::from_millis(ms)).await;
}

/// Fails the test instead of hanging it.
async fn within<T>(ms: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    future::or(f, async {
        sleep(ms).await;
        panic!("{what} did not finish within {ms} ms")
    })
    .await
}

/// Etcd's lease count, read directly, as an operator would.
async fn leases(url: &str) -> usize {
    let http = HttpClient::new(url, Duration::from_secs(2)).unwrap();
    let req = http
        .request(hyper::Method::POST, "/v3/lease/leases")
        .body(Full::new(Bytes::from(json!({}).to_string())))
        .unwrap();
    let resp = http.send(req).await.unwrap();
    let v: Value = serde_json::from_slice(&resp.body).unwrap();
    v["leases"].as_array().map_or(0, Vec::len)
}

/// Every key under the prefix, read directly.
async fn stored_keys(url: &str) -> Vec<String> {
    let http = HttpClient::new(url, Duration::from_secs(2)).unwrap();
    let body = json!({"key": B64.encode(PREFIX), "range_end": B64.encode("leasehold0"), "keys_only": true});
    let req = http
        .request(hyper::Method::POST, "/v3/kv/range")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let v: Value = serde_json::from_slice(&http.send(req).await.unwrap().body).unwrap();
    let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
    kvs.iter()
        .map(|kv| String::from_utf8(B64.decode(kv["key"].as_str().unwrap()).unwrap()).unwrap())
        .collect()
}

/// Waits until `session` has queued for `key` (told so by its report), then runs `then`;
/// returns the grant and how long after `then` began it came.
async fn queue_then<F: std::future::Future<Output = ()>>(
    session: &SessionClient,
    key: &str,
    then: F,
) -> (Lease, Duration) {
    let (queued_tx, queued_rx) = async_channel::bounded::<()>(1);
    let waiting = async {
        let lease = session.acquire_reporting(key, None, move |_| {
            let _ = queued_tx.try_send(());
        });
        (lease.await, Instant::now())
    };
    let act = async {
        within(10_000, "queued", queued_rx.recv()).await.unwrap();
        // Let the waiter's keepalive be the held one, so the push is what is measured.
        sleep(300).await;
        let began = Instant::now();
        then.await;
        began
    };
    let ((granted, at), began) = within(30_000, "grant", future::zip(waiting, act)).await;
    (granted.expect("the session is granted the key"), at - began)
}

/// Whether a v1 acquire is refused (typed: `Busy`, with about the session's time left) while a
/// session holds the key, while one holds it and another waits, and after the first's release.
fn v1_is_refused_while_sessions_hold(url: &str, fault: Option<EtcdFault>) -> Result<(), String> {
    let mut b = v1(url);
    if let Some(f) = fault {
        b = b.with_fault(f);
    }
    let (s1, s2) = (session(url, "s1"), session(url, "s2"));
    let ttl = LDuration::from_secs(5);
    smol::block_on(async {
        let mut verdict = Ok(());
        let mut check = |what: &str, reply: Reply| match reply {
            // Busy until the session's lease ends: far more than the 1 s said when etcd cannot tell.
            Reply::Busy { retry_after } if retry_after.as_micros() >= 10_000_000 => {}
            Reply::Granted { fence, .. } => {
                verdict = verdict.clone().and(Err(format!("v1 granted {fence:?} while {what}")));
            }
            other => verdict = verdict.clone().and(Err(format!("v1 answered {other:?} while {what}"))),
        };
        let held = s1.acquire("k").await.unwrap();
        let reply = v1_acquire(&b, "k", 7, ttl).await;
        if let Reply::Granted { fence, .. } = reply {
            assert_eq!(call(&b, "k", 7, Op::Release { fence }).await, Reply::Released);
        }
        check("a session held the key", reply);
        let (tx, rx) = async_channel::bounded::<()>(1);
        let waiting = s2.acquire_reporting("k", None, move |_| {
            let _ = tx.try_send(());
        });
        let (second, reply) = future::zip(waiting, async {
            within(10_000, "queued", rx.recv()).await.unwrap();
            let reply = v1_acquire(&b, "k", 7, ttl).await;
            if let Reply::Granted { fence, .. } = reply {
                assert_eq!(call(&b, "k", 7, Op::Release { fence }).await, Reply::Released);
            }
            held.release().await.unwrap();
            reply
        })
        .await;
        check("a session held the key and another waited", reply);
        let second = second.unwrap();
        let reply = v1_acquire(&b, "k", 7, ttl).await;
        if let Reply::Granted { fence, .. } = reply {
            assert_eq!(call(&b, "k", 7, Op::Release { fence }).await, Reply::Released);
        }
        check("the waiter held the key after the first's release", reply);
        second.release().await.unwrap();
        s1.close().await;
        s2.close().await;
        verdict
    })
}

#[test]
fn a_v1_acquire_is_busy_while_a_session_holds_or_waits_for_the_key() {
    let e = etcd();
    assert_eq!(v1_is_refused_while_sessions_hold(e.url(), None), Ok(()));
    // Once the sessions are gone the key is v1's to take, its entry in the queue with it.
    smol::block_on(async {
        let b = v1(e.url());
        let fence = v1_grant(&b, "k", 7, LDuration::from_secs(5)).await;
        assert_eq!(stored_keys(e.url()).await, vec![format!("{PREFIX}k"), format!("{PREFIX}v2/k@v1")]);
        assert_eq!(call(&b, "k", 7, Op::Release { fence }).await, Reply::Released);
        assert_eq!(stored_keys(e.url()).await, Vec::<String>::new(), "a release deletes both");
        assert_eq!(leases(e.url()).await, 0, "and revokes the v1 lease; the sessions closed theirs");
    });
}

#[test]
fn planted_v1_ignoring_sessions_is_caught_by_the_exclusion_check() {
    let e = etcd();
    let verdict = v1_is_refused_while_sessions_hold(e.url(), Some(EtcdFault::V1IgnoresSessions));
    println!("planted V1IgnoresSessions: {verdict:?}");
    assert!(verdict.is_err(), "V1IgnoresSessions went unnoticed");
}

#[test]
fn a_v1_holder_makes_sessions_queue_and_its_release_pushes_the_first_at_once() {
    // Three pushes each within 1 s of the release while the waiter's keepalives are seconds
    // apart: a waiter that only looked at its keepalives would pass all three by luck rarely.
    let e = etcd();
    let b = v1(e.url());
    let s = session(e.url(), "waiter");
    let ttl = LDuration::from_secs(20);
    smol::block_on(async {
        let mut last = Fence::NONE;
        let mut took = Vec::new();
        for _ in 0..3 {
            let fence = v1_grant(&b, "k", 7, ttl).await;
            assert!(fence > last, "v1 {fence:?} after {last:?}");
            assert_eq!(s.try_acquire("k").await.unwrap_err(), AcquireError::Busy);
            let (lease, after) = queue_then(&s, "k", async {
                assert_eq!(call(&b, "k", 7, Op::Release { fence }).await, Reply::Released);
            })
            .await;
            took.push(after);
            let v2 = lease.fence().unwrap();
            assert!(v2 > fence, "v2 {v2:?} after v1 {fence:?}");
            // And back: v1 is busy while the session holds, then free after its release.
            assert!(matches!(v1_acquire(&b, "k", 8, ttl).await, Reply::Busy { .. }));
            lease.release().await.unwrap();
            last = v2;
        }
        println!("v1 release sent to pushed v2 grant: {took:?}");
        assert!(took.iter().all(|t| *t < PUSH_BOUND), "hand-offs {took:?}, bound {PUSH_BOUND:?}");
        s.close().await;
    });
}

#[test]
fn a_v1_holders_expiry_pushes_a_waiting_session_no_sooner_than_its_ttl_from_the_last_renewal() {
    let e = etcd();
    let b = v1(e.url());
    let s = session(e.url(), "waiter");
    let ttl = LDuration::from_secs(2);
    smol::block_on(async {
        let fence = v1_grant(&b, "k", 7, ttl).await;
        let (tx, rx) = async_channel::bounded::<()>(1);
        let waiting = async {
            let lease = s.acquire_reporting("k", None, move |_| {
                let _ = tx.try_send(());
            });
            (lease.await, Instant::now())
        };
        // Renewed once the session waits: the entry it queues behind is on the same lease, so
        // it lives on as long; the renewal's send is the anchor of the v1 holder's validity.
        let renew = async {
            within(10_000, "queued", rx.recv()).await.unwrap();
            let sent = Instant::now();
            assert_eq!(call(&b, "k", 7, Op::Renew { fence, ttl }).await, Reply::Granted { fence, ttl });
            sent
        };
        let ((lease, granted), sent) = within(30_000, "grant", future::zip(waiting, renew)).await;
        let lease = lease.expect("pushed the key at the v1 holder's expiry");
        let after = granted - sent;
        println!("v1 expiry to pushed v2 grant: {after:?} after the renewal's send (ttl {ttl:?})");
        let std_ttl: Duration = ttl.into();
        assert!(after >= std_ttl, "granted {after:?} after the v1 renewal's send, before its ttl");
        // etcd ends expired leases every 500 ms, then the push is one watch event: well under
        // the session's keepalive interval, generous for a loaded machine.
        assert!(after < std_ttl + Duration::from_secs(5), "granted only {after:?} after the renewal");
        assert!(lease.fence().unwrap() > fence);
        assert_eq!(call(&b, "k", 7, Op::Renew { fence, ttl }).await, Reply::NotHolder);
        lease.release().await.unwrap();
        s.close().await;
    });
}

#[test]
fn fences_increase_across_both_protocols_and_new_clients() {
    // Each grant by a client made afresh (as after a restart): nothing but etcd carries the
    // fences, and they strictly increase in grant order whichever protocol grants.
    let e = etcd();
    smol::block_on(async {
        let mut fences = Vec::new();
        for round in 0..6 {
            if round % 2 == 0 {
                let b = v1(e.url());
                let fence = v1_grant(&b, "k", 7 + round, LDuration::from_secs(5)).await;
                fences.push(("v1", fence));
                assert_eq!(call(&b, "k", 7 + round, Op::Release { fence }).await, Reply::Released);
            } else {
                let s = session(e.url(), "s");
                let lease = s.try_acquire("k").await.expect("free after the v1 release");
                fences.push(("v2", lease.fence().unwrap()));
                lease.release().await.unwrap();
                s.close().await;
            }
            // An unrelated write between grants: fences are revisions, not a counter per key.
            let other = v1(e.url());
            let f = v1_grant(&other, "other", 1, LDuration::from_secs(5)).await;
            assert_eq!(call(&other, "other", 1, Op::Release { fence: f }).await, Reply::Released);
        }
        println!("fences in grant order: {fences:?}");
        assert!(fences.windows(2).all(|w| w[1].1 > w[0].1), "{fences:?}");
    });
}

#[test]
fn a_retried_v1_acquire_with_a_session_queued_behind_it_lets_the_session_go_first() {
    // The v1 grant's reply was "lost" and the same owner asks again while a session waits
    // behind its entry: re-granting in place would keep the entry's old create revision, below
    // the waiter's, and the waiter's later grant would carry a lower fence than the v1 holder's.
    // The retry drops the grant nobody believes in instead, and the waiter is first.
    let e = etcd();
    let b = v1(e.url());
    let s = session(e.url(), "waiter");
    let ttl = LDuration::from_secs(20);
    smol::block_on(async {
        let first = v1_grant(&b, "k", 7, ttl).await;
        let retried = std::sync::Mutex::new(None);
        let (lease, _) = queue_then(&s, "k", async {
            *retried.lock().unwrap() = Some(v1_acquire(&b, "k", 7, ttl).await);
        })
        .await;
        let retried = retried.into_inner().unwrap().unwrap();
        assert!(matches!(retried, Reply::Busy { .. }), "the retry answered {retried:?}");
        assert!(lease.fence().unwrap() > first);
        assert_eq!(call(&b, "k", 7, Op::Renew { fence: first, ttl }).await, Reply::NotHolder);
        let waited = lease.fence().unwrap();
        lease.release().await.unwrap();
        // With nobody queued, a retry is granted afresh under a higher fence.
        let again = v1_grant(&b, "k", 7, ttl).await;
        let retry = v1_grant(&b, "k", 7, ttl).await;
        assert!(retry > again && again > waited, "{waited:?} {again:?} {retry:?}");
        assert_eq!(call(&b, "k", 7, Op::Release { fence: retry }).await, Reply::Released);
        s.close().await;
        assert_eq!(leases(e.url()).await, 0, "every dropped grant's lease was revoked");
    });
}

#[test]
fn each_listing_shows_the_key_held_by_v1_and_only_v2_lists_the_waiters() {
    let e = etcd();
    let b = v1(e.url());
    let listing = EtcdSessions::new(e.url(), PREFIX, Duration::from_secs(2)).unwrap();
    let s = session(e.url(), "waiter");
    smol::block_on(async {
        let fence = v1_grant(&b, "k", 7, LDuration::from_secs(20)).await;
        let (tx, rx) = async_channel::bounded::<()>(1);
        let waiting = s.acquire_reporting("k", None, move |_| {
            let _ = tx.try_send(());
        });
        let (lease, ()) = future::zip(waiting, async {
            within(10_000, "queued", rx.recv()).await.unwrap();
            // v2: held by v1 (no session holder), its time left, one session waiting.
            let queues = listing.list(&Filter::default()).await.unwrap();
            assert_eq!(queues.len(), 1, "{queues:?}");
            let q = &queues[0];
            assert_eq!((q.key.as_str(), q.holders.len(), q.waiting), ("k", 0, 1), "{q:?}");
            let v1_holder = q.v1_holder.as_ref().expect("the v1 holder");
            assert_eq!(v1_holder.fence, fence);
            assert!(v1_holder.remaining > Duration::from_secs(10), "{v1_holder:?}");
            // v1: the key and its owner, and none of the queue's entries.
            let keys = b.list(&Filter::default()).await.unwrap();
            let listed: Vec<_> =
                keys.iter().map(|k| (k.key.as_str(), k.holder.as_ref().map(|h| h.owner))).collect();
            assert_eq!(listed, vec![("k", Some(OwnerId(7)))]);
            assert_eq!(call(&b, "k", 7, Op::Release { fence }).await, Reply::Released);
        })
        .await;
        let lease = lease.unwrap();
        let queues = listing.list(&Filter::default()).await.unwrap();
        assert_eq!(queues[0].v1_holder, None);
        assert_eq!(queues[0].holders[0].label, "waiter");
        assert!(b.list(&Filter::default()).await.unwrap().is_empty(), "no v1 holder left");
        lease.release().await.unwrap();
        s.close().await;
    });
}

async fn next_pushed(o: &mut leasehold_http::Observations, what: &str) -> leasehold_http::Observation {
    use futures_lite::StreamExt;
    within(3_000, what, o.next()).await.expect("the observation goes on")
}

#[test]
fn an_observer_hears_a_v1_holder_as_a_holder_labelled_with_its_owner() {
    use leasehold_http::Observation;
    let e = etcd();
    let b = v1(e.url());
    let follower = session(e.url(), "follower");
    smol::block_on(async {
        let mut seen = follower.observe("k").unwrap();
        assert_eq!(next_pushed(&mut seen, "the first report").await, Observation::Free);
        let fence = v1_grant(&b, "k", 7, LDuration::from_secs(20)).await;
        match next_pushed(&mut seen, "the v1 grant").await {
            Observation::Held { label, fence: f, value, .. } => {
                assert_eq!((label.as_str(), f, value.as_str()), ("v1 owner 7", fence, ""));
            }
            other => panic!("the v1 grant was reported as {other:?}"),
        }
        assert_eq!(call(&b, "k", 7, Op::Release { fence }).await, Reply::Released);
        assert_eq!(next_pushed(&mut seen, "the v1 release").await, Observation::Free);
        drop(seen);
        follower.close().await;
    });
}

/// A gateway call by hand, as an operator (or an older leasehold) would make it.
async fn post(url: &str, path: &str, body: Value) -> Value {
    let http = HttpClient::new(url, Duration::from_secs(2)).unwrap();
    let req = http.request(hyper::Method::POST, path).body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let resp = http.send(req).await.unwrap();
    assert_eq!(resp.status, 200, "{path}: {:?}", resp.body);
    serde_json::from_slice(&resp.body).unwrap()
}

#[test]
fn a_v1_key_written_without_a_queue_entry_is_busy_for_sessions_until_its_lease_ends() {
    // As an older leasehold's v1 wrote it: the key on its lease, nothing in the v2 queue.
    let e = etcd();
    let s = session(e.url(), "newcomer");
    smol::block_on(async {
        let granted = post(e.url(), "/v3/lease/grant", json!({"TTL": "30"})).await;
        let lease = granted["ID"].as_str().unwrap().to_string();
        let put =
            json!({"key": B64.encode(format!("{PREFIX}old")), "value": B64.encode("7"), "lease": lease});
        post(e.url(), "/v3/kv/put", put).await;
        assert_eq!(s.try_acquire("old").await.unwrap_err(), AcquireError::Busy);
        // Even a session that would wait: there is no entry to wait behind.
        assert_eq!(s.acquire("old").await.unwrap_err(), AcquireError::Busy);
        assert_eq!(stored_keys(e.url()).await, vec![format!("{PREFIX}old")], "no waiter key left behind");
        // Its lease ends: the key is free for sessions.
        post(e.url(), "/v3/lease/revoke", json!({"ID": lease})).await;
        let l = s.try_acquire("old").await.expect("free once the old holder's lease ended");
        l.release().await.unwrap();
        s.close().await;
    });
}

/// Two v1 and two v2 contenders of one key loop for `run`: each marks the key held in this
/// process when granted (refusing if already marked) and records its fence in grant order.
/// Returns the grants per protocol, or what broke exclusion or fence order.
fn contend(url: &str, fault: Option<EtcdFault>, run: Duration) -> Result<(usize, usize), String> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let held = Arc::new(AtomicBool::new(false));
    let order: Arc<Mutex<Vec<(&'static str, Fence)>>> = Arc::new(Mutex::new(Vec::new()));
    let broken: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let deadline = Instant::now() + run;
    // In the exclusive section: mark, record, hold a little, unmark.
    let section = {
        let (held, order, broken) = (held.clone(), order.clone(), broken.clone());
        move |who: &'static str, fence: Fence| {
            let (held, order, broken) = (held.clone(), order.clone(), broken.clone());
            async move {
                if held.swap(true, Ordering::SeqCst) {
                    broken
                        .lock()
                        .unwrap()
                        .get_or_insert(format!("{who} granted {fence:?} while another held"));
                }
                order.lock().unwrap().push((who, fence));
                sleep(5).await;
                held.store(false, Ordering::SeqCst);
            }
        }
    };
    let mut threads = Vec::new();
    for owner in [1u64, 2] {
        let (url, section) = (url.to_string(), section.clone());
        threads.push(std::thread::spawn(move || {
            let mut b = v1(&url);
            if let Some(f) = fault {
                b = b.with_fault(f);
            }
            smol::block_on(async {
                while Instant::now() < deadline {
                    match v1_acquire(&b, "hot", owner, LDuration::from_secs(10)).await {
                        Reply::Granted { fence, .. } => {
                            section("v1", fence).await;
                            assert_eq!(call(&b, "hot", owner, Op::Release { fence }).await, Reply::Released);
                            sleep(10).await;
                        }
                        _ => sleep(2).await,
                    }
                }
            })
        }));
    }
    for label in ["s1", "s2"] {
        let (url, section) = (url.to_string(), section.clone());
        threads.push(std::thread::spawn(move || {
            let s = session(&url, label);
            smol::block_on(async {
                while Instant::now() < deadline {
                    let lease = within(30_000, "a session's turn", s.acquire("hot")).await.unwrap();
                    section("v2", lease.fence().unwrap()).await;
                    lease.release().await.unwrap();
                    // A rest, so the queue is sometimes empty and v1 gets its turns too.
                    sleep(25).await;
                }
                s.close().await;
            })
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    if let Some(b) = broken.lock().unwrap().take() {
        return Err(b);
    }
    let order = order.lock().unwrap();
    if let Some(w) = order.windows(2).find(|w| w[1].1 <= w[0].1) {
        return Err(format!("fences out of grant order: {w:?}"));
    }
    let v1_grants = order.iter().filter(|(who, _)| *who == "v1").count();
    Ok((v1_grants, order.len() - v1_grants))
}

#[test]
fn v1_and_v2_contenders_racing_for_one_key_never_overlap_and_fences_rise() {
    let e = etcd();
    let (v1_grants, v2_grants) = contend(e.url(), None, Duration::from_secs(4)).expect("exclusion and order");
    println!("grants in 4 s: v1 {v1_grants}, v2 {v2_grants}");
    // Both protocols won the key, so their races were really run.
    assert!(v1_grants >= 3 && v2_grants >= 3, "v1 {v1_grants}, v2 {v2_grants}");
}

#[test]
fn planted_v1_ignoring_sessions_is_caught_by_the_race() {
    let e = etcd();
    let verdict = contend(e.url(), Some(EtcdFault::V1IgnoresSessions), Duration::from_secs(4));
    println!("racing with V1IgnoresSessions: {verdict:?}");
    assert!(verdict.is_err(), "V1IgnoresSessions went unnoticed: {verdict:?}");
}
