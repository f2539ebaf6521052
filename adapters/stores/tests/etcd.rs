//! etcd-specific behaviour against a real etcd started on loopback (`apt-get install -y
//! etcd-server`): what the backend-generic conformance suite (in `tests/tests/conformance.rs`)
//! cannot see from outside, checked by reading etcd directly.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use leasehold_core::{
    parse_key, Duration as LDuration, Fence, Op, OwnerId, Reject, Reply, Request, RequestId,
};
use leasehold_http::{Backend, Client, LostReason, Options};
use leasehold_stores::EtcdBackend;
use leasehold_test_servers::etcd;
use serde_json::json;

mod common;
use common::Etcd;

const PREFIX: &str = "leasehold/";

fn backend(url: &str) -> EtcdBackend {
    EtcdBackend::new(url, PREFIX, Duration::from_secs(2)).unwrap()
}

async fn call(b: &EtcdBackend, key: &str, owner: u64, op: Op) -> Reply {
    let request = Request { id: RequestId(1), owner: OwnerId(owner), op };
    b.call(&parse_key(key).unwrap(), request).await.unwrap()
}

async fn grant(b: &EtcdBackend, key: &str, owner: u64, ttl: LDuration) -> Fence {
    match call(b, key, owner, Op::Acquire { ttl }).await {
        Reply::Granted { fence, ttl: t } => {
            assert_eq!(t, ttl);
            fence
        }
        other => panic!("expected a grant for {owner} on {key}, got {other:?}"),
    }
}

/// What these tests read from etcd beyond [`Etcd`]'s own.
impl Etcd {
    /// The stored key: (value, mod_revision, lease).
    async fn get(&self, key: &str) -> Option<(String, u64, i64)> {
        let v = self.post("/v3/kv/range", json!({"key": B64.encode(format!("{PREFIX}{key}"))})).await;
        let kv = &v["kvs"][0];
        kv.is_object().then(|| {
            let n = |f: &str| kv[f].as_str().unwrap_or("0").parse::<i64>().unwrap();
            let value = String::from_utf8(B64.decode(kv["value"].as_str().unwrap()).unwrap()).unwrap();
            (value, n("mod_revision") as u64, n("lease"))
        })
    }

    async fn ttl(&self, lease: i64) -> (i64, i64) {
        let v = self.post("/v3/lease/timetolive", json!({"ID": lease.to_string()})).await;
        let n = |f: &str| v[f].as_str().unwrap_or("0").parse::<i64>().unwrap();
        (n("TTL"), n("grantedTTL"))
    }
}

