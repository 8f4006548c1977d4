//! Every finding from a crafted snapshot; the exact outputs; the adapter
//! against a recorded cluster state.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use super::*;
use crate::certs::Ca;
use crate::config::Config;

const DAY: i64 = 86400;

struct Tls {
    ca_pem: String,
    cert_pem: String,
    not_after: i64,
}

fn istio_v1() -> crate::routes::offline::Target {
    crate::routes::offline::Target::Istio("networking.istio.io/v1".into())
}

fn tls(validity_days: u64) -> Tls {
    let ca = Ca::generate("check CA", Duration::from_secs(3650 * 86400)).unwrap();
    let b = ca
        .issue(
            &["canary-injector.canary-injector.svc".into()],
            Duration::from_secs(validity_days * 86400),
        )
        .unwrap();
    Tls {
        not_after: not_after(b.cert_pem.as_bytes()).unwrap(),
        ca_pem: b.ca_cert_pem,
        cert_pem: b.cert_pem,
    }
}

fn opt_in() -> BTreeMap<String, String> {
    BTreeMap::from([("canary-injection".into(), "enabled".into())])
}

fn healthy_webhook(t: &Tls) -> WebhookView {
    WebhookView {
        configuration_name: "canary-injector".into(),
        webhooks: Some(vec![WebhookEntry {
            name: "labels.canary-injector.io".into(),
            ca_bundle: Some(t.ca_pem.clone().into_bytes()),
            namespace_selector: opt_in(),
            url: None,
        }]),
        serving_certificate: Some(t.cert_pem.clone().into_bytes()),
        serving_certificate_error: None,
        ready_endpoints: Some(2),
        service: "canary-injector/canary-injector".into(),
        ca_source: CaSource::Certgen,
        namespace: "canary-injector".into(),
    }
}

fn pod(name: &str, labels: Value, annotations: Value, owner: Option<&str>) -> Value {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "shop/checkout:2.1"}]},
    });
    if let Some(rs) = owner {
        p["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
            "uid": "6d1b9a2e-0000-4000-8000-000000000001", "controller": true,
        }]);
    }
    p
}

fn replicaset(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
           "metadata": {"name": name, "namespace": "shop", "labels": labels}})
}

fn template() -> BTreeMap<String, String> {
    BTreeMap::from([("envoy_bootstrap_tmpl.json".into(), "{}".into())])
}

/// A sound cluster: one namespace, a normal and a gray pod that agree
/// with their ReplicaSets, the bootstrap copy current.
fn sound(t: &Tls) -> Snapshot {
    Snapshot {
        webhook: Some(healthy_webhook(t)),
        bootstrap_source: Some(template()),
        namespaces: vec![NamespaceView {
            name: "shop".into(),
            labels: opt_in(),
            pods: vec![
                pod(
                    "checkout-7d9f-a",
                    json!({"app": "checkout", "stage": "normal"}),
                    json!({}),
                    Some("checkout-7d9f"),
                ),
                pod(
                    "checkout-gray-5c4b-b",
                    json!({"app": "checkout", "stage": "gray", "canarytag": "feature-login"}),
                    json!({"canary-injector.io/tag": "feature-login"}),
                    Some("checkout-gray-5c4b"),
                ),
            ],
            replicasets: vec![
                replicaset(
                    "checkout-7d9f",
                    json!({"app": "checkout", "stage": "normal"}),
                ),
                replicaset(
                    "checkout-gray-5c4b",
                    json!({"app": "checkout", "stage": "gray", "canarytag": "feature-login"}),
                ),
            ],
            bootstrap_copy: Some(template()),
            ..NamespaceView::default()
        }],
        now: t.not_after - 300 * DAY,
        config_error: None,
        native: Default::default(),
        route_api: None,
    }
}

fn report(s: &Snapshot) -> Report {
    check(s, Config::default().policy())
}

fn codes(r: &Report) -> Vec<&'static str> {
    r.findings.iter().map(|f| f.code).collect()
}

fn only(s: &Snapshot) -> Finding {
    let r = report(s);
    assert_eq!(r.findings.len(), 1, "{:#?}", r.findings);
    r.findings[0].clone()
}

#[test]
fn a_sound_cluster_has_no_findings() {
    let t = tls(365);
    let r = report(&sound(&t));
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
    assert!(r.is_sound());
    assert_eq!((r.namespaces, r.pods), (1, 2));
}

// === the webhook ===

#[test]
fn a_missing_configuration_is_an_error() {
    let t = tls(365);
    let mut s = sound(&t);
    s.webhook.as_mut().unwrap().webhooks = None;
    let f = only(&s);
    assert_eq!((f.severity, f.code), (Severity::Error, "webhook-missing"));
}

#[test]
fn a_ca_bundle_that_does_not_verify_the_certificate_is_an_error() {
    let t = tls(365);
    let other = tls(365);
    let mut s = sound(&t);
    s.webhook.as_mut().unwrap().webhooks.as_mut().unwrap()[0].ca_bundle =
        Some(other.ca_pem.clone().into_bytes());
    assert_eq!(only(&s).code, "ca-bundle-mismatch");
    // The fix fits the install method in use.
    for (source, fix) in [
        (
            CaSource::Certgen,
            "run the certgen Job again, which fills the caBundle from the CA it keeps: kubectl -n \
             canary-injector create job --from=cronjob/canary-injector-cert-renew certgen-now",
        ),
        (
            CaSource::CertManager,
            "check the Certificate that the annotation cert-manager.io/inject-ca-from names and \
             cert-manager's cainjector (kubectl -n canary-injector describe certificate \
             canary-injector-serving; kubectl -n cert-manager logs deploy/cert-manager-cainjector)",
        ),
        (
            CaSource::Own,
            "put the CA that signed your certificate into every webhook's clientConfig.caBundle \
             (base64 of the PEM: kubectl patch mutatingwebhookconfiguration canary-injector \
             --type=json ...; see certs/README.md)",
        ),
    ] {
        s.webhook.as_mut().unwrap().ca_source = source;
        assert_eq!(only(&s).fix, fix, "{source:?}");
    }
    s.webhook.as_mut().unwrap().webhooks.as_mut().unwrap()[0].ca_bundle = None;
    assert_eq!(only(&s).code, "ca-bundle-missing");
    // Old and new CA published together (a CA switch in progress): fine.
    let both = format!("{}{}", tls(365).ca_pem, t.ca_pem);
    s.webhook.as_mut().unwrap().webhooks.as_mut().unwrap()[0].ca_bundle = Some(both.into_bytes());
    assert!(report(&s).findings.is_empty());
}

