//! The backfill against the mock apiserver ([`crate::testing`]): exact
//! requests where their shape matters (`MockApi`), the stateful
//! [`FakeApiServer`] where the outcome matters.

use std::collections::BTreeMap;

use http::Method;
use serde_json::{Value, json};
use tokio::time::timeout;

use super::*;
use crate::cluster::events::{EventMetrics, EventQueue};
use crate::cluster::watches::Shared;
use crate::metrics::{ControllerMetrics, new_registry};
use crate::testing::{FakeApiServer, Hook, MockApi, WAIT, mock_client, scraped};
use kube::runtime::watcher;
use std::time::Duration;

const RS_UID: &str = "5c1b1e2a-7f3d-4e8a-9b6c-1d2e3f4a5b6c";
const DEPLOYMENT_UID: &str = "9a8b7c6d-5e4f-4321-8fed-cba987654321";
const PODS: &str = "/api/v1/namespaces/shop/pods";
const REPLICASETS: &str = "/apis/apps/v1/namespaces/shop/replicasets";
const METADATA_LIST: &str = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";
const METADATA: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";
const JSON_PATCH: &str = "application/json-patch+json";

// === fixtures ===

fn config() -> Config {
    let mut cfg = Config::default();
    cfg.namespaces.own = Some("canary-injector".into());
    cfg
}

fn namespace(name: &str) -> Arc<Namespace> {
    Arc::new(Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                "canary-injection".into(),
                "enabled".into(),
            )])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    })
}

/// A pod of the ReplicaSet `web-abc` (created before the webhook).
fn pod(name: &str, labels: Value, annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
            "resourceVersion": "100", "labels": labels, "annotations": annotations,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-abc",
                "uid": RS_UID, "controller": true, "blockOwnerDeletion": true}]},
        "spec": {"containers": [{"name": "web", "image": "nginx"}]},
        "status": {"phase": "Running"}})
}

/// A ReplicaSet of the Deployment `web` (no tag anywhere).
fn replicaset(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
            "resourceVersion": "200", "labels": labels,
            "annotations": {"deployment.kubernetes.io/revision": "1"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web",
                "uid": DEPLOYMENT_UID, "controller": true, "blockOwnerDeletion": true}]},
        "spec": {"replicas": 2,
            "selector": {"matchLabels": {"app": "web", "pod-template-hash": "abc"}},
            "template": {"metadata": {"labels": {"app": "web", "pod-template-hash": "abc"}},
                         "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}})
}

/// What the apiserver answers a metadata-only list.
fn metadata_list(items: &[Value], next: Option<&str>) -> Value {
    let items: Vec<Value> = items.iter().map(|o| patched(&o["metadata"])).collect();
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
           "metadata": {"resourceVersion": "300", "continue": next.unwrap_or("")},
           "items": items})
}

/// What the apiserver answers a patch asking for metadata only.
fn patched(metadata: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": metadata})
}

/// `n` pods `web-0`.. without the labels, as one metadata list.
fn unlabelled_pods(n: usize) -> Value {
    let pods: Vec<Value> = (0..n)
        .map(|i| pod(&format!("web-{i}"), json!({"app": "web"}), json!({})))
        .collect();
    metadata_list(&pods, None)
}

fn list(kind: &str, items: &[Value]) -> Value {
    json!({"apiVersion": "apps/v1", "kind": format!("{kind}List"),
           "metadata": {"resourceVersion": "300"}, "items": items})
}

struct Harness {
    ctx: Arc<Context>,
    queue: EventQueue,
    counters: ControllerCounters,
    registry: Registry,
}

fn harness(client: Client, cfg: &Config) -> Harness {
    let registry = new_registry();
    let counters = ControllerMetrics::register(&registry)
        .unwrap()
        .controller(CONTROLLER, &BackfillError::REASONS);
    let metrics = BackfillMetrics::register(&registry).unwrap();
    let (events, queue) = EventSink::channel(64, EventMetrics::register(&registry).unwrap());
    let settings = BackfillSettings::from_config(cfg).unwrap();
    let ctx = Arc::new(Context {
        client,
        pacer: Pacer::new(settings.patches_per_second),
        settings,
        counters: counters.clone(),
        metrics,
        events,
        shutdown: CancellationToken::new(),
        warned: Default::default(),
    });
    Harness {
        ctx,
        queue,
        counters,
        registry,
    }
}

/// Checks a list request of the backfill.
fn assert_list(call: &crate::testing::Call, path: &str, limit: &str, accept: &str) {
    assert_eq!((&call.method, call.path.as_str()), (&Method::GET, path));
    assert_eq!(
        call.param("labelSelector"),
        Some("canary-injector.io/inject!=false"),
        "opted-out objects are not listed"
    );
    assert_eq!(call.param("limit"), Some(limit));
    assert_eq!(call.accept, accept);
}

/// The JSON Patches the fake apiserver received, by path.
fn patches(fake: &FakeApiServer) -> Vec<(String, Value)> {
    fake.seen()
        .into_iter()
        .filter(|c| c.method == Method::PATCH)
        .map(|c| (c.path, c.body))
        .collect()
}

fn labels(fake: &FakeApiServer, path: &str) -> Value {
    fake.get(path).unwrap()["metadata"]["labels"].clone()
}

/// Waits for the pass, then requires that no other call comes once every
/// client (the harness's included: `ctx` is dropped here) is gone.
async fn finish(
    api: MockApi,
    pass: tokio::task::JoinHandle<Result<Action, BackfillError>>,
    ctx: Arc<Context>,
) -> Action {
    let action = timeout(WAIT, pass).await.unwrap().unwrap().unwrap();
    drop(ctx);
    api.expect_no_more().await;
    action
}

// === one pass, call by call ===

