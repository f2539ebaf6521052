//! DynamoDB, spoken over its JSON API (`POST /`, `X-Amz-Target: DynamoDB_20120810.<Op>`,
//! SigV4-signed).
//!
//! DynamoDB has no clock to expire leases with, so this is the compare-and-set discipline:
//! one item per key holds `owner`, `fence`, `version` and `ttl_us`. Every write is conditional
//! and bumps `version`. A contender that finds the key held gets `Observed { version, ttl }`;
//! the core then waits `ttl·(1+ε)` on its own clock and asks to take over *that version*,
//! which succeeds only if the holder has not renewed meanwhile. Release removes the owner but
//! keeps the item, so the fence counter never resets.
//!
//! Table: partition key `key` (string). Create it with [`DynamoDbBackend::create_table`] or
//! `aws dynamodb create-table --table-name leases --attribute-definitions
//! AttributeName=key,AttributeType=S --key-schema AttributeName=key,KeyType=HASH
//! --billing-mode PAY_PER_REQUEST`.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use http_body_util::Full;
use hyper::body::Bytes;
use leasehold_core::{Duration as LDuration, Fence, Key, Op, OwnerId, Reject, Reply, Request};
use leasehold_http::{Backend, HttpClient, TransportError};
use serde_json::{json, Value};

/// A lease backend on a DynamoDB table (or a DynamoDB-compatible server).
pub struct DynamoDbBackend {
    http: HttpClient,
    endpoint: String,
    region: String,
    table: String,
    identity: Identity,
}

/// What a failed DynamoDB call means for a lease request.
enum Failure {
    /// The condition did not hold; the item as it was, if the server returned it.
    Condition(Option<Value>),
    /// A definite answer for the core.
    Reply(Reply),
}

impl DynamoDbBackend {
    /// A backend on `table` at `endpoint` (`http://…`; only plain HTTP endpoints such as local
    /// servers or a TLS-terminating proxy are supported) in `region`, signing with
    /// `credentials`.
    pub fn new(
        endpoint: &str,
        region: &str,
        table: &str,
        credentials: Credentials,
        timeout: Duration,
    ) -> Result<DynamoDbBackend, TransportError> {
        if table.len() < 3 {
            return Err(TransportError::Config(format!("table name {table:?} is shorter than 3 characters")));
        }
        Ok(DynamoDbBackend {
            http: HttpClient::new(endpoint, timeout)?,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            region: region.to_string(),
            table: table.to_string(),
            identity: credentials.into(),
        })
    }

