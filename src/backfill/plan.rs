//! The pure part of the backfill: what one running Pod or ReplicaSet
//! lacks, decided by the admission rules ([`mutate::decide`], as at its
//! `CREATE`: one rule set, no second opinion), and the label-only JSON
//! Patch that adds it, guarded by a `test` of the `resourceVersion` read.
//!
//! The precondition makes the patch safe against concurrent writers: if
//! anything changed the object since it was read (someone set a label, a
//! new pod took the name), the apiserver refuses the whole patch (422) and
//! the caller reads the object again and decides again. Nothing is ever
//! overwritten: an `add` of a label that exists replaces it, which the
//! decision never asks for and the test rules out.
//!
//! Only the object's own `metadata.labels` are written: never a pod
//! template (an owned ReplicaSet's would make its Deployment create
//! ReplicaSets forever; a standalone one's only matters to pods created
//! later, which admission labels), never the bootstrap mount (a running
//! pod's volumes cannot change; [`LabelPatch::restart_for_bootstrap`] only
//! reports it). So a ReplicaSet's meaning comes from its pod template,
//! owned or standalone ([`Mode::Backfill`]): its running pods were created
//! from that template, and a tag on the ReplicaSet's own metadata alone
//! would make it gray while they are normal.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{PatchOperation, TestOperation};
use serde_json::Value;

use crate::mutate::bootstrap::ISTIO_STATUS;
use crate::mutate::{
    self, ClusterView, Deny, Kind, Mode, ObjectView, Operation, Policy, SkipReason, Subject,
};

/// What the backfill does with one running object.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Nothing to add: it has its labels, or a rule skips it (the reason).
    Nothing(Option<SkipReason>),
    /// Admission would have refused it (its tag has nothing usable): left
    /// unlabelled, with the message to report.
    Refused(Deny),
    /// Labels to add.
    Label(LabelPatch),
}

/// The patch for one object and what it means.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelPatch {
    /// `test /metadata/resourceVersion`, then the label operations.
    pub ops: Vec<PatchOperation>,
    /// The labels added, as `key=value`, tag first.
    pub added: Vec<String>,
    /// A pod with an Istio sidecar that was created without the webhook,
    /// so without the bootstrap keepalive template (mounted only at pod
    /// creation): a restart gives it one, when its Istio is older than 1.8.
    pub restart_for_bootstrap: bool,
}

/// Decides what `object` (a `kind` read in `namespace` at
/// `resource_version`) lacks. `policy.bootstrap` is not applied (a running
/// pod cannot get a mount); `report_bootstrap` says whether to report pods
/// that miss it.
pub fn plan(
    kind: Kind,
    namespace: &str,
    object: &ObjectView,
    resource_version: &str,
    policy: Policy<'_>,
    report_bootstrap: bool,
) -> Plan {
    // Being deleted: nothing to gain, and its patch would race the delete.
    if object
        .metadata
        .as_ref()
        .is_some_and(|m| m.deletion_timestamp.is_some())
    {
        return Plan::Nothing(None);
    }
    let subject = Subject {
        kind: Some(kind),
        operation: Operation::Create,
        namespace,
        sub_resource: "",
        mode: Mode::Backfill,
    };
    let decision = match mutate::decide(&subject, object, policy, &ClusterView::OFFLINE) {
        Ok(d) => d,
        Err(deny) => return Plan::Refused(deny),
    };
    let labels = decision.object_labels_patch();
    if labels.is_empty() {
        return Plan::Nothing(decision.skipped);
    }
    let added = decision
        .intent
        .iter()
        .flat_map(|intent| {
            decision
                .targets
                .iter()
                .filter(|t| t.location == mutate::Location::Object)
                .flat_map(|t| t.missing(intent))
                .map(|l| format!("{}={}", l.key, l.value))
        })
        .collect();
    let mut ops = vec![PatchOperation::Test(TestOperation {
        path: PointerBuf::from_tokens(["metadata", "resourceVersion"]),
        value: Value::String(resource_version.to_owned()),
    })];
    ops.extend(labels);
    let annotations = object
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref());
    let restart_for_bootstrap = report_bootstrap
        && kind == Kind::Pod
        && runs_sidecar_without_opt_out(annotations, &policy.bootstrap.opt_out_annotation);
    Plan::Label(LabelPatch {
        ops,
        added,
        restart_for_bootstrap,
    })
}