#[test]
fn certificate_expiry_is_checked() {
    let t = tls(365);
    let mut s = sound(&t);
    s.now = t.not_after - 10 * DAY;
    let f = only(&s);
    assert_eq!(
        (f.severity, f.code),
        (Severity::Warning, "certificate-expiring")
    );
    assert!(f.message.contains("10 day"), "{}", f.message);
    s.now = t.not_after + 1;
    assert_eq!(only(&s).code, "certificate-expired");
}

#[test]
fn an_unreadable_certificate_is_said_not_guessed() {
    let t = tls(365);
    let mut s = sound(&t);
    let w = s.webhook.as_mut().unwrap();
    w.serving_certificate = None;
    w.serving_certificate_error = Some("secrets \"canary-injector-tls\" is forbidden".into());
    let f = only(&s);
    assert_eq!(
        (f.severity, f.code),
        (Severity::Warning, "certificate-unreadable")
    );
    assert!(f.message.contains("forbidden"));
}

#[test]
fn no_ready_endpoint_is_an_error() {
    let t = tls(365);
    let mut s = sound(&t);
    s.webhook.as_mut().unwrap().ready_endpoints = Some(0);
    assert_eq!(only(&s).code, "no-ready-endpoints");
}

#[test]
fn webhook_and_controllers_must_select_the_same_namespaces() {
    let t = tls(365);
    let mut s = sound(&t);
    s.webhook.as_mut().unwrap().webhooks.as_mut().unwrap()[0].namespace_selector =
        BTreeMap::from([("mesh".into(), "on".into())]);
    let f = only(&s);
    assert_eq!(f.code, "selector-mismatch");
    assert!(
        f.message.contains("mesh=on") && f.message.contains("canary-injection=enabled"),
        "{}",
        f.message
    );
}

#[test]
fn an_invalid_deployed_config_is_an_error() {
    let t = tls(365);
    let mut s = sound(&t);
    s.config_error = Some("invalid config: canaryTagLabel moved to labels.canaryTag".into());
    assert_eq!(only(&s).code, "config-invalid");
}

// === namespaces and pods ===

fn shop(s: &mut Snapshot) -> &mut NamespaceView {
    &mut s.namespaces[0]
}

#[test]
fn a_pod_without_stage_is_an_error() {
    let t = tls(365);
    let mut s = sound(&t);
    shop(&mut s)
        .pods
        .push(pod("legacy-1", json!({"app": "legacy"}), json!({}), None));
    let f = only(&s);
    assert_eq!(
        (f.code, f.place.as_str()),
        ("pod-without-stage", "shop/Pod/legacy-1")
    );
}

#[test]
fn opted_out_and_mirror_pods_are_not_findings() {
    let t = tls(365);
    let mut s = sound(&t);
    shop(&mut s).pods.push(pod(
        "out",
        json!({"canary-injector.io/inject": "false"}),
        json!({}),
        None,
    ));
    shop(&mut s).pods.push(pod(
        "static",
        json!({}),
        json!({"kubernetes.io/config.mirror": "x"}),
        None,
    ));
    assert!(report(&s).findings.is_empty());
}

/// `check -n other` on a namespace that never opted in: one finding that
/// says so and how to opt in, not a `pod-without-stage` for every pod.
#[test]
fn a_namespace_that_has_not_opted_in_is_one_finding_not_its_pods() {
    let t = tls(365);
    let mut s = sound(&t);
    let mut other = s.namespaces[0].clone();
    other.name = "other".into();
    other.labels = BTreeMap::from([("team".into(), "shop".into())]);
    other.pods = vec![
        pod("web-1", json!({"app": "web"}), json!({}), None),
        pod("web-2", json!({"app": "web"}), json!({}), None),
    ];
    s.namespaces = vec![other];
    let r = report(&s);
    assert_eq!(
        r.findings,
        [Finding {
            severity: Severity::Error,
            code: "namespace-not-opted-in",
            place: "other".into(),
            message: "namespace other has not opted in (no canary-injection=enabled): the \
                      webhook labels none of its pods and no controller acts on it, so it was \
                      not checked"
                .into(),
            fix: "kubectl label namespace other canary-injection=enabled".into(),
        }]
    );
    assert_eq!((r.namespaces, r.pods), (1, 0), "its pods were not checked");
    // The fix uses the configured selector.
    let mut cfg = Config::default();
    cfg.namespaces.opt_in =
        BTreeMap::from([("mesh".into(), "on".into()), ("team".into(), "shop".into())]);
    let f = &check(&s, cfg.policy()).findings[0];
    assert_eq!(f.fix, "kubectl label namespace other mesh=on team=shop");
    assert!(
        f.message.contains("(no mesh=on,team=shop)"),
        "{}",
        f.message
    );
}

/// An excluded namespace is one finding too: labelled to opt in (the
/// apiserver then calls the webhook for its pods for nothing, and a webhook
/// outage blocks them), or named with `-n`.
#[test]
fn an_excluded_namespace_is_one_finding_not_its_pods() {
    let t = tls(365);
    let mut s = sound(&t);
    let mut system = s.namespaces[0].clone();
    system.name = "kube-system".into();
    system.pods = vec![pod("coredns", json!({}), json!({}), None)];
    s.namespaces.push(system);
    let r = report(&s);
    assert_eq!(codes(&r), ["namespace-excluded"], "{:#?}", r.findings);
    let f = &r.findings[0];
    assert_eq!(
        (f.severity, f.place.as_str()),
        (Severity::Warning, "kube-system")
    );
    assert_eq!(
        f.message,
        "namespace kube-system is labelled canary-injection=enabled but canary-injector never \
         acts on it (namespaces.excluded): its pods get no labels, yet the apiserver still calls \
         the webhook for them, and with failurePolicy Fail their creation stops while the \
         webhook is down"
    );
    assert_eq!(
        f.fix,
        "kubectl label namespace kube-system canary-injection-"
    );
    assert_eq!(r.pods, 2, "only shop's pods");
    // `check -n canary-injector` (its own, not labelled).
    let mut cfg = Config::default();
    cfg.namespaces.own = Some("canary-injector".into());
    let own = NamespaceView {
        name: "canary-injector".into(),
        ..NamespaceView::default()
    };
    s.namespaces = vec![own];
    let f = &check(&s, cfg.policy()).findings[0];
    assert_eq!(f.code, "namespace-excluded");
    assert_eq!(
        f.message,
        "canary-injector never acts on namespace canary-injector (the webhook's own namespace): \
         its pods are not labelled, so it was not checked"
    );
}

