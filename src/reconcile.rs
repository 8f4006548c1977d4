//! Keeps the bootstrap ConfigMap where sidecars mount it, and tells the
//! admission path where it is.
//!
//! The patched Envoy bootstrap template lives in one ConfigMap (the *source*)
//! in the webhook's own namespace. A ConfigMap volume is namespace-local, and
//! a pod whose ConfigMap is missing never starts, so:
//!
//! - a reconciler ([`Controller`] over Namespaces labelled
//!   `canary-injection=enabled`) keeps a copy of the source in every
//!   opted-in namespace, by server-side apply with a field manager of our own
//!   ([`desired_copy`] says what a copy holds);
//! - a cache ([`BootstrapCache`]), fed by one watch over the ConfigMaps of
//!   that name in all namespaces (a field selector, so the rest of the
//!   cluster's ConfigMaps are never held in memory), answers "does the copy
//!   exist in this namespace?" for the admission path without any I/O.
//!
//! ```text
//!  watch ConfigMaps (metadata.name=<name>, all namespaces)
//!        |  reflector
//!        v
//!  Store<ConfigMap> ----> BootstrapCache::availability(ns)     (admission path)
//!        |  source changed / copy deleted or edited / relisted
//!        v
//!  Notify --reconcile_all_on--> Controller<Namespace> (label selector)
//!                                   | reconcile(ns): source from the Store,
//!                                   v skip if the copy is up to date
//!                               PATCH (server-side apply) <ns>/<name>
//! ```
//!
//! The reconciler reads the source from the same Store the watch fills, and
//! is only woken after the Store has been updated, so it never applies a
//! stale source. It starts once the first list has completed.

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
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use kube::{Client, ResourceExt};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::Config;

/// Label selector of the namespaces that get a copy (the same label the
/// webhook configuration's `namespaceSelector` uses).
pub const DEFAULT_NAMESPACE_SELECTOR: &str = "canary-injection=enabled";

/// Field manager of our server-side applies.
pub const FIELD_MANAGER: &str = "canary-injector";

/// Label set on every copy.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Value of [`MANAGED_BY_LABEL`] on every copy.
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
/// triggers a reconcile at once).
const SOURCE_MISSING_REQUEUE: Duration = Duration::from_secs(60);

/// At most this many applies in flight, to be gentle with the apiserver when
/// hundreds of namespaces need a copy at once.
const CONCURRENCY: u16 = 4;

// === Settings ===

/// What the reconciler and the cache need to know, taken from [`Config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Namespace of the source ConfigMap: the webhook's own.
    pub source_namespace: String,
    /// Name of the source and of every copy.
    pub config_map_name: String,
    /// Label selector of the namespaces that get a copy.
    pub namespace_selector: String,
    /// Field manager of the server-side applies.
    pub field_manager: String,
    /// Run the reconciler (else only the cache).
    pub reconcile: bool,
}

impl Settings {
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
            namespace_selector: DEFAULT_NAMESPACE_SELECTOR.into(),
            field_manager: FIELD_MANAGER.into(),
            reconcile: cfg.bootstrap.reconcile,
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
pub fn desired_copy(source: &ConfigMap, namespace: &str, settings: &Settings) -> ConfigMap {
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
fn is_up_to_date(copy: &ConfigMap, source: &ConfigMap, settings: &Settings) -> bool {
    fn non_empty<V>(m: &Option<BTreeMap<String, V>>) -> Option<&BTreeMap<String, V>> {
        m.as_ref().filter(|m| !m.is_empty())
    }
    non_empty(&copy.data) == non_empty(&source.data)
        && non_empty(&copy.binary_data) == non_empty(&source.binary_data)
        && copy.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY_VALUE)
        && copy.annotations().get(SOURCE_ANNOTATION) == Some(&settings.source())
}

// === BootstrapCache ===

/// Whether the bootstrap ConfigMap is known to exist in a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// The ConfigMap exists there: mounting it is safe.
    Present,
    /// The watch has synced and the ConfigMap is not there.
    Missing,
    /// Nothing is known: no cluster, or the watch has not synced yet.
    Unknown,
}

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
        let key = ObjectRef::new(&inner.config_map_name).within(namespace);
        if inner.store.get(&key).is_some() {
            Availability::Present
        } else {
            Availability::Missing
        }
    }

    /// True once the watch has listed every ConfigMap of our name.
    pub fn is_synced(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|i| i.synced.load(Ordering::Acquire))
    }

    /// A synced cache in which the ConfigMap `config_map_name` exists in
    /// exactly `namespaces`. For tests of the code that consults the cache.
    pub fn from_namespaces(config_map_name: &str, namespaces: &[&str]) -> Self {
        let mut writer = reflector::store::Writer::<ConfigMap>::default();
        writer.apply_watcher_event(&watcher::Event::Init);
        for ns in namespaces {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(config_map_name.to_string()),
                    namespace: Some((*ns).to_string()),
                    ..ObjectMeta::default()
                },
                ..ConfigMap::default()
            };
            writer.apply_watcher_event(&watcher::Event::InitApply(cm));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        Self {
            inner: Some(Arc::new(CacheInner {
                store: writer.as_reader(),
                synced: AtomicBool::new(true),
                config_map_name: config_map_name.to_string(),
            })),
        }
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

