//! Many leases in one client (issue 10, "Figures"): N leases (10,000 by default) in one
//! `SessionClient` against the built-in server in another process, ttl 15 s, then a steady
//! state of S seconds (60 by default). Prints the requests/s the server handled, the client's
//! TCP connections, RSS and CPU over the steady state.
//!
//! ```sh
//! cargo run --release -p leasehold-http --example many_leases [-- LEASES SECONDS]
//! ```
//!
//! The server is this same binary re-run with `--serve DIR`, so that the client's RSS and CPU
//! are its own.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use leasehold_http::{BuiltinSessions, Options, SessionClient};

/// The session counters at the server's `/metrics`, summed: every request it handled.
fn server_requests(addr: &str) -> u64 {
    let mut s = std::net::TcpStream::connect(addr).expect("server");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    ["opens", "keepalives", "acquires", "releases", "closes"]
        .iter()
        .map(|what| {
            let name = format!("leasehold_session_{what}_total ");
            text.lines().find_map(|l| l.strip_prefix(&name)?.trim().parse::<u64>().ok()).unwrap_or(0)
        })
        .sum()
}

/// This process's user+system CPU time, from /proc/self/stat (clock ticks of 10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

/// TCP sockets this process has open.
fn sockets() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count()
}

fn serve(dir: &str) {
    let config = leasehold_server::ServerConfig::new(dir, "127.0.0.1:0".parse().unwrap());
    let server = smol::block_on(leasehold_server::Server::bind(config)).expect("server starts");
    println!("listening on {}", server.local_addr());
    std::io::stdout().flush().unwrap();
    smol::block_on(server.run());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        return serve(&args[2]);
    }
    let leases: usize = args.get(1).map(|s| s.parse().expect("LEASES")).unwrap_or(10_000);
    let seconds: u64 = args.get(2).map(|s| s.parse().expect("SECONDS")).unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();
    let mut server = Command::new(std::env::current_exe().unwrap())
        .arg("--serve")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the server");
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").expect("listening line").to_string();

    let ttl = Duration::from_secs(15);
    let options = Options::session(ttl);
    let backend =
        BuiltinSessions::new(&format!("http://{addr}"), None, options.config.request_timeout.into()).unwrap();
    let client = SessionClient::new(backend, "many-leases", options).unwrap();
    let started = Instant::now();
    let held = smol::block_on(async {
        let tasks: Vec<_> = (0..leases)
            .map(|i| {
                let c = client.clone();
                smol::spawn(async move { c.acquire(&format!("lease-{i}")).await.expect("acquired") })
            })
            .collect();
        let mut held = Vec::with_capacity(leases);
        for t in tasks {
            held.push(t.await);
        }
        held
    });
    println!(
        "{leases} leases acquired in {:.1} s ({} requests to the server)",
        started.elapsed().as_secs_f64(),
        server_requests(&addr)
    );

    let (r0, c0, t0) = (server_requests(&addr), cpu_time(), Instant::now());
    let mut peak_sockets = sockets();
    while t0.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(500));
        peak_sockets = peak_sockets.max(sockets());
    }
    let (r1, c1, wall) = (server_requests(&addr), cpu_time(), t0.elapsed());
    if std::env::var_os("DEBUG_METRICS").is_some() {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.lines().filter(|l| l.starts_with("leasehold_session")).for_each(|l| eprintln!("{l}"));
    }
    let healthy = held.iter().filter(|l| l.is_healthy()).count();
    println!("steady state {:.0} s, ttl {} s, one SessionClient:", wall.as_secs_f64(), ttl.as_secs());
    println!("  requests to the server: {} ({:.2}/s)", r1 - r0, (r1 - r0) as f64 / wall.as_secs_f64());
    println!("  client TCP sockets: at most {peak_sockets}");
    println!("  client RSS: {:.1} MiB", rss_mib());
    println!(
        "  client CPU: {:.2} s = {:.2}% of a core",
        (c1 - c0).as_secs_f64(),
        100.0 * (c1 - c0).as_secs_f64() / wall.as_secs_f64()
    );
    println!("  leases healthy at the end: {healthy} of {leases}");
    smol::block_on(client.close());
    let _ = server.kill();
    let _ = server.wait();
}
