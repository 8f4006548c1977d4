//! The native admission policy (`canary-injector policy`,
//! deploy/native-policy): `policy` prints exactly the checked-in deploy/native-policy/policy.yaml
//! for deploy/base/config.yaml, refuses bad options and configurations with
//! exit code 2, and deploy/native-policy leaves the webhook only what the
//! policy cannot do.

use std::process::Command;

use canary_injector::config::Config;
use canary_injector::policy::{self, Options};
use k8s_openapi::api::admissionregistration::{v1, v1beta1};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn kustomize(dir: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .args(["kustomize", &format!("{ROOT}/{dir}")])
        .output()
        .expect("kubectl (client only) is needed to build deploy/; see README");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs(&String::from_utf8(out.stdout).unwrap())
}

/// Deserialises into the k8s-openapi type and back: a field the type does
/// not know (a typo, a field of another version) is lost on the way, so the
/// round trip must give the same JSON. (`.ci/validate-manifests` checks
/// deploy/native-policy against the strict 1.36 and 1.37 schemas, and the
/// v1beta1 objects against 1.34 to 1.37.)
fn round_trip<T: DeserializeOwned + Serialize>(object: &Value) {
    let typed: T = serde_json::from_value(object.clone())
        .unwrap_or_else(|e| panic!("{}: {e}", object["kind"]));
    assert_eq!(
        &serde_json::to_value(&typed).unwrap(),
        object,
        "{} has fields k8s-openapi does not know",
        object["kind"]
    );
}

#[test]
fn the_generated_objects_are_the_kubernetes_types_of_their_version() {
    let mut cfg = Config::default();
    cfg.namespaces.own = Some("canary-injector".into());
    // A configuration unlike the defaults, with an empty opt-in and nothing excluded.
    let mut odd = Config::from_yaml(
        "labels: {canaryTag: example.com/canary, stage: example.com/stage}\n\
         namespaces: {optIn: {}, excluded: []}\n",
    )
    .unwrap();
    odd.namespaces.own = None;
    for cfg in [&cfg, &odd] {
        let native = policy::generate(cfg.policy(), &Options::default());
        round_trip::<v1::MutatingAdmissionPolicy>(&native.mutating_policy);
        round_trip::<v1::MutatingAdmissionPolicyBinding>(&native.mutating_binding);
        round_trip::<v1::ValidatingAdmissionPolicy>(&native.validating_policy);
        round_trip::<v1::ValidatingAdmissionPolicyBinding>(&native.validating_binding);
        let beta = policy::generate(
            cfg.policy(),
            &Options {
                api_version: policy::ApiVersion::V1beta1,
                ..Options::default()
            },
        );
        round_trip::<v1beta1::MutatingAdmissionPolicy>(&beta.mutating_policy);
        round_trip::<v1beta1::MutatingAdmissionPolicyBinding>(&beta.mutating_binding);
        assert_eq!(
            beta.mutating_policy["apiVersion"],
            "admissionregistration.k8s.io/v1beta1"
        );
    }
}

fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_canary-injector"));
    cmd.env_remove("POD_NAMESPACE")
        .env_remove("RUST_LOG")
        .current_dir(ROOT);
    cmd
}

#[test]
fn policy_prints_the_checked_in_objects_for_the_shipped_config() {
    // The ConfigMap's config.yaml, as the webhook pods read it.
    let cm = yaml_docs(&read("deploy/base/config.yaml")).remove(0);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let out = binary()
        .args(["policy", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(
        printed == read("deploy/native-policy/policy.yaml"),
        "deploy/native-policy/policy.yaml is stale: run `canary-injector policy --config \
         <deploy/base/config.yaml's config.yaml> > deploy/native-policy/policy.yaml`"
    );
    // The defaults are the shipped config's, with or without --config.
    let defaults = binary().arg("policy").output().unwrap();
    assert_eq!(String::from_utf8(defaults.stdout).unwrap(), printed);
    // v1beta1 and Never change only what they say.
    let beta = binary()
        .args([
            "policy",
            "--api-version",
            "v1beta1",
            "--reinvocation-policy",
            "Never",
        ])
        .output()
        .unwrap();
    assert!(beta.status.success());
    let beta = yaml_docs(&String::from_utf8(beta.stdout).unwrap());
    let mut v1 = yaml_docs(&printed);
    v1[0]["apiVersion"] = "admissionregistration.k8s.io/v1beta1".into();
    v1[1]["apiVersion"] = "admissionregistration.k8s.io/v1beta1".into();
    v1[0]["spec"]["reinvocationPolicy"] = "Never".into();
    assert_eq!(beta, v1);
}

#[test]
fn policy_refuses_bad_options_and_configurations_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "labels: {stage: 'has space'}\n").unwrap();
    let unknown = dir.path().join("unknown.yaml");
    std::fs::write(&unknown, "labels: {stageLabel: x}\n").unwrap();
    let missing = dir.path().join("missing.yaml");
    let cases: Vec<(Vec<&std::ffi::OsStr>, &str)> = vec![
        (
            vec!["--api-version".as_ref(), "v1alpha1".as_ref()],
            "invalid value 'v1alpha1' for '--api-version <API_VERSION>'",
        ),
        (
            vec!["--reinvocation-policy".as_ref(), "Always".as_ref()],
            "invalid value 'Always' for '--reinvocation-policy <REINVOCATION_POLICY>'",
        ),
        (vec!["--config".as_ref(), bad.as_os_str()], "labels.stage"),
        (vec!["--config".as_ref(), unknown.as_os_str()], "stageLabel"),
        (
            vec!["--config".as_ref(), missing.as_os_str()],
            "cannot read config file",
        ),
        (
            vec!["--no-such-flag".as_ref()],
            "unexpected argument '--no-such-flag'",
        ),
    ];
    for (args, message) in cases {
        let out = binary().arg("policy").args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} printed something");
    }
}

