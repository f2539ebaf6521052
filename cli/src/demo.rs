//! `leasehold demo`: a local server, contending worker processes, a fenced resource, a
//! SIGKILL of the holder, and a verdict.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leasehold_http::{BuiltinBackend, Client, Options};
use leasehold_server::{Server, ServerConfig};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Number of contending workers.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Lease ttl.
    #[arg(long, default_value = "2s", value_parser = crate::duration)]
    ttl: Duration,
    /// How long the demo runs.
    #[arg(long, default_value = "12s", value_parser = crate::duration)]
    duration: Duration,
    /// When to SIGKILL the worker holding the lease (the first seen mid-hold from then on).
    #[arg(long, default_value = "5s", value_parser = crate::duration)]
    kill_after: Duration,
}

#[derive(clap::Args)]
pub(crate) struct WorkerArgs {
    #[arg(long)]
    server: String,
    #[arg(long)]
    key: String,
    #[arg(long)]
    name: String,
    #[arg(long)]
    resource: SocketAddr,
    #[arg(long, value_parser = crate::duration)]
    ttl: Duration,
}

const DRIFT_PPM: u32 = 10_000;

/// What the shared resource saw.
#[derive(Default)]
struct Resource {
    highest: u64,
    /// (time, fence, worker) of every accepted write.
    accepted: Vec<(Duration, u64, String)>,
    /// Writes refused because a higher fence had already written.
    stale: Vec<(Duration, u64, String)>,
}

/// Serves `WRITE <fence> <worker> <seq>` lines: accepted unless a higher fence already wrote.
fn serve_resource(listener: TcpListener, state: Arc<Mutex<Resource>>, start: Instant) {
    for conn in listener.incoming().flatten() {
        let state = state.clone();
        std::thread::spawn(move || {
            let Ok(mut out) = conn.try_clone() else {
                return;
            };
            for line in BufReader::new(conn).lines().map_while(Result::ok) {
                let parts: Vec<&str> = line.split_whitespace().collect();
                let (Some(&"WRITE"), Some(Ok(fence)), Some(worker)) =
                    (parts.first(), parts.get(1).map(|f| f.parse::<u64>()), parts.get(2))
                else {
                    let _ = writeln!(out, "ERR malformed");
                    continue;
                };
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                let t = start.elapsed();
                let answer = if fence >= s.highest {
                    s.highest = fence;
                    s.accepted.push((t, fence, worker.to_string()));
                    "OK".to_string()
                } else {
                    s.stale.push((t, fence, worker.to_string()));
                    format!("STALE {}", s.highest)
                };
                drop(s);
                let _ = writeln!(out, "{answer}");
            }
        });
    }
}

struct Line {
    t: Duration,
    who: String,
    text: String,
}

