//! The controller against the shared apiserver model
//! ([`FakeApiServer`]): discovery, lists, watches
//! that deliver every change (with the label selector applied, as the real
//! one does), creates, server-side applies and deletes with their
//! preconditions, and Events. Lists and watches of Namespaces, Services and
//! pods must ask for metadata only (the `Accept` header of
//! `PartialObjectMetadataList` / `PartialObjectMetadata`) and get only
//! metadata back, as from the real apiserver; a full read of them fails the
//! test at [`Running::stop`]. Time is tokio's paused clock, so grace
//! periods and resyncs pass instantly and the order of writes is exact.

use http::Method;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::*;
use crate::cluster::events::{self, EventMetrics, Pace, Recorder, Reporter};
use crate::metrics::ControllerMetrics;
use crate::testing::{FakeApiServer, Hook, METADATA_ACCEPT, METADATA_LIST_ACCEPT, Seen};

const SHOP: &str = "/api/v1/namespaces/shop";
const SERVICE: &str = "/api/v1/namespaces/shop/services/checkout";
const SLICE: &str = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/checkout-abc12";
const GRAY_POD: &str = "/api/v1/namespaces/shop/pods/checkout-gray-7d9f-x1";
const DR: &str = "/apis/networking.istio.io/v1/namespaces/shop/destinationrules/checkout";
const VS: &str = "/apis/networking.istio.io/v1/namespaces/shop/virtualservices/checkout";
const DR_COLLECTION: &str = "/apis/networking.istio.io/v1/namespaces/shop/destinationrules";
const VS_COLLECTION: &str = "/apis/networking.istio.io/v1/namespaces/shop/virtualservices";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";
const SERVICE_UID: &str = "0b5c3e6a-1111-4222-8333-944445555666";
const GRACE: Duration = Duration::from_secs(60);

/// The collections the controller reads metadata of, and only metadata.
const METADATA_ONLY: [&str; 3] = ["/api/v1/namespaces", "/api/v1/services", "/api/v1/pods"];

// === the apiserver model ===

/// The cluster: the shared apiserver model ([`FakeApiServer`]) with
/// Istio's group (1.22+ serves all three versions) and `discovery.k8s.io`
/// declared, and Namespaces, Services and pods readable as metadata only.
#[derive(Clone)]
struct Apiserver(FakeApiServer);

const ISTIO: &str = "networking.istio.io";
/// What Istio 1.22+ serves, preferred first.
const ISTIO_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];
const ISTIO_RESOURCES: [(&str, &str); 2] = [
    ("destinationrules", "DestinationRule"),
    ("virtualservices", "VirtualService"),
];

impl Apiserver {
    fn new(objects: &[(&str, Value)]) -> Self {
        let fake = FakeApiServer::with(objects);
        fake.serve_group(ISTIO, &ISTIO_VERSIONS, &ISTIO_RESOURCES);
        fake.serve_group(
            "discovery.k8s.io",
            &["v1"],
            &[("endpointslices", "EndpointSlice")],
        );
        fake.require_metadata_only(&METADATA_ONLY);
        Self(fake)
    }

    /// Istio installed (all three versions) or not.
    fn with_istio(&self, served: bool) {
        let versions: &[&str] = if served { &ISTIO_VERSIONS } else { &[] };
        self.with_istio_versions(versions);
    }

    /// Serves only these `networking.istio.io` versions, preferred first
    /// (Istio 1.5-1.21: `v1beta1`, `v1alpha3`).
    fn with_istio_versions(&self, versions: &[&str]) {
        self.0.serve_group(ISTIO, versions, &ISTIO_RESOURCES);
    }

    /// Another actor writes `object` at `path` (kubelet, a user).
    fn put(&self, path: &str, object: Value) {
        self.0.put(path, object);
    }

    /// Another actor deletes the object at `path`.
    fn delete(&self, path: &str) {
        self.0.delete(path);
    }

    fn get(&self, path: &str) -> Option<Value> {
        self.0.get(path)
    }

    fn fail_once(&self, method: Method, path: &str, code: u16) {
        self.0.hook(method, path, Hook::Fail(code));
    }

    /// Someone else changes the object at `path` just before our next
    /// apply to it.
    fn touch_before_next_apply(&self, path: &str) {
        self.0.hook(Method::PATCH, path, Hook::Touch);
    }

    fn seen(&self) -> Vec<Seen> {
        self.0.seen()
    }

    /// Writes to DestinationRules and VirtualServices, in order.
    fn writes(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|c| c.is_write() && c.path.contains(ISTIO))
            .collect()
    }

    fn write_lines(&self) -> Vec<String> {
        self.writes().iter().map(Seen::line).collect()
    }

    /// Events posted, as (reason, type, regarding name).
    fn events(&self) -> Vec<(String, String, String)> {
        self.seen()
            .into_iter()
            .filter(|c| c.method == Method::POST && c.path == EVENTS)
            .map(|c| {
                let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
                (
                    s(&c.body["reason"]),
                    s(&c.body["type"]),
                    s(&c.body["regarding"]["name"]),
                )
            })
            .collect()
    }

    fn serve(&self) -> (Client, JoinHandle<()>) {
        self.0.client()
    }
}

// === fixtures ===

fn namespace() -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": "shop", "labels": {"canary-injection": "enabled"}}})
}

fn service(annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "checkout", "namespace": "shop", "uid": SERVICE_UID, "annotations": annotations},
           "spec": {"selector": {"app": "checkout"}, "ports": [{"name": "http", "port": 80}]}})
}

fn routed() -> Value {
    service(json!({"canary-injector.io/routes": "true"}))
}

fn pod(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "shop", "labels": labels},
           "spec": {"containers": [{"name": "app", "image": "checkout"}]}})
}

fn gray_pod() -> Value {
    pod(
        "checkout-gray-7d9f-x1",
        json!({"app": "checkout", "canarytag": "feature-login", "stage": "gray"}),
    )
}

/// The Service's slice: a normal pod (ready) and the gray one.
fn slice(gray_ready: bool) -> Value {
    slice_of(true, gray_ready)
}

/// The Service's slice, the normal pod ready or not.
fn slice_of(normal_ready: bool, gray_ready: bool) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "checkout-abc12", "namespace": "shop",
                        "labels": {"kubernetes.io/service-name": "checkout"}},
           "addressType": "IPv4",
           "endpoints": [
               {"addresses": ["10.0.0.5"], "conditions": {"ready": normal_ready},
                "targetRef": {"kind": "Pod", "name": "checkout-7c6d-a1", "namespace": "shop"}},
               {"addresses": ["10.0.0.9"], "conditions": {"ready": gray_ready, "serving": gray_ready},
                "targetRef": {"kind": "Pod", "name": "checkout-gray-7d9f-x1", "namespace": "shop"}},
           ],
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

fn cluster(gray_ready: bool) -> Apiserver {
    Apiserver::new(&[
        (SHOP, namespace()),
        (SERVICE, routed()),
        (
            "/api/v1/namespaces/shop/pods/checkout-7c6d-a1",
            pod(
                "checkout-7c6d-a1",
                json!({"app": "checkout", "stage": "normal"}),
            ),
        ),
        (GRAY_POD, gray_pod()),
        (SLICE, slice(gray_ready)),
    ])
}