#[test]
fn a_gray_pod_without_tag_is_an_error() {
    let t = tls(365);
    let mut s = sound(&t);
    shop(&mut s)
        .pods
        .push(pod("gray-1", json!({"stage": "gray"}), json!({}), None));
    assert_eq!(only(&s).code, "gray-without-tag");
}

#[test]
fn a_rewritten_tag_is_information_only() {
    let t = tls(365);
    let mut s = sound(&t);
    shop(&mut s).pods.push(pod(
        "pay-1",
        json!({"stage": "gray", "canarytag": "feature-Payment_v2"}),
        json!({"canary-injector.io/tag": "feature/Payment_v2"}),
        None,
    ));
    let r = report(&s);
    assert_eq!(codes(&r), ["tag-rewritten"]);
    assert!(r.is_sound(), "info does not need fixing");
}

#[test]
fn a_pod_and_its_replicaset_that_disagree_are_an_error() {
    let t = tls(365);
    let mut s = sound(&t);
    // The Deployment's own metadata was tagged: the ReplicaSet gray, its
    // pods normal (issue #10's split release).
    shop(&mut s).replicasets[0] = replicaset(
        "checkout-7d9f",
        json!({"stage": "gray", "canarytag": "feature-x"}),
    );
    let f = only(&s);
    assert_eq!(f.code, "pod-replicaset-disagree");
    assert!(
        f.message.contains("normal") && f.message.contains("gray/feature-x"),
        "{}",
        f.message
    );
}

#[test]
fn bootstrap_copies_missing_or_stale_are_warnings() {
    let t = tls(365);
    let mut s = sound(&t);
    shop(&mut s).bootstrap_copy = Some(BTreeMap::from([(
        "envoy_bootstrap_tmpl.json".into(),
        "old".into(),
    )]));
    assert_eq!(only(&s).code, "bootstrap-configmap-stale");
    shop(&mut s).bootstrap_copy = None;
    assert_eq!(only(&s).code, "bootstrap-configmap-missing");
    // No source: nothing to copy, nothing to report.
    s.bootstrap_source = None;
    assert!(report(&s).findings.is_empty());
}

#[test]
fn an_old_sidecar_without_the_patched_template_is_a_warning() {
    let t = tls(365);
    let mut s = sound(&t);
    let mut p = pod(
        "old-1",
        json!({"stage": "normal"}),
        json!({"sidecar.istio.io/status": "{}"}),
        None,
    );
    p["spec"]["containers"] = json!([
        {"name": "app", "image": "shop/app:1"},
        {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.5.4",
         "volumeMounts": [{"name": "istio-envoy", "mountPath": "/etc/istio/proxy"}]},
    ]);
    shop(&mut s).pods.push(p.clone());
    assert_eq!(only(&s).code, "sidecar-without-template");
    // With the template mounted: nothing.
    p["spec"]["containers"][1]["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "canary-injector-bootstrap", "mountPath": "/var/lib/istio/envoy/envoy_bootstrap_tmpl.json"}));
    shop(&mut s).pods.pop();
    shop(&mut s).pods.push(p);
    assert!(report(&s).findings.is_empty());
}

// === output ===

fn two_findings() -> Report {
    let t = tls(365);
    let mut s = sound(&t);
    s.webhook.as_mut().unwrap().ready_endpoints = Some(0);
    shop(&mut s).pods.push(pod(
        "pay-1",
        json!({"stage": "gray", "canarytag": "feature-x"}),
        json!({"canary-injector.io/tag": "feature/x"}),
        None,
    ));
    report(&s)
}

#[test]
fn the_human_output_is_one_block_per_finding_and_a_summary() {
    assert_eq!(
        two_findings().render(false),
        "\
error   no-ready-endpoints           webhook
        Service canary-injector/canary-injector has no ready endpoint: with failurePolicy Fail, pod creation in opted-in namespaces stops
        fix: kubectl -n canary-injector get pods; kubectl -n canary-injector describe deployment canary-injector
info    tag-rewritten                shop/Pod/pay-1
        annotation canary-injector.io/tag=\"feature/x\" became label canarytag=feature-x
        fix: send the header with \"feature-x\", or use a tag of [A-Za-z0-9._-] only
needs fixing: 1 namespace(s) (shop), 3 pod(s) checked: 1 error(s), 0 warning(s), 1 info
"
    );
    let coloured = two_findings().render(true);
    assert!(coloured.contains("\x1b[31;1merror  \x1b[0m"));
    let t = tls(365);
    assert_eq!(
        report(&sound(&t)).render(false),
        "sound: 1 namespace(s) (shop), 2 pod(s) checked: 0 error(s), 0 warning(s), 0 info\n"
    );
}

#[test]
fn the_json_output_has_every_field() {
    let out = two_findings().to_json();
    assert_eq!(out["sound"], false);
    assert_eq!(
        out["checked"],
        json!({"namespaces": 1, "namespaceNames": ["shop"], "pods": 3})
    );
    assert_eq!(
        out["findings"][1],
        json!({
            "severity": "info", "code": "tag-rewritten", "place": "shop/Pod/pay-1",
            "message": "annotation canary-injector.io/tag=\"feature/x\" became label canarytag=feature-x",
            "fix": "send the header with \"feature-x\", or use a tag of [A-Za-z0-9._-] only",
        })
    );
    assert_eq!(out["findings"][0]["severity"], "error");
}

/// docs/check.md's description of `-o json` names the keys the code prints,
/// against a cluster (`pods`) and with `-f` (`workloads`).
#[test]
fn the_docs_describe_the_json_both_modes_print() {
    let section = include_str!("../../docs/check.md").replace('\n', " ");
    let t = tls(365);
    let cluster = report(&sound(&t)).to_json();
    let manifests = manifests::check_documents(
        include_str!("../../tests/fixtures/check/sound.yaml"),
        "sound.yaml",
        &Config::default(),
    )
    .unwrap()
    .to_json();
    let keys = |v: &Value| -> Vec<String> {
        v.as_object()
            .unwrap()
            .keys()
            .map(|k| format!("\"{k}\""))
            .collect()
    };
    for out in [&cluster, &manifests] {
        let checked = format!("\"checked\": {{{}}}", keys(&out["checked"]).join(", "));
        assert!(section.contains(&checked), "docs/check.md lacks {checked}");
        assert_eq!(keys(out), ["\"sound\"", "\"checked\"", "\"findings\""]);
    }
    assert_eq!(keys(&manifests["checked"])[2], "\"workloads\"");
    let finding = keys(&two_findings().to_json()["findings"][0]).join(", ");
    assert!(
        section.contains(&format!("[{{{finding}}}]")),
        "docs/check.md lacks {finding}"
    );
}

// === against a recorded cluster ===

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A cluster as the API returns it: the webhook installed and healthy,
/// `shop` opted in with one pod missing its stage label.
fn recorded(t: &Tls) -> crate::testing::FakeApiServer {
    let config = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "canary-injector-config", "namespace": "canary-injector"},
        "data": {"config.yaml": "labels: {canaryTag: canarytag}\n"},
    });
    let webhook = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "canary-injector"},
        "webhooks": [{
            "name": "labels.canary-injector.io", "admissionReviewVersions": ["v1"], "sideEffects": "NoneOnDryRun",
            "clientConfig": {"caBundle": b64(&t.ca_pem),
                             "service": {"name": "canary-injector", "namespace": "canary-injector"}},
            "namespaceSelector": {"matchLabels": {"canary-injection": "enabled"}},
        }],
    });
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "canary-injector-tls", "namespace": "canary-injector"},
        "data": {"tls.crt": b64(&t.cert_pem), "tls.key": b64("unused")},
    });
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "canary-injector-x1", "namespace": "canary-injector",
                     "labels": {"kubernetes.io/service-name": "canary-injector"}},
        "endpoints": [{"addresses": ["10.0.0.7"], "conditions": {"ready": true}},
                      {"addresses": ["10.0.0.8"], "conditions": {"ready": false}}],
    });
    let ns = |name: &str, labels: Value| {
        json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels}})
    };
    crate::testing::FakeApiServer::with(&[
        (
            "/api/v1/namespaces/canary-injector/configmaps/canary-injector-config",
            config,
        ),
        (
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/canary-injector",
            webhook,
        ),
        (
            "/api/v1/namespaces/canary-injector/secrets/canary-injector-tls",
            secret,
        ),
        (
            "/apis/discovery.k8s.io/v1/namespaces/canary-injector/endpointslices/canary-injector-x1",
            slice,
        ),
        (
            "/api/v1/namespaces/shop",
            ns("shop", json!({"canary-injection": "enabled"})),
        ),
        ("/api/v1/namespaces/other", ns("other", json!({}))),
        (
            "/api/v1/namespaces/shop/pods/legacy-1",
            pod("legacy-1", json!({"app": "legacy"}), json!({}), None),
        ),
        (
            "/api/v1/namespaces/other/pods/x",
            pod("x", json!({}), json!({}), None),
        ),
    ])
}

