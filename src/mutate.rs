//! The pure mutation core: `(subject, config) -> plan (patch ops, warnings,
//! skip reason) | deny`.
//!
//! No I/O, no clock, no globals. The admission server, the offline CLI and
//! the tests all call [`plan`]. The core reads a typed, minimal view of the
//! object ([`ObjectView`]): only the fields a decision needs, so the hot path
//! does not deserialise whole pods.
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
pub mod labels;

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use serde::Deserialize;
use serde_json::Value;

use crate::config::Config;
use bootstrap::PodTarget;
pub use bootstrap::{Availability, BootstrapOutcome, BootstrapSkip};
use labels::sanitize_tag;

/// Annotation the kubelet puts on mirror pods of static pods.
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The kinds the core knows. Admission acts on Pods and ReplicaSets; the
/// offline CLI also labels the pod templates of the other workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `v1/Pod`.
    Pod,
    /// `apps/v1/ReplicaSet`.
    ReplicaSet,
    /// `apps/v1/Deployment` (offline only).
    Deployment,
    /// `apps/v1/StatefulSet` (offline only).
    StatefulSet,
    /// `apps/v1/DaemonSet` (offline only).
    DaemonSet,
    /// `batch/v1/Job` (offline only).
    Job,
    /// `batch/v1/CronJob` (offline only).
    CronJob,
}

impl Kind {
    /// Maps a Kubernetes `kind` name to a [`Kind`].
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "Pod" => Self::Pod,
            "ReplicaSet" => Self::ReplicaSet,
            "Deployment" => Self::Deployment,
            "StatefulSet" => Self::StatefulSet,
            "DaemonSet" => Self::DaemonSet,
            "Job" => Self::Job,
            "CronJob" => Self::CronJob,
            _ => return None,
        })
    }

    /// The Kubernetes `kind` name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pod => "Pod",
            Self::ReplicaSet => "ReplicaSet",
            Self::Deployment => "Deployment",
            Self::StatefulSet => "StatefulSet",
            Self::DaemonSet => "DaemonSet",
            Self::Job => "Job",
            Self::CronJob => "CronJob",
        }
    }
}

/// Where the decision is made: admission acts on Pods and ReplicaSets only;
/// offline (a source edit) also labels workload pod templates.
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

    fn template(&self) -> Option<&TemplateView> {
        self.spec.as_ref()?.template.as_ref()
    }

    fn cronjob_template(&self) -> Option<&TemplateView> {
        self.spec
            .as_ref()?
            .job_template
            .as_ref()?
            .spec
            .as_ref()?
            .template
            .as_ref()
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

/// What to do with an object that is not denied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// RFC 6902 operations, only `add`s; empty when nothing is missing.
    pub ops: Vec<PatchOperation>,
    /// Messages for the user (admission `warnings`, stderr offline).
    pub warnings: Vec<String>,
    /// Set when the object was skipped; `ops` is then empty.
    pub skipped: Option<SkipReason>,
    /// What was changed, for the mutations metric (`labels`,
    /// `template-labels`, `bootstrap-annotations`, `bootstrap-volume`).
    pub mutations: Vec<&'static str>,
    /// What the bootstrap part did, when it was considered.
    pub bootstrap: Option<BootstrapOutcome>,
}

/// What the core knows about the cluster (filled by the adapter from its
/// caches; the core never does I/O).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterView {
    /// Whether the bootstrap ConfigMap exists in the object's namespace.
    pub bootstrap_configmap: Availability,
}

impl ClusterView {
    /// Offline: assume the ConfigMap exists (the user applies it with the manifests).
    pub const OFFLINE: Self = Self {
        bootstrap_configmap: Availability::Present,
    };
}

impl Plan {
    fn skip(reason: SkipReason) -> Self {
        Self {
            skipped: Some(reason),
            ..Self::default()
        }
    }
}

/// The skip rules that need no object: operation, subresource, kind and
/// namespace. Callers check this first so they need not parse an object
/// they will not act on.
pub fn pre_skip(subject: &Subject<'_>, cfg: &Config) -> Option<SkipReason> {
    if subject.operation != Operation::Create {
        return Some(SkipReason::Operation);
    }
    if !subject.sub_resource.is_empty() {
        return Some(SkipReason::SubResource);
    }
    match (subject.kind, subject.mode) {
        (None, _) => return Some(SkipReason::Kind),
        (Some(Kind::Pod | Kind::ReplicaSet), _) | (Some(_), Mode::Offline) => {}
        (Some(_), Mode::Admission) => return Some(SkipReason::Kind),
    }
    if cfg.is_excluded_namespace(subject.namespace) {
        return Some(SkipReason::Namespace);
    }
    None
}

