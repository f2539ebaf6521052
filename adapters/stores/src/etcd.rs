//! etcd v3 through its JSON gateway (`/v3/...`, etcd 3.4+).
//!
//! etcd keeps its own clock, so this is the server-timed discipline: a grant is an etcd lease
//! of at least the requested ttl with the key attached, created only if the key is absent
//! (`create_revision == 0`). The fence is the cluster revision of the winning write, which
//! strictly increases per key and survives restarts. Renewal is a lease keepalive; release
//! deletes the key if it is still our write, and revokes the lease.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use http_body_util::Full;
use hyper::body::Bytes;
use leasehold_core::{Duration as LDuration, Fence, Key, Op, OwnerId, Reject, Reply, Request};
use leasehold_http::{Backend, HttpClient, TransportError};
use serde_json::{json, Value};

/// A lease backend on an etcd cluster's v3 JSON gateway.
pub struct EtcdBackend {
    http: HttpClient,
    prefix: String,
    /// Which etcd lease carries each of our grants: `(key, owner) -> (fence, lease id)`.
    /// Bookkeeping of ids, not lease logic: validity and retries stay with the core.
    leases: Mutex<HashMap<(Key, OwnerId), (Fence, i64)>>,
}

impl EtcdBackend {
    /// A backend for the etcd client URL `url` (e.g. `http://127.0.0.1:2379`); keys are stored
    /// under `prefix` (e.g. `leasehold/`).
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<EtcdBackend, TransportError> {
        Ok(EtcdBackend {
            http: HttpClient::new(url, timeout)?,
            prefix: prefix.to_string(),
            leases: Mutex::default(),
        })
    }

