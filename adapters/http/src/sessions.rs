//! The built-in lease server's protocol v2 (`/v2/sessions`) as a [`SessionBackend`].

use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use leasehold_client::{SessionBackend, TransportError, MAX_IN_FLIGHT};
use leasehold_core::session::wire::{SessionOp, SessionRequest, SessionResponse};

use crate::http::HttpClient;

/// The built-in lease server's sessions: the core's requests and responses carried as they are,
/// as JSON, one schema for both ends.
pub struct BuiltinSessions {
    /// Opens, acquires, releases, closes: up to the driver's requests in flight.
    http: HttpClient,
    /// Keepalives only, so one held open at the server never waits behind a burst of acquires
    /// for a connection (and the other way round). Two: a keepalive the machine gave up on may
    /// still be out when it sends the next.
    keepalive_http: HttpClient,
    token: Option<String>,
}

impl BuiltinSessions {
    /// Sessions at the server at `url` (e.g. `http://127.0.0.1:7878`), with its `--token` if
    /// any, and a per-request timeout (the session's request timeout: [`Options::session`]
    /// gives ttl/3).
    ///
    /// [`Options::session`]: leasehold_client::Options::session
    pub fn new(
        url: &str,
        token: Option<String>,
        timeout: Duration,
    ) -> Result<BuiltinSessions, TransportError> {
        Ok(BuiltinSessions {
            http: HttpClient::new(url, timeout)?.with_max_connections(MAX_IN_FLIGHT),
            keepalive_http: HttpClient::new(url, timeout)?.with_max_connections(2),
            token,
        })
    }

    /// Uses `tls` for an `https://` URL (see [`HttpClient::with_tls`]).
    #[cfg(feature = "tls")]
    pub fn with_tls(self, tls: crate::TlsConfig) -> BuiltinSessions {
        BuiltinSessions {
            http: self.http.with_tls(tls.clone()),
            keepalive_http: self.keepalive_http.with_tls(tls),
            token: self.token,
        }
    }
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    message: String,
}

impl SessionBackend for BuiltinSessions {
    async fn call(&self, req: SessionRequest, hold: Duration) -> Result<SessionResponse, TransportError> {
        let (http, path) = match req.op {
            SessionOp::Open { .. } => (&self.http, "/v2/sessions".to_string()),
            SessionOp::KeepAlive | SessionOp::KeepAliveSeen { .. } => {
                (&self.keepalive_http, format!("/v2/sessions/{}?wait_ms={}", req.session.0, hold.as_millis()))
            }
            _ => (&self.http, format!("/v2/sessions/{}", req.session.0)),
        };
        let body = serde_json::to_vec(&req).map_err(|e| TransportError::Protocol(e.to_string()))?;
        let mut b =
            http.request(hyper::Method::POST, &path).header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(t) = &self.token {
            b = b.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let request =
            b.body(Full::new(Bytes::from(body))).map_err(|e| TransportError::Config(e.to_string()))?;
        let resp = http.send(request).await?;
        session_response(resp.status, &resp.body)
    }
}

/// The server's answer: the core's response whatever the status (refusals come as 4xx with
/// the same body), or a transport-level error body.
fn session_response(status: u16, body: &[u8]) -> Result<SessionResponse, TransportError> {
    if let Ok(r) = serde_json::from_slice::<SessionResponse>(body) {
        return Ok(r);
    }
    let err: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let what = match &err {
        Some(e) => format!("HTTP {status} {}: {}", e.error, e.message),
        None => format!("HTTP {status} with a body that is neither a session response nor an error"),
    };
    match status {
        // The store failed or is being re-opened: retrying helps.
        500..=599 => Err(TransportError::Protocol(what)),
        // A wrong token, a server without protocol v2, a request it cannot parse: only a
        // change of configuration (or of version) helps.
        _ => Err(TransportError::Config(format!("the server refused a session request: {what}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_core::session::wire::SessionReply;
    use leasehold_core::Reject;

    #[test]
    fn server_answers_map_to_responses_or_classified_errors() {
        let ok = br#"{"session":3,"seq":5,"reply":"expired"}"#;
        assert_eq!(session_response(200, ok).unwrap().reply, SessionReply::Expired);
        let refused = br#"{"session":3,"seq":5,"reply":{"rejected":"unauthorized"}}"#;
        assert_eq!(
            session_response(401, refused).unwrap().reply,
            SessionReply::Rejected(Reject::Unauthorized)
        );
        let token = br#"{"error":"unauthorized","message":"missing or wrong bearer token"}"#;
        let e = session_response(401, token).unwrap_err();
        assert!(e.is_permanent(), "{e}");
        let down = br#"{"error":"unavailable","message":"store"}"#;
        assert!(!session_response(503, down).unwrap_err().is_permanent());
        assert!(session_response(404, b"<html>").unwrap_err().is_permanent());
    }
}
