//! HTTPS admission server: TLS listener, HTTP/1.1 + HTTP/2, routing, limits,
//! graceful shutdown; and the plain-HTTP metrics listener.
//!
//! Routes (on the path alone; the query carries the apiserver's deadline):
//! - `POST /mutate`: an `AdmissionReview` in, an `AdmissionReview` out;
//! - `GET /healthz`: 200 while the process serves;
//! - `GET /readyz`: 200 while ready, 503 once shutdown has begun.
//!
//! Requests that are not a well-formed review get a 4xx with a plain-text
//! reason: 404 unknown path, 405 wrong method, 415 not JSON, 413 too large
//! (refused from `Content-Length` before reading, or as soon as the limit is
//! crossed), 408 body too slow, 400 malformed review.

mod report;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admission::{self, ConfigMapLookup, Outcome};
use crate::cluster::events::EventSink;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::mutate::BootstrapOutcome;

/// Bodies larger than this are decided on a blocking thread so one huge
/// review cannot stall the async workers serving the others.
const BLOCKING_THRESHOLD: usize = 256 * 1024;

/// Timeouts and limits of the HTTPS listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for the request headers (HTTP/1.1).
    pub header_timeout: Duration,
    /// Time allowed for the body when the request names no `timeout`.
    pub body_timeout: Duration,
    /// Upper bound for a deadline taken from `?timeout=`.
    pub max_body_timeout: Duration,
    /// How long in-flight requests may take to finish at shutdown.
    pub drain_timeout: Duration,
    /// Open connections at most; beyond it new ones wait in the listen
    /// backlog until one closes, so a flood cannot exhaust memory or fds.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            max_body_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

/// What every request handler shares.
pub struct State {
    /// The mutation policy.
    pub config: Arc<Config>,
    /// Metric handles.
    pub metrics: Metrics,
    /// Limits and timeouts.
    pub limits: Limits,
    /// Where the bootstrap ConfigMap exists (the reconciler's cache).
    pub configmaps: Arc<ConfigMapLookup>,
    /// Where events about reviewed objects go (never awaited on the review
    /// path; dry-run reviews emit none).
    pub events: EventSink,
    /// Benchmark floor: answer every `POST /mutate` with these bytes after
    /// reading the body, without parsing (same listener, TLS and limits).
    pub floor_response: Option<Bytes>,
    ready: AtomicBool,
}

impl State {
    /// New state; not ready until [`State::set_ready`].
    pub fn new(config: Arc<Config>, metrics: Metrics, limits: Limits) -> Self {
        Self {
            config,
            metrics,
            limits,
            configmaps: Arc::new(admission::no_cluster),
            events: EventSink::disabled(),
            floor_response: None,
            ready: AtomicBool::new(false),
        }
    }

    /// Uses `lookup` to tell where the bootstrap ConfigMap exists.
    pub fn with_configmaps(mut self, lookup: Arc<ConfigMapLookup>) -> Self {
        self.configmaps = lookup;
        self
    }

    /// Sends events about reviewed objects to `events`.
    pub fn with_events(mut self, events: EventSink) -> Self {
        self.events = events;
        self
    }

    /// Sets what `/readyz` answers.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// What `/readyz` answers.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

type Resp = Response<Full<Bytes>>;

fn text(status: StatusCode, msg: impl Into<String>) -> Resp {
    let mut body = msg.into();
    body.push('\n');
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json(body: Vec<u8>) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn method_not_allowed(allow: &'static str) -> Resp {
    let mut resp = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; use {allow}"),
    );
    resp.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    resp
}

/// Routes one request. Generic over the body so tests can call it directly.
pub async fn handle<B>(req: Request<B>, state: &State) -> Resp
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match (req.uri().path(), req.method()) {
        ("/mutate", &Method::POST) => mutate(req, state).await,
        ("/mutate", _) => {
            state.metrics.error("method", false, 0.0);
            method_not_allowed("POST")
        }
        ("/healthz", &Method::GET | &Method::HEAD) => text(StatusCode::OK, "ok"),
        ("/readyz", &Method::GET | &Method::HEAD) => {
            if state.is_ready() {
                text(StatusCode::OK, "ready")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready")
            }
        }
        ("/healthz" | "/readyz", _) => method_not_allowed("GET"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; the webhook path is /mutate",
        ),
    }
}

