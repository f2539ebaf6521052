//! The `leasehold` binary as users run it: real processes on loopback.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use leasehold_core::{parse_key, Duration as LDuration, Op, OwnerId, Reply, Request, RequestId};
use leasehold_http::{Backend, BuiltinBackend};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

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
    serve_with(data, &[])
}

/// `leasehold serve` on a free port with `extra` arguments.
fn serve_with(data: &Path, extra: &[&str]) -> (Proc, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--data"])
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start leasehold serve");
    let out = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected: {line:?}"))
        .to_string();
    (Proc(child), url)
}

/// `run --protocol v1`'s flag (v2 is the default on the built-in server).
const V1: &[&str] = &["--protocol", "v1"];

fn run_cmd(url: &str, key: &str, ttl: &str, extra: &[&str], cmd: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["run", "--key", key, "--ttl", ttl, "--server", url]).args(extra).arg("--").args(cmd);
    c.process_group(0);
    c
}

fn call(url: &str, key: &str, owner: u64, op: Op) -> Reply {
    let b = BuiltinBackend::new(url, None, Duration::from_secs(2)).unwrap();
    let req = Request { id: RequestId(1), owner: OwnerId(owner), op };
    smol::block_on(b.call(&parse_key(key).unwrap(), req)).expect("server answers")
}

#[test]
fn two_run_processes_never_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(&dir.path().join("store"));
    let log = dir.path().join("fenced.log");
    // Each child appends "start FENCE T" and "end FENCE T" around a short sleep, three times
    // per contender.
    let script = format!(
        "for i in 1 2 3; do {BIN} run --key shared --ttl 1s --server {url} -- sh -c \
         'echo start $LEASEHOLD_FENCE $(date +%s%N) >> {log}; sleep 0.2; echo end $LEASEHOLD_FENCE $(date +%s%N) >> {log}' \
         || exit 1; done",
        log = log.display()
    );
    let mut a = Proc(Command::new("sh").args(["-c", &script]).process_group(0).spawn().unwrap());
    let mut b = Proc(Command::new("sh").args(["-c", &script]).process_group(0).spawn().unwrap());
    assert!(a.0.wait().unwrap().success());
    assert!(b.0.wait().unwrap().success());

    let text = std::fs::read_to_string(&log).unwrap();
    let entries: Vec<(String, u64, u128)> = text
        .lines()
        .map(|l| {
            let p: Vec<&str> = l.split_whitespace().collect();
            (p[0].to_string(), p[1].parse().unwrap(), p[2].parse().unwrap())
        })
        .collect();
    assert_eq!(entries.len(), 12, "{text}");
    // Lines alternate start/end with the same fence: no one started while another held.
    let mut last_fence = 0;
    for pair in entries.chunks(2) {
        assert_eq!((pair[0].0.as_str(), pair[1].0.as_str()), ("start", "end"), "overlap in:\n{text}");
        assert_eq!(pair[0].1, pair[1].1, "overlap in:\n{text}");
        assert!(pair[0].1 > last_fence, "fences must increase:\n{text}");
        last_fence = pair[0].1;
    }
}

#[test]
fn exit_codes_are_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(&dir.path().join("store"));
    let code = |c: &mut Command| c.status().unwrap().code();

    assert_eq!(code(&mut run_cmd(&url, "codes", "2s", &[], &["sh", "-c", "exit 7"])), Some(7));
    assert_eq!(code(&mut run_cmd(&url, "codes", "2s", &[], &["no-such-command-here"])), Some(127));
    let env = run_cmd(
        &url,
        "codes",
        "2s",
        &[],
        &["sh", "-c", "test -n \"$LEASEHOLD_FENCE\" && test \"$LEASEHOLD_KEY\" = codes"],
    )
    .status()
    .unwrap();
    assert!(env.success(), "fence and key are exported to the command");

    let _holder = Proc(run_cmd(&url, "codes", "2s", &[], &["sleep", "60"]).spawn().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(code(&mut run_cmd(&url, "codes", "2s", &["--no-wait"], &["true"])), Some(75));
    assert_eq!(code(&mut run_cmd(&url, "codes", "2s", &["--timeout", "300ms"], &["true"])), Some(75));
    assert_eq!(code(&mut run_cmd(&url, "bad key", "2s", &[], &["true"])), Some(2));
    assert_eq!(code(&mut run_cmd(&url, "codes", "0s", &[], &["true"])), Some(2));
    assert_eq!(
        code(&mut run_cmd("http://127.0.0.1:9", "codes", "1s", &["--timeout", "500ms"], &["true"])),
        Some(75)
    );
}

/// Polls `done` until it holds; fails the test, naming `what`, if that takes over 20 s.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < Duration::from_secs(20), "{what}: not within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A counter from the server's /metrics.
fn metric(url: &str, name: &str) -> u64 {
    let port = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port in the URL");
    leasehold_test_servers::metric(port, name).unwrap_or_else(|| panic!("no {name} at {url}/metrics"))
}

