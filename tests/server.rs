//! The real server over real TLS: routing, every kind of bad request, and
//! isolation between requests.

mod common;

use std::time::Duration;

use bytes::Bytes;
use canary_injector::config::Config;
use canary_injector::server::Limits;
use common::{Client, apply_response, fixture, fixture_json, start, start_with, tls_connect};
use http::Request;
use http_body_util::Full;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn text(body: &Bytes) -> String {
    String::from_utf8_lossy(body).into_owned()
}

#[tokio::test]
async fn health_and_readiness_over_http1_and_http2() {
    let server = start(Config::default()).await;
    for http2 in [false, true] {
        let mut c = Client::connect(server.addr, &server.certs.ca_pem, http2).await;
        assert_eq!(c.get("/healthz").await.status(), 200);
        assert_eq!(c.get("/readyz").await.status(), 200);
    }
    server.state.set_ready(false);
    let mut c = Client::connect(server.addr, &server.certs.ca_pem, false).await;
    assert_eq!(c.get("/readyz").await.status(), 503);
    assert_eq!(
        c.get("/healthz").await.status(),
        200,
        "alive while not ready"
    );
}

#[tokio::test]
async fn client_that_does_not_trust_the_ca_is_refused() {
    let server = start(Config::default()).await;
    let other = common::Certs::new();
    let err = tls_connect(server.addr, &other.ca_pem, &[b"http/1.1"]).await;
    assert!(err.is_err(), "handshake must fail against an unknown CA");
}

#[tokio::test]
async fn wrong_path_method_and_content_type() {
    let server = start(Config::default()).await;
    let mut c = Client::connect(server.addr, &server.certs.ca_pem, false).await;

    let r = c.get("/nope").await;
    assert_eq!(r.status(), 404);

    let r = c.get("/mutate").await;
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");

    let req = Request::post("/mutate")
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(fixture("pod.review.json"))))
        .unwrap();
    let r = c.send(req).await;
    assert_eq!(r.status(), 415);
    assert!(text(r.body()).contains("application/json"));

    // The path alone routes; the query is the apiserver's deadline.
    let r = c
        .post_json("/mutate?timeout=10s", fixture("pod.review.json"))
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn malformed_reviews_get_400_with_the_reason() {
    let server = start(Config::default()).await;
    let mut c = Client::connect(server.addr, &server.certs.ca_pem, true).await;
    let cases: [(&str, &str); 5] = [
        ("{\"apiVersion\": ", "malformed AdmissionReview"),
        ("[1,2,3]", "malformed AdmissionReview"),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            "has no request",
        ),
        (
            r#"{"apiVersion":"admission.k8s.io/v2","kind":"AdmissionReview","request":{}}"#,
            "unsupported apiVersion \"admission.k8s.io/v2\"",
        ),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"Pod","request":{}}"#,
            "unsupported kind \"Pod\"",
        ),
    ];
    for (body, expected) in cases {
        let r = c.post_json("/mutate", body.to_string()).await;
        assert_eq!(r.status(), 400, "{body}");
        assert!(
            text(r.body()).contains(expected),
            "{body}: {}",
            text(r.body())
        );
    }
    // A request missing uid names the field.
    let r = c
        .post_json(
            "/mutate",
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"kind":{"kind":"Pod"},"operation":"CREATE"}}"#,
        )
        .await;
    assert_eq!(r.status(), 400);
    assert!(text(r.body()).contains("uid"), "{}", text(r.body()));
}

