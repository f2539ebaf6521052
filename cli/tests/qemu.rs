//! End to end on emulated hardware: the built-in server, the gateway, two QEMU lm3s6965evb
//! boards running examples/firmware-pump, and a host client, all contending for "pump".
//!
//! Needs `qemu-system-arm` and the `thumbv7m-none-eabi` target (`bash scripts/setup.sh`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leasehold_http::{BuiltinBackend, Client, Options};
use leasehold_server::{Server, ServerConfig};

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");
const TTL: Duration = Duration::from_millis(1_000);

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One line of anyone's log, stamped with host time on arrival.
#[derive(Debug, Clone)]
struct Line {
    t: Duration,
    who: String,
    text: String,
}

fn firmware() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/firmware-pump");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--release", "--quiet"])
        .current_dir(&dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "building the firmware failed (is the target installed? `rustup target add thumbv7m-none-eabi`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("target/thumbv7m-none-eabi/release/firmware-pump")
}

/// Starts a board; returns it and the TCP port of its UART.
fn board(elf: &PathBuf, device: u32, log: Arc<Mutex<Vec<Line>>>, start: Instant) -> (Proc, u16) {
    let mut child = Command::new("qemu-system-arm")
        .args(["-M", "lm3s6965evb", "-nographic", "-monitor", "none"])
        .args(["-semihosting-config", "enable=on,target=native"])
        .args(["-serial", "tcp:127.0.0.1:0,server=on,wait=on,nodelay=on", "-kernel"])
        .arg(elf)
        .args(["-append", &format!("{device} {}", std::process::id())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start qemu-system-arm ({e}); install it: apt-get install qemu-system-arm")
        });
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let port = loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "qemu exited before listening");
        if let Some(p) = line
            .rsplit("127.0.0.1:")
            .next()
            .and_then(|r| r.split(',').next())
            .and_then(|p| p.trim().parse().ok())
        {
            break p;
        }
    };
    let out = child.stdout.take().unwrap();
    let who = format!("board{device}");
    std::thread::spawn(move || {
        for text in BufReader::new(out).lines().map_while(Result::ok) {
            log.lock().unwrap().push(Line { t: start.elapsed(), who: who.clone(), text });
        }
    });
    (Proc(child), port)
}

