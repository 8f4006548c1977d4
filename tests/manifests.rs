//! Every manifest under deploy/, checked without a cluster: kustomize builds
//! it (kubectl's built-in kustomize), `install.yaml` is exactly the build of
//! `deploy/`, each built-in object deserialises into its k8s-openapi type
//! with no unknown field (a round trip loses nothing), and the objects say
//! what the webhook and the docs promise.

use std::collections::BTreeSet;
use std::process::Command;

use canary_injector::config::Config;
use canary_injector::metrics::{self, Metrics};
use canary_injector::offline;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingAdmissionPolicy, MutatingAdmissionPolicyBinding, MutatingWebhookConfiguration,
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn kustomize(dir: &str) -> String {
    let out = Command::new("kubectl")
        .args(["kustomize", &format!("{ROOT}/{dir}")])
        .output()
        .expect("kubectl (client only) is needed to build deploy/; see CONTRIBUTING.md");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// Deserialises into `T` and back; any field `T` does not know is lost on
/// the way, so the round trip must give the same JSON.
fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{} {}: {e}", doc["kind"], doc["metadata"]["name"]));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        &back, doc,
        "{} {} has fields k8s-openapi does not know (or wrong types)",
        doc["kind"], doc["metadata"]["name"]
    );
    typed
}

const CUSTOM_KINDS: &[(&str, &str)] = &[
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("networking.istio.io/v1beta1", "DestinationRule"),
    ("networking.istio.io/v1beta1", "VirtualService"),
];

/// Older API versions the legacy overlay uses (Kubernetes 1.16-1.20), with
/// the v1 version whose fields are a superset of what we write: such an
/// object is round-tripped through the v1 type. (.ci/validate-manifests
/// checks them against the real 1.16 and 1.20 schemas.)
const LEGACY_VERSIONS: &[(&str, &str, &str)] = &[
    ("policy/v1beta1", "PodDisruptionBudget", "policy/v1"),
    ("batch/v1beta1", "CronJob", "batch/v1"),
];

/// Every kustomization under deploy/ (the tests below build each).
const ENTRY_POINTS: &[&str] = &[
    "deploy",
    "deploy/base",
    "deploy/overlays/cert-manager",
    "deploy/overlays/legacy",
    "deploy/network-policy",
    "deploy/monitoring",
    "deploy/examples",
    "deploy/label-guard",
    "deploy/native-policy",
];

/// Checks every object of a build; returns them.
fn check_all(yaml: &str) -> Vec<Value> {
    let objects = docs(yaml);
    assert!(!objects.is_empty());
    for doc in &objects {
        let api = doc["apiVersion"].as_str().unwrap_or_default();
        let kind = doc["kind"].as_str().unwrap_or_default();
        assert!(doc["metadata"]["name"].is_string(), "{kind} without a name");
        if let Some((_, _, v1)) = LEGACY_VERSIONS
            .iter()
            .find(|(old, k, _)| (*old, *k) == (api, kind))
        {
            let mut as_v1 = doc.clone();
            as_v1["apiVersion"] = (*v1).into();
            check_all(&serde_json::to_string(&as_v1).unwrap());
            continue;
        }
        match kind {
            "Namespace" => drop(round_trip::<Namespace>(doc)),
            "ServiceAccount" => drop(round_trip::<ServiceAccount>(doc)),
            "ClusterRole" => drop(round_trip::<ClusterRole>(doc)),
            "ClusterRoleBinding" => drop(round_trip::<ClusterRoleBinding>(doc)),
            "Role" => drop(round_trip::<Role>(doc)),
            "RoleBinding" => drop(round_trip::<RoleBinding>(doc)),
            "ConfigMap" => drop(round_trip::<ConfigMap>(doc)),
            "Service" => drop(round_trip::<Service>(doc)),
            "Deployment" => drop(round_trip::<Deployment>(doc)),
            "ReplicaSet" => drop(round_trip::<ReplicaSet>(doc)),
            "Job" => drop(round_trip::<Job>(doc)),
            "CronJob" => drop(round_trip::<CronJob>(doc)),
            "PodDisruptionBudget" => drop(round_trip::<PodDisruptionBudget>(doc)),
            "MutatingWebhookConfiguration" => drop(round_trip::<MutatingWebhookConfiguration>(doc)),
            "NetworkPolicy" => drop(round_trip::<NetworkPolicy>(doc)),
            "ValidatingAdmissionPolicy" => drop(round_trip::<ValidatingAdmissionPolicy>(doc)),
            "ValidatingAdmissionPolicyBinding" => {
                drop(round_trip::<ValidatingAdmissionPolicyBinding>(doc))
            }
            "MutatingAdmissionPolicy" => drop(round_trip::<MutatingAdmissionPolicy>(doc)),
            "MutatingAdmissionPolicyBinding" => {
                drop(round_trip::<MutatingAdmissionPolicyBinding>(doc))
            }
            _ => assert!(
                CUSTOM_KINDS.contains(&(api, kind)),
                "unexpected object {api} {kind}"
            ),
        }
    }
    objects
}

