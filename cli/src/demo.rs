//! `leasehold demo`: a local server, contending worker processes, a shared resource that
//! logs every write attempted on it, a SIGKILL of one holder, a SIGSTOP of another past its
//! ttl, and an analysis of the log that applies the fence check and gives a verdict.
//!
//! The workers hold the key in protocol-v2 sessions by default (FIFO waiting, grants pushed
//! at a release or an expiry), or in v1 leases (`--protocol v1`: each waiter polls). The
//! timeline then also shows each hand-off after a release and whether the grant went to the
//! worker that had waited longest.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ExitCode, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use leasehold_core::resource::HighWater;
use leasehold_core::{Fence, OwnerId};
use leasehold_http::{AcquireError, BuiltinBackend, BuiltinSessions, Client, Lease, Options, SessionClient};
use leasehold_server::{Server, ServerConfig};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::run::Protocol;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Number of contending workers (three or more for both the kill and the stop).
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Lease ttl.
    #[arg(long, default_value = "2s", value_parser = crate::duration)]
    ttl: Duration,
    /// How long the demo runs (longer if the stopped worker's write is still to come).
    #[arg(long, default_value = "12s", value_parser = crate::duration)]
    duration: Duration,
    /// When to SIGKILL the worker holding the lease (the first seen mid-hold from then on).
    #[arg(long, default_value = "5s", value_parser = crate::duration)]
    kill_after: Duration,
    /// When to SIGSTOP the holder just before a write, until a newer holder has written
    /// (once the failover after the kill has been seen).
    #[arg(long, default_value = "7s", value_parser = crate::duration)]
    stop_after: Duration,
    /// How the workers hold the key: `v2` sessions (FIFO waiting, pushed grants) or `v1`
    /// leases (waiters poll).
    #[arg(long, value_enum, default_value = "v2")]
    protocol: Protocol,
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
    #[arg(long, value_enum)]
    protocol: Protocol,
}

const DRIFT_PPM: u32 = 10_000;

/// One write attempted on the resource, as it arrived.
#[derive(Debug, Clone, PartialEq)]
struct Attempt {
    t: Duration,
    fence: u64,
    worker: String,
}

/// A worker's report that it was granted `fence`, as it arrived.
#[derive(Debug, Clone, PartialEq)]
struct Grant {
    t: Duration,
    fence: u64,
}

/// The holder stopped on purpose.
#[derive(Debug, Clone)]
struct Stopped {
    worker: String,
    fence: u64,
    at: Duration,
    resumed: Option<Duration>,
}