#[tokio::test]
async fn a_pass_sends_label_only_patches_with_a_resource_version_test() {
    let (client, mut api) = mock_client();
    let mut h = harness(client, &config());
    let pass = tokio::spawn(backfill_namespace(namespace("shop"), h.ctx.clone()));

    let call = api.next().await;
    assert_list(&call, PODS, "500", METADATA_LIST);
    let mut unlabelled = pod(
        "web-1",
        json!({"app": "web", "pod-template-hash": "abc"}),
        json!({"sidecar.istio.io/status": "{}"}),
    );
    unlabelled["metadata"]["resourceVersion"] = json!("101");
    let done = pod("web-2", json!({"app": "web", "stage": "normal"}), json!({}));
    call.ok(&metadata_list(&[unlabelled.clone(), done], None));

    // An Istio pod: read whole once, for what its sidecar runs.
    let call = api.expect(Method::GET, &format!("{PODS}/web-1")).await;
    assert_eq!(call.accept, "", "the whole pod");
    let mut whole = unlabelled.clone();
    whole["spec"]["containers"] = json!([
        {"name": "web", "image": "nginx"},
        {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.5.4",
         "volumeMounts": [{"name": "istio-envoy", "mountPath": "/etc/istio/proxy"}]},
    ]);
    call.ok(&whole);

    let call = api.expect(Method::PATCH, &format!("{PODS}/web-1")).await;
    assert_eq!(call.content_type, JSON_PATCH);
    assert_eq!(call.accept, METADATA, "the answer: metadata only");
    assert_eq!(
        call.body,
        json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": "101"},
            {"op": "add", "path": "/metadata/labels/stage", "value": "normal"},
        ])
    );
    call.ok(&patched(&unlabelled["metadata"]));

    let call = api.next().await;
    assert_list(&call, REPLICASETS, "100", "");
    let owned = replicaset("web-abc", json!({"app": "web", "pod-template-hash": "abc"}));
    let complete = replicaset(
        "web-old",
        json!({"app": "web", "pod-template-hash": "old", "stage": "normal"}),
    );
    call.ok(&list("ReplicaSet", &[owned, complete]));

    // Owned: labelled as its pods are; its template untouched.
    let call = api
        .expect(Method::PATCH, &format!("{REPLICASETS}/web-abc"))
        .await;
    assert_eq!(call.content_type, JSON_PATCH);
    assert_eq!(
        call.body,
        json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": "200"},
            {"op": "add", "path": "/metadata/labels/stage", "value": "normal"},
        ])
    );
    call.ok(&patched(&json!({"name": "web-abc"})));

    assert_eq!(finish(api, pass, h.ctx).await, Action::requeue(RESYNC));
    assert_eq!(h.counters.applies(), 2);
    assert!(scraped(
        &h.registry,
        r#"canary_injector_backfill_labelled_total{kind="Pod"} 1"#
    ));
    assert!(scraped(
        &h.registry,
        r#"canary_injector_backfill_labelled_total{kind="ReplicaSet"} 1"#
    ));
    assert!(scraped(
        &h.registry,
        r#"canary_injector_backfill_restart_for_bootstrap_total{reason="template"} 1"#
    ));

    // One Event per owner of what was labelled.
    let events = h.queue.drain();
    assert_eq!(events.len(), 2, "{events:?}");
    let on = |kind: &str| {
        events
            .iter()
            .find(|e| e.regarding.kind.as_deref() == Some(kind))
            .unwrap_or_else(|| panic!("no event on the {kind}: {events:?}"))
    };
    let rs = on("ReplicaSet");
    assert_eq!(rs.regarding.name.as_deref(), Some("web-abc"));
    assert_eq!(rs.regarding.uid.as_deref(), Some(RS_UID));
    assert_eq!(rs.regarding.namespace.as_deref(), Some("shop"));
    assert_eq!(rs.type_, EventType::Normal);
    assert_eq!(rs.reason, "LabelsBackfilled");
    assert_eq!(rs.action, "Backfill");
    assert_eq!(
        rs.note,
        "added stage=normal to 1 Pod that lacked them (created before the namespace opted in or \
         before the webhook ran, or their labels were removed since; no restart needed); 1 of them runs an Istio 1.5-1.7 sidecar without the bootstrap keepalive \
         template: restart it to mount it"
    );
    let deployment = on("Deployment");
    assert_eq!(deployment.regarding.uid.as_deref(), Some(DEPLOYMENT_UID));
    assert!(
        deployment
            .note
            .starts_with("added stage=normal to 1 ReplicaSet")
    );
}

#[tokio::test]
async fn a_conflict_is_read_again_and_never_clobbers_a_label_set_meanwhile() {
    let (client, mut api) = mock_client();
    let h = harness(client, &config());
    let pass = tokio::spawn(backfill_namespace(namespace("shop"), h.ctx.clone()));
    let tagged = pod(
        "web-1",
        json!({"app": "web"}),
        json!({"canary-injector.io/tag": "v2"}),
    );
    api.expect(Method::GET, PODS)
        .await
        .ok(&metadata_list(std::slice::from_ref(&tagged), None));
    let call = api.expect(Method::PATCH, &format!("{PODS}/web-1")).await;
    assert_eq!(call.body[0]["value"], "100");
    // Someone labelled it between the list and the patch: the test fails.
    call.fail(
        422,
        "Invalid",
        "the server rejected our request due to an error in our request",
    );
    let call = api.expect(Method::GET, &format!("{PODS}/web-1")).await;
    assert_eq!(call.accept, METADATA);
    let mut changed = tagged.clone();
    changed["metadata"]["resourceVersion"] = json!("105");
    changed["metadata"]["labels"] = json!({"app": "web", "stage": "normal"});
    call.ok(&patched(&changed["metadata"]));
    // Their stage=normal stands: the tag annotation is now ignored (as
    // admission would), and nothing is left to add.
    api.expect(Method::GET, REPLICASETS)
        .await
        .ok(&list("ReplicaSet", &[]));
    finish(api, pass, h.ctx).await;
    assert_eq!(h.counters.applies(), 0);
}

