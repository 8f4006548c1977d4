//! What the routes controller knows of the cluster, fed by its watches and
//! kept small: per object only the few fields a decision reads (a pod is
//! its name and stage: normal, or the tag of a canary; an EndpointSlice its Service and its endpoints'
//! pod and readiness), never the objects themselves. No I/O: the controller
//! turns watch events into [`Change`]s and applies them; tests and the
//! memory benchmark fill it the same way.
//!
//! Each `apply_*` method also says which Services a change concerns (their
//! keys go into `dirty`), so the controller reconciles only those.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::DynamicObject;
use kube::runtime::watcher;
use serde::Deserialize;

use super::gateway::{GrpcRouteSpec, HttpRouteSpec, ObservedService, ROUTE_OF_LABEL};
use super::objects::{DestinationRuleSpec, Observed, ObservedMeta, Spec, VirtualServiceSpec};
use super::shape::pod_weight;
use super::{
    EndpointView, Live, PodStage, PodWeight, RuleHead, RuleKind, host_service, live, pod_stage,
    wants_routes,
};
use crate::mutate::OwnerRef;
use crate::mutate::{LabelPolicy, NamespacePolicy};

/// `(namespace, name)`; a namespace's own key is `(name, "")`.
pub type Key = (String, String);

/// The label EndpointSlices carry naming their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One change to a [`Table`], from a watch event: `None` values mean "not
/// of interest" (a Service without the annotation), which removes the row.
#[derive(Debug, Clone, PartialEq)]
pub enum Change<V> {
    /// A (re)list starts.
    Init,
    /// A listed object.
    Listed(Key, Option<V>),
    /// The list is complete: rows not listed are gone.
    InitDone,
    /// An object was added or changed.
    Applied(Key, Option<V>),
    /// An object was deleted.
    Deleted(Key),
}

impl<V> Change<V> {
    /// The change for a watch event, with `row` reading an object's key and
    /// value.
    pub fn from_event<K>(event: watcher::Event<K>, row: impl Fn(K) -> (Key, Option<V>)) -> Self {
        match event {
            watcher::Event::Init => Self::Init,
            watcher::Event::InitDone => Self::InitDone,
            watcher::Event::InitApply(o) => {
                let (k, v) = row(o);
                Self::Listed(k, v)
            }
            watcher::Event::Apply(o) => {
                let (k, v) = row(o);
                Self::Applied(k, v)
            }
            watcher::Event::Delete(o) => Self::Deleted(row(o).0),
        }
    }
}

/// Rows of one kind, replaced atomically when a relist completes (like
/// kube-runtime's reflector store).
#[derive(Debug)]
pub struct Table<V> {
    rows: BTreeMap<Key, V>,
    relist: Option<BTreeMap<Key, V>>,
    synced: bool,
}

impl<V> Default for Table<V> {
    fn default() -> Self {
        Self {
            rows: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
}

impl<V: PartialEq> Table<V> {
    /// Applies `change`; `changed(key, old, new)` is called for every row
    /// whose value changed.
    pub fn apply(
        &mut self,
        change: Change<V>,
        mut changed: impl FnMut(&Key, Option<&V>, Option<&V>),
    ) {
        match change {
            Change::Init => self.relist = Some(BTreeMap::new()),
            Change::Listed(key, value) => match (&mut self.relist, value) {
                (Some(relist), Some(v)) => {
                    relist.insert(key, v);
                }
                (Some(_), None) => {}
                (None, value) => self.set(key, value, &mut changed),
            },
            Change::InitDone => {
                let new = self.relist.take().unwrap_or_default();
                let old = std::mem::replace(&mut self.rows, new);
                for (key, v) in &old {
                    let now = self.rows.get(key);
                    if now != Some(v) {
                        changed(key, Some(v), now);
                    }
                }
                for (key, v) in &self.rows {
                    if !old.contains_key(key) {
                        changed(key, None, Some(v));
                    }
                }
                self.synced = true;
            }
            Change::Applied(key, value) => self.set(key, value, &mut changed),
            Change::Deleted(key) => self.set(key, None, &mut changed),
        }
    }

    fn set(
        &mut self,
        key: Key,
        value: Option<V>,
        changed: &mut impl FnMut(&Key, Option<&V>, Option<&V>),
    ) {
        match value {
            Some(v) => {
                if self.rows.get(&key) != Some(&v) {
                    let old = self.rows.insert(key.clone(), v);
                    changed(&key, old.as_ref(), self.rows.get(&key));
                }
            }
            None => {
                if let Some(old) = self.rows.remove(&key) {
                    changed(&key, Some(&old), None);
                }
            }
        }
    }

    /// The row of `key`.
    pub fn get(&self, key: &Key) -> Option<&V> {
        self.rows.get(key)
    }

    /// True once the first list has completed.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True without rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows of one namespace.
    pub fn in_namespace<'a>(
        &'a self,
        namespace: &'a str,
    ) -> impl Iterator<Item = (&'a Key, &'a V)> {
        self.rows
            .range((namespace.to_owned(), String::new())..)
            .take_while(move |(k, _)| k.0 == namespace)
    }

    /// Every row.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &V)> {
        self.rows.iter()
    }
}

