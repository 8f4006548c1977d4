//! The pure mutation core: `(subject, object, policy, cluster view) ->`
//! [`Decision`] `|` [`Deny`].
//!
//! No I/O, no clock, no globals, no adapter imports. The admission server,
//! the offline CLI and the tests all call [`decide`]; JSON Patch is one
//! rendering of the decision ([`Decision::to_json_patch`]). The core reads a
//! typed, minimal view of the object ([`ObjectView`]): only the fields a
//! decision needs, so the hot path does not deserialise whole pods. Which
//! kinds are acted on, and where their pods live, is one table
//! ([`kinds::KINDS`]); the policy is [`policy`]'s sections.
//!
//! Rules (see README "Labels and annotations"):
//! - only `CREATE` of the main resource is acted on;
//! - excluded namespaces, mirror pods and objects labelled
//!   `<optOutLabel>: "false"` are skipped;
//! - a Pod gets labels on `metadata.labels`; a ReplicaSet owned by a
//!   controller gets them on its own `metadata.labels` only (mutating its
//!   template makes a Deployment create ReplicaSets forever); a standalone
//!   ReplicaSet also on `spec.template.metadata.labels`;
//! - existing labels are never overwritten, and missing ones are chosen
//!   consistently with those present;
//! - `spec.selector` is never touched.

pub mod bootstrap;
pub mod decision;
pub mod kinds;
pub mod labels;
mod patch;
pub mod policy;

use bootstrap::PodTarget;
pub use bootstrap::{
    Availability, BootstrapDecision, BootstrapOutcome, BootstrapSkip, KeepaliveForm, Version,
};
pub use decision::{Decision, Intent, Label, LabelTarget, Warning};
pub use kinds::{KINDS, Kind, KindInfo, Location, Scope};
pub use policy::{
    BootstrapPolicy, IstioPolicy, Keepalive, LabelPolicy, NamespacePolicy, Policy, PolicyError,
};

use std::collections::BTreeMap;

use serde::Deserialize;

/// Annotation the kubelet puts on mirror pods of static pods.
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Where the decision is made: admission acts on the kinds the table marks
/// `admission` (Pods and ReplicaSets); offline (a source edit) acts on every
/// kind of [`KINDS`] and also mounts the bootstrap into pod templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Called by the apiserver through `/mutate`.
    Admission,
    /// `canary-injector mutate -f`.
    Offline,
}

/// The admission operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `CREATE`: the only one acted on.
    Create,
    /// `UPDATE`, `DELETE`, `CONNECT` or anything else.
    Other,
}

impl Operation {
    /// Parses the `request.operation` string.
    pub fn from_name(op: &str) -> Self {
        if op == "CREATE" {
            Self::Create
        } else {
            Self::Other
        }
    }
}

/// What the core is asked to decide about.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The object's kind, or `None` for a kind the core does not know.
    pub kind: Option<Kind>,
    /// The operation.
    pub operation: Operation,
    /// The request namespace (empty for cluster-scoped or unknown).
    pub namespace: &'a str,
    /// `request.subResource` (empty for the main resource).
    pub sub_resource: &'a str,
    /// Admission or offline.
    pub mode: Mode,
}

/// The few fields of an object the core reads. Everything else in the JSON
/// is skipped by serde and left untouched by the patch.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectView {
    /// `kind` as written in the object, checked against the request kind.
    #[serde(default)]
    pub kind: Option<String>,
    /// `metadata`, `None` when absent.
    #[serde(default)]
    pub metadata: Option<MetaView>,
    /// `spec`, for the pod template of ReplicaSets and workloads.
    #[serde(default)]
    pub spec: Option<SpecView>,
}

/// The parts of `metadata` the core reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetaView {
    /// `metadata.name` (empty for controller-created pods).
    #[serde(default)]
    pub name: Option<String>,
    /// `metadata.generateName`.
    #[serde(default)]
    pub generate_name: Option<String>,
    /// `metadata.labels`; `None` when absent or `null`.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// `metadata.annotations`; `None` when absent or `null`.
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
    /// `metadata.ownerReferences`.
    #[serde(default)]
    pub owner_references: Option<Vec<OwnerRef>>,
}

/// One `ownerReferences` entry.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct OwnerRef {
    /// Kind of the owner, e.g. `Deployment`.
    #[serde(default)]
    pub kind: String,
    /// True for the managing controller.
    #[serde(default)]
    pub controller: Option<bool>,
}

