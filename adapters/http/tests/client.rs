//! The handle against a real built-in server on loopback.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::future;
use leasehold_core::{ConfigError, Key, Op, OwnerId, Reject, Reply, Request, RequestId};
use leasehold_http::{
    AcquireError, Backend, BuiltinBackend, Client, Health, LostReason, Options, ReleaseError, Report,
    TransportError,
};
use leasehold_server::{RunningServer, Server, ServerConfig};

mod support;
use support::{sleep, within};

fn server(dir: &std::path::Path) -> RunningServer {
    Server::spawn(ServerConfig::new(dir, "127.0.0.1:0".parse().unwrap())).expect("server starts")
}

fn client(url: &str, ttl_ms: u64) -> Client<BuiltinBackend> {
    let backend = BuiltinBackend::new(url, None, Duration::from_millis(500)).unwrap();
    Client::new(backend, Options::new(Duration::from_millis(ttl_ms))).unwrap()
}

#[test]
fn mutual_exclusion_and_increasing_fences() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    smol::block_on(async {
        let a = client(&s.url(), 2_000);
        let b = client(&s.url(), 2_000);
        let la = a.acquire("job").await.unwrap();
        let fa = la.fence().unwrap();
        assert!(la.is_healthy());
        assert!(la.remaining().unwrap() > Duration::from_millis(1_500));
        assert_eq!(b.try_acquire("job").await.unwrap_err(), AcquireError::Busy);
        la.release().await.expect("release acknowledged");
        let lb = within(2_000, "acquire after release", b.acquire("job")).await.unwrap();
        assert!(lb.fence().unwrap() > fa);
        assert!(matches!(a.try_acquire("no spaces").await, Err(AcquireError::InvalidKey(_))));
    });
}

#[tokio::test(flavor = "current_thread")]
async fn works_under_tokio() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let a = client(&s.url(), 2_000);
    let b = client(&s.url(), 2_000);
    let la = a.acquire("tokio").await.unwrap();
    assert_eq!(b.try_acquire("tokio").await.unwrap_err(), AcquireError::Busy);
    // Tokio's own timer, to show the lease renews while tokio drives the test.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert!(la.is_healthy(), "renewed past its ttl under tokio");
    drop(la);
    let lb = b.acquire_timeout("tokio", Duration::from_secs(2)).await.unwrap();
    assert!(lb.fence().is_some());
}

/// Counts calls into the real backend.
struct Counting(BuiltinBackend, Arc<AtomicUsize>);

impl Backend for Counting {
    async fn call(&self, key: &Key, request: Request) -> Result<Reply, TransportError> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.call(key, request).await
    }
}

#[test]
fn uncontended_acquire_costs_one_request() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let calls = Arc::new(AtomicUsize::new(0));
    let backend =
        Counting(BuiltinBackend::new(&s.url(), None, Duration::from_secs(1)).unwrap(), calls.clone());
    let c = Client::new(backend, Options::new(Duration::from_secs(30))).unwrap();
    smol::block_on(async {
        let l = c.acquire("solo").await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one HTTP request for an uncontended acquire");
        l.release().await.expect("release acknowledged");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn renews_past_the_ttl_and_keeps_its_fence() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    smol::block_on(async {
        // Renewals every ttl/3 against an fsyncing server: a ttl of two seconds leaves room for
        // a loaded CI machine's disk without changing what is checked.
        let c = client(&s.url(), 2_000);
        let l = c.acquire("renewed").await.unwrap();
        let f = l.fence();
        for _ in 0..10 {
            sleep(300).await;
            assert!(l.remaining().is_some(), "lease lapsed while renewing");
        }
        assert_eq!(l.fence(), f);
        assert_eq!(l.health(), Health::Held);
        let other = client(&s.url(), 1_000);
        assert_eq!(other.try_acquire("renewed").await.unwrap_err(), AcquireError::Busy);
    });
}

#[test]
fn lost_fires_by_the_local_deadline_when_the_server_vanishes() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    smol::block_on(async {
        let c = client(&s.url(), 2_000);
        let l = c.acquire("doomed").await.unwrap();
        let started = Instant::now();
        drop(s);
        // No renewal can succeed from here on, so the validity left now is when it ends.
        let left = l.remaining().expect("just acquired");
        let why = within(4_000, "lost()", l.lost()).await;
        assert_eq!(why, LostReason::Expired);
        // lost() fires at the end of the validity, not after the ttl, let alone after retries
        // give up; the slack is only for a loaded machine's scheduling.
        let slack = Duration::from_millis(500);
        assert!(started.elapsed() <= left + slack, "{:?} for {left:?} left", started.elapsed());
        assert_eq!(l.remaining(), None);
        assert_eq!(l.health(), Health::Lost);
        assert_eq!(l.fence(), None);
    });
}

