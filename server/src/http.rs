//! The HTTP/1.1 JSON API. See the crate README for the contract.

use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body as _;
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};
use leasehold_core::authority::Record;
use leasehold_core::session::wire::{SessionOp, SessionReply, SessionRequest};
use leasehold_core::{parse_key, Reject, Reply, Request};
use serde::Serialize;

use crate::Shared;

/// Largest accepted request body.
pub const MAX_BODY: usize = 16 * 1024;

pub(crate) type Body = Full<Bytes>;

pub(crate) async fn handle(shared: Arc<Shared>, mut req: hyper::Request<Incoming>) -> Response<Body> {
    let started = std::time::Instant::now();
    let is_post = req.method() == Method::POST;
    // Set by `read_request` once the whole body has been read. A reply sent before then
    // (invalid_key, 405, 401, body_too_large, a body that timed out) leaves unread bytes that
    // hyper cannot skip, so it must close the connection; say so, or the client's next request
    // on it meets a broken pipe.
    let body_read = BodyRead::default();
    let has_body = !req.body().is_end_stream();
    req.extensions_mut().insert(body_read.clone());
    let mut resp = match route(&shared, req).await {
        Ok(r) => r,
        Err(e) => {
            shared.metrics.error(e.code);
            json(e.status, &ErrorBody { error: e.code, message: &e.message })
        }
    };
    if has_body && !body_read.0.load(std::sync::atomic::Ordering::Relaxed) {
        resp.headers_mut().insert(CONNECTION, hyper::header::HeaderValue::from_static("close"));
    }
    if is_post {
        shared.metrics.latency(started.elapsed());
    }
    resp
}

/// Whether a request's body was read to its end (see [`handle`]).
#[derive(Clone, Default)]
struct BodyRead(Arc<std::sync::atomic::AtomicBool>);

struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

fn err(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError { status, code, message: message.into() }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
}

#[derive(Serialize)]
struct HolderView {
    owner: u64,
    fence: u64,
    ttl: u64,
    remaining: u64,
}

#[derive(Serialize)]
struct LeaseView {
    key: String,
    holder: Option<HolderView>,
    last_fence: u64,
}

#[derive(Serialize)]
struct LeaseList {
    leases: Vec<LeaseView>,
}

fn view(shared: &Shared, key: String, rec: &Record) -> LeaseView {
    let now = shared.clock.now();
    LeaseView {
        key,
        holder: rec.holder.filter(|h| h.expires_at > now).map(|h| HolderView {
            owner: h.owner.0,
            fence: h.fence.0,
            ttl: h.ttl.as_micros(),
            remaining: (h.expires_at - now).as_micros(),
        }),
        last_fence: rec.last_fence.0,
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

fn authorized(shared: &Shared, req: &hyper::Request<Incoming>) -> bool {
    let Some(token) = shared.token.as_deref() else {
        return true;
    };
    let Some(given) = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(given) = given.strip_prefix("Bearer ") else {
        return false;
    };
    // Constant time in the token's content, so a timing probe learns nothing but its length.
    given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn route(shared: &Shared, req: hyper::Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        // Readiness: ok only while the store takes writes, so a balancer or supervisor sees a
        // full disk instead of a server that refuses every grant.
        // v1 grants need the session log too (one namespace), so its failure is the store's.
        let health = match (shared.store.health(), shared.sessions.failing()) {
            (crate::store::Health::Up, Some((since, cause))) => crate::store::Health::Down { since, cause },
            (health, _) => health,
        };
        return Ok(match health {
            crate::store::Health::Up => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
            crate::store::Health::Down { since, cause } => json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({
                    "status": "store_unavailable",
                    "store": cause,
                    "down_for_ms": since.elapsed().as_millis() as u64,
                }),
            ),
        });
    }
    if !authorized(shared, &req) {
        return Err(err(StatusCode::UNAUTHORIZED, "unauthorized", "missing or wrong bearer token"));
    }
    let method_not_allowed = || {
        err(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} not allowed on {path}", req.method()),
        )
    };
    match path.as_str() {
        "/metrics" if req.method() == Method::GET => {
            let mut r = Response::new(Full::new(Bytes::from(shared.render_metrics())));
            r.headers_mut()
                .insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"));
            return Ok(r);
        }
        "/metrics" => return Err(method_not_allowed()),
        "/v1/leases" if req.method() == Method::GET => {
            let query = list_query(req.uri().query().unwrap_or(""))?;
            let all = shared.store.all().await.map_err(|e| unavailable(&e))?;
            // Filtered here, so a client that wants the few held keys of many does not
            // receive them all.
            let leases = all
                .into_iter()
                .filter(|(k, _)| k.starts_with(&query.prefix))
                .map(|(k, r)| view(shared, k, &r))
                .filter(|v| !query.held_only || v.holder.is_some())
                .collect();
            return Ok(json(StatusCode::OK, &LeaseList { leases }));
        }
        "/v1/leases" => return Err(method_not_allowed()),
        "/v2/leases" if req.method() == Method::GET => {
            let query = list_query(req.uri().query().unwrap_or(""))?;
            let leases = shared.sessions.keys(query.held_only, &query.prefix);
            return Ok(json(StatusCode::OK, &serde_json::json!({ "leases": leases })));
        }
        "/v2/leases" => return Err(method_not_allowed()),
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/v2/sessions") {
        if req.method() != Method::POST {
            return Err(method_not_allowed());
        }
        return session_route(shared, req, rest).await;
    }
    let Some(raw_key) = path.strip_prefix("/v1/leases/") else {
        return Err(err(StatusCode::NOT_FOUND, "not_found", format!("no such endpoint: {path}")));
    };
    let key = parse_key(raw_key).map_err(|e| err(StatusCode::BAD_REQUEST, "invalid_key", e.to_string()))?;
    match *req.method() {
        Method::GET => match shared.store.get(key.clone()).await.map_err(|e| unavailable(&e))? {
            Some(rec) => Ok(json(StatusCode::OK, &view(shared, key.to_string(), &rec))),
            None => {
                Err(err(StatusCode::NOT_FOUND, "unknown_key", format!("key {key:?} has never been leased")))
            }
        },
        Method::POST => {
            let request = read_request(req, shared.request_timeout).await?;
            let d = shared.namespace.apply(key, request).await.map_err(|e| match e {
                crate::namespace::V1Error::Store(e) => unavailable(&e),
                crate::namespace::V1Error::Sessions(e) => unavailable_sessions(&e),
                e @ crate::namespace::V1Error::Stalled(_) => {
                    err(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string())
                }
            })?;
            shared.metrics.outcome(d.outcome, d.expired);
            let response = leasehold_core::Response { id: request.id, owner: request.owner, reply: d.reply };
            if let Reply::Rejected(r) = d.reply {
                // The core's response as it is, so a client reads the reason from the one
                // schema; `error` and the status are for generic tools.
                let (status, code) = reject_status(r);
                shared.metrics.error(code);
                return Ok(json(status, &Refusal { response, error: code, message: r.to_string() }));
            }
            Ok(json(StatusCode::OK, &response))
        }
        _ => Err(method_not_allowed()),
    }
}

