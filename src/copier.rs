//! The bootstrap ConfigMap copier: keeps the patched Envoy bootstrap
//! template where sidecars mount it, and tells the admission path where it
//! is.
//!
//! The template lives in one ConfigMap (the *source*) in the webhook's own
//! namespace. A ConfigMap volume is namespace-local, and a pod whose
//! ConfigMap is missing never starts, so:
//!
//! - every replica runs a cache ([`BootstrapCache`], fed by [`CacheWatch`]:
//!   one watch over the ConfigMaps of that name in all namespaces, a field
//!   selector, so no other ConfigMap is ever held) that answers "does the
//!   copy exist in this namespace?" for the admission path without I/O;
//! - the leader runs the copier ([`run_copier`]: a `Controller` over the
//!   opted-in Namespaces) that keeps a copy of the source in each of them by
//!   server-side apply ([`desired_copy`] says what a copy holds).
//!
//! ```text
//!  every replica:  watch ConfigMaps (metadata.name=<name>) --reflector--> Store
//!                    Store --> BootstrapCache::availability(ns)   (admission path)
//!                    source changed / copy deleted or edited / relisted --> Notify
//!  leader only:    Notify --reconcile_all_on--> Controller<Namespace> (shared watch)
//!                    copy_one(ns): source from the Store, skip if up to date
//!                    --> PATCH (server-side apply) <ns>/<name>
//! ```
//!
//! The copier reads the source from the same Store the watch fills and is
//! only woken after the Store was updated, so it never applies a stale
//! source. It starts once the first list has completed.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, ReflectHandle, Store};
use kube::runtime::watcher::{self, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cluster::events::is_namespace_terminating;
use crate::config::Config;
use crate::metrics::ControllerCounters;
use crate::task::TaskError;

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "bootstrap-copier";

/// Field manager of our server-side applies.
pub const FIELD_MANAGER: &str = "canary-injector";

/// Label set on every object we own.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Value of [`MANAGED_BY_LABEL`] on every object we own.
pub const MANAGED_BY_VALUE: &str = "canary-injector";

/// Annotation on every copy naming its source as `<namespace>/<name>`.
pub const SOURCE_ANNOTATION: &str = "canary-injector.io/source";

/// Client-side `kubectl apply` keeps a second copy of the whole object here;
/// dropped from the cache to halve its memory.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Re-check every namespace this often even without a watch event. Cheap:
/// an up-to-date copy costs no API call.
const RESYNC: Duration = Duration::from_secs(600);

/// Retry after a failed apply.
const ERROR_REQUEUE: Duration = Duration::from_secs(30);

/// Retry while the source ConfigMap does not exist (its creation also
/// triggers a pass at once).
const SOURCE_MISSING_REQUEUE: Duration = Duration::from_secs(60);

/// At most this many applies in flight, to be gentle with the apiserver when
/// hundreds of namespaces need a copy at once.
const CONCURRENCY: u16 = 4;

// === CopierSettings ===

/// What the cache and the copier need to know, taken from [`Config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopierSettings {
    /// Namespace of the source ConfigMap: the webhook's own.
    pub source_namespace: String,
    /// Name of the source and of every copy.
    pub config_map_name: String,
    /// Label selector of the namespaces that get a copy.
    pub namespace_selector: String,
    /// Namespaces never written to, even when labelled (the webhook's own
    /// exclusions: a copy there would be mounted by nobody).
    pub excluded_namespaces: Vec<String>,
    /// Field manager of the server-side applies.
    pub field_manager: String,
    /// Run the copier (else only the cache).
    pub copy: bool,
}

