//! The server's own https listener, reached by a rustls client with a CA made at test time.
#![cfg(feature = "tls")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use futures_rustls::pki_types::pem::PemObject;
use futures_rustls::pki_types::{CertificateDer, ServerName};
use futures_rustls::rustls::{self, ClientConfig, RootCertStore};
use futures_rustls::TlsConnector;
use leasehold_server::{RunningServer, Server, ServerConfig, ServerTls};
use leasehold_test_servers::tls::Ca;

fn tls_server(dir: &std::path::Path, ca: &Ca) -> RunningServer {
    let (cert, key) = ca.server_cert(&["127.0.0.1"]);
    let mut config = ServerConfig::new(dir, "127.0.0.1:0".parse().unwrap());
    config.tls = Some(ServerTls::from_pem(cert.as_bytes(), key.as_bytes(), None).unwrap());
    config.request_timeout = Duration::from_millis(500);
    Server::spawn(config).unwrap()
}

/// `GET path` over TLS, trusting `ca`; the whole answer.
fn https_get(addr: SocketAddr, ca: &Ca, path: &str) -> String {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap()).unwrap();
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    smol::block_on(async {
        let tcp = async_net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
        let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        let mut answer = String::new();
        tls.read_to_string(&mut answer).await.unwrap();
        answer
    })
}

#[test]
fn https_is_served_and_anything_else_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("leasehold server test CA");
    let s = tls_server(dir.path(), &ca);
    assert!(s.url().starts_with("https://127.0.0.1:"), "{}", s.url());

    let answer = https_get(s.addr(), &ca, "/healthz");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(r#"{"status":"ok"}"#), "{answer}");

    // Plain http on the https port: closed without an HTTP answer.
    let mut plain = TcpStream::connect(s.addr()).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut bytes = Vec::new();
    let _ = plain.read_to_end(&mut bytes);
    assert!(!String::from_utf8_lossy(&bytes).contains("HTTP/1.1"), "{bytes:?}");

    // A client that connects and never starts its handshake is cut off after the timeout.
    let mut silent = TcpStream::connect(s.addr()).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(silent.read(&mut buf).unwrap(), 0, "closed by the server");

    let metrics = https_get(s.addr(), &ca, "/metrics");
    assert!(metrics.contains("\nleasehold_tls_handshake_failures_total 2\n"), "{metrics}");
}

#[test]
fn unusable_tls_files_are_typed_errors() {
    let ca = Ca::new("leasehold server test CA");
    let (cert, key) = ca.server_cert(&["127.0.0.1"]);
    let (_, other_key) = ca.server_cert(&["127.0.0.1"]);
    let message = |r: Result<ServerTls, leasehold_server::ServerError>| r.unwrap_err().to_string();
    assert!(message(ServerTls::from_pem(cert.as_bytes(), other_key.as_bytes(), None)).contains("do not fit"));
    assert!(message(ServerTls::from_pem(b"junk", key.as_bytes(), None)).contains("no CERTIFICATE"));
    assert!(message(ServerTls::from_pem(cert.as_bytes(), b"junk", None)).contains("private key"));
    let m = message(ServerTls::from_pem(cert.as_bytes(), key.as_bytes(), Some(b"junk")));
    assert!(m.contains("client CA"), "{m}");
    let m = message(ServerTls::from_pem_files("/nonexistent/cert.pem".as_ref(), "/x".as_ref(), None));
    assert!(m.contains("/nonexistent/cert.pem"), "{m}");
}