/// What `GET /v1/leases` lists: `held=true` only the keys held now, `prefix=P` only the keys
/// that start with `P`.
struct ListQuery {
    held_only: bool,
    prefix: String,
}

fn list_query(query: &str) -> Result<ListQuery, ApiError> {
    let bad = |m: String| err(StatusCode::BAD_REQUEST, "invalid_query", m);
    let mut q = ListQuery { held_only: false, prefix: String::new() };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "held" => {
                q.held_only = match value {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad(format!("held={value:?}: expected true or false"))),
                }
            }
            "prefix" => {
                q.prefix = percent_decoded(value)
                    .filter(|p| p.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b)))
                    .ok_or_else(|| bad(format!("prefix={value:?}: keys have only [A-Za-z0-9._:/-]")))?
            }
            _ => return Err(bad(format!("unknown parameter {name:?} (known: held, prefix)"))),
        }
    }
    Ok(q)
}

/// `%3A` → `:` and so on; `None` for a broken escape or bytes that are not UTF-8.
fn percent_decoded(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?
            }
            b => b,
        });
    }
    String::from_utf8(out).ok()
}

async fn read_request(
    req: hyper::Request<Incoming>,
    timeout: std::time::Duration,
) -> Result<Request, ApiError> {
    let body = read_body(req, timeout).await?;
    serde_json::from_slice::<Request>(&body)
        .map_err(|e| err(StatusCode::BAD_REQUEST, "malformed_json", format!("not a lease request: {e}")))
}

/// The whole body, within `timeout` and [`MAX_BODY`].
async fn read_body(req: hyper::Request<Incoming>, timeout: std::time::Duration) -> Result<Bytes, ApiError> {
    let too_large = || {
        err(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("request body exceeds {MAX_BODY} bytes"))
    };
    let declared =
        req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let body_read = req.extensions().get::<BodyRead>().cloned();
    let collect = async {
        Limited::new(req.into_body(), MAX_BODY).collect().await.map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                too_large()
            } else {
                err(StatusCode::BAD_REQUEST, "malformed_json", format!("could not read body: {e}"))
            }
        })
    };
    // hyper bounds the wait for the head only; a client that never finishes its body must not
    // pin the connection either.
    let deadline = async {
        leasehold_timer::Deadline::after(timeout).await;
        Err(err(StatusCode::BAD_REQUEST, "malformed_json", format!("body not received within {timeout:?}")))
    };
    let body = futures_lite::future::or(collect, deadline).await?;
    if let Some(BodyRead(flag)) = body_read {
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(body.to_bytes())
}

/// The longest a keepalive is held open, whatever `wait_ms` asks: past this, proxies and
/// idle timeouts start cutting connections.
const MAX_HOLD: std::time::Duration = std::time::Duration::from_secs(60);