impl CopierSettings {
    /// The settings for `cfg`; `None` when the bootstrap fix is disabled or
    /// the webhook's own namespace is unknown (then nothing is watched).
    pub fn from_config(cfg: &Config) -> Option<Self> {
        if !cfg.bootstrap.enabled {
            return None;
        }
        let source_namespace = cfg.own_namespace()?.to_string();
        Some(Self {
            source_namespace,
            config_map_name: cfg.bootstrap.config_map_name.clone(),
            namespace_selector: cfg.namespaces.opt_in_selector(),
            excluded_namespaces: cfg.namespaces.excluded.clone(),
            field_manager: FIELD_MANAGER.into(),
            copy: cfg.bootstrap.reconcile,
        })
    }

    /// `<namespace>/<name>` of the source, as written in [`SOURCE_ANNOTATION`].
    pub fn source(&self) -> String {
        format!("{}/{}", self.source_namespace, self.config_map_name)
    }

    fn source_ref(&self) -> ObjectRef<ConfigMap> {
        ObjectRef::new(&self.config_map_name).within(&self.source_namespace)
    }

    fn is_source(&self, cm: &ConfigMap) -> bool {
        cm.metadata.namespace.as_deref() == Some(self.source_namespace.as_str())
            && cm.metadata.name.as_deref() == Some(self.config_map_name.as_str())
    }

    fn is_excluded(&self, namespace: &str) -> bool {
        self.excluded_namespaces.iter().any(|ns| ns == namespace)
    }
}

// === desired_copy ===

/// The copy of `source` that belongs in `namespace`: same name, same `data`
/// and `binaryData`, our managed-by label and the source annotation.
///
/// Nothing else is carried over: no `resourceVersion`, `uid` or
/// `managedFields` (server-owned), no ownerReferences (an owner in another
/// namespace is not allowed), no `immutable` (an immutable copy could never
/// follow a change of the source), and none of the source's own labels or
/// annotations.
pub fn desired_copy(source: &ConfigMap, namespace: &str, settings: &CopierSettings) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(settings.config_map_name.clone()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY_VALUE.to_string(),
            )])),
            annotations: Some(BTreeMap::from([(
                SOURCE_ANNOTATION.to_string(),
                settings.source(),
            )])),
            ..ObjectMeta::default()
        },
        data: source.data.clone(),
        binary_data: source.binary_data.clone(),
        immutable: None,
    }
}

/// True when `copy` already holds what [`desired_copy`] would apply, so the
/// apply can be skipped. Other managers' extra labels and annotations are
/// fine; a missing map and an empty one are the same.
fn is_up_to_date(copy: &ConfigMap, source: &ConfigMap, settings: &CopierSettings) -> bool {
    fn non_empty<V>(m: &Option<BTreeMap<String, V>>) -> Option<&BTreeMap<String, V>> {
        m.as_ref().filter(|m| !m.is_empty())
    }
    non_empty(&copy.data) == non_empty(&source.data)
        && non_empty(&copy.binary_data) == non_empty(&source.binary_data)
        && copy.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY_VALUE)
        && copy.annotations().get(SOURCE_ANNOTATION) == Some(&settings.source())
}

// === BootstrapCache ===

/// The core's answer type: Present, Missing (the watch has synced and the
/// ConfigMap is not there, though the source is), NotConfigured (neither is
/// there), Unknown (no cluster, or not synced yet).
pub use crate::mutate::Availability;

/// Which namespaces hold the bootstrap ConfigMap, answered from memory.
///
/// The admission path consults this and never calls the API server itself.
/// Cheap to clone.
#[derive(Clone)]
pub struct BootstrapCache {
    inner: Option<Arc<CacheInner>>,
}

struct CacheInner {
    store: Store<ConfigMap>,
    /// Set once the first list has been applied to `store`; stays set (the
    /// Store keeps its last state while a broken watch re-lists).
    synced: AtomicBool,
    config_map_name: String,
    /// Where the source lives: without it, a missing copy means the
    /// template fix is not set up ([`Availability::NotConfigured`]).
    source_namespace: String,
}