#[test]
fn dropping_a_lease_releases_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    smol::block_on(async {
        let a = client(&s.url(), 30_000);
        let b = client(&s.url(), 30_000);
        drop(a.acquire("dropped").await.unwrap());
        // The release goes out in the background; once it is done the key is free, far
        // sooner than the 30 s ttl. (Racing `b` against it instead would make `b` poll, every
        // ttl/8, which is a loaded machine's timing, not the property.)
        within(10_000, "the background release", a.wait_idle()).await;
        let l = b.try_acquire("dropped").await.expect("free after the dropped lease's release");
        assert!(l.fence().is_some());
    });
}

/// Holds every release back for a while, as a slow network would.
struct SlowRelease(BuiltinBackend);

impl Backend for SlowRelease {
    async fn call(&self, key: &Key, request: Request) -> Result<Reply, TransportError> {
        if matches!(request.op, Op::Release { .. }) {
            sleep(300).await;
        }
        self.0.call(key, request).await
    }
}

#[test]
fn wait_idle_returns_once_dropped_leases_are_released() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let backend = SlowRelease(BuiltinBackend::new(&s.url(), None, Duration::from_secs(2)).unwrap());
    let a = Client::new(backend, Options::new(Duration::from_secs(30))).unwrap();
    let rival = client(&s.url(), 30_000);
    smol::block_on(async {
        // Nothing taken yet: idle at once.
        within(1_000, "wait_idle of a fresh client", a.wait_idle()).await;
        let l1 = a.acquire("idle-1").await.unwrap();
        let l2 = a.acquire("idle-2").await.unwrap();
        drop(l1);
        drop(l2);
        // The releases are still held back: the keys are taken as far as the server knows.
        assert_eq!(rival.try_acquire("idle-1").await.unwrap_err(), AcquireError::Busy);
        within(5_000, "wait_idle after drops", a.wait_idle()).await;
        // Both releases reached the server: free long before the 30 s ttl.
        for key in ["idle-1", "idle-2"] {
            let l = rival.try_acquire(key).await.unwrap();
            l.release().await.expect("release acknowledged");
        }
        // A held lease keeps the client busy; releasing it ends that.
        let held = a.acquire("idle-1").await.unwrap();
        let waited = future::or(
            async {
                a.wait_idle().await;
                true
            },
            async {
                sleep(200).await;
                false
            },
        )
        .await;
        assert!(!waited, "wait_idle returned while a lease was held");
        held.release().await.expect("release acknowledged");
        within(1_000, "wait_idle after release", a.wait_idle()).await;
    });
}

/// Grants, then answers every renewal with a permanent error (credentials revoked, say).
struct RenewalsMisconfigured(BuiltinBackend);

impl Backend for RenewalsMisconfigured {
    async fn call(&self, key: &Key, request: Request) -> Result<Reply, TransportError> {
        match request.op {
            Op::Renew { .. } => Err(TransportError::Config("credentials revoked".into())),
            _ => self.0.call(key, request).await,
        }
    }
}

#[test]
fn a_permanent_error_ends_a_held_lease_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let backend = RenewalsMisconfigured(BuiltinBackend::new(&s.url(), None, Duration::from_secs(2)).unwrap());
    // The first renewal (due after a third of the ttl) fails for good.
    let c = Client::new(backend, Options::new(Duration::from_secs(3))).unwrap();
    smol::block_on(async {
        let l = c.acquire("revoked").await.unwrap();
        let reason = within(10_000, "lost after the first renewal", l.lost()).await;
        // Not `Expired`: the lease ended at the failed renewal, not at its deadline.
        assert_eq!(reason, LostReason::Unreachable);
        assert_eq!(l.remaining(), None);
    });
}

