//! The stores over https://: a TLS terminator (futures-rustls, certificate from a CA made at
//! test time) on 127.0.0.1:0 in front of a real etcd and a real dynalite.
#![cfg(feature = "tls")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_rustls::rustls::ServerConfig;
use leasehold_core::{parse_key, Duration as LDuration, Fence, Op, OwnerId, Reply, Request, RequestId};
use leasehold_http::{Backend, TlsConfig, TransportError};
use leasehold_stores::{Credentials, DynamoDbBackend, EtcdBackend};
use leasehold_test_servers::tls::{etcd_tls, Ca, Terminator};
use leasehold_test_servers::{dynalite, etcd};

/// Generous: a request that times out drops its connection, and the handshake counts below
/// would then include a legitimate reconnect.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A CA and a server configuration with a certificate it signed for `localhost` and
/// 127.0.0.1.
fn ca_and_server() -> (Ca, Arc<ServerConfig>) {
    let ca = Ca::new("leasehold stores test CA");
    let config = ca.server_config(&["localhost", "127.0.0.1"]);
    (ca, config)
}

fn addr_of(url: &str) -> SocketAddr {
    url.strip_prefix("http://").unwrap().parse().unwrap()
}

const TTL: LDuration = LDuration::from_secs(5);

async fn call(b: &impl Backend, owner: u64, op: Op) -> Result<Reply, TransportError> {
    b.call(&parse_key("tls").unwrap(), Request { id: RequestId(1), owner: OwnerId(owner), op }).await
}

