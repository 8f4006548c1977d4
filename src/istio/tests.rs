//! Version detection: reading an injector ConfigMap, combining several,
//! and the watch against recorded `istio-system` states served by the fake
//! apiserver (and a scripted one for changes after the first list).

use std::time::Duration;

use http::Method;
use serde_json::{Value, json};
use tokio::time::timeout;

use super::*;
use crate::testing::{FakeApiServer, WAIT, list, mock_client};

fn v(major: u32, minor: u32) -> Version {
    Version { major, minor }
}

fn configmap(name: &str, data: Value) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "istio-system"},
        "data": data,
    }))
    .unwrap()
}

fn injector_with(values: &Value) -> ConfigMap {
    configmap(
        "istio-sidecar-injector",
        json!({"values": values.to_string(), "config": "policy: enabled\n"}),
    )
}

/// A recorded `kubectl get cm,deploy -n istio-system -o json`.
fn recorded(name: &str) -> Vec<Value> {
    let path = format!(
        "{}/tests/fixtures/istio-system/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let list: Value = serde_json::from_str(&text).unwrap();
    list["items"].as_array().unwrap().clone()
}

fn path_of(object: &Value) -> String {
    let (ns, name) = (
        object["metadata"]["namespace"].as_str().unwrap(),
        object["metadata"]["name"].as_str().unwrap(),
    );
    match object["kind"].as_str().unwrap() {
        "ConfigMap" => format!("/api/v1/namespaces/{ns}/configmaps/{name}"),
        "Deployment" => format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}"),
        other => panic!("not modelled: {other}"),
    }
}

fn fake(state: &str) -> FakeApiServer {
    let server = FakeApiServer::default();
    for object in recorded(state) {
        server.put(&path_of(&object), object);
    }
    server
}

fn settings(names: &[&str]) -> DetectSettings {
    DetectSettings {
        namespace: "istio-system".into(),
        config_maps: names.iter().map(|n| (*n).to_owned()).collect(),
    }
}