#[tokio::test]
async fn the_adapter_reads_the_cluster_and_writes_nothing() {
    let t = tls(365);
    let api = recorded(&t);
    let (client, served) = api.client();
    let report = cluster::run(client, &cluster::Target::default(), t.not_after - 100 * DAY)
        .await
        .unwrap();
    served.await.unwrap();
    assert_eq!(
        codes(&report),
        ["pod-without-stage"],
        "{:#?}",
        report.findings
    );
    assert_eq!(report.findings[0].place, "shop/Pod/legacy-1");
    assert_eq!(
        (report.namespaces, report.pods),
        (1, 1),
        "only opted-in namespaces"
    );
    let calls = api.calls();
    assert!(
        calls.iter().all(|c| !c.is_write()),
        "check only reads: {calls:#?}"
    );
    let ns_list = calls
        .iter()
        .find(|c| c.path == "/api/v1/namespaces")
        .unwrap();
    assert_eq!(
        ns_list.query.get("labelSelector").map(String::as_str),
        Some("canary-injection=enabled")
    );
}

#[tokio::test]
async fn check_n_on_a_namespace_that_has_not_opted_in_reads_nothing_there() {
    let t = tls(365);
    let api = recorded(&t);
    let (client, served) = api.client();
    let target = cluster::Target {
        only_namespace: Some("other".into()),
        ..cluster::Target::default()
    };
    let report = cluster::run(client, &target, t.not_after - 100 * DAY)
        .await
        .unwrap();
    served.await.unwrap();
    assert_eq!(
        codes(&report),
        ["namespace-not-opted-in"],
        "{:#?}",
        report.findings
    );
    assert_eq!(
        report.findings[0].fix,
        "kubectl label namespace other canary-injection=enabled"
    );
    assert!(!report.is_sound());
    let calls = api.calls();
    assert!(
        calls
            .iter()
            .all(|c| !c.path.starts_with("/api/v1/namespaces/other/")),
        "nothing read in it: {calls:#?}"
    );
    // A namespace that does not exist is a usage error, not a report.
    let (client, _served) = api.client();
    let target = cluster::Target {
        only_namespace: Some("nope".into()),
        ..cluster::Target::default()
    };
    let err = cluster::run(client, &target, 0).await.unwrap_err();
    assert_eq!(err.to_string(), "namespace \"nope\" not found");
}

#[tokio::test]
async fn an_api_failure_names_what_could_not_be_read() {
    let t = tls(365);
    let api = recorded(&t);
    api.hook(
        http::Method::GET,
        "/api/v1/namespaces/shop/pods",
        crate::testing::Hook::Fail(403),
    );
    let (client, _served) = api.client();
    let err = cluster::run(client, &cluster::Target::default(), 0)
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with("cannot read pods in shop:"),
        "{err}"
    );
}

// === against recorded cluster states (tests/fixtures/check/cluster/) ===

/// Where the apiserver serves `object` (a recorded item: an object, or a
/// discovery document).
fn api_path(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap();
    match kind {
        "APIGroup" => return format!("/apis/{}", object["name"].as_str().unwrap()),
        "APIResourceList" => {
            return format!("/apis/{}", object["groupVersion"].as_str().unwrap());
        }
        _ => {}
    }
    let api = match object["apiVersion"].as_str().unwrap() {
        "v1" => "/api/v1".to_owned(),
        group_version => format!("/apis/{group_version}"),
    };
    let plural = format!("{}s", kind.to_lowercase());
    let name = object["metadata"]["name"].as_str().unwrap();
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{api}/namespaces/{ns}/{plural}/{name}"),
        None => format!("{api}/{plural}/{name}"),
    }
}

/// The webhook installed and healthy (a CA and a serving certificate valid
/// until 2126), Istio's and EndpointSlices' APIs served.
const INSTALL: &str = include_str!("../../tests/fixtures/check/cluster/install.json");
/// `shop` sound: a normal and a gray pod agreeing with their ReplicaSets,
/// ready, routed by a hand-written DestinationRule and VirtualService.
const SOUND: &str = include_str!("../../tests/fixtures/check/cluster/sound.json");
/// `shop`: a pod from before the webhook, a release split by a tag on a
/// Deployment's own metadata; `pay`: a routed canary subset whose only pod
/// is not ready.
const FINDINGS: &str = include_str!("../../tests/fixtures/check/cluster/findings.json");
/// What `check -o json` prints for [`FINDINGS`].
const FINDINGS_OUT: &str = include_str!("../../tests/fixtures/check/cluster/findings.out.json");

