//! The canary intent of the workloads that own Pods and ReplicaSets, for
//! admission and the backfill. A tag annotation on a workload's own
//! metadata reaches its pods through their pod template only when the
//! webhook copied it there (at the workload's admission); a workload
//! created before its namespace opted in has it on its metadata alone (and
//! a Deployment copies it onto its current ReplicaSet). Its pods ask for a
//! canary all the same: the intent is the first of the object's own
//! annotation, its pod template's, and the owner chain's ([`OwnerIndex`]).
//!
//! Admission never calls the API: every replica keeps a small index fed by
//! metadata-only watches ([`OwnerCache`], [`OwnerWatch`]), as it does for
//! the bootstrap ConfigMap.
//!
//! ```text
//!  every replica: watch (metadata only, all namespaces)
//!     ReplicaSets, Deployments, StatefulSets, DaemonSets, Jobs, CronJobs
//!       --> OwnerIndex: rows only for what a chain can use: objects that
//!           carry the tag annotation, and the links ReplicaSet -> Deployment
//!           (with its revision) and Job -> CronJob
//!     opted-in Namespaces --> how each joins the mesh (sidecar injection,
//!           ambient, none): whether a pod not injected yet gets a sidecar
//!  admission / backfill: owner_tag(namespace, controller ref)
//!       Pod -> ReplicaSet -> Deployment   (the Deployment's tag only for
//!                                          its current ReplicaSet)
//!       Pod -> StatefulSet | DaemonSet | Job -> CronJob
//!       --> the nearest owner whose metadata carries the tag
//! ```
//!
//! Until every watch has listed once the index knows nothing: a pod whose
//! tag comes only from its owner's metadata is then labelled from its own
//! annotations (docs/labels.md "Tags on workloads"). `serve` waits (at most 10 s)
//! for the first lists before it turns ready.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::mutate::{NamespaceMesh, NamespacePolicy, OwnerRef, OwnerTag};
use crate::task::TaskError;

pub mod index;

pub use index::{Change, NamespaceChange, OwnerIndex, REVISION_ANNOTATION, Row, WorkloadKind};

// === the cache every replica keeps ===

/// The index, shared by the watch that fills it and the lookups; cheap to
/// clone. [`OwnerCache::disabled`] knows nothing.
#[derive(Clone, Default)]
pub struct OwnerCache {
    inner: Option<Arc<RwLock<OwnerIndex>>>,
    synced: Arc<AtomicBool>,
}

impl OwnerCache {
    /// A cache without a cluster: every lookup is `None`.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// False for [`OwnerCache::disabled`].
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// True once every watch has listed once (stays true while a broken
    /// watch relists: the rows are kept).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The tag the owner chain of an object in `namespace` managed by
    /// `controller` asks for. A map lookup or two under a short read lock:
    /// never blocks on I/O.
    pub fn owner_tag(&self, namespace: &str, controller: &OwnerRef) -> Option<OwnerTag> {
        let kind = WorkloadKind::of(&controller.api_version, &controller.kind)?;
        let index = self
            .inner
            .as_ref()?
            .read()
            .unwrap_or_else(|e| e.into_inner());
        index.owner_tag(namespace, kind, &controller.name)
    }

    /// The workload at the top of the chain of an object managed by
    /// `controller`: a ReplicaSet's Deployment, a Job's CronJob; else
    /// `controller` itself.
    pub fn workload(&self, namespace: &str, controller: &OwnerRef) -> OwnerRef {
        let kind = WorkloadKind::of(&controller.api_version, &controller.kind);
        let (Some(kind), Some(inner)) = (kind, self.inner.as_ref()) else {
            return controller.clone();
        };
        let index = inner.read().unwrap_or_else(|e| e.into_inner());
        index
            .workload(namespace, kind, &controller.name)
            .unwrap_or_else(|| controller.clone())
    }

    /// How `namespace` joins the mesh (its labels), for the keepalive
    /// decision of pods not injected yet.
    pub fn mesh(&self, namespace: &str) -> NamespaceMesh {
        match &self.inner {
            Some(i) => i.read().unwrap_or_else(|e| e.into_inner()).mesh(namespace),
            None => NamespaceMesh::Unknown,
        }
    }

    /// Number of rows held.
    pub fn len(&self) -> usize {
        self.inner
            .as_ref()
            .map_or(0, |i| i.read().unwrap_or_else(|e| e.into_inner()).len())
    }

    /// True without rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The watches that fill an [`OwnerCache`]; run with [`OwnerWatch::run`].
pub struct OwnerWatch {
    client: Client,
    tag_annotation: String,
    namespaces: NamespacePolicy,
    cache: OwnerCache,
}

/// A cache and the watches that fill it, for the objects of every
/// namespace that is not excluded.
pub fn cache(
    client: Client,
    tag_annotation: String,
    namespaces: NamespacePolicy,
) -> (OwnerCache, OwnerWatch) {
    let cache = OwnerCache {
        inner: Some(Arc::default()),
        synced: Arc::default(),
    };
    let watch = OwnerWatch {
        client,
        tag_annotation,
        namespaces,
        cache: cache.clone(),
    };
    (cache, watch)
}

/// One watch event of one kind (`None`: Namespaces), its objects' metadata.
type Update = (
    Option<WorkloadKind>,
    watcher::Result<watcher::Event<ObjectMeta>>,
);

/// A metadata-only watch of `K` in every namespace.
fn stream<K>(
    api: Api<PartialObjectMeta<K>>,
    config: watcher::Config,
    kind: Option<WorkloadKind>,
) -> futures::stream::BoxStream<'static, Update>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let meta = |event: watcher::Event<PartialObjectMeta<K>>| match event {
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
        watcher::Event::InitApply(o) => watcher::Event::InitApply(o.metadata),
        watcher::Event::Apply(o) => watcher::Event::Apply(o.metadata),
        watcher::Event::Delete(o) => watcher::Event::Delete(o.metadata),
    };
    watcher(api, config)
        .default_backoff()
        .map(move |r| (kind, r.map(meta)))
        .boxed()
}

