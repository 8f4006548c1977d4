//! Core rules, table by table. Each test applies the returned patch to the
//! object with `json_patch` and checks the result, then checks that the
//! result needs no second patch.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

fn subject(kind: Kind, namespace: &str, mode: Mode) -> Subject<'_> {
    Subject {
        kind: Some(kind),
        operation: Operation::Create,
        namespace,
        sub_resource: "",
        mode,
        owner_tag: None,
    }
}

/// The policy sections, owned (what `Config` holds in the binary).
#[derive(Debug, Clone, Default)]
struct P {
    labels: LabelPolicy,
    namespaces: NamespacePolicy,
    bootstrap: BootstrapPolicy,
    istio: IstioPolicy,
}

impl P {
    fn policy(&self) -> Policy<'_> {
        Policy {
            labels: &self.labels,
            namespaces: &self.namespaces,
            bootstrap: &self.bootstrap,
            istio: &self.istio,
        }
    }
}

/// A decision with its JSON Patch rendering, owned so tests can keep it.
#[derive(Debug)]
struct Planned {
    ops: Vec<json_patch::PatchOperation>,
    warnings: Vec<String>,
    reasons: Vec<&'static str>,
    skipped: Option<SkipReason>,
    mutations: Vec<&'static str>,
    bootstrap: Option<BootstrapOutcome>,
    intent: Option<(Option<String>, String)>,
    targets: Vec<LabelTarget>,
    noop: bool,
}

/// Decides and renders.
fn plan(s: &Subject<'_>, view: &ObjectView, p: &P, cluster: &ClusterView) -> Result<Planned, Deny> {
    let d = decide(s, view, p.policy(), cluster)?;
    Ok(Planned {
        ops: d.to_json_patch(),
        warnings: d.warnings.iter().map(ToString::to_string).collect(),
        reasons: d.warnings.iter().map(Warning::reason).collect(),
        skipped: d.skipped,
        mutations: d.mutations().collect(),
        bootstrap: d.bootstrap_outcome(),
        intent: d
            .intent
            .as_ref()
            .map(|i| (i.tag().map(str::to_owned), i.stage().to_owned())),
        targets: d.targets.clone(),
        noop: d.is_noop(),
    })
}

/// Decides, applies the patch, decides again; returns the patched object
/// and the first decision. The second decision must have nothing to do.
fn run(kind: Kind, object: Value, cfg: &P) -> (Value, Planned) {
    run_in(kind, "shop", Mode::Admission, object, cfg)
}

fn run_in(kind: Kind, ns: &str, mode: Mode, mut object: Value, cfg: &P) -> (Value, Planned) {
    let view = ObjectView::from_value(object.clone()).unwrap();
    let s = subject(kind, ns, mode);
    let first = plan(&s, &view, cfg, &ClusterView::OFFLINE).expect("not denied");
    assert_eq!(first.noop, first.ops.is_empty(), "{first:?}");
    json_patch::patch(&mut object, &first.ops).expect("patch applies");
    let again = ObjectView::from_value(object.clone()).unwrap();
    let second = plan(&s, &again, cfg, &ClusterView::OFFLINE).unwrap();
    assert!(second.noop, "second pass has work: {second:?}");
    assert!(
        second.ops.is_empty(),
        "second pass patched: {:?}",
        second.ops
    );
    (object, first)
}

fn pod(labels: Value, annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"generateName": "web-", "labels": labels, "annotations": annotations},
           "spec": {"containers": [{"name": "app", "image": "nginx"}]}})
}

/// A Deployment with these annotations on its own metadata and on its pod
/// template.
fn deployment(annotations: Value, template_annotations: Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": "web", "labels": {"app": "web"}, "annotations": annotations},
           "spec": {"selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"},
                                              "annotations": template_annotations},
                                 "spec": {"containers": [{"name": "app", "image": "nginx"}]}}}})
}

fn labels_of(v: &Value) -> &Value {
    &v["metadata"]["labels"]
}

#[test]
fn pod_without_tag_gets_stage_normal_only() {
    let (out, plan) = run(
        Kind::Pod,
        pod(json!({"app": "web"}), json!({})),
        &P::default(),
    );
    assert_eq!(labels_of(&out), &json!({"app": "web", "stage": "normal"}));
    assert!(plan.warnings.is_empty());
    assert_eq!(plan.mutations, ["labels"]);
}

#[test]
fn pod_with_tag_gets_canary_labels() {
    let (out, _) = run(
        Kind::Pod,
        pod(
            json!({"app": "web"}),
            json!({"canary-injector.io/tag": "v2"}),
        ),
        &P::default(),
    );
    assert_eq!(
        labels_of(&out),
        &json!({"app": "web", "canarytag": "v2", "stage": "gray"})
    );
}

#[test]
fn missing_or_null_labels_map_is_created() {
    for labels in [None, Some(Value::Null)] {
        let mut p = pod(json!({}), json!({}));
        let meta = p["metadata"].as_object_mut().unwrap();
        meta.remove("labels");
        if let Some(l) = labels.clone() {
            meta.insert("labels".into(), l);
        }
        let (out, plan) = run(Kind::Pod, p, &P::default());
        assert_eq!(labels_of(&out), &json!({"stage": "normal"}));
        assert_eq!(plan.ops.len(), 1, "one op creates the map");
    }
}

#[test]
fn missing_metadata_is_created() {
    let (out, _) = run(Kind::Pod, json!({"kind": "Pod", "spec": {}}), &P::default());
    assert_eq!(labels_of(&out), &json!({"stage": "normal"}));
}

#[test]
fn existing_labels_are_never_overwritten() {
    // (existing labels, annotation, expected labels, warns)
    let cases = [
        // canarytag present: stage follows it
        (
            json!({"canarytag": "x"}),
            json!({}),
            json!({"canarytag": "x", "stage": "gray"}),
            false,
        ),
        // stage=gray present: the annotation provides the tag
        (
            json!({"stage": "gray"}),
            json!({"canary-injector.io/tag": "t"}),
            json!({"stage": "gray", "canarytag": "t"}),
            false,
        ),
        // stage=normal present: the annotation is ignored, with a warning
        (
            json!({"stage": "normal"}),
            json!({"canary-injector.io/tag": "t"}),
            json!({"stage": "normal"}),
            true,
        ),
        // both present: nothing added, conflicting annotation warned about
        (
            json!({"canarytag": "a", "stage": "gray"}),
            json!({"canary-injector.io/tag": "b"}),
            json!({"canarytag": "a", "stage": "gray"}),
            true,
        ),
        // both present and agreeing: silent
        (
            json!({"canarytag": "b", "stage": "gray"}),
            json!({"canary-injector.io/tag": "b"}),
            json!({"canarytag": "b", "stage": "gray"}),
            false,
        ),
        // a custom stage value is kept and a tag added beside it
        (
            json!({"stage": "beta"}),
            json!({"canary-injector.io/tag": "t"}),
            json!({"stage": "beta", "canarytag": "t"}),
            false,
        ),
        // canarytag + unusable annotation: the label wins, no deny
        (
            json!({"canarytag": "a"}),
            json!({"canary-injector.io/tag": "///"}),
            json!({"canarytag": "a", "stage": "gray"}),
            true,
        ),
    ];
    for (labels, annotations, expected, warns) in cases {
        let (out, plan) = run(Kind::Pod, pod(labels.clone(), annotations), &P::default());
        assert_eq!(labels_of(&out), &expected, "from {labels}");
        assert_eq!(
            !plan.warnings.is_empty(),
            warns,
            "from {labels}: {:?}",
            plan.warnings
        );
    }
}

#[test]
fn invalid_tag_is_sanitized_with_a_warning() {
    let (out, plan) = run(
        Kind::Pod,
        pod(
            json!({}),
            json!({"canary-injector.io/tag": "feature/Login_v2"}),
        ),
        &P::default(),
    );
    assert_eq!(labels_of(&out)["canarytag"], "feature-Login_v2");
    assert_eq!(plan.warnings.len(), 1);
    assert!(plan.warnings[0].contains("\"feature/Login_v2\""));
    assert!(plan.warnings[0].contains("\"feature-Login_v2\""));
}

#[test]
fn unusable_tag_is_denied_naming_the_annotation() {
    for tag in ["", "///", "--"] {
        let view =
            ObjectView::from_value(pod(json!({}), json!({"canary-injector.io/tag": tag}))).unwrap();
        let err = plan(
            &subject(Kind::Pod, "shop", Mode::Admission),
            &view,
            &P::default(),
            &ClusterView::OFFLINE,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Deny::UnusableTag { .. }));
        assert!(msg.contains("canary-injector.io/tag"), "{msg}");
        assert!(msg.contains("[A-Za-z0-9._-]"), "{msg}");
    }
}

#[test]
fn skip_rules() {
    let cfg = P {
        namespaces: NamespacePolicy {
            own: Some("canary-injector".into()),
            ..NamespacePolicy::default()
        },
        ..P::default()
    };
    let plain = pod(json!({}), json!({}));
    let mirror = pod(json!({}), json!({"kubernetes.io/config.mirror": "abc"}));
    let opted_out = pod(json!({"canary-injector.io/inject": "false"}), json!({}));
    let opted_in = pod(json!({"canary-injector.io/inject": "true"}), json!({}));
    let tagged = deployment(json!({"canary-injector.io/tag": "v2"}), json!({}));
    let mut deleting = tagged.clone();
    deleting["metadata"]["deletionTimestamp"] = json!("2024-05-01T10:00:00Z");
    let mut opted_out_deployment = tagged.clone();
    opted_out_deployment["metadata"]["labels"] = json!({"canary-injector.io/inject": "false"});
    let mut job = tagged.clone();
    job["kind"] = json!("Job");
    let base = subject(Kind::Pod, "shop", Mode::Admission);
    let cases: Vec<(Subject<'_>, &Value, Option<SkipReason>)> = vec![
        (
            Subject {
                operation: Operation::Other,
                ..base
            },
            &plain,
            Some(SkipReason::Operation),
        ),
        (
            Subject {
                sub_resource: "ephemeralcontainers",
                ..base
            },
            &plain,
            Some(SkipReason::SubResource),
        ),
        (
            Subject { kind: None, ..base },
            &plain,
            Some(SkipReason::Kind),
        ),
        (
            Subject {
                operation: Operation::Update,
                ..base
            },
            &plain,
            Some(SkipReason::Operation),
        ),
        (
            Subject {
                kind: Some(Kind::Job),
                operation: Operation::Update,
                ..base
            },
            &job,
            Some(SkipReason::Operation),
        ),
        (
            Subject {
                kind: Some(Kind::Deployment),
                operation: Operation::Other,
                ..base
            },
            &tagged,
            Some(SkipReason::Operation),
        ),
        (
            Subject {
                kind: Some(Kind::Deployment),
                operation: Operation::Update,
                ..base
            },
            &deleting,
            Some(SkipReason::Deleting),
        ),
        (
            Subject {
                kind: Some(Kind::Deployment),
                operation: Operation::Update,
                ..base
            },
            &tagged,
            None,
        ),
        (
            Subject {
                kind: Some(Kind::Deployment),
                operation: Operation::Update,
                mode: Mode::Offline,
                ..base
            },
            &tagged,
            Some(SkipReason::Operation),
        ),
        (
            Subject {
                kind: Some(Kind::Deployment),
                ..base
            },
            &opted_out_deployment,
            Some(SkipReason::OptedOut),
        ),
        (
            Subject {
                kind: Some(Kind::Deployment),
                namespace: "kube-system",
                ..base
            },
            &tagged,
            Some(SkipReason::Namespace),
        ),
        (
            Subject {
                namespace: "kube-system",
                ..base
            },
            &plain,
            Some(SkipReason::Namespace),
        ),
        (
            Subject {
                namespace: "kube-public",
                ..base
            },
            &plain,
            Some(SkipReason::Namespace),
        ),
        (
            Subject {
                namespace: "kube-node-lease",
                ..base
            },
            &plain,
            Some(SkipReason::Namespace),
        ),
        (
            Subject {
                namespace: "canary-injector",
                ..base
            },
            &plain,
            Some(SkipReason::Namespace),
        ),
        (base, &mirror, Some(SkipReason::MirrorPod)),
        (base, &opted_out, Some(SkipReason::OptedOut)),
        (base, &opted_in, None),
        (base, &plain, None),
    ];
    for (s, object, expected) in cases {
        let view = ObjectView::from_value(object.clone()).unwrap();
        let p = plan(&s, &view, &cfg, &ClusterView::OFFLINE).unwrap();
        assert_eq!(p.skipped, expected, "{s:?}");
        assert_eq!(p.ops.is_empty(), expected.is_some(), "{s:?}");
    }
}

