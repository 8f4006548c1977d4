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
//! Rules (see docs/labels.md):
//! - `CREATE` of the main resource is acted on, and `UPDATE` of workloads
//!   whose pod template may change ([`KindInfo::update`]);
//! - excluded namespaces, mirror pods, objects labelled
//!   `<optOutLabel>: "false"` and workloads being deleted are skipped;
//! - a Pod gets labels on `metadata.labels`; a ReplicaSet owned by a
//!   controller gets them on its own `metadata.labels` only (mutating its
//!   template makes a Deployment create ReplicaSets forever); a standalone
//!   ReplicaSet also on `spec.template.metadata.labels`;
//! - what an object means follows its pods: a pod template a controller
//!   owns speaks for the object (an owned ReplicaSet reads the tag from its
//!   template, never from its own annotations, so it is never labelled gray
//!   while its pods are normal); so does every template in the backfill
//!   ([`Mode::Backfill`]), which cannot change one;
//! - at admission a workload (Deployment, StatefulSet, DaemonSet, Job,
//!   CronJob) gets no labels: the tag annotation on its own metadata is
//!   copied into its pod template ([`TemplateTag`]), so its pods carry it;
//! - existing labels are never overwritten, and missing ones are chosen
//!   consistently with those present;
//! - `spec.selector` is never touched.

pub mod bootstrap;
pub mod decision;
pub mod kinds;
pub mod labels;
mod patch;
pub mod policy;
pub mod version;

use bootstrap::PodTarget;
pub use bootstrap::{
    Availability, BootstrapDecision, BootstrapOutcome, BootstrapSkip, KeepaliveForm,
};
pub use decision::{
    Contradiction, Decision, Intent, Label, LabelTarget, OwnerTag, RequestedTag, TagSource,
    TemplateTag, Warning,
};
pub use kinds::{KINDS, Kind, KindInfo, Location, Scope};
pub use policy::{
    BootstrapPolicy, IstioPolicy, Keepalive, LabelPolicy, NamespacePolicy, Policy, PolicyError,
};
pub use version::Version;

use std::borrow::{Borrow, Cow};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;

use serde::Deserialize;

/// Annotation the kubelet puts on mirror pods of static pods.
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Where the decision is made: admission acts on the kinds the table marks
/// `admission` (Pods, ReplicaSets, and the workloads whose template gets
/// their tag); offline (a source edit) acts on every kind of [`KINDS`] and
/// also mounts the bootstrap into pod templates; the backfill decides as
/// admission does at `CREATE`, about an object that already runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Called by the apiserver through `/mutate`.
    Admission,
    /// `canary-injector mutate -f`.
    Offline,
    /// The backfill: a running object whose own `metadata.labels` are all
    /// it may change. Its pod template (if it has one) is never changed and
    /// is what its running pods were created from, so the template speaks
    /// for the object whether or not a controller owns it: a standalone
    /// ReplicaSet is labelled as its pods are, never from its own tag
    /// annotation alone.
    Backfill,
}

/// The admission operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `CREATE`: acted on for every kind.
    Create,
    /// `UPDATE`: acted on for the kinds whose row says `update`.
    Update,
    /// `DELETE`, `CONNECT` or anything else.
    Other,
}