#[tokio::test]
async fn an_object_that_keeps_changing_is_left_for_the_next_pass() {
    let (client, mut api) = mock_client();
    let h = harness(client, &config());
    let pass = tokio::spawn(backfill_namespace(namespace("shop"), h.ctx.clone()));
    let unlabelled = pod("web-1", json!({"app": "web"}), json!({}));
    api.expect(Method::GET, PODS)
        .await
        .ok(&metadata_list(std::slice::from_ref(&unlabelled), None));
    for version in ["100", "101", "102"] {
        let call = api.expect(Method::PATCH, &format!("{PODS}/web-1")).await;
        assert_eq!(call.body[0]["value"], version);
        call.fail(422, "Invalid", "test failed");
        let call = api.expect(Method::GET, &format!("{PODS}/web-1")).await;
        let mut again = unlabelled.clone();
        again["metadata"]["resourceVersion"] =
            json!((version.parse::<u32>().unwrap() + 1).to_string());
        call.ok(&patched(&again["metadata"]));
    }
    api.expect(Method::GET, REPLICASETS)
        .await
        .ok(&list("ReplicaSet", &[]));
    assert_eq!(finish(api, pass, h.ctx).await, Action::requeue(RESYNC));
    assert_eq!(h.counters.errors(CONFLICT), 1);
    assert_eq!(h.counters.applies(), 0);
}

// === outcomes, on a stateful apiserver ===

// === tags on workloads: the owner chain ===

/// The owner cache admission keeps, filled from `fake` by its own watches
/// (metadata only), as the lookup the backfill decides with.
struct Owners(crate::owners::OwnerCache);

impl crate::admission::ClusterLookup for Owners {
    fn view(&self, _: &str) -> ClusterView {
        ClusterView::UNKNOWN
    }
    fn owner_tag(&self, ns: &str, controller: &OwnerRef) -> Option<crate::mutate::OwnerTag> {
        self.0.owner_tag(ns, controller)
    }
    fn workload(&self, ns: &str, controller: &OwnerRef) -> OwnerRef {
        self.0.workload(ns, controller)
    }
    fn owners_synced(&self) -> bool {
        self.0.is_synced()
    }
}

/// A harness whose backfill finds owners' tags through an owner cache
/// watching `fake` (synced before it returns).
async fn harness_with_owners(fake: &FakeApiServer) -> (Harness, CancellationToken) {
    let (client, _served) = fake.client();
    let cfg = config();
    let (cache, watch) = crate::owners::cache(
        client.clone(),
        cfg.labels.tag_annotation.clone(),
        cfg.namespaces.clone(),
    );
    let stop = CancellationToken::new();
    tokio::spawn(watch.run(stop.clone()));
    for _ in 0..200 {
        if cache.is_synced() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(cache.is_synced(), "the owner cache lists");
    let mut h = harness(client, &cfg);
    let settings = BackfillSettings::from_config(&cfg)
        .unwrap()
        .with_cluster_view(Arc::new(Owners(cache)));
    let ctx = Arc::get_mut(&mut h.ctx).unwrap();
    ctx.settings = settings;
    (h, stop)
}

const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/shop/deployments";

/// A Deployment created before its namespace opted in, tagged on its own
/// metadata only (so the webhook never copied the tag into its template),
/// its ReplicaSet (the Deployment's annotations copied, as the Deployment
/// controller does) and two pods of it.
fn tagged_deployment() -> FakeApiServer {
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop", "uid": DEPLOYMENT_UID,
            "annotations": {"canary-injector.io/tag": "beta",
                            "deployment.kubernetes.io/revision": "1"}},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}});
    let mut rs = replicaset("web-abc", json!({"app": "web", "pod-template-hash": "abc"}));
    rs["metadata"]["uid"] = json!(RS_UID);
    rs["metadata"]["annotations"] = json!({"canary-injector.io/tag": "beta",
        "deployment.kubernetes.io/revision": "1"});
    FakeApiServer::with(&[
        (&format!("{DEPLOYMENTS}/web"), deployment),
        (&format!("{REPLICASETS}/web-abc"), rs),
        (
            &format!("{PODS}/web-1"),
            pod("web-1", json!({"app": "web"}), json!({})),
        ),
        (
            &format!("{PODS}/web-2"),
            pod("web-2", json!({"app": "web"}), json!({})),
        ),
    ])
}

/// The label patches sent, by path, in order.
fn label_patches(fake: &FakeApiServer) -> Vec<(String, Value)> {
    patches(fake)
        .into_iter()
        .map(|(path, mut body)| {
            // The resourceVersion the fake assigned: not the point here.
            body[0]["value"] = json!("<rv>");
            (path, body)
        })
        .collect()
}

fn gray_beta() -> Value {
    json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": "<rv>"},
        {"op": "add", "path": "/metadata/labels/canarytag", "value": "beta"},
        {"op": "add", "path": "/metadata/labels/stage", "value": "gray"},
    ])
}