#[test]
fn object_kind_must_match_request_kind() {
    let view = ObjectView::from_value(json!({"kind": "Service"})).unwrap();
    let err = plan(
        &subject(Kind::Pod, "shop", Mode::Admission),
        &view,
        &P::default(),
        &ClusterView::OFFLINE,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"object kind "Service" does not match the request kind "Pod""#
    );
}

fn replicaset(owned: bool) -> Value {
    let mut rs = json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": "web-abc", "labels": {"app": "web", "pod-template-hash": "abc"},
                     "annotations": {}},
        "spec": {"selector": {"matchLabels": {"app": "web", "pod-template-hash": "abc"}},
                 "template": {"metadata": {"labels": {"app": "web", "pod-template-hash": "abc"}},
                              "spec": {"containers": []}}}
    });
    if owned {
        rs["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "Deployment",
            "name": "web", "uid": "u", "controller": true}]);
    }
    rs
}

#[test]
fn owned_replicaset_template_and_selector_are_untouched() {
    let original = replicaset(true);
    let (out, plan) = run(Kind::ReplicaSet, original.clone(), &P::default());
    assert_eq!(labels_of(&out)["stage"], "normal");
    assert_eq!(
        out["spec"], original["spec"],
        "template and selector unchanged"
    );
    assert!(
        plan.ops
            .iter()
            .all(|op| !op.path().to_string().starts_with("/spec"))
    );
}

#[test]
fn owned_replicaset_reads_tag_from_its_template() {
    let mut rs = replicaset(true);
    rs["spec"]["template"]["metadata"]["annotations"] = json!({"canary-injector.io/tag": "v3"});
    let original = rs.clone();
    let (out, _) = run(Kind::ReplicaSet, rs, &P::default());
    assert_eq!(labels_of(&out)["canarytag"], "v3");
    assert_eq!(out["spec"], original["spec"]);
}

#[test]
fn non_controller_owner_means_standalone() {
    let mut rs = replicaset(false);
    rs["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u"}]);
    let (out, plan) = run(Kind::ReplicaSet, rs, &P::default());
    assert_eq!(
        out["spec"]["template"]["metadata"]["labels"]["stage"],
        "normal"
    );
    assert_eq!(plan.mutations, ["labels", "template-labels"]);
}

#[test]
fn standalone_replicaset_gets_labels_on_metadata_and_template() {
    let mut rs = replicaset(false);
    rs["metadata"]["annotations"] = json!({"canary-injector.io/tag": "gray-1"});
    let selector = rs["spec"]["selector"].clone();
    let (out, _) = run(Kind::ReplicaSet, rs, &P::default());
    for labels in [
        &out["metadata"]["labels"],
        &out["spec"]["template"]["metadata"]["labels"],
    ] {
        assert_eq!(labels["canarytag"], "gray-1");
        assert_eq!(labels["stage"], "gray");
        assert_eq!(labels["app"], "web");
    }
    assert_eq!(out["spec"]["selector"], selector, "selector never touched");
}

#[test]
fn standalone_replicaset_template_follows_existing_labels() {
    // The release platform labelled the ReplicaSet but not its template.
    let mut rs = replicaset(false);
    rs["metadata"]["labels"]["canarytag"] = json!("v9");
    let (out, _) = run(Kind::ReplicaSet, rs, &P::default());
    let t = &out["spec"]["template"]["metadata"]["labels"];
    assert_eq!(t["canarytag"], "v9");
    assert_eq!(t["stage"], "gray");
    assert_eq!(out["metadata"]["labels"]["stage"], "gray");
}

#[test]
fn template_without_metadata_gets_one() {
    let mut rs = replicaset(false);
    rs["spec"]["template"]
        .as_object_mut()
        .unwrap()
        .remove("metadata");
    let (out, _) = run(Kind::ReplicaSet, rs, &P::default());
    assert_eq!(
        out["spec"]["template"]["metadata"],
        json!({"labels": {"stage": "normal"}})
    );
}

#[test]
fn keys_with_slash_and_tilde_are_escaped() {
    let cfg = P {
        labels: LabelPolicy {
            canary_tag: "example.com/canary~tag".replace('~', "-"),
            stage: "example.com/stage".into(),
            ..LabelPolicy::default()
        },
        ..P::default()
    };
    let (out, plan) = run(
        Kind::Pod,
        pod(
            json!({"app": "web"}),
            json!({"canary-injector.io/tag": "v1"}),
        ),
        &cfg,
    );
    assert_eq!(labels_of(&out)["example.com/stage"], "gray");
    assert_eq!(labels_of(&out)["example.com/canary-tag"], "v1");
    let paths: Vec<String> = plan.ops.iter().map(|op| op.path().to_string()).collect();
    assert!(
        paths.contains(&"/metadata/labels/example.com~1stage".to_string()),
        "{paths:?}"
    );
}

#[test]
fn offline_labels_workload_templates_only() {
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "labels": {"app": "web"},
                     "annotations": {"canary-injector.io/tag": "v2"}},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {}}}});
    let (out, _) = run_in(
        Kind::Deployment,
        "",
        Mode::Offline,
        deployment,
        &P::default(),
    );
    assert_eq!(out["metadata"]["labels"], json!({"app": "web"}));
    assert_eq!(
        out["spec"]["template"]["metadata"]["labels"],
        json!({"app": "web", "canarytag": "v2", "stage": "gray"})
    );
    assert_eq!(
        out["spec"]["selector"],
        json!({"matchLabels": {"app": "web"}})
    );

    let cronjob = json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c"},
        "spec": {"jobTemplate": {"spec": {"template": {"spec": {}}}}}});
    let (out, _) = run_in(Kind::CronJob, "", Mode::Offline, cronjob, &P::default());
    assert_eq!(
        out["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"],
        json!({"stage": "normal"})
    );
}

#[test]
fn workload_without_template_is_left_alone() {
    let (out, plan) = run_in(
        Kind::StatefulSet,
        "",
        Mode::Offline,
        json!({"kind": "StatefulSet", "metadata": {"name": "s"}, "spec": {}}),
        &P::default(),
    );
    assert!(plan.ops.is_empty());
    assert!(out["metadata"].get("labels").is_none());
}

// === workloads at admission: the tag reaches the pod template ===

/// Admits `object` as `kind` with `operation`, applies the patch, admits
/// the result again (it must need nothing); returns both.
fn admit_op(kind: Kind, operation: Operation, mut object: Value) -> (Value, Planned) {
    let p = P::default();
    let s = Subject {
        operation,
        ..subject(kind, "shop", Mode::Admission)
    };
    let view = ObjectView::from_value(object.clone()).unwrap();
    let first = plan(&s, &view, &p, &ClusterView::OFFLINE).expect("not denied");
    assert_eq!(first.noop, first.ops.is_empty(), "{first:?}");
    json_patch::patch(&mut object, &first.ops).expect("patch applies");
    let again = ObjectView::from_value(object.clone()).unwrap();
    let second = plan(&s, &again, &p, &ClusterView::OFFLINE).unwrap();
    assert!(
        second.ops.is_empty(),
        "re-admission patched: {:?}",
        second.ops
    );
    (object, first)
}

fn template_annotations(v: &Value) -> &Value {
    &v["spec"]["template"]["metadata"]["annotations"]
}

#[test]
fn workload_tag_is_copied_into_its_template_once() {
    for operation in [Operation::Create, Operation::Update] {
        let input = deployment(json!({"canary-injector.io/tag": "v2"}), json!({}));
        let (out, p) = admit_op(Kind::Deployment, operation, input.clone());
        assert_eq!(
            template_annotations(&out),
            &json!({"canary-injector.io/tag": "v2"})
        );
        // Only the template's annotation: no labels anywhere, selector kept.
        assert_eq!(out["metadata"], input["metadata"]);
        assert_eq!(
            out["spec"]["template"]["metadata"]["labels"],
            json!({"app": "web"})
        );
        assert_eq!(out["spec"]["selector"], input["spec"]["selector"]);
        assert_eq!(p.ops.len(), 1);
        assert_eq!(
            p.ops[0].path().to_string(),
            "/spec/template/metadata/annotations/canary-injector.io~1tag"
        );
        assert_eq!(p.mutations, ["template-tag"]);
        assert_eq!(p.intent, Some((Some("v2".into()), "gray".into())));
        assert!(
            p.targets.is_empty(),
            "a workload gets no labels at admission"
        );
        // An UPDATE changes the template, which rolls the workload: say so.
        let rolls = operation == Operation::Update;
        assert_eq!(p.reasons == ["template-tag-copied"], rolls, "{p:?}");
    }
}

#[test]
fn workload_tag_already_in_its_template_needs_no_patch() {
    let tag = json!({"canary-injector.io/tag": "v2"});
    for operation in [Operation::Create, Operation::Update] {
        let (_, p) = admit_op(
            Kind::Deployment,
            operation,
            deployment(tag.clone(), tag.clone()),
        );
        assert!(p.ops.is_empty());
        assert!(p.warnings.is_empty());
        // Tagged in the template only: the pods get it; nothing to copy.
        let (_, p) = admit_op(
            Kind::Deployment,
            operation,
            deployment(json!({}), tag.clone()),
        );
        assert!(p.ops.is_empty());
        assert_eq!(p.intent, Some((Some("v2".into()), "gray".into())));
        // No tag at all: a normal workload.
        let (_, p) = admit_op(
            Kind::Deployment,
            operation,
            deployment(json!({}), json!({})),
        );
        assert!(p.ops.is_empty());
        assert_eq!(p.intent, Some((None, "normal".into())));
    }
}