/// Decides what to add to `object`. See the module docs for the rules.
pub fn plan(
    subject: &Subject<'_>,
    object: &ObjectView,
    cfg: &Config,
    cluster: &ClusterView,
) -> Result<Plan, Deny> {
    if let Some(reason) = pre_skip(subject, cfg) {
        return Ok(Plan::skip(reason));
    }
    let Some(kind) = subject.kind else {
        return Ok(Plan::skip(SkipReason::Kind));
    };
    if let Some(found) = object.kind.as_deref()
        && found != kind.name()
    {
        return Err(Deny::KindMismatch {
            expected: kind.name().into(),
            found: found.into(),
        });
    }
    let annotations = object.annotations();
    if kind == Kind::Pod && annotations.is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION)) {
        return Ok(Plan::skip(SkipReason::MirrorPod));
    }
    if object
        .labels()
        .and_then(|l| l.get(&cfg.opt_out_label))
        .is_some_and(|v| v == "false")
    {
        return Ok(Plan::skip(SkipReason::OptedOut));
    }

    let targets = targets(kind, object);
    let mut plan = Plan::default();
    if let Some(labels) = desired_labels(object, &targets, cfg, &mut plan.warnings)? {
        for target in &targets {
            let before = plan.ops.len();
            add_missing(target, &labels, &mut plan.ops);
            if plan.ops.len() > before {
                plan.mutations.push(target.mutation());
            }
        }
    }
    if cfg.bootstrap.enabled
        && let Some(pod) = bootstrap_target(kind, subject.mode, object)
    {
        let outcome = bootstrap::plan(
            &pod,
            cfg,
            cluster.bootstrap_configmap,
            &mut plan.ops,
            &mut plan.warnings,
        );
        plan.mutations.extend(outcome.mutation());
        plan.bootstrap = Some(outcome);
    }
    Ok(plan)
}

/// The pod (or pod template) whose `istio-proxy` gets the bootstrap mount:
/// Pods at admission; offline also workload templates (a source edit).
fn bootstrap_target(kind: Kind, mode: Mode, object: &ObjectView) -> Option<PodTarget<'_>> {
    match (kind, mode) {
        (Kind::Pod, _) => Some(PodTarget {
            holder: ROOT,
            metadata: object.metadata.as_ref(),
            spec: object.spec.as_ref(),
        }),
        (_, Mode::Admission) => None,
        (Kind::ReplicaSet, Mode::Offline) if object.has_controller() => None,
        (Kind::CronJob, Mode::Offline) => {
            template_target(CRONJOB_TEMPLATE, object.cronjob_template())
        }
        (_, Mode::Offline) => template_target(TEMPLATE, object.template()),
    }
}

fn template_target<'a>(
    holder: &'static [&'static str],
    template: Option<&'a TemplateView>,
) -> Option<PodTarget<'a>> {
    let t = template?;
    Some(PodTarget {
        holder,
        metadata: t.metadata.as_ref(),
        spec: t.spec.as_deref(),
    })
}

/// A label map the core fills: where it lives and what it holds now.
struct Target<'a> {
    /// Tokens of the object that holds `metadata` (empty = the root).
    holder: &'static [&'static str],
    /// That holder's `metadata`, if present.
    metadata: Option<&'a MetaView>,
}

impl Target<'_> {
    fn mutation(&self) -> &'static str {
        if self.holder.is_empty() {
            "labels"
        } else {
            "template-labels"
        }
    }

    fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata?.labels.as_ref()
    }
}

const ROOT: &[&str] = &[];
const TEMPLATE: &[&str] = &["spec", "template"];
const CRONJOB_TEMPLATE: &[&str] = &["spec", "jobTemplate", "spec", "template"];

/// The label maps to fill for `kind`, primary first.
fn targets(kind: Kind, object: &ObjectView) -> Vec<Target<'_>> {
    let root = Target {
        holder: ROOT,
        metadata: object.metadata.as_ref(),
    };
    fn template<'a>(
        holder: &'static [&'static str],
        t: Option<&'a TemplateView>,
    ) -> Option<Target<'a>> {
        t.map(|t| Target {
            holder,
            metadata: t.metadata.as_ref(),
        })
    }
    match kind {
        Kind::Pod => vec![root],
        // An owned ReplicaSet's template belongs to its controller: never touch it.
        Kind::ReplicaSet if object.has_controller() => vec![root],
        Kind::ReplicaSet => std::iter::once(root)
            .chain(template(TEMPLATE, object.template()))
            .collect(),
        Kind::Deployment | Kind::StatefulSet | Kind::DaemonSet | Kind::Job => {
            template(TEMPLATE, object.template()).into_iter().collect()
        }
        Kind::CronJob => template(CRONJOB_TEMPLATE, object.cronjob_template())
            .into_iter()
            .collect(),
    }
}