/// An opted-in namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceRow {
    /// It is being deleted (`deletionTimestamp` set).
    pub terminating: bool,
}

/// A Service that asks for routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Its uid.
    pub uid: Option<String>,
    /// Its resourceVersion: the Gateway API backend reads the Service's
    /// selector and ports again when it changes.
    pub resource_version: Option<String>,
    /// Its annotations that matter here: the header override, the route
    /// settings and the route API, if any.
    pub annotations: BTreeMap<String, String>,
}

/// A Service whose name holds `--`, as every version Service's does: who
/// holds the names the Gateway API backend would give its Services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashedRow {
    /// Labelled as ours.
    pub managed: bool,
    /// [`ROUTE_OF_LABEL`], when ours.
    pub route_of: Option<String>,
}

/// An EndpointSlice: its Service and, per endpoint, the pod and readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEntry {
    /// The Service it belongs to.
    pub service: String,
    /// Its endpoints.
    pub endpoints: Vec<EndpointEntry>,
}

/// One endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointEntry {
    /// The pod (`targetRef` of kind Pod in the slice's namespace).
    pub pod: Option<String>,
    /// `conditions.ready`, unset meaning ready.
    pub ready: bool,
}

/// A pod as the index keeps it: what subset it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRow {
    /// Labelled `<stage>: <normalStage>`.
    Normal,
    /// A canary of this tag.
    Canary(Canary),
}

/// A canary pod as the index keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canary {
    /// Its tag.
    pub tag: String,
    /// Its weight annotation, if any, and (then only) its managing
    /// controller, where a bad weight is reported.
    pub weight: Option<(PodWeight, Option<Box<OwnerRef>>)>,
}

/// The index (see the module docs).
#[derive(Debug)]
pub struct Index {
    labels: LabelPolicy,
    namespace_policy: NamespacePolicy,
    namespaces: Table<NamespaceRow>,
    services: Table<ServiceEntry>,
    slices: Table<SliceEntry>,
    slices_by_service: BTreeMap<Key, BTreeSet<String>>,
    pods: Table<PodRow>,
    destination_rules: Table<Observed<DestinationRuleSpec>>,
    virtual_services: Table<Observed<VirtualServiceSpec>>,
    http_routes: Table<Observed<HttpRouteSpec>>,
    grpc_routes: Table<Observed<GrpcRouteSpec>>,
    /// Our version Services (whole objects, from their own watch).
    versions: Table<ObservedService>,
    /// Every Service whose name holds `--` (from the metadata watch).
    dashed: Table<DashedRow>,
    /// The newest `resourceVersion` each watch of a kind we write has
    /// delivered (deletes included): how far that view has come.
    newest_rule_versions: [u64; RuleKind::ALL.len()],
}

impl Index {
    /// An empty index for this vocabulary and namespace policy.
    pub fn new(labels: LabelPolicy, namespace_policy: NamespacePolicy) -> Self {
        Self {
            labels,
            namespace_policy,
            namespaces: Table::default(),
            services: Table::default(),
            slices: Table::default(),
            slices_by_service: BTreeMap::new(),
            pods: Table::default(),
            destination_rules: Table::default(),
            virtual_services: Table::default(),
            http_routes: Table::default(),
            grpc_routes: Table::default(),
            versions: Table::default(),
            dashed: Table::default(),
            newest_rule_versions: [0; RuleKind::ALL.len()],
        }
    }