/// The certgen Job, by its component label: its name carries the version
/// (tests/release.rs checks which).
fn certgen_job(objects: &[Value]) -> &Value {
    let jobs: Vec<&Value> = objects
        .iter()
        .filter(|o| {
            o["kind"] == "Job"
                && o["metadata"]["labels"]["app.kubernetes.io/component"] == "certgen"
        })
        .collect();
    assert_eq!(jobs.len(), 1, "one certgen Job: {jobs:?}");
    let name = jobs[0]["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("canary-injector-certgen-"), "{name}");
    jobs[0]
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn install_yaml_is_the_kustomize_build_of_deploy() {
    let built = kustomize("deploy");
    let committed = std::fs::read_to_string(format!("{ROOT}/deploy/install.yaml")).unwrap();
    assert!(
        built == committed,
        "deploy/install.yaml is stale: run `kubectl kustomize deploy/ > deploy/install.yaml`"
    );
}

#[test]
fn base_install_is_valid_and_says_what_the_webhook_needs() {
    let objects = check_all(&kustomize("deploy"));

    let cm: ConfigMap = round_trip(find(&objects, "ConfigMap", "canary-injector-config"));
    let cfg = Config::from_yaml(&cm.data.unwrap()["config.yaml"]).expect("shipped config is valid");
    assert_eq!(cfg.labels, Config::default().labels);

    let hook: MutatingWebhookConfiguration = round_trip(find(
        &objects,
        "MutatingWebhookConfiguration",
        "canary-injector",
    ));
    assert!(
        hook.metadata.name.as_deref().unwrap() < "istio-sidecar-injector",
        "must sort before Istio's injector"
    );
    let webhooks = hook.webhooks.unwrap();
    let names: Vec<&str> = webhooks.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(
        names,
        ["labels.canary-injector.io", "workloads.canary-injector.io"]
    );
    // Every (operation set, group, version, resource) sent, and by which webhook.
    let mut rules: BTreeSet<(Vec<String>, String, String, String)> = BTreeSet::new();
    for w in &webhooks {
        assert_eq!(w.admission_review_versions, ["v1", "v1beta1"]);
        assert_eq!(
            w.side_effects, "NoneOnDryRun",
            "events are a side effect, never on dry-run"
        );
        assert_eq!(w.reinvocation_policy.as_deref(), Some("IfNeeded"));
        assert_eq!(w.match_policy.as_deref(), Some("Equivalent"));
        assert_eq!(w.failure_policy.as_deref(), Some("Fail"));
        assert!(w.timeout_seconds.unwrap() <= 5);
        let svc = w.client_config.service.as_ref().unwrap();
        assert_eq!(
            (
                svc.name.as_str(),
                svc.namespace.as_str(),
                svc.path.as_deref(),
                svc.port
            ),
            (
                "canary-injector",
                "canary-injector",
                Some("/mutate"),
                Some(443)
            )
        );
        for r in w.rules.iter().flatten() {
            let operations = r.operations.clone().unwrap();
            let group = r.api_groups.clone().unwrap()[0].clone();
            let version = r.api_versions.clone().unwrap()[0].clone();
            for res in r.resources.clone().unwrap() {
                // Pods and ReplicaSets go to the labels webhook, the rest
                // (templates the tag is copied into) to the workloads one.
                let labels = matches!(res.as_str(), "pods" | "replicasets");
                assert_eq!(
                    w.name == "labels.canary-injector.io",
                    labels,
                    "{res} sent by {}",
                    w.name
                );
                rules.insert((operations.clone(), group.clone(), version.clone(), res));
            }
        }
        let ns_selector = serde_json::to_value(&w.namespace_selector).unwrap();
        assert_eq!(ns_selector["matchLabels"]["canary-injection"], "enabled");
        let excluded = &ns_selector["matchExpressions"][0];
        assert_eq!(excluded["key"], "kubernetes.io/metadata.name");
        assert_eq!(excluded["operator"], "NotIn");
        for ns in [
            "kube-system",
            "kube-public",
            "kube-node-lease",
            "canary-injector",
        ] {
            assert!(
                excluded["values"].as_array().unwrap().contains(&ns.into()),
                "{ns}"
            );
        }
        let obj_selector = serde_json::to_value(&w.object_selector).unwrap();
        assert_eq!(
            obj_selector["matchExpressions"][0],
            serde_json::json!({"key": "canary-injector.io/inject", "operator": "NotIn", "values": ["false"]})
        );
    }
    // Exactly the kinds admission acts on, with their operations.
    let expected: BTreeSet<(Vec<String>, String, String, String)> = canary_injector::mutate::KINDS
        .iter()
        .filter(|row| row.admission)
        .map(|row| {
            (
                row.operations().iter().map(|o| o.to_string()).collect(),
                row.group.to_owned(),
                row.version.to_owned(),
                row.resource.to_owned(),
            )
        })
        .collect();
    assert_eq!(rules, expected);
    assert!(rules.contains(&(vec!["CREATE".into()], "".into(), "v1".into(), "pods".into())));

    let deployment: Deployment = round_trip(find(&objects, "Deployment", "canary-injector"));
    let spec = deployment.spec;
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap();
    let pod_sc = pod.security_context.unwrap();
    assert_eq!(pod_sc.run_as_non_root, Some(true));
    assert_eq!(pod_sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    assert!(pod.affinity.unwrap().pod_anti_affinity.is_some());
    assert!(pod.termination_grace_period_seconds.unwrap() >= 20);
    let c = &pod.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);
    assert!(c.resources.as_ref().unwrap().limits.is_some());
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/readyz")
    );
    assert_eq!(
        c.liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/healthz")
    );
    let args = c.args.clone().unwrap();
    assert_eq!(args[0], "serve");
    for flag in ["--tls-cert", "--tls-key", "--config"] {
        assert!(args.iter().any(|a| a == flag), "{flag}");
    }
    let secret_volume = pod
        .volumes
        .unwrap()
        .into_iter()
        .find_map(|v| v.secret)
        .unwrap();
    assert_eq!(
        secret_volume.secret_name.as_deref(),
        Some("canary-injector-tls")
    );
    assert_eq!(secret_volume.default_mode, Some(0o440));

    let service: Service = round_trip(find(&objects, "Service", "canary-injector"));
    let port = service
        .spec
        .unwrap()
        .ports
        .unwrap()
        .into_iter()
        .find(|p| p.port == 443);
    assert!(port.is_some(), "Service must expose 443");
    find(&objects, "PodDisruptionBudget", "canary-injector");
    certgen_job(&objects);
    find(&objects, "CronJob", "canary-injector-cert-renew");
}

/// Every kustomization under deploy/ is in ENTRY_POINTS, so the tests
/// below cover all of them.
#[test]
fn every_kustomization_is_checked() {
    fn walk(dir: &std::path::Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.file_name().is_some_and(|n| n == "kustomization.yaml") {
                let rel = path.parent().unwrap().strip_prefix(ROOT).unwrap();
                found.push(rel.to_str().unwrap().trim_start_matches('/').to_owned());
            }
        }
    }
    let mut found = Vec::new();
    walk(&std::path::Path::new(ROOT).join("deploy"), &mut found);
    found.sort();
    let mut listed: Vec<String> = ENTRY_POINTS.iter().map(|s| (*s).to_owned()).collect();
    listed.sort();
    assert_eq!(found, listed);
}