impl BootstrapCache {
    /// A cache for when there is no cluster: always [`Availability::Unknown`].
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Whether the ConfigMap exists in `namespace`. A hash lookup under a
    /// short read lock: never blocks on I/O, never async.
    pub fn availability(&self, namespace: &str) -> Availability {
        let Some(inner) = &self.inner else {
            return Availability::Unknown;
        };
        if !inner.synced.load(Ordering::Acquire) {
            return Availability::Unknown;
        }
        let key = |ns: &str| ObjectRef::new(&inner.config_map_name).within(ns);
        if inner.store.get(&key(namespace)).is_some() {
            Availability::Present
        } else if inner.store.get(&key(&inner.source_namespace)).is_none() {
            Availability::NotConfigured
        } else {
            Availability::Missing
        }
    }

    /// False for [`BootstrapCache::disabled`].
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// True once the watch has listed every ConfigMap of our name.
    pub fn is_synced(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|i| i.synced.load(Ordering::Acquire))
    }
}

impl fmt::Debug for BootstrapCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            None => f.write_str("BootstrapCache(disabled)"),
            Some(i) => f
                .debug_struct("BootstrapCache")
                .field("config_map_name", &i.config_map_name)
                .field("synced", &i.synced.load(Ordering::Relaxed))
                .field("copies", &i.store.len())
                .finish(),
        }
    }
}

// === CacheWatch: every replica ===

/// The watch that fills a [`BootstrapCache`] and tells the copier when a
/// full pass is due. Runs on every replica (the cache serves admission).
pub struct CacheWatch {
    api: Api<ConfigMap>,
    settings: Arc<CopierSettings>,
    writer: reflector::store::Writer<ConfigMap>,
    inner: Arc<CacheInner>,
    passes: Arc<Notify>,
}

/// What the copier needs from the cache side.
#[derive(Clone)]
pub struct CopySource {
    /// The source and the existing copies.
    pub store: Store<ConfigMap>,
    /// Woken when a full pass is due (source changed, a copy deleted or
    /// edited, the watch relisted). One stored permit: bursts collapse.
    pub passes: Arc<Notify>,
}

/// Builds the cache (unknown until the first list) and the watch that
/// fills it, over all namespaces of `client`.
pub fn cache(client: Client, settings: CopierSettings) -> (BootstrapCache, CacheWatch, CopySource) {
    let (store, writer) = reflector::store::<ConfigMap>();
    let inner = Arc::new(CacheInner {
        store: store.clone(),
        synced: AtomicBool::new(false),
        config_map_name: settings.config_map_name.clone(),
        source_namespace: settings.source_namespace.clone(),
    });
    let passes = Arc::new(Notify::new());
    let watch = CacheWatch {
        api: Api::all(client),
        settings: Arc::new(settings),
        writer,
        inner: inner.clone(),
        passes: passes.clone(),
    };
    (
        BootstrapCache { inner: Some(inner) },
        watch,
        CopySource { store, passes },
    )
}

impl CacheWatch {
    /// Watches until `shutdown`. A failing watch (apiserver down, RBAC
    /// missing) is retried with exponential backoff and logged; it never
    /// ends the task.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), TaskError> {
        let CacheWatch {
            api,
            settings,
            writer,
            inner,
            passes,
        } = self;
        let wc = watcher::Config::default()
            .fields(&format!("metadata.name={}", settings.config_map_name));
        let events = watcher(api, wc)
            .default_backoff()
            .modify(|cm| {
                // Never read; keeps the cache small.
                cm.managed_fields_mut().clear();
                cm.annotations_mut().remove(LAST_APPLIED_ANNOTATION);
            })
            .reflect(writer);
        let mut events = std::pin::pin!(events);
        loop {
            let event = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                event = events.next() => event,
            };
            match event {
                // A watcher stream never ends; stop if it somehow does.
                None => break,
                Some(Ok(event)) => {
                    if matches!(event, watcher::Event::InitDone)
                        && !inner.synced.swap(true, Ordering::AcqRel)
                    {
                        info!(
                            configmaps = inner.store.len(),
                            "bootstrap ConfigMap cache synced"
                        );
                    }
                    if settings.copy && wants_full_pass(&event, &inner.store, &settings) {
                        passes.notify_one();
                    }
                }
                Some(Err(error)) => {
                    warn!(%error, "bootstrap ConfigMap watch failed; retrying with backoff");
                }
            }
        }
        debug!("bootstrap ConfigMap watch stopped");
        Ok(())
    }
}

