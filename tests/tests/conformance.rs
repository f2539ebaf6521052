//! One conformance suite, every backend: the same generic checks against the built-in server
//! and a real etcd, each started on loopback by the test.

use std::time::{Duration, Instant};

use leasehold_core::{parse_key, Duration as LDuration, Fence, Op, OwnerId, Reply, Request, RequestId};
use leasehold_http::{Backend, BuiltinBackend, Client, Options, TransportError};
use leasehold_server::{Server, ServerConfig};
use leasehold_stores::{Credentials, DynamoDbBackend, EtcdBackend};
use leasehold_test_servers::{dynalite, etcd, free_port, ClosingProxy};

/// A child process and the directory it owns; both go when dropped.
fn dynamo(url: &str, table: &str) -> DynamoDbBackend {
    let creds = Credentials::new("AKIDLEASEHOLDTEST", "not-a-real-secret", None, None, "test");
    DynamoDbBackend::new(url, "us-east-1", table, creds, Duration::from_secs(2)).unwrap()
}

fn req(owner: u64, op: Op) -> Request {
    Request { id: RequestId(1), owner: OwnerId(owner), op }
}

const TTL: LDuration = LDuration::from_secs(2);

async fn granted<B: Backend>(b: &B, key: &str, owner: u64) -> Fence {
    match b.call(&parse_key(key).unwrap(), req(owner, Op::Acquire { ttl: TTL })).await {
        Ok(Reply::Granted { fence, ttl }) => {
            assert!(ttl <= TTL && !ttl.is_zero());
            fence
        }
        other => panic!("expected a grant for {owner} on {key}, got {other:?}"),
    }
}

/// Mutual exclusion, fenced release, monotonic fences, renewal, recovery after a transport
/// failure.
async fn protocol<B: Backend>(b: &B, name: &str) {
    let k = parse_key(&format!("conf-{name}")).unwrap();
    let f1 = granted(b, &k, 1).await;
    let contender = b.call(&k, req(2, Op::Acquire { ttl: TTL })).await.unwrap();
    assert!(matches!(contender, Reply::Busy { .. } | Reply::Observed { .. }), "{name}: {contender:?}");
    assert_eq!(
        b.call(&k, req(2, Op::Release { fence: f1 })).await.unwrap(),
        Reply::NotHolder,
        "{name}: other owner"
    );
    assert_eq!(
        b.call(&k, req(1, Op::Release { fence: Fence(f1.0 + 1000) })).await.unwrap(),
        Reply::NotHolder
    );
    assert_eq!(
        b.call(&k, req(1, Op::Renew { fence: f1, ttl: TTL })).await.unwrap(),
        Reply::Granted { fence: f1, ttl: TTL }
    );
    assert_eq!(b.call(&k, req(2, Op::Renew { fence: f1, ttl: TTL })).await.unwrap(), Reply::NotHolder);
    assert_eq!(b.call(&k, req(1, Op::Release { fence: f1 })).await.unwrap(), Reply::Released, "{name}");
    let mut last = f1;
    for owner in 2..6 {
        let f = granted(b, &k, owner).await;
        assert!(f > last, "{name}: fence {f} after {last}");
        assert_eq!(b.call(&k, req(owner, Op::Release { fence: f })).await.unwrap(), Reply::Released);
        last = f;
    }
}

/// Fails the first `n` renewals in transport, then passes everything through.
struct Flaky<B> {
    inner: B,
    failures_left: std::sync::atomic::AtomicUsize,
}

impl<B: Backend> Backend for Flaky<B> {
    async fn call(&self, key: &leasehold_core::Key, request: Request) -> Result<Reply, TransportError> {
        use std::sync::atomic::Ordering::SeqCst;
        if matches!(request.op, Op::Renew { .. })
            && self.failures_left.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok()
        {
            return Err(TransportError::io("injected", std::io::Error::other("injected transient failure")));
        }
        self.inner.call(key, request).await
    }
}

/// Two renewals fail in transport; the lease stays valid, retries, and renews with its fence.
async fn renewal_after_a_transient_failure<B: Backend>(b: B, name: &str) {
    let flaky = Flaky { inner: b, failures_left: 2.into() };
    let client = Client::new(flaky, Options::new(TTL.into())).unwrap();
    let lease = client.acquire(&format!("flaky-{name}")).await.unwrap();
    let fence = lease.fence();
    let t0 = Instant::now();
    while client.backend().failures_left.load(std::sync::atomic::Ordering::SeqCst) > 0 || !lease.is_healthy()
    {
        assert!(lease.remaining().is_some(), "{name}: lease lapsed during transient failures");
        assert!(t0.elapsed() < Duration::from_secs(2), "{name}: never renewed after the failures");
        async_io::Timer::after(Duration::from_millis(10)).await;
    }
    assert_eq!(lease.fence(), fence, "{name}: a renewal keeps the fence");
    lease.release().await.expect("release acknowledged");
}

