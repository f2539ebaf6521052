//! Backends carry one core request for one key to an authority and bring back its reply.

use std::future::Future;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use async_io::Async;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{Connection, SendRequest};
use leasehold_core::{Key, Reject, Reply, Request};
use smol_hyper::rt::FuturesIo;

/// Carries one core request for one key to an authority and brings back its reply.
///
/// Implementations translate between the core's [`Request`]/[`Reply`] and a store's API; they
/// hold no lease logic (no validity, no retry policy: the core decides both).
pub trait Backend: Send + Sync + 'static {
    /// Sends `request` for `key`. An `Err` means the request may or may not have reached the
    /// authority; the core treats it as a failed attempt and retries with backoff.
    fn call(&self, key: &Key, request: Request)
        -> impl Future<Output = Result<Reply, TransportError>> + Send;
}

/// Why a request got no usable reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The authority could not be reached.
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// Where we tried.
        addr: String,
        /// The cause.
        message: String,
    },
    /// No reply within the request timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The connection failed mid-request.
    #[error("i/o error: {0}")]
    Io(String),
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
        /// The cause, e.g. `received fatal alert: ...`.
        message: String,
    },
    /// The certificates did not pass: the `https://` server's is not issued by a trusted CA,
    /// not valid for the URL's host, expired..., or the server refused ours (or its absence).
    #[error("TLS with {addr} failed: {message}")]
    Certificate {
        /// Where we tried.
        addr: String,
        /// The cause, e.g. `invalid peer certificate: ...`.
        message: String,
    },
}

impl TransportError {
    /// Retrying cannot help: the configuration (URL, credentials, trusted CAs) has to change.
    ///
    /// [`Client`](crate::Client) gives up on such an error at once instead of retrying until a
    /// deadline, so a typo fails in a second rather than after `--timeout` (or never).
    pub fn is_permanent(&self) -> bool {
        matches!(self, TransportError::Config(_) | TransportError::Certificate { .. })
    }
}

/// A parsed `http[s]://host[:port][/prefix]` URL.
#[derive(Debug, Clone)]
pub(crate) struct HttpTarget {
    /// `https://`.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) tls: bool,
    /// The host without brackets: what a TLS certificate must name.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) host: String,
    /// `host:port` to connect to, the scheme's default port filled in.
    pub(crate) authority: String,
    /// The URL's authority as written: the `Host` header.
    pub(crate) host_header: String,
    pub(crate) prefix: String,
}

impl HttpTarget {
    pub(crate) fn parse(url: &str) -> Result<HttpTarget, TransportError> {
        let bad = |why: &str| TransportError::Config(format!("{url:?}: {why}"));
        let (tls, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            if cfg!(not(feature = "tls")) {
                return Err(bad("https:// URLs need leasehold-http's `tls` feature"));
            }
            (true, rest)
        } else {
            return Err(bad("only http:// and https:// URLs are supported"));
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = match authority.strip_prefix('[') {
            // An IPv6 literal: `[::1]` or `[::1]:8443`.
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '[' in the host"))?;
                match after {
                    "" => (host, None),
                    _ => (host, Some(after.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?)),
                }
            }
            None => match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| bad("bad port"))?,
            None if tls => 443,
            None => 80,
        };
        let authority =
            if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        Ok(HttpTarget {
            tls,
            host: host.to_string(),
            authority,
            host_header: rest[..rest.find('/').unwrap_or(rest.len())].to_string(),
            prefix: prefix.to_string(),
        })
    }
}

/// A connection's byte stream: plain TCP or TLS over TCP.
enum Stream {
    Plain(Async<TcpStream>),
    #[cfg(feature = "tls")]
    Tls(Box<futures_rustls::client::TlsStream<Async<TcpStream>>>),
}

/// Both variants are `Unpin`, so each call is forwarded through `Pin::new`.
macro_rules! forward {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => $e,
            #[cfg(feature = "tls")]
            Stream::Tls($s) => $e,
        }
    };
}

impl futures_lite::AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
        forward!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl futures_lite::AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        forward!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        forward!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        forward!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        forward!(self, s => Pin::new(s).poll_close(cx))
    }
}

type Io = FuturesIo<Stream>;

/// Idle keep-alive connections kept per client; more concurrent requests than this open
/// connections that are closed after use.
const MAX_IDLE: usize = 8;

