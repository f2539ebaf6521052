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
    // Its stderr is kept: a failure must say why the waiter gave up.
    let waiter = run(backend, url, &extra, &["sh", "-c", &mark]).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let killed_at = nanos_now();
    killpg(Pid::from_raw(holder.id() as i32), Signal::SIGKILL).unwrap();
    let _ = holder.wait();
    let waited = waiter.wait_with_output().unwrap();
    assert!(
        waited.status.success(),
        "{name}: waiter failed ({}): {}",
        waited.status,
        String::from_utf8_lossy(&waited.stderr)
    );
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
    // Observe-and-wait: ttl·(1+ε) + margin (2.04 s) from when the waiter first read the last
    // version, which can be a poll (ttl/8 + jitter up to ttl/64: 281 ms) after the holder wrote
    // it just before the kill: up to 2.32 s by design, plus the child's start. The bound
    // allows 2.02 + 0.6 s (it was 0.3 s, under the design's own worst case: 2.25 s seen at
    // load 10).
    kill_9("dynamodb", d.url(), &[], Duration::from_millis(600));
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
    // v1 keys, shown by `status --protocol v1` (v2, `run`'s default, is status's default too:
    // observe_value_and_status_on_etcd_sessions covers it).
    status_follows_run("etcd", e.url(), V1, V1);
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

#[test]
fn run_on_dynamodb_sessions() {
    let d = dynalite_with_leases_table();
    let v2 = ["--protocol", "v2"];
    let dir = tempfile::tempdir().unwrap();
    let (seen, marker) = (dir.path().join("seen"), dir.path().join("started"));
    let hold = format!("echo $LEASEHOLD_OWNER > {}; touch {}; sleep 1.5", seen.display(), marker.display());
    let mut holder = holding("dynamodb", d.url(), &v2, "cli-job", &hold, &marker);
    let owner: u64 = std::fs::read_to_string(&seen).unwrap().trim().parse().expect("the session id");
    assert_ne!(owner, 0);
    // `status` shows the session by id and its public label (`HOST:PID`, never the secret).
    let out = Command::new(BIN)
        .args([
            "status",
            "--backend",
            "dynamodb",
            "--server",
            d.url(),
            "--table",
            "leases",
            "cli-job",
            "--json",
        ])
        .envs(AWS_ENV)
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let h = &doc["leases"][0]["holder"];
    assert_eq!(h["owner"], serde_json::json!(owner), "{doc}");
    assert!(h["label"].as_str().is_some_and(|l| !l.is_empty()), "the label: {doc}");
    let table = Command::new(BIN)
        .args(["status", "--backend", "dynamodb", "--server", d.url(), "--table", "leases"])
        .envs(AWS_ENV)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.lines().next().is_some_and(|l| l.ends_with(" LABEL")), "{text}");
    assert!(text.lines().nth(1).is_some_and(|l| l.ends_with(h["label"].as_str().unwrap())), "{text}");
    // Refused to another session, and to a v1 run: the same item, the same discipline.
    let busy = run("dynamodb", d.url(), &["--no-wait", "--protocol", "v2"], &["true"]).status().unwrap();
    assert_eq!(busy.code(), Some(75));
    let busy_v1 = run("dynamodb", d.url(), &["--no-wait"], &["true"]).status().unwrap();
    assert_eq!(busy_v1.code(), Some(75), "a v1 run is excluded by a v2 holder");
    assert!(holder.wait().unwrap().success());
    // Released on the way out: free at once.
    let free = run("dynamodb", d.url(), &["--no-wait", "--protocol", "v2"], &["true"]).status().unwrap();
    assert_eq!(free.code(), Some(0));
    // A semaphore is not built on DynamoDB: a usage error, not a wait.
    let sem = run("dynamodb", d.url(), &["--protocol", "v2", "--limit", "2"], &["true"]).status().unwrap();
    assert_eq!(sem.code(), Some(2));
    // kill -9 of the holder: the waiter, polling, takes over the last version it saw once it
    // has stood still ttl·(1+ε) + margin. That version was written up to a renewal interval
    // (ttl/4) before the kill and seen up to a poll interval (ttl/8) after it was written.
    kill_9("dynamodb v2", d.url(), &v2, Duration::from_millis(900));
}

/// `leasehold observe --backend etcd --json`, its stdout lines carried to a channel as they come.
fn observe_etcd(url: &str, key: &str) -> (Proc, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = Command::new(BIN)
        .args(["observe", "--backend", "etcd", "--server", url, "--key", key, "--json"])
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start leasehold observe");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (Proc(child), rx)
}

