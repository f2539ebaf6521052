//! TLS for `https://` URLs: rustls (ring provider) over async-io sockets through
//! futures-rustls, so it needs no runtime either.

use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use async_io::Async;
use futures_rustls::pki_types::pem::PemObject;
use futures_rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use futures_rustls::rustls::{self, ClientConfig, RootCertStore};
use futures_rustls::TlsConnector;

use leasehold_client::{Cause, TransportError};

/// Which certificates an `https://` server may present: Mozilla's root certificates (compiled
/// in from `webpki-roots`, so public endpoints such as AWS validate on any machine, with or
/// without a system certificate store) plus any CA certificates added here.
///
/// For servers that require client certificates (etcd's `--client-cert-auth`, mutual TLS in
/// general), [`with_client_cert_files`](TlsConfig::with_client_cert_files) adds one.
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
    identity: Option<Arc<Identity>>,
    config: Arc<ClientConfig>,
}

/// A client certificate chain and its private key.
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("roots", &self.roots.len())
            .field("client_cert", &self.identity.is_some())
            .finish_non_exhaustive()
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
                let config = client_config(roots.clone(), None).expect("no client certificate to refuse");
                TlsConfig { config, roots, identity: None }
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
        self.config = client_config(self.roots.clone(), self.identity.as_deref())?;
        Ok(self)
    }

    /// Presents the client certificate chain in the PEM file `cert` (leaf first), proven with
    /// the private key in the PEM file `key`, to servers that ask for one.
    pub fn with_client_cert_files(
        self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<TlsConfig, TransportError> {
        let (cert, key) = (cert.as_ref(), key.as_ref());
        let read = |path: &Path, what: &str| {
            std::fs::read(path)
                .map_err(|e| TransportError::Config(format!("client {what} file {}: {e}", path.display())))
        };
        let (cert_pem, key_pem) = (read(cert, "certificate")?, read(key, "key")?);
        self.with_client_cert_pem(&cert_pem, &key_pem).map_err(|e| {
            TransportError::Config(format!(
                "client certificate {} / key {}: {}",
                cert.display(),
                key.display(),
                config_message(e)
            ))
        })
    }

    /// Presents the client certificate chain in `cert_pem` (leaf first), proven with the
    /// private key in `key_pem` (PKCS#8, PKCS#1 or SEC1), to servers that ask for one.
    pub fn with_client_cert_pem(
        mut self,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<TlsConfig, TransportError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TransportError::Config(format!("unreadable certificate PEM: {e}")))?;
        if chain.is_empty() {
            return Err(TransportError::Config("no CERTIFICATE block in the client certificate PEM".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| TransportError::Config(format!("no usable private key in the key PEM: {e}")))?;
        let identity = Identity { chain, key };
        self.config = client_config(self.roots.clone(), Some(&identity))?;
        self.identity = Some(Arc::new(identity));
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

/// TLS 1.2 and 1.3 with ring's safe defaults, ALPN `http/1.1`, and the client certificate if
/// there is one (an error if its key does not fit it).
fn client_config(
    roots: RootCertStore,
    identity: Option<&Identity>,
) -> Result<Arc<ClientConfig>, TransportError> {
    // An explicit provider: the process-wide default would panic if another crate in the
    // build enabled a second provider (e.g. aws-lc-rs) on rustls.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls's default protocol versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .map_err(|e| TransportError::Config(format!("client certificate and key do not fit: {e}")))?,
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
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
            let rustls = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).cloned();
            let e = match rustls {
                Some(r @ rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
                    let message = "invalid peer certificate: not issued by a trusted CA (UnknownIssuer); \
                                   a private CA must be added to the client's trusted CAs";
                    TransportError::Certificate {
                        addr,
                        message: message.to_string(),
                        source: Some(Arc::new(r)),
                    }
                }
                Some(r @ rustls::Error::InvalidCertificate(_)) => {
                    TransportError::Certificate { addr, message: r.to_string(), source: Some(Arc::new(r)) }
                }
                Some(rustls::Error::AlertReceived(alert)) if refuses_identity(alert) => {
                    identity_refused(addr, alert)
                }
                Some(r @ rustls::Error::InvalidMessage(_)) => TransportError::Tls {
                    addr,
                    message: format!("the server's answer is not TLS ({r}): is it an http:// server?"),
                    source: Some(Arc::new(r)),
                },
                Some(r) => TransportError::Tls { addr, message: r.to_string(), source: Some(Arc::new(r)) },
                None => TransportError::Tls {
                    addr,
                    message: "handshake failed".to_string(),
                    source: Some(Arc::new(e) as Cause),
                },
            };
            tracing::warn!("{}", crate::Report(&e));
            e
        })
    }
}

/// Alerts with which a server turns down the client's certificate (or its absence).
fn refuses_identity(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::CertificateRequired
            | A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
    )
}

fn identity_refused(addr: String, alert: rustls::AlertDescription) -> TransportError {
    let message = format!(
        "the server refused our client certificate (alert {alert:?}): it requires one signed by a CA \
         it trusts"
    );
    TransportError::Certificate { addr, message, source: Some(Arc::new(rustls::Error::AlertReceived(alert))) }
}

/// A server's refusal of the client certificate, if that is what `e` (or what caused it)
/// is. Under TLS 1.3 the server checks the client's certificate after the client considers
/// the handshake done, so the refusal arrives with the first response instead.
pub(crate) fn refused_identity(addr: &str, e: &(dyn std::error::Error + 'static)) -> Option<TransportError> {
    let mut next = Some(e);
    while let Some(e) = next {
        // io::Error's source() skips the error it wraps, so look inside it too.
        let inner = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).map(|i| i as &_);
        for candidate in [Some(e), inner].into_iter().flatten() {
            if let Some(rustls::Error::AlertReceived(alert)) = candidate.downcast_ref::<rustls::Error>() {
                if refuses_identity(*alert) {
                    return Some(identity_refused(addr.to_string(), *alert));
                }
            }
        }
        next = e.source();
    }
    None
}