#[test]
fn a_changed_workload_tag_replaces_the_templates() {
    // `kubectl apply` of a new tag keeps the template's old copy (it was
    // not in the applied manifest): the workload's own annotation wins.
    let (out, p) = admit_op(
        Kind::Deployment,
        Operation::Update,
        deployment(
            json!({"canary-injector.io/tag": "v3"}),
            json!({"canary-injector.io/tag": "v2", "other": "kept"}),
        ),
    );
    assert_eq!(
        template_annotations(&out),
        &json!({"canary-injector.io/tag": "v3", "other": "kept"})
    );
    assert!(matches!(
        p.ops[..],
        [json_patch::PatchOperation::Replace(_)]
    ));
    assert_eq!(p.reasons, ["template-tag-copied"]);
    assert!(p.warnings[0].contains(r#""v3" copied into the pod template over "v2""#));
}

#[test]
fn workload_template_maps_are_created_when_absent() {
    for template_meta in [json!(null), json!({}), json!({"annotations": null})] {
        let mut d = deployment(json!({"canary-injector.io/tag": "v2"}), json!({}));
        if template_meta.is_null() {
            d["spec"]["template"]
                .as_object_mut()
                .unwrap()
                .remove("metadata");
        } else {
            d["spec"]["template"]["metadata"] = template_meta.clone();
        }
        let (out, _) = admit_op(Kind::Deployment, Operation::Create, d);
        assert_eq!(
            template_annotations(&out),
            &json!({"canary-injector.io/tag": "v2"}),
            "{template_meta}"
        );
    }
}

#[test]
fn every_workload_kind_gets_the_tag_in_its_template() {
    for kind in [
        Kind::Deployment,
        Kind::StatefulSet,
        Kind::DaemonSet,
        Kind::Job,
        Kind::CronJob,
    ] {
        let info = kind.info();
        let template = json!({"metadata": {"labels": {"app": "web"}}, "spec": {}});
        let spec = match info.pod {
            Location::CronJobPodTemplate => {
                json!({"jobTemplate": {"spec": {"template": template}}})
            }
            _ => json!({"template": template}),
        };
        let object = json!({"kind": info.name,
            "metadata": {"name": "web", "annotations": {"canary-injector.io/tag": "feature/x"}},
            "spec": spec});
        let (out, p) = admit_op(kind, Operation::Create, object);
        let mut at = &out;
        for token in info.pod.tokens() {
            at = &at[*token];
        }
        // Copied as written: the pods' own admission makes it a label value.
        assert_eq!(
            at["metadata"]["annotations"],
            json!({"canary-injector.io/tag": "feature/x"}),
            "{}",
            info.name
        );
        assert_eq!(p.intent, Some((Some("feature-x".into()), "gray".into())));
        assert_eq!(
            p.reasons,
            ["tag-rewritten"],
            "{}: the user sees it at apply",
            info.name
        );
    }
}

#[test]
fn unusable_workload_tag_denies_a_create_but_never_an_update() {
    let d = deployment(json!({"canary-injector.io/tag": "///"}), json!({}));
    let view = ObjectView::from_value(d.clone()).unwrap();
    let p = P::default();
    let create = subject(Kind::Deployment, "shop", Mode::Admission);
    let err = decide(&create, &view, p.policy(), &ClusterView::OFFLINE).unwrap_err();
    assert!(matches!(err, Deny::UnusableTag { .. }), "{err}");
    let (out, planned) = admit_op(Kind::Deployment, Operation::Update, d.clone());
    assert_eq!(out, d, "not copied");
    assert_eq!(planned.reasons, ["tag-unusable"]);
    assert_eq!(planned.intent, None);
}

#[test]
fn owned_workloads_keep_their_template() {
    // A Job its CronJob created, tagged on the Job's own metadata only.
    let mut job = deployment(json!({"canary-injector.io/tag": "v2"}), json!({}));
    job["kind"] = json!("Job");
    job["metadata"]["ownerReferences"] = json!([{"apiVersion": "batch/v1", "kind": "CronJob",
        "name": "nightly", "uid": "u", "controller": true}]);
    for mode in [Mode::Admission, Mode::Offline] {
        let view = ObjectView::from_value(job.clone()).unwrap();
        let p = plan(
            &subject(Kind::Job, "shop", mode),
            &view,
            &P::default(),
            &ClusterView::OFFLINE,
        )
        .unwrap();
        assert!(p.ops.is_empty(), "{mode:?}: {:?}", p.ops);
        // What its pods get: its own metadata is the first link of their
        // owner chain.
        assert_eq!(
            p.intent,
            Some((Some("v2".into()), "gray".into())),
            "what its pods get"
        );
        assert!(p.reasons.is_empty(), "{:?}", p.reasons);
    }
}

#[test]
fn owned_replicaset_labels_follow_its_template_then_its_own_tag() {
    // What a Deployment tagged on its own metadata makes: the annotation
    // copied onto the ReplicaSet, its template without it. Its pods find
    // the tag up their owner chain (this ReplicaSet's metadata), so the
    // ReplicaSet is a canary as they are; its template is untouched.
    let mut rs = replicaset(true);
    rs["metadata"]["annotations"] = json!({"canary-injector.io/tag": "feature-x",
        "deployment.kubernetes.io/revision": "3"});
    let original = rs.clone();
    let (out, p) = run(Kind::ReplicaSet, rs, &P::default());
    assert_eq!(
        labels_of(&out),
        &json!({"app": "web", "pod-template-hash": "abc", "canarytag": "feature-x",
                "stage": "gray"}),
        "labelled as its pods are"
    );
    assert_eq!(out["spec"], original["spec"]);
    assert!(p.reasons.is_empty(), "{:?}", p.reasons);

    // The template's labels speak for it first.
    let mut rs = replicaset(true);
    rs["metadata"]["annotations"] = json!({"canary-injector.io/tag": "feature-x"});
    rs["spec"]["template"]["metadata"]["labels"]["canarytag"] = json!("v7");
    let (out, p) = run(Kind::ReplicaSet, rs, &P::default());
    assert_eq!(labels_of(&out)["canarytag"], "v7");
    assert_eq!(labels_of(&out)["stage"], "gray");
    assert_eq!(p.reasons, ["tag-ignored"]);

    // Its template's tag first, with a warning when its own differs.
    let mut rs = replicaset(true);
    rs["metadata"]["annotations"] = json!({"canary-injector.io/tag": "feature-x"});
    rs["spec"]["template"]["metadata"]["annotations"] = json!({"canary-injector.io/tag": "v8"});
    let (out, p) = run(Kind::ReplicaSet, rs, &P::default());
    assert_eq!(labels_of(&out)["canarytag"], "v8");
    assert_eq!(p.reasons, ["template-tag-differs"]);

    // Tagged the same on both: no warning.
    let mut rs = replicaset(true);
    let tag = json!({"canary-injector.io/tag": "feature-x"});
    rs["metadata"]["annotations"] = tag.clone();
    rs["spec"]["template"]["metadata"]["annotations"] = tag;
    let (out, p) = run(Kind::ReplicaSet, rs, &P::default());
    assert_eq!(labels_of(&out)["canarytag"], "feature-x");
    assert!(p.warnings.is_empty());
}

#[test]
fn offline_leaves_an_owned_workloads_template_alone() {
    let mut d = deployment(json!({"canary-injector.io/tag": "v2"}), json!({}));
    d["metadata"]["ownerReferences"] = json!([{"apiVersion": "example.com/v1",
        "kind": "App", "name": "web", "uid": "u", "controller": true}]);
    let (out, p) = run_in(
        Kind::Deployment,
        "",
        Mode::Offline,
        d.clone(),
        &P::default(),
    );
    assert_eq!(out, d);
    assert!(p.reasons.is_empty(), "{:?}", p.reasons);
}

#[test]
fn custom_values_are_used() {
    let cfg = P {
        labels: LabelPolicy {
            gray_stage: "canary".into(),
            normal_stage: "stable".into(),
            tag_annotation: "example.com/version".into(),
            ..LabelPolicy::default()
        },
        ..P::default()
    };
    let (out, _) = run(
        Kind::Pod,
        pod(json!({}), json!({"example.com/version": "v7"})),
        &cfg,
    );
    assert_eq!(
        labels_of(&out),
        &json!({"canarytag": "v7", "stage": "canary"})
    );
    let (out, _) = run(Kind::Pod, pod(json!({}), json!({})), &cfg);
    assert_eq!(labels_of(&out), &json!({"stage": "stable"}));
}

fn label_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("canarytag".to_string()),
        Just("stage".to_string()),
        Just("app".to_string()),
        "[a-z]{1,8}(\\.[a-z]{1,5})?/[a-z0-9~_.-]{1,10}",
        "[a-zA-Z0-9]{1,12}",
    ]
}

fn label_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("gray".to_string()),
        Just("normal".to_string()),
        "[A-Za-z0-9]([A-Za-z0-9._-]{0,10}[A-Za-z0-9])?",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Random label sets and tags (including hostile ones) always give a
    /// patch that applies, a valid result that keeps every original label,
    /// and an empty second pass.
    #[test]
    fn any_labels_and_tag_give_an_idempotent_valid_patch(
        labels in prop::collection::btree_map(label_key(), label_value(), 0..6),
        tag in prop::option::of(prop_oneof![
            "\\PC{0,90}",
            "[a-zA-Z0-9/_.#-]{1,100}",
        ]),
        standalone_rs in any::<bool>(),
    ) {
        let cfg = P::default();
        let annotations = match &tag {
            Some(t) => json!({"canary-injector.io/tag": t}),
            None => json!({}),
        };
        let (kind, object) = if standalone_rs {
            let mut rs = replicaset(false);
            rs["metadata"]["labels"] = json!(labels);
            rs["metadata"]["annotations"] = annotations;
            (Kind::ReplicaSet, rs)
        } else {
            (Kind::Pod, pod(json!(labels), annotations))
        };
        let view = ObjectView::from_value(object.clone()).unwrap();
        let s = subject(kind, "shop", Mode::Admission);
        match plan(&s, &view, &cfg, &ClusterView::OFFLINE) {
            Err(Deny::UnusableTag { .. }) => {
                let t = tag.as_deref().unwrap();
                prop_assert!(!t.chars().any(|c| c.is_ascii_alphanumeric()));
                prop_assert!(!labels.contains_key("canarytag"));
            }
            Err(other) => prop_assert!(false, "unexpected deny {other}"),
            Ok(p) => {
                let mut patched = object.clone();
                json_patch::patch(&mut patched, &p.ops).unwrap();
                let out = patched["metadata"]["labels"].as_object().unwrap();
                for (k, v) in &labels {
                    prop_assert_eq!(out.get(k), Some(&json!(v)), "label {} kept", k);
                }
                prop_assert!(out.contains_key("stage"));
                for key in ["canarytag", "stage"] {
                    if let Some(v) = out.get(key) {
                        prop_assert!(labels::validate_label_value(v.as_str().unwrap()).is_ok(), "{v}");
                    }
                }
                let again = ObjectView::from_value(patched).unwrap();
                prop_assert!(plan(&s, &again, &cfg, &ClusterView::OFFLINE).unwrap().ops.is_empty());
            }
        }
    }
}

// === bootstrap mount ===

fn istio_cfg(version: Option<&str>) -> P {
    P {
        istio: IstioPolicy {
            proxy_version: version.map(str::to_owned),
            ..IstioPolicy::default()
        },
        ..P::default()
    }
}

fn present() -> ClusterView {
    ClusterView {
        bootstrap_configmap: Availability::Present,
        injector_version: None,
        mesh: Default::default(),
    }
}

fn with_configmap(availability: Availability) -> ClusterView {
    ClusterView {
        bootstrap_configmap: availability,
        injector_version: None,
        mesh: Default::default(),
    }
}

fn plan_with(object: &Value, cfg: &P, cluster: ClusterView) -> (Value, Planned) {
    let view = ObjectView::from_value(object.clone()).unwrap();
    let s = subject(Kind::Pod, "shop", Mode::Admission);
    let p = plan(&s, &view, cfg, &cluster).unwrap();
    let mut out = object.clone();
    json_patch::patch(&mut out, &p.ops).unwrap();
    let again = ObjectView::from_value(out.clone()).unwrap();
    let second = plan(&s, &again, cfg, &cluster).unwrap();
    assert!(second.ops.is_empty(), "second pass: {:?}", second.ops);
    (out, p)
}

