//! The owner chains, pure: which rows of which workload kinds a chain can
//! use, and the nearest tag up a chain ([`OwnerIndex::owner_tag`]). No I/O:
//! the cache ([`super::OwnerCache`]) fills it from watches; `check` fills
//! one from what it read.

use std::collections::HashMap;

use crate::mutate::{NamespaceMesh, OwnerRef, OwnerTag, StrMap};

/// The annotation a Deployment and its ReplicaSets carry with the
/// Deployment's rollout revision: equal on the Deployment's current
/// ReplicaSet, the one the Deployment's annotations are copied onto.
pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";

/// The kinds an owner chain passes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKind {
    /// `apps/v1` ReplicaSet (owned by a Deployment, or standalone).
    ReplicaSet,
    /// `apps/v1` Deployment.
    Deployment,
    /// `apps/v1` StatefulSet.
    StatefulSet,
    /// `apps/v1` DaemonSet.
    DaemonSet,
    /// `batch/v1` Job (owned by a CronJob, or standalone).
    Job,
    /// `batch/v1` CronJob.
    CronJob,
}

impl WorkloadKind {
    /// Every kind, in watch order.
    pub const ALL: [Self; 6] = [
        Self::ReplicaSet,
        Self::Deployment,
        Self::StatefulSet,
        Self::DaemonSet,
        Self::Job,
        Self::CronJob,
    ];

    /// The kind's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::ReplicaSet => "ReplicaSet",
            Self::Deployment => "Deployment",
            Self::StatefulSet => "StatefulSet",
            Self::DaemonSet => "DaemonSet",
            Self::Job => "Job",
            Self::CronJob => "CronJob",
        }
    }

    /// `apps/v1` or `batch/v1`.
    pub fn api_version(self) -> &'static str {
        match self {
            Self::Job | Self::CronJob => "batch/v1",
            _ => "apps/v1",
        }
    }

    /// The kind an ownerReference names (`apiVersion` group and `kind`);
    /// `None` for anything else (a custom controller's kind).
    pub fn of(api_version: &str, kind: &str) -> Option<Self> {
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        let found = Self::ALL.into_iter().find(|k| k.name() == kind)?;
        let wanted = found.api_version().split_once('/').map_or("", |(g, _)| g);
        (group == wanted).then_some(found)
    }
}

/// What the index keeps of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Its uid (Events about it).
    pub uid: String,
    /// Its tag annotation, as written.
    pub tag: Option<String>,
    /// Its managing controller, when that is a link of a chain
    /// (ReplicaSet -> Deployment, Job -> CronJob).
    pub owner: Option<(WorkloadKind, String)>,
    /// [`REVISION_ANNOTATION`] (ReplicaSets and Deployments).
    pub revision: Option<String>,
}

impl Row {
    /// The row of an object of `kind` with this `uid`, `annotations` and
    /// managing `controller`, or `None` when no chain can use it: it
    /// carries no tag and is no link (most objects).
    pub fn of<M: StrMap + ?Sized>(
        kind: WorkloadKind,
        uid: &str,
        annotations: Option<&M>,
        controller: Option<&OwnerRef>,
        tag_annotation: &str,
    ) -> Option<Self> {
        let annotation = |key: &str| annotations?.value(key).map(str::to_owned);
        let tag = annotation(tag_annotation);
        let owner = controller
            .and_then(|o| Some((WorkloadKind::of(&o.api_version, &o.kind)?, o.name.clone())))
            .filter(|(owner, _)| {
                matches!(
                    (kind, owner),
                    (WorkloadKind::ReplicaSet, WorkloadKind::Deployment)
                        | (WorkloadKind::Job, WorkloadKind::CronJob)
                )
            });
        if tag.is_none() && owner.is_none() {
            return None;
        }
        Some(Self {
            uid: uid.to_owned(),
            tag,
            owner,
            revision: matches!(kind, WorkloadKind::ReplicaSet | WorkloadKind::Deployment)
                .then(|| annotation(REVISION_ANNOTATION))
                .flatten(),
        })
    }
}

/// Rows of one kind by namespace and name, replaced whole when a relist
/// completes (as kube-runtime's reflector store does).
#[derive(Debug, Default)]
struct Rows {
    rows: HashMap<String, HashMap<String, Row>>,
    relist: Option<HashMap<String, HashMap<String, Row>>>,
    synced: bool,
}

impl Rows {
    fn get(&self, namespace: &str, name: &str) -> Option<&Row> {
        self.rows.get(namespace)?.get(name)
    }

    fn set(
        map: &mut HashMap<String, HashMap<String, Row>>,
        namespace: String,
        name: String,
        row: Option<Row>,
    ) {
        match row {
            Some(row) => {
                map.entry(namespace).or_default().insert(name, row);
            }
            None => {
                if let Some(names) = map.get_mut(&namespace) {
                    names.remove(&name);
                    if names.is_empty() {
                        map.remove(&namespace);
                    }
                }
            }
        }
    }
}

/// A change to the index, from a watch event.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A (re)list starts.
    Init,
    /// A listed object: namespace, name, its row.
    Listed(String, String, Option<Row>),
    /// The list is complete: rows not listed are gone.
    InitDone,
    /// An object was added or changed.
    Applied(String, String, Option<Row>),
    /// An object was deleted.
    Deleted(String, String),
}

