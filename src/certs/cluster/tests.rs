//! `certs --secret` against a mock apiserver (kube-rs' tower-test pattern):
//! each scenario lists the exact requests the code must make, answers them
//! as an apiserver would, and fails on a missing or unexpected call.

use std::time::Duration;

use base64::Engine as _;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock;

use super::*;
use crate::certs::{Ca, service_sans};

const SECRETS: &str = "/api/v1/namespaces/canary-injector/secrets";
const SECRET: &str = "/api/v1/namespaces/canary-injector/secrets/canary-injector-tls";
const CONFIG: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/canary-injector";
const WEBHOOKS: [&str; 2] = [
    "labels.canary-injector.io",
    "replicasets.canary-injector.io",
];

type Handle = mock::Handle<Request<Body>, Response<Body>>;
type Reply = mock::SendResponse<Response<Body>>;

/// The mock apiserver's side of the pair.
struct ApiServer(Handle);

impl ApiServer {
    /// Waits for the next request, checks method and path, returns its JSON
    /// body (`Null` when empty) and the responder.
    async fn expect(&mut self, method: Method, path: &str) -> (Value, Reply) {
        let (req, reply) = self
            .0
            .next_request()
            .await
            .unwrap_or_else(|| panic!("expected {method} {path}, but the client went away"));
        assert_eq!(
            (req.method(), req.uri().path()),
            (&method, path),
            "unexpected request"
        );
        if method == Method::PATCH {
            assert_eq!(
                req.headers()[http::header::CONTENT_TYPE],
                "application/json-patch+json"
            );
        }
        let bytes = req.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (body, reply)
    }
}

fn respond(reply: Reply, code: u16, body: &Value) {
    let resp = Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap();
    reply.send_response(resp);
}

/// A `Status` failure as the apiserver sends it.
fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn target() -> Target {
    Target {
        namespace: "canary-injector".into(),
        secret: "canary-injector-tls".into(),
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

/// A Secret as the apiserver returns it, holding `bundle`.
fn secret_json(bundle: &Bundle, resource_version: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": "canary-injector-tls", "namespace": "canary-injector",
            "resourceVersion": resource_version, "uid": "0b9e4f5e-0000-4000-8000-000000000001",
            "labels": {"keep": "me"},
        },
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": b64(&bundle.cert_pem), "tls.key": b64(&bundle.key_pem),
            "ca.crt": b64(&bundle.ca_cert_pem), "ca.key": b64(&bundle.ca_key_pem),
        },
    })
}