fn injected_pod(image: &str, native: bool) -> Value {
    let proxy = json!({"name": "istio-proxy", "image": image, "args": ["proxy", "sidecar"]});
    let mut p = pod(
        json!({"stage": "normal"}),
        json!({"sidecar.istio.io/status": "{}"}),
    );
    if native {
        let mut proxy = proxy;
        proxy["restartPolicy"] = json!("Always");
        p["spec"]["initContainers"] = json!([{"name": "istio-init", "image": image}, proxy]);
    } else {
        p["spec"]["containers"].as_array_mut().unwrap().push(proxy);
    }
    p
}

#[test]
fn native_sidecar_below_1_8_gets_the_mount_in_init_containers() {
    let (out, p) = plan_with(
        &injected_pod("istio/proxyv2:1.7.8", true),
        &istio_cfg(None),
        present(),
    );
    assert_eq!(p.bootstrap, Some(BootstrapOutcome::Mounted));
    let proxy = &out["spec"]["initContainers"][1];
    assert_eq!(
        proxy["volumeMounts"][0]["mountPath"],
        bootstrap::TEMPLATE_PATH
    );
    assert_eq!(proxy["volumeMounts"][0]["readOnly"], true);
    assert_eq!(out["spec"]["volumes"][0]["name"], bootstrap::VOLUME_NAME);
    assert!(
        out["spec"]["initContainers"][0]
            .get("volumeMounts")
            .is_none()
    );
}

#[test]
fn volume_name_clash_gets_a_suffix() {
    let mut p = injected_pod("istio/proxyv2:1.5.4", false);
    p["spec"]["volumes"] = json!([{"name": "canary-injector-bootstrap", "emptyDir": {}}]);
    let (out, _) = plan_with(&p, &istio_cfg(None), present());
    assert_eq!(
        out["spec"]["volumes"][0]["emptyDir"],
        json!({}),
        "user volume kept"
    );
    assert_eq!(
        out["spec"]["volumes"][1]["name"],
        "canary-injector-bootstrap-1"
    );
    assert_eq!(
        out["spec"]["containers"][1]["volumeMounts"][0]["name"],
        "canary-injector-bootstrap-1"
    );
}

#[test]
fn only_the_proxy_container_changes() {
    let original = injected_pod("istio/proxyv2:1.5.4", false);
    let (out, _) = plan_with(&original, &istio_cfg(None), present());
    assert_eq!(
        out["spec"]["containers"][0],
        original["spec"]["containers"][0]
    );
    let mut proxy = out["spec"]["containers"][1].clone();
    proxy.as_object_mut().unwrap().remove("volumeMounts");
    assert_eq!(proxy, original["spec"]["containers"][1]);
}

#[test]
fn proxy_tag_that_is_not_a_version_falls_back_to_config() {
    for image in [
        "istio/proxyv2:latest",
        "istio/proxyv2@sha256:0123abcd",
        "istio/proxyv2",
    ] {
        let p = injected_pod(image, false);
        let (_, plan) = plan_with(&p, &istio_cfg(None), present());
        assert_eq!(
            plan.bootstrap,
            Some(BootstrapOutcome::Skipped(BootstrapSkip::VersionUnknown)),
            "{image}"
        );
        let (_, plan) = plan_with(&p, &istio_cfg(Some("1.6")), present());
        assert_eq!(plan.bootstrap, Some(BootstrapOutcome::Mounted), "{image}");
        let (_, plan) = plan_with(&p, &istio_cfg(Some("1.9")), present());
        assert_eq!(
            plan.bootstrap,
            Some(BootstrapOutcome::Skipped(BootstrapSkip::AgentKeepalive)),
            "{image}"
        );
    }
}

#[test]
fn image_version_wins_over_config() {
    let p = injected_pod("istio/proxyv2:1.12.0", false);
    let (_, plan) = plan_with(&p, &istio_cfg(Some("1.5")), present());
    assert_eq!(
        plan.bootstrap,
        Some(BootstrapOutcome::Skipped(BootstrapSkip::AgentKeepalive))
    );
}

#[test]
fn unknown_cluster_skips_quietly_and_missing_configmap_warns() {
    let p = injected_pod("istio/proxyv2:1.5.4", false);
    let unknown = with_configmap(Availability::Unknown);
    let (_, plan) = plan_with(&p, &istio_cfg(None), unknown);
    assert_eq!(
        plan.bootstrap,
        Some(BootstrapOutcome::Skipped(BootstrapSkip::ClusterUnavailable))
    );
    assert!(plan.warnings.is_empty());
    let missing = with_configmap(Availability::Missing);
    let (_, plan) = plan_with(&p, &istio_cfg(None), missing);
    assert_eq!(
        plan.bootstrap,
        Some(BootstrapOutcome::Skipped(BootstrapSkip::ConfigMapMissing))
    );
    assert_eq!(plan.warnings.len(), 1);
    assert!(plan.ops.is_empty());
}

/// A pod not injected yet gets the keepalive fix only where a sidecar is
/// coming: its namespace injects (or it asks itself); an ambient namespace
/// has no sidecars. Those are quiet skips, never `istio-version-unknown`.
#[test]
fn a_pod_not_injected_is_skipped_where_no_sidecar_is_coming() {
    let cfg = istio_cfg(Some("1.20"));
    let with_mesh = |mesh| ClusterView { mesh, ..present() };
    let skipped = |mesh, labels: Value| {
        let (_, plan) = plan_with(&pod(labels, json!({})), &cfg, with_mesh(mesh));
        plan.bootstrap
    };
    use BootstrapSkip::{Ambient, NoSidecarExpected};
    assert_eq!(
        skipped(NamespaceMesh::NoInjection, json!({})),
        Some(BootstrapOutcome::Skipped(NoSidecarExpected))
    );
    assert_eq!(
        skipped(NamespaceMesh::Ambient, json!({})),
        Some(BootstrapOutcome::Skipped(Ambient))
    );
    // Injected all the same: the pod asks, or the namespace injects.
    for (mesh, labels) in [
        (
            NamespaceMesh::NoInjection,
            json!({"sidecar.istio.io/inject": "true"}),
        ),
        (NamespaceMesh::Sidecar, json!({})),
        (NamespaceMesh::Unknown, json!({})),
    ] {
        assert_eq!(
            skipped(mesh, labels),
            Some(BootstrapOutcome::ProxyConfig),
            "{mesh:?}: the agent keepalive, by annotation before injection"
        );
    }
    // The namespace's labels say which.
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(
        NamespaceMesh::of(Some(&labels(&[("istio-injection", "enabled")]))),
        NamespaceMesh::Sidecar
    );
    assert_eq!(
        NamespaceMesh::of(Some(&labels(&[("istio.io/rev", "1-22")]))),
        NamespaceMesh::Sidecar
    );
    assert_eq!(
        NamespaceMesh::of(Some(&labels(&[("istio.io/dataplane-mode", "ambient")]))),
        NamespaceMesh::Ambient
    );
    assert_eq!(
        NamespaceMesh::of(Some(&labels(&[("istio-injection", "disabled")]))),
        NamespaceMesh::NoInjection
    );
    assert_eq!(NamespaceMesh::of(None), NamespaceMesh::NoInjection);
}

#[test]
fn pod_with_annotations_and_mount_is_left_alone() {
    // What Istio's injector makes of our annotations, re-admitted.
    let cfg = istio_cfg(Some("1.5"));
    let (annotated, _) = plan_with(&pod(json!({}), json!({})), &cfg, present());
    let mut injected = annotated.clone();
    injected["metadata"]["annotations"]["sidecar.istio.io/status"] = json!("{}");
    injected["spec"]["containers"].as_array_mut().unwrap().push(json!({
        "name": "istio-proxy", "image": "istio/proxyv2:1.5.4",
        "volumeMounts": [{"name": "canary-injector-bootstrap", "mountPath": bootstrap::TEMPLATE_PATH,
                          "subPath": "envoy_bootstrap_tmpl.json", "readOnly": true}]}));
    injected["spec"]["volumes"] = json!([{"name": "canary-injector-bootstrap", "configMap": {"name": "canary-injector-bootstrap"}}]);
    let (out, plan) = plan_with(&injected, &cfg, present());
    assert_eq!(plan.bootstrap, Some(BootstrapOutcome::AlreadyDone));
    assert_eq!(out, injected);
}

#[test]
fn bootstrap_disabled_in_config_does_nothing() {
    let mut cfg = istio_cfg(Some("1.5"));
    cfg.bootstrap.enabled = false;
    let (out, plan) = plan_with(&injected_pod("istio/proxyv2:1.5.4", false), &cfg, present());
    assert_eq!(plan.bootstrap, None);
    assert!(out["spec"].get("volumes").is_none());
}

#[test]
fn custom_configmap_name_is_used() {
    let mut cfg = istio_cfg(Some("1.5"));
    cfg.bootstrap.config_map_name = "istio-keepalive".into();
    let (out, _) = plan_with(&injected_pod("istio/proxyv2:1.5.4", false), &cfg, present());
    assert_eq!(
        out["spec"]["volumes"][0]["configMap"]["name"],
        "istio-keepalive"
    );
}

fn web_deployment() -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}})
}

#[test]
fn offline_deployment_template_gets_the_annotations() {
    let (out, p) = run_in(
        Kind::Deployment,
        "",
        Mode::Offline,
        web_deployment(),
        &istio_cfg(Some("1.5")),
    );
    assert_eq!(p.bootstrap, Some(BootstrapOutcome::Annotated));
    let annotations = &out["spec"]["template"]["metadata"]["annotations"];
    let volumes: Value =
        serde_json::from_str(annotations[bootstrap::USER_VOLUME].as_str().unwrap()).unwrap();
    assert_eq!(
        volumes["canary-injector-bootstrap"]["configMap"]["name"],
        "canary-injector-bootstrap"
    );
    assert!(out["metadata"].get("annotations").is_none());
}

// === the agent keepalive (Istio 1.8+) ===

fn v(major: u32, minor: u32) -> Version {
    Version { major, minor }
}

fn detected(version: Option<Version>) -> ClusterView {
    ClusterView {
        bootstrap_configmap: Availability::Missing,
        injector_version: version,
        mesh: Default::default(),
    }
}

fn proxy_config_of(object: &Value) -> Value {
    let text = object["metadata"]["annotations"][bootstrap::PROXY_CONFIG]
        .as_str()
        .unwrap();
    serde_saphyr::from_str(text).unwrap()
}

#[test]
fn versions_have_keepalive_forms() {
    for (version, form) in [
        (v(1, 4), KeepaliveForm::BootstrapTemplate),
        (v(1, 5), KeepaliveForm::BootstrapTemplate),
        (v(1, 7), KeepaliveForm::BootstrapTemplate),
        (v(1, 8), KeepaliveForm::AgentFixed),
        (v(1, 12), KeepaliveForm::AgentFixed),
        (v(1, 17), KeepaliveForm::AgentFixed),
        (v(1, 18), KeepaliveForm::AgentEnv),
        (v(1, 27), KeepaliveForm::AgentEnv),
        (v(2, 0), KeepaliveForm::AgentEnv),
    ] {
        assert_eq!(version.keepalive_form(), form, "{version}");
    }
}

