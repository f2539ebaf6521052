//! The `leasehold` command.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod demo;
mod gateway;
mod observe;
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
    /// Hold a lease while a command runs (waiters queue FIFO); stop the command if the lease is lost.
    Run(run::Args),
    /// Print a key's holder and each change of it (protocol v2, no polling).
    Observe(observe::Args),
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
        // Colour codes only for a person at a terminal, never into a log file or a pipe.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Serve(a) => serve::main(a),
        Command::Status(a) => status::main(a),
        Command::Run(a) => run::main(a),
        Command::Observe(a) => observe::main(a),
        Command::Demo(a) => demo::main(a),
        Command::Gateway(a) => gateway::main(a),
        Command::DemoWorker(a) => demo::worker(a),
    }
}

/// TLS settings for an `https://` server, shared by every command that talks to one.
#[derive(clap::Args)]
pub(crate) struct TlsArgs {
    /// Also trust the CA certificate(s) in this PEM file for an `https://` server (Mozilla's
    /// roots are always trusted).
    #[arg(long, env = "LEASEHOLD_CA_FILE", value_name = "PEM")]
    ca_file: Option<std::path::PathBuf>,
    /// Present the client certificate (chain) in this PEM file to a server that requires one,
    /// such as etcd with `--client-cert-auth`.
    #[arg(long, env = "LEASEHOLD_CLIENT_CERT", value_name = "PEM", requires = "client_key")]
    client_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of `--client-cert`.
    #[arg(long, env = "LEASEHOLD_CLIENT_KEY", value_name = "PEM", requires = "client_cert")]
    client_key: Option<std::path::PathBuf>,
}

impl TlsArgs {
    /// Mozilla's roots, plus the CA file and the client certificate if given; any file that
    /// cannot be used is an error here, before anything runs.
    pub(crate) fn config(&self) -> Result<leasehold_http::TlsConfig, String> {
        let mut tls = leasehold_http::TlsConfig::new();
        if let Some(path) = &self.ca_file {
            tls = tls.add_ca_file(path).map_err(|e| e.to_string())?;
        }
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            tls = tls.with_client_cert_files(cert, key).map_err(|e| e.to_string())?;
        }
        Ok(tls)
    }
}
