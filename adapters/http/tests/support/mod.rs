//! Helpers shared by the client's integration tests.
// Each test binary uses a subset.
#![allow(dead_code)]

use std::time::Duration;

use futures_lite::future;

pub(crate) async fn sleep(ms: u64) {
    async_io::Timer::after(Duration::from_millis(ms)).await;
}

/// Fails the test instead of hanging it.
pub(crate) async fn within<T>(ms: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    future::or(f, async {
        sleep(ms).await;
        panic!("{what} did not finish within {ms} ms")
    })
    .await
}
