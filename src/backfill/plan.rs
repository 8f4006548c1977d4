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
//! later, which admission labels), never the sidecar keepalive (a running
//! pod's volumes and environment cannot change; [`LabelPatch::restart`]
//! only reports what a restart would give it). So a ReplicaSet's meaning
//! comes from its pod template, owned or standalone ([`Mode::Backfill`]):
//! its running pods were created from that template, and a tag on the
//! ReplicaSet's own metadata alone would make it gray while they are
//! normal.
//!
//! What a restart would give an Istio pod is the admission decision's
//! bootstrap part ([`BootstrapDecision`]) for the running pod, by the
//! version of its proxy (image tag, `sidecar.istio.io/proxyImage`, config
//! `istio.proxyVersion`, the detected injector version, as at admission):
//!
//! | the running pod | admission would | [`Restart`] |
//! |-----------------|-----------------|-------------|
//! | Istio 1.5-1.7, no template mount | mount the template | [`Restart::Template`] |
//! | Istio 1.8-1.17 | nothing (the agent's keepalive is fine) | none |
//! | Istio 1.18+, no `GRPC_KEEPALIVE_*` on `istio-proxy` | set them | [`Restart::AgentKeepalive`] |
//! | version unknown | skip | [`Restart::VersionUnknown`] |

use json_patch::jsonptr::PointerBuf;
use json_patch::{PatchOperation, TestOperation};
use serde_json::Value;

use crate::mutate::bootstrap::ISTIO_STATUS;
use crate::mutate::{
    self, Availability, BootstrapDecision, BootstrapSkip, ClusterView, Contradiction, Deny, Kind,
    Mode, ObjectView, Operation, OwnerTag, Policy, SkipReason, StrMap, Subject, TagSource,
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
    /// Its labels say the opposite of what its workload asks for (never
    /// overwritten): to report. For a pod labelled a canary, the caller
    /// still has to rule out a pod template that labels it so.
    Contradicts(Contradiction),
}

/// Where the tag a patch follows was asked for, when not on the object or
/// its pod template: the workload to tell about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagFrom {
    /// On the object's own metadata, though a controller owns it (a
    /// Deployment copies its annotations onto its ReplicaSets): its
    /// controller's.
    Controller,
    /// On the metadata of this owner up the chain.
    Owner(OwnerTag),
}

/// The patch for one object and what it means.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelPatch {
    /// `test /metadata/resourceVersion`, then the label operations.
    pub ops: Vec<PatchOperation>,
    /// The labels added, as `key=value`, tag first.
    pub added: Vec<String>,
    /// What a restart would give this pod's Istio sidecar, created without
    /// the webhook (the keepalive is set only at pod creation); `None`: no
    /// sidecar, nothing to gain, the fix is off or not set up.
    pub restart: Option<Restart>,
    /// The tag came from a workload's metadata, not the object's own pod
    /// template (say so on that workload).
    pub tag_from: Option<TagFrom>,
}

/// Why an Istio pod the backfill labelled is reported: what restarting it
/// would give its sidecar (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Restart {
    /// Istio 1.5-1.7 without the patched bootstrap template: a new pod gets
    /// it mounted.
    Template,
    /// Istio 1.18 or newer without `GRPC_KEEPALIVE_INTERVAL` /
    /// `GRPC_KEEPALIVE_TIMEOUT` on `istio-proxy`: a new pod gets them.
    AgentKeepalive,
    /// The proxy's Istio version cannot be told, so neither can whether a
    /// restart would change its keepalive.
    VersionUnknown,
}

impl Restart {
    /// Every reason, in report order.
    pub const ALL: [Self; 3] = [Self::Template, Self::AgentKeepalive, Self::VersionUnknown];

    /// Stable kebab-case code: the metric's `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Template => "template",
            Self::AgentKeepalive => "agent-keepalive",
            Self::VersionUnknown => "istio-version-unknown",
        }
    }
}

