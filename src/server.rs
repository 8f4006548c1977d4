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
//! crossed), 408 body too slow, 400 malformed review. Overload gets a 503
//! with `Retry-After: 1`: the bodies in memory would pass
//! [`Limits::body_budget_bytes`], or the request came on a connection from
//! the probe reserve (see [`Limits::probe_connections`]).
//!
//! Connections are bounded in number and in time: see [`Limits`] and the
//! `conn` module for the lifecycle, `body` for the memory budget.

mod body;
mod conn;
mod report;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admission::{self, ConfigMapLookup, Outcome};
use crate::cluster::events::EventSink;
use crate::config::Config;
/// The server's settings, defined in [`crate::limits`] so the configuration can build them.
pub use crate::limits::{Limits, LimitsError};
use crate::metrics::Metrics;
use crate::mutate::BootstrapOutcome;
use body::{BodyError, Budget, Reservation};
use conn::{Activity, Closed, Slot, Slots, Timeouts};

/// Bodies larger than this are decided on a blocking thread so one huge
/// review cannot stall the async workers serving the others.
const BLOCKING_THRESHOLD: usize = 256 * 1024;

/// HTTP/1.1 read buffer per connection at most (headers must fit in it).
const HTTP1_MAX_BUF_SIZE: usize = 64 * 1024;

