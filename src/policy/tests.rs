use std::collections::BTreeMap;

use super::*;
use crate::mutate::{BootstrapPolicy, IstioPolicy, LabelPolicy, NamespacePolicy};

struct Sections {
    labels: LabelPolicy,
    namespaces: NamespacePolicy,
    bootstrap: BootstrapPolicy,
    istio: IstioPolicy,
}

impl Sections {
    fn new() -> Self {
        Self {
            labels: LabelPolicy::default(),
            namespaces: NamespacePolicy {
                own: Some("canary-injector".into()),
                ..NamespacePolicy::default()
            },
            bootstrap: BootstrapPolicy::default(),
            istio: IstioPolicy::default(),
        }
    }

    fn policy(&self) -> Policy<'_> {
        Policy {
            labels: &self.labels,
            namespaces: &self.namespaces,
            bootstrap: &self.bootstrap,
            istio: &self.istio,
        }
    }
}

#[test]
fn the_api_version_changes_nothing_else() {
    let s = Sections::new();
    let v1 = generate(s.policy(), &Options::default());
    let mut beta = generate(
        s.policy(),
        &Options {
            api_version: ApiVersion::V1beta1,
            ..Options::default()
        },
    );
    for object in [&mut beta.mutating_policy, &mut beta.mutating_binding] {
        object["apiVersion"] = "admissionregistration.k8s.io/v1".into();
    }
    assert_eq!(v1, beta);
}

#[test]
fn the_reinvocation_policy_is_the_option() {
    let s = Sections::new();
    let spec = |reinvocation| {
        generate(
            s.policy(),
            &Options {
                reinvocation,
                ..Options::default()
            },
        )
        .mutating_policy["spec"]["reinvocationPolicy"]
            .clone()
    };
    assert_eq!(spec(Reinvocation::IfNeeded), "IfNeeded");
    assert_eq!(spec(Reinvocation::Never), "Never");
    assert_eq!(Options::default().reinvocation, Reinvocation::IfNeeded);
}

#[test]
fn output_is_stable() {
    let s = Sections::new();
    let a = generate(s.policy(), &Options::default()).render().unwrap();
    let b = generate(s.policy(), &Options::default()).render().unwrap();
    assert_eq!(a, b);
    // Documents in apply order, each policy before its binding.
    let kinds: Vec<&str> = a.lines().filter_map(|l| l.strip_prefix("kind: ")).collect();
    assert_eq!(
        kinds,
        [
            "MutatingAdmissionPolicy",
            "MutatingAdmissionPolicyBinding",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding"
        ]
    );
    // The YAML reads back as the objects.
    let back: Vec<Value> = serde_saphyr::from_multiple(&a).unwrap();
    let native = generate(s.policy(), &Options::default());
    assert_eq!(back.iter().collect::<Vec<_>>(), native.objects());
    assert!(a.starts_with("# canary-injector's label rules as a native admission policy"));
}

#[test]
fn the_policies_match_what_the_webhook_is_sent() {
    let s = Sections::new();
    let native = generate(s.policy(), &Options::default());
    let hook: Value =
        serde_saphyr::from_str(include_str!("../../deploy/base/webhook.yaml")).unwrap();
    // (group, resource) -> operations, as the webhook configuration sends them.
    let mut sent: BTreeMap<(String, String), Value> = BTreeMap::new();
    for w in hook["webhooks"].as_array().unwrap() {
        for rule in w["rules"].as_array().unwrap() {
            for group in rule["apiGroups"].as_array().unwrap() {
                for resource in rule["resources"].as_array().unwrap() {
                    let key = (
                        group.as_str().unwrap().into(),
                        resource.as_str().unwrap().into(),
                    );
                    sent.insert(key, rule["operations"].clone());
                }
            }
        }
        let constraints = &native.mutating_policy["spec"]["matchConstraints"];
        assert_eq!(constraints["namespaceSelector"], w["namespaceSelector"]);
        assert_eq!(constraints["objectSelector"], w["objectSelector"]);
        assert_eq!(constraints["matchPolicy"], w["matchPolicy"]);
    }
    let rules = |policy: &Value| -> BTreeMap<(String, String), Value> {
        policy["spec"]["matchConstraints"]["resourceRules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    (
                        r["apiGroups"][0].as_str().unwrap().into(),
                        r["resources"][0].as_str().unwrap().into(),
                    ),
                    r["operations"].clone(),
                )
            })
            .collect()
    };
    assert_eq!(rules(&native.mutating_policy), sent);
    let validated = rules(&native.validating_policy);
    assert_eq!(
        validated.keys().collect::<Vec<_>>(),
        sent.keys().collect::<Vec<_>>()
    );
    assert!(
        validated.values().all(|ops| ops == &json!(["CREATE"])),
        "{validated:?}"
    );
    assert_eq!(
        native.validating_policy["spec"]["matchConstraints"]["namespaceSelector"],
        native.mutating_policy["spec"]["matchConstraints"]["namespaceSelector"]
    );
}

