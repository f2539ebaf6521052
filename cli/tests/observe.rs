//! `leasehold observe` and `run --value` as users run them: real processes on loopback.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");

/// A child process killed (with its process group) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.0.id() as i32), Signal::SIGKILL);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `leasehold serve` on a free port; returns the process and its URL.
fn serve(data: &Path) -> (Proc, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--data"])
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start leasehold serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected: {line:?}"))
        .to_string();
    (Proc(child), url)
}

/// `leasehold run --protocol v2 --value VALUE` holding `key` while `cmd` runs.
fn run_valued(url: &str, key: &str, value: &str, cmd: &str) -> Proc {
    let mut c = Command::new(BIN);
    c.args(["run", "--protocol", "v2", "--ttl", "5s", "--server", url, "--key", key, "--value", value])
        .args(["--", "sh", "-c", cmd])
        .process_group(0);
    Proc(c.spawn().expect("start leasehold run"))
}

/// `leasehold observe --key KEY --json`, its stdout lines carried to a channel as they come.
fn observe(url: &str, key: &str, extra: &[&str]) -> (Proc, Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(["observe", "--server", url, "--key", key, "--json"])
        .args(extra)
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start leasehold observe");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (Proc(child), rx)
}

/// The next line `observe` prints, parsed; fails the test if none comes within 20 s.
fn next(lines: &Receiver<String>, what: &str) -> Value {
    let line =
        lines.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{what}: no line ({e})"));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {line}"))
}

/// A `GET` of `path` on the built-in server at `url`, as JSON.
fn get_json(url: &str, path: &str) -> Value {
    let http = leasehold_http::HttpClient::new(url, Duration::from_secs(2)).unwrap();
    let req = http
        .request(hyper::Method::GET, path)
        .body(http_body_util::Full::new(hyper::body::Bytes::new()))
        .unwrap();
    let resp = smol::block_on(http.send(req)).unwrap();
    assert_eq!(resp.status, 200, "GET {path}: {:?}", String::from_utf8_lossy(&resp.body));
    serde_json::from_slice(&resp.body).unwrap()
}

/// Polls `done` until it holds; fails the test, naming `what`, if that takes over 20 s.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < Duration::from_secs(20), "{what}: not within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn v2_lease(url: &str, key: &str) -> Value {
    let all = get_json(url, "/v2/leases");
    all["leases"].as_array().unwrap().iter().find(|l| l["key"] == key).cloned().unwrap_or_default()
}

#[test]
fn observe_prints_each_holder_with_its_fence_and_value_as_runs_come_and_go() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(&dir.path().join("store"));
    let (mut watcher, lines) = observe(&url, "leader", &[]);
    assert_eq!(next(&lines, "the state at the start"), serde_json::json!({"key": "leader", "holder": null}));

    let go = dir.path().join("go");
    let a = run_valued(
        &url,
        "leader",
        "10.0.0.1:8080",
        &format!("while [ ! -e {} ]; do sleep 0.05; done", go.display()),
    );
    let held = next(&lines, "a's holding");
    assert_eq!(held["holder"]["value"], "10.0.0.1:8080");
    let label = held["holder"]["label"].as_str().unwrap();
    assert!(label.ends_with(&format!(":{}", a.0.id())), "the label is run's HOST:PID: {label}");
    let fence_a = held["holder"]["fence"].as_u64().unwrap();

    // b queues behind a; its command ends at once, so after a the key goes to b, then is free.
    let mut b = run_valued(&url, "leader", "10.0.0.2:8080", "true");
    eventually("b queued", || v2_lease(&url, "leader")["waiting"] == 1);
    std::fs::write(&go, "").unwrap();
    let mut a = a;
    assert!(a.0.wait().unwrap().success());
    assert!(b.0.wait().unwrap().success());
    let held = next(&lines, "b's holding");
    assert_eq!(held["holder"]["value"], "10.0.0.2:8080");
    assert!(held["holder"]["label"].as_str().unwrap().ends_with(&format!(":{}", b.0.id())), "{held}");
    assert!(held["holder"]["fence"].as_u64().unwrap() > fence_a, "fences increase: {held} after {fence_a}");
    assert_eq!(next(&lines, "free after b"), serde_json::json!({"key": "leader", "holder": null}));

    // SIGTERM ends it with 0, and its session is closed rather than left to expire.
    kill(Pid::from_raw(watcher.0.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(watcher.0.wait().unwrap().code(), Some(0));
    let live = || {
        let port = url.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap();
        leasehold_test_servers::metric(port, "leasehold_sessions_live").unwrap()
    };
    eventually("every session closed", || live() == 0);
}

#[test]
fn observe_count_and_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(&dir.path().join("store"));
    let go = dir.path().join("go");
    let _holder =
        run_valued(&url, "k", "here", &format!("while [ ! -e {} ]; do sleep 0.05; done", go.display()));
    eventually("held", || v2_lease(&url, "k")["holder"].is_object());
    // --count 1: the holder now, then exit 0 (a script's "who leads?").
    let out =
        Command::new(BIN).args(["observe", "--server", &url, "--key", "k", "--count", "1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("k: held by ") && text.trim_end().ends_with("value \"here\""), "{text:?}");
    assert_eq!(text.lines().count(), 1, "{text:?}");
    std::fs::write(&go, "").unwrap();

    let code = |args: &[&str]| Command::new(BIN).args(args).output().unwrap().status.code();
    // A server that refuses the token: exit 2 at once, not a silent wait.
    let mut guarded = Command::new(BIN)
        .args(["serve", "--data"])
        .arg(dir.path().join("guarded"))
        .args(["--listen", "127.0.0.1:0", "--token", "s3cret"])
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(guarded.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _guarded = Proc(guarded);
    let guarded_url = line.trim().strip_prefix("listening on ").unwrap().to_string();
    assert_eq!(code(&["observe", "--server", &guarded_url, "--key", "k"]), Some(2));
    let out = Command::new(BIN)
        .args(["observe", "--server", &guarded_url, "--key", "k", "--token", "s3cret", "--count", "1"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "k: free\n", "{out:?}");
    // A dead port is waited for, and said so.
    let dead = format!("http://127.0.0.1:{}", leasehold_test_servers::free_port());
    let mut waiting = Command::new(BIN)
        .args(["observe", "--server", &dead, "--key", "k"])
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let err = waiting.stderr.take().unwrap();
    let _waiting = Proc(waiting);
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let said = rx.recv_timeout(Duration::from_secs(20)).expect("a line on stderr within 20 s");
    assert!(said.contains("waiting for the server at") && said.contains(&dead), "{said:?}");
    assert_eq!(code(&["observe", "--server", &url, "--key", "bad key"]), Some(2));
    assert_eq!(code(&["observe", "--server", "ftp://x", "--key", "k"]), Some(2));
    // --value is a session feature: with v1 a usage error, and a value must be printable.
    assert_eq!(
        code(&["run", "--protocol", "v1", "--server", &url, "--key", "k", "--value", "x", "--", "true"]),
        Some(2)
    );
    // v2 is the default on the built-in server: a value is accepted without --protocol.
    assert_eq!(code(&["run", "--server", &url, "--key", "valued", "--value", "x", "--", "true"]), Some(0));
    let bad = ["run", "--protocol", "v2", "--server", &url, "--key", "k", "--value", "a\tb", "--", "true"];
    assert_eq!(code(&bad), Some(2));
    let long = "x".repeat(65);
    let too_long =
        ["run", "--protocol", "v2", "--server", &url, "--key", "k", "--value", &long, "--", "true"];
    assert_eq!(code(&too_long), Some(2));
}