/// The issue's case: a Deployment tagged on its metadata before its
/// namespace opted in. Its pods and ReplicaSet become canaries (never
/// `stage=normal`), and the Deployment gets an Event saying so and why.
#[tokio::test]
async fn a_tag_on_a_deployments_metadata_makes_its_pods_canaries() {
    let fake = tagged_deployment();
    let (mut h, stop) = harness_with_owners(&fake).await;
    backfill_namespace(namespace("shop"), h.ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        label_patches(&fake),
        [
            (format!("{PODS}/web-1"), gray_beta()),
            (format!("{PODS}/web-2"), gray_beta()),
            (format!("{REPLICASETS}/web-abc"), gray_beta()),
        ]
    );
    // One Event, on the Deployment, for its pods and its ReplicaSet (whose
    // copy of the annotation the pods' owner chain found).
    let events = h.queue.drain();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].regarding.kind.as_deref(), Some("Deployment"));
    assert_eq!(events[0].regarding.name.as_deref(), Some("web"));
    assert_eq!(events[0].regarding.uid.as_deref(), Some(DEPLOYMENT_UID));
    assert_eq!(
        events[0].note,
        "added canarytag=beta, stage=gray to 2 Pods and 1 ReplicaSet: the annotation \
         canary-injector.io/tag=beta on this Deployment's own metadata asks for a canary (its \
         pod template does not carry it), so its pods are labelled as canaries, and new ones \
         are admitted the same way (no restart needed); put the annotation in the pod template \
         to make it explicit"
    );
    assert!(events.iter().all(|e| e.type_ == EventType::Normal));
    stop.cancel();
}

/// Pod -> StatefulSet: the StatefulSet's own metadata.
#[tokio::test]
async fn a_tag_on_a_statefulsets_metadata_makes_its_pods_canaries() {
    let sts = json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "db", "namespace": "shop", "uid": "sts-uid",
                     "annotations": {"canary-injector.io/tag": "beta"}},
        "spec": {"selector": {"matchLabels": {"app": "db"}},
                 "template": {"metadata": {"labels": {"app": "db"}}}}});
    let mut db0 = pod("db-0", json!({"app": "db"}), json!({}));
    db0["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1",
        "kind": "StatefulSet", "name": "db", "uid": "sts-uid", "controller": true}]);
    let fake = FakeApiServer::with(&[
        ("/apis/apps/v1/namespaces/shop/statefulsets/db", sts),
        (&format!("{PODS}/db-0"), db0),
    ]);
    let (mut h, stop) = harness_with_owners(&fake).await;
    backfill_namespace(namespace("shop"), h.ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        label_patches(&fake),
        [(format!("{PODS}/db-0"), gray_beta())]
    );
    let events = h.queue.drain();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].regarding.kind.as_deref(), Some("StatefulSet"));
    assert_eq!(events[0].regarding.uid.as_deref(), Some("sts-uid"));
    assert!(
        events[0]
            .note
            .contains("on this StatefulSet's own metadata")
    );
    stop.cancel();
}

/// Pod -> Job -> CronJob: the CronJob's own metadata (a CronJob copies
/// its job template's metadata onto its Jobs, not its own).
#[tokio::test]
async fn a_tag_on_a_cronjobs_metadata_makes_the_pods_of_its_jobs_canaries() {
    let cronjob = json!({"apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": "nightly", "namespace": "shop", "uid": "cj-uid",
                     "annotations": {"canary-injector.io/tag": "beta"}},
        "spec": {"schedule": "0 2 * * *", "jobTemplate": {"spec": {"template": {"spec": {}}}}}});
    let job = json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "nightly-29000", "namespace": "shop", "uid": "job-uid",
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob",
                         "name": "nightly", "uid": "cj-uid", "controller": true}]},
        "spec": {"template": {"spec": {}}}});
    let mut run = pod(
        "nightly-29000-x",
        json!({"job-name": "nightly-29000"}),
        json!({}),
    );
    run["metadata"]["ownerReferences"] = json!([{"apiVersion": "batch/v1", "kind": "Job",
        "name": "nightly-29000", "uid": "job-uid", "controller": true}]);
    let fake = FakeApiServer::with(&[
        ("/apis/batch/v1/namespaces/shop/cronjobs/nightly", cronjob),
        ("/apis/batch/v1/namespaces/shop/jobs/nightly-29000", job),
        (&format!("{PODS}/nightly-29000-x"), run),
    ]);
    let (mut h, stop) = harness_with_owners(&fake).await;
    backfill_namespace(namespace("shop"), h.ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        label_patches(&fake),
        [(format!("{PODS}/nightly-29000-x"), gray_beta())]
    );
    let events = h.queue.drain();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].regarding.kind.as_deref(), Some("CronJob"));
    assert_eq!(events[0].regarding.name.as_deref(), Some("nightly"));
    stop.cancel();
}

/// A pod already labelled `stage=normal` whose Deployment asks for a
/// canary: its labels are never overwritten; one Warning on the Deployment
/// (not one per pod, and not again on the next pass) names the pods and
/// the command that fixes it.
#[tokio::test]
async fn a_pod_labelled_normal_that_its_workload_wants_a_canary_is_warned_about_once() {
    let fake = tagged_deployment();
    for name in ["web-1", "web-2"] {
        let path = format!("{PODS}/{name}");
        let mut p = fake.get(&path).unwrap();
        p["metadata"]["labels"]["stage"] = json!("normal");
        fake.put(&path, p);
    }
    let (mut h, stop) = harness_with_owners(&fake).await;
    for _ in 0..2 {
        backfill_namespace(namespace("shop"), h.ctx.clone())
            .await
            .unwrap();
    }
    let patched: Vec<String> = label_patches(&fake).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        patched,
        [format!("{REPLICASETS}/web-abc")],
        "no pod is touched"
    );
    for name in ["web-1", "web-2"] {
        assert_eq!(labels(&fake, &format!("{PODS}/{name}"))["stage"], "normal");
    }
    let warnings: Vec<EventRequest> = h
        .queue
        .drain()
        .into_iter()
        .filter(|e| e.type_ == EventType::Warning)
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = &warnings[0];
    assert_eq!(w.reason, "CanaryLabelledNormal");
    assert_eq!(w.regarding.kind.as_deref(), Some("Deployment"));
    assert_eq!(w.regarding.name.as_deref(), Some("web"));
    assert_eq!(
        w.note,
        "web-1, web-2: labelled stage=normal, but this Deployment asks for canary beta: canary \
         code in the normal subset, serving requests without the header. Labels are never \
         overwritten; fix: kubectl -n shop rollout restart deployment/web"
    );
    stop.cancel();
}