    /// Credentials and region from the usual environment variables (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, optional `AWS_SESSION_TOKEN`, `AWS_REGION` or
    /// `AWS_DEFAULT_REGION`).
    pub fn from_env(
        endpoint: &str,
        table: &str,
        timeout: Duration,
    ) -> Result<DynamoDbBackend, TransportError> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        let missing = |n: &str| TransportError::Config(format!("{n} is not set"));
        let ak = var("AWS_ACCESS_KEY_ID").ok_or_else(|| missing("AWS_ACCESS_KEY_ID"))?;
        let sk = var("AWS_SECRET_ACCESS_KEY").ok_or_else(|| missing("AWS_SECRET_ACCESS_KEY"))?;
        let region =
            var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")).ok_or_else(|| missing("AWS_REGION"))?;
        let creds = Credentials::new(ak, sk, var("AWS_SESSION_TOKEN"), None, "environment");
        DynamoDbBackend::new(endpoint, &region, table, creds, timeout)
    }

    /// Creates the table (partition key `key`, on demand).
    pub async fn create_table(&self) -> Result<(), TransportError> {
        let body = json!({
            "TableName": self.table,
            "AttributeDefinitions": [{"AttributeName": "key", "AttributeType": "S"}],
            "KeySchema": [{"AttributeName": "key", "KeyType": "HASH"}],
            "BillingMode": "PAY_PER_REQUEST",
        });
        match self.api("CreateTable", &body).await? {
            (200, _) => Ok(()),
            (_, v) if error_type(&v) == "ResourceInUseException" => Ok(()),
            (status, v) => Err(TransportError::Config(format!("CreateTable: HTTP {status}: {v}"))),
        }
    }

    /// One signed API call; returns the status and the JSON body.
    async fn api(&self, op: &str, body: &Value) -> Result<(u16, Value), TransportError> {
        let bytes = body.to_string().into_bytes();
        let target = format!("DynamoDB_20120810.{op}");
        let mut req = self
            .http
            .request(hyper::Method::POST, "/")
            .header(hyper::header::CONTENT_TYPE, "application/x-amz-json-1.0")
            .header("x-amz-target", &target)
            .body(Full::new(Bytes::from(bytes.clone())))
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name("dynamodb")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| TransportError::Config(format!("signing: {e}")))?
            .into();
        let url = format!("{}/", self.endpoint);
        let headers: Vec<(String, String)> = req
            .headers()
            .iter()
            .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_string(), v.to_string())))
            .collect();
        let signable = SignableRequest::new(
            "POST",
            url.as_str(),
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            SignableBody::Bytes(&bytes),
        )
        .map_err(|e| TransportError::Config(format!("signing: {e}")))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| TransportError::Config(format!("signing: {e}")))?
            .into_parts();
        instructions.apply_to_request_http1x(&mut req);
        let resp = self.http.send(req).await?;
        let v: Value = serde_json::from_slice(&resp.body)
            .map_err(|e| TransportError::Protocol(format!("DynamoDB {op}: HTTP {}: {e}", resp.status)))?;
        Ok((resp.status, v))
    }

    /// A conditional UpdateItem; `Ok` carries the new item.
    async fn update(
        &self,
        key: &Key,
        expr: &str,
        cond: &str,
        values: Value,
    ) -> Result<Result<Value, Failure>, TransportError> {
        let body = json!({
            "TableName": self.table,
            "Key": {"key": {"S": key.as_str()}},
            "UpdateExpression": expr,
            "ConditionExpression": cond,
            // DynamoDB refuses names the expressions do not use.
            "ExpressionAttributeNames": names(&[expr, cond]),
            "ExpressionAttributeValues": values,
            "ReturnValues": "ALL_NEW",
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        });
        let (status, v) = self.api("UpdateItem", &body).await?;
        if status == 200 {
            return Ok(Ok(v["Attributes"].clone()));
        }
        Ok(Err(classify(status, &v)))
    }

    async fn current(&self, key: &Key) -> Result<Value, TransportError> {
        let body =
            json!({"TableName": self.table, "Key": {"key": {"S": key.as_str()}}, "ConsistentRead": true});
        match self.api("GetItem", &body).await? {
            (200, v) => Ok(v["Item"].clone()),
            (status, v) => Err(TransportError::Protocol(format!("GetItem: HTTP {status}: {v}"))),
        }
    }

    async fn acquire(
        &self,
        key: &Key,
        owner: OwnerId,
        ttl: LDuration,
        takeover: Option<u64>,
    ) -> Result<Reply, TransportError> {
        let mut values = json!({
            ":me": {"S": owner.0.to_string()},
            ":ttl": {"N": ttl.as_micros().to_string()},
            ":zero": {"N": "0"},
            ":one": {"N": "1"},
        });
        let mut cond = "attribute_not_exists(#o) OR #o = :me".to_string();
        if let Some(v) = takeover {
            values[":seen"] = json!({"N": v.to_string()});
            cond.push_str(" OR #v = :seen");
        }
        let expr = "SET #o = :me, #t = :ttl, #f = if_not_exists(#f, :zero) + :one, #v = if_not_exists(#v, :zero) + :one";
        match self.update(key, expr, &cond, values).await? {
            Ok(item) => match num(&item["fence"]) {
                Some(f) => Ok(Reply::Granted { fence: Fence(f), ttl }),
                None => Err(TransportError::Protocol(format!("UpdateItem returned no fence: {item}"))),
            },
            Err(Failure::Reply(r)) => Ok(r),
            Err(Failure::Condition(old)) => {
                // DynamoDB returns the item that failed the check; some compatible servers do
                // not, and then one consistent read fetches it.
                let item = match old {
                    Some(item) => item,
                    None => self.current(key).await?,
                };
                Ok(match (item["owner"].is_object(), num(&item["version"]), num(&item["ttl_us"])) {
                    (true, Some(version), Some(ttl_us)) => {
                        Reply::Observed { version, ttl: LDuration::from_micros(ttl_us) }
                    }
                    // Freed between the write and the read: ask again at once.
                    _ => Reply::Busy { retry_after: LDuration::ZERO },
                })
            }
        }
    }

    async fn fenced(
        &self,
        key: &Key,
        owner: OwnerId,
        fence: Fence,
        expr: &str,
        ttl: Option<LDuration>,
    ) -> Result<Reply, TransportError> {
        let mut values = json!({
            ":me": {"S": owner.0.to_string()},
            ":fence": {"N": fence.0.to_string()},
            ":one": {"N": "1"},
        });
        if let Some(ttl) = ttl {
            values[":ttl"] = json!({"N": ttl.as_micros().to_string()});
        }
        match self.update(key, expr, "#o = :me AND #f = :fence", values).await? {
            Ok(_) => Ok(match ttl {
                Some(ttl) => Reply::Granted { fence, ttl },
                None => Reply::Released,
            }),
            Err(Failure::Condition(_)) => Ok(Reply::NotHolder),
            Err(Failure::Reply(r)) => Ok(r),
        }
    }
}

