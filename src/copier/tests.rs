//! The copier and its cache against the mock apiserver ([`crate::testing`]).

use std::collections::BTreeSet;

use http::Method;
use k8s_openapi::ByteString;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, OwnerReference, Time};
use prometheus::Registry;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::*;
use crate::cluster::watches::Shared;
use crate::metrics::ControllerMetrics;
use crate::testing::{Call, MockApi, WAIT, list, mock_client};

const SOURCE_NS: &str = "canary-injector";
/// The default `namespaces.optIn`, as a selector.
const DEFAULT_NAMESPACE_SELECTOR: &str = "canary-injection=enabled";
const NAME: &str = "canary-injector-bootstrap";
const TEMPLATE_KEY: &str = "envoy_bootstrap_tmpl.json";
const TEMPLATE: &str = r#"{"static_resources": {"clusters": [{"name": "xds-grpc"}]}}"#;

// === fixtures ===

fn settings() -> CopierSettings {
    CopierSettings {
        source_namespace: SOURCE_NS.into(),
        config_map_name: NAME.into(),
        namespace_selector: DEFAULT_NAMESPACE_SELECTOR.into(),
        excluded_namespaces: vec!["kube-system".into(), "kube-public".into()],
        field_manager: FIELD_MANAGER.into(),
        copy: true,
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

/// A synced cache in which the ConfigMap `name` exists in exactly `namespaces`.
fn cache_with(name: &str, namespaces: &[&str]) -> BootstrapCache {
    let copies = namespaces
        .iter()
        .map(|ns| ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some((*ns).into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        })
        .collect();
    BootstrapCache {
        inner: Some(Arc::new(CacheInner {
            store: store_with(copies),
            synced: AtomicBool::new(true),
            config_map_name: name.into(),
            source_namespace: SOURCE_NS.into(),
        })),
    }
}

fn counters() -> ControllerCounters {
    ControllerMetrics::register(&Registry::new())
        .unwrap()
        .controller(CONTROLLER, &CopyError::REASONS)
}

fn context(client: Client, cache: Store<ConfigMap>, metrics: ControllerCounters) -> Arc<Context> {
    Arc::new(Context {
        client,
        settings: settings(),
        cache,
        metrics,
        source_missing: AtomicBool::new(false),
    })
}

/// Checks one server-side apply of the copy into `ns` and answers it.
fn check_apply(call: Call, ns: &str) {
    assert_eq!(call.method, Method::PATCH);
    assert_eq!(
        call.path,
        format!("/api/v1/namespaces/{ns}/configmaps/{NAME}")
    );
    assert_eq!(call.param("fieldManager"), Some(FIELD_MANAGER));
    assert_eq!(call.param("force"), Some("true"));
    assert_eq!(call.content_type, "application/apply-patch+yaml");
    assert_eq!(
        call.body,
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
    let mut applied = call.body.clone();
    applied["metadata"]["resourceVersion"] = json!("1");
    call.ok(&applied);
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

// === copy_one ===

#[tokio::test]
async fn opted_in_namespace_gets_the_copy_by_server_side_apply() {
    let (client, mut api) = mock_client();
    let m = counters();
    let ctx = context(client, store_with(vec![source()]), m.clone());
    let copying = tokio::spawn(copy_one(Arc::new(namespace("shop")), ctx));
    check_apply(api.next().await, "shop");
    let action = timeout(WAIT, copying).await.unwrap().unwrap().unwrap();
    assert_eq!(action, Action::requeue(RESYNC));
    assert_eq!(m.applies(), 1);
    api.expect_no_more().await;
}

#[tokio::test]
async fn up_to_date_copy_is_not_applied_again() {
    let (client, api) = mock_client();
    let m = counters();
    let copy = desired_copy(&source(), "shop", &settings());
    let ctx = context(client, store_with(vec![source(), copy]), m.clone());
    let action = copy_one(Arc::new(namespace("shop")), ctx).await.unwrap();
    assert_eq!(action, Action::requeue(RESYNC));
    assert_eq!(m.applies(), 0);
    api.expect_no_more().await;
}

#[tokio::test]
async fn edited_copy_is_applied_again() {
    let (client, mut api) = mock_client();
    let mut copy = desired_copy(&source(), "shop", &settings());
    copy.data = Some(BTreeMap::from([(TEMPLATE_KEY.into(), "{}".into())]));
    let ctx = context(client, store_with(vec![source(), copy]), counters());
    let copying = tokio::spawn(copy_one(Arc::new(namespace("shop")), ctx));
    check_apply(api.next().await, "shop");
    copying.await.unwrap().unwrap();
    api.expect_no_more().await;
}

#[tokio::test]
async fn missing_source_applies_nothing_counts_and_requeues() {
    let (client, api) = mock_client();
    let m = counters();
    let ctx = context(client, store_with(vec![]), m.clone());
    for ns in ["shop", "payments"] {
        let ns = Arc::new(namespace(ns));
        let err = copy_one(ns.clone(), ctx.clone()).await.unwrap_err();
        assert!(matches!(err, CopyError::SourceMissing), "{err}");
        let action = on_error(ns, &err, ctx.clone());
        assert_eq!(action, Action::requeue(SOURCE_MISSING_REQUEUE));
    }
    assert_eq!(m.errors("source-missing"), 2);
    assert_eq!(m.applies(), 0);
    assert!(ctx.source_missing.load(Ordering::Relaxed));
    drop(ctx);
    api.expect_no_more().await;
}

#[tokio::test]
async fn source_and_excluded_namespaces_get_no_copy() {
    let (client, api) = mock_client();
    let m = counters();
    let ctx = context(client, store_with(vec![source()]), m.clone());
    // Labelled for opt-in, yet excluded (#12: the copier honours the same
    // exclusions as the webhook).
    for ns in [SOURCE_NS, "kube-system", "kube-public"] {
        let action = copy_one(Arc::new(namespace(ns)), ctx.clone())
            .await
            .unwrap();
        assert_eq!(action, Action::await_change(), "{ns}");
    }
    assert_eq!(m.applies(), 0);
    drop(ctx);
    api.expect_no_more().await;
}

#[tokio::test]
async fn terminating_namespace_is_skipped() {
    let (client, api) = mock_client();
    let mut ns = namespace("leaving");
    ns.metadata.deletion_timestamp = Some(Time(Default::default()));
    let ctx = context(client, store_with(vec![source()]), counters());
    let action = copy_one(Arc::new(ns), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::await_change());
    drop(ctx);
    api.expect_no_more().await;
}

#[tokio::test]
async fn failed_apply_is_an_error_that_is_counted_and_retried() {
    let (client, mut api) = mock_client();
    let m = counters();
    let ctx = context(client, store_with(vec![source()]), m.clone());
    let ns = Arc::new(namespace("shop"));
    let copying = tokio::spawn(copy_one(ns.clone(), ctx.clone()));
    api.next()
        .await
        .fail(403, "Forbidden", "configmaps is forbidden");
    let err = copying.await.unwrap().unwrap_err();
    assert!(matches!(err, CopyError::Apply(_)), "{err}");
    assert_eq!(on_error(ns, &err, ctx), Action::requeue(ERROR_REQUEUE));
    assert_eq!(m.errors("apply"), 1);
    assert_eq!(m.applies(), 0);
}

/// The namespace watch may say "terminating" after the apiserver does:
/// its refusal of the copy is no error.
#[tokio::test]
async fn a_copy_refused_because_the_namespace_is_being_deleted_is_no_error() {
    let (client, mut api) = mock_client();
    let m = counters();
    let ctx = context(client, store_with(vec![source()]), m.clone());
    let copying = tokio::spawn(copy_one(Arc::new(namespace("leaving")), ctx.clone()));
    api.next().await.fail(
        403,
        "Forbidden",
        "configmaps \"canary-injector-bootstrap\" is forbidden: unable to create new content \
         in namespace leaving because it is being terminated",
    );
    assert_eq!(copying.await.unwrap().unwrap(), Action::await_change());
    assert_eq!(m.errors("apply"), 0);
    assert_eq!(m.applies(), 0);
}

#[tokio::test]
async fn namespace_without_a_name_is_an_error() {
    let (client, _api) = mock_client();
    let ctx = context(client, store_with(vec![source()]), counters());
    let err = copy_one(Arc::new(Namespace::default()), ctx)
        .await
        .unwrap_err();
    assert!(matches!(err, CopyError::MissingObjectKey(".metadata.name")));
}

// === passes ===

#[test]
fn full_pass_follows_the_source_and_damaged_copies_only() {
    let s = settings();
    let good = desired_copy(&source(), "shop", &s);
    let mut edited = good.clone();
    edited.data = None;
    let store = store_with(vec![source(), good.clone()]);
    let wants = |e: watcher::Event<ConfigMap>| wants_full_pass(&e, &store, &s);
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
    assert!(!wants_full_pass(&watcher::Event::Apply(edited), &empty, &s));
}

// === cache ===

#[test]
fn cache_answers_present_and_missing_per_namespace() {
    let cache = cache_with(NAME, &[SOURCE_NS, "shop", "payments"]);
    assert!(cache.is_synced());
    assert_eq!(cache.availability("shop"), Availability::Present);
    assert_eq!(cache.availability("payments"), Availability::Present);
    assert_eq!(cache.availability("billing"), Availability::Missing);
    assert_eq!(cache.availability(""), Availability::Missing);
}

/// Without the source nobody set the template fix up: a missing copy is
/// not worth a warning. A copy left behind still counts as present.
#[test]
fn cache_without_the_source_says_not_configured() {
    let cache = cache_with(NAME, &["shop"]);
    assert_eq!(cache.availability("billing"), Availability::NotConfigured);
    assert_eq!(cache.availability("shop"), Availability::Present);
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
            source_namespace: SOURCE_NS.into(),
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
    let cache = cache_with("other-name", &["shop"]);
    let mine = cache_with(NAME, &[]);
    assert_eq!(cache.availability("shop"), Availability::Present);
    assert_eq!(mine.availability("shop"), Availability::NotConfigured);
}

// === settings ===

#[test]
fn settings_need_bootstrap_enabled_and_an_own_namespace() {
    let mut cfg = Config::default();
    assert_eq!(CopierSettings::from_config(&cfg), None);
    cfg.namespaces.own = Some(SOURCE_NS.into());
    let s = CopierSettings::from_config(&cfg).unwrap();
    assert_eq!(s.source_namespace, SOURCE_NS);
    assert_eq!(s.namespace_selector, DEFAULT_NAMESPACE_SELECTOR);
    assert_eq!(s.excluded_namespaces, cfg.namespaces.excluded);
    assert!(s.copy);
    cfg.bootstrap.reconcile = false;
    assert!(!CopierSettings::from_config(&cfg).unwrap().copy);
    cfg.bootstrap.enabled = false;
    assert_eq!(CopierSettings::from_config(&cfg), None);
}

// === the cache watch and the copier together ===

fn labelled_namespace_json(name: &str) -> Value {
    serde_json::to_value(namespace(name)).unwrap()
}

/// Answers the lists, parks the watches, releases one DELETED event for
/// the copy in `shop` on `release`, and reports each applied namespace.
async fn fake_apiserver(
    mut api: MockApi,
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
    while let Some(call) = api.next_or_end().await {
        match (call.method.clone(), call.path.as_str()) {
            (Method::GET, "/api/v1/configmaps") => {
                assert_eq!(
                    call.param("fieldSelector"),
                    Some("metadata.name=canary-injector-bootstrap")
                );
                assert_eq!(call.param("labelSelector"), None);
                if !call.is_watch() {
                    let mut up_to_date = shop_copy.clone();
                    up_to_date["metadata"]["resourceVersion"] = json!("100");
                    call.ok(&list(
                        "ConfigMap",
                        "100",
                        vec![serde_json::to_value(source()).unwrap(), up_to_date],
                    ));
                } else if let Some(release) = release.take() {
                    let event = json!({"type": "DELETED", "object": shop_copy.clone()});
                    tokio::spawn(async move {
                        if release.await.is_ok() {
                            call.events(&[event]);
                        }
                    });
                } else {
                    parked.push(call.park());
                }
            }
            (Method::GET, "/api/v1/namespaces") => {
                assert_eq!(
                    call.param("labelSelector"),
                    Some(DEFAULT_NAMESPACE_SELECTOR)
                );
                if call.is_watch() {
                    parked.push(call.park());
                } else {
                    call.ok(&list(
                        "Namespace",
                        "200",
                        vec![
                            labelled_namespace_json("shop"),
                            labelled_namespace_json("fresh"),
                            labelled_namespace_json(SOURCE_NS),
                            labelled_namespace_json("kube-system"),
                        ],
                    ));
                }
            }
            (Method::PATCH, p) => {
                let ns = p
                    .strip_prefix("/api/v1/namespaces/")
                    .and_then(|rest| rest.strip_suffix(&format!("/configmaps/{NAME}")))
                    .unwrap_or_else(|| panic!("unexpected PATCH {p}"))
                    .to_string();
                assert_eq!(call.param("fieldManager"), Some(FIELD_MANAGER));
                let mut body = call.body.clone();
                body["metadata"]["resourceVersion"] = json!("300");
                call.ok(&body);
                applied.send(ns).unwrap();
            }
            (method, _) => panic!("unexpected call: {method} {}", call.path),
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
async fn cache_and_copier_copy_where_missing_and_repair_deleted_copies() {
    let (client, api) = mock_client();
    let (applied_tx, mut applied) = mpsc::unbounded_channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(fake_apiserver(api, applied_tx, release_rx));
    let m = counters();
    let shutdown = CancellationToken::new();

    let (cache, watch, source) = super::cache(client.clone(), settings());
    // Nothing has run yet.
    assert_eq!(cache.availability("shop"), Availability::Unknown);
    let watch_task = tokio::spawn(watch.run(shutdown.clone()));
    // The leader's side: the shared Namespace watch and the copier.
    let namespaces = Shared::<Namespace>::new();
    let (subscription, ns_store) = (namespaces.subscribe(), namespaces.store());
    let ns_api: Api<Namespace> = Api::all(client.clone());
    let ns_task = tokio::spawn(namespaces.run(
        ns_api,
        watcher::Config::default().labels(DEFAULT_NAMESPACE_SELECTOR),
        "namespaces",
        shutdown.clone(),
    ));
    let copier = tokio::spawn(run_copier(
        client,
        settings(),
        source,
        subscription,
        ns_store,
        m.clone(),
        shutdown.clone(),
    ));

    // "fresh" has no copy: applied. "shop" is up to date, the source and
    // kube-system namespaces are skipped: never applied before the release.
    let first = timeout(WAIT, applied.recv()).await.unwrap().unwrap();
    assert_eq!(first, "fresh");
    assert!(cache.is_synced());
    assert_eq!(cache.availability("shop"), Availability::Present);
    assert_eq!(cache.availability(SOURCE_NS), Availability::Present);
    assert_eq!(cache.availability("fresh"), Availability::Missing);
    assert_eq!(cache.availability("elsewhere"), Availability::Missing);

    // Someone deletes the copy in "shop": the watch sees it, the copier puts
    // it back.
    release_tx.send(()).unwrap();
    let mut seen = BTreeSet::from([first]);
    while !seen.contains("shop") {
        let ns = timeout(WAIT, applied.recv()).await.unwrap().unwrap();
        seen.insert(ns);
    }
    assert_eq!(cache.availability("shop"), Availability::Missing);
    assert!(!seen.contains(SOURCE_NS), "{seen:?}");
    assert!(!seen.contains("kube-system"), "{seen:?}");
    poll_until("the applies to be counted", || m.applies() >= 2).await;

    shutdown.cancel();
    for task in [watch_task, ns_task] {
        timeout(WAIT, task).await.unwrap().unwrap().unwrap();
    }
    timeout(WAIT, copier).await.unwrap().unwrap();
    server.abort();
    if let Err(e) = server.await
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
    assert_eq!(m.errors("apply"), 0);
}

#[tokio::test]
async fn the_cache_alone_only_watches() {
    let (client, mut api) = mock_client();
    let shutdown = CancellationToken::new();
    let s = CopierSettings {
        copy: false,
        ..settings()
    };
    let (cache, watch, _source) = super::cache(client, s);
    let task = tokio::spawn(watch.run(shutdown.clone()));
    let server = tokio::spawn(async move {
        let mut parked = Vec::new();
        while let Some(call) = api.next_or_end().await {
            assert_eq!(call.path, "/api/v1/configmaps", "only the cache watch");
            if call.is_watch() {
                parked.push(call.park());
            } else {
                call.ok(&list("ConfigMap", "1", vec![]));
            }
        }
    });
    poll_until("the cache to sync", || cache.is_synced()).await;
    assert_eq!(cache.availability("shop"), Availability::NotConfigured);
    shutdown.cancel();
    timeout(WAIT, task).await.unwrap().unwrap().unwrap();
    server.abort();
    if let Err(e) = server.await
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// The copier shares the namespace watch with other writers (the backfill):
/// while it waits for its own cache it must keep reading, or the shared
/// watch stalls for everyone once its buffer is full.
#[tokio::test]
async fn a_copier_waiting_for_its_cache_does_not_stall_the_shared_namespace_watch() {
    let (client, _api) = mock_client();
    let namespaces = Shared::<Namespace>::new();
    let copier_subscription = namespaces.subscribe();
    let mut other = namespaces.subscribe();
    let store = namespaces.store();
    // A cache that never syncs (its watch never lists).
    let (never, _writer) = reflector::store::<ConfigMap>();
    let source = CopySource {
        store: never,
        passes: Arc::new(Notify::new()),
    };
    let shutdown = CancellationToken::new();
    let copier = tokio::spawn(run_copier(
        client,
        settings(),
        source,
        copier_subscription,
        store,
        counters(),
        shutdown.clone(),
    ));
    const N: usize = 600; // more than the fan-out buffer holds
    let events = futures::stream::iter(
        (0..N).map(|i| Ok(watcher::Event::Apply(namespace(&format!("ns-{i}"))))),
    );
    let watch = tokio::spawn(namespaces.run_stream(events, "namespaces", shutdown.clone()));
    let mut seen = 0;
    while seen < N {
        timeout(WAIT, other.next())
            .await
            .expect("the other writer keeps getting namespaces")
            .expect("the stream goes on");
        seen += 1;
    }
    shutdown.cancel();
    timeout(WAIT, copier).await.unwrap().unwrap();
    timeout(WAIT, watch).await.unwrap().unwrap().unwrap();
}