/// The backfill waits for the owner cache: a pass before it has listed
/// could label a canary's pods `stage=normal` for good.
#[tokio::test]
async fn no_pass_before_the_owner_cache_has_listed() {
    let fake = tagged_deployment();
    let (client, _served) = fake.client();
    let cfg = config();
    let (cache, _watch) = crate::owners::cache(
        client.clone(),
        cfg.labels.tag_annotation.clone(),
        cfg.namespaces.clone(),
    );
    let mut h = harness(client, &cfg);
    Arc::get_mut(&mut h.ctx).unwrap().settings = BackfillSettings::from_config(&cfg)
        .unwrap()
        .with_cluster_view(Arc::new(Owners(cache)));
    let action = backfill_namespace(namespace("shop"), h.ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(OWNERS_NOT_SYNCED));
    assert!(
        fake.seen().iter().all(|c| !c.path.starts_with(PODS)),
        "nothing listed"
    );
}

/// A running pod of `tests/fixtures/bootstrap-pods/` (a review's object:
/// Istio-injected, of the ReplicaSet `checkout-7d9f8b6c5d`), named `name`.
fn istio_pod(review: &str, name: &str) -> Value {
    let doc: Value = serde_json::from_str(review).unwrap();
    let mut pod = doc["request"]["object"].clone();
    pod["metadata"]["name"] = json!(name);
    pod["metadata"]["namespace"] = json!("shop");
    pod
}

