//! `leasehold status`.

use std::process::ExitCode;
use std::time::Duration;

use leasehold_http::HttpClient;
use serde_json::Value;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The key to show; every key when omitted.
    key: Option<String>,
    /// The lease server.
    #[arg(long, env = "LEASEHOLD_SERVER", default_value = "http://127.0.0.1:7878")]
    server: String,
    /// Bearer token, if the server requires one.
    #[arg(long, env = "LEASEHOLD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    tls: crate::TlsArgs,
}

pub(crate) fn main(args: Args) -> ExitCode {
    let client = match args.tls.config().and_then(|tls| {
        HttpClient::new(&args.server, Duration::from_secs(5))
            .map(|c| c.with_tls(tls))
            .map_err(|e| e.to_string())
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("leasehold status: {e}");
            return ExitCode::from(2);
        }
    };
    let path = match &args.key {
        Some(k) => format!("/v1/leases/{k}"),
        None => "/v1/leases".to_string(),
    };
    let mut req = client.request(hyper::Method::GET, &path);
    if let Some(t) = &args.token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let Ok(req) = req.body(http_body_util::Full::new(hyper::body::Bytes::new())) else {
        eprintln!("leasehold status: cannot build a request for {path:?}");
        return ExitCode::from(2);
    };
    let resp = match smol::block_on(client.send(req)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("leasehold status: server {} unreachable: {e}", args.server);
            return ExitCode::from(2);
        }
    };
    let body: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    if resp.status != 200 {
        let msg = body["message"].as_str().unwrap_or("unexpected answer");
        eprintln!("leasehold status: {msg}");
        return ExitCode::from(1);
    }
    let rows: Vec<Value> = match body.get("leases") {
        Some(Value::Array(a)) => a.clone(),
        _ => vec![body],
    };
    println!("{:<32} {:>8} {:>20} {:>12}", "KEY", "FENCE", "HOLDER", "REMAINING");
    for r in rows {
        let key = r["key"].as_str().unwrap_or("?");
        match r.get("holder") {
            Some(h) if h.is_object() => println!(
                "{:<32} {:>8} {:>20} {:>11.1}s",
                key,
                h["fence"].as_u64().unwrap_or(0),
                h["owner"].as_u64().unwrap_or(0).to_string(),
                h["remaining"].as_u64().unwrap_or(0) as f64 / 1e6
            ),
            _ => println!(
                "{:<32} {:>8} {:>20} {:>12}",
                key,
                r["last_fence"].as_u64().unwrap_or(0),
                "-",
                "free"
            ),
        }
    }
    ExitCode::SUCCESS
}
