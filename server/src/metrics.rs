//! Counters and a latency histogram, rendered in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use leasehold_core::authority::Outcome;

/// Upper bounds (seconds) of the request latency histogram.
const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0];

/// Error codes counted separately.
pub(crate) const ERROR_CODES: [&str; 16] = [
    "malformed_json",
    "invalid_key",
    "invalid_ttl",
    "fence_exhausted",
    "body_too_large",
    "unauthorized",
    "unknown_key",
    "not_found",
    "method_not_allowed",
    "unavailable",
    "invalid_query",
    "session_mismatch",
    "capacity",
    "malformed",
    "unsupported_version",
    "misconfigured",
];

#[derive(Default)]
pub(crate) struct Metrics {
    grants: AtomicU64,
    renewals: AtomicU64,
    releases: AtomicU64,
    expiries: AtomicU64,
    refusals: AtomicU64,
    tls_failures: AtomicU64,
    accept_errors: AtomicU64,
    shed: AtomicU64,
    errors: [AtomicU64; ERROR_CODES.len()],
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
}

impl Metrics {
    pub(crate) fn outcome(&self, outcome: Outcome, expired: bool) {
        if expired {
            self.expiries.fetch_add(1, Relaxed);
        }
        let c = match outcome {
            Outcome::Granted => &self.grants,
            Outcome::Renewed => &self.renewals,
            Outcome::Released => &self.releases,
            Outcome::Refused => &self.refusals,
            // Counted by error code when the reply is sent.
            Outcome::Rejected => return,
        };
        c.fetch_add(1, Relaxed);
    }

    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) fn tls_failure(&self) {
        self.tls_failures.fetch_add(1, Relaxed);
    }

    pub(crate) fn accept_error(&self) {
        self.accept_errors.fetch_add(1, Relaxed);
    }

    pub(crate) fn shed(&self) {
        self.shed.fetch_add(1, Relaxed);
    }

    pub(crate) fn error(&self, code: &str) {
        if let Some(i) = ERROR_CODES.iter().position(|c| *c == code) {
            self.errors[i].fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn latency(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.latency_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// The text exposition, with `counters` and `gauges` (name, help, value) kept elsewhere
    /// (by the store, the connection table).
    pub(crate) fn render(&self, counters: &[(&str, &str, u64)], gauges: &[(&str, &str, u64)]) -> String {
        let mut s = String::new();
        let mut counter = |name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Relaxed));
        };
        counter("leasehold_grants_total", "New grants (new fence).", &self.grants);
        counter("leasehold_renewals_total", "Grants extended.", &self.renewals);
        counter("leasehold_releases_total", "Grants given back.", &self.releases);
        counter("leasehold_expiries_total", "Grants found expired.", &self.expiries);
        counter("leasehold_refusals_total", "Busy or not-holder answers.", &self.refusals);
        counter(
            "leasehold_tls_handshake_failures_total",
            "TLS handshakes that failed or timed out (untrusted client, plain http, port scans).",
            &self.tls_failures,
        );
        counter(
            "leasehold_accept_errors_total",
            "Failed accepts (out of file descriptors, mostly); each is followed by a pause.",
            &self.accept_errors,
        );
        counter(
            "leasehold_connections_shed_total",
            "Connections closed to make room at the connection cap or when descriptors ran out.",
            &self.shed,
        );
        for (kind, list) in [("counter", counters), ("gauge", gauges)] {
            for (name, help, v) in list {
                let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
            }
        }
        let _ = writeln!(s, "# HELP leasehold_errors_total Requests rejected, by error code.");
        let _ = writeln!(s, "# TYPE leasehold_errors_total counter");
        for (code, v) in ERROR_CODES.iter().zip(&self.errors) {
            let _ = writeln!(s, "leasehold_errors_total{{code=\"{code}\"}} {}", v.load(Relaxed));
        }
        let name = "leasehold_request_duration_seconds";
        let _ = writeln!(s, "# HELP {name} Time to answer lease requests, including the commit.");
        let _ = writeln!(s, "# TYPE {name} histogram");
        for (b, v) in BUCKETS.iter().zip(&self.latency_buckets) {
            let _ = writeln!(s, "{name}_bucket{{le=\"{b}\"}} {}", v.load(Relaxed));
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(s, "{name}_sum {}", self.latency_sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(s, "{name}_count {count}");
        s
    }
}