async fn grant(b: &impl Backend, owner: u64) -> Fence {
    match call(b, owner, Op::Acquire { ttl: TTL }).await {
        Ok(Reply::Granted { fence, .. }) => fence,
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// `a` takes the key; `b` finds it held (`held` says how the store puts that); `a` releases;
/// `b` then gets a higher fence.
async fn hand_over(a: &impl Backend, b: &impl Backend, held: fn(&Reply) -> bool) {
    let fence = grant(a, 1).await;
    let r = call(b, 2, Op::Acquire { ttl: TTL }).await;
    assert!(r.as_ref().is_ok_and(held), "held, yet the other client got {r:?}");
    assert_eq!(call(a, 1, Op::Release { fence }).await, Ok(Reply::Released));
    assert!(grant(b, 2).await > fence);
}

fn busy(r: &Reply) -> bool {
    matches!(r, Reply::Busy { .. })
}

/// A client configuration that trusts `ca`.
fn trust(ca: &Ca) -> TlsConfig {
    TlsConfig::new().add_ca_pem(ca.pem().as_bytes()).unwrap()
}

#[test]
fn etcd_over_https_with_a_private_ca() {
    let server = etcd();
    let (ca, config) = ca_and_server();
    let t = Terminator::start(config, addr_of(server.url()));
    let url = format!("https://localhost:{}", t.addr().port());
    let https = EtcdBackend::new(&url, "leasehold/", TIMEOUT).unwrap().with_tls(trust(&ca));
    let plain = EtcdBackend::new(server.url(), "leasehold/", TIMEOUT).unwrap();
    // Held as far as etcd is concerned: a plain-http client of the same etcd is refused.
    smol::block_on(hand_over(&https, &plain, busy));
    // Acquire (grant, txn) and release (txn, revoke) shared one pooled TLS connection.
    assert_eq!(t.accepted().len(), 1);

    // Without the CA, the same endpoint is a typed TLS error.
    let untrusted = EtcdBackend::new(&url, "leasehold/", TIMEOUT).unwrap();
    let r = smol::block_on(call(&untrusted, 3, Op::Acquire { ttl: TTL }));
    assert!(
        matches!(&r, Err(TransportError::Certificate { message, .. }) if message.contains("trusted CA")),
        "{r:?}"
    );
}

#[test]
fn etcd_serving_tls_itself_with_client_certificates() {
    let ca = Ca::new("leasehold etcd CA");
    let server = etcd_tls(&ca);
    assert!(server.url().starts_with("https://127.0.0.1:"), "{}", server.url());
    let (cert, key) = ca.client_cert("leasehold-client");
    let with_cert = trust(&ca).with_client_cert_pem(cert.as_bytes(), key.as_bytes()).unwrap();
    let etcd = EtcdBackend::new(server.url(), "leasehold/", TIMEOUT).unwrap().with_tls(with_cert);
    smol::block_on(hand_over(&etcd, &etcd, busy));

    // No client certificate, or one from a CA etcd does not trust: refused, permanently.
    let stranger = Ca::new("some other CA");
    let (cert, key) = stranger.client_cert("leasehold-client");
    let foreign = trust(&ca).with_client_cert_pem(cert.as_bytes(), key.as_bytes()).unwrap();
    for (what, tls) in [("no client certificate", trust(&ca)), ("a foreign client certificate", foreign)] {
        let b = EtcdBackend::new(server.url(), "leasehold/", TIMEOUT).unwrap().with_tls(tls);
        match smol::block_on(call(&b, 3, Op::Acquire { ttl: TTL })) {
            Err(e @ TransportError::Certificate { .. }) => {
                assert!(e.is_permanent());
                assert!(e.to_string().contains("refused our client certificate"), "{what}: {e}");
            }
            other => panic!("{what}: expected a refused client certificate, got {other:?}"),
        }
    }

    // A key that does not belong to the certificate is caught before any connection.
    let (_, other_key) = ca.client_cert("someone-else");
    let (cert, _) = ca.client_cert("leasehold-client");
    let r = trust(&ca).with_client_cert_pem(cert.as_bytes(), other_key.as_bytes());
    assert!(matches!(&r, Err(TransportError::Config(m)) if m.contains("do not fit")), "{r:?}");
}

#[test]
fn dynamodb_over_https_signs_and_reaches_the_table() {
    let server = dynalite();
    let (ca, config) = ca_and_server();
    let t = Terminator::start(config, addr_of(server.url()));
    let url = format!("https://127.0.0.1:{}", t.addr().port());
    let tls = trust(&ca);
    let creds = Credentials::new("AKIDLEASEHOLDTEST", "not-a-real-secret", None, None, "test");
    let dynamo = || {
        DynamoDbBackend::new(&url, "us-east-1", "leases", creds.clone(), TIMEOUT)
            .unwrap()
            .with_tls(tls.clone())
    };
    let (a, b) = (dynamo(), dynamo());
    smol::block_on(async {
        a.create_table().await.unwrap();
        // Held, seen through another TLS client: DynamoDB reports the record it saw.
        hand_over(&a, &b, |r| matches!(r, Reply::Observed { .. })).await;
    });
    // Two clients, each on one pooled TLS connection (a: CreateTable, DescribeTable, three
    // UpdateItems; b: UpdateItem, GetItem, UpdateItem).
    assert_eq!(t.accepted().len(), 2);
}

#[test]
fn etcd_sessions_over_tls_with_a_client_certificate_push_the_hand_off() {
    use leasehold_http::{Options, SessionClient};
    use leasehold_stores::EtcdSessions;
    let ca = Ca::new("leasehold etcd sessions CA");
    let server = etcd_tls(&ca);
    let (cert, key) = ca.client_cert("leasehold-client");
    let with_cert = trust(&ca).with_client_cert_pem(cert.as_bytes(), key.as_bytes()).unwrap();
    // Keepalives 5 s apart: a hand-off well inside that came through the watch stream, which
    // is read over TLS as it arrives.
    let options = Options::session(Duration::from_secs(20));
    let client = |label: &str| {
        let b = EtcdSessions::new(server.url(), "leasehold/", options.config.request_timeout.into())
            .unwrap()
            .with_tls(with_cert.clone());
        SessionClient::new(b, label, options).unwrap()
    };
    let (a, b) = (client("a"), client("b"));
    smol::block_on(async {
        let held = a.acquire("tls-key").await.unwrap();
        let fence = held.fence().unwrap();
        let (tx, rx) = async_channel::bounded::<()>(1);
        let waiting = b.acquire_reporting("tls-key", None, move |_| {
            let _ = tx.try_send(());
        });
        let release = async {
            rx.recv().await.unwrap();
            async_io::Timer::after(Duration::from_millis(300)).await;
            held.release().await.unwrap();
            std::time::Instant::now()
        };
        let (granted, released) =
            futures_lite::future::or(futures_lite::future::zip(waiting, release), async {
                async_io::Timer::after(Duration::from_secs(20)).await;
                panic!("no hand-off over TLS within 20 s")
            })
            .await;
        let took = released.elapsed();
        assert!(took < Duration::from_secs(1), "hand-off over TLS took {took:?}");
        let lb = granted.unwrap();
        assert!(lb.fence().unwrap() > fence);
        lb.release().await.unwrap();
        a.close().await;
        b.close().await;
    });
}