async fn mutate<B>(req: Request<B>, state: &State) -> Resp
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let start = Instant::now();
    let limit = state.config.server.max_body_bytes;
    let refuse = |reason: &'static str, status: StatusCode, msg: String| {
        state.metrics.error(
            reason,
            status.is_server_error(),
            start.elapsed().as_secs_f64(),
        );
        debug!(reason, status = status.as_u16(), "request refused");
        text(status, msg)
    };

    if !is_json(req.headers().get(header::CONTENT_TYPE)) {
        return refuse(
            "content-type",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json".into(),
        );
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return refuse(
            "body-too-large",
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds {limit} bytes"),
        );
    }
    let budget = deadline(req.uri().query(), &state.limits);
    let collected =
        tokio::time::timeout(budget, Limited::new(req.into_body(), limit).collect()).await;
    let bytes = match collected {
        Err(_) => {
            return refuse(
                "body-timeout",
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not received within {budget:?}"),
            );
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return refuse(
                "body-too-large",
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds {limit} bytes"),
            );
        }
        Ok(Err(e)) => {
            return refuse(
                "body-read",
                StatusCode::BAD_REQUEST,
                format!("cannot read request body: {e}"),
            );
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    if let Some(floor) = &state.floor_response {
        return json(floor.to_vec());
    }

    let result = if bytes.len() > BLOCKING_THRESHOLD {
        let config = state.config.clone();
        let configmaps = state.configmaps.clone();
        match tokio::task::spawn_blocking(move || admission::review(&bytes, &config, &*configmaps))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "review task failed");
                return refuse(
                    "internal",
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error".into(),
                );
            }
        }
    } else {
        admission::review(&bytes, &state.config, &*state.configmaps)
    };
    match result {
        Ok(reviewed) => {
            let seconds = start.elapsed().as_secs_f64();
            let m = &state.metrics;
            m.review(
                &reviewed.kind,
                &reviewed.operation,
                reviewed.outcome.as_str(),
                seconds,
            );
            if let Outcome::Skipped(reason) = reviewed.outcome {
                m.skip(reason.as_str());
            }
            for kind in &reviewed.mutations {
                m.mutation(kind);
            }
            if let Some(BootstrapOutcome::Skipped(reason)) = reviewed.bootstrap {
                m.bootstrap_skip(reason.as_str());
            }
            report::report(state, &reviewed);
            // Empty (no allocation) without warnings.
            let warning_text = reviewed.warnings.join("; ");
            // `&str` values, not `%` (Display): recorded as strings directly
            // instead of formatted through `fmt::Write` first.
            info!(
                uid = reviewed.uid.as_str(),
                kind = reviewed.kind.as_str(),
                namespace = reviewed.namespace.as_str(),
                name = reviewed.name.as_str(),
                operation = reviewed.operation.as_str(),
                dry_run = reviewed.dry_run,
                result = reviewed.outcome.as_str(),
                skip_reason = match reviewed.outcome {
                    Outcome::Skipped(r) => r.as_str(),
                    _ => "-",
                },
                patch_ops = reviewed.patch_ops,
                patch_bytes = reviewed.patch_bytes,
                warnings = reviewed.warnings.len(),
                warning_text = if warning_text.is_empty() {
                    "-"
                } else {
                    &warning_text
                },
                denied = reviewed.denied.as_deref().unwrap_or("-"),
                latency_us = start.elapsed().as_micros() as u64,
                "review"
            );
            json(reviewed.body)
        }
        Err(e @ admission::ReviewError::Serialize(_)) => {
            warn!(error = %e, "cannot serialise a review response");
            refuse(
                "internal",
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error".into(),
            )
        }
        Err(e) => refuse("bad-request", StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// True for `application/json`, with or without parameters.
fn is_json(value: Option<&header::HeaderValue>) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// The time allowed for the body: the apiserver's `?timeout=` (a Go
/// duration such as `5s` or `1m30s`), capped, else the default.
fn deadline(query: Option<&str>, limits: &Limits) -> Duration {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("timeout="))
        .and_then(parse_go_duration)
        .map_or(limits.body_timeout, |d| d.min(limits.max_body_timeout))
}

/// Parses the Go durations the apiserver sends (`5s`, `500ms`, `1m30s`).
fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .filter(|&i| i > 0)?;
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(value * scale).ok()?;
    }
    Some(total)
}

