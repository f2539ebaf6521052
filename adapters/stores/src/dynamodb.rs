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
//! The request bodies and the reading of DynamoDB's answers are pure functions below,
//! unit-tested on answers recorded from dynalite 4.0.0; [`DynamoDbBackend`] only signs and
//! sends them.

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

use crate::listing::{Filter, Holder, KeyStatus, ListError, DEFAULT_PAGE};

/// How long [`DynamoDbBackend::create_table`] waits for a new table to become `ACTIVE`.
const TABLE_ACTIVE_WITHIN: Duration = Duration::from_secs(120);

/// A lease backend on a DynamoDB table (or a DynamoDB-compatible server).
///
/// Table layout: partition key `key` (S), one item per lease key with attributes `owner` (S,
/// the owner id in decimal; absent while free), `fence` (N), `version` (N) and `ttl_us` (N,
/// the holder's ttl in microseconds); a protocol v2 holder ([`DynamoSessions`]) also writes its
/// public `label` (S). v1 and v2 clients of one key exclude each other: same items, same
/// discipline.
///
/// [`DynamoSessions`]: crate::DynamoSessions
pub struct DynamoDbBackend {
    http: HttpClient,
    endpoint: String,
    region: String,
    table: String,
    identity: Identity,
    /// Items per Scan request of a listing.
    page: u32,
}

/// What a failed DynamoDB call means for a lease request.
#[derive(Debug, PartialEq)]
pub(crate) enum Failure {
    /// The condition did not hold; the item as it was, if the server returned it.
    Condition(Option<Value>),
    /// A definite answer for the core.
    Reply(Reply),
}

