//! Why a request got no usable reply, and how to print an error with its causes.

use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The underlying error of a [`TransportError`]: shared, so the error stays `Clone` (a lease
/// keeps the last one for [`AcquireError::Unavailable`](crate::AcquireError::Unavailable)
/// and [`ReleaseError`](crate::ReleaseError)).
pub type Cause = Arc<dyn Error + Send + Sync + 'static>;

/// Why a request got no usable reply.
///
/// Each variant names the authority's address; what went wrong underneath (the OS error, the
/// TLS alert, hyper's error) is its [`source`](Error::source). Print the whole chain with
/// [`Report`].
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The authority could not be reached: name resolution or the TCP connect failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// Where we tried (`host:port`).
        addr: String,
        /// The resolver's or the socket's error.
        #[source]
        source: Cause,
    },
    /// No complete reply within the request timeout.
    #[error("no reply from {addr} within {timeout:?}")]
    Timeout {
        /// Where we asked.
        addr: String,
        /// The per-request timeout that ran out.
        timeout: Duration,
    },
    /// The connection failed before a complete response arrived.
    #[error("the connection to {addr} failed mid-request")]
    Io {
        /// Where we asked.
        addr: String,
        /// What failed: hyper's error, an OS error, or the peer closing the connection.
        #[source]
        source: Cause,
    },
    /// The reply could not be understood.
    #[error("unintelligible reply: {0}")]
    Protocol(String),
    /// The backend is misconfigured (bad URL, missing credentials...).
    #[error("misconfigured backend: {0}")]
    Config(String),
    /// The TLS handshake with an `https://` server failed: it sent a TLS alert, closed the
    /// connection mid-handshake, or does not speak TLS.
    #[error("TLS with {addr} failed: {message}")]
    Tls {
        /// Where we tried.
        addr: String,
        /// What it means, e.g. `the server's answer is not TLS`.
        message: String,
        /// rustls's or the socket's error.
        #[source]
        source: Option<Cause>,
    },
    /// The certificates did not pass: the `https://` server's is not issued by a trusted CA,
    /// not valid for the URL's host, expired..., or the server refused ours (or its absence).
    #[error("TLS with {addr} failed: {message}")]
    Certificate {
        /// Where we tried.
        addr: String,
        /// What it means, e.g. `invalid peer certificate: ...`.
        message: String,
        /// rustls's error, or the alert the server sent.
        #[source]
        source: Option<Cause>,
    },
}

/// Equal when of the same kind and printed the same, causes included: the causes themselves
/// (OS, TLS and hyper errors) cannot be compared.
impl PartialEq for TransportError {
    fn eq(&self, other: &TransportError) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && Report(self).to_string() == Report(other).to_string()
    }
}

impl Eq for TransportError {}

impl TransportError {
    /// Retrying cannot help: the configuration (URL, credentials, trusted CAs) has to change.
    ///
    /// [`Client`](crate::Client) gives up on such an error at once instead of retrying until a
    /// deadline, so a typo fails in a second rather than after `--timeout` (or never).
    pub fn is_permanent(&self) -> bool {
        matches!(self, TransportError::Config(_) | TransportError::Certificate { .. })
    }

    /// A connection to `addr` that failed mid-request because of `source`.
    pub fn io(addr: impl Into<String>, source: impl Error + Send + Sync + 'static) -> TransportError {
        TransportError::Io { addr: addr.into(), source: Arc::new(source) }
    }
}

/// Displays an error followed by each of its [`source`](Error::source)s, `: `-separated:
/// `the lease authority is unreachable: cannot connect to 127.0.0.1:9: Connection refused (os
/// error 111)`.
///
/// ```
/// use leasehold_client::{Report, TransportError};
/// let e = TransportError::io("127.0.0.1:7878", std::io::Error::other("connection reset"));
/// assert_eq!(
///     Report(&e).to_string(),
///     "the connection to 127.0.0.1:7878 failed mid-request: connection reset"
/// );
/// ```
#[derive(Clone, Copy)]
pub struct Report<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut last = self.0.to_string();
        let mut next = self.0.source();
        while let Some(e) = next {
            let text = e.to_string();
            // Some errors (io::Error wrapping a custom error) repeat their inner message.
            if !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            next = e.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
