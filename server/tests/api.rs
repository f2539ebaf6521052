//! The built-in server's API over real HTTP on loopback.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use leasehold_server::ServerConfig;
use serde_json::{json, Value};

mod support;
use support::*;

fn post(addr: SocketAddr, key: &str, body: Value) -> Reply {
    request(addr, "POST", &format!("/v1/leases/{key}"), None, body.to_string().as_bytes())
}

fn acquire(owner: u64, ttl: u64) -> Value {
    json!({"id": 1, "owner": owner, "op": {"acquire": {"ttl": ttl}}})
}

const TTL: u64 = 10_000_000;

#[test]
fn acquire_busy_renew_release() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let a = s.addr();

    let r = post(a, "pump", acquire(7, TTL));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"id": 1, "owner": 7, "reply": {"granted": {"fence": 1, "ttl": TTL}}}));

    let r = post(a, "pump", acquire(8, TTL)).json();
    let retry = r["reply"]["busy"]["retry_after"].as_u64().expect("busy");
    assert!(retry > 0 && retry <= TTL);

    let renew = json!({"id": 2, "owner": 7, "op": {"renew": {"fence": 1, "ttl": TTL}}});
    assert_eq!(post(a, "pump", renew).json()["reply"], json!({"granted": {"fence": 1, "ttl": TTL}}));

    // Someone else's release, and a stale fence, change nothing.
    let theirs = json!({"id": 3, "owner": 8, "op": {"release": {"fence": 1}}});
    assert_eq!(post(a, "pump", theirs).json()["reply"], json!("not_holder"));
    let stale = json!({"id": 3, "owner": 7, "op": {"release": {"fence": 9}}});
    assert_eq!(post(a, "pump", stale).json()["reply"], json!("not_holder"));
    assert_eq!(get(a, "/v1/leases/pump").json()["holder"]["owner"], json!(7));

    let release = json!({"id": 4, "owner": 7, "op": {"release": {"fence": 1}}});
    assert_eq!(post(a, "pump", release.clone()).json()["reply"], json!("released"));
    assert_eq!(post(a, "pump", release).json()["reply"], json!("not_holder"), "repeat release is harmless");

    let v = get(a, "/v1/leases/pump").json();
    assert_eq!(v["holder"], Value::Null);
    assert_eq!(v["last_fence"], json!(1));
    let r = post(a, "pump", acquire(8, TTL)).json();
    assert_eq!(r["reply"]["granted"]["fence"], json!(2));

    let list = get(a, "/v1/leases").json();
    assert_eq!(list["leases"].as_array().map(Vec::len), Some(1));
    assert_eq!(get(a, "/healthz").json(), json!({"status": "ok"}));
    let metrics = get(a, "/metrics").body;
    assert!(metrics.contains("leasehold_grants_total 2"), "{metrics}");
    assert!(metrics.contains("leasehold_releases_total 1"), "{metrics}");
    // Sequential requests commit one by one; busy and not_holder answers change nothing and
    // cost no fsync: acquire, renew, release, acquire.
    assert!(metrics.contains("leasehold_commits_total 4"), "{metrics}");
}