/// A holder that dies right after its grant: a waiting client gets the key within the bound.
async fn takeover<B: Backend>(b: B, name: &str) -> Duration {
    let key = format!("takeover-{name}");
    let k = parse_key(&key).unwrap();
    let t0 = Instant::now();
    granted(&b, &k, 77).await; // ...and never renews
    let client = Client::new(b, Options::new(TTL.into())).unwrap();
    let lease = client.acquire(&key).await.unwrap();
    let waited = t0.elapsed();
    assert!(lease.fence().is_some());
    waited
}

#[test]
fn builtin_server_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::spawn(ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap())).unwrap();
    let b = || BuiltinBackend::new(&s.url(), None, Duration::from_secs(2)).unwrap();
    smol::block_on(protocol(&b(), "builtin"));
    smol::block_on(renewal_after_a_transient_failure(b(), "builtin"));
    let waited = smol::block_on(takeover(b(), "builtin"));
    // Slack: one busy poll (backoff_max = ttl/8 = 250 ms) and the fsynced grant on a loaded
    // machine.
    report("builtin", waited, TTL.into(), Duration::from_millis(750));

    let proxy = ClosingProxy::start(s.addr());
    let through = BuiltinBackend::new(&proxy.url(), None, Duration::from_secs(2)).unwrap();
    smol::block_on(protocol(&through, "builtin-closing"));
    closed_after_every_response(&proxy);
}

/// The suite passed through `proxy`, which answers `Connection: close` and closes after each
/// response: every reply came on a connection of its own.
fn closed_after_every_response(proxy: &ClosingProxy) {
    assert!(proxy.served() >= 15, "the suite's requests went through the proxy: {}", proxy.served());
}

fn addr_of(url: &str) -> std::net::SocketAddr {
    url.trim_start_matches("http://").trim_end_matches('/').parse().expect("http://IP:PORT")
}

#[test]
fn etcd_conforms() {
    let server = etcd();
    let url = server.url().to_string();
    let b = || EtcdBackend::new(&url, "leasehold/", Duration::from_secs(2)).unwrap();
    smol::block_on(protocol(&b(), "etcd"));
    smol::block_on(renewal_after_a_transient_failure(b(), "etcd"));
    let waited = smol::block_on(takeover(b(), "etcd"));
    // etcd deletes a dead lease's key in a sweep every 500 ms after its expiry, then one busy
    // poll (ttl/8) finds it free.
    report("etcd", waited, TTL.into(), Duration::from_millis(1_250));

    let proxy = ClosingProxy::start(addr_of(&url));
    let through = EtcdBackend::new(&proxy.url(), "leasehold/", Duration::from_secs(2)).unwrap();
    smol::block_on(protocol(&through, "etcd-closing"));
    closed_after_every_response(&proxy);
}

#[test]
fn dynamodb_conforms() {
    let server = dynalite();
    let url = server.url().to_string();
    smol::block_on(dynamo(&url, "leases").create_table()).unwrap();
    smol::block_on(protocol(&dynamo(&url, "leases"), "dynamodb"));
    smol::block_on(renewal_after_a_transient_failure(dynamo(&url, "leases"), "dynamodb"));
    // No server clock: the waiting client observes the record, waits ttl·(1+ε) + margin on its
    // own clock from receipt, then takes over the version it saw.
    let waited = smol::block_on(takeover(dynamo(&url, "leases"), "dynamodb"));
    report("dynamodb", waited, TTL.into(), Duration::from_millis(750));
    let proxy = ClosingProxy::start(addr_of(&url));
    smol::block_on(protocol(&dynamo(&proxy.url(), "leases"), "dynamodb-closing"));
    closed_after_every_response(&proxy);
    // A missing table is the operator's problem, said as such, not a retry loop.
    let missing = smol::block_on(
        dynamo(&url, "no-such-table").call(&parse_key("k").unwrap(), req(1, Op::Acquire { ttl: TTL })),
    );
    assert_eq!(missing.unwrap(), Reply::Rejected(leasehold_core::Reject::Misconfigured));
    assert!(matches!(
        DynamoDbBackend::new(
            &url,
            "us-east-1",
            "ab",
            Credentials::new("a", "b", None, None, "t"),
            Duration::from_secs(1)
        ),
        Err(TransportError::Config(_))
    ));
}

#[test]
fn misconfiguration_is_a_clear_error() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let b = EtcdBackend::new(&dead, "x/", Duration::from_millis(500)).unwrap();
    let r = smol::block_on(b.call(&parse_key("k").unwrap(), req(1, Op::Acquire { ttl: TTL })));
    assert!(matches!(r, Err(TransportError::Connect { .. })), "{r:?}");
    assert!(matches!(
        EtcdBackend::new("etcd://x", "x/", Duration::from_secs(1)),
        Err(TransportError::Config(_))
    ));
}

fn report(name: &str, waited: Duration, ttl: Duration, slack: Duration) {
    let bound = ttl.mul_f64(1.01);
    println!(
        "{name}: takeover after a dead holder {:.3}s, bound ttl*(1+eps) {:.3}s, ratio {:.2}",
        waited.as_secs_f64(),
        bound.as_secs_f64(),
        waited.as_secs_f64() / bound.as_secs_f64()
    );
    assert!(waited <= bound + slack, "{name}: {waited:?}");
}
