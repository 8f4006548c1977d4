//! One test per row of the kinds table (`mutate::KINDS`): what admission
//! does with the kind on `CREATE` and `UPDATE` (through
//! `admission::review`, patch applied as the apiserver would), what
//! `mutate -f` does with it (also in another API group), and the `kind`
//! label its reviews get in the metrics. Adding a
//! row without a test here does not compile (`test_of`).

mod common;

use canary_injector::admission::{self, Outcome, no_cluster};
use canary_injector::config::Config;
use canary_injector::metrics::{Metrics, encode, new_registry};
use canary_injector::mutate::{Kind, KindInfo, Location, SkipReason};
use canary_injector::offline::mutate_documents;
use common::{apply_response, with_object};
use serde_json::{Value, json};

/// Every kind has its test: a new `Kind` variant fails to compile here.
#[allow(dead_code)]
fn test_of(kind: Kind) -> fn() {
    match kind {
        Kind::Pod => pod,
        Kind::ReplicaSet => replicaset,
        Kind::Deployment => deployment,
        Kind::StatefulSet => statefulset,
        Kind::DaemonSet => daemonset,
        Kind::Job => job,
        Kind::CronJob => cronjob,
    }
}

fn api_version(row: &KindInfo) -> String {
    if row.group.is_empty() {
        row.version.to_owned()
    } else {
        format!("{}/{}", row.group, row.version)
    }
}

/// A canary object of the row's kind, shaped like a real one.
fn object(row: &KindInfo) -> Value {
    let pod_spec = json!({"containers": [{"name": "app", "image": "nginx"}]});
    let template = json!({"metadata": {"labels": {"app": "web"}}, "spec": pod_spec});
    let selector = json!({"matchLabels": {"app": "web"}});
    let spec = match row.pod {
        Location::Object => pod_spec,
        Location::PodTemplate => json!({"selector": selector, "template": template}),
        Location::CronJobPodTemplate => json!({"schedule": "*/5 * * * *",
            "jobTemplate": {"spec": {"template": template}}}),
    };
    json!({"apiVersion": api_version(row), "kind": row.name,
           "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"},
                        "annotations": {"canary-injector.io/tag": "v2"}},
           "spec": spec})
}

fn labels_at(object: &Value, location: Location) -> &Value {
    let mut at = object;
    for token in location.tokens() {
        at = &at[*token];
    }
    &at["metadata"]["labels"]
}

/// At admission a workload gets its tag annotation copied into its pod
/// template, and no labels (its pods get them at their own CREATE).
fn assert_tag_in_template(row: &KindInfo, out: &Value, input: &Value) {
    let mut template = out;
    let mut before = input;
    for token in row.pod.tokens() {
        template = &template[*token];
        before = &before[*token];
    }
    assert_eq!(
        template["metadata"]["annotations"],
        json!({"canary-injector.io/tag": "v2"}),
        "{} template",
        row.name
    );
    assert_eq!(
        template["metadata"]["labels"], before["metadata"]["labels"],
        "{} template labels",
        row.name
    );
    assert_eq!(
        out["metadata"], input["metadata"],
        "{} own metadata",
        row.name
    );
    assert_eq!(out["spec"]["selector"], input["spec"]["selector"]);
}

/// The object carries the canary labels exactly where the table says.
fn assert_labelled(row: &KindInfo, out: &Value, input: &Value) {
    let canary = json!({"app": "web", "canarytag": "v2", "stage": "gray"});
    let own = labels_at(out, Location::Object);
    if row.labels_on_object {
        assert_eq!(own, &canary, "{} own labels", row.name);
    } else {
        assert_eq!(own, &input["metadata"]["labels"], "{} own labels", row.name);
    }
    if row.pod != Location::Object {
        assert_eq!(labels_at(out, row.pod), &canary, "{} template", row.name);
    }
    let selector = |v: &Value| v["spec"]["selector"].clone();
    assert_eq!(selector(out), selector(input), "selector never touched");
}