#[test]
fn bad_input_gets_a_typed_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let a = s.addr();
    assert_eq!(post(a, "held", acquire(1, TTL)).status, 200);
    let before = get(a, "/v1/leases/held").json();

    let cases: Vec<(&str, Reply, u16, &str)> = vec![
        ("garbage body", request(a, "POST", "/v1/leases/held", None, b"{not json"), 400, "malformed_json"),
        ("truncated JSON", request(a, "POST", "/v1/leases/held", None, br#"{"id":1,"owner":2,"op":{"acq"#), 400, "malformed_json"),
        ("unknown field", post(a, "held", json!({"id":1,"owner":2,"op":{"acquire":{"ttl":TTL}},"evil":true})), 400, "malformed_json"),
        ("unknown op", post(a, "held", json!({"id":1,"owner":2,"op":{"steal":{}}})), 400, "malformed_json"),
        ("negative ttl", post(a, "held", json!({"id":1,"owner":2,"op":{"acquire":{"ttl":-5}}})), 400, "malformed_json"),
        ("zero ttl", post(a, "held", acquire(2, 0)), 400, "invalid_ttl"),
        ("absurd ttl", post(a, "held", acquire(2, u64::MAX)), 400, "invalid_ttl"),
        ("renew with absurd ttl", post(a, "held", json!({"id":1,"owner":1,"op":{"renew":{"fence":1,"ttl":u64::MAX}}})), 400, "invalid_ttl"),
        ("bad key", post(a, "bad%20key", acquire(2, TTL)), 400, "invalid_key"),
        ("long key", post(a, &"k".repeat(65), acquire(2, TTL)), 400, "invalid_key"),
        ("declared too large", raw(a, "POST /v1/leases/held HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 99999999\r\n\r\n", b""), 413, "body_too_large"),
        ("streamed too large", request(a, "POST", "/v1/leases/held", None, &vec![b' '; 20_000]), 413, "body_too_large"),
        ("unknown key", get(a, "/v1/leases/never"), 404, "unknown_key"),
        ("unknown path", get(a, "/v2/everything"), 404, "not_found"),
        ("wrong method", request(a, "DELETE", "/v1/leases/held", None, b""), 405, "method_not_allowed"),
        ("wrong method on list", request(a, "POST", "/v1/leases", None, b"{}"), 405, "method_not_allowed"),
    ];
    for (what, reply, status, code) in cases {
        assert_eq!(reply.status, status, "{what}: {}", reply.body);
        assert_eq!(reply.error_code(), code, "{what}: {}", reply.body);
        assert!(reply.json()["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: no message");
    }
    // What the authority itself refused comes as its own response, in the core's schema, so a
    // client needs no table of error codes.
    let refused = post(a, "held", acquire(2, 0)).json();
    assert_eq!((&refused["id"], &refused["owner"]), (&json!(1), &json!(2)), "{refused}");
    assert_eq!(refused["reply"], json!({"rejected": "invalid_ttl"}), "{refused}");
    // Garbage that is not even HTTP.
    let mut s2 = TcpStream::connect(a).unwrap();
    let _ = s2.write_all(b"\x00\xff\xfe garbage\r\n\r\n");
    drop(s2);

    let after = get(a, "/v1/leases/held").json();
    assert_eq!(before["holder"]["fence"], after["holder"]["fence"]);
    assert_eq!(before["last_fence"], after["last_fence"]);
    assert_eq!(get(a, "/healthz").status, 200, "server still serving");
    assert!(get(a, "/metrics").body.contains("leasehold_errors_total{code=\"invalid_ttl\"} 4"));
}

#[test]
fn the_list_is_filtered_by_holding_and_prefix_on_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let a = s.addr();
    for key in ["job:1", "job:10", "job:2", "pump", "job:free"] {
        assert_eq!(post(a, key, acquire(1, TTL)).status, 200);
    }
    let release = json!({"id": 2, "owner": 1, "op": {"release": {"fence": 1}}});
    assert_eq!(post(a, "job:free", release).json()["reply"], json!("released"));
    let keys = |path: &str| -> Vec<String> {
        let list = get(a, path).json();
        let leases = list["leases"].as_array().unwrap_or_else(|| panic!("{path}: {list}"));
        leases.iter().map(|l| l["key"].as_str().unwrap().to_string()).collect()
    };
    // Byte order of the key.
    assert_eq!(keys("/v1/leases"), ["job:1", "job:10", "job:2", "job:free", "pump"]);
    assert_eq!(keys("/v1/leases?held=true"), ["job:1", "job:10", "job:2", "pump"]);
    assert_eq!(keys("/v1/leases?held=false"), keys("/v1/leases"));
    assert_eq!(keys("/v1/leases?prefix=job:"), ["job:1", "job:10", "job:2", "job:free"]);
    assert_eq!(keys("/v1/leases?prefix=job%3A1&held=true"), ["job:1", "job:10"]);
    assert_eq!(keys("/v1/leases?prefix=nothing"), Vec::<String>::new());
    for bad in
        ["/v1/leases?held=yes", "/v1/leases?prefix=a%20b", "/v1/leases?prefix=%zz", "/v1/leases?sort=key"]
    {
        let r = get(a, bad);
        assert_eq!((r.status, r.error_code().as_str()), (400, "invalid_query"), "{bad}: {}", r.body);
    }
}

#[test]
fn bearer_token_is_required_when_set() {
    let dir = tempfile::tempdir().unwrap();
    let s = server_with(dir.path(), |c| c.token = Some("s3cret".into()));
    let a = s.addr();
    let body = acquire(1, TTL).to_string();
    let none = request(a, "POST", "/v1/leases/k", None, body.as_bytes());
    assert_eq!((none.status, none.error_code().as_str()), (401, "unauthorized"));
    let wrong = request(a, "POST", "/v1/leases/k", Some("s3cres"), body.as_bytes());
    assert_eq!(wrong.status, 401);
    assert_eq!(request(a, "GET", "/metrics", None, b"").status, 401);
    assert_eq!(request(a, "POST", "/v1/leases/k", Some("s3cret"), body.as_bytes()).status, 200);
    assert_eq!(request(a, "GET", "/healthz", None, b"").status, 200);
}

#[test]
fn grants_survive_a_restart_and_fences_keep_increasing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = server(dir.path());
        for key in ["a", "b"] {
            for owner in 1..=3 {
                let r = post(s.addr(), key, acquire(owner, TTL)).json();
                let fence = r["reply"]["granted"]["fence"].as_u64().expect("granted");
                let release = json!({"id": 2, "owner": owner, "op": {"release": {"fence": fence}}});
                assert_eq!(post(s.addr(), key, release).json()["reply"], json!("released"));
            }
        }
        assert_eq!(post(s.addr(), "a", acquire(9, TTL)).json()["reply"]["granted"]["fence"], json!(4));
    }
    let s = server(dir.path());
    // The grant acknowledged before the restart still holds.
    assert!(post(s.addr(), "a", acquire(10, TTL)).json()["reply"]["busy"].is_object());
    assert_eq!(get(s.addr(), "/v1/leases/a").json()["holder"]["fence"], json!(4));
    assert_eq!(post(s.addr(), "b", acquire(10, TTL)).json()["reply"]["granted"]["fence"], json!(4));
}

