//! Protocol v2 on etcd: `SessionClient` over `EtcdSessions` against a real etcd on loopback
//! (`apt-get install -y etcd-server`), with etcd read directly to see what it keeps.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures_lite::future;
use leasehold_core::{parse_key, Duration as LDuration};
use leasehold_http::{AcquireError, Health, LostReason, Options, SessionClient};
use leasehold_stores::{EtcdFault, EtcdSessions};
use leasehold_test_servers::etcd;
use serde_json::{json, Value};

mod common;
use common::{sleep, within, Etcd};

const PREFIX: &str = "leasehold/";

fn client(url: &str, label: &str, ttl_ms: u64) -> SessionClient {
    client_with(url, label, ttl_ms, None)
}

/// A client whose backend has `fault` planted, if any.
fn client_with(url: &str, label: &str, ttl_ms: u64, fault: Option<EtcdFault>) -> SessionClient {
    let options = Options::session(Duration::from_millis(ttl_ms));
    let mut backend = EtcdSessions::new(url, PREFIX, options.config.request_timeout.into()).unwrap();
    if let Some(f) = fault {
        backend = backend.with_fault(f);
    }
    SessionClient::new(backend, label, options).unwrap()
}

/// What these tests read from etcd beyond [`Etcd`]'s own.
impl Etcd {
    /// Every key under `prefix` as (key, lease, create revision), oldest first.
    async fn keys(&self, prefix: &str) -> Vec<(String, i64, u64)> {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().unwrap() += 1;
        let v = self
            .post(
                "/v3/kv/range",
                json!({"key": B64.encode(prefix), "range_end": B64.encode(end),
                       "sort_order": "ASCEND", "sort_target": "CREATE"}),
            )
            .await;
        let n = |kv: &Value, f: &str| kv[f].as_str().unwrap_or("0").parse::<i64>().unwrap();
        v["kvs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|kv| {
                let key = String::from_utf8(B64.decode(kv["key"].as_str().unwrap()).unwrap()).unwrap();
                (key, n(kv, "lease"), n(kv, "create_revision") as u64)
            })
            .collect()
    }
}

/// The waiter key of session `id` for `key`.
fn waiter(key: &str, id: u64) -> String {
    format!("{PREFIX}v2/{key}@{id:016x}")
}

#[test]
fn sessions_exclude_each_other_and_a_release_frees_the_key() {
    let e = etcd();
    let raw = Etcd::new(e.url());
    smol::block_on(async {
        let a = client(e.url(), "a", 6_000);
        let b = client(e.url(), "b", 6_000);
        let la = a.acquire("job").await.unwrap();
        let id = a.session_id().unwrap();
        assert_eq!(la.owner().0, id);
        assert_eq!(la.health(), Health::Held);
        // The grant is a waiter key on the session's lease, its fence the key's create revision.
        let held = raw.keys(&format!("{PREFIX}v2/")).await;
        assert_eq!(held, vec![(waiter("job", id), id as i64, la.fence().unwrap().0)]);
        assert_eq!(b.try_acquire("job").await.unwrap_err(), AcquireError::Busy);
        // A contender that does not wait leaves no key behind.
        assert_eq!(raw.keys(&format!("{PREFIX}v2/")).await, held);
        let fa = la.fence().unwrap();
        la.release().await.expect("release acknowledged");
        assert_eq!(raw.keys(&format!("{PREFIX}v2/")).await, vec![], "a release deletes the waiter key");
        let lb = b.try_acquire("job").await.expect("free after the release");
        assert!(lb.fence().unwrap() > fa, "every grant a higher fence");
        // A key with a `/` has its own queue: `job/x` is not behind `job`'s holder.
        let lx = a.try_acquire("job/x").await.expect("a different key");
        lx.release().await.unwrap();
        lb.release().await.unwrap();
        a.close().await;
        b.close().await;
        assert_eq!(raw.leases().await, 0, "closing revokes each session's lease");
    });
}

#[test]
fn three_waiters_are_handed_the_key_in_the_order_they_queued() {
    let e = etcd();
    let raw = Etcd::new(e.url());
    let holder = client(e.url(), "holder", 6_000);
    let waiters: Vec<SessionClient> = (1..=3).map(|i| client(e.url(), &format!("w{i}"), 6_000)).collect();
    let order = Arc::new(Mutex::new(Vec::new()));
    smol::block_on(async {
        let held = holder.acquire("k").await.unwrap();
        let mut fences = vec![held.fence().unwrap().0];
        let mut tasks = Vec::new();
        for (i, w) in waiters.iter().enumerate() {
            let (queued_tx, queued_rx) = async_channel::bounded::<()>(1);
            let order = order.clone();
            let w = w.clone();
            tasks.push(smol::spawn(async move {
                let lease = w
                    .acquire_reporting("k", None, move |_| {
                        let _ = queued_tx.try_send(());
                    })
                    .await
                    .unwrap();
                order.lock().unwrap().push((i + 1, lease.fence().unwrap().0));
                // Held for a moment, so a waiter that jumped the queue would be seen.
                sleep(50).await;
                lease.release().await.unwrap();
            }));
            // The next waiter asks only once this one is queued in etcd.
            within(10_000, "queued", queued_rx.recv()).await.unwrap();
        }
        // Queue order is etcd's create order of the waiter keys.
        let queue = raw.keys(&format!("{PREFIX}v2/k@")).await;
        let sessions: Vec<String> =
            std::iter::once(&holder).chain(&waiters).map(|c| waiter("k", c.session_id().unwrap())).collect();
        assert_eq!(queue.iter().map(|q| q.0.clone()).collect::<Vec<_>>(), sessions);
        fences.extend(queue[1..].iter().map(|q| q.2));
        held.release().await.unwrap();
        for t in tasks {
            within(20_000, "every waiter served", t).await;
        }
        let served = order.lock().unwrap().clone();
        assert_eq!(served, vec![(1, fences[1]), (2, fences[2]), (3, fences[3])], "FIFO, each its own fence");
        assert!(
            fences.windows(2).all(|w| w[0] < w[1]),
            "fences strictly increase in grant order: {fences:?}"
        );
    });
}