/// The webhook configuration from deploy/base/webhook.yaml (two webhooks),
/// with `ca_bundle` (PEM) in every clientConfig when given.
fn config_json(ca_bundle: Option<&str>, resource_version: &str) -> Value {
    let webhooks: Vec<Value> = WEBHOOKS
        .iter()
        .map(|name| {
            let mut client_config = json!({
                "service": {"name": "canary-injector", "namespace": "canary-injector", "path": "/mutate", "port": 443},
            });
            if let Some(ca) = ca_bundle {
                client_config["caBundle"] = json!(b64(ca));
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
        "metadata": {"name": "canary-injector", "resourceVersion": resource_version},
        "webhooks": webhooks,
    })
}

fn valid_bundle(validity: Duration) -> Bundle {
    Ca::generate("other CA", Duration::from_secs(87600 * 3600))
        .unwrap()
        .issue(&target().sans, validity)
        .unwrap()
}

/// Checks a JSON Patch that sets both webhooks' caBundle to `ca_pem`, and
/// applies it to `config` as the apiserver would.
fn check_ca_bundle_patch(patch: &Value, config: &Value, ca_pem: &str) -> Value {
    let expected = json!([
        {"op": "test", "path": "/webhooks/0/name", "value": WEBHOOKS[0]},
        {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": b64(ca_pem)},
        {"op": "test", "path": "/webhooks/1/name", "value": WEBHOOKS[1]},
        {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": b64(ca_pem)},
    ]);
    assert_eq!(patch, &expected);
    let mut patched = config.clone();
    let ops: json_patch::Patch = serde_json::from_value(patch.clone()).unwrap();
    json_patch::patch(&mut patched, &ops).unwrap();
    patched
}

/// Runs `ensure` against a scenario; both must finish within the timeout.
async fn run<F>(scenario: impl FnOnce(ApiServer) -> F) -> Result<Outcome, ClusterError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let verifier = tokio::spawn(scenario(ApiServer(handle)));
    let client = Client::new(svc, "default");
    let limit = Duration::from_secs(10);
    let result = tokio::time::timeout(limit, ensure(client, &target()))
        .await
        .expect("ensure() did not finish: a request was never answered");
    tokio::time::timeout(limit, verifier)
        .await
        .expect("the scenario did not finish: an expected request never came")
        .expect("scenario assertions");
    result
}

#[tokio::test]
async fn absent_secret_is_created_and_ca_bundle_set_on_every_webhook() {
    let outcome = run(|mut api| async move {
        let (_, reply) = api.expect(Method::GET, SECRET).await;
        respond(
            reply,
            404,
            &status(404, "NotFound", "secrets \"canary-injector-tls\" not found"),
        );

        let (mut secret, reply) = api.expect(Method::POST, SECRETS).await;
        assert_eq!(secret["type"], "kubernetes.io/tls");
        assert_eq!(secret["metadata"]["name"], "canary-injector-tls");
        assert_eq!(secret["metadata"]["namespace"], "canary-injector");
        let data = secret["data"].as_object().unwrap();
        let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["ca.crt", "ca.key", "tls.crt", "tls.key"]);
        let ca_pem = unb64(&data["ca.crt"]);
        // What was created is what `plan_secret` accepts.
        let stored: Secret = serde_json::from_value(secret.clone()).unwrap();
        let now = OffsetDateTime::now_utc();
        assert_eq!(
            plan_secret(
                Some(&secret_data(&stored)),
                now,
                &target().sans,
                Lifetimes::default().renew_before
            ),
            SecretAction::Keep
        );
        secret["metadata"]["resourceVersion"] = json!("1");
        respond(reply, 201, &secret);

        let config = config_json(None, "7");
        let (_, reply) = api.expect(Method::GET, CONFIG).await;
        respond(reply, 200, &config);

        let (patch, reply) = api.expect(Method::PATCH, CONFIG).await;
        let patched = check_ca_bundle_patch(&patch, &config, &ca_pem);
        respond(reply, 200, &patched);
    })
    .await
    .unwrap();
    assert_eq!(outcome.secret, SecretOutcome::Created);
    assert_eq!(outcome.ca_bundle, CaBundleOutcome::Patched { webhooks: 2 });
}

#[tokio::test]
async fn valid_secret_and_current_ca_bundle_cause_no_writes() {
    let bundle = valid_bundle(Duration::from_secs(8760 * 3600));
    let ca_pem = bundle.ca_cert_pem.clone();
    let outcome = run(move |mut api| async move {
        let (_, reply) = api.expect(Method::GET, SECRET).await;
        respond(reply, 200, &secret_json(&bundle, "5"));
        let (_, reply) = api.expect(Method::GET, CONFIG).await;
        respond(reply, 200, &config_json(Some(&bundle.ca_cert_pem), "7"));
        // Nothing else: a write would find the handle gone and fail ensure().
    })
    .await
    .unwrap();
    assert_eq!(outcome.secret, SecretOutcome::Unchanged);
    assert_eq!(outcome.ca_bundle, CaBundleOutcome::Unchanged);
    assert_eq!(outcome.ca_cert_pem, ca_pem);
}

#[tokio::test]
async fn create_conflict_rereads_and_uses_the_winners_ca() {
    let winner = valid_bundle(Duration::from_secs(8760 * 3600));
    let winner_ca = winner.ca_cert_pem.clone();
    let outcome = run(move |mut api| async move {
        let (_, reply) = api.expect(Method::GET, SECRET).await;
        respond(reply, 404, &status(404, "NotFound", "not found"));
        // A racing Job created it between our GET and POST.
        let (_, reply) = api.expect(Method::POST, SECRETS).await;
        respond(reply, 409, &status(409, "AlreadyExists", "secrets \"canary-injector-tls\" already exists"));
        let (_, reply) = api.expect(Method::GET, SECRET).await;
        respond(reply, 200, &secret_json(&winner, "2"));

        // One webhook already trusts the winner's CA: only the other is patched.
        let mut config = config_json(None, "7");
        config["webhooks"][0]["clientConfig"]["caBundle"] = json!(b64(&winner.ca_cert_pem));
        let (_, reply) = api.expect(Method::GET, CONFIG).await;
        respond(reply, 200, &config);
        let (patch, reply) = api.expect(Method::PATCH, CONFIG).await;
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/webhooks/1/name", "value": WEBHOOKS[1]},
                {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": b64(&winner.ca_cert_pem)},
            ])
        );
        respond(reply, 200, &config);
    })
    .await
    .unwrap();
    assert_eq!(outcome.secret, SecretOutcome::Unchanged);
    assert_eq!(outcome.ca_bundle, CaBundleOutcome::Patched { webhooks: 1 });
    assert_eq!(outcome.ca_cert_pem, winner_ca);
}

#[tokio::test]
async fn missing_webhook_configuration_is_an_error() {
    let bundle = valid_bundle(Duration::from_secs(8760 * 3600));
    let err = run(move |mut api| async move {
        let (_, reply) = api.expect(Method::GET, SECRET).await;
        respond(reply, 200, &secret_json(&bundle, "5"));
        let (_, reply) = api.expect(Method::GET, CONFIG).await;
        respond(reply, 404, &status(404, "NotFound", "not found"));
    })
    .await
    .unwrap_err();
    assert!(
        matches!(&err, ClusterError::WebhookConfigurationNotFound(n) if n == "canary-injector"),
        "{err:?}"
    );
    assert!(err.to_string().contains("canary-injector not found"));
}