/// The labels every target should carry: `(key, value)` pairs in patch order.
/// `None` when there is nothing to add anywhere.
fn desired_labels(
    object: &ObjectView,
    targets: &[Target<'_>],
    cfg: &Config,
    warnings: &mut Vec<String>,
) -> Result<Option<Vec<(String, String)>>, Deny> {
    if targets.is_empty() {
        return Ok(None);
    }
    // Existing labels win; the first target that has one speaks for all.
    let existing = |key: &str| targets.iter().find_map(|t| t.labels()?.get(key));
    let existing_tag = existing(&cfg.canary_tag_label);
    let existing_stage = existing(&cfg.stage_label);

    // The tag annotation, on the object or (ReplicaSet, workloads) its pod
    // template. Reading an owned ReplicaSet's template is harmless.
    fn template_annotation<'a>(t: Option<&'a TemplateView>, key: &str) -> Option<&'a String> {
        t?.metadata.as_ref()?.annotations.as_ref()?.get(key)
    }
    let annotation = object
        .annotations()
        .and_then(|a| a.get(&cfg.tag_annotation))
        .or_else(|| template_annotation(object.template(), &cfg.tag_annotation))
        .or_else(|| template_annotation(object.cronjob_template(), &cfg.tag_annotation));

    let tag: Option<String> = match (existing_tag, annotation) {
        (Some(tag), Some(requested)) => {
            if sanitize_tag(requested).is_none_or(|s| &s.value != tag) {
                warnings.push(format!(
                    "label {}={tag} is already set; annotation {} ignored",
                    cfg.canary_tag_label, cfg.tag_annotation
                ));
            }
            Some(tag.clone())
        }
        (Some(tag), None) => Some(tag.clone()),
        (None, Some(_)) if existing_stage == Some(&cfg.normal_stage) => {
            warnings.push(format!(
                "label {}={} is already set; annotation {} ignored",
                cfg.stage_label, cfg.normal_stage, cfg.tag_annotation
            ));
            None
        }
        (None, Some(requested)) => {
            let Some(sanitized) = sanitize_tag(requested) else {
                return Err(Deny::UnusableTag {
                    annotation: cfg.tag_annotation.clone(),
                    value: requested.clone(),
                    label: cfg.canary_tag_label.clone(),
                });
            };
            if sanitized.changed {
                warnings.push(format!(
                    "annotation {}: {requested:?} is not a valid label value; using {:?}",
                    cfg.tag_annotation, sanitized.value
                ));
            }
            Some(sanitized.value)
        }
        (None, None) => None,
    };

    let stage = match (existing_stage, &tag) {
        (Some(stage), _) => stage.clone(),
        (None, Some(_)) => cfg.gray_stage.clone(),
        (None, None) => cfg.normal_stage.clone(),
    };
    let mut labels = Vec::with_capacity(2);
    if let Some(tag) = tag {
        labels.push((cfg.canary_tag_label.clone(), tag));
    }
    labels.push((cfg.stage_label.clone(), stage));
    Ok(Some(labels))
}

/// Appends `add` operations for the labels `target` lacks, creating
/// `metadata` or `metadata.labels` when absent.
fn add_missing(target: &Target<'_>, labels: &[(String, String)], ops: &mut Vec<PatchOperation>) {
    let current = target.labels();
    let missing: Vec<&(String, String)> = labels
        .iter()
        .filter(|(k, _)| current.is_none_or(|l| !l.contains_key(k)))
        .collect();
    if missing.is_empty() {
        return;
    }
    let map = || {
        Value::Object(
            missing
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        )
    };
    let path = |tail: &[&str]| PointerBuf::from_tokens(target.holder.iter().chain(tail).copied());
    let add = |path: PointerBuf, value: Value| PatchOperation::Add(AddOperation { path, value });
    match (target.metadata, current) {
        (None, _) => ops.push(add(
            path(&["metadata"]),
            serde_json::json!({ "labels": map() }),
        )),
        (Some(_), None) => ops.push(add(path(&["metadata", "labels"]), map())),
        (Some(_), Some(_)) => {
            for (k, v) in missing {
                let path = PointerBuf::from_tokens(target.holder.iter().copied().chain([
                    "metadata",
                    "labels",
                    k.as_str(),
                ]));
                ops.push(add(path, Value::String(v.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests;
