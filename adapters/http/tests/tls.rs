//! https:// against a real built-in server behind a TLS terminator on loopback, with CAs and
//! certificates made at test time.
#![cfg(feature = "tls")]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_io::Async;
use futures_lite::{future, io, AsyncWriteExt};
use futures_rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use futures_rustls::rustls::{self, ServerConfig};
use futures_rustls::TlsAcceptor;
use leasehold_core::{Key, Op, OwnerId, Reply, Request, RequestId};
use leasehold_http::{
    AcquireError, Backend, BuiltinBackend, Client, Health, HttpClient, Options, TlsConfig, TransportError,
};
use leasehold_server::{RunningServer, Server, ServerConfig as LeaseServerConfig};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// A test CA: its certificate (PEM) and what it needs to sign server certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A server certificate for `names` (DNS names or IP addresses) and its key.
    fn server_config(&self, names: &[&str]) -> Arc<ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.der().clone()], key)
                .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    fn tls(&self) -> TlsConfig {
        TlsConfig::new().add_ca_pem(self.pem.as_bytes()).unwrap()
    }
}

/// What the terminator saw of one completed handshake.
#[derive(Debug, Clone, PartialEq)]
struct Accepted {
    sni: Option<String>,
    alpn: Option<Vec<u8>>,
}

/// Terminates TLS on 127.0.0.1:0 and forwards the plaintext to `upstream`, a real leasehold
/// server. Stops (closing every connection) when dropped.
struct Terminator {
    addr: SocketAddr,
    accepted: Arc<Mutex<Vec<Accepted>>>,
    failed: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    _stop: smol::channel::Sender<()>,
}

impl Terminator {
    fn start(config: Arc<ServerConfig>, upstream: SocketAddr) -> Terminator {
        let listener = Async::<TcpListener>::bind(([127, 0, 0, 1], 0)).unwrap();
        let addr = listener.get_ref().local_addr().unwrap();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = smol::channel::bounded::<()>(1);
        let (acc, fail, clo) = (accepted.clone(), failed.clone(), closed.clone());
        std::thread::spawn(move || {
            let ex = smol::Executor::new();
            let acceptor = TlsAcceptor::from(config);
            let serve = async {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else { continue };
                    let (acceptor, acc, fail, clo) =
                        (acceptor.clone(), acc.clone(), fail.clone(), clo.clone());
                    ex.spawn(async move {
                        let tls = match acceptor.accept(tcp).await {
                            Ok(tls) => tls,
                            Err(_) => {
                                fail.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        };
                        let conn = tls.get_ref().1;
                        acc.lock().unwrap().push(Accepted {
                            sni: conn.server_name().map(str::to_string),
                            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                        });
                        let up = Async::<TcpStream>::connect(upstream).await.unwrap();
                        let (tls_r, mut tls_w) = io::split(tls);
                        let (up_r, mut up_w) = io::split(up);
                        // Either side closing closes the other.
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
                        clo.fetch_add(1, Ordering::SeqCst);
                    })
                    .detach();
                }
            };
            smol::block_on(ex.run(future::or(serve, async {
                let _ = stopped.recv().await;
            })));
        });
        Terminator { addr, accepted, failed, closed, _stop: stop }
    }

    fn accepted(&self) -> Vec<Accepted> {
        self.accepted.lock().unwrap().clone()
    }
}

fn lease_server(dir: &std::path::Path) -> RunningServer {
    Server::spawn(LeaseServerConfig::new(dir, "127.0.0.1:0".parse().unwrap())).expect("server starts")
}

fn acquire_request(owner: u64) -> Request {
    Request {
        id: RequestId(1),
        owner: OwnerId(owner),
        op: Op::Acquire { ttl: leasehold_core::Duration::from_secs(5) },
    }
}

fn key(k: &str) -> Key {
    leasehold_core::parse_key(k).unwrap()
}

async fn sleep(ms: u64) {
    async_io::Timer::after(Duration::from_millis(ms)).await;
}

/// Waits (bounded) until `f` holds.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        sleep(10).await;
    }
    panic!("{what} did not happen within 2 s");
}

