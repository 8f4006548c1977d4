//! `certs --secret` against the in-memory apiserver of [`crate::testing`]
//! ([`FakeApiServer`](crate::testing::FakeApiServer): objects kept, server-side
//! apply, JSON Patch `test`, `resourceVersion` conflicts, every call
//! recorded, failures and concurrent writers injected).

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use http::Method;
use serde_json::{Value, json};

use super::*;
use crate::certs::{Bundle, service_sans};
use crate::testing::{FakeApiServer as ApiServer, Hook, Seen as Call};

const TLS: &str = "/api/v1/namespaces/canary-injector/secrets/canary-injector-tls";
const CA: &str = "/api/v1/namespaces/canary-injector/secrets/canary-injector-ca";
const CONFIG: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/canary-injector";
const WEBHOOKS: [&str; 2] = [
    "labels.canary-injector.io",
    "replicasets.canary-injector.io",
];
const APPLY: &str = "application/apply-patch+yaml";
const JSON_PATCH: &str = "application/json-patch+json";
const HOUR: Duration = Duration::from_secs(3600);
const YEAR: Duration = Duration::from_secs(8760 * 3600);

/// Runs `ensure` against `api`; the served client goes away with it.
async fn ensure_on(api: &ApiServer) -> Result<Outcome, ClusterError> {
    let (client, served) = api.client();
    let result = tokio::time::timeout(Duration::from_secs(20), ensure(client, &target()))
        .await
        .expect("ensure() did not finish");
    served.await.unwrap();
    result
}

fn target() -> Target {
    Target {
        namespace: "canary-injector".into(),
        secret: "canary-injector-tls".into(),
        ca_secret: "canary-injector-ca".into(),
        webhook_configuration: "canary-injector".into(),
        sans: service_sans("canary-injector", "canary-injector", "cluster.local"),
        lifetimes: Lifetimes::default(),
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(v: &Value) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("base64 string"))
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

fn ca(validity: Duration) -> Ca {
    Ca::generate("test CA", validity).unwrap()
}

/// A serving certificate from `ca` issued `age` ago.
fn serving(ca: &Ca, age: Duration) -> Bundle {
    ca.issue_at(&target().sans, YEAR, OffsetDateTime::now_utc() - age)
        .unwrap()
}

/// The TLS Secret as this version writes it.
fn tls_json(b: &Bundle) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": "canary-injector-tls", "namespace": "canary-injector",
            "labels": {"keep": "me"},
        },
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": b64(&b.cert_pem), "tls.key": b64(&b.key_pem), "ca.crt": b64(&b.ca_cert_pem),
        },
    })
}

/// The TLS Secret as older versions wrote it, with the CA key in it.
fn legacy_tls_json(b: &Bundle) -> Value {
    let mut s = tls_json(b);
    s["data"]["ca.key"] = json!(b64(&b.ca_key_pem));
    s
}

fn ca_json(ca: &Ca) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "canary-injector-ca", "namespace": "canary-injector"},
        "type": "Opaque",
        "data": {"ca.crt": b64(ca.cert_pem()), "ca.key": b64(ca.key_pem())},
    })
}

/// The webhook configuration with two webhooks, each with `bundle` (PEM)
/// as caBundle when given.
fn config_json(bundle: Option<&str>) -> Value {
    let webhooks: Vec<Value> = WEBHOOKS
        .iter()
        .map(|name| {
            let mut client_config = json!({
                "service": {"name": "canary-injector", "namespace": "canary-injector", "path": "/mutate", "port": 443},
            });
            if let Some(pem) = bundle {
                client_config["caBundle"] = json!(b64(pem));
            }
            json!({
                "name": name,
                "admissionReviewVersions": ["v1", "v1beta1"],
                "sideEffects": "None",
                "clientConfig": client_config,
            })
        })
        .collect();
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "canary-injector"},
        "webhooks": webhooks,
    })
}

/// The DER of every certificate of a PEM text.
fn ders(pem: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| p.unwrap().contents)
        .collect()
}