#[test]
fn same_process_acquires_queue_locally() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    smol::block_on(async {
        let c = client(&s.url(), 5_000);
        let first = c.acquire("local").await.unwrap();
        assert_eq!(c.try_acquire("local").await.unwrap_err(), AcquireError::Busy);
        let c2 = c.clone();
        let second = smol::spawn(async move { c2.acquire("local").await });
        sleep(300).await;
        assert!(!second.is_finished(), "second acquire must wait for the first");
        let f1 = first.fence().unwrap();
        first.release().await.expect("release acknowledged");
        let l2 = within(2_000, "queued acquire", second).await.unwrap();
        assert!(l2.fence().unwrap() > f1);
    });
}

#[test]
fn bad_configuration_and_dead_servers_are_errors_not_panics() {
    let backend = BuiltinBackend::new("http://127.0.0.1:9", None, Duration::from_millis(200)).unwrap();
    let zero = Client::new(backend, Options::new(Duration::ZERO)).err();
    assert_eq!(zero, Some(ConfigError::ZeroTtl));
    assert!(matches!(
        BuiltinBackend::new("ftp://x", None, Duration::from_secs(1)),
        Err(TransportError::Config(_))
    ));

    // Nothing listens on the discard port.
    let c = client("http://127.0.0.1:9", 1_000);
    let r = smol::block_on(within(
        3_000,
        "acquire on a dead server",
        c.acquire_timeout("k", Duration::from_millis(500)),
    ));
    // The error says where and why, down to the OS's word for it.
    let e = r.unwrap_err();
    assert!(matches!(&e, AcquireError::Unavailable(Some(_))), "{e:?}");
    let text = Report(&e).to_string();
    assert!(text.contains("cannot connect to 127.0.0.1:9") && text.contains("refused"), "{text}");
    assert_eq!(text.matches("127.0.0.1:9").count(), 1, "each cause once: {text}");
}

#[test]
fn bearer_token_and_server_limits_are_typed_rejections() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap());
    config.token = Some("s3cret".into());
    config.limits.max_ttl = leasehold_core::Duration::from_secs(60);
    let s = Server::spawn(config).expect("server starts");
    smol::block_on(async {
        let anonymous = client(&s.url(), 2_000);
        assert_eq!(
            anonymous.try_acquire("guarded").await.unwrap_err(),
            AcquireError::Rejected(Reject::Unauthorized)
        );
        let backend = BuiltinBackend::new(&s.url(), Some("s3cret".into()), Duration::from_secs(1)).unwrap();
        let c = Client::new(backend, Options::new(Duration::from_secs(2))).unwrap();
        let l = c.try_acquire("guarded").await.unwrap();
        assert!(l.fence().is_some());
        l.release().await.expect("release acknowledged");

        // Valid for the client, longer than this server grants.
        let backend = BuiltinBackend::new(&s.url(), Some("s3cret".into()), Duration::from_secs(1)).unwrap();
        let c = Client::new(backend, Options::new(Duration::from_secs(120))).unwrap();
        assert_eq!(c.acquire("guarded").await.unwrap_err(), AcquireError::Rejected(Reject::InvalidTtl));
    });
}

fn acquire_request(owner: u64) -> Request {
    Request {
        id: RequestId(1),
        owner: OwnerId(owner),
        op: Op::Acquire { ttl: leasehold_core::Duration::from_secs(5) },
    }
}

#[test]
fn a_connection_the_server_closed_is_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let addr = s.addr();
    let backend = BuiltinBackend::new(&s.url(), None, Duration::from_secs(1)).unwrap();
    let key = leasehold_core::parse_key("pooled").unwrap();
    smol::block_on(async {
        let first = backend.call(&key, acquire_request(1)).await;
        assert!(matches!(first, Ok(Reply::Granted { .. })), "{first:?}");
        // The restart closes the pooled keep-alive connection behind the client's back.
        drop(s);
        let s = Server::spawn(ServerConfig::new(dir.path(), addr)).expect("server restarts on the same port");
        let second = backend.call(&key, acquire_request(2)).await;
        assert!(matches!(second, Ok(Reply::Busy { .. })), "fresh connection, durable grant: {second:?}");
        drop(s);
    });
}

/// Counts failed calls into the real backend.
struct CountingErrors(BuiltinBackend, Arc<AtomicUsize>);

