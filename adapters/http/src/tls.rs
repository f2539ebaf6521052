//! TLS for `https://` URLs: rustls (ring provider) over async-io sockets through
//! futures-rustls, so it needs no runtime either.

use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use async_io::Async;
use futures_rustls::pki_types::pem::PemObject;
use futures_rustls::pki_types::{CertificateDer, ServerName};
use futures_rustls::rustls::{self, ClientConfig, RootCertStore};
use futures_rustls::TlsConnector;

use crate::backend::TransportError;

/// Which certificates an `https://` server may present: Mozilla's root certificates (compiled
/// in from `webpki-roots`, so public endpoints such as AWS validate on any machine, with or
/// without a system certificate store) plus any CA certificates added here.
///
/// Clone it to share one configuration (and its TLS session cache) between clients.
///
/// ```
/// # fn f() -> Result<(), leasehold_http::TransportError> {
/// use std::time::Duration;
/// use leasehold_http::{HttpClient, TlsConfig};
///
/// let tls = TlsConfig::new().add_ca_file("/etc/leasehold/ca.pem")?;
/// let http = HttpClient::new("https://leases.internal:7878", Duration::from_secs(2))?.with_tls(tls);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TlsConfig {
    roots: RootCertStore,
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig").field("roots", &self.roots.len()).finish_non_exhaustive()
    }
}

impl Default for TlsConfig {
    fn default() -> TlsConfig {
        TlsConfig::new()
    }
}

impl TlsConfig {
    /// Mozilla's root certificates only.
    pub fn new() -> TlsConfig {
        static DEFAULT: OnceLock<TlsConfig> = OnceLock::new();
        DEFAULT
            .get_or_init(|| {
                let roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
                TlsConfig { config: client_config(roots.clone()), roots }
            })
            .clone()
    }

    /// Also trusts the CA certificate(s) in the PEM file at `path` (e.g. a private CA that
    /// signed an etcd cluster's or a lease server's certificate).
    pub fn add_ca_file(self, path: impl AsRef<Path>) -> Result<TlsConfig, TransportError> {
        let path = path.as_ref();
        let pem = std::fs::read(path)
            .map_err(|e| TransportError::Config(format!("CA file {}: {e}", path.display())))?;
        self.add_ca_pem(&pem)
            .map_err(|e| TransportError::Config(format!("CA file {}: {}", path.display(), config_message(e))))
    }

    /// Also trusts the CA certificate(s) in `pem` (one or more `BEGIN CERTIFICATE` blocks).
    pub fn add_ca_pem(mut self, pem: &[u8]) -> Result<TlsConfig, TransportError> {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| TransportError::Config(format!("unreadable PEM: {e}")))?;
            self.roots
                .add(cert)
                .map_err(|e| TransportError::Config(format!("not a usable CA certificate: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(TransportError::Config("no CERTIFICATE block in the PEM data".into()));
        }
        self.config = client_config(self.roots.clone());
        Ok(self)
    }

    pub(crate) fn connector(&self) -> TlsConnector {
        TlsConnector::from(self.config.clone())
    }
}

fn config_message(e: TransportError) -> String {
    match e {
        TransportError::Config(m) => m,
        other => other.to_string(),
    }
}

/// TLS 1.2 and 1.3 with ring's safe defaults, ALPN `http/1.1`, no client certificate.
fn client_config(roots: RootCertStore) -> Arc<ClientConfig> {
    // An explicit provider: the process-wide default would panic if another crate in the
    // build enabled a second provider (e.g. aws-lc-rs) on rustls.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls's default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The TLS side of one `https://` target: whom to trust, and the name the certificate must
/// carry (also sent as SNI, unless it is an IP address).
pub(crate) struct TlsTarget {
    pub(crate) connector: TlsConnector,
    pub(crate) name: ServerName<'static>,
}

impl TlsTarget {
    pub(crate) fn new(host: &str, config: &TlsConfig) -> Result<TlsTarget, TransportError> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| TransportError::Config(format!("{host:?} is not a TLS server name: {e}")))?;
        Ok(TlsTarget { connector: config.connector(), name })
    }

    /// The TLS handshake on a connected socket. A refused certificate is a
    /// [`TransportError::Certificate`]; every other failure (an alert, a peer that does not
    /// speak TLS, a close mid-handshake) is a [`TransportError::Tls`].
    pub(crate) async fn handshake(
        &self,
        addr: &str,
        stream: Async<TcpStream>,
    ) -> Result<futures_rustls::client::TlsStream<Async<TcpStream>>, TransportError> {
        self.connector.connect(self.name.clone(), stream).await.map_err(|e| {
            let addr = addr.to_string();
            let e = match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
                    let message = "invalid peer certificate: not issued by a trusted CA (UnknownIssuer); \
                                   a private CA must be added to the client's trusted CAs";
                    TransportError::Certificate { addr, message: message.to_string() }
                }
                Some(e @ rustls::Error::InvalidCertificate(_)) => {
                    TransportError::Certificate { addr, message: e.to_string() }
                }
                Some(e @ rustls::Error::InvalidMessage(_)) => TransportError::Tls {
                    addr,
                    message: format!("the server's answer is not TLS ({e}): is it an http:// server?"),
                },
                Some(e) => TransportError::Tls { addr, message: e.to_string() },
                None => TransportError::Tls { addr, message: format!("handshake failed: {e}") },
            };
            tracing::warn!("{e}");
            e
        })
    }
}