/// The invariant of every state a run leaves: each webhook's caBundle
/// trusts the CA that signed the serving certificate in the TLS Secret, and
/// the TLS Secret holds no CA key. Returns the caBundle's CAs (DER).
fn assert_trusted(api: &ApiServer) -> Vec<Vec<u8>> {
    let tls = api.get(TLS).expect("TLS Secret");
    assert!(
        tls["data"].get("ca.key").is_none(),
        "ca.key in the mounted Secret"
    );
    let leaf_pem = unb64(&tls["data"]["tls.crt"]);
    let leaf_der = ders(&leaf_pem).remove(0);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    let config = api.get(CONFIG).unwrap();
    let mut bundles = Vec::new();
    for w in config["webhooks"].as_array().unwrap() {
        let bundle = ders(&unb64(&w["clientConfig"]["caBundle"]));
        let trusted = bundle.iter().any(|ca| {
            let (_, ca) = x509_parser::parse_x509_certificate(ca).unwrap();
            leaf.verify_signature(Some(ca.public_key())).is_ok()
        });
        assert!(
            trusted,
            "webhook {} does not trust the served certificate",
            w["name"]
        );
        bundles.push(bundle);
    }
    assert!(
        bundles.windows(2).all(|w| w[0] == w[1]),
        "every webhook the same"
    );
    bundles.remove(0)
}

fn der_of(pem: &str) -> Vec<u8> {
    ders(pem).remove(0)
}