/// 1.8-1.17: the agent's own 30 s / 10 s keepalive does the job: a quiet,
/// counted skip, before and after injection, whatever the ConfigMap.
#[test]
fn istio_1_8_to_1_17_is_a_quiet_skip() {
    let before = pod(json!({"stage": "normal"}), json!({}));
    for (object, cfg, cluster) in [
        (
            injected_pod("docker.io/istio/proxyv2:1.12.9", false),
            istio_cfg(None),
            detected(None),
        ),
        (before.clone(), istio_cfg(Some("1.12")), detected(None)),
        (before.clone(), istio_cfg(None), detected(Some(v(1, 17)))),
        (before, istio_cfg(None), detected(Some(v(1, 8)))),
    ] {
        let (out, plan) = plan_with(&object, &cfg, cluster);
        assert_eq!(
            plan.bootstrap,
            Some(BootstrapOutcome::Skipped(BootstrapSkip::AgentKeepalive))
        );
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
        assert_eq!(out, object);
    }
}

/// 1.18+, injected: the two variables appended to istio-proxy's env, the
/// rest of the pod untouched; classic and native sidecars.
#[test]
fn istio_1_18_injected_gets_the_keepalive_env() {
    for native in [false, true] {
        let mut object = injected_pod("docker.io/istio/proxyv2:1.22.3", native);
        let list = if native {
            "initContainers"
        } else {
            "containers"
        };
        let index = 1;
        object["spec"][list][index]["env"] =
            json!([{"name": "PILOT_CERT_PROVIDER", "value": "istiod"}]);
        let (out, plan) = plan_with(&object, &istio_cfg(None), detected(None));
        assert_eq!(plan.bootstrap, Some(BootstrapOutcome::Env));
        assert_eq!(plan.mutations, ["keepalive-env"]);
        assert!(plan.warnings.is_empty());
        assert_eq!(
            out["spec"][list][index]["env"],
            json!([
                {"name": "PILOT_CERT_PROVIDER", "value": "istiod"},
                {"name": "GRPC_KEEPALIVE_INTERVAL", "value": "30s"},
                {"name": "GRPC_KEEPALIVE_TIMEOUT", "value": "15s"},
            ])
        );
        let mut rest = out.clone();
        rest["spec"][list][index]
            .as_object_mut()
            .unwrap()
            .remove("env");
        let mut original = object.clone();
        original["spec"][list][index]
            .as_object_mut()
            .unwrap()
            .remove("env");
        assert_eq!(rest, original, "only the env changes");
    }
    // No env list yet: created whole, in one operation.
    let (out, plan) = plan_with(
        &injected_pod("istio/proxyv2:1.18.0", false),
        &istio_cfg(Some("1.5")),
        detected(Some(v(1, 7))),
    );
    assert_eq!(plan.ops.len(), 1, "{:?}", plan.ops);
    assert_eq!(
        out["spec"]["containers"][1]["env"],
        json!([
            {"name": "GRPC_KEEPALIVE_INTERVAL", "value": "30s"},
            {"name": "GRPC_KEEPALIVE_TIMEOUT", "value": "15s"},
        ]),
        "the image tag beats config and the detected injector"
    );
}

/// What the user set stays: one variable set means only the other is
/// added; both set means nothing to do.
#[test]
fn user_set_keepalive_env_is_kept() {
    let mut object = injected_pod("istio/proxyv2:1.20.1", false);
    object["spec"]["containers"][1]["env"] = json!([
        {"name": "GRPC_KEEPALIVE_INTERVAL", "value": "1m"},
    ]);
    let (out, _) = plan_with(&object, &istio_cfg(None), detected(None));
    assert_eq!(
        out["spec"]["containers"][1]["env"],
        json!([
            {"name": "GRPC_KEEPALIVE_INTERVAL", "value": "1m"},
            {"name": "GRPC_KEEPALIVE_TIMEOUT", "value": "15s"},
        ])
    );
    object["spec"]["containers"][1]["env"] = json!([
        {"name": "GRPC_KEEPALIVE_TIMEOUT", "valueFrom": {"configMapKeyRef": {"name": "k", "key": "t"}}},
        {"name": "GRPC_KEEPALIVE_INTERVAL", "value": "1m"},
    ]);
    let (out, plan) = plan_with(&object, &istio_cfg(None), detected(None));
    assert_eq!(plan.bootstrap, Some(BootstrapOutcome::AlreadyDone));
    assert_eq!(out, object);
}

/// The values follow `bootstrap.keepalive`: interval = time, timeout =
/// probes x interval.
#[test]
fn keepalive_values_follow_the_config() {
    let mut cfg = istio_cfg(None);
    cfg.bootstrap.keepalive = Keepalive {
        time: 60,
        probes: 4,
        interval: 2,
    };
    let (out, _) = plan_with(
        &injected_pod("istio/proxyv2:1.19.0", false),
        &cfg,
        detected(None),
    );
    assert_eq!(
        out["spec"]["containers"][1]["env"],
        json!([
            {"name": "GRPC_KEEPALIVE_INTERVAL", "value": "60s"},
            {"name": "GRPC_KEEPALIVE_TIMEOUT", "value": "8s"},
        ])
    );
}

/// 1.18+, not injected yet: the keepalive goes into proxyMetadata of
/// `proxy.istio.io/config`, which Istio's injector turns into env.
#[test]
fn istio_1_18_before_injection_gets_proxy_metadata() {
    let (out, plan) = plan_with(
        &pod(json!({}), json!({})),
        &istio_cfg(None),
        detected(Some(v(1, 20))),
    );
    assert_eq!(plan.bootstrap, Some(BootstrapOutcome::ProxyConfig));
    assert_eq!(plan.mutations, ["labels", "keepalive-proxy-config"]);
    assert!(plan.warnings.is_empty(), "no ConfigMap needed");
    assert_eq!(
        out["metadata"]["annotations"][bootstrap::PROXY_CONFIG],
        r#"{"proxyMetadata":{"GRPC_KEEPALIVE_INTERVAL":"30s","GRPC_KEEPALIVE_TIMEOUT":"15s"}}"#
    );
    assert!(
        out["metadata"]["annotations"]
            .get(bootstrap::USER_VOLUME)
            .is_none()
    );
}

/// An existing proxy config keeps every field and its format; keys the
/// user set win.
#[test]
fn existing_proxy_config_is_merged_in_its_format() {
    let cfg = istio_cfg(Some("1.21"));
    let json_in = r#"{"holdApplicationUntilProxyStarts":true,"proxyMetadata":{"ISTIO_META_DNS_CAPTURE":"true","GRPC_KEEPALIVE_TIMEOUT":"20s"}}"#;
    let (out, plan) = plan_with(
        &pod(json!({}), json!({bootstrap::PROXY_CONFIG: json_in})),
        &cfg,
        detected(None),
    );
    assert_eq!(plan.bootstrap, Some(BootstrapOutcome::ProxyConfig));
    assert!(
        plan.ops
            .iter()
            .any(|op| matches!(op, json_patch::PatchOperation::Replace(_)))
    );
    assert_eq!(
        out["metadata"]["annotations"][bootstrap::PROXY_CONFIG],
        r#"{"holdApplicationUntilProxyStarts":true,"proxyMetadata":{"ISTIO_META_DNS_CAPTURE":"true","GRPC_KEEPALIVE_TIMEOUT":"20s","GRPC_KEEPALIVE_INTERVAL":"30s"}}"#
    );

    let yaml_in = "concurrency: 2\nterminationDrainDuration: 10s\nproxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n";
    let (out, _) = plan_with(
        &pod(json!({}), json!({bootstrap::PROXY_CONFIG: yaml_in})),
        &cfg,
        detected(None),
    );
    let text = out["metadata"]["annotations"][bootstrap::PROXY_CONFIG]
        .as_str()
        .unwrap();
    assert!(
        !text.trim_start().starts_with('{'),
        "YAML stays YAML: {text}"
    );
    assert_eq!(
        proxy_config_of(&out),
        json!({"concurrency": 2, "terminationDrainDuration": "10s", "proxyMetadata": {
            "ISTIO_META_DNS_CAPTURE": "true",
            "GRPC_KEEPALIVE_INTERVAL": "30s", "GRPC_KEEPALIVE_TIMEOUT": "15s"}})
    );

    // The snake_case spelling protobuf JSON also accepts is kept (a second
    // spelling would be a duplicate field).
    let snake = r#"{"proxy_metadata":{"GRPC_KEEPALIVE_INTERVAL":"1m"}}"#;
    let (out, _) = plan_with(
        &pod(json!({}), json!({bootstrap::PROXY_CONFIG: snake})),
        &cfg,
        detected(None),
    );
    assert_eq!(
        proxy_config_of(&out),
        json!({"proxy_metadata": {"GRPC_KEEPALIVE_INTERVAL": "1m", "GRPC_KEEPALIVE_TIMEOUT": "15s"}})
    );

    // Both set: nothing to do.
    let both = "proxyMetadata: {GRPC_KEEPALIVE_INTERVAL: 10s, GRPC_KEEPALIVE_TIMEOUT: 5s}\n";
    let object = pod(
        json!({"stage": "normal"}),
        json!({bootstrap::PROXY_CONFIG: both}),
    );
    let (out, plan) = plan_with(&object, &cfg, detected(None));
    assert_eq!(plan.bootstrap, Some(BootstrapOutcome::AlreadyDone));
    assert_eq!(out, object);

    // Empty: treated as no config.
    let (out, _) = plan_with(
        &pod(json!({}), json!({bootstrap::PROXY_CONFIG: "  "})),
        &cfg,
        detected(None),
    );
    assert_eq!(
        proxy_config_of(&out)["proxyMetadata"]["GRPC_KEEPALIVE_TIMEOUT"],
        "15s"
    );
}

/// A proxy config that is not a mapping is left alone, with a warning
/// (Istio's injector would refuse it too); the labels still come.
#[test]
fn malformed_proxy_config_is_skipped_with_a_warning() {
    for bad in [
        "{not: [json",
        "- a\n- list\n",
        "just a string",
        r#"{"proxyMetadata": ["GRPC_KEEPALIVE_INTERVAL"]}"#,
    ] {
        let object = pod(json!({}), json!({bootstrap::PROXY_CONFIG: bad}));
        let (out, plan) = plan_with(&object, &istio_cfg(Some("1.20")), detected(None));
        assert_eq!(
            plan.bootstrap,
            Some(BootstrapOutcome::Skipped(
                BootstrapSkip::MalformedProxyConfig
            )),
            "{bad}"
        );
        assert_eq!(plan.reasons, ["malformed-proxy-config"], "{bad}");
        assert_eq!(out["metadata"]["annotations"][bootstrap::PROXY_CONFIG], bad);
        assert_eq!(out["metadata"]["labels"]["stage"], "normal");
    }
}

