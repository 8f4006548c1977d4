//! The backfill controller (leader only): gives the Pods and ReplicaSets of
//! opted-in namespaces the labels admission would have given them at
//! `CREATE`, when they were created before the webhook could (the
//! namespace opted in later, the webhook was installed later).
//!
//! Labels are mutable, so a label-only PATCH needs no restart and does not
//! change which ReplicaSet owns a pod (selectors only need their own
//! labels). What each object lacks is decided by the admission rules
//! themselves ([`plan::plan`] calls [`crate::mutate::decide`]): the same
//! opt-out label, excluded namespaces, mirror pods, owned-template rule and
//! tag handling, and nothing an object already has is ever overwritten.
//!
//! ```text
//!  shared watch of the opted-in Namespaces (namespaces.optIn)
//!    --> Controller<Namespace>: a pass per namespace at the start of each
//!        leadership term, when a namespace opts in (or changes), and every
//!        30 minutes
//!  a pass over one namespace:
//!    list Pods, metadata only, pages of 500, opted-out ones filtered by the
//!      apiserver (labelSelector <optOutLabel>!=false)
//!    list ReplicaSets, pages of 100 (a ReplicaSet's intent is in its template)
//!    per object: plan --> JSON Patch [test resourceVersion, add labels...]
//!      an Istio pod to label: read whole once (its proxy image, mounts, env)
//!      paced (backfill.patchesPerSecond, shared by all namespaces);
//!      422, the test failed (changed since read) --> read again, decide
//!        again (3 tries); any other 422 (the labels refused) --> counted
//!        as invalid, the object left as it is, the pass goes on
//!    one Event per owner of what was labelled; one log line per namespace
//! ```
//!
//! Resumable by construction: the cluster holds the progress. A pass cut
//! short (leadership lost, an API error, shutdown) is simply run again, and
//! what was labelled already costs no write. A running pod's sidecar
//! cannot get the keepalive (it is set only at pod creation): what a
//! restart would give each Istio pod it labels ([`plan::Restart`], decided
//! by admission's rules for the pod's Istio version) is counted by reason
//! and in its owner's Event.

pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod};
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ReflectHandle, Store};
use kube::{Client, ResourceExt};
use prometheus::{IntCounterVec, Opts, Registry};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admission::{ConfigMapLookup, no_cluster};
use crate::cluster::events::{EventRequest, EventSink};
use crate::config::Config;
use crate::metrics::ControllerCounters;
use crate::mutate::{
    ClusterView, Contradiction, Kind, LabelPolicy, MetaView, ObjectView, OwnerRef, Policy, StrMap,
    TemplateView, Text, TextMap,
};
use plan::{LabelPatch, Plan, Restart, TagFrom};

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "backfill";

/// Pass over every opted-in namespace again this often: catches objects
/// that escaped admission some other way. Cheap when nothing is missing:
/// two list calls per namespace, no writes.
const RESYNC: Duration = Duration::from_secs(30 * 60);

/// Retry a namespace whose pass failed.
const ERROR_REQUEUE: Duration = Duration::from_secs(30);

/// Look again this soon when the owner cache has not listed yet.
const OWNERS_NOT_SYNCED: Duration = Duration::from_secs(5);

/// Pods per list page (metadata only: about 1-2 kB each).
const POD_PAGE: u32 = 500;

/// ReplicaSets per list page (whole objects: their template is read).
const REPLICASET_PAGE: u32 = 100;

/// Patches of one object before it is left for the next pass, when it
/// keeps changing between the read and the patch.
const ATTEMPTS: usize = 3;

/// Namespaces passed over at once (the pace is shared, so more would only
/// overlap list calls).
const CONCURRENCY: u16 = 2;

// === BackfillSettings ===

/// What the backfill needs from [`Config`], and the view of the cluster
/// admission decides with.
#[derive(Clone)]
pub struct BackfillSettings {
    /// At most this many patches per second, over all namespaces.
    pub patches_per_second: u32,
    /// The configuration decided with. Only labels are ever written; with
    /// `bootstrap.enabled` the keepalive decision says what a restart would
    /// give an Istio pod.
    rules: Config,
    /// Admission's view of a namespace (bootstrap ConfigMap, detected
    /// injector version), for the keepalive decision.
    cluster: Arc<ConfigMapLookup>,
}

impl std::fmt::Debug for BackfillSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackfillSettings")
            .field("patches_per_second", &self.patches_per_second)
            .field("report_restarts", &self.reports_restarts())
            .finish_non_exhaustive()
    }
}

impl BackfillSettings {
    /// The settings for `cfg`; `None` when `backfill.enabled` is false.
    /// No cluster view until [`BackfillSettings::with_cluster_view`]: the
    /// injector version is then unknown.
    pub fn from_config(cfg: &Config) -> Option<Self> {
        if !cfg.backfill.enabled {
            return None;
        }
        Some(Self {
            patches_per_second: cfg.backfill.patches_per_second,
            rules: cfg.clone(),
            cluster: Arc::new(no_cluster),
        })
    }