/// The error of one raw call to `url` with `tls`, which must be a TLS failure.
fn tls_error(url: &str, tls: TlsConfig) -> TransportError {
    let backend = BuiltinBackend::new(url, None, Duration::from_secs(2)).unwrap().with_tls(tls);
    let e = smol::block_on(backend.call(&key("k"), acquire_request(1))).expect_err("a TLS failure");
    match &e {
        TransportError::Tls { addr, .. } | TransportError::Certificate { addr, .. } => {
            assert!(url.ends_with(addr.as_str()), "{addr} in {url}")
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    e
}

/// The message of a refused certificate, which retrying cannot fix.
fn certificate_error(url: &str, tls: TlsConfig) -> String {
    match tls_error(url, tls) {
        e @ TransportError::Certificate { .. } => {
            assert!(e.is_permanent());
            e.to_string()
        }
        other => panic!("expected a refused certificate, got {other:?}"),
    }
}

#[test]
fn leases_over_https_reuse_one_tls_connection() {
    let dir = tempfile::tempdir().unwrap();
    let s = lease_server(dir.path());
    let ca = Ca::new("leasehold test CA");
    let t = Terminator::start(ca.server_config(&["localhost", "127.0.0.1"]), s.addr());
    let url = format!("https://localhost:{}", t.addr.port());
    smol::block_on(async {
        let backend = BuiltinBackend::new(&url, None, Duration::from_secs(2)).unwrap().with_tls(ca.tls());
        let a = Client::new(backend, Options::new(Duration::from_millis(400))).unwrap();
        let la = a.acquire("tls-job").await.unwrap();
        let fence = la.fence().unwrap();
        // Past two ttls: only renewals over https keep it.
        for _ in 0..10 {
            sleep(100).await;
            assert!(la.remaining().is_some(), "lapsed while renewing over https");
        }
        assert_eq!(la.health(), Health::Held);
        assert_eq!(la.fence(), Some(fence));
        // The lease is real: a plain-http client of the same server sees it held.
        let rival = Client::new(
            BuiltinBackend::new(&s.url(), None, Duration::from_secs(1)).unwrap(),
            Options::new(Duration::from_secs(5)),
        )
        .unwrap();
        assert_eq!(rival.try_acquire("tls-job").await.unwrap_err(), AcquireError::Busy);
        la.release().await;
        let lb = rival.try_acquire("tls-job").await.unwrap();
        assert!(lb.fence().unwrap() > fence);
    });
    // Acquire, at least four renewals and the release, all on one TLS connection.
    assert_eq!(
        t.accepted(),
        vec![Accepted { sni: Some("localhost".into()), alpn: Some(b"http/1.1".to_vec()) }],
        "one handshake, SNI from the URL, ALPN http/1.1"
    );
    assert_eq!(t.failed.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn https_works_under_tokio() {
    let dir = tempfile::tempdir().unwrap();
    let s = lease_server(dir.path());
    let ca = Ca::new("leasehold test CA");
    // An IP address URL: checked against the certificate's IP SAN, no SNI sent.
    let t = Terminator::start(ca.server_config(&["127.0.0.1"]), s.addr());
    let url = format!("https://127.0.0.1:{}", t.addr.port());
    let backend = BuiltinBackend::new(&url, None, Duration::from_secs(2)).unwrap().with_tls(ca.tls());
    let c = Client::new(backend, Options::new(Duration::from_millis(500))).unwrap();
    let l = c.acquire("tokio-tls").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(l.is_healthy(), "renewed over https past its ttl under tokio");
    l.release().await;
    assert_eq!(t.accepted(), vec![Accepted { sni: None, alpn: Some(b"http/1.1".to_vec()) }]);
}

#[test]
fn a_tls_connection_the_server_closed_is_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let s = lease_server(dir.path());
    let addr = s.addr();
    let ca = Ca::new("leasehold test CA");
    let t = Terminator::start(ca.server_config(&["localhost"]), addr);
    let url = format!("https://localhost:{}", t.addr.port());
    let backend = BuiltinBackend::new(&url, None, Duration::from_secs(2)).unwrap().with_tls(ca.tls());
    smol::block_on(async {
        let first = backend.call(&key("pooled"), acquire_request(1)).await;
        assert!(matches!(first, Ok(Reply::Granted { .. })), "{first:?}");
        let again = backend.call(&key("pooled"), acquire_request(2)).await;
        assert!(matches!(again, Ok(Reply::Busy { .. })), "{again:?}");
        assert_eq!(t.accepted().len(), 1, "the pooled TLS connection was reused");
        // The restart closes the upstream connection; the terminator then closes the TLS one
        // (close_notify and FIN) behind the client's back.
        drop(s);
        eventually("the terminator closing the TLS connection", || t.closed.load(Ordering::SeqCst) == 1)
            .await;
        let s = Server::spawn(LeaseServerConfig::new(dir.path(), addr))
            .expect("server restarts on the same port");
        let third = backend.call(&key("pooled"), acquire_request(3)).await;
        assert!(matches!(third, Ok(Reply::Busy { .. })), "fresh TLS connection, durable grant: {third:?}");
        assert_eq!(t.accepted().len(), 2, "a new handshake instead of the dead connection");
        drop(s);
    });
}

#[test]
fn a_certificate_from_an_unknown_ca_is_a_tls_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = lease_server(dir.path());
    let trusted = Ca::new("trusted CA");
    let stranger = Ca::new("unknown CA");
    let t = Terminator::start(stranger.server_config(&["localhost"]), s.addr());
    let url = format!("https://localhost:{}", t.addr.port());

    let message = certificate_error(&url, trusted.tls());
    assert!(message.contains("not issued by a trusted CA"), "{message}");
    // Mozilla's roots alone do not know a private CA either.
    let message = certificate_error(&url, TlsConfig::new());
    assert!(message.contains("not issued by a trusted CA"), "{message}");
    // The server learns of it from the client's alert.
    smol::block_on(eventually("two failed handshakes", || t.failed.load(Ordering::SeqCst) == 2));
    assert_eq!(t.accepted().len(), 0, "no handshake completed");

    // Through the handle it is a configuration to fix, reported by the first attempt: an
    // acquisition that would wait forever for a reachable authority gives up.
    let backend = BuiltinBackend::new(&url, None, Duration::from_secs(1)).unwrap().with_tls(trusted.tls());
    let c = Client::new(backend, Options::new(Duration::from_secs(2))).unwrap();
    match smol::block_on(c.acquire("k")) {
        Err(AcquireError::Misconfigured(e @ TransportError::Certificate { .. })) => {
            assert!(e.to_string().contains("not issued by a trusted CA"), "{e}")
        }
        other => panic!("expected a refused certificate, got {other:?}"),
    }
    smol::block_on(async {
        eventually("the third failed handshake", || t.failed.load(Ordering::SeqCst) >= 3).await;
        sleep(200).await;
    });
    assert_eq!(t.failed.load(Ordering::SeqCst), 3, "one attempt, no retries");
}

#[test]
fn a_certificate_for_another_host_is_a_tls_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = lease_server(dir.path());
    let ca = Ca::new("leasehold test CA");
    let t = Terminator::start(ca.server_config(&["elsewhere.invalid"]), s.addr());

    let message = certificate_error(&format!("https://localhost:{}", t.addr.port()), ca.tls());
    assert!(message.contains("not valid for name \"localhost\""), "{message}");
    let message = certificate_error(&format!("https://127.0.0.1:{}", t.addr.port()), ca.tls());
    assert!(message.contains("not valid for name \"127.0.0.1\""), "{message}");
    assert_eq!(t.accepted().len(), 0);
}

#[test]
fn https_to_a_plain_http_server_is_a_tls_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = lease_server(dir.path());
    let e = tls_error(&format!("https://127.0.0.1:{}", s.addr().port()), TlsConfig::new());
    assert!(
        matches!(&e, TransportError::Tls { message, .. } if message.contains("the server's answer is not TLS")),
        "{e}"
    );
}