impl Operation {
    /// Parses the `request.operation` string.
    pub fn from_name(op: &str) -> Self {
        match op {
            "CREATE" => Self::Create,
            "UPDATE" => Self::Update,
            _ => Self::Other,
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
    /// The tag a workload that owns the object asks for on its own
    /// metadata, when the adapter knows one (its caches; offline, the
    /// manifests): the last place the intent is looked for.
    pub owner_tag: Option<&'a OwnerTag>,
}

/// A string of the object as read: borrowed from the JSON it was read from
/// when written there without escapes (nothing copied: a review holds
/// dozens of names, keys and paths), owned otherwise. Reads as `str`;
/// compares, orders, hashes and prints (`Debug` too) as the `str`, so a
/// map keyed by it is looked up by `&str`.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Text<'a>(pub Cow<'a, str>);

impl Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Text<'_> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'a> From<&'a str> for Text<'a> {
    fn from(s: &'a str) -> Self {
        Self(Cow::Borrowed(s))
    }
}

impl From<String> for Text<'_> {
    fn from(s: String) -> Self {
        Self(Cow::Owned(s))
    }
}

impl PartialEq<str> for Text<'_> {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Text<'_> {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

/// Read as `String` is (the same calls and error messages), borrowing when
/// the deserializer lends the string.
impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_string(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> serde::de::Visitor<'de> for TextVisitor {
    type Value = Text<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // What `String` says, so errors read as before.
        f.write_str("a string")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
        Ok(Text(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
        Ok(Text(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
        Ok(Text(Cow::Owned(v)))
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Text<'de>, E> {
        match std::str::from_utf8(v) {
            Ok(s) => Ok(Text(Cow::Owned(s.to_owned()))),
            Err(_) => Err(E::invalid_value(serde::de::Unexpected::Bytes(v), &self)),
        }
    }

    fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<Text<'de>, E> {
        match std::str::from_utf8(v) {
            Ok(s) => Ok(Text(Cow::Borrowed(s))),
            Err(_) => Err(E::invalid_value(serde::de::Unexpected::Bytes(v), &self)),
        }
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Text<'de>, E> {
        match String::from_utf8(v) {
            Ok(s) => Ok(Text(Cow::Owned(s))),
            Err(e) => Err(E::invalid_value(
                serde::de::Unexpected::Bytes(&e.into_bytes()),
                &self,
            )),
        }
    }
}

/// Labels or annotations as read from an object (`BTreeMap<Text, Text>`)
/// or held by a cache (`BTreeMap<String, String>`): what the rules look up.
pub trait StrMap {
    /// The value of `key`, if set.
    fn value(&self, key: &str) -> Option<&str>;

    /// Whether `key` is set.
    fn has(&self, key: &str) -> bool {
        self.value(key).is_some()
    }
}

impl StrMap for BTreeMap<String, String> {
    fn value(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl StrMap for BTreeMap<Text<'_>, Text<'_>> {
    fn value(&self, key: &str) -> Option<&str> {
        self.get(key).map(|v| &**v)
    }
}

/// Labels or annotations of an object as read.
pub type TextMap<'a> = BTreeMap<Text<'a>, Text<'a>>;

/// The few fields of an object the core reads. Everything else in the JSON
/// is skipped by serde and left untouched by the patch. Strings borrow from
/// the JSON read ([`Text`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectView<'a> {
    /// `kind` as written in the object, checked against the request kind.
    #[serde(default, borrow)]
    pub kind: Option<Text<'a>>,
    /// `metadata`, `None` when absent.
    #[serde(default, borrow)]
    pub metadata: Option<MetaView<'a>>,
    /// `spec`, for the pod template of ReplicaSets and workloads.
    #[serde(default, borrow)]
    pub spec: Option<SpecView<'a>>,
}

impl ObjectView<'static> {
    /// Reads the view of an object held as a JSON value, as
    /// `serde_json::from_value` does (the strings owned).
    pub fn from_value(value: serde_json::Value) -> Result<Self, serde_json::Error> {
        Self::deserialize(value)
    }
}

/// The parts of `metadata` the core reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetaView<'a> {
    /// `metadata.name` (empty for controller-created pods).
    #[serde(default, borrow)]
    pub name: Option<Text<'a>>,
    /// `metadata.generateName`.
    #[serde(default, borrow)]
    pub generate_name: Option<Text<'a>>,
    /// `metadata.labels`; `None` when absent or `null`.
    #[serde(default, borrow)]
    pub labels: Option<TextMap<'a>>,
    /// `metadata.annotations`; `None` when absent or `null`.
    #[serde(default, borrow)]
    pub annotations: Option<TextMap<'a>>,
    /// `metadata.ownerReferences`.
    #[serde(default)]
    pub owner_references: Option<Vec<OwnerRef>>,
    /// `metadata.deletionTimestamp`: set once the object is being deleted.
    #[serde(default, borrow)]
    pub deletion_timestamp: Option<Text<'a>>,
}

impl MetaView<'_> {
    /// The managing controller's ownerReference (`controller: true`).
    pub fn controller(&self) -> Option<&OwnerRef> {
        self.owner_references
            .as_deref()?
            .iter()
            .find(|r| r.controller == Some(true))
    }
}

/// One `ownerReferences` entry: enough to tell the managing controller and
/// to point an Event at it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerRef {
    /// API version of the owner, e.g. `apps/v1`.
    #[serde(default)]
    pub api_version: String,
    /// Kind of the owner, e.g. `Deployment`.
    #[serde(default)]
    pub kind: String,
    /// Name of the owner.
    #[serde(default)]
    pub name: String,
    /// UID of the owner.
    #[serde(default)]
    pub uid: String,
    /// True for the managing controller.
    #[serde(default)]
    pub controller: Option<bool>,
}

/// The parts of `spec` the core reads: a workload's template, or a pod's
/// containers and volumes (for the bootstrap mount).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecView<'a> {
    /// `hostNetwork` (pods): Istio does not inject such pods.
    #[serde(default)]
    pub host_network: Option<bool>,
    /// `containers` (pods).
    #[serde(default, borrow)]
    pub containers: Option<Vec<bootstrap::ContainerView<'a>>>,
    /// `initContainers` (pods; native sidecars live here from Istio 1.27).
    #[serde(default, borrow)]
    pub init_containers: Option<Vec<bootstrap::ContainerView<'a>>>,
    /// `volumes` (pods; names only).
    #[serde(default, borrow)]
    pub volumes: Option<Vec<bootstrap::NamedView<'a>>>,
    /// `spec.template` (ReplicaSet, Deployment, StatefulSet, DaemonSet, Job).
    #[serde(default, borrow)]
    pub template: Option<TemplateView<'a>>,
    /// `spec.jobTemplate` (CronJob).
    #[serde(default, borrow)]
    pub job_template: Option<JobTemplateView<'a>>,
}