/// What a restart would give each labelled Istio pod, by its proxy's
/// version: counted by reason, and said per reason in its owner's Event.
#[tokio::test]
async fn istio_pods_are_reported_by_what_a_restart_would_give_them() {
    let fixture = |f: &str| match f {
        "1.5" => include_str!("../../tests/fixtures/bootstrap-pods/injected-1.5.review.json"),
        "1.7" => include_str!("../../tests/fixtures/bootstrap-pods/injected-1.7.review.json"),
        "1.12" => include_str!("../../tests/fixtures/bootstrap-pods/injected-1.12.review.json"),
        "1.22" => include_str!("../../tests/fixtures/bootstrap-pods/injected-1.22.review.json"),
        _ => include_str!("../../tests/fixtures/bootstrap-pods/native-sidecar-1.27.review.json"),
    };
    let mut unknown = istio_pod(fixture("1.22"), "checkout-unknown");
    unknown["spec"]["containers"][1]["image"] = json!("docker.io/istio/proxyv2:latest");
    let mut plain = istio_pod(fixture("1.5"), "checkout-plain");
    plain["metadata"]["annotations"] = json!({});
    plain["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("ownerReferences");
    plain["spec"]["containers"] = json!([{"name": "checkout", "image": "shop/checkout:1"}]);
    let pods = [
        istio_pod(fixture("1.5"), "checkout-15"),
        istio_pod(fixture("1.7"), "checkout-17"),
        istio_pod(fixture("1.12"), "checkout-112"),
        istio_pod(fixture("1.22"), "checkout-122"),
        istio_pod(fixture("1.27"), "checkout-127"),
        unknown,
        plain,
    ];
    let paths: Vec<(String, Value)> = pods
        .iter()
        .map(|p| {
            (
                format!("{PODS}/{}", p["metadata"]["name"].as_str().unwrap()),
                p.clone(),
            )
        })
        .collect();
    let refs: Vec<(&str, Value)> = paths.iter().map(|(p, o)| (p.as_str(), o.clone())).collect();
    let fake = FakeApiServer::with(&refs);
    let (client, server) = fake.client();
    let mut h = harness(client, &config());
    backfill_namespace(namespace("shop"), h.ctx.clone())
        .await
        .unwrap();

    let calls = fake.calls();
    let whole_reads: Vec<&str> = calls
        .iter()
        .filter(|c| c.method == Method::GET && c.path.starts_with(&format!("{PODS}/")))
        .map(|c| c.path.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(
        whole_reads,
        [
            "checkout-112",
            "checkout-122",
            "checkout-127",
            "checkout-15",
            "checkout-17",
            "checkout-unknown",
        ],
        "each Istio pod read whole once; the others not at all"
    );
    for (path, pod) in &paths {
        let after = fake.get(path).unwrap();
        assert_eq!(after["metadata"]["labels"]["stage"], "normal", "{path}");
        assert_eq!(after["spec"], pod["spec"], "labels only: {path}");
    }
    for (reason, n) in [
        ("template", 2),
        ("agent-keepalive", 2),
        ("istio-version-unknown", 1),
    ] {
        let line = format!(
            "canary_injector_backfill_restart_for_bootstrap_total{{reason=\"{reason}\"}} {n}"
        );
        assert!(scraped(&h.registry, &line), "{line}");
    }
    let events = h.queue.drain();
    assert_eq!(events.len(), 2, "{events:?}");
    let on_rs = events
        .iter()
        .find(|e| e.regarding.name.as_deref() == Some("checkout-7d9f8b6c5d"))
        .unwrap();
    assert_eq!(
        on_rs.note,
        "added stage=normal to 6 Pods that lacked them (created before the namespace opted in or \
         before the webhook ran, or their labels were removed since; no restart needed); 2 of them run an Istio 1.5-1.7 sidecar without the bootstrap keepalive \
         template: restart them to mount it; 2 of them run an Istio 1.18+ sidecar without \
         GRPC_KEEPALIVE_INTERVAL and GRPC_KEEPALIVE_TIMEOUT: restart them to set the agent \
         keepalive; the Istio version of 1 of them is unknown (no version in the proxy image \
         tag; set istio.proxyVersion): whether a restart would change their keepalive cannot \
         be told"
    );
    drop(h);
    server.await.unwrap();
}

#[tokio::test]
async fn opted_out_mirror_and_labelled_pods_are_left_alone() {
    let objects = [
        ("a", pod("a", json!({"app": "web"}), json!({}))),
        (
            "opted-out",
            pod(
                "opted-out",
                json!({"canary-injector.io/inject": "false"}),
                json!({}),
            ),
        ),
        (
            "mirror",
            pod(
                "mirror",
                json!({}),
                json!({"kubernetes.io/config.mirror": "abc"}),
            ),
        ),
        (
            "labelled",
            pod(
                "labelled",
                json!({"stage": "gray", "canarytag": "v1"}),
                json!({}),
            ),
        ),
    ];
    let paths: Vec<(String, Value)> = objects
        .iter()
        .map(|(n, o)| (format!("{PODS}/{n}"), o.clone()))
        .collect();
    let refs: Vec<(&str, Value)> = paths.iter().map(|(p, o)| (p.as_str(), o.clone())).collect();
    let fake = FakeApiServer::with(&refs);
    let (client, server) = fake.client();
    let h = harness(client, &config());
    backfill_namespace(namespace("shop"), h.ctx.clone())
        .await
        .unwrap();
    let sent = patches(&fake);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, format!("{PODS}/a"));
    for (name, before) in &objects[1..] {
        assert_eq!(
            fake.get(&format!("{PODS}/{name}")).unwrap()["metadata"]["labels"],
            before["metadata"]["labels"],
            "{name}"
        );
    }
    drop(h);
    server.await.unwrap();
}

#[tokio::test]
async fn excluded_namespaces_are_not_even_listed() {
    let (client, api) = mock_client();
    let h = harness(client, &config());
    for ns in [
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "canary-injector",
    ] {
        // Labelled to opt in all the same.
        let action = backfill_namespace(namespace(ns), h.ctx.clone())
            .await
            .unwrap();
        assert_eq!(action, Action::await_change(), "{ns}");
    }
    drop(h);
    api.expect_no_more().await;
}

#[tokio::test]
async fn every_page_is_read_and_a_second_pass_writes_nothing() {
    // 1,201 pods, pages of 500: the last two lack their labels.
    let mut objects = Vec::new();
    for i in 0..1201 {
        let labels = if i < 1199 {
            json!({"app": "web", "stage": "normal"})
        } else {
            json!({"app": "web"})
        };
        objects.push((
            format!("{PODS}/web-{i:04}"),
            pod(&format!("web-{i:04}"), labels, json!({})),
        ));
    }
    let refs: Vec<(&str, Value)> = objects
        .iter()
        .map(|(p, o)| (p.as_str(), o.clone()))
        .collect();
    let fake = FakeApiServer::with(&refs);
    let (client, server) = fake.client();
    let h = harness(client, &config());
    backfill_namespace(namespace("shop"), h.ctx.clone())
        .await
        .unwrap();
    let calls = fake.calls();
    let pod_lists: Vec<Option<&str>> = calls
        .iter()
        .filter(|c| c.method == Method::GET && c.path == PODS)
        .map(|c| c.query.get("continue").map(String::as_str))
        .collect();
    assert_eq!(pod_lists, [None, Some("500"), Some("1000")]);
    let patched: Vec<&str> = calls
        .iter()
        .filter(|c| c.method == Method::PATCH)
        .map(|c| c.path.as_str())
        .collect();
    assert_eq!(
        patched,
        [format!("{PODS}/web-1199"), format!("{PODS}/web-1200")]
    );
    // Idempotent: the cluster holds the progress.
    backfill_namespace(namespace("shop"), h.ctx.clone())
        .await
        .unwrap();
    assert!(fake.calls().iter().all(|c| !c.is_write()));
    drop(h);
    server.await.unwrap();
}

#[tokio::test]
async fn a_failed_list_is_an_error_counted_by_reason() {
    let fake = FakeApiServer::default();
    fake.outage(Some(500));
    let (client, server) = fake.client();
    let h = harness(client, &config());
    let ns = namespace("shop");
    let error = backfill_namespace(ns.clone(), h.ctx.clone())
        .await
        .unwrap_err();
    assert!(matches!(error, BackfillError::List(_)), "{error}");
    assert_eq!(
        on_error(ns, &error, h.ctx.clone()),
        Action::requeue(ERROR_REQUEUE)
    );
    assert_eq!(h.counters.errors("list"), 1);
    drop(h);
    server.await.unwrap();
}

// === the pace ===

#[tokio::test(start_paused = true)]
async fn patches_keep_the_configured_pace() {
    let mut cfg = config();
    cfg.backfill.patches_per_second = 5;
    let (client, mut api) = mock_client();
    let h = harness(client, &cfg);
    let pass = tokio::spawn(backfill_namespace(namespace("shop"), h.ctx.clone()));
    api.expect(Method::GET, PODS).await.ok(&unlabelled_pods(10));
    let mut at = Vec::new();
    for i in 0..10 {
        let call = api.expect(Method::PATCH, &format!("{PODS}/web-{i}")).await;
        at.push(Instant::now());
        call.ok(&patched(&json!({"name": format!("web-{i}")})));
    }
    api.expect(Method::GET, REPLICASETS)
        .await
        .ok(&list("ReplicaSet", &[]));
    finish(api, pass, h.ctx).await;
    for pair in at.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(200) && gap < Duration::from_millis(210),
            "{gap:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_pace_is_shared_by_namespaces_and_a_stop_ends_the_wait() {
    let pacer = Pacer::new(2);
    let stop = CancellationToken::new();
    let start = Instant::now();
    assert!(pacer.wait(&stop).await, "the first slot is now");
    assert!(pacer.wait(&stop).await);
    assert_eq!(start.elapsed(), Duration::from_millis(500));
    // A third waiter (another namespace) is stopped while it waits.
    let waiting = pacer.wait(&stop);
    stop.cancel();
    assert!(!waiting.await);
    assert_eq!(start.elapsed(), Duration::from_millis(500));
}

#[tokio::test(start_paused = true)]
async fn leadership_lost_mid_pass_stops_it_at_the_next_patch() {
    let mut cfg = config();
    cfg.backfill.patches_per_second = 1;
    let (client, mut api) = mock_client();
    let h = harness(client, &cfg);
    let pass = tokio::spawn(backfill_namespace(namespace("shop"), h.ctx.clone()));
    api.expect(Method::GET, PODS).await.ok(&unlabelled_pods(5));
    let call = api.expect(Method::PATCH, &format!("{PODS}/web-0")).await;
    call.ok(&patched(&json!({"name": "web-0"})));
    h.ctx.shutdown.cancel();
    let action = timeout(Duration::from_millis(10), pass)
        .await
        .expect("stopped without waiting for the pace")
        .unwrap()
        .unwrap();
    assert_eq!(action, Action::requeue(RESYNC));
    assert_eq!(h.counters.applies(), 1);
    drop(h);
    api.expect_no_more().await;
}

// === the controller: triggered when a namespace opts in ===

#[tokio::test]
async fn a_namespace_that_opts_in_gets_a_pass() {
    let path = format!("{PODS}/web-1");
    let fake = FakeApiServer::with(&[(
        path.as_str(),
        pod("web-1", json!({"app": "web"}), json!({})),
    )]);
    let (client, server) = fake.client();
    let registry = new_registry();
    let counters = ControllerMetrics::register(&registry)
        .unwrap()
        .controller(CONTROLLER, &BackfillError::REASONS);
    let namespaces = Shared::<Namespace>::new();
    let (subscription, store) = (namespaces.subscribe(), namespaces.store());
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let stop = CancellationToken::new();
    let watch = tokio::spawn(namespaces.run_stream(rx, "namespaces", stop.clone()));
    let backfill = tokio::spawn(run_backfill(
        client,
        BackfillSettings::from_config(&config()).unwrap(),
        subscription,
        store,
        counters.clone(),
        BackfillMetrics::register(&registry).unwrap(),
        EventSink::disabled(),
        stop.clone(),
    ));
    // No namespace has opted in yet.
    for event in [watcher::Event::Init, watcher::Event::InitDone] {
        tx.unbounded_send(Ok(event)).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(fake.seen().is_empty());
    // `kubectl label namespace shop canary-injection=enabled`.
    tx.unbounded_send(Ok(watcher::Event::Apply((*namespace("shop")).clone())))
        .unwrap();
    timeout(WAIT, async {
        while labels(&fake, &path).get("stage").is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the opted-in namespace was backfilled");
    assert_eq!(
        labels(&fake, &path),
        json!({"app": "web", "stage": "normal"})
    );
    stop.cancel();
    timeout(WAIT, backfill).await.unwrap().unwrap();
    timeout(WAIT, watch).await.unwrap().unwrap().unwrap();
    assert_eq!(counters.applies(), 1);
    server.await.unwrap();
}

#[test]
fn settings_follow_the_config() {
    let mut cfg = config();
    let s = BackfillSettings::from_config(&cfg).unwrap();
    assert_eq!(s.patches_per_second, 20);
    assert!(s.reports_restarts());
    assert_eq!(s.list_selector(), "canary-injector.io/inject!=false");
    assert_eq!(
        s.cluster_view("shop"),
        crate::mutate::ClusterView::UNKNOWN,
        "no view until one is given"
    );
    let version = crate::mutate::Version {
        major: 1,
        minor: 22,
    };
    let s = s.with_cluster_view(Arc::new(move |_: &str| crate::mutate::ClusterView {
        bootstrap_configmap: crate::mutate::Availability::Present,
        injector_version: Some(version),
        mesh: Default::default(),
    }));
    assert_eq!(s.cluster_view("shop").injector_version, Some(version));
    cfg.labels.opt_out_label = "example.com/skip".into();
    cfg.bootstrap.enabled = false;
    let s = BackfillSettings::from_config(&cfg).unwrap();
    assert_eq!(s.list_selector(), "example.com/skip!=false");
    assert!(!s.reports_restarts());
    cfg.backfill.enabled = false;
    assert!(BackfillSettings::from_config(&cfg).is_none());
}

#[test]
fn status_codes_tell_conflicts_from_failures() {
    let api_error = |code| {
        kube::Error::Api(
            kube::core::Status::failure("x", "y")
                .with_code(code)
                .boxed(),
        )
    };
    assert!(is_status(&api_error(422), &[409, 422]));
    assert!(!is_status(&api_error(500), &[409, 422]));
    assert!(!is_status(
        &kube::Error::Discovery(kube::error::DiscoveryError::MissingResource("x".into())),
        &[422]
    ));
}

/// A `Status` body as the apiserver sends it, read as kube reads it.
fn api_error(body: Value) -> kube::Error {
    kube::Error::Api(
        serde_json::from_value::<kube::core::Status>(body)
            .unwrap()
            .boxed(),
    )
}

/// The 422 of a JSON Patch whose `test` failed, as the apiserver answers
/// it (`NewGenericServerResponse`: a generic message, no causes).
fn failed_test() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "the server rejected our request due to an error in our request",
           "reason": "Invalid", "details": {}, "code": 422})
}

/// A validation error (`NewInvalid`): the object and the fields named.
fn validation_error(name: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("Pod \"{name}\" is invalid: metadata.labels: Invalid value: \
                               \"gray\": must be no more than 63 characters"),
           "reason": "Invalid",
           "details": {"name": name, "kind": "Pod", "causes": [{
               "reason": "FieldValueInvalid",
               "message": "Invalid value: \"gray\": must be no more than 63 characters",
               "field": "metadata.labels"}]},
           "code": 422})
}