/// deploy/native-policy: the base install (the controllers run as before)
/// and the policy, with a webhook configuration that keeps only what the
/// policy cannot do.
#[test]
fn the_native_install_leaves_the_webhook_only_what_the_policy_cannot_do() {
    let native = kustomize("deploy/native-policy");
    let base = kustomize("deploy");
    let key = |o: &Value| format!("{}/{}", o["kind"], o["metadata"]["name"]);
    let hook_kind = "MutatingWebhookConfiguration";
    // Everything of the base install, unchanged, but the webhook configuration.
    for object in base.iter().filter(|o| o["kind"] != hook_kind) {
        let same = native.iter().find(|o| key(o) == key(object));
        assert_eq!(same, Some(object), "{} differs or is missing", key(object));
    }
    // The policy objects, as `policy` prints them.
    for object in yaml_docs(&read("deploy/native-policy/policy.yaml")) {
        let built = native.iter().find(|o| key(o) == key(&object));
        assert_eq!(built, Some(&object), "{}", key(&object));
    }
    assert_eq!(native.len(), base.len() + 4, "nothing else is added");

    let hook = native.iter().find(|o| o["kind"] == hook_kind).unwrap();
    let base_hook = base.iter().find(|o| o["kind"] == hook_kind).unwrap();
    let webhooks = hook["webhooks"].as_array().unwrap();
    let names: Vec<&str> = webhooks
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [policy::FALLBACK_WEBHOOK, policy::BOOTSTRAP_WEBHOOK]);
    let rules = |w: &Value| -> Vec<(String, String)> {
        w["rules"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                let ops = r["operations"].to_string();
                r["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(move |res| (res.as_str().unwrap().to_owned(), ops.clone()))
            })
            .collect()
    };
    let (fallback, bootstrap) = (&webhooks[0], &webhooks[1]);
    let labels = Config::default().labels;
    // What the policy leaves unlabelled, failing closed as in webhook mode.
    assert_eq!(
        fallback["matchConditions"],
        json!([policy::unlabelled_condition(&labels)])
    );
    assert_eq!(fallback["failurePolicy"], "Fail");
    assert_eq!(
        rules(fallback),
        [
            ("pods".to_owned(), r#"["CREATE"]"#.to_owned()),
            ("replicasets".to_owned(), r#"["CREATE"]"#.to_owned())
        ]
    );
    // The sidecar keepalive must not stop pod creation.
    assert_eq!(bootstrap["failurePolicy"], "Ignore");
    assert_eq!(
        rules(bootstrap),
        [("pods".to_owned(), r#"["CREATE"]"#.to_owned())]
    );
    assert!(bootstrap.get("matchConditions").is_none());
    // Otherwise as the base install's labels webhook: same endpoint,
    // selectors, reinvocation, timeouts.
    let base_labels = &base_hook["webhooks"][0];
    for w in [fallback, bootstrap] {
        for field in [
            "admissionReviewVersions",
            "clientConfig",
            "matchPolicy",
            "sideEffects",
            "reinvocationPolicy",
            "timeoutSeconds",
            "namespaceSelector",
            "objectSelector",
        ] {
            assert_eq!(w[field], base_labels[field], "{} {field}", w["name"]);
        }
    }
    // The policy selects the namespaces and objects the webhook does.
    let map = native
        .iter()
        .find(|o| o["kind"] == "MutatingAdmissionPolicy")
        .unwrap();
    for field in ["namespaceSelector", "objectSelector"] {
        assert_eq!(
            map["spec"]["matchConstraints"][field], base_labels[field],
            "{field}"
        );
    }
    let mut cfg = Config::default();
    cfg.namespaces.own = Some("canary-injector".into());
    let generated = policy::generate(cfg.policy(), &Options::default());
    assert_eq!(map, &generated.mutating_policy);
}