/// The parts of `spec` the core reads: a workload's template, or a pod's
/// containers and volumes (for the bootstrap mount).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecView {
    /// `hostNetwork` (pods): Istio does not inject such pods.
    #[serde(default)]
    pub host_network: Option<bool>,
    /// `containers` (pods).
    #[serde(default)]
    pub containers: Option<Vec<bootstrap::ContainerView>>,
    /// `initContainers` (pods; native sidecars live here from Istio 1.27).
    #[serde(default)]
    pub init_containers: Option<Vec<bootstrap::ContainerView>>,
    /// `volumes` (pods; names only).
    #[serde(default)]
    pub volumes: Option<Vec<bootstrap::NamedView>>,
    /// `spec.template` (ReplicaSet, Deployment, StatefulSet, DaemonSet, Job).
    #[serde(default)]
    pub template: Option<TemplateView>,
    /// `spec.jobTemplate` (CronJob).
    #[serde(default)]
    pub job_template: Option<JobTemplateView>,
}

/// A pod template (`spec.template`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TemplateView {
    /// `spec.template.metadata`.
    #[serde(default)]
    pub metadata: Option<MetaView>,
    /// `spec.template.spec`.
    #[serde(default)]
    pub spec: Option<Box<SpecView>>,
}

/// A CronJob's `spec.jobTemplate`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct JobTemplateView {
    /// `spec.jobTemplate.spec`.
    #[serde(default)]
    pub spec: Option<Box<SpecView>>,
}

impl ObjectView {
    fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata.as_ref()?.labels.as_ref()
    }

    fn annotations(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata.as_ref()?.annotations.as_ref()
    }

    /// True when an ownerReference has `controller: true`.
    pub fn has_controller(&self) -> bool {
        self.metadata
            .as_ref()
            .and_then(|m| m.owner_references.as_ref())
            .is_some_and(|refs| refs.iter().any(|r| r.controller == Some(true)))
    }

    /// The pod template at `location` (`None` for [`Location::Object`]).
    pub fn template_at(&self, location: Location) -> Option<&TemplateView> {
        let spec = self.spec.as_ref()?;
        match location {
            Location::Object => None,
            Location::PodTemplate => spec.template.as_ref(),
            Location::CronJobPodTemplate => {
                spec.job_template.as_ref()?.spec.as_ref()?.template.as_ref()
            }
        }
    }
}

/// Why an object was left alone. The label value of the skip metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Not a `CREATE`.
    Operation,
    /// A subresource such as `pods/binding`.
    SubResource,
    /// A kind the webhook does not mutate at admission.
    Kind,
    /// A system namespace or the webhook's own.
    Namespace,
    /// A mirror pod of a static pod (the kubelet cannot be told about labels).
    MirrorPod,
    /// Labelled `<optOutLabel>: "false"`.
    OptedOut,
}

impl SkipReason {
    /// Every skip, for documentation and tests.
    pub const ALL: [Self; 6] = [
        Self::Operation,
        Self::SubResource,
        Self::Kind,
        Self::Namespace,
        Self::MirrorPod,
        Self::OptedOut,
    ];

    /// Stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Operation => "operation",
            Self::SubResource => "subresource",
            Self::Kind => "kind",
            Self::Namespace => "namespace",
            Self::MirrorPod => "mirror-pod",
            Self::OptedOut => "opted-out",
        }
    }
}

/// Why a request is refused. `Display` is the user-facing message: it says
/// what is wrong and what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Deny {
    /// The tag annotation has no letter or digit to build a label from.
    #[error(
        "annotation {annotation}: {value:?} has no letters or digits to use as a canary tag; \
         set it to a name made of [A-Za-z0-9._-] (it becomes the {label} label, at most 63 characters)"
    )]
    UnusableTag {
        /// The annotation key.
        annotation: String,
        /// The value given.
        value: String,
        /// The label it would have become.
        label: String,
    },
    /// The object's own `kind` disagrees with the request's kind.
    #[error("object kind {found:?} does not match the request kind {expected:?}")]
    KindMismatch {
        /// Kind named by the request.
        expected: String,
        /// Kind written in the object.
        found: String,
    },
    /// A `CREATE` without an object.
    #[error("request has no object to admit")]
    MissingObject,
    /// The object does not have the shape of its kind.
    #[error("cannot read the {kind} object: {reason}")]
    MalformedObject {
        /// The request kind.
        kind: String,
        /// The parse error.
        reason: String,
    },
}

/// What the core knows about the cluster (filled by the adapter from its
/// caches; the core never does I/O).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterView {
    /// Whether the bootstrap ConfigMap exists in the object's namespace.
    pub bootstrap_configmap: Availability,
    /// The Istio version the cluster's sidecar injector(s) inject, when
    /// known (detected by `crate::istio`); used for pods that are not
    /// injected yet, after the pod's own proxy image and config
    /// `istio.proxyVersion`.
    pub injector_version: Option<Version>,
}

impl ClusterView {
    /// Offline: assume the ConfigMap exists (the user applies it with the
    /// manifests); no injector known (config `istio.proxyVersion` or the
    /// proxy image tell the version).
    pub const OFFLINE: Self = Self {
        bootstrap_configmap: Availability::Present,
        injector_version: None,
    };

    /// No cluster: nothing known.
    pub const UNKNOWN: Self = Self {
        bootstrap_configmap: Availability::Unknown,
        injector_version: None,
    };
}