#[test]
fn grant_is_an_etcd_lease_with_the_key_and_the_fence_is_its_revision() {
    let server = etcd();
    let (b, etcd) = (backend(server.url()), Etcd::new(server.url()));
    smol::block_on(async {
        // 300 ms asked: etcd counts seconds and keeps at least that.
        let fence = grant(&b, "pump", 7, LDuration::from_millis(300)).await;
        let (value, rev, lease) = etcd.get("pump").await.expect("key written");
        assert_eq!((value.as_str(), rev), ("7", fence.0));
        let (_, granted) = etcd.ttl(lease).await;
        assert!(granted >= 1, "granted TTL {granted}s");
        // The contender gets Busy with about the holder's remaining time, and its own fresh
        // etcd lease is revoked, not leaked.
        let long = grant(&b, "long", 1, LDuration::from_secs(10)).await;
        match call(&b, "long", 2, Op::Acquire { ttl: LDuration::from_secs(10) }).await {
            Reply::Busy { retry_after } => {
                assert!((8..=10).contains(&(retry_after.as_micros() / 1_000_000)), "{retry_after:?}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(etcd.leases().await, 2, "only the two holders' leases remain");
        // Released: key gone, lease revoked.
        assert_eq!(call(&b, "long", 1, Op::Release { fence: long }).await, Reply::Released);
        assert_eq!(etcd.get("long").await, None);
        assert_eq!(etcd.leases().await, 1);
    });
}

#[test]
fn a_retried_acquire_gets_a_new_fence_and_drops_the_old_lease() {
    let server = etcd();
    let (b, etcd) = (backend(server.url()), Etcd::new(server.url()));
    smol::block_on(async {
        let ttl = LDuration::from_secs(5);
        let first = grant(&b, "k", 3, ttl).await;
        let (_, _, old_lease) = etcd.get("k").await.unwrap();
        // The first reply was lost; the core asks again.
        let second = grant(&b, "k", 3, ttl).await;
        assert!(second > first, "{second} after {first}");
        let (_, rev, new_lease) = etcd.get("k").await.unwrap();
        assert_eq!(rev, second.0);
        assert_ne!(new_lease, old_lease);
        assert_eq!(etcd.ttl(old_lease).await.0, -1, "old lease revoked");
        assert_eq!(call(&b, "k", 3, Op::Renew { fence: first, ttl }).await, Reply::NotHolder);
        assert_eq!(
            call(&b, "k", 3, Op::Renew { fence: second, ttl }).await,
            Reply::Granted { fence: second, ttl }
        );
        assert_eq!(call(&b, "k", 3, Op::Release { fence: first }).await, Reply::NotHolder);
        assert_eq!(call(&b, "k", 3, Op::Release { fence: second }).await, Reply::Released);
    });
}

#[test]
fn losses_are_not_holder_not_errors() {
    let server = etcd();
    let (b, etcd) = (backend(server.url()), Etcd::new(server.url()));
    smol::block_on(async {
        let ttl = LDuration::from_secs(5);
        // The lease dies (here: an operator revokes it): the keepalive's answer has no TTL.
        let f = grant(&b, "revoked", 1, ttl).await;
        let (_, _, lease) = etcd.get("revoked").await.unwrap();
        etcd.post("/v3/lease/revoke", json!({"ID": lease.to_string()})).await;
        assert_eq!(call(&b, "revoked", 1, Op::Renew { fence: f, ttl }).await, Reply::NotHolder);
        assert!(grant(&b, "revoked", 2, ttl).await > f);
        // The key is deleted under a live lease.
        let f = grant(&b, "deleted", 1, ttl).await;
        etcd.post("/v3/kv/deleterange", json!({"key": B64.encode(format!("{PREFIX}deleted"))})).await;
        assert_eq!(call(&b, "deleted", 1, Op::Renew { fence: f, ttl }).await, Reply::NotHolder);
        assert_eq!(call(&b, "deleted", 1, Op::Release { fence: f }).await, Reply::NotHolder);
    });
}

#[test]
fn grants_survive_a_new_backend_instance() {
    // No per-process state: a restarted process with the same owner id renews and releases.
    let server = etcd();
    let ttl = LDuration::from_secs(5);
    let f = smol::block_on(grant(&backend(server.url()), "k", 9, ttl));
    let other = backend(server.url());
    smol::block_on(async {
        assert_eq!(call(&other, "k", 9, Op::Renew { fence: f, ttl }).await, Reply::Granted { fence: f, ttl });
        assert_eq!(call(&other, "k", 8, Op::Renew { fence: f, ttl }).await, Reply::NotHolder);
        assert_eq!(call(&other, "k", 9, Op::Release { fence: f }).await, Reply::Released);
    });
}

#[test]
fn a_held_lease_learns_of_its_loss() {
    // Through the core's lease machine: the renewal after a revoke reports a loss.
    let server = etcd();
    let etcd = Etcd::new(server.url());
    let client = Client::new(backend(server.url()), Options::new(Duration::from_secs(2))).unwrap();
    smol::block_on(async {
        let lease = client.acquire("watched").await.unwrap();
        let (_, rev, id) = etcd.get("watched").await.unwrap();
        assert_eq!(lease.fence(), Some(Fence(rev)));
        etcd.post("/v3/lease/revoke", json!({"ID": id.to_string()})).await;
        let lost = futures_lite::future::or(async { Some(lease.lost().await) }, async {
            async_io::Timer::after(Duration::from_secs(3)).await;
            None
        })
        .await;
        assert_eq!(lost, Some(LostReason::Revoked));
    });
}

#[test]
fn a_url_without_a_gateway_is_misconfigured() {
    let server = etcd();
    let b = backend(&format!("{}/not-etcd", server.url()));
    let reply = smol::block_on(call(&b, "k", 1, Op::Acquire { ttl: LDuration::from_secs(1) }));
    assert_eq!(reply, Reply::Rejected(Reject::Misconfigured));
}

/// What [`Interceptor`] runs once.
type Hook = Box<dyn FnOnce() + Send>;

/// A TCP proxy in front of etcd that runs `hook` once, just before it forwards the first
/// request whose bytes contain `trigger`: a way to act *between* two requests of one backend
/// call, on the real wire.
struct Interceptor {
    addr: std::net::SocketAddr,
    fired: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Interceptor {
    fn start(upstream: &str, trigger: &'static [u8], hook: impl FnOnce() + Send + 'static) -> Interceptor {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let upstream: std::net::SocketAddr = upstream.trim_start_matches("http://").parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fired = Arc::new(AtomicBool::new(false));
        let hook: Arc<Mutex<Option<Hook>>> = Arc::new(Mutex::new(Some(Box::new(hook))));
        let flag = fired.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (hook, flag) = (hook.clone(), flag.clone());
                std::thread::spawn(move || {
                    let server = TcpStream::connect(upstream).unwrap();
                    let (mut from_server, mut to_client) =
                        (server.try_clone().unwrap(), client.try_clone().unwrap());
                    std::thread::spawn(move || std::io::copy(&mut from_server, &mut to_client));
                    let (mut from_client, mut to_server) = (client, server);
                    // The tail of the previous read too, so a trigger split across reads is seen.
                    let mut seen: Vec<u8> = Vec::new();
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let n = match from_client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        seen.extend_from_slice(&buf[..n]);
                        if seen.windows(trigger.len()).any(|w| w == trigger) {
                            // Before forwarding: etcd cannot act on a request it has not read whole.
                            if let Some(hook) = hook.lock().unwrap().take() {
                                hook();
                                flag.store(true, Ordering::SeqCst);
                            }
                        }
                        seen.drain(..seen.len().saturating_sub(trigger.len()));
                        if to_server.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to_server.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Interceptor { addr, fired }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn fired(&self) -> bool {
        self.fired.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[test]
fn a_key_re_created_by_a_rival_before_the_keepalive_is_not_renewed() {
    // The renewal reads the key to find its etcd lease, then keeps that lease alive. Between
    // the two, the key is deleted (here by an operator; an expiry does the same) and a rival
    // acquires it: our keepalive still succeeds, on a lease that no longer carries the key.
    let server = etcd();
    let ttl = LDuration::from_secs(5);
    let ours = smol::block_on(grant(&backend(server.url()), "raced", 1, ttl));
    let rival_fence = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (url, rival) = (server.url().to_string(), rival_fence.clone());
    let proxy = Interceptor::start(server.url(), b"POST /v3/lease/keepalive", move || {
        smol::block_on(async {
            // The key and its entry in the key's v2 queue, as an expiry deletes them.
            for k in [format!("{PREFIX}raced"), format!("{PREFIX}v2/raced@v1")] {
                Etcd::new(&url).post("/v3/kv/deleterange", json!({"key": B64.encode(k)})).await;
            }
            *rival.lock().unwrap() = Some(grant(&backend(&url), "raced", 2, ttl).await);
        })
    });
    let through_proxy = backend(&proxy.url());
    let reply = smol::block_on(call(&through_proxy, "raced", 1, Op::Renew { fence: ours, ttl }));
    assert!(proxy.fired(), "the renewal never sent a keepalive");
    assert_eq!(reply, Reply::NotHolder, "renewed a key the rival re-created");
    let rival = rival_fence.lock().unwrap().expect("the rival acquired");
    let etcd = Etcd::new(server.url());
    let (value, rev, _) = smol::block_on(etcd.get("raced")).expect("the rival's key");
    assert_eq!((value.as_str(), rev), ("2", rival.0), "the rival's write is left alone");
    let direct = backend(server.url());
    assert_eq!(
        smol::block_on(call(&direct, "raced", 2, Op::Renew { fence: rival, ttl })),
        Reply::Granted { fence: rival, ttl }
    );
}

#[test]
fn listing_pages_through_the_held_keys_under_the_prefix_in_byte_order() {
    use leasehold_stores::Filter;
    let server = etcd();
    let etcd = Etcd::new(server.url());
    // One key per page: a listing that stopped after its first page would show one key.
    let b = backend(server.url()).with_page_size(1);
    let ttl = LDuration::from_secs(30);
    smol::block_on(async {
        let mut fences = std::collections::HashMap::new();
        for (key, owner) in [("job:2", 2), ("pump", 4), ("job:10", 10), ("job:1", 1), ("gone", 5)] {
            fences.insert(key, grant(&b, key, owner, ttl).await);
        }
        assert_eq!(call(&b, "gone", 5, Op::Release { fence: fences["gone"] }).await, Reply::Released);
        // Beside ours: a key outside the prefix, and one under it that leasehold did not write.
        let put = |k: &str, v: &str| json!({"key": B64.encode(k), "value": B64.encode(v)});
        etcd.post("/v3/kv/put", put("other/job:3", "3")).await;
        etcd.post("/v3/kv/put", put(&format!("{PREFIX}job:foreign"), "not an owner")).await;

        let all = b.list(&Filter::default()).await.unwrap();
        let keys: Vec<&str> = all.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(keys, ["job:1", "job:10", "job:2", "pump"]);
        for k in &all {
            let h = k.holder.as_ref().expect("etcd lists held keys only");
            assert_eq!((h.fence, k.last_fence), (fences[k.key.as_str()], fences[k.key.as_str()]), "{k:?}");
            let owner = k.key.strip_prefix("job:").map_or(4, |n| n.parse().unwrap());
            assert_eq!(h.owner, OwnerId(owner), "{k:?}");
            assert_eq!(h.ttl, Some(Duration::from_secs(30)), "{k:?}");
            let left = h.remaining.expect("etcd tells the lease's time to live");
            assert!(left > Duration::ZERO && left <= Duration::from_secs(30), "{k:?}");
        }
        let jobs = b.list(&Filter { prefix: "job:1".into(), held_only: true }).await.unwrap();
        assert_eq!(jobs.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(), ["job:1", "job:10"]);
        assert_eq!(b.status(&parse_key("pump").unwrap()).await.unwrap().as_ref(), all.last());
        assert_eq!(b.status(&parse_key("gone").unwrap()).await.unwrap(), None, "released: deleted");
        assert_eq!(b.status(&parse_key("never").unwrap()).await.unwrap(), None);
    });
}
