//! Events and counters a review leaves behind: on the owner of what a
//! controller created, never on the review's path.

use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use prometheus::Registry;
use serde_json::{Value, json};

use super::*;
use crate::cluster::events::{EventMetrics, EventQueue, EventSink};
use crate::config::Config;
use crate::metrics::{Metrics, new_registry};
use crate::server::{Limits, handle};
use crate::testing::scraped;

const RS_UID: &str = "5c1b1e2a-7f3d-4e8a-9b6c-1d2e3f4a5b6c";

/// A pod the ReplicaSet `checkout-7d9f8b6c5d` creates, with `annotations`.
fn owned_pod_review(annotations: Value) -> Value {
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "e1a2b3c4-0000-4000-8000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": "checkout-7d9f8b6c5d-", "namespace": "shop",
                    "labels": {"app": "checkout", "pod-template-hash": "7d9f8b6c5d"},
                    "annotations": annotations,
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                        "name": "checkout-7d9f8b6c5d", "uid": RS_UID,
                        "controller": true, "blockOwnerDeletion": true}]},
                "spec": {"containers": [{"name": "checkout", "image": "shop/checkout:2.4.1"}]}}}})
}

fn rewritten_tag() -> Value {
    json!({"canary-injector.io/tag": "feature/Payment_v2"})
}

struct Harness {
    state: State,
    queue: EventQueue,
    registry: Registry,
}

/// A server state whose events go to a queue of `capacity` the test holds.
fn harness(capacity: usize) -> Harness {
    let registry = new_registry();
    let metrics = Metrics::register(&registry).unwrap();
    let event_metrics = EventMetrics::register(&registry).unwrap();
    let (sink, queue) = EventSink::channel(capacity, event_metrics);
    let state =
        State::new(Arc::new(Config::default()), metrics, Limits::default()).with_events(sink);
    state.set_ready(true);
    Harness {
        state,
        queue,
        registry,
    }
}

fn request(review: &Value) -> Request<Full<Bytes>> {
    Request::post("/mutate?timeout=5s")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(review.to_string())))
        .unwrap()
}

/// Answers `review` and requires that the answer never waited: the whole
/// review completes in one poll (a full or stuck event queue included).
async fn answer_at_once(state: &State, review: &Value) -> Value {
    let resp = handle(request(review), state)
        .now_or_never()
        .expect("the review waited on something");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn a_rewritten_tag_on_an_owned_pod_is_an_event_on_its_replicaset() {
    let mut h = harness(8);
    let out = answer_at_once(&h.state, &owned_pod_review(rewritten_tag())).await;
    assert_eq!(out["response"]["allowed"], true);
    let events = h.queue.drain();
    assert_eq!(
        events,
        [EventRequest {
            regarding: ObjectReference {
                api_version: Some("apps/v1".into()),
                kind: Some("ReplicaSet".into()),
                name: Some("checkout-7d9f8b6c5d".into()),
                namespace: Some("shop".into()),
                uid: Some(RS_UID.into()),
                ..ObjectReference::default()
            },
            type_: EventType::Warning,
            reason: "TagRewritten".into(),
            action: "Admit".into(),
            note: "Pod checkout-7d9f8b6c5d-*: annotation canary-injector.io/tag: \
                   \"feature/Payment_v2\" is not a valid label value; using \"feature-Payment_v2\""
                .into(),
        }]
    );
    assert!(
        scraped(&h.registry, "canary_injector_tags_rewritten_total 0"),
        "the pod inherits the tag from its ReplicaSet's template: counted where it is set"
    );
}

#[tokio::test]
async fn a_deny_of_an_owned_pod_is_an_event_on_its_replicaset() {
    let mut h = harness(8);
    let review = owned_pod_review(json!({"canary-injector.io/tag": "///"}));
    let out = answer_at_once(&h.state, &review).await;
    assert_eq!(out["response"]["allowed"], false);
    let events = h.queue.drain();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e.type_, EventType::Warning);
    assert_eq!(e.reason, "DeniedUnusableTag");
    assert_eq!(e.action, "Deny");
    assert_eq!(e.regarding.uid.as_deref(), Some(RS_UID));
    let message = out["response"]["status"]["message"].as_str().unwrap();
    assert_eq!(e.note, format!("Pod checkout-7d9f8b6c5d-*: {message}"));
}

#[tokio::test]
async fn dry_runs_leave_nothing_behind() {
    let mut h = harness(8);
    let mut review = owned_pod_review(rewritten_tag());
    review["request"]["dryRun"] = json!(true);
    let out = answer_at_once(&h.state, &review).await;
    assert_eq!(
        out["response"]["warnings"].as_array().map(Vec::len),
        Some(1),
        "the same answer"
    );
    assert!(h.queue.drain().is_empty());
    assert!(scraped(
        &h.registry,
        "canary_injector_tags_rewritten_total 0"
    ));
}