/// A pod template (`spec.template`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TemplateView<'a> {
    /// `spec.template.metadata`.
    #[serde(default, borrow)]
    pub metadata: Option<MetaView<'a>>,
    /// `spec.template.spec`.
    #[serde(default, borrow)]
    pub spec: Option<Box<SpecView<'a>>>,
}

/// A CronJob's `spec.jobTemplate`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct JobTemplateView<'a> {
    /// `spec.jobTemplate.spec`.
    #[serde(default, borrow)]
    pub spec: Option<Box<SpecView<'a>>>,
}

impl<'a> ObjectView<'a> {
    fn labels(&self) -> Option<&TextMap<'a>> {
        self.metadata.as_ref()?.labels.as_ref()
    }

    fn annotations(&self) -> Option<&TextMap<'a>> {
        self.metadata.as_ref()?.annotations.as_ref()
    }

    /// True when an ownerReference has `controller: true`.
    pub fn has_controller(&self) -> bool {
        self.controller().is_some()
    }

    /// The managing controller's ownerReference, if any.
    pub fn controller(&self) -> Option<&OwnerRef> {
        self.metadata.as_ref()?.controller()
    }

    fn is_deleting(&self) -> bool {
        self.metadata
            .as_ref()
            .is_some_and(|m| m.deletion_timestamp.is_some())
    }

    /// The pod template at `location` (`None` for [`Location::Object`]).
    pub fn template_at(&self, location: Location) -> Option<&TemplateView<'a>> {
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
    /// An operation the kind is not acted on for (anything but `CREATE`,
    /// or `UPDATE` of a workload).
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
    /// An `UPDATE` of an object being deleted (garbage collection removes
    /// finalizers that way; nothing to add to it).
    Deleting,
}

impl SkipReason {
    /// Every skip, for documentation and tests.
    pub const ALL: [Self; 7] = [
        Self::Operation,
        Self::SubResource,
        Self::Kind,
        Self::Namespace,
        Self::MirrorPod,
        Self::OptedOut,
        Self::Deleting,
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
            Self::Deleting => "deleting",
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

impl Deny {
    /// Every reason code, for documentation and tests.
    pub const REASONS: [&'static str; 4] = [
        "unusable-tag",
        "kind-mismatch",
        "missing-object",
        "malformed-object",
    ];

    /// Stable kebab-case code: an Event reason and a log field.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnusableTag { .. } => Self::REASONS[0],
            Self::KindMismatch { .. } => Self::REASONS[1],
            Self::MissingObject => Self::REASONS[2],
            Self::MalformedObject { .. } => Self::REASONS[3],
        }
    }
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
    /// How the namespace joins the mesh, from its labels, when known.
    pub mesh: NamespaceMesh,
}

/// How a namespace joins the Istio mesh, from its labels: what decides
/// whether a pod not injected yet will get a sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NamespaceMesh {
    /// Not known (no cluster, or the cache has not seen the namespace).
    #[default]
    Unknown,
    /// Sidecar injection: `istio-injection: enabled` or `istio.io/rev`.
    Sidecar,
    /// Ambient mode: `istio.io/dataplane-mode: ambient` (no sidecars).
    Ambient,
    /// Neither: pods get a sidecar only when they ask
    /// (`sidecar.istio.io/inject: "true"` label).
    NoInjection,
}

impl NamespaceMesh {
    /// The mode a namespace's labels say.
    pub fn of(labels: Option<&BTreeMap<String, String>>) -> Self {
        let get = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
        if get("istio.io/dataplane-mode") == Some("ambient") {
            Self::Ambient
        } else if get("istio-injection") == Some("enabled") || get("istio.io/rev").is_some() {
            Self::Sidecar
        } else {
            Self::NoInjection
        }
    }
}