/// The skip rules that need no object: operation, subresource, kind and
/// namespace. Callers check this first so they need not parse an object
/// they will not act on.
pub fn pre_skip(subject: &Subject<'_>, policy: Policy<'_>) -> Option<SkipReason> {
    if subject.operation != Operation::Create {
        return Some(SkipReason::Operation);
    }
    if !subject.sub_resource.is_empty() {
        return Some(SkipReason::SubResource);
    }
    match (subject.kind, subject.mode) {
        (None, _) => return Some(SkipReason::Kind),
        (Some(kind), Mode::Admission) if !kind.info().admission => return Some(SkipReason::Kind),
        (Some(_), _) => {}
    }
    if policy.namespaces.is_excluded(subject.namespace) {
        return Some(SkipReason::Namespace);
    }
    None
}

/// Decides what `object` needs. See the module docs for the rules.
pub fn decide<'a>(
    subject: &Subject<'_>,
    object: &'a ObjectView,
    policy: Policy<'a>,
    cluster: &ClusterView,
) -> Result<Decision<'a>, Deny> {
    if let Some(reason) = pre_skip(subject, policy) {
        return Ok(Decision::skip(reason));
    }
    let Some(kind) = subject.kind else {
        return Ok(Decision::skip(SkipReason::Kind));
    };
    let info = kind.info();
    if let Some(found) = object.kind.as_deref()
        && found != info.name
    {
        return Err(Deny::KindMismatch {
            expected: info.name.into(),
            found: found.into(),
        });
    }
    let annotations = object.annotations();
    if info.pod == Location::Object
        && annotations.is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION))
    {
        return Ok(Decision::skip(SkipReason::MirrorPod));
    }
    if policy.labels.opts_out(object.labels()) {
        return Ok(Decision::skip(SkipReason::OptedOut));
    }

    // The pod template, unless the object's controller owns it.
    let template = object
        .template_at(info.pod)
        .filter(|_| !(info.owned_template_untouched && object.has_controller()));
    let holders = [
        info.labels_on_object
            .then_some((Location::Object, object.metadata.as_ref())),
        template.map(|t| (info.pod, t.metadata.as_ref())),
    ];
    let mut decision = Decision::default();
    if holders.iter().any(Option::is_some) {
        let labels_of = |m: Option<&'a MetaView>| m.and_then(|m| m.labels.as_ref());
        // Existing labels win; the first target that has one speaks for all.
        let existing = |key: &str| {
            holders
                .iter()
                .flatten()
                .find_map(|(_, m)| labels_of(*m)?.get(key))
        };
        // The tag annotation, on the object or its pod template. Reading
        // an owned ReplicaSet's template is harmless.
        let tag_annotation = &policy.labels.tag_annotation;
        let annotation = annotations.and_then(|a| a.get(tag_annotation)).or_else(|| {
            object
                .template_at(info.pod)?
                .metadata
                .as_ref()?
                .annotations
                .as_ref()?
                .get(tag_annotation)
        });
        let intent = policy.labels.resolve(
            existing(&policy.labels.canary_tag),
            existing(&policy.labels.stage),
            annotation,
            &mut decision.warnings,
        )?;
        decision.targets = holders
            .iter()
            .flatten()
            .map(|&(location, metadata)| {
                let labels = labels_of(metadata);
                let lacks = |key: &str| labels.is_none_or(|l| !l.contains_key(key));
                LabelTarget {
                    location,
                    has_metadata: metadata.is_some(),
                    has_labels: labels.is_some(),
                    lacks_tag: intent.tag.as_ref().is_some_and(|t| lacks(t.key)),
                    lacks_stage: lacks(intent.stage.key),
                }
            })
            .collect();
        decision.intent = Some(intent);
    }

    if policy.bootstrap.enabled
        && let Some(pod) = bootstrap_target(info, subject.mode, object)
    {
        decision.bootstrap = Some(bootstrap::decide(
            &pod,
            policy,
            cluster,
            &mut decision.warnings,
        ));
    }
    Ok(decision)
}

/// The pod (or pod template) whose `istio-proxy` gets the bootstrap mount:
/// Pods at admission; offline also workload templates (a source edit),
/// except the template of a controller-owned ReplicaSet.
fn bootstrap_target<'a>(
    info: &KindInfo,
    mode: Mode,
    object: &'a ObjectView,
) -> Option<PodTarget<'a>> {
    if info.pod == Location::Object {
        return Some(PodTarget {
            location: Location::Object,
            metadata: object.metadata.as_ref(),
            spec: object.spec.as_ref(),
        });
    }
    if mode == Mode::Admission || (info.owned_template_untouched && object.has_controller()) {
        return None;
    }
    let template = object.template_at(info.pod)?;
    Some(PodTarget {
        location: info.pod,
        metadata: template.metadata.as_ref(),
        spec: template.spec.as_deref(),
    })
}

#[cfg(test)]
mod tests;