impl DynamoDbBackend {
    /// A backend on `table` at `endpoint` in `region`, signing with `credentials`: AWS's
    /// `https://dynamodb.<region>.amazonaws.com` (validated against Mozilla's roots, built in;
    /// needs the default `tls` feature) or a local `http://` server. Nothing is contacted
    /// until the first call.
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
            page: DEFAULT_PAGE,
        })
    }

    /// The table's name.
    pub(crate) fn table(&self) -> &str {
        &self.table
    }

    /// Uses `tls` for an `https://` endpoint, e.g. to trust a private CA in front of a
    /// DynamoDB-compatible server (see [`leasehold_http::TlsConfig`]).
    #[cfg(feature = "tls")]
    pub fn with_tls(self, tls: leasehold_http::TlsConfig) -> DynamoDbBackend {
        DynamoDbBackend { http: self.http.with_tls(tls), ..self }
    }

    /// Credentials and region from the usual environment variables (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, optional `AWS_SESSION_TOKEN`, `AWS_REGION` or
    /// `AWS_DEFAULT_REGION`).
    pub fn from_env(
        endpoint: &str,
        table: &str,
        timeout: Duration,
    ) -> Result<DynamoDbBackend, TransportError> {
        let (credentials, region) = env_config(|n| std::env::var(n).ok())?;
        DynamoDbBackend::new(endpoint, &region, table, credentials, timeout)
    }

    /// How many items [`list`](Self::list) asks for per Scan request (default 1000; DynamoDB
    /// also ends a page at 1 MB); smaller pages spread the read capacity a listing uses.
    pub fn with_page_size(self, items: u32) -> DynamoDbBackend {
        DynamoDbBackend { page: items.max(1), ..self }
    }

    /// Every item that passes `filter`, sorted by key (a Scan returns them in hash order),
    /// read a page at a time with consistent reads. The filter is applied by DynamoDB, so
    /// only matching items cross the wire (a Scan still reads, and bills, every item).
    pub async fn list(&self, filter: &Filter) -> Result<Vec<KeyStatus>, ListError> {
        let mut out = Vec::new();
        let mut start: Option<Value> = None;
        loop {
            let page = self.read("Scan", &scan_body(&self.table, filter, self.page, start.take())).await?;
            let items = page["Items"].as_array().map(Vec::as_slice).unwrap_or_default();
            out.extend(items.iter().filter_map(key_status).filter(|k| filter.admits(k)));
            // A page can be empty and still not the last: the filter runs after the limit.
            match page.get("LastEvaluatedKey") {
                Some(last) if last.is_object() => start = Some(last.clone()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// `key`'s item; `None` when it was never leased.
    pub async fn status(&self, key: &Key) -> Result<Option<KeyStatus>, ListError> {
        let v = self.read("GetItem", &get_body(&self.table, key)).await?;
        Ok(v.get("Item").and_then(key_status))
    }

    /// An API call whose error answer is reported as it is, for listings.
    async fn read(&self, op: &str, body: &Value) -> Result<Value, ListError> {
        match self.api(op, body).await? {
            (200, v) => Ok(v),
            (status, v) => {
                let message = format!("{}: {}", error_type(&v), error_text(&v));
                Err(ListError::Refused { operation: format!("DynamoDB {op}"), status, message })
            }
        }
    }

    /// Creates the table (partition key `key`, on demand) if it does not exist, and waits
    /// until it is `ACTIVE` (DynamoDB takes seconds; until then items cannot be written).
    pub async fn create_table(&self) -> Result<(), TransportError> {
        match self.api("CreateTable", &create_table_body(&self.table)).await? {
            (200, _) => {}
            (_, v) if error_type(&v) == "ResourceInUseException" => {}
            (status, v) => return Err(TransportError::Config(format!("CreateTable: HTTP {status}: {v}"))),
        }
        let started = std::time::Instant::now();
        loop {
            match self.api("DescribeTable", &json!({"TableName": self.table})).await? {
                (200, v) if v["Table"]["TableStatus"] == "ACTIVE" => return Ok(()),
                (200, _) => {}
                (status, v) => {
                    return Err(TransportError::Config(format!("DescribeTable: HTTP {status}: {v}")))
                }
            }
            if started.elapsed() > TABLE_ACTIVE_WITHIN {
                return Err(TransportError::Config(format!(
                    "table {} is not ACTIVE after {TABLE_ACTIVE_WITHIN:?}",
                    self.table
                )));
            }
            async_io::Timer::after(Duration::from_millis(250)).await;
        }
    }

    /// One signed API call; returns the status and the JSON body (`null` for an error answer
    /// that is not JSON, e.g. from a proxy).
    pub(crate) async fn api(&self, op: &str, body: &Value) -> Result<(u16, Value), TransportError> {
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
        match serde_json::from_slice(&resp.body) {
            Ok(v) => Ok((resp.status, v)),
            Err(_) if resp.status != 200 => Ok((resp.status, Value::Null)),
            Err(e) => Err(TransportError::Protocol(format!("DynamoDB {op}: {e}"))),
        }
    }

    /// A conditional UpdateItem; `Ok` carries the item as it was before the write (`null` if
    /// there was none).
    pub(crate) async fn update(&self, body: &Value) -> Result<Result<Value, Failure>, TransportError> {
        Ok(match self.api("UpdateItem", body).await? {
            (200, v) => Ok(v["Attributes"].clone()),
            (status, v) => Err(classify(status, &v)),
        })
    }

    async fn acquire(
        &self,
        key: &Key,
        owner: OwnerId,
        ttl: LDuration,
        takeover: Option<u64>,
    ) -> Result<Reply, TransportError> {
        match self.update(&acquire_body(&self.table, key, owner, ttl, takeover)).await? {
            Ok(old) => granted(&old, owner, ttl),
            Err(Failure::Reply(r)) => Ok(r),
            Err(Failure::Condition(old)) => {
                // DynamoDB returns the item that failed the check; some compatible servers
                // (dynalite) do not, and then one consistent read fetches it.
                let item = match old {
                    Some(item) => item,
                    None => match self.api("GetItem", &get_body(&self.table, key)).await? {
                        (200, v) => v["Item"].clone(),
                        (status, v) => match classify(status, &v) {
                            Failure::Reply(r) => return Ok(r),
                            Failure::Condition(_) => {
                                return Err(TransportError::Protocol(format!("GetItem: HTTP {status}: {v}")))
                            }
                        },
                    },
                };
                Ok(observed(&item))
            }
        }
    }

    async fn fenced(&self, body: &Value, on_success: Reply) -> Result<Reply, TransportError> {
        match self.update(body).await? {
            Ok(_) => Ok(on_success),
            Err(Failure::Condition(_)) => Ok(Reply::NotHolder),
            Err(Failure::Reply(r)) => Ok(r),
        }
    }
}

impl Backend for DynamoDbBackend {
    async fn call(&self, key: &Key, request: Request) -> Result<Reply, TransportError> {
        let (table, owner) = (&self.table, request.owner);
        match request.op {
            Op::Acquire { ttl } => self.acquire(key, owner, ttl, None).await,
            Op::Takeover { version, ttl } => self.acquire(key, owner, ttl, Some(version)).await,
            Op::Renew { fence, ttl } => {
                self.fenced(&renew_body(table, key, owner, fence, ttl), Reply::Granted { fence, ttl }).await
            }
            Op::Release { fence } => {
                self.fenced(&release_body(table, key, owner, fence), Reply::Released).await
            }
        }
    }
}

/// Credentials and region from environment variables read through `var`.
pub(crate) fn env_config(
    var: impl Fn(&str) -> Option<String>,
) -> Result<(Credentials, String), TransportError> {
    let var = |n: &str| var(n).filter(|v| !v.is_empty());
    let missing = |n: &str| TransportError::Config(format!("{n} is not set"));
    let ak = var("AWS_ACCESS_KEY_ID").ok_or_else(|| missing("AWS_ACCESS_KEY_ID"))?;
    let sk = var("AWS_SECRET_ACCESS_KEY").ok_or_else(|| missing("AWS_SECRET_ACCESS_KEY"))?;
    let region = var("AWS_REGION")
        .or_else(|| var("AWS_DEFAULT_REGION"))
        .ok_or_else(|| missing("AWS_REGION (or AWS_DEFAULT_REGION)"))?;
    Ok((Credentials::new(ak, sk, var("AWS_SESSION_TOKEN"), None, "environment"), region))
}

fn create_table_body(table: &str) -> Value {
    json!({
        "TableName": table,
        "AttributeDefinitions": [{"AttributeName": "key", "AttributeType": "S"}],
        "KeySchema": [{"AttributeName": "key", "KeyType": "HASH"}],
        "BillingMode": "PAY_PER_REQUEST",
    })
}

pub(crate) fn get_body(table: &str, key: &Key) -> Value {
    json!({"TableName": table, "Key": {"key": {"S": key.as_str()}}, "ConsistentRead": true})
}

/// A consistent Scan page of at most `limit` items from `start` (a `LastEvaluatedKey`),
/// filtered by DynamoDB.
fn scan_body(table: &str, filter: &Filter, limit: u32, start: Option<Value>) -> Value {
    let mut body = json!({"TableName": table, "ConsistentRead": true, "Limit": limit});
    let mut conditions = Vec::new();
    if !filter.prefix.is_empty() {
        conditions.push("begins_with(#k, :prefix)");
        body["ExpressionAttributeValues"] = json!({":prefix": {"S": filter.prefix}});
    }
    if filter.held_only {
        conditions.push("attribute_exists(#o)");
    }
    if !conditions.is_empty() {
        let expr = conditions.join(" AND ");
        body["ExpressionAttributeNames"] = names(&[&expr]);
        body["FilterExpression"] = json!(expr);
    }
    if let Some(start) = start {
        body["ExclusiveStartKey"] = start;
    }
    body
}

/// An item as a listing shows it; `None` for one leasehold did not write.
fn key_status(item: &Value) -> Option<KeyStatus> {
    let key = item["key"]["S"].as_str()?.to_string();
    let last_fence = Fence(num(&item["fence"])?);
    let holder = match item["owner"]["S"].as_str() {
        None => None,
        Some(owner) => Some(Holder {
            owner: OwnerId(owner.parse().ok()?),
            fence: last_fence,
            ttl: num(&item["ttl_us"]).map(Duration::from_micros),
            // Nobody keeps time here: only a contender's own wait can tell.
            remaining: None,
            label: item["label"]["S"].as_str().map(str::to_string),
        }),
    };
    Some(KeyStatus { key, holder, last_fence })
}

/// A conditional UpdateItem returning the item as it was, whether the condition held or not:
/// the old owner is what tells a takeover of an expired holder from a grant of a free key.
pub(crate) fn update_body(table: &str, key: &Key, expr: &str, cond: &str, values: Value) -> Value {
    json!({
        "TableName": table,
        "Key": {"key": {"S": key.as_str()}},
        "UpdateExpression": expr,
        "ConditionExpression": cond,
        // DynamoDB refuses names the expressions do not use.
        "ExpressionAttributeNames": names(&[expr, cond]),
        "ExpressionAttributeValues": values,
        "ReturnValues": "ALL_OLD",
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    })
}

/// Acquire: the key is free (no owner) or already ours, or (takeover) still at the `version`
/// the core observed and waited out. Sets owner and ttl and bumps fence and version in one
/// write.
fn acquire_body(table: &str, key: &Key, owner: OwnerId, ttl: LDuration, takeover: Option<u64>) -> Value {
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
    // A session holder's label (protocol v2, same items) is not this holder's name.
    let expr = "SET #o = :me, #t = :ttl, #f = if_not_exists(#f, :zero) + :one, #v = if_not_exists(#v, :zero) + :one \
                REMOVE #l";
    update_body(table, key, expr, &cond, values)
}

/// Renew: still ours with this fence; the new version tells observers we are alive.
fn renew_body(table: &str, key: &Key, owner: OwnerId, fence: Fence, ttl: LDuration) -> Value {
    let mut values = fenced_values(owner, fence);
    values[":ttl"] = json!({"N": ttl.as_micros().to_string()});
    update_body(table, key, "SET #t = :ttl, #v = #v + :one", FENCED, values)
}

/// Release: still ours with this fence; the item stays so the fence counter never resets.
fn release_body(table: &str, key: &Key, owner: OwnerId, fence: Fence) -> Value {
    update_body(table, key, "REMOVE #o SET #v = #v + :one", FENCED, fenced_values(owner, fence))
}

const FENCED: &str = "#o = :me AND #f = :fence";

fn fenced_values(owner: OwnerId, fence: Fence) -> Value {
    json!({
        ":me": {"S": owner.0.to_string()},
        ":fence": {"N": fence.0.to_string()},
        ":one": {"N": "1"},
    })
}

fn names(exprs: &[&str]) -> Value {
    let all = [
        ("#o", "owner"),
        ("#f", "fence"),
        ("#v", "version"),
        ("#t", "ttl_us"),
        ("#k", "key"),
        ("#l", "label"),
    ];
    let used: serde_json::Map<String, Value> = all
        .iter()
        .filter(|(n, _)| exprs.iter().any(|e| e.contains(n)))
        .map(|(n, a)| (n.to_string(), json!(a)))
        .collect();
    Value::Object(used)
}

/// The reply to a successful acquire or takeover by `me`, from the item as it was before the
/// write (`null` if there was none). The write set the fence one higher, atomically. An old
/// owner other than `me` can only have passed the condition through `#v = :seen`: a takeover
/// of a holder that was waited out, i.e. whose lease expired (the same rule as
/// `leasehold_core::authority::cas::CasRecord::apply`).
fn granted(old: &Value, me: OwnerId, ttl: LDuration) -> Result<Reply, TransportError> {
    let before = match &old["fence"] {
        Value::Null => Some(0),
        f => num(f),
    };
    let Some(fence) = before.and_then(|f| Fence(f).next()) else {
        return Err(TransportError::Protocol(format!("UpdateItem returned an unusable fence: {old}")));
    };
    let previous = old["owner"]["S"].as_str();
    Ok(match previous {
        Some(o) if o != me.0.to_string() => Reply::GrantedAfterExpiry { fence, ttl },
        _ => Reply::Granted { fence, ttl },
    })
}

/// The reply to an acquire that found the key held, from the item as it is.
fn observed(item: &Value) -> Reply {
    if !item["owner"].is_object() {
        // Freed between the write and the read: ask again at once.
        return Reply::Busy { retry_after: LDuration::ZERO };
    }
    match (num(&item["version"]), num(&item["ttl_us"])) {
        (Some(version), Some(ttl_us)) => Reply::Observed { version, ttl: LDuration::from_micros(ttl_us) },
        // Waiting would never end: the item was not written by leasehold.
        _ => {
            tracing::warn!("DynamoDB item has an owner but no numeric version/ttl_us: {item}");
            Reply::Rejected(Reject::Misconfigured)
        }
    }
}

pub(crate) fn num(v: &Value) -> Option<u64> {
    v["N"].as_str().and_then(|s| s.parse().ok())
}

fn error_type(v: &Value) -> &str {
    let t = v["__type"].as_str().unwrap_or("");
    t.rsplit('#').next().unwrap_or(t)
}

/// The message of an error answer (DynamoDB spells it `message` or `Message`).
fn error_text(v: &Value) -> &str {
    v["message"].as_str().or(v["Message"].as_str()).unwrap_or("")
}

pub(crate) fn classify(status: u16, v: &Value) -> Failure {
    let kind = error_type(v);
    let message = error_text(v);
    match kind {
        "ConditionalCheckFailedException" => return Failure::Condition(v.get("Item").cloned()),
        "ProvisionedThroughputExceededException"
        | "ThrottlingException"
        | "RequestLimitExceeded"
        | "TransactionConflictException"
        | "InternalServerError"
        | "ServiceUnavailable" => return Failure::Reply(Reply::Unavailable),
        _ => {}
    }
    if status >= 500 {
        return Failure::Reply(Reply::Unavailable);
    }
    tracing::warn!("DynamoDB refused the request: HTTP {status}: {kind}: {message}");
    Failure::Reply(Reply::Rejected(match kind {
        "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "IncompleteSignatureException"
        | "MissingAuthenticationTokenException"
        | "AccessDeniedException"
        | "ExpiredTokenException" => Reject::Unauthorized,
        // ResourceNotFoundException: the table is missing (or still being created);
        // ValidationException: a schema that does not match; no JSON at all: not a DynamoDB
        // endpoint. Either way an operator must act.
        _ => Reject::Misconfigured,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_core::parse_key;

    // Answers recorded from dynalite 4.0.0.
    const NEW_ITEM: &str = r#"{"Attributes":{"key":{"S":"k"},"owner":{"S":"1"},"ttl_us":{"N":"2000000"},
        "fence":{"N":"1"},"version":{"N":"1"}}}"#;
    const CONDITION_FAILED: &str = r#"{"__type":"com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException",
        "message":"The conditional request failed"}"#;
    const NO_TABLE: &str = r#"{"__type":"com.amazonaws.dynamodb.v20120810#ResourceNotFoundException",
        "message":"Requested resource not found"}"#;
    const NO_AUTH: &str = r#"{"__type":"com.amazon.coral.service#MissingAuthenticationTokenException",
        "message":"Request is missing Authentication Token"}"#;
    // Real DynamoDB with ReturnValuesOnConditionCheckFailure = ALL_OLD.
    const CONDITION_FAILED_WITH_ITEM: &str = r#"{"__type":"com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException",
        "message":"The conditional request failed","Item":{"key":{"S":"k"},"owner":{"S":"1"},
        "ttl_us":{"N":"2000000"},"fence":{"N":"3"},"version":{"N":"8"}}}"#;

    fn v(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn acquire_sets_owner_and_bumps_counters_in_one_conditional_write() {
        let k = parse_key("pump").unwrap();
        let b = acquire_body("leases", &k, OwnerId(7), LDuration::from_secs(15), None);
        assert_eq!(b["Key"], json!({"key": {"S": "pump"}}));
        assert_eq!(b["ConditionExpression"], "attribute_not_exists(#o) OR #o = :me");
        assert!(b["UpdateExpression"].as_str().unwrap().contains("#f = if_not_exists(#f, :zero) + :one"));
        assert_eq!(b["ExpressionAttributeValues"][":me"], json!({"S": "7"}));
        assert_eq!(b["ExpressionAttributeValues"][":ttl"], json!({"N": "15000000"}));
        assert_eq!(b["ExpressionAttributeValues"].get(":seen"), None);
        assert_eq!(b["ReturnValues"], "ALL_OLD");
        assert_eq!(b["ReturnValuesOnConditionCheckFailure"], "ALL_OLD");
        let t = acquire_body("leases", &k, OwnerId(7), LDuration::from_secs(15), Some(9));
        assert_eq!(t["ConditionExpression"], "attribute_not_exists(#o) OR #o = :me OR #v = :seen");
        assert_eq!(t["ExpressionAttributeValues"][":seen"], json!({"N": "9"}));
    }

    #[test]
    fn renew_and_release_are_fenced_and_name_only_what_they_use() {
        let k = parse_key("pump").unwrap();
        let r = renew_body("leases", &k, OwnerId(7), Fence(4), LDuration::from_secs(2));
        assert_eq!(r["ConditionExpression"], "#o = :me AND #f = :fence");
        assert_eq!(r["ExpressionAttributeValues"][":fence"], json!({"N": "4"}));
        assert_eq!(r["ExpressionAttributeValues"][":ttl"], json!({"N": "2000000"}));
        let d = release_body("leases", &k, OwnerId(7), Fence(4));
        assert_eq!(d["UpdateExpression"], "REMOVE #o SET #v = #v + :one");
        assert_eq!(d["ExpressionAttributeValues"].get(":ttl"), None);
        // No #t in release: DynamoDB rejects unused names.
        assert_eq!(d["ExpressionAttributeNames"], json!({"#o": "owner", "#f": "fence", "#v": "version"}));
    }

    #[test]
    fn reads_items() {
        let ttl = LDuration::from_secs(2);
        // A grant is read from the item as it was: none, ours (re-acquired), another's (taken over).
        assert_eq!(granted(&Value::Null, OwnerId(1), ttl), Ok(Reply::Granted { fence: Fence(1), ttl }));
        let old = &v(NEW_ITEM)["Attributes"];
        assert_eq!(granted(old, OwnerId(1), ttl), Ok(Reply::Granted { fence: Fence(2), ttl }));
        assert_eq!(granted(old, OwnerId(2), ttl), Ok(Reply::GrantedAfterExpiry { fence: Fence(2), ttl }));
        let released = json!({"key": {"S": "k"}, "fence": {"N": "3"}, "version": {"N": "4"}});
        assert_eq!(granted(&released, OwnerId(2), ttl), Ok(Reply::Granted { fence: Fence(4), ttl }));
        let garbled = json!({"fence": {"S": "x"}});
        assert!(matches!(granted(&garbled, OwnerId(1), ttl), Err(TransportError::Protocol(_))));
        assert_eq!(observed(&v(NEW_ITEM)["Attributes"]), Reply::Observed { version: 1, ttl });
        // Released (owner removed) or never written: try again.
        assert_eq!(
            observed(&json!({"key": {"S": "k"}, "fence": {"N": "3"}, "version": {"N": "4"}})),
            Reply::Busy { retry_after: LDuration::ZERO }
        );
        assert_eq!(observed(&Value::Null), Reply::Busy { retry_after: LDuration::ZERO });
        assert_eq!(observed(&json!({"owner": {"S": "1"}})), Reply::Rejected(Reject::Misconfigured));
    }

    #[test]
    fn scans_filter_on_the_server_and_name_only_what_they_use() {
        let all = scan_body("leases", &Filter::default(), 100, None);
        assert_eq!(all, json!({"TableName": "leases", "ConsistentRead": true, "Limit": 100}));
        let filter = Filter { prefix: "job:".into(), held_only: true };
        let next = scan_body("leases", &filter, 5, Some(json!({"key": {"S": "job:3"}})));
        assert_eq!(next["FilterExpression"], "begins_with(#k, :prefix) AND attribute_exists(#o)");
        assert_eq!(next["ExpressionAttributeNames"], json!({"#o": "owner", "#k": "key"}));
        assert_eq!(next["ExpressionAttributeValues"], json!({":prefix": {"S": "job:"}}));
        assert_eq!(next["ExclusiveStartKey"], json!({"key": {"S": "job:3"}}));
        let held = scan_body("leases", &Filter { prefix: String::new(), held_only: true }, 5, None);
        assert_eq!(held["ExpressionAttributeNames"], json!({"#o": "owner"}));
        assert_eq!(held.get("ExpressionAttributeValues"), None);
    }

    #[test]
    fn listed_items() {
        let held = key_status(&v(NEW_ITEM)["Attributes"]).unwrap();
        assert_eq!(
            held,
            KeyStatus {
                key: "k".into(),
                holder: Some(Holder {
                    owner: OwnerId(1),
                    fence: Fence(1),
                    ttl: Some(Duration::from_secs(2)),
                    remaining: None,
                    label: None,
                }),
                last_fence: Fence(1),
            }
        );
        let free = json!({"key": {"S": "k"}, "fence": {"N": "3"}, "version": {"N": "4"}});
        assert_eq!(
            key_status(&free),
            Some(KeyStatus { key: "k".into(), holder: None, last_fence: Fence(3) })
        );
        assert_eq!(
            key_status(&json!({"key": {"S": "k"}, "owner": {"S": "someone"}, "fence": {"N": "1"}})),
            None
        );
        assert_eq!(key_status(&json!({"key": {"S": "k"}})), None);
    }

    #[test]
    fn errors_map_to_replies() {
        let c = |s, t: &str| classify(s, &json!({"__type": t, "message": "m"}));
        let ddb = "com.amazonaws.dynamodb.v20120810#";
        assert_eq!(classify(400, &v(CONDITION_FAILED)), Failure::Condition(None));
        assert_eq!(
            classify(400, &v(CONDITION_FAILED_WITH_ITEM)),
            Failure::Condition(Some(v(CONDITION_FAILED_WITH_ITEM)["Item"].clone()))
        );
        assert_eq!(
            observed(&v(CONDITION_FAILED_WITH_ITEM)["Item"]),
            Reply::Observed { version: 8, ttl: LDuration::from_secs(2) }
        );
        assert_eq!(c(400, &format!("{ddb}ThrottlingException")), Failure::Reply(Reply::Unavailable));
        assert_eq!(
            c(400, &format!("{ddb}ProvisionedThroughputExceededException")),
            Failure::Reply(Reply::Unavailable)
        );
        assert_eq!(
            c(400, "com.amazon.coral.service#UnrecognizedClientException"),
            Failure::Reply(Reply::Rejected(Reject::Unauthorized))
        );
        assert_eq!(classify(400, &v(NO_AUTH)), Failure::Reply(Reply::Rejected(Reject::Unauthorized)));
        assert_eq!(classify(400, &v(NO_TABLE)), Failure::Reply(Reply::Rejected(Reject::Misconfigured)));
        assert_eq!(c(500, "x#InternalServerError"), Failure::Reply(Reply::Unavailable));
        assert_eq!(classify(503, &Value::Null), Failure::Reply(Reply::Unavailable));
        assert_eq!(classify(404, &Value::Null), Failure::Reply(Reply::Rejected(Reject::Misconfigured)));
    }

    #[test]
    fn credentials_and_region_from_the_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |n: &str| vars.iter().find(|(k, _)| *k == n).map(|(_, v)| v.to_string())
        };
        let (c, region) = env_config(env(&[
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("AWS_SESSION_TOKEN", "tok"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
        ]))
        .unwrap();
        assert_eq!(
            (c.access_key_id(), c.session_token(), region.as_str()),
            ("AKID", Some("tok"), "eu-west-1")
        );
        let (_, region) = env_config(env(&[
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("AWS_REGION", "us-east-2"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
        ]))
        .unwrap();
        assert_eq!(region, "us-east-2");
        let missing = env_config(env(&[("AWS_ACCESS_KEY_ID", "AKID"), ("AWS_REGION", "x")])).err();
        assert_eq!(missing, Some(TransportError::Config("AWS_SECRET_ACCESS_KEY is not set".into())));
        let empty = env_config(env(&[("AWS_ACCESS_KEY_ID", ""), ("AWS_SECRET_ACCESS_KEY", "s")])).err();
        assert_eq!(empty, Some(TransportError::Config("AWS_ACCESS_KEY_ID is not set".into())));
    }
}