async fn poll_until(what: &str, mut done: impl FnMut() -> bool) {
    timeout(WAIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

// === reading one injector ===

#[test]
fn the_version_is_the_tag_the_injector_renders() {
    let values = |global: Value| json!({"global": global, "revision": ""});
    for (global, expected) in [
        (
            json!({"hub": "docker.io/istio", "tag": "1.20.3", "proxy": {"image": "proxyv2"}}),
            Some(v(1, 20)),
        ),
        (
            json!({"hub": "docker.io/istio", "tag": "1.5.4", "proxy": {"image": "proxyv2"}}),
            Some(v(1, 5)),
        ),
        // A full image reference in proxy.image wins over the tag.
        (
            json!({"tag": "1.5.4", "proxy": {"image": "registry.example.com/istio/proxyv2:1.7.8"}}),
            Some(v(1, 7)),
        ),
        (json!({"tag": "1.22.0-distroless"}), Some(v(1, 22))),
        (json!({"tag": "latest"}), None),
        (json!({"tag": 1.2}), None),
        (json!({"hub": "docker.io/istio"}), None),
        (
            json!({"tag": "1.20.3", "proxy": {"image": "registry.example.com/proxyv2@sha256:0a1b"}}),
            None,
        ),
    ] {
        assert_eq!(
            injector_version(&injector_with(&values(global.clone()))),
            expected,
            "{global}"
        );
    }
    // YAML values (some distributions render them so).
    let yaml = configmap(
        "istio-sidecar-injector",
        json!({"values": "global:\n  tag: 1.18.2\n  proxy: {image: proxyv2}\n"}),
    );
    assert_eq!(injector_version(&yaml), Some(v(1, 18)));
    for data in [
        json!({}),
        json!({"config": "policy: enabled"}),
        json!({"values": "{not json: ["}),
        json!({"values": "[1, 2]"}),
    ] {
        assert_eq!(
            injector_version(&configmap("istio-sidecar-injector", data.clone())),
            None,
            "{data}"
        );
    }
    assert_eq!(injector_version(&ConfigMap::default()), None);
}

#[test]
fn injectors_agree_on_one_keepalive_form() {
    assert_eq!(agree([]), None, "no injector");
    assert_eq!(agree([Some(v(1, 20))]), Some(v(1, 20)));
    assert_eq!(agree([Some(v(1, 22)), Some(v(1, 20))]), Some(v(1, 20)));
    assert_eq!(agree([Some(v(1, 9)), Some(v(1, 17))]), Some(v(1, 9)));
    assert_eq!(agree([Some(v(1, 5)), Some(v(1, 7))]), Some(v(1, 5)));
    assert_eq!(
        agree([Some(v(1, 7)), Some(v(1, 12))]),
        None,
        "template vs agent"
    );
    assert_eq!(
        agree([Some(v(1, 17)), Some(v(1, 18))]),
        None,
        "fixed vs env"
    );
    assert_eq!(agree([Some(v(1, 20)), None]), None, "one unreadable");
}

#[test]
fn the_answer_waits_for_every_list_and_follows_changes() {
    let cm = |tag: &str| injector_with(&json!({"global": {"tag": tag}}));
    let mut seen = Injectors::new(2);
    assert!(!seen.apply(0, watcher::Event::Init));
    assert!(!seen.apply(0, watcher::Event::InitApply(cm("1.20.1"))));
    assert!(seen.apply(0, watcher::Event::InitDone));
    assert_eq!(seen.answer(), None, "the second watch has not listed");
    seen.apply(1, watcher::Event::Init);
    seen.apply(1, watcher::Event::InitDone);
    assert_eq!(seen.answer(), Some(Some(v(1, 20))), "the second is absent");
    seen.apply(1, watcher::Event::Apply(cm("1.12.0")));
    assert_eq!(seen.answer(), Some(None), "1.20 and 1.12 disagree");
    seen.apply(1, watcher::Event::Delete(cm("1.12.0")));
    assert_eq!(seen.answer(), Some(Some(v(1, 20))));
    // A relist that no longer finds it.
    seen.apply(0, watcher::Event::Init);
    assert_eq!(seen.answer(), Some(Some(v(1, 20))), "kept while relisting");
    seen.apply(0, watcher::Event::InitDone);
    assert_eq!(seen.answer(), Some(None));
}

#[test]
fn packing_round_trips() {
    for version in [
        None,
        Some(v(1, 5)),
        Some(v(1, 27)),
        Some(v(0, 0)),
        Some(v(2, 1)),
    ] {
        assert_eq!(unpack(pack(version)), version);
    }
    let off = InjectorVersion::disabled();
    assert_eq!(
        (off.get(), off.is_synced(), off.is_enabled()),
        (None, false, false)
    );
    assert_eq!(format!("{off:?}"), "InjectorVersion(disabled)");
}

#[test]
fn settings_follow_the_config() {
    let mut cfg = Config::default();
    assert_eq!(
        DetectSettings::from_config(&cfg),
        Some(settings(&["istio-sidecar-injector"]))
    );
    cfg.istio.injector_config_maps.clear();
    assert_eq!(DetectSettings::from_config(&cfg), None);
    let mut cfg = Config::default();
    cfg.bootstrap.enabled = false;
    assert_eq!(DetectSettings::from_config(&cfg), None);
}

// === the watch against an apiserver ===

/// Runs the watch against `server` until the version is synced; returns it
/// and the requests the watch made.
async fn detect(server: &FakeApiServer, names: &[&str]) -> (Option<Version>, Vec<String>) {
    let (client, api_task) = server.client();
    let (version, watch) = super::watch(client, settings(names));
    assert_eq!((version.get(), version.is_synced()), (None, false));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(watch.run(shutdown.clone()));
    poll_until("the version to sync", || version.is_synced()).await;
    let found = version.get();
    shutdown.cancel();
    timeout(WAIT, task).await.unwrap().unwrap().unwrap();
    api_task.abort();
    let calls = server
        .calls()
        .into_iter()
        .map(|c| {
            assert_eq!(c.method, Method::GET, "reads only");
            format!(
                "{} {} watch={}",
                c.path,
                c.query.get("fieldSelector").map_or("-", String::as_str),
                c.query.get("watch").map_or("false", String::as_str),
            )
        })
        .collect();
    (found, calls)
}

/// The default: the one injector ConfigMap, by name, in istio-system; the
/// revision's ConfigMap, the mesh config, the CA bundle and the Deployments
/// are never read.
#[tokio::test]
async fn detects_the_default_injector_reading_only_its_configmap() {
    let server = fake("istio-1.20-with-1-22-revision");
    let (version, calls) = detect(&server, &["istio-sidecar-injector"]).await;
    assert_eq!(version, Some(v(1, 20)));
    let list = "/api/v1/namespaces/istio-system/configmaps metadata.name=istio-sidecar-injector";
    assert_eq!(calls[0], format!("{list} watch=false"));
    assert!(
        calls
            .iter()
            .all(|c| c.starts_with(list) && (c.ends_with("false") || c.ends_with("true"))),
        "{calls:?}"
    );
}

#[tokio::test]
async fn revisions_of_one_form_agree_and_of_two_forms_do_not() {
    let both = ["istio-sidecar-injector", "istio-sidecar-injector-1-22"];
    let (version, calls) = detect(&fake("istio-1.20-with-1-22-revision"), &both).await;
    assert_eq!(version, Some(v(1, 20)), "1.20 and 1.22 both take the env");
    for name in both {
        assert!(
            calls
                .iter()
                .any(|c| c.contains(&format!("metadata.name={name} "))),
            "{name}: {calls:?}"
        );
    }

    let across = ["istio-sidecar-injector", "istio-sidecar-injector-1-12"];
    let (version, _) = detect(&fake("istio-1.7-with-1-12-revision"), &across).await;
    assert_eq!(version, None, "a 1.7 template and a 1.12 agent: unknown");
    let (version, _) = detect(
        &fake("istio-1.7-with-1-12-revision"),
        &["istio-sidecar-injector"],
    )
    .await;
    assert_eq!(version, Some(v(1, 7)));
}

#[tokio::test]
async fn a_full_proxy_image_reference_is_read_for_its_tag() {
    let (version, _) = detect(
        &fake("istio-1.5-private-registry"),
        &["istio-sidecar-injector"],
    )
    .await;
    assert_eq!(version, Some(v(1, 5)));
}

#[tokio::test]
async fn no_istio_is_unknown_but_synced() {
    let (version, _) = detect(&FakeApiServer::default(), &["istio-sidecar-injector"]).await;
    assert_eq!(version, None);
}

/// After the first list the watch follows changes: an upgrade, a removal.
/// Every request carries the field selector.
#[tokio::test]
async fn follows_upgrades_and_removal() {
    let (client, mut api) = mock_client();
    let (version, watch) = super::watch(client, settings(&["istio-sidecar-injector"]));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(watch.run(shutdown.clone()));
    let cm = |tag: &str, rv: &str| {
        let mut o = serde_json::to_value(injector_with(&json!({"global": {"tag": tag}}))).unwrap();
        o["metadata"]["resourceVersion"] = json!(rv);
        o
    };
    let path = "/api/v1/namespaces/istio-system/configmaps";
    let selected = |call: &crate::testing::Call| {
        assert_eq!(call.path, path);
        assert_eq!(
            call.param("fieldSelector"),
            Some("metadata.name=istio-sidecar-injector")
        );
    };

    let call = api.next().await;
    selected(&call);
    assert!(!call.is_watch());
    call.ok(&list("ConfigMap", "10", vec![cm("1.12.2", "9")]));
    poll_until("1.12", || version.get() == Some(v(1, 12))).await;

    let call = api.next().await;
    selected(&call);
    assert!(call.is_watch());
    call.events(&[json!({"type": "MODIFIED", "object": cm("1.20.0", "11")})]);
    poll_until("the upgrade to 1.20", || version.get() == Some(v(1, 20))).await;

    let call = api.next().await;
    selected(&call);
    assert!(call.is_watch());
    assert_eq!(call.param("resourceVersion"), Some("11"));
    call.events(&[json!({"type": "DELETED", "object": cm("1.20.0", "12")})]);
    poll_until("the removal", || version.get().is_none()).await;
    assert!(version.is_synced());

    let parked = api.next().await;
    assert!(parked.is_watch());
    let _open = parked.park();
    shutdown.cancel();
    timeout(WAIT, task).await.unwrap().unwrap().unwrap();
}

/// Without RBAC (403) the version stays unknown, the watch retries, and
/// the task runs on until shutdown.
#[tokio::test]
async fn forbidden_is_retried_and_stays_unknown() {
    let (client, mut api) = mock_client();
    let (version, watch) = super::watch(client, settings(&["istio-sidecar-injector"]));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(watch.run(shutdown.clone()));
    for _ in 0..2 {
        let call = api.next().await;
        assert!(!call.is_watch());
        call.fail(
            403,
            "Forbidden",
            "configmaps \"istio-sidecar-injector\" is forbidden: User \
             \"system:serviceaccount:canary-injector:canary-injector\" cannot list resource \
             \"configmaps\" in API group \"\" in the namespace \"istio-system\"",
        );
    }
    assert_eq!((version.get(), version.is_synced()), (None, false));
    assert!(!task.is_finished());
    shutdown.cancel();
    timeout(WAIT, task).await.unwrap().unwrap().unwrap();
}