/// Whether someone else can take `key` at once (and gives it back).
fn free_now(url: &str, key: &str) -> bool {
    let ttl = LDuration::from_secs(30);
    match call(url, key, 999, Op::Acquire { ttl }) {
        Reply::Granted { fence, .. } => {
            assert_eq!(call(url, key, 999, Op::Release { fence }), Reply::Released);
            true
        }
        _ => false,
    }
}

#[test]
fn signals_end_the_command_and_release_at_once() {
    // Protocol v1 (its polling is what shows that run asked); v2's signal handling is
    // `run_on_sessions_keeps_its_exit_codes_and_signal_handling`.
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(&dir.path().join("store"));
    // A 30 s ttl: only a release frees the key within this test.
    let script = |trap: &str, marker: &Path| {
        format!("trap 'exit {trap}' TERM INT; touch {}; while :; do sleep 0.05; done", marker.display())
    };

    // SIGTERM to leasehold alone (a service manager stopping it): passed on to the command.
    let started = dir.path().join("term-started");
    let mut run =
        Proc(run_cmd(&url, "sig", "30s", V1, &["sh", "-c", &script("3", &started)]).spawn().unwrap());
    eventually("the command starts", || started.exists());
    assert!(!free_now(&url, "sig"));
    nix::sys::signal::kill(Pid::from_raw(run.0.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(run.0.wait().unwrap().code(), Some(3), "the command's own exit code");
    assert!(free_now(&url, "sig"), "released on the way out, not left to expire");

    // Ctrl-C on a terminal: SIGINT to the whole process group. Not passed on a second time.
    let started = dir.path().join("int-started");
    let mut run =
        Proc(run_cmd(&url, "sig", "30s", V1, &["sh", "-c", &script("4", &started)]).spawn().unwrap());
    eventually("the command starts", || started.exists());
    killpg(Pid::from_raw(run.0.id() as i32), Signal::SIGINT).unwrap();
    assert_eq!(run.0.wait().unwrap().code(), Some(4));
    assert!(free_now(&url, "sig"));

    // SIGTERM while waiting for a held key: the wait is cancelled, the command never runs.
    let holder = match call(&url, "sig", 7, Op::Acquire { ttl: LDuration::from_secs(30) }) {
        Reply::Granted { fence, .. } => fence,
        other => panic!("{other:?}"),
    };
    let refusals = metric(&url, "leasehold_refusals_total");
    let ran = dir.path().join("ran");
    let touch = format!("touch {}", ran.display());
    let mut run = Proc(run_cmd(&url, "sig", "30s", V1, &["sh", "-c", &touch]).spawn().unwrap());
    eventually("leasehold run asks for the key", || metric(&url, "leasehold_refusals_total") != refusals);
    nix::sys::signal::kill(Pid::from_raw(run.0.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(run.0.wait().unwrap().code(), Some(128 + 15));
    assert!(!ran.exists(), "the command ran without the lease");
    assert_eq!(call(&url, "sig", 7, Op::Release { fence: holder }), Reply::Released, "still ours");
}

#[test]
fn a_lost_lease_stops_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let (server, url) = serve(&dir.path().join("store"));
    let mut run = Proc(run_cmd(&url, "lost", "1s", &["--grace", "200ms"], &["sleep", "60"]).spawn().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    drop(server); // the authority vanishes; renewals fail
    let t = Instant::now();
    let status = run.0.wait().unwrap();
    assert_eq!(status.code(), Some(76));
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
}

#[test]
fn a_killed_server_keeps_its_grants_and_fences() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let ttl = LDuration::from_secs(30);
    let (server, url) = serve(&store);
    let Reply::Granted { fence: f1, .. } = call(&url, "durable", 1, Op::Acquire { ttl }) else { panic!() };
    let Reply::Granted { fence: f2, .. } = call(&url, "other", 1, Op::Acquire { ttl }) else { panic!() };
    assert_eq!(call(&url, "other", 1, Op::Release { fence: f2 }), Reply::Released);
    drop(server); // SIGKILL: no shutdown path runs

    let (_server, url) = serve(&store);
    assert!(matches!(call(&url, "durable", 2, Op::Acquire { ttl }), Reply::Busy { .. }), "grant survived");
    assert_eq!(call(&url, "durable", 1, Op::Renew { fence: f1, ttl }), Reply::Granted { fence: f1, ttl });
    let Reply::Granted { fence: f3, .. } = call(&url, "other", 2, Op::Acquire { ttl }) else { panic!() };
    assert!(f3 > f2, "fence {f3} after {f2}");

    let out = Command::new(BIN).args(["status", "durable", "--server", &url]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("durable") && text.contains(&format!(" {f1} ")), "{text}");
    let missing = Command::new(BIN).args(["status", "never-used", "--server", &url]).output().unwrap();
    assert_eq!(missing.status.code(), Some(1));
    let dead = Command::new(BIN).args(["status", "--server", "http://127.0.0.1:9"]).output().unwrap();
    assert_eq!(dead.status.code(), Some(2));
}

/// Runs `leasehold demo` (ttl 2 s) with `extra` arguments, checks what holds under either
/// protocol, and returns its output.
fn demo(extra: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["demo", "--duration", "8s", "--kill-after", "2s", "--stop-after", "4s"])
        .args(extra)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("kill -9") && text.contains("kill -STOP") && text.contains("kill -CONT"), "{text}");
    let verdict = text.lines().find(|l| l.starts_with("VERDICT: PASS")).unwrap_or_else(|| panic!("{text}"));
    // "… N interleaved holders (M stopped on purpose), A stale writes accepted, R stale writes refused"
    let count = |what: &str| -> u64 {
        let before = verdict.split(what).next().unwrap_or_else(|| panic!("no {what:?} in {verdict}"));
        before.split_whitespace().last().and_then(|n| n.trim_start_matches('(').parse().ok()).unwrap()
    };
    assert!(count(" stale writes refused") >= 1, "{verdict}");
    assert_eq!(count(" stale writes accepted"), 0, "{verdict}");
    assert_eq!(count(" interleaved holders"), count(" stopped on purpose"), "{verdict}");
    assert!(text.contains("REFUSED"), "{text}");
    // "failover after kill -9: F s; bound ttl·(1+ε) = B s; …": within the bound, plus a v1
    // retry's jitter (ttl/64) and scheduling slack. Not sooner is the fence analysis's part.
    let failover = text
        .lines()
        .find_map(|l| l.strip_prefix("failover after kill -9: "))
        .unwrap_or_else(|| panic!("{text}"));
    let secs =
        |s: &str| -> f64 { s.trim().trim_end_matches('s').parse().unwrap_or_else(|_| panic!("{failover}")) };
    let (took, rest) = failover.split_once(';').unwrap();
    let bound = secs(rest.split('=').nth(1).unwrap().split(';').next().unwrap());
    assert!((2.0..2.03).contains(&bound), "{failover}");
    assert!(secs(took) <= bound + 2.0 / 64.0 + 0.1, "{failover}");
    text
}

/// The numbers in `line` after `label`, e.g. `"max "` in "… max 3.2 ms".
fn figure(text: &str, line: &str, label: &str) -> f64 {
    let l = text.lines().find(|l| l.starts_with(line)).unwrap_or_else(|| panic!("no {line:?} in {text}"));
    let after = l.split(label).nth(1).unwrap_or_else(|| panic!("no {label:?} in {l}"));
    after.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{l}"))
}

#[test]
fn demo_on_sessions_refuses_the_stopped_holders_stale_write_and_grants_in_fifo_order() {
    let text = demo(&[]);
    assert!(text.contains("protocol v2"), "{text}");
    // Every grant made while others waited went to the one that had waited longest (the
    // session queue's FIFO). There is at least one: the killed holder's two rivals both wait
    // out its session's ttl, and only one of them gets the key.
    assert_eq!(figure(&text, "grants while others waited:", " to the longest waiter, "), 0.0, "{text}");
    let contested = figure(&text, "grants while others waited:", " of ");
    assert!(contested >= 1.0, "{text}");
    // A pushed hand-off waits for no poll: at worst for the waiter's next keepalive (ttl/4 =
    // 500 ms) if none was held at the release, plus scheduling slack.
    if !text.contains("hand-off after a release: none seen") {
        let max = figure(&text, "hand-off after a release", " max ");
        assert!(max <= 500.0 + 500.0, "{text}");
    }
}

#[test]
fn demo_on_v1_leases_refuses_the_stopped_holders_stale_write() {
    let text = demo(&["--protocol", "v1"]);
    assert!(text.contains("protocol v1") && text.contains("waiters poll"), "{text}");
}

#[test]
fn tls_settings_are_checked_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(&dir.path().join("store"));
    let marker = dir.path().join("ran");
    let touch = format!("touch {}", marker.display());

    // A CA file that does not exist or holds no certificate: exit 2, naming the file.
    let not_pem = dir.path().join("not-a-ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    for ca in [dir.path().join("missing.pem"), not_pem] {
        let out = run_cmd(&url, "tls", "2s", &["--ca-file", ca.to_str().unwrap()], &["sh", "-c", &touch])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("CA file"), "{out:?}");
        let status =
            Command::new(BIN).args(["status", "--server", &url, "--ca-file"]).arg(&ca).output().unwrap();
        assert_eq!(status.status.code(), Some(2), "{status:?}");
    }
    assert!(!marker.exists(), "the command ran without a lease");

    // https:// to a server that speaks plain HTTP: a TLS failure, reported, never a grant.
    let https = url.replace("http://", "https://");
    let out = Command::new(BIN).args(["status", "--server", &https]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).to_lowercase().contains("tls"), "{out:?}");
    let code = run_cmd(&https, "tls", "2s", &["--timeout", "500ms"], &["sh", "-c", &touch]).status().unwrap();
    assert_eq!(code.code(), Some(75));
    assert!(!marker.exists(), "the command ran without a lease");
}