    /// Decides with `lookup`, the view admission uses (its caches).
    pub fn with_cluster_view(mut self, lookup: Arc<ConfigMapLookup>) -> Self {
        self.cluster = lookup;
        self
    }

    /// Whether Istio pods are reported with what a restart would give them
    /// (`bootstrap.enabled`).
    pub fn reports_restarts(&self) -> bool {
        self.rules.bootstrap.enabled
    }

    fn policy(&self) -> Policy<'_> {
        self.rules.policy()
    }

    fn cluster_view(&self, namespace: &str) -> ClusterView {
        self.cluster.view(namespace)
    }

    /// The webhook's `objectSelector`, as a list selector: opted-out
    /// objects are not even listed.
    fn list_selector(&self) -> String {
        format!("{}!=false", self.rules.labels.opt_out_label)
    }
}

// === BackfillMetrics ===

/// What the backfill counts besides the controller counters.
#[derive(Clone)]
pub struct BackfillMetrics {
    labelled: IntCounterVec,
    restart_for_bootstrap: IntCounterVec,
}

impl BackfillMetrics {
    /// Creates and registers `backfill_labelled_total{kind}` and
    /// `backfill_restart_for_bootstrap_total{reason}` (every reason of
    /// [`Restart`] exported at 0).
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let labelled = IntCounterVec::new(
            Opts::new(
                "backfill_labelled_total",
                "Objects created before the webhook that the backfill gave their missing \
                 labels, by kind (Pod, ReplicaSet).",
            ),
            &["kind"],
        )?;
        for kind in [Kind::Pod, Kind::ReplicaSet] {
            labelled.with_label_values(&[kind.name()]);
        }
        let restart_for_bootstrap = IntCounterVec::new(
            Opts::new(
                "backfill_restart_for_bootstrap_total",
                "Istio pods the backfill labelled whose sidecar lacks the keepalive a new pod \
                 gets (set only at pod creation), by reason: template (Istio 1.5-1.7, a \
                 restart mounts the bootstrap template), agent-keepalive (1.18+, a restart \
                 sets GRPC_KEEPALIVE_*), istio-version-unknown (cannot tell).",
            ),
            &["reason"],
        )?;
        for reason in Restart::ALL {
            restart_for_bootstrap.with_label_values(&[reason.as_str()]);
        }
        registry.register(Box::new(labelled.clone()))?;
        registry.register(Box::new(restart_for_bootstrap.clone()))?;
        Ok(Self {
            labelled,
            restart_for_bootstrap,
        })
    }
}

// === Errors ===

/// Why a pass over a namespace stopped.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// Listing Pods or ReplicaSets failed.
    #[error("cannot list the objects: {0}")]
    List(#[source] kube::Error),
    /// Reading an object again after a conflict failed.
    #[error("cannot read the object again: {0}")]
    Read(#[source] kube::Error),
    /// A label patch was refused for another reason than a conflict.
    #[error("cannot patch the labels: {0}")]
    Patch(#[source] kube::Error),
    /// The namespace has no name.
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),
}

impl BackfillError {
    /// Every `reason` label value, exported at 0 from the start:
    /// `conflict` counts objects that kept changing and were left for the
    /// next pass, `invalid` objects whose labels the apiserver refused for
    /// another reason than a change (a validation error: not retried).
    pub const REASONS: [&'static str; 6] = [
        "list",
        "read",
        "patch",
        "missing-object-key",
        CONFLICT,
        INVALID,
    ];

    fn reason(&self) -> &'static str {
        match self {
            Self::List(_) => Self::REASONS[0],
            Self::Read(_) => Self::REASONS[1],
            Self::Patch(_) => Self::REASONS[2],
            Self::MissingObjectKey(_) => Self::REASONS[3],
        }
    }
}

const CONFLICT: &str = "conflict";
const INVALID: &str = "invalid";

/// The message of the 422 the apiserver answers when a JSON Patch cannot
/// be applied (`NewGenericServerResponse`): for our patches, its `test` of
/// the `resourceVersion` failed.
const PATCH_NOT_APPLIED: &str = "the server rejected our request due to an error in our request";

// === Pacer ===

/// Spaces patches `1 / patches_per_second` apart, over every namespace
/// being passed: a steady pace, no bursts.
struct Pacer {
    period: Duration,
    next: Mutex<Instant>,
}

impl Pacer {
    fn new(per_second: u32) -> Self {
        Self {
            period: Duration::from_secs(1) / per_second.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits for the next slot; false when `stop` came first.
    async fn wait(&self, stop: &CancellationToken) -> bool {
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let at = (*next).max(Instant::now());
            *next = at + self.period;
            at
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => false,
            () = tokio::time::sleep_until(at) => true,
        }
    }
}

// === Reading and writing one kind ===

/// One object as read: what the decision needs and how to address it.
struct Read {
    name: String,
    uid: Option<String>,
    resource_version: String,
    view: ObjectView<'static>,
}

/// Labels or annotations, for the core's view.
fn text_map(map: &BTreeMap<String, String>) -> TextMap<'static> {
    map.iter()
        .map(|(k, v)| (Text::from(k.clone()), Text::from(v.clone())))
        .collect()
}

