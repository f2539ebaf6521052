//! The built-in lease server's API (`leasehold serve`) as a [`Backend`].

use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use leasehold_core::{Key, Reject, Reply, Request};

use crate::http::{HttpClient, HttpResponse};
use leasehold_client::Backend;
use leasehold_client::TransportError;

/// The built-in lease server (`leasehold serve`).
pub struct BuiltinBackend {
    http: HttpClient,
    token: Option<String>,
}

impl BuiltinBackend {
    /// A backend for the server at `url` (e.g. `http://127.0.0.1:7878`), with an optional
    /// bearer token and a per-request timeout.
    pub fn new(
        url: &str,
        token: Option<String>,
        timeout: Duration,
    ) -> Result<BuiltinBackend, TransportError> {
        Ok(BuiltinBackend { http: HttpClient::new(url, timeout)?, token })
    }

    /// Resolves the server's host name with `resolver` (see [`HttpClient::with_resolver`]).
    pub fn with_resolver(
        self,
        resolver: impl Fn(&str) -> std::io::Result<Vec<std::net::SocketAddr>> + Send + Sync + 'static,
    ) -> BuiltinBackend {
        BuiltinBackend { http: self.http.with_resolver(resolver), ..self }
    }

    /// At most `n` requests in flight at once (see [`HttpClient::with_max_connections`]).
    pub fn with_max_connections(self, n: usize) -> BuiltinBackend {
        BuiltinBackend { http: self.http.with_max_connections(n), ..self }
    }

    /// Uses `tls` for an `https://` URL, e.g. to trust the private CA that signed the
    /// server's certificate (see [`HttpClient::with_tls`]).
    #[cfg(feature = "tls")]
    pub fn with_tls(self, tls: crate::TlsConfig) -> BuiltinBackend {
        BuiltinBackend { http: self.http.with_tls(tls), ..self }
    }
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    message: String,
}

impl Backend for BuiltinBackend {
    async fn call(&self, key: &Key, request: Request) -> Result<Reply, TransportError> {
        let body = serde_json::to_vec(&request).map_err(|e| TransportError::Protocol(e.to_string()))?;
        let mut b = self
            .http
            .request(hyper::Method::POST, &format!("/v1/leases/{key}"))
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(t) = &self.token {
            b = b.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = b.body(Full::new(Bytes::from(body))).map_err(|e| TransportError::Config(e.to_string()))?;
        let resp = self.http.send(req).await?;
        builtin_reply(&request, resp)
    }
}

/// A refusal from the authority: the core's response (the server adds `error` and
/// `message` for generic tools).
#[derive(serde::Deserialize)]
struct Refusal {
    id: leasehold_core::RequestId,
    owner: leasehold_core::OwnerId,
    reply: Reply,
}

/// Maps the built-in server's answer to the core's reply. The authority's own answers,
/// refusals included, are the core's response whatever the status; what is left is the HTTP
/// layer's: a 5xx is the store failing (retry), a refused token or an unparsable request is
/// said as such, and anything else is a server this client cannot talk to.
fn builtin_reply(request: &Request, resp: HttpResponse) -> Result<Reply, TransportError> {
    let ours = |id, owner| {
        if id == request.id && owner == request.owner {
            Ok(())
        } else {
            Err(TransportError::Protocol("response for another request".into()))
        }
    };
    if resp.status == 200 {
        let r: leasehold_core::Response = serde_json::from_slice(&resp.body)
            .map_err(|e| TransportError::Protocol(format!("bad response body: {e}")))?;
        ours(r.id, r.owner)?;
        return Ok(r.reply);
    }
    if let Ok(r) = serde_json::from_slice::<Refusal>(&resp.body) {
        ours(r.id, r.owner)?;
        return Ok(r.reply);
    }
    if resp.status >= 500 {
        return Ok(Reply::Unavailable);
    }
    let err: ErrorBody = serde_json::from_slice(&resp.body).map_err(|_| {
        TransportError::Protocol(format!(
            "HTTP {} with a body that is not an error: {:?}",
            resp.status, resp.body
        ))
    })?;
    tracing::warn!("server refused the request: {} ({})", err.error, err.message);
    match err.error.as_str() {
        "unauthorized" => Ok(Reply::Rejected(Reject::Unauthorized)),
        "invalid_key" => Ok(Reply::Rejected(Reject::InvalidKey)),
        "malformed_json" | "body_too_large" => Ok(Reply::Rejected(Reject::Malformed)),
        _ => Err(TransportError::Config(format!(
            "the server refused the request: HTTP {} {}: {}",
            resp.status, err.error, err.message
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_core::{Op, OwnerId, RequestId};

    fn req() -> Request {
        Request { id: RequestId(3), owner: OwnerId(7), op: Op::Release { fence: leasehold_core::Fence(1) } }
    }
    fn resp(status: u16, body: &str) -> HttpResponse {
        HttpResponse { status, body: Bytes::from(body.to_string()) }
    }

    #[test]
    fn maps_server_answers() {
        assert_eq!(
            builtin_reply(&req(), resp(200, r#"{"id":3,"owner":7,"reply":"released"}"#)),
            Ok(Reply::Released)
        );
        assert!(matches!(
            builtin_reply(&req(), resp(200, r#"{"id":4,"owner":7,"reply":"released"}"#)),
            Err(TransportError::Protocol(_))
        ));
        assert!(matches!(builtin_reply(&req(), resp(200, "garbage")), Err(TransportError::Protocol(_))));
        assert_eq!(builtin_reply(&req(), resp(503, "")), Ok(Reply::Unavailable));
        // The authority's refusals are its response, whatever the status: a full store is
        // not a 503 to retry forever.
        for (status, reply, reject) in [
            (400, "invalid_ttl", Reject::InvalidTtl),
            (400, "unsupported_version", Reject::UnsupportedVersion),
            (507, "capacity", Reject::Capacity),
            (500, "misconfigured", Reject::Misconfigured),
        ] {
            let body = format!(
                r#"{{"id":3,"owner":7,"reply":{{"rejected":"{reply}"}},"error":"{reply}","message":"x"}}"#
            );
            assert_eq!(builtin_reply(&req(), resp(status, &body)), Ok(Reply::Rejected(reject)), "{body}");
        }
        let other = r#"{"id":9,"owner":7,"reply":{"rejected":"capacity"},"error":"capacity","message":"x"}"#;
        assert!(matches!(builtin_reply(&req(), resp(507, other)), Err(TransportError::Protocol(_))));
        // No such endpoint: a server this client cannot talk to, not a refusal to retry.
        let e = builtin_reply(&req(), resp(404, r#"{"error":"not_found","message":"x"}"#)).unwrap_err();
        assert!(e.is_permanent(), "{e}");
        assert_eq!(
            builtin_reply(&req(), resp(401, r#"{"error":"unauthorized","message":"x"}"#)),
            Ok(Reply::Rejected(Reject::Unauthorized))
        );
        assert!(matches!(builtin_reply(&req(), resp(404, "<html>")), Err(TransportError::Protocol(_))));
    }
}
