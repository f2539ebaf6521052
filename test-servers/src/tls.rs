//! TLS in front of a real server: a CA made at test time and a terminator on loopback that
//! forwards the plaintext to it, counting what it saw.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_io::Async;
use futures_lite::{future, io, AsyncWriteExt};
use futures_rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use futures_rustls::rustls::{self, ServerConfig};
use futures_rustls::TlsAcceptor;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::Running;

/// A test CA: its certificate and what it needs to sign server certificates.
pub struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A fresh self-signed CA named `name`.
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-signed CA");
        Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// The CA certificate, PEM: what a client must trust.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Writes [`pem`](Ca::pem) to `path`, as `--ca-file` wants it.
    pub fn write_pem(&self, path: &Path) {
        std::fs::write(path, &self.pem).expect("write the CA file");
    }

    /// A server certificate (PEM) this CA signed for `names` (DNS names or IP addresses), and
    /// its private key (PEM): what `leasehold serve --tls-cert --tls-key` takes.
    pub fn server_cert(&self, names: &[&str]) -> (String, String) {
        self.issue(names, &[ExtendedKeyUsagePurpose::ServerAuth])
    }

    /// A client certificate (PEM) this CA signed for `name`, and its private key (PEM).
    pub fn client_cert(&self, name: &str) -> (String, String) {
        self.issue(&[name], &[ExtendedKeyUsagePurpose::ClientAuth])
    }

    /// A certificate (PEM) this CA signed for `names` (DNS names or IP addresses; the first
    /// is also the common name) and its private key (PEM).
    fn issue(&self, names: &[&str], usage: &[ExtendedKeyUsagePurpose]) -> (String, String) {
        let (cert, key) = self.sign(names, usage);
        (cert.pem(), key.serialize_pem())
    }

    fn sign(&self, names: &[&str], usage: &[ExtendedKeyUsagePurpose]) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().expect("key");
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let mut params = CertificateParams::new(names.clone()).expect("certificate parameters");
        params.distinguished_name.push(DnType::CommonName, &names[0]);
        params.extended_key_usages = usage.to_vec();
        let cert = params.signed_by(&key, &self.issuer).expect("signed certificate");
        (cert, key)
    }

    /// A server configuration with a certificate this CA signed for `names` (DNS names or IP
    /// addresses), offering h2 and http/1.1.
    pub fn server_config(&self, names: &[&str]) -> Arc<ServerConfig> {
        let (cert, key) = self.sign(names, &[ExtendedKeyUsagePurpose::ServerAuth]);
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_no_client_auth()
                .with_single_cert(vec![cert.der().clone()], key)
                .expect("server certificate");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// What the terminator saw of one completed handshake.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// The server name the client asked for.
    pub sni: Option<String>,
    /// The application protocol agreed on.
    pub alpn: Option<Vec<u8>>,
}

/// Terminates TLS on 127.0.0.1:0 and forwards the plaintext to `upstream`. Stops (closing
/// every connection) when dropped.
pub struct Terminator {
    addr: SocketAddr,
    accepted: Arc<Mutex<Vec<Accepted>>>,
    failed: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    _stop: async_channel::Sender<()>,
}

impl Terminator {
    /// Listens at once; handshakes and forwarding run on a thread of their own.
    pub fn start(config: Arc<ServerConfig>, upstream: SocketAddr) -> Terminator {
        let listener = Async::<TcpListener>::bind(([127, 0, 0, 1], 0)).expect("bind loopback");
        let addr = listener.get_ref().local_addr().expect("local addr");
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let (acc, fail, clo) = (accepted.clone(), failed.clone(), closed.clone());
        std::thread::spawn(move || {
            let ex = async_executor::Executor::new();
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
                        acc.lock().unwrap_or_else(|p| p.into_inner()).push(Accepted {
                            sni: conn.server_name().map(str::to_string),
                            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                        });
                        let Ok(up) = Async::<TcpStream>::connect(upstream).await else { return };
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
            future::block_on(ex.run(future::or(serve, async {
                let _ = stopped.recv().await;
            })));
        });
        Terminator { addr, accepted, failed, closed, _stop: stop }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Completed handshakes, oldest first.
    pub fn accepted(&self) -> Vec<Accepted> {
        self.accepted.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Handshakes that failed (the client refused the certificate, or spoke no TLS).
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }

    /// Forwarded connections that have ended.
    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

/// A single-node etcd serving its clients over https with a certificate `ca` signed for
/// 127.0.0.1 and localhost, and accepting only clients that present a certificate `ca` signed
/// (`--client-cert-auth`).
pub fn etcd_tls(ca: &Ca) -> Running {
    // Client use too: etcd 3.4's JSON gateway dials etcd's own gRPC server with this
    // certificate, and --client-cert-auth checks it like any client's.
    let usage = [ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let (cert, key) = ca.issue(&["localhost", "127.0.0.1"], &usage);
    let ca_pem = ca.pem().to_string();
    crate::etcd_with(
        move |dir| {
            let write = |name: &str, text: &str| {
                let path = dir.join(name);
                std::fs::write(&path, text).expect("write a TLS file for etcd");
                path.display().to_string()
            };
            vec![
                "--cert-file".into(),
                write("server.pem", &cert),
                "--key-file".into(),
                write("server-key.pem", &key),
                "--trusted-ca-file".into(),
                write("ca.pem", &ca_pem),
                "--client-cert-auth".into(),
            ]
        },
        "https",
    )
}
