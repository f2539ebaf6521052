//! A backend-generic load generator: concurrent acquire+release pairs on distinct keys.
//!
//! [`acquire_release`] talks to a [`Backend`] directly (one request per acquire, one per
//! release), so it measures the authority and its durability, not the client's timers. The
//! same function runs against every backend, which is what makes side-by-side figures
//! comparable. [`session_acquire_release`] does the same over protocol v2 through
//! [`SessionClient`]'s public API, the way an application would: one session per worker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold_core::{parse_key, Duration as LDuration, Op, OwnerId, Reply, Request, RequestId};
use leasehold_http::{Backend, BuiltinSessions, Options, SessionClient, SessionSetupError, TransportError};

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
    report(all, errors, started.elapsed())
}

/// Why [`session_acquire_release`] could not start its clients.
#[derive(Debug, thiserror::Error)]
pub enum SessionLoadError {
    /// The server's URL cannot be used.
    #[error("session backend: {0}")]
    Backend(#[source] TransportError),
    /// A session client could not be made.
    #[error("session client: {0}")]
    Client(#[source] SessionSetupError),
}

/// Runs `clients` concurrent loops of acquire+release on keys `load-<prefix>-<i>` for
/// `duration` against the built-in server at `url` over protocol v2, each loop in its own
/// [`SessionClient`] (its own session) with session ttl `ttl`.
///
/// One session per worker, because each worker stands for an independent process, as each
/// loop of [`acquire_release`] is an independent owner: the server then sees `clients`
/// sessions, each with one key in use at a time. Every session is opened (by one untimed
/// acquire+release) before the clock starts, and closed after it stops, so the figure is the
/// steady state, not the opens. Each pair is `try_acquire` (one acquire, `Busy` at once if
/// held) and `release` (which returns once the server acknowledged it), so it costs two
/// requests, the same as a pair of [`acquire_release`].
pub async fn session_acquire_release(
    url: &str,
    prefix: &str,
    clients: usize,
    duration: Duration,
    ttl: Duration,
) -> Result<LoadReport, SessionLoadError> {
    let options = Options::session(ttl);
    let mut workers = Vec::with_capacity(clients);
    for i in 0..clients {
        let key = format!("load-{prefix}-{i}");
        let backend = BuiltinSessions::new(url, None, options.config.request_timeout.into())
            .map_err(SessionLoadError::Backend)?;
        let client = SessionClient::new(backend, &key, options).map_err(SessionLoadError::Client)?;
        workers.push((client, key));
    }
    let warmed: Vec<_> = workers
        .iter()
        .map(|(client, key)| {
            let (client, key) = (client.clone(), key.clone());
            smol::spawn(async move { pair(&client, &key).await.is_ok() })
        })
        .collect();
    let mut errors = 0;
    for w in warmed {
        errors += u64::from(!w.await);
    }
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = workers
        .iter()
        .map(|(client, key)| {
            let (client, key) = (client.clone(), key.clone());
            smol::spawn(async move {
                let (mut lat, mut errors) = (Vec::new(), 0u64);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match pair(&client, &key).await {
                        Ok(()) => lat.push(t.elapsed()),
                        Err(()) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        let (lat, e) = t.await;
        all.extend(lat);
        errors += e;
    }
    let elapsed = started.elapsed();
    for (client, _) in &workers {
        client.close().await;
    }
    Ok(report(all, errors, elapsed))
}

/// One acquire+release of `key` in `client`'s session.
async fn pair(client: &SessionClient, key: &str) -> Result<(), ()> {
    let lease = client.try_acquire(key).await.map_err(|_| ())?;
    lease.release().await.map_err(|_| ())
}

fn report(mut all: Vec<Duration>, errors: u64, elapsed: Duration) -> LoadReport {
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