/// A child process killed (with its process group) when dropped.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.0.id() as i32), Signal::SIGKILL);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next line `observe` prints, parsed; fails the test if none comes within 20 s.
fn next_line(lines: &std::sync::mpsc::Receiver<String>, what: &str) -> serde_json::Value {
    let line =
        lines.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{what}: no line ({e})"));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {line}"))
}

/// `status --backend etcd --protocol v2 --json`'s rows.
fn etcd_v2_status(url: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["status", "--backend", "etcd", "--protocol", "v2", "--server", url, "--json"])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    doc["leases"].as_array().cloned().unwrap_or_default()
}

#[test]
fn observe_value_and_status_on_etcd_sessions() {
    let e = etcd();
    let dir = tempfile::tempdir().unwrap();
    let (mut watcher, lines) = observe_etcd(e.url(), "leader");
    assert_eq!(next_line(&lines, "the start"), serde_json::json!({"key": "leader", "holder": null}));

    let (go, marker) = (dir.path().join("go"), dir.path().join("started"));
    let hold = format!("touch {}; while [ ! -e {} ]; do sleep 0.05; done", marker.display(), go.display());
    let flags = ["--protocol", "v2", "--value", "10.0.0.1:8080"];
    let leader = holding("etcd", e.url(), &flags, "leader", &hold, &marker);
    let held = next_line(&lines, "the leader");
    assert_eq!(held["holder"]["value"], "10.0.0.1:8080", "{held}");
    let label = held["holder"]["label"].as_str().unwrap().to_string();
    assert!(label.ends_with(&format!(":{}", leader.id())), "the label is run's HOST:PID: {label}");
    let fence = held["holder"]["fence"].as_u64().unwrap();

    // status shows it by label, with the fence observers were told and the value.
    let rows = etcd_v2_status(e.url(), &[]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let h = &rows[0]["holders"][0];
    assert_eq!((rows[0]["key"].as_str(), h["label"].as_str()), (Some("leader"), Some(label.as_str())));
    assert_eq!((h["fence"].as_u64(), h["value"].as_str()), (Some(fence), Some("10.0.0.1:8080")));
    assert_eq!(h["session"], held["holder"]["session"], "{rows:?}");
    assert!(h["remaining"].as_u64().unwrap() > 0 && h["ttl"].as_u64().unwrap() >= 2_000_000, "{rows:?}");
    assert_eq!(rows[0]["waiting"], 0);
    let table = Command::new(BIN)
        .args(["status", "--backend", "etcd", "--protocol", "v2", "--server", e.url(), "leader"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    let row: Vec<&str> =
        text.lines().find(|l| l.starts_with("leader ")).expect("a row").split_whitespace().collect();
    assert_eq!((row[1], row[2]), (fence.to_string().as_str(), label.as_str()), "{text}");
    let unknown = Command::new(BIN)
        .args(["status", "--backend", "etcd", "--protocol", "v2", "--server", e.url(), "nobody"])
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(1), "{unknown:?}");

    // The leader ends: observers hear the key free.
    std::fs::write(&go, "").unwrap();
    let mut leader = leader;
    assert!(leader.wait().unwrap().success());
    assert_eq!(next_line(&lines, "free"), serde_json::json!({"key": "leader", "holder": null}));
    assert_eq!(etcd_v2_status(e.url(), &[]), Vec::<serde_json::Value>::new());
    nix::sys::signal::kill(Pid::from_raw(watcher.0.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(watcher.0.wait().unwrap().code(), Some(0));
}

#[test]
fn run_limit_is_a_semaphore_on_etcd_sessions() {
    let e = etcd();
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let v2 = ["--protocol", "v2", "--limit", "3"];
    let mut slots = Vec::new();
    for i in 0..3 {
        let marker = dir.path().join(format!("s{i}"));
        let hold = format!(
            "echo $LEASEHOLD_FENCE > {0}.fence; touch {0}; while [ ! -e {1} ]; do sleep 0.05; done",
            marker.display(),
            go.display()
        );
        slots.push(Proc(holding("etcd", e.url(), &v2, "pool", &hold, &marker)));
    }
    let fences: Vec<u64> = (0..3)
        .map(|i| {
            std::fs::read_to_string(dir.path().join(format!("s{i}.fence"))).unwrap().trim().parse().unwrap()
        })
        .collect();
    assert!(fences.windows(2).all(|w| w[0] < w[1]), "{fences:?}");
    // A fourth waits; one with another limit is refused (exit 2), at once.
    let fourth_marker = dir.path().join("fourth");
    let fourth_cmd = format!("touch {}", fourth_marker.display());
    let mut fourth = run(
        "etcd",
        e.url(),
        &["--key", "pool", "--protocol", "v2", "--limit", "3"],
        &["sh", "-c", &fourth_cmd],
    )
    .spawn()
    .unwrap();
    eventually("the fourth queued", || etcd_keys(e.url(), "leasehold/v2/pool@").len() == 4);
    let other = run("etcd", e.url(), &["--key", "pool", "--protocol", "v2", "--limit", "2"], &["true"])
        .status()
        .unwrap();
    assert_eq!(other.code(), Some(2), "a mismatched limit is a usage error");
    let rows = etcd_v2_status(e.url(), &[]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0]["limit"].as_u64(), rows[0]["waiting"].as_u64()), (Some(3), Some(1)), "{rows:?}");
    let shown: Vec<u64> =
        rows[0]["holders"].as_array().unwrap().iter().map(|h| h["fence"].as_u64().unwrap()).collect();
    assert_eq!(shown, fences, "a row per slot holder, oldest first");
    assert!(!fourth_marker.exists(), "three slots, all held");
    std::fs::write(&go, "").unwrap();
    assert!(fourth.wait().unwrap().success());
    assert!(fourth_marker.exists());
    for mut s in slots {
        assert!(s.0.wait().unwrap().success());
    }
}

#[test]
fn v1_and_v2_runs_share_one_key_namespace_on_etcd() {
    let e = etcd();
    let dir = tempfile::tempdir().unwrap();
    let fence_of = |path: &std::path::Path| -> u64 {
        std::fs::read_to_string(path).unwrap().trim().parse().expect("a fence")
    };
    // A v1 holder: a session is refused without waiting, and v2's status shows the key held by v1.
    let (go, marker, v1_fence) = (dir.path().join("go"), dir.path().join("held"), dir.path().join("v1"));
    let hold = format!(
        "echo $LEASEHOLD_FENCE > {}; touch {}; while [ ! -e {} ]; do sleep 0.05; done",
        v1_fence.display(),
        marker.display(),
        go.display()
    );
    let mut holder = holding("etcd", e.url(), V1, "mixed", &hold, &marker);
    let v2_no_wait = ["--key", "mixed", "--no-wait", "--protocol", "v2"];
    assert_eq!(run("etcd", e.url(), &v2_no_wait, &["true"]).status().unwrap().code(), Some(75));
    let rows = etcd_v2_status(e.url(), &[]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["key"], "mixed");
    assert_eq!(rows[0]["holders"], serde_json::json!([]), "{rows:?}");
    assert_eq!(rows[0]["last_fence"].as_u64(), Some(fence_of(&v1_fence)), "{rows:?}");
    assert!(rows[0]["v1_remaining"].as_u64().is_some_and(|us| us > 0), "{rows:?}");
    // A waiting session runs once the v1 holder ends, under a higher fence.
    let v2_fence = dir.path().join("v2");
    let record = format!("echo $LEASEHOLD_FENCE > {}", v2_fence.display());
    let mut waiter = run("etcd", e.url(), &["--key", "mixed", "--protocol", "v2"], &["sh", "-c", &record])
        .spawn()
        .unwrap();
    eventually("the session queued", || etcd_keys(e.url(), "leasehold/v2/mixed@").len() == 2);
    assert!(!v2_fence.exists(), "the session ran while the v1 holder held the key");
    std::fs::write(&go, "").unwrap();
    assert!(holder.wait().unwrap().success());
    assert!(waiter.wait().unwrap().success());
    assert!(fence_of(&v2_fence) > fence_of(&v1_fence));
    // A session holder: v1 is refused without waiting.
    let (go, marker) = (dir.path().join("go2"), dir.path().join("held2"));
    let hold = format!("touch {}; while [ ! -e {} ]; do sleep 0.05; done", marker.display(), go.display());
    let mut holder = holding("etcd", e.url(), &["--protocol", "v2"], "mixed", &hold, &marker);
    let v1_no_wait = ["--key", "mixed", "--no-wait", "--protocol", "v1"];
    assert_eq!(run("etcd", e.url(), &v1_no_wait, &["true"]).status().unwrap().code(), Some(75));
    std::fs::write(&go, "").unwrap();
    assert!(holder.wait().unwrap().success());
    assert_eq!(run("etcd", e.url(), &v1_no_wait, &["true"]).status().unwrap().code(), Some(0));
    assert_eq!(etcd_keys(e.url(), "leasehold/"), Vec::<String>::new(), "nothing left behind");
}
