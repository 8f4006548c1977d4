//! Shared test support: a real server on an ephemeral port with a generated
//! CA, and a TLS client that verifies that CA (HTTP/1.1 or HTTP/2 by ALPN).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use canary_injector::certs::Ca;
use canary_injector::config::Config;
use canary_injector::metrics::{self, Metrics};
use canary_injector::server::tls::{self, CertPaths, Resolver};
use canary_injector::server::{self, Limits, State};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::Registry;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA and a serving certificate for 127.0.0.1/localhost, on disk.
pub struct Certs {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub ca_pem: String,
    pub paths: CertPaths,
}

impl Certs {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("test CA", std::time::Duration::from_secs(3600)).unwrap();
        let paths = CertPaths {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
        };
        let me = Self {
            ca_pem: String::new(),
            dir,
            ca,
            paths,
        };
        let bundle = me.issue("localhost");
        Self {
            ca_pem: bundle.ca_cert_pem,
            ..me
        }
    }

    /// Issues a certificate with SANs `name` and 127.0.0.1 and writes it.
    pub fn issue(&self, name: &str) -> canary_injector::certs::Bundle {
        let b = self
            .ca
            .issue(
                &[name.to_string(), "127.0.0.1".to_string()],
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        std::fs::write(&self.paths.cert, &b.cert_pem).unwrap();
        std::fs::write(&self.paths.key, &b.key_pem).unwrap();
        b
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub certs: Certs,
    pub state: Arc<State>,
    pub registry: Registry,
    pub resolver: Arc<Resolver>,
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<()>,
}

pub async fn start(cfg: Config) -> TestServer {
    start_with(cfg, Limits::default()).await
}

pub async fn start_with(cfg: Config, limits: Limits) -> TestServer {
    start_full(
        cfg,
        limits,
        Arc::new(canary_injector::admission::no_cluster),
    )
    .await
}

/// A server whose bootstrap ConfigMap lookup is `lookup`.
pub async fn start_full(
    cfg: Config,
    limits: Limits,
    lookup: Arc<canary_injector::admission::ConfigMapLookup>,
) -> TestServer {
    let certs = Certs::new();
    let loaded = tls::load(&certs.paths, &provider()).unwrap();
    let resolver = Arc::new(Resolver::new(&loaded));
    let tls_config = tls::server_config(provider(), resolver.clone()).unwrap();
    let registry = metrics::new_registry();
    let metrics = Metrics::register(&registry).unwrap();
    let state = Arc::new(State::new(Arc::new(cfg), metrics, limits).with_configmaps(lookup));
    state.set_ready(true);
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(server::serve(
        listener,
        tls_config,
        state.clone(),
        shutdown.clone(),
    ));
    TestServer {
        addr,
        certs,
        state,
        registry,
        resolver,
        shutdown,
        handle,
    }
}

/// A server whose certificate is reloaded from `paths` every `interval`.
pub struct ReloadingServer {
    pub addr: SocketAddr,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
}

pub async fn start_reloading(paths: CertPaths, interval: std::time::Duration) -> ReloadingServer {
    let loaded = tls::load(&paths, &provider()).unwrap();
    let resolver = Arc::new(Resolver::new(&loaded));
    let registry = metrics::new_registry();
    let m = Metrics::register(&registry).unwrap();
    if let Some(t) = loaded.not_after {
        m.certificate_expiry.set(t);
    }
    let state = Arc::new(State::new(
        Arc::new(Config::default()),
        m.clone(),
        Limits::default(),
    ));
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let tls_config = tls::server_config(provider(), resolver.clone()).unwrap();
    tokio::spawn(server::serve(listener, tls_config, state, shutdown.clone()));
    let expiry = m.certificate_expiry.clone();
    tokio::spawn(
        tls::Reloader::new(paths, provider(), resolver, &loaded).run(
            interval,
            shutdown.clone(),
            move |t| expiry.set(t.unwrap_or_default()),
        ),
    );
    ReloadingServer {
        addr,
        metrics: m,
        shutdown,
    }
}

pub fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// A connected client, HTTP/1.1 or HTTP/2.
pub enum Client {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

pub async fn tls_connect(
    addr: SocketAddr,
    ca_pem: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    TlsConnector::from(client_config(ca_pem, alpn))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

impl Client {
    pub async fn connect(addr: SocketAddr, ca_pem: &str, http2: bool) -> Self {
        let alpn: &[&[u8]] = if http2 { &[b"h2"] } else { &[b"http/1.1"] };
        let tls = tls_connect(addr, ca_pem, alpn).await.expect("tls connect");
        let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let io = TokioIo::new(tls);
        if http2 {
            assert_eq!(negotiated.as_deref(), Some(&b"h2"[..]));
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            Client::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Client::H1(send)
        }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Response<Bytes> {
        self.try_send(req).await.unwrap()
    }

    /// Like [`Client::send`], but a transport error is returned, not a panic.
    pub async fn try_send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Bytes>, hyper::Error> {
        let resp = match self {
            Client::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Client::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await?.to_bytes();
        Ok(Response::from_parts(parts, bytes))
    }

    pub async fn post_json(&mut self, path: &str, body: impl Into<Bytes>) -> Response<Bytes> {
        let req = Request::post(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(body.into()))
            .unwrap();
        self.send(req).await
    }

    pub async fn get(&mut self, path: &str) -> Response<Bytes> {
        let req = Request::get(path)
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.send(req).await
    }
}

pub fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&fixture(name)).unwrap()
}

/// What an apiserver does with a response: decode the base64 JSON Patch and
/// apply it to the request's object. Checks the response envelope on the way.
pub fn apply_response(review: &Value, response: &Value) -> Value {
    assert_eq!(response["apiVersion"], review["apiVersion"]);
    assert_eq!(response["kind"], "AdmissionReview");
    let r = &response["response"];
    assert_eq!(r["uid"], review["request"]["uid"]);
    let mut object = review["request"]["object"].clone();
    match (r.get("patchType"), r.get("patch")) {
        (None, None) => {}
        (Some(t), Some(p)) => {
            assert_eq!(t, "JSONPatch");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(p.as_str().unwrap())
                .expect("patch is base64");
            let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("RFC 6902 patch");
            json_patch::patch(&mut object, &patch).expect("patch applies");
        }
        other => panic!("patchType and patch must come together: {other:?}"),
    }
    object
}

/// The same review with `object` replaced (to re-admit a patched object).
pub fn with_object(review: &Value, object: Value) -> Value {
    let mut r = review.clone();
    r["request"]["object"] = object;
    r
}

/// Reads an HTTP/1.1 answer (head and a body ending in a newline) until the
/// peer closes or `limit` passes; whatever arrived, as text.
pub async fn read_response(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: std::time::Duration,
) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.ends_with(b"\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// A well-behaved client gets a correct answer: a review over a new
/// connection, its patch applied, the pod labelled.
pub async fn still_serves(server: &TestServer, http2: bool) {
    let mut c = Client::connect(server.addr, &server.certs.ca_pem, http2).await;
    let review = fixture_json("pod.review.json");
    let r = c.post_json("/mutate", review.to_string()).await;
    assert_eq!(r.status(), 200);
    let out: Value = serde_json::from_slice(r.body()).unwrap();
    assert_eq!(
        apply_response(&review, &out)["metadata"]["labels"]["stage"],
        "normal"
    );
}
