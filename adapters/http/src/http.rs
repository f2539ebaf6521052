//! A small pooled HTTP/1.1 client on hyper's connection API, with no runtime of its own.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_io::Async;
use async_lock::Semaphore;
use futures_lite::future;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{Connection, SendRequest};
use smol_hyper::rt::FuturesIo;

use leasehold_client::TransportError;

/// A parsed `http[s]://host[:port][/prefix]` URL.
#[derive(Debug, Clone)]
pub(crate) struct HttpTarget {
    /// `https://`.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) tls: bool,
    /// The host without brackets: what a TLS certificate must name.
    pub(crate) host: String,
    pub(crate) port: u16,
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
            port,
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

/// Requests in flight at once per client, and so connections open at once (each request has
/// one to itself; HTTP/1.1 cannot interleave). Ten thousand leases renewing through one client
/// queue here for a connection instead of opening thousands; the core anchors validity at the
/// moment it handed out the request, so time spent queueing is never counted in the holder's
/// favour.
pub const DEFAULT_MAX_CONNECTIONS: usize = 32;

/// Resolves `host:port` to the addresses to try, in order. It may block: it runs on a thread
/// of the `blocking` pool, never on the thread that drives renewals.
pub type Resolver = Arc<dyn Fn(&str) -> io::Result<Vec<SocketAddr>> + Send + Sync>;

/// hyper's half of a connection that does the reading and writing; polled while a request is out.
type ConnDriver = Pin<Box<Connection<Io, Full<Bytes>>>>;

struct Conn {
    sender: SendRequest<Full<Bytes>>,
    conn: ConnDriver,
}

/// A small keep-alive HTTP/1.1 client that needs no async runtime: sockets and timers come
/// from async-io, whose reactor runs on its own thread, so it works under smol, tokio or a
/// plain `block_on`. Name resolution (`getaddrinfo`) runs on the `blocking` thread pool.
///
/// At most [`max_connections`](HttpClient::with_max_connections) requests are in flight at
/// once, each on its own connection; connections are kept alive and reused. A response is
/// complete once its body is, whatever the connection does next: a server or proxy that
/// answers `Connection: close` is served like any other.
///
/// `https://` URLs (with the default `tls` feature) are served by rustls with ALPN `http/1.1`,
/// SNI and certificate checks against the URL's host, and the trust roots of a
/// [`TlsConfig`](crate::TlsConfig) (Mozilla's roots unless [`with_tls`](HttpClient::with_tls)
/// adds more). TLS connections are pooled exactly like plain ones.
pub struct HttpClient {
    target: HttpTarget,
    timeout: Duration,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
    /// Held while waiting for a permit: see [`permit`](HttpClient::permit).
    turns: async_lock::Mutex<()>,
    max_connections: usize,
    resolver: Resolver,
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

/// A response whose body is read as it arrives (see [`HttpClient::stream`]). Dropping it
/// closes its connection.
pub struct HttpStream {
    /// Status code.
    pub status: u16,
    body: hyper::body::Incoming,
    /// `None` once the connection has ended: what it delivered is still in `body`.
    conn: Option<ConnDriver>,
    addr: String,
    _permit: async_lock::SemaphoreGuardArc,
}

impl HttpStream {
    /// The next piece of the body as it arrived; `None` at its end. Unbounded in time: race it
    /// against a timer.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, TransportError>> {
        loop {
            let frame = match self.conn.as_mut() {
                // The connection future does the reading, so it is polled alongside.
                Some(conn) => {
                    let read = future::or(async { Some(self.body.frame().await) }, async {
                        let _ = conn.as_mut().await;
                        None
                    })
                    .await;
                    match read {
                        Some(frame) => frame,
                        None => {
                            self.conn = None;
                            continue;
                        }
                    }
                }
                None => self.body.frame().await,
            };
            match frame? {
                Ok(f) => match f.into_data() {
                    Ok(data) => return Some(Ok(data)),
                    // Trailers: not data, read on.
                    Err(_) => continue,
                },
                Err(e) => return Some(Err(TransportError::io(&self.addr, e))),
            }
        }
    }
}

/// How the first of a request's exchange and its connection ended.
enum First {
    Exchange(Result<HttpResponse, hyper::Error>),
    Closed(Result<(), hyper::Error>),
}

impl HttpClient {
    /// A client for `base_url` (`http[s]://host[:port][/prefix]`) with a per-request
    /// `timeout` (which covers waiting for a free connection, resolving, connecting and the
    /// TLS handshake too).
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
            permits: Arc::new(Semaphore::new(DEFAULT_MAX_CONNECTIONS)),
            turns: async_lock::Mutex::new(()),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            resolver: Arc::new(|authority: &str| Ok(authority.to_socket_addrs()?.collect())),
        })
    }

    /// Uses `tls` for an `https://` URL (for `http://` it is unused), e.g. to trust a private
    /// CA as well.
    #[cfg(feature = "tls")]
    pub fn with_tls(mut self, tls: crate::TlsConfig) -> HttpClient {
        if let Some(t) = self.tls.as_mut() {
            t.connector = tls.connector();
            // Pooled connections were verified against the old roots.
            self.idle_conns().clear();
        }
        self
    }

    /// At most `n` (at least 1) requests in flight, and so connections open, at once
    /// ([`DEFAULT_MAX_CONNECTIONS`] unless set).
    pub fn with_max_connections(mut self, n: usize) -> HttpClient {
        self.max_connections = n.max(1);
        self.permits = Arc::new(Semaphore::new(self.max_connections));
        self
    }

    /// Resolves host names with `resolver` instead of the system's `getaddrinfo` (for service
    /// discovery, or a resolver with its own cache). URLs with an IP address skip it.
    pub fn with_resolver(
        mut self,
        resolver: impl Fn(&str) -> io::Result<Vec<SocketAddr>> + Send + Sync + 'static,
    ) -> HttpClient {
        self.resolver = Arc::new(resolver);
        self
    }

    /// The server's `host:port`.
    pub fn authority(&self) -> &str {
        &self.target.authority
    }

    /// Sends one request and reads the whole response, reusing an idle connection if any.
    pub async fn send(&self, request: hyper::Request<Full<Bytes>>) -> Result<HttpResponse, TransportError> {
        let timeout = self.timeout;
        future::or(self.send_inner(request), async move {
            leasehold_timer::Deadline::after(timeout).await;
            Err(TransportError::Timeout { addr: self.target.authority.clone(), timeout })
        })
        .await
    }

    /// Sends one request and returns as soon as the response's head has arrived, with its body
    /// to be read as it comes: for a server that streams (etcd's `POST /v3/watch` answers with
    /// one JSON object per event, for as long as the connection lasts).
    ///
    /// The timeout covers the response's head only; the reader bounds the body's wait itself.
    /// The connection is the stream's own until it is dropped, which closes it (a stream has no
    /// end the pool could wait for), and it counts against
    /// [`max_connections`](HttpClient::with_max_connections) meanwhile.
    pub async fn stream(&self, request: hyper::Request<Full<Bytes>>) -> Result<HttpStream, TransportError> {
        let timeout = self.timeout;
        future::or(self.stream_inner(request), async move {
            leasehold_timer::Deadline::after(timeout).await;
            Err(TransportError::Timeout { addr: self.target.authority.clone(), timeout })
        })
        .await
    }

    async fn stream_inner(&self, request: hyper::Request<Full<Bytes>>) -> Result<HttpStream, TransportError> {
        let permit = self.permit().await;
        let Conn { mut sender, mut conn } = match self.take_idle().await {
            Some(c) => c,
            None => self.connect().await?,
        };
        let head = async {
            future::poll_fn(|cx| sender.poll_ready(cx)).await?;
            sender.send_request(request).await
        };
        let first = future::or(async { Some(head.await) }, async {
            let _ = conn.as_mut().await;
            None
        })
        .await;
        let addr = self.target.authority.clone();
        match first {
            Some(Ok(resp)) => Ok(HttpStream {
                status: resp.status().as_u16(),
                body: resp.into_body(),
                conn: Some(conn),
                addr,
                _permit: permit,
            }),
            Some(Err(e)) => Err(self.exchange_error(e, None)),
            None => {
                Err(TransportError::io(addr, io::Error::other("the connection closed before a response")))
            }
        }
    }

    /// Builds a request for `path` (below the base URL's prefix).
    pub fn request(&self, method: hyper::Method, path: &str) -> hyper::http::request::Builder {
        hyper::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.target.prefix, path))
            .header(hyper::header::HOST, &self.target.host_header)
    }

    async fn send_inner(&self, request: hyper::Request<Full<Bytes>>) -> Result<HttpResponse, TransportError> {
        let _permit = self.permit().await;
        let Conn { mut sender, mut conn } = match self.take_idle().await {
            Some(c) => c,
            None => self.connect().await?,
        };
        let mut exchange = Box::pin(async {
            future::poll_fn(|cx| sender.poll_ready(cx)).await?;
            let resp = sender.send_request(request).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok(HttpResponse { status, body })
        });
        // The connection future does the reading and writing, so it is polled alongside.
        let first = future::or(async { First::Exchange(exchange.as_mut().await) }, async {
            First::Closed(conn.as_mut().await)
        })
        .await;
        match first {
            First::Exchange(Ok(response)) => {
                drop(exchange);
                if !sender.is_closed() {
                    let mut idle = self.idle_conns();
                    if idle.len() < self.max_connections {
                        idle.push(Conn { sender, conn });
                    }
                }
                Ok(response)
            }
            First::Exchange(Err(e)) => Err(self.exchange_error(e, None)),
            First::Closed(closed) => {
                // The connection is done: the server closed it after its reply (`Connection:
                // close`), or it failed. Whatever hyper read is in the exchange's channels, so
                // a complete response is still a response; dropping the connection makes
                // whatever it can no longer deliver fail instead of wait.
                drop(conn);
                exchange.await.map_err(|e| self.exchange_error(e, closed.err()))
            }
        }
    }

    /// A failed exchange: the server refusing our client certificate (which TLS 1.3 reports
    /// only after the handshake, with the first response or as the connection's error), or an
    /// i/o error.
    fn exchange_error(&self, e: hyper::Error, connection: Option<hyper::Error>) -> TransportError {
        #[cfg(feature = "tls")]
        for candidate in connection.iter().chain([&e]) {
            if let Some(refused) = crate::tls::refused_identity(&self.target.authority, candidate) {
                tracing::warn!("{}", crate::Report(&refused));
                return refused;
            }
        }
        TransportError::io(&self.target.authority, connection.unwrap_or(e))
    }

    /// A permit to use a connection, in about the order asked for. async-lock's semaphore lets
    /// a task that gives its permit back and asks again at once (a busy driver) take it before
    /// a waiter that was woken for it: `load 64 5 v1` over the default 32 connections had 32
    /// clients wait out their whole 5 s timeout. Only the holder of `turns` waits for a
    /// permit, and async-lock's mutex goes to a waiter starved for over 0.5 ms.
    async fn permit(&self) -> async_lock::SemaphoreGuardArc {
        let _turn = self.turns.lock().await;
        self.permits.acquire_arc().await
    }

    fn idle_conns(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection that is still open. Nothing polls an idle connection, so a server
    /// that closed it (restart, idle timeout) is only noticed by polling it once here; sending
    /// on it instead would fail a request that a fresh connection would have carried. Over TLS
    /// the poll reads the peer's close_notify or EOF the same way.
    async fn take_idle(&self) -> Option<Conn> {
        loop {
            let mut c = self.idle_conns().pop()?;
            if c.sender.is_closed() {
                continue;
            }
            // A finished connection future means the peer closed it (or it broke).
            if future::poll_once(c.conn.as_mut()).await.is_some() || c.sender.is_closed() {
                continue;
            }
            return Some(c);
        }
    }

    /// The addresses to try: the URL's IP address, or what the resolver says of its name.
    async fn resolve(&self) -> Result<Vec<SocketAddr>, TransportError> {
        let connect_error = |e: io::Error| TransportError::Connect {
            addr: self.target.authority.clone(),
            source: Arc::new(e),
        };
        if let Ok(ip) = self.target.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, self.target.port)]);
        }
        let (resolver, authority) = (self.resolver.clone(), self.target.authority.clone());
        let addrs = blocking::unblock(move || resolver(&authority)).await.map_err(connect_error)?;
        match addrs.is_empty() {
            true => Err(connect_error(io::Error::new(io::ErrorKind::NotFound, "the name has no addresses"))),
            false => Ok(addrs),
        }
    }

    async fn connect(&self) -> Result<Conn, TransportError> {
        let mut last = None;
        for addr in self.resolve().await? {
            match Async::<TcpStream>::connect(addr).await {
                Ok(stream) => {
                    let _ = stream.get_ref().set_nodelay(true);
                    let stream = self.secure(stream).await?;
                    let (sender, conn) = hyper::client::conn::http1::handshake(FuturesIo::new(stream))
                        .await
                        .map_err(|e| TransportError::io(&self.target.authority, e))?;
                    return Ok(Conn { sender, conn: Box::pin(conn) });
                }
                Err(e) => last = Some(e),
            }
        }
        let source = last.unwrap_or_else(|| io::Error::other("no address to connect to"));
        Err(TransportError::Connect { addr: self.target.authority.clone(), source: Arc::new(source) })
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

#[cfg(test)]
mod tests {
    use super::*;

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