    /// Declares which route APIs are watched: the tables of the others
    /// count as listed (empty), so [`Index::is_synced`] waits only for
    /// what is watched.
    pub fn watching(&mut self, istio: bool, gateway: bool, grpc: bool) {
        if !istio {
            self.destination_rules.apply(Change::InitDone, |_, _, _| {});
            self.virtual_services.apply(Change::InitDone, |_, _, _| {});
        }
        if !gateway {
            self.http_routes.apply(Change::InitDone, |_, _, _| {});
            self.versions.apply(Change::InitDone, |_, _, _| {});
        }
        if !(gateway && grpc) {
            self.grpc_routes.apply(Change::InitDone, |_, _, _| {});
        }
    }

    /// Notes that the watch of `kind` delivered an object (an add, change,
    /// delete or list item) at `resource_version`.
    pub fn saw_rule_version(&mut self, kind: RuleKind, resource_version: Option<&str>) {
        if let Some(v) = resource_version.and_then(|v| v.parse::<u64>().ok()) {
            let newest = &mut self.newest_rule_versions[kind.index()];
            *newest = (*newest).max(v);
        }
    }

    /// The newest `resourceVersion` the watch of `kind` delivered (0: none
    /// that reads as a number).
    pub fn newest_rule_version(&self, kind: RuleKind) -> u64 {
        self.newest_rule_versions[kind.index()]
    }

    /// The label vocabulary.
    pub fn labels(&self) -> &LabelPolicy {
        &self.labels
    }

    /// True once every watch has listed.
    pub fn is_synced(&self) -> bool {
        self.namespaces.is_synced()
            && self.services.is_synced()
            && self.slices.is_synced()
            && self.pods.is_synced()
            && self.destination_rules.is_synced()
            && self.virtual_services.is_synced()
            && self.http_routes.is_synced()
            && self.grpc_routes.is_synced()
            && self.versions.is_synced()
    }

    // === rows from objects ===

    /// The row of a Namespace: present when it carries the opt-in labels and
    /// is not excluded.
    pub fn namespace_row(&self, meta: &ObjectMeta) -> (Key, Option<NamespaceRow>) {
        let name = meta.name.clone().unwrap_or_default();
        let labels = meta.labels.as_ref();
        let opted_in = self
            .namespace_policy
            .opt_in
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
        let keep = opted_in && !self.namespace_policy.is_excluded(&name);
        let row = NamespaceRow {
            terminating: meta.deletion_timestamp.is_some(),
        };
        ((name, String::new()), keep.then_some(row))
    }