struct Conn {
    sender: SendRequest<Full<Bytes>>,
    conn: Pin<Box<Connection<Io, Full<Bytes>>>>,
}

/// A small keep-alive HTTP/1.1 client that needs no async runtime: sockets and timers come
/// from async-io, whose reactor runs on its own thread, so it works under smol, tokio or a
/// plain `block_on`.
///
/// `https://` URLs (with the default `tls` feature) are served by rustls with ALPN `http/1.1`,
/// SNI and certificate checks against the URL's host, and the trust roots of a
/// [`TlsConfig`](crate::TlsConfig) (Mozilla's roots unless [`with_tls`](HttpClient::with_tls)
/// adds more). TLS connections are pooled exactly like plain ones.
pub struct HttpClient {
    target: HttpTarget,
    timeout: Duration,
    idle: Mutex<Vec<Conn>>,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::TlsTarget>,
}

/// An HTTP response: status and body.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// The whole body.
    pub body: Bytes,
}

impl HttpClient {
    /// A client for `base_url` (`http[s]://host[:port][/prefix]`) with a per-request
    /// `timeout` (which covers connecting and the TLS handshake too).
    pub fn new(base_url: &str, timeout: Duration) -> Result<HttpClient, TransportError> {
        let target = HttpTarget::parse(base_url)?;
        Ok(HttpClient {
            #[cfg(feature = "tls")]
            tls: match target.tls {
                true => Some(crate::tls::TlsTarget::new(&target.host, &crate::TlsConfig::new())?),
                false => None,
            },
            target,
            timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Uses `tls` for an `https://` URL (for `http://` it is unused), e.g. to trust a private
    /// CA as well.
    #[cfg(feature = "tls")]
    pub fn with_tls(mut self, tls: crate::TlsConfig) -> HttpClient {
        if let Some(t) = self.tls.as_mut() {
            t.connector = tls.connector();
            // Pooled connections were verified against the old roots.
            if let Ok(mut idle) = self.idle.lock() {
                idle.clear();
            }
        }
        self
    }

    /// Sends one request and reads the whole response, reusing an idle connection if any.
    pub async fn send(&self, request: hyper::Request<Full<Bytes>>) -> Result<HttpResponse, TransportError> {
        let timeout = self.timeout;
        futures_lite::future::or(self.send_inner(request), async move {
            async_io::Timer::after(timeout).await;
            Err(TransportError::Timeout(timeout))
        })
        .await
    }

    /// Builds a request for `path` (below the base URL's prefix).
    pub fn request(&self, method: hyper::Method, path: &str) -> hyper::http::request::Builder {
        hyper::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.target.prefix, path))
            .header(hyper::header::HOST, &self.target.host_header)
    }

    async fn send_inner(&self, request: hyper::Request<Full<Bytes>>) -> Result<HttpResponse, TransportError> {
        let mut c = match self.take_idle().await {
            Some(c) => c,
            None => self.connect().await?,
        };
        let io = |e: hyper::Error| self.io_error(e);
        // The connection future must be polled while the request and its body are in flight.
        let exchange = async {
            futures_lite::future::poll_fn(|cx| c.sender.poll_ready(cx)).await.map_err(io)?;
            let resp = c.sender.send_request(request).await.map_err(io)?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.map_err(io)?.to_bytes();
            Ok(HttpResponse { status, body })
        };
        let result = {
            let conn = &mut c.conn;
            futures_lite::future::or(exchange, async move {
                Err(match conn.as_mut().await {
                    Ok(()) => TransportError::Io("connection closed".to_string()),
                    Err(e) => io(e),
                })
            })
            .await
        };
        if result.is_ok() && !c.sender.is_closed() {
            if let Ok(mut v) = self.idle.lock() {
                if v.len() < MAX_IDLE {
                    v.push(c);
                }
            }
        }
        result
    }

    /// A failed exchange: the server refusing our client certificate (which TLS 1.3 reports
    /// only here), or an i/o error.
    fn io_error(&self, e: hyper::Error) -> TransportError {
        #[cfg(feature = "tls")]
        if let Some(refused) = crate::tls::refused_identity(&self.target.authority, &e) {
            tracing::warn!("{refused}");
            return refused;
        }
        TransportError::Io(e.to_string())
    }

    /// An idle connection that is still open. Nothing polls an idle connection, so a server
    /// that closed it (restart, idle timeout) is only noticed by polling it once here; sending
    /// on it instead would fail a request that a fresh connection would have carried. Over TLS
    /// the poll reads the peer's close_notify or EOF the same way.
    async fn take_idle(&self) -> Option<Conn> {
        loop {
            let mut c = self.idle.lock().ok()?.pop()?;
            if c.sender.is_closed() {
                continue;
            }
            // A finished connection future means the peer closed it (or it broke).
            if futures_lite::future::poll_once(c.conn.as_mut()).await.is_some() || c.sender.is_closed() {
                continue;
            }
            return Some(c);
        }
    }

    async fn connect(&self) -> Result<Conn, TransportError> {
        let authority = self.target.authority.clone();
        let connect_err =
            |e: std::io::Error| TransportError::Connect { addr: authority.clone(), message: e.to_string() };
        let addrs: Vec<SocketAddr> = self.target.authority.to_socket_addrs().map_err(connect_err)?.collect();
        let mut last = None;
        for addr in addrs {
            match Async::<TcpStream>::connect(addr).await {
                Ok(stream) => {
                    let _ = stream.get_ref().set_nodelay(true);
                    let stream = self.secure(stream).await?;
                    let (sender, conn) = hyper::client::conn::http1::handshake(FuturesIo::new(stream))
                        .await
                        .map_err(|e| TransportError::Io(e.to_string()))?;
                    return Ok(Conn { sender, conn: Box::pin(conn) });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(connect_err(last.unwrap_or_else(|| std::io::Error::other("no address"))))
    }

    /// The TLS handshake for an `https://` target; plain TCP otherwise.
    async fn secure(&self, stream: Async<TcpStream>) -> Result<Stream, TransportError> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            let stream = tls.handshake(&self.target.authority, stream).await?;
            return Ok(Stream::Tls(Box::new(stream)));
        }
        Ok(Stream::Plain(stream))
    }
}

/// The built-in lease server (`leasehold serve`).
pub struct BuiltinBackend {
    http: HttpClient,
    token: Option<String>,
}

impl BuiltinBackend {
    /// A backend for the server at `url` (e.g. `http://127.0.0.1:7878`), with an optional
    /// bearer token and a per-request timeout.
    pub fn new(
        url: &str,
        token: Option<String>,
        timeout: Duration,
    ) -> Result<BuiltinBackend, TransportError> {
        Ok(BuiltinBackend { http: HttpClient::new(url, timeout)?, token })
    }

    /// Uses `tls` for an `https://` URL, e.g. to trust the private CA that signed the
    /// server's certificate (see [`HttpClient::with_tls`]).
    #[cfg(feature = "tls")]
    pub fn with_tls(self, tls: crate::TlsConfig) -> BuiltinBackend {
        BuiltinBackend { http: self.http.with_tls(tls), ..self }
    }
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    message: String,
}

impl Backend for BuiltinBackend {
    async fn call(&self, key: &Key, request: Request) -> Result<Reply, TransportError> {
        let body = serde_json::to_vec(&request).map_err(|e| TransportError::Protocol(e.to_string()))?;
        let mut b = self
            .http
            .request(hyper::Method::POST, &format!("/v1/leases/{key}"))
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(t) = &self.token {
            b = b.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = b.body(Full::new(Bytes::from(body))).map_err(|e| TransportError::Config(e.to_string()))?;
        let resp = self.http.send(req).await?;
        builtin_reply(&request, resp)
    }
}

/// Maps the built-in server's answer to the core's reply, per the server's API contract.
fn builtin_reply(request: &Request, resp: HttpResponse) -> Result<Reply, TransportError> {
    if resp.status == 200 {
        let r: leasehold_core::Response = serde_json::from_slice(&resp.body)
            .map_err(|e| TransportError::Protocol(format!("bad response body: {e}")))?;
        if r.id != request.id || r.owner != request.owner {
            return Err(TransportError::Protocol("response for another request".into()));
        }
        return Ok(r.reply);
    }
    if resp.status >= 500 {
        return Ok(Reply::Unavailable);
    }
    let err: ErrorBody = serde_json::from_slice(&resp.body).map_err(|_| {
        TransportError::Protocol(format!(
            "HTTP {} with a body that is not an error: {:?}",
            resp.status, resp.body
        ))
    })?;
    tracing::warn!("server rejected request: {} ({})", err.error, err.message);
    Ok(Reply::Rejected(match err.error.as_str() {
        "invalid_ttl" => Reject::InvalidTtl,
        "invalid_key" => Reject::InvalidKey,
        "unauthorized" => Reject::Unauthorized,
        "fence_exhausted" => Reject::FenceExhausted,
        "malformed_json" | "body_too_large" => Reject::Malformed,
        _ => Reject::Misconfigured,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_core::{Op, OwnerId, RequestId};

    fn req() -> Request {
        Request { id: RequestId(3), owner: OwnerId(7), op: Op::Release { fence: leasehold_core::Fence(1) } }
    }
    fn resp(status: u16, body: &str) -> HttpResponse {
        HttpResponse { status, body: Bytes::from(body.to_string()) }
    }

    #[test]
    fn maps_server_answers() {
        assert_eq!(
            builtin_reply(&req(), resp(200, r#"{"id":3,"owner":7,"reply":"released"}"#)),
            Ok(Reply::Released)
        );
        assert!(matches!(
            builtin_reply(&req(), resp(200, r#"{"id":4,"owner":7,"reply":"released"}"#)),
            Err(TransportError::Protocol(_))
        ));
        assert!(matches!(builtin_reply(&req(), resp(200, "garbage")), Err(TransportError::Protocol(_))));
        assert_eq!(builtin_reply(&req(), resp(503, "")), Ok(Reply::Unavailable));
        assert_eq!(
            builtin_reply(&req(), resp(400, r#"{"error":"invalid_ttl","message":"x"}"#)),
            Ok(Reply::Rejected(Reject::InvalidTtl))
        );
        assert_eq!(
            builtin_reply(&req(), resp(401, r#"{"error":"unauthorized","message":"x"}"#)),
            Ok(Reply::Rejected(Reject::Unauthorized))
        );
        assert!(matches!(builtin_reply(&req(), resp(404, "<html>")), Err(TransportError::Protocol(_))));
    }

    fn parsed(url: &str) -> (bool, String, String, String, String) {
        let t = HttpTarget::parse(url).unwrap();
        (t.tls, t.host, t.authority, t.host_header, t.prefix)
    }

    fn strings(
        tls: bool,
        host: &str,
        authority: &str,
        header: &str,
        prefix: &str,
    ) -> (bool, String, String, String, String) {
        (tls, host.into(), authority.into(), header.into(), prefix.into())
    }

    #[test]
    fn parses_urls() {
        assert_eq!(
            parsed("http://127.0.0.1:7878/"),
            strings(false, "127.0.0.1", "127.0.0.1:7878", "127.0.0.1:7878", "")
        );
        assert_eq!(
            parsed("http://example.com/base/"),
            strings(false, "example.com", "example.com:80", "example.com", "/base")
        );
        assert_eq!(parsed("http://[::1]:2379"), strings(false, "::1", "[::1]:2379", "[::1]:2379", ""));
        assert_eq!(parsed("http://[::1]/p"), strings(false, "::1", "[::1]:80", "[::1]", "/p"));
        for bad in [
            "http:///x",
            "ftp://x",
            "http://:80",
            "http://x:port",
            "http://x:99999",
            "http://[::1",
            "http://[::1]x",
        ] {
            assert!(matches!(HttpTarget::parse(bad), Err(TransportError::Config(_))), "{bad}");
        }
    }

    #[cfg(feature = "tls")]
    #[test]
    fn parses_https_urls() {
        assert_eq!(
            parsed("https://dynamodb.eu-west-1.amazonaws.com"),
            strings(
                true,
                "dynamodb.eu-west-1.amazonaws.com",
                "dynamodb.eu-west-1.amazonaws.com:443",
                "dynamodb.eu-west-1.amazonaws.com",
                ""
            )
        );
        assert_eq!(
            parsed("https://localhost:8443/v/"),
            strings(true, "localhost", "localhost:8443", "localhost:8443", "/v")
        );
        assert!(
            HttpClient::new("https://127.0.0.1:8443", Duration::from_secs(1)).is_ok(),
            "IP names are fine"
        );
        assert!(matches!(
            HttpClient::new("https://bad_name!:8443", Duration::from_secs(1)),
            Err(TransportError::Config(_))
        ));
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn https_needs_the_tls_feature() {
        let e = HttpTarget::parse("https://example.com").unwrap_err();
        assert!(matches!(&e, TransportError::Config(m) if m.contains("`tls` feature")), "{e}");
    }
}