/// Keepalives every ttl/4 = 5 s: a waiter that only looked at its keepalives would take
/// 0..5 s per hand-off; a pushed one takes a few etcd round trips.
const HANDOFF_TTL_MS: u64 = 20_000;
const HANDOFF_BOUND: Duration = Duration::from_millis(1_000);

/// Hands one key back and forth between two sessions `rounds` times; how long each hand-off
/// took from the release's acknowledgement to the waiter's grant.
fn hand_offs(url: &str, fault: Option<EtcdFault>, rounds: usize) -> Vec<Duration> {
    let a = client_with(url, "a", HANDOFF_TTL_MS, fault);
    let b = client_with(url, "b", HANDOFF_TTL_MS, fault);
    smol::block_on(async {
        let mut held = a.acquire("handoff").await.unwrap();
        let mut fence = held.fence().unwrap();
        let mut took = Vec::new();
        for round in 0..rounds {
            let next = if round % 2 == 0 { &b } else { &a };
            let (queued_tx, queued_rx) = async_channel::bounded::<()>(1);
            let waiting = next.acquire_reporting("handoff", None, move |_| {
                let _ = queued_tx.try_send(());
            });
            let release = async {
                within(10_000, "queued", queued_rx.recv()).await.unwrap();
                // Let the waiter's keepalive be the held one, so the push is what is measured.
                sleep(300).await;
                held.release().await.unwrap();
                Instant::now()
            };
            let (granted, released) = within(20_000, "hand-off", future::zip(waiting, release)).await;
            took.push(released.elapsed());
            held = granted.unwrap();
            assert!(held.fence().unwrap() > fence);
            fence = held.fence().unwrap();
        }
        held.release().await.unwrap();
        a.close().await;
        b.close().await;
        took
    })
}

#[test]
fn a_hand_off_is_pushed_at_once_not_found_at_the_next_keepalive() {
    // Three hand-offs each within 1 s: a poller would pass all three by luck with probability
    // (1/5)³ < 1%.
    let e = etcd();
    let took = hand_offs(e.url(), None, 3);
    println!("pushed hand-offs: {took:?}");
    assert!(took.iter().all(|t| *t < HANDOFF_BOUND), "hand-offs {took:?}, bound {HANDOFF_BOUND:?}");
}

#[test]
fn planted_no_watch_is_caught_by_the_hand_off_bound() {
    // Without watches a hand-off waits for the waiter's held keepalive to run out (0..5 s):
    // five all under 1 s would be a (1/5)⁵ = 0.03% fluke.
    let e = etcd();
    let took = hand_offs(e.url(), Some(EtcdFault::NoWatch), 5);
    println!("hand-offs without watches: {took:?}");
    assert!(took.iter().any(|t| *t >= HANDOFF_BOUND), "NoWatch went unnoticed: {took:?}");
}

/// Whether a second session is refused a key the first holds.
fn second_session_is_refused(url: &str, fault: Option<EtcdFault>) -> Result<(), String> {
    let a = client_with(url, "a", 6_000, fault);
    let b = client_with(url, "b", 6_000, fault);
    smol::block_on(async {
        let held = a.acquire("exclusive").await.unwrap();
        let second = b.try_acquire("exclusive").await;
        let verdict = match &second {
            Err(AcquireError::Busy) => Ok(()),
            other => Err(format!(
                "a second session was answered {:?} while the first held",
                other.as_ref().map(|l| l.fence())
            )),
        };
        held.release().await.unwrap();
        if let Ok(l) = second {
            l.release().await.unwrap();
        }
        verdict
    })
}

#[test]
fn planted_second_in_line_grant_is_caught_by_the_exclusion_check() {
    let e = etcd();
    assert_eq!(second_session_is_refused(e.url(), None), Ok(()));
    assert!(second_session_is_refused(e.url(), Some(EtcdFault::SecondInLineGranted)).is_err());
}

#[test]
fn a_lease_revoked_behind_the_sessions_back_loses_every_key_at_once() {
    let e = etcd();
    let raw = Etcd::new(e.url());
    let c = client(e.url(), "c", 6_000);
    let other = client(e.url(), "other", 6_000);
    smol::block_on(async {
        let leases =
            [c.acquire("x").await.unwrap(), c.acquire("y").await.unwrap(), c.acquire("z").await.unwrap()];
        let id = c.session_id().unwrap();
        assert_eq!(raw.keys(&format!("{PREFIX}v2/")).await.len(), 3);
        raw.post("/v3/lease/revoke", json!({"ID": id.to_string()})).await;
        // etcd deleted every key of the session in the revoke's one revision.
        assert_eq!(raw.keys(&format!("{PREFIX}v2/")).await, vec![]);
        let taken = other.try_acquire("y").await.expect("y is free at once");
        // The next keepalive (within ttl/4, plus its hold) finds the lease gone.
        let (first, _) = within(
            6_000,
            "lost",
            future::race(
                future::race(async { (0, leases[0].lost().await) }, async { (1, leases[1].lost().await) }),
                async { (2, leases[2].lost().await) },
            ),
        )
        .await;
        let _ = first;
        for l in &leases {
            assert_eq!(l.fence(), None, "one session, one loss: every key at once");
            assert_eq!(l.health(), Health::Lost);
        }
        for l in &leases {
            assert_eq!(within(1_000, "each lost", l.lost()).await, LostReason::Revoked);
        }
        taken.release().await.unwrap();
        // A new session serves the client again.
        let again = c.try_acquire("x").await.expect("a new session");
        assert_ne!(c.session_id().unwrap(), id);
        again.release().await.unwrap();
    });
}