/// The core's view of `metadata`.
fn meta_view(m: &ObjectMeta) -> MetaView<'static> {
    MetaView {
        name: m.name.clone().map(Text::from),
        generate_name: m.generate_name.clone().map(Text::from),
        labels: m.labels.as_ref().map(text_map),
        annotations: m.annotations.as_ref().map(text_map),
        owner_references: m.owner_references.as_ref().map(|refs| {
            refs.iter()
                .map(|r| OwnerRef {
                    api_version: r.api_version.clone(),
                    kind: r.kind.clone(),
                    name: r.name.clone(),
                    uid: r.uid.clone(),
                    controller: r.controller,
                })
                .collect()
        }),
        deletion_timestamp: m
            .deletion_timestamp
            .as_ref()
            .map(|t| t.0.to_string().into()),
    }
}

fn read_of(m: &ObjectMeta, template: Option<&ObjectMeta>) -> Option<Read> {
    let template = template.map(|t| TemplateView {
        metadata: Some(meta_view(t)),
        spec: None,
    });
    Some(Read {
        name: m.name.clone()?,
        uid: m.uid.clone(),
        resource_version: m.resource_version.clone()?,
        view: ObjectView {
            kind: None,
            metadata: Some(meta_view(m)),
            spec: template.map(|t| crate::mutate::SpecView {
                template: Some(t),
                ..Default::default()
            }),
        },
    })
}

/// A ReplicaSet's `spec.template.metadata`.
fn template_meta(rs: &ReplicaSet) -> Option<&ObjectMeta> {
    rs.spec.template.as_ref()?.metadata.as_ref()
}

/// The Pods or the ReplicaSets of one namespace.
enum Objects {
    Pods(Api<Pod>),
    ReplicaSets(Api<ReplicaSet>),
}

impl Objects {
    fn kind(&self) -> Kind {
        match self {
            Self::Pods(_) => Kind::Pod,
            Self::ReplicaSets(_) => Kind::ReplicaSet,
        }
    }

    fn api_version(&self) -> &'static str {
        match self {
            Self::Pods(_) => "v1",
            Self::ReplicaSets(_) => "apps/v1",
        }
    }

    fn page_size(&self) -> u32 {
        match self {
            Self::Pods(_) => POD_PAGE,
            Self::ReplicaSets(_) => REPLICASET_PAGE,
        }
    }

    /// One page, and the token of the next when there is one.
    async fn page(&self, lp: &ListParams) -> Result<(Vec<Read>, Option<String>), kube::Error> {
        let (items, token) = match self {
            // Pods: metadata only (labels, annotations, owners are there).
            Self::Pods(api) => {
                let list = api.list_metadata(lp).await?;
                let items = list
                    .items
                    .iter()
                    .filter_map(|p| read_of(&p.metadata, None))
                    .collect();
                (items, list.metadata.continue_)
            }
            // ReplicaSets: whole, for their template's labels and tag.
            Self::ReplicaSets(api) => {
                let list = api.list(lp).await?;
                let items = list
                    .items
                    .iter()
                    .filter_map(|rs| read_of(&rs.metadata, template_meta(rs)))
                    .collect();
                (items, list.metadata.continue_)
            }
        };
        Ok((items, token.filter(|t| !t.is_empty())))
    }

    /// The object again; `None` once it is gone.
    async fn read(&self, name: &str) -> Result<Option<Read>, kube::Error> {
        Ok(match self {
            Self::Pods(api) => api
                .get_metadata_opt(name)
                .await?
                .and_then(|p| read_of(&p.metadata, None)),
            Self::ReplicaSets(api) => api
                .get_opt(name)
                .await?
                .and_then(|rs| read_of(&rs.metadata, template_meta(&rs))),
        })
    }

    /// A pod again, whole: what its Istio sidecar runs is in its spec (the
    /// lists are metadata only). `None` once it is gone; a pod whose spec
    /// cannot be read is its metadata alone (nothing is then reported).
    async fn read_whole(&self, name: &str) -> Result<Option<Read>, kube::Error> {
        let Self::Pods(api) = self else {
            return self.read(name).await;
        };
        let Some(pod) = api.get_opt(name).await? else {
            return Ok(None);
        };
        let Some(mut read) = read_of(&pod.metadata, None) else {
            return Ok(None);
        };
        // From an owned value, as `serde_json::from_value` reads it.
        if let Some(spec) = serde_json::to_value(&pod.spec)
            .ok()
            .and_then(|v| <crate::mutate::SpecView as serde::Deserialize>::deserialize(v).ok())
        {
            read.view.spec = Some(spec);
        }
        Ok(Some(read))
    }

    /// Applies the JSON Patch (the response: metadata only).
    async fn patch(
        &self,
        name: &str,
        ops: Vec<json_patch::PatchOperation>,
    ) -> Result<(), kube::Error> {
        let patch = Patch::Json::<()>(json_patch::Patch(ops));
        let params = PatchParams::default();
        match self {
            Self::Pods(api) => api.patch_metadata(name, &params, &patch).await.map(drop),
            Self::ReplicaSets(api) => api.patch_metadata(name, &params, &patch).await.map(drop),
        }
    }
}