/// Whether a change seen by the cache watch calls for copying into every
/// opted-in namespace again: the source changed or vanished, a copy was
/// deleted or no longer matches the source, or the watch (re)listed (events
/// may have been missed). Our own applies echo back up to date and trigger
/// nothing.
fn wants_full_pass(
    event: &watcher::Event<ConfigMap>,
    store: &Store<ConfigMap>,
    settings: &CopierSettings,
) -> bool {
    match event {
        watcher::Event::Init | watcher::Event::InitApply(_) => false,
        watcher::Event::InitDone | watcher::Event::Delete(_) => true,
        watcher::Event::Apply(cm) if settings.is_source(cm) => true,
        watcher::Event::Apply(copy) => store
            .get(&settings.source_ref())
            .is_some_and(|source| !is_up_to_date(copy, &source, settings)),
    }
}

// === Errors ===

/// Why a namespace could not get its copy.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The server-side apply of the copy failed.
    #[error("cannot apply the bootstrap ConfigMap: {0}")]
    Apply(#[source] kube::Error),
    /// The source ConfigMap does not exist, so there is nothing to copy.
    #[error("the source ConfigMap does not exist")]
    SourceMissing,
    /// The object lacks a field every object has (e.g. `.metadata.name`).
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),
}

impl CopyError {
    /// Every `reason` label value, exported at 0 from the start.
    pub const REASONS: [&'static str; 3] = ["apply", "source-missing", "missing-object-key"];

    /// Bounded metric label for this error.
    fn reason(&self) -> &'static str {
        match self {
            CopyError::Apply(_) => Self::REASONS[0],
            CopyError::SourceMissing => Self::REASONS[1],
            CopyError::MissingObjectKey(_) => Self::REASONS[2],
        }
    }
}

// === Copier: leader only ===

/// What every copy shares.
struct Context {
    client: Client,
    settings: CopierSettings,
    /// The cache's Store: the source and the existing copies.
    cache: Store<ConfigMap>,
    metrics: ControllerCounters,
    /// Set while the source is missing, so that is logged once, not per
    /// namespace and retry.
    source_missing: AtomicBool,
}

