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

/// `run --protocol v1`'s flags (v2 is the default on the built-in server and etcd).
const V1: &[&str] = &["--protocol", "v1"];

/// The holder runs; a second `--no-wait` run is refused with 75; then it succeeds.
fn exclusive(backend: &str, url: &str, flags: &[&str]) {
    let no_wait: Vec<&str> = flags.iter().copied().chain(["--no-wait"]).collect();
    let mut holder =
        run(backend, url, flags, &["sh", "-c", "test -n \"$LEASEHOLD_FENCE\" && sleep 1.5"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        run(backend, url, &no_wait, &["true"]).status().unwrap().code(),
        Some(75),
        "{backend} {flags:?}"
    );
    assert!(holder.wait().unwrap().success(), "{backend} {flags:?}: holder failed");
    assert_eq!(
        run(backend, url, &no_wait, &["true"]).status().unwrap().code(),
        Some(0),
        "{backend} {flags:?}"
    );
}

fn nanos_now() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// `leasehold run` of the shell `script` on `key`, in its own process group, once the script
/// has created `marker` (so the lease is held).
fn holding(
    backend: &str,
    url: &str,
    flags: &[&str],
    key: &str,
    script: &str,
    marker: &std::path::Path,
) -> std::process::Child {
    let extra: Vec<&str> = ["--key", key].iter().chain(flags).copied().collect();
    let holder = run(backend, url, &extra, &["sh", "-c", script]).process_group(0).spawn().unwrap();
    let started = Instant::now();
    while !marker.exists() {
        assert!(started.elapsed() < Duration::from_secs(20), "{backend}: holder never acquired");
        std::thread::sleep(Duration::from_millis(10));
    }
    holder
}

/// Kills a holding `leasehold run` (and its command) with SIGKILL; returns how long until a
/// waiting `leasehold run` got the lease, and prints it against the bound.
fn kill_9(name: &str, url: &str, flags: &[&str], slack: Duration) {
    let backend = name.split(' ').next().unwrap_or(name);
    let dir = tempfile::tempdir().unwrap();
    let (held, acquired) = (dir.path().join("held"), dir.path().join("acquired"));
    let hold = format!("touch {}; sleep 60", held.display());
    let mut holder = holding(backend, url, flags, "failover", &hold, &held);
    let mark = format!("date +%s%N > {}", acquired.display());
    let extra: Vec<&str> = ["--key", "failover"].iter().chain(flags).copied().collect();
    let mut waiter = run(backend, url, &extra, &["sh", "-c", &mark]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let killed_at = nanos_now();
    killpg(Pid::from_raw(holder.id() as i32), Signal::SIGKILL).unwrap();
    let _ = holder.wait();
    assert!(waiter.wait().unwrap().success(), "{name}: waiter failed");
    let at: u128 = std::fs::read_to_string(&acquired).unwrap().trim().parse().unwrap();
    let failover = Duration::from_nanos((at - killed_at) as u64);
    let bound = Duration::from_secs(2).mul_f64(1.01);
    println!(
        "{name}: failover after kill -9 {:.3}s, bound ttl*(1+eps) {:.3}s, ratio {:.2}",
        failover.as_secs_f64(),
        bound.as_secs_f64(),
        failover.as_secs_f64() / bound.as_secs_f64()
    );
    assert!(failover <= bound + slack, "{name}: failover {failover:?}");
}

#[test]
fn run_on_builtin() {
    let dir = tempfile::tempdir().unwrap();
    let s = leasehold_server::Server::spawn(leasehold_server::ServerConfig::new(
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .unwrap();
    // v2 (the default): the waiter is pushed the grant at the session's expiry.
    exclusive("builtin", &s.url(), &[]);
    kill_9("builtin", &s.url(), &[], Duration::from_millis(300));
    // v1, with `--protocol v1`. Slack: one busy poll (ttl/8) plus the start of the child
    // that writes the mark.
    exclusive("builtin", &s.url(), V1);
    kill_9("builtin v1", &s.url(), V1, Duration::from_millis(300));
}

#[test]
fn run_on_etcd() {
    let e = etcd();
    // Protocol v1 (v2 is `run_on_etcd_sessions`). etcd deletes a dead lease's key in a
    // sweep every 500 ms after expiry.
    exclusive("etcd", e.url(), V1);
    kill_9("etcd v1", e.url(), V1, Duration::from_millis(900));
}

/// The keys etcd has under `prefix` (`etcdctl`, as an operator would look).
fn etcd_keys(url: &str, prefix: &str) -> Vec<String> {
    let out = Command::new("etcdctl")
        .args(["--endpoints", url, "get", "--prefix", prefix, "--keys-only"])
        .env("ETCDCTL_API", "3")
        .output()
        .expect("etcdctl (apt-get install -y etcd-client)");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
}

fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < Duration::from_secs(20), "{what}: not within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn run_on_etcd_sessions() {
    let e = etcd();
    // The default, said anyway (and checked once without it, at the end).
    let v2 = ["--protocol", "v2"];
    // Exclusion, and the v2 key is a waiter key under PREFIXv2/ on the session's lease.
    let dir = tempfile::tempdir().unwrap();
    let (seen, marker) = (dir.path().join("seen"), dir.path().join("started"));
    let hold = format!("echo $LEASEHOLD_OWNER > {}; touch {}; sleep 1.5", seen.display(), marker.display());
    let mut holder = holding("etcd", e.url(), &v2, "cli-job", &hold, &marker);
    let owner: u64 = std::fs::read_to_string(&seen).unwrap().trim().parse().expect("the session id");
    assert_eq!(etcd_keys(e.url(), "leasehold/"), vec![format!("leasehold/v2/cli-job@{owner:016x}")]);
    let busy = run("etcd", e.url(), &["--no-wait", "--protocol", "v2"], &["true"]).status().unwrap();
    assert_eq!(busy.code(), Some(75));
    assert!(holder.wait().unwrap().success());
    assert_eq!(etcd_keys(e.url(), "leasehold/"), Vec::<String>::new(), "released on the way out");

    // FIFO: three waiters queued one after the other are served in that order, fences rising.
    let (log, go, started) = (dir.path().join("order.log"), dir.path().join("go"), dir.path().join("s"));
    let hold = format!(
        "echo holder $LEASEHOLD_FENCE >> {0}; touch {2}; while [ ! -e {1} ]; do sleep 0.05; done",
        log.display(),
        go.display(),
        started.display()
    );
    let mut holder = holding("etcd", e.url(), &v2, "turns", &hold, &started);
    let mut waiters = Vec::new();
    for i in 1..=3 {
        let write = format!("echo w{i} $LEASEHOLD_FENCE >> {}", log.display());
        let flags = ["--key", "turns", "--protocol", "v2"];
        waiters.push(run("etcd", e.url(), &flags, &["sh", "-c", &write]).spawn().unwrap());
        // The next one starts only once this one's waiter key is in etcd.
        eventually("queued", || etcd_keys(e.url(), "leasehold/v2/turns@").len() == i + 1);
    }
    std::fs::write(&go, "").unwrap();
    assert!(holder.wait().unwrap().success());
    for w in &mut waiters {
        assert!(w.wait().unwrap().success());
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<(&str, u64)> =
        text.lines().map(|l| l.split_once(' ').map(|(who, f)| (who, f.parse().unwrap())).unwrap()).collect();
    let who: Vec<&str> = lines.iter().map(|l| l.0).collect();
    assert_eq!(who, ["holder", "w1", "w2", "w3"], "FIFO: {text}");
    assert!(lines.windows(2).all(|w| w[0].1 < w[1].1), "fences strictly increase: {text}");
    let leases = Command::new("etcdctl").args(["--endpoints", e.url(), "lease", "list"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&leases.stdout).contains("found 0 leases"),
        "every run revoked its session's lease on the way out: {leases:?}"
    );

    // kill -9 of the holder: its lease expires in etcd, which deletes its key, and the waiter
    // (watching that key) is pushed the grant: ttl·(1+ε) plus etcd's expiry sweep.
    kill_9("etcd v2", e.url(), &v2, Duration::from_millis(900));
    // v2 is the default on etcd: a run without --protocol holds a session's key.
    exclusive("etcd", e.url(), &[]);
    let marker = dir.path().join("default-started");
    let mut holder =
        holding("etcd", e.url(), &[], "default", &format!("touch {}; sleep 60", marker.display()), &marker);
    let keys = etcd_keys(e.url(), "leasehold/");
    assert!(keys.len() == 1 && keys[0].starts_with("leasehold/v2/default@"), "{keys:?}");
    killpg(Pid::from_raw(holder.id() as i32), Signal::SIGTERM).unwrap();
    let _ = holder.wait();
}

/// dynalite with the table `run` uses by default.
fn dynalite_with_leases_table() -> leasehold_test_servers::Running {
    let d = dynalite();
    let creds = leasehold_stores::Credentials::new(AWS_ENV[0].1, AWS_ENV[1].1, None, None, "test");
    let b =
        leasehold_stores::DynamoDbBackend::new(d.url(), "us-east-1", "leases", creds, Duration::from_secs(2))
            .unwrap();
    smol::block_on(b.create_table()).unwrap();
    d
}

#[test]
fn run_on_dynamodb() {
    let d = dynalite_with_leases_table();
    exclusive("dynamodb", d.url(), &[]);
    // Observe-and-wait: ttl·(1+ε) + margin from when the waiter read the record.
    kill_9("dynamodb", d.url(), &[], Duration::from_millis(300));
    // Without credentials: a usage error naming what is missing.
    let out = Command::new(BIN)
        .args(["run", "--backend", "dynamodb", "--server", d.url(), "--key", "k", "--", "true"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AWS_ACCESS_KEY_ID"));
}

/// `leasehold status` on `backend` while `leasehold run` holds a key there, and after it let go:
/// the table and the JSON show the holder the command saw, then nothing (and exit 1 by name).
fn status_follows_run(backend: &str, url: &str, extra: &[&str], run_flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let (seen, marker) = (dir.path().join("seen"), dir.path().join("started"));
    let hold = format!(
        "echo $LEASEHOLD_OWNER $LEASEHOLD_FENCE > {}; touch {}; sleep 60",
        seen.display(),
        marker.display()
    );
    let mut holder = holding(backend, url, run_flags, "watched/job-1", &hold, &marker);
    let seen = std::fs::read_to_string(&seen).unwrap();
    let (owner, fence) = seen.trim().split_once(' ').unwrap();
    let status = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(["status", "--backend", backend, "--server", url]).args(extra).args(args).envs(AWS_ENV);
        c.output().unwrap()
    };
    let table = status(&["--prefix", "watched/"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success(), "{backend}: {table:?}");
    let rows: Vec<Vec<&str>> = text.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 1, "{backend}: {text}");
    assert_eq!(rows[0][..3], ["watched/job-1", fence, owner], "{backend}: {text}");
    let doc = status(&["watched/job-1", "--json"]);
    let doc: serde_json::Value =
        serde_json::from_slice(&doc.stdout).unwrap_or_else(|e| panic!("{e}: {doc:?}"));
    let h = &doc["leases"][0]["holder"];
    assert_eq!(
        (h["owner"].to_string(), h["fence"].to_string()),
        (owner.to_string(), fence.to_string()),
        "{doc}"
    );
    assert_eq!(h["ttl"], serde_json::json!(2_000_000), "{backend}: {doc}");

    // SIGTERM: the command exits and the lease is released at once.
    killpg(Pid::from_raw(holder.id() as i32), Signal::SIGTERM).unwrap();
    let _ = holder.wait();
    let after = status(&["--prefix", "watched/"]);
    assert!(after.status.success(), "{backend}: {after:?}");
    assert_eq!(
        String::from_utf8_lossy(&after.stdout).lines().count(),
        1,
        "{backend}: only the header: {after:?}"
    );
    assert_eq!(status(&["--prefix", "nothing/"]).status.code(), Some(0));
    assert_eq!(status(&["never-leased"]).status.code(), Some(1), "{backend}");
}

#[test]
fn status_on_etcd() {
    let e = etcd();
    // v1 keys (etcd status does not list session keys yet), and v1 is status's default there.
    status_follows_run("etcd", e.url(), &[], V1);
    // Keys under another prefix are another application's.
    let other = Command::new(BIN)
        .args(["status", "--backend", "etcd", "--server", e.url(), "--etcd-prefix", "elsewhere/", "--all"])
        .output()
        .unwrap();
    assert!(other.status.success(), "{other:?}");
    assert_eq!(String::from_utf8_lossy(&other.stdout).lines().count(), 1, "{other:?}");
}

#[test]
fn status_on_dynamodb() {
    let d = dynalite_with_leases_table();
    // `run` uses the default table; `status` is told it.
    status_follows_run("dynamodb", d.url(), &["--table", "leases"], &[]);
    // Released, the item stays: --all shows it free with its last fence.
    let all = Command::new(BIN)
        .args(["status", "--backend", "dynamodb", "--server", d.url(), "--table", "leases", "--all"])
        .envs(AWS_ENV)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&all.stdout);
    assert!(text.lines().any(|l| l.starts_with("watched/job-1 ") && l.ends_with("free")), "{all:?}");
}