struct Running {
    api: Apiserver,
    metrics: RouteMetrics,
    counters: ControllerCounters,
    term: CancellationToken,
    task: JoinHandle<()>,
    _served: JoinHandle<()>,
}

/// Starts the controller (leading) against `api`, with Events published
/// through the recorder to the same apiserver.
fn start(api: &Apiserver) -> Running {
    start_with_clock(api, Clock::new())
}

/// [`start`], reading wall-clock time off `clock` (replicas share the wall
/// clock: a test that restarts the controller passes the same one).
fn start_with_clock(api: &Apiserver, clock: Clock) -> Running {
    let (client, served) = api.serve();
    let registry = Registry::new();
    let metrics = RouteMetrics::register(&registry).unwrap();
    let counters = ControllerMetrics::register(&registry)
        .unwrap()
        .controller(CONTROLLER, &RouteError::REASONS);
    let event_metrics = EventMetrics::register(&registry).unwrap();
    let (sink, queue) = EventSink::channel(64, event_metrics.clone());
    let term = CancellationToken::new();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "canary-injector".into(),
            instance: Some("canary-injector-0".into()),
        },
    );
    tokio::spawn(events::publish(
        queue,
        recorder,
        Pace::default(),
        event_metrics,
        term.clone(),
    ));
    let mut cfg = Config::default();
    cfg.routes.removal_grace_seconds = GRACE.as_secs() as u32;
    let writer = RoutesWriter {
        owners: Default::default(),
        clock,
        settings: RoutesSettings::from_config(&cfg).unwrap(),
        metrics: metrics.clone(),
        counters: counters.clone(),
        events: sink,
    };
    let task = tokio::spawn(run(client, writer, term.clone()));
    Running {
        api: api.clone(),
        metrics,
        counters,
        term,
        task,
        _served: served,
    }
}

impl Running {
    /// Waits (virtual time) until `check` holds.
    async fn until(&self, what: &str, check: impl Fn(&Apiserver) -> bool) {
        for _ in 0..2000 {
            if check(&self.api) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "timed out waiting for {what}; writes: {:#?}",
            self.api.write_lines()
        );
    }

    /// Lets (virtual) time pass.
    async fn idle(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    /// Ends the term; fails if any list or watch of Namespaces, Services or
    /// pods asked for whole objects, or an update was not a forced apply
    /// of our field manager.
    async fn stop(self) {
        self.term.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("stops when the term ends")
            .unwrap();
        for w in self.api.writes() {
            if w.method == Method::PATCH {
                assert_eq!(
                    w.content_type,
                    "application/apply-patch+yaml",
                    "{}",
                    w.line()
                );
                assert_eq!(
                    w.query.get("fieldManager").map(String::as_str),
                    Some(FIELD_MANAGER)
                );
                assert_eq!(w.query.get("force").map(String::as_str), Some("true"));
            }
        }
        let full = self.api.0.full_reads();
        assert_eq!(
            full,
            Vec::<String>::new(),
            "metadata-only reads asked for whole objects"
        );
    }
}

fn desired_dr(tags: &[(&str, &str)]) -> Value {
    let mut subsets = vec![json!({"name": "normal", "labels": {"stage": "normal"}})];
    for (tag, name) in tags {
        subsets.push(json!({"name": name, "labels": {"canarytag": tag, "stage": "gray"}}));
    }
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "checkout", "namespace": "shop",
                     "labels": {"app.kubernetes.io/managed-by": "canary-injector"},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "checkout", "uid": SERVICE_UID}]},
        "spec": {"host": "checkout", "subsets": subsets},
    })
}

fn desired_vs(header: &str, tags: &[(&str, &str)]) -> Value {
    desired_vs_to(header, tags, true)
}

/// The VirtualService, its default route to `normal` or (`normal` false)
/// to the Service host.
fn desired_vs_to(header: &str, tags: &[(&str, &str)], normal: bool) -> Value {
    let to = |s: &str| json!([{"destination": {"host": "checkout", "subset": s}}]);
    let mut http = Vec::new();
    for (tag, name) in tags {
        http.push(json!({"name": name, "match": [{"headers": {header: {"exact": tag}}}], "route": to(name)}));
    }
    if normal {
        http.push(json!({"name": "normal", "route": to("normal")}));
    } else {
        http.push(json!({"route": [{"destination": {"host": "checkout"}}]}));
    }
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "checkout", "namespace": "shop",
                     "labels": {"app.kubernetes.io/managed-by": "canary-injector"},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "checkout", "uid": SERVICE_UID}]},
        "spec": {"hosts": ["checkout"], "http": http},
    })
}

