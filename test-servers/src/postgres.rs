//! A throwaway PostgreSQL server on loopback: `initdb` into a temporary folder, the server on
//! 127.0.0.1 and a kernel-picked port, stopped on drop.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// A PostgreSQL server of its own, user `postgres` with trust authentication, database
/// `postgres`. Fast shutdown on drop, and also when the test process dies: the server runs
/// under a shell that waits for its standard input to close, which the kernel does when this
/// process exits however it ends. That makes it safe to keep one in a `static` for a whole
/// test binary, where nothing is ever dropped.
pub struct Postgres {
    /// Closed to stop the server; `None` once closed.
    stop: Option<ChildStdin>,
    watchdog: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Postgres {
    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection string for the `postgres` client: `host=127.0.0.1 port=P user=postgres
    /// dbname=postgres`.
    pub fn config(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    /// The server's log so far (its standard error).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        drop(self.stop.take());
        let _ = self.watchdog.wait();
    }
}

/// How much the server promises about committed data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// PostgreSQL's defaults: every commit is on disk before it is acknowledged. For
    /// benchmarks, whose figures should be what users see.
    Full,
    /// `fsync`, `synchronous_commit` and `full_page_writes` off: several times faster per
    /// commit, and nothing a test checks depends on surviving a power cut.
    None,
}

/// A server for tests ([`Durability::None`]). Panics, saying what to install, if PostgreSQL's
/// server programs are missing: a test that needs one must fail, never skip.
pub fn postgres() -> Postgres {
    postgres_with(Durability::None)
}

/// A server with the given durability.
pub fn postgres_with(durability: Durability) -> Postgres {
    let (bin, as_server_user, dir) = init();
    // The server cannot be told to pick its own port (`-p 0` is refused), so the port is
    // picked beforehand; another process may take it in between, and then the server exits at
    // once: try again on a new port.
    for _ in 0..5 {
        if let Some((stop, watchdog)) = try_start(&bin, &as_server_user, dir.path(), free_port(), durability)
        {
            let port = port_of(dir.path());
            return Postgres { stop: Some(stop), watchdog, port, dir };
        }
    }
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
    panic!("PostgreSQL exited at start five times (ports taken?); its last log:\n{log}");
}

/// The server programs' folder, the prefix that runs them, and a folder with a fresh cluster.
fn init() -> (PathBuf, Vec<String>, tempfile::TempDir) {
    let bin = server_bin_dir();
    let dir = tempfile::tempdir().expect("temp dir");
    let as_server_user = server_user_prefix();
    if !as_server_user.is_empty() {
        // The server refuses to run as root; the folder must be its own.
        run(
            Command::new("chown").arg("postgres:postgres").arg(dir.path()),
            "chown the server's folder to postgres",
        );
    }
    run(
        command(&as_server_user, &bin.join("initdb")).arg("-D").arg(dir.path().join("data")).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]),
        "initdb",
    );
    (bin, as_server_user, dir)
}

/// The port in a running server's postmaster.pid (its fourth line).
fn port_of(dir: &Path) -> u16 {
    let pid_file = std::fs::read_to_string(dir.join("data/postmaster.pid")).unwrap_or_default();
    pid_file.lines().nth(3).and_then(|p| p.trim().parse().ok()).expect("a port in postmaster.pid")
}

