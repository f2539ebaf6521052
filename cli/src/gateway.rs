//! `leasehold gateway`: devices on serial links, a lease backend on the network.
//!
//! The gateway only forwards. It never holds a lease for a device: each device's validity is
//! anchored at the device's own send time, so a slow gateway can only shorten a lease.

use std::fs::OpenOptions;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use async_io::Async;
use futures_lite::{AsyncRead, AsyncWrite};
use leasehold_core::{Reply, Response};
use leasehold_http::{Backend, BuiltinBackend};
use leasehold_serial::host::{response_to, version_mismatch, AsyncHostLink};
use leasehold_serial::{Body, DecodeError};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// A device link: a serial device path (e.g. /dev/ttyUSB0, configured with stty) or
    /// tcp:HOST:PORT (e.g. an emulator's UART). Repeat for several links.
    #[arg(long = "link", required = true, value_name = "PATH|tcp:HOST:PORT")]
    links: Vec<String>,
    /// The lease server.
    #[arg(long, env = "LEASEHOLD_SERVER", default_value = "http://127.0.0.1:7878")]
    server: String,
    /// Bearer token, if the server requires one.
    #[arg(long, env = "LEASEHOLD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    tls: crate::TlsArgs,
    /// Per-request timeout towards the server.
    #[arg(long, default_value = "2s", value_parser = crate::duration)]
    timeout: Duration,
    /// Stop after this many reconnect failures in a row on every link (default: never).
    #[arg(long)]
    give_up_after: Option<u32>,
}

pub(crate) fn main(args: Args) -> ExitCode {
    let backend = match args.tls.config().and_then(|tls| {
        BuiltinBackend::new(&args.server, args.token.clone(), args.timeout)
            .map(|b| b.with_tls(tls))
            .map_err(|e| e.to_string())
    }) {
        Ok(b) => Arc::new(b),
        Err(e) => {
            eprintln!("leasehold gateway: {e}");
            return ExitCode::from(2);
        }
    };
    smol::block_on(async {
        let tasks: Vec<_> = args
            .links
            .iter()
            .map(|l| smol::spawn(serve_link(l.clone(), backend.clone(), args.give_up_after)))
            .collect();
        for t in tasks {
            t.await;
        }
    });
    ExitCode::FAILURE
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn open(link: &str) -> std::io::Result<Box<dyn Stream>> {
    if let Some(addr) = link.strip_prefix("tcp:") {
        let s = async_net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        return Ok(Box::new(s));
    }
    let file = OpenOptions::new().read(true).write(true).open(link)?;
    Ok(Box::new(Async::new(file)?))
}

/// Keeps one link connected and forwards its frames, forever (or until `give_up_after`).
async fn serve_link<B: Backend>(link: String, backend: Arc<B>, give_up_after: Option<u32>) {
    let mut failures = 0u32;
    loop {
        let stream = match open(&link).await {
            Ok(s) => {
                failures = 0;
                eprintln!("leasehold gateway: link {link} connected");
                s
            }
            Err(e) => {
                failures += 1;
                if give_up_after.is_some_and(|n| failures >= n) {
                    eprintln!("leasehold gateway: link {link}: {e}; giving up");
                    return;
                }
                tracing::warn!("link {link}: {e}; retrying");
                async_io::Timer::after(Duration::from_millis(250)).await;
                continue;
            }
        };
        match forward(&mut AsyncHostLink::new(stream), &*backend).await {
            Ok(()) => eprintln!("leasehold gateway: link {link} closed; reconnecting"),
            Err(e) => eprintln!("leasehold gateway: link {link}: {e}; reconnecting"),
        }
        async_io::Timer::after(Duration::from_millis(100)).await;
    }
}

async fn forward<S: Stream, B: Backend>(link: &mut AsyncHostLink<S>, backend: &B) -> std::io::Result<()> {
    while let Some(frame) = link.read_frame().await? {
        match frame {
            Ok(f) => {
                let Body::Request { key, request } = f.body else {
                    tracing::debug!("ignoring a non-request frame from device {}", f.header.device);
                    continue;
                };
                // A request that cannot be forwarded is answered "unavailable": the device's
                // machine backs off and retries, exactly as after a lost reply. Permanent
                // errors too: they are the gateway's configuration, fixable while devices keep
                // trying, and a rejection would make every device give up.
                let reply = backend.call(&key, request).await.unwrap_or_else(|e| {
                    tracing::warn!("device {}: {e}", f.header.device);
                    Reply::Unavailable
                });
                let response = Response { id: request.id, owner: request.owner, reply };
                link.write_frame(&response_to(&f.header, response)).await?;
            }
            Err(DecodeError::WrongVersion(h)) => {
                tracing::warn!("device {} speaks protocol version {}", h.device, h.version);
                link.write_frame(&version_mismatch(&h)).await?;
            }
            Err(e) => tracing::debug!("bad frame: {e:?} (stats {:?})", link.stats()),
        }
    }
    Ok(())
}
