//! https for the listener: rustls (ring provider) over the same async sockets, through
//! futures-rustls.

use std::path::Path;
use std::sync::Arc;

use futures_rustls::pki_types::pem::PemObject;
use futures_rustls::pki_types::{CertificateDer, PrivateKeyDer};
use futures_rustls::rustls::server::WebPkiClientVerifier;
use futures_rustls::rustls::{self, RootCertStore};
use futures_rustls::TlsAcceptor;

use crate::ServerError;

/// The server's side of TLS: its certificate chain and private key, and optionally the CAs
/// whose client certificates it requires (mutual TLS: no certificate, no connection).
#[derive(Clone)]
pub struct ServerTls {
    pub(crate) acceptor: TlsAcceptor,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// From PEM files: the certificate chain (leaf first), its private key, and optionally the
    /// CA certificate(s) that must have signed every client's certificate.
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<ServerTls, ServerError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| ServerError::Tls(format!("{}: {e}", path.display())))
        };
        let client_ca = client_ca.map(read).transpose()?;
        ServerTls::from_pem(&read(cert)?, &read(key)?, client_ca.as_deref())
    }

    /// From PEM data; see [`from_pem_files`](ServerTls::from_pem_files).
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        client_ca_pem: Option<&[u8]>,
    ) -> Result<ServerTls, ServerError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| ServerError::Tls(format!("{what}: {e}"));
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("unreadable certificate PEM", &e))?;
        if chain.is_empty() {
            return Err(ServerError::Tls("no CERTIFICATE block in the certificate PEM".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| bad("no usable private key in the key PEM", &e))?;
        // An explicit provider, as on the client side: the process default could be ambiguous.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("protocol versions", &e))?;
        let builder = match client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| bad("unreadable client CA PEM", &e))?;
                    roots.add(cert).map_err(|e| bad("not a usable client CA certificate", &e))?;
                }
                if roots.is_empty() {
                    return Err(ServerError::Tls("no CERTIFICATE block in the client CA PEM".into()));
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| bad("client CA", &e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config =
            builder.with_single_cert(chain, key).map_err(|e| bad("certificate and key do not fit", &e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls { acceptor: TlsAcceptor::from(Arc::new(config)) })
    }
}