impl OwnerWatch {
    /// Watches until `stop`. A failing watch is retried with backoff and
    /// logged once until it recovers; a kind the apiserver does not serve
    /// (404) counts as listed, with nothing in it.
    pub async fn run(self, stop: CancellationToken) -> Result<(), TaskError> {
        let all = || watcher::Config::default();
        let c = &self.client;
        let mut namespaces = all();
        let selector = self.namespaces.opt_in_selector();
        if !selector.is_empty() {
            namespaces = namespaces.labels(&selector);
        }
        let mut updates = futures::stream::select_all([
            stream::<ReplicaSet>(Api::all(c.clone()), all(), Some(WorkloadKind::ReplicaSet)),
            stream::<Deployment>(Api::all(c.clone()), all(), Some(WorkloadKind::Deployment)),
            stream::<StatefulSet>(Api::all(c.clone()), all(), Some(WorkloadKind::StatefulSet)),
            stream::<DaemonSet>(Api::all(c.clone()), all(), Some(WorkloadKind::DaemonSet)),
            stream::<Job>(Api::all(c.clone()), all(), Some(WorkloadKind::Job)),
            stream::<CronJob>(Api::all(c.clone()), all(), Some(WorkloadKind::CronJob)),
            stream::<Namespace>(Api::all(c.clone()), namespaces, None),
        ]);
        let Some(index) = self.cache.inner.clone() else {
            return Ok(());
        };
        let mut failing = [false; 7];
        loop {
            let (kind, result) = tokio::select! {
                biased;
                () = stop.cancelled() => return Ok(()),
                next = updates.next() => match next {
                    Some(u) => u,
                    None => return Ok(()),
                },
            };
            let slot = kind.map_or(6, |k| k as usize);
            let name = kind.map_or("Namespace", WorkloadKind::name);
            let mut index = index.write().unwrap_or_else(|e| e.into_inner());
            match (result, kind) {
                (Ok(event), kind) => {
                    if std::mem::take(&mut failing[slot]) {
                        info!(kind = name, "owner watch recovered");
                    }
                    match kind {
                        Some(kind) => index.apply(kind, self.change(kind, event)),
                        None => index.apply_namespace(namespace_change(event)),
                    }
                }
                (Err(error), Some(kind)) if is_not_found(&error) => {
                    if !index.is_listed(kind) {
                        info!(kind = name, "not served; no owner of this kind");
                    }
                    index.not_served(kind);
                }
                (Err(error), _) => {
                    if !std::mem::replace(&mut failing[slot], true) {
                        warn!(kind = name, %error, "owner watch failed; retrying with backoff");
                    }
                }
            }
            if !self.cache.is_synced() && index.is_synced() {
                info!(rows = index.len(), "owner cache synced");
                self.cache.synced.store(true, Ordering::Release);
            }
        }
    }

    fn change(&self, kind: WorkloadKind, event: watcher::Event<ObjectMeta>) -> Change {
        let row = |meta: &ObjectMeta| -> (String, String, Option<Row>) {
            let namespace = meta.namespace.clone().unwrap_or_default();
            let name = meta.name.clone().unwrap_or_default();
            let controller = meta
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.controller == Some(true))
                .map(|o| OwnerRef {
                    api_version: o.api_version.clone(),
                    kind: o.kind.clone(),
                    name: o.name.clone(),
                    uid: o.uid.clone(),
                    controller: o.controller,
                });
            let row = Row::of(
                kind,
                meta.uid.as_deref().unwrap_or_default(),
                meta.annotations.as_ref(),
                controller.as_ref(),
                &self.tag_annotation,
            )
            .filter(|_| !self.namespaces.is_excluded(&namespace));
            (namespace, name, row)
        };
        match event {
            watcher::Event::Init => Change::Init,
            watcher::Event::InitDone => Change::InitDone,
            watcher::Event::InitApply(meta) => {
                let (ns, name, row) = row(&meta);
                Change::Listed(ns, name, row)
            }
            watcher::Event::Apply(meta) => {
                let (ns, name, row) = row(&meta);
                Change::Applied(ns, name, row)
            }
            watcher::Event::Delete(meta) => {
                let (ns, name, _) = row(&meta);
                Change::Deleted(ns, name)
            }
        }
    }
}

/// A Namespace watch event as a change of its mesh mode.
fn namespace_change(event: watcher::Event<ObjectMeta>) -> NamespaceChange {
    let of = |m: &ObjectMeta| {
        (
            m.name.clone().unwrap_or_default(),
            NamespaceMesh::of(m.labels.as_ref()),
        )
    };
    match event {
        watcher::Event::Init => NamespaceChange::Init,
        watcher::Event::InitDone => NamespaceChange::InitDone,
        watcher::Event::InitApply(m) => {
            let (name, mesh) = of(&m);
            NamespaceChange::Listed(name, mesh)
        }
        watcher::Event::Apply(m) => {
            let (name, mesh) = of(&m);
            NamespaceChange::Applied(name, mesh)
        }
        watcher::Event::Delete(m) => NamespaceChange::Deleted(of(&m).0),
    }
}

fn is_not_found(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
