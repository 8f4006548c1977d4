//! Connection and memory limits against the real server (issue #12): silent
//! and idle connections are closed, busy ones are not; HTTP/2 peers that
//! stop answering pings are dropped; probes are answered while the
//! connection cap is reached; stalled bodies past the memory budget get a
//! fast 503 (HTTP/1.1 uploads, and HTTP/2 streams on one connection); the
//! metrics port has the same timeouts and a cap.
//!
//! Limits are set short (hundreds of milliseconds) and every "closed within"
//! check waits ten times longer, polling the socket rather than sleeping,
//! so a busy machine slows the tests down without failing them.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use canary_injector::config::Config;
use canary_injector::metrics;
use canary_injector::server::{self, Limits};
use common::{TestServer, fixture, read_response, start_with, still_serves, tls_connect};
use futures::StreamExt as _;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SHORT: Duration = Duration::from_millis(300);
/// Ten times [`SHORT`]: the bound every "closed within" check allows.
const BOUND: Duration = Duration::from_secs(3);
const LONG: Duration = Duration::from_secs(60);

/// Limits with every connection timeout long; tests shorten the one they test.
fn long_limits() -> Limits {
    Limits {
        first_request_timeout: LONG,
        idle_timeout: LONG,
        header_timeout: LONG,
        body_timeout: LONG,
        max_body_timeout: LONG,
        http2_keep_alive_interval: LONG,
        ..Limits::default()
    }
}

/// Reads until the peer closes; true when that happened within `limit`.
async fn closed_within(stream: &mut (impl AsyncRead + Unpin), limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A hyper client whose connection task can be watched: it ends when the
/// server closes the connection.
enum Sender<B> {
    H1(hyper::client::conn::http1::SendRequest<B>),
    H2(hyper::client::conn::http2::SendRequest<B>),
}

async fn connect<B>(server: &TestServer, http2: bool) -> (Sender<B>, JoinHandle<()>)
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let alpn: &[&[u8]] = if http2 { &[b"h2"] } else { &[b"http/1.1"] };
    let tls = tokio::time::timeout(BOUND, tls_connect(server.addr, &server.certs.ca_pem, alpn))
        .await
        .expect("connection accepted")
        .unwrap();
    let io = TokioIo::new(tls);
    if http2 {
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        (
            Sender::H2(send),
            tokio::spawn(async move {
                let _ = conn.await;
            }),
        )
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        (
            Sender::H1(send),
            tokio::spawn(async move {
                let _ = conn.await;
            }),
        )
    }
}