fn is_status(error: &kube::Error, codes: &[u16]) -> bool {
    matches!(error, kube::Error::Api(s) if codes.contains(&s.code))
}

/// True for the 422 of a JSON Patch whose `test` failed: the object changed
/// since it was read. The apiserver answers it with the generic
/// [`PATCH_NOT_APPLIED`] message (and, in some versions, the patch
/// library's `testing value /metadata/resourceVersion failed` as a
/// cause). A validation error is a 422 too (`Pod "x" is invalid: ...`,
/// its causes naming the fields): that is no conflict, and reading the
/// object again would not change the answer.
fn is_failed_test(error: &kube::Error) -> bool {
    let kube::Error::Api(s) = error else {
        return false;
    };
    if s.code != 422 {
        return false;
    }
    let causes = s.details.as_ref().map_or(&[][..], |d| d.causes.as_slice());
    if causes.iter().any(|c| !c.field.is_empty()) {
        return false;
    }
    let mentions_test = |text: &str| {
        let text = text.to_ascii_lowercase();
        text.contains("test failed") || (text.contains("testing value") && text.contains("failed"))
    };
    s.message.starts_with(PATCH_NOT_APPLIED)
        || mentions_test(&s.message)
        || causes.iter().any(|c| mentions_test(&c.message))
}