/// `POST /v2/sessions` (open) and `POST /v2/sessions/{id}` (everything else). `rest` is the
/// path after `/v2/sessions`.
async fn session_route(
    shared: &Shared,
    req: hyper::Request<Incoming>,
    rest: &str,
) -> Result<Response<Body>, ApiError> {
    let path_session = match rest {
        "" => None,
        id => Some(
            id.strip_prefix('/').and_then(|id| id.parse::<u64>().ok()).filter(|id| *id != 0).ok_or_else(
                || err(StatusCode::NOT_FOUND, "not_found", format!("no such session path: {rest:?}")),
            )?,
        ),
    };
    let hold = hold_query(req.uri().query().unwrap_or(""))?;
    let body = read_body(req, shared.request_timeout).await?;
    let request: SessionRequest = serde_json::from_slice(&body)
        .map_err(|e| err(StatusCode::BAD_REQUEST, "malformed_json", format!("not a session request: {e}")))?;
    let reply = match (path_session, &request.op) {
        (None, SessionOp::Open { ttl, label }) => shared.sessions.open_session(*ttl, label.clone()).await,
        (None, _) => {
            return Err(err(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                "POST /v2/sessions takes an open; other requests go to /v2/sessions/{id}",
            ))
        }
        (Some(_), SessionOp::Open { .. }) => {
            return Err(err(StatusCode::BAD_REQUEST, "malformed_json", "an open goes to POST /v2/sessions"))
        }
        (Some(id), _) if id != request.session.0 => {
            return Err(err(
                StatusCode::BAD_REQUEST,
                "session_mismatch",
                format!("the path names session {id}, the body {}", request.session.0),
            ))
        }
        (Some(_), op) => {
            match (op, hold) {
                (SessionOp::KeepAlive | SessionOp::KeepAliveSeen { .. }, Some(wait)) => {
                    // Held at most half the request timeout, so the answer leaves well before
                    // anyone's timeout cuts it.
                    let wait = wait.min(shared.request_timeout / 2).min(MAX_HOLD);
                    shared.sessions.held_keepalive(request.clone(), wait).await
                }
                _ => shared.sessions.request(request.clone()).await,
            }
        }
    }
    .map_err(|e| unavailable_sessions(&e))?;
    let status = match reply {
        SessionReply::Rejected(r) => {
            let (status, code) = reject_status(r);
            shared.metrics.error(code);
            status
        }
        _ => StatusCode::OK,
    };
    Ok(json(status, &request.answer(reply)))
}

/// `wait_ms=N`: hold a keepalive up to N ms until there is news for the session.
fn hold_query(query: &str) -> Result<Option<std::time::Duration>, ApiError> {
    let mut wait = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "wait_ms" => {
                let ms = value.parse::<u64>().map_err(|_| {
                    err(
                        StatusCode::BAD_REQUEST,
                        "invalid_query",
                        format!("wait_ms={value:?}: expected milliseconds"),
                    )
                })?;
                wait = Some(std::time::Duration::from_millis(ms));
            }
            _ => {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    format!("unknown parameter {name:?} (known: wait_ms)"),
                ))
            }
        }
    }
    Ok(wait)
}

/// The status of a request the authority refused, and the code `/metrics` and generic tools
/// see. The body is still the core's response, so a client reads the reason from one schema.
fn reject_status(r: Reject) -> (StatusCode, &'static str) {
    match r {
        Reject::InvalidTtl => (StatusCode::BAD_REQUEST, "invalid_ttl"),
        Reject::InvalidKey => (StatusCode::BAD_REQUEST, "invalid_key"),
        Reject::FenceExhausted => (StatusCode::CONFLICT, "fence_exhausted"),
        // Not permanent: the key takes another limit once its holders and waiters are gone.
        Reject::LimitMismatch => (StatusCode::CONFLICT, "limit_mismatch"),
        Reject::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
        Reject::Malformed => (StatusCode::BAD_REQUEST, "malformed"),
        Reject::UnsupportedVersion => (StatusCode::BAD_REQUEST, "unsupported_version"),
        // Not 503: retrying the same request cannot help until something is freed.
        Reject::Capacity => (StatusCode::INSUFFICIENT_STORAGE, "capacity"),
        Reject::Misconfigured => (StatusCode::INTERNAL_SERVER_ERROR, "misconfigured"),
    }
}

/// A refused lease request: the core's response, with an error code for generic tools.
#[derive(Serialize)]
struct Refusal {
    #[serde(flatten)]
    response: leasehold_core::Response,
    error: &'static str,
    message: String,
}

fn unavailable_sessions(e: &crate::sessions::SessionStoreError) -> ApiError {
    tracing::debug!("{e}");
    err(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string())
}

fn unavailable(e: &crate::store::StoreError) -> ApiError {
    // The store logs the failure once, when it happens; a full disk must not also cost a line
    // per refused request.
    tracing::debug!("{e}");
    err(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string())
}