impl ClusterView {
    /// Offline: assume the ConfigMap exists (the user applies it with the
    /// manifests); no injector known (config `istio.proxyVersion` or the
    /// proxy image tell the version).
    pub const OFFLINE: Self = Self {
        bootstrap_configmap: Availability::Present,
        injector_version: None,
        mesh: NamespaceMesh::Unknown,
    };

    /// No cluster: nothing known.
    pub const UNKNOWN: Self = Self {
        bootstrap_configmap: Availability::Unknown,
        injector_version: None,
        mesh: NamespaceMesh::Unknown,
    };
}

/// The skip rules that need no object: operation, subresource, kind and
/// namespace. Callers check this first so they need not parse an object
/// they will not act on.
pub fn pre_skip(subject: &Subject<'_>, policy: Policy<'_>) -> Option<SkipReason> {
    let acted_on = match subject.operation {
        Operation::Create => true,
        Operation::Update => {
            subject.mode == Mode::Admission && subject.kind.is_some_and(|k| k.info().update)
        }
        Operation::Other => false,
    };
    if !acted_on {
        return Some(SkipReason::Operation);
    }
    if !subject.sub_resource.is_empty() {
        return Some(SkipReason::SubResource);
    }
    match (subject.kind, subject.mode) {
        (None, _) => return Some(SkipReason::Kind),
        (Some(kind), Mode::Admission | Mode::Backfill) if !kind.info().admission => {
            return Some(SkipReason::Kind);
        }
        (Some(_), _) => {}
    }
    if policy.namespaces.is_excluded(subject.namespace) {
        return Some(SkipReason::Namespace);
    }
    None
}