#[test]
fn closing_revokes_the_session_and_frees_its_keys_and_its_places() {
    let e = etcd();
    let raw = Etcd::new(e.url());
    let a = client(e.url(), "a", 6_000);
    let b = client(e.url(), "b", 6_000);
    let c = client(e.url(), "c", 6_000);
    smol::block_on(async {
        let held = a.acquire("p").await.unwrap();
        let _held_q = a.acquire("q").await.unwrap();
        let fence = held.fence().unwrap();
        let a_id = a.session_id().unwrap() as i64;
        // b queues for p, with a deadline; c queues behind b.
        let queued = |tx: async_channel::Sender<()>| {
            move |_: &leasehold_http::Waiting| {
                let _ = tx.try_send(());
            }
        };
        let (tx, rx) = async_channel::bounded::<()>(1);
        let b_wait = b.clone();
        let tb = smol::spawn(async move {
            b_wait.acquire_reporting("p", Some(Duration::from_millis(1_500)), queued(tx)).await
        });
        within(10_000, "b queued", rx.recv()).await.unwrap();
        let (tx, rx) = async_channel::bounded::<()>(1);
        let c_wait = c.clone();
        let tc = smol::spawn(async move { c_wait.acquire_reporting("p", None, queued(tx)).await });
        within(10_000, "c queued", rx.recv()).await.unwrap();
        let b_id = b.session_id().unwrap();
        assert_eq!(raw.keys(&format!("{PREFIX}v2/p@")).await.len(), 3);
        // b's deadline passes: it leaves the queue, its waiter key goes, c is next after a.
        assert_eq!(within(10_000, "b gives up", tb).await.unwrap_err(), AcquireError::Busy);
        let queue: Vec<String> = raw.keys(&format!("{PREFIX}v2/p@")).await.into_iter().map(|k| k.0).collect();
        assert_eq!(queue.len(), 2, "{queue:?}");
        assert!(!queue.contains(&waiter("p", b_id)), "{queue:?}");
        within(5_000, "a closed", a.close()).await;
        assert!(
            raw.keys(&format!("{PREFIX}v2/")).await.iter().all(|k| k.1 != a_id),
            "one revoke freed both of a's keys"
        );
        let lc = within(5_000, "c is pushed p", tc).await.unwrap();
        assert!(lc.fence().unwrap() > fence);
        lc.release().await.unwrap();
    });
}

// v1 beside v2 (one key namespace on etcd) is tested in `etcd_namespace.rs`.

/// The backend's answers to the core's requests, sent by hand as the holder machine would.
#[test]
fn the_backend_answers_each_request_as_the_protocol_says() {
    use leasehold_core::session::wire::{
        parse_label, Secret, Seq, SessionId, SessionOp, SessionReply, SessionRequest,
    };
    use leasehold_core::Fence;
    use leasehold_http::SessionBackend;
    let e = etcd();
    let raw = Etcd::new(e.url());
    let b = EtcdSessions::new(e.url(), PREFIX, Duration::from_secs(2)).unwrap();
    let hold = Duration::ZERO;
    smol::block_on(async {
        let open =
            SessionOp::Open { ttl: LDuration::from_millis(4_500), label: parse_label("by-hand").unwrap() };
        let req = SessionRequest { session: SessionId::NONE, secret: Secret::NONE, seq: Seq(1), op: open };
        let SessionReply::Opened { session, secret, ttl } = b.call(req, hold).await.unwrap().reply else {
            panic!("not opened")
        };
        assert_eq!(ttl, LDuration::from_secs(5), "etcd's whole seconds, rounded up");
        let mut seq = 1;
        let mut send = |op: SessionOp, secret: Secret| {
            seq += 1;
            let r = SessionRequest { session, secret, seq: Seq(seq), op };
            let b = &b;
            async move { b.call(r, hold).await.unwrap().reply }
        };
        let x = parse_key("x").unwrap();
        let acquire = SessionOp::Acquire { key: x.clone(), wait: false };
        let SessionReply::Granted { fence, .. } = send(acquire.clone(), secret).await else {
            panic!("granted")
        };
        assert_eq!(
            send(acquire.clone(), secret).await,
            SessionReply::Granted { key: x.clone(), fence },
            "same fence"
        );
        assert_eq!(
            send(acquire.clone(), Secret::from_bytes([9; 16])).await,
            SessionReply::Rejected(leasehold_core::Reject::Unauthorized),
            "a wrong secret changes nothing"
        );
        let alive = send(SessionOp::KeepAlive, secret).await;
        assert_eq!(alive, SessionReply::Alive { ttl: LDuration::from_secs(5), granted: None, more: false });
        let stale = SessionOp::Release { key: x.clone(), fence: Fence(fence.0 + 1) };
        assert_eq!(send(stale, secret).await, SessionReply::NotHolder { key: x.clone() });
        assert_eq!(raw.keys(&format!("{PREFIX}v2/")).await.len(), 1, "a wrong fence releases nothing");
        let release = SessionOp::Release { key: x.clone(), fence };
        assert_eq!(send(release, secret).await, SessionReply::Released { key: x.clone() });
        assert_eq!(raw.keys(&format!("{PREFIX}v2/")).await, vec![]);
        assert_eq!(send(SessionOp::Close, secret).await, SessionReply::Closed);
        assert_eq!(raw.leases().await, 0, "close revoked the lease");
        assert_eq!(send(SessionOp::KeepAlive, secret).await, SessionReply::Expired);
    });
}

#[test]
fn one_session_waiting_for_two_keys_is_pushed_each_when_its_holder_lets_go() {
    let e = etcd();
    let (a, b) = (client(e.url(), "a", HANDOFF_TTL_MS), client(e.url(), "b", HANDOFF_TTL_MS));
    let c = client(e.url(), "c", HANDOFF_TTL_MS);
    smol::block_on(async {
        let (m1, m2) = (a.acquire("m1").await.unwrap(), b.acquire("m2").await.unwrap());
        let wait = |key: &'static str| {
            let (tx, rx) = async_channel::bounded::<()>(1);
            let c = c.clone();
            let task = smol::spawn(async move {
                c.acquire_reporting(key, None, move |_| {
                    let _ = tx.try_send(());
                })
                .await
            });
            (task, rx)
        };
        let (w1, q1) = wait("m1");
        let (w2, q2) = wait("m2");
        within(10_000, "c queued for m1", q1.recv()).await.unwrap();
        within(10_000, "c queued for m2", q2.recv()).await.unwrap();
        // One held keepalive watches both predecessors: whichever goes first is pushed at once.
        for (held, waiter) in [(m2, w2), (m1, w1)] {
            sleep(300).await;
            held.release().await.unwrap();
            let released = Instant::now();
            let lease = within(10_000, "pushed", waiter).await.unwrap();
            let took = released.elapsed();
            assert!(took < HANDOFF_BOUND, "{}: hand-off took {took:?}", lease.key());
            lease.release().await.unwrap();
        }
    });
}