#[test]
fn concurrent_clients_get_strictly_increasing_fences() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let a = s.addr();
    let granted: Vec<Vec<(String, u64)>> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..16u64)
            .map(|owner| {
                scope.spawn(move || {
                    let mut got = Vec::new();
                    for round in 0..10 {
                        let key = if round % 2 == 0 { "shared".to_string() } else { format!("own-{owner}") };
                        let r = post(a, &key, acquire(owner + 1, TTL)).json();
                        if let Some(f) = r["reply"]["granted"]["fence"].as_u64() {
                            got.push((key.clone(), f));
                            let rel = json!({"id": 2, "owner": owner + 1, "op": {"release": {"fence": f}}});
                            assert_eq!(post(a, &key, rel).json()["reply"], json!("released"));
                        }
                    }
                    got
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut shared: Vec<u64> =
        granted.iter().flatten().filter(|(k, _)| k == "shared").map(|(_, f)| *f).collect();
    let n = shared.len();
    shared.sort_unstable();
    shared.dedup();
    assert_eq!(shared.len(), n, "a fence was granted twice");
    assert!(n >= 1);
    let own: usize = granted.iter().flatten().filter(|(k, _)| k != "shared").count();
    assert_eq!(own, 16 * 5, "every private key acquire succeeds");
    assert_eq!(get(a, "/v1/leases/shared").json()["last_fence"].as_u64(), shared.last().copied());
}

#[test]
fn stalled_clients_are_cut_off_and_others_keep_being_served() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let s = server_with(dir.path(), |c| c.request_timeout = Duration::from_millis(300));
    let a = s.addr();

    // Half a head, then silence: the connection is closed.
    let mut head = TcpStream::connect(a).unwrap();
    head.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    head.write_all(b"POST /v1/leases/k HTTP/1.1\r\nHost: x\r\n").unwrap();
    // A whole head promising a body that never comes: a typed error.
    let mut body = TcpStream::connect(a).unwrap();
    body.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    body.write_all(b"POST /v1/leases/k HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n{\"id\":1,").unwrap();

    let started = Instant::now();
    assert_eq!(post(a, "k", acquire(1, TTL)).status, 200, "served while others stall");
    let mut out = Vec::new();
    let _ = head.read_to_end(&mut out);
    assert!(started.elapsed() < Duration::from_secs(3), "stalled head kept for {:?}", started.elapsed());
    let mut out = String::new();
    let _ = body.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("malformed_json") && out.contains("not received"), "{out}");
    assert_eq!(get(a, "/v1/leases/k").json()["holder"]["fence"], json!(1), "nothing else changed");
}

/// Reads one HTTP/1.1 response (head and a `Content-Length` body); `None` when the connection
/// ended first. Header names are lowercased.
fn read_response(s: &mut TcpStream) -> Option<(u16, String, String)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let status = head.get(9..12)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((status, head, String::from_utf8_lossy(&body).to_string()))
}