#[tokio::test]
async fn object_of_another_kind_is_denied_with_a_message() {
    let server = start(Config::default()).await;
    let mut c = Client::connect(server.addr, &server.certs.ca_pem, false).await;
    let mut review = fixture_json("pod.review.json");
    review["request"]["object"]["kind"] = "Service".into();
    let r = c.post_json("/mutate", review.to_string()).await;
    assert_eq!(r.status(), 200);
    let out: Value = serde_json::from_slice(r.body()).unwrap();
    assert_eq!(out["response"]["allowed"], false);
    assert_eq!(out["response"]["uid"], review["request"]["uid"]);
    assert!(out["response"].get("patch").is_none());
    assert!(
        out["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("does not match the request kind")
    );
}

#[tokio::test]
async fn unusable_tag_is_denied_naming_the_annotation() {
    let server = start(Config::default()).await;
    let mut c = Client::connect(server.addr, &server.certs.ca_pem, false).await;
    let mut review = fixture_json("pod.review.json");
    review["request"]["object"]["metadata"]["annotations"] =
        serde_json::json!({"canary-injector.io/tag": "#!/"});
    let out: Value =
        serde_json::from_slice(c.post_json("/mutate", review.to_string()).await.body()).unwrap();
    assert_eq!(out["response"]["allowed"], false);
    let msg = out["response"]["status"]["message"].as_str().unwrap();
    assert!(msg.contains("annotation canary-injector.io/tag"), "{msg}");
}

/// Sends raw bytes over TLS (HTTP/1.1) and reads what comes back within `wait`.
async fn raw_exchange(
    server: &common::TestServer,
    head: &[u8],
    body: &[u8],
    wait: Duration,
) -> String {
    let mut tls = tls_connect(server.addr, &server.certs.ca_pem, &[b"http/1.1"])
        .await
        .unwrap();
    tls.write_all(head).await.unwrap();
    tls.write_all(body).await.unwrap();
    tls.flush().await.unwrap();
    common::read_response(&mut tls, wait).await
}

#[tokio::test]
async fn oversized_declared_body_is_refused_before_it_is_sent() {
    let server = start(Config::default()).await;
    // Declares 100 MiB and sends 10 bytes: the answer must come at once,
    // without the server waiting for (or buffering) the rest.
    let head = b"POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 104857600\r\n\r\n";
    let resp = raw_exchange(&server, head, b"{\"a\": 1234", Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(resp.contains("exceeds 4194304 bytes"), "{resp}");
}

#[tokio::test]
async fn oversized_chunked_body_is_cut_off_at_the_limit() {
    let limits = Limits {
        max_body_bytes: 4096,
        ..Limits::default()
    };
    let server = start_with(Config::default(), limits).await;
    let head = b"POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    // 8 chunks of 1000 bytes, never terminated: the server must answer as
    // soon as the limit is crossed.
    let mut body = Vec::new();
    for _ in 0..8 {
        body.extend_from_slice(b"3e8\r\n");
        body.extend_from_slice(&[b' '; 1000]);
        body.extend_from_slice(b"\r\n");
    }
    let resp = raw_exchange(&server, head, &body, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
}

#[tokio::test]
async fn body_slower_than_the_deadline_gets_408() {
    let server = start(Config::default()).await;
    let head = b"POST /mutate?timeout=1s HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n";
    let resp = raw_exchange(&server, head, b"{", Duration::from_secs(10)).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
}

#[tokio::test]
async fn garbage_and_plain_http_do_not_disturb_other_clients() {
    let server = start(Config::default()).await;
    let mut good = Client::connect(server.addr, &server.certs.ca_pem, true).await;
    // Plain HTTP and random bytes to the TLS port.
    for junk in [
        &b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 1, 2][..],
    ] {
        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(junk).await.unwrap();
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
    }
    // A bad review on the same HTTP/2 connection as a good one.
    let bad = good.post_json("/mutate", "{not json").await;
    assert_eq!(bad.status(), 400);
    let ok = good.post_json("/mutate", fixture("pod.review.json")).await;
    assert_eq!(ok.status(), 200);
    let review = fixture_json("pod.review.json");
    let patched = apply_response(&review, &serde_json::from_slice(ok.body()).unwrap());
    assert_eq!(patched["metadata"]["labels"]["stage"], "normal");
}

#[tokio::test]
async fn concurrent_reviews_each_get_their_own_answer() {
    let server = start(Config::default()).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let addr = server.addr;
        let ca = server.certs.ca_pem.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr, &ca, i % 2 == 0).await;
            for j in 0..20 {
                let mut review = fixture_json("canary-pod.v1beta1.review.json");
                let uid = format!("uid-{i}-{j}");
                let tag = format!("t{i}x{j}");
                review["request"]["uid"] = uid.clone().into();
                review["request"]["object"]["metadata"]["annotations"] =
                    serde_json::json!({"canary-injector.io/tag": tag});
                if j % 5 == 0 {
                    assert_eq!(c.post_json("/mutate", "{}").await.status(), 400);
                }
                let r = c.post_json("/mutate", review.to_string()).await;
                let out: Value = serde_json::from_slice(r.body()).unwrap();
                let patched = apply_response(&review, &out);
                assert_eq!(patched["metadata"]["labels"]["canarytag"], tag.as_str());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn metrics_count_outcomes_and_refusals() {
    let server = start(Config::default()).await;
    let mut c = Client::connect(server.addr, &server.certs.ca_pem, false).await;
    c.post_json("/mutate", fixture("pod.review.json")).await;
    c.post_json("/mutate", fixture("kube-system-pod.review.json"))
        .await;
    c.post_json("/mutate", "nope").await;
    let text = String::from_utf8(canary_injector::metrics::encode(&server.registry)).unwrap();
    for line in [
        r#"canary_injector_admission_reviews_total{kind="Pod",operation="CREATE",outcome="patched"} 1"#,
        r#"canary_injector_admission_reviews_total{kind="Pod",operation="CREATE",outcome="skipped"} 1"#,
        r#"canary_injector_skips_total{reason="namespace"} 1"#,
        r#"canary_injector_errors_total{reason="bad-request"} 1"#,
        r#"canary_injector_mutations_total{type="labels"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
}

#[tokio::test]
async fn idle_connection_without_headers_is_closed() {
    let limits = Limits {
        header_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let server = start_with(Config::default(), limits).await;
    let mut tls = tls_connect(server.addr, &server.certs.ca_pem, &[b"http/1.1"])
        .await
        .unwrap();
    tls.write_all(b"POST /mutate HTTP/1.1\r\n").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "server must close a connection that never finishes its headers"
    );
}

/// `?timeout=` values an apiserver never sends (issue #12: overflowing sums
/// used to panic the connection task) are clamped or ignored: the review is
/// answered as usual.
#[tokio::test]
async fn crafted_timeouts_are_clamped_or_ignored() {
    let server = start(Config::default()).await;
    let review = fixture_json("pod.review.json");
    for http2 in [false, true] {
        let mut c = Client::connect(server.addr, &server.certs.ca_pem, http2).await;
        for timeout in [
            "10000000000000000000s10000000000000000000s",
            "18446744073709551615s999999999ns1ns",
            "99999999999999999999999999999999999999999h",
            "9223372036854775807h",
            "1e308s",
            "-1s",
            "NaNs",
            "0.0000000000000000000000000000000001s",
            "",
        ] {
            let r = c
                .post_json(&format!("/mutate?timeout={timeout}"), review.to_string())
                .await;
            assert_eq!(r.status(), 200, "timeout={timeout}");
            let out: Value = serde_json::from_slice(r.body()).unwrap();
            let patched = apply_response(&review, &out);
            assert_eq!(patched["metadata"]["labels"]["stage"], "normal");
        }
    }
}

/// Headers are held in a bounded buffer: 100 KB of them get 431, not memory.
#[tokio::test]
async fn oversized_headers_get_431() {
    let server = start(Config::default()).await;
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: localhost\r\nx-pad: {}\r\ncontent-type: application/json\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let resp = raw_exchange(&server, head.as_bytes(), b"", Duration::from_secs(10)).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
}

/// The benchmark floor (`--bench-floor-response`, bench/run.sh): `/mutate`
/// answers the given bytes after reading the body under the same limits;
/// the other routes are the usual ones.
#[tokio::test]
async fn floor_mode_answers_fixed_bytes_under_the_same_limits() {
    use canary_injector::server::{self, State, tls};
    use std::sync::Arc;
    let certs = common::Certs::new();
    let loaded = tls::load(&certs.paths, &common::provider()).unwrap();
    let resolver = Arc::new(tls::Resolver::new(&loaded));
    let tls_config = tls::server_config(common::provider(), resolver).unwrap();
    let registry = canary_injector::metrics::new_registry();
    let metrics = canary_injector::metrics::Metrics::register(&registry).unwrap();
    let limits = Limits {
        max_body_bytes: 64 * 1024,
        ..Limits::default()
    };
    let mut state = State::new(Arc::new(Config::default()), metrics, limits);
    state.floor_response = Some(Bytes::from_static(b"{\"floor\":true}"));
    state.set_ready(true);
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(server::serve(
        listener,
        tls_config,
        Arc::new(state),
        shutdown.clone(),
    ));
    for http2 in [false, true] {
        let mut c = Client::connect(addr, &certs.ca_pem, http2).await;
        assert_eq!(c.get("/readyz").await.status(), 200);
        let r = c.post_json("/mutate", fixture("pod.review.json")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(&r.body()[..], b"{\"floor\":true}");
        // Last: HTTP/1.1 closes a connection whose body was not read.
        let r = c.post_json("/mutate", vec![b' '; 70 * 1024]).await;
        assert_eq!(r.status(), 413);
    }
    shutdown.cancel();
}