/// Writes `text` to `dir/name` and returns the path, as a command-line argument.
fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// Runs `cmd` to the end, killing it (and failing the test) if it takes over 20 s.
fn output_within_20s(cmd: &mut Command) -> std::process::Output {
    let mut child = Proc(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap());
    eventually(&format!("{cmd:?} exits"), || child.0.try_wait().unwrap().is_some());
    let mut out = std::process::Output { status: child.0.wait().unwrap(), stdout: vec![], stderr: vec![] };
    use std::io::Read;
    child.0.stdout.take().unwrap().read_to_end(&mut out.stdout).unwrap();
    child.0.stderr.take().unwrap().read_to_end(&mut out.stderr).unwrap();
    out
}

#[test]
fn https_servers_are_trusted_through_the_ca_file() {
    use leasehold_test_servers::tls::{Ca, Terminator};
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(&dir.path().join("store"));
    let ca = Ca::new("leasehold cli test CA");
    let t = Terminator::start(
        ca.server_config(&["localhost"]),
        url.strip_prefix("http://").unwrap().parse().unwrap(),
    );
    let https = format!("https://localhost:{}", t.addr().port());
    let ran = dir.path().join("ran");
    let touch = format!("test -n \"$LEASEHOLD_FENCE\" && touch {}", ran.display());

    // Not trusted: no --timeout, yet the first attempt settles it. Exit 2, naming the cause.
    let out = output_within_20s(&mut run_cmd(&https, "tls-run", "5s", &[], &["sh", "-c", &touch]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not issued by a trusted CA"), "{out:?}");
    assert!(!ran.exists(), "the command ran without a lease");
    assert_eq!(t.accepted().len(), 0);

    // Trusted through --ca-file: the lease is taken over https and the command runs.
    let pem = dir.path().join("ca.pem");
    ca.write_pem(&pem);
    let ca_file = ["--ca-file", pem.to_str().unwrap()];
    let out = output_within_20s(&mut run_cmd(&https, "tls-run", "5s", &ca_file, &["sh", "-c", &touch]));
    assert!(out.status.success(), "{out:?}");
    assert!(ran.exists(), "the command ran under the lease");
    let status = output_within_20s(Command::new(BIN).args(["status", "--server", &https]).args(ca_file));
    assert!(status.status.success(), "{status:?}");
    assert!(t.accepted().iter().all(|a| a.sni.as_deref() == Some("localhost")), "{:?}", t.accepted());
}

#[test]
fn etcd_with_client_certificate_auth_through_the_cli() {
    use leasehold_test_servers::tls::{etcd_tls, Ca};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("leasehold cli etcd CA");
    let etcd = etcd_tls(&ca);
    let file = |name: &str, text: &str| write_file(dir.path(), name, text);
    let ca_file = file("ca.pem", ca.pem());
    let (cert, key) = ca.client_cert("cli");
    let (cert, key) = (file("client.pem", &cert), file("client-key.pem", &key));
    let ran = dir.path().join("ran");
    let touch = format!("test -n \"$LEASEHOLD_FENCE\" && touch {}", ran.display());
    let base = ["--backend", "etcd", "--ca-file", ca_file.as_str()];

    // Without a client certificate etcd refuses the connection: exit 2 at the first attempt.
    let out = output_within_20s(&mut run_cmd(etcd.url(), "mtls", "5s", &base, &["sh", "-c", &touch]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("client certificate"), "{out:?}");
    assert!(!ran.exists());

    // A certificate without its key is a usage error clap reports.
    let args = [&base[..], &["--client-cert", &cert]].concat();
    let out = output_within_20s(&mut run_cmd(etcd.url(), "mtls", "5s", &args, &["true"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--client-key"), "{out:?}");

    // With it, the command runs under a lease etcd granted.
    let args = [&base[..], &["--client-cert", &cert, "--client-key", &key]].concat();
    let out = output_within_20s(&mut run_cmd(etcd.url(), "mtls", "5s", &args, &["sh", "-c", &touch]));
    assert!(out.status.success(), "{out:?}");
    assert!(ran.exists(), "the command ran under the lease");
}

#[test]
fn serve_over_https_with_and_without_client_certificates() {
    use leasehold_test_servers::tls::Ca;
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| write_file(dir.path(), name, text);
    let ca = Ca::new("leasehold serve test CA");
    let ca_file = file("ca.pem", ca.pem());
    let (cert, key) = ca.server_cert(&["localhost", "127.0.0.1"]);
    let (cert, key) = (file("server.pem", &cert), file("server-key.pem", &key));
    let (ccert, ckey) = ca.client_cert("worker");
    let (ccert, ckey) = (file("client.pem", &ccert), file("client-key.pem", &ckey));
    let ran = dir.path().join("ran");
    let touch = format!("test -n \"$LEASEHOLD_FENCE\" && touch {}", ran.display());

    // https with a bearer token: the token travels encrypted, the CA vouches for the server.
    let tls = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str(), "--token", "s3cret"];
    let (_server, url) = serve_with(&dir.path().join("store-1"), &tls);
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let trusted = ["--ca-file", ca_file.as_str(), "--token", "s3cret"];
    let out = output_within_20s(&mut run_cmd(&url, "tls-serve", "5s", &trusted, &["sh", "-c", &touch]));
    assert!(out.status.success(), "{out:?}");
    assert!(ran.exists());
    std::fs::remove_file(&ran).unwrap();
    // Without the CA the client refuses the server, at once.
    let out = output_within_20s(&mut run_cmd(&url, "tls-serve", "5s", &["--token", "s3cret"], &["true"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not issued by a trusted CA"), "{out:?}");
    // Plain http to the https port gets nothing it could mistake for an answer.
    let plain = url.replace("https://", "http://");
    let out = output_within_20s(&mut run_cmd(&plain, "tls-serve", "5s", &["--timeout", "1s"], &["true"]));
    assert_eq!(out.status.code(), Some(75), "{out:?}");

    // Mutual TLS: only clients with a certificate from the client CA get in.
    let mtls = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str(), "--client-ca", ca_file.as_str()];
    let (_server, url) = serve_with(&dir.path().join("store-2"), &mtls);
    let out = output_within_20s(&mut run_cmd(&url, "mtls-serve", "5s", &["--ca-file", &ca_file], &["true"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("client certificate"), "{out:?}");
    let with_cert =
        ["--ca-file", ca_file.as_str(), "--client-cert", ccert.as_str(), "--client-key", ckey.as_str()];
    let out = output_within_20s(&mut run_cmd(&url, "mtls-serve", "5s", &with_cert, &["sh", "-c", &touch]));
    assert!(out.status.success(), "{out:?}");
    assert!(ran.exists());

    // Unusable TLS files stop `serve` before it listens: exit 2, naming the problem.
    for args in [
        vec!["--tls-cert", cert.as_str(), "--tls-key", ckey.as_str()],
        vec!["--tls-cert", ca_file.as_str(), "--tls-key", dir.path().join("missing").to_str().unwrap()],
    ] {
        let out = output_within_20s(
            Command::new(BIN)
                .args(["serve", "--data"])
                .arg(dir.path().join("store-3"))
                .args(["--listen", "127.0.0.1:0"])
                .args(&args),
        );
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("TLS"), "{out:?}");
    }
}

/// Reads `child`'s stderr line by line until a line satisfies `wanted`; fails the test with
/// what it read if none does within 20 s.
fn stderr_line(child: &mut Proc, what: &str, wanted: impl Fn(&str) -> bool + Send + 'static) -> String {
    let err = child.0.stderr.take().expect("stderr piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let hit = wanted(&line);
            if tx.send((hit, line)).is_err() || hit {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Ok((hit, line)) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if hit {
            return line;
        }
        seen.push(line);
    }
    panic!("{what}: no such line on stderr within 20 s; saw {seen:#?}");
}

#[test]
fn waiting_says_whether_the_key_is_held_or_the_server_unreachable() {
    for protocol in ["v2", "v1"] {
        let flags = &["--protocol", protocol][..];
        // A dead port: the wait is for a server, said on a pipe too, with the address and cause.
        let dead = format!("127.0.0.1:{}", leasehold_test_servers::free_port());
        let mut waiting = Proc(
            run_cmd(&format!("http://{dead}"), "unreachable", "2s", flags, &["true"])
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let line = stderr_line(&mut waiting, "unreachable server", |l| l.contains("unreachable"));
        assert!(
            line.contains(&dead) && line.contains("refused") && line.contains("retrying"),
            "{protocol}: {line}"
        );
        assert!(!line.contains("held by someone else"), "{protocol}: {line}");
        drop(waiting);

        // A held key (by a v1 lease: one namespace): the wait is for the holder; v1 polls and
        // shows the grant's remaining time.
        let dir = tempfile::tempdir().unwrap();
        let (_server, url) = serve(&dir.path().join("store"));
        let ttl = LDuration::from_secs(30);
        assert!(matches!(call(&url, "taken", 5, Op::Acquire { ttl }), Reply::Granted { .. }));
        let mut waiting =
            Proc(run_cmd(&url, "taken", "2s", flags, &["true"]).stderr(Stdio::piped()).spawn().unwrap());
        let line = stderr_line(&mut waiting, "held key", |l| l.contains("waiting for"));
        assert!(line.contains("held by someone else"), "{protocol}: {line}");
        assert!(protocol == "v2" || line.contains("runs out within"), "{protocol}: {line}");
        assert!(!line.contains("unreachable"), "{protocol}: {line}");
    }
}

#[test]
fn run_timeout_waits_the_whole_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(&dir.path().join("store"));
    let ttl = LDuration::from_secs(30);
    assert!(matches!(call(&url, "long-held", 5, Op::Acquire { ttl }), Reply::Granted { .. }));
    let started = Instant::now();
    let out = output_within_20s(&mut run_cmd(&url, "long-held", "15s", &["--timeout", "2s"], &["true"]));
    let waited = started.elapsed();
    assert_eq!(out.status.code(), Some(75), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(waited >= Duration::from_secs(2), "gave up after {waited:?}");
    eprintln!("run --timeout 2s on a key held for 30 s: exit 75 after {waited:?}");

    // Against a server nobody answers for, the same.
    let dead = format!("http://127.0.0.1:{}", leasehold_test_servers::free_port());
    let started = Instant::now();
    let out = output_within_20s(&mut run_cmd(&dead, "k", "15s", &["--timeout", "3s"], &["true"]));
    let waited = started.elapsed();
    assert_eq!(out.status.code(), Some(75), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(waited >= Duration::from_secs(3), "gave up after {waited:?}");
    eprintln!("run --timeout 3s against a dead port: exit 75 after {waited:?}");
}

/// A `GET` of `path` on the built-in server at `url`, as JSON.
fn get_json(url: &str, path: &str) -> serde_json::Value {
    let http = leasehold_http::HttpClient::new(url, Duration::from_secs(2)).unwrap();
    let req = http
        .request(hyper::Method::GET, path)
        .body(http_body_util::Full::new(hyper::body::Bytes::new()))
        .unwrap();
    let resp = smol::block_on(http.send(req)).unwrap();
    assert_eq!(resp.status, 200, "GET {path}: {:?}", String::from_utf8_lossy(&resp.body));
    serde_json::from_slice(&resp.body).unwrap()
}

#[test]
fn logs_on_a_pipe_have_no_colour_and_owner_ids_are_decimal_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(&dir.path().join("store"));
    let owner_file = dir.path().join("owner");
    let marker = dir.path().join("started");
    let script =
        format!("echo $LEASEHOLD_OWNER > {}; touch {}; sleep 60", owner_file.display(), marker.display());
    let mut run = Proc(
        run_cmd(&url, "owned", "5s", &["--protocol", "v1"], &["sh", "-c", &script])
            .env("LEASEHOLD_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    eventually("the command starts", || marker.exists());
    let exported = std::fs::read_to_string(&owner_file).unwrap().trim().to_string();
    let served = get_json(&url, "/v1/leases/owned")["holder"]["owner"].as_u64().expect("held");
    assert_eq!(exported, served.to_string(), "LEASEHOLD_OWNER as the server reports the holder");
    let status =
        Command::new(BIN).args(["status", "owned", "--protocol", "v1", "--server", &url]).output().unwrap();
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(shown.split_whitespace().any(|w| w == exported), "status shows {exported}:\n{shown}");

    // stderr is a pipe here: the info line about the grant, without colour codes.
    killpg(Pid::from_raw(run.0.id() as i32), Signal::SIGTERM).unwrap();
    run.0.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut run.0.stderr.take().unwrap(), &mut log).unwrap();
    assert!(log.contains("acquired"), "{log:?}");
    assert!(!log.contains('\x1b'), "ANSI escape codes on a pipe: {log:?}");
}

/// `run --protocol v2` with `extra` flags.
fn run_v2(url: &str, key: &str, extra: &[&str], cmd: &[&str]) -> Command {
    let mut flags = vec!["--protocol", "v2"];
    flags.extend_from_slice(extra);
    run_cmd(url, key, "5s", &flags, cmd)
}

/// The `GET /v2/leases` entry of `key` (`null` if sessions never used it).
fn v2_lease(url: &str, key: &str) -> serde_json::Value {
    let all = get_json(url, "/v2/leases");
    all["leases"].as_array().unwrap().iter().find(|l| l["key"] == key).cloned().unwrap_or_default()
}

#[test]
fn run_on_sessions_hands_the_key_to_waiters_in_the_order_they_queued() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(&dir.path().join("store"));
    let log = dir.path().join("order.log");
    let go = dir.path().join("go");
    let hold = format!(
        "echo holder $LEASEHOLD_FENCE >> {0}; while [ ! -e {1} ]; do sleep 0.05; done",
        log.display(),
        go.display()
    );
    let mut holder = Proc(run_v2(&url, "turns", &[], &["sh", "-c", &hold]).spawn().unwrap());
    eventually("the holder runs", || v2_lease(&url, "turns")["holder"].is_object());
    let mut waiters = Vec::new();
    for i in 1..=3 {
        let write = format!("echo w{i} $LEASEHOLD_FENCE >> {}", log.display());
        waiters.push(Proc(run_v2(&url, "turns", &[], &["sh", "-c", &write]).spawn().unwrap()));
        // The next one starts only once this one is queued at the server.
        eventually("queued", || v2_lease(&url, "turns")["waiting"] == i);
    }
    std::fs::write(&go, "").unwrap();
    assert!(holder.0.wait().unwrap().success());
    for w in &mut waiters {
        assert!(w.0.wait().unwrap().success());
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<(&str, u64)> =
        text.lines().map(|l| l.split_once(' ').map(|(who, f)| (who, f.parse().unwrap())).unwrap()).collect();
    assert_eq!(lines, vec![("holder", 1), ("w1", 2), ("w2", 3), ("w3", 4)], "FIFO, each with the next fence");
    assert_eq!(metric(&url, "leasehold_sessions_live"), 0, "every run closed its session on the way out");
}

#[test]
fn run_on_sessions_keeps_its_exit_codes_and_signal_handling() {
    let dir = tempfile::tempdir().unwrap();
    let (server, url) = serve(&dir.path().join("store"));
    let code = |c: &mut Command| c.status().unwrap().code();
    assert_eq!(code(&mut run_v2(&url, "v2codes", &[], &["sh", "-c", "exit 7"])), Some(7));
    assert_eq!(code(&mut run_v2(&url, "v2codes", &[], &["no-such-command-here"])), Some(127));
    assert_eq!(code(&mut run_v2(&url, "bad key", &[], &["true"])), Some(2));
    assert_eq!(code(&mut run_v2(&url, "k", &["--backend", "dynamodb"], &["true"])), Some(2));
    let owner = dir.path().join("owner");
    let write = format!("echo $LEASEHOLD_OWNER > {}", owner.display());
    assert_eq!(code(&mut run_v2(&url, "v2codes", &[], &["sh", "-c", &write])), Some(0));
    let owner: u64 = std::fs::read_to_string(&owner).unwrap().trim().parse().expect("the session id");
    assert!(owner > 0);

    // SIGTERM is passed on; the key is free the moment run exits.
    let started = dir.path().join("started");
    let script = format!("trap 'exit 3' TERM; touch {}; while :; do sleep 0.05; done", started.display());
    let mut run = Proc(run_v2(&url, "v2codes", &[], &["sh", "-c", &script]).spawn().unwrap());
    eventually("the command starts", || started.exists());
    let label = v2_lease(&url, "v2codes")["holder"]["label"].as_str().unwrap_or_default().to_string();
    assert!(label.ends_with(&format!(":{}", run.0.id())), "the label names the process: {label}");
    assert_eq!(code(&mut run_v2(&url, "v2codes", &["--no-wait"], &["true"])), Some(75));
    assert_eq!(code(&mut run_v2(&url, "v2codes", &["--timeout", "300ms"], &["true"])), Some(75));
    nix::sys::signal::kill(Pid::from_raw(run.0.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(run.0.wait().unwrap().code(), Some(3));
    assert_eq!(v2_lease(&url, "v2codes")["holder"], serde_json::Value::Null, "released, not left to expire");

    // No server: exit 75 at the timeout. A server that refuses our token: exit 2 at once.
    let dead = format!("http://127.0.0.1:{}", leasehold_test_servers::free_port());
    assert_eq!(code(&mut run_v2(&dead, "k", &["--timeout", "500ms"], &["true"])), Some(75));
    let (_guarded, guarded_url) = serve_with(&dir.path().join("guarded"), &["--token", "s3cret"]);
    let refused = output_within_20s(&mut run_v2(&guarded_url, "k", &[], &["true"]));
    assert_eq!(refused.status.code(), Some(2), "{}", String::from_utf8_lossy(&refused.stderr));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unauthorized"));
    assert_eq!(code(&mut run_v2(&guarded_url, "k", &["--token", "s3cret"], &["true"])), Some(0));

    // The server vanishes: the session is lost, the command stopped, exit 76.
    // Held as far as run knows: the command has started (the server showing a holder is not
    // enough, since its grant may still be on the way to the client).
    let holding = dir.path().join("holding");
    let script = format!("touch {}; sleep 60", holding.display());
    let mut run = Proc(
        run_cmd(&url, "v2lost", "1s", &["--protocol", "v2", "--grace", "200ms"], &["sh", "-c", &script])
            .spawn()
            .unwrap(),
    );
    eventually("the command starts", || holding.exists());
    assert!(v2_lease(&url, "v2lost")["holder"].is_object(), "held at the server too");
    drop(server);
    assert_eq!(run.0.wait().unwrap().code(), Some(76));
}

#[test]
fn run_limit_admits_that_many_at_once_and_every_contender_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(&dir.path().join("store"));
    let log = dir.path().join("slots.log");
    // Each section logs its start and end; the first two wait (up to 10 s) until two have
    // started, so the log shows whether two really held the key at once.
    let section = format!(
        "echo start $LEASEHOLD_FENCE >> {log}; n=0; \
         while [ $(grep -c start {log}) -lt 2 ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n+1)); done; \
         sleep 0.1; echo end $LEASEHOLD_FENCE >> {log}",
        log = log.display()
    );
    let contender = format!(
        "for i in 1 2 3; do {BIN} run --protocol v2 --limit 2 --key slots --ttl 5s --server {url} -- sh -c '{section}' \
         || exit 1; done"
    );
    let mut runs: Vec<Proc> = (0..3)
        .map(|_| Proc(Command::new("sh").args(["-c", &contender]).process_group(0).spawn().unwrap()))
        .collect();
    for r in &mut runs {
        assert!(r.0.wait().unwrap().success(), "every contender's every run succeeded");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let (mut running, mut most, mut fences) = (0i32, 0i32, Vec::new());
    for line in text.lines() {
        let (what, fence) = line.split_once(' ').unwrap();
        match what {
            "start" => {
                running += 1;
                fences.push(fence.parse::<u64>().unwrap());
            }
            _ => running -= 1,
        }
        most = most.max(running);
        assert!(running <= 2, "more than 2 at once in:\n{text}");
    }
    assert_eq!(most, 2, "two held the key at once:\n{text}");
    assert_eq!(fences.len(), 9, "all 9 sections ran:\n{text}");
    fences.sort();
    fences.dedup();
    assert_eq!(fences.len(), 9, "each grant its own fence:\n{text}");
    assert_eq!(metric(&url, "leasehold_sessions_live"), 0);
}

#[test]
fn run_limit_needs_v2_and_every_contender_to_agree() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(&dir.path().join("store"));
    let code = |c: &mut Command| c.status().unwrap().code();
    assert_eq!(
        code(&mut run_cmd(&url, "k", "5s", &["--protocol", "v1", "--limit", "2"], &["true"])),
        Some(2),
        "v1 has no semaphores"
    );
    let env_v1 =
        run_cmd(&url, "k", "5s", &["--limit", "2"], &["true"]).env("LEASEHOLD_PROTOCOL", "v1").status();
    assert_eq!(env_v1.unwrap().code(), Some(2), "LEASEHOLD_PROTOCOL=v1 is --protocol v1");
    assert_eq!(code(&mut run_v2(&url, "k", &["--limit", "0"], &["true"])), Some(2));
    let go = dir.path().join("go");
    let hold = format!("while [ ! -e {} ]; do sleep 0.05; done", go.display());
    let mut holder = Proc(run_v2(&url, "agree", &["--limit", "2"], &["sh", "-c", &hold]).spawn().unwrap());
    eventually("the holder runs", || {
        v2_lease(&url, "agree")["holders"].as_array().is_some_and(|h| h.len() == 1)
    });
    assert_eq!(v2_lease(&url, "agree")["limit"], 2);
    let refused = output_within_20s(&mut run_v2(&url, "agree", &["--limit", "3"], &["true"]));
    assert_eq!(refused.status.code(), Some(2), "another limit is a configuration error");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("another holder limit"), "{stderr}");
    assert_eq!(
        code(&mut run_v2(&url, "agree", &["--no-wait"], &["true"])),
        Some(2),
        "a plain lease is limit 1"
    );
    // The same limit takes the second slot at once, beside the holder.
    assert_eq!(code(&mut run_v2(&url, "agree", &["--limit", "2", "--no-wait"], &["true"])), Some(0));
    std::fs::write(&go, "").unwrap();
    assert!(holder.0.wait().unwrap().success());
}

#[test]
fn status_shows_session_held_keys_by_label() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(&dir.path().join("store"));
    let marker = dir.path().join("started");
    let hold = format!("touch {}; sleep 30", marker.display());
    let run = Proc(run_v2(&url, "shown", &[], &["sh", "-c", &hold]).spawn().unwrap());
    eventually("the command starts", || marker.exists());
    let pid = run.0.id();
    let status = |extra: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(["status", "--protocol", "v2", "--server", &url]).args(extra);
        c.output().unwrap()
    };

    // The holder's label (host:pid of the `run` process), its session and fence; no secret.
    let out = status(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let row: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("shown "))
        .expect("a row for the key")
        .split_whitespace()
        .collect();
    let served = &v2_lease(&url, "shown")["holder"];
    assert!(row[2].ends_with(&format!(":{pid}")), "label {:?} names the run process {pid}", row[2]);
    assert_eq!(row[1], served["fence"].to_string(), "{text}");
    assert_eq!(row[3], format!("s{}", served["session"]), "{text}");

    let one = status(&["shown", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&one.stdout).expect("JSON");
    assert_eq!(doc["leases"][0]["holders"][0]["fence"], served["fence"], "{doc}");
    assert!(!String::from_utf8_lossy(&one.stdout).contains("secret"), "{doc}");

    // v2 is the default on the built-in server: the same key, fence, label and session (the
    // remaining time moves on).
    let default = Command::new(BIN).args(["status", "--server", &url]).output().unwrap();
    let default_text = String::from_utf8_lossy(&default.stdout);
    assert!(
        default_text.lines().any(|l| l.split_whitespace().take(4).eq(row[..4].iter().copied())),
        "{default_text}"
    );

    // A key sessions never used: exit 1.
    assert_eq!(status(&["never-used"]).status.code(), Some(1));
    // v1's listing has v1 records only, with owner ids.
    let v1 =
        Command::new(BIN).args(["status", "shown", "--protocol", "v1", "--server", &url]).output().unwrap();
    assert_eq!(v1.status.code(), Some(1), "{v1:?}");
    // A key held by a v1 lease: one namespace, so v2's status shows it as such, with its fence.
    let ttl = LDuration::from_secs(30);
    let Reply::Granted { fence, .. } = call(&url, "v1-held", 5, Op::Acquire { ttl }) else {
        panic!("not granted")
    };
    let out = status(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    let row: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("v1-held "))
        .expect("a row for the v1 key")
        .split_whitespace()
        .collect();
    assert_eq!((row[1], row[2], row[3]), (fence.0.to_string().as_str(), "(v1", "lease)"), "{text}");
    // DynamoDB's session holders are in its one listing: a usage error.
    let dynamodb = status(&["--backend", "dynamodb"]);
    assert_eq!(dynamodb.status.code(), Some(2), "{dynamodb:?}");
    assert!(
        String::from_utf8_lossy(&dynamodb.stderr)
            .contains("on DynamoDB, session holders show in the v1 listing"),
        "{dynamodb:?}"
    );
    drop(run);
}
