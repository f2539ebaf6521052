//! One conformance suite, every backend: the same generic checks against the built-in server
//! and a real etcd, each started on loopback by the test.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use leasehold_core::authority::cas::CasRecord;
use leasehold_core::authority::{decide, Limits, Record};
use leasehold_core::{
    parse_key, Duration as LDuration, Fence, Instant as LInstant, Op, OwnerId, Reply, Request, RequestId,
};
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

/// The core's rules for one key, as the spec a backend must agree with.
#[derive(Debug)]
enum Spec {
    ServerTimed(Record),
    CompareAndSet(CasRecord),
}

impl Spec {
    /// `now` only has to be monotonic: nothing expires within a sequence (ttl 30 s).
    fn apply(&mut self, now: LInstant, request: &Request) -> Reply {
        match self {
            Spec::ServerTimed(rec) => {
                let d = decide(rec, now, request, &Limits::default());
                *rec = d.record;
                d.reply
            }
            Spec::CompareAndSet(rec) => {
                let d = rec.apply(request);
                *rec = d.record;
                d.reply
            }
        }
    }
}

/// Spec fences to the backend's. etcd's fences are cluster revisions, not a per-key count, so
/// fences are compared by the order in which they appear, not by value.
#[derive(Default)]
struct Fences(BTreeMap<Fence, Fence>);

impl Fences {
    /// Checks that `spec` and `backend` are the same grant (or, if new to both, rise alike).
    fn same(&mut self, spec: Fence, backend: Fence, what: &str) {
        match self.0.get(&spec) {
            Some(&b) => assert_eq!(b, backend, "{what}: spec fence {spec} was {b} at the backend"),
            None => {
                let highest = self.0.values().next_back().copied().unwrap_or(Fence::NONE);
                assert!(backend > highest, "{what}: new fence {backend} not above {highest}");
                assert!(!self.0.values().any(|&b| b == backend), "{what}: fence {backend} reused");
                self.0.insert(spec, backend);
            }
        }
    }
}

/// Random operation sequences from three owners, each on a fresh key, sent to `b` and to the
/// core's spec of its discipline; every reply must agree (Busy's wait aside, which depends on
/// the clock). The seeds are fixed, so a failure replays.
async fn matches_the_spec<B: Backend>(b: &B, name: &str, cas: bool) {
    const TTL30: LDuration = LDuration::from_secs(30);
    // Neither a spec fence nor a backend one: a holder's confused or forged fence.
    const BOGUS: Fence = Fence(u64::MAX / 2);
    let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
    for seed in 0..4u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let key = parse_key(&format!("spec-{name}-{seed}")).unwrap();
        let mut spec = if cas {
            Spec::CompareAndSet(CasRecord::default())
        } else {
            Spec::ServerTimed(Record::default())
        };
        let mut fences = Fences::default();
        let mut versions = vec![0u64];
        // The newest grant, so that renewals and releases are mostly the holder's own.
        let mut holder: Option<(OwnerId, Fence)> = None;
        for step in 0..30u64 {
            let mut owner = OwnerId(rng.u64(1..=3));
            let known: Vec<Fence> = fences.0.keys().copied().collect();
            let mut fence =
                if known.is_empty() || rng.u8(..5) == 0 { BOGUS } else { known[rng.usize(..known.len())] };
            let roll = rng.u8(..20);
            if let (Some(mine), 9..) = (holder, roll) {
                if rng.u8(..3) > 0 {
                    (owner, fence) = mine;
                }
            }
            let op = match roll {
                0..=6 => Op::Acquire { ttl: TTL30 },
                // Mostly the version seen last, as a waiting contender would.
                7..=8 => {
                    let seen_last = versions.len() - 1;
                    let i = if rng.bool() { seen_last } else { rng.usize(..versions.len()) };
                    Op::Takeover { version: versions[i], ttl: TTL30 }
                }
                9..=13 => Op::Renew { fence, ttl: TTL30 },
                _ => Op::Release { fence },
            };
            let to_backend = |f: Fence| fences.0.get(&f).copied().unwrap_or(f);
            let backend_op = match op {
                Op::Renew { fence, ttl } => Op::Renew { fence: to_backend(fence), ttl },
                Op::Release { fence } => Op::Release { fence: to_backend(fence) },
                other => other,
            };
            let request = Request { id: RequestId(step as u32), owner, op };
            let want = spec.apply(LInstant::from_secs(1_000) + LDuration::from_micros(step), &request);
            let got = b.call(&key, Request { op: backend_op, ..request }).await;
            let what = format!("{name} seed {seed} step {step}: {owner:?} {op:?}");
            let got = got.unwrap_or_else(|e| panic!("{what}: {e}"));
            match (want, got) {
                (Reply::Granted { fence: f, ttl: t }, Reply::Granted { fence: g, ttl: u })
                | (
                    Reply::GrantedAfterExpiry { fence: f, ttl: t },
                    Reply::GrantedAfterExpiry { fence: g, ttl: u },
                ) => {
                    assert_eq!(t, u, "{what}: ttl");
                    fences.same(f, g, &what);
                }
                (Reply::Busy { .. }, Reply::Busy { .. }) => {}
                (want, got) => assert_eq!(want, got, "{what}"),
            }
            match want {
                Reply::Observed { version, .. } => versions.push(version),
                Reply::Granted { fence, .. } | Reply::GrantedAfterExpiry { fence, .. }
                    if !matches!(op, Op::Renew { .. }) =>
                {
                    holder = Some((owner, fence));
                }
                Reply::Released => holder = None,
                _ => {}
            }
            *seen.entry(kind(&want)).or_default() += 1;
        }
    }
    // The sequences must have reached every answer the discipline gives.
    let mut expected = vec!["granted", "busy-or-observed", "not_holder", "released"];
    if cas {
        expected.push("granted_after_expiry");
    }
    for k in expected {
        assert!(seen.contains_key(k), "{name}: no {k} reply in the sequences: {seen:?}");
    }
}

fn kind(r: &Reply) -> &'static str {
    match r {
        Reply::Granted { .. } => "granted",
        Reply::GrantedAfterExpiry { .. } => "granted_after_expiry",
        Reply::Busy { .. } | Reply::Observed { .. } => "busy-or-observed",
        Reply::NotHolder => "not_holder",
        Reply::Released => "released",
        _ => "other",
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
    smol::block_on(matches_the_spec(&b(), "builtin", false));
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
    smol::block_on(matches_the_spec(&b(), "etcd", false));
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
    smol::block_on(matches_the_spec(&dynamo(&url, "leases"), "dynamodb", true));
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
    // Safety: the dead holder's grant was made after the clock started, so no one can have
    // the key before its ttl ran out (less the clock-rate bound).
    assert!(waited >= ttl.mul_f64(0.99), "{name}: taken over after {waited:?}, before the ttl");
    // Liveness: one poll and a few requests after the ttl; `slack` is what an idle machine
    // needs, and a loaded one (busy loops beside the whole suite) gets up to a ttl more.
    assert!(waited <= bound + slack + ttl, "{name}: {waited:?}");
}