/// The apiserver's message in an API error, else the error.
fn api_message(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

// === A pass over one namespace ===

/// What the backfill shares between namespaces.
struct Context {
    client: Client,
    settings: BackfillSettings,
    counters: ControllerCounters,
    metrics: BackfillMetrics,
    events: EventSink,
    pacer: Pacer,
    shutdown: CancellationToken,
    /// Workloads warned about (a contradiction) this term: once each.
    warned: Mutex<BTreeSet<String>>,
}

/// How one object ended.
enum Done {
    /// Labelled (and tallied), or nothing to add (complete, skipped,
    /// refused, gone, or left for the next pass).
    Next,
    /// The term ended before its patch.
    Stopped,
}

/// What one pass labelled, by the object an Event goes on and why (or by
/// object, for objects without an owner): one Event each; and the objects
/// whose labels contradict their workload, by workload.
#[derive(Default)]
struct Tally {
    owners: BTreeMap<(String, Why), OwnerTally>,
    pods: usize,
    replicasets: usize,
    restarts: BTreeMap<Restart, usize>,
    contradictions: BTreeMap<(String, &'static str), Contradicted>,
    /// Whether a ReplicaSet's pod template labels its pods a canary (read
    /// once per pass, for pods labelled a canary that nothing asks for).
    templates: BTreeMap<String, bool>,
}

/// Why labels were added, in an Event's words.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Why {
    /// The object lacked them: its workload asks for nothing else.
    Lacked,
    /// The tag annotation on the workload's own metadata asks for a canary
    /// that its pod template does not carry.
    WorkloadTag {
        /// The annotation key.
        annotation: String,
        /// Its value, as written.
        value: String,
    },
}

struct OwnerTally {
    regarding: ObjectReference,
    pods: usize,
    replicasets: usize,
    /// Of those, how many had some of the labels already (so lost others
    /// since they were labelled).
    partial: usize,
    added: BTreeSet<String>,
    restarts: BTreeMap<Restart, usize>,
}

/// Pods (or ReplicaSets) of one workload whose labels contradict it.
struct Contradicted {
    regarding: ObjectReference,
    contradiction: Contradiction,
    pods: Vec<String>,
}

/// An ObjectReference to `owner` in `namespace`.
fn reference(namespace: &str, owner: &OwnerRef) -> ObjectReference {
    ObjectReference {
        api_version: Some(owner.api_version.clone()),
        kind: Some(owner.kind.clone()),
        name: Some(owner.name.clone()),
        uid: Some(owner.uid.clone()).filter(|u| !u.is_empty()),
        namespace: Some(namespace.to_owned()),
        ..ObjectReference::default()
    }
}

fn key_of(r: &ObjectReference) -> String {
    format!(
        "{}/{}/{}",
        r.kind.as_deref().unwrap_or_default(),
        r.name.as_deref().unwrap_or_default(),
        r.uid.as_deref().unwrap_or_default()
    )
}

/// `1 Pod`, `3 ReplicaSets`.
fn count(n: usize, kind: &str) -> String {
    if n == 1 {
        format!("1 {kind}")
    } else {
        format!("{n} {kind}s")
    }
}

impl Tally {
    /// Tallies one labelled object; `workload`: the workload whose own
    /// metadata carries the tag it follows, when `patch.tag_from` says so.
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        namespace: &str,
        kind: Kind,
        api_version: &str,
        read: &Read,
        patch: &LabelPatch,
        policy: &LabelPolicy,
        workload: Option<&OwnerRef>,
    ) {
        match kind {
            Kind::Pod => self.pods += 1,
            _ => self.replicasets += 1,
        }
        if let Some(reason) = patch.restart {
            *self.restarts.entry(reason).or_default() += 1;
        }
        let own = ObjectReference {
            api_version: Some(api_version.to_owned()),
            kind: Some(kind.name().to_owned()),
            name: Some(read.name.clone()),
            uid: read.uid.clone(),
            namespace: Some(namespace.to_owned()),
            ..ObjectReference::default()
        };
        let controller = read.view.controller().map(|o| reference(namespace, o));
        let tag = match &patch.tag_from {
            Some(TagFrom::Owner(o)) => Some(o.value.clone()),
            Some(TagFrom::Controller) => read
                .view
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.as_ref()?.value(&policy.tag_annotation))
                .map(str::to_owned),
            None => None,
        };
        let (regarding, why) = match (tag, workload) {
            (Some(value), Some(w)) => (
                reference(namespace, w),
                Why::WorkloadTag {
                    annotation: policy.tag_annotation.clone(),
                    value,
                },
            ),
            _ => (controller.unwrap_or(own), Why::Lacked),
        };
        let labels = read.view.metadata.as_ref().and_then(|m| m.labels.as_ref());
        let had_some = labels.is_some_and(|l| l.has(&policy.stage) || l.has(&policy.canary_tag));
        let entry = self
            .owners
            .entry((key_of(&regarding), why))
            .or_insert_with(|| OwnerTally {
                regarding,
                pods: 0,
                replicasets: 0,
                partial: 0,
                added: BTreeSet::new(),
                restarts: BTreeMap::new(),
            });
        match kind {
            Kind::Pod => entry.pods += 1,
            _ => entry.replicasets += 1,
        }
        entry.partial += usize::from(had_some);
        entry.added.extend(patch.added.iter().cloned());
        if let Some(reason) = patch.restart {
            *entry.restarts.entry(reason).or_default() += 1;
        }
    }

    /// Notes an object whose labels contradict `workload`.
    fn contradicted(
        &mut self,
        namespace: &str,
        workload: &OwnerRef,
        name: &str,
        contradiction: Contradiction,
    ) {
        let regarding = reference(namespace, workload);
        let entry = self
            .contradictions
            .entry((key_of(&regarding), contradiction.code()))
            .or_insert_with(|| Contradicted {
                regarding,
                contradiction,
                pods: Vec::new(),
            });
        entry.pods.push(name.to_owned());
    }

    /// How many labelled pods a restart would give `reason`'s keepalive.
    fn restarts(&self, reason: Restart) -> usize {
        self.restarts.get(&reason).copied().unwrap_or(0)
    }

    fn events(&self) -> impl Iterator<Item = EventRequest> + '_ {
        self.owners.iter().map(|((_, why), o)| {
            let what = match (o.pods, o.replicasets) {
                (p, 0) => count(p, "Pod"),
                (0, r) => count(r, "ReplicaSet"),
                (p, r) => format!("{} and {}", count(p, "Pod"), count(r, "ReplicaSet")),
            };
            let labels: Vec<&str> = o.added.iter().map(String::as_str).collect();
            let labels = labels.join(", ");
            let mut note = match why {
                Why::WorkloadTag { annotation, value } => format!(
                    "added {labels} to {what}: the annotation {annotation}={value} on this \
                     {kind}'s own metadata asks for a canary (its pod template does not carry \
                     it), so its pods are labelled as canaries, and new ones are admitted the \
                     same way (no restart needed); put the annotation in the pod template to \
                     make it explicit",
                    kind = o.regarding.kind.as_deref().unwrap_or("workload"),
                ),
                Why::Lacked if o.partial == o.pods + o.replicasets => format!(
                    "added {labels} to {what} that had lost them since they were labelled \
                     (removed by hand?) (no restart needed)"
                ),
                Why::Lacked => format!(
                    "added {labels} to {what} that lacked them (created before the namespace \
                     opted in or before the webhook ran, or their labels were removed since; no \
                     restart needed)"
                ),
            };
            for (reason, n) in &o.restarts {
                note.push_str("; ");
                note.push_str(&restart_note(*reason, *n));
            }
            EventRequest {
                regarding: o.regarding.clone(),
                type_: EventType::Normal,
                reason: "LabelsBackfilled".into(),
                action: "Backfill".into(),
                note,
            }
        })
    }

    /// One Warning per workload whose objects contradict it.
    fn warnings(&self, policy: &LabelPolicy) -> impl Iterator<Item = (String, EventRequest)> + '_ {
        let policy = policy.clone();
        self.contradictions.iter().map(move |((key, code), c)| {
            let r = &c.regarding;
            let (namespace, kind, name) = (
                r.namespace.as_deref().unwrap_or_default(),
                r.kind.as_deref().unwrap_or_default(),
                r.name.as_deref().unwrap_or_default(),
            );
            let mut pods = c.pods.clone();
            let shown = pods.len().min(3);
            let more = pods.len() - shown;
            pods.truncate(shown);
            let list = if more > 0 {
                format!("{} and {more} more", pods.join(", "))
            } else {
                pods.join(", ")
            };
            let normal = format!("{}={}", policy.stage, policy.normal_stage);
            let note = match &c.contradiction {
                Contradiction::CanaryLabelledNormal { tag } => format!(
                    "{list}: labelled {normal}, but this {kind} asks for canary {tag}: canary \
                     code in the normal subset, serving requests without the header. Labels are \
                     never overwritten; fix: {}",
                    c.contradiction.fix(namespace, kind, name)
                ),
                Contradiction::NormalLabelledCanary { tag } => format!(
                    "{list}: labelled canary {tag}, but neither they nor this {kind} ask for a \
                     canary (no {} annotation): out of the normal subset. Labels are never \
                     overwritten; fix: {}",
                    policy.tag_annotation,
                    c.contradiction.fix(namespace, kind, name)
                ),
            };
            let reason = match c.contradiction {
                Contradiction::CanaryLabelledNormal { .. } => "CanaryLabelledNormal",
                Contradiction::NormalLabelledCanary { .. } => "NormalLabelledCanary",
            };
            (
                format!("{key}/{code}"),
                EventRequest {
                    regarding: r.clone(),
                    type_: EventType::Warning,
                    reason: reason.into(),
                    action: "Backfill".into(),
                    note,
                },
            )
        })
    }
}