// === Metrics ===

/// Reconciler metrics. Cheap to clone.
#[derive(Clone)]
pub struct ReconcileMetrics {
    errors: IntCounterVec,
    applies: IntCounter,
}

impl ReconcileMetrics {
    /// Creates the metrics and registers them on `registry` (whose prefix,
    /// if any, is prepended: `canary_injector_reconcile_errors_total`).
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let errors = IntCounterVec::new(
            Opts::new(
                "reconcile_errors_total",
                "Failed reconciles of the bootstrap ConfigMap copies, by reason \
                 (source_missing, apply, missing_object_key).",
            ),
            &["reason"],
        )?;
        let applies = IntCounter::new(
            "reconcile_applies_total",
            "Server-side applies of a bootstrap ConfigMap copy that succeeded.",
        )?;
        // Export every reason from the start, so rate() works on the first error.
        for reason in Error::REASONS {
            errors.with_label_values(&[reason]);
        }
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(applies.clone()))?;
        Ok(Self { errors, applies })
    }

    fn error(&self, reason: &'static str) {
        self.errors.with_label_values(&[reason]).inc();
    }
}

// === Errors ===

/// Why a namespace could not be reconciled.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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

impl Error {
    const REASONS: [&'static str; 3] = ["apply", "source_missing", "missing_object_key"];

    /// Bounded metric label for this error.
    fn reason(&self) -> &'static str {
        match self {
            Error::Apply(_) => Self::REASONS[0],
            Error::SourceMissing => Self::REASONS[1],
            Error::MissingObjectKey(_) => Self::REASONS[2],
        }
    }
}

// === Reconciler ===

/// What every reconcile shares.
struct Context {
    client: Client,
    settings: Settings,
    /// The cache's Store: the source and the existing copies.
    cache: Store<ConfigMap>,
    metrics: ReconcileMetrics,
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
async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = ns
        .metadata
        .name
        .as_deref()
        .ok_or(Error::MissingObjectKey(".metadata.name"))?;
    let settings = &ctx.settings;
    if namespace == settings.source_namespace {
        debug!(namespace, "the source namespace needs no copy");
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
        return Err(Error::SourceMissing);
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
    api.patch(
        &settings.config_map_name,
        &PatchParams::apply(&settings.field_manager).force(),
        &Patch::Apply(&desired),
    )
    .await
    .map_err(Error::Apply)?;
    ctx.metrics.applies.inc();
    info!(namespace, "bootstrap ConfigMap applied");
    Ok(Action::requeue(RESYNC))
}

/// Counts the error and retries later; a missing source was already logged
/// once by [`reconcile`].
fn error_policy(ns: Arc<Namespace>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error.reason());
    match error {
        Error::SourceMissing => Action::requeue(SOURCE_MISSING_REQUEUE),
        _ => {
            warn!(namespace = %ns.name_any(), %error, "cannot reconcile the bootstrap ConfigMap");
            Action::requeue(ERROR_REQUEUE)
        }
    }
}

