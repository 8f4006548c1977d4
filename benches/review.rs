//! The handler on its own: body bytes of a review -> parse -> decide ->
//! patch -> serialised response, as `/mutate` runs it after reading the body.
//!
//! `cargo bench --bench review`; the `server` group adds the route around it.

use std::hint::black_box;

use std::sync::Arc;

use bytes::Bytes;
use canary_injector::admission::{self, no_cluster};
use canary_injector::config::Config;
use canary_injector::metrics::{self, Metrics};
use canary_injector::mutate::{Availability, ClusterView, Version};
use canary_injector::server::{self, Limits, State};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::Request;
use http_body_util::Full;
use serde_json::{Value, json};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let cfg = Config::default();
    let istio = fixture("istio-pod.review.json").into_bytes();
    let mut group = c.benchmark_group("review");

    group.throughput(Throughput::Bytes(istio.len() as u64));
    group.bench_function("istio-pod (labels)", |b| {
        b.iter(|| admission::review(black_box(&istio), &cfg, &no_cluster).unwrap())
    });

    // The same review without indentation, as the apiserver sends it.
    let compact = serde_json::to_vec(&serde_json::from_slice::<Value>(&istio).unwrap()).unwrap();
    group.throughput(Throughput::Bytes(compact.len() as u64));
    group.bench_function("istio-pod compact (labels)", |b| {
        b.iter(|| admission::review(black_box(&compact), &cfg, &no_cluster).unwrap())
    });
    group.throughput(Throughput::Bytes(istio.len() as u64));

    // What the caches report in a 1.5 mesh set up for the template fix.
    let present = |_: &str| ClusterView {
        bootstrap_configmap: Availability::Present,
        injector_version: Some(Version { major: 1, minor: 5 }),
        mesh: Default::default(),
    };
    group.bench_function("istio-pod (labels + bootstrap mount)", |b| {
        b.iter(|| admission::review(black_box(&istio), &cfg, &present).unwrap())
    });

    let skip = fixture("kube-system-pod.review.json").into_bytes();
    group.throughput(Throughput::Bytes(skip.len() as u64));
    group.bench_function("kube-system pod (skipped)", |b| {
        b.iter(|| admission::review(black_box(&skip), &cfg, &no_cluster).unwrap())
    });

    let mut big: Value = serde_json::from_str(&fixture("canary-pod.v1beta1.review.json")).unwrap();
    big["request"]["object"]["metadata"]["annotations"]["example.com/blob"] =
        json!("x".repeat(3 * 1024 * 1024 - 8 * 1024));
    let big = serde_json::to_vec(&big).unwrap();
    group.throughput(Throughput::Bytes(big.len() as u64));
    group.sample_size(20);
    group.bench_function("3 MiB pod", |b| {
        b.iter(|| admission::review(black_box(&big), &cfg, &no_cluster).unwrap())
    });
    group.finish();
}

/// The `/mutate` route as the server runs it once the headers are in: the
/// header checks, reading the body (size limit, memory budget, deadline),
/// the review, metrics and the log event. The body comes from memory; a
/// current-thread runtime drives the future.
fn bench_handle(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let registry = metrics::new_registry();
    let metrics = Metrics::register(&registry).unwrap();
    let state = State::new(Arc::new(Config::default()), metrics, Limits::default());
    let istio = fixture("istio-pod.review.json");
    let compact = serde_json::to_vec(&serde_json::from_str::<Value>(&istio).unwrap()).unwrap();
    let body = Bytes::from(compact);
    let mut group = c.benchmark_group("server");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("handle /mutate, istio-pod compact", |b| {
        b.iter(|| {
            let req = Request::post("/mutate?timeout=10s")
                .header("content-type", "application/json")
                .header("content-length", body.len())
                .body(Full::new(body.clone()))
                .unwrap();
            let resp = rt.block_on(server::handle(req, &state));
            assert_eq!(resp.status(), 200);
        })
    });
    group.finish();
}

criterion_group!(benches, bench, bench_handle);
criterion_main!(benches);