/// The RBAC rules of every entry point: no wildcards, and every rule that
/// touches ConfigMaps or Secrets names the objects (resourceNames). Kubernetes
/// authorizes by name a get/patch/delete, a list/watch carrying a
/// metadata.name field selector, and a create made by server-side apply; a
/// rule without names would let the identity read every ConfigMap (or
/// Secret) it reaches and create any.
#[test]
fn rbac_names_every_configmap_and_secret() {
    let mut rules_seen = 0;
    for entry in ENTRY_POINTS {
        for doc in check_all(&kustomize(entry)) {
            if !matches!(doc["kind"].as_str(), Some("Role" | "ClusterRole")) {
                continue;
            }
            let who = format!("{entry}: {} {}", doc["kind"], doc["metadata"]["name"]);
            for rule in doc["rules"].as_array().into_iter().flatten() {
                rules_seen += 1;
                let list = |key: &str| -> Vec<String> {
                    rule[key]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|v| v.as_str().unwrap().to_owned())
                        .collect()
                };
                let (groups, resources, verbs) =
                    (list("apiGroups"), list("resources"), list("verbs"));
                for l in [&groups, &resources, &verbs] {
                    assert!(
                        !l.iter().any(|x| x.contains('*')),
                        "{who}: wildcard in {rule}"
                    );
                }
                let core = groups.iter().any(|g| g.is_empty());
                let sensitive = resources
                    .iter()
                    .any(|r| r == "configmaps" || r == "secrets");
                if core && sensitive {
                    assert!(
                        !list("resourceNames").is_empty(),
                        "{who}: a rule on ConfigMaps or Secrets without resourceNames: {rule}"
                    );
                }
            }
        }
    }
    assert!(rules_seen > 0, "no RBAC found");
}