/// What the Event of an owner says about `n` of its pods that a restart
/// would give `reason`.
fn restart_note(reason: Restart, n: usize) -> String {
    let (them, run) = if n == 1 {
        ("it", "runs")
    } else {
        ("them", "run")
    };
    match reason {
        Restart::Template => format!(
            "{n} of them {run} an Istio 1.5-1.7 sidecar without the bootstrap keepalive \
             template: restart {them} to mount it"
        ),
        Restart::AgentKeepalive => format!(
            "{n} of them {run} an Istio 1.18+ sidecar without GRPC_KEEPALIVE_INTERVAL and \
             GRPC_KEEPALIVE_TIMEOUT: restart {them} to set the agent keepalive"
        ),
        Restart::VersionUnknown => format!(
            "the Istio version of {n} of them is unknown (no version in the proxy image tag; \
             set istio.proxyVersion): whether a restart would change their keepalive cannot be \
             told"
        ),
    }
}

/// Gives one object its missing labels: decide, patch under the
/// `resourceVersion` read, and on a conflict read again and decide again.
/// What it labelled goes into `tally`.
async fn label_one(
    objects: &Objects,
    namespace: &str,
    mut read: Read,
    ctx: &Context,
    tally: &mut Tally,
) -> Result<Done, BackfillError> {
    let kind = objects.kind();
    let policy = ctx.settings.policy();
    let cluster = ctx.settings.cluster_view(namespace);
    let mut attempts = 0;
    let mut whole = false;
    while attempts < ATTEMPTS {
        let owner_tag = read
            .view
            .controller()
            .and_then(|c| ctx.settings.cluster.owner_tag(namespace, c));
        let patch = match plan::plan(
            kind,
            namespace,
            &read.view,
            &read.resource_version,
            policy,
            &cluster,
            owner_tag.as_ref(),
        ) {
            Plan::Nothing(_) => return Ok(Done::Next),
            Plan::Contradicts(c) => {
                contradicts(objects, namespace, &read, c, ctx, tally).await?;
                return Ok(Done::Next);
            }
            Plan::Refused(deny) => {
                warn!(namespace, kind = kind.name(), name = %read.name, error = %deny,
                      "not labelled: admission would refuse this object");
                return Ok(Done::Next);
            }
            Plan::Label(patch) => patch,
        };
        // An Istio pod to label: decide once more on the whole pod, to
        // tell what a restart would give its sidecar (once: a pod whose
        // spec cannot be read is reported as nothing, never guessed).
        if !whole && plan::needs_pod_spec(kind, &read.view, policy) {
            whole = true;
            match objects.read_whole(&read.name).await {
                Ok(Some(fresh)) => read = fresh,
                Ok(None) => return Ok(Done::Next),
                Err(e) if is_status(&e, &[404]) => return Ok(Done::Next),
                Err(e) => return Err(BackfillError::Read(e)),
            }
            continue;
        }
        attempts += 1;
        if !ctx.pacer.wait(&ctx.shutdown).await {
            return Ok(Done::Stopped);
        }
        match objects.patch(&read.name, patch.ops.clone()).await {
            Ok(()) => {
                ctx.counters.applied();
                ctx.metrics.labelled.with_label_values(&[kind.name()]).inc();
                if let Some(reason) = patch.restart {
                    ctx.metrics
                        .restart_for_bootstrap
                        .with_label_values(&[reason.as_str()])
                        .inc();
                }
                debug!(namespace, kind = kind.name(), name = %read.name,
                       labels = %patch.added.join(","), "labelled");
                // The workload whose own metadata carries the tag: up
                // the chain from where it was found (a ReplicaSet's copy
                // is its Deployment's).
                let found = match &patch.tag_from {
                    Some(TagFrom::Owner(o)) => Some(OwnerRef {
                        api_version: o.api_version.clone(),
                        kind: o.kind.clone(),
                        name: o.name.clone(),
                        uid: o.uid.clone(),
                        controller: Some(true),
                    }),
                    Some(TagFrom::Controller) => read.view.controller().cloned(),
                    None => None,
                };
                let workload = found.map(|f| ctx.settings.cluster.workload(namespace, &f));
                tally.add(
                    namespace,
                    kind,
                    objects.api_version(),
                    &read,
                    &patch,
                    &ctx.settings.rules.labels,
                    workload.as_ref(),
                );
                return Ok(Done::Next);
            }
            Err(e) if is_status(&e, &[404]) => return Ok(Done::Next),
            // The test of the resourceVersion failed: it changed since it
            // was read. Read it again and decide again; never overwrite.
            Err(e) if is_status(&e, &[409]) || is_failed_test(&e) => {
                debug!(namespace, kind = kind.name(), name = %read.name,
                       "changed since it was read; reading it again");
                let again = if whole {
                    objects.read_whole(&read.name).await
                } else {
                    objects.read(&read.name).await
                };
                let fresh = match again {
                    Ok(Some(fresh)) => fresh,
                    Ok(None) => return Ok(Done::Next),
                    Err(e) if is_status(&e, &[404]) => return Ok(Done::Next),
                    Err(e) => return Err(BackfillError::Read(e)),
                };
                // Unchanged after all: not the test that failed, but the
                // patch itself. Asking again would get the same answer.
                if is_status(&e, &[422]) && fresh.resource_version == read.resource_version {
                    return Ok(refused(ctx, namespace, kind, &read.name, &e));
                }
                read = fresh;
            }
            // Any other 422: the apiserver refuses these labels (validation,
            // a policy). Not a conflict; not retried.
            Err(e) if is_status(&e, &[422]) => {
                return Ok(refused(ctx, namespace, kind, &read.name, &e));
            }
            Err(e) => return Err(BackfillError::Patch(e)),
        }
    }
    ctx.counters.error(CONFLICT);
    warn!(namespace, kind = kind.name(), name = %read.name,
          "object keeps changing; left for the next pass");
    Ok(Done::Next)
}

