//! `leasehold run` on every backend against real stores on loopback: exclusion, and
//! failover after the holder is killed with SIGKILL.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use leasehold_test_servers::{dynalite, etcd};

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");

const AWS_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "AKIDLEASEHOLDTEST"),
    ("AWS_SECRET_ACCESS_KEY", "not-a-real-secret"),
    ("AWS_REGION", "us-east-1"),
];

fn run(backend: &str, url: &str, extra: &[&str], cmd: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["run", "--backend", backend, "--server", url, "--ttl", "2s"]);
    if !extra.contains(&"--key") {
        c.args(["--key", "cli-job"]);
    }
    c.args(extra).arg("--").args(cmd);
    c.envs(AWS_ENV).stderr(Stdio::null());
    c
}

/// The holder runs; a second `--no-wait` run is refused with 75; then it succeeds.
fn exclusive(backend: &str, url: &str) {
    let mut holder =
        run(backend, url, &[], &["sh", "-c", "test -n \"$LEASEHOLD_FENCE\" && sleep 1.5"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(run(backend, url, &["--no-wait"], &["true"]).status().unwrap().code(), Some(75), "{backend}");
    assert!(holder.wait().unwrap().success(), "{backend}: holder failed");
    assert_eq!(run(backend, url, &["--no-wait"], &["true"]).status().unwrap().code(), Some(0), "{backend}");
}

fn nanos_now() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// Kills a holding `leasehold run` (and its command) with SIGKILL; returns how long until a
/// waiting `leasehold run` got the lease, and prints it against the bound.
fn kill_9(backend: &str, url: &str, slack: Duration) {
    let dir = tempfile::tempdir().unwrap();
    let (held, acquired) = (dir.path().join("held"), dir.path().join("acquired"));
    let hold = format!("touch {}; sleep 60", held.display());
    let mut holder = run(backend, url, &["--key", "failover"], &["sh", "-c", &hold]);
    let mut holder = holder.process_group(0).spawn().unwrap();
    let started = Instant::now();
    while !held.exists() {
        assert!(started.elapsed() < Duration::from_secs(5), "{backend}: holder never acquired");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mark = format!("date +%s%N > {}", acquired.display());
    let mut waiter = run(backend, url, &["--key", "failover"], &["sh", "-c", &mark]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let killed_at = nanos_now();
    killpg(Pid::from_raw(holder.id() as i32), Signal::SIGKILL).unwrap();
    let _ = holder.wait();
    assert!(waiter.wait().unwrap().success(), "{backend}: waiter failed");
    let at: u128 = std::fs::read_to_string(&acquired).unwrap().trim().parse().unwrap();
    let failover = Duration::from_nanos((at - killed_at) as u64);
    let bound = Duration::from_secs(2).mul_f64(1.01);
    println!(
        "{backend}: failover after kill -9 {:.3}s, bound ttl*(1+eps) {:.3}s, ratio {:.2}",
        failover.as_secs_f64(),
        bound.as_secs_f64(),
        failover.as_secs_f64() / bound.as_secs_f64()
    );
    assert!(failover <= bound + slack, "{backend}: failover {failover:?}");
}

#[test]
fn run_on_builtin() {
    let dir = tempfile::tempdir().unwrap();
    let s = leasehold_server::Server::spawn(leasehold_server::ServerConfig::new(
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .unwrap();
    exclusive("builtin", &s.url());
    // Slack: one busy poll (ttl/8) plus the start of the child that writes the mark.
    kill_9("builtin", &s.url(), Duration::from_millis(300));
}

#[test]
fn run_on_etcd() {
    let e = etcd();
    exclusive("etcd", e.url());
    // etcd deletes a dead lease's key in a sweep every 500 ms after expiry.
    kill_9("etcd", e.url(), Duration::from_millis(900));
}

#[test]
fn run_on_dynamodb() {
    let d = dynalite();
    let creds = leasehold_stores::Credentials::new(AWS_ENV[0].1, AWS_ENV[1].1, None, None, "test");
    let b =
        leasehold_stores::DynamoDbBackend::new(d.url(), "us-east-1", "leases", creds, Duration::from_secs(2))
            .unwrap();
    smol::block_on(b.create_table()).unwrap();
    exclusive("dynamodb", d.url());
    // Observe-and-wait: ttl·(1+ε) + margin from when the waiter read the record.
    kill_9("dynamodb", d.url(), Duration::from_millis(300));
    // Without credentials: a usage error naming what is missing.
    let out = Command::new(BIN)
        .args(["run", "--backend", "dynamodb", "--server", d.url(), "--key", "k", "--", "true"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AWS_ACCESS_KEY_ID"));
}