impl Backend for CountingErrors {
    async fn call(&self, key: &Key, request: Request) -> Result<Reply, TransportError> {
        let r = self.0.call(key, request).await;
        if r.is_err() {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
        r
    }
}

#[test]
fn a_short_outage_is_ridden_out_by_the_cores_retries() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let addr = s.addr();
    let errors = Arc::new(AtomicUsize::new(0));
    let backend = CountingErrors(
        BuiltinBackend::new(&s.url(), None, Duration::from_millis(200)).unwrap(),
        errors.clone(),
    );
    let c = Client::new(backend, Options::new(Duration::from_millis(3_000))).unwrap();
    smol::block_on(async {
        let l = c.acquire("outage").await.unwrap();
        let fence = l.fence();
        drop(s);
        // Long enough for renewals to fail, short enough for the grant to stay valid.
        sleep(1_200).await;
        assert!(errors.load(Ordering::SeqCst) >= 1, "renewals against a dead server are transport errors");
        assert!(l.remaining().is_some(), "still within the grant");
        let _s =
            Server::spawn(ServerConfig::new(dir.path(), addr)).expect("server restarts on the same port");
        // Past the ttl measured from the acquisition: only a retried renewal keeps it.
        sleep(3_000).await;
        assert!(l.is_healthy(), "renewal resumed after the outage: {:?}", l.health());
        assert_eq!(l.fence(), fence);
        l.release().await.expect("release acknowledged");
    });
}

#[test]
fn handles_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Client<BuiltinBackend>>();
    assert_send_sync::<leasehold_http::Lease>();
}

#[test]
fn release_against_a_vanished_server_says_it_was_not_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let addr = s.addr().to_string();
    smol::block_on(async {
        let c = client(&s.url(), 600);
        let l = c.acquire("orphan").await.unwrap();
        let fence = l.fence().unwrap();
        drop(s);
        // It can take no longer than the lease's remaining validity (< 600 ms); the bound
        // here only keeps a broken release from hanging the test.
        match within(3_000, "release with no server", l.release()).await {
            Err(ReleaseError::NotAcknowledged { fence: f, last_error: Some(e), .. }) => {
                assert_eq!(f, fence);
                let text = Report(&e).to_string();
                assert!(text.contains(&addr), "the last error names the server: {text}");
            }
            other => panic!("expected an unacknowledged release, got {other:?}"),
        }
    });
    // Acknowledged releases are Ok: see every other test's `release().await.expect(..)`.
}

/// Answers renewals with "not the holder" once told to, as an authority that revoked the
/// grant would; counts every call.
struct Revoking(BuiltinBackend, Arc<AtomicUsize>, Arc<AtomicBool>);

impl Backend for Revoking {
    async fn call(&self, key: &Key, request: Request) -> Result<Reply, TransportError> {
        self.1.fetch_add(1, Ordering::SeqCst);
        if matches!(request.op, Op::Renew { .. }) && self.2.load(Ordering::SeqCst) {
            return Ok(Reply::NotHolder);
        }
        self.0.call(key, request).await
    }
}

#[test]
fn a_lost_lease_frees_the_local_guard_before_its_handle_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let (calls, revoke) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let backend = Revoking(
        BuiltinBackend::new(&s.url(), None, Duration::from_secs(2)).unwrap(),
        calls.clone(),
        revoke.clone(),
    );
    let c = Client::new(backend, Options::new(Duration::from_millis(1_500))).unwrap();
    smol::block_on(async {
        let l = c.acquire("revoked-locally").await.unwrap();
        revoke.store(true, Ordering::SeqCst);
        assert_eq!(within(5_000, "lost", l.lost()).await, LostReason::Revoked);
        // `l` is still alive. The next attempt must ask the authority, not stop at a guard
        // that belongs to a lease nobody holds any more.
        let before = calls.load(Ordering::SeqCst);
        let again = within(5_000, "acquire after loss", c.acquire("revoked-locally")).await.unwrap();
        assert!(calls.load(Ordering::SeqCst) > before, "asked the authority");
        assert!(again.fence() > l.fence(), "a new grant");
        drop(l);
    });
}

