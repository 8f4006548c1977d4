//! The limits and timeouts of the HTTPS and the metrics listener: what
//! [`crate::server`] enforces and [`crate::config`] reads from the
//! `server:` section. Plain data with its defaults and a validity check; it
//! sits below both so the configuration never imports the server (the
//! server re-exports it as part of its API).

use std::time::Duration;

/// Default for [`Limits::max_body_bytes`]: 4 MiB.
///
/// Sized for the largest CREATE review: the apiserver refuses request bodies
/// over 3 MiB, and a CREATE review carries the object alone (no
/// `oldObject`), so 3 MiB of object plus 1 MiB for the envelope, for JSON
/// being larger than the protobuf a controller may have sent, and for what
/// earlier webhooks added. An UPDATE review carries `object` and `oldObject`;
/// objects that etcd stores (1.5 MiB per request by default) make that at
/// most about 3 MiB too, and the Pods, ReplicaSets and workloads this
/// webhook reviews are far smaller. Memory is bounded by
/// [`Limits::body_budget_bytes`], not by this limit.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Timeouts and limits of the HTTPS and the metrics listener.
///
/// [`Limits::default`] holds the documented defaults (docs/configuration.md "HTTP API");
/// [`Limits::validate`] checks a combination taken from configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time allowed for the TLS handshake. Default 10 s.
    pub handshake_timeout: Duration,
    /// Time from the end of the handshake (metrics: from the accept) to the
    /// first request; a connection that sends nothing is closed after it, so
    /// it cannot hold a slot. Default 10 s.
    pub first_request_timeout: Duration,
    /// Time allowed for the request headers (HTTP/1.1), and how long an
    /// HTTP/1.1 connection may wait between requests. Default 5 s.
    pub header_timeout: Duration,
    /// How long a connection with no request in flight stays open after its
    /// last request (HTTP/2; HTTP/1.1 waits at most `header_timeout`).
    /// Default 90 s, as long as Go's clients keep idle connections: the
    /// apiserver's connection stays up while it sends reviews.
    pub idle_timeout: Duration,
    /// Interval of HTTP/2 PING frames. Default 30 s.
    pub http2_keep_alive_interval: Duration,
    /// A PING not answered within this closes the connection. Default 10 s.
    pub http2_keep_alive_timeout: Duration,
    /// Time allowed for the body when the request names no `timeout`.
    /// Default 10 s.
    pub body_timeout: Duration,
    /// Upper bound for a deadline taken from `?timeout=`. Default 30 s.
    pub max_body_timeout: Duration,
    /// How long in-flight requests may take to finish at shutdown.
    /// Default 10 s.
    pub drain_timeout: Duration,
    /// Open connections at most on the webhook port. Default 1024.
    pub max_connections: usize,
    /// Connections accepted beyond `max_connections`, each for one request:
    /// `/healthz` and `/readyz` are answered, anything else gets 503 with
    /// `Retry-After: 1`; then the connection is closed. Keeps the kubelet's
    /// probes (which share the port) answered while the cap is reached.
    /// Beyond both, new connections wait in the listen backlog. Default 8.
    pub probe_connections: usize,
    /// Largest accepted request body; larger ones get 413. Default
    /// [`DEFAULT_MAX_BODY_BYTES`].
    pub max_body_bytes: usize,
    /// Request body bytes held in memory at once, across all requests;
    /// a request that would pass it gets 503 with `Retry-After: 1` at once.
    /// Default 32 MiB: eight of the largest reviews, thousands of usual ones
    /// (8 KB), and well inside the Deployment's 128 MiB memory limit.
    pub body_budget_bytes: usize,
    /// Open connections at most on the metrics port (the same timeouts
    /// apply there). Default 64.
    pub metrics_max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(90),
            http2_keep_alive_interval: Duration::from_secs(30),
            http2_keep_alive_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            max_body_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            max_connections: 1024,
            probe_connections: 8,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            body_budget_bytes: 32 * 1024 * 1024,
            metrics_max_connections: 64,
        }
    }
}

/// A combination of [`Limits`] the server cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct LimitsError {
    /// The [`Limits`] field at fault.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Limits {
    /// Checks that every timeout is positive, every cap at least one, and
    /// that the body budget holds at least one request of the largest size.
    pub fn validate(&self) -> Result<(), LimitsError> {
        let err = |field, reason| Err(LimitsError { field, reason });
        let timeouts = [
            ("handshake_timeout", self.handshake_timeout),
            ("first_request_timeout", self.first_request_timeout),
            ("header_timeout", self.header_timeout),
            ("idle_timeout", self.idle_timeout),
            ("http2_keep_alive_interval", self.http2_keep_alive_interval),
            ("http2_keep_alive_timeout", self.http2_keep_alive_timeout),
            ("body_timeout", self.body_timeout),
            ("max_body_timeout", self.max_body_timeout),
        ];
        if let Some((field, _)) = timeouts.iter().find(|(_, d)| d.is_zero()) {
            return err(field, "must be more than zero");
        }
        if self.max_body_timeout < self.body_timeout {
            return err("max_body_timeout", "must be at least body_timeout");
        }
        if self.max_connections == 0 {
            return err("max_connections", "must be at least 1");
        }
        if self.metrics_max_connections == 0 {
            return err("metrics_max_connections", "must be at least 1");
        }
        if self.max_body_bytes < 1024 {
            return err("max_body_bytes", "must be at least 1024");
        }
        if self.body_budget_bytes < self.max_body_bytes {
            return err(
                "body_budget_bytes",
                "must be at least max_body_bytes, or the largest review is never accepted",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_limits_are_valid_and_bad_ones_are_named() {
        assert_eq!(Limits::default().validate(), Ok(()));
        let field = |l: Limits| l.validate().unwrap_err().field;
        let d = Limits::default;
        assert_eq!(
            field(Limits {
                idle_timeout: Duration::ZERO,
                ..d()
            }),
            "idle_timeout"
        );
        assert_eq!(
            field(Limits {
                body_budget_bytes: d().max_body_bytes - 1,
                ..d()
            }),
            "body_budget_bytes"
        );
        assert_eq!(
            field(Limits {
                max_connections: 0,
                ..d()
            }),
            "max_connections"
        );
        assert_eq!(
            field(Limits {
                max_body_timeout: Duration::from_secs(1),
                ..d()
            }),
            "max_body_timeout"
        );
    }
}