fn names(exprs: &[&str]) -> Value {
    let all = [("#o", "owner"), ("#f", "fence"), ("#v", "version"), ("#t", "ttl_us")];
    let used: serde_json::Map<String, Value> = all
        .iter()
        .filter(|(n, _)| exprs.iter().any(|e| e.contains(n)))
        .map(|(n, a)| (n.to_string(), json!(a)))
        .collect();
    Value::Object(used)
}

fn num(v: &Value) -> Option<u64> {
    v["N"].as_str().and_then(|s| s.parse().ok())
}

fn error_type(v: &Value) -> &str {
    let t = v["__type"].as_str().unwrap_or("");
    t.rsplit('#').next().unwrap_or(t)
}

fn classify(status: u16, v: &Value) -> Failure {
    let kind = error_type(v);
    let message = v["message"].as_str().or(v["Message"].as_str()).unwrap_or("");
    match kind {
        "ConditionalCheckFailedException" => return Failure::Condition(v.get("Item").cloned()),
        "ProvisionedThroughputExceededException" | "ThrottlingException" | "RequestLimitExceeded" => {
            return Failure::Reply(Reply::Unavailable)
        }
        _ => {}
    }
    if status >= 500 {
        return Failure::Reply(Reply::Unavailable);
    }
    tracing::warn!("DynamoDB refused the request: {kind}: {message}");
    Failure::Reply(Reply::Rejected(match kind {
        "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "MissingAuthenticationTokenException"
        | "AccessDeniedException"
        | "ExpiredTokenException" => Reject::Unauthorized,
        // ResourceNotFoundException: the table is missing; ValidationException: a schema
        // that does not match. Either way an operator must act.
        _ => Reject::Misconfigured,
    }))
}

impl Backend for DynamoDbBackend {
    async fn call(&self, key: &Key, request: Request) -> Result<Reply, TransportError> {
        let owner = request.owner;
        match request.op {
            Op::Acquire { ttl } => self.acquire(key, owner, ttl, None).await,
            Op::Takeover { version, ttl } => self.acquire(key, owner, ttl, Some(version)).await,
            Op::Renew { fence, ttl } => {
                self.fenced(key, owner, fence, "SET #t = :ttl, #v = #v + :one", Some(ttl)).await
            }
            Op::Release { fence } => {
                self.fenced(key, owner, fence, "REMOVE #o SET #v = #v + :one", None).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_replies() {
        let c = |s, t: &str| match classify(s, &json!({"__type": t, "message": "m"})) {
            Failure::Reply(r) => Some(r),
            Failure::Condition(_) => None,
        };
        assert_eq!(c(400, "com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException"), None);
        assert_eq!(c(400, "com.amazonaws.dynamodb.v20120810#ThrottlingException"), Some(Reply::Unavailable));
        assert_eq!(
            c(400, "com.amazon.coral.service#UnrecognizedClientException"),
            Some(Reply::Rejected(Reject::Unauthorized))
        );
        assert_eq!(
            c(400, "com.amazonaws.dynamodb.v20120810#ResourceNotFoundException"),
            Some(Reply::Rejected(Reject::Misconfigured))
        );
        assert_eq!(c(503, "x#InternalServerError"), Some(Reply::Unavailable));
    }
}
