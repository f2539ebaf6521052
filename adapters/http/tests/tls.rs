//! https:// against a real built-in server behind a TLS terminator on loopback, with CAs and
//! certificates made at test time.
#![cfg(feature = "tls")]

use std::time::Duration;

use leasehold_core::{Key, Op, OwnerId, Reply, Request, RequestId};
use leasehold_http::{
    AcquireError, Backend, BuiltinBackend, Client, Health, HttpClient, Options, TlsConfig, TransportError,
};
use leasehold_server::{RunningServer, Server, ServerConfig as LeaseServerConfig};
use leasehold_test_servers::tls::{Accepted, Ca, Terminator};

/// A client configuration that trusts `ca`.
fn trust(ca: &Ca) -> TlsConfig {
    TlsConfig::new().add_ca_pem(ca.pem().as_bytes()).unwrap()
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
    let url = format!("https://localhost:{}", t.addr().port());
    smol::block_on(async {
        let backend = BuiltinBackend::new(&url, None, Duration::from_secs(2)).unwrap().with_tls(trust(&ca));
        // A ttl that leaves a loaded machine's fsync well inside the request timeout (ttl/6):
        // a timed-out request would cost its connection and so a second handshake.
        let a = Client::new(backend, Options::new(Duration::from_secs(2))).unwrap();
        let la = a.acquire("tls-job").await.unwrap();
        let fence = la.fence().unwrap();
        // Past two ttls: only renewals over https keep it.
        for _ in 0..45 {
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
        la.release().await.expect("release acknowledged");
        let lb = rival.try_acquire("tls-job").await.unwrap();
        assert!(lb.fence().unwrap() > fence);
    });
    // Acquire, at least four renewals and the release, all on one TLS connection.
    assert_eq!(
        t.accepted(),
        vec![Accepted { sni: Some("localhost".into()), alpn: Some(b"http/1.1".to_vec()) }],
        "one handshake, SNI from the URL, ALPN http/1.1"
    );
    assert_eq!(t.failed(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn https_works_under_tokio() {
    let dir = tempfile::tempdir().unwrap();
    let s = lease_server(dir.path());
    let ca = Ca::new("leasehold test CA");
    // An IP address URL: checked against the certificate's IP SAN, no SNI sent.
    let t = Terminator::start(ca.server_config(&["127.0.0.1"]), s.addr());
    let url = format!("https://127.0.0.1:{}", t.addr().port());
    let backend = BuiltinBackend::new(&url, None, Duration::from_secs(2)).unwrap().with_tls(trust(&ca));
    let c = Client::new(backend, Options::new(Duration::from_secs(2))).unwrap();
    let l = c.acquire("tokio-tls").await.unwrap();
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    assert!(l.is_healthy(), "renewed over https past its ttl under tokio");
    l.release().await.expect("release acknowledged");
    assert_eq!(t.accepted(), vec![Accepted { sni: None, alpn: Some(b"http/1.1".to_vec()) }]);
}

#[test]
fn a_tls_connection_the_server_closed_is_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let s = lease_server(dir.path());
    let addr = s.addr();
    let ca = Ca::new("leasehold test CA");
    let t = Terminator::start(ca.server_config(&["localhost"]), addr);
    let url = format!("https://localhost:{}", t.addr().port());
    let backend = BuiltinBackend::new(&url, None, Duration::from_secs(2)).unwrap().with_tls(trust(&ca));
    smol::block_on(async {
        let first = backend.call(&key("pooled"), acquire_request(1)).await;
        assert!(matches!(first, Ok(Reply::Granted { .. })), "{first:?}");
        let again = backend.call(&key("pooled"), acquire_request(2)).await;
        assert!(matches!(again, Ok(Reply::Busy { .. })), "{again:?}");
        assert_eq!(t.accepted().len(), 1, "the pooled TLS connection was reused");
        // The restart closes the upstream connection; the terminator then closes the TLS one
        // (close_notify and FIN) behind the client's back.
        drop(s);
        eventually("the terminator closing the TLS connection", || t.closed() == 1).await;
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
    let url = format!("https://localhost:{}", t.addr().port());

    let message = certificate_error(&url, trust(&trusted));
    assert!(message.contains("not issued by a trusted CA"), "{message}");
    // Mozilla's roots alone do not know a private CA either.
    let message = certificate_error(&url, TlsConfig::new());
    assert!(message.contains("not issued by a trusted CA"), "{message}");
    // The server learns of it from the client's alert.
    smol::block_on(eventually("two failed handshakes", || t.failed() == 2));
    assert_eq!(t.accepted().len(), 0, "no handshake completed");

    // Through the handle it is a configuration to fix, reported by the first attempt: an
    // acquisition that would wait forever for a reachable authority gives up.
    let backend = BuiltinBackend::new(&url, None, Duration::from_secs(1)).unwrap().with_tls(trust(&trusted));
    let c = Client::new(backend, Options::new(Duration::from_secs(2))).unwrap();
    match smol::block_on(c.acquire("k")) {
        Err(AcquireError::Misconfigured(e @ TransportError::Certificate { .. })) => {
            assert!(e.to_string().contains("not issued by a trusted CA"), "{e}")
        }
        other => panic!("expected a refused certificate, got {other:?}"),
    }
    smol::block_on(async {
        eventually("the third failed handshake", || t.failed() >= 3).await;
        sleep(200).await;
    });
    assert_eq!(t.failed(), 3, "one attempt, no retries");
}

#[test]
fn a_certificate_for_another_host_is_a_tls_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = lease_server(dir.path());
    let ca = Ca::new("leasehold test CA");
    let t = Terminator::start(ca.server_config(&["elsewhere.invalid"]), s.addr());

    let message = certificate_error(&format!("https://localhost:{}", t.addr().port()), trust(&ca));
    assert!(message.contains("not valid for name \"localhost\""), "{message}");
    let message = certificate_error(&format!("https://127.0.0.1:{}", t.addr().port()), trust(&ca));
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
    let backend = BuiltinBackend::new(&s.url(), None, Duration::from_secs(1)).unwrap().with_tls(trust(&ca));
    let c = Client::new(backend, Options::new(Duration::from_secs(2))).unwrap();
    smol::block_on(async {
        let l = c.try_acquire("plain").await.unwrap();
        assert!(l.fence().is_some());
        l.release().await.expect("release acknowledged");
    });
}

#[test]
fn ca_files_are_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("file CA");
    let good = dir.path().join("ca.pem");
    ca.write_pem(&good);
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
    let http = HttpClient::new(&format!("https://localhost:{}/", t.addr().port()), Duration::from_secs(2))
        .unwrap()
        .with_tls(TlsConfig::new().add_ca_file(&good).unwrap());
    let resp = smol::block_on(
        http.send(http.request(hyper::Method::GET, "/v1/nothing-here").body(Default::default()).unwrap()),
    )
    .unwrap();
    assert_eq!(resp.status, 404);
    assert_eq!(t.accepted().len(), 1);
}