/// The merged log, for failure messages.
fn render(lines: &[Line]) -> String {
    lines
        .iter()
        .map(|l| format!("{:>8.3}s {:<7} {}", l.t.as_secs_f64(), l.who, l.text))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn boards_and_a_host_share_one_lease_safely() {
    let elf = firmware();
    let start = Instant::now();
    let log: Arc<Mutex<Vec<Line>>> = Arc::default();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::spawn(ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap())).unwrap();
    let (mut b1, p1) = board(&elf, 1, log.clone(), start);
    let (b2, p2) = board(&elf, 2, log.clone(), start);
    let _gateway = Proc(
        Command::new(BIN)
            .args(["gateway", "--server", &server.url()])
            .args(["--link", &format!("tcp:127.0.0.1:{p1}"), "--link", &format!("tcp:127.0.0.1:{p2}")])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // The host client contends too, logging its actions like the boards.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let host = {
        let (log, stop, url) = (log.clone(), stop.clone(), server.url());
        std::thread::spawn(move || {
            let backend = BuiltinBackend::new(&url, None, Duration::from_millis(300)).unwrap();
            let client = Client::new(backend, Options::new(TTL)).unwrap();
            let say = |text: String| {
                log.lock().unwrap().push(Line { t: start.elapsed(), who: "host".into(), text })
            };
            smol::block_on(async {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let Ok(lease) = client.acquire_timeout("pump", Duration::from_millis(500)).await else {
                        continue;
                    };
                    let fence = lease.fence().map_or(0, |f| f.0);
                    say(format!("ACQUIRED {fence}"));
                    for n in 1..=5 {
                        if lease.remaining().is_none_or(|r| r < Duration::from_millis(50)) {
                            break;
                        }
                        say(format!("ACT {fence} {n}"));
                        async_io::Timer::after(Duration::from_millis(100)).await;
                    }
                    lease.release().await.expect("release acknowledged");
                    say(format!("RELEASED {fence}"));
                    async_io::Timer::after(Duration::from_millis(300)).await;
                }
            });
        })
    };

    // Let everyone take turns, then kill board 1 while it holds the lease.
    std::thread::sleep(Duration::from_secs(4));
    let killed_at = loop {
        let holding = {
            let l = log.lock().unwrap();
            // Mid-hold: board 1's newest line is an early action under a grant.
            let last = l.iter().rev().find(|x| x.who == "board1" && !x.text.starts_with("CLOCK"));
            // Any of its first six actions will do: at least two more are due, so the kill
            // lands mid-hold, and a busy host that misses the second still catches a later one.
            last.is_some_and(|x| {
                let mut w = x.text.split_whitespace();
                w.next() == Some("ACT")
                    && w.nth(1).and_then(|n| n.parse::<u32>().ok()).is_some_and(|n| n <= 6)
            })
        };
        if holding {
            let _ = b1.0.kill();
            break start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "board 1 never held the lease:\n{}",
            render(&log.lock().unwrap())
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    host.join().unwrap();
    drop(b2);

    let lines = log.lock().unwrap().clone();
    let dump = || render(&lines);

    // The fenced log: every ACT names its fence. One party per fence, fences in order, and
    // the spans of consecutive fences never overlap in (host) time.
    let acts: Vec<(Duration, &str, u64)> = lines
        .iter()
        .filter_map(|l| {
            let mut w = l.text.split_whitespace();
            (w.next() == Some("ACT"))
                .then(|| (l.t, l.who.as_str(), w.next().and_then(|f| f.parse().ok()).unwrap_or(0)))
        })
        .collect();
    let mut spans: Vec<(u64, &str, Duration, Duration)> = Vec::new();
    for (t, who, fence) in &acts {
        match spans.last_mut() {
            Some(s) if s.0 == *fence => {
                assert_eq!(s.1, *who, "fence {fence} used by two parties:\n{}", dump());
                s.3 = *t;
            }
            _ => {
                if let Some(prev) = spans.last() {
                    assert!(*fence > prev.0, "fence {fence} acted after fence {}:\n{}", prev.0, dump());
                }
                spans.push((*fence, who, *t, *t));
            }
        }
    }
    let parties: std::collections::BTreeSet<&str> = spans.iter().map(|s| s.1).collect();
    assert!(parties.len() == 3, "all three parties should have held the lease: {parties:?}\n{}", dump());

    // Failover after the emulator was killed: the next party's grant.
    let next = lines
        .iter()
        .find(|l| l.t > killed_at && l.who != "board1" && l.text.starts_with("ACQUIRED"))
        .unwrap_or_else(|| panic!("nobody acquired after the kill:\n{}", dump()));
    let failover = next.t - killed_at;
    let bound = TTL.mul_f64(1.01);
    println!(
        "failover after killing board1: {:.3}s (bound {:.3}s, ratio {:.2})",
        failover.as_secs_f64(),
        bound.as_secs_f64(),
        failover.as_secs_f64() / bound.as_secs_f64()
    );
    // Slack: the host's busy poll and the board's 1 ms tick.
    assert!(failover <= bound + Duration::from_millis(200), "failover {failover:?}:\n{}", dump());

    // The boards' clocks must run within ε of the host's for the safety argument to hold.
    for who in ["board1", "board2"] {
        let clocks: Vec<(Duration, u64)> = lines
            .iter()
            .filter(|l| l.who == who)
            .filter_map(|l| l.text.strip_prefix("CLOCK ").and_then(|c| c.parse().ok()).map(|c| (l.t, c)))
            .collect();
        let (Some(a), Some(b)) = (clocks.first(), clocks.last()) else { panic!("{who} reported no clock") };
        let rate = (b.1 - a.1) as f64 / 1e6 / (b.0 - a.0).as_secs_f64();
        println!("{who} clock rate vs host: {rate:.4} over {:.1}s", (b.0 - a.0).as_secs_f64());
        assert!((rate - 1.0).abs() < 0.01, "{who} clock runs at {rate} of host time:\n{}", dump());
    }
    let mut rtts: Vec<u64> = lines
        .iter()
        .filter(|l| l.who.starts_with("board"))
        .filter_map(|l| l.text.strip_prefix("RENEWED rtt_us ").and_then(|v| v.parse().ok()))
        .collect();
    rtts.sort_unstable();
    assert!(!rtts.is_empty(), "the boards never renewed:\n{}", dump());
    println!(
        "device -> gateway -> server -> device round trip (renewals): min {:.2} ms, median {:.2} ms, max {:.2} ms over {}",
        rtts[0] as f64 / 1e3,
        rtts[rtts.len() / 2] as f64 / 1e3,
        rtts[rtts.len() - 1] as f64 / 1e3,
        rtts.len()
    );
}