/// Decides what `object` (a `kind` read in `namespace` at
/// `resource_version`) lacks, with the admission `cluster` view of
/// `namespace` and the tag its owner chain asks for (`owner_tag`, from
/// admission's owner cache). Only labels are written; with
/// `policy.bootstrap.enabled` the bootstrap decision for a running Istio
/// pod says what a restart would give it (read from its spec: see
/// [`needs_pod_spec`]).
pub fn plan(
    kind: Kind,
    namespace: &str,
    object: &ObjectView,
    resource_version: &str,
    policy: Policy<'_>,
    cluster: &ClusterView,
    owner_tag: Option<&OwnerTag>,
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
        owner_tag,
    };
    let cluster = restart_view(cluster);
    let decision = match mutate::decide(&subject, object, policy, &cluster) {
        Ok(d) => d,
        Err(deny) => return Plan::Refused(deny),
    };
    let labels = decision.object_labels_patch();
    if labels.is_empty() {
        if decision.skipped.is_none() {
            let meta = object.metadata.as_ref();
            let template_canary = object
                .template_at(kind.info().pod)
                .and_then(|t| t.metadata.as_ref()?.labels.as_ref())
                .is_some_and(|l| l.value(&policy.labels.stage) == Some(&policy.labels.gray_stage));
            if let Some(c) = policy.labels.contradiction(
                meta.and_then(|m| m.labels.as_ref()),
                decision.requested.map(|r| r.value),
                template_canary,
            ) {
                return Plan::Contradicts(c);
            }
        }
        return Plan::Nothing(decision.skipped);
    }
    let tag_from = match decision.requested.map(|r| r.source) {
        Some(TagSource::Owner(o)) if decision.intent.as_ref().is_some_and(|i| i.tag.is_some()) => {
            Some(TagFrom::Owner(o.clone()))
        }
        Some(TagSource::Object) if kind != Kind::Pod && object.has_controller() => {
            Some(TagFrom::Controller)
        }
        _ => None,
    };
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
    let restart = if kind == Kind::Pod && injected(object) {
        match &decision.bootstrap {
            Some(BootstrapDecision::Mount(_)) => Some(Restart::Template),
            Some(BootstrapDecision::Env(_)) => Some(Restart::AgentKeepalive),
            Some(BootstrapDecision::Skipped(BootstrapSkip::VersionUnknown)) => {
                Some(Restart::VersionUnknown)
            }
            _ => None,
        }
    } else {
        None
    };
    Plan::Label(LabelPatch {
        ops,
        added,
        restart,
        tag_from,
    })
}

/// True when deciding about `object` needs its pod spec, which the
/// backfill lists without (metadata only): an Istio-injected pod, when the
/// keepalive fix is on (the proxy's image, mounts and env tell what a
/// restart would give it).
pub fn needs_pod_spec(kind: Kind, object: &ObjectView, policy: Policy<'_>) -> bool {
    kind == Kind::Pod && policy.bootstrap.enabled && object.spec.is_none() && injected(object)
}

/// Istio injected it: `sidecar.istio.io/status` (a running pod that has
/// none has no sidecar, and will get none).
fn injected(object: &ObjectView) -> bool {
    object
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .is_some_and(|a| a.contains_key(ISTIO_STATUS))
}

