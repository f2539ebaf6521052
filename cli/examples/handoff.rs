//! Hand-off and fairness (issue 10, "Figures"): looping contenders on one key per group, all
//! groups in the same run on this machine.
//!
//! - `run --protocol v2`: three looping `leasehold run` on the built-in server's sessions;
//! - `run v1`: the same on protocol v1 (polling);
//! - `run --backend etcd`: `leasehold run` on etcd;
//! - `run --backend etcd --protocol v2`: `leasehold run` in etcd sessions (waiters watch their
//!   predecessor's key);
//! - `etcdctl lock`: three looping `etcdctl lock` on etcd 3.4 (Debian's).
//!
//! With `dynamodb` after SECONDS, instead: `run --backend dynamodb` with `--protocol v1` and
//! `v2` on dynalite (no push and no queue there: waiters poll, so this shows the fairness that
//! remains).
//!
//! Each contender's command logs `start`/`end` with a nanosecond timestamp around a short
//! sleep. Per group it prints the gap between one command's end and the next one's start
//! (median and p90) and the largest share of sections one contender got.
//!
//! ```sh
//! cargo build --release -p leasehold && cargo run --release -p leasehold --example handoff [-- SECONDS [dynamodb]]
//! ```

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{leasehold_bin, percentile, serve, Proc};

struct Group {
    name: &'static str,
    /// The command that takes the lock and runs `sh -c SECTION`.
    lock: String,
}

/// One contender: loops `lock` until `until_ns`, logging each section as `start|end WHO NS`.
fn contender(group: &Group, who: usize, log: &Path, until_ns: u128) -> Proc {
    let section = format!(
        "echo start {who} $(date +%s%N) >> {log}; sleep 0.05; echo end {who} $(date +%s%N) >> {log}",
        log = log.display()
    );
    let script = format!(
        "while [ $(date +%s%N) -lt {until_ns} ]; do {lock} sh -c '{section}' > /dev/null 2>&1; done",
        lock = group.lock
    );
    Proc(Command::new("sh").args(["-c", &script]).process_group(0).spawn().expect("sh"))
}

/// Gaps (ms) between each end and the next start, the section count per contender, and
/// whether two sections ever overlapped.
fn analyse(log: &Path) -> (Vec<f64>, Vec<usize>, usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut events: Vec<(u128, bool, usize)> = text
        .lines()
        .filter_map(|l| {
            let mut p = l.split_whitespace();
            let kind = p.next()? == "start";
            let who = p.next()?.parse().ok()?;
            Some((p.next()?.parse().ok()?, kind, who))
        })
        .collect();
    events.sort();
    let (mut gaps, mut counts, mut overlaps) = (Vec::new(), vec![0; 3], 0);
    let (mut last_end, mut open) = (None::<u128>, 0i32);
    for (t, start, who) in events {
        if start {
            open += 1;
            if open > 1 {
                overlaps += 1;
            }
            counts[who] += 1;
            if let Some(e) = last_end.take() {
                gaps.push((t - e) as f64 / 1e6);
            }
        } else {
            open -= 1;
            last_end = Some(t);
        }
    }
    gaps.sort_by(f64::total_cmp);
    (gaps, counts, overlaps)
}

fn main() {
    let seconds: u64 = std::env::args().nth(1).map(|s| s.parse().expect("SECONDS")).unwrap_or(30);
    let bin = leasehold_bin();
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(&bin, &dir.path().join("store"), &[]);
    let run = |extra: &str, key: &str| format!("{} run --key {key} --ttl 5s {extra} --", bin.display());
    let dynamodb = std::env::args().nth(2).is_some_and(|a| a == "dynamodb");
    let _dynalite;
    let _etcd;
    let groups = if dynamodb {
        let d = leasehold_test_servers::dynalite();
        let creds =
            leasehold_stores::Credentials::new("AKIDLEASEHOLD", "not-a-secret", None, None, "handoff");
        let table = leasehold_stores::DynamoDbBackend::new(
            d.url(),
            "us-east-1",
            "leases",
            creds,
            Duration::from_secs(2),
        )
        .unwrap();
        smol::block_on(table.create_table()).unwrap();
        let env = "AWS_ACCESS_KEY_ID=AKIDLEASEHOLD AWS_SECRET_ACCESS_KEY=not-a-secret AWS_REGION=us-east-1";
        let on = |protocol: &str, key: &str| {
            format!(
                "{env} {}",
                run(&format!("--server {} --backend dynamodb --protocol {protocol}", d.url()), key)
            )
        };
        let groups = vec![
            Group { name: "leasehold run --backend dynamodb --protocol v2", lock: on("v2", "ddb-v2") },
            Group { name: "leasehold run --backend dynamodb (v1)", lock: on("v1", "ddb-v1") },
        ];
        _dynalite = d;
        groups
    } else {
        let etcd = leasehold_test_servers::etcd();
        let etcd_url = etcd.url().to_string();
        _etcd = etcd;
        etcd_groups(&run, &url, &etcd_url)
    };
    run_groups(seconds, &dir, &groups);
}

fn etcd_groups(run: &dyn Fn(&str, &str) -> String, url: &str, etcd_url: &str) -> Vec<Group> {
    vec![
        Group {
            name: "leasehold run --protocol v2",
            lock: run(&format!("--server {url} --protocol v2"), "v2"),
        },
        Group {
            name: "leasehold run (v1, polling)",
            lock: run(&format!("--server {url} --protocol v1"), "v1"),
        },
        Group {
            name: "leasehold run --backend etcd",
            lock: run(&format!("--server {etcd_url} --backend etcd"), "etcd"),
        },
        Group {
            name: "leasehold run --backend etcd --protocol v2",
            lock: run(&format!("--server {etcd_url} --backend etcd --protocol v2"), "etcd-v2"),
        },
        Group {
            name: "etcdctl lock",
            lock: format!("ETCDCTL_API=3 etcdctl --endpoints {etcd_url} lock etcdctl-key --"),
        },
    ]
}

fn run_groups(seconds: u64, dir: &tempfile::TempDir, groups: &[Group]) {
    let now_ns = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let until = now_ns() + Duration::from_secs(seconds).as_nanos();
    let logs: Vec<PathBuf> = (0..groups.len()).map(|i| dir.path().join(format!("group{i}.log"))).collect();
    let mut procs = Vec::new();
    for (g, log) in groups.iter().zip(&logs) {
        for who in 0..3 {
            procs.push(contender(g, who, log, until));
        }
    }
    for p in &mut procs {
        let _ = p.0.wait();
    }
    println!("{seconds} s, 3 looping contenders per group, all groups at once, 50 ms sections:");
    println!(
        "{:<44} {:>8} {:>12} {:>10} {:>10} {:>9}",
        "group", "sections", "per contender", "gap p50", "gap p90", "max share"
    );
    for (g, log) in groups.iter().zip(&logs) {
        let (gaps, counts, overlaps) = analyse(log);
        let total: usize = counts.iter().sum();
        let max_share = counts.iter().copied().max().unwrap_or(0) as f64 / total.max(1) as f64;
        println!(
            "{:<44} {:>8} {:>12} {:>8.1}ms {:>8.1}ms {:>9.2}{}",
            g.name,
            total,
            format!("{counts:?}"),
            percentile(&gaps, 0.5),
            percentile(&gaps, 0.9),
            max_share,
            if overlaps > 0 { format!("  OVERLAPS: {overlaps}") } else { String::new() }
        );
    }
}