/// What the resource and the stop share.
#[derive(Default)]
struct Resource {
    /// Every write attempted, in arrival order. The resource itself checks nothing: the fence
    /// check is the analysis's, on this log.
    log: Vec<Attempt>,
    /// Worker name → pid, for the stop.
    pids: HashMap<String, u32>,
    /// The worker killed with SIGKILL; it is not stopped as well.
    killed: Option<String>,
    /// Set when the next holder about to write is to be stopped.
    stop_armed: bool,
    stopped: Option<Stopped>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves two lines per write: `READY <fence> <worker>` once the worker has checked that its
/// lease is valid, answered `GO`; then `WRITE <fence> <worker> <seq>`, logged and answered
/// `LOGGED`. Between the two is where a pause hurts (the check passed, the write is still to
/// come), so that is where an armed stop lands: the holder is stopped before its `GO`, and
/// resumed once a newer holder has written.
fn serve_resource(listener: TcpListener, state: Arc<Mutex<Resource>>, start: Instant, ttl: Duration) {
    for conn in listener.incoming().flatten() {
        let state = state.clone();
        std::thread::spawn(move || {
            let Ok(mut out) = conn.try_clone() else {
                return;
            };
            for line in BufReader::new(conn).lines().map_while(Result::ok) {
                let parts: Vec<&str> = line.split_whitespace().collect();
                let (Some(verb), Some(Ok(fence)), Some(worker)) =
                    (parts.first(), parts.get(1).map(|f| f.parse::<u64>()), parts.get(2))
                else {
                    let _ = writeln!(out, "ERR malformed");
                    continue;
                };
                let answer = match *verb {
                    "READY" => {
                        stop_if_armed(&state, worker, fence, start, ttl);
                        "GO"
                    }
                    "WRITE" => {
                        let t = start.elapsed();
                        lock(&state).log.push(Attempt { t, fence, worker: worker.to_string() });
                        "LOGGED"
                    }
                    _ => "ERR unknown verb",
                };
                let _ = writeln!(out, "{answer}");
            }
        });
    }
}

/// If a stop is armed: SIGSTOP `worker` (which holds `fence` and has just checked it), wait
/// until a higher fence has written (or 3 ttl), SIGCONT it.
fn stop_if_armed(state: &Mutex<Resource>, worker: &str, fence: u64, start: Instant, ttl: Duration) {
    let pid = {
        let mut s = lock(state);
        if !s.stop_armed || s.killed.as_deref() == Some(worker) {
            return;
        }
        let Some(&pid) = s.pids.get(worker) else { return };
        s.stop_armed = false;
        if kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).is_err() {
            return;
        }
        let at = start.elapsed();
        s.stopped = Some(Stopped { worker: worker.to_string(), fence, at, resumed: None });
        println!("  t={:>7.3}s  --  kill -STOP {worker}: its lease is valid, its write of fence {fence} comes next", at.as_secs_f64());
        pid
    };
    let deadline = Instant::now() + ttl * 3;
    while Instant::now() < deadline && !lock(state).log.iter().any(|a| a.fence > fence) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut s = lock(state);
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
    let resumed = start.elapsed();
    if let Some(st) = s.stopped.as_mut() {
        println!(
            "  t={:>7.3}s  --  kill -CONT {worker} after {:.3}s: meanwhile its lease ran out and a newer holder wrote; it writes with fence {fence}",
            resumed.as_secs_f64(),
            (resumed - st.at).as_secs_f64(),
        );
        st.resumed = Some(resumed);
    }
}

/// The fence check, applied to the log afterwards.
#[derive(Debug, Default, PartialEq)]
struct Analysis {
    /// Writes that pass: fence at least the highest one written before.
    accepted: Vec<Attempt>,
    /// Writes refused: a higher fence had already written.
    refused: Vec<Attempt>,
    /// Writes that passed the check although a higher fence had already been *granted*: the
    /// window a fence cannot close (the new holder had not written yet).
    stale_accepted: Vec<Attempt>,
    /// Fences whose holder wrote while a newer holder existed (granted or written), i.e.
    /// holders that overlapped.
    interleaved: BTreeSet<u64>,
}