/// Where the version of a pod not injected yet comes from: its proxy image
/// annotation, else config, else the detected injector, else unknown.
#[test]
fn version_precedence_before_injection() {
    let plain = pod(json!({"stage": "normal"}), json!({}));
    let annotated = pod(
        json!({"stage": "normal"}),
        json!({bootstrap::PROXY_IMAGE: "registry.example.com/istio/proxyv2:1.12.1"}),
    );
    let outcome = |object: &Value, cfg: Option<&str>, injector: Option<Version>| {
        plan_with(object, &istio_cfg(cfg), detected(injector))
            .1
            .bootstrap
    };
    let env = Some(BootstrapOutcome::ProxyConfig);
    let fixed = Some(BootstrapOutcome::Skipped(BootstrapSkip::AgentKeepalive));
    let unknown = Some(BootstrapOutcome::Skipped(BootstrapSkip::VersionUnknown));
    assert_eq!(outcome(&annotated, Some("1.20"), Some(v(1, 20))), fixed);
    assert_eq!(outcome(&plain, Some("1.20"), Some(v(1, 12))), env);
    assert_eq!(outcome(&plain, Some("1.12"), Some(v(1, 20))), fixed);
    assert_eq!(outcome(&plain, None, Some(v(1, 20))), env);
    assert_eq!(outcome(&plain, None, None), unknown);
    // A detected 1.5-1.7 injector: the template, as with config.
    let (_, plan) = plan_with(
        &plain,
        &istio_cfg(None),
        ClusterView {
            bootstrap_configmap: Availability::Present,
            injector_version: Some(v(1, 7)),
            mesh: Default::default(),
        },
    );
    assert_eq!(plan.bootstrap, Some(BootstrapOutcome::Annotated));
}

/// The opt-out annotation and `bootstrap.enabled: false` also cover the
/// agent keepalive.
#[test]
fn agent_keepalive_opt_outs() {
    let mut object = injected_pod("istio/proxyv2:1.24.0", false);
    object["metadata"]["annotations"]["canary-injector.io/bootstrap"] = json!("false");
    let (out, plan) = plan_with(&object, &istio_cfg(None), detected(None));
    assert_eq!(
        plan.bootstrap,
        Some(BootstrapOutcome::Skipped(BootstrapSkip::OptedOut))
    );
    assert_eq!(out, object);
    let mut cfg = istio_cfg(Some("1.24"));
    cfg.bootstrap.enabled = false;
    let before = pod(json!({"stage": "normal"}), json!({}));
    let (out, plan) = plan_with(&before, &cfg, detected(Some(v(1, 24))));
    assert_eq!(plan.bootstrap, None);
    assert_eq!(out, before);
}

/// 1.5-1.7 without the template set up anywhere: a quiet skip; with the
/// source set up but this namespace's copy missing: a warning.
#[test]
fn template_not_configured_is_quiet() {
    let object = injected_pod("istio/proxyv2:1.7.8", false);
    let (_, plan) = plan_with(
        &object,
        &istio_cfg(None),
        with_configmap(Availability::NotConfigured),
    );
    assert_eq!(
        plan.bootstrap,
        Some(BootstrapOutcome::Skipped(BootstrapSkip::NotConfigured))
    );
    assert!(plan.warnings.is_empty());
    let (_, plan) = plan_with(
        &object,
        &istio_cfg(None),
        with_configmap(Availability::Missing),
    );
    assert_eq!(plan.reasons, ["configmap-missing"]);
}

#[test]
fn offline_deployment_template_gets_proxy_metadata() {
    let (out, p) = run_in(
        Kind::Deployment,
        "",
        Mode::Offline,
        web_deployment(),
        &istio_cfg(Some("1.20")),
    );
    assert_eq!(p.bootstrap, Some(BootstrapOutcome::ProxyConfig));
    let template = &out["spec"]["template"];
    assert_eq!(
        proxy_config_of(template)["proxyMetadata"],
        json!({"GRPC_KEEPALIVE_INTERVAL": "30s", "GRPC_KEEPALIVE_TIMEOUT": "15s"})
    );
    assert_eq!(template["metadata"]["labels"]["stage"], "normal");
}

// === the typed decision ===

fn decided(kind: Kind, mode: Mode, object: &Value, p: &P, cluster: ClusterView) -> Planned {
    let view = ObjectView::from_value(object.clone()).unwrap();
    plan(&subject(kind, "shop", mode), &view, p, &cluster).unwrap()
}

#[test]
fn decision_names_the_intent_and_what_each_target_lacks() {
    let mut rs = replicaset(false);
    rs["metadata"]["labels"]["canarytag"] = json!("v9");
    rs["spec"]["template"]
        .as_object_mut()
        .unwrap()
        .remove("metadata");
    let d = decided(
        Kind::ReplicaSet,
        Mode::Admission,
        &rs,
        &P::default(),
        ClusterView::OFFLINE,
    );
    assert_eq!(d.intent, Some((Some("v9".into()), "gray".into())));
    assert_eq!(
        d.targets,
        [
            LabelTarget {
                location: Location::Object,
                has_metadata: true,
                has_labels: true,
                lacks_tag: false,
                lacks_stage: true,
            },
            LabelTarget {
                location: Location::PodTemplate,
                has_metadata: false,
                has_labels: false,
                lacks_tag: true,
                lacks_stage: true,
            },
        ]
    );
    assert_eq!(d.mutations, ["labels", "template-labels"]);
    assert!(d.warnings.is_empty());
    assert_eq!(d.skipped, None);
}

#[test]
fn missing_labels_come_as_key_value_pairs() {
    let p = P::default();
    let object = pod(
        json!({"stage": "gray"}),
        json!({"canary-injector.io/tag": "v2"}),
    );
    let view = ObjectView::from_value(object).unwrap();
    let d = decide(
        &subject(Kind::Pod, "shop", Mode::Admission),
        &view,
        p.policy(),
        &ClusterView::OFFLINE,
    )
    .unwrap();
    let intent = d.intent.as_ref().unwrap();
    assert_eq!((intent.tag(), intent.stage()), (Some("v2"), "gray"));
    let missing: Vec<(&str, &str)> = d.targets[0]
        .missing(intent)
        .map(|l| (l.key, &*l.value))
        .collect();
    assert_eq!(missing, [("canarytag", "v2")]);
}

#[test]
fn owned_replicaset_has_one_target_and_workloads_only_their_template() {
    let d = decided(
        Kind::ReplicaSet,
        Mode::Offline,
        &replicaset(true),
        &istio_cfg(Some("1.5")),
        ClusterView::OFFLINE,
    );
    let locations: Vec<Location> = d.targets.iter().map(|t| t.location).collect();
    assert_eq!(locations, [Location::Object]);
    assert_eq!(
        d.bootstrap, None,
        "owned template: no bootstrap offline either"
    );

    let cronjob = json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c"},
        "spec": {"jobTemplate": {"spec": {"template": {"spec": {}}}}}});
    let d = decided(
        Kind::CronJob,
        Mode::Offline,
        &cronjob,
        &P::default(),
        ClusterView::OFFLINE,
    );
    let locations: Vec<Location> = d.targets.iter().map(|t| t.location).collect();
    assert_eq!(locations, [Location::CronJobPodTemplate]);
}

#[test]
fn skipped_decision_is_empty() {
    let d = decided(
        Kind::Pod,
        Mode::Admission,
        &pod(json!({"canary-injector.io/inject": "false"}), json!({})),
        &P::default(),
        present(),
    );
    assert_eq!(d.skipped, Some(SkipReason::OptedOut));
    assert_eq!(d.intent, None);
    assert!(d.targets.is_empty() && d.ops.is_empty() && d.noop);
    assert_eq!(d.bootstrap, None);
}

#[test]
fn warnings_carry_reason_codes() {
    let d = decided(
        Kind::Pod,
        Mode::Admission,
        &pod(
            json!({"stage": "normal"}),
            json!({"canary-injector.io/tag": "v1"}),
        ),
        &P::default(),
        ClusterView::OFFLINE,
    );
    assert_eq!(d.reasons, ["tag-ignored"]);
    assert_eq!(
        d.warnings,
        ["label stage=normal is already set; annotation canary-injector.io/tag ignored"]
    );
    let d = decided(
        Kind::Pod,
        Mode::Admission,
        &pod(json!({}), json!({"canary-injector.io/tag": "a/b"})),
        &P::default(),
        ClusterView::OFFLINE,
    );
    assert_eq!(d.reasons, ["tag-rewritten"]);
    let missing = with_configmap(Availability::Missing);
    let d = decided(
        Kind::Pod,
        Mode::Admission,
        &injected_pod("istio/proxyv2:1.5.4", false),
        &istio_cfg(None),
        missing,
    );
    assert_eq!(d.reasons, ["configmap-missing"]);
    let mut p = pod(json!({}), json!({bootstrap::USER_VOLUME: "{not json"}));
    p["metadata"]["labels"] = json!({"stage": "normal"});
    let d = decided(
        Kind::Pod,
        Mode::Admission,
        &p,
        &istio_cfg(Some("1.5")),
        present(),
    );
    assert_eq!(d.reasons, ["malformed-annotation"]);
}

#[test]
fn bootstrap_decision_says_what_to_mount() {
    let mut p = injected_pod("istio/proxyv2:1.5.4", true);
    p["spec"]["volumes"] = json!([{"name": "canary-injector-bootstrap", "emptyDir": {}}]);
    let policy = istio_cfg(None);
    let view = ObjectView::from_value(p).unwrap();
    let d = decide(
        &subject(Kind::Pod, "shop", Mode::Admission),
        &view,
        policy.policy(),
        &present(),
    )
    .unwrap();
    assert_eq!(
        d.bootstrap,
        Some(BootstrapDecision::Mount(bootstrap::Mount {
            location: Location::Object,
            container: bootstrap::ContainerList::InitContainers,
            index: 1,
            volume_name: "canary-injector-bootstrap-1".into(),
            config_map_name: "canary-injector-bootstrap",
            has_volumes: true,
            has_volume_mounts: false,
        }))
    );
}

#[test]
fn bootstrap_decision_says_what_to_annotate() {
    let theirs = r#"{"data":{"emptyDir":{}}}"#;
    let p = pod(
        json!({"stage": "normal"}),
        json!({bootstrap::USER_VOLUME: theirs}),
    );
    let policy = istio_cfg(Some("1.5"));
    let view = ObjectView::from_value(p).unwrap();
    let d = decide(
        &subject(Kind::Pod, "shop", Mode::Admission),
        &view,
        policy.policy(),
        &present(),
    )
    .unwrap();
    let Some(BootstrapDecision::Annotate(a)) = &d.bootstrap else {
        panic!("{:?}", d.bootstrap);
    };
    assert_eq!(a.target.location, Location::Object);
    assert!(a.target.has_metadata && a.target.has_annotations);
    assert_eq!(a.user_volume.edit, bootstrap::Edit::Replace);
    assert_eq!(a.user_volume_mount.edit, bootstrap::Edit::Add);
    let merged: Value = serde_json::from_str(&a.user_volume.value).unwrap();
    assert_eq!(merged["data"], json!({"emptyDir": {}}));
    assert_eq!(
        merged["canary-injector-bootstrap"]["configMap"]["name"],
        "canary-injector-bootstrap"
    );
    let ops: Vec<&str> = d
        .to_json_patch()
        .iter()
        .map(|op| match op {
            json_patch::PatchOperation::Add(_) => "add",
            json_patch::PatchOperation::Replace(_) => "replace",
            _ => "other",
        })
        .collect();
    assert_eq!(ops, ["replace", "add"]);
}

/// Thousands of user volumes that take our name and its suffixes: the free
/// name is found (in linear time: a set, not a scan per candidate).
#[test]
fn free_volume_name_skips_every_taken_suffix() {
    let mut p = injected_pod("istio/proxyv2:1.5.4", false);
    let mut volumes = vec![json!({"name": "canary-injector-bootstrap", "emptyDir": {}})];
    volumes.extend(
        (1..5000)
            .map(|n| json!({"name": format!("canary-injector-bootstrap-{n}"), "emptyDir": {}})),
    );
    volumes.reverse();
    p["spec"]["volumes"] = json!(volumes);
    let (out, _) = plan_with(&p, &istio_cfg(None), present());
    assert_eq!(
        out["spec"]["volumes"][5000]["name"],
        "canary-injector-bootstrap-5000"
    );
}

