//! `leasehold serve`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use leasehold_core::authority::Limits;
use leasehold_server::{Server, ServerConfig, ServerTls};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Directory of the durable store (created if missing).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Address to listen on; port 0 picks a free one (the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// Require `Authorization: Bearer <TOKEN>` on every request but /healthz.
    #[arg(long, env = "LEASEHOLD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Shortest ttl granted.
    #[arg(long, default_value = "10ms", value_parser = crate::duration)]
    min_ttl: Duration,
    /// Longest ttl granted (at most one day). A restart re-arms every stored grant for its
    /// full ttl, so this also bounds how long a restart can keep an abandoned key locked.
    #[arg(long, default_value = "5m", value_parser = crate::duration)]
    max_ttl: Duration,
    /// Most connections served at once; past it the longest-idle connection is closed.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Most bytes of a request head; a longer head is answered 431 and its connection closed.
    #[arg(long, default_value_t = 16 * 1024, value_name = "BYTES")]
    max_header_bytes: usize,
    /// Threads that serve connections (HTTP and JSON); one if not given. Each log
    /// is written by one writer whatever this is.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Delete the records of keys free this long (fences stay safe: a reclaimed key's next
    /// fence is above every fence it had), and compact the store.
    #[arg(long, default_value = "1h", value_parser = crate::duration)]
    reclaim_after: Duration,
    /// Serve https with the certificate chain in this PEM file (leaf first).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `--tls-cert`.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// With https: accept only clients presenting a certificate signed by a CA in this PEM
    /// file (mutual TLS).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
}

pub(crate) fn main(args: Args) -> ExitCode {
    let mut config = ServerConfig::new(args.data, args.listen);
    config.token = args.token;
    config.limits =
        Limits { min_ttl: args.min_ttl.into(), max_ttl: args.max_ttl.into(), ..Limits::default() };
    config.max_connections = args.max_connections;
    config.max_header_bytes = args.max_header_bytes;
    config.reclaim_after = Some(args.reclaim_after);
    if let Some(n) = args.threads {
        config.threads = n;
    }
    // Refused before anything is opened or bound: a server that cannot grant is worse than
    // none, because it looks alive.
    if let Err(e) = config.validate() {
        eprintln!("leasehold serve: {e}");
        return ExitCode::from(2);
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        match ServerTls::from_pem_files(cert, key, args.client_ca.as_deref()) {
            Ok(tls) => config.tls = Some(tls),
            Err(e) => {
                eprintln!("leasehold serve: {e}");
                return ExitCode::from(2);
            }
        }
    }
    smol::block_on(async {
        let server = match Server::bind(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("leasehold serve: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("listening on {}", server.url());
        let _ = std::io::stdout().flush();
        server.run().await;
        ExitCode::SUCCESS
    })
}
