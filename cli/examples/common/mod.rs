//! What the examples that drive real `leasehold` processes share: the binary, a server on a
//! kernel-picked port, and child process groups that cannot outlive the example.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A child process group, killed when dropped: a contender's `sh` and the command under it
/// go with it, even when the example panics.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.0.wait();
    }
}

/// The `leasehold` binary next to this example's directory (`target/release/leasehold`).
pub(crate) fn leasehold_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("leasehold")).expect("a target directory");
    assert!(bin.exists(), "{} is missing: cargo build --release -p leasehold first", bin.display());
    bin
}

/// `leasehold serve` on a kernel-picked port with `extra` arguments, in its own process
/// group; returns it with its URL, read from its `listening on` line.
pub(crate) fn serve(bin: &Path, data: &Path, extra: &[&str]) -> (Proc, String) {
    let mut child = Command::new(bin)
        .args(["serve", "--data"])
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start leasehold serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line).expect("a line");
    let url = line.trim().strip_prefix("listening on ").expect("listening line").to_string();
    (Proc(child), url)
}

/// The `p` quantile of `sorted` (nearest rank); NaN if it is empty.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}
