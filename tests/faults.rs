//! Faults and hostile input against the real server: slow clients,
//! connection floods, non-TLS bytes, old TLS versions, huge and deeply nested
//! bodies, certificate rotation and shutdown under load, many concurrent
//! clients with mixed requests. Every test also checks that a well-behaved
//! client is still served.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use canary_injector::admission::{self, no_cluster};
use canary_injector::config::Config;
use canary_injector::server::Limits;
use common::{
    Certs, Client, TestServer, apply_response, fixture, fixture_json, provider, start_with,
    tls_connect,
};
use proptest::prelude::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A well-behaved client still gets a correct answer (over HTTP/2).
async fn still_serves(server: &TestServer) {
    common::still_serves(server, true).await;
}

#[tokio::test]
async fn header_trickle_is_cut_off_without_blocking_others() {
    let limits = Limits {
        header_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let server = start_with(Config::default(), limits).await;
    let mut slow = tls_connect(server.addr, &server.certs.ca_pem, &[b"http/1.1"])
        .await
        .unwrap();
    let started = Instant::now();
    let request = b"POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n";
    let mut closed = false;
    for byte in request.iter() {
        // One byte every 300 ms: far slower than the 1 s header budget allows.
        if slow.write_all(&[*byte]).await.is_err() || slow.flush().await.is_err() {
            closed = true;
            break;
        }
        still_serves_quickly(&server).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        if started.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    if !closed {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
        closed = read.is_ok();
    }
    assert!(closed, "a header trickle must be closed");
    assert!(started.elapsed() < Duration::from_secs(8));
}

async fn still_serves_quickly(server: &TestServer) {
    tokio::time::timeout(Duration::from_secs(5), still_serves(server))
        .await
        .expect("other clients are served while one trickles");
}

#[tokio::test]
async fn unfinished_body_gets_408_without_blocking_others() {
    let limits = Limits {
        body_timeout: Duration::from_millis(800),
        ..Limits::default()
    };
    let server = start_with(Config::default(), limits).await;
    let mut slow = tls_connect(server.addr, &server.certs.ca_pem, &[b"http/1.1"])
        .await
        .unwrap();
    slow.write_all(b"POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n{\"apiVersion\"")
        .await
        .unwrap();
    still_serves_quickly(&server).await;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("answer within the body budget")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"));
}

#[tokio::test]
async fn connection_cap_makes_extra_connections_wait() {
    let limits = Limits {
        max_connections: 2,
        probe_connections: 0,
        ..Limits::default()
    };
    let server = start_with(Config::default(), limits).await;
    let a = tls_connect(server.addr, &server.certs.ca_pem, &[b"h2"])
        .await
        .unwrap();
    let mut b = Client::connect(server.addr, &server.certs.ca_pem, true).await;
    // The third handshake waits: the server does not accept beyond the cap.
    let third = tokio::time::timeout(
        Duration::from_millis(700),
        tls_connect(server.addr, &server.certs.ca_pem, &[b"h2"]),
    )
    .await;
    assert!(
        third.is_err(),
        "third connection must wait while two are open"
    );
    // Connections already open are still served.
    assert_eq!(
        b.post_json("/mutate", fixture("pod.review.json"))
            .await
            .status(),
        200
    );
    drop(a);
    let third = tokio::time::timeout(
        Duration::from_secs(5),
        tls_connect(server.addr, &server.certs.ca_pem, &[b"h2"]),
    )
    .await;
    assert!(
        matches!(third, Ok(Ok(_))),
        "a freed slot admits the waiting connection"
    );
}

#[tokio::test]
async fn many_idle_connections_do_not_stop_service() {
    let server = start_with(Config::default(), Limits::default()).await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    still_serves_quickly(&server).await;
}

/// A ClientHello offering only TLS 1.`minor - 1` (0x0301 = TLS 1.0,
/// 0x0302 = TLS 1.1) and an old cipher suite.
fn old_client_hello(minor: u8) -> Vec<u8> {
    let mut hello = vec![0x03, minor]; // client_version
    hello.extend_from_slice(&[7u8; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&[0x00, 0x02, 0x00, 0x2f]); // TLS_RSA_WITH_AES_128_CBC_SHA
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null
    let mut handshake = vec![0x01, 0x00, 0x00, hello.len() as u8];
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, handshake.len() as u8];
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn garbage_plain_http_and_old_tls_are_refused_cleanly() {
    let server = start_with(Config::default(), Limits::default()).await;
    let inputs: Vec<Vec<u8>> = vec![
        b"POST /mutate HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}".to_vec(),
        old_client_hello(0x01),
        old_client_hello(0x02),
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
        vec![0x16, 0x03, 0x03, 0xff, 0xff],
    ];
    for input in inputs {
        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let _ = tcp.write_all(&input).await;
        let mut buf = vec![0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
        let n = read.expect("the server answers or closes").unwrap_or(0);
        // Either closed, or a TLS alert record (content type 21): never HTTP.
        assert!(n == 0 || buf[0] == 0x15, "unexpected reply {:?}", &buf[..n]);
        still_serves(&server).await;
    }
    // Counted as handshake failures, never as failing reviews: a scanner
    // does not trip the admission error alert.
    let scrape = |line: &str| {
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&server.registry.gather())
            .unwrap();
        text.lines().any(|l| l.starts_with(line))
    };
    assert!(scrape(
        r#"canary_injector_errors_total{reason="tls-handshake"} 5"#
    ));
    assert!(!scrape(
        r#"canary_injector_admission_reviews_total{kind="",operation="",outcome="invalid"}"#
    ));
}

#[tokio::test]
async fn unrequested_client_certificate_is_harmless() {
    let server = start_with(Config::default(), Limits::default()).await;
    let client_certs = Certs::new();
    let bundle = client_certs.issue("client.example");
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(server.certs.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(bundle.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(bundle.key_pem.as_bytes()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .expect("handshake succeeds; the server never asks for the certificate");
    drop(tls);
    still_serves(&server).await;
}

#[tokio::test]
async fn deeply_nested_json_is_refused_with_400() {
    let server = start_with(Config::default(), Limits::default()).await;
    let mut c = Client::connect(server.addr, &server.certs.ca_pem, false).await;
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    // Where a review field is expected, the nesting is refused with 400.
    for body in [
        deep.clone(),
        format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{deep}}}"#
        ),
        format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":{deep}}}}}"#
        ),
    ] {
        let r = c.post_json("/mutate", body).await;
        assert_eq!(r.status(), 400);
        let text = String::from_utf8_lossy(r.body()).into_owned();
        assert!(text.starts_with("malformed AdmissionReview"), "{text}");
    }
    // In a part of the object the webhook never reads (here the pod's
    // status) it is skipped without recursion and the pod is labelled.
    let review = fixture_json("pod.review.json");
    let body = fixture("pod.review.json").replacen(
        r#""status": {}"#,
        &format!(r#""status": {{"x": {deep}}}"#),
        1,
    );
    let r = c.post_json("/mutate", body).await;
    assert_eq!(r.status(), 200);
    let out: Value = serde_json::from_slice(r.body()).unwrap();
    assert_eq!(
        apply_response(&review, &out)["metadata"]["labels"]["stage"],
        "normal"
    );
    still_serves(&server).await;
}

#[tokio::test]
async fn huge_label_maps_and_a_3_mib_pod_get_correct_patches() {
    let server = start_with(Config::default(), Limits::default()).await;
    let mut c = Client::connect(server.addr, &server.certs.ca_pem, true).await;

    let mut review = fixture_json("pod.review.json");
    let labels: serde_json::Map<String, Value> = (0..20_000)
        .map(|i| (format!("example.com/label-{i}"), json!(format!("v{i}"))))
        .collect();
    review["request"]["object"]["metadata"]["labels"] = Value::Object(labels.clone());
    let r = c.post_json("/mutate", review.to_string()).await;
    assert_eq!(r.status(), 200);
    let out = apply_response(&review, &serde_json::from_slice(r.body()).unwrap());
    let got = out["metadata"]["labels"].as_object().unwrap();
    assert_eq!(got.len(), labels.len() + 1);
    assert_eq!(got["stage"], "normal");

    // A pod the size the apiserver allows (3 MiB), most of it one annotation.
    let mut review = fixture_json("canary-pod.v1beta1.review.json");
    review["request"]["object"]["metadata"]["annotations"]["example.com/blob"] =
        json!("x".repeat(3 * 1024 * 1024 - 8 * 1024));
    let body = review.to_string();
    assert!(body.len() > 3 * 1024 * 1024 - 16 * 1024);
    let r = c.post_json("/mutate", body).await;
    assert_eq!(r.status(), 200);
    let out = apply_response(&review, &serde_json::from_slice(r.body()).unwrap());
    assert_eq!(out["metadata"]["labels"]["canarytag"], "feature-login");
    assert_eq!(
        out["metadata"]["annotations"],
        review["request"]["object"]["metadata"]["annotations"]
    );
    still_serves(&server).await;
}

/// 64 clients x N mixed reviews (valid v1, valid v1beta1 with a per-request
/// tag, malformed, wrong version, oversized) against one server: each answer
/// belongs to its own request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_mixed_traffic_never_mixes_answers() {
    const CLIENTS: usize = 64;
    let per_client: usize = std::env::var("FAULTS_REQUESTS_PER_CLIENT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let limits = Limits {
        max_body_bytes: 64 * 1024,
        ..Limits::default()
    };
    let server = start_with(Config::default(), limits).await;
    let v1 = fixture_json("pod.review.json");
    let v1beta1 = fixture_json("canary-pod.v1beta1.review.json");
    let oversized = Bytes::from(format!(
        r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","pad":"{}"}}"#,
        " ".repeat(70 * 1024)
    ));
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let (addr, ca) = (server.addr, server.certs.ca_pem.clone());
        let (v1, v1beta1, oversized) = (v1.clone(), v1beta1.clone(), oversized.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr, &ca, client % 2 == 0).await;
            for i in 0..per_client {
                match i % 10 {
                    0..=3 => {
                        let mut review = v1.clone();
                        review["request"]["uid"] = json!(format!("{client}-{i}"));
                        let r = c.post_json("/mutate", review.to_string()).await;
                        assert_eq!(r.status(), 200);
                        let out: Value = serde_json::from_slice(r.body()).unwrap();
                        let patched = apply_response(&review, &out);
                        assert_eq!(patched["metadata"]["labels"]["stage"], "normal");
                    }
                    4..=6 => {
                        let mut review = v1beta1.clone();
                        let tag = format!("c{client}-r{i}");
                        review["request"]["uid"] = json!(format!("{client}-{i}"));
                        review["request"]["object"]["metadata"]["annotations"] =
                            json!({"canary-injector.io/tag": tag});
                        let r = c.post_json("/mutate", review.to_string()).await;
                        let out: Value = serde_json::from_slice(r.body()).unwrap();
                        assert_eq!(out["apiVersion"], "admission.k8s.io/v1beta1");
                        let patched = apply_response(&review, &out);
                        assert_eq!(patched["metadata"]["labels"]["canarytag"], tag.as_str());
                    }
                    7 => {
                        let r = c.post_json("/mutate", format!("{{\"broken\": {i}")).await;
                        assert_eq!(r.status(), 400);
                    }
                    8 => {
                        let mut review = v1.clone();
                        review["apiVersion"] = json!("admission.k8s.io/v9");
                        let r = c.post_json("/mutate", review.to_string()).await;
                        assert_eq!(r.status(), 400);
                    }
                    _ => {
                        let req = http::Request::post("/mutate")
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(oversized.clone()))
                            .unwrap();
                        match c.try_send(req).await {
                            Ok(r) => assert_eq!(r.status(), 413),
                            // HTTP/1.1: the server answers 413 from the
                            // declared length and closes without reading the
                            // body, so the client may hit the closed socket
                            // while still writing (Go's client reads the early
                            // answer; hyper's reports the write error).
                            Err(e) => assert!(client % 2 == 1, "HTTP/2 must get the 413: {e}"),
                        }
                        if client % 2 == 1 {
                            c = Client::connect(addr, &ca, false).await;
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    still_serves(&server).await;
}

/// Certificates rotate every 100 ms while clients keep opening connections:
/// no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load_fails_no_request() {
    let certs = Certs::new();
    let server = common::start_reloading(certs.paths.clone(), Duration::from_millis(20)).await;
    let addr = server.addr;

    let stop = CancellationToken::new();
    let mut clients = Vec::new();
    for i in 0..8 {
        let (ca, stop) = (certs.ca_pem.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut done = 0;
            while !stop.is_cancelled() {
                // A new connection each time, so each sees the current pair.
                let mut c = Client::connect(addr, &ca, i % 2 == 0).await;
                let r = c.post_json("/mutate", fixture("pod.review.json")).await;
                assert_eq!(r.status(), 200);
                done += 1;
            }
            done
        }));
    }
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Written in place (not atomically): the reloader must never serve
        // a half-written pair.
        certs.issue("localhost");
    }
    stop.cancel();
    let mut total = 0;
    for c in clients {
        total += c.await.expect("no request failed during rotation");
    }
    assert!(total > 10, "load actually ran ({total} requests)");
    server.shutdown.cancel();
}

/// Shutdown while many reviews are mid-body: every one of them is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_load_answers_every_accepted_request() {
    let server = start_with(Config::default(), Limits::default()).await;
    let body = fixture("pod.review.json");
    let half = body.len() / 2;
    let mut in_flight = Vec::new();
    for _ in 0..32 {
        let mut tls = tls_connect(server.addr, &server.certs.ca_pem, &[b"http/1.1"])
            .await
            .unwrap();
        let head = format!(
            "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.write_all(&body.as_bytes()[..half]).await.unwrap();
        tls.flush().await.unwrap();
        in_flight.push(tls);
    }
    // Let the server read every request's headers before it stops accepting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.shutdown.cancel();
    let mut answers = Vec::new();
    for mut tls in in_flight {
        let rest = body.as_bytes()[half..].to_vec();
        answers.push(tokio::spawn(async move {
            tls.write_all(&rest).await.unwrap();
            tls.flush().await.unwrap();
            let mut out = Vec::new();
            let mut chunk = [0u8; 8192];
            loop {
                let n = tls.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&chunk[..n]);
                if out.ends_with(b"}") {
                    break;
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        }));
    }
    for a in answers {
        let text = tokio::time::timeout(Duration::from_secs(10), a)
            .await
            .unwrap()
            .unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("JSONPatch"));
    }
    tokio::time::timeout(Duration::from_secs(10), server.handle)
        .await
        .expect("server finished draining")
        .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Arbitrary bytes never panic the review path.
    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = admission::review(&bytes, &Config::default(), &no_cluster);
    }

    /// Valid reviews with random byte edits never panic, and whatever is
    /// answered is a well-formed review response.
    #[test]
    fn mutated_reviews_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = fixture("istio-pod.review.json").into_bytes();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if let Ok(r) = admission::review(&bytes, &Config::default(), &no_cluster) {
            let out: Value = serde_json::from_slice(&r.body).unwrap();
            prop_assert_eq!(&out["kind"], "AdmissionReview");
            prop_assert!(out["response"]["allowed"].is_boolean());
        }
    }

    /// The bootstrap template scanner never panics on mutated templates.
    #[test]
    fn mutated_templates_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<char>()), 1..8)) {
        let mut chars: Vec<char> = fixture("bootstrap/istio-1.5.tmpl.json").chars().collect();
        for (at, c) in edits {
            let i = at.index(chars.len());
            chars[i] = c;
        }
        let text: String = chars.into_iter().collect();
        let _ = canary_injector::envoy_template::patch_template(&text, Default::default());
    }
}