/// A recorded state (`kind: List` files, as `kubectl get -o json` writes
/// them) in the stateful fake apiserver.
fn state(lists: &[&str]) -> crate::testing::FakeApiServer {
    let objects: Vec<(String, Value)> = lists
        .iter()
        .flat_map(|text| {
            let list: Value = serde_json::from_str(text).unwrap();
            list["items"].as_array().unwrap().clone()
        })
        .map(|item| (api_path(&item), item))
        .collect();
    let refs: Vec<(&str, Value)> = objects
        .iter()
        .map(|(path, o)| (path.as_str(), o.clone()))
        .collect();
    crate::testing::FakeApiServer::with(&refs)
}

/// 2030-01-01: well inside the recorded certificate's validity.
const RECORDED_NOW: i64 = 1_893_456_000;

async fn check_recorded(lists: &[&str], target: &cluster::Target) -> Report {
    let api = state(lists);
    let (client, served) = api.client();
    let report = cluster::run(client, target, RECORDED_NOW).await.unwrap();
    served.await.unwrap();
    assert!(
        api.calls().iter().all(|c| !c.is_write()),
        "check only reads"
    );
    report
}

#[tokio::test]
async fn a_recorded_namespace_with_unlabelled_pods_a_split_release_and_an_unready_subset() {
    let report = check_recorded(&[INSTALL, FINDINGS], &cluster::Target::default()).await;
    let expected: Value = serde_json::from_str(FINDINGS_OUT).unwrap();
    assert_eq!(report.to_json(), expected, "{:#}", report.to_json());
    assert!(!report.is_sound(), "exit code 1");
}

#[tokio::test]
async fn a_recorded_sound_namespace_has_no_findings() {
    let report = check_recorded(&[INSTALL, SOUND], &cluster::Target::default()).await;
    assert_eq!(
        report.to_json(),
        json!({"sound": true, "checked": {"namespaces": 1, "namespaceNames": ["shop"], "pods": 2},
               "findings": []})
    );
    assert!(report.is_sound(), "exit code 0");
    // The namespace that has not opted in, named with -n.
    let target = cluster::Target {
        only_namespace: Some("other".into()),
        ..cluster::Target::default()
    };
    let report = check_recorded(&[INSTALL, SOUND], &target).await;
    assert_eq!(codes(&report), ["namespace-not-opted-in"]);
}

/// `shop`: a Deployment tagged on its own metadata before the namespace
/// opted in, whose pods (and ReplicaSet) are labelled `stage=normal`, and a
/// DestinationRule whose host names no Service.
const CONTRADICTIONS: &str = include_str!("../../tests/fixtures/check/cluster/contradictions.json");
/// What `check -o json` prints for [`CONTRADICTIONS`].
const CONTRADICTIONS_OUT: &str =
    include_str!("../../tests/fixtures/check/cluster/contradictions.out.json");

#[tokio::test]
async fn a_recorded_canary_labelled_normal_and_a_rule_for_no_service() {
    let report = check_recorded(&[INSTALL, CONTRADICTIONS], &cluster::Target::default()).await;
    let expected: Value = serde_json::from_str(CONTRADICTIONS_OUT).unwrap();
    assert_eq!(report.to_json(), expected, "{:#}", report.to_json());
    assert!(!report.is_sound(), "exit code 1");
}

/// A webhook called at a URL (out of the cluster, in development) has no
/// Service: one info finding naming the URL, never `no-ready-endpoints`,
/// and the Service's endpoints are not even read.
#[tokio::test]
async fn a_recorded_webhook_called_at_a_url_is_information_not_an_outage() {
    let mut install: Value = serde_json::from_str(INSTALL).unwrap();
    for item in install["items"].as_array_mut().unwrap() {
        if item["kind"] == "MutatingWebhookConfiguration" {
            for hook in item["webhooks"].as_array_mut().unwrap() {
                let config = hook["clientConfig"].as_object_mut().unwrap();
                config.remove("service");
                config.insert("url".into(), json!("https://192.168.49.1:8443/mutate"));
            }
        }
    }
    install["items"]
        .as_array_mut()
        .unwrap()
        .retain(|i| i["kind"] != "EndpointSlice");
    let install = install.to_string();
    let api = state(&[&install, SOUND]);
    let (client, served) = api.client();
    let report = cluster::run(client, &cluster::Target::default(), RECORDED_NOW)
        .await
        .unwrap();
    served.await.unwrap();
    let webhook: Vec<(&str, &str)> = report
        .findings
        .iter()
        .filter(|f| f.place == "webhook")
        .map(|f| (f.severity.as_str(), f.code))
        .collect();
    assert_eq!(webhook, [("info", "webhook-url")], "{:#?}", report.findings);
    assert_eq!(
        report.findings[0].message,
        "webhook labels.canary-injector.io is called at https://192.168.49.1:8443/mutate \
         (clientConfig.url, outside the cluster): whether it answers is not checked"
    );
    assert!(report.is_sound(), "information only: exit code 0");
    assert!(
        api.calls().iter().all(
            |c| c.path != "/apis/discovery.k8s.io/v1/namespaces/canary-injector/endpointslices"
        ),
        "no Service, no endpoints to read"
    );
}

#[tokio::test]
async fn a_recorded_cluster_whose_api_fails_is_an_error_not_a_report() {
    let api = state(&[INSTALL, SOUND]);
    api.outage(Some(503));
    let (client, _served) = api.client();
    let err = cluster::run(client, &cluster::Target::default(), RECORDED_NOW)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot read ConfigMap canary-injector/canary-injector-config:"),
        "{err}"
    );
}

#[test]
fn every_code_is_documented_in_the_docs() {
    let page = include_str!("../../docs/check.md");
    for code in CODES {
        assert!(
            page.contains(&format!("| `{code}` |")),
            "docs/check.md lacks {code}"
        );
    }
}

// === routing ===

fn svc(name: &str, annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
           "spec": {"selector": {"app": name}, "ports": [{"port": 80}]}})
}

