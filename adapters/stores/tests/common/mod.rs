//! What the stores' tests share: direct access to etcd's gateway and to dynalite's table,
//! as an operator would have, and bounded waits.
// Each test binary compiles this module and uses a part of it.
#![allow(dead_code)]

use std::time::Duration;

use futures_lite::future;
use http_body_util::Full;
use hyper::body::Bytes;
use leasehold_http::HttpClient;
use leasehold_stores::Credentials;
use serde_json::{json, Value};

/// Direct access to etcd's gateway, as an operator would have.
pub(crate) struct Etcd(pub(crate) HttpClient);

impl Etcd {
    pub(crate) fn new(url: &str) -> Etcd {
        Etcd(HttpClient::new(url, Duration::from_secs(2)).unwrap())
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> Value {
        let req =
            self.0.request(hyper::Method::POST, path).body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let resp = self.0.send(req).await.unwrap();
        assert_eq!(resp.status, 200, "{path}: {:?}", resp.body);
        serde_json::from_slice(&resp.body).unwrap()
    }

    /// How many leases etcd has.
    pub(crate) async fn leases(&self) -> usize {
        let v = self.post("/v3/lease/leases", json!({})).await;
        v["leases"].as_array().map_or(0, Vec::len)
    }
}

/// The test credentials: dynalite checks that a request is signed, not the signature.
pub(crate) fn creds() -> Credentials {
    Credentials::new("AKIDLEASEHOLDTEST", "not-a-real-secret", None, None, "test")
}

/// One DynamoDB API call `op` straight to the table at `url`, behind the backends' backs:
/// its status and body. Signed with a dummy signature, which dynalite accepts.
pub(crate) async fn dynamo_raw(url: &str, op: &str, body: Value) -> (u16, Value) {
    let http = HttpClient::new(url, Duration::from_secs(2)).unwrap();
    let req = http
        .request(hyper::Method::POST, "/")
        .header("content-type", "application/x-amz-json-1.0")
        .header("x-amz-target", format!("DynamoDB_20120810.{op}"))
        .header("x-amz-date", "20260101T000000Z")
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKID/20260101/us-east-1/dynamodb/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature=00",
        )
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = http.send(req).await.unwrap();
    (resp.status, serde_json::from_slice(&resp.body).unwrap())
}

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
