//! The routes controller's desired-state computation for 1,000 Services and
//! 10,000 pods (see `support/cluster.rs` for the shape):
//! - `plan all`: for every Service, its live tags from the index, its
//!   conflicts and the make-before-break plan (the pure functions);
//! - `desired all`: the final objects of every Service (what `routes -f`
//!   computes);
//! - `controller pass`: the controller's own pass over every Service in
//!   steady state (index reads, plan, no write; an API call would fail).
//!
//! `cargo bench --bench routes`

#[path = "support/cluster.rs"]
mod support;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use jiff::Timestamp;

use canary_injector::cluster::events::EventSink;
use canary_injector::config::Config;
use canary_injector::metrics::ControllerMetrics;
use canary_injector::routes::controller::{
    Apis, IstioApis, RouteError, RouteMetrics, Routes, RoutesSettings, RoutesWriter,
};
use canary_injector::routes::index::Index;
use canary_injector::routes::plan::{PlanInput, plan};
use canary_injector::routes::{ServiceRef, conflicts, desired};
use criterion::{Criterion, criterion_group, criterion_main};
use kube::api::{ApiResource, GroupVersionKind};

const SERVICES: usize = 1_000;
const PODS_PER_SERVICE: usize = 10;
const SHAPE: support::Shape = support::Shape {
    services: SERVICES,
    pods_per_service: PODS_PER_SERVICE,
};

fn index() -> Index {
    let cfg = Config::default();
    let mut index = Index::new(cfg.labels.clone(), cfg.namespaces.clone());
    support::fill(&mut index, SHAPE);
    index
}

fn bench(c: &mut Criterion) {
    let cfg = Config::default();
    let index = index();
    assert_eq!(index.pod_count(), SERVICES * PODS_PER_SERVICE);
    let keys: Vec<_> = index.services().cloned().collect();
    assert_eq!(keys.len(), SERVICES);
    let mut group = c.benchmark_group("routes");
    group.sample_size(30);

    let empty = BTreeMap::new();
    let now = Timestamp::now();
    group.bench_function("plan all (1,000 Services, 10,000 pods)", |b| {
        b.iter(|| {
            let mut steps = 0;
            for key in &keys {
                let entry = index.routed(key).unwrap();
                let service = ServiceRef {
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                    uid: entry.uid.clone(),
                };
                let live = index.live(key);
                assert!(conflicts(&service, index.rules_in(&key.0)).is_empty());
                let p = plan(&PlanInput {
                    service: &service,
                    header: &cfg.routes.header,
                    labels: &cfg.labels,
                    live: &live,
                    destination_rule: index.destination_rule(key),
                    virtual_service: index.virtual_service(key),
                    due: &empty,
                    now,
                    grace: Duration::from_secs(60),
                    settings: &Default::default(),
                });
                steps += usize::from(p.step.is_some());
            }
            assert_eq!(steps, 0, "steady state");
            black_box(steps)
        })
    });

    group.bench_function("desired all (1,000 Services, 10,000 pods)", |b| {
        b.iter(|| {
            for key in &keys {
                let service = ServiceRef {
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                    uid: None,
                };
                black_box(desired(
                    &service,
                    &cfg.routes.header,
                    &index.live(key),
                    &cfg.labels,
                    &Default::default(),
                ));
            }
        })
    });

    // The controller itself: a pass over every Service, nothing to write.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let (service, _handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    // Client::new spawns its buffer task: inside the runtime.
    let client = rt.block_on(async { kube::Client::new(service, "default") });
    let registry = prometheus::Registry::new();
    let writer = RoutesWriter {
        owners: Default::default(),
        clock: Default::default(),
        settings: RoutesSettings::from_config(&cfg).unwrap(),
        metrics: RouteMetrics::register(&registry).unwrap(),
        counters: ControllerMetrics::register(&registry)
            .unwrap()
            .controller("routes", &RouteError::REASONS),
        events: EventSink::disabled(),
    };
    let resource = |g: &str, v: &str, k: &str, p: &str| {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(g, v, k), p)
    };
    let apis = Apis {
        istio: Some(IstioApis {
            destination_rules: resource(
                "networking.istio.io",
                "v1",
                "DestinationRule",
                "destinationrules",
            ),
            virtual_services: resource(
                "networking.istio.io",
                "v1",
                "VirtualService",
                "virtualservices",
            ),
        }),
        gateway: None,
        endpoint_slices: resource("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
    };
    let mut routes = Routes::new(client, writer.clone(), apis);
    {
        let (index, _) = routes.index_mut();
        support::fill(index, SHAPE);
    }
    group.bench_function("controller pass (1,000 Services, 10,000 pods)", |b| {
        b.iter(|| {
            let (index, dirty) = routes.index_mut();
            dirty.extend(index.all_keys());
            rt.block_on(routes.process());
        })
    });
    assert_eq!(writer.counters.applies(), 0, "steady state writes nothing");
    assert_eq!(writer.metrics.services("routed"), SERVICES as i64);
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
