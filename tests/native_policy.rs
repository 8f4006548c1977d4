//! The native admission policy (`canary-injector policy`,
//! deploy/native-policy) against the webhook.
//!
//! The shared corpus `tests/fixtures/native-policy/corpus.json` holds
//! admission cases and, for each, the webhook's answer (`expect`: its JSON
//! Patch, or its refusal). This file checks that answer against the webhook
//! itself: the shipped webhook configuration's rules and selectors decide
//! whether the apiserver would call it at all, then
//! `canary_injector::admission::review` answers, and the patch is applied as
//! an apiserver would (re-admitting the result must patch nothing).
//! `.ci/native_policy.py` checks the same cases against the policy's CEL
//! (cel-python), so the two agree case by case. `BLESS=1 cargo test --test
//! native_policy` rewrites the expectations from the webhook; review the diff.
//!
//! Also: `policy` prints exactly the checked-in deploy/native-policy/policy.yaml
//! for deploy/base/config.yaml, refuses bad options and configurations with
//! exit code 2, and deploy/native-policy leaves the webhook only what the
//! policy cannot do.

use std::collections::BTreeMap;
use std::process::Command;

use base64::Engine as _;
use canary_injector::admission::{self, no_cluster};
use canary_injector::config::Config;
use canary_injector::mutate::Kind;
use canary_injector::policy::{self, Options};
use k8s_openapi::api::admissionregistration::{v1, v1beta1};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CORPUS: &str = "tests/fixtures/native-policy/corpus.json";

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
        .expect("kubectl (client only) is needed to build deploy/; see CONTRIBUTING.md");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs(&String::from_utf8(out.stdout).unwrap())
}

fn labels_of(object: &Value) -> BTreeMap<String, String> {
    object["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect()
}

/// A Kubernetes label selector (`matchLabels`, `matchExpressions` with
/// In, NotIn, Exists, DoesNotExist) against a label set; absent selects all.
fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let match_labels = selector["matchLabels"].as_object().into_iter().flatten();
    let expressions = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten();
    match_labels
        .into_iter()
        .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
        && expressions.into_iter().all(|e| {
            let value = labels.get(e["key"].as_str().unwrap());
            let values: Vec<&str> = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            match e["operator"].as_str().unwrap() {
                "In" => value.is_some_and(|v| values.contains(&v.as_str())),
                "NotIn" => value.is_none_or(|v| !values.contains(&v.as_str())),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                other => panic!("operator {other}"),
            }
        })
}

/// One corpus case as an admission request.
struct Request<'a> {
    case: &'a Value,
    group: &'static str,
    version: &'static str,
    resource: &'static str,
    kind: &'static str,
}

impl<'a> Request<'a> {
    fn new(case: &'a Value) -> Self {
        let object = &case["object"];
        let kind = Kind::from_api_version(
            object["apiVersion"].as_str().unwrap(),
            object["kind"].as_str().unwrap(),
        )
        .unwrap_or_else(|| panic!("{}: not a kind the webhook knows", case["name"]));
        let info = kind.info();
        Self {
            case,
            group: info.group,
            version: info.version,
            resource: info.resource,
            kind: info.name,
        }
    }

    fn namespace(&self) -> &str {
        self.case["namespace"].as_str().unwrap()
    }

    fn operation(&self) -> &str {
        self.case["operation"].as_str().unwrap()
    }

    /// The namespace's labels, with the name label the apiserver sets.
    fn namespace_labels(&self, corpus: &Value) -> BTreeMap<String, String> {
        let mut labels: BTreeMap<String, String> =
            serde_json::from_value(corpus["namespaces"][self.namespace()].clone())
                .unwrap_or_else(|_| panic!("namespace {} not in the corpus", self.namespace()));
        labels.insert(
            "kubernetes.io/metadata.name".into(),
            self.namespace().into(),
        );
        labels
    }

    /// Whether the apiserver calls `webhook` (one entry of a
    /// MutatingWebhookConfiguration) for this request: a rule, the
    /// namespace selector, and the object selector on the new or old object.
    fn calls(&self, webhook: &Value, corpus: &Value) -> bool {
        let has = |list: &Value, item: &str| {
            list.as_array()
                .unwrap()
                .iter()
                .any(|v| v == item || v == "*")
        };
        let ruled = webhook["rules"].as_array().unwrap().iter().any(|r| {
            has(&r["operations"], self.operation())
                && has(&r["apiGroups"], self.group)
                && has(&r["apiVersions"], self.version)
                && has(&r["resources"], self.resource)
        });
        let objects = [&self.case["object"], &self.case["oldObject"]];
        ruled
            && selects(
                &webhook["namespaceSelector"],
                &self.namespace_labels(corpus),
            )
            && objects
                .iter()
                .filter(|o| o.is_object())
                .any(|o| selects(&webhook["objectSelector"], &labels_of(o)))
    }

    fn review(&self, object: &Value) -> Value {
        let mut request = json!({
            "uid": "b3f1e0a2-0000-4000-8000-00000000c0de",
            "kind": {"group": self.group, "version": self.version, "kind": self.kind},
            "resource": {"group": self.group, "version": self.version, "resource": self.resource},
            "requestKind": {"group": self.group, "version": self.version, "kind": self.kind},
            "namespace": self.namespace(),
            "operation": self.operation(),
            "userInfo": {"username": "alice@example.com"},
            "object": object,
            "dryRun": false,
        });
        if let Some(name) = object["metadata"]["name"].as_str() {
            request["name"] = name.into();
        }
        if self.case["oldObject"].is_object() {
            request["oldObject"] = self.case["oldObject"].clone();
        }
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request})
    }
}

