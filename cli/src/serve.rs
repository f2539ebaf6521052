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
    /// Longest ttl granted.
    #[arg(long, default_value = "1day", value_parser = crate::duration)]
    max_ttl: Duration,
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
