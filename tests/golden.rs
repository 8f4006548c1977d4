//! Golden fixtures through the real server over TLS: each
//! `tests/fixtures/<dir>/<case>.review.json` is posted to `/mutate`, the
//! returned patch is applied to the request's object as an apiserver would,
//! and the result must equal `<case>.out.json`. The patched object is then
//! admitted again and must get no patch (idempotence, and what
//! `reinvocationPolicy: IfNeeded` does).
//!
//! `BLESS=1 cargo test --test golden` rewrites the `.out.json` files; review
//! the diff before committing.

mod common;

use std::sync::Arc;

use canary_injector::config::Config;
use canary_injector::mutate::{Availability, ClusterView, Version};
use canary_injector::server::Limits;
use common::{Client, TestServer, apply_response, fixture_json, start, start_full, with_object};
use serde_json::{Value, json};

const LABEL_CASES: &[&str] = &[
    "pod",
    "istio-pod",
    "canary-pod.v1beta1",
    "standalone-replicaset",
    "owned-replicaset",
    "kube-system-pod",
    "labelled-pod",
    "workloads/deployment-create",
    "workloads/deployment-tag-changed",
    "workloads/deployment-image-update",
    "workloads/statefulset-create",
    "workloads/cronjob-create",
    "workloads/owned-job",
    "workloads/owned-replicaset-tag-on-metadata",
];

/// One pod per Istio generation, before and after injection (the
/// namespace says which injector version the cluster view reports; an
/// injected proxy's own image tag wins).
const BOOTSTRAP_CASES: &[&str] = &[
    // 1.5-1.7: the template mount.
    "bootstrap-pods/before-injection",
    "bootstrap-pods/injected-1.5",
    "bootstrap-pods/before-injection-1.7",
    "bootstrap-pods/injected-1.7",
    "bootstrap-pods/user-volume-annotations",
    "bootstrap-pods/configmap-missing",
    "bootstrap-pods/opted-out",
    "bootstrap-pods/host-network",
    "bootstrap-pods/injection-disabled",
    "bootstrap-pods/malformed-user-volume",
    // 1.8-1.17: nothing to do.
    "bootstrap-pods/before-injection-1.12",
    "bootstrap-pods/injected-1.12",
    // 1.18+: the agent keepalive.
    "bootstrap-pods/before-injection-1.20",
    "bootstrap-pods/before-injection-1.20-proxy-config",
    "bootstrap-pods/injected-1.22",
    "bootstrap-pods/injected-1.22-user-keepalive",
    "bootstrap-pods/opted-out-1.22",
    "bootstrap-pods/native-sidecar-1.27",
];

async fn check_cases(server: &TestServer, cases: &[&str]) {
    for (i, case) in cases.iter().enumerate() {
        let mut client = Client::connect(server.addr, &server.certs.ca_pem, i % 2 == 1).await;
        let review = fixture_json(&format!("{case}.review.json"));
        let resp = client
            .post_json("/mutate?timeout=5s", serde_json::to_vec(&review).unwrap())
            .await;
        assert_eq!(resp.status(), 200, "{case}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let response: Value = serde_json::from_slice(resp.body()).unwrap();
        let patched = apply_response(&review, &response);
        let r = &response["response"];
        let actual = json!({
            "allowed": r["allowed"],
            "warnings": r.get("warnings").cloned().unwrap_or(json!([])),
            "status": r.get("status").cloned().unwrap_or(Value::Null),
            "object": patched,
        });
        let golden_path = format!(
            "{}/tests/fixtures/{case}.out.json",
            env!("CARGO_MANIFEST_DIR")
        );
        if std::env::var_os("BLESS").is_some() {
            let text = serde_json::to_string_pretty(&actual).unwrap() + "\n";
            std::fs::write(&golden_path, text).unwrap();
        } else {
            let golden = fixture_json(&format!("{case}.out.json"));
            assert_eq!(actual, golden, "{case}: output differs from {golden_path}");
        }

        // Re-admit our own output: no patch, nothing changes.
        let again = with_object(&review, patched.clone());
        let resp = client
            .post_json("/mutate", serde_json::to_vec(&again).unwrap())
            .await;
        let response: Value = serde_json::from_slice(resp.body()).unwrap();
        assert!(
            response["response"].get("patch").is_none(),
            "{case}: second pass patched: {response}"
        );
        assert_eq!(apply_response(&again, &response), patched);
    }
}

#[tokio::test]
async fn label_fixtures_match_golden_outputs_and_are_idempotent() {
    let server = start(Config::default()).await;
    check_cases(&server, LABEL_CASES).await;
}

/// The keepalive fix with the cluster view the caches give, and the
/// shipped configuration (no Istio version pinned): per namespace, whether
/// the bootstrap ConfigMap exists and which injector version was detected.
#[tokio::test]
async fn bootstrap_fixtures_match_golden_outputs_and_are_idempotent() {
    let v = |minor| Some(Version { major: 1, minor });
    let lookup = Arc::new(move |ns: &str| {
        let (bootstrap_configmap, injector_version) = match ns {
            "shop" => (Availability::Present, v(5)),
            "legacy" => (Availability::Present, v(7)),
            "mesh-1-12" => (Availability::NotConfigured, v(12)),
            "mesh-1-20" => (Availability::NotConfigured, v(20)),
            _ => (Availability::Missing, v(5)),
        };
        ClusterView {
            bootstrap_configmap,
            injector_version,
            mesh: Default::default(),
        }
    });
    let server = start_full(Config::default(), Limits::default(), lookup).await;
    check_cases(&server, BOOTSTRAP_CASES).await;
    let text = String::from_utf8(canary_injector::metrics::encode(&server.registry)).unwrap();
    for reason in [
        "agent-keepalive",
        "configmap-missing",
        "opted-out",
        "host-network",
        "no-sidecar-expected",
        "malformed-annotation",
    ] {
        assert!(
            text.contains(&format!(
                "canary_injector_bootstrap_skips_total{{reason=\"{reason}\"}}"
            )),
            "{reason} not counted\n{text}"
        );
    }
    for (kind, count) in [
        ("bootstrap-volume", 2),
        ("bootstrap-annotations", 3),
        ("keepalive-proxy-config", 2),
        ("keepalive-env", 2),
    ] {
        assert!(
            text.contains(&format!(
                "canary_injector_mutations_total{{type=\"{kind}\"}} {count}\n"
            )),
            "{kind} {count}\n{text}"
        );
    }
}

#[tokio::test]
async fn dry_run_gets_the_same_answer() {
    let server = start(Config::default()).await;
    let mut client = Client::connect(server.addr, &server.certs.ca_pem, false).await;
    let review = fixture_json("standalone-replicaset.review.json");
    let mut dry = review.clone();
    dry["request"]["dryRun"] = json!(true);
    let a: Value =
        serde_json::from_slice(client.post_json("/mutate", review.to_string()).await.body())
            .unwrap();
    let b: Value =
        serde_json::from_slice(client.post_json("/mutate", dry.to_string()).await.body()).unwrap();
    assert_eq!(a, b);
}