/// Istio injected it (`sidecar.istio.io/status`) and it did not opt out
/// of the bootstrap fix.
fn runs_sidecar_without_opt_out(
    annotations: Option<&BTreeMap<String, String>>,
    opt_out: &str,
) -> bool {
    annotations.is_some_and(|a| {
        a.contains_key(ISTIO_STATUS) && a.get(opt_out).is_none_or(|v| v != "false")
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::Config;

    /// The default rules, the bootstrap mount off (as the backfill runs).
    struct Sections(Config);

    impl Sections {
        fn new() -> Self {
            let mut cfg = Config::default();
            cfg.bootstrap.enabled = false;
            Self(cfg)
        }

        fn policy(&self) -> Policy<'_> {
            self.0.policy()
        }
    }

    fn view(v: Value) -> ObjectView {
        serde_json::from_value(v).unwrap()
    }

    fn pod(labels: Value, annotations: Value) -> ObjectView {
        view(
            json!({"metadata": {"name": "web-1", "labels": labels, "annotations": annotations,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-abc",
                                 "uid": "u", "controller": true}]}}),
        )
    }

    fn patch_of(plan: &Plan) -> Value {
        match plan {
            Plan::Label(p) => serde_json::to_value(&p.ops).unwrap(),
            other => panic!("no patch: {other:?}"),
        }
    }

    #[test]
    fn a_pod_gets_its_missing_labels_under_a_resource_version_test() {
        let s = Sections::new();
        let p = plan(
            Kind::Pod,
            "shop",
            &pod(
                json!({"app": "web"}),
                json!({"canary-injector.io/tag": "feature/x"}),
            ),
            "4711",
            s.policy(),
            true,
        );
        assert_eq!(
            patch_of(&p),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "4711"},
                {"op": "add", "path": "/metadata/labels/canarytag", "value": "feature-x"},
                {"op": "add", "path": "/metadata/labels/stage", "value": "gray"},
            ])
        );
        let Plan::Label(p) = p else { unreachable!() };
        assert_eq!(p.added, ["canarytag=feature-x", "stage=gray"]);
        assert!(!p.restart_for_bootstrap, "no sidecar");
    }

    #[test]
    fn only_what_is_missing_and_never_over_a_label() {
        let s = Sections::new();
        let p = plan(
            Kind::Pod,
            "shop",
            &pod(
                json!({"stage": "gray"}),
                json!({"canary-injector.io/tag": "v2"}),
            ),
            "9",
            s.policy(),
            false,
        );
        assert_eq!(
            patch_of(&p),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "9"},
                {"op": "add", "path": "/metadata/labels/canarytag", "value": "v2"},
            ])
        );
        // A label map that does not exist is created whole.
        let p = plan(
            Kind::Pod,
            "shop",
            &view(json!({"metadata": {"name": "web-1"}})),
            "9",
            s.policy(),
            false,
        );
        assert_eq!(
            patch_of(&p),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "9"},
                {"op": "add", "path": "/metadata/labels", "value": {"stage": "normal"}},
            ])
        );
        let done = pod(json!({"stage": "normal"}), json!({}));
        assert_eq!(
            plan(Kind::Pod, "shop", &done, "9", s.policy(), false),
            Plan::Nothing(None)
        );
    }

    #[test]
    fn the_admission_skip_rules_apply() {
        let s = Sections::new();
        let opted_out = pod(json!({"canary-injector.io/inject": "false"}), json!({}));
        let mirror = pod(json!({}), json!({"kubernetes.io/config.mirror": "x"}));
        for (object, ns, reason) in [
            (&opted_out, "shop", SkipReason::OptedOut),
            (&mirror, "shop", SkipReason::MirrorPod),
            (
                &pod(json!({}), json!({})),
                "kube-system",
                SkipReason::Namespace,
            ),
        ] {
            assert_eq!(
                plan(Kind::Pod, ns, object, "1", s.policy(), true),
                Plan::Nothing(Some(reason))
            );
        }
        let mut deleting = pod(json!({}), json!({}));
        deleting.metadata.as_mut().unwrap().deletion_timestamp =
            Some("2024-05-02T10:00:00Z".into());
        assert_eq!(
            plan(Kind::Pod, "shop", &deleting, "1", s.policy(), true),
            Plan::Nothing(None)
        );
        let refused = pod(json!({}), json!({"canary-injector.io/tag": "~~"}));
        assert!(matches!(
            plan(Kind::Pod, "shop", &refused, "1", s.policy(), true),
            Plan::Refused(Deny::UnusableTag { .. })
        ));
    }

    #[test]
    fn an_owned_replicaset_gets_metadata_labels_from_its_template_only() {
        let s = Sections::new();
        let rs = view(json!({"metadata": {"name": "web-abc",
                "labels": {"app": "web", "pod-template-hash": "abc"},
                "annotations": {"canary-injector.io/tag": "feature-x"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "web", "uid": "d", "controller": true}]},
            "spec": {"template": {"metadata": {"labels": {"app": "web"}}}}}));
        assert_eq!(
            patch_of(&plan(Kind::ReplicaSet, "shop", &rs, "5", s.policy(), true)),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "5"},
                {"op": "add", "path": "/metadata/labels/stage", "value": "normal"},
            ])
        );
    }

    /// A standalone ReplicaSet tagged on its own metadata only: its running
    /// pods came from its template, which has no tag (the backfill labels
    /// them `stage=normal`), and the backfill cannot change the template.
    /// So the ReplicaSet is labelled as its pods are, never gray.
    #[test]
    fn a_standalone_replicaset_follows_its_template_as_its_pods_do() {
        let s = Sections::new();
        let standalone = view(
            json!({"metadata": {"name": "web-gray", "labels": {"app": "web"},
                "annotations": {"canary-injector.io/tag": "v9"}},
            "spec": {"template": {"metadata": {"labels": {"app": "web"}}}}}),
        );
        let rs = plan(Kind::ReplicaSet, "shop", &standalone, "5", s.policy(), true);
        assert_eq!(
            patch_of(&rs),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "5"},
                {"op": "add", "path": "/metadata/labels/stage", "value": "normal"},
            ])
        );
        // One of its pods, created from that template (no tag): the same.
        let its_pod = view(
            json!({"metadata": {"name": "web-gray-x1", "labels": {"app": "web"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": "web-gray", "uid": "r", "controller": true}]}}),
        );
        let pod = plan(Kind::Pod, "shop", &its_pod, "6", s.policy(), true);
        let (Plan::Label(rs), Plan::Label(pod)) = (rs, pod) else {
            unreachable!()
        };
        assert_eq!(rs.added, pod.added, "the ReplicaSet and its pods agree");

        // Tagged in its template (what its pods carry): gray, from there.
        let tagged = view(
            json!({"metadata": {"name": "web-gray", "labels": {"app": "web"}},
            "spec": {"template": {"metadata": {"labels": {"app": "web"},
                "annotations": {"canary-injector.io/tag": "feature/v9"}}}}}),
        );
        assert_eq!(
            patch_of(&plan(
                Kind::ReplicaSet,
                "shop",
                &tagged,
                "7",
                s.policy(),
                true
            )),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
                {"op": "add", "path": "/metadata/labels/canarytag", "value": "feature-v9"},
                {"op": "add", "path": "/metadata/labels/stage", "value": "gray"},
            ])
        );
        // Labels already in its template speak for it too.
        let labelled = view(
            json!({"metadata": {"name": "web-gray", "labels": {"app": "web"},
                "annotations": {"canary-injector.io/tag": "v9"}},
            "spec": {"template": {"metadata": {"labels": {"app": "web", "stage": "gray",
                "canarytag": "v8"}}}}}),
        );
        assert_eq!(
            patch_of(&plan(
                Kind::ReplicaSet,
                "shop",
                &labelled,
                "8",
                s.policy(),
                true
            )),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "8"},
                {"op": "add", "path": "/metadata/labels/canarytag", "value": "v8"},
                {"op": "add", "path": "/metadata/labels/stage", "value": "gray"},
            ])
        );
    }

    #[test]
    fn istio_pods_without_the_template_are_reported() {
        let s = Sections::new();
        let injected = pod(json!({}), json!({ISTIO_STATUS: "{}"}));
        let opted_out = pod(
            json!({}),
            json!({ISTIO_STATUS: "{}", "canary-injector.io/bootstrap": "false"}),
        );
        let restart = |object: &ObjectView, report: bool| match plan(
            Kind::Pod,
            "shop",
            object,
            "1",
            s.policy(),
            report,
        ) {
            Plan::Label(p) => p.restart_for_bootstrap,
            other => panic!("{other:?}"),
        };
        assert!(restart(&injected, true));
        assert!(!restart(&injected, false), "bootstrap fix disabled");
        assert!(!restart(&opted_out, true));
    }
}