fn slice(service: &str, pods: &[(&str, bool)]) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-abc"), "labels": {"kubernetes.io/service-name": service}},
           "endpoints": pods.iter().map(|(pod, ready)| json!({
               "addresses": ["10.0.0.1"], "conditions": {"ready": ready},
               "targetRef": {"kind": "Pod", "name": pod}})).collect::<Vec<_>>()})
}

fn dr(name: &str, host: &str, subsets: Value, managed: bool) -> Value {
    let labels = if managed {
        json!({"app.kubernetes.io/managed-by": "canary-injector"})
    } else {
        json!({})
    };
    json!({"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
           "metadata": {"name": name, "namespace": "shop", "labels": labels},
           "spec": {"host": host, "subsets": subsets}})
}

fn vs(name: &str, host: &str, routes: Value) -> Value {
    json!({"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
           "metadata": {"name": name, "namespace": "shop"},
           "spec": {"hosts": [host], "http": routes}})
}

fn header_route(tag: &str, host: &str, subset: &str) -> Value {
    json!({"match": [{"headers": {"x-canary-tag": {"exact": tag}}}],
           "route": [{"destination": {"host": host, "subset": subset}}]})
}

fn default_route(host: &str, subset: &str) -> Value {
    json!({"route": [{"destination": {"host": host, "subset": subset}}]})
}

/// `shop` with a checkout Service, a normal and a gray pod behind ready
/// endpoints, and hand-written rules that route both correctly.
fn routed(t: &Tls) -> Snapshot {
    let mut s = sound(t);
    let ns = shop(&mut s);
    for p in &mut ns.pods {
        p["metadata"]["labels"]["app"] = json!("checkout");
    }
    ns.services = vec![svc("checkout", json!({}))];
    ns.endpoint_slices = vec![slice(
        "checkout",
        &[("checkout-7d9f-a", true), ("checkout-gray-5c4b-b", true)],
    )];
    ns.rules = vec![
        dr(
            "checkout",
            "checkout",
            json!([
                {"name": "normal", "labels": {"stage": "normal"}},
                {"name": "feature-login", "labels": {"stage": "gray", "canarytag": "feature-login"}},
            ]),
            false,
        ),
        vs(
            "checkout",
            "checkout.shop.svc.cluster.local",
            json!([
                header_route("feature-login", "checkout", "feature-login"),
                default_route("checkout", "normal"),
            ]),
        ),
    ];
    s
}

#[test]
fn hand_written_rules_that_route_every_ready_pod_are_sound() {
    let t = tls(365);
    let r = report(&routed(&t));
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
}

#[test]
fn a_routed_subset_without_ready_pods_is_an_error() {
    let t = tls(365);
    let mut s = routed(&t);
    // The gray pod is not ready: its subset selects nothing, yet is routed.
    shop(&mut s).endpoint_slices = vec![slice(
        "checkout",
        &[("checkout-7d9f-a", true), ("checkout-gray-5c4b-b", false)],
    )];
    let f = only(&s);
    assert_eq!(
        (f.severity, f.code),
        (Severity::Error, "subset-selects-no-pod")
    );
    assert_eq!(f.place, "shop/DestinationRule/checkout");
    assert!(f.message.contains("Service checkout has no ready pod that subset feature-login (canarytag=feature-login,stage=gray) selects"), "{}", f.message);
}

#[test]
fn an_unrouted_subset_without_pods_is_a_warning_unless_ours_in_its_grace_period() {
    let t = tls(365);
    let mut s = routed(&t);
    shop(&mut s).rules[0]["spec"]["subsets"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "old", "labels": {"canarytag": "old"}}));
    let f = only(&s);
    assert_eq!(
        (f.severity, f.code),
        (Severity::Warning, "subset-selects-no-pod")
    );
    shop(&mut s).rules[0]["metadata"]["labels"] =
        json!({"app.kubernetes.io/managed-by": "canary-injector"});
    assert!(
        report(&s).findings.is_empty(),
        "kept for the removal grace period"
    );
}

#[test]
fn a_route_to_a_subset_no_rule_defines_is_an_error() {
    let t = tls(365);
    let mut s = routed(&t);
    shop(&mut s).rules[1]["spec"]["http"][0]["route"][0]["destination"]["subset"] =
        json!("feature-logn");
    let r = report(&s);
    assert!(
        codes(&r).contains(&"route-to-missing-subset"),
        "{:#?}",
        r.findings
    );
    let f = r
        .findings
        .iter()
        .find(|f| f.code == "route-to-missing-subset")
        .unwrap();
    assert_eq!(f.place, "shop/VirtualService/checkout");
}

#[test]
fn a_live_canary_without_a_header_route_is_a_warning() {
    let t = tls(365);
    let mut s = routed(&t);
    shop(&mut s).rules.pop();
    let r = report(&s);
    let f = r
        .findings
        .iter()
        .find(|f| f.code == "live-tag-without-route")
        .expect("{r:#?}");
    assert!(
        f.message
            .contains("canary feature-login has a ready pod behind Service checkout")
            && f.message.contains("share of all traffic"),
        "{}",
        f.message
    );
}

#[test]
fn two_rules_for_one_host_are_a_warning() {
    let t = tls(365);
    let mut s = routed(&t);
    let copy = {
        let mut d = shop(&mut s).rules[0].clone();
        d["metadata"]["name"] = json!("checkout-old");
        d["spec"]["host"] = json!("checkout.shop");
        d
    };
    shop(&mut s).rules.push(copy);
    let f = only(&s);
    assert_eq!(f.code, "duplicate-rules");
    assert!(
        f.message.contains("checkout, checkout-old"),
        "{}",
        f.message
    );
}