/// Serves HTTPS on `listener` until `shutdown` is cancelled, then stops
/// accepting and lets in-flight requests finish (bounded by
/// [`Limits::drain_timeout`]).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(
        state.limits.max_connections.max(1),
    ));

    loop {
        let slot = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = accept(&listener, "webhook") => accepted,
        };
        // Small frames (HTTP/2 WINDOW_UPDATE, short responses) must not wait
        // for a delayed ACK.
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let state = state.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let handshake =
                tokio::time::timeout(state.limits.handshake_timeout, acceptor.accept(tcp));
            let stream = match handshake.await {
                Ok(Ok(s)) => s,
                Ok(Err(error)) => {
                    debug!(%peer, %error, "tls handshake failed");
                    state.metrics.error("tls-handshake", false, 0.0);
                    return;
                }
                Err(_) => {
                    debug!(%peer, "tls handshake timed out");
                    state.metrics.error("tls-handshake", false, 0.0);
                    return;
                }
            };
            let svc_state = state.clone();
            let service = service_fn(move |req| {
                let state = svc_state.clone();
                async move { Ok::<_, Infallible>(handle(req, &state).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(error) = watcher.watch(conn).await {
                debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    info!("stopped accepting; draining in-flight requests");
    if tokio::time::timeout(state.limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("drain timeout reached; closing remaining connections");
    }
}

/// Serves `GET /metrics` (Prometheus text format) on plain HTTP until
/// `shutdown`.
pub async fn serve_metrics(listener: TcpListener, registry: Registry, shutdown: CancellationToken) {
    let registry = Arc::new(registry);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5));
    let builder = Arc::new(builder);
    loop {
        let (tcp, _) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            accepted = accept(&listener, "metrics") => accepted,
        };
        let registry = registry.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let registry = registry.clone();
                async move {
                    let resp = match (req.uri().path(), req.method()) {
                        ("/metrics", &Method::GET) => {
                            let mut r = Response::new(Full::new(Bytes::from(
                                crate::metrics::encode(&registry),
                            )));
                            r.headers_mut().insert(
                                header::CONTENT_TYPE,
                                header::HeaderValue::from_static(
                                    "text/plain; version=0.0.4; charset=utf-8",
                                ),
                            );
                            r
                        }
                        ("/metrics", _) => method_not_allowed("GET"),
                        _ => text(StatusCode::NOT_FOUND, "not found; try /metrics"),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

/// Accepts the next connection; on errors (EMFILE and friends) logs and
/// backs off instead of spinning.
async fn accept(listener: &TcpListener, listener_name: &'static str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) => {
                warn!(%error, listener = listener_name, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Binds a TCP listener with a clear error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        for bad in ["", "5", "s", "5x", "-5s", "5s5", "1e999s"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn deadline_is_taken_from_query_and_capped() {
        let l = Limits::default();
        assert_eq!(deadline(Some("timeout=5s"), &l), Duration::from_secs(5));
        assert_eq!(deadline(Some("a=b&timeout=2s"), &l), Duration::from_secs(2));
        assert_eq!(deadline(Some("timeout=1h"), &l), l.max_body_timeout);
        assert_eq!(deadline(Some("timeout=junk"), &l), l.body_timeout);
        assert_eq!(deadline(None, &l), l.body_timeout);
    }

    #[test]
    fn json_content_types() {
        let v = |s: &'static str| header::HeaderValue::from_static(s);
        assert!(is_json(Some(&v("application/json"))));
        assert!(is_json(Some(&v("Application/JSON; charset=utf-8"))));
        assert!(!is_json(Some(&v("text/plain"))));
        assert!(!is_json(Some(&v("application/jsonx"))));
        assert!(!is_json(None));
    }
}