fn three() -> std::num::NonZeroU16 {
    std::num::NonZeroU16::new(3).unwrap()
}

/// Queues `c` for a slot of `key` (limit 3) in a task; the channel says when it is queued.
fn queue_for_slot(
    c: &SessionClient,
    key: &'static str,
) -> (smol::Task<Result<leasehold_http::Lease, AcquireError>>, async_channel::Receiver<()>) {
    let (tx, rx) = async_channel::bounded::<()>(1);
    let c = c.clone();
    let task = smol::spawn(async move {
        c.acquire_reporting_with_limit(key, three(), None, move |_| {
            let _ = tx.try_send(());
        })
        .await
    });
    (task, rx)
}

#[test]
fn a_semaphore_of_three_admits_three_of_five_and_pushes_the_fourth_when_a_slot_frees() {
    let e = etcd();
    let raw = Etcd::new(e.url());
    // Keepalives 5 s apart: a grant found at the next keepalive would break the bound.
    let cs: Vec<SessionClient> = (0..5).map(|i| client(e.url(), &format!("s{i}"), HANDOFF_TTL_MS)).collect();
    smol::block_on(async {
        let mut holders = Vec::new();
        for c in &cs[..3] {
            holders.push(c.try_acquire_with_limit("pool", three()).await.expect("a free slot"));
        }
        let fences: Vec<u64> = holders.iter().map(|l| l.fence().unwrap().0).collect();
        assert!(fences.windows(2).all(|w| w[0] < w[1]), "each slot its own, higher fence: {fences:?}");
        for c in &cs[3..] {
            let refused = c.try_acquire_with_limit("pool", three()).await.unwrap_err();
            assert_eq!(refused, AcquireError::Busy, "three slots, all held");
        }
        assert_eq!(raw.keys(&format!("{PREFIX}v2/pool@")).await.len(), 3, "no place kept by a try");
        // Every holder must agree on the limit: another one is refused, typed, and leaves nothing.
        let odd = client(e.url(), "odd", 6_000);
        let two = std::num::NonZeroU16::new(2).unwrap();
        assert_eq!(
            odd.try_acquire_with_limit("pool", two).await.unwrap_err(),
            AcquireError::Rejected(leasehold_core::Reject::LimitMismatch)
        );
        assert_eq!(
            odd.try_acquire("pool").await.unwrap_err(),
            AcquireError::Rejected(leasehold_core::Reject::LimitMismatch),
            "a plain acquire is a limit of 1"
        );
        assert_eq!(raw.keys(&format!("{PREFIX}v2/pool@")).await.len(), 3, "the refused left no key");
        odd.close().await;

        let (fourth, q4) = queue_for_slot(&cs[3], "pool");
        within(10_000, "the fourth queued", q4.recv()).await.unwrap();
        let (fifth, q5) = queue_for_slot(&cs[4], "pool");
        within(10_000, "the fifth queued", q5.recv()).await.unwrap();
        assert_eq!(raw.keys(&format!("{PREFIX}v2/pool@")).await.len(), 5);
        // Let the waiters' keepalives be the held ones, so the push is what is measured.
        sleep(300).await;
        // The middle slot frees: any deletion ahead of a waiter can make it a holder.
        holders.remove(1).release().await.unwrap();
        let released = Instant::now();
        let got = within(10_000, "the fourth pushed", fourth).await.unwrap();
        let took = released.elapsed();
        println!("semaphore hand-off: {took:?}");
        assert!(took < HANDOFF_BOUND, "the fourth waited {took:?} (bound {HANDOFF_BOUND:?})");
        assert!(got.fence().unwrap().0 > fences[2], "a later grant, a higher fence");
        // Still three holders: the fifth waits.
        sleep(300).await;
        let mut fifth = Box::pin(fifth);
        assert!(future::poll_once(&mut fifth).await.is_none(), "the fifth must wait for a slot");
        let got_fence = got.fence().unwrap();
        got.release().await.unwrap();
        let last = within(10_000, "the fifth pushed", fifth).await.unwrap();
        assert!(last.fence().unwrap() > got_fence);
        last.release().await.unwrap();
        for h in holders {
            h.release().await.unwrap();
        }
        for c in &cs {
            c.close().await;
        }
        assert_eq!(raw.keys(&format!("{PREFIX}v2/")).await, vec![]);
    });
}

/// Whether a fourth session is refused a semaphore of three that three others hold.
fn fourth_is_refused(url: &str, fault: Option<EtcdFault>) -> Result<(), String> {
    let cs: Vec<SessionClient> = (0..4).map(|i| client_with(url, &format!("f{i}"), 6_000, fault)).collect();
    smol::block_on(async {
        let mut held = Vec::new();
        for c in &cs[..3] {
            held.push(c.try_acquire_with_limit("slots", three()).await.unwrap());
        }
        let fourth = cs[3].try_acquire_with_limit("slots", three()).await;
        let verdict = match &fourth {
            Err(AcquireError::Busy) => Ok(()),
            other => Err(format!("a fourth holder of three slots: {:?}", other.as_ref().map(|l| l.fence()))),
        };
        held.extend(fourth);
        for l in held {
            l.release().await.unwrap();
        }
        for c in &cs {
            c.close().await;
        }
        verdict
    })
}

#[test]
fn planted_n_plus_first_slot_is_caught_by_the_semaphore_check() {
    let e = etcd();
    assert_eq!(fourth_is_refused(e.url(), None), Ok(()));
    assert!(fourth_is_refused(e.url(), Some(EtcdFault::SecondInLineGranted)).is_err());
}

/// The next observation, within a bound well under the follower's keepalive interval (its ttl
/// is 20 s: keepalives 5 s apart), so each change must have been pushed.
async fn next_pushed(o: &mut leasehold_http::Observations, what: &str) -> leasehold_http::Observation {
    use futures_lite::StreamExt;
    within(3_000, what, o.next()).await.expect("the observation goes on")
}

