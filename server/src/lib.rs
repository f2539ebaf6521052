#![doc = include_str!("../README.md")]

mod http;
mod metrics;
mod store;
#[cfg(feature = "tls")]
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use leasehold_core::authority::Limits;
use smol_hyper::rt::FuturesIo;

pub use http::MAX_BODY;
pub use store::StoreError;
#[cfg(feature = "tls")]
pub use tls::ServerTls;

/// How to run a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Directory of the store; created if missing.
    pub data_dir: PathBuf,
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// When set, every request but `/healthz` needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// The ttls granted.
    pub limits: Limits,
    /// How long a client may take to send a request's head, and then its body; a connection
    /// that stalls longer is closed (head) or answered `malformed_json` (body). 30 s by default.
    /// It bounds the TLS handshake too.
    pub request_timeout: std::time::Duration,
    /// Serve https instead of http.
    #[cfg(feature = "tls")]
    pub tls: Option<ServerTls>,
}

impl ServerConfig {
    /// A config for `data_dir` on `listen`, no token, default limits.
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        ServerConfig {
            data_dir: data_dir.into(),
            listen,
            token: None,
            limits: Limits::default(),
            request_timeout: std::time::Duration::from_secs(30),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The TLS certificate, key or client CA cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
}

/// The authority's clock: microseconds since the process started. It restarts with the
/// process, which is why grants are re-armed on start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock(std::time::Instant);

impl Clock {
    pub(crate) fn now(&self) -> leasehold_core::Instant {
        leasehold_core::Instant::from_micros(self.0.elapsed().as_micros() as u64)
    }
}

pub(crate) struct Shared {
    store: store::Store,
    clock: Clock,
    token: Option<String>,
    request_timeout: std::time::Duration,
    metrics: metrics::Metrics,
}

/// A bound, recovered server, ready to [`run`](Server::run).
pub struct Server {
    listener: async_net::TcpListener,
    #[cfg(feature = "tls")]
    tls: Option<ServerTls>,
    shared: Arc<Shared>,
    writer: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl Server {
    /// Opens the store (re-arming every stored grant from now) and binds the listener.
    pub async fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        let clock = Clock(std::time::Instant::now());
        let (store, writer) = store::Store::open(&config.data_dir, clock, config.limits)?;
        let listener = async_net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
        let shared = Arc::new(Shared {
            store,
            clock,
            token: config.token,
            request_timeout: config.request_timeout,
            metrics: Default::default(),
        });
        Ok(Server {
            listener,
            #[cfg(feature = "tls")]
            tls: config.tls,
            shared,
            writer: Box::pin(writer),
        })
    }

    /// `http://ADDR`, or `https://ADDR` when serving TLS.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.local_addr())
    }

    fn scheme(&self) -> &'static str {
        #[cfg(feature = "tls")]
        if self.tls.is_some() {
            return "https";
        }
        "http"
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serves until this future is dropped; dropping it closes every connection and the store.
    /// Works on any executor: connections run on a local executor driven by this future, and
    /// store I/O on a blocking thread pool.
    pub async fn run(self) {
        #[cfg(feature = "tls")]
        let Server { listener, tls, shared, writer } = self;
        #[cfg(not(feature = "tls"))]
        let Server { listener, shared, writer } = self;
        let ex = smol::LocalExecutor::new();
        ex.spawn(writer).detach();
        ex.run(async {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        async_io::Timer::after(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                #[cfg(feature = "tls")]
                if let Some(tls) = &tls {
                    let acceptor = tls.acceptor.clone();
                    ex.spawn(async move {
                        // A client that never finishes its handshake cannot pin a connection.
                        let timeout = shared.request_timeout;
                        let handshake =
                            futures_lite::future::or(async { Some(acceptor.accept(stream).await) }, async {
                                async_io::Timer::after(timeout).await;
                                None
                            });
                        let why = match handshake.await {
                            Some(Ok(stream)) => return serve_connection(stream, shared, peer).await,
                            Some(Err(e)) => e.to_string(),
                            None => "timed out".to_string(),
                        };
                        shared.metrics.tls_failure();
                        tracing::debug!("TLS handshake with {peer} failed: {why}");
                    })
                    .detach();
                    continue;
                }
                ex.spawn(serve_connection(stream, shared, peer)).detach();
            }
        })
        .await
    }

    /// Runs a server on a thread of its own until the returned handle is dropped. For tests and
    /// embedding; the `leasehold serve` command runs [`Server::run`] directly.
    pub fn spawn(config: ServerConfig) -> Result<RunningServer, ServerError> {
        let server = smol::block_on(Server::bind(config))?;
        let (addr, url) = (server.local_addr(), server.url());
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let thread = std::thread::spawn(move || {
            smol::block_on(futures_lite::future::or(server.run(), async {
                let _ = stopped.recv().await;
            }))
        });
        Ok(RunningServer { addr, url, stop, thread: Some(thread) })
    }
}

/// A server running on its own thread; dropping it stops the server and closes its store.
pub struct RunningServer {
    addr: SocketAddr,
    url: String,
    stop: async_channel::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningServer {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, or `https://ADDR` when serving TLS.
    pub fn url(&self) -> String {
        self.url.clone()
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.stop.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves HTTP/1.1 on one connection, plain or TLS, until the client closes it.
async fn serve_connection<S>(stream: S, shared: Arc<Shared>, peer: SocketAddr)
where
    S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin + Send + 'static,
{
    let head_timeout = shared.request_timeout;
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, std::convert::Infallible>(http::handle(shared, req).await) }
    });
    // A client that opens a connection and dribbles (or never sends) its request head cannot
    // pin it.
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(smol_hyper::rt::SmolTimer::new())
        .header_read_timeout(head_timeout)
        .keep_alive(true)
        .serve_connection(FuturesIo::new(stream), service)
        .await
    {
        tracing::debug!("connection from {peer}: {e}");
    }
}