    /// The row of a Service: present when it asks for routes.
    pub fn service_row(meta: &ObjectMeta) -> (Key, Option<ServiceEntry>) {
        let key = key_of(meta);
        let annotations = meta.annotations.as_ref();
        let entry = wants_routes(annotations).then(|| ServiceEntry {
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            annotations: annotations
                .into_iter()
                .flatten()
                .filter(|(k, _)| {
                    [
                        super::HEADER_ANNOTATION,
                        super::shape::TIMEOUT_ANNOTATION,
                        super::shape::RETRIES_ANNOTATION,
                        super::gateway::ROUTE_API_ANNOTATION,
                    ]
                    .contains(&k.as_str())
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        });
        (key, entry)
    }

    /// The row of a Service for [`Index::apply_dashed`]: present when its
    /// name holds `--`.
    pub fn dashed_row(meta: &ObjectMeta) -> (Key, Option<DashedRow>) {
        let key = key_of(meta);
        let row = key.1.contains("--").then(|| {
            let label = |k: &str| meta.labels.as_ref().and_then(|l| l.get(k));
            let managed =
                label(super::MANAGED_BY_LABEL).map(String::as_str) == Some(super::MANAGED_BY_VALUE);
            DashedRow {
                managed,
                route_of: label(ROUTE_OF_LABEL).filter(|_| managed).cloned(),
            }
        });
        (key, row)
    }

    /// The row of one of our version Services.
    pub fn version_row(object: DynamicObject) -> (Key, Option<ObservedService>) {
        let key = key_of(&object.metadata);
        let json = serde_json::json!({
            "metadata": object.metadata,
            "spec": object.data.get("spec"),
        });
        (key, Some(ObservedService::from_json(&json)))
    }

    /// The row of a pod: present when it is a normal pod or a canary
    /// ([`super::pod_stage`]).
    pub fn pod_row(&self, meta: &ObjectMeta) -> (Key, Option<PodRow>) {
        let row = meta
            .labels
            .as_ref()
            .and_then(|l| pod_stage(&self.labels, l))
            .map(|stage| match stage {
                PodStage::Normal => PodRow::Normal,
                PodStage::Canary(tag) => PodRow::Canary(Canary {
                    tag: tag.to_owned(),
                    weight: pod_weight(meta.annotations.as_ref()).map(|w| {
                        let controller = meta
                            .owner_references
                            .iter()
                            .flatten()
                            .find(|o| o.controller == Some(true))
                            .map(|o| {
                                Box::new(OwnerRef {
                                    api_version: o.api_version.clone(),
                                    kind: o.kind.clone(),
                                    name: o.name.clone(),
                                    uid: o.uid.clone(),
                                    controller: o.controller,
                                })
                            });
                        (w, controller)
                    }),
                }),
            });
        (key_of(meta), row)
    }

    /// The ready canary pods of `key` whose weight annotation does not read,
    /// by tag: (the problem, the pods' controller).
    pub fn weight_owners(&self, key: &Key, tag: &str) -> Vec<OwnerRef> {
        let Some(slices) = self.slices_by_service.get(key) else {
            return Vec::new();
        };
        let mut owners: Vec<OwnerRef> = slices
            .iter()
            .filter_map(|s| self.slices.get(&(key.0.clone(), s.clone())))
            .flat_map(|s| &s.endpoints)
            .filter(|e| e.ready)
            .filter_map(|e| self.pods.get(&(key.0.clone(), e.pod.clone()?)))
            .filter_map(|row| match row {
                PodRow::Canary(c) if c.tag == tag => c.weight.as_ref()?.1.as_deref().cloned(),
                _ => None,
            })
            .collect();
        owners.sort_by(|a, b| (&a.kind, &a.name).cmp(&(&b.kind, &b.name)));
        owners.dedup_by(|a, b| a.kind == b.kind && a.name == b.name);
        owners
    }

    /// The row of an EndpointSlice (`discovery.k8s.io` `v1` or `v1beta1`:
    /// the fields read are the same).
    pub fn slice_row(object: DynamicObject) -> (Key, Option<SliceEntry>) {
        let key = key_of(&object.metadata);
        let service = object
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned();
        let entry = service.map(|service| {
            let data = SliceData::deserialize(&object.data).unwrap_or_default();
            SliceEntry {
                service,
                endpoints: data
                    .endpoints
                    .into_iter()
                    .map(|e| EndpointEntry {
                        ready: e.conditions.ready.unwrap_or(true),
                        pod: e
                            .target_ref
                            .filter(|t| {
                                t.kind == "Pod"
                                    && t.namespace.as_ref().is_none_or(|ns| *ns == key.0)
                            })
                            .map(|t| t.name),
                    })
                    .collect(),
            }
        });
        (key, entry)
    }

    /// The row of a DestinationRule or VirtualService.
    pub fn rule_row<S: Spec>(object: DynamicObject) -> (Key, Option<Observed<S>>) {
        (key_of(&object.metadata), Some(Self::observe_rule(&object)))
    }

    /// A DestinationRule or VirtualService as observed.
    pub fn observe_rule<S: Spec>(object: &DynamicObject) -> Observed<S> {
        Observed::new(observed_meta(&object.metadata), object.data.get("spec"))
            .with_status(object.data.get("status"))
    }

    // === changes ===

    /// Applies a Namespace change: every Service and rule of the namespace is
    /// concerned.
    pub fn apply_namespace(&mut self, change: Change<NamespaceRow>, dirty: &mut BTreeSet<Key>) {
        let mut touched = Vec::new();
        self.namespaces
            .apply(change, |k, _, _| touched.push(k.0.clone()));
        for ns in touched {
            self.everything_in(&ns, dirty);
        }
    }

    /// Applies a Service change.
    pub fn apply_service(&mut self, change: Change<ServiceEntry>, dirty: &mut BTreeSet<Key>) {
        self.services.apply(change, |k, _, _| {
            dirty.insert(k.clone());
        });
    }

    /// Applies an EndpointSlice change: its Service (before and after) is
    /// concerned.
    pub fn apply_slice(&mut self, change: Change<SliceEntry>, dirty: &mut BTreeSet<Key>) {
        let by_service = &mut self.slices_by_service;
        let mut concerned = BTreeSet::new();
        let dirty_in = dirty;
        let dirty = &mut concerned;
        self.slices.apply(change, |k, old, new| {
            if let Some(old) = old {
                let service = (k.0.clone(), old.service.clone());
                if let Some(set) = by_service.get_mut(&service) {
                    set.remove(&k.1);
                    if set.is_empty() {
                        by_service.remove(&service);
                    }
                }
                dirty.insert(service);
            }
            if let Some(new) = new {
                let service = (k.0.clone(), new.service.clone());
                by_service
                    .entry(service.clone())
                    .or_default()
                    .insert(k.1.clone());
                dirty.insert(service);
            }
        });
        // A version Service's endpoints concern the Service it is for.
        for key in concerned {
            match self.versions.get(&key).and_then(|v| v.route_of.as_ref()) {
                Some(of) => dirty_in.insert((key.0.clone(), of.clone())),
                None => dirty_in.insert(key),
            };
        }
    }

    /// Applies a pod change: the routed Services of its namespace are
    /// concerned (the few that select it among them).
    pub fn apply_pod(&mut self, change: Change<PodRow>, dirty: &mut BTreeSet<Key>) {
        let mut touched = BTreeSet::new();
        self.pods.apply(change, |k, _, _| {
            touched.insert(k.0.clone());
        });
        for ns in touched {
            dirty.extend(self.services.in_namespace(&ns).map(|(k, _)| k.clone()));
        }
    }

    /// Applies a DestinationRule change: the Service of its name and every
    /// Service it names as a host are concerned.
    pub fn apply_destination_rule(
        &mut self,
        change: Change<Observed<DestinationRuleSpec>>,
        dirty: &mut BTreeSet<Key>,
    ) {
        self.destination_rules
            .apply(change, |k, old, new| concerned(k, old, new, dirty));
    }

    /// Applies a VirtualService change (as for a DestinationRule).
    pub fn apply_virtual_service(
        &mut self,
        change: Change<Observed<VirtualServiceSpec>>,
        dirty: &mut BTreeSet<Key>,
    ) {
        self.virtual_services
            .apply(change, |k, old, new| concerned(k, old, new, dirty));
    }

    /// Applies an HTTPRoute change: the Services it has as parents and the
    /// one it is for (ours) are concerned.
    pub fn apply_http_route(
        &mut self,
        change: Change<Observed<HttpRouteSpec>>,
        dirty: &mut BTreeSet<Key>,
    ) {
        self.http_routes
            .apply(change, |k, old, new| gateway_concerned(k, old, new, dirty));
    }

    /// Applies a GRPCRoute change (as for an HTTPRoute).
    pub fn apply_grpc_route(
        &mut self,
        change: Change<Observed<GrpcRouteSpec>>,
        dirty: &mut BTreeSet<Key>,
    ) {
        self.grpc_routes
            .apply(change, |k, old, new| gateway_concerned(k, old, new, dirty));
    }

    /// Applies a change of one of our version Services: the Service it is
    /// for is concerned.
    pub fn apply_version(&mut self, change: Change<ObservedService>, dirty: &mut BTreeSet<Key>) {
        self.versions.apply(change, |k, old, new| {
            for s in old.into_iter().chain(new) {
                if let Some(of) = &s.route_of {
                    dirty.insert((k.0.clone(), of.clone()));
                }
            }
        });
    }

    /// Applies a change of a Service whose name holds `--`: the routed
    /// Services of its namespace are concerned (it may hold a name one of
    /// them wants).
    pub fn apply_dashed(&mut self, change: Change<DashedRow>, dirty: &mut BTreeSet<Key>) {
        let mut touched = BTreeSet::new();
        self.dashed.apply(change, |k, _, _| {
            touched.insert(k.0.clone());
        });
        for ns in touched {
            dirty.extend(self.services.in_namespace(&ns).map(|(k, _)| k.clone()));
        }
    }

    fn everything_in(&self, namespace: &str, dirty: &mut BTreeSet<Key>) {
        dirty.extend(
            self.services
                .in_namespace(namespace)
                .map(|(k, _)| k.clone()),
        );
        dirty.extend(
            self.destination_rules
                .in_namespace(namespace)
                .map(|(k, _)| k.clone()),
        );
        dirty.extend(
            self.virtual_services
                .in_namespace(namespace)
                .map(|(k, _)| k.clone()),
        );
        for (k, o) in self.http_routes.in_namespace(namespace) {
            gateway_concerned(k, None, Some(o), dirty);
        }
        for (k, o) in self.versions.in_namespace(namespace) {
            if let Some(of) = &o.route_of {
                dirty.insert((k.0.clone(), of.clone()));
            }
        }
    }

    // === queries ===

    /// The Service of `key` when it is routed: it asks for routes, in an
    /// opted-in namespace that is not excluded (nor being deleted).
    pub fn routed(&self, key: &Key) -> Option<&ServiceEntry> {
        let ns = self.namespaces.get(&(key.0.clone(), String::new()))?;
        if ns.terminating {
            return None;
        }
        self.services.get(key)
    }

    /// True while the opted-in namespace is being deleted: the apiserver
    /// refuses anything new there and deletes what is in it, ours too.
    pub fn terminating(&self, namespace: &str) -> bool {
        self.namespaces
            .get(&(namespace.to_owned(), String::new()))
            .is_some_and(|n| n.terminating)
    }

    /// Notes that the namespace is being deleted, as a write's refusal says,
    /// before its watch does (the watches are separate streams).
    pub fn note_terminating(&mut self, namespace: &str) {
        let key = (namespace.to_owned(), String::new());
        let row = Some(NamespaceRow { terminating: true });
        self.namespaces
            .apply(Change::Applied(key, row), |_, _, _| {});
    }

    /// What is live for the Service `key` (see [`super::live`]).
    pub fn live(&self, key: &Key) -> Live {
        let Some(slices) = self.slices_by_service.get(key) else {
            return Live::default();
        };
        let endpoints = slices
            .iter()
            .filter_map(|s| self.slices.get(&(key.0.clone(), s.clone())))
            .flat_map(|s| &s.endpoints)
            .map(|e| EndpointView {
                pod: e.pod.as_deref(),
                ready: e.ready,
            });
        live(endpoints, |pod| {
            self.pods
                .get(&(key.0.clone(), pod.to_owned()))
                .map(|row| match row {
                    PodRow::Normal => (PodStage::Normal, None),
                    PodRow::Canary(c) => {
                        (PodStage::Canary(&c.tag), c.weight.as_ref().map(|(w, _)| w))
                    }
                })
        })
    }

    /// The DestinationRule named `key`.
    pub fn destination_rule(&self, key: &Key) -> Option<&Observed<DestinationRuleSpec>> {
        self.destination_rules.get(key)
    }

    /// The VirtualService named `key`.
    pub fn virtual_service(&self, key: &Key) -> Option<&Observed<VirtualServiceSpec>> {
        self.virtual_services.get(key)
    }

    /// Every DestinationRule and VirtualService of a namespace.
    pub fn rules_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = RuleHead<'a>> {
        self.destination_rules
            .in_namespace(namespace)
            .map(|(_, o)| o.head())
            .chain(
                self.virtual_services
                    .in_namespace(namespace)
                    .map(|(_, o)| o.head()),
            )
    }

    /// Our HTTPRoutes for the Service `key`, by name.
    pub fn http_routes_of<'a>(
        &'a self,
        key: &'a Key,
    ) -> BTreeMap<String, &'a Observed<HttpRouteSpec>> {
        self.http_routes
            .in_namespace(&key.0)
            .filter(|(_, o)| o.managed && o.route_of.as_ref() == Some(&key.1))
            .map(|(k, o)| (k.1.clone(), o))
            .collect()
    }

    /// The HTTPRoute named `key`.
    pub fn http_route(&self, key: &Key) -> Option<&Observed<HttpRouteSpec>> {
        self.http_routes.get(key)
    }

    /// Our version Services for the Service `key`, by name.
    pub fn versions_of<'a>(&'a self, key: &'a Key) -> BTreeMap<String, &'a ObservedService> {
        self.versions
            .in_namespace(&key.0)
            .filter(|(_, o)| o.is_version_of(&key.1))
            .map(|(k, o)| (k.1.clone(), o))
            .collect()
    }

    /// The version Service named `key`.
    pub fn version(&self, key: &Key) -> Option<&ObservedService> {
        self.versions.get(key)
    }

    /// Every HTTPRoute and GRPCRoute of a namespace.
    pub fn gateway_routes_in<'a>(
        &'a self,
        namespace: &'a str,
    ) -> impl Iterator<Item = RuleHead<'a>> {
        self.http_routes
            .in_namespace(namespace)
            .map(|(_, o)| o.head())
            .chain(
                self.grpc_routes
                    .in_namespace(namespace)
                    .map(|(_, o)| o.head()),
            )
    }

    /// Service names of the namespace that the Service `key` must not give
    /// its version Services: those other routed Services' version Services
    /// hold.
    pub fn names_taken(&self, key: &Key) -> BTreeSet<String> {
        self.dashed
            .in_namespace(&key.0)
            .filter(|(_, row)| row.managed && row.route_of.as_ref() != Some(&key.1))
            .map(|(k, _)| k.1.clone())
            .chain(
                self.versions
                    .in_namespace(&key.0)
                    .filter(|(_, o)| o.route_of.as_ref() != Some(&key.1))
                    .map(|(k, _)| k.1.clone()),
            )
            .collect()
    }

    /// True when a Service named `key` exists that is not one of our
    /// version Services of `service` (only names holding `--` are known).
    pub fn foreign_service(&self, key: &Key, service: &str) -> bool {
        self.dashed
            .get(key)
            .is_some_and(|row| !row.managed || row.route_of.as_deref() != Some(service))
    }

    /// True when the Service `key` has a ready endpoint.
    pub fn has_ready_endpoint(&self, key: &Key) -> bool {
        self.slices_by_service.get(key).is_some_and(|slices| {
            slices
                .iter()
                .filter_map(|s| self.slices.get(&(key.0.clone(), s.clone())))
                .any(|s| s.endpoints.iter().any(|e| e.ready))
        })
    }

    /// Every key worth a reconcile: routed Services and our objects (whose
    /// Service may have stopped asking for routes).
    pub fn all_keys(&self) -> BTreeSet<Key> {
        let ours = |k: &Key, managed: bool| managed.then(|| k.clone());
        self.services
            .iter()
            .map(|(k, _)| k.clone())
            .chain(
                self.destination_rules
                    .iter()
                    .filter_map(|(k, o)| ours(k, o.managed)),
            )
            .chain(
                self.virtual_services
                    .iter()
                    .filter_map(|(k, o)| ours(k, o.managed)),
            )
            .chain(
                self.http_routes
                    .iter()
                    .filter_map(|(k, o)| Some((k.0.clone(), o.route_of.clone()?))),
            )
            .chain(
                self.versions
                    .iter()
                    .filter_map(|(k, o)| Some((k.0.clone(), o.route_of.clone()?))),
            )
            .collect()
    }

    /// The Services that ask for routes, in opted-in namespaces or not.
    pub fn services(&self) -> impl Iterator<Item = &Key> {
        self.services.iter().map(|(k, _)| k)
    }

    /// Number of pods held (normal pods and canaries).
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// Number of EndpointSlices held.
    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }
}

