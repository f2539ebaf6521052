//! The load generator's two drivers against a real built-in server: each pair they count is
//! one acquire and one release the server handled, so the figures of the `load` example are
//! what they say.

use std::sync::Arc;
use std::time::Duration;

use leasehold_core::Duration as LDuration;
use leasehold_http::BuiltinBackend;
use leasehold_server::{RunningServer, Server, ServerConfig};
use leasehold_test_servers::metric;
use leasehold_tests::load::{acquire_release, session_acquire_release};

const CLIENTS: usize = 4;

fn server() -> (tempfile::TempDir, RunningServer) {
    let dir = tempfile::tempdir().unwrap();
    let server =
        Server::spawn(ServerConfig::new(dir.path().join("db"), "127.0.0.1:0".parse().unwrap())).unwrap();
    (dir, server)
}

#[test]
fn each_v2_pair_is_one_acquire_and_one_release_in_its_own_session() {
    let (_dir, server) = server();
    let port = server.addr().port();
    let r = smol::block_on(session_acquire_release(
        &server.url(),
        "t",
        CLIENTS,
        Duration::from_millis(300),
        Duration::from_secs(30),
    ))
    .unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(r.pairs > 0 && r.p50 <= r.p99, "{r:?}");
    let count = |what: &str| metric(port, &format!("leasehold_session_{what}_total")).unwrap();
    // One session per client, each opened before the clock started and closed after it.
    assert_eq!(count("opens"), CLIENTS as u64);
    assert_eq!(count("closes"), CLIENTS as u64);
    // The untimed pair that opened each session, then exactly one acquire and one release
    // per pair counted: nothing was retried or left out of the figure.
    assert_eq!(count("acquires"), r.pairs + CLIENTS as u64);
    assert_eq!(count("releases"), r.pairs + CLIENTS as u64);
}

#[test]
fn each_v1_pair_is_one_grant_and_one_release() {
    let (_dir, server) = server();
    let port = server.addr().port();
    let backend = Arc::new(BuiltinBackend::new(&server.url(), None, Duration::from_secs(5)).unwrap());
    let r = smol::block_on(acquire_release(
        backend,
        "t",
        CLIENTS,
        Duration::from_millis(300),
        LDuration::from_secs(30),
    ));
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(r.pairs > 0 && r.p50 <= r.p99, "{r:?}");
    assert_eq!(metric(port, "leasehold_grants_total"), Some(r.pairs));
    assert_eq!(metric(port, "leasehold_releases_total"), Some(r.pairs));
}