/// The admission view, for the question "does this running pod lack what
/// a new pod gets": the template ConfigMap counts as there unless the fix
/// is not set up at all (no source). A copy the copier has not made yet,
/// or a cache not synced yet, is no reason to keep quiet about a pod that
/// needs a restart: the pass that labels it is the one that reports it.
fn restart_view(cluster: &ClusterView) -> ClusterView {
    let bootstrap_configmap = match cluster.bootstrap_configmap {
        Availability::NotConfigured => Availability::NotConfigured,
        Availability::Present | Availability::Missing | Availability::Unknown => {
            Availability::Present
        }
    };
    ClusterView {
        bootstrap_configmap,
        ..*cluster
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::Config;

    /// The rules the backfill runs with: the defaults, or changed.
    struct Sections(Config);

    impl Sections {
        fn new() -> Self {
            Self(Config::default())
        }

        fn with(f: impl FnOnce(&mut Config)) -> Self {
            let mut cfg = Config::default();
            f(&mut cfg);
            Self(cfg)
        }

        fn policy(&self) -> Policy<'_> {
            self.0.policy()
        }
    }

    /// The template ConfigMap in place, no injector version detected.
    fn present() -> ClusterView {
        ClusterView {
            bootstrap_configmap: Availability::Present,
            injector_version: None,
            mesh: Default::default(),
        }
    }

    fn view(v: Value) -> ObjectView<'static> {
        ObjectView::from_value(v).unwrap()
    }

    fn pod(labels: Value, annotations: Value) -> ObjectView<'static> {
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
            &present(),
            None,
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
        assert_eq!(p.restart, None, "no sidecar");
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
            &present(),
            None,
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
            &present(),
            None,
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
            plan(Kind::Pod, "shop", &done, "9", s.policy(), &present(), None),
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
                plan(Kind::Pod, ns, object, "1", s.policy(), &present(), None),
                Plan::Nothing(Some(reason))
            );
        }
        let mut deleting = pod(json!({}), json!({}));
        deleting.metadata.as_mut().unwrap().deletion_timestamp =
            Some("2024-05-02T10:00:00Z".into());
        assert_eq!(
            plan(
                Kind::Pod,
                "shop",
                &deleting,
                "1",
                s.policy(),
                &present(),
                None
            ),
            Plan::Nothing(None)
        );
        let refused = pod(json!({}), json!({"canary-injector.io/tag": "~~"}));
        assert!(matches!(
            plan(
                Kind::Pod,
                "shop",
                &refused,
                "1",
                s.policy(),
                &present(),
                None
            ),
            Plan::Refused(Deny::UnusableTag { .. })
        ));
    }

    /// A ReplicaSet of a Deployment tagged on its own metadata only (before
    /// its namespace opted in): the Deployment copied the annotation onto
    /// it, its template lacks it. It and its pods (whose owner chain finds
    /// the tag on it) are canaries, and the patch says where the tag came
    /// from, for the Event on the Deployment.
    #[test]
    fn a_replicaset_tagged_by_its_deployment_is_a_canary_as_its_pods_are() {
        let s = Sections::new();
        let rs = view(json!({"metadata": {"name": "web-abc",
                "labels": {"app": "web", "pod-template-hash": "abc"},
                "annotations": {"canary-injector.io/tag": "feature-x"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "web", "uid": "d", "controller": true}]},
            "spec": {"template": {"metadata": {"labels": {"app": "web"}}}}}));
        let planned = plan(
            Kind::ReplicaSet,
            "shop",
            &rs,
            "5",
            s.policy(),
            &present(),
            None,
        );
        assert_eq!(
            patch_of(&planned),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "5"},
                {"op": "add", "path": "/metadata/labels/canarytag", "value": "feature-x"},
                {"op": "add", "path": "/metadata/labels/stage", "value": "gray"},
            ])
        );
        let Plan::Label(p) = planned else {
            unreachable!()
        };
        assert_eq!(p.tag_from, Some(TagFrom::Controller));
        let owner = OwnerTag {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            name: "web-abc".into(),
            uid: "r".into(),
            value: "feature-x".into(),
        };
        let its_pod = pod(json!({"app": "web"}), json!({}));
        let planned = plan(
            Kind::Pod,
            "shop",
            &its_pod,
            "6",
            s.policy(),
            &present(),
            Some(&owner),
        );
        assert_eq!(
            patch_of(&planned),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "6"},
                {"op": "add", "path": "/metadata/labels/canarytag", "value": "feature-x"},
                {"op": "add", "path": "/metadata/labels/stage", "value": "gray"},
            ])
        );
        let Plan::Label(p) = planned else {
            unreachable!()
        };
        assert_eq!(p.tag_from, Some(TagFrom::Owner(owner.clone())));
        // Already labelled normal (by hand, or by an older release): never
        // overwritten, but a contradiction to report.
        let normal = pod(json!({"app": "web", "stage": "normal"}), json!({}));
        assert_eq!(
            plan(
                Kind::Pod,
                "shop",
                &normal,
                "7",
                s.policy(),
                &present(),
                Some(&owner)
            ),
            Plan::Contradicts(Contradiction::CanaryLabelledNormal {
                tag: "feature-x".into()
            })
        );
        // Labelled a canary with nothing asking for one: the reverse.
        let gray = pod(json!({"stage": "gray", "canarytag": "old"}), json!({}));
        assert_eq!(
            plan(Kind::Pod, "shop", &gray, "8", s.policy(), &present(), None),
            Plan::Contradicts(Contradiction::NormalLabelledCanary { tag: "old".into() })
        );
    }

    /// A standalone ReplicaSet tagged on its own metadata only: its pods
    /// find the tag up their owner chain (on it), so both are canaries.
    #[test]
    fn a_standalone_replicaset_and_its_pods_follow_its_tag() {
        let s = Sections::new();
        let standalone = view(
            json!({"metadata": {"name": "web-gray", "labels": {"app": "web"},
                "annotations": {"canary-injector.io/tag": "v9"}},
            "spec": {"template": {"metadata": {"labels": {"app": "web"}}}}}),
        );
        let rs = plan(
            Kind::ReplicaSet,
            "shop",
            &standalone,
            "5",
            s.policy(),
            &present(),
            None,
        );
        assert_eq!(
            patch_of(&rs),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "5"},
                {"op": "add", "path": "/metadata/labels/canarytag", "value": "v9"},
                {"op": "add", "path": "/metadata/labels/stage", "value": "gray"},
            ])
        );
        // One of its pods, created from that template (no tag): the same.
        let its_pod = view(
            json!({"metadata": {"name": "web-gray-x1", "labels": {"app": "web"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": "web-gray", "uid": "r", "controller": true}]}}),
        );
        let owner = OwnerTag {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            name: "web-gray".into(),
            uid: "r".into(),
            value: "v9".into(),
        };
        let pod = plan(
            Kind::Pod,
            "shop",
            &its_pod,
            "6",
            s.policy(),
            &present(),
            Some(&owner),
        );
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
                &present(),
                None
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
                &present(),
                None
            )),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "8"},
                {"op": "add", "path": "/metadata/labels/canarytag", "value": "v8"},
                {"op": "add", "path": "/metadata/labels/stage", "value": "gray"},
            ])
        );
    }

    /// A pod of `tests/fixtures/bootstrap-pods/` as the cluster runs it
    /// (the object of a review, or a golden result: with what admission
    /// gave it), without the labels: the backfill has something to add.
    fn running(fixture: &str) -> Value {
        const DIR: &str = "../../tests/fixtures/bootstrap-pods";
        let text = match fixture {
            "injected-1.5" => {
                include_str!("../../tests/fixtures/bootstrap-pods/injected-1.5.review.json")
            }
            "injected-1.5.out" => {
                include_str!("../../tests/fixtures/bootstrap-pods/injected-1.5.out.json")
            }
            "injected-1.7" => {
                include_str!("../../tests/fixtures/bootstrap-pods/injected-1.7.review.json")
            }
            "injected-1.12" => {
                include_str!("../../tests/fixtures/bootstrap-pods/injected-1.12.review.json")
            }
            "injected-1.22" => {
                include_str!("../../tests/fixtures/bootstrap-pods/injected-1.22.review.json")
            }
            "injected-1.22.out" => {
                include_str!("../../tests/fixtures/bootstrap-pods/injected-1.22.out.json")
            }
            "injected-1.22-user-keepalive" => include_str!(
                "../../tests/fixtures/bootstrap-pods/injected-1.22-user-keepalive.review.json"
            ),
            "native-sidecar-1.27" => {
                include_str!("../../tests/fixtures/bootstrap-pods/native-sidecar-1.27.review.json")
            }
            other => panic!("no fixture {other} in {DIR}"),
        };
        let doc: Value = serde_json::from_str(text).unwrap();
        let mut pod = match doc.get("request") {
            Some(request) => request["object"].clone(),
            None => doc["object"].clone(),
        };
        pod["metadata"]["name"] = json!("checkout-7d9f8b6c5d-x1");
        let labels = pod["metadata"]["labels"].as_object_mut().unwrap();
        labels.remove("stage");
        labels.remove("canarytag");
        pod
    }

    fn restart_with(pod: &Value, s: &Sections, cluster: &ClusterView) -> Option<Restart> {
        match plan(
            Kind::Pod,
            "shop",
            &view(pod.clone()),
            "1",
            s.policy(),
            cluster,
            None,
        ) {
            Plan::Label(p) => p.restart,
            other => panic!("{other:?}"),
        }
    }

    fn restart(pod: &Value) -> Option<Restart> {
        restart_with(pod, &Sections::new(), &present())
    }

    /// What a restart gives each Istio generation's running sidecar, as
    /// admission would decide for a new pod of that version.
    #[test]
    fn what_a_restart_gives_a_sidecar_follows_its_istio_version() {
        // 1.5-1.7 without the template mount: a restart mounts it.
        assert_eq!(restart(&running("injected-1.5")), Some(Restart::Template));
        assert_eq!(restart(&running("injected-1.7")), Some(Restart::Template));
        assert_eq!(restart(&running("injected-1.5.out")), None, "mounted");
        // 1.8-1.17: the agent's keepalive already notices a dead istiod.
        assert_eq!(restart(&running("injected-1.12")), None);
        // 1.18+ without the agent keepalive env: a restart sets it.
        assert_eq!(
            restart(&running("injected-1.22")),
            Some(Restart::AgentKeepalive)
        );
        assert_eq!(
            restart(&running("native-sidecar-1.27")),
            Some(Restart::AgentKeepalive),
            "istio-proxy in initContainers"
        );
        assert_eq!(restart(&running("injected-1.22.out")), None, "env set");
        assert_eq!(
            restart(&running("injected-1.22-user-keepalive")),
            None,
            "the user's own values"
        );
    }

    #[test]
    fn the_version_comes_from_where_admission_reads_it() {
        let mut pod = running("injected-1.22");
        pod["spec"]["containers"][1]["image"] = json!("docker.io/istio/proxyv2:latest");
        assert_eq!(restart(&pod), Some(Restart::VersionUnknown));
        // The pod's proxyImage annotation.
        let mut annotated = pod.clone();
        annotated["metadata"]["annotations"]["sidecar.istio.io/proxyImage"] =
            json!("docker.io/istio/proxyv2:1.6.14");
        assert_eq!(restart(&annotated), Some(Restart::Template));
        // Config istio.proxyVersion.
        let s = Sections::with(|c| c.istio.proxy_version = Some("1.7".into()));
        assert_eq!(restart_with(&pod, &s, &present()), Some(Restart::Template));
        let s = Sections::with(|c| c.istio.proxy_version = Some("1.12".into()));
        assert_eq!(restart_with(&pod, &s, &present()), None);
        // The injector version the cluster runs, last.
        let detected = ClusterView {
            injector_version: Some(mutate::Version {
                major: 1,
                minor: 20,
            }),
            ..present()
        };
        assert_eq!(
            restart_with(&pod, &Sections::new(), &detected),
            Some(Restart::AgentKeepalive)
        );
        // The image tag wins over all of them.
        assert_eq!(
            restart_with(&running("injected-1.5"), &Sections::new(), &detected),
            Some(Restart::Template)
        );
    }

    #[test]
    fn only_sidecars_that_would_get_something_are_reported() {
        let s = Sections::new();
        // Opted out of the keepalive fix, or the fix turned off.
        let mut opted_out = running("injected-1.5");
        opted_out["metadata"]["annotations"]["canary-injector.io/bootstrap"] = json!("false");
        assert_eq!(restart(&opted_out), None);
        let off = Sections::with(|c| c.bootstrap.enabled = false);
        assert_eq!(
            restart_with(&running("injected-1.5"), &off, &present()),
            None
        );
        assert_eq!(
            restart_with(&running("injected-1.22"), &off, &present()),
            None
        );
        // The template fix not set up in the cluster (no source ConfigMap):
        // a restart would not mount anything.
        let not_configured = ClusterView {
            bootstrap_configmap: Availability::NotConfigured,
            ..present()
        };
        assert_eq!(
            restart_with(&running("injected-1.5"), &s, &not_configured),
            None
        );
        // A copy not made yet, or a cache not synced yet: still reported.
        for availability in [Availability::Missing, Availability::Unknown] {
            let cluster = ClusterView {
                bootstrap_configmap: availability,
                ..present()
            };
            assert_eq!(
                restart_with(&running("injected-1.5"), &s, &cluster),
                Some(Restart::Template),
                "{availability:?}"
            );
        }
        // No sidecar: nothing.
        assert_eq!(restart(&json!({"metadata": {"name": "web-1"}})), None);
        // The patch is labels only, whatever a restart would give.
        let Plan::Label(p) = plan(
            Kind::Pod,
            "shop",
            &view(running("injected-1.5")),
            "1",
            s.policy(),
            &present(),
            None,
        ) else {
            unreachable!()
        };
        assert_eq!(
            serde_json::to_value(&p.ops).unwrap(),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
                {"op": "add", "path": "/metadata/labels/stage", "value": "normal"},
            ])
        );
    }

    #[test]
    fn an_injected_pod_read_as_metadata_needs_its_spec() {
        let s = Sections::new();
        let pod = running("injected-1.5");
        let mut metadata_only = pod.clone();
        metadata_only.as_object_mut().unwrap().remove("spec");
        assert!(needs_pod_spec(
            Kind::Pod,
            &view(metadata_only.clone()),
            s.policy()
        ));
        assert!(!needs_pod_spec(Kind::Pod, &view(pod), s.policy()));
        assert!(
            !needs_pod_spec(
                Kind::Pod,
                &view(json!({"metadata": {"name": "web-1"}})),
                s.policy()
            ),
            "no sidecar"
        );
        let off = Sections::with(|c| c.bootstrap.enabled = false);
        assert!(!needs_pod_spec(
            Kind::Pod,
            &view(metadata_only.clone()),
            off.policy()
        ));
        // Decided without it, nothing is reported (never a guess).
        assert_eq!(restart(&metadata_only), None);
    }
}