/// The names in the RBAC rules are the names the code uses: the bootstrap
/// ConfigMap of the shipped config, the Secrets the certgen Job writes and
/// the Deployment mounts, the webhook configuration it patches.
#[test]
fn rbac_names_match_what_the_code_uses() {
    let objects = check_all(&kustomize("deploy"));
    let names = |kind: &str, name: &str, resource: &str| -> BTreeSet<String> {
        let role = find(&objects, kind, name);
        role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                r["resources"]
                    .as_array()
                    .unwrap()
                    .contains(&resource.into())
            })
            .flat_map(|r| r["resourceNames"].as_array().unwrap().iter())
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };

    let cm: ConfigMap = round_trip(find(&objects, "ConfigMap", "canary-injector-config"));
    let cfg = Config::from_yaml(&cm.data.unwrap()["config.yaml"]).unwrap();
    let mut expected = BTreeSet::from([cfg.bootstrap.config_map_name.clone()]);
    expected.extend(cfg.istio.injector_config_maps.iter().cloned());
    assert_eq!(
        names("ClusterRole", "canary-injector", "configmaps"),
        expected
    );
    // Writes only to the bootstrap ConfigMap; Istio's injector ConfigMaps
    // are watched, never written.
    let webhook_rules = find(&objects, "ClusterRole", "canary-injector")["rules"].clone();
    for rule in webhook_rules.as_array().unwrap() {
        if rule["resources"] == serde_json::json!(["configmaps"]) {
            let set = |key: &str| -> BTreeSet<&str> {
                rule[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap())
                    .collect()
            };
            let verbs = set("verbs");
            if set("resourceNames") == BTreeSet::from([cfg.bootstrap.config_map_name.as_str()]) {
                assert_eq!(verbs, BTreeSet::from(["list", "watch", "create", "patch"]));
            } else {
                assert_eq!(verbs, BTreeSet::from(["list", "watch"]), "{rule}");
                for name in set("resourceNames") {
                    assert!(cfg.istio.injector_config_maps.iter().any(|n| n == name));
                }
            }
        }
    }

    let job: Job = round_trip(certgen_job(&objects));
    let args = job.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    let arg = |flag: &str| -> String {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{flag}"));
        args[i + 1].clone()
    };
    assert_eq!(
        names("Role", "canary-injector-certgen", "secrets"),
        BTreeSet::from([arg("--secret"), arg("--ca-secret")])
    );
    assert_eq!(
        names(
            "ClusterRole",
            "canary-injector-certgen",
            "mutatingwebhookconfigurations"
        ),
        BTreeSet::from([arg("--webhook-configuration")])
    );
    let deployment: Deployment = round_trip(find(&objects, "Deployment", "canary-injector"));
    let mounted: Vec<String> = deployment
        .spec
        .template
        .spec
        .unwrap()
        .volumes
        .unwrap()
        .into_iter()
        .filter_map(|v| v.secret.and_then(|s| s.secret_name))
        .collect();
    assert_eq!(
        mounted,
        [arg("--secret")],
        "the pods mount the TLS Secret only, never the CA's"
    );
}