/// Whether a watch cache has caught up with one of our writes, so that it,
/// and no longer the write's answer, is the view to decide from. Our write
/// took the object from `prior` (its `resourceVersion`; `None`: absent) to
/// `written` (`None`: we deleted it); the cache shows `cached` and its
/// watch has delivered up to `newest`.
///
/// Under load the apiserver's watch can deliver events older than our own
/// last write (several writes in a row can all be ahead of it). A decision
/// must never rest on a view older than what we wrote: the cache counts only
/// once it shows our write or something after it. `resourceVersion`s are
/// compared as numbers (what etcd-backed apiservers give); one that does not
/// read as a number is only compared for equality, and anything other than
/// `prior` then counts as newer.
pub fn caught_up(
    cached: Option<&str>,
    prior: Option<&str>,
    written: Option<&str>,
    newest: u64,
) -> bool {
    let num = |v: &str| v.parse::<u64>().ok();
    match (written, cached) {
        // The cache shows the object: at our write or after it?
        (Some(w), Some(c)) => match (num(w), num(c)) {
            (Some(w), Some(c)) => c >= w,
            _ => c == w || Some(c) != prior,
        },
        // The cache lacks what we wrote: deleted since (its watch got past
        // our write), or not there yet.
        (Some(w), None) => match num(w) {
            Some(w) => newest >= w,
            None => prior.is_some(),
        },
        // We deleted it, and the cache agrees.
        (None, None) => true,
        // We deleted it, and the cache still shows it: the version we
        // deleted (or older), or one created after the delete.
        (None, Some(c)) => match (prior.and_then(num), num(c)) {
            (Some(p), Some(c)) => c > p,
            _ => Some(c) != prior,
        },
    }
}