/// Notes an object whose labels contradict its workload, for the Warning
/// on that workload. A pod labelled a canary that nothing asks for is no
/// contradiction when its ReplicaSet's pod template labels it so (read
/// once per pass).
async fn contradicts(
    objects: &Objects,
    namespace: &str,
    read: &Read,
    contradiction: Contradiction,
    ctx: &Context,
    tally: &mut Tally,
) -> Result<(), BackfillError> {
    let controller = read.view.controller();
    if let (Contradiction::NormalLabelledCanary { .. }, Objects::Pods(_), Some(rs)) =
        (&contradiction, objects, controller)
        && rs.kind == "ReplicaSet"
    {
        let canary = match tally.templates.get(&rs.name) {
            Some(canary) => *canary,
            None => {
                let api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), namespace);
                let labels = &ctx.settings.rules.labels;
                let canary = match api.get_opt(&rs.name).await {
                    Ok(found) => found.as_ref().and_then(template_meta).is_some_and(|m| {
                        m.labels.as_ref().and_then(|l| l.get(&labels.stage))
                            == Some(&labels.gray_stage)
                    }),
                    Err(e) => return Err(BackfillError::Read(e)),
                };
                tally.templates.insert(rs.name.clone(), canary);
                canary
            }
        };
        if canary {
            return Ok(());
        }
    }
    let own = OwnerRef {
        api_version: objects.api_version().into(),
        kind: objects.kind().name().into(),
        name: read.name.clone(),
        uid: read.uid.clone().unwrap_or_default(),
        controller: None,
    };
    let workload = match controller {
        Some(c) => ctx.settings.cluster.workload(namespace, c),
        None => own,
    };
    debug!(namespace, name = %read.name, workload = %workload.name,
           contradiction = contradiction.code(), "labels contradict the workload");
    tally.contradicted(namespace, &workload, &read.name, contradiction);
    Ok(())
}

/// Counts and reports labels the apiserver refused (a 422 that is not a
/// failed test); the pass goes on with the next object.
fn refused(ctx: &Context, namespace: &str, kind: Kind, name: &str, error: &kube::Error) -> Done {
    ctx.counters.error(INVALID);
    warn!(namespace, kind = kind.name(), name, error = %api_message(error),
          "the apiserver refused the labels; not retried");
    Done::Next
}