    fn key(&self, key: &Key) -> String {
        B64.encode(format!("{}{}", self.prefix, key))
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, TransportError> {
        let req = self
            .http
            .request(hyper::Method::POST, path)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let resp = self.http.send(req).await?;
        let v: Value = serde_json::from_slice(&resp.body)
            .map_err(|e| TransportError::Protocol(format!("etcd {path}: HTTP {}: {e}", resp.status)))?;
        if resp.status >= 500 {
            return Err(TransportError::Protocol(format!("etcd {path}: HTTP {}: {v}", resp.status)));
        }
        if resp.status != 200 {
            return Err(TransportError::Config(format!(
                "etcd {path}: HTTP {}: {}",
                resp.status, v["message"]
            )));
        }
        Ok(v)
    }

    async fn grant(&self, ttl: LDuration) -> Result<i64, TransportError> {
        // etcd counts whole seconds and may round up further (its minimum TTL): never less
        // than asked, which is the safe direction.
        let secs = ttl.as_micros().div_ceil(1_000_000).max(1);
        let v = self.post("/v3/lease/grant", json!({"TTL": secs.to_string()})).await?;
        int(&v["ID"]).ok_or_else(|| TransportError::Protocol(format!("lease grant without ID: {v}")))
    }

    async fn revoke(&self, id: i64) {
        if let Err(e) = self.post("/v3/lease/revoke", json!({"ID": id.to_string()})).await {
            tracing::debug!("revoking etcd lease {id}: {e}");
        }
    }

    fn remember(&self, key: &Key, owner: OwnerId) -> Option<(Fence, i64)> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).get(&(key.clone(), owner)).copied()
    }

    async fn acquire(&self, key: &Key, owner: OwnerId, ttl: LDuration) -> Result<Reply, TransportError> {
        let id = self.grant(ttl).await?;
        let k = self.key(key);
        let me = B64.encode(owner.0.to_string());
        let put = json!({"request_put": {"key": k, "value": me, "lease": id.to_string()}});
        // Free, or already ours (a retried acquire whose reply was lost): a fresh put either way,
        // so the fence (its revision) is new.
        let txn = json!({
            "compare": [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [put],
            "failure": [{"request_range": {"key": k}}],
        });
        let v = self.post("/v3/kv/txn", txn).await?;
        let holder = if v["succeeded"] == json!(true) {
            None
        } else {
            let kv = &v["responses"][0]["response_range"]["kvs"][0];
            Some((
                kv["value"].as_str().unwrap_or("").to_string(),
                int(&kv["lease"]).unwrap_or(0),
                int(&kv["mod_revision"]),
            ))
        };
        let revision = match holder {
            None => int(&v["header"]["revision"]),
            Some((value, old_lease, Some(mod_rev))) if value == me => {
                let again = json!({
                    "compare": [{"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": mod_rev.to_string()}],
                    "success": [put],
                });
                let v = self.post("/v3/kv/txn", again).await?;
                if v["succeeded"] == json!(true) {
                    self.revoke(old_lease).await;
                    int(&v["header"]["revision"])
                } else {
                    self.revoke(id).await;
                    return Ok(Reply::Busy { retry_after: LDuration::from_millis(100) });
                }
            }
            Some((_, holder_lease, _)) => {
                self.revoke(id).await;
                let remaining =
                    self.post("/v3/lease/timetolive", json!({"ID": holder_lease.to_string()})).await;
                let secs = remaining.ok().and_then(|r| int(&r["TTL"])).filter(|s| *s > 0).unwrap_or(1);
                return Ok(Reply::Busy { retry_after: LDuration::from_secs(secs as u64) });
            }
        };
        let Some(revision) = revision.filter(|r| *r > 0) else {
            return Err(TransportError::Protocol(format!("txn without a revision: {v}")));
        };
        let fence = Fence(revision as u64);
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).insert((key.clone(), owner), (fence, id));
        Ok(Reply::Granted { fence, ttl })
    }

    async fn renew(
        &self,
        key: &Key,
        owner: OwnerId,
        fence: Fence,
        ttl: LDuration,
    ) -> Result<Reply, TransportError> {
        let Some((f, id)) = self.remember(key, owner).filter(|(f, _)| *f == fence) else {
            return Ok(Reply::NotHolder);
        };
        let v = self.post("/v3/lease/keepalive", json!({"ID": id.to_string()})).await?;
        // A dead lease's keepalive answer has no TTL: that is a loss, not an error.
        if int(&v["result"]["TTL"]).is_none_or(|t| t <= 0) {
            self.forget(key, owner, f);
            return Ok(Reply::NotHolder);
        }
        // The key must still be our write (an operator may have deleted it).
        let v = self.post("/v3/kv/range", json!({"key": self.key(key)})).await?;
        if int(&v["kvs"][0]["mod_revision"]) != Some(fence.0 as i64) {
            self.forget(key, owner, f);
            self.revoke(id).await;
            return Ok(Reply::NotHolder);
        }
        Ok(Reply::Granted { fence, ttl })
    }

    async fn release(&self, key: &Key, owner: OwnerId, fence: Fence) -> Result<Reply, TransportError> {
        let k = self.key(key);
        let me = B64.encode(owner.0.to_string());
        let txn = json!({
            "compare": [
                {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": fence.0.to_string()},
                {"key": k, "target": "VALUE", "result": "EQUAL", "value": me},
            ],
            "success": [{"request_delete_range": {"key": k}}],
        });
        let v = self.post("/v3/kv/txn", txn).await?;
        if let Some((f, id)) = self.remember(key, owner).filter(|(f, _)| *f == fence) {
            self.forget(key, owner, f);
            self.revoke(id).await;
        }
        Ok(if v["succeeded"] == json!(true) { Reply::Released } else { Reply::NotHolder })
    }

    fn forget(&self, key: &Key, owner: OwnerId, fence: Fence) {
        let mut m = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&(key.clone(), owner)).is_some_and(|(f, _)| *f == fence) {
            m.remove(&(key.clone(), owner));
        }
    }
}

/// etcd's JSON renders int64 as strings.
fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

impl Backend for EtcdBackend {
    async fn call(&self, key: &Key, request: Request) -> Result<Reply, TransportError> {
        let r = match request.op {
            Op::Acquire { ttl } | Op::Takeover { ttl, .. } => self.acquire(key, request.owner, ttl).await,
            Op::Renew { fence, ttl } => self.renew(key, request.owner, fence, ttl).await,
            Op::Release { fence } => self.release(key, request.owner, fence).await,
        };
        match r {
            // A 4xx from etcd means we sent something it will never accept.
            Err(TransportError::Config(msg)) => {
                tracing::warn!("etcd rejected a request: {msg}");
                Ok(Reply::Rejected(Reject::Misconfigured))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int64_fields_are_strings() {
        assert_eq!(int(&json!("42")), Some(42));
        assert_eq!(int(&json!(7)), Some(7));
        assert_eq!(int(&json!(null)), None);
        assert_eq!(int(&json!("x")), None);
    }
}
