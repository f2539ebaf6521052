//! Real stores started on loopback for tests: etcd and dynalite (DynamoDB-compatible).
//! Each is stopped when dropped. A missing binary fails loudly with the install command.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A store process on loopback; killed on drop.
pub struct Running {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Running {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind loopback").local_addr().expect("local addr").port()
}

fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// A single-node etcd with a fresh data directory, healthy.
pub fn etcd() -> Running {
    let dir = tempfile::tempdir().expect("temp dir");
    let (client, peer) = (free_port(), free_port());
    let c = format!("http://127.0.0.1:{client}");
    let p = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
        .args(["--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
        .args(["--initial-cluster", &format!("default={p}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start etcd ({e}); install it: apt-get install etcd-server"));
    let running = Running { child, url: c, _dir: dir };
    let started = Instant::now();
    while !http_get(client, "/health").is_some_and(|r| r.contains("\"health\":\"true\"")) {
        assert!(started.elapsed() < Duration::from_secs(15), "etcd did not become healthy");
        std::thread::sleep(Duration::from_millis(50));
    }
    running
}

/// dynalite (in memory), from `tools/dynalite` (installed by `scripts/setup.sh`).
pub fn dynalite() -> Running {
    let cli = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/dynalite/node_modules/dynalite/cli.js");
    assert!(
        cli.exists(),
        "dynalite is not installed: run `bash scripts/setup.sh` (or `cd tools/dynalite && npm ci`)"
    );
    let port = free_port();
    let child = Command::new("node")
        .arg(&cli)
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--createTableMs", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start node ({e}); install it: apt-get install nodejs npm"));
    let running = Running {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _dir: tempfile::tempdir().expect("temp dir"),
    };
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(15), "dynalite did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    running
}