/// Applies the fence check to `log` (in arrival order) and compares it with the `grants`
/// (each reported when granted): nothing here trusts what the resource or the workers did.
/// The check is core's `HighWater::admit`, the one a device's actuator and the SQL adapter
/// apply, with each worker's name standing for its owner id.
fn analyse(log: &[Attempt], grants: &[Grant]) -> Analysis {
    let mut a = Analysis::default();
    let mut mark = HighWater::NONE;
    // Worker names in order of first appearance; a worker's owner id is its place here.
    let mut workers: Vec<&str> = Vec::new();
    for w in log {
        let highest_granted = grants.iter().filter(|g| g.t <= w.t).map(|g| g.fence).max().unwrap_or(0);
        if w.fence < mark.fence.0.max(highest_granted) {
            a.interleaved.insert(w.fence);
        }
        let holder = match workers.iter().position(|n| *n == w.worker) {
            Some(i) => i,
            None => {
                workers.push(&w.worker);
                workers.len() - 1
            }
        };
        match mark.admit(Fence(w.fence), OwnerId(holder as u64 + 1)) {
            Ok(admitted) => mark = admitted,
            Err(_) => {
                a.refused.push(w.clone());
                continue;
            }
        }
        if w.fence < highest_granted {
            a.stale_accepted.push(w.clone());
        }
        a.accepted.push(w.clone());
    }
    a
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
    let ttl = args.ttl;
    {
        let resource = resource.clone();
        std::thread::spawn(move || serve_resource(listener, resource, start, ttl));
    }
    let bound = ttl.mul_f64(1.0 + DRIFT_PPM as f64 / 1e6);
    let protocol_arg = match args.protocol {
        Protocol::V1 => "v1",
        Protocol::V2 => "v2",
    };
    println!(
        "leasehold demo: server {} (store {}), key \"demo\", ttl {:?}, ε {}%, {} workers, protocol {}",
        server.url(),
        dir.path().display(),
        ttl,
        DRIFT_PPM as f64 / 1e4,
        args.workers,
        protocol_arg
    );
    println!(
        "each worker: acquire, write to a shared resource with its fence ~every 150 ms, release, repeat"
    );
    match args.protocol {
        Protocol::V2 => println!("each worker holds the key in a session: waiters queue FIFO at the server and are pushed the grant"),
        Protocol::V1 => println!("each worker holds the key in a v1 lease: waiters poll with backoff"),
    }
    println!("the resource logs every write; the analysis refuses any whose fence is lower than one written before\n");

    let lines: Arc<Mutex<Vec<Line>>> = Arc::new(Mutex::new(Vec::new()));
    let exe = std::env::current_exe()?;
    let mut workers: Vec<(String, Child)> = Vec::new();
    for i in 1..=args.workers {
        let name = format!("w{i}");
        let mut child = std::process::Command::new(&exe)
            .args(["demo-worker", "--server", &server.url(), "--key", "demo", "--name", &name])
            .args(["--resource", &resource_addr.to_string(), "--ttl", &format!("{}ms", ttl.as_millis())])
            .args(["--protocol", protocol_arg])
            .stdout(Stdio::piped())
            .spawn()?;
        lock(&resource).pids.insert(name.clone(), child.id());
        let out = child.stdout.take().ok_or("no worker stdout")?;
        let (lines, who) = (lines.clone(), name.clone());
        std::thread::spawn(move || {
            for text in BufReader::new(out).lines().map_while(Result::ok) {
                let t = start.elapsed();
                println!("  t={:>7.3}s  {who}  {text}", t.as_secs_f64());
                lock(&lines).push(Line { t, who: who.clone(), text });
            }
        });
        workers.push((name, child));
    }

    std::thread::sleep(args.kill_after.saturating_sub(start.elapsed()));
    // The victim must be mid-hold: its newest line says it acquired a fence (not yet released)
    // and the resource has logged a write under that fence. Whoever wrote last may already
    // have released, and killing it would measure nothing.
    let victim = loop {
        let holder = {
            let lines = lock(&lines);
            let res = lock(&resource);
            workers.iter().find_map(|(name, _)| {
                let last = lines.iter().rev().find(|l| l.who == *name)?;
                let fence: u64 = last.text.strip_prefix("acquired fence ")?.parse().ok()?;
                res.log.iter().any(|w| w.fence == fence).then(|| (name.clone(), fence))
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
            lock(&resource).killed = Some(name.clone());
            let _ = child.kill(); // SIGKILL: no release, no goodbye
            let _ = child.wait();
            let t = start.elapsed();
            println!("  t={:>7.3}s  --  kill -9 {name} while it holds fence {fence}", t.as_secs_f64());
            killed = Some((t, name, fence));
        }
    }
    // The stop comes after the failover, so the two measure one thing each; it needs one
    // worker to stop and another to take over.
    let stop_planned = args.workers >= 3;
    if stop_planned {
        while start.elapsed() < args.duration
            && killed.as_ref().is_some_and(|(t, name, _)| acquired_after(&lock(&lines), *t, name).is_none())
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(args.stop_after.saturating_sub(start.elapsed()));
        lock(&resource).stop_armed = true;
    }
    std::thread::sleep(args.duration.saturating_sub(start.elapsed()));
    // A stop under way is seen to its end: its write is the point of it.
    let finish_by = Instant::now() + ttl * 4;
    while Instant::now() < finish_by && stop_pending(&lock(&resource)) {
        std::thread::sleep(Duration::from_millis(10));
    }
    lock(&resource).stop_armed = false;
    for (_, child) in workers.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(server);

    // ----- analysis -----
    let res = lock(&resource);
    let lines = lock(&lines);
    let grants: Vec<Grant> = lines
        .iter()
        .filter_map(|l| Some(Grant { t: l.t, fence: l.text.strip_prefix("acquired fence ")?.parse().ok()? }))
        .collect();
    let a = analyse(&res.log, &grants);
    let mut spans: Vec<(u64, String, Duration, Duration, usize)> = Vec::new();
    for w in &a.accepted {
        match spans.last_mut() {
            Some(s) if s.0 == w.fence => {
                s.3 = w.t;
                s.4 += 1;
            }
            _ => spans.push((w.fence, w.worker.clone(), w.t, w.t, 1)),
        }
    }
    let handed = hand_offs(&lines);
    println!("\nwho held which fence when (the writes the fence check accepts), and how each got it:");
    for (f, w, from, to, n) in &spans {
        let how = match handed.iter().find(|h| h.fence == *f) {
            Some(h) => {
                let after = match &h.after_release {
                    Some(r) => format!(
                        "{:.1} ms after {} release of fence {}",
                        r.gap.as_secs_f64() * 1e3,
                        if r.by_itself { "its own" } else { "the" },
                        r.fence
                    ),
                    None if h.first => "first".to_string(),
                    None => "after an expiry".to_string(),
                };
                let order = match &h.overtook {
                    Some(o) => format!("OUT OF ORDER: {o} had waited longer"),
                    None if h.rivals > 0 => "the longest waiter".to_string(),
                    None => "nobody else waiting".to_string(),
                };
                format!("  granted {after}, {order}")
            }
            None => String::new(),
        };
        println!(
            "  fence {f:>3}  {w}  {:>7.3}s – {:>7.3}s  {n:>2} writes{how}",
            from.as_secs_f64(),
            to.as_secs_f64()
        );
    }
    for w in &a.refused {
        println!(
            "  REFUSED  {} with fence {} at {:>7.3}s: a higher fence had written",
            w.worker,
            w.fence,
            w.t.as_secs_f64()
        );
    }
    for w in &a.stale_accepted {
        println!(
            "  STALE    {} with fence {} at {:>7.3}s: a higher fence was granted",
            w.worker,
            w.fence,
            w.t.as_secs_f64()
        );
    }
    let failover = killed
        .as_ref()
        .and_then(|(t_kill, victim, _)| acquired_after(&lines, *t_kill, victim).map(|t| t - *t_kill));
    // Hand-offs to another worker: a worker that takes the key back gave nobody a turn.
    let mut gaps: Vec<Duration> = handed
        .iter()
        .filter_map(|h| h.after_release.as_ref().filter(|r| !r.by_itself).map(|r| r.gap))
        .collect();
    gaps.sort_unstable();
    let contested: Vec<&HandOff> = handed.iter().filter(|h| h.rivals > 0).collect();
    let overtaken = contested.iter().filter(|h| h.overtook.is_some()).count();
    let stopped_fence = res.stopped.as_ref().map(|s| s.fence);
    // Only the holder stopped on purpose may have overlapped a newer one.
    let unexpected: Vec<u64> = a.interleaved.iter().copied().filter(|f| Some(*f) != stopped_fence).collect();
    let mut ok = a.stale_accepted.is_empty() && unexpected.is_empty() && !spans.is_empty();
    println!();
    match (&killed, failover) {
        (Some(_), Some(f)) => {
            let ratio = f.as_secs_f64() / bound.as_secs_f64();
            println!(
                "failover after kill -9: {:.3}s; bound ttl·(1+ε) = {:.3}s; ratio {ratio:.2}{}",
                f.as_secs_f64(),
                bound.as_secs_f64(),
                match args.protocol {
                    // The session's ttl runs from its last keepalive, which came before the kill.
                    Protocol::V2 => " (the session expired a ttl after its last keepalive; the head waiter was pushed the key)",
                    Protocol::V1 => "",
                }
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
    match (gaps.first(), gaps.last()) {
        (Some(min), Some(max)) => println!(
            "hand-off after a release ({}): {} hand-offs, min {:.1} ms, median {:.1} ms, max {:.1} ms",
            match args.protocol {
                Protocol::V2 => "pushed to the head of the queue",
                Protocol::V1 => "found by a waiter's poll",
            },
            gaps.len(),
            min.as_secs_f64() * 1e3,
            gaps[gaps.len() / 2].as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        ),
        _ => println!("hand-off after a release: none seen"),
    }
    println!(
        "grants while others waited: {} of {} to the longest waiter, {overtaken} out of order",
        contested.len() - overtaken,
        contested.len()
    );
    match &res.stopped {
        Some(st) => {
            let refused = a.refused.iter().filter(|w| w.worker == st.worker && w.fence == st.fence).count();
            println!(
                "stopped {} with fence {} past its ttl: {refused} of its writes refused by fence afterwards",
                st.worker, st.fence
            );
            ok &= refused >= 1;
        }
        None if stop_planned => {
            println!("the stop never happened: no holder was about to write");
            ok = false;
        }
        None => println!("fewer than three workers: no stop"),
    }
    println!(
        "VERDICT: {} — {} grants, {} writes logged, {} interleaved holders ({} stopped on purpose), {} stale writes accepted, {} stale writes refused",
        if ok { "PASS" } else { "FAIL" },
        grants.len(),
        res.log.len(),
        a.interleaved.len(),
        a.interleaved.len() - unexpected.len(),
        a.stale_accepted.len(),
        a.refused.len()
    );
    Ok(ok)
}

/// How one grant came about, from the workers' lines.
#[derive(Debug, PartialEq)]
struct HandOff {
    fence: u64,
    /// The release this grant followed; `None` if the key came free otherwise (an expiry,
    /// or the first grant).
    after_release: Option<Released>,
    /// The key's first grant in the demo.
    first: bool,
    /// How many other workers were waiting when it was granted.
    rivals: usize,
    /// A worker that had been waiting longer (by more than [`SAME_TIME`]) and was passed over.
    overtook: Option<String>,
}

/// A release that a grant followed.
#[derive(Debug, PartialEq)]
struct Released {
    fence: u64,
    /// From the release's send to the grant's report.
    gap: Duration,
    /// The releasing worker was granted the key again.
    by_itself: bool,
}

/// Waits begun this close together may reach the server in either order: the lines are
/// timed as the demo reads them, not as the requests arrive.
const SAME_TIME: Duration = Duration::from_millis(100);

/// Each grant in `lines`, with the release it followed and whether it went to the worker
/// that had waited longest (a worker waits from its `waiting` line to its next grant).
fn hand_offs(lines: &[Line]) -> Vec<HandOff> {
    let mut lines: Vec<&Line> = lines.iter().collect();
    lines.sort_by_key(|l| l.t);
    let mut waiting: HashMap<&str, Duration> = HashMap::new();
    let mut released: Option<(u64, Duration, &str)> = None;
    let mut out = Vec::new();
    for l in lines {
        if l.text == "waiting" {
            waiting.insert(&l.who, l.t);
        } else if let Some(fence) = l.text.strip_prefix("releasing fence ").and_then(|f| f.parse().ok()) {
            released = Some((fence, l.t, &l.who));
        } else if let Some(fence) = l.text.strip_prefix("acquired fence ").and_then(|f| f.parse().ok()) {
            let since = waiting.remove(l.who.as_str());
            let overtook = since.and_then(|since| {
                waiting
                    .iter()
                    .filter(|(_, t)| **t + SAME_TIME < since)
                    .min_by_key(|(_, t)| **t)
                    .map(|(w, _)| w.to_string())
            });
            let after_release = released.take().map(|(f, t, by)| Released {
                fence: f,
                gap: l.t.saturating_sub(t),
                by_itself: by == l.who,
            });
            let first = out.is_empty();
            out.push(HandOff { fence, after_release, first, rivals: waiting.len(), overtook });
        }
    }
    out
}

/// When a worker other than `not` first reported a grant after `t`.
fn acquired_after(lines: &[Line], t: Duration, not: &str) -> Option<Duration> {
    lines.iter().find(|l| l.t > t && l.who != not && l.text.starts_with("acquired")).map(|l| l.t)
}

/// Whether an armed or started stop has not yet produced the stopped worker's write.
fn stop_pending(res: &Resource) -> bool {
    match &res.stopped {
        None => res.stop_armed,
        Some(st) => match st.resumed {
            None => true,
            Some(resumed) => !res.log.iter().any(|w| w.worker == st.worker && w.t >= resumed),
        },
    }
}

/// One worker: acquire, write with the fence while the lease is valid, release, repeat.
pub(crate) fn worker(args: WorkerArgs) -> ExitCode {
    let say = |s: String| {
        println!("{s}");
        let _ = std::io::stdout().flush();
    };
    let client = match Holder::new(&args) {
        Ok(c) => c,
        Err(e) => {
            say(format!("error: {e}"));
            return ExitCode::FAILURE;
        }
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
            // Holds of 0.5–1.3 s: several hand-offs before the kill and after the stop.
            let writes = 3 + fastrand_u64() % 6;
            let mut lost = false;
            for seq in 0..writes {
                // Act only with time to spare; the fence protects the resource regardless.
                if lease.remaining().is_none_or(|r| r < Duration::from_millis(300)) {
                    lost = true;
                    break;
                }
                // The check above passed; a pause from here on goes unnoticed until the write.
                for (line, expected) in [
                    (format!("READY {fence} {}", args.name), "GO"),
                    (format!("WRITE {fence} {} {seq}", args.name), "LOGGED"),
                ] {
                    let _ = writeln!(out, "{line}");
                    match answers.next() {
                        Some(Ok(a)) if a == expected => {}
                        Some(Ok(a)) => say(format!("resource answered {a:?} to {line:?}")),
                        _ => return ExitCode::FAILURE,
                    }
                }
                async_io::Timer::after(Duration::from_millis(150)).await;
            }
            if lost {
                say(format!("lost fence {fence}: {:?}", lease.health()));
            } else {
                // Said before the release is sent: a pushed grant may reach the next holder
                // before this one hears its release acknowledged.
                say(format!("releasing fence {fence}"));
                match lease.release().await {
                    Ok(()) => say(format!("released fence {fence}")),
                    Err(e) => say(format!("release of fence {fence}: {e}")),
                }
            }
            async_io::Timer::after(Duration::from_millis(50 + fastrand_u64() % 250)).await;
        }
    })
}

/// A worker's client, in the protocol the demo was asked for.
enum Holder {
    V1(Client<BuiltinBackend>),
    V2(SessionClient),
}

impl Holder {
    fn new(args: &WorkerArgs) -> Result<Holder, Box<dyn std::error::Error>> {
        let mut options = match args.protocol {
            Protocol::V1 => Options::new(args.ttl),
            Protocol::V2 => Options::session(args.ttl),
        };
        options.config.drift = leasehold_core::Drift::from_ppm(DRIFT_PPM);
        let timeout = options.config.request_timeout.into();
        Ok(match args.protocol {
            Protocol::V1 => {
                Holder::V1(Client::new(BuiltinBackend::new(&args.server, None, timeout)?, options)?)
            }
            Protocol::V2 => Holder::V2(SessionClient::new(
                BuiltinSessions::new(&args.server, None, timeout)?,
                &args.name,
                options,
            )?),
        })
    }

    /// Waits for `key`: a v1 client polls with backoff, a session queues FIFO at the server
    /// and is pushed the grant.
    async fn acquire(&self, key: &str) -> Result<Lease, AcquireError> {
        match self {
            Holder::V1(c) => c.acquire(key).await,
            Holder::V2(c) => c.acquire(key).await,
        }
    }
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(t: u64) -> Duration {
        Duration::from_millis(t)
    }

    fn log(writes: &[(u64, u64, &str)]) -> Vec<Attempt> {
        writes.iter().map(|&(t, fence, w)| Attempt { t: ms(t), fence, worker: w.into() }).collect()
    }

    fn grants(gs: &[(u64, u64)]) -> Vec<Grant> {
        gs.iter().map(|&(t, fence)| Grant { t: ms(t), fence }).collect()
    }

    #[test]
    fn a_clean_log_passes_with_nothing_to_count() {
        let l = log(&[(10, 1, "a"), (20, 1, "a"), (110, 2, "b"), (210, 3, "a")]);
        let a = analyse(&l, &grants(&[(0, 1), (100, 2), (200, 3)]));
        assert_eq!(a.accepted, l);
        assert_eq!((a.refused.len(), a.stale_accepted.len(), a.interleaved.len()), (0, 0, 0));
    }

    #[test]
    fn a_write_after_a_higher_fence_wrote_is_refused_and_its_holder_interleaved() {
        // a held fence 1, paused; b was granted 2 and wrote; a wakes up and writes with 1.
        let l = log(&[(10, 1, "a"), (110, 2, "b"), (120, 1, "a"), (130, 2, "b")]);
        let a = analyse(&l, &grants(&[(0, 1), (100, 2)]));
        assert_eq!(a.refused, log(&[(120, 1, "a")]));
        assert_eq!(a.accepted, log(&[(10, 1, "a"), (110, 2, "b"), (130, 2, "b")]));
        assert_eq!(a.interleaved, BTreeSet::from([1]));
        assert!(a.stale_accepted.is_empty());
    }

    #[test]
    fn a_write_after_a_newer_grant_but_before_its_first_write_is_a_stale_write_accepted() {
        // What a fence cannot catch: b holds fence 2 but has not written yet.
        let l = log(&[(10, 1, "a"), (105, 1, "a"), (110, 2, "b")]);
        let a = analyse(&l, &grants(&[(0, 1), (100, 2)]));
        assert_eq!(a.stale_accepted, log(&[(105, 1, "a")]));
        assert_eq!(a.interleaved, BTreeSet::from([1]));
        assert!(a.refused.is_empty());
    }

    #[test]
    fn an_equal_fence_from_another_worker_is_refused_as_core_rules() {
        // Only a broken authority hands one fence to two holders; the first keeps writing.
        let l = log(&[(10, 1, "a"), (20, 1, "b"), (30, 1, "a")]);
        let a = analyse(&l, &grants(&[(0, 1)]));
        assert_eq!(a.refused, log(&[(20, 1, "b")]));
        assert_eq!(a.accepted, log(&[(10, 1, "a"), (30, 1, "a")]));
    }

    fn lines(ls: &[(u64, &str, &str)]) -> Vec<Line> {
        ls.iter().map(|&(t, who, text)| Line { t: ms(t), who: who.into(), text: text.into() }).collect()
    }

    #[test]
    fn a_grant_after_a_release_is_timed_from_the_release_and_checked_against_the_longest_waiter() {
        let l = lines(&[
            (0, "a", "waiting"),
            (1, "a", "acquired fence 1"),
            (10, "b", "waiting"),
            (300, "c", "waiting"),
            (500, "a", "releasing fence 1"),
            (503, "b", "acquired fence 2"), // b waited since 10, c since 300: in order
            (600, "a", "waiting"),
            (900, "b", "releasing fence 2"),
            (950, "a", "acquired fence 3"), // a waited since 600, c since 300: c was passed over
            (1200, "a", "releasing fence 3"),
            (1300, "a", "waiting"),
            (1320, "a", "acquired fence 4"), // a takes it back after its own release
        ]);
        let h = hand_offs(&l);
        assert_eq!(h.len(), 4);
        assert!(h[0].first && h[0].after_release.is_none() && h[0].rivals == 0);
        assert_eq!(h[1].after_release, Some(Released { fence: 1, gap: ms(3), by_itself: false }));
        assert_eq!((h[1].rivals, h[1].overtook.as_deref()), (1, None));
        assert_eq!(h[2].overtook.as_deref(), Some("c"));
        assert_eq!(h[3].after_release, Some(Released { fence: 3, gap: ms(120), by_itself: true }));
        assert_eq!(h[3].overtook.as_deref(), Some("c"));
    }

    #[test]
    fn waits_begun_at_about_the_same_time_are_in_no_order() {
        let l = lines(&[
            (0, "a", "waiting"),
            (40, "b", "waiting"),
            (45, "b", "acquired fence 1"),
            (2000, "b", "releasing fence 1"),
            (2001, "c", "waiting"),
            (2010, "a", "acquired fence 2"),
        ]);
        let h = hand_offs(&l);
        assert_eq!((h[0].rivals, h[0].overtook.as_deref()), (1, None));
        // c began waiting after a: a is the longest waiter.
        assert_eq!((h[1].rivals, h[1].overtook.as_deref()), (1, None));
    }

    #[test]
    fn overlapping_holders_are_counted_once_each() {
        // Two old holders (1 and 2) both keep writing after 3 took over.
        let l =
            log(&[(10, 1, "a"), (110, 2, "b"), (210, 3, "c"), (220, 1, "a"), (230, 2, "b"), (240, 1, "a")]);
        let a = analyse(&l, &grants(&[(0, 1), (100, 2), (200, 3)]));
        assert_eq!(a.interleaved, BTreeSet::from([1, 2]));
        assert_eq!(a.refused.len(), 3);
    }
}