/// The Services a change of a rule concerns: the one of its name, and the
/// ones its hosts name (before and after).
fn concerned<S>(
    key: &Key,
    old: Option<&Observed<S>>,
    new: Option<&Observed<S>>,
    dirty: &mut BTreeSet<Key>,
) {
    dirty.insert(key.clone());
    for rule in old.into_iter().chain(new) {
        for host in &rule.hosts {
            if let Some(service) = host_service(host, &key.0) {
                dirty.insert((key.0.clone(), service.to_owned()));
            }
        }
    }
}

/// The Services a change of a Gateway API route concerns: the ones it has
/// as parents and the one it is for (ours), before and after.
fn gateway_concerned<S>(
    key: &Key,
    old: Option<&Observed<S>>,
    new: Option<&Observed<S>>,
    dirty: &mut BTreeSet<Key>,
) {
    for route in old.into_iter().chain(new) {
        if let Some(of) = &route.route_of {
            dirty.insert((key.0.clone(), of.clone()));
        }
        for host in &route.hosts {
            if let Some(service) = host_service(host, &key.0) {
                dirty.insert((key.0.clone(), service.to_owned()));
            }
        }
    }
}

fn key_of(meta: &ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// What an object's metadata says about ownership and versions.
pub fn observed_meta(meta: &ObjectMeta) -> ObservedMeta {
    ObservedMeta {
        name: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        labels: meta.labels.clone().unwrap_or_default(),
        removal_due: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(super::objects::REMOVAL_DUE_ANNOTATION))
            .cloned(),
        owner_uids: meta
            .owner_references
            .iter()
            .flatten()
            .filter(|o| o.kind == "Service")
            .map(|o| o.uid.clone())
            .collect(),
    }
}