#[test]
fn a_reply_sent_before_the_body_is_read_says_connection_close_or_keeps_serving() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let a = s.addr();
    let body = acquire(1, TTL).to_string();
    let keep_alive = |method: &str, path: &str, body: &str| {
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len())
    };
    let cases = [
        ("invalid_key with a body", keep_alive("POST", "/v1/leases/bad%20key", &body), 400, false),
        ("405 with a body", keep_alive("POST", "/metrics", &body), 405, false),
        ("404 with a body", keep_alive("POST", "/nowhere", &body), 404, false),
        // Read to its end: the connection stays usable without being closed.
        ("malformed_json", keep_alive("POST", "/v1/leases/k", "{nope}"), 400, true),
        ("granted", keep_alive("POST", "/v1/leases/k", &body), 200, true),
    ];
    for (what, first, status, stays_open) in cases {
        let mut c = TcpStream::connect(a).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(first.as_bytes()).unwrap();
        let (st, head, reply) = read_response(&mut c).unwrap_or_else(|| panic!("{what}: no reply"));
        assert_eq!(st, status, "{what}: {reply}");
        let says_close = head.contains("connection: close");
        assert_eq!(says_close, !stays_open, "{what}: {head}");
        if says_close {
            // The server meant it: the connection ends after the reply.
            assert_eq!(c.read(&mut [0u8; 16]).unwrap_or(0), 0, "{what}: open after Connection: close");
            continue;
        }
        // Not announced as closing, so the next request on it must be answered.
        let second = keep_alive("GET", "/healthz", "");
        let sent = c.write_all(second.as_bytes());
        let answer = sent.ok().and_then(|()| read_response(&mut c));
        assert_eq!(answer.map(|r| r.0), Some(200), "{what}: second request on the connection failed");
    }
}