#[test]
fn a_routed_service_with_a_hand_written_rule_is_a_conflict() {
    let t = tls(365);
    let mut s = routed(&t);
    shop(&mut s).services = vec![svc(
        "checkout",
        json!({"canary-injector.io/routes": "true"}),
    )];
    let r = report(&s);
    assert!(
        codes(&r).iter().all(|c| *c == "routes-conflict"),
        "{:#?}",
        r.findings
    );
    let text: String = r.findings.iter().map(|f| f.message.clone()).collect();
    for kind in ["DestinationRule", "VirtualService"] {
        assert!(
            text.contains(&format!("a {kind} of the same name")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{kind} checkout (not managed")),
            "{text}"
        );
    }
}

/// `check -f` and `routes -f` read the same input the same way: a routed
/// Service whose workloads in the files are all canaries is a finding in
/// one and a warning in the other.
#[test]
fn check_f_and_routes_f_agree_on_a_routed_service_without_a_normal_workload() {
    let input = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, annotations: {canary-injector.io/routes: "true"}}
spec: {selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web-beta, namespace: shop}
spec:
  selector: {matchLabels: {app: web, track: beta}}
  template:
    metadata: {labels: {app: web, track: beta}, annotations: {canary-injector.io/tag: beta}}
    spec: {containers: [{name: web, image: web:2}]}
"#;
    let cfg = Config::default();
    let report = manifests::check_documents(input, "web.yaml", &cfg).unwrap();
    assert_eq!(codes(&report), ["no-normal-pod"], "{:#?}", report.findings);
    assert_eq!(report.findings[0].place, "shop/Service/web");
    let routed =
        crate::routes::offline::routes_documents(input, "web.yaml", &cfg, &istio_v1()).unwrap();
    assert!(
        routed
            .warnings
            .iter()
            .any(|w| w.contains("(Service web): no workload in the input is a normal pod")),
        "{:?}",
        routed.warnings
    );
    // With the normal release in the input, neither says anything.
    let both = format!(
        "{input}---\n{}",
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web, track: stable}}
  template:
    metadata: {labels: {app: web, track: stable}}
    spec: {containers: [{name: web, image: web:1}]}
"#
    );
    let report = manifests::check_documents(&both, "web.yaml", &cfg).unwrap();
    assert!(
        !codes(&report).contains(&"no-normal-pod"),
        "{:#?}",
        report.findings
    );
    let routed =
        crate::routes::offline::routes_documents(&both, "web.yaml", &cfg, &istio_v1()).unwrap();
    assert!(routed.warnings.iter().all(|w| !w.contains("normal pod")));
}

/// `routes -f` writes the weights and settings the annotations ask for,
/// and `check -f` reports the ones that cannot be used, as the controller
/// would read them.
#[test]
fn weights_and_route_settings_offline_and_in_check() {
    let input = |weight_b: &str, timeout: &str| {
        format!(
            r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations: {{canary-injector.io/routes: "true", canary-injector.io/route-timeout: "{timeout}",
                canary-injector.io/route-retries: "2/500ms"}}
spec: {{selector: {{app: web}}, ports: [{{port: 80}}]}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web, track: stable}}}}
  template:
    metadata: {{labels: {{app: web, track: stable}}}}
    spec: {{containers: [{{name: web, image: web:1}}]}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web-a, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web, track: a}}}}
  template:
    metadata: {{labels: {{app: web, track: a}},
               annotations: {{canary-injector.io/tag: a, canary-injector.io/weight: "70"}}}}
    spec: {{containers: [{{name: web, image: web:2}}]}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web-b, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web, track: b}}}}
  template:
    metadata: {{labels: {{app: web, track: b}},
               annotations: {{canary-injector.io/tag: b, canary-injector.io/weight: "{weight_b}"}}}}
    spec: {{containers: [{{name: web, image: web:3}}]}}
"#
        )
    };
    let cfg = Config::default();
    let api = &istio_v1();
    let vs = |text: &str| {
        let out = crate::routes::offline::routes_documents(text, "web.yaml", &cfg, api).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&out.text).unwrap();
        (docs[1].clone(), out.warnings)
    };
    // Usable: the split and the settings, as the controller writes them.
    let (good, warnings) = vs(&input("20", "3s"));
    assert!(warnings.is_empty(), "{warnings:?}");
    let http = good["spec"]["http"].as_array().unwrap();
    assert_eq!(
        http.last().unwrap()["route"],
        json!([{"destination": {"host": "web", "subset": "normal"}, "weight": 10},
               {"destination": {"host": "web", "subset": "a"}, "weight": 70},
               {"destination": {"host": "web", "subset": "b"}, "weight": 20}])
    );
    for route in http {
        assert_eq!(route["timeout"], "3s");
        assert_eq!(
            route["retries"],
            json!({"attempts": 2, "perTryTimeout": "0.5s"})
        );
    }
    let report = manifests::check_documents(&input("20", "3s"), "web.yaml", &cfg).unwrap();
    assert!(report.is_sound(), "{:#?}", report.findings);
    // 70 + 40 = 110, and a timeout that does not read.
    let (over, warnings) = vs(&input("40", "soon"));
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("add up to 110"), "{warnings:?}");
    assert!(
        over["spec"]["http"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r.get("timeout").is_none())
    );
    let report = manifests::check_documents(&input("40", "soon"), "web.yaml", &cfg).unwrap();
    assert_eq!(
        codes(&report),
        ["route-settings-invalid", "route-weights-invalid"],
        "{:#?}",
        report.findings
    );
    assert_eq!(
        report.findings[1].message,
        "the weights of its canaries add up to 110 (a 70, b 40), more than 100: the routes \
         controller keeps the split it had"
    );
    // A weight that is no percent: counts as 0, reported.
    let report = manifests::check_documents(&input("half", "3s"), "web.yaml", &cfg).unwrap();
    assert_eq!(
        codes(&report),
        ["route-weight-invalid"],
        "{:#?}",
        report.findings
    );
}

// === routing on the Gateway API ===

fn version_svc(name: &str, selector: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "shop",
                        "labels": {"app.kubernetes.io/managed-by": "canary-injector",
                                   "canary-injector.io/route-of": "checkout"}},
           "spec": {"selector": selector, "ports": [{"port": 80}]}})
}