#[test]
fn acquire_timeout_keeps_trying_for_the_whole_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    smol::block_on(async {
        let holder = client(&s.url(), 30_000);
        let waiter = client(&s.url(), 30_000);
        let held = holder.acquire("patient").await.unwrap();

        // The holder's grant outlasts the timeout by far: the waiter gives up, but not early.
        let started = Instant::now();
        let r = waiter.acquire_timeout("patient", Duration::from_secs(2)).await;
        let waited = started.elapsed();
        assert_eq!(r.unwrap_err(), AcquireError::Busy);
        assert!(waited >= Duration::from_secs(2), "gave up after {waited:?}");
        eprintln!("acquire_timeout(2 s) on a key held for 30 s: Busy after {waited:?}");

        // A release at 80 % of the timeout is caught by the attempts left.
        let timeout = Duration::from_secs(10);
        let started = Instant::now();
        let release = async {
            sleep(8_000).await;
            held.release().await.expect("release acknowledged");
        };
        let (l, ()) = future::zip(waiter.acquire_timeout("patient", timeout), release).await;
        let got = started.elapsed();
        let l = l.expect("the waiter gets the lease released at 80 % of its timeout");
        assert!(got >= Duration::from_secs(8), "granted only after the release: {got:?}");
        eprintln!("acquire_timeout(10 s), holder releasing at 8 s: granted after {got:?}");
        assert!(l.fence().is_some());
    });
}

#[test]
fn a_slow_resolver_does_not_hold_up_other_renewals() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let port = s.addr().port();
    let slow = Arc::new(AtomicBool::new(false));
    let resolved = Arc::new(AtomicUsize::new(0));
    let (slow2, resolved2) = (slow.clone(), resolved.clone());
    // A resolver that blocks for seconds, as getaddrinfo does with an unreachable DNS server.
    let backend =
        BuiltinBackend::new(&format!("http://leases.test:{port}"), None, Duration::from_millis(500))
            .unwrap()
            .with_resolver(move |_| {
                resolved2.fetch_add(1, Ordering::SeqCst);
                if slow2.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_secs(4));
                }
                Ok(vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))])
            });
    let c = Client::new(backend, Options::new(Duration::from_millis(3_000))).unwrap();
    smol::block_on(async {
        let l = c.acquire("renewing").await.unwrap();
        let fence = l.fence();
        slow.store(true, Ordering::SeqCst);
        // Several acquisitions at once need connections beyond the pooled one, and so the
        // resolver; each gives up when its request times out.
        let others: Vec<_> = (0..4)
            .map(|i| {
                let c = c.clone();
                smol::spawn(async move { c.try_acquire(&format!("other-{i}")).await.map(drop) })
            })
            .collect();
        for _ in 0..20 {
            sleep(250).await;
            assert!(l.remaining().is_some(), "the held lease lapsed while names resolved");
        }
        for o in others {
            let _ = o.await;
        }
        assert!(resolved.load(Ordering::SeqCst) >= 2, "the slow resolver was consulted");
        assert!(l.is_healthy(), "renewed throughout: {:?}", l.health());
        assert_eq!(l.fence(), fence);
    });
}

/// A task that asks for a connection while another keeps one busy gets its turn: the busy
/// task gives its permit back and asks again at once, and must not take it from the waiter
/// every time (with the pool's semaphore alone, 32 of 64 load clients waited out their 5 s
/// timeout). One connection, one executor: the busy task's count when the waiter's request
/// is answered shows how many turns it took.
#[test]
fn a_request_waiting_for_a_connection_is_not_overtaken_by_a_busy_task_every_time() {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use leasehold_http::HttpClient;
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let http = HttpClient::new(&s.url(), Duration::from_secs(30)).unwrap().with_max_connections(1);
    let get = || http.request(hyper::Method::GET, "/healthz").body(Full::new(Bytes::new())).unwrap();
    const BUSY: usize = 200;
    let busy_sent = AtomicUsize::new(0);
    let ((), waiter) = smol::block_on(within(60_000, "both tasks", async {
        let busy = async {
            for _ in 0..BUSY {
                assert_eq!(http.send(get()).await.unwrap().status, 200);
                busy_sent.fetch_add(1, Ordering::SeqCst);
            }
        };
        let waiter = async {
            // Ask once the busy task holds the connection.
            while busy_sent.load(Ordering::SeqCst) == 0 {
                future::yield_now().await;
            }
            assert_eq!(http.send(get()).await.unwrap().status, 200);
            busy_sent.load(Ordering::SeqCst)
        };
        future::zip(busy, waiter).await
    }));
    println!("the waiter was answered after {waiter} of the busy task's {BUSY} requests");
    assert!(waiter <= 4, "the waiter was answered only after {waiter} of the busy task's {BUSY} requests");
}