#[test]
fn legacy_overlay_uses_the_apis_of_kubernetes_1_16_to_1_20() {
    let objects = check_all(&kustomize("deploy/overlays/legacy"));
    let api = |kind: &str| -> String {
        let o = objects.iter().find(|o| o["kind"] == kind).unwrap();
        o["apiVersion"].as_str().unwrap().to_owned()
    };
    assert_eq!(api("PodDisruptionBudget"), "policy/v1beta1");
    assert_eq!(api("CronJob"), "batch/v1beta1");
    let text = kustomize("deploy/overlays/legacy");
    assert!(
        !text.contains("seccompProfile"),
        "seccompProfile is unknown to 1.16-1.18"
    );
    for kind in ["Deployment", "Job"] {
        let o = objects.iter().find(|o| o["kind"] == kind).unwrap();
        assert_eq!(
            o["spec"]["template"]["metadata"]["annotations"]["seccomp.security.alpha.kubernetes.io/pod"],
            "runtime/default",
            "{kind}"
        );
    }
    // Apart from those, the same install as the base.
    let base = check_all(&kustomize("deploy"));
    let ids = |objs: &[Value]| -> BTreeSet<(String, String)> {
        objs.iter()
            .map(|o| {
                (
                    o["kind"].as_str().unwrap().to_owned(),
                    o["metadata"]["name"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(ids(&objects), ids(&base));
}

#[test]
fn network_policies_admit_the_apiserver_and_monitoring_only() {
    let objects = check_all(&kustomize("deploy/network-policy"));
    let webhook: NetworkPolicy =
        round_trip(find(&objects, "NetworkPolicy", "canary-injector-webhook"));
    let spec = webhook.spec.unwrap();
    // Selects the webhook pods by the Deployment's own selector labels.
    let deployment: Deployment = round_trip(find(
        &check_all(&kustomize("deploy")),
        "Deployment",
        "canary-injector",
    ));
    assert_eq!(spec.pod_selector, Some(deployment.spec.selector));
    assert_eq!(
        spec.policy_types.unwrap(),
        ["Ingress".to_owned(), "Egress".to_owned()]
    );
    let ingress = spec.ingress.unwrap();
    let port_of = |r: &k8s_openapi::api::networking::v1::NetworkPolicyIngressRule| {
        serde_json::to_value(&r.ports.as_ref().unwrap()[0].port).unwrap()
    };
    assert_eq!(ingress.len(), 2);
    assert_eq!(port_of(&ingress[0]), 8443);
    assert!(
        ingress[0].from.is_none(),
        "8443 from anywhere: the control plane cannot be named portably"
    );
    assert_eq!(port_of(&ingress[1]), 9090);
    let from = serde_json::to_value(&ingress[1].from).unwrap();
    assert_eq!(
        from[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    let egress = serde_json::to_value(spec.egress.unwrap()).unwrap();
    let ports: BTreeSet<String> = egress
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["ports"].as_array().unwrap().iter())
        .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap()))
        .collect();
    assert_eq!(
        ports,
        BTreeSet::from(["443/TCP", "6443/TCP", "53/UDP", "53/TCP"].map(String::from))
    );
    let certgen: NetworkPolicy =
        round_trip(find(&objects, "NetworkPolicy", "canary-injector-certgen"));
    let spec = certgen.spec.unwrap();
    assert_eq!(
        spec.ingress.unwrap_or_default().len(),
        0,
        "nothing calls the certgen pods"
    );
    assert_eq!(
        spec.pod_selector.unwrap().match_labels.unwrap()["app.kubernetes.io/component"],
        "certgen"
    );
}

#[test]
fn cert_manager_overlay_builds_and_injects_the_ca() {
    let objects = check_all(&kustomize("deploy/overlays/cert-manager"));
    let hook = find(&objects, "MutatingWebhookConfiguration", "canary-injector");
    assert!(
        hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].is_string(),
        "cert-manager must fill caBundle"
    );
    assert!(
        !objects
            .iter()
            .any(|o| o["kind"] == "Job" || o["kind"] == "CronJob"),
        "no certgen Job with cert-manager"
    );
    let cert = objects
        .iter()
        .find(|o| o["kind"] == "Certificate" && o["spec"]["secretName"] == "canary-injector-tls")
        .expect("serving Certificate");
    let dns = cert["spec"]["dnsNames"].as_array().unwrap();
    assert!(dns.contains(&"canary-injector.canary-injector.svc".into()));
}

/// The examples agree with the webhook's defaults: `generated/routes.yaml` is
/// what the routes controller makes of the example (the same pure function
/// as `routes -f`); after the webhook's rules, the stable Deployment's pods
/// and the gray ReplicaSet's pods fall into exactly one of its subsets each,
/// the gray one has its header route and the stable one the default route;
/// and the hand-written alternative in `manual/` routes the same way.
#[test]
fn examples_route_to_what_the_webhook_labels() {
    let yaml = kustomize("deploy/examples");
    let objects = check_all(&yaml);
    assert!(
        objects.iter().all(|o| o["apiVersion"]
            .as_str()
            .is_some_and(|a| !a.starts_with("networking.istio.io"))),
        "the controller makes the Istio objects, the example does not apply them"
    );
    let mutated =
        offline::mutate_documents(&yaml, "deploy/examples", &Config::default(), false).unwrap();
    let mutated = docs(&mutated.text);
    let generated = canary_injector::routes::offline::routes_documents(
        &yaml,
        "deploy/examples",
        &Config::default(),
        &canary_injector::routes::offline::Target::Istio("networking.istio.io/v1beta1".into()),
    )
    .unwrap();
    let committed =
        std::fs::read_to_string(format!("{ROOT}/deploy/examples/generated/routes.yaml")).unwrap();
    assert_eq!(
        docs(&committed),
        docs(&generated.text),
        "deploy/examples/generated/routes.yaml is stale: see the command in it"
    );
    let manual = ["destinationrule.yaml", "virtualservice.yaml"]
        .iter()
        .flat_map(|f| {
            docs(&std::fs::read_to_string(format!("{ROOT}/deploy/examples/manual/{f}")).unwrap())
        })
        .collect::<Vec<_>>();
    check_all(&serde_json::to_string(&manual[0]).unwrap());
    check_all(&serde_json::to_string(&manual[1]).unwrap());

    let pod_labels = |kind: &str| -> serde_json::Map<String, Value> {
        let w = mutated.iter().find(|o| o["kind"] == kind).unwrap();
        w["spec"]["template"]["metadata"]["labels"]
            .as_object()
            .unwrap()
            .clone()
    };
    for routes in [docs(&generated.text), manual] {
        let dr = routes
            .iter()
            .find(|o| o["kind"] == "DestinationRule")
            .unwrap();
        let subsets: Vec<(String, serde_json::Map<String, Value>)> = dr["spec"]["subsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_owned(),
                    s["labels"].as_object().unwrap().clone(),
                )
            })
            .collect();
        let matching = |labels: &serde_json::Map<String, Value>| -> Vec<String> {
            subsets
                .iter()
                .filter(|(_, sel)| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
                .map(|(n, _)| n.clone())
                .collect()
        };
        let stable = matching(&pod_labels("Deployment"));
        let gray = matching(&pod_labels("ReplicaSet"));
        assert_eq!(stable, ["normal"], "stable pods match one subset");
        assert_eq!(gray, ["feature-login"], "gray pods match one subset");

        let vs = routes
            .iter()
            .find(|o| o["kind"] == "VirtualService")
            .unwrap();
        let http = vs["spec"]["http"].as_array().unwrap();
        let to = |r: &Value| {
            r["route"][0]["destination"]["subset"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let gray_route = http
            .iter()
            .find(|r| r["match"][0]["headers"]["x-canary-tag"]["exact"] == "feature-login")
            .unwrap();
        assert_eq!(to(gray_route), gray[0]);
        assert_eq!(to(http.last().unwrap()), stable[0], "stable route last");
        assert!(http.last().unwrap().get("match").is_none());
        assert_eq!(dr["spec"]["host"], "checkout");
        assert_eq!(vs["spec"]["hosts"], serde_json::json!(["checkout"]));
    }
}

/// On the Gateway API: `generated/gateway-routes.yaml` is what the routes
/// controller keeps for the example; after the webhook's rules, the stable
/// Deployment's pods are selected by the normal version Service only and the
/// gray ReplicaSet's pods by the canary's only, and the HTTPRoute sends the
/// header to the canary's Service and the rest to the normal one.
#[test]
fn gateway_examples_route_to_what_the_webhook_labels() {
    let yaml = kustomize("deploy/examples");
    let mutated =
        offline::mutate_documents(&yaml, "deploy/examples", &Config::default(), false).unwrap();
    let mutated = docs(&mutated.text);
    let generated = canary_injector::routes::offline::routes_documents(
        &yaml,
        "deploy/examples",
        &Config::default(),
        &canary_injector::routes::offline::Target::GatewayApi,
    )
    .unwrap();
    assert!(generated.warnings.is_empty(), "{:?}", generated.warnings);
    let committed = std::fs::read_to_string(format!(
        "{ROOT}/deploy/examples/generated/gateway-routes.yaml"
    ))
    .unwrap();
    let routes = docs(&generated.text);
    assert_eq!(
        docs(&committed),
        routes,
        "deploy/examples/generated/gateway-routes.yaml is stale: see the command in it"
    );
    let pod_labels = |kind: &str| -> serde_json::Map<String, Value> {
        let w = mutated.iter().find(|o| o["kind"] == kind).unwrap();
        w["spec"]["template"]["metadata"]["labels"]
            .as_object()
            .unwrap()
            .clone()
    };
    let selecting = |labels: &serde_json::Map<String, Value>| -> Vec<String> {
        routes
            .iter()
            .filter(|o| o["kind"] == "Service")
            .filter(|s| {
                s["spec"]["selector"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v))
            })
            .map(|s| s["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(selecting(&pod_labels("Deployment")), ["checkout--normal"]);
    assert_eq!(
        selecting(&pod_labels("ReplicaSet")),
        ["checkout--feature-login"]
    );
    let route = routes.iter().find(|o| o["kind"] == "HTTPRoute").unwrap();
    assert_eq!(
        route["spec"]["parentRefs"],
        serde_json::json!([{"group": "", "kind": "Service", "name": "checkout"}])
    );
    let rules = route["spec"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(
        rules[0]["matches"][0]["headers"][0]["value"],
        "feature-login"
    );
    assert_eq!(
        rules[0]["backendRefs"][0]["name"],
        "checkout--feature-login"
    );
    assert_eq!(rules[1]["backendRefs"][0]["name"], "checkout--normal");
    assert!(rules[1]["matches"][0].get("headers").is_none());
}

/// The weighted gray stage example: valid, and `generated/routes-weighted.yaml`
/// is what the routes controller makes of the examples with it: the
/// default route splits 90/10 between normal and beta.
#[test]
fn the_weighted_gray_stage_example_splits_the_default_route() {
    let weighted =
        std::fs::read_to_string(format!("{ROOT}/deploy/examples/weighted-gray-stage.yaml"))
            .unwrap();
    check_all(&weighted);
    let yaml = format!("{}---\n{weighted}", kustomize("deploy/examples"));
    let generated = canary_injector::routes::offline::routes_documents(
        &yaml,
        "deploy/examples",
        &Config::default(),
        &canary_injector::routes::offline::Target::Istio("networking.istio.io/v1beta1".into()),
    )
    .unwrap();
    assert!(generated.warnings.is_empty(), "{:?}", generated.warnings);
    let committed = std::fs::read_to_string(format!(
        "{ROOT}/deploy/examples/generated/routes-weighted.yaml"
    ))
    .unwrap();
    assert_eq!(
        docs(&committed),
        docs(&generated.text),
        "deploy/examples/generated/routes-weighted.yaml is stale: see the command in it"
    );
    let vs = docs(&generated.text)
        .into_iter()
        .find(|o| o["kind"] == "VirtualService")
        .unwrap();
    assert_eq!(
        vs["spec"]["http"].as_array().unwrap().last().unwrap()["route"],
        serde_json::json!([
            {"destination": {"host": "checkout", "subset": "normal"}, "weight": 90},
            {"destination": {"host": "checkout", "subset": "beta"}, "weight": 10},
        ])
    );
}

#[test]
fn monitoring_uses_only_metrics_the_webhook_exports() {
    let objects = check_all(&kustomize("deploy/monitoring"));
    let rule = objects
        .iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .unwrap();
    let exprs: Vec<String> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| r["expr"].as_str().unwrap().trim().to_owned())
        .collect();
    for envoy in [
        r#"sum(envoy_cluster_upstream_cx_active{namespace!="fe-pre"}) by (namespace, service) < 1"#,
        r#"sum by(namespace, service) (rate(envoy_cluster_upstream_rq_503[1m])) > 0"#,
        r#"sum by(namespace, service) (rate(envoy_cluster_upstream_rq{response_code_class!="2xx"}[1m])) != 0"#,
    ] {
        assert!(
            exprs.iter().any(|e| e == envoy),
            "missing Envoy alert {envoy}"
        );
    }

    // Every canary_injector_* name in the rules and the dashboard exists.
    let registry = metrics::new_registry();
    let m = Metrics::register(&registry).unwrap();
    // Vectors appear in a scrape once a label set has been used.
    m.review("Pod", "CREATE", "patched", 0.001);
    m.skip("namespace");
    m.bootstrap_skip("istio-version");
    m.mutation("labels");
    m.error("bad-request", false, 0.0);
    let controllers = canary_injector::metrics::ControllerMetrics::register(&registry).unwrap();
    controllers
        .controller(
            canary_injector::copier::CONTROLLER,
            &canary_injector::copier::CopyError::REASONS,
        )
        .applied();
    controllers
        .controller(
            canary_injector::backfill::CONTROLLER,
            &canary_injector::backfill::BackfillError::REASONS,
        )
        .applied();
    canary_injector::backfill::BackfillMetrics::register(&registry).unwrap();
    canary_injector::cluster::events::EventMetrics::register(&registry).unwrap();
    canary_injector::routes::controller::RouteMetrics::register(&registry).unwrap();
    let exported: BTreeSet<String> = registry
        .gather()
        .iter()
        .flat_map(|f| {
            let n = f.name().to_owned();
            [
                n.clone(),
                format!("{n}_bucket"),
                format!("{n}_sum"),
                format!("{n}_count"),
            ]
        })
        .collect();
    let dashboard =
        std::fs::read_to_string(format!("{ROOT}/deploy/monitoring/dashboard.json")).unwrap();
    serde_json::from_str::<Value>(&dashboard).expect("dashboard is JSON");
    let text = format!("{}\n{dashboard}", exprs.join("\n"));
    let used: BTreeSet<&str> = text
        .match_indices("canary_injector_")
        .map(|(i, _)| {
            let rest = &text[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    assert!(!used.is_empty());
    let unknown: Vec<&&str> = used.iter().filter(|n| !exported.contains(**n)).collect();
    assert!(
        unknown.is_empty(),
        "metrics not exported by the webhook: {unknown:?}"
    );
}

/// The label guard names the identity the webhook runs as and the two label
/// keys the backfill writes (the shipped defaults): a renamed ServiceAccount
/// or label key would otherwise leave it guarding nothing, or refusing the
/// backfill.
#[test]
fn label_guard_names_the_webhook_identity_and_its_labels() {
    let base = docs(&kustomize("deploy"));
    let deployment = find(&base, "Deployment", "canary-injector");
    let identity = format!(
        "system:serviceaccount:{}:{}",
        deployment["metadata"]["namespace"].as_str().unwrap(),
        deployment["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap()
    );
    let guard = docs(&kustomize("deploy/label-guard"));
    let policy = find(
        &guard,
        "ValidatingAdmissionPolicy",
        "canary-injector-labels-only",
    );
    let condition = policy["spec"]["matchConditions"][0]["expression"]
        .as_str()
        .unwrap();
    assert_eq!(
        condition.trim(),
        format!("request.userInfo.username == '{identity}'")
    );
    let labels = Config::default().labels;
    let allowed = format!("k in ['{}', '{}']", labels.stage, labels.canary_tag);
    let validations = policy["spec"]["validations"].as_array().unwrap();
    assert!(
        validations
            .iter()
            .any(|v| v["expression"].as_str().unwrap().contains(&allowed)),
        "no validation allows exactly {allowed}"
    );
    let binding = find(
        &guard,
        "ValidatingAdmissionPolicyBinding",
        "canary-injector-labels-only",
    );
    assert_eq!(binding["spec"]["policyName"], "canary-injector-labels-only");
    assert_eq!(
        binding["spec"]["validationActions"],
        serde_json::json!(["Deny"])
    );
}