impl<B> Sender<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Sends `req` and reads the answer; panics when that takes over 10 s.
    async fn send(&mut self, req: Request<B>) -> http::Response<Bytes> {
        tokio::time::timeout(Duration::from_secs(10), self.exchange(req))
            .await
            .expect("answered within 10 s")
    }

    async fn exchange(&mut self, req: Request<B>) -> http::Response<Bytes> {
        let resp = match self {
            Sender::H1(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
            Sender::H2(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
        };
        let (parts, body) = resp.into_parts();
        http::Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    }
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn post(path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

#[tokio::test]
async fn silent_connection_after_the_handshake_is_closed() {
    let limits = Limits {
        first_request_timeout: SHORT,
        ..long_limits()
    };
    let server = start_with(Config::default(), limits).await;
    // No ALPN, HTTP/1.1, HTTP/2: the handshake completes, then nothing.
    for alpn in [&[][..], &[&b"http/1.1"[..]][..], &[&b"h2"[..]][..]] {
        let mut tls = tls_connect(server.addr, &server.certs.ca_pem, alpn)
            .await
            .unwrap();
        assert!(
            closed_within(&mut tls, BOUND).await,
            "silent connection (ALPN {alpn:?}) must be closed"
        );
    }
    // An HTTP/2 client that sends its preface and settings but no request.
    let (_send, conn) = connect::<Full<Bytes>>(&server, true).await;
    assert!(
        tokio::time::timeout(BOUND, conn).await.is_ok(),
        "HTTP/2 connection without a request must be closed"
    );
    still_serves(&server, true).await;
}

#[tokio::test]
async fn idle_connection_is_closed_after_its_last_request() {
    let limits = Limits {
        idle_timeout: SHORT,
        ..long_limits()
    };
    let server = start_with(Config::default(), limits).await;
    for http2 in [false, true] {
        let (mut c, conn) = connect(&server, http2).await;
        let r = c.send(post("/mutate", fixture("pod.review.json"))).await;
        assert_eq!(r.status(), 200);
        assert!(
            tokio::time::timeout(BOUND, conn).await.is_ok(),
            "idle connection (http2: {http2}) must be closed"
        );
    }
    // HTTP/1.1 waits for its next request at most the header timeout.
    let limits = Limits {
        header_timeout: SHORT,
        ..long_limits()
    };
    let server = start_with(Config::default(), limits).await;
    let (mut c, conn) = connect(&server, false).await;
    let r = c.send(post("/mutate", fixture("pod.review.json"))).await;
    assert_eq!(r.status(), 200);
    assert!(
        tokio::time::timeout(BOUND, conn).await.is_ok(),
        "kept-alive HTTP/1.1 connection must be closed after the header timeout"
    );
}

/// A request in flight keeps its connection: a body that takes several
/// idle periods to arrive is still answered (HTTP/1.1 and HTTP/2).
#[tokio::test]
async fn busy_connection_is_not_closed_for_idleness() {
    let limits = Limits {
        idle_timeout: SHORT,
        ..long_limits()
    };
    let server = start_with(Config::default(), limits).await;
    let body = fixture("pod.review.json").into_bytes();
    let half = body.len() / 2;
    for http2 in [false, true] {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Bytes>();
        let stream = StreamBody::new(rx.map(|b| Ok::<_, Infallible>(Frame::data(b))));
        let (mut c, _conn) = connect(&server, http2).await;
        let req = Request::post("/mutate")
            .header("host", "localhost")
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(stream)
            .unwrap();
        let rest = Bytes::copy_from_slice(&body[half..]);
        tx.unbounded_send(Bytes::copy_from_slice(&body[..half]))
            .unwrap();
        let finish = tokio::spawn(async move {
            tokio::time::sleep(SHORT * 5).await;
            tx.unbounded_send(rest).unwrap();
        });
        let r = c.send(req).await;
        assert_eq!(r.status(), 200, "http2: {http2}");
        finish.await.unwrap();
    }
}

/// HTTP/2 frames by hand: enough to open a stream and stop answering.
mod h2_raw {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const SETTINGS: u8 = 4;
    pub const PING: u8 = 6;
    pub const ACK: u8 = 1;
    pub const END_HEADERS: u8 = 4;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// HPACK for `POST /mutate`, JSON, `content-length: 100`: static-table
    /// entries and literals without indexing or Huffman coding.
    pub fn post_headers() -> Vec<u8> {
        let mut h = vec![0x83, 0x87]; // :method POST, :scheme https
        for (prefix, value) in [
            (&[0x04][..], &b"/mutate"[..]),                // :path
            (&[0x01][..], &b"localhost"[..]),              // :authority
            (&[0x0f, 0x10][..], &b"application/json"[..]), // content-type (31)
            (&[0x0f, 0x0d][..], &b"100"[..]),              // content-length (28)
        ] {
            h.extend_from_slice(prefix);
            h.push(value.len() as u8);
            h.extend_from_slice(value);
        }
        h
    }
}

#[tokio::test]
async fn http2_peer_that_stops_answering_pings_is_closed() {
    use h2_raw::*;
    let limits = Limits {
        http2_keep_alive_interval: SHORT,
        http2_keep_alive_timeout: SHORT,
        ..long_limits()
    };
    let server = start_with(Config::default(), limits).await;
    let mut tls = tls_connect(server.addr, &server.certs.ca_pem, &[b"h2"])
        .await
        .unwrap();
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, END_HEADERS, 1, &post_headers()));
    out.extend(frame(DATA, 0, 1, b"{"));
    tls.write_all(&out).await.unwrap();
    tls.flush().await.unwrap();
    // A request is in flight (its body stalls), so only the pings can tell
    // the peer is gone. Acknowledge settings, never pings.
    let mut pinged = false;
    let closed = tokio::time::timeout(BOUND * 2, async {
        let mut head = [0u8; 9];
        loop {
            if tls.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if tls.read_exact(&mut payload).await.is_err() {
                return;
            }
            match (head[3], head[4] & ACK) {
                (SETTINGS, 0) => {
                    let ack = frame(SETTINGS, ACK, 0, &[]);
                    if tls.write_all(&ack).await.is_err() {
                        return;
                    }
                }
                (PING, 0) => pinged = true,
                _ => {}
            }
        }
    })
    .await;
    assert!(pinged, "the server must ping");
    assert!(
        closed.is_ok(),
        "an unanswered ping must close the connection"
    );
    still_serves(&server, true).await;
}

/// Silent connections fill the cap; probes still get answers on reserve
/// connections (one request each), and reviews there get a retryable 503.
#[tokio::test]
async fn probes_are_answered_while_the_cap_is_reached() {
    let limits = Limits {
        max_connections: 2,
        probe_connections: 2,
        ..long_limits()
    };
    let server = start_with(Config::default(), limits).await;
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(
            tls_connect(server.addr, &server.certs.ca_pem, &[b"h2"])
                .await
                .unwrap(),
        );
    }
    for http2 in [false, true] {
        for path in ["/healthz", "/readyz"] {
            let (mut c, conn) = connect(&server, http2).await;
            let r = c.send(get(path)).await;
            assert_eq!(r.status(), 200, "{path} (http2: {http2})");
            assert!(
                tokio::time::timeout(BOUND, conn).await.is_ok(),
                "a reserve connection serves one request (http2: {http2})"
            );
        }
        let (mut c, _conn) = connect(&server, http2).await;
        let r = c.send(post("/mutate", fixture("pod.review.json"))).await;
        assert_eq!(r.status(), 503, "http2: {http2}");
        assert_eq!(r.headers()["retry-after"], "1");
    }
    let text = String::from_utf8(metrics::encode(&server.registry)).unwrap();
    assert!(
        text.contains(r#"canary_injector_errors_total{reason="connection-limit"} 2"#),
        "{text}"
    );
    // Once a regular slot frees up (the server has to notice the close
    // first: poll), reviews are served again.
    drop(silent.pop());
    let served = async {
        loop {
            let (mut c, _conn) = connect(&server, false).await;
            let r = c.send(post("/mutate", fixture("pod.review.json"))).await;
            if r.status() == 200 {
                return;
            }
            assert_eq!(r.status(), 503);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(BOUND, served)
        .await
        .expect("a freed slot serves reviews again");
}

/// Polls the body bytes the server holds until `done` says so; panics with
/// `what` after [`BOUND`].
async fn in_flight_until(server: &TestServer, done: impl Fn(usize) -> bool, what: &str) {
    let reached = async {
        while !done(server.state.body_bytes_in_flight()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(BOUND, reached).await.expect(what);
}

/// Writes the head and part of a body over HTTP/1.1, then stalls.
async fn stalled_upload(
    server: &TestServer,
    head: &str,
    part: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tls = tls_connect(server.addr, &server.certs.ca_pem, &[b"http/1.1"])
        .await
        .unwrap();
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(part).await.unwrap();
    tls.flush().await.unwrap();
    tls
}

#[tokio::test]
async fn stalled_bodies_past_the_budget_get_a_fast_503() {
    const KIB: usize = 1024;
    let limits = Limits {
        max_body_bytes: 400 * KIB,
        body_budget_bytes: 1024 * KIB,
        ..long_limits()
    };
    let server = start_with(Config::default(), limits).await;
    let declared = |n: usize| {
        format!(
            "POST /mutate?timeout=30s HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {n}\r\n\r\n"
        )
    };
    // Two uploads declare 400 KiB each and stall after 1 KiB: 800 KiB held.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(stalled_upload(&server, &declared(400 * KIB), &[b' '; KIB]).await);
    }
    // Poll until the server has reserved both.
    in_flight_until(
        &server,
        |held| held >= 800 * KIB,
        "both uploads reserved their declared length",
    )
    .await;

    // A third declared upload does not fit: refused before its body, long
    // before its 30 s deadline.
    let mut third = stalled_upload(&server, &declared(400 * KIB), &[b' '; KIB]).await;
    let resp = read_response(&mut third, BOUND).await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("retry-after: 1"),
        "{resp}"
    );

    // A chunked upload is refused as soon as its chunks pass the budget.
    let head = "POST /mutate?timeout=30s HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    let mut chunks = Vec::new();
    for _ in 0..300 {
        chunks.extend_from_slice(b"400\r\n");
        chunks.extend_from_slice(&[b' '; KIB]);
        chunks.extend_from_slice(b"\r\n");
    }
    let mut chunked = stalled_upload(&server, head, &chunks).await;
    let resp = read_response(&mut chunked, BOUND).await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");

    // Small reviews still fit beside the stalled uploads.
    still_serves(&server, true).await;

    // Closing the stalled uploads returns their share of the budget.
    drop(stalled);
    drop((third, chunked));
    in_flight_until(
        &server,
        |held| held == 0,
        "budget released when the uploads go away",
    )
    .await;
    let text = String::from_utf8(metrics::encode(&server.registry)).unwrap();
    assert!(
        text.contains(r#"canary_injector_errors_total{reason="body-budget"} 2"#),
        "{text}"
    );
}

/// The same budget over HTTP/2, the way the apiserver calls: many streams
/// on one connection. Two streams that declared 400 KiB and stalled hold
/// the budget; a third stream on the same connection is refused at once,
/// and the connection keeps serving small reviews.
#[tokio::test]
async fn stalled_http2_streams_past_the_budget_get_a_fast_503() {
    const KIB: usize = 1024;
    let limits = Limits {
        max_body_bytes: 400 * KIB,
        body_budget_bytes: 1024 * KIB,
        ..long_limits()
    };
    let server = start_with(Config::default(), limits).await;
    type Chunks = futures::channel::mpsc::UnboundedSender<Bytes>;
    type StreamedBody = StreamBody<
        futures::stream::Map<
            futures::channel::mpsc::UnboundedReceiver<Bytes>,
            fn(Bytes) -> Result<Frame<Bytes>, Infallible>,
        >,
    >;
    let (sender, _conn) = connect::<StreamedBody>(&server, true).await;
    let Sender::H2(h2) = sender else {
        unreachable!()
    };
    // A stream that declares `declared` bytes and sends 1 KiB of them.
    let open = |declared: usize| -> (Chunks, JoinHandle<http::Response<Bytes>>) {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Bytes>();
        let frame: fn(Bytes) -> Result<Frame<Bytes>, Infallible> = |b| Ok(Frame::data(b));
        let req = Request::post("/mutate?timeout=30s")
            .header("host", "localhost")
            .header("content-type", "application/json")
            .header("content-length", declared)
            .body(StreamBody::new(rx.map(frame)))
            .unwrap();
        tx.unbounded_send(Bytes::from(vec![b' '; KIB])).unwrap();
        let mut h2 = h2.clone();
        let answer = tokio::spawn(async move {
            h2.ready().await.unwrap();
            let resp = h2.send_request(req).await.unwrap();
            let (parts, body) = resp.into_parts();
            http::Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
        });
        (tx, answer)
    };
    let stalled = [open(400 * KIB), open(400 * KIB)];
    in_flight_until(
        &server,
        |held| held >= 800 * KIB,
        "both streams reserved their declared length",
    )
    .await;

    let (_third_tx, third) = open(400 * KIB);
    let resp = tokio::time::timeout(BOUND, third)
        .await
        .expect("refused long before the 30 s deadline")
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");

    // The same connection still answers a review that fits.
    let review = fixture("pod.review.json").into_bytes();
    let (tx, answer) = open(review.len() + KIB);
    let mut rest = review.clone();
    rest.resize(review.len(), b' ');
    // The first KiB sent was blanks: a review with leading whitespace.
    tx.unbounded_send(Bytes::from(rest)).unwrap();
    drop(tx);
    let resp = tokio::time::timeout(BOUND, answer)
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(resp.status(), 200, "{:?}", resp.body());

    // Ending the stalled streams returns their share.
    drop(stalled);
    in_flight_until(
        &server,
        |held| held == 0,
        "budget released when the streams end",
    )
    .await;
}

/// The metrics listener on an ephemeral port with `limits`.
async fn start_metrics(limits: Limits) -> (std::net::SocketAddr, CancellationToken) {
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let registry = metrics::new_registry();
    metrics::Metrics::register(&registry).unwrap();
    tokio::spawn(server::serve_metrics_with(
        listener,
        registry,
        limits,
        shutdown.clone(),
    ));
    (addr, shutdown)
}

async fn scrape(tcp: &mut tokio::net::TcpStream, limit: Duration) -> String {
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    read_response(tcp, limit).await
}

#[tokio::test]
async fn metrics_port_closes_silent_and_idle_connections() {
    let limits = Limits {
        first_request_timeout: SHORT,
        idle_timeout: SHORT,
        ..long_limits()
    };
    let (addr, shutdown) = start_metrics(limits).await;
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(&mut silent, BOUND).await,
        "silent metrics connection must be closed"
    );
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let resp = scrape(&mut idle, BOUND).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        closed_within(&mut idle, BOUND).await,
        "idle metrics connection must be closed"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn metrics_port_caps_connections() {
    let limits = Limits {
        metrics_max_connections: 2,
        ..long_limits()
    };
    let (addr, shutdown) = start_metrics(limits).await;
    let mut open = Vec::new();
    for _ in 0..2 {
        open.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // The kernel completes the third connection, but the server does not
    // accept it while two are open: its scrape is not answered.
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let resp = scrape(&mut third, Duration::from_millis(500)).await;
    assert!(resp.is_empty(), "{resp}");
    drop(open.pop());
    let resp = read_response(&mut third, BOUND).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    shutdown.cancel();
}