#[test]
fn an_observer_hears_each_holder_change_in_order_with_label_fence_and_value() {
    use leasehold_http::Observation;
    let e = etcd();
    let raw = Etcd::new(e.url());
    let follower = client(e.url(), "follower", HANDOFF_TTL_MS);
    let a = client(e.url(), "a", HANDOFF_TTL_MS);
    let b = client(e.url(), "b", HANDOFF_TTL_MS);
    smol::block_on(async {
        let mut leaders = follower.observe("leader").unwrap();
        assert_eq!(next_pushed(&mut leaders, "the first report").await, Observation::Free);
        let la = a.acquire_with_value("leader", "10.0.0.1:80", None, |_| {}).await.unwrap();
        let held_by =
            |c: &SessionClient, label: &str, l: &leasehold_http::Lease, value: &str| Observation::Held {
                session: c.session_id().unwrap(),
                label: label.into(),
                fence: l.fence().unwrap(),
                value: value.into(),
            };
        assert_eq!(next_pushed(&mut leaders, "a's grant").await, held_by(&a, "a", &la, "10.0.0.1:80"));
        // b queues with its own value; a's release hands the key straight to b: one change.
        let (tx, rx) = async_channel::bounded::<()>(1);
        let b2 = b.clone();
        let wait = smol::spawn(async move {
            b2.acquire_with_value("leader", "10.0.0.2:80", None, move |_| {
                let _ = tx.try_send(());
            })
            .await
        });
        within(10_000, "b queued", rx.recv()).await.unwrap();
        la.release().await.unwrap();
        let lb = within(10_000, "b granted", wait).await.unwrap();
        assert_eq!(next_pushed(&mut leaders, "b's grant").await, held_by(&b, "b", &lb, "10.0.0.2:80"));
        // b's session ends behind its back (its etcd lease revoked): the key is free.
        raw.post("/v3/lease/revoke", json!({"ID": b.session_id().unwrap().to_string()})).await;
        assert_eq!(next_pushed(&mut leaders, "the revoke").await, Observation::Free);
        // And a new holder after it.
        let la = a.acquire("leader").await.unwrap();
        assert_eq!(next_pushed(&mut leaders, "a again").await, held_by(&a, "a", &la, ""));
        la.release().await.unwrap();
        assert_eq!(next_pushed(&mut leaders, "a's release").await, Observation::Free);
        drop(leaders);
        follower.close().await;
        a.close().await;
    });
}

#[test]
fn an_observer_whose_session_is_lost_catches_up_with_the_holder_now() {
    use futures_lite::StreamExt;
    use leasehold_http::Observation;
    let e = etcd();
    let raw = Etcd::new(e.url());
    let follower = client(e.url(), "follower", 6_000);
    let a = client(e.url(), "a", 6_000);
    let c = client(e.url(), "c", 6_000);
    smol::block_on(async {
        let la = a.acquire("primary").await.unwrap();
        let mut seen = follower.observe("primary").unwrap();
        let first = within(5_000, "the first report", seen.next()).await.unwrap();
        assert!(matches!(&first, Observation::Held { label, .. } if label == "a"), "{first:?}");
        // The follower's session is lost, and the key changes hands twice while it is.
        let lost = follower.session_id().unwrap();
        raw.post("/v3/lease/revoke", json!({"ID": lost.to_string()})).await;
        la.release().await.unwrap();
        let lc = c.acquire_with_value("primary", "v-c", None, |_| {}).await.unwrap();
        // A new session observes again; whatever it heard in between, it ends at c's grant.
        let want = Observation::Held {
            session: c.session_id().unwrap(),
            label: "c".into(),
            fence: lc.fence().unwrap(),
            value: "v-c".into(),
        };
        let caught_up = within(15_000, "caught up", async {
            loop {
                match seen.next().await.expect("the observation goes on") {
                    Observation::Free => continue,
                    other => return other,
                }
            }
        })
        .await;
        assert_eq!(caught_up, want);
        // The old session may report c's grant itself before its next keepalive finds its
        // lease revoked (its watch runs in this process); by then at the latest the follower
        // has left it.
        within(15_000, "the lost session left", async {
            while follower.session_id() == Some(lost) {
                sleep(20).await;
            }
        })
        .await;
        lc.release().await.unwrap();
        drop(seen);
        for x in [&follower, &a, &c] {
            x.close().await;
        }
    });
}

/// Sessions driven by hand over one backend, every keepalive answered at once (never held):
/// an observer reads its keys only when it sends a request.
struct ByHand {
    backend: EtcdSessions,
    seq: std::cell::Cell<u64>,
}

/// A session opened [`ByHand`].
#[derive(Debug, Clone, Copy)]
struct Hand {
    session: leasehold_core::session::wire::SessionId,
    secret: leasehold_core::session::wire::Secret,
}

impl ByHand {
    fn new(url: &str) -> ByHand {
        ByHand { backend: EtcdSessions::new(url, PREFIX, Duration::from_secs(2)).unwrap(), seq: 1.into() }
    }

    async fn open(&self, label: &str) -> Hand {
        use leasehold_core::session::wire::{parse_label, SessionId, SessionOp, SessionReply};
        let ttl = LDuration::from_secs(10);
        let op = SessionOp::Open { ttl, label: parse_label(label).unwrap() };
        let none = Hand { session: SessionId::NONE, secret: leasehold_core::session::wire::Secret::NONE };
        match self.send(none, op).await {
            SessionReply::Opened { session, secret, .. } => Hand { session, secret },
            other => panic!("not opened: {other:?}"),
        }
    }

    async fn send(
        &self,
        h: Hand,
        op: leasehold_core::session::wire::SessionOp,
    ) -> leasehold_core::session::wire::SessionReply {
        self.held(h, op, Duration::ZERO).await
    }

    /// Sends `op`, a keepalive held open for up to `hold` if it is one.
    async fn held(
        &self,
        h: Hand,
        op: leasehold_core::session::wire::SessionOp,
        hold: Duration,
    ) -> leasehold_core::session::wire::SessionReply {
        use leasehold_core::session::wire::{Seq, SessionRequest};
        use leasehold_http::SessionBackend;
        self.seq.set(self.seq.get() + 1);
        let r = SessionRequest { session: h.session, secret: h.secret, seq: Seq(self.seq.get()), op };
        self.backend.call(r, hold).await.unwrap().reply
    }

