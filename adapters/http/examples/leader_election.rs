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
//! cargo run -p leasehold-http --example leader_election
//! ```
//!
//! The same with the command line, on every candidate and wherever the leader is needed:
//!
//! ```sh
//! leasehold run --protocol v2 --key leader --value 10.0.0.7:8080 -- serve-as-leader
//! leasehold observe --key leader      # one line per change: its label, fence and value
//! ```

use std::time::Duration;

use futures_lite::StreamExt;
use leasehold_http::{Fence, Observation, Options, SessionClient};
use leasehold_server::{Server, ServerConfig};

const CANDIDATES: usize = 3;
const TERMS_EACH: usize = 2;

fn main() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let server =
        Server::spawn(ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap())).expect("server");
    let url = server.url();
    let options = || Options::session(Duration::from_secs(5));
    let follower = SessionClient::new(&url, None, "follower", options()).expect("client");
    smol::block_on(async {
        let mut leaders = follower.observe("leader").expect("a valid key");
        // The first report is the state now (nobody leads yet): from here on no term is missed.
        assert_eq!(leaders.next().await, Some(Observation::Free));
        let candidates: Vec<_> = (1..=CANDIDATES)
            .map(|i| {
                let client =
                    SessionClient::new(&url, None, &format!("candidate-{i}"), options()).expect("client");
                smol::spawn(async move {
                    let address = format!("127.0.0.{i}:8080");
                    for _ in 0..TERMS_EACH {
                        // Waits FIFO behind the other candidates; the grant is pushed.
                        let lease = client.acquire_with_value("leader", &address, None, |_| {}).await?;
                        println!(
                            "candidate-{i}: leading as {address} under fence {}",
                            lease.fence().unwrap_or_default()
                        );
                        // Serve as leader, presenting the fence to whatever it writes to.
                        async_io::Timer::after(Duration::from_millis(300)).await;
                        lease
                            .release()
                            .await
                            .map_err(|e| leasehold_http::AcquireError::Spawn(e.to_string()))?;
                    }
                    client.close().await;
                    Ok::<(), leasehold_http::AcquireError>(())
                })
            })
            .collect();
        let follow = async {
            let (mut terms, mut last) = (0, Fence::NONE);
            while let Some(o) = leaders.next().await {
                match o {
                    Observation::Held { label, fence, value, .. } => {
                        assert!(fence > last, "fences only grow");
                        last = fence;
                        terms += 1;
                        println!("follower: the leader is {label} at {value} (fence {fence})");
                    }
                    Observation::Free => {
                        println!("follower: no leader");
                        if terms == CANDIDATES * TERMS_EACH {
                            return terms;
                        }
                    }
                }
            }
            terms
        };
        let stand = async {
            for c in candidates {
                c.await.expect("candidate");
            }
        };
        let (terms, ()) = futures_lite::future::zip(follow, stand).await;
        println!("follower saw {terms} terms, each leader's address as it took over");
    });
}