#[tokio::test]
async fn an_object_without_an_owner_gets_no_event() {
    // Its creator saw the warning in the API response.
    let mut h = harness(8);
    let mut review = owned_pod_review(rewritten_tag());
    review["request"]["object"]["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("ownerReferences");
    answer_at_once(&h.state, &review).await;
    assert!(h.queue.drain().is_empty());
    assert!(scraped(
        &h.registry,
        "canary_injector_tags_rewritten_total 1"
    ));
    // A non-controller owner is not the one that created it.
    let mut review = owned_pod_review(rewritten_tag());
    review["request"]["object"]["metadata"]["ownerReferences"][0]["controller"] = json!(false);
    answer_at_once(&h.state, &review).await;
    assert!(h.queue.drain().is_empty());
}

/// A Deployment created `stage=gray` in its pod template without a tag: no
/// subset selects its pods. The creator sees the warning, and the
/// Deployment gets an Event of its own (no controller owns it).
#[tokio::test]
async fn a_workload_labelled_gray_without_a_tag_is_warned_about_with_an_event_on_itself() {
    let mut h = harness(8);
    let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "e1a2b3c4-0000-4000-8000-000000000002",
            "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "name": "web", "namespace": "shop", "operation": "CREATE",
            "object": {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web", "stage": "gray"}},
                        "spec": {"containers": [{"name": "web", "image": "web:2"}]}}}}}});
    let out = answer_at_once(&h.state, &review).await;
    let text = "label stage=gray without a canarytag label: no subset selects these pods, so \
                no route reaches them; set the annotation canary-injector.io/tag on the pod \
                template (or remove the label stage=gray)";
    assert_eq!(out["response"]["warnings"], json!([text]));
    let events = h.queue.drain();
    assert_eq!(
        events,
        [EventRequest {
            regarding: ObjectReference {
                api_version: Some("apps/v1".into()),
                kind: Some("Deployment".into()),
                name: Some("web".into()),
                namespace: Some("shop".into()),
                ..ObjectReference::default()
            },
            type_: EventType::Warning,
            reason: "GrayWithoutTag".into(),
            action: "Admit".into(),
            note: text.into(),
        }]
    );
    // A pod its ReplicaSet creates so: on the ReplicaSet, as every warning.
    let mut pod = owned_pod_review(json!({}));
    pod["request"]["object"]["metadata"]["labels"]["stage"] = json!("gray");
    answer_at_once(&h.state, &pod).await;
    let events = h.queue.drain();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].reason, "GrayWithoutTag");
    assert_eq!(events[0].regarding.kind.as_deref(), Some("ReplicaSet"));
}

#[tokio::test]
async fn a_full_event_queue_never_holds_a_review_back() {
    // Nobody drains the queue (a publisher stuck on a slow or failing API
    // server): the first event fills it, every later one is dropped and
    // counted, and every review still answers in one poll with its patch.
    let h = harness(1);
    for i in 0..50 {
        let out = answer_at_once(&h.state, &owned_pod_review(rewritten_tag())).await;
        assert_eq!(out["response"]["patchType"], "JSONPatch", "review {i}");
    }
    assert!(scraped(
        &h.registry,
        r#"canary_injector_events_total{outcome="dropped"} 49"#
    ));
    drop(h.queue);
}

/// The review of `fixture` (`tests/fixtures/workloads/`).
fn workload_review(fixture: &str) -> Value {
    let text = match fixture {
        "deployment-create" => {
            include_str!("../../../tests/fixtures/workloads/deployment-create.review.json")
        }
        "deployment-tag-changed" => {
            include_str!("../../../tests/fixtures/workloads/deployment-tag-changed.review.json")
        }
        "deployment-image-update" => {
            include_str!("../../../tests/fixtures/workloads/deployment-image-update.review.json")
        }
        _ => include_str!(
            "../../../tests/fixtures/workloads/owned-replicaset-tag-on-metadata.review.json"
        ),
    };
    serde_json::from_str(text).unwrap()
}

