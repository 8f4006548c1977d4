//! `check` in native mode: when the cluster has any of the native admission
//! policy's objects ([`crate::policy`]), all four must be there and be what
//! `canary-injector policy` makes of the webhook's deployed configuration,
//! or the policy and the webhook (with the routes controller and the
//! backfill, which read the same configuration) disagree on labels. Pure:
//! the objects come in a [`NativeView`] read by [`super::cluster`].
//!
//! A live object matches when every field the generator writes has the
//! generated value (lists item by item, and of the same length): the
//! apiserver adds defaults of its own, which are not differences. The API
//! version and `reinvocationPolicy` found are taken as chosen (both are
//! `policy` options), not compared.

use serde_json::Value;

use super::{Finding, Severity, finding};
use crate::mutate::Policy;
use crate::policy::{self, ApiVersion, MUTATING_NAME, Options, Reinvocation, VALIDATING_NAME};

/// The native policy's objects as the cluster has them (`None`: absent).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NativeView {
    /// `MutatingAdmissionPolicy` [`MUTATING_NAME`], `v1` or `v1beta1`.
    pub mutating_policy: Option<Value>,
    /// `MutatingAdmissionPolicyBinding` [`MUTATING_NAME`].
    pub mutating_binding: Option<Value>,
    /// `ValidatingAdmissionPolicy` [`VALIDATING_NAME`].
    pub validating_policy: Option<Value>,
    /// `ValidatingAdmissionPolicyBinding` [`VALIDATING_NAME`].
    pub validating_binding: Option<Value>,
}

impl NativeView {
    fn entries(&self) -> [(&'static str, &'static str, Option<&Value>); 4] {
        [
            (
                "MutatingAdmissionPolicy",
                MUTATING_NAME,
                self.mutating_policy.as_ref(),
            ),
            (
                "MutatingAdmissionPolicyBinding",
                MUTATING_NAME,
                self.mutating_binding.as_ref(),
            ),
            (
                "ValidatingAdmissionPolicy",
                VALIDATING_NAME,
                self.validating_policy.as_ref(),
            ),
            (
                "ValidatingAdmissionPolicyBinding",
                VALIDATING_NAME,
                self.validating_binding.as_ref(),
            ),
        ]
    }
}

/// How to install or refresh the objects.
const FIX: &str = "regenerate and apply them from the webhook's config.yaml: canary-injector \
                   policy --config config.yaml | kubectl apply -f - (the default config: \
                   kubectl apply -k deploy/native-policy)";

/// The options the cluster's objects were written with: their API version
/// and `reinvocationPolicy` (defaults where unreadable, which then differ).
fn options_of(mutating_policy: Option<&Value>) -> Options {
    let Some(p) = mutating_policy else {
        return Options::default();
    };
    let version = p["apiVersion"]
        .as_str()
        .and_then(|v| v.rsplit_once('/'))
        .and_then(|(_, v)| ApiVersion::from_name(v).ok());
    let reinvocation = p["spec"]["reinvocationPolicy"]
        .as_str()
        .and_then(|r| Reinvocation::from_name(r).ok());
    Options {
        api_version: version.unwrap_or_default(),
        reinvocation: reinvocation.unwrap_or_default(),
    }
}

/// The first place where `live` lacks what `expected` says, as a dotted
/// path (`spec.variables[3].expression`); `None` when it has all of it.
pub fn first_difference(expected: &Value, live: &Value, at: &str) -> Option<String> {
    let here = || {
        if at.is_empty() {
            "(top)".to_owned()
        } else {
            at.to_owned()
        }
    };
    match (expected, live) {
        (Value::Object(e), Value::Object(l)) => e.iter().find_map(|(key, value)| {
            let path = if at.is_empty() {
                key.clone()
            } else {
                format!("{at}.{key}")
            };
            match l.get(key) {
                Some(found) => first_difference(value, found, &path),
                None => Some(path),
            }
        }),
        (Value::Array(e), Value::Array(l)) if e.len() == l.len() => e
            .iter()
            .zip(l)
            .enumerate()
            .find_map(|(i, (e, l))| first_difference(e, l, &format!("{}[{i}]", here()))),
        (e, l) if e == l => None,
        _ => Some(here()),
    }
}