#[tokio::test]
async fn expiring_certificate_is_replaced_with_resource_version_and_retried_on_conflict() {
    let old = valid_bundle(Duration::from_secs(3600));
    let ca_pem = old.ca_cert_pem.clone();
    let outcome = run(move |mut api| async move {
        let (_, reply) = api.expect(Method::GET, SECRET).await;
        respond(reply, 200, &secret_json(&old, "5"));
        let (put, reply) = api.expect(Method::PUT, SECRET).await;
        assert_eq!(put["metadata"]["resourceVersion"], "5");
        respond(
            reply,
            409,
            &status(409, "Conflict", "the object has been modified"),
        );

        // Someone touched it (not the certificate): read again, write again.
        let (_, reply) = api.expect(Method::GET, SECRET).await;
        respond(reply, 200, &secret_json(&old, "6"));
        let (put, reply) = api.expect(Method::PUT, SECRET).await;
        assert_eq!(put["metadata"]["resourceVersion"], "6");
        assert_eq!(put["metadata"]["labels"]["keep"], "me", "metadata is kept");
        assert_eq!(put["type"], "kubernetes.io/tls");
        // Same CA, new serving certificate.
        assert_eq!(unb64(&put["data"]["ca.crt"]), old.ca_cert_pem);
        assert_eq!(unb64(&put["data"]["ca.key"]), old.ca_key_pem);
        assert_ne!(unb64(&put["data"]["tls.crt"]), old.cert_pem);
        assert_ne!(unb64(&put["data"]["tls.key"]), old.key_pem);
        respond(reply, 200, &put);

        let (_, reply) = api.expect(Method::GET, CONFIG).await;
        respond(reply, 200, &config_json(Some(&old.ca_cert_pem), "7"));
    })
    .await
    .unwrap();
    assert_eq!(
        outcome.secret,
        SecretOutcome::Renewed {
            new_ca: false,
            reason: RenewReason::Expiring(TLS_CRT)
        }
    );
    assert_eq!(outcome.ca_bundle, CaBundleOutcome::Unchanged);
    assert_eq!(outcome.ca_cert_pem, ca_pem);
}

#[tokio::test]
async fn unusable_ca_is_replaced_and_the_new_bundle_patched() {
    let mut old = valid_bundle(Duration::from_secs(8760 * 3600));
    old.ca_key_pem = "garbage".into();
    let outcome = run(move |mut api| async move {
        let (_, reply) = api.expect(Method::GET, SECRET).await;
        respond(reply, 200, &secret_json(&old, "5"));
        let (put, reply) = api.expect(Method::PUT, SECRET).await;
        let new_ca = unb64(&put["data"]["ca.crt"]);
        assert_ne!(new_ca, old.ca_cert_pem);
        respond(reply, 200, &put);

        let config = config_json(Some(&old.ca_cert_pem), "7");
        let (_, reply) = api.expect(Method::GET, CONFIG).await;
        respond(reply, 200, &config);
        let (patch, reply) = api.expect(Method::PATCH, CONFIG).await;
        let patched = check_ca_bundle_patch(&patch, &config, &new_ca);
        respond(reply, 200, &patched);
    })
    .await
    .unwrap();
    assert!(matches!(
        outcome.secret,
        SecretOutcome::Renewed { new_ca: true, .. }
    ));
    assert_eq!(outcome.ca_bundle, CaBundleOutcome::Patched { webhooks: 2 });
}

#[tokio::test]
async fn failed_patch_test_rereads_the_configuration() {
    let bundle = valid_bundle(Duration::from_secs(8760 * 3600));
    let outcome = run(move |mut api| async move {
        let (_, reply) = api.expect(Method::GET, SECRET).await;
        respond(reply, 200, &secret_json(&bundle, "5"));
        let config = config_json(None, "7");
        let (_, reply) = api.expect(Method::GET, CONFIG).await;
        respond(reply, 200, &config);
        let (_, reply) = api.expect(Method::PATCH, CONFIG).await;
        // The list changed between GET and PATCH: a `test` op failed.
        respond(
            reply,
            422,
            &status(
                422,
                "Invalid",
                "the server rejected our request due to an error in our request",
            ),
        );
        let (_, reply) = api.expect(Method::GET, CONFIG).await;
        respond(reply, 200, &config);
        let (patch, reply) = api.expect(Method::PATCH, CONFIG).await;
        let patched = check_ca_bundle_patch(&patch, &config, &bundle.ca_cert_pem);
        respond(reply, 200, &patched);
    })
    .await
    .unwrap();
    assert_eq!(outcome.ca_bundle, CaBundleOutcome::Patched { webhooks: 2 });
}

#[tokio::test]
async fn forbidden_is_reported_with_the_action() {
    let err = run(|mut api| async move {
        let (_, reply) = api.expect(Method::GET, SECRET).await;
        respond(
            reply,
            403,
            &status(
                403,
                "Forbidden",
                "secrets \"canary-injector-tls\" is forbidden",
            ),
        );
    })
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot get Secret canary-injector/canary-injector-tls"
    );
    assert!(matches!(err, ClusterError::Api { .. }));
    let chain = format!("{:#}", anyhow::Error::from(err));
    assert!(chain.contains("is forbidden"), "{chain}");
    eprintln!("{chain}");
}