fn review(row: &KindInfo, operation: &str, object: &Value) -> Value {
    let mut review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
           "request": {"uid": "7c1e6a50-0000-4000-8000-000000000001",
                       "kind": {"group": row.group, "version": row.version, "kind": row.name},
                       "resource": {"group": row.group, "version": row.version,
                                    "resource": row.resource},
                       "namespace": "shop", "operation": operation, "object": object}});
    if operation == "UPDATE" {
        review["request"]["oldObject"] = object.clone();
    }
    review
}

fn admit(review: &Value) -> (admission::Reviewed, Value) {
    let cfg = Config::default();
    let r = admission::review(&serde_json::to_vec(review).unwrap(), &cfg, &no_cluster).unwrap();
    let response: Value = serde_json::from_slice(&r.body).unwrap();
    let patched = apply_response(review, &response);
    (r, patched)
}

fn check(kind: Kind) {
    let row = kind.info();
    let input = object(row);

    // Admission: acted on only when the table says so, on the operations
    // its webhook rule names.
    for operation in ["CREATE", "UPDATE", "DELETE"] {
        let review = review(row, operation, &input);
        let (reviewed, patched) = admit(&review);
        if !row.operations().contains(&operation) {
            let reason = if row.admission {
                SkipReason::Operation
            } else {
                SkipReason::Kind
            };
            assert_eq!(
                reviewed.outcome,
                Outcome::Skipped(reason),
                "{} {operation}",
                row.name
            );
            assert_eq!(patched, input);
            continue;
        }
        assert_eq!(
            reviewed.outcome,
            Outcome::Patched,
            "{} {operation}",
            row.name
        );
        if row.labels_on_object {
            assert_labelled(row, &patched, &input);
        } else {
            assert_tag_in_template(row, &patched, &input);
        }
        let (again, _) = admit(&with_object(&review, patched));
        assert_eq!(again.outcome, Outcome::Allowed, "{} re-admitted", row.name);
    }
    let review = review(row, "CREATE", &input);
    // The same name in another group is never ours.
    let mut foreign = review.clone();
    foreign["request"]["kind"]["group"] = json!("example.com");
    assert_eq!(
        admit(&foreign).0.outcome,
        Outcome::Skipped(SkipReason::Kind),
        "{} in example.com",
        row.name
    );

    // Offline: every kind of the table, in its own group only.
    let cfg = Config::default();
    let out = mutate_documents(&input.to_string(), "in.json", &cfg, false).unwrap();
    let out: Value = serde_saphyr::from_str(&out.text).unwrap();
    assert_labelled(row, &out, &input);
    let mut crd = input.clone();
    crd["apiVersion"] = json!("example.com/v1");
    let out = mutate_documents(&crd.to_string(), "in.json", &cfg, true).unwrap();
    assert_eq!(out.text.trim(), "[]", "{} of example.com/v1", row.name);

    // Metrics: the kind's own label when admission acts on it, else `other`.
    let expected = if row.admission { row.name } else { "other" };
    assert_eq!(Kind::metric_label(row.name), expected);
    let registry = new_registry();
    let metrics = Metrics::register(&registry).unwrap();
    metrics.review(row.name, "CREATE", "patched", 0.0001);
    let text = String::from_utf8(encode(&registry)).unwrap();
    assert!(
        text.contains(&format!(
            r#"canary_injector_admission_reviews_total{{kind="{expected}",operation="CREATE",outcome="patched"}} 1"#
        )),
        "{text}"
    );
}

#[test]
fn pod() {
    check(Kind::Pod);
}

#[test]
fn replicaset() {
    check(Kind::ReplicaSet);
}

#[test]
fn deployment() {
    check(Kind::Deployment);
}

#[test]
fn statefulset() {
    check(Kind::StatefulSet);
}

#[test]
fn daemonset() {
    check(Kind::DaemonSet);
}

#[test]
fn job() {
    check(Kind::Job);
}

#[test]
fn cronjob() {
    check(Kind::CronJob);
}