fn without_version(mut v: Value) -> Value {
    if let Some(m) = v["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    v
}

// === tests ===

#[tokio::test(start_paused = true)]
async fn a_new_canary_gets_its_subset_then_its_route_and_steady_state_writes_nothing() {
    let api = cluster(false);
    let r = start(&api);
    // The gray pod is not ready: routes to normal only.
    r.until("both objects", |a| a.writes().len() == 2).await;
    let writes = api.writes();
    assert_eq!(
        api.write_lines(),
        [
            format!("POST {DR_COLLECTION}"),
            format!("POST {VS_COLLECTION}")
        ]
    );
    assert_eq!(
        writes[0].query.get("fieldManager").map(String::as_str),
        Some(FIELD_MANAGER)
    );
    assert_eq!(writes[0].body, desired_dr(&[]));
    assert_eq!(writes[1].body, desired_vs("x-canary-tag", &[]));

    // It turns ready: the subset first, then the route, each an apply over
    // the version read.
    let dr_version = api.get(DR).unwrap()["metadata"]["resourceVersion"].clone();
    api.put(SLICE, slice(true));
    r.until("the route", |a| a.writes().len() == 4).await;
    let writes = api.writes();
    assert_eq!(
        api.write_lines()[2..],
        [format!("PATCH {DR}"), format!("PATCH {VS}")]
    );
    let mut applied = desired_dr(&[("feature-login", "feature-login")]);
    applied["metadata"]["resourceVersion"] = dr_version;
    assert_eq!(writes[2].body, applied);
    assert_eq!(
        without_version(writes[3].body.clone()),
        desired_vs("x-canary-tag", &[("feature-login", "feature-login")])
    );

    // Steady state, through a resync and a relisting: no writes.
    r.idle(RESYNC * 2).await;
    assert_eq!(api.writes().len(), 4, "{:#?}", api.write_lines());
    assert_eq!(r.metrics.services("routed"), 1);
    assert_eq!(r.metrics.changes("route-added"), 1);
    assert_eq!(r.metrics.changes("subset-added"), 1);
    assert_eq!(r.metrics.crds_present.get(), 1);
    assert_eq!(r.counters.applies(), 4);
    r.until("the event", |a| !a.events().is_empty()).await;
    assert_eq!(
        api.events(),
        [(
            "RouteAdded".to_owned(),
            "Normal".to_owned(),
            "checkout".to_owned()
        )]
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn namespaces_services_and_pods_are_read_as_metadata_only() {
    let api = cluster(true);
    let r = start(&api);
    r.until("converged", |a| a.writes().len() == 2).await;
    // Routed from metadata alone: the model answered PartialObjectMetadata.
    assert_eq!(
        api.get(VS).unwrap()["spec"],
        desired_vs("x-canary-tag", &[("feature-login", "feature-login")])["spec"]
    );
    let seen = api.seen();
    for collection in METADATA_ONLY {
        let reads: Vec<(bool, &str)> = seen
            .iter()
            .filter(|c| c.method == Method::GET && c.path == collection)
            .map(|c| (c.query.contains_key("watch"), c.accept.as_str()))
            .collect();
        assert!(
            reads.contains(&(false, METADATA_LIST_ACCEPT)),
            "{collection}: {reads:?}"
        );
        assert!(
            reads.contains(&(true, METADATA_ACCEPT)),
            "{collection}: {reads:?}"
        );
    }
    // EndpointSlices are read whole: readiness and pods are in the body.
    assert!(
        seen.iter()
            .filter(|c| c.path == "/apis/discovery.k8s.io/v1/endpointslices")
            .all(|c| !c.accept.contains("PartialObjectMetadata"))
    );
    // Later changes come through the metadata watch too.
    api.put(SLICE, slice(false));
    r.until("the route removal", |a| a.writes().len() >= 3)
        .await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_canary_that_goes_away_loses_its_route_then_after_the_grace_its_subset() {
    let api = cluster(true);
    let r = start(&api);
    r.until("converged", |a| a.writes().len() == 2).await;
    assert_eq!(
        api.get(DR).unwrap()["spec"],
        desired_dr(&[("feature-login", "feature-login")])["spec"]
    );
    // The gray pod stops being ready: the route goes at once, then the
    // DestinationRule records when its subset may go.
    api.put(SLICE, slice(false));
    r.until("the route removal", |a| a.writes().len() == 4)
        .await;
    let removed_at = api.writes()[2].at;
    assert_eq!(
        api.write_lines()[2..],
        [format!("PATCH {VS}"), format!("PATCH {DR}")]
    );
    assert_eq!(
        api.get(VS).unwrap()["spec"],
        desired_vs("x-canary-tag", &[])["spec"]
    );
    let due: BTreeMap<String, String> = serde_json::from_str(
        api.get(DR).unwrap()["metadata"]["annotations"]["canary-injector.io/removal-due"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(due.keys().collect::<Vec<_>>(), ["feature-login"]);
    r.until("the subset removal", |a| a.writes().len() == 5)
        .await;
    let w = &api.writes()[4];
    assert_eq!(w.line(), format!("PATCH {DR}"));
    assert!(
        w.at - removed_at >= GRACE,
        "subset kept for the grace period"
    );
    assert!(w.at - removed_at < GRACE + Duration::from_secs(2));
    assert_eq!(api.get(DR).unwrap()["spec"], desired_dr(&[])["spec"]);
    r.idle(RESYNC).await;
    assert_eq!(api.writes().len(), 5, "{:#?}", api.write_lines());
    assert_eq!(r.metrics.changes("route-removed"), 1);
    assert_eq!(r.metrics.changes("subset-removed"), 1);
    r.until("events", |a| a.events().len() == 2).await;
    assert_eq!(api.events()[1].0, "RouteRemoved");
    r.stop().await;
}

/// The removal time is on the DestinationRule: a new leader (or the same
/// one after a restart) removes the subset when it was due, not a whole
/// grace period after it took over.
#[tokio::test(start_paused = true)]
async fn the_grace_survives_a_change_of_leader() {
    let api = cluster(true);
    let clock = Clock::new();
    let r = start_with_clock(&api, clock);
    r.until("converged", |a| a.writes().len() == 2).await;
    api.put(SLICE, slice(false));
    r.until("the route removal", |a| a.writes().len() == 4)
        .await;
    let removed_at = api.writes()[2].at;
    r.idle(GRACE / 2).await;
    r.stop().await;
    // Another replica leads from now on.
    let r = start_with_clock(&api, clock);
    r.until("the subset removal", |a| a.writes().len() == 5)
        .await;
    let w = &api.writes()[4];
    assert_eq!(w.line(), format!("PATCH {DR}"));
    assert!(w.at - removed_at >= GRACE);
    assert!(
        w.at - removed_at < GRACE + Duration::from_secs(2),
        "due when the first leader said, not a grace after the second took over"
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_default_route_goes_to_normal_only_while_a_normal_pod_is_ready() {
    // The normal pod predates the opt-in: ready, but not labelled stage=normal.
    let api = cluster(true);
    let normal_pod = "/api/v1/namespaces/shop/pods/checkout-7c6d-a1";
    api.put(
        normal_pod,
        pod("checkout-7c6d-a1", json!({"app": "checkout"})),
    );
    let r = start(&api);
    r.until("both objects", |a| a.writes().len() == 2).await;
    let writes = api.writes();
    assert_eq!(
        api.write_lines(),
        [
            format!("POST {DR_COLLECTION}"),
            format!("POST {VS_COLLECTION}")
        ]
    );
    // The subset normal is there (nothing routes to it); header-less
    // requests go to every ready endpoint, as before the VirtualService.
    let login = [("feature-login", "feature-login")];
    assert_eq!(writes[0].body, desired_dr(&login));
    assert_eq!(writes[1].body, desired_vs_to("x-canary-tag", &login, false));
    r.until("the events", |a| a.events().len() == 2).await;
    assert_eq!(
        api.events()[1],
        (
            "RouteNoNormalPod".to_owned(),
            "Warning".to_owned(),
            "checkout".to_owned()
        )
    );
    assert_eq!(r.metrics.services("without-normal"), 1);
    assert_eq!(r.metrics.services("routed"), 0);

    // The backfill labels it: the subset exists already, so one write, the
    // default route to normal.
    api.put(
        normal_pod,
        pod(
            "checkout-7c6d-a1",
            json!({"app": "checkout", "stage": "normal"}),
        ),
    );
    r.until("the route to normal", |a| a.writes().len() == 3)
        .await;
    assert_eq!(api.write_lines()[2], format!("PATCH {VS}"));
    assert_eq!(
        without_version(api.writes()[2].body.clone()),
        desired_vs("x-canary-tag", &login)
    );
    assert_eq!(r.metrics.services("without-normal"), 0);
    assert_eq!(r.metrics.services("routed"), 1);

    // The normal pods stop being ready: back to the whole Service at once.
    api.put(SLICE, slice_of(false, true));
    r.until("the route to the Service", |a| a.writes().len() == 4)
        .await;
    assert_eq!(api.write_lines()[3], format!("PATCH {VS}"));
    assert_eq!(
        without_version(api.writes()[3].body.clone()),
        desired_vs_to("x-canary-tag", &login, false)
    );
    r.idle(RESYNC).await;
    assert_eq!(api.writes().len(), 4, "{:#?}", api.write_lines());
    assert_eq!(
        api.get(DR).unwrap()["spec"],
        desired_dr(&login)["spec"],
        "the normal subset stays"
    );
    assert_eq!(r.metrics.services("without-normal"), 1);
    // The second RouteNoNormalPod is the first one counted again (the
    // recorder patches a repeated Event).
    r.until("the events", |a| {
        a.seen()
            .iter()
            .any(|c| c.method == Method::PATCH && c.path.starts_with(EVENTS))
    })
    .await;
    let reasons: Vec<String> = api.events().into_iter().map(|e| e.0).collect();
    assert_eq!(reasons, ["RouteAdded", "RouteNoNormalPod", "RouteToNormal"]);
    r.stop().await;
}

/// A newly routed Service whose normal pods are still becoming ready is no
/// news: the Warning comes only once there has been no ready normal pod
/// for `routes.noNormalPodWarningSeconds` (30 s).
#[tokio::test(start_paused = true)]
async fn no_warning_while_the_normal_pods_are_still_becoming_ready() {
    let api = cluster(true);
    api.put(SLICE, slice_of(false, true));
    let r = start(&api);
    r.until("both objects", |a| a.writes().len() == 2).await;
    let routed_at = api.writes()[1].at;
    r.idle(Duration::from_secs(20)).await;
    api.put(SLICE, slice_of(true, true));
    r.until("the route to normal", |a| a.writes().len() == 3)
        .await;
    r.idle(RESYNC).await;
    let reasons: Vec<String> = api.events().into_iter().map(|e| e.0).collect();
    assert_eq!(
        reasons,
        ["RouteAdded"],
        "no warning, and nothing to recover from"
    );

    // Now the normal pods stop being ready for good: one Warning, 30 s
    // after it started.
    api.put(SLICE, slice_of(false, true));
    r.until("the route to the Service", |a| a.writes().len() == 4)
        .await;
    let since = api.writes()[3].at;
    r.until("the warning", |a| a.events().len() == 2).await;
    let warned_at = api
        .seen()
        .into_iter()
        .filter(|c| c.method == Method::POST && c.path == EVENTS)
        .nth(1)
        .unwrap()
        .at;
    assert_eq!(api.events()[1].0, "RouteNoNormalPod");
    assert!(warned_at - since >= Duration::from_secs(30));
    assert!(warned_at - since < Duration::from_secs(32));
    assert!(routed_at < since);
    r.idle(RESYNC).await;
    assert_eq!(api.events().len(), 2, "warned once");
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_service_with_gray_pods_only_sends_requests_without_the_header_to_them() {
    let api = cluster(true);
    api.delete("/api/v1/namespaces/shop/pods/checkout-7c6d-a1");
    let mut gray_only = slice(true);
    gray_only["endpoints"].as_array_mut().unwrap().remove(0);
    api.put(SLICE, gray_only);
    let r = start(&api);
    r.until("both objects", |a| a.writes().len() == 2).await;
    let login = [("feature-login", "feature-login")];
    assert_eq!(
        without_version(api.get(VS).unwrap())["spec"],
        desired_vs_to("x-canary-tag", &login, false)["spec"]
    );
    r.idle(RESYNC).await;
    assert_eq!(api.writes().len(), 2, "steady: {:#?}", api.write_lines());
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_pod_that_loses_its_canary_labels_loses_its_route() {
    let api = cluster(true);
    let r = start(&api);
    r.until("converged", |a| a.writes().len() == 2).await;
    // Relabelled by hand: no longer selected by the pod watch (DELETED).
    api.put(
        GRAY_POD,
        pod(
            "checkout-gray-7d9f-x1",
            json!({"app": "checkout", "stage": "normal"}),
        ),
    );
    r.until("the route removal", |a| a.writes().len() >= 3)
        .await;
    assert_eq!(api.write_lines()[2], format!("PATCH {VS}"));
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn objects_we_do_not_own_block_every_write_until_they_are_gone() {
    let api = cluster(true);
    let manual = json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "checkout-manual", "namespace": "shop"},
        "spec": {"hosts": ["checkout.shop.svc.cluster.local"],
                 "http": [{"route": [{"destination": {"host": "checkout.shop.svc.cluster.local"}}]}]}});
    let manual_path = format!("{VS_COLLECTION}/checkout-manual");
    api.put(&manual_path, manual);
    let r = start(&api);
    r.until("the conflict event", |a| !a.events().is_empty())
        .await;
    assert_eq!(
        api.events(),
        [(
            "RouteConflict".to_owned(),
            "Warning".to_owned(),
            "checkout".to_owned()
        )]
    );
    let note = api
        .seen()
        .into_iter()
        .find(|c| c.path == EVENTS)
        .unwrap()
        .body["note"]
        .clone();
    assert!(
        note.as_str()
            .unwrap()
            .contains("VirtualService checkout-manual"),
        "{note}"
    );
    r.idle(RESYNC * 2).await;
    assert_eq!(
        api.write_lines(),
        Vec::<String>::new(),
        "nothing written while in conflict"
    );
    assert_eq!(r.metrics.services("conflict"), 1);
    assert_eq!(r.metrics.services("routed"), 0);
    assert_eq!(api.events().len(), 1, "reported once, not at every resync");
    // The manual object is deleted: routing starts.
    api.delete(&manual_path);
    r.until("routes", |a| a.writes().len() == 2).await;
    assert_eq!(r.metrics.services("conflict"), 0);
    assert_eq!(r.metrics.services("routed"), 1);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_object_of_the_same_name_we_do_not_own_is_never_touched() {
    let api = cluster(true);
    let theirs = json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "checkout", "namespace": "shop"},
        "spec": {"host": "payments"}});
    api.put(DR, theirs.clone());
    let r = start(&api);
    r.until("the conflict event", |a| !a.events().is_empty())
        .await;
    r.idle(RESYNC).await;
    assert_eq!(api.write_lines(), Vec::<String>::new());
    // Not even when the Service stops asking for routes.
    api.put(SERVICE, service(json!({})));
    r.idle(RESYNC).await;
    assert_eq!(api.write_lines(), Vec::<String>::new());
    assert_eq!(api.get(DR).unwrap()["spec"], theirs["spec"]);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn opting_out_deletes_our_virtual_service_then_our_destination_rule() {
    let api = cluster(true);
    let r = start(&api);
    r.until("converged", |a| a.writes().len() == 2).await;
    let (dr, vs) = (api.get(DR).unwrap(), api.get(VS).unwrap());
    api.put(
        SERVICE,
        service(json!({"canary-injector.io/routes": "false"})),
    );
    r.until("both deletes", |a| a.writes().len() == 4).await;
    let writes = api.writes();
    assert_eq!(
        api.write_lines()[2..],
        [format!("DELETE {VS}"), format!("DELETE {DR}")]
    );
    for (w, o) in [(&writes[2], &vs), (&writes[3], &dr)] {
        assert_eq!(w.body["preconditions"]["uid"], o["metadata"]["uid"]);
        assert_eq!(
            w.body["preconditions"]["resourceVersion"],
            o["metadata"]["resourceVersion"]
        );
    }
    assert_eq!(api.get(DR), None);
    assert_eq!(r.metrics.changes("objects-deleted"), 2);
    r.idle(RESYNC).await;
    assert_eq!(api.writes().len(), 4);
    // Opting in again, and then the namespace opting out, does the same.
    api.put(SERVICE, routed());
    r.until("routes again", |a| a.writes().len() == 6).await;
    api.put(
        SHOP,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
    );
    r.until("deleted again", |a| a.writes().len() == 8).await;
    assert_eq!(
        api.write_lines()[6..],
        [format!("DELETE {VS}"), format!("DELETE {DR}")]
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn edits_and_deletes_of_our_objects_are_repaired() {
    let api = cluster(true);
    let r = start(&api);
    r.until("converged", |a| a.writes().len() == 2).await;
    // A user deletes the DestinationRule: recreated, and the
    // VirtualService is left alone (it is right).
    api.delete(DR);
    r.until("recreated", |a| a.writes().len() == 3).await;
    assert_eq!(api.write_lines()[2], format!("POST {DR_COLLECTION}"));
    // A user points the default route at the canary.
    let mut vs = api.get(VS).unwrap();
    vs["spec"]["http"][1]["route"][0]["destination"]["subset"] = json!("feature-login");
    api.put(VS, vs);
    r.until("repaired", |a| a.writes().len() == 4).await;
    assert_eq!(api.write_lines()[3], format!("PATCH {VS}"));
    assert_eq!(
        api.get(VS).unwrap()["spec"],
        desired_vs("x-canary-tag", &[("feature-login", "feature-login")])["spec"]
    );
    // Someone else's extra field (another field manager's) is no reason to write.
    let mut dr = api.get(DR).unwrap();
    dr["spec"]["trafficPolicy"] = json!({"tls": {"mode": "ISTIO_MUTUAL"}});
    api.put(DR, dr);
    r.idle(RESYNC).await;
    assert_eq!(api.writes().len(), 4, "{:#?}", api.write_lines());
    // Each repair is said: an Event on the Service naming the object, and
    // a count by kind. The extra field is no repair.
    assert_eq!(r.metrics.restored(RuleKind::DestinationRule), 1);
    assert_eq!(r.metrics.restored(RuleKind::VirtualService), 1);
    let notes: Vec<(String, String)> = api
        .seen()
        .into_iter()
        .filter(|c| c.method == Method::POST && c.path == EVENTS)
        .filter(|c| c.body["reason"] == "RoutesRestored")
        .map(|c| {
            (
                c.body["type"].as_str().unwrap().to_owned(),
                c.body["note"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        notes,
        [
            (
                "Normal".to_owned(),
                "DestinationRule checkout was deleted by someone else; canary-injector put back \
                 its host and subsets, which it owns (add other fields with your own field \
                 manager)"
                    .to_owned()
            ),
            (
                "Normal".to_owned(),
                "VirtualService checkout was changed by someone else; canary-injector put back \
                 its hosts and http routes, which it owns (add other fields with your own field \
                 manager)"
                    .to_owned()
            ),
        ]
    );
    r.stop().await;
}

/// Two canaries, `feat-a` and `feat-b`, behind the Service with a ready
/// normal pod; each canary's readiness set by the test.
fn two_canaries(a_ready: bool, b_ready: bool) -> Apiserver {
    let endpoint = |ip: &str, pod: &str, ready: bool| {
        json!({"addresses": [ip], "conditions": {"ready": ready},
               "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}})
    };
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "checkout-abc12", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "checkout"}},
        "addressType": "IPv4",
        "endpoints": [endpoint("10.0.0.5", "checkout-7c6d-a1", true),
                      endpoint("10.0.0.6", "checkout-a-1", a_ready),
                      endpoint("10.0.0.7", "checkout-b-1", b_ready)],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]});
    let canary = |name: &str, tag: &str| {
        pod(
            name,
            json!({"app": "checkout", "canarytag": tag, "stage": "gray"}),
        )
    };
    Apiserver::new(&[
        (SHOP, namespace()),
        (SERVICE, routed()),
        (
            "/api/v1/namespaces/shop/pods/checkout-7c6d-a1",
            pod(
                "checkout-7c6d-a1",
                json!({"app": "checkout", "stage": "normal"}),
            ),
        ),
        (
            "/api/v1/namespaces/shop/pods/checkout-a-1",
            canary("checkout-a-1", "feat-a"),
        ),
        (
            "/api/v1/namespaces/shop/pods/checkout-b-1",
            canary("checkout-b-1", "feat-b"),
        ),
        (SLICE, slice),
    ])
}

/// The tags a VirtualService write routes by header, in order.
fn routed_tags(write: &Seen) -> Vec<String> {
    write.body["spec"]["http"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["match"][0]["headers"]["x-canary-tag"]["exact"].as_str())
        .map(str::to_owned)
        .collect()
}

/// The flicker seen on a real apiserver under a creation burst (one route
/// in 400 removed for 0.8 s while its pods stayed ready, with retried 409s):
/// the DestinationRule watch lags behind the controller's own writes. Two
/// subset writes in a row (`feat-a`, then `feat-b`) while the watch still
/// shows the version before the first one used to drop the stand-in for
/// the cache, so the next plan read the old DestinationRule (without
/// `feat-a`) and removed `feat-a`'s route. A decision never rests on a
/// view older than what the controller wrote: `feat-a` keeps its route
/// throughout, and nothing conflicts.
#[tokio::test(start_paused = true)]
async fn a_lagging_watch_never_removes_the_route_of_a_live_tag() {
    let api = two_canaries(false, false);
    let r = start(&api);
    r.until("converged", |a| a.writes().len() == 2).await;
    api.0
        .hold_watch("/apis/networking.istio.io/v1/destinationrules");
    api.put(SLICE, {
        let mut s = api.get(SLICE).unwrap();
        s["endpoints"][1]["conditions"]["ready"] = json!(true);
        s
    });
    r.until("feat-a routed", |a| a.writes().len() == 4).await;
    api.put(SLICE, {
        let mut s = api.get(SLICE).unwrap();
        s["endpoints"][2]["conditions"]["ready"] = json!(true);
        s
    });
    r.until("feat-b's subset", |a| a.writes().len() >= 5).await;
    r.idle(Duration::from_secs(2)).await;
    api.0
        .release_watch("/apis/networking.istio.io/v1/destinationrules");
    r.until("feat-b routed", |a| {
        a.get(VS).unwrap()["spec"]["http"].as_array().unwrap().len() == 3
    })
    .await;
    r.idle(RESYNC).await;
    let routes: Vec<Vec<String>> = api
        .writes()
        .iter()
        .filter(|w| w.path.starts_with(VS_COLLECTION))
        .map(routed_tags)
        .collect();
    assert_eq!(
        routes,
        [
            vec![],
            vec!["feat-a".to_owned()],
            vec!["feat-a".into(), "feat-b".into()]
        ],
        "{:#?}",
        api.write_lines()
    );
    assert_eq!(r.counters.errors("stale"), 0, "{:#?}", api.write_lines());
    assert_eq!(r.metrics.changes("route-removed"), 0);
    r.until("events", |a| a.events().len() == 2).await;
    assert!(api.events().iter().all(|e| e.0 == "RouteAdded"));
    r.stop().await;
}

/// `n` routed Services `svc-0`.. in `shop`, each with one ready normal pod.
fn many_services(n: usize) -> Apiserver {
    let mut objects = vec![(SHOP.to_owned(), namespace())];
    for i in 0..n {
        let name = format!("svc-{i}");
        let pod_name = format!("{name}-pod");
        objects.push((
            format!("/api/v1/namespaces/shop/services/{name}"),
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": name, "namespace": "shop",
                                "annotations": {"canary-injector.io/routes": "true"}},
                   "spec": {"selector": {"app": name}, "ports": [{"port": 80}]}}),
        ));
        objects.push((
            format!("/api/v1/namespaces/shop/pods/{pod_name}"),
            pod(&pod_name, json!({"app": name, "stage": "normal"})),
        ));
        objects.push((
            format!("/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/{name}-x"),
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": format!("{name}-x"), "namespace": "shop",
                                "labels": {"kubernetes.io/service-name": name}},
                   "addressType": "IPv4",
                   "endpoints": [{"addresses": ["10.0.0.5"], "conditions": {"ready": true},
                                  "targetRef": {"kind": "Pod", "name": pod_name, "namespace": "shop"}}]}),
        ));
    }
    let refs: Vec<(&str, Value)> = objects
        .iter()
        .map(|(p, o)| (p.as_str(), o.clone()))
        .collect();
    Apiserver::new(&refs)
}

/// The namespace controller empties a namespace being deleted: it marks
/// it, then deletes every kind of object in it, one kind after the other
/// (endpoints first, as pods stop; ours while the Services still exist).
async fn tear_down(r: &Running) {
    let api = &r.api;
    let mut ns = api.get(SHOP).unwrap();
    ns["metadata"]["deletionTimestamp"] = json!("2026-12-06T10:00:00Z");
    api.put(SHOP, ns);
    let paths: Vec<String> = api
        .0
        .paths()
        .into_iter()
        .filter(|p| p.contains("/namespaces/shop/"))
        .collect();
    for kind in [
        "endpointslices",
        "pods",
        "virtualservices",
        "destinationrules",
        "services",
    ] {
        r.idle(Duration::from_secs(2)).await;
        for p in paths.iter().filter(|p| p.contains(&format!("/{kind}/"))) {
            api.delete(p);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_namespace_being_deleted_gets_no_writes_no_errors_and_no_events() {
    let api = many_services(5);
    let r = start(&api);
    r.until("converged", |a| a.writes().len() == 10).await;
    r.until("no events yet", |a| a.events().is_empty()).await;
    tear_down(&r).await;
    r.idle(RESYNC).await;
    assert_eq!(api.writes().len(), 10, "{:#?}", api.write_lines());
    assert_eq!(r.counters.errors("write"), 0);
    assert_eq!(r.counters.errors("stale"), 0);
    assert_eq!(api.events(), []);
    r.stop().await;
}

/// The watches are separate streams: the controller may see our objects
/// deleted before it sees their namespace being deleted. The apiserver's
/// refusal of the first re-create says so; nothing more is written there,
/// and the refusal is no error.
#[tokio::test(start_paused = true)]
async fn a_namespace_whose_deletion_is_seen_late_gets_one_refused_create_and_no_error() {
    let api = many_services(5);
    let r = start(&api);
    r.until("converged", |a| a.writes().len() == 10).await;
    api.0.hold_watch("/api/v1/namespaces");
    tear_down(&r).await;
    r.idle(Duration::from_secs(30)).await;
    api.0.release_watch("/api/v1/namespaces");
    r.idle(RESYNC).await;
    let late: Vec<String> = api.write_lines()[10..].to_vec();
    assert!(
        late.iter().filter(|l| l.starts_with("POST")).count() <= 1,
        "{late:#?}"
    );
    assert_eq!(r.counters.errors("write"), 0);
    assert_eq!(r.counters.errors("stale"), 0);
    assert!(
        api.events().iter().all(|e| e.1 != "Warning"),
        "{:#?}",
        api.events()
    );
    r.stop().await;
}

/// The gray pod, asking for `weight` of the requests without a header.
fn weighted_gray_pod(weight: &str) -> Value {
    let mut p = gray_pod();
    p["metadata"]["annotations"] = json!({"canary-injector.io/weight": weight});
    p["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "name": "checkout-gray-7d9f", "uid": "rs-gray", "controller": true}]);
    p
}

/// The default route's destinations as (subset, weight).
fn default_split(api: &Apiserver) -> Vec<(String, Option<u64>)> {
    let vs = api.get(VS).unwrap();
    vs["spec"]["http"].as_array().unwrap().last().unwrap()["route"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["destination"]["subset"].as_str().unwrap_or("").to_owned(),
                d["weight"].as_u64(),
            )
        })
        .collect()
}

fn split(pairs: &[(&str, Option<u64>)]) -> Vec<(String, Option<u64>)> {
    pairs.iter().map(|(s, w)| ((*s).to_owned(), *w)).collect()
}

/// A weighted gray stage: added (the subset first, then route and share in
/// one write), changed (one write), removed (one write, back to normal),
/// each said with an Event on the Service.
#[tokio::test(start_paused = true)]
async fn a_weight_is_added_changed_and_removed_with_one_write_each() {
    let api = cluster(false);
    api.put(GRAY_POD, weighted_gray_pod("10"));
    let r = start(&api);
    r.until("converged", |a| a.writes().len() == 2).await;
    assert_eq!(default_split(&api), split(&[("normal", None)]));
    // The canary turns ready: its subset, then its route and its share.
    api.put(SLICE, slice(true));
    r.until("the share", |a| a.writes().len() == 4).await;
    assert_eq!(
        api.write_lines()[2..],
        [format!("PATCH {DR}"), format!("PATCH {VS}")]
    );
    assert_eq!(
        default_split(&api),
        split(&[("normal", Some(90)), ("feature-login", Some(10))])
    );
    // Changed: one VirtualService write.
    api.put(GRAY_POD, weighted_gray_pod("25"));
    r.until("the new share", |a| a.writes().len() == 5).await;
    assert_eq!(api.write_lines()[4], format!("PATCH {VS}"));
    assert_eq!(
        default_split(&api),
        split(&[("normal", Some(75)), ("feature-login", Some(25))])
    );
    // Removed (a new rollout without it): back to normal, one write.
    api.put(GRAY_POD, gray_pod());
    r.until("back to normal", |a| a.writes().len() == 6).await;
    assert_eq!(default_split(&api), split(&[("normal", None)]));
    r.idle(RESYNC).await;
    assert_eq!(api.writes().len(), 6, "steady: {:#?}", api.write_lines());
    r.until("events", |a| {
        a.events().iter().filter(|e| e.0 == "RouteWeights").count() == 3
    })
    .await;
    let notes: Vec<String> = api
        .seen()
        .into_iter()
        .filter(|c| c.method == Method::POST && c.path == EVENTS)
        .filter(|c| c.body["reason"] == "RouteWeights")
        .map(|c| c.body["note"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        notes,
        [
            "requests without a canary header now go 90% to normal, 10% to feature-login",
            "requests without a canary header now go 75% to normal, 25% to feature-login",
            "requests without a canary header now go 100% to normal",
        ]
    );
    r.stop().await;
}

/// Weights over 100: the split written before stands, and a Warning on the
/// Service says why; an unusable weight counts as 0, with a Warning on
/// the workload of its pods.
#[tokio::test(start_paused = true)]
async fn weights_over_100_keep_the_split_and_a_bad_weight_counts_as_0() {
    let api = two_canaries(true, true);
    let annotate = |path: &str, weight: &str| {
        let mut p = api.get(path).unwrap();
        p["metadata"]["annotations"] = json!({"canary-injector.io/weight": weight});
        p["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1",
            "kind": "ReplicaSet", "name": "checkout-rs", "uid": "rs", "controller": true}]);
        api.put(path, p);
    };
    annotate("/api/v1/namespaces/shop/pods/checkout-a-1", "60");
    let r = start(&api);
    r.until("converged", |a| {
        a.get(VS)
            .is_some_and(|v| v["spec"]["http"].as_array().unwrap().len() == 3)
    })
    .await;
    r.idle(Duration::from_secs(5)).await;
    assert_eq!(
        default_split(&api),
        split(&[("normal", Some(40)), ("feat-a", Some(60))])
    );
    let writes = api.writes().len();
    // feat-b asks for 50 more: 110.
    annotate("/api/v1/namespaces/shop/pods/checkout-b-1", "50");
    r.until("the warning", |a| {
        a.events().iter().any(|e| e.0 == "RouteWeightsInvalid")
    })
    .await;
    r.idle(RESYNC).await;
    assert_eq!(api.writes().len(), writes, "the split stands");
    assert_eq!(
        default_split(&api),
        split(&[("normal", Some(40)), ("feat-a", Some(60))])
    );
    let invalid: Vec<_> = api
        .events()
        .into_iter()
        .filter(|e| e.0 == "RouteWeightsInvalid")
        .collect();
    assert_eq!(
        invalid,
        [(
            "RouteWeightsInvalid".to_owned(),
            "Warning".to_owned(),
            "checkout".to_owned()
        )]
    );
    // feat-b's weight turns unreadable: it counts as 0, so 60 fits again.
    annotate("/api/v1/namespaces/shop/pods/checkout-b-1", "lots");
    r.until("the warning on the workload", |a| {
        a.events().iter().any(|e| e.0 == "RouteWeightInvalid")
    })
    .await;
    let bad = api
        .seen()
        .into_iter()
        .find(|c| {
            c.method == Method::POST && c.path == EVENTS && c.body["reason"] == "RouteWeightInvalid"
        })
        .unwrap();
    assert_eq!(bad.body["regarding"]["kind"], "ReplicaSet");
    assert_eq!(bad.body["regarding"]["name"], "checkout-rs");
    assert_eq!(
        bad.body["note"],
        "annotation canary-injector.io/weight: \"lots\" is not an integer from 0 to 100: canary \
         feat-b gets no share of the requests to Service checkout without a header (it counts \
         as 0)"
    );
    r.stop().await;
}

/// Timeout and retries from the Service's annotations on every route; a
/// value that does not read is left out, with a Warning on the Service.
#[tokio::test(start_paused = true)]
async fn route_settings_reach_every_route_and_a_bad_one_is_left_out() {
    let api = cluster(true);
    api.put(
        SERVICE,
        service(json!({"canary-injector.io/routes": "true",
                       "canary-injector.io/route-timeout": "2500ms",
                       "canary-injector.io/route-retries": "3/1s"})),
    );
    let r = start(&api);
    r.until("converged", |a| a.writes().len() == 2).await;
    let http = api.get(VS).unwrap()["spec"]["http"].clone();
    for route in http.as_array().unwrap() {
        assert_eq!(route["timeout"], "2.5s");
        assert_eq!(
            route["retries"],
            json!({"attempts": 3, "perTryTimeout": "1s"})
        );
    }
    api.put(
        SERVICE,
        service(json!({"canary-injector.io/routes": "true",
                       "canary-injector.io/route-timeout": "soon",
                       "canary-injector.io/route-retries": "3/1s"})),
    );
    r.until("rewritten", |a| a.writes().len() == 3).await;
    let http = api.get(VS).unwrap()["spec"]["http"].clone();
    for route in http.as_array().unwrap() {
        assert!(route.get("timeout").is_none(), "{route}");
        assert_eq!(route["retries"]["attempts"], 3);
    }
    r.until("the warning", |a| {
        a.events().iter().any(|e| e.0 == "RouteSettingsInvalid")
    })
    .await;
    r.idle(RESYNC).await;
    assert_eq!(api.writes().len(), 3);
    assert_eq!(
        api.events()
            .iter()
            .filter(|e| e.0 == "RouteSettingsInvalid")
            .count(),
        1,
        "said once"
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_write_that_finds_the_object_changed_reads_again() {
    let api = cluster(false);
    let r = start(&api);
    r.until("converged", |a| a.writes().len() == 2).await;
    // Someone else updates the DestinationRule just before our apply: 409.
    api.touch_before_next_apply(DR);
    api.put(SLICE, slice(true));
    r.until("the route", |a| {
        a.get(VS).unwrap()["spec"]["http"].as_array().unwrap().len() == 2
    })
    .await;
    let lines = api.write_lines();
    assert_eq!(
        lines[2..],
        [
            format!("PATCH {DR}"),
            format!("PATCH {DR}"),
            format!("PATCH {VS}")
        ]
    );
    assert_eq!(r.counters.errors("stale"), 1);
    // The other writer's label is still there (apply merges).
    assert_eq!(
        api.get(DR).unwrap()["metadata"]["labels"]["touched-by"],
        "someone-else"
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_write_is_retried_with_backoff() {
    let api = cluster(true);
    api.fail_once(Method::POST, DR_COLLECTION, 500);
    let r = start(&api);
    r.until("converged", |a| a.get(VS).is_some()).await;
    let writes = api.writes();
    assert_eq!(writes.len(), 3, "{:#?}", api.write_lines());
    assert!(writes[1].at - writes[0].at >= FIRST_RETRY);
    assert_eq!(r.counters.errors("write"), 1);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_invalid_header_annotation_is_reported_and_nothing_is_written() {
    let api = cluster(true);
    api.put(
        SERVICE,
        service(json!({"canary-injector.io/routes": "true", "canary-injector.io/route-header": "X-Version"})),
    );
    let r = start(&api);
    r.until("the event", |a| !a.events().is_empty()).await;
    assert_eq!(api.events()[0].0, "RouteHeaderInvalid");
    assert_eq!(api.write_lines(), Vec::<String>::new());
    assert_eq!(r.metrics.services("invalid-header"), 1);
    // Fixed: routes with that header.
    api.put(
        SERVICE,
        service(json!({"canary-injector.io/routes": "true", "canary-injector.io/route-header": "x-version"})),
    );
    r.until("routes", |a| a.writes().len() == 2).await;
    assert_eq!(
        without_version(api.get(VS).unwrap())["spec"],
        desired_vs("x-version", &[("feature-login", "feature-login")])["spec"]
    );
    r.stop().await;
}

/// `object` as written at `networking.istio.io/<version>`.
fn at_version(mut object: Value, version: &str) -> Value {
    object["apiVersion"] = json!(format!("networking.istio.io/{version}"));
    object
}

/// Routes on a cluster that serves `versions` of `networking.istio.io`:
/// every read and write of DestinationRules and VirtualServices goes to
/// `expected`'s paths, and the objects carry its apiVersion.
async fn routes_at_the_served_version(versions: &[&'static str], expected: &str) {
    let api = cluster(false);
    api.with_istio_versions(versions);
    let r = start(&api);
    r.until("both objects", |a| a.writes().len() == 2).await;
    let base = format!("/apis/networking.istio.io/{expected}/namespaces/shop");
    assert_eq!(
        api.write_lines(),
        [
            format!("POST {base}/destinationrules"),
            format!("POST {base}/virtualservices")
        ]
    );
    let writes = api.writes();
    assert_eq!(writes[0].body, at_version(desired_dr(&[]), expected));
    assert_eq!(
        writes[1].body,
        at_version(desired_vs("x-canary-tag", &[]), expected)
    );
    // Listed and watched at that version, and no other version asked for
    // (discovery of the group aside).
    let seen = api.seen();
    for resource in ["destinationrules", "virtualservices"] {
        let path = format!("/apis/networking.istio.io/{expected}/{resource}");
        assert!(
            seen.iter()
                .any(|c| c.path == path && c.query.contains_key("watch")),
            "no watch of {path}"
        );
    }
    let prefix = format!("/apis/networking.istio.io/{expected}");
    for c in &seen {
        if let Some(rest) = c.path.strip_prefix("/apis/networking.istio.io/") {
            assert!(
                c.path.starts_with(&prefix),
                "{} {} at a version not served ({rest})",
                c.method,
                c.path
            );
        }
    }
    // A change: the subset, then the route, applied at that version.
    api.put(SLICE, slice(true));
    r.until("the route", |a| a.writes().len() == 4).await;
    assert_eq!(
        api.write_lines()[2..],
        [
            format!("PATCH {base}/destinationrules/checkout"),
            format!("PATCH {base}/virtualservices/checkout")
        ]
    );
    let login = [("feature-login", "feature-login")];
    assert_eq!(
        without_version(api.writes()[3].body.clone()),
        at_version(desired_vs("x-canary-tag", &login), expected)
    );
    assert_eq!(
        api.get(&format!("{base}/destinationrules/checkout"))
            .unwrap()["apiVersion"],
        format!("networking.istio.io/{expected}")
    );
    r.idle(RESYNC).await;
    assert_eq!(api.writes().len(), 4, "steady: {:#?}", api.write_lines());
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn istio_1_5_to_1_21_gets_v1beta1_objects() {
    // Those releases serve v1beta1 and v1alpha3, not v1.
    routes_at_the_served_version(&["v1beta1", "v1alpha3"], "v1beta1").await;
}

#[tokio::test(start_paused = true)]
async fn a_cluster_serving_only_v1alpha3_gets_v1alpha3_objects() {
    routes_at_the_served_version(&["v1alpha3"], "v1alpha3").await;
}

#[tokio::test(start_paused = true)]
async fn the_best_version_served_is_used() {
    // v1 is preferred even when the group lists it last.
    routes_at_the_served_version(&["v1alpha3", "v1beta1", "v1"], "v1").await;
}

#[tokio::test(start_paused = true)]
async fn without_istio_it_idles_then_routes_once_the_crds_appear() {
    let api = cluster(true);
    api.with_istio(false);
    let r = start(&api);
    r.idle(RECHECK * 3 + Duration::from_secs(1)).await;
    let discoveries = api
        .seen()
        .iter()
        .filter(|c| c.path == "/apis/networking.istio.io")
        .count();
    assert_eq!(discoveries, 4, "checked at start and every 30 s");
    assert!(
        api.seen().iter().all(|c| !c.query.contains_key("watch")),
        "no watch while idle"
    );
    assert_eq!(r.metrics.crds_present.get(), 0);
    api.with_istio(true);
    r.until("routes", |a| a.writes().len() == 2).await;
    assert_eq!(r.metrics.crds_present.get(), 1);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn when_istio_goes_away_it_idles_again() {
    let api = cluster(true);
    let r = start(&api);
    r.until("converged", |a| a.writes().len() == 2).await;
    api.with_istio(false);
    // The next DestinationRule event makes the watch restart and fail.
    api.delete(DR);
    r.until("idle", |_| r.metrics.crds_present.get() == 0).await;
    api.with_istio(true);
    r.until("routing again", |a| a.get(DR).is_some()).await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn watch_errors_are_retried_and_nothing_is_written_before_every_list_completed() {
    let api = cluster(true);
    api.fail_once(Method::GET, "/api/v1/pods", 500);
    api.fail_once(
        Method::GET,
        "/apis/networking.istio.io/v1/virtualservices",
        503,
    );
    let r = start(&api);
    r.until("converged", |a| a.writes().len() == 2).await;
    let seen = api.seen();
    let first_write = seen.iter().position(|c| c.method == Method::POST).unwrap();
    let pod_lists = seen[..first_write]
        .iter()
        .filter(|c| c.path == "/api/v1/pods" && !c.query.contains_key("watch"))
        .count();
    assert_eq!(pod_lists, 2, "the failed list was retried before any write");
    assert_eq!(r.metrics.watch_errors("pods"), 1);
    assert_eq!(r.metrics.watch_errors("virtualservices"), 1);
    // Later, a watch breaks off with an error: the watcher relists and
    // nothing is written again.
    api.fail_once(Method::GET, "/api/v1/services", 500);
    r.idle(RESYNC).await;
    assert_eq!(api.writes().len(), 2);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_follower_makes_no_call_at_all() {
    let api = cluster(true);
    let (client, _served) = api.serve();
    let registry = Registry::new();
    let writer = RoutesWriter {
        owners: Default::default(),
        clock: Default::default(),
        settings: RoutesSettings::from_config(&Config::default()).unwrap(),
        metrics: RouteMetrics::register(&registry).unwrap(),
        counters: ControllerMetrics::register(&registry)
            .unwrap()
            .controller(CONTROLLER, &RouteError::REASONS),
        events: EventSink::disabled(),
    };
    let (leader, rx) = tokio::sync::watch::channel(false);
    let shutdown = CancellationToken::new();
    let gate = tokio::spawn(crate::cluster::while_leading(
        rx,
        shutdown.clone(),
        move |term| run(client.clone(), writer.clone(), term),
    ));
    tokio::time::sleep(RESYNC).await;
    assert!(api.seen().is_empty(), "{:?}", api.seen());
    leader.send_replace(true);
    for _ in 0..200 {
        if api.get(VS).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(api.get(VS).is_some(), "the leader routes");
    // Leadership lost: the term ends, no more calls.
    leader.send_replace(false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = api.seen().len();
    api.put(SLICE, slice(false));
    tokio::time::sleep(RESYNC).await;
    assert_eq!(api.seen().len(), calls);
    shutdown.cancel();
    gate.await.unwrap().unwrap();
}

mod gateway;

/// A mutating admission webhook that rewrites the VirtualService (here: a
/// host added) would have the controller write it again after
/// every write: instead the write is retried with backoff and counted as
/// `not-kept`.
#[tokio::test(start_paused = true)]
async fn a_virtual_service_stored_otherwise_is_retried_with_backoff_not_at_once() {
    let api = cluster(true);
    api.0.mutate_writes(
        VS,
        json!({"spec": {"hosts": ["checkout", "injected.example.com"]}}),
    );
    let r = start(&api);
    r.until("the VirtualService", |a| a.get(VS).is_some()).await;
    r.idle(Duration::from_secs(60)).await;
    let vs_writes = api
        .writes()
        .iter()
        .filter(|w| w.path == VS || w.path == VS_COLLECTION)
        .count();
    assert!(
        (2..=8).contains(&vs_writes),
        "retried with backoff, not in a loop: {vs_writes} writes in a minute"
    );
    assert!(r.counters.errors("not-kept") >= 1);
    r.stop().await;
}
