//! Leader election on protocol v2: acquire plus observe.
//!
//! Three candidates contend for the key `leader`, each acquiring it with its own address as
//! the value ([`SessionClient::acquire_with_value`]); whoever holds it is the leader and
//! serves (here: for 300 ms, then steps down and stands again). A follower observes the key
//! ([`SessionClient::observe`]) and learns each new leader's address the moment it takes
//! over, with a fence that only grows, without polling. The built-in server runs in this
//! process on a kernel-chosen loopback port.
//!
//! ```sh
//! cargo run -p leasehold-http --example leader_election [-- TERMS_EACH]
//! ```
//!
//! It also prints how long the follower took to hear of each new leader, counted from the
//! moment the old one called `release`.
//!
//! The same with the command line, on every candidate and wherever the leader is needed:
//!
//! ```sh
//! leasehold run --protocol v2 --key leader --value 10.0.0.7:8080 -- serve-as-leader
//! leasehold observe --key leader      # one line per change: its label, fence and value
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use leasehold_http::{AcquireError, BuiltinSessions, Fence, Observation, Options, SessionClient};
use leasehold_server::{Server, ServerConfig};

const CANDIDATES: usize = 3;

/// A candidate: stands `terms` times, each time leading for 300 ms once elected. Notes when it
/// steps down in `stepped_down`.
async fn candidate(
    client: SessionClient,
    i: usize,
    terms: usize,
    stepped_down: Arc<Mutex<Option<Instant>>>,
) -> Result<(), AcquireError> {
    let address = format!("127.0.0.{i}:8080");
    for _ in 0..terms {
        // Waits FIFO behind the other candidates; the grant is pushed.
        let lease = client.acquire_with_value("leader", &address, None, |_| {}).await?;
        println!("candidate-{i}: leading as {address} under fence {}", lease.fence().unwrap_or_default());
        // Serve as leader, presenting the fence to whatever it writes to.
        async_io::Timer::after(Duration::from_millis(300)).await;
        *stepped_down.lock().unwrap() = Some(Instant::now());
        lease.release().await.map_err(|e| AcquireError::Spawn(e.to_string()))?;
    }
    client.close().await;
    Ok(())
}

fn main() {
    let terms_each: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let server =
        Server::spawn(ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap())).expect("server");
    let url = server.url();
    let client = |label: &str| {
        let options = Options::session(Duration::from_secs(5));
        let backend = BuiltinSessions::new(&url, None, options.config.request_timeout.into()).expect("a URL");
        SessionClient::new(backend, label, options).expect("client")
    };
    let follower = client("follower");
    let stepped_down: Arc<Mutex<Option<Instant>>> = Arc::default();
    smol::block_on(async {
        let mut leaders = follower.observe("leader").expect("a valid key");
        // The first report is the state now (nobody leads yet): from here on no term is missed.
        assert_eq!(leaders.next().await, Some(Observation::Free));
        let candidates: Vec<_> = (1..=CANDIDATES)
            .map(|i| {
                smol::spawn(candidate(client(&format!("candidate-{i}")), i, terms_each, stepped_down.clone()))
            })
            .collect();
        let follow = async {
            let (mut terms, mut last, mut heard_after) = (0, Fence::NONE, Vec::new());
            while let Some(o) = leaders.next().await {
                match o {
                    Observation::Held { label, fence, value, .. } => {
                        assert!(fence > last, "fences only grow");
                        last = fence;
                        terms += 1;
                        let after = stepped_down.lock().unwrap().take().map(|t| t.elapsed());
                        heard_after.extend(after);
                        println!("follower: the leader is {label} at {value} (fence {fence})");
                    }
                    Observation::Free => {
                        println!("follower: no leader");
                        if terms == CANDIDATES * terms_each {
                            break;
                        }
                    }
                }
            }
            (terms, heard_after)
        };
        let stand = async {
            for c in candidates {
                c.await.expect("candidate");
            }
        };
        let ((terms, mut heard_after), ()) = futures_lite::future::zip(follow, stand).await;
        println!("follower saw {terms} terms, each leader's address as it took over");
        heard_after.sort();
        if let (Some(&min), Some(&max)) = (heard_after.first(), heard_after.last()) {
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            let median = heard_after[heard_after.len() / 2];
            println!(
                "a new leader heard after the old one's release call: {} hand-offs, min {:.1} ms, median {:.1} ms, max {:.1} ms",
                heard_after.len(),
                ms(min),
                ms(median),
                ms(max)
            );
        }
    });
}