pub(crate) fn main(args: Args) -> ExitCode {
    match demo(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("leasehold demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    let start = Instant::now();
    let dir = tempfile::tempdir()?;
    let server = Server::spawn(ServerConfig::new(dir.path(), "127.0.0.1:0".parse()?))?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let resource_addr = listener.local_addr()?;
    let resource = Arc::new(Mutex::new(Resource::default()));
    {
        let resource = resource.clone();
        std::thread::spawn(move || serve_resource(listener, resource, start));
    }
    let ttl = args.ttl;
    let bound = ttl.mul_f64(1.0 + DRIFT_PPM as f64 / 1e6);
    println!(
        "leasehold demo: server {} (store {}), key \"demo\", ttl {:?}, ε {}%, {} workers",
        server.url(),
        dir.path().display(),
        ttl,
        DRIFT_PPM as f64 / 1e4,
        args.workers
    );
    println!(
        "each worker: acquire, write to a shared resource with its fence ~every 150 ms, release, repeat"
    );
    println!("the resource refuses any write whose fence is lower than one it has seen\n");

    let lines: Arc<Mutex<Vec<Line>>> = Arc::new(Mutex::new(Vec::new()));
    let exe = std::env::current_exe()?;
    let mut workers: Vec<(String, Child)> = Vec::new();
    for i in 1..=args.workers {
        let name = format!("w{i}");
        let mut child = std::process::Command::new(&exe)
            .args(["demo-worker", "--server", &server.url(), "--key", "demo", "--name", &name])
            .args(["--resource", &resource_addr.to_string(), "--ttl", &format!("{}ms", ttl.as_millis())])
            .stdout(Stdio::piped())
            .spawn()?;
        let out = child.stdout.take().ok_or("no worker stdout")?;
        let (lines, who) = (lines.clone(), name.clone());
        std::thread::spawn(move || {
            for text in BufReader::new(out).lines().map_while(Result::ok) {
                let t = start.elapsed();
                println!("  t={:>7.3}s  {who}  {text}", t.as_secs_f64());
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(Line { t, who: who.clone(), text });
            }
        });
        workers.push((name, child));
    }

    std::thread::sleep(args.kill_after.saturating_sub(start.elapsed()));
    // The victim must be mid-hold: its newest line says it acquired a fence (not yet released)
    // and the resource has accepted a write under that fence. Whoever wrote last may already
    // have released, and killing it would measure nothing.
    let victim = loop {
        let holder = {
            let lines = lines.lock().unwrap_or_else(|p| p.into_inner());
            let res = resource.lock().unwrap_or_else(|p| p.into_inner());
            workers.iter().find_map(|(name, _)| {
                let last = lines.iter().rev().find(|l| l.who == *name)?;
                let fence: u64 = last.text.strip_prefix("acquired fence ")?.parse().ok()?;
                res.accepted.iter().any(|(_, f, _)| *f == fence).then(|| (name.clone(), fence))
            })
        };
        if holder.is_some() || start.elapsed() >= args.duration {
            break holder;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut killed: Option<(Duration, String, u64)> = None;
    if let Some((name, fence)) = victim {
        if let Some((_, child)) = workers.iter_mut().find(|(n, _)| *n == name) {
            let _ = child.kill(); // SIGKILL: no release, no goodbye
            let _ = child.wait();
            let t = start.elapsed();
            println!("  t={:>7.3}s  --  kill -9 {name} while it holds fence {fence}", t.as_secs_f64());
            killed = Some((t, name, fence));
        }
    }
    std::thread::sleep(args.duration.saturating_sub(start.elapsed()));
    for (_, child) in workers.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(server);

    // ----- analysis -----
    let res = resource.lock().unwrap_or_else(|p| p.into_inner());
    let lines = lines.lock().unwrap_or_else(|p| p.into_inner());
    let mut spans: Vec<(u64, String, Duration, Duration, usize)> = Vec::new();
    for (t, f, w) in &res.accepted {
        match spans.last_mut() {
            Some(s) if s.0 == *f => {
                s.3 = *t;
                s.4 += 1;
            }
            _ => spans.push((*f, w.clone(), *t, *t, 1)),
        }
    }
    println!("\nwho held which fence when (from the resource's accepted writes):");
    for (f, w, a, b, n) in &spans {
        println!("  fence {f:>3}  {w}  {:>7.3}s – {:>7.3}s  {n} writes", a.as_secs_f64(), b.as_secs_f64());
    }
    let mut fences: Vec<u64> = spans.iter().map(|s| s.0).collect();
    let interleaved = fences.windows(2).filter(|w| w[1] <= w[0]).count();
    fences.dedup();
    let failover = killed.as_ref().and_then(|(t_kill, victim, _)| {
        lines
            .iter()
            .find(|l| l.t > *t_kill && l.who != *victim && l.text.starts_with("acquired"))
            .map(|l| l.t - *t_kill)
    });
    // Recounted from the log rather than trusted to the resource's own check.
    let stale_accepted = res
        .accepted
        .iter()
        .scan(0, |highest, (_, f, _)| {
            let stale = *f < *highest;
            *highest = (*highest).max(*f);
            Some(stale)
        })
        .filter(|&stale| stale)
        .count();
    let mut ok = interleaved == 0 && stale_accepted == 0 && res.stale.is_empty() && !spans.is_empty();
    println!();
    match (&killed, failover) {
        (Some(_), Some(f)) => {
            let ratio = f.as_secs_f64() / bound.as_secs_f64();
            println!(
                "failover after kill -9: {:.3}s; bound ttl·(1+ε) = {:.3}s; ratio {ratio:.2}",
                f.as_secs_f64(),
                bound.as_secs_f64()
            );
            // The bound plus one retry's jitter (backoff_min = ttl/64) and scheduling slack.
            ok &= f <= bound + ttl / 64 + Duration::from_millis(100);
        }
        (Some(_), None) => {
            println!("failover after kill -9: nobody acquired the lease afterwards");
            ok = false;
        }
        (None, _) => println!("nobody held the lease at the kill time; no failover measured"),
    }
    println!(
        "VERDICT: {} — {} grants, {} fenced writes, {} interleaved holders, {} stale writes accepted, {} stale writes refused",
        if ok { "PASS" } else { "FAIL" },
        fences.len(),
        res.accepted.len(),
        interleaved,
        stale_accepted,
        res.stale.len()
    );
    Ok(ok)
}

/// One worker: acquire, write with the fence while the lease is valid, release, repeat.
pub(crate) fn worker(args: WorkerArgs) -> ExitCode {
    let say = |s: String| {
        println!("{s}");
        let _ = std::io::stdout().flush();
    };
    let mut options = Options::new(args.ttl);
    options.config.drift = leasehold_core::Drift::from_ppm(DRIFT_PPM);
    let backend = match BuiltinBackend::new(&args.server, None, options.config.request_timeout.into()) {
        Ok(b) => b,
        Err(e) => {
            say(format!("error: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let Ok(client) = Client::new(backend, options) else {
        return ExitCode::FAILURE;
    };
    let Ok(conn) = TcpStream::connect(args.resource) else {
        say("error: resource unreachable".into());
        return ExitCode::FAILURE;
    };
    let Ok(write_half) = conn.try_clone() else {
        return ExitCode::FAILURE;
    };
    let mut out = write_half;
    let mut answers = BufReader::new(conn).lines();
    smol::block_on(async {
        loop {
            say("waiting".into());
            let lease = match client.acquire(&args.key).await {
                Ok(l) => l,
                Err(e) => {
                    say(format!("error: {e}"));
                    async_io::Timer::after(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let fence = lease.fence().map_or(0, |f| f.0);
            say(format!("acquired fence {fence}"));
            let writes = 6 + fastrand_u64() % 10;
            let mut lost = false;
            for seq in 0..writes {
                // Act only with time to spare; the fence protects the resource regardless.
                if lease.remaining().is_none_or(|r| r < Duration::from_millis(300)) {
                    lost = true;
                    break;
                }
                let _ = writeln!(out, "WRITE {fence} {} {seq}", args.name);
                match answers.next() {
                    Some(Ok(a)) if a == "OK" => {}
                    Some(Ok(a)) => say(format!("write refused: {a}")),
                    _ => return ExitCode::FAILURE,
                }
                async_io::Timer::after(Duration::from_millis(150)).await;
            }
            if lost {
                say(format!("lost fence {fence}: {:?}", lease.health()));
            } else {
                match lease.release().await {
                    Ok(()) => say(format!("released fence {fence}")),
                    Err(e) => say(format!("release of fence {fence}: {e}")),
                }
            }
            async_io::Timer::after(Duration::from_millis(50 + fastrand_u64() % 250)).await;
        }
    })
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}
