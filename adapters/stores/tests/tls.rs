//! The stores over https://: a TLS terminator (futures-rustls, certificate from a CA made at
//! test time) on 127.0.0.1:0 in front of a real etcd and a real dynalite.
#![cfg(feature = "tls")]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_io::Async;
use futures_lite::{future, io, AsyncWriteExt};
use futures_rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use futures_rustls::rustls::{self, ServerConfig};
use futures_rustls::TlsAcceptor;
use leasehold_core::{parse_key, Duration as LDuration, Fence, Op, OwnerId, Reply, Request, RequestId};
use leasehold_http::{Backend, TlsConfig, TransportError};
use leasehold_stores::{Credentials, DynamoDbBackend, EtcdBackend};
use leasehold_test_servers::{dynalite, etcd};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

/// Generous: a request that times out drops its connection, and the handshake counts below
/// would then include a legitimate reconnect.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A CA's certificate (PEM) and a server configuration with a certificate it signed for
/// `localhost` and 127.0.0.1.
fn ca_and_server() -> (String, Arc<ServerConfig>) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "leasehold stores test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);

    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
    (ca_pem, Arc::new(config))
}

/// Terminates TLS and forwards to `upstream`; counts completed handshakes. Stops when dropped.
struct Terminator {
    port: u16,
    handshakes: Arc<AtomicUsize>,
    _stop: smol::channel::Sender<()>,
}

fn terminator(config: Arc<ServerConfig>, upstream: SocketAddr) -> Terminator {
    let listener = Async::<TcpListener>::bind(([127, 0, 0, 1], 0)).unwrap();
    let port = listener.get_ref().local_addr().unwrap().port();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = smol::channel::bounded::<()>(1);
    let count = handshakes.clone();
    std::thread::spawn(move || {
        let ex = smol::Executor::new();
        let acceptor = TlsAcceptor::from(config);
        let serve = async {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (acceptor, count) = (acceptor.clone(), count.clone());
                ex.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    count.fetch_add(1, Ordering::SeqCst);
                    let Ok(up) = Async::<TcpStream>::connect(upstream).await else { return };
                    let (tls_r, mut tls_w) = io::split(tls);
                    let (up_r, mut up_w) = io::split(up);
                    future::or(
                        async {
                            let _ = io::copy(tls_r, &mut up_w).await;
                            let _ = up_w.close().await;
                        },
                        async {
                            let _ = io::copy(up_r, &mut tls_w).await;
                            let _ = tls_w.close().await;
                        },
                    )
                    .await;
                })
                .detach();
            }
        };
        smol::block_on(ex.run(future::or(serve, async {
            let _ = stopped.recv().await;
        })));
    });
    Terminator { port, handshakes, _stop: stop }
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

#[test]
fn etcd_over_https_with_a_private_ca() {
    let server = etcd();
    let (ca, config) = ca_and_server();
    let t = terminator(config, addr_of(server.url()));
    let url = format!("https://localhost:{}", t.port);
    let tls = TlsConfig::new().add_ca_pem(ca.as_bytes()).unwrap();
    let https = EtcdBackend::new(&url, "leasehold/", TIMEOUT).unwrap().with_tls(tls);
    let plain = EtcdBackend::new(server.url(), "leasehold/", TIMEOUT).unwrap();
    smol::block_on(async {
        let fence = grant(&https, 1).await;
        // Held as far as etcd is concerned: a plain-http client of the same etcd is refused.
        let r = call(&plain, 2, Op::Acquire { ttl: TTL }).await;
        assert!(matches!(r, Ok(Reply::Busy { .. })), "{r:?}");
        assert_eq!(call(&https, 1, Op::Release { fence }).await, Ok(Reply::Released));
        assert!(grant(&plain, 2).await > fence);
    });
    // Acquire (grant, txn) and release (txn, revoke) shared one pooled TLS connection.
    assert_eq!(t.handshakes.load(Ordering::SeqCst), 1);

    // Without the CA, the same endpoint is a typed TLS error.
    let untrusted = EtcdBackend::new(&url, "leasehold/", TIMEOUT).unwrap();
    let r = smol::block_on(call(&untrusted, 3, Op::Acquire { ttl: TTL }));
    assert!(
        matches!(&r, Err(TransportError::Certificate { message, .. }) if message.contains("trusted CA")),
        "{r:?}"
    );
}

#[test]
fn dynamodb_over_https_signs_and_reaches_the_table() {
    let server = dynalite();
    let (ca, config) = ca_and_server();
    let t = terminator(config, addr_of(server.url()));
    let url = format!("https://127.0.0.1:{}", t.port);
    let tls = TlsConfig::new().add_ca_pem(ca.as_bytes()).unwrap();
    let creds = Credentials::new("AKIDLEASEHOLDTEST", "not-a-real-secret", None, None, "test");
    let dynamo = || {
        DynamoDbBackend::new(&url, "us-east-1", "leases", creds.clone(), TIMEOUT)
            .unwrap()
            .with_tls(tls.clone())
    };
    let (a, b) = (dynamo(), dynamo());
    smol::block_on(async {
        a.create_table().await.unwrap();
        let fence = grant(&a, 1).await;
        let r = call(&b, 2, Op::Acquire { ttl: TTL }).await;
        assert!(matches!(r, Ok(Reply::Observed { .. })), "held, seen through another TLS client: {r:?}");
        assert_eq!(call(&a, 1, Op::Release { fence }).await, Ok(Reply::Released));
        assert!(grant(&b, 2).await > fence);
    });
    // Two clients, each on one pooled TLS connection (a: CreateTable, DescribeTable, three
    // UpdateItems; b: UpdateItem, GetItem, UpdateItem).
    assert_eq!(t.handshakes.load(Ordering::SeqCst), 2);
}