/// The server on `port`, ready; `None` if it exited (the port was taken).
fn try_start(
    bin: &Path,
    as_server_user: &[String],
    dir: &Path,
    port: u16,
    durability: Durability,
) -> Option<(ChildStdin, Child)> {
    let data = dir.join("data");
    let _ = std::fs::remove_file(data.join("postmaster.pid"));
    let mut server = command(as_server_user, &bin.join("postgres"));
    server.arg("-D").arg(&data).arg("-p").arg(port.to_string()).arg("-k").arg(dir);
    server.args(["-c", "listen_addresses=127.0.0.1"]);
    if durability == Durability::None {
        server.args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]);
    }
    // The shell waits for the server and exits with it, so a server that exits at start is
    // seen. Beside it a reader waits for the shell's standard input to close, then marks the
    // stop as asked for and sends a fast shutdown (SIGINT; the server's PID is `$!`, since
    // setpriv execs); only an asked-for stop removes the folder (a server kept in a static
    // has no drop to do that). An asynchronous list's standard input is /dev/null, hence fd 3.
    let stopping = shell_quote(&dir.join("stopping").to_string_lossy());
    let script = format!(
        "exec 3<&0; {server} 2>>{log} & pid=$!; (read _ <&3; : >{stopping}; kill -INT $pid 2>/dev/null) & \
         wait $pid; [ -e {stopping} ] && rm -rf {dir}",
        server = shell_words(&server),
        log = shell_quote(&dir.join("server.log").to_string_lossy()),
        dir = shell_quote(&dir.to_string_lossy()),
    );
    let mut watchdog = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run sh to start PostgreSQL: {e}"));
    let stop = watchdog.stdin.take().expect("piped stdin");
    let started = Instant::now();
    // postmaster.pid's eighth line becomes "ready" once *this* server accepts connections; a
    // readiness probe on the port could be answered by whoever else holds it.
    loop {
        if watchdog.try_wait().expect("wait for the PostgreSQL shell").is_some() {
            return None;
        }
        if let Ok(pid_file) = std::fs::read_to_string(data.join("postmaster.pid")) {
            let mut lines = pid_file.lines();
            if lines.nth(3).is_some_and(|p| p.trim() == port.to_string())
                && lines.nth(3).is_some_and(|s| s.trim() == "ready")
            {
                return Some((stop, watchdog));
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            drop(stop);
            let _ = watchdog.wait();
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            panic!("PostgreSQL did not become ready in 30 s; its log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where `initdb` and `postgres` are: the newest `/usr/lib/postgresql/N/bin` (Debian keeps
/// them off PATH), else the folder of an `initdb` on PATH.
fn server_bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").is_file() && bin.join("postgres").is_file())
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let on_path = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|d| d.join("initdb").is_file() && d.join("postgres").is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "PostgreSQL's server programs (initdb, postgres) are not installed: no \
             /usr/lib/postgresql/*/bin/initdb and none on PATH. Install them: \
             apt-get install postgresql (or run bash scripts/setup.sh)"
        )
    })
}

/// As root, the prefix that runs a program as the `postgres` user (initdb and the server
/// refuse root). `setpriv` execs, so the process started is the program itself; `runuser`
/// would stay its parent.
fn server_user_prefix() -> Vec<String> {
    let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    if root {
        ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", "--"].map(String::from).to_vec()
    } else {
        Vec::new()
    }
}

fn command(prefix: &[String], program: &Path) -> Command {
    match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn run(command: &mut Command, what: &str) {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start {:?}: {e}", command.get_program()));
    let mut stderr = String::new();
    let _ = child.stderr.take().expect("piped stderr").read_to_string(&mut stderr);
    let status = child.wait().expect("wait");
    assert!(status.success(), "{what} failed ({status}): {stderr}");
}

fn shell_words(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port someone else holds: the server exits at start, and that is seen, not waited out.
    #[test]
    fn a_taken_port_is_seen_and_another_is_tried() {
        let (bin, as_server_user, dir) = init();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        assert!(try_start(&bin, &as_server_user, dir.path(), port, Durability::None).is_none());
        assert!(std::fs::read_to_string(dir.path().join("server.log"))
            .unwrap()
            .contains("Address already in use"));
        let (stop, mut watchdog) =
            try_start(&bin, &as_server_user, dir.path(), free_port(), Durability::None).unwrap();
        assert_ne!(port_of(dir.path()), port);
        drop(stop);
        assert!(watchdog.wait().unwrap().success());
    }
}
