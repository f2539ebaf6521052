//! The `leasehold` command.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod demo;
mod gateway;
mod run;
mod serve;
mod status;

/// Distributed leases: only one of us at a time, with fences to prove who held it when.
#[derive(Parser)]
#[command(name = "leasehold", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the built-in lease server on an embedded, durable store.
    Serve(serve::Args),
    /// Show who holds a key (or every key).
    Status(status::Args),
    /// Hold a lease while a command runs; stop the command if the lease is lost.
    Run(run::Args),
    /// Start a local server and three contending workers; print a timeline and a verdict.
    Demo(demo::Args),
    /// Forward lease requests from serial-linked devices to a lease server.
    Gateway(gateway::Args),
    /// One demo worker (started by `demo`).
    #[command(hide = true)]
    DemoWorker(demo::WorkerArgs),
}

/// Parses `15s`, `500ms`, `2m`.
pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (examples: 15s, 500ms, 2m)"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LEASEHOLD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(a) => serve::main(a),
        Command::Status(a) => status::main(a),
        Command::Run(a) => run::main(a),
        Command::Demo(a) => demo::main(a),
        Command::Gateway(a) => gateway::main(a),
        Command::DemoWorker(a) => demo::worker(a),
    }
}

/// The TLS settings for `https://` servers: Mozilla's roots, plus `ca_file` if given.
pub(crate) fn tls(ca_file: Option<&std::path::Path>) -> Result<leasehold_http::TlsConfig, String> {
    let tls = leasehold_http::TlsConfig::new();
    match ca_file {
        Some(path) => tls.add_ca_file(path).map_err(|e| e.to_string()),
        None => Ok(tls),
    }
}