#[test]
fn a_failed_test_is_told_from_a_validation_error() {
    assert!(is_failed_test(&api_error(failed_test())));
    // Versions that pass the patch library's error on as a cause.
    let mut with_cause = failed_test();
    with_cause["details"] = json!({"causes": [{"reason": "UnexpectedServerResponse",
        "message": "testing value /metadata/resourceVersion failed: test failed"}]});
    assert!(is_failed_test(&api_error(with_cause)));
    let mut in_message = failed_test();
    in_message["message"] = json!("Testing value /metadata/resourceVersion failed");
    assert!(is_failed_test(&api_error(in_message)));
    // Not one.
    assert!(!is_failed_test(&api_error(validation_error("web-1"))));
    let mut other = failed_test();
    other["code"] = json!(500);
    assert!(!is_failed_test(&api_error(other)));
    let mut denied = validation_error("web-1");
    denied["message"] = json!("admission webhook \"policy.example.com\" denied the request");
    denied["details"] = json!({});
    assert!(!is_failed_test(&api_error(denied)));
}

/// A 422 that is not a failed test (the apiserver refuses the labels) is
/// counted as `invalid` and left: no second read, no retry, and the pass
/// goes on with the next object.
#[tokio::test]
async fn a_validation_error_is_counted_and_not_retried() {
    let (client, mut api) = mock_client();
    let h = harness(client, &config());
    let pass = tokio::spawn(backfill_namespace(namespace("shop"), h.ctx.clone()));
    let pods = [
        pod("web-1", json!({"app": "web"}), json!({})),
        pod("web-2", json!({"app": "web"}), json!({})),
    ];
    api.expect(Method::GET, PODS)
        .await
        .ok(&metadata_list(&pods, None));
    let call = api.expect(Method::PATCH, &format!("{PODS}/web-1")).await;
    let body = validation_error("web-1");
    call.respond(http::StatusCode::UNPROCESSABLE_ENTITY, &body);
    // Straight on to the next pod: web-1 is not read again.
    let call = api.expect(Method::PATCH, &format!("{PODS}/web-2")).await;
    call.ok(&patched(&pods[1]["metadata"]));
    api.expect(Method::GET, REPLICASETS)
        .await
        .ok(&list("ReplicaSet", &[]));
    assert_eq!(finish(api, pass, h.ctx).await, Action::requeue(RESYNC));
    assert_eq!(h.counters.errors(INVALID), 1);
    assert_eq!(h.counters.errors(CONFLICT), 0);
    assert_eq!(h.counters.applies(), 1);
}