#[test]
fn the_namespaces_come_from_the_configuration() {
    let mut s = Sections::new();
    s.namespaces.opt_in = BTreeMap::from([("team".into(), "shop".into())]);
    s.namespaces.excluded = vec!["kube-system".into(), "injector".into()];
    s.namespaces.own = Some("injector".into());
    let selector = &generate(s.policy(), &Options::default()).mutating_policy["spec"]["matchConstraints"]
        ["namespaceSelector"];
    assert_eq!(
        selector,
        &json!({
            "matchLabels": {"team": "shop"},
            "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                                  "values": ["kube-system", "injector"]}],
        })
    );
    // Nothing excluded: no NotIn (its values may not be empty); an empty
    // opt-in selects every namespace, as the webhook's.
    s.namespaces.excluded.clear();
    s.namespaces.own = None;
    s.namespaces.opt_in.clear();
    let native = generate(s.policy(), &Options::default());
    assert_eq!(
        native.mutating_policy["spec"]["matchConstraints"]["namespaceSelector"],
        json!({"matchLabels": {}})
    );
    assert!(native.coverage.covered[0].contains("in every namespace, except"));
}

#[test]
fn the_label_vocabulary_reaches_every_object() {
    let mut s = Sections::new();
    s.labels.opt_out_label = "example.com/skip".into();
    s.labels.tag_annotation = "example.com/tag".into();
    s.labels.canary_tag = "example.com/canary".into();
    let native = generate(s.policy(), &Options::default());
    assert_eq!(
        native.mutating_policy["spec"]["matchConstraints"]["objectSelector"]["matchExpressions"][0]
            ["key"],
        "example.com/skip"
    );
    let text = serde_json::to_string(&native.objects()).unwrap();
    assert!(
        !text.contains("canary-injector.io/"),
        "a default key is left"
    );
    let message = native.validating_policy["spec"]["validations"][0]["messageExpression"]
        .as_str()
        .unwrap();
    assert!(message.starts_with("'annotation example.com/tag: \"' + variables.requested[0]"));
    assert!(message.contains("the example.com/canary label"));
    assert_eq!(
        unlabelled_condition(&s.labels)["name"],
        "not-labelled-by-the-policy"
    );
}

#[test]
fn coverage_says_what_stays_with_the_webhook() {
    let mut s = Sections::new();
    let with = coverage(s.policy());
    assert!(
        with.webhook.iter().any(|l| l.contains(BOOTSTRAP_WEBHOOK)),
        "{with:#?}"
    );
    assert!(with.webhook[0].contains("FNV-1a") && with.webhook[0].contains(FALLBACK_WEBHOOK));
    assert!(with.covered[0].contains("namespaces labelled canary-injection=enabled"));
    assert!(
        with.covered[0]
            .contains("never kube-system, kube-public, kube-node-lease, canary-injector")
    );
    s.bootstrap.enabled = false;
    let without = coverage(s.policy());
    assert!(
        !without
            .webhook
            .iter()
            .any(|l| l.contains(BOOTSTRAP_WEBHOOK))
    );
    assert_eq!(without.webhook.len() + 1, with.webhook.len());
    let text = with.to_string();
    assert!(text.lines().all(|l| l.starts_with('#')), "{text}");
    assert!(text.lines().all(|l| l.len() <= 92), "{text}");
    // Wrapping loses no word.
    let words = |s: &str| -> Vec<String> {
        s.split_whitespace()
            .filter(|w| *w != "#" && *w != "-")
            .map(str::to_owned)
            .collect()
    };
    let items: String = with.webhook.join(" ");
    let listed = &text[text.find("Left to the webhook").unwrap()..];
    let listed = &listed[listed.find('\n').unwrap()..];
    assert_eq!(words(listed), words(&items));
}

#[test]
fn options_are_parsed_with_a_message_naming_the_choices() {
    assert_eq!(ApiVersion::from_name("v1"), Ok(ApiVersion::V1));
    assert_eq!(ApiVersion::from_name("v1beta1"), Ok(ApiVersion::V1beta1));
    for name in ApiVersion::NAMES {
        assert_eq!(ApiVersion::from_name(name).unwrap().as_str(), name);
    }
    assert_eq!(
        ApiVersion::from_name("v1alpha1").unwrap_err().to_string(),
        "--api-version: \"v1alpha1\" is not one of v1 (Kubernetes 1.36+), v1beta1 (1.34-1.35 \
         with the feature gate)"
    );
    for name in Reinvocation::NAMES {
        assert_eq!(Reinvocation::from_name(name).unwrap().as_str(), name);
    }
    assert_eq!(
        Reinvocation::from_name("ifneeded").unwrap_err().to_string(),
        "--reinvocation-policy: \"ifneeded\" is not one of IfNeeded, Never"
    );
}
