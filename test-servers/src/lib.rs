//! Real stores started on loopback for tests: etcd, dynalite (DynamoDB-compatible) and
//! PostgreSQL.
//! Each is stopped when dropped. A missing binary fails loudly with the install command.
//! With the `tls` feature, the `tls` module puts any of them (or a leasehold server) behind https.

mod closing;
mod postgres;
#[cfg(feature = "tls")]
pub mod tls;

pub use closing::ClosingProxy;
pub use postgres::{postgres, postgres_with, Durability, Postgres};

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
    /// Where clients connect: `http://127.0.0.1:PORT` (or `https://`).
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

/// The counter `name` from the plain-http `/metrics` (Prometheus text) of a server on
/// 127.0.0.1:`port`; `None` if it cannot be reached or has no such counter.
pub fn metric(port: u16, name: &str) -> Option<u64> {
    let text = http_get(port, "/metrics")?;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The whole response (status line, headers and body) to a plain-http `GET path` of a server on
/// 127.0.0.1:`port`; `None` if it cannot be reached.
pub fn http_get(port: u16, path: &str) -> Option<String> {
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
    etcd_with(|_| Vec::new(), "http")
}

/// etcd started with the extra arguments `args(dir)` gives (files it needs go in `dir`, which
/// lives as long as the process), serving clients on `scheme`://127.0.0.1:PORT.
pub(crate) fn etcd_with(args: impl Fn(&Path) -> Vec<String>, scheme: &str) -> Running {
    // etcd cannot report a kernel-chosen port, so the ports are picked beforehand; another
    // process may take one in between, and then etcd exits: try again on new ports.
    for _ in 0..5 {
        if let Some(running) = try_etcd(&args, scheme) {
            return running;
        }
    }
    panic!("etcd exited at start five times (ports taken?); run `etcd` by hand to see why");
}

fn try_etcd(args: &impl Fn(&Path) -> Vec<String>, scheme: &str) -> Option<Running> {
    let dir = tempfile::tempdir().expect("temp dir");
    let (client, peer, metrics) = (free_port(), free_port(), free_port());
    let c = format!("{scheme}://127.0.0.1:{client}");
    let p = format!("http://127.0.0.1:{peer}");
    // /health on a plain-http metrics listener works whatever the client side requires.
    let m = format!("http://127.0.0.1:{metrics}");
    let child = Command::new("etcd")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
        .args(["--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
        .args(["--initial-cluster", &format!("default={p}")])
        .args(["--listen-metrics-urls", &m])
        .args(args(dir.path()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start etcd ({e}); install it: apt-get install etcd-server"));
    let mut running = Running { child, url: c, _dir: dir };
    let started = Instant::now();
    // The body check matters: it rules out a socket connected to itself, which a bare connect
    // to a port nobody listens on yet can produce.
    while !http_get(metrics, "/health").is_some_and(|r| r.contains("\"health\":\"true\"")) {
        if running.child.try_wait().expect("wait for etcd").is_some() {
            return None;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "etcd did not become healthy");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Healthy, but was that our etcd? If another one owns the port, ours has exited by now.
    std::thread::sleep(Duration::from_millis(50));
    running.child.try_wait().expect("wait for etcd").is_none().then_some(running)
}

/// dynalite (in memory), from `tools/dynalite` (installed by `scripts/setup.sh`); tables become
/// ACTIVE at once.
pub fn dynalite() -> Running {
    dynalite_with_create_table_ms(0)
}

/// dynalite whose new tables stay CREATING for `ms` milliseconds, as DynamoDB's do.
pub fn dynalite_with_create_table_ms(ms: u64) -> Running {
    use std::io::{BufRead, BufReader};
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/dynalite");
    assert!(
        tools.join("node_modules/dynalite").exists(),
        "dynalite is not installed: run `bash scripts/setup.sh` (or `cd tools/dynalite && npm ci`)"
    );
    // serve.js listens on a port the kernel picks and prints it: no free-port race.
    let mut child = Command::new("node")
        .arg(tools.join("serve.js"))
        .arg(ms.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start node ({e}); install it: apt-get install nodejs npm"));
    let mut line = String::new();
    let read = BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line);
    let port = match read.ok().and_then(|_| line.trim().strip_prefix("listening ")?.parse::<u16>().ok()) {
        Some(port) => port,
        None => {
            let _ = child.kill();
            panic!("dynalite did not start: it printed {line:?} (see its stderr above)");
        }
    };
    Running { child, url: format!("http://127.0.0.1:{port}"), _dir: tempfile::tempdir().expect("temp dir") }
}