/// The generic 422 whose object turns out unchanged when read again: the
/// test did not fail, the patch did; counted as `invalid`, not patched
/// again (and not three times as a "conflict").
#[tokio::test]
async fn a_generic_422_on_an_unchanged_object_is_not_a_conflict() {
    let (client, mut api) = mock_client();
    let h = harness(client, &config());
    let pass = tokio::spawn(backfill_namespace(namespace("shop"), h.ctx.clone()));
    let unlabelled = pod("web-1", json!({"app": "web"}), json!({}));
    api.expect(Method::GET, PODS)
        .await
        .ok(&metadata_list(std::slice::from_ref(&unlabelled), None));
    let call = api.expect(Method::PATCH, &format!("{PODS}/web-1")).await;
    call.respond(http::StatusCode::UNPROCESSABLE_ENTITY, &failed_test());
    api.expect(Method::GET, &format!("{PODS}/web-1"))
        .await
        .ok(&patched(&unlabelled["metadata"]));
    api.expect(Method::GET, REPLICASETS)
        .await
        .ok(&list("ReplicaSet", &[]));
    finish(api, pass, h.ctx).await;
    assert_eq!(h.counters.errors(INVALID), 1);
    assert_eq!(h.counters.errors(CONFLICT), 0);
}

/// On the stateful apiserver: the refused pod keeps its labels, the others
/// get theirs, and the metric says why.
#[tokio::test]
async fn refused_labels_leave_the_object_as_it_is_and_the_rest_labelled() {
    let (a, b) = (format!("{PODS}/web-1"), format!("{PODS}/web-2"));
    let fake = FakeApiServer::with(&[
        (a.as_str(), pod("web-1", json!({"app": "web"}), json!({}))),
        (b.as_str(), pod("web-2", json!({"app": "web"}), json!({}))),
    ]);
    fake.hook(Method::PATCH, &a, Hook::Reject(validation_error("web-1")));
    let (client, server) = fake.client();
    let h = harness(client, &config());
    backfill_namespace(namespace("shop"), h.ctx.clone())
        .await
        .unwrap();
    assert_eq!(labels(&fake, &a), json!({"app": "web"}));
    assert_eq!(labels(&fake, &b), json!({"app": "web", "stage": "normal"}));
    assert_eq!(patches(&fake).len(), 2, "one patch each, none retried");
    assert!(scraped(
        &h.registry,
        r#"canary_injector_reconcile_errors_total{controller="backfill",reason="invalid"} 1"#
    ));
    assert!(scraped(
        &h.registry,
        r#"canary_injector_reconcile_errors_total{controller="backfill",reason="conflict"} 0"#
    ));
    drop(h);
    server.await.unwrap();
}