/// The webhook's configuration for the labels (the bootstrap keepalive
/// off: the corpus is about labels), in the webhook's own namespace.
fn webhook_config() -> Config {
    let mut cfg = Config::from_yaml("bootstrap: {enabled: false}\n").unwrap();
    cfg.namespaces.own = Some("canary-injector".into());
    cfg
}

/// The webhook's answer to `review`: `{"patch": [...]}` or `{"refused": msg}`.
fn answer(review: &Value, cfg: &Config) -> Value {
    let body = serde_json::to_vec(review).unwrap();
    let reviewed = admission::review(&body, cfg, &no_cluster).unwrap();
    let response: Value = serde_json::from_slice(&reviewed.body).unwrap();
    let r = &response["response"];
    assert_eq!(r["uid"], review["request"]["uid"]);
    if r["allowed"] == false {
        assert_eq!(r["status"]["code"], 403, "{r}");
        return json!({"refused": r["status"]["message"]});
    }
    let patch = match r.get("patch") {
        None => json!([]),
        Some(p) => {
            assert_eq!(r["patchType"], "JSONPatch");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(p.as_str().unwrap())
                .unwrap();
            serde_json::from_slice(&bytes).unwrap()
        }
    };
    json!({ "patch": patch })
}

fn apply(object: &Value, patch: &Value) -> Value {
    let mut object = object.clone();
    let patch: json_patch::Patch = serde_json::from_value(patch.clone()).unwrap();
    json_patch::patch(&mut object, &patch).expect("the patch applies");
    object
}

/// What the webhook does with one case: the object as stored (unchanged
/// when the apiserver does not call it), or its refusal.
fn webhook_outcome(corpus: &Value, case: &Value, cfg: &Config) -> Value {
    let request = Request::new(case);
    let hooks: Value = serde_saphyr::from_str(&read("deploy/base/webhook.yaml")).unwrap();
    let called = hooks["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| request.calls(w, corpus))
        .count();
    assert!(called <= 1, "{}: two webhooks for one kind", case["name"]);
    if called == 0 {
        return json!({"patch": []});
    }
    let answer = answer(&request.review(&case["object"]), cfg);
    if answer.get("patch").is_some() {
        // Re-admitting the result patches nothing (reinvocation, idempotence).
        let patched = apply(&case["object"], &answer["patch"]);
        assert_eq!(
            self::answer(&request.review(&patched), cfg),
            json!({"patch": []}),
            "{}: admitting the result again patches it",
            case["name"]
        );
    }
    answer
}

#[test]
fn the_webhook_gives_what_the_corpus_expects() {
    let mut corpus: Value = serde_json::from_str(&read(CORPUS)).unwrap();
    let cfg = webhook_config();
    let bless = std::env::var_os("BLESS").is_some();
    let mut wrong = Vec::new();
    let mut refused = 0;
    let cases = corpus["cases"].as_array().unwrap().clone();
    for (i, case) in cases.iter().enumerate() {
        let name = case["name"].as_str().unwrap();
        let actual = webhook_outcome(&corpus, case, &cfg);
        if bless {
            corpus["cases"][i]["expect"] = actual;
            continue;
        }
        let expect = &case["expect"];
        let same = match (expect.get("patch"), actual.get("patch")) {
            // Patches agree when they make the same object.
            (Some(e), Some(a)) => apply(&case["object"], e) == apply(&case["object"], a),
            _ => expect == &actual,
        };
        if !same {
            wrong.push(format!(
                "{name}: expected {expect}, the webhook gives {actual}"
            ));
        }
        refused += usize::from(actual.get("refused").is_some());
    }
    if bless {
        let text = serde_json::to_string_pretty(&corpus).unwrap() + "\n";
        std::fs::write(format!("{ROOT}/{CORPUS}"), text).unwrap();
        return;
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The corpus covers refusals and cases the webhook is never called for.
    assert!(refused >= 3, "{refused} refusals");
}

/// A property of a corpus case.
type CaseTest = fn(&Value) -> bool;

/// Every kind the webhook admits, every operation it acts on and every skip
/// is in the corpus, so a rule cannot be left out of the comparison.
#[test]
fn the_corpus_covers_every_kind_operation_and_skip() {
    let corpus: Value = serde_json::from_str(&read(CORPUS)).unwrap();
    let cases = corpus["cases"].as_array().unwrap();
    let seen = |f: &dyn Fn(&Value) -> bool| cases.iter().any(f);
    for kind in Kind::ALL {
        for op in kind.info().operations() {
            assert!(
                seen(&|c| c["object"]["kind"] == kind.name() && c["operation"] == *op),
                "no {op} of {} in the corpus",
                kind.name()
            );
        }
    }
    let checks: [(&str, CaseTest); 9] = [
        ("a refusal", |c| c["expect"].get("refused").is_some()),
        ("an unchanged object", |c| c["expect"]["patch"] == json!([])),
        ("a namespace not opted in", |c| c["namespace"] == "legacy"),
        ("an excluded namespace", |c| c["namespace"] == "kube-system"),
        ("the webhook's namespace", |c| {
            c["namespace"] == "canary-injector"
        }),
        ("an opted-out object", |c| {
            c["object"]["metadata"]["labels"]["canary-injector.io/inject"] == "false"
        }),
        ("a mirror pod", |c| {
            c["object"]["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_string()
        }),
        ("a workload being deleted", |c| {
            c["object"]["metadata"]["deletionTimestamp"].is_string()
        }),
        ("a tag longer than a label value", |c| {
            serde_json::to_string(&c["object"])
                .unwrap()
                .contains(&"a".repeat(64))
        }),
    ];
    for (what, test) in checks {
        assert!(seen(&test), "the corpus has no case with {what}");
    }
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
