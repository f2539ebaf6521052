//! A backend-generic load generator: concurrent acquire+release pairs on distinct keys.
//!
//! It talks to a [`Backend`] directly (one request per acquire, one per release), so it
//! measures the authority and its durability, not the client's timers. The same function runs
//! against every backend, which is what makes side-by-side figures comparable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold_core::{parse_key, Duration as LDuration, Op, OwnerId, Reply, Request, RequestId};
use leasehold_http::Backend;

/// What a run measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Completed acquire+release pairs.
    pub pairs: u64,
    /// Pairs that failed (transport error or unexpected reply).
    pub errors: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Median latency of one pair.
    pub p50: Duration,
    /// 99th percentile latency of one pair.
    pub p99: Duration,
}

impl LoadReport {
    /// Pairs per second.
    pub fn rate(&self) -> f64 {
        self.pairs as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `clients` concurrent loops of acquire+release on keys `load-<prefix>-<i>` for
/// `duration`, with lease length `ttl`.
pub async fn acquire_release<B: Backend>(
    backend: Arc<B>,
    prefix: &str,
    clients: usize,
    duration: Duration,
    ttl: LDuration,
) -> LoadReport {
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let backend = backend.clone();
            let key = parse_key(&format!("load-{prefix}-{i}")).expect("valid key");
            smol::spawn(async move {
                let owner = OwnerId(i as u64 + 1);
                let (mut lat, mut errors, mut id) = (Vec::new(), 0u64, 0u32);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    id += 2;
                    let acquire = Request { id: RequestId(id), owner, op: Op::Acquire { ttl } };
                    let Ok(Reply::Granted { fence, .. }) = backend.call(&key, acquire).await else {
                        errors += 1;
                        continue;
                    };
                    let release = Request { id: RequestId(id + 1), owner, op: Op::Release { fence } };
                    match backend.call(&key, release).await {
                        Ok(Reply::Released) => lat.push(t.elapsed()),
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await;
        all.extend(lat);
        errors += e;
    }
    let elapsed = started.elapsed();
    all.sort_unstable();
    let pct = |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied();
    LoadReport {
        pairs: all.len() as u64,
        errors,
        elapsed,
        p50: pct(0.50).unwrap_or_default(),
        p99: pct(0.99).unwrap_or_default(),
    }
}