/// Checks one server-side apply request of a Secret: path, query, content
/// type, and the body's fixed parts; returns the body.
fn check_apply(
    call: &Call,
    path: &str,
    r#type: &str,
    keys: &[&str],
    version: Option<&str>,
) -> Value {
    assert_eq!((&call.method, call.path.as_str()), (&Method::PATCH, path));
    assert_eq!(call.content_type, APPLY);
    assert_eq!(
        call.query,
        BTreeMap::from([
            (
                "fieldManager".to_owned(),
                "canary-injector-certs".to_owned()
            ),
            ("force".to_owned(), "true".to_owned()),
        ])
    );
    let body = &call.body;
    assert_eq!(body["apiVersion"], "v1");
    assert_eq!(body["kind"], "Secret");
    assert_eq!(body["metadata"]["name"].as_str(), path.rsplit('/').next());
    assert_eq!(body["metadata"]["namespace"], "canary-injector");
    assert_eq!(
        body["metadata"]["labels"],
        json!({"app.kubernetes.io/name": "canary-injector", "app.kubernetes.io/managed-by": "canary-injector-certs"})
    );
    assert_eq!(body["metadata"]["resourceVersion"].as_str(), version);
    assert_eq!(body["type"], r#type);
    let mut found: Vec<&str> = body["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    found.sort_unstable();
    assert_eq!(found, keys);
    let mut fields: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["apiVersion", "data", "kind", "metadata", "type"],
        "nothing else applied"
    );
    body.clone()
}

#[tokio::test]
async fn first_install_writes_the_ca_then_the_bundle_then_the_tls_secret() {
    let api = ApiServer::with(&[(CONFIG, config_json(None))]);
    let outcome = ensure_on(&api).await.unwrap();
    assert_eq!(outcome.ca, CaOutcome::Created);
    assert_eq!(
        outcome.ca_bundle,
        CaBundleOutcome::Published { webhooks: 2 }
    );
    assert_eq!(outcome.tls, TlsOutcome::Created);
    assert!(!outcome.removed_tls_ca_key);

    let calls = api.calls();
    let summary: Vec<(Method, &str)> = calls
        .iter()
        .map(|c| (c.method.clone(), c.path.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (Method::GET, TLS),
            (Method::GET, CA),
            (Method::GET, CONFIG),
            (Method::PATCH, CA),
            (Method::PATCH, CONFIG),
            (Method::PATCH, TLS),
        ]
    );
    // Creates by server-side apply, so RBAC can name the Secrets; no
    // resourceVersion (there is none yet).
    let ca_body = check_apply(&calls[3], CA, "Opaque", &["ca.crt", "ca.key"], None);
    let ca_pem = unb64(&ca_body["data"]["ca.crt"]);
    assert_eq!(ca_pem, outcome.ca_cert_pem);
    let config_rv = calls[4].body[0].clone();
    assert_eq!(
        calls[4].body,
        json!([
            config_rv,
            {"op": "test", "path": "/webhooks/0/name", "value": WEBHOOKS[0]},
            {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": b64(&ca_pem)},
            {"op": "test", "path": "/webhooks/1/name", "value": WEBHOOKS[1]},
            {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": b64(&ca_pem)},
        ])
    );
    assert_eq!(config_rv["op"], "test");
    assert_eq!(config_rv["path"], "/metadata/resourceVersion");
    assert_eq!(calls[4].content_type, JSON_PATCH);
    let tls_body = check_apply(
        &calls[5],
        TLS,
        "kubernetes.io/tls",
        &["ca.crt", "tls.crt", "tls.key"],
        None,
    );
    assert_eq!(unb64(&tls_body["data"]["ca.crt"]), ca_pem);
    assert_eq!(assert_trusted(&api), [der_of(&ca_pem)]);

    // What was written is what the next run keeps: only reads.
    let again = ensure_on(&api).await.unwrap();
    assert_eq!(
        (again.ca, again.ca_bundle, again.tls),
        (
            CaOutcome::Unchanged,
            CaBundleOutcome::Unchanged,
            TlsOutcome::Unchanged
        )
    );
    assert_eq!(again.ca_cert_pem, ca_pem);
    assert!(api.calls().iter().all(|c| !c.is_write()));
}

#[tokio::test]
async fn renewal_carries_the_resource_version_and_a_conflict_restarts_the_run() {
    let ca = ca(10 * YEAR);
    let old = ca
        .issue_at(&target().sans, HOUR * 2, OffsetDateTime::now_utc())
        .unwrap();
    let api = ApiServer::with(&[
        (CA, ca_json(&ca)),
        (TLS, tls_json(&old)),
        (CONFIG, config_json(Some(ca.cert_pem()))),
    ]);
    let rv = api.get(TLS).unwrap()["metadata"]["resourceVersion"].clone();
    // Someone labels the Secret between our read and our write.
    api.hook(Method::PATCH, TLS, Hook::Touch);
    let outcome = ensure_on(&api).await.unwrap();
    assert_eq!(
        outcome.tls,
        TlsOutcome::Renewed(RenewReason::Expiring("tls.crt"))
    );
    assert_eq!(outcome.ca, CaOutcome::Unchanged);
    assert_eq!(outcome.ca_bundle, CaBundleOutcome::Unchanged);

    let writes: Vec<Call> = api.calls().into_iter().filter(Call::is_write).collect();
    assert_eq!(writes.len(), 2, "{writes:?}");
    let keys = ["ca.crt", "tls.crt", "tls.key"];
    check_apply(&writes[0], TLS, "kubernetes.io/tls", &keys, rv.as_str());
    // The retry read the Secret again and carries the version it found.
    let reread = writes[1].body["metadata"]["resourceVersion"]
        .as_str()
        .unwrap();
    assert_ne!(Some(reread), rv.as_str());
    let body = check_apply(&writes[1], TLS, "kubernetes.io/tls", &keys, Some(reread));
    assert_eq!(unb64(&body["data"]["ca.crt"]), ca.cert_pem());
    assert_ne!(unb64(&body["data"]["tls.crt"]), old.cert_pem);
    let stored = api.get(TLS).unwrap();
    assert_eq!(stored["data"]["tls.crt"], body["data"]["tls.crt"]);
    assert_eq!(
        stored["metadata"]["labels"]["keep"], "me",
        "other labels kept"
    );
    assert_eq!(stored["metadata"]["labels"]["touched-by"], "someone-else");
    assert_eq!(assert_trusted(&api), [der_of(ca.cert_pem())]);
}

/// The CA is replaced with an overlap, and a failed caBundle patch leaves a
/// working state that the next run completes.
#[tokio::test]
async fn ca_replacement_survives_a_failed_bundle_patch_and_prunes_the_old_ca_later() {
    let old = ca(HOUR * 24 * 10);
    let api = ApiServer::with(&[
        (CA, ca_json(&old)),
        (TLS, tls_json(&serving(&old, HOUR))),
        (CONFIG, config_json(Some(old.cert_pem()))),
    ]);
    api.hook(Method::PATCH, CONFIG, Hook::Fail(500));
    let err = ensure_on(&api).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot patch MutatingWebhookConfiguration canary-injector"
    );
    let writes: Vec<(Method, String)> = api
        .calls()
        .into_iter()
        .filter(Call::is_write)
        .map(|c| (c.method, c.path))
        .collect();
    assert_eq!(
        writes,
        [
            (Method::PATCH, CA.to_owned()),
            (Method::PATCH, CONFIG.to_owned())
        ]
    );
    // The TLS Secret was not touched: pods serve the old CA's certificate,
    // which the unchanged bundle still trusts.
    assert_eq!(assert_trusted(&api), [der_of(old.cert_pem())]);
    let new_pem = unb64(&api.get(CA).unwrap()["data"]["ca.crt"]);
    assert_ne!(new_pem, old.cert_pem());

    // The rerun publishes both CAs, then switches the serving certificate.
    let outcome = ensure_on(&api).await.unwrap();
    assert_eq!(outcome.ca, CaOutcome::Unchanged);
    assert_eq!(
        outcome.ca_bundle,
        CaBundleOutcome::Published { webhooks: 2 }
    );
    assert_eq!(outcome.tls, TlsOutcome::Renewed(RenewReason::NotSignedByCa));
    let order: Vec<String> = api
        .calls()
        .into_iter()
        .filter(Call::is_write)
        .map(|c| c.path)
        .collect();
    assert_eq!(order, [CONFIG, TLS]);
    assert_eq!(
        assert_trusted(&api),
        [der_of(old.cert_pem()), der_of(&new_pem)],
        "old and new CA while pods reload"
    );

    // A run right after keeps the old CA: the pods may still serve it.
    let outcome = ensure_on(&api).await.unwrap();
    assert_eq!(outcome.ca_bundle, CaBundleOutcome::Unchanged);
    assert!(api.calls().iter().all(|c| !c.is_write()));

    // Once the new serving certificate is older than the overlap, the old
    // CA goes (simulated: a certificate of the new CA issued an hour ago).
    let new = Ca::from_pem(&new_pem, &unb64(&api.get(CA).unwrap()["data"]["ca.key"])).unwrap();
    api.put(TLS, tls_json(&serving(&new, HOUR)));
    let outcome = ensure_on(&api).await.unwrap();
    assert_eq!(outcome.ca_bundle, CaBundleOutcome::Pruned { webhooks: 2 });
    assert_eq!(outcome.tls, TlsOutcome::Unchanged);
    assert_eq!(assert_trusted(&api), [der_of(&new_pem)]);
}

#[tokio::test]
async fn ca_key_in_an_old_tls_secret_moves_to_the_ca_secret() {
    let ca = ca(10 * YEAR);
    let served = serving(&ca, HOUR);
    let api = ApiServer::with(&[
        (TLS, legacy_tls_json(&served)),
        (CONFIG, config_json(Some(ca.cert_pem()))),
    ]);
    let outcome = ensure_on(&api).await.unwrap();
    assert_eq!(outcome.ca, CaOutcome::Moved);
    assert_eq!(
        outcome.ca_bundle,
        CaBundleOutcome::Unchanged,
        "caBundle stays valid"
    );
    assert_eq!(outcome.tls, TlsOutcome::Unchanged);
    assert!(outcome.removed_tls_ca_key);

    let writes: Vec<Call> = api.calls().into_iter().filter(Call::is_write).collect();
    assert_eq!(writes.len(), 2, "{writes:?}");
    // First the CA Secret, with the same CA ...
    let body = check_apply(&writes[0], CA, "Opaque", &["ca.crt", "ca.key"], None);
    assert_eq!(unb64(&body["data"]["ca.crt"]), ca.cert_pem());
    assert_eq!(unb64(&body["data"]["ca.key"]), ca.key_pem());
    // ... then the key leaves the TLS Secret, guarded by its resourceVersion.
    assert_eq!(
        (&writes[1].method, writes[1].path.as_str()),
        (&Method::PATCH, TLS)
    );
    assert_eq!(writes[1].content_type, JSON_PATCH);
    assert_eq!(writes[1].body[0]["op"], "test");
    assert_eq!(writes[1].body[0]["path"], "/metadata/resourceVersion");
    assert_eq!(
        writes[1].body[1],
        json!({"op": "remove", "path": "/data/ca.key"})
    );
    let tls = api.get(TLS).unwrap();
    assert_eq!(
        unb64(&tls["data"]["tls.crt"]),
        served.cert_pem,
        "serving pair untouched"
    );
    assert_eq!(assert_trusted(&api), [der_of(ca.cert_pem())]);

    // Done: the next run only reads.
    ensure_on(&api).await.unwrap();
    assert!(api.calls().iter().all(|c| !c.is_write()));
}

#[tokio::test]
async fn a_concurrent_bundle_change_restarts_the_run_from_a_fresh_read() {
    let api = ApiServer::with(&[(CONFIG, config_json(None))]);
    api.hook(Method::PATCH, CONFIG, Hook::Touch);
    let outcome = ensure_on(&api).await.unwrap();
    let summary: Vec<(Method, String)> = api
        .calls()
        .into_iter()
        .map(|c| (c.method, c.path))
        .collect();
    let get = |p: &str| (Method::GET, p.to_owned());
    let patch = |p: &str| (Method::PATCH, p.to_owned());
    assert_eq!(
        summary,
        [
            get(TLS),
            get(CA),
            get(CONFIG),
            patch(CA),
            patch(CONFIG),
            // 422 from the resourceVersion test: everything is read again,
            // and the CA just written is used.
            get(TLS),
            get(CA),
            get(CONFIG),
            patch(CONFIG),
            patch(TLS),
        ]
    );
    assert_eq!(outcome.ca, CaOutcome::Unchanged);
    assert_eq!(assert_trusted(&api).len(), 1);
}

#[tokio::test]
async fn endless_conflicts_give_up_after_the_attempts() {
    let api = ApiServer::with(&[(CONFIG, config_json(None))]);
    for _ in 0..ATTEMPTS {
        api.hook(Method::PATCH, CONFIG, Hook::Touch);
    }
    let err = ensure_on(&api).await.unwrap_err();
    assert!(matches!(err, ClusterError::Conflict { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "gave up after 3 conflicting concurrent updates (MutatingWebhookConfiguration canary-injector)"
    );
    assert!(
        api.get(TLS).is_none(),
        "no serving certificate the apiserver does not trust"
    );
}

#[tokio::test]
async fn missing_webhook_configuration_is_an_error_before_any_write() {
    let api = ApiServer::default();
    let err = ensure_on(&api).await.unwrap_err();
    assert!(
        matches!(&err, ClusterError::WebhookConfigurationNotFound(n) if n == "canary-injector"),
        "{err:?}"
    );
    assert!(err.to_string().contains("canary-injector not found"));
    assert!(api.calls().iter().all(|c| !c.is_write()));
}

#[tokio::test]
async fn forbidden_is_reported_with_the_action() {
    let api = ApiServer::default();
    api.hook(Method::GET, TLS, Hook::Fail(403));
    let err = ensure_on(&api).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot get Secret canary-injector/canary-injector-tls"
    );
    assert!(matches!(err, ClusterError::Api { .. }));
}

#[tokio::test]
async fn a_secret_of_another_type_keeps_its_type() {
    // Made by hand as an Opaque Secret: the type is immutable, so the apply
    // repeats it rather than failing with 422.
    let ca = ca(10 * YEAR);
    let mut tls = tls_json(
        &ca.issue_at(&target().sans, HOUR, OffsetDateTime::now_utc())
            .unwrap(),
    );
    tls["type"] = json!("Opaque");
    let api = ApiServer::with(&[
        (CA, ca_json(&ca)),
        (TLS, tls),
        (CONFIG, config_json(Some(ca.cert_pem()))),
    ]);
    let outcome = ensure_on(&api).await.unwrap();
    assert!(matches!(outcome.tls, TlsOutcome::Renewed(_)));
    let apply = api
        .calls()
        .into_iter()
        .find(|c| c.path == TLS && c.is_write())
        .unwrap();
    assert_eq!(apply.body["type"], "Opaque");
}

#[test]
fn default_ca_secret_names() {
    assert_eq!(
        default_ca_secret("canary-injector-tls"),
        "canary-injector-ca"
    );
    assert_eq!(default_ca_secret("webhook"), "webhook-ca");
    assert_eq!(default_ca_secret("-tls"), "-tls-ca");
}
