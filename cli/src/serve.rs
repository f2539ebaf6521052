//! `leasehold serve`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use leasehold_core::authority::Limits;
use leasehold_server::{Server, ServerConfig};

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
}

pub(crate) fn main(args: Args) -> ExitCode {
    let mut config = ServerConfig::new(args.data, args.listen);
    config.token = args.token;
    config.limits = Limits { min_ttl: args.min_ttl.into(), max_ttl: args.max_ttl.into() };
    smol::block_on(async {
        let server = match Server::bind(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("leasehold serve: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("listening on http://{}", server.local_addr());
        let _ = std::io::stdout().flush();
        server.run().await;
        ExitCode::SUCCESS
    })
}