/// A rewritten tag counts once, on the object that carries it: a
/// Deployment tagged `feature/Payment_v2` counts 1 at its `CREATE`, not
/// again for its ReplicaSet and each of its pods (they inherit the tag from
/// its template), nor at an `UPDATE` that leaves the tag as it is; an
/// `UPDATE` that changes the tag counts again.
#[tokio::test]
async fn a_rewritten_tag_counts_once_per_object_that_carries_it() {
    let h = harness(64);
    let count = |n: u64| {
        assert!(
            scraped(
                &h.registry,
                &format!("canary_injector_tags_rewritten_total {n}")
            ),
            "expected {n}"
        );
    };
    let out = answer_at_once(&h.state, &workload_review("deployment-create")).await;
    assert!(
        out["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("not a valid label value")
    );
    count(1);
    // Its ReplicaSet, tagged in its template (copied from the Deployment's),
    // and three pods created from it.
    let mut rs = workload_review("owned-replicaset-tag-on-metadata");
    rs["request"]["object"]["spec"]["template"]["metadata"]["annotations"] =
        json!({"canary-injector.io/tag": "feature/Payment_v2"});
    let out = answer_at_once(&h.state, &rs).await;
    assert_eq!(out["response"]["allowed"], true);
    for _ in 0..3 {
        answer_at_once(
            &h.state,
            &owned_pod_review(json!({"canary-injector.io/tag": "feature/Payment_v2"})),
        )
        .await;
    }
    count(1);
    // An UPDATE that leaves the tag (here: an image change).
    let mut same = workload_review("deployment-image-update");
    for at in [
        "/request/object/metadata/annotations",
        "/request/object/spec/template/metadata/annotations",
    ] {
        same.pointer_mut(at).unwrap()["canary-injector.io/tag"] = json!("feature/Payment_v2");
    }
    answer_at_once(&h.state, &same).await;
    count(1);
    // An UPDATE that changes it to another one that needs rewriting.
    let mut changed = workload_review("deployment-tag-changed");
    changed["request"]["object"]["metadata"]["annotations"]["canary-injector.io/tag"] =
        json!("feature/Payment_v3");
    let out = answer_at_once(&h.state, &changed).await;
    assert_eq!(out["response"]["patchType"], "JSONPatch");
    count(2);
    // A pod someone creates by hand carries its own tag: counted.
    let mut standalone = owned_pod_review(rewritten_tag());
    standalone["request"]["object"]["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("ownerReferences");
    answer_at_once(&h.state, &standalone).await;
    count(3);
}

#[test]
fn reasons_are_pascal_case() {
    assert_eq!(pascal_case("", "tag-rewritten"), "TagRewritten");
    assert_eq!(pascal_case("", "configmap-missing"), "ConfigmapMissing");
    assert_eq!(
        pascal_case("Denied", "malformed-object"),
        "DeniedMalformedObject"
    );
    for reason in crate::mutate::Warning::REASONS {
        let p = pascal_case("", reason);
        assert!(p.chars().all(|c| c.is_ascii_alphanumeric()), "{p}");
        assert!(p.starts_with(|c: char| c.is_ascii_uppercase()), "{p}");
    }
}

#[tokio::test]
async fn a_stuck_event_publisher_never_holds_a_review_back() {
    use crate::cluster::events::{Pace, publish};
    use crate::cluster::events::{Recorder, Reporter};
    use crate::testing::mock_client;
    use tokio_util::sync::CancellationToken;

    let registry = new_registry();
    let metrics = Metrics::register(&registry).unwrap();
    let event_metrics = EventMetrics::register(&registry).unwrap();
    let (sink, queue) = EventSink::channel(4, event_metrics.clone());
    let state =
        State::new(Arc::new(Config::default()), metrics, Limits::default()).with_events(sink);
    let (client, mut api) = mock_client();
    let stop = CancellationToken::new();
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "canary-injector".into(),
            instance: None,
        },
    );
    let publisher = tokio::spawn(publish(
        queue,
        recorder,
        Pace::default(),
        event_metrics,
        stop.clone(),
    ));
    answer_at_once(&state, &owned_pod_review(rewritten_tag())).await;
    // The API server takes the first Event and never answers.
    let call = api.next().await;
    assert_eq!(call.path, "/apis/events.k8s.io/v1/namespaces/shop/events");
    let stuck = call.park();
    for _ in 0..10 {
        answer_at_once(&state, &owned_pod_review(rewritten_tag())).await;
    }
    // Four wait in the queue, six are dropped; no review waited.
    assert!(scraped(
        &registry,
        r#"canary_injector_events_total{outcome="dropped"} 6"#
    ));
    stop.cancel();
    drop(stuck);
    publisher.await.unwrap().unwrap();
}

/// docs/labels.md "Warnings, and where they go" lists every warning with the
/// Event reason it becomes.
#[test]
fn every_warning_is_documented_with_its_event_reason() {
    let page = include_str!("../../../docs/labels.md");
    let start = page.find("\n## Warnings, and where they go\n").unwrap();
    let section = &page[start..];
    let section = &section[..section[1..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 1)];
    for reason in crate::mutate::Warning::REASONS {
        let row = format!("| `{reason}` (`{}`) |", pascal_case("", reason));
        assert!(section.contains(&row), "{row} missing from docs/labels.md");
    }
}