/// The fields of an EndpointSlice read here.
#[derive(Debug, Default, Deserialize)]
struct SliceData {
    #[serde(default, deserialize_with = "nullable")]
    endpoints: Vec<EndpointData>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointData {
    #[serde(default, deserialize_with = "nullable")]
    conditions: Conditions,
    #[serde(default)]
    target_ref: Option<TargetRef>,
}

#[derive(Debug, Default, Deserialize)]
struct Conditions {
    #[serde(default)]
    ready: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
struct TargetRef {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// `null` reads as the default.
fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::caught_up;

    #[test]
    fn the_cache_counts_once_it_shows_our_write_or_something_after_it() {
        // We wrote 12 (from 5): the cache at 5, or at 9 (a write of ours
        // before that one), is behind; at 12 or later it is the view.
        assert!(!caught_up(Some("5"), Some("5"), Some("12"), 9));
        assert!(!caught_up(Some("9"), Some("9"), Some("12"), 9));
        assert!(!caught_up(Some("5"), Some("9"), Some("12"), 9));
        assert!(caught_up(Some("12"), Some("9"), Some("12"), 12));
        assert!(caught_up(Some("15"), Some("9"), Some("12"), 15));
        // We created it: absent in the cache until its watch gets there;
        // absent after that means someone deleted it since.
        assert!(!caught_up(None, None, Some("12"), 11));
        assert!(caught_up(None, None, Some("12"), 13));
        // We deleted it (at 9): still shown at 9 or before is behind;
        // shown at a later version was created again since.
        assert!(caught_up(None, Some("9"), None, 0));
        assert!(!caught_up(Some("9"), Some("9"), None, 9));
        assert!(!caught_up(Some("7"), Some("9"), None, 9));
        assert!(caught_up(Some("14"), Some("9"), None, 14));
    }

    #[test]
    fn versions_that_are_not_numbers_are_compared_for_equality_only() {
        assert!(caught_up(Some("b"), Some("a"), Some("b"), 0));
        assert!(!caught_up(Some("a"), Some("a"), Some("b"), 0));
        assert!(caught_up(Some("c"), Some("a"), Some("b"), 0));
        assert!(caught_up(None, Some("a"), Some("b"), 0));
        assert!(!caught_up(None, None, Some("b"), 0));
        assert!(!caught_up(Some("a"), Some("a"), None, 0));
        assert!(caught_up(Some("z"), Some("a"), None, 0));
    }
}
