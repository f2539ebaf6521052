//! `leasehold serve` and `leasehold status` as users run them: the real binary on loopback,
//! spoken to over plain HTTP/1.1, killed with SIGKILL and restarted on the same store.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");
const LONG_TTL: u64 = 120_000_000;

/// A `leasehold serve` process, SIGKILLed when dropped.
struct Serve {
    child: Child,
    addr: SocketAddr,
}

impl Serve {
    fn start(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Serve {
        Serve::start_with(Command::new(BIN), data, extra, env)
    }

    /// Starts `leasehold serve` through `cmd`: the binary itself, or a shell that `exec`s its
    /// arguments after changing the process's limits.
    fn start_with(mut cmd: Command, data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Serve {
        let mut child = cmd
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .args(extra)
            .env_remove("LEASEHOLD_TOKEN")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read stdout");
        let Some(addr) = line.trim().strip_prefix("listening on http://") else {
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("serve did not announce its address: stdout {line:?}, stderr {err:?}");
        };
        let addr = addr.parse().unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
        Serve { child, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL: no shutdown code runs.
    fn kill_9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request on a fresh connection; `None` when the server is gone or the answer is cut off.
fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Option<(u16, Value)> {
    let (status, body) = try_http_text(addr, method, path, token, body)?;
    Some((status, serde_json::from_str(&body).ok()?))
}

/// [`try_http`] with the body as text.
fn try_http_text(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.get(9..12)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n")?.1.to_string()))
}

fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    try_http(addr, method, path, token, body).unwrap_or_else(|| panic!("no answer to {method} {path}"))
}

fn acquire_body(owner: u64) -> String {
    json!({"id": 1, "owner": owner, "op": {"acquire": {"ttl": LONG_TTL}}}).to_string()
}

fn release_body(owner: u64, fence: u64) -> String {
    json!({"id": 2, "owner": owner, "op": {"release": {"fence": fence}}}).to_string()
}

fn fence_of(reply: &Value) -> Option<u64> {
    reply["reply"]["granted"]["fence"].as_u64()
}

/// `leasehold status --protocol v1`: these tests read v1 records, with their owner ids (v2 is
/// the default on the built-in server, tested in cli.rs).
fn status(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["status", "--protocol", "v1"])
        .args(args)
        .env_remove("LEASEHOLD_TOKEN")
        .env_remove("LEASEHOLD_PROTOCOL")
        .output()
        .expect("run status")
}

/// An acknowledged grant: key, owner, fence.
type Grant = (String, u64, u64);

#[test]
fn kill_9_under_load_loses_no_acknowledged_grant_and_fences_keep_increasing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Serve::start(dir.path(), &[], &[]);
    let addr = server.addr;
    let stop = AtomicBool::new(false);

    // Eight clients acquire fresh keys of their own (and keep them), and cycle acquire+release
    // on one shared key; each remembers only what the server acknowledged.
    let (held, shared): (Vec<Vec<Grant>>, Vec<Vec<u64>>) = std::thread::scope(|scope| {
        let clients: Vec<_> = (1..=8u64)
            .map(|owner| {
                let stop = &stop;
                scope.spawn(move || {
                    let (mut held, mut shared) = (Vec::new(), Vec::new());
                    for i in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let key = format!("c{owner}-{i}");
                        let path = format!("/v1/leases/{key}");
                        let Some((200, r)) = try_http(addr, "POST", &path, None, &acquire_body(owner)) else {
                            break;
                        };
                        held.push((key, owner, fence_of(&r).expect("a fresh key is granted")));
                        let Some((200, r)) =
                            try_http(addr, "POST", "/v1/leases/shared", None, &acquire_body(owner))
                        else {
                            break;
                        };
                        if let Some(f) = fence_of(&r) {
                            shared.push(f);
                            if try_http(addr, "POST", "/v1/leases/shared", None, &release_body(owner, f))
                                .is_none()
                            {
                                break;
                            }
                        }
                    }
                    (held, shared)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(700));
        server.kill_9();
        stop.store(true, Ordering::Relaxed);
        clients.into_iter().map(|c| c.join().expect("client thread")).unzip()
    });
    let held: Vec<_> = held.into_iter().flatten().collect();
    let shared_max = shared.iter().flatten().copied().max().unwrap_or(0);
    assert!(held.len() >= 16, "too little load before the kill to prove anything: {}", held.len());

    let server = Serve::start(dir.path(), &[], &[]);
    let addr = server.addr;
    for (key, owner, fence) in &held {
        let (st, v) = http(addr, "GET", &format!("/v1/leases/{key}"), None, "");
        assert_eq!(st, 200, "acknowledged grant of {key} forgotten: {v}");
        assert_eq!(v["holder"]["owner"], json!(owner), "{key}: {v}");
        assert_eq!(v["holder"]["fence"], json!(fence), "{key}: {v}");
    }
    // Held for another owner, and the holder can still renew with its fence.
    let (key, owner, fence) = &held[0];
    let (_, r) = http(addr, "POST", &format!("/v1/leases/{key}"), None, &acquire_body(999));
    assert!(r["reply"]["busy"].is_object(), "{key} must be busy after the restart: {r}");
    let renew = json!({"id": 3, "owner": owner, "op": {"renew": {"fence": fence, "ttl": LONG_TTL}}});
    let (_, r) = http(addr, "POST", &format!("/v1/leases/{key}"), None, &renew.to_string());
    assert_eq!(fence_of(&r), Some(*fence), "{r}");

    // The shared key's fence never goes back: free it if held, and the next grant is newer than
    // anything acknowledged before the kill.
    let (_, v) = http(addr, "GET", "/v1/leases/shared", None, "");
    assert!(v["last_fence"].as_u64().unwrap_or(0) >= shared_max, "{v} vs {shared_max}");
    if let (Some(o), Some(f)) = (v["holder"]["owner"].as_u64(), v["holder"]["fence"].as_u64()) {
        let (_, r) = http(addr, "POST", "/v1/leases/shared", None, &release_body(o, f));
        assert_eq!(r["reply"], json!("released"));
    }
    let (_, r) = http(addr, "POST", "/v1/leases/shared", None, &acquire_body(1000));
    let next = fence_of(&r).expect("free shared key is granted");
    assert!(next > shared_max, "fence {next} after {shared_max} acknowledged before the kill");
}

#[test]
fn token_from_flag_or_env_guards_everything_but_healthz() {
    let dir = tempfile::tempdir().unwrap();
    for (extra, env, token) in [
        (&["--token", "flag-secret"][..], &[][..], "flag-secret"),
        (&[][..], &[("LEASEHOLD_TOKEN", "env-secret")][..], "env-secret"),
    ] {
        let server = Serve::start(&dir.path().join(token), extra, env);
        let a = server.addr;
        let (st, v) = http(a, "POST", "/v1/leases/k", None, &acquire_body(1));
        assert_eq!((st, v["error"].as_str()), (401, Some("unauthorized")), "{v}");
        assert_eq!(http(a, "POST", "/v1/leases/k", Some("wrong"), &acquire_body(1)).0, 401);
        assert_eq!(http(a, "GET", "/v1/leases", Some(&format!("{token}x")), "").0, 401);
        assert_eq!(http(a, "GET", "/healthz", None, "").0, 200);
        let (st, v) = http(a, "POST", "/v1/leases/k", Some(token), &acquire_body(1));
        assert_eq!((st, fence_of(&v)), (200, Some(1)), "{v}");
        // The refused requests changed nothing: the first authorised acquire got fence 1.

        let denied = status(&["k", "--server", &server.url()]);
        assert_eq!(denied.status.code(), Some(2), "{denied:?}");
        assert!(String::from_utf8_lossy(&denied.stderr).contains("token"), "{denied:?}");
        let ok = status(&["k", "--server", &server.url(), "--token", token]);
        assert!(ok.status.success(), "{ok:?}");
    }
}

/// The rows of a `status` table (header checked and dropped), split into cells.
fn rows(out: &Output) -> Vec<Vec<String>> {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("a header").split_whitespace().collect();
    assert_eq!(header, ["KEY", "FENCE", "OWNER", "TTL", "REMAINING"], "{text}");
    lines.map(|l| l.split_whitespace().map(str::to_string).collect()).collect()
}

fn keys(out: &Output) -> Vec<String> {
    rows(out).into_iter().map(|r| r[0].clone()).collect()
}

/// "pump" held by `owner`, "valve" leased and released; returns pump's fence.
fn pump_held_by_valve_free(a: SocketAddr, owner: u64) -> u64 {
    let (_, r) = http(a, "POST", "/v1/leases/pump", None, &acquire_body(owner));
    let fence = fence_of(&r).expect("granted");
    let (_, r) = http(a, "POST", "/v1/leases/valve", None, &acquire_body(2));
    http(a, "POST", "/v1/leases/valve", None, &release_body(2, fence_of(&r).expect("granted")));
    fence
}

#[test]
fn status_shows_held_keys_by_default_all_with_all_and_filters_by_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let server = Serve::start(dir.path(), &[], &[]);
    let (a, url) = (server.addr, server.url());
    let fence = pump_held_by_valve_free(a, 0xabc);
    for key in ["job-10", "job-9", "job-100"] {
        http(a, "POST", &format!("/v1/leases/{key}"), None, &acquire_body(5));
    }

    // Byte order of the key ("job-10" < "job-100" < "job-9"), free keys hidden.
    let held = status(&["--server", &url]);
    assert_eq!(keys(&held), ["job-10", "job-100", "job-9", "pump"]);
    let pump = rows(&held).pop().unwrap();
    assert_eq!(pump[..4], ["pump", &fence.to_string(), "2748", "120.0s"], "owner 0xabc in decimal");
    let left: f64 = pump[4].trim_end_matches('s').parse().unwrap();
    assert!(left > 0.0 && left <= 120.0, "{pump:?}");

    let all = status(&["--all", "--server", &url]);
    assert_eq!(keys(&all), ["job-10", "job-100", "job-9", "pump", "valve"]);
    assert_eq!(rows(&all)[4][3..], ["-", "free"]);
    assert_eq!(keys(&status(&["--prefix", "job-1", "--server", &url])), ["job-10", "job-100"]);
    assert_eq!(keys(&status(&["--prefix", "v", "--all", "--server", &url])), ["valve"]);
    let none = status(&["--prefix", "v", "--server", &url]);
    assert_eq!(keys(&none), Vec::<String>::new());
    assert!(String::from_utf8_lossy(&none.stderr).contains("--all"), "{none:?}");
    // A key asked for by name is shown free or held.
    assert_eq!(rows(&status(&["valve", "--server", &url])), [["valve", "1", "-", "-", "free"]]);
}

#[test]
fn status_json_is_one_document() {
    let dir = tempfile::tempdir().unwrap();
    let server = Serve::start(dir.path(), &[], &[]);
    let (a, url) = (server.addr, server.url());
    let fence = pump_held_by_valve_free(a, 7);

    let doc = |args: &[&str]| -> Value {
        let out = status(&[args, &["--json", "--server", &url]].concat());
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not one JSON document ({e}): {out:?}"))
    };
    let held = doc(&[]);
    assert_eq!(held["leases"].as_array().map(Vec::len), Some(1), "{held}");
    let pump = &held["leases"][0];
    assert_eq!((pump["key"].as_str(), pump["last_fence"].as_u64()), (Some("pump"), Some(fence)), "{held}");
    assert_eq!(pump["holder"]["owner"], json!(7), "{held}");
    assert_eq!(pump["holder"]["fence"], json!(fence), "{held}");
    assert_eq!(pump["holder"]["ttl"], json!(LONG_TTL), "{held}");
    assert!(pump["holder"]["remaining"].as_u64().is_some_and(|r| r > 0 && r <= LONG_TTL), "{held}");
    let all = doc(&["--all"]);
    assert_eq!(all["leases"][1]["key"], json!("valve"), "{all}");
    assert_eq!(all["leases"][1]["holder"], Value::Null, "{all}");
    assert_eq!(doc(&["valve"])["leases"].as_array().map(Vec::len), Some(1));
    assert_eq!(doc(&["--prefix", "nothing"]), json!({"leases": []}));
}

#[test]
fn status_exit_codes_are_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let server = Serve::start(dir.path(), &["--token", "s3cret"], &[]);
    let url = server.url();
    let ok = status(&["--server", &url, "--token", "s3cret"]);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");

    // 1: the key asked for has no record.
    let unknown = status(&["never-used", "--server", &url, "--token", "s3cret"]);
    assert_eq!(unknown.status.code(), Some(1), "{unknown:?}");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("never-used"), "{unknown:?}");

    // 2: no answer. A bad key, a wrong token, a dead server, usage.
    let bad = status(&["bad key!", "--server", &url, "--token", "s3cret"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    let denied = status(&["--server", &url, "--token", "wrong"]);
    assert_eq!(denied.status.code(), Some(2), "{denied:?}");
    assert!(String::from_utf8_lossy(&denied.stderr).contains("token"), "{denied:?}");
    // A port nobody listens on: bind one, note it, close it.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dead = status(&["--server", &format!("http://{free}")]);
    assert_eq!(dead.status.code(), Some(2), "{dead:?}");
    assert!(String::from_utf8_lossy(&dead.stderr).contains("unreachable"), "{dead:?}");
    let usage = status(&["k", "--all", "--server", &url]);
    assert_eq!(usage.status.code(), Some(2), "{usage:?}");
    let bad_prefix = status(&["--prefix", "a b", "--server", &url, "--token", "s3cret"]);
    assert_eq!(bad_prefix.status.code(), Some(2), "{bad_prefix:?}");
    assert!(String::from_utf8_lossy(&bad_prefix.stderr).contains("--prefix"), "{bad_prefix:?}");
    let no_credentials = Command::new(BIN)
        .args(["status", "--backend", "dynamodb", "--server", &url])
        .env_remove("AWS_ACCESS_KEY_ID")
        .output()
        .unwrap();
    assert_eq!(no_credentials.status.code(), Some(2), "{no_credentials:?}");
}

#[test]
fn a_second_server_on_the_same_store_or_port_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = Serve::start(dir.path(), &[], &[]);
    http(first.addr, "POST", "/v1/leases/k", None, &acquire_body(1));

    // Two authorities on one store would hand out the same fence twice.
    let second = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .output()
        .expect("run serve");
    assert!(!second.status.success(), "{second:?}");
    assert!(String::from_utf8_lossy(&second.stderr).contains("store"), "{second:?}");

    let other = tempfile::tempdir().unwrap();
    let busy_port = Command::new(BIN)
        .args(["serve", "--listen", &first.addr.to_string(), "--data"])
        .arg(other.path())
        .output()
        .expect("run serve");
    assert!(!busy_port.status.success(), "{busy_port:?}");
    assert!(String::from_utf8_lossy(&busy_port.stderr).contains("cannot listen"), "{busy_port:?}");

    // The first server is untouched.
    let (st, v) = http(first.addr, "GET", "/v1/leases/k", None, "");
    assert_eq!((st, v["holder"]["fence"].as_u64()), (200, Some(1)), "{v}");
}

#[test]
fn configurations_that_cannot_work_exit_2_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    for (flags, says) in [
        (&["--min-ttl", "10s", "--max-ttl", "1s"][..], "longer than the maximum ttl"),
        (&["--min-ttl", "0s"][..], "minimum ttl must be greater than zero"),
        (&["--max-ttl", "1000000years"][..], "longer than 86400s"),
        (&["--max-ttl", "2days"][..], "longer than 86400s"),
        (&["--token", ""][..], "token must be non-empty"),
        (&["--max-connections", "0"][..], "connection cap"),
        (&["--threads", "0"][..], "thread count"),
    ] {
        let data = dir.path().join("store");
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(&data)
            .args(flags)
            .env_remove("LEASEHOLD_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run serve");
        // A server that starts anyway never exits on its own: give it 20 s, then fail.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while child.try_wait().expect("wait").is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{flags:?}: serve started instead of refusing");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().expect("reap");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {out:?}");
        assert!(stderr.contains(says), "{flags:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{flags:?} announced a listener: {out:?}");
        assert!(!data.exists(), "{flags:?} created the store");
    }
}

#[test]
fn an_idle_connection_flood_past_the_fd_limit_does_not_lock_out_a_working_client() {
    use std::time::Instant;
    const FLOOD: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    // Soft limit 64 (the server must raise it), hard limit 400: the flood is past both, so only
    // the connection cap keeps descriptors free.
    let mut sh = Command::new("sh");
    sh.args(["-c", r#"ulimit -S -n 64 && ulimit -H -n 400 && exec "$0" "$@""#, BIN]);
    let server = Serve::start_with(sh, dir.path(), &["--max-connections", "100"], &[]);
    let addr = server.addr;
    let stop = AtomicBool::new(false);
    let flood_open = AtomicUsize::new(0);

    let (latencies, failures, reconnects) = std::thread::scope(|scope| {
        // Idle connections that send nothing, reconnected as soon as the server drops them.
        let flood = scope.spawn(|| {
            let mut conns: Vec<Option<TcpStream>> = (0..FLOOD).map(|_| None).collect();
            let mut reconnects = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for slot in conns.iter_mut() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let alive = slot.as_mut().is_some_and(|c| {
                        matches!(c.read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                    });
                    if !alive {
                        *slot = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok();
                        if let Some(c) = slot {
                            let _ = c.set_nonblocking(true);
                        }
                        reconnects += 1;
                    }
                }
                flood_open.store(conns.iter().flatten().count(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            reconnects
        });
        // Wait for the flood to build up (a server that stops accepting never lets it finish).
        let building = Instant::now();
        while flood_open.load(Ordering::Relaxed) < FLOOD / 2 && building.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        // One client doing real work: acquire, then release, each on a fresh connection.
        let (mut latencies, mut failures) = (Vec::new(), Vec::new());
        for round in 0..40 {
            if failures.len() >= 3 {
                break; // Locked out: no need to wait out every timeout.
            }
            let started = Instant::now();
            let acquired = try_http(addr, "POST", "/v1/leases/legit", None, &acquire_body(1));
            let Some(fence) = acquired.as_ref().and_then(|(_, r)| fence_of(r)) else {
                failures.push(format!("round {round}: acquire: {acquired:?}"));
                continue;
            };
            let released = try_http(addr, "POST", "/v1/leases/legit", None, &release_body(1, fence));
            if released.as_ref().map(|(_, r)| &r["reply"]) != Some(&json!("released")) {
                failures.push(format!("round {round}: release: {released:?}"));
                continue;
            }
            latencies.push(started.elapsed());
        }
        stop.store(true, Ordering::Relaxed);
        (latencies, failures, flood.join().expect("flood thread"))
    });
    assert!(failures.is_empty(), "{} rounds failed during the flood: {failures:?}", failures.len());
    let mut sorted = latencies.clone();
    sorted.sort();
    let p = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    println!(
        "acquire+release under a {FLOOD}-connection idle flood ({reconnects} flood connects): \
         p50 {:?}, p99 {:?}, max {:?}",
        p(0.5),
        p(0.99),
        sorted[sorted.len() - 1]
    );
    let (_, metrics) = try_http_text(addr, "GET", "/metrics", None, "").expect("metrics");
    assert!(
        metrics.contains("leasehold_open_files_limit 400"),
        "soft limit not raised to the hard one: {metrics}"
    );
    assert!(metrics.contains("leasehold_connections_max 100"), "{metrics}");
    let shed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("leasehold_connections_shed_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(shed > 0, "the flood was never shed: {metrics}");
}