/// The findings about the native policy; none when the cluster has none of
/// its objects (webhook mode).
pub fn check_native(view: &NativeView, policy: Policy<'_>, out: &mut Vec<Finding>) {
    let entries = view.entries();
    if entries.iter().all(|(_, _, o)| o.is_none()) {
        return;
    }
    let missing: Vec<String> = entries
        .iter()
        .filter(|(_, _, o)| o.is_none())
        .map(|(kind, name, _)| format!("{kind} {name}"))
        .collect();
    if !missing.is_empty() {
        out.push(finding(
            Severity::Error,
            "native-policy-incomplete",
            "webhook",
            format!(
                "the native admission policy is partly installed: {} missing. A policy without \
                 its binding does nothing (pods are labelled only where the webhook is called), \
                 and without the validating policy an unusable tag is refused only by the webhook",
                missing.join(", ")
            ),
            FIX,
        ));
    }
    let generated = policy::generate(policy, &options_of(view.mutating_policy.as_ref()));
    let expected = generated.objects();
    for ((kind, name, live), expected) in entries.iter().zip(expected) {
        let Some(live) = live else { continue };
        let wanted = serde_json::json!({"metadata": {"name": expected["metadata"]["name"]},
                                        "spec": expected["spec"]});
        if let Some(path) = first_difference(&wanted, live, "") {
            out.push(finding(
                Severity::Error,
                "native-policy-stale",
                "webhook",
                format!(
                    "{kind} {name} is not what `canary-injector policy` makes of the webhook's \
                     config.yaml (it differs at {path}): the apiserver labels by other rules than \
                     the webhook, the routes controller and the backfill"
                ),
                FIX,
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::check::CODES;
    use crate::config::Config;

    fn installed(cfg: &Config, options: &Options) -> NativeView {
        let native = policy::generate(cfg.policy(), options);
        NativeView {
            mutating_policy: Some(native.mutating_policy),
            mutating_binding: Some(native.mutating_binding),
            validating_policy: Some(native.validating_policy),
            validating_binding: Some(native.validating_binding),
        }
    }

    fn deployed() -> Config {
        let mut cfg = Config::default();
        cfg.namespaces.own = Some("canary-injector".into());
        cfg
    }

    fn findings(view: &NativeView, cfg: &Config) -> Vec<Finding> {
        let mut out = Vec::new();
        check_native(view, cfg.policy(), &mut out);
        for f in &out {
            assert!(CODES.contains(&f.code), "{}", f.code);
        }
        out
    }

    /// What the apiserver adds to a stored object: defaults and metadata.
    fn as_stored(mut object: Value) -> Value {
        object["metadata"]["uid"] = json!("0f1e2d3c-0000-4000-8000-000000000009");
        object["metadata"]["resourceVersion"] = json!("4711");
        object["metadata"]["generation"] = json!(1);
        if object["spec"]["matchConstraints"].is_object() {
            object["spec"]["matchConstraints"]["excludeResourceRules"] = json!([]);
        }
        object
    }

    #[test]
    fn webhook_mode_is_not_a_finding() {
        assert!(findings(&NativeView::default(), &deployed()).is_empty());
    }

    #[test]
    fn an_installed_policy_as_generated_is_sound_whatever_its_options() {
        let cfg = deployed();
        for options in [
            Options::default(),
            Options {
                api_version: ApiVersion::V1beta1,
                reinvocation: Reinvocation::Never,
            },
        ] {
            let mut view = installed(&cfg, &options);
            for o in [
                &mut view.mutating_policy,
                &mut view.mutating_binding,
                &mut view.validating_policy,
                &mut view.validating_binding,
            ] {
                *o = o.take().map(as_stored);
            }
            assert_eq!(findings(&view, &cfg), [], "{options:?}");
        }
    }

    #[test]
    fn a_missing_object_is_an_error_naming_it() {
        let cfg = deployed();
        let mut view = installed(&cfg, &Options::default());
        view.mutating_binding = None;
        view.validating_policy = None;
        let out = findings(&view, &cfg);
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(out[0].code, "native-policy-incomplete");
        assert_eq!(out[0].severity, Severity::Error);
        assert!(
            out[0].message.contains(
                "MutatingAdmissionPolicyBinding canary-injector-labels, \
                 ValidatingAdmissionPolicy canary-injector-tags missing"
            ),
            "{}",
            out[0].message
        );
        assert!(out[0].fix.contains("canary-injector policy --config"));
    }

    #[test]
    fn a_policy_from_another_configuration_is_stale() {
        let cfg = deployed();
        // Generated before labels.stage was changed in the webhook's config.
        let old = deployed();
        let mut changed = deployed();
        changed.labels.stage = "release".into();
        let view = installed(&old, &Options::default());
        let out = findings(&view, &changed);
        let stale: Vec<&str> = out
            .iter()
            .filter(|f| f.code == "native-policy-stale")
            .map(|f| f.message.as_str())
            .collect();
        // Both policies read the stage label; the bindings do not change.
        assert_eq!(stale.len(), 2, "{out:#?}");
        assert!(stale[0].starts_with("MutatingAdmissionPolicy canary-injector-labels is not"));
        assert!(
            stale[0].contains("(it differs at spec.variables["),
            "{}",
            stale[0]
        );
        assert!(stale[1].starts_with("ValidatingAdmissionPolicy canary-injector-tags"));
        assert_eq!(findings(&view, &cfg), []);
        // Another namespace selector, or a binding to another policy.
        let mut other_ns = deployed();
        other_ns
            .namespaces
            .opt_in
            .insert("team".into(), "shop".into());
        assert!(
            findings(&view, &other_ns)[0]
                .message
                .contains("spec.matchConstraints.namespaceSelector.matchLabels")
        );
        let mut view = installed(&cfg, &Options::default());
        view.mutating_binding.as_mut().unwrap()["spec"]["policyName"] = json!("something-else");
        let out = findings(&view, &cfg);
        assert_eq!(out.len(), 1);
        assert!(out[0].message.contains("differs at spec.policyName"));
    }

    #[test]
    fn an_extra_condition_or_variable_is_a_difference() {
        let cfg = deployed();
        let mut view = installed(&cfg, &Options::default());
        view.mutating_policy.as_mut().unwrap()["spec"]["matchConditions"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "never", "expression": "false"}));
        let out = findings(&view, &cfg);
        assert_eq!(out.len(), 1);
        assert!(
            out[0].message.contains("differs at spec.matchConditions"),
            "{out:#?}"
        );
    }

    #[test]
    fn differences_are_found_where_they_are() {
        let expected = json!({"a": {"b": [1, {"c": "x"}]}, "d": "y"});
        assert_eq!(first_difference(&expected, &expected, ""), None);
        let extra = json!({"a": {"b": [1, {"c": "x", "z": 0}], "q": 1}, "d": "y", "e": 2});
        assert_eq!(
            first_difference(&expected, &extra, ""),
            None,
            "additions are defaults"
        );
        let changed = json!({"a": {"b": [1, {"c": "w"}]}, "d": "y"});
        assert_eq!(
            first_difference(&expected, &changed, "").as_deref(),
            Some("a.b[1].c")
        );
        let shorter = json!({"a": {"b": [1]}, "d": "y"});
        assert_eq!(
            first_difference(&expected, &shorter, "").as_deref(),
            Some("a.b")
        );
        let missing = json!({"a": {"b": [1, {"c": "x"}]}});
        assert_eq!(
            first_difference(&expected, &missing, "").as_deref(),
            Some("d")
        );
        assert_eq!(
            first_difference(&json!(1), &json!(2), "").as_deref(),
            Some("(top)")
        );
    }

    /// `check` against an apiserver that holds the objects: read (v1, else
    /// v1beta1 for the mutating ones), compared, nothing written.
    #[tokio::test]
    async fn the_adapter_reads_the_objects_in_either_version() {
        let cfg = deployed();
        for (version, stale) in [("v1", false), ("v1beta1", false), ("v1beta1", true)] {
            let mut view = installed(
                &cfg,
                &Options {
                    api_version: ApiVersion::from_name(version).unwrap(),
                    ..Options::default()
                },
            );
            if stale {
                view.validating_policy.as_mut().unwrap()["spec"]["validations"][0]["reason"] =
                    json!("Invalid");
            }
            let base = "/apis/admissionregistration.k8s.io";
            let objects = [
                (
                    format!("{base}/{version}/mutatingadmissionpolicies/{MUTATING_NAME}"),
                    view.mutating_policy.clone().unwrap(),
                ),
                (
                    format!("{base}/{version}/mutatingadmissionpolicybindings/{MUTATING_NAME}"),
                    view.mutating_binding.clone().unwrap(),
                ),
                (
                    format!("{base}/v1/validatingadmissionpolicies/{VALIDATING_NAME}"),
                    view.validating_policy.clone().unwrap(),
                ),
            ];
            let stored: Vec<(&str, Value)> = objects
                .iter()
                .map(|(p, o)| (p.as_str(), o.clone()))
                .collect();
            let api = crate::testing::FakeApiServer::with(&stored);
            let (client, _served) = api.client();
            let report = crate::check::cluster::run(client, &Default::default(), 0)
                .await
                .unwrap();
            let native: Vec<&Finding> = report
                .findings
                .iter()
                .filter(|f| f.code.starts_with("native-policy"))
                .collect();
            // The validating binding is not stored: incomplete, always.
            assert_eq!(native[0].code, "native-policy-incomplete", "{native:#?}");
            assert!(
                native[0]
                    .message
                    .contains("ValidatingAdmissionPolicyBinding")
            );
            assert_eq!(
                native.len(),
                if stale { 2 } else { 1 },
                "{version}: {native:#?}"
            );
            if stale {
                assert!(
                    native[1]
                        .message
                        .contains("differs at spec.validations[0].reason")
                );
            }
            assert!(
                api.calls().iter().all(|c| !c.is_write()),
                "check only reads"
            );
        }
    }
}