    /// Acknowledges `change` of `key` (0: nothing) and returns the report that comes back.
    async fn seen(&self, h: Hand, key: &leasehold_core::Key, change: u64) -> Reported {
        use leasehold_core::session::wire::SessionOp;
        let op = match change {
            0 => SessionOp::KeepAlive,
            _ => SessionOp::KeepAliveSeen { key: key.clone(), change },
        };
        reported(self.send(h, op).await)
    }

    /// Takes `key` without waiting: its fence.
    async fn take(&self, h: Hand, key: &leasehold_core::Key) -> leasehold_core::Fence {
        use leasehold_core::session::wire::{SessionOp, SessionReply};
        match self.send(h, SessionOp::Acquire { key: key.clone(), wait: false }).await {
            SessionReply::Granted { fence, .. } => fence,
            other => panic!("not granted: {other:?}"),
        }
    }

    async fn give_back(&self, h: Hand, key: &leasehold_core::Key, fence: leasehold_core::Fence) {
        use leasehold_core::session::wire::{SessionOp, SessionReply};
        let released = self.send(h, SessionOp::Release { key: key.clone(), fence }).await;
        assert_eq!(released, SessionReply::Released { key: key.clone() });
    }
}

/// A keepalive's report of an observed key: the change and whether more wait behind it.
type Reported = Option<(leasehold_core::session::wire::Observed, bool)>;

fn reported(reply: leasehold_core::session::wire::SessionReply) -> Reported {
    use leasehold_core::session::wire::SessionReply;
    match reply {
        SessionReply::AliveObserved { observed, more, .. } => Some((observed, more)),
        SessionReply::Alive { .. } => None,
        other => panic!("not a keepalive's answer: {other:?}"),
    }
}

/// The observe requests sent by hand: numbering, a lost report heard again, acknowledgements,
/// unobserve.
#[test]
fn observe_by_hand_numbers_changes_and_repeats_what_was_not_acknowledged() {
    use leasehold_core::session::wire::{Observed, SessionOp, SessionReply};
    let e = etcd();
    let b = ByHand::new(e.url());
    smol::block_on(async {
        let watcher = b.open("w").await;
        let holder = b.open("h").await;
        let k = parse_key("obs").unwrap();
        let observed = |r: Reported| r.expect("a change reported").0;
        assert_eq!(
            b.send(watcher, SessionOp::Observe { key: k.clone() }).await,
            SessionReply::Observing { key: k.clone() }
        );
        let first = observed(b.seen(watcher, &k, 0).await);
        assert_eq!(first, Observed { key: k.clone(), change: 1, holder: None });
        // Not acknowledged: reported again (a lost reply is never a lost change).
        assert_eq!(observed(b.seen(watcher, &k, 0).await), first);
        assert_eq!(b.seen(watcher, &k, 1).await, None, "nothing new");
        let value = leasehold_core::session::wire::parse_value("addr").unwrap();
        let acq = SessionOp::AcquireWithValue { key: k.clone(), wait: false, value };
        let SessionReply::Granted { fence, .. } = b.send(holder, acq).await else { panic!("granted") };
        let second = observed(b.seen(watcher, &k, 1).await);
        assert_eq!(second.change, 2);
        let h = second.holder.clone().expect("held");
        assert_eq!(
            (h.session, h.label.as_str(), h.fence, h.value.as_str()),
            (holder.session, "h", fence, "addr")
        );
        b.give_back(holder, &k, fence).await;
        let third = observed(b.seen(watcher, &k, 2).await);
        assert_eq!((third.change, third.holder), (3, None));
        // An acknowledgement past the latest skips nothing to come.
        assert_eq!(b.seen(watcher, &k, 99).await, None);
        let again = b.take(holder, &k).await;
        assert!(again > fence);
        let fourth = observed(b.seen(watcher, &k, 0).await);
        assert_eq!(fourth.change, 4);
        assert_eq!(fourth.holder.map(|h| (h.fence, h.value.is_empty())), Some((again, true)));
        b.give_back(holder, &k, again).await;
        let fifth = observed(b.seen(watcher, &k, 4).await);
        assert_eq!((fifth.change, fifth.holder), (5, None));
        // Observed again by a later request: the report starts over at the holder now, though
        // it was acknowledged (an Observe overtaken by its own Unobserve must not leave the
        // session without a first report).
        assert_eq!(b.seen(watcher, &k, 5).await, None);
        let observe = SessionOp::Observe { key: k.clone() };
        assert_eq!(b.send(watcher, observe).await, SessionReply::Observing { key: k.clone() });
        let again = observed(b.seen(watcher, &k, 0).await);
        assert_eq!((again.change, again.holder), (5, None));
        assert_eq!(
            b.send(watcher, SessionOp::Unobserve { key: k.clone() }).await,
            SessionReply::Unobserved { key: k.clone() }
        );
        assert_eq!(b.seen(watcher, &k, 0).await, None);
        b.send(watcher, SessionOp::Close).await;
        b.send(holder, SessionOp::Close).await;
    });
}

/// The holders an observer is told, acknowledging each report as it comes, from `change` on,
/// until a keepalive reports nothing new: (change, fence or `None` for free, more) each.
async fn reports_from(
    b: &ByHand,
    watcher: Hand,
    key: &leasehold_core::Key,
    mut acked: u64,
) -> Vec<(u64, Option<leasehold_core::Fence>, bool)> {
    let mut heard = Vec::new();
    while let Some((o, more)) = b.seen(watcher, key, acked).await {
        heard.push((o.change, o.holder.map(|h| h.fence), more));
        acked = o.change;
        assert!(heard.len() <= 64, "reports never end: {heard:?}");
    }
    heard
}

/// A by-hand watcher observing a key, and a second backend (another process) for its holders.
struct Observing {
    watching: ByHand,
    holding: ByHand,
    watcher: Hand,
    key: leasehold_core::Key,
}