#[test]
fn http_urls_ignore_the_tls_config() {
    let dir = tempfile::tempdir().unwrap();
    let s = lease_server(dir.path());
    let ca = Ca::new("leasehold test CA");
    let backend = BuiltinBackend::new(&s.url(), None, Duration::from_secs(1)).unwrap().with_tls(ca.tls());
    let c = Client::new(backend, Options::new(Duration::from_secs(2))).unwrap();
    smol::block_on(async {
        let l = c.try_acquire("plain").await.unwrap();
        assert!(l.fence().is_some());
        l.release().await;
    });
}

#[test]
fn ca_files_are_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("file CA");
    let good = dir.path().join("ca.pem");
    std::fs::write(&good, &ca.pem).unwrap();
    assert!(TlsConfig::new().add_ca_file(&good).is_ok());

    let config_error = |r: Result<TlsConfig, TransportError>| match r {
        Err(TransportError::Config(m)) => m,
        other => panic!("expected a configuration error, got {other:?}"),
    };
    let missing = config_error(TlsConfig::new().add_ca_file(dir.path().join("nope.pem")));
    assert!(missing.contains("nope.pem"), "{missing}");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no certificates here\n").unwrap();
    let m = config_error(TlsConfig::new().add_ca_file(&empty));
    assert!(m.contains("empty.pem") && m.contains("no CERTIFICATE"), "{m}");
    let garbled = "-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n";
    config_error(TlsConfig::new().add_ca_pem(garbled.as_bytes()));

    // The CA from the file is what makes the handshake succeed.
    let data = tempfile::tempdir().unwrap();
    let s = lease_server(data.path());
    let t = Terminator::start(ca.server_config(&["localhost"]), s.addr());
    let http = HttpClient::new(&format!("https://localhost:{}/", t.addr.port()), Duration::from_secs(2))
        .unwrap()
        .with_tls(TlsConfig::new().add_ca_file(&good).unwrap());
    let resp = smol::block_on(
        http.send(http.request(hyper::Method::GET, "/v1/nothing-here").body(Default::default()).unwrap()),
    )
    .unwrap();
    assert_eq!(resp.status, 404);
    assert_eq!(t.accepted().len(), 1);
}