/// Whether a change seen by the cache watch calls for reconciling every
/// opted-in namespace: the source changed or vanished, a copy was deleted or
/// no longer matches the source, or the watch (re)listed (events may have
/// been missed). Our own applies echo back up to date and trigger nothing.
fn wants_full_reconcile(
    event: &watcher::Event<ConfigMap>,
    store: &Store<ConfigMap>,
    settings: &Settings,
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

// === Entry point ===

/// Starts the cache watch (always) and the reconciler (when
/// `settings.reconcile`). Returns the cache at once, [`Availability::Unknown`]
/// until the first list completes, and the task that runs both until
/// `shutdown` is cancelled.
///
/// A failing watch (apiserver down, RBAC missing) is retried with
/// exponential backoff and logged; it never ends the task.
pub fn start(
    client: Client,
    settings: Settings,
    metrics: ReconcileMetrics,
    shutdown: CancellationToken,
) -> (BootstrapCache, tokio::task::JoinHandle<()>) {
    let (store, writer) = reflector::store::<ConfigMap>();
    let inner = Arc::new(CacheInner {
        store: store.clone(),
        synced: AtomicBool::new(false),
        config_map_name: settings.config_map_name.clone(),
    });
    let cache = BootstrapCache {
        inner: Some(inner.clone()),
    };
    let trigger = Arc::new(Notify::new());
    let settings = Arc::new(settings);
    let watch = watch_configmaps(
        Api::all(client.clone()),
        settings.clone(),
        writer,
        inner,
        trigger.clone(),
        shutdown.clone(),
    );
    let task = async move {
        if settings.reconcile {
            let ctx = Arc::new(Context {
                client,
                settings: Settings::clone(&settings),
                cache: store,
                metrics,
                source_missing: AtomicBool::new(false),
            });
            tokio::join!(watch, run_reconciler(ctx, trigger, shutdown));
        } else {
            watch.await;
        }
    };
    let handle = tokio::spawn(task.instrument(info_span!("bootstrap")));
    (cache, handle)
}

/// Feeds the cache from one watch and wakes the reconciler on relevant
/// changes. Runs until `shutdown`.
async fn watch_configmaps(
    api: Api<ConfigMap>,
    settings: Arc<Settings>,
    writer: reflector::store::Writer<ConfigMap>,
    inner: Arc<CacheInner>,
    trigger: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let wc =
        watcher::Config::default().fields(&format!("metadata.name={}", settings.config_map_name));
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
                if settings.reconcile && wants_full_reconcile(&event, &inner.store, &settings) {
                    // One stored permit: bursts collapse into one pass.
                    trigger.notify_one();
                }
            }
            Some(Err(error)) => {
                warn!(%error, "bootstrap ConfigMap watch failed; retrying with backoff");
            }
        }
    }
    debug!("bootstrap ConfigMap watch stopped");
}

/// Runs the Namespace controller once the cache has listed everything (a
/// half-filled cache would make the source or the copies look missing).
async fn run_reconciler(ctx: Arc<Context>, trigger: Arc<Notify>, shutdown: CancellationToken) {
    tokio::select! {
        biased;
        () = shutdown.cancelled() => return,
        ready = ctx.cache.wait_until_ready() => if ready.is_err() { return },
    }
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let wc = watcher::Config::default().labels(&ctx.settings.namespace_selector);
    let triggers = stream::unfold(trigger, |trigger| async move {
        trigger.notified().await;
        Some(((), trigger))
    });
    info!(selector = %ctx.settings.namespace_selector, "bootstrap reconciler started");
    Controller::new(namespaces, wc)
        .with_config(controller::Config::default().concurrency(CONCURRENCY))
        .reconcile_all_on(triggers)
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(namespace = %obj.name, "reconciled"),
                // Counted and logged by error_policy.
                Err(controller::Error::ReconcilerFailed(..)) => {}
                Err(controller::Error::ObjectNotFound(obj)) => {
                    debug!(namespace = %obj.name, "namespace gone before its reconcile");
                }
                Err(error) => warn!(%error, "namespace watch failed; retrying with backoff"),
            }
        })
        .await;
    info!("bootstrap reconciler stopped");
}