/// The connection timeouts of [`Limits`] the `conn` module enforces.
fn conn_timeouts(limits: &Limits) -> Timeouts {
    Timeouts {
        first_request: limits.first_request_timeout,
        idle: limits.idle_timeout,
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
    /// Benchmark floor (`bench/run.sh`): when set, connections are served by
    /// a separate handler that reads the body like `/mutate` (same listener,
    /// TLS, limits and budget) and answers these bytes without parsing. The
    /// review path never looks at it.
    pub floor_response: Option<Bytes>,
    budget: Budget,
    ready: AtomicBool,
}

impl State {
    /// New state; not ready until [`State::set_ready`].
    pub fn new(config: Arc<Config>, metrics: Metrics, limits: Limits) -> Self {
        Self {
            config,
            metrics,
            budget: Budget::new(limits.body_budget_bytes),
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

    /// Request body bytes reserved from [`Limits::body_budget_bytes`] now.
    pub fn body_bytes_in_flight(&self) -> usize {
        self.budget.in_use()
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

fn json(body: Bytes) -> Resp {
    let mut resp = Response::new(Full::new(body));
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

/// Counts and logs a refused request and builds its answer; a 503 says
/// `Retry-After: 1`, which client-go (and so the apiserver) honours by
/// retrying within the webhook's timeout.
fn refuse(
    state: &State,
    start: Instant,
    reason: &'static str,
    status: StatusCode,
    msg: impl Into<String>,
) -> Resp {
    state.metrics.error(
        reason,
        status.is_server_error(),
        start.elapsed().as_secs_f64(),
    );
    debug!(reason, status = status.as_u16(), "request refused");
    let mut resp = text(status, msg);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
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
        _ => other(req.uri().path(), req.method(), state),
    }
}

/// Everything but `/mutate`.
fn other(path: &str, method: &Method, state: &State) -> Resp {
    match (path, method) {
        ("/healthz", &Method::GET | &Method::HEAD) => text(StatusCode::OK, "ok"),
        ("/readyz", &Method::GET | &Method::HEAD) => {
            if state.is_ready() {
                text(StatusCode::OK, "ready")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready")
            }
        }
        ("/healthz" | "/readyz", _) => method_not_allowed("GET"),
        _ => {
            state.metrics.error("not-found", false, 0.0);
            text(
                StatusCode::NOT_FOUND,
                "not found; the webhook path is /mutate",
            )
        }
    }
}

/// Routes a request on a connection from the probe reserve: probes are
/// answered, anything else is asked to come back.
fn handle_reserve(req: &Request<Incoming>, state: &State) -> Resp {
    match req.uri().path() {
        "/healthz" | "/readyz" => other(req.uri().path(), req.method(), state),
        _ => refuse(
            state,
            Instant::now(),
            "connection-limit",
            StatusCode::SERVICE_UNAVAILABLE,
            "connection limit reached; retry",
        ),
    }
}

/// Routes a request in benchmark floor mode: `/mutate` reads the body under
/// the same limits and answers `floor` as is.
async fn handle_floor(req: Request<Incoming>, state: &State, floor: Bytes) -> Resp {
    match (req.uri().path(), req.method()) {
        ("/mutate", &Method::POST) => {
            let start = Instant::now();
            match read_body(req, state).await {
                Ok(_) => json(floor),
                Err(refusal) => refusal.answer(state, start),
            }
        }
        _ => handle(req, state).await,
    }
}

/// Why a `/mutate` request was refused before its review: turned into an
/// answer (and counted) by [`Refusal::answer`].
struct Refusal {
    reason: &'static str,
    status: StatusCode,
    msg: String,
}

impl Refusal {
    fn answer(self, state: &State, start: Instant) -> Resp {
        refuse(state, start, self.reason, self.status, self.msg)
    }
}

/// Checks the headers and reads the body of a `/mutate` request under the
/// size limit, the memory budget and the deadline. The reservation holds
/// the body's share of the budget until the answer is built.
async fn read_body<B>(req: Request<B>, state: &State) -> Result<(Bytes, Reservation<'_>), Refusal>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let limit = state.limits.max_body_bytes;
    let refuse = |reason, status, msg: String| {
        Err(Refusal {
            reason,
            status,
            msg,
        })
    };
    if !is_json(req.headers().get(header::CONTENT_TYPE)) {
        return refuse(
            "content-type",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json".into(),
        );
    }
    let too_large = || format!("request body exceeds {limit} bytes");
    let over_budget = || "too many request bodies in memory; retry".to_string();
    let declared = match req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        Some(n) if n > limit as u64 => {
            return refuse("body-too-large", StatusCode::PAYLOAD_TOO_LARGE, too_large());
        }
        declared => declared.map(|n| n as usize),
    };
    let Some(mut held) = state.budget.reserve(declared.unwrap_or(0)) else {
        return refuse(
            "body-budget",
            StatusCode::SERVICE_UNAVAILABLE,
            over_budget(),
        );
    };
    let time = deadline(req.uri().query(), &state.limits);
    let read = body::collect(req.into_body(), declared, limit, &mut held);
    match tokio::time::timeout(time, read).await {
        Ok(Ok(bytes)) => Ok((bytes, held)),
        Err(_) => refuse(
            "body-timeout",
            StatusCode::REQUEST_TIMEOUT,
            format!("request body not received within {time:?}"),
        ),
        Ok(Err(BodyError::TooLarge)) => {
            refuse("body-too-large", StatusCode::PAYLOAD_TOO_LARGE, too_large())
        }
        Ok(Err(BodyError::OverBudget)) => refuse(
            "body-budget",
            StatusCode::SERVICE_UNAVAILABLE,
            over_budget(),
        ),
        Ok(Err(BodyError::Read(e))) => refuse(
            "body-read",
            StatusCode::BAD_REQUEST,
            format!("cannot read request body: {e}"),
        ),
    }
}

async fn mutate<B>(req: Request<B>, state: &State) -> Resp
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let start = Instant::now();
    // `_held` keeps the body's share of the budget until the answer is built.
    let (bytes, _held) = match read_body(req, state).await {
        Ok(read) => read,
        Err(refusal) => return refusal.answer(state, start),
    };
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
                    state,
                    start,
                    "internal",
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error",
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
            json(Bytes::from(reviewed.body))
        }
        Err(e @ admission::ReviewError::Serialize(_)) => {
            warn!(error = %e, "cannot serialise a review response");
            refuse(
                state,
                start,
                "internal",
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
            )
        }
        Err(e) => refuse(
            state,
            start,
            "bad-request",
            StatusCode::BAD_REQUEST,
            e.to_string(),
        ),
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
/// duration such as `5s` or `1m30s`), between [`MIN_BODY_TIMEOUT`] and
/// [`Limits::max_body_timeout`]; the default when absent or unreadable.
fn deadline(query: Option<&str>, limits: &Limits) -> Duration {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("timeout="))
        .and_then(|v| crate::duration::parse(v).ok())
        .map_or(limits.body_timeout, |d| {
            d.clamp(
                MIN_BODY_TIMEOUT,
                limits.max_body_timeout.max(MIN_BODY_TIMEOUT),
            )
        })
}

/// The shortest body deadline a `?timeout=` can ask for: the apiserver
/// never sends less than a second (`timeoutSeconds` is 1-30), so `0s` or
/// `1ms` would only fail a review whose body is already on its way.
const MIN_BODY_TIMEOUT: Duration = Duration::from_secs(1);

/// The hyper connection builder for both listeners: timeouts from `limits`;
/// `keep_alive: false` makes HTTP/1.1 close after one request.
fn http_builder(limits: &Limits, keep_alive: bool) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(keep_alive)
        // Bounds what a connection's headers can hold in memory (hyper's
        // default is ~400 KB; a review's headers are a few hundred bytes).
        .max_buf_size(HTTP1_MAX_BUF_SIZE);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(limits.http2_keep_alive_interval)
        .keep_alive_timeout(limits.http2_keep_alive_timeout);
    builder
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves HTTP on `io` with `handler` until the connection ends or
/// [`conn::drive`] closes it, counting each request as activity.
async fn serve_http<I, F, Fut>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    activity: &Arc<Activity>,
    timeouts: Timeouts,
    shutdown: &CancellationToken,
    handler: F,
) -> (Closed, Result<(), BoxError>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    let tracked = activity.clone();
    let service = service_fn(move |req| {
        let in_flight = tracked.begin();
        let answer = handler(req);
        async move {
            let resp = answer.await;
            drop(in_flight);
            Ok::<_, Infallible>(resp)
        }
    });
    conn::drive(
        builder.serve_connection(io, service),
        activity,
        timeouts,
        shutdown,
    )
    .await
}

fn log_closed(peer: SocketAddr, listener: &'static str, closed: (Closed, Result<(), BoxError>)) {
    match closed {
        (Closed::Idle, _) => debug!(%peer, listener, "idle connection closed"),
        (_, Err(error)) => debug!(%peer, listener, %error, "connection ended with an error"),
        _ => {}
    }
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
    let builders = Arc::new([
        http_builder(&state.limits, true),
        http_builder(&state.limits, false),
    ]);
    let slots = Slots::new(state.limits.max_connections, state.limits.probe_connections);
    conn::accept_loop(
        &slots,
        &shutdown,
        || accept(&listener, "webhook"),
        |(tcp, peer): (TcpStream, SocketAddr), slot| {
            // Small frames (HTTP/2 WINDOW_UPDATE, short responses) must not
            // wait for a delayed ACK.
            let _ = tcp.set_nodelay(true);
            serve_tls(
                tcp,
                peer,
                slot,
                acceptor.clone(),
                state.clone(),
                builders.clone(),
                shutdown.clone(),
            )
        },
    )
    .await;
    drop(listener);
    info!("stopped accepting; draining in-flight requests");
    if !slots.drained(state.limits.drain_timeout).await {
        warn!("drain timeout reached; closing remaining connections");
    }
}

/// One webhook connection: handshake, then HTTP with the handler its slot
/// and the state call for.
async fn serve_tls(
    tcp: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    builders: Arc<[auto::Builder<TokioExecutor>; 2]>,
    shutdown: CancellationToken,
) {
    let handshake = tokio::time::timeout(state.limits.handshake_timeout, acceptor.accept(tcp));
    let stream = match handshake.await {
        Ok(Ok(s)) => s,
        Ok(Err(error)) => {
            debug!(%peer, %error, "tls handshake failed");
            state.metrics.tls_handshake_failed();
            return;
        }
        Err(_) => {
            debug!(%peer, "tls handshake timed out");
            state.metrics.tls_handshake_failed();
            return;
        }
    };
    let io = TokioIo::new(stream);
    let timeouts = conn_timeouts(&state.limits);
    let activity = Arc::new(Activity::new(slot.is_reserve()));
    let [regular, one_shot] = &*builders;
    let s = state.clone();
    let closed = if slot.is_reserve() {
        let handler = move |req: Request<Incoming>| {
            let resp = handle_reserve(&req, &s);
            async move { resp }
        };
        serve_http(one_shot, io, &activity, timeouts, &shutdown, handler).await
    } else if let Some(floor) = state.floor_response.clone() {
        let handler = move |req| {
            let (s, floor) = (s.clone(), floor.clone());
            async move { handle_floor(req, &s, floor).await }
        };
        serve_http(regular, io, &activity, timeouts, &shutdown, handler).await
    } else {
        let handler = move |req| {
            let s = s.clone();
            async move { handle(req, &s).await }
        };
        serve_http(regular, io, &activity, timeouts, &shutdown, handler).await
    };
    log_closed(peer, "webhook", closed);
    drop(slot);
}

/// Serves `GET /metrics` (Prometheus text format) on plain HTTP until
/// `shutdown`, with the default [`Limits`].
pub async fn serve_metrics(listener: TcpListener, registry: Registry, shutdown: CancellationToken) {
    serve_metrics_with(listener, registry, Limits::default(), shutdown).await;
}

/// Serves `GET /metrics` (Prometheus text format) on plain HTTP until
/// `shutdown`: at most [`Limits::metrics_max_connections`] connections,
/// with the webhook port's first-request, header and idle timeouts.
pub async fn serve_metrics_with(
    listener: TcpListener,
    registry: Registry,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let registry = Arc::new(registry);
    let builder = Arc::new(http_builder(&limits, true));
    let timeouts = conn_timeouts(&limits);
    let slots = Slots::new(limits.metrics_max_connections, 0);
    conn::accept_loop(
        &slots,
        &shutdown,
        || accept(&listener, "metrics"),
        |(tcp, peer): (TcpStream, SocketAddr), slot| {
            let (registry, builder, shutdown) =
                (registry.clone(), builder.clone(), shutdown.clone());
            async move {
                let activity = Arc::new(Activity::new(false));
                let handler = move |req: Request<Incoming>| {
                    let resp = metrics_response(&req, &registry);
                    async move { resp }
                };
                let io = TokioIo::new(tcp);
                let closed =
                    serve_http(&builder, io, &activity, timeouts, &shutdown, handler).await;
                log_closed(peer, "metrics", closed);
                drop(slot);
            }
        },
    )
    .await;
    drop(listener);
    slots.drained(limits.drain_timeout).await;
}

fn metrics_response(req: &Request<Incoming>, registry: &Registry) -> Resp {
    match (req.uri().path(), req.method()) {
        ("/metrics", &Method::GET) => {
            let mut r = Response::new(Full::new(Bytes::from(crate::metrics::encode(registry))));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        ("/metrics", _) => method_not_allowed("GET"),
        _ => text(StatusCode::NOT_FOUND, "not found; try /metrics"),
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
    fn deadline_is_taken_from_query_and_capped() {
        let l = Limits::default();
        assert_eq!(deadline(Some("timeout=5s"), &l), Duration::from_secs(5));
        assert_eq!(deadline(Some("a=b&timeout=2s"), &l), Duration::from_secs(2));
        assert_eq!(deadline(Some("timeout=1h"), &l), l.max_body_timeout);
        assert_eq!(deadline(Some("timeout=junk"), &l), l.body_timeout);
        assert_eq!(deadline(None, &l), l.body_timeout);
        // Crafted values (issue #12) are clamped or ignored, never a panic.
        let crafted = "timeout=10000000000000000000s10000000000000000000s";
        assert_eq!(deadline(Some(crafted), &l), l.body_timeout);
        let huge = "timeout=18446744073709551615s";
        assert_eq!(deadline(Some(huge), &l), l.max_body_timeout);
        assert_eq!(deadline(Some("timeout=-5s"), &l), l.body_timeout);
        // Too short to read a body in: the apiserver's minimum instead.
        assert_eq!(deadline(Some("timeout=0s"), &l), MIN_BODY_TIMEOUT);
        assert_eq!(deadline(Some("timeout=1ms"), &l), MIN_BODY_TIMEOUT);
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