#[test]
fn endless_request_heads_are_cut_off_at_the_header_cap() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    // Long enough that only the byte cap, not the head timeout, can end these connections.
    let s = server_with(dir.path(), |c| c.request_timeout = Duration::from_secs(120));
    let a = s.addr();
    let started = Instant::now();
    let outcomes: Vec<Result<(), String>> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..40)
            .map(|_| {
                scope.spawn(move || {
                    let mut c = TcpStream::connect(a).map_err(|e| e.to_string())?;
                    c.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    let _ = c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: ");
                    // 300 KB of one header that never ends. Being cut off mid-way is the point.
                    for _ in 0..300 {
                        if c.write_all(&[b'a'; 1000]).is_err() {
                            return Ok(());
                        }
                    }
                    let mut out = Vec::new();
                    match c.read_to_end(&mut out) {
                        Ok(_) => Ok(()),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
                        Err(e) => Err(format!("still open after 300 KB of head: {e}")),
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let open: Vec<_> = outcomes.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(open.is_empty(), "{} of 40 connections kept: {:?}", open.len(), open.first());
    println!("40 endless heads cut off after {:?}", started.elapsed());
    assert_eq!(post(a, "k", acquire(1, TTL)).status, 200, "served after the flood");
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    assert_eq!(raw(a, &big, b"").status, 431, "a finished head over the cap is refused with 431");
}

/// Sets the flag when dropped, also while unwinding.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A tmpfs of `size` mounted on a temp dir of its own, unmounted on drop. Needs root (CI runs
/// as root); without it the test fails saying so rather than passing untested.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a {size} tmpfs on {} (this test needs root): {}",
            dir.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn a_full_disk_answers_unavailable_then_recovers_without_restart_keeping_every_grant() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};
    const LONG: u64 = 120_000_000;
    let fs = Tmpfs::mount("2m");
    let data = fs.path().join("store");
    let s = server_with(&data, |c| c.reclaim_after = None);
    let a = s.addr();
    let (stop, refused) = (AtomicBool::new(false), AtomicU64::new(0));

    // Four clients take fresh keys (each grows the store) and keep them; one cycles a shared key.
    // Each remembers only what was acknowledged, and any answer that is neither 200 nor a typed
    // 503.
    let filler = fs.path().join("filler");
    let (held, shared, wrong, recovery) = std::thread::scope(|scope| {
        // A failed assertion below must still stop the clients, or the scope never ends.
        let _stop = StopOnDrop(&stop);
        let loaders: Vec<_> = (1..=4u64)
            .map(|owner| {
                let (stop, refused) = (&stop, &refused);
                scope.spawn(move || {
                    let (mut held, mut shared, mut wrong) = (Vec::new(), Vec::new(), Vec::new());
                    for i in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let key = format!("c{owner}-{i}");
                        let (r, shared_key) = if i % 4 == 0 {
                            (post(a, "shared", acquire(owner, LONG)), true)
                        } else {
                            (post(a, &key, acquire(owner, LONG)), false)
                        };
                        match (r.status, r.json()["reply"]["granted"]["fence"].as_u64()) {
                            (200, Some(f)) if shared_key => {
                                shared.push(f);
                                let rel = json!({"id": 2, "owner": owner, "op": {"release": {"fence": f}}});
                                let _ = post(a, "shared", rel);
                            }
                            (200, Some(f)) => held.push((key, f)),
                            (200, None) if shared_key => {} // busy
                            (503, _) if r.error_code() == "unavailable" => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            _ => wrong.push(format!("{} {}", r.status, r.body)),
                        }
                    }
                    (held, shared, wrong)
                })
            })
            .collect();
        within(20, "grants before the disk fills", || {
            (metric(a, "leasehold_commits_total") > 20).then_some(())
        });
        // Fill the file system while the clients keep going.
        let mut f = std::fs::File::create(&filler).unwrap();
        while std::io::Write::write_all(&mut f, &[0u8; 16 * 1024]).is_ok() {}
        drop(f);
        within(30, "a refusal while the disk is full", || {
            (refused.load(Ordering::Relaxed) > 0).then_some(())
        });
        // The store is re-opened now and then to see whether space returned, and a probe may
        // fit where batches do not: /healthz need not say 503 every time, but must say it.
        let health = within(10, "/healthz saying the disk is full", || {
            let h = get(a, "/healthz");
            (h.status == 503).then_some(h)
        });
        assert!(health.body.contains("No space left"), "{}", health.body);
        // Either store may be the first to find the disk full: v1's, or the session log (a v1
        // grant is held in the session log first, one namespace).
        let failures = |a| {
            metric(a, "leasehold_store_failures_total") + metric(a, "leasehold_session_log_failures_total")
        };
        assert!(failures(a) >= 1);
        std::thread::sleep(Duration::from_millis(300));

        std::fs::remove_file(&filler).unwrap();
        let freed = Instant::now();
        within(30, "serving again after space returned", || {
            (post(a, "after", acquire(99, LONG)).status == 200).then_some(())
        });
        let recovery = freed.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let mut out = (Vec::new(), Vec::new(), Vec::new());
        for l in loaders {
            let (h, sh, w) = l.join().unwrap();
            out.0.extend(h);
            out.1.extend(sh);
            out.2.extend(w);
        }
        (out.0, out.1, out.2, recovery)
    });
    println!(
        "disk full: {} grants acknowledged, {} requests refused with 503 unavailable; \
         serving again {recovery:?} after space was freed",
        held.len(),
        refused.load(Ordering::Relaxed)
    );
    assert!(wrong.is_empty(), "answers that are neither a grant nor a typed 503: {wrong:?}");
    assert_eq!(get(a, "/healthz").status, 200, "healthy again");
    assert!(
        metric(a, "leasehold_store_reopens_total") + metric(a, "leasehold_session_log_rebuilds_total") >= 1
    );

    // Every acknowledged grant is still held under its fence, before and after a restart, and
    // the shared key's fences were never issued twice and keep increasing.
    let check = |a: SocketAddr| {
        for (key, fence) in &held {
            let v = get(a, &format!("/v1/leases/{key}")).json();
            assert_eq!(v["holder"]["fence"], json!(fence), "acknowledged grant of {key} lost: {v}");
        }
    };
    check(a);
    let mut unique = shared.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), shared.len(), "a shared fence was granted twice: {shared:?}");
    drop(s);
    let s = server_with(&data, |c| c.reclaim_after = None);
    check(s.addr());
    let v = get(s.addr(), "/v1/leases/shared").json();
    if let (Some(o), Some(f)) = (v["holder"]["owner"].as_u64(), v["holder"]["fence"].as_u64()) {
        let rel = json!({"id": 2, "owner": o, "op": {"release": {"fence": f}}});
        assert_eq!(post(s.addr(), "shared", rel).json()["reply"], json!("released"));
    }
    let next = post(s.addr(), "shared", acquire(1000, LONG)).json()["reply"]["granted"]["fence"].as_u64();
    assert!(next > unique.last().copied(), "fence {next:?} after {:?}", unique.last());
    drop(s);
}