/// Every object of one kind in `namespace`, page by page. False when the
/// term ended.
async fn pass(
    objects: &Objects,
    namespace: &str,
    ctx: &Context,
    tally: &mut Tally,
) -> Result<bool, BackfillError> {
    let selector = ctx.settings.list_selector();
    let mut lp = ListParams::default()
        .labels(&selector)
        .limit(objects.page_size());
    loop {
        if ctx.shutdown.is_cancelled() {
            return Ok(false);
        }
        let (items, next) = objects.page(&lp).await.map_err(BackfillError::List)?;
        for read in items {
            if let Done::Stopped = label_one(objects, namespace, read, ctx, tally).await? {
                return Ok(false);
            }
        }
        match next {
            Some(token) => lp = lp.continue_token(&token),
            None => return Ok(true),
        }
    }
}

/// Passes over the Pods, then the ReplicaSets, of one opted-in namespace;
/// reports what it labelled (also when the pass failed half way).
async fn backfill_namespace(
    ns: Arc<Namespace>,
    ctx: Arc<Context>,
) -> Result<Action, BackfillError> {
    let namespace = ns
        .metadata
        .name
        .as_deref()
        .ok_or(BackfillError::MissingObjectKey(".metadata.name"))?;
    if ctx.settings.rules.namespaces.is_excluded(namespace) {
        debug!(namespace, "excluded namespace: no backfill");
        return Ok(Action::await_change());
    }
    if ns.metadata.deletion_timestamp.is_some() {
        debug!(namespace, "namespace is terminating");
        return Ok(Action::await_change());
    }
    // A pass before the owner cache has listed could label a pod normal
    // that its Deployment's metadata asks to be a canary, for good.
    if !ctx.settings.cluster.owners_synced() {
        debug!(namespace, "owner cache not synced yet; pass postponed");
        return Ok(Action::requeue(OWNERS_NOT_SYNCED));
    }
    let mut tally = Tally::default();
    let result = async {
        for objects in [
            Objects::Pods(Api::namespaced(ctx.client.clone(), namespace)),
            Objects::ReplicaSets(Api::namespaced(ctx.client.clone(), namespace)),
        ] {
            if !pass(&objects, namespace, &ctx, &mut tally).await? {
                break;
            }
        }
        Ok::<_, BackfillError>(())
    }
    .await;
    for event in tally.events() {
        ctx.events.emit(event);
    }
    let policy = &ctx.settings.rules.labels;
    for (key, event) in tally.warnings(policy) {
        let first = ctx
            .warned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key);
        if first {
            warn!(namespace, workload = ?event.regarding.name, reason = %event.reason,
                  "labels contradict what the workload asks for; never overwritten");
            ctx.events.emit(event);
        }
    }
    if tally.pods + tally.replicasets > 0 {
        info!(
            namespace,
            pods = tally.pods,
            replicasets = tally.replicasets,
            restart_template = tally.restarts(Restart::Template),
            restart_agent_keepalive = tally.restarts(Restart::AgentKeepalive),
            keepalive_version_unknown = tally.restarts(Restart::VersionUnknown),
            "labelled objects created before the webhook"
        );
    } else {
        debug!(namespace, "nothing to backfill");
    }
    result?;
    Ok(Action::requeue(RESYNC))
}

/// Counts the error and retries the namespace later.
fn on_error(ns: Arc<Namespace>, error: &BackfillError, ctx: Arc<Context>) -> Action {
    ctx.counters.error(error.reason());
    warn!(namespace = %ns.name_any(), %error, "backfill pass failed; retrying");
    Action::requeue(ERROR_REQUEUE)
}

/// The backfill: a `Controller` over the opted-in Namespaces
/// (`namespaces`: a subscription to the shared Namespace watch, whose
/// store is `namespace_store`). Events about what it labelled go to
/// `events`. Runs until `shutdown`; a pass in flight stops at its next
/// patch.
#[allow(clippy::too_many_arguments)]
pub async fn run_backfill(
    client: Client,
    settings: BackfillSettings,
    namespaces: ReflectHandle<Namespace>,
    namespace_store: Store<Namespace>,
    counters: ControllerCounters,
    metrics: BackfillMetrics,
    events: EventSink,
    shutdown: CancellationToken,
) {
    let ctx = Arc::new(Context {
        client,
        pacer: Pacer::new(settings.patches_per_second),
        settings,
        counters,
        metrics,
        events,
        shutdown: shutdown.clone(),
        warned: Mutex::new(BTreeSet::new()),
    });
    info!(
        patches_per_second = ctx.settings.patches_per_second,
        "backfill started"
    );
    Controller::for_shared_stream(namespaces, namespace_store)
        .with_config(controller::Config::default().concurrency(CONCURRENCY))
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(backfill_namespace, on_error, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(namespace = %obj.name, "backfill pass done"),
                // Counted and logged by on_error.
                Err(controller::Error::ReconcilerFailed(..)) => {}
                Err(controller::Error::ObjectNotFound(obj)) => {
                    debug!(namespace = %obj.name, "namespace gone before its pass");
                }
                Err(error) => warn!(%error, "backfill failed; retrying"),
            }
        })
        .await;
    info!("backfill stopped");
}

#[cfg(test)]
mod tests;