// === proptest: rendered, applied, re-decided: nothing left to do ===

fn tag_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,90}",
        "[a-zA-Z0-9/_.#-]{1,100}",
        Just("v2".to_string())
    ]
}

/// A userVolume / userVolumeMount annotation: absent, someone else's map,
/// one that already has ours, or not a JSON object.
fn user_volume_annotation() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(r#"{"data":{"emptyDir":{}}}"#.to_string())),
        1 => Just(Some(r#"{"canary-injector-bootstrap":{"configMap":{"name":"x"}}}"#.to_string())),
        1 => Just(Some("{not json".to_string())),
        1 => Just(Some("[1, 2]".to_string())),
    ]
}

/// A `proxy.istio.io/config` annotation: absent, JSON or YAML with other
/// fields, one that sets a keepalive key already (both spellings of the
/// field), or not a mapping.
fn proxy_config_annotation() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        6 => Just(None),
        1 => Just(Some(r#"{"holdApplicationUntilProxyStarts":true}"#.to_string())),
        1 => Just(Some("concurrency: 2\nproxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n".to_string())),
        1 => Just(Some("proxyMetadata:\n  GRPC_KEEPALIVE_TIMEOUT: 20s\n".to_string())),
        1 => Just(Some(r#"{"proxy_metadata":{"GRPC_KEEPALIVE_INTERVAL":"1m"}}"#.to_string())),
        1 => Just(Some("".to_string())),
        1 => Just(Some("- not\n- a mapping\n".to_string())),
        1 => Just(Some(r#"{"proxyMetadata": "a string"}"#.to_string())),
    ]
}

/// `metadata` of a pod or template: absent, without labels, labels null,
/// or random labels (the opt-out label among them sometimes), with random
/// tag and bootstrap annotations.
fn metadata() -> impl Strategy<Value = Option<Value>> {
    let labels = prop::collection::btree_map(
        prop_oneof![
            9 => label_key(),
            1 => Just("canary-injector.io/inject".to_string()),
        ],
        prop_oneof![9 => label_value(), 1 => Just("false".to_string())],
        0..5,
    );
    (
        0..4u8,
        labels,
        prop::option::of(tag_value()),
        user_volume_annotation(),
        user_volume_annotation(),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
        0..3u8,
        (proxy_config_annotation(), prop::bool::weighted(0.1)),
    )
        .prop_map(
            |(
                shape,
                labels,
                tag,
                volume,
                mount,
                status,
                no_inject,
                opt_out,
                annotations_shape,
                (proxy_config, proxy_image),
            )| {
                let mut annotations = serde_json::Map::new();
                let mut put = |k: &str, v: Option<String>| {
                    if let Some(v) = v {
                        annotations.insert(k.into(), Value::String(v));
                    }
                };
                put("canary-injector.io/tag", tag);
                put(bootstrap::USER_VOLUME, volume);
                put(bootstrap::USER_VOLUME_MOUNT, mount);
                put(bootstrap::ISTIO_STATUS, status.then(|| "{}".into()));
                put(bootstrap::ISTIO_INJECT, no_inject.then(|| "false".into()));
                put(
                    "canary-injector.io/bootstrap",
                    opt_out.then(|| "false".into()),
                );
                put(bootstrap::PROXY_CONFIG, proxy_config);
                put(
                    bootstrap::PROXY_IMAGE,
                    proxy_image.then(|| "docker.io/istio/proxyv2:1.21.2".into()),
                );
                let mut meta = serde_json::Map::new();
                match annotations_shape {
                    0 if annotations.is_empty() => {}
                    1 if annotations.is_empty() => {
                        meta.insert("annotations".into(), Value::Null);
                    }
                    _ => {
                        meta.insert("annotations".into(), Value::Object(annotations));
                    }
                }
                match shape {
                    0 => return None,
                    1 => {}
                    2 => {
                        meta.insert("labels".into(), Value::Null);
                    }
                    _ => {
                        meta.insert("labels".into(), json!(labels));
                    }
                }
                Some(Value::Object(meta))
            },
        )
}

/// A pod spec: not injected, or injected (classic or native sidecar) with
/// various proxy versions, volumes (clashing names), mounts (the template
/// already mounted) and hostNetwork.
fn pod_spec() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            4 => Just(None),
            1 => Just(Some("istio/proxyv2:1.5.4")),
            1 => Just(Some("istio/proxyv2:1.7.8")),
            1 => Just(Some("istio/proxyv2:1.12.0")),
            1 => Just(Some("istio/proxyv2:1.18.0")),
            1 => Just(Some("docker.io/istio/proxyv2:1.27.1-distroless")),
            1 => Just(Some("istio/proxyv2:latest")),
        ],
        any::<bool>(),
        0..3u8,
        0..4usize,
        any::<bool>(),
        prop::bool::weighted(0.1),
        0..4u8,
    )
        .prop_map(
            |(proxy, native, mounts, volumes, clash, host_network, env)| {
                let mut spec = json!({"containers": [{"name": "app", "image": "nginx"}]});
                if let Some(image) = proxy {
                    let mut proxy = json!({"name": "istio-proxy", "image": image});
                    match env {
                        0 => {}
                        1 => {
                            proxy["env"] =
                                json!([{"name": "PILOT_CERT_PROVIDER", "value": "istiod"}])
                        }
                        2 => {
                            proxy["env"] =
                                json!([{"name": "GRPC_KEEPALIVE_INTERVAL", "value": "1m"}])
                        }
                        _ => proxy["env"] = Value::Null,
                    }
                    match mounts {
                        0 => {}
                        1 => proxy["volumeMounts"] = json!([{"name": "x", "mountPath": "/x"}]),
                        _ => {
                            proxy["volumeMounts"] = json!([{"name": "t",
                                "mountPath": bootstrap::TEMPLATE_PATH}])
                        }
                    }
                    if native {
                        proxy["restartPolicy"] = json!("Always");
                        spec["initContainers"] = json!([proxy]);
                    } else {
                        spec["containers"].as_array_mut().unwrap().push(proxy);
                    }
                }
                if volumes > 0 {
                    let mut list: Vec<Value> = (1..volumes)
                        .map(|i| json!({"name": format!("v{i}"), "emptyDir": {}}))
                        .collect();
                    if clash {
                        list.push(json!({"name": bootstrap::VOLUME_NAME, "emptyDir": {}}));
                    }
                    spec["volumes"] = json!(list);
                }
                if host_network {
                    spec["hostNetwork"] = json!(true);
                }
                spec
            },
        )
}

/// A Pod, an owned or standalone ReplicaSet, or a workload (sometimes
/// owned), with the mode and operation that act on it.
fn subject_object() -> impl Strategy<Value = (Kind, Mode, Operation, Value)> {
    (
        0..8u8,
        metadata(),
        metadata(),
        pod_spec(),
        any::<bool>(),
        prop::bool::weighted(0.2),
        any::<bool>(),
    )
        .prop_map(
            |(which, meta, template_meta, spec, offline, owned_workload, update)| {
                let (kind, owned) = match which {
                    0 => (Kind::Pod, false),
                    1 => (Kind::ReplicaSet, true),
                    2 => (Kind::ReplicaSet, false),
                    3 => (Kind::Deployment, owned_workload),
                    4 => (Kind::StatefulSet, owned_workload),
                    5 => (Kind::DaemonSet, owned_workload),
                    6 => (Kind::Job, owned_workload),
                    _ => (Kind::CronJob, owned_workload),
                };
                let info = kind.info();
                let mode = if info.admission && !offline {
                    Mode::Admission
                } else {
                    Mode::Offline
                };
                let operation = if mode == Mode::Admission && info.update && update {
                    Operation::Update
                } else {
                    Operation::Create
                };
                let mut object = json!({"apiVersion": "v1", "kind": info.name});
                let mut meta = meta;
                if owned {
                    let m = meta.get_or_insert_with(|| json!({}));
                    m["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "Deployment",
                        "name": "web", "uid": "u", "controller": true}]);
                }
                if let Some(m) = meta {
                    object["metadata"] = m;
                }
                let mut template = json!({"spec": spec.clone()});
                if let Some(m) = template_meta {
                    template["metadata"] = m;
                }
                object["spec"] = match info.pod {
                    Location::Object => spec,
                    Location::PodTemplate => {
                        json!({"selector": {"matchLabels": {"app": "web"}}, "template": template})
                    }
                    Location::CronJobPodTemplate => {
                        json!({"jobTemplate": {"spec": {"template": template}}})
                    }
                };
                (kind, mode, operation, object)
            },
        )
}

fn labels_at(object: &Value, location: Location) -> Option<&serde_json::Map<String, Value>> {
    let mut at = object;
    for token in location.tokens() {
        at = at.get(*token)?;
    }
    at.get("metadata")?.get("labels")?.as_object()
}

const TAG: &str = "canary-injector.io/tag";