/// Decides what `object` needs. See the module docs for the rules.
pub fn decide<'a>(
    subject: &Subject<'a>,
    object: &'a ObjectView<'a>,
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
    if subject.operation == Operation::Update && object.is_deleting() {
        return Ok(Decision::skip(SkipReason::Deleting));
    }

    let mut decision = Decision::default();
    let template = object.template_at(info.pod);
    // A pod template a controller owns is never changed, and it speaks
    // for the object: the object's pods are created from it. The backfill
    // changes no template at all, and the running pods came from it.
    let owned = template.is_some()
        && info.owned_template_untouched
        && (object.has_controller() || subject.mode == Mode::Backfill);
    let own = object.metadata.as_ref();
    let template_meta = template.and_then(|t| t.metadata.as_ref());
    // Labels go on the object's own metadata (Pods, ReplicaSets) and on a
    // template nobody else owns, except a workload's at admission: its
    // pods get their labels at their own CREATE, and its tag annotation is
    // copied into the template instead (below). Never both on one
    // template, so the two never create the same `metadata`.
    let label_template =
        template.is_some() && !owned && (info.labels_on_object || subject.mode == Mode::Offline);
    let holders = [
        info.labels_on_object.then_some((Location::Object, own)),
        label_template.then_some((info.pod, template_meta)),
    ];
    if holders.iter().any(Option::is_some) || template.is_some() {
        let labels_of = |m: Option<&'a MetaView<'a>>| m.and_then(|m| m.labels.as_ref());
        let object_labels = labels_of(own).filter(|_| info.labels_on_object);
        let template_labels = labels_of(template_meta);
        // Existing labels win; the first map that has one speaks for all:
        // the owned template first (what the pods get), else the object.
        let sources = if owned {
            [template_labels, object_labels]
        } else {
            [object_labels, template_labels]
        };
        let existing = |key: &str| sources.iter().flatten().find_map(|l| l.value(key));
        let tag_key = &policy.labels.tag_annotation;
        let tag_of = |m: Option<&'a MetaView<'a>>| m?.annotations.as_ref()?.value(tag_key);
        let (own_tag, template_tag) = (tag_of(own), tag_of(template_meta));
        // The tag annotation: the first of the object's own, its pod
        // template's, and the owner chain's (a workload's metadata). An
        // owned template comes first: the object is labelled as the pods
        // created from it are (a pod's own annotations are its template's,
        // and the owner chain starts at this object's metadata).
        let from =
            |value: Option<&'a str>, source| value.map(|value| RequestedTag { value, source });
        let owner = subject.owner_tag.map(|o| RequestedTag {
            value: o.value.as_str(),
            source: TagSource::Owner(o),
        });
        let (own_req, template_req) = (
            from(own_tag, TagSource::Object),
            from(template_tag, TagSource::Template),
        );
        decision.requested = if owned {
            template_req.or(own_req).or(owner)
        } else {
            own_req.or(template_req).or(owner)
        };
        let annotation = decision.requested.map(|r| r.value);
        let intent = match policy.labels.resolve(
            existing(&policy.labels.canary_tag),
            existing(&policy.labels.stage),
            annotation,
            &mut decision.warnings,
        ) {
            Ok(intent) => intent,
            // An UPDATE is never refused for what the object carried
            // already: controllers and the garbage collector update
            // workloads too. The tag is just not copied.
            Err(Deny::UnusableTag {
                annotation,
                value,
                label,
            }) if subject.operation == Operation::Update => {
                decision.warnings.push(Warning::TagUnusable {
                    annotation,
                    value,
                    label,
                });
                return Ok(decision);
            }
            // A tag the object did not ask for itself (its owner's, or a
            // copy of its Deployment's on an owned ReplicaSet) never
            // refuses it: a controller creates it, and refusing would stop
            // the workload. It gets no labels (in no subset, never in
            // `normal`) until the tag is fixed.
            Err(Deny::UnusableTag {
                annotation, value, ..
            }) if decision.requested.is_some_and(|r| match r.source {
                TagSource::Owner(_) => true,
                TagSource::Object => owned,
                TagSource::Template => false,
            }) =>
            {
                let on = match decision.requested.map(|r| r.source) {
                    Some(TagSource::Owner(o)) => format!("{} {}", o.kind, o.name),
                    _ => "this object's own metadata".to_owned(),
                };
                decision.warnings.push(Warning::OwnerTagUnusable {
                    annotation,
                    value,
                    on,
                });
                return Ok(decision);
            }
            Err(deny) => return Err(deny),
        };
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

        if intent.stage() == policy.labels.gray_stage && intent.tag().is_none() {
            decision.warnings.push(Warning::GrayWithoutTag {
                stage: format!("{}={}", policy.labels.stage, policy.labels.gray_stage),
                label: policy.labels.canary_tag.clone(),
                annotation: tag_key.clone(),
            });
        }
        decision.intent = Some(intent);

        match own_tag.filter(|&value| template_tag != Some(value)) {
            // The template has another tag: labels follow it. (Its text
            // names the controller: the backfill's standalone ReplicaSets
            // have none, and the backfill reports no warning.)
            Some(value) if owned && object.has_controller() && template_tag.is_some() => {
                decision.warnings.push(Warning::TemplateTagDiffers {
                    annotation: tag_key.clone(),
                    value: value.to_owned(),
                    template: template_tag.map(str::to_owned),
                });
            }
            // Its own tag alone: labels follow it (its pods' owner chain
            // finds it too); an owned template is never changed.
            Some(_) if owned && object.has_controller() => {}
            // A workload at admission: its tag annotation reaches its pods
            // through the template (the rule `mutate -f` applies with
            // labels). The workload's own annotation wins, so a changed
            // tag reaches the template, which rolls the workload.
            Some(value) if subject.mode == Mode::Admission && !info.labels_on_object => {
                decision.template_tag = Some(TemplateTag {
                    location: info.pod,
                    key: tag_key,
                    value,
                    previous: template_tag,
                    has_metadata: template_meta.is_some(),
                    has_annotations: template_meta.is_some_and(|m| m.annotations.is_some()),
                });
                if subject.operation == Operation::Update || template_tag.is_some() {
                    decision.warnings.push(Warning::TemplateTagCopied {
                        annotation: tag_key.clone(),
                        value: value.to_owned(),
                        previous: template_tag.map(str::to_owned),
                    });
                }
            }
            _ => {}
        }
    }

    if policy.bootstrap.enabled
        && let Some(pod) = bootstrap_target(info, subject.mode, object)
    {
        let bootstrap = bootstrap::decide(&pod, policy, cluster);
        if let BootstrapDecision::Skipped(skip) = bootstrap
            && let Some(warning) = Warning::for_bootstrap_skip(skip, policy)
        {
            decision.warnings.push(warning);
        }
        decision.bootstrap = Some(bootstrap);
    }
    Ok(decision)
}

/// The pod (or pod template) whose `istio-proxy` gets the bootstrap mount:
/// Pods at admission; offline also workload templates (a source edit),
/// except the template of a controller-owned ReplicaSet.
fn bootstrap_target<'a>(
    info: &KindInfo,
    mode: Mode,
    object: &'a ObjectView<'a>,
) -> Option<PodTarget<'a>> {
    if info.pod == Location::Object {
        return Some(PodTarget {
            location: Location::Object,
            metadata: object.metadata.as_ref(),
            spec: object.spec.as_ref(),
        });
    }
    if mode != Mode::Offline || (info.owned_template_untouched && object.has_controller()) {
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