#[test]
fn idle_keys_are_reclaimed_and_their_fences_continue_above_the_floor_across_restarts() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let reclaiming = |c: &mut ServerConfig| c.reclaim_after = Some(Duration::from_millis(200));
    let s = server_with(dir.path(), reclaiming);
    let a = s.addr();
    let cycle = |a: SocketAddr, key: &str, times: u64| -> u64 {
        let mut fence = 0;
        for owner in 1..=times {
            fence = post(a, key, acquire(owner, TTL)).json()["reply"]["granted"]["fence"]
                .as_u64()
                .expect("granted");
            let rel = json!({"id": 2, "owner": owner, "op": {"release": {"fence": fence}}});
            assert_eq!(post(a, key, rel).json()["reply"], json!("released"));
        }
        fence
    };
    let (fence_a, fence_b) = (cycle(a, "a", 3), cycle(a, "b", 5));
    // Its fence is above the floor when it was granted, which the sweeps may already have raised.
    let held_fence = post(a, "held", acquire(1, 120_000_000)).json()["reply"]["granted"]["fence"].clone();
    assert!(held_fence.is_u64(), "granted: {held_fence}");
    assert_eq!(post(a, "expiring", acquire(1, 20_000)).status, 200, "20 ms, then free");
    // Enough idle records that deleting them must show in the file.
    std::thread::scope(|scope| {
        for t in 0..4 {
            scope.spawn(move || {
                for i in 0..100 {
                    cycle(a, &format!("bulk-{t}-{i}"), 1);
                }
            });
        }
    });
    let file = dir.path().join("leases.redb");
    let before = std::fs::metadata(&file).unwrap().len();

    // Each thread's last key is its newest; the threads' last keys may come in any order.
    let all_gone = || (0..4).all(|t| get(a, &format!("/v1/leases/bulk-{t}-99")).status == 404);
    within(30, "idle keys reclaimed", || all_gone().then_some(()));
    for key in ["a", "b", "expiring", "bulk-0-0"] {
        assert_eq!(get(a, &format!("/v1/leases/{key}")).error_code(), "unknown_key", "{key} not reclaimed");
    }
    assert_eq!(
        get(a, "/v1/leases/held").json()["holder"]["fence"],
        held_fence,
        "a held key is never reclaimed"
    );
    // The counters move just after the reclaim commits, on the store's own thread, and the
    // compaction follows.
    within(30, "the reclaim counted", || (metric(a, "leasehold_keys_reclaimed_total") >= 403).then_some(()));
    within(30, "compaction after the reclaim", || {
        (metric(a, "leasehold_store_compactions_total") >= 1).then_some(())
    });
    let floor = metric(a, "leasehold_store_fence_floor");
    assert!(floor >= fence_b, "floor {floor} below a reclaimed key's fence {fence_b}");
    let after = std::fs::metadata(&file).unwrap().len();
    println!("store file {before} B with 403 idle keys, {after} B after reclaiming and compacting");
    assert!(after < before, "compaction did not shrink the file: {before} -> {after}");

    // A reclaimed key's next fence is above every fence it had, and so after a restart.
    let granted =
        |a: SocketAddr, key: &str| post(a, key, acquire(9, TTL)).json()["reply"]["granted"]["fence"].as_u64();
    let new_a = granted(a, "a").expect("a granted");
    assert!(new_a > floor && new_a > fence_a, "a's fence {new_a} after {fence_a} (floor {floor})");
    drop(s);
    let s = server_with(dir.path(), reclaiming);
    let new_b = granted(s.addr(), "b").expect("b granted");
    assert!(
        new_b > floor && new_b > fence_b,
        "the floor did not survive the restart: b's fence {new_b} after {fence_b}"
    );
    assert_eq!(
        get(s.addr(), "/v1/leases/a").json()["holder"]["fence"],
        json!(new_a),
        "a's new grant survived"
    );
}