/// Makes the copy in one opted-in namespace match the source.
///
/// When a namespace opts out (loses the label) its copy is deliberately left
/// in place: running pods mount it, and a pod whose ConfigMap volume is gone
/// fails to start again after a restart or reschedule. Delete it by hand once
/// no pod uses it.
async fn copy_one(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, CopyError> {
    let namespace = ns
        .metadata
        .name
        .as_deref()
        .ok_or(CopyError::MissingObjectKey(".metadata.name"))?;
    let settings = &ctx.settings;
    if namespace == settings.source_namespace {
        debug!(namespace, "the source namespace needs no copy");
        return Ok(Action::await_change());
    }
    if settings.is_excluded(namespace) {
        debug!(namespace, "excluded namespace: no copy");
        return Ok(Action::await_change());
    }
    if ns.metadata.deletion_timestamp.is_some() {
        // The apiserver refuses new objects in a terminating namespace.
        debug!(namespace, "namespace is terminating");
        return Ok(Action::await_change());
    }
    let Some(source) = ctx.cache.get(&settings.source_ref()) else {
        if !ctx.source_missing.swap(true, Ordering::Relaxed) {
            warn!(
                source = %settings.source(),
                "source ConfigMap not found; no copies are made until it exists"
            );
        }
        return Err(CopyError::SourceMissing);
    };
    if ctx.source_missing.swap(false, Ordering::Relaxed) {
        info!(source = %settings.source(), "source ConfigMap found");
    }
    let copy_ref = ObjectRef::new(&settings.config_map_name).within(namespace);
    if let Some(copy) = ctx.cache.get(&copy_ref)
        && is_up_to_date(&copy, &source, settings)
    {
        debug!(namespace, "copy is up to date");
        return Ok(Action::requeue(RESYNC));
    }
    let desired = desired_copy(&source, namespace, settings);
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    match api
        .patch(
            &settings.config_map_name,
            &PatchParams::apply(&settings.field_manager).force(),
            &Patch::Apply(&desired),
        )
        .await
    {
        Ok(_) => {}
        // Being deleted, though the namespace watch has not said so yet:
        // no copy is needed there, and no fault of ours.
        Err(e) if is_namespace_terminating(&e) => {
            debug!(namespace, "namespace is terminating");
            return Ok(Action::await_change());
        }
        Err(e) => return Err(CopyError::Apply(e)),
    }
    ctx.metrics.applied();
    info!(namespace, "bootstrap ConfigMap applied");
    Ok(Action::requeue(RESYNC))
}

/// Counts the error and retries later; a missing source was already logged
/// once by [`copy_one`].
fn on_error(ns: Arc<Namespace>, error: &CopyError, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error.reason());
    match error {
        CopyError::SourceMissing => Action::requeue(SOURCE_MISSING_REQUEUE),
        _ => {
            warn!(namespace = %ns.name_any(), %error, "cannot copy the bootstrap ConfigMap");
            Action::requeue(ERROR_REQUEUE)
        }
    }
}

/// The copier: a `Controller` over the opted-in Namespaces (`namespaces`:
/// a subscription to the shared Namespace watch, whose store is
/// `namespace_store`), woken for a full pass by the cache. Runs until
/// `shutdown`; starts once the cache has listed everything (a half-filled
/// cache would make the source or the copies look missing).
pub async fn run_copier(
    client: Client,
    settings: CopierSettings,
    source: CopySource,
    namespaces: ReflectHandle<Namespace>,
    namespace_store: Store<Namespace>,
    metrics: ControllerCounters,
    shutdown: CancellationToken,
) {
    // Keep reading the shared namespace watch while the cache fills: a
    // subscriber that stops reading stalls the watch for every writer that
    // shares it. Nothing read here is lost: the namespaces are in
    // `namespace_store`, and the cache's first sync wakes a full pass over
    // all of them.
    let mut namespaces = namespaces;
    let cache = source.store.clone();
    let ready = cache.wait_until_ready();
    tokio::pin!(ready);
    let mut watching = true;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            ready = &mut ready => {
                if ready.is_err() {
                    return;
                }
                break;
            }
            // An ended watch (the term is ending) answers None at once:
            // stop reading it rather than spin.
            next = namespaces.next(), if watching => watching = next.is_some(),
        }
    }
    let ctx = Arc::new(Context {
        client,
        settings,
        cache: source.store,
        metrics,
        source_missing: AtomicBool::new(false),
    });
    let passes = stream::unfold(source.passes, |passes| async move {
        passes.notified().await;
        Some(((), passes))
    });
    info!(selector = %ctx.settings.namespace_selector, "bootstrap copier started");
    Controller::for_shared_stream(namespaces, namespace_store)
        .with_config(controller::Config::default().concurrency(CONCURRENCY))
        .reconcile_all_on(passes)
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(copy_one, on_error, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(namespace = %obj.name, "copied"),
                // Counted and logged by on_error.
                Err(controller::Error::ReconcilerFailed(..)) => {}
                Err(controller::Error::ObjectNotFound(obj)) => {
                    debug!(namespace = %obj.name, "namespace gone before its copy");
                }
                Err(error) => warn!(%error, "bootstrap copier failed; retrying"),
            }
        })
        .await;
    info!("bootstrap copier stopped");
}

#[cfg(test)]
mod tests;
