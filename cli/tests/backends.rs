//! `leasehold run --backend etcd|dynamodb` against real stores on loopback.

use std::process::{Command, Stdio};
use std::time::Duration;

use leasehold_tests::servers::{dynalite, etcd};

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");

const AWS_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "AKIDLEASEHOLDTEST"),
    ("AWS_SECRET_ACCESS_KEY", "not-a-real-secret"),
    ("AWS_REGION", "us-east-1"),
];

fn run(backend: &str, url: &str, extra: &[&str], cmd: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["run", "--backend", backend, "--server", url, "--key", "cli-job", "--ttl", "2s"])
        .args(extra)
        .arg("--")
        .args(cmd);
    c.envs(AWS_ENV).stderr(Stdio::null());
    c
}

/// The holder runs; a second `--no-wait` run is refused with 75; then it succeeds.
fn exclusive(backend: &str, url: &str) {
    let mut holder =
        run(backend, url, &[], &["sh", "-c", "test -n \"$LEASEHOLD_FENCE\" && sleep 1.5"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(run(backend, url, &["--no-wait"], &["true"]).status().unwrap().code(), Some(75), "{backend}");
    assert!(holder.wait().unwrap().success(), "{backend}: holder failed");
    assert_eq!(run(backend, url, &["--no-wait"], &["true"]).status().unwrap().code(), Some(0), "{backend}");
}

#[test]
fn run_on_etcd() {
    let e = etcd();
    exclusive("etcd", e.url());
}

#[test]
fn run_on_dynamodb() {
    let d = dynalite();
    let creds = leasehold_stores::Credentials::new(AWS_ENV[0].1, AWS_ENV[1].1, None, None, "test");
    let b =
        leasehold_stores::DynamoDbBackend::new(d.url(), "us-east-1", "leases", creds, Duration::from_secs(2))
            .unwrap();
    smol::block_on(b.create_table()).unwrap();
    exclusive("dynamodb", d.url());
    // Without credentials: a usage error naming what is missing.
    let out = Command::new(BIN)
        .args(["run", "--backend", "dynamodb", "--server", d.url(), "--key", "k", "--", "true"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AWS_ACCESS_KEY_ID"));
}