impl Observing {
    /// `key` observed by a new watcher session, its first report (the key free) acknowledged.
    async fn free(url: &str, key: &str) -> Observing {
        use leasehold_core::session::wire::{SessionOp, SessionReply};
        let (watching, holding) = (ByHand::new(url), ByHand::new(url));
        let watcher = watching.open("w").await;
        let key = parse_key(key).unwrap();
        let observing = watching.send(watcher, SessionOp::Observe { key: key.clone() }).await;
        assert_eq!(observing, SessionReply::Observing { key: key.clone() });
        assert_eq!(reports_from(&watching, watcher, &key, 0).await, vec![(1, None, false)]);
        Observing { watching, holding, watcher, key }
    }

    /// What the watcher is told from `acked` on (see [`reports_from`]).
    async fn reports(&self, acked: u64) -> Vec<(u64, Option<leasehold_core::Fence>, bool)> {
        reports_from(&self.watching, self.watcher, &self.key, acked).await
    }

    async fn close(self, holders: &[Hand]) {
        use leasehold_core::session::wire::SessionOp;
        for h in holders {
            self.holding.send(*h, SessionOp::Close).await;
        }
        self.watching.send(self.watcher, SessionOp::Close).await;
    }
}

/// Runs `test` against a fresh etcd (its URL) with `key` observed, free (see
/// [`Observing::free`]).
fn observed<F: std::future::Future<Output = ()>>(key: &str, test: impl FnOnce(Observing, String) -> F) {
    let e = etcd();
    smol::block_on(async { test(Observing::free(e.url(), key).await, e.url().to_string()).await });
}

/// The grant a by-hand waiter's keepalive is pushed.
async fn pushed(b: &ByHand, h: Hand) -> leasehold_core::Fence {
    use leasehold_core::session::wire::{SessionOp, SessionReply};
    match b.send(h, SessionOp::KeepAlive).await {
        SessionReply::Alive { granted: Some(g), .. }
        | SessionReply::AliveObserved { granted: Some(g), .. } => g.fence,
        other => panic!("no grant pushed: {other:?}"),
    }
}

#[test]
fn an_observer_that_reads_only_now_and_then_is_told_every_holder_in_turn() {
    use leasehold_core::session::wire::{SessionOp, SessionReply};
    observed("turns", |o, _| async move {
        let (hs, k) = (&o.holding, &o.key);
        // Three sessions take the key in turn while the observer sends nothing: a holds, b and
        // c queue behind it, and each release hands the key straight to the next.
        let (a, b, c) = (hs.open("a").await, hs.open("b").await, hs.open("c").await);
        let fa = hs.take(a, k).await;
        for (h, place) in [(b, 1), (c, 2)] {
            let queued = hs.send(h, SessionOp::Acquire { key: k.clone(), wait: true }).await;
            assert_eq!(queued, SessionReply::Queued { key: k.clone(), position: place });
        }
        hs.give_back(a, k, fa).await;
        let fb = pushed(hs, b).await;
        hs.give_back(b, k, fb).await;
        let fc = pushed(hs, c).await;
        // Each hand-off is one change (never an instant of free), numbered on from 1.
        assert_eq!(o.reports(1).await, vec![(2, Some(fa), true), (3, Some(fb), true), (4, Some(fc), false)]);
        o.close(&[a, b, c]).await;
    });
}

#[test]
fn an_observer_further_behind_than_eight_changes_is_told_the_oldest_kept() {
    observed("laggard", |o, _| async move {
        // Eleven changes (2..=12) unheard: five holds and releases, then a sixth hold.
        let a = o.holding.open("a").await;
        let mut fences = Vec::new();
        for _ in 0..5 {
            let f = o.holding.take(a, &o.key).await;
            o.holding.give_back(a, &o.key, f).await;
            fences.push(f);
        }
        fences.push(o.holding.take(a, &o.key).await);
        // The last eight kept (5..=12): the number of the first shows the three not kept.
        let heard = o.reports(1).await;
        let holders: Vec<_> = heard.iter().map(|(_, f, _)| *f).collect();
        let want =
            [None, Some(fences[2]), None, Some(fences[3]), None, Some(fences[4]), None, Some(fences[5])];
        assert_eq!(holders, want, "{heard:?}");
        let numbers: Vec<u64> = heard.iter().map(|(n, ..)| *n).collect();
        assert_eq!(numbers, (5..=12).collect::<Vec<_>>());
        o.close(&[a]).await;
    });
}

#[test]
fn a_compacted_history_is_caught_up_as_the_holder_now_and_followed_in_full_after() {
    observed("compacted", |o, url| async move {
        let raw = Etcd::new(&url);
        let (hs, k) = (&o.holding, &o.key);
        let (a, b, c) = (hs.open("a").await, hs.open("b").await, hs.open("c").await);
        let fa = hs.take(a, k).await;
        hs.give_back(a, k, fa).await;
        let fb = hs.take(b, k).await;
        // etcd forgets the revisions the observer has not read: a's turn is gone from history.
        let now =
            raw.post("/v3/kv/range", json!({"key": B64.encode("x")})).await["header"]["revision"].clone();
        raw.post("/v3/kv/compaction", json!({"revision": now, "physical": true})).await;
        // The documented fallback: the holder now, numbered next (a is not heard).
        assert_eq!(o.reports(1).await, vec![(2, Some(fb), false)]);
        // History after the compaction is followed in full again: b's release, then c.
        hs.give_back(b, k, fb).await;
        let fc = hs.take(c, k).await;
        assert_eq!(o.reports(2).await, vec![(3, None, true), (4, Some(fc), false)]);
        o.close(&[a, b, c]).await;
    });
}

