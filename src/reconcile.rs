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
            namespace_selector: cfg.namespaces.opt_in_selector(),
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

/// The core's answer type: Present, Missing (the watch has synced and the
/// ConfigMap is not there), Unknown (no cluster, or not synced yet).
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

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::BTreeSet;

    use http::{Method, Request, Response, header};
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
        ManagedFieldsEntry, OwnerReference, Time,
    };
    use kube::client::Body;
    use serde_json::{Value, json};
    use tokio::sync::mpsc;
    use tokio::time::timeout;

    const SOURCE_NS: &str = "canary-injector";
    const NAME: &str = "canary-injector-bootstrap";
    const TEMPLATE_KEY: &str = "envoy_bootstrap_tmpl.json";
    const TEMPLATE: &str = r#"{"static_resources": {"clusters": [{"name": "xds-grpc"}]}}"#;
    /// Long enough for a slow CI machine, short enough to fail fast.
    const WAIT: Duration = Duration::from_secs(5);

    // === fixtures ===

    fn settings() -> Settings {
        Settings {
            source_namespace: SOURCE_NS.into(),
            config_map_name: NAME.into(),
            namespace_selector: DEFAULT_NAMESPACE_SELECTOR.into(),
            field_manager: FIELD_MANAGER.into(),
            reconcile: true,
        }
    }

    /// A source shaped like a real object: server fields, an owner, a
    /// client-side-apply annotation, immutable.
    fn source() -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(NAME.into()),
                namespace: Some(SOURCE_NS.into()),
                resource_version: Some("4711".into()),
                uid: Some("5f0c7d4e-1111-4222-8333-944445555666".into()),
                labels: Some(BTreeMap::from([("app".into(), "canary-injector".into())])),
                annotations: Some(BTreeMap::from([(
                    LAST_APPLIED_ANNOTATION.into(),
                    "{...}".into(),
                )])),
                managed_fields: Some(vec![ManagedFieldsEntry {
                    manager: Some("kubectl".into()),
                    operation: Some("Update".into()),
                    ..ManagedFieldsEntry::default()
                }]),
                owner_references: Some(vec![OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "Deployment".into(),
                    name: "canary-injector".into(),
                    uid: "0a0b0c0d-1111-4222-8333-944445555666".into(),
                    ..OwnerReference::default()
                }]),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(TEMPLATE_KEY.into(), TEMPLATE.into())])),
            binary_data: Some(BTreeMap::from([(
                "extra.bin".into(),
                ByteString(vec![0, 159, 255]),
            )])),
            immutable: Some(true),
        }
    }

    fn namespace(name: &str) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([(
                    "canary-injection".into(),
                    "enabled".into(),
                )])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }
    }

    /// A Store that has listed exactly `objects`.
    fn store_with(objects: Vec<ConfigMap>) -> Store<ConfigMap> {
        let mut writer = reflector::store::Writer::<ConfigMap>::default();
        writer.apply_watcher_event(&watcher::Event::Init);
        for cm in objects {
            writer.apply_watcher_event(&watcher::Event::InitApply(cm));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        writer.as_reader()
    }

    fn metrics() -> ReconcileMetrics {
        ReconcileMetrics::register(&Registry::new()).unwrap()
    }

    fn context(client: Client, cache: Store<ConfigMap>, metrics: ReconcileMetrics) -> Arc<Context> {
        Arc::new(Context {
            client,
            settings: settings(),
            cache,
            metrics,
            source_missing: AtomicBool::new(false),
        })
    }

    fn errors(m: &ReconcileMetrics, reason: &str) -> u64 {
        m.errors.with_label_values(&[reason]).get()
    }

    fn query(req: &Request<Body>) -> BTreeMap<String, String> {
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect()
    }

    fn json_response(value: &Value) -> Response<Body> {
        Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(value).unwrap()))
            .unwrap()
    }

    // === mock apiserver (kube-rs tower-test pattern) ===

    type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn mock_client() -> (Client, ApiServerVerifier) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (Client::new(service, "default"), ApiServerVerifier(handle))
    }

    struct ApiServerVerifier(ApiServerHandle);

    enum Scenario {
        /// One server-side apply of the copy into the namespace, then nothing.
        ApplyCopy(&'static str),
        /// No call at all.
        NoCalls,
    }

    impl ApiServerVerifier {
        /// Runs one scenario; then requires that no further call comes
        /// before every client is dropped.
        fn run(self, scenario: Scenario) -> tokio::task::JoinHandle<()> {
            tokio::spawn(async move {
                let this = match scenario {
                    Scenario::ApplyCopy(ns) => self.handle_apply(ns).await,
                    Scenario::NoCalls => self,
                };
                this.handle_no_more_calls().await;
            })
        }

        async fn handle_apply(mut self, ns: &str) -> Self {
            let (request, send) = self.0.next_request().await.expect("apply was not sent");
            assert_eq!(request.method(), Method::PATCH);
            assert_eq!(
                request.uri().path(),
                format!("/api/v1/namespaces/{ns}/configmaps/{NAME}")
            );
            let q = query(&request);
            assert_eq!(
                q.get("fieldManager").map(String::as_str),
                Some(FIELD_MANAGER)
            );
            assert_eq!(q.get("force").map(String::as_str), Some("true"));
            assert_eq!(
                request.headers()[header::CONTENT_TYPE],
                "application/apply-patch+yaml"
            );
            let body = request.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                body,
                json!({
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {
                        "name": NAME,
                        "namespace": ns,
                        "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE},
                        "annotations": {SOURCE_ANNOTATION: format!("{SOURCE_NS}/{NAME}")},
                    },
                    "data": {TEMPLATE_KEY: TEMPLATE},
                    "binaryData": {"extra.bin": "AJ//"},
                })
            );
            let mut applied = body;
            applied["metadata"]["resourceVersion"] = json!("1");
            send.send_response(json_response(&applied));
            self
        }

        async fn handle_no_more_calls(mut self) {
            if let Some((request, _)) = self.0.next_request().await {
                panic!("unexpected call: {} {}", request.method(), request.uri());
            }
        }
    }

    /// Awaits the verifier: a missing call times out, a failed assertion
    /// panics here.
    async fn verified(verifier: tokio::task::JoinHandle<()>) {
        timeout(WAIT, verifier)
            .await
            .expect("timeout on mock apiserver")
            .expect("scenario succeeded");
    }

    // === desired_copy ===

    #[test]
    fn desired_copy_copies_data_and_sets_our_metadata_only() {
        let copy = desired_copy(&source(), "shop", &settings());
        assert_eq!(copy.data, source().data);
        assert_eq!(copy.binary_data, source().binary_data);
        let meta = &copy.metadata;
        assert_eq!(meta.name.as_deref(), Some(NAME));
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        assert_eq!(
            meta.labels,
            Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY_VALUE.to_string()
            )]))
        );
        assert_eq!(
            meta.annotations,
            Some(BTreeMap::from([(
                SOURCE_ANNOTATION.to_string(),
                "canary-injector/canary-injector-bootstrap".to_string()
            )]))
        );
        assert_eq!(meta.resource_version, None);
        assert_eq!(meta.uid, None);
        assert_eq!(meta.managed_fields, None);
        assert_eq!(meta.owner_references, None);
        assert_eq!(copy.immutable, None);
    }

    #[test]
    fn desired_copy_of_a_source_without_binary_data_omits_it() {
        let mut src = source();
        src.binary_data = None;
        let copy = serde_json::to_value(desired_copy(&src, "shop", &settings())).unwrap();
        assert!(copy.get("binaryData").is_none(), "{copy}");
        assert_eq!(copy["data"][TEMPLATE_KEY], TEMPLATE);
    }

    #[test]
    fn a_fresh_copy_is_up_to_date_and_an_edited_one_is_not() {
        let s = settings();
        let copy = desired_copy(&source(), "shop", &s);
        assert!(is_up_to_date(&copy, &source(), &s));
        let mut other_labels = copy.clone();
        other_labels
            .labels_mut()
            .insert("team".into(), "payments".into());
        assert!(is_up_to_date(&other_labels, &source(), &s));
        let mut edited = copy.clone();
        edited.data = Some(BTreeMap::from([(TEMPLATE_KEY.into(), "{}".into())]));
        assert!(!is_up_to_date(&edited, &source(), &s));
        let mut unlabelled = copy.clone();
        unlabelled.labels_mut().clear();
        assert!(!is_up_to_date(&unlabelled, &source(), &s));
        let mut no_binary = source();
        no_binary.binary_data = Some(BTreeMap::new());
        let copy = desired_copy(&no_binary, "shop", &s);
        assert!(is_up_to_date(
            &ConfigMap {
                binary_data: None,
                ..copy
            },
            &no_binary,
            &s
        ));
    }

    // === reconcile ===

    #[tokio::test]
    async fn opted_in_namespace_gets_the_copy_by_server_side_apply() {
        let (client, server) = mock_client();
        let verifier = server.run(Scenario::ApplyCopy("shop"));
        let m = metrics();
        let ctx = context(client, store_with(vec![source()]), m.clone());
        let action = timeout(WAIT, reconcile(Arc::new(namespace("shop")), ctx))
            .await
            .expect("reconcile finished")
            .expect("reconcile succeeded");
        assert_eq!(action, Action::requeue(RESYNC));
        assert_eq!(m.applies.get(), 1);
        verified(verifier).await;
    }

    #[tokio::test]
    async fn up_to_date_copy_is_not_applied_again() {
        let (client, server) = mock_client();
        let verifier = server.run(Scenario::NoCalls);
        let m = metrics();
        let copy = desired_copy(&source(), "shop", &settings());
        let ctx = context(client, store_with(vec![source(), copy]), m.clone());
        let action = reconcile(Arc::new(namespace("shop")), ctx).await.unwrap();
        assert_eq!(action, Action::requeue(RESYNC));
        assert_eq!(m.applies.get(), 0);
        verified(verifier).await;
    }

    #[tokio::test]
    async fn edited_copy_is_applied_again() {
        let (client, server) = mock_client();
        let verifier = server.run(Scenario::ApplyCopy("shop"));
        let mut copy = desired_copy(&source(), "shop", &settings());
        copy.data = Some(BTreeMap::from([(TEMPLATE_KEY.into(), "{}".into())]));
        let ctx = context(client, store_with(vec![source(), copy]), metrics());
        reconcile(Arc::new(namespace("shop")), ctx).await.unwrap();
        verified(verifier).await;
    }

    #[tokio::test]
    async fn missing_source_applies_nothing_counts_and_requeues() {
        let (client, server) = mock_client();
        let verifier = server.run(Scenario::NoCalls);
        let m = metrics();
        let ctx = context(client, store_with(vec![]), m.clone());
        for ns in ["shop", "payments"] {
            let ns = Arc::new(namespace(ns));
            let err = reconcile(ns.clone(), ctx.clone()).await.unwrap_err();
            assert!(matches!(err, Error::SourceMissing), "{err}");
            let action = error_policy(ns, &err, ctx.clone());
            assert_eq!(action, Action::requeue(SOURCE_MISSING_REQUEUE));
        }
        assert_eq!(errors(&m, "source_missing"), 2);
        assert_eq!(m.applies.get(), 0);
        assert!(ctx.source_missing.load(Ordering::Relaxed));
        drop(ctx);
        verified(verifier).await;
    }

    #[tokio::test]
    async fn source_namespace_is_skipped() {
        let (client, server) = mock_client();
        let verifier = server.run(Scenario::NoCalls);
        let m = metrics();
        let ctx = context(client, store_with(vec![source()]), m.clone());
        let action = reconcile(Arc::new(namespace(SOURCE_NS)), ctx)
            .await
            .unwrap();
        assert_eq!(action, Action::await_change());
        assert_eq!(m.applies.get(), 0);
        verified(verifier).await;
    }

    #[tokio::test]
    async fn terminating_namespace_is_skipped() {
        let (client, server) = mock_client();
        let verifier = server.run(Scenario::NoCalls);
        let mut ns = namespace("leaving");
        ns.metadata.deletion_timestamp = Some(Time(Default::default()));
        let ctx = context(client, store_with(vec![source()]), metrics());
        let action = reconcile(Arc::new(ns), ctx).await.unwrap();
        assert_eq!(action, Action::await_change());
        verified(verifier).await;
    }

    #[tokio::test]
    async fn failed_apply_is_an_error_that_is_counted_and_retried() {
        let (client, mut server) = mock_client();
        let verifier = tokio::spawn(async move {
            let (_, send) = server.0.next_request().await.expect("apply was not sent");
            let status = json!({
                "apiVersion": "v1", "kind": "Status", "status": "Failure",
                "message": "configmaps is forbidden", "reason": "Forbidden", "code": 403,
            });
            let mut resp = json_response(&status);
            *resp.status_mut() = http::StatusCode::FORBIDDEN;
            send.send_response(resp);
        });
        let m = metrics();
        let ctx = context(client, store_with(vec![source()]), m.clone());
        let ns = Arc::new(namespace("shop"));
        let err = reconcile(ns.clone(), ctx.clone()).await.unwrap_err();
        assert!(matches!(err, Error::Apply(_)), "{err}");
        assert_eq!(error_policy(ns, &err, ctx), Action::requeue(ERROR_REQUEUE));
        assert_eq!(errors(&m, "apply"), 1);
        assert_eq!(m.applies.get(), 0);
        verified(verifier).await;
    }

    #[tokio::test]
    async fn namespace_without_a_name_is_an_error() {
        let (client, _server) = mock_client();
        let ctx = context(client, store_with(vec![source()]), metrics());
        let err = reconcile(Arc::new(Namespace::default()), ctx)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::MissingObjectKey(".metadata.name")));
    }

    // === triggers ===

    #[test]
    fn full_reconcile_follows_the_source_and_damaged_copies_only() {
        let s = settings();
        let good = desired_copy(&source(), "shop", &s);
        let mut edited = good.clone();
        edited.data = None;
        let store = store_with(vec![source(), good.clone()]);
        let wants = |e: watcher::Event<ConfigMap>| wants_full_reconcile(&e, &store, &s);
        assert!(wants(watcher::Event::Apply(source())));
        assert!(wants(watcher::Event::Delete(source())));
        assert!(wants(watcher::Event::Delete(good.clone())));
        assert!(wants(watcher::Event::Apply(edited.clone())));
        assert!(wants(watcher::Event::InitDone));
        assert!(
            !wants(watcher::Event::Apply(good.clone())),
            "our own apply echoing back"
        );
        assert!(!wants(watcher::Event::Init));
        assert!(!wants(watcher::Event::InitApply(edited.clone())));
        // Without a source there is nothing to repair a copy from.
        let empty = store_with(vec![]);
        assert!(!wants_full_reconcile(
            &watcher::Event::Apply(edited),
            &empty,
            &s
        ));
    }

    // === cache ===

    #[test]
    fn cache_answers_present_and_missing_per_namespace() {
        let cache = BootstrapCache::from_namespaces(NAME, &["shop", "payments"]);
        assert!(cache.is_synced());
        assert_eq!(cache.availability("shop"), Availability::Present);
        assert_eq!(cache.availability("payments"), Availability::Present);
        assert_eq!(cache.availability("billing"), Availability::Missing);
        assert_eq!(cache.availability(""), Availability::Missing);
    }

    #[test]
    fn disabled_cache_knows_nothing() {
        let cache = BootstrapCache::disabled();
        assert!(!cache.is_synced());
        assert_eq!(cache.availability("shop"), Availability::Unknown);
        assert_eq!(format!("{cache:?}"), "BootstrapCache(disabled)");
    }

    #[test]
    fn cache_is_unknown_until_synced() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let cache = BootstrapCache {
            inner: Some(Arc::new(CacheInner {
                store,
                synced: AtomicBool::new(false),
                config_map_name: NAME.into(),
            })),
        };
        writer.apply_watcher_event(&watcher::Event::Apply(desired_copy(
            &source(),
            "shop",
            &settings(),
        )));
        assert_eq!(cache.availability("shop"), Availability::Unknown);
        cache
            .inner
            .as_ref()
            .unwrap()
            .synced
            .store(true, Ordering::Release);
        assert_eq!(cache.availability("shop"), Availability::Present);
    }

    #[test]
    fn cache_ignores_configmaps_of_other_names() {
        let cache = BootstrapCache::from_namespaces("other-name", &["shop"]);
        let mine = BootstrapCache::from_namespaces(NAME, &[]);
        assert_eq!(cache.availability("shop"), Availability::Present);
        assert_eq!(mine.availability("shop"), Availability::Missing);
    }

    // === settings and metrics ===

    #[test]
    fn settings_need_bootstrap_enabled_and_an_own_namespace() {
        let mut cfg = Config::default();
        assert_eq!(Settings::from_config(&cfg), None);
        cfg.namespaces.own = Some(SOURCE_NS.into());
        assert_eq!(Settings::from_config(&cfg), Some(settings()));
        cfg.bootstrap.reconcile = false;
        assert!(!Settings::from_config(&cfg).unwrap().reconcile);
        cfg.bootstrap.enabled = false;
        assert_eq!(Settings::from_config(&cfg), None);
    }

    #[test]
    fn metrics_are_prefixed_and_every_reason_is_exported() {
        let registry = crate::metrics::new_registry();
        let m = ReconcileMetrics::register(&registry).unwrap();
        m.applies.inc();
        m.error("apply");
        let text = String::from_utf8(crate::metrics::encode(&registry)).unwrap();
        assert!(
            text.contains("canary_injector_reconcile_applies_total 1"),
            "{text}"
        );
        assert!(text.contains(r#"canary_injector_reconcile_errors_total{reason="apply"} 1"#));
        assert!(
            text.contains(r#"canary_injector_reconcile_errors_total{reason="source_missing"} 0"#)
        );
        assert!(ReconcileMetrics::register(&registry).is_err());
    }

    // === start: watches, controller, triggers and shutdown together ===

    fn labelled_namespace_json(name: &str) -> Value {
        serde_json::to_value(namespace(name)).unwrap()
    }

    /// Answers the lists, parks the watches, releases one DELETED event for
    /// the copy in `shop` on `release`, and reports each applied namespace.
    async fn fake_apiserver(
        mut handle: ApiServerHandle,
        applied: mpsc::UnboundedSender<String>,
        release: tokio::sync::oneshot::Receiver<()>,
    ) {
        let shop_copy = {
            let mut cm = desired_copy(&source(), "shop", &settings());
            cm.metadata.resource_version = Some("101".into());
            serde_json::to_value(cm).unwrap()
        };
        let mut release = Some(release);
        let mut parked = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let path = request.uri().path().to_string();
            let q = query(&request);
            let watching = q.get("watch").map(String::as_str) == Some("true");
            match (request.method().clone(), path.as_str()) {
                (Method::GET, "/api/v1/configmaps") => {
                    assert_eq!(
                        q.get("fieldSelector").map(String::as_str),
                        Some("metadata.name=canary-injector-bootstrap")
                    );
                    assert!(!q.contains_key("labelSelector"));
                    if !watching {
                        let mut up_to_date = shop_copy.clone();
                        up_to_date["metadata"]["resourceVersion"] = json!("100");
                        send.send_response(json_response(&json!({
                            "apiVersion": "v1", "kind": "ConfigMapList",
                            "metadata": {"resourceVersion": "100"},
                            "items": [serde_json::to_value(source()).unwrap(), up_to_date],
                        })));
                    } else if let Some(release) = release.take() {
                        let event = json!({"type": "DELETED", "object": shop_copy.clone()});
                        tokio::spawn(async move {
                            if release.await.is_ok() {
                                let mut line = serde_json::to_vec(&event).unwrap();
                                line.push(b'\n');
                                send.send_response(Response::new(Body::from(line)));
                            }
                        });
                    } else {
                        parked.push(send);
                    }
                }
                (Method::GET, "/api/v1/namespaces") => {
                    assert_eq!(
                        q.get("labelSelector").map(String::as_str),
                        Some(DEFAULT_NAMESPACE_SELECTOR)
                    );
                    if watching {
                        parked.push(send);
                    } else {
                        send.send_response(json_response(&json!({
                            "apiVersion": "v1", "kind": "NamespaceList",
                            "metadata": {"resourceVersion": "200"},
                            "items": [
                                labelled_namespace_json("shop"),
                                labelled_namespace_json("fresh"),
                                labelled_namespace_json(SOURCE_NS),
                            ],
                        })));
                    }
                }
                (Method::PATCH, p) => {
                    let ns = p
                        .strip_prefix("/api/v1/namespaces/")
                        .and_then(|rest| rest.strip_suffix(&format!("/configmaps/{NAME}")))
                        .unwrap_or_else(|| panic!("unexpected PATCH {p}"))
                        .to_string();
                    assert_eq!(
                        q.get("fieldManager").map(String::as_str),
                        Some(FIELD_MANAGER)
                    );
                    let body = request.into_body().collect_bytes().await.unwrap();
                    let mut body: Value = serde_json::from_slice(&body).unwrap();
                    body["metadata"]["resourceVersion"] = json!("300");
                    send.send_response(json_response(&body));
                    applied.send(ns).unwrap();
                }
                (method, _) => panic!("unexpected call: {method} {}", request.uri()),
            }
        }
    }

    async fn poll_until(what: &str, mut condition: impl FnMut() -> bool) {
        timeout(WAIT, async {
            while !condition() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    #[tokio::test]
    async fn start_syncs_the_cache_copies_where_missing_and_repairs_deleted_copies() {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let (applied_tx, mut applied) = mpsc::unbounded_channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(fake_apiserver(handle, applied_tx, release_rx));
        let m = metrics();
        let shutdown = CancellationToken::new();

        let (cache, task) = start(client, settings(), m.clone(), shutdown.clone());
        // Nothing has run yet on this single-threaded runtime.
        assert_eq!(cache.availability("shop"), Availability::Unknown);

        // "fresh" has no copy: applied. "shop" is up to date and the source
        // namespace is skipped: never applied before the release below.
        let first = timeout(WAIT, applied.recv()).await.unwrap().unwrap();
        assert_eq!(first, "fresh");
        assert!(cache.is_synced());
        assert_eq!(cache.availability("shop"), Availability::Present);
        assert_eq!(cache.availability(SOURCE_NS), Availability::Present);
        assert_eq!(cache.availability("fresh"), Availability::Missing);
        assert_eq!(cache.availability("elsewhere"), Availability::Missing);

        // Someone deletes the copy in "shop": the watch sees it, the
        // reconciler puts it back.
        release_tx.send(()).unwrap();
        let mut seen = BTreeSet::from([first]);
        while !seen.contains("shop") {
            let ns = timeout(WAIT, applied.recv()).await.unwrap().unwrap();
            seen.insert(ns);
        }
        assert_eq!(cache.availability("shop"), Availability::Missing);
        assert!(!seen.contains(SOURCE_NS), "{seen:?}");
        poll_until("the applies to be counted", || m.applies.get() >= 2).await;

        shutdown.cancel();
        timeout(WAIT, task)
            .await
            .expect("stopped on shutdown")
            .expect("task did not panic");
        server.abort();
        if let Err(e) = server.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
        assert_eq!(errors(&m, "apply"), 0);
    }

    #[tokio::test]
    async fn start_without_reconcile_only_watches() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let shutdown = CancellationToken::new();
        let s = Settings {
            reconcile: false,
            ..settings()
        };
        let (cache, task) = start(client, s, metrics(), shutdown.clone());
        let server = tokio::spawn(async move {
            let mut parked = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                assert_eq!(
                    request.uri().path(),
                    "/api/v1/configmaps",
                    "only the cache watch"
                );
                if query(&request).contains_key("watch") {
                    parked.push(send);
                } else {
                    send.send_response(json_response(&json!({
                        "apiVersion": "v1", "kind": "ConfigMapList",
                        "metadata": {"resourceVersion": "1"},
                        "items": [],
                    })));
                }
            }
        });
        poll_until("the cache to sync", || cache.is_synced()).await;
        assert_eq!(cache.availability("shop"), Availability::Missing);
        shutdown.cancel();
        timeout(WAIT, task).await.unwrap().unwrap();
        server.abort();
        if let Err(e) = server.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}