/// A change to the namespaces' mesh modes, from a watch event.
#[derive(Debug, Clone, PartialEq)]
pub enum NamespaceChange {
    /// A (re)list starts.
    Init,
    /// A listed namespace and its mode.
    Listed(String, NamespaceMesh),
    /// The list is complete.
    InitDone,
    /// A namespace was added or changed.
    Applied(String, NamespaceMesh),
    /// A namespace was deleted (or no longer opted in).
    Deleted(String),
}

/// The owner rows of every kind, the chain rules, and how each opted-in
/// namespace joins the mesh (no I/O).
#[derive(Debug, Default)]
pub struct OwnerIndex {
    kinds: [Rows; 6],
    mesh: HashMap<String, NamespaceMesh>,
    mesh_relist: Option<HashMap<String, NamespaceMesh>>,
    mesh_synced: bool,
}

impl OwnerIndex {
    /// Applies a change to the opted-in namespaces' mesh modes.
    pub fn apply_namespace(&mut self, change: NamespaceChange) {
        match change {
            NamespaceChange::Init => self.mesh_relist = Some(HashMap::new()),
            NamespaceChange::Listed(name, mesh) => match &mut self.mesh_relist {
                Some(relist) => {
                    relist.insert(name, mesh);
                }
                None => {
                    self.mesh.insert(name, mesh);
                }
            },
            NamespaceChange::InitDone => {
                self.mesh = self.mesh_relist.take().unwrap_or_default();
                self.mesh_synced = true;
            }
            NamespaceChange::Applied(name, mesh) => {
                self.mesh.insert(name, mesh);
            }
            NamespaceChange::Deleted(name) => {
                self.mesh.remove(&name);
            }
        }
    }

    /// How `namespace` joins the mesh, as its labels say.
    pub fn mesh(&self, namespace: &str) -> NamespaceMesh {
        self.mesh.get(namespace).copied().unwrap_or_default()
    }

    /// Applies a change to the rows of `kind`.
    pub fn apply(&mut self, kind: WorkloadKind, change: Change) {
        let rows = &mut self.kinds[kind as usize];
        match change {
            Change::Init => rows.relist = Some(HashMap::new()),
            Change::Listed(ns, name, row) => match &mut rows.relist {
                Some(relist) => Rows::set(relist, ns, name, row),
                None => Rows::set(&mut rows.rows, ns, name, row),
            },
            Change::InitDone => {
                rows.rows = rows.relist.take().unwrap_or_default();
                rows.synced = true;
            }
            Change::Applied(ns, name, row) => Rows::set(&mut rows.rows, ns, name, row),
            Change::Deleted(ns, name) => Rows::set(&mut rows.rows, ns, name, None),
        }
    }

    /// Marks `kind` as listed without rows (its API is not served, e.g.
    /// `batch/v1` CronJobs before Kubernetes 1.21).
    pub fn not_served(&mut self, kind: WorkloadKind) {
        let rows = &mut self.kinds[kind as usize];
        rows.rows.clear();
        rows.relist = None;
        rows.synced = true;
    }

    /// True once `kind` has listed (or is not served).
    pub fn is_listed(&self, kind: WorkloadKind) -> bool {
        self.kinds[kind as usize].synced
    }

    /// True once every kind, and the namespaces, have listed.
    pub fn is_synced(&self) -> bool {
        self.kinds.iter().all(|r| r.synced) && self.mesh_synced
    }

    /// Number of rows held (all kinds).
    pub fn len(&self) -> usize {
        self.kinds
            .iter()
            .flat_map(|r| r.rows.values())
            .map(HashMap::len)
            .sum()
    }

    /// True without rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn row(&self, kind: WorkloadKind, namespace: &str, name: &str) -> Option<&Row> {
        self.kinds[kind as usize].get(namespace, name)
    }

    /// The owner of `kind`/`name` up the chain (a ReplicaSet's Deployment,
    /// a Job's CronJob), when the index links them.
    pub fn workload(&self, namespace: &str, kind: WorkloadKind, name: &str) -> Option<OwnerRef> {
        let (owner_kind, owner_name) = self.row(kind, namespace, name)?.owner.as_ref()?;
        let uid = self
            .row(*owner_kind, namespace, owner_name)
            .map(|r| r.uid.clone())
            .unwrap_or_default();
        Some(OwnerRef {
            api_version: owner_kind.api_version().into(),
            kind: owner_kind.name().into(),
            name: owner_name.clone(),
            uid,
            controller: Some(true),
        })
    }

    /// The tag the owner chain of an object in `namespace` asks for, the
    /// object's managing controller being `kind`/`name`: that controller's
    /// own tag annotation, else its owner's (a Deployment's only for its
    /// current ReplicaSet, whose revision is the Deployment's: an older
    /// ReplicaSet of a Deployment tagged since runs other code).
    pub fn owner_tag(&self, namespace: &str, kind: WorkloadKind, name: &str) -> Option<OwnerTag> {
        let tag = |kind: WorkloadKind, name: &str, row: &Row| {
            row.tag.as_ref().map(|value| OwnerTag {
                api_version: kind.api_version().into(),
                kind: kind.name().into(),
                name: name.to_owned(),
                uid: row.uid.clone(),
                value: value.clone(),
            })
        };
        let row = self.row(kind, namespace, name)?;
        if let Some(found) = tag(kind, name, row) {
            return Some(found);
        }
        let (owner_kind, owner_name) = row.owner.as_ref()?;
        let owner = self.row(*owner_kind, namespace, owner_name)?;
        if *owner_kind == WorkloadKind::Deployment
            && (row.revision.is_none() || row.revision != owner.revision)
        {
            return None;
        }
        tag(*owner_kind, owner_name, owner)
    }
}