/// `object` without its pod template's tag annotation (nor the maps that
/// held only it), and that annotation.
fn split_template_tag(object: &Value, location: Location) -> (Value, Option<Value>) {
    let mut object = object.clone();
    let mut at = Some(&mut object);
    for token in location.tokens() {
        at = at.and_then(|v| v.get_mut(*token));
    }
    let Some(meta) = at
        .and_then(|t| t.as_object_mut())
        .filter(|t| t.contains_key("metadata"))
    else {
        return (object, None);
    };
    let tag = meta["metadata"]
        .get_mut("annotations")
        .and_then(Value::as_object_mut)
        .and_then(|a| a.remove(TAG));
    let empty = |v: &Value| v.is_null() || v.as_object().is_some_and(|m| m.is_empty());
    if let Some(m) = meta["metadata"].as_object_mut()
        && m.get("annotations").is_some_and(empty)
    {
        m.remove("annotations");
    }
    if meta.get("metadata").is_some_and(empty) {
        meta.remove("metadata");
    }
    (object, tag)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// Whatever the kind, labels, tag, annotations, pod shape, policy and
    /// cluster view: the rendered patch applies, keeps every label the
    /// object had, fills each target with the intent's labels, and the
    /// decision on the patched object has nothing to do.
    #[test]
    fn rendered_patch_applied_then_redecided_has_nothing_to_do(
        (kind, mode, operation, object) in subject_object(),
        proxy_version in prop_oneof![
            2 => Just(None),
            3 => Just(Some("1.5")),
            1 => Just(Some("1.9")),
            2 => Just(Some("1.20")),
        ],
        injector_version in prop_oneof![
            2 => Just(None),
            1 => Just(Some(Version { major: 1, minor: 7 })),
            1 => Just(Some(Version { major: 1, minor: 12 })),
            1 => Just(Some(Version { major: 1, minor: 24 })),
        ],
        bootstrap_enabled in prop::bool::weighted(0.8),
        availability in prop_oneof![
            3 => Just(Availability::Present),
            1 => Just(Availability::Missing),
            1 => Just(Availability::NotConfigured),
            1 => Just(Availability::Unknown),
        ],
        keepalive in (1..100u32, 1..10u32, 1..20u32),
    ) {
        let mut p = istio_cfg(proxy_version);
        p.bootstrap.enabled = bootstrap_enabled;
        p.bootstrap.keepalive = Keepalive { time: keepalive.0, probes: keepalive.1, interval: keepalive.2 };
        let cluster = ClusterView { bootstrap_configmap: availability, injector_version, mesh: Default::default() };
        let s = Subject { operation, ..subject(kind, "shop", mode) };
        let view = ObjectView::from_value(object.clone()).unwrap();
        let first = match decide(&s, &view, p.policy(), &cluster) {
            Err(Deny::UnusableTag { value, .. }) => {
                prop_assert!(!value.chars().any(|c| c.is_ascii_alphanumeric()), "{value:?}");
                prop_assert_eq!(operation, Operation::Create, "an UPDATE is never refused");
                return Ok(());
            }
            Err(other) => return Err(TestCaseError::fail(format!("unexpected deny {other}"))),
            Ok(d) => d,
        };
        let ops = first.to_json_patch();
        prop_assert_eq!(first.is_noop(), ops.is_empty());
        prop_assert_eq!(first.mutations().next().is_none(), ops.is_empty());
        if first.skipped.is_some() {
            prop_assert!(ops.is_empty());
        }
        let mut patched = object.clone();
        json_patch::patch(&mut patched, &ops).unwrap();

        // Never the selector; never the spec of an object whose template a
        // controller owns.
        prop_assert_eq!(&patched["spec"]["selector"], &object["spec"]["selector"]);
        if kind != Kind::Pod && view.has_controller() {
            prop_assert_eq!(&patched["spec"], &object["spec"]);
        }
        // A workload at admission: at most its template's tag annotation
        // changes, to the workload's own.
        if mode == Mode::Admission && !kind.info().labels_on_object {
            let (patched_rest, copied) = split_template_tag(&patched, kind.info().pod);
            let (original_rest, _) = split_template_tag(&object, kind.info().pod);
            if first.template_tag.is_some() {
                prop_assert_eq!(copied.as_ref(), object["metadata"]["annotations"].get(TAG));
            }
            prop_assert_eq!(patched_rest, original_rest);
            prop_assert!(first.targets.is_empty());
        }
        // Every label kept; every target filled with the intent's labels
        // where it lacked them.
        if let Some(intent) = &first.intent {
            for label in intent.labels() {
                prop_assert!(labels::validate_label_value(&label.value).is_ok(), "{label:?}");
            }
            for target in &first.targets {
                let before = labels_at(&object, target.location);
                let after = labels_at(&patched, target.location).unwrap();
                for (k, v) in before.into_iter().flatten() {
                    prop_assert_eq!(after.get(k), Some(v), "label {} kept", k);
                }
                for label in intent.labels() {
                    let had = before.and_then(|b| b.get(label.key));
                    let now = after.get(label.key).and_then(Value::as_str);
                    match had {
                        Some(v) => prop_assert_eq!(Some(v.as_str().unwrap_or_default()), now),
                        None => prop_assert_eq!(Some(&*label.value), now),
                    }
                }
            }
        }

        // The keepalive: what the pod set is kept, what it lacked is ours.
        match &first.bootstrap {
            Some(BootstrapDecision::Env(e)) => {
                let at = |o: &Value| {
                    let mut at = o;
                    for token in e.location.tokens() {
                        at = &at[*token];
                    }
                    at["spec"][e.container.field()][e.index]["env"].clone()
                };
                let (before, after) = (at(&object), at(&patched));
                let before = before.as_array().cloned().unwrap_or_default();
                let after = after.as_array().unwrap();
                prop_assert_eq!(&after[..before.len()], &before[..], "existing env kept");
                prop_assert_eq!(after.len(), before.len() + e.vars.len());
                for (name, value) in &e.vars {
                    prop_assert!(!before.iter().any(|v| v["name"] == *name));
                    prop_assert!(after.iter().any(|v| v["name"] == *name && v["value"] == *value));
                }
            }
            Some(BootstrapDecision::ProxyConfig(c)) => {
                let mut at = &patched;
                for token in c.target.location.tokens() {
                    at = &at[*token];
                }
                let text = at["metadata"]["annotations"][bootstrap::PROXY_CONFIG].as_str().unwrap();
                let config: Value = serde_saphyr::from_str(text).unwrap();
                let metadata = config.get("proxyMetadata").or_else(|| config.get("proxy_metadata")).unwrap();
                let (interval, timeout) = p.bootstrap.keepalive.agent();
                for (name, ours) in [
                    (bootstrap::GRPC_KEEPALIVE_INTERVAL, format!("{interval}s")),
                    (bootstrap::GRPC_KEEPALIVE_TIMEOUT, format!("{timeout}s")),
                ] {
                    let theirs = ["1m", "20s"];
                    let value = metadata[name].as_str().unwrap();
                    prop_assert!(value == ours || theirs.contains(&value), "{name}: {value}");
                }
            }
            _ => {}
        }

        let again = ObjectView::from_value(patched.clone()).unwrap();
        let second = decide(&s, &again, p.policy(), &cluster).unwrap();
        prop_assert!(second.is_noop(), "second decision has work: {second:?}");
        prop_assert!(second.to_json_patch().is_empty());
        prop_assert_eq!(
            second.intent.as_ref().map(|i| (i.tag(), i.stage())),
            first.intent.as_ref().map(|i| (i.tag(), i.stage()))
        );
    }
}

/// Found by the proptest: a template without `metadata` gets labels and the
/// bootstrap annotations; the annotations must not replace the `metadata`
/// the labels created.
#[test]
fn labels_and_annotations_share_a_created_metadata() {
    let mut rs = replicaset(false);
    rs["spec"]["template"] = json!({"spec": {"containers": [{"name": "app", "image": "nginx"}]}});
    let (out, p) = run_in(
        Kind::ReplicaSet,
        "shop",
        Mode::Offline,
        rs,
        &istio_cfg(Some("1.5")),
    );
    assert_eq!(p.bootstrap, Some(BootstrapOutcome::Annotated));
    let meta = &out["spec"]["template"]["metadata"];
    assert_eq!(meta["labels"], json!({"stage": "normal"}));
    assert!(meta["annotations"][bootstrap::USER_VOLUME].is_string());
    assert!(meta["annotations"][bootstrap::USER_VOLUME_MOUNT].is_string());
}

// === proptest: a Deployment, its ReplicaSet and its pods agree ===

/// The ReplicaSet the Deployment controller makes from `deployment`: its
/// annotations copied, the template's labels plus `pod-template-hash` on
/// both the ReplicaSet and its template, owned by the Deployment.
fn replicaset_of(deployment: &Value) -> Value {
    let hash = "5d8f7c9b6";
    let mut template = deployment["spec"]["template"].clone();
    let mut labels = template["metadata"]["labels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    labels.insert("pod-template-hash".into(), json!(hash));
    if !template.get("metadata").is_some_and(Value::is_object) {
        template["metadata"] = json!({});
    }
    template["metadata"]["labels"] = Value::Object(labels.clone());
    let mut annotations = deployment["metadata"]["annotations"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    annotations.insert("deployment.kubernetes.io/revision".into(), json!("1"));
    json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": format!("web-{hash}"), "labels": labels, "annotations": annotations,
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                          "name": "web", "uid": "d", "controller": true}]},
        "spec": {"selector": {"matchLabels": {"app": "web", "pod-template-hash": hash}},
                 "template": template}})
}

/// A pod the ReplicaSet controller makes from `rs`'s template.
fn pod_of(rs: &Value) -> Value {
    let mut meta = rs["spec"]["template"]["metadata"].clone();
    meta["generateName"] = json!("web-5d8f7c9b6-");
    meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "name": rs["metadata"]["name"], "uid": "r", "controller": true}]);
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
           "spec": rs["spec"]["template"]["spec"]})
}

/// What the owner cache says of a pod of `rs`: its tag annotation.
fn owner_tag_of(rs: &Value) -> Option<OwnerTag> {
    let value = rs["metadata"]["annotations"][TAG].as_str()?;
    Some(OwnerTag {
        api_version: "apps/v1".into(),
        kind: "ReplicaSet".into(),
        name: rs["metadata"]["name"].as_str().unwrap_or_default().into(),
        uid: "r".into(),
        value: value.into(),
    })
}

/// Admits `object` as the apiserver would and returns what it stores:
/// `None` when denied.
fn admitted(kind: Kind, operation: Operation, object: Value, p: &P) -> Option<Value> {
    admitted_with(kind, operation, object, p, None)
}

/// [`admitted`], with the tag the owner cache knows for it.
fn admitted_with(
    kind: Kind,
    operation: Operation,
    mut object: Value,
    p: &P,
    owner_tag: Option<&OwnerTag>,
) -> Option<Value> {
    let s = Subject {
        operation,
        owner_tag,
        ..subject(kind, "shop", Mode::Admission)
    };
    let view = ObjectView::from_value(object.clone()).unwrap();
    let d = decide(&s, &view, p.policy(), &ClusterView::OFFLINE).ok()?;
    json_patch::patch(&mut object, &d.to_json_patch()).unwrap();
    Some(object)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// Whatever a Deployment carries (a tag on its own metadata or its
    /// template, labels on its template, opt-outs, unusable tags): once
    /// admitted, the ReplicaSet its controller makes and the pods that
    /// ReplicaSet makes carry the same `stage` and `canarytag`, and a tag
    /// on the Deployment's own metadata reaches the pods.
    #[test]
    fn a_deployment_its_replicaset_and_its_pods_agree(
        meta in metadata(),
        template_meta in metadata(),
        operation in prop_oneof![Just(Operation::Create), Just(Operation::Update)],
    ) {
        let p = P::default();
        let mut deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "template": {"spec": {"containers": [{"name": "app", "image": "nginx"}]}}}});
        if let Some(m) = meta {
            deployment["metadata"] = m;
        }
        if let Some(m) = template_meta {
            deployment["spec"]["template"]["metadata"] = m;
        }
        // The webhook's objectSelector: an opted-out object is not sent.
        let opted_out = |v: &Value| v["metadata"]["labels"]["canary-injector.io/inject"] == "false";
        let deployment = if opted_out(&deployment) {
            deployment
        } else {
            match admitted(Kind::Deployment, operation, deployment, &p) {
                Some(d) => d,
                None => return Ok(()),
            }
        };
        let rs = replicaset_of(&deployment);
        let rs = if opted_out(&rs) {
            rs
        } else {
            match admitted(Kind::ReplicaSet, Operation::Create, rs, &p) {
                Some(rs) => rs,
                // Its template's tag is unusable: no ReplicaSet, no pods.
                None => return Ok(()),
            }
        };
        let pod = pod_of(&rs);
        let pod = if opted_out(&pod) {
            pod
        } else {
            admitted_with(Kind::Pod, Operation::Create, pod, &p, owner_tag_of(&rs).as_ref())
                .expect("a pod is denied only for what its ReplicaSet was")
        };
        for key in ["stage", "canarytag"] {
            prop_assert_eq!(
                &rs["metadata"]["labels"][key], &pod["metadata"]["labels"][key],
                "{} of the ReplicaSet and its pod", key
            );
        }
        // The Deployment's own usable tag reached the pods (unless a label
        // the template already has says otherwise).
        let own_tag = deployment["metadata"]["annotations"]["canary-injector.io/tag"].as_str();
        let template_labels = &deployment["spec"]["template"]["metadata"]["labels"];
        if let Some(tag) = own_tag
            && let Some(expected) = labels::sanitize_tag(tag)
            && !opted_out(&deployment)
            && template_labels.get("canarytag").is_none()
            && template_labels.get("stage").is_none()
            && !opted_out(&pod)
        {
            prop_assert_eq!(
                pod["metadata"]["labels"]["canarytag"].as_str(),
                Some(expected.value.as_str())
            );
        }
    }
}