#[test]
fn an_observer_free_at_both_reads_hears_the_holders_in_between_in_its_held_keepalive() {
    use leasehold_core::session::wire::SessionOp;
    observed("between", |o, _| async move {
        // Three sessions take the key in turn and give it back while the observer sends
        // nothing: the key is free at both of its reads.
        let mut fences = Vec::new();
        for label in ["a", "b", "c"] {
            let h = o.holding.open(label).await;
            let f = o.holding.take(h, &o.key).await;
            o.holding.give_back(h, &o.key, f).await;
            o.holding.send(h, SessionOp::Close).await;
            fences.push(f);
        }
        // A keepalive held open is answered with the first of them, not at its timer.
        let op = SessionOp::KeepAliveSeen { key: o.key.clone(), change: 1 };
        let first = reported(o.watching.held(o.watcher, op, Duration::from_secs(8)).await);
        let (first, more) = first.expect("a change reported before the hold ran out");
        assert_eq!((first.change, first.holder.map(|h| h.fence), more), (2, Some(fences[0]), true));
        let want = vec![
            (3, None, true),
            (4, Some(fences[1]), true),
            (5, None, true),
            (6, Some(fences[2]), true),
            (7, None, false),
        ];
        assert_eq!(o.reports(2).await, want);
        o.close(&[]).await;
    });
}

/// How long a follower took to hear each of `rounds` acquisitions and releases of a key, from
/// the acquisition's grant (or the release's acknowledgement) to the observation.
fn observer_delays(url: &str, fault: Option<EtcdFault>, rounds: usize) -> Vec<Duration> {
    use futures_lite::StreamExt;
    use leasehold_http::Observation;
    let follower = client_with(url, "follower", HANDOFF_TTL_MS, fault);
    let holder = client(url, "holder", HANDOFF_TTL_MS);
    smol::block_on(async {
        let mut seen = follower.observe("followed").unwrap();
        assert_eq!(within(10_000, "the first report", seen.next()).await, Some(Observation::Free));
        let mut took = Vec::new();
        for _ in 0..rounds {
            // Let the follower's keepalive be the held one, so the push is what is measured.
            sleep(300).await;
            let lease = holder.acquire("followed").await.unwrap();
            let granted = Instant::now();
            let o = within(20_000, "the grant heard", seen.next()).await.unwrap();
            took.push(granted.elapsed());
            assert!(matches!(&o, Observation::Held { fence, .. } if Some(*fence) == lease.fence()), "{o:?}");
            sleep(300).await;
            lease.release().await.unwrap();
            let released = Instant::now();
            assert_eq!(within(20_000, "the release heard", seen.next()).await, Some(Observation::Free));
            took.push(released.elapsed());
        }
        drop(seen);
        follower.close().await;
        holder.close().await;
        took
    })
}

#[test]
fn an_observer_is_pushed_each_change_at_once_not_at_its_next_keepalive() {
    // Keepalives 5 s apart: a follower that looked only at each keepalive would hear six
    // changes all within 1 s with probability about (1/5)⁶.
    let e = etcd();
    let took = observer_delays(e.url(), None, 3);
    println!("observer delays: {took:?}");
    assert!(took.iter().all(|t| *t < HANDOFF_BOUND), "delays {took:?}, bound {HANDOFF_BOUND:?}");
}

#[test]
fn planted_no_watch_is_caught_by_the_observer_bound() {
    // Without watches each change is heard at the follower's next keepalive (0..5 s): four all
    // under 1 s would be a (1/5)⁴ = 0.16% fluke.
    let e = etcd();
    let took = observer_delays(e.url(), Some(EtcdFault::NoWatch), 2);
    println!("observer delays without watches: {took:?}");
    assert!(took.iter().any(|t| *t >= HANDOFF_BOUND), "NoWatch went unnoticed by observers: {took:?}");
}

#[test]
fn a_keys_limit_is_its_oldest_waiters_and_a_refused_newcomer_refuses_nobody_else() {
    let e = etcd();
    let raw = Etcd::new(e.url());
    let (a, c) = (client(e.url(), "a", 6_000), client(e.url(), "c", 6_000));
    smol::block_on(async {
        let held = a.try_acquire_with_limit("agreed", three()).await.unwrap();
        // A newcomer with another limit, caught between its put and its refusal's delete.
        let lease =
            raw.post("/v3/lease/grant", json!({"TTL": "30"})).await["ID"].as_str().unwrap().to_string();
        let id: u64 = lease.parse().unwrap();
        let stray = json!({"label": "stray", "limit": 2, "value": ""}).to_string();
        let put =
            json!({"key": B64.encode(waiter("agreed", id)), "value": B64.encode(stray), "lease": lease});
        raw.post("/v3/kv/put", put).await;
        // The key's limit is still a's 3: c is granted a slot, not refused for the stray's 2.
        let second = c.try_acquire_with_limit("agreed", three()).await.expect("judged by the oldest");
        assert!(second.fence() > held.fence());
        assert_eq!(
            client(e.url(), "d", 6_000).try_acquire("agreed").await.unwrap_err(),
            AcquireError::Rejected(leasehold_core::Reject::LimitMismatch),
            "a limit of 1 against the oldest's 3"
        );
        raw.post("/v3/lease/revoke", json!({"ID": lease})).await;
        second.release().await.unwrap();
        held.release().await.unwrap();
    });
}

#[test]
fn an_observer_of_a_semaphore_follows_its_oldest_grant() {
    use leasehold_http::Observation;
    let e = etcd();
    let (a, b) = (client(e.url(), "a", HANDOFF_TTL_MS), client(e.url(), "b", HANDOFF_TTL_MS));
    let follower = client(e.url(), "follower", HANDOFF_TTL_MS);
    smol::block_on(async {
        let la = a.try_acquire_with_limit("sem", three()).await.unwrap();
        let lb = b.try_acquire_with_limit("sem", three()).await.unwrap();
        let held = |c: &SessionClient, label: &str, l: &leasehold_http::Lease| Observation::Held {
            session: c.session_id().unwrap(),
            label: label.into(),
            fence: l.fence().unwrap(),
            value: String::new(),
        };
        let (want_a, want_b) = (held(&a, "a", &la), held(&b, "b", &lb));
        let mut seen = follower.observe("sem").unwrap();
        assert_eq!(next_pushed(&mut seen, "the oldest grant").await, want_a);
        la.release().await.unwrap();
        assert_eq!(next_pushed(&mut seen, "the next oldest").await, want_b);
        lb.release().await.unwrap();
        assert_eq!(next_pushed(&mut seen, "free").await, Observation::Free);
        drop(seen);
        for c in [&a, &b, &follower] {
            c.close().await;
        }
    });
}