fn http_route(name: &str, parent: &str, rules: Value, managed: bool) -> Value {
    let labels = if managed {
        json!({"app.kubernetes.io/managed-by": "canary-injector",
               "canary-injector.io/route-of": parent})
    } else {
        json!({})
    };
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
           "metadata": {"name": name, "namespace": "shop", "labels": labels},
           "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent}],
                    "rules": rules},
           "status": {"parents": [{
               "parentRef": {"group": "", "kind": "Service", "name": parent},
               "controllerName": "linkerd.io/gateway-controller",
               "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted"},
                              {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs"}]}]}})
}

fn gateway_rule(tag: Option<&str>, backend: &str) -> Value {
    let mut m = json!({"path": {"type": "PathPrefix", "value": "/"}});
    if let Some(t) = tag {
        m["headers"] = json!([{"type": "Exact", "name": "x-canary-tag", "value": t}]);
    }
    json!({"matches": [m],
           "backendRefs": [{"group": "", "kind": "Service", "name": backend, "port": 80, "weight": 1}]})
}

/// `shop` routed on the Gateway API: checkout asks for routes, its version
/// Services have the normal and the gray pod, our HTTPRoute sends the tag
/// to its Service and the rest to the normal one, and a mesh accepted it.
fn gateway_routed(t: &Tls) -> Snapshot {
    let mut s = routed(t);
    s.route_api = Some(RouteApi::GatewayApi);
    let ns = shop(&mut s);
    ns.services = vec![
        svc("checkout", json!({"canary-injector.io/routes": "true"})),
        version_svc(
            "checkout--normal",
            json!({"app": "checkout", "stage": "normal"}),
        ),
        version_svc(
            "checkout--feature-login",
            json!({"app": "checkout", "stage": "gray", "canarytag": "feature-login"}),
        ),
    ];
    ns.endpoint_slices = vec![
        slice(
            "checkout",
            &[("checkout-7d9f-a", true), ("checkout-gray-5c4b-b", true)],
        ),
        slice("checkout--normal", &[("checkout-7d9f-a", true)]),
        slice("checkout--feature-login", &[("checkout-gray-5c4b-b", true)]),
    ];
    ns.rules = vec![http_route(
        "checkout",
        "checkout",
        json!([
            gateway_rule(Some("feature-login"), "checkout--feature-login"),
            gateway_rule(None, "checkout--normal"),
        ]),
        true,
    )];
    s
}

#[test]
fn gateway_routes_that_reach_every_ready_pod_are_sound() {
    let t = tls(365);
    let r = report(&gateway_routed(&t));
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
}

#[test]
fn a_gateway_rule_to_a_service_without_ready_pods_is_an_error() {
    let t = tls(365);
    let mut s = gateway_routed(&t);
    shop(&mut s).endpoint_slices[2] = slice(
        "checkout--feature-login",
        &[("checkout-gray-5c4b-b", false)],
    );
    let f = only(&s);
    assert_eq!(
        (f.severity, f.code),
        (Severity::Error, "backend-selects-no-pod")
    );
    assert_eq!(f.place, "shop/HTTPRoute/checkout");
    assert!(
        f.message.contains(
            "to Service checkout--feature-login, which has no ready pod: they fail (503)"
        ),
        "{}",
        f.message
    );
    // A backend that does not exist at all.
    let mut s = gateway_routed(&t);
    shop(&mut s).services.remove(2);
    let codes = codes(&report(&s));
    assert!(codes.contains(&"backend-not-found"), "{codes:?}");
}

#[test]
fn a_gateway_route_no_mesh_accepted_is_a_warning_with_the_reason() {
    let t = tls(365);
    let mut s = gateway_routed(&t);
    shop(&mut s).rules[0]
        .as_object_mut()
        .unwrap()
        .remove("status");
    let f = only(&s);
    assert_eq!(
        (f.severity, f.code),
        (Severity::Warning, "route-not-accepted")
    );
    assert!(
        f.message.contains("without a mesh that implements GAMMA"),
        "{}",
        f.message
    );
    let mut s = gateway_routed(&t);
    shop(&mut s).rules[0]["status"]["parents"][0]["conditions"][0] =
        json!({"type": "Accepted", "status": "False", "reason": "NoMatchingParent"});
    let f = only(&s);
    assert!(
        f.message
            .contains("not accepted (linkerd.io/gateway-controller: NoMatchingParent)"),
        "{}",
        f.message
    );
    // A hand-written route is the mesh's business and the user's.
    let mut s = gateway_routed(&t);
    let route = &mut shop(&mut s).rules[0];
    route["metadata"]["labels"] = json!({});
    route.as_object_mut().unwrap().remove("status");
    assert!(!codes(&report(&s)).contains(&"route-not-accepted"));
}

#[test]
fn ambient_mode_without_a_waypoint_is_a_warning() {
    let t = tls(365);
    let mut s = gateway_routed(&t);
    shop(&mut s)
        .labels
        .insert("istio.io/dataplane-mode".into(), "ambient".into());
    let f = only(&s);
    assert_eq!(
        (f.severity, f.code),
        (Severity::Warning, "ambient-without-waypoint")
    );
    assert!(
        f.message.contains("ztunnel does not apply HTTPRoutes"),
        "{}",
        f.message
    );
    // A waypoint on the namespace, or on the Service, is enough.
    let mut ns_waypoint = s.clone();
    shop(&mut ns_waypoint)
        .labels
        .insert("istio.io/use-waypoint".into(), "waypoint".into());
    assert!(report(&ns_waypoint).findings.is_empty());
    shop(&mut s).services[0]["metadata"]["labels"] = json!({"istio.io/use-waypoint": "waypoint"});
    assert!(report(&s).findings.is_empty());
}

#[test]
fn on_the_gateway_api_a_foreign_route_is_a_conflict_and_a_missing_rule_is_said() {
    let t = tls(365);
    let mut s = gateway_routed(&t);
    shop(&mut s).rules.push(http_route(
        "by-hand",
        "checkout",
        json!([gateway_rule(None, "checkout")]),
        false,
    ));
    let f = only(&s);
    assert_eq!((f.severity, f.code), (Severity::Error, "routes-conflict"));
    assert!(
        f.message.contains(
            "HTTPRoute by-hand (not managed by canary-injector) has Service checkout as a parent"
        ),
        "{}",
        f.message
    );
    // A VirtualService is no conflict for a Service on the Gateway API.
    let mut s = gateway_routed(&t);
    shop(&mut s).rules.push(vs(
        "checkout",
        "checkout",
        json!([default_route("checkout", "normal")]),
    ));
    assert!(!codes(&report(&s)).contains(&"routes-conflict"));
    // A live canary without its rule.
    let mut s = gateway_routed(&t);
    shop(&mut s).rules[0]["spec"]["rules"]
        .as_array_mut()
        .unwrap()
        .remove(0);
    let codes = codes(&report(&s));
    assert!(codes.contains(&"live-tag-without-route"), "{codes:?}");
}

#[test]
fn check_f_checks_the_gateway_routes_routes_f_would_write() {
    let input = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {canary-injector.io/enabled: "true", istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations: {canary-injector.io/routes: "true", canary-injector.io/route-api: gateway-api}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: web:1}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web-beta, namespace: shop}
spec:
  template:
    metadata: {labels: {app: web}, annotations: {canary-injector.io/tag: beta}}
    spec: {containers: [{name: web, image: web:2}]}
"#;
    let r = super::manifests::check_documents(input, "web.yaml", &Config::default()).unwrap();
    // The generated route reaches both versions; ambient mode needs a waypoint.
    assert_eq!(codes(&r), ["ambient-without-waypoint"], "{:#?}", r.findings);
    let with_waypoint = input.replace(
        "istio.io/dataplane-mode: ambient}",
        "istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}",
    );
    let r =
        super::manifests::check_documents(&with_waypoint, "web.yaml", &Config::default()).unwrap();
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
}
