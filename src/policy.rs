//! The native admission policy, the pure part: the webhook's label rules as
//! a `MutatingAdmissionPolicy` the apiserver evaluates itself (CEL, in
//! process: nothing to be down, no TLS, no network hop), generated from the
//! same configuration sections the webhook decides with
//! ([`crate::mutate::Policy`]). No I/O, no kube types: `canary-injector
//! policy` prints [`Native::render`], `check` compares the cluster's objects
//! with [`generate`], and the tests evaluate the CEL against the webhook's
//! own decisions (`tests/native_policy.rs`, `.ci/native_policy.py`).
//!
//! ```text
//!  labels:, namespaces: (config) --> generate() --> MutatingAdmissionPolicy canary-injector-labels
//!                                                    + its binding: the labels, the tag copy
//!                                               --> ValidatingAdmissionPolicy canary-injector-tags
//!                                                    + its binding: refuses an unusable tag
//!  apiserver, per CREATE (UPDATE for workloads):
//!    MutatingAdmissionPolicy -> mutating webhooks -> ValidatingAdmissionPolicy -> ...
//!    (labels)                   (the webhook: what      (unusable tag)
//!                                the policy left; the
//!                                sidecar keepalive)
//! ```
//!
//! What the objects do is what [`crate::mutate::decide`] does at admission
//! for the label rules: the same kinds and operations
//! ([`crate::mutate::KINDS`]), the same namespaces (the opt-in labels; never
//! the excluded ones or the webhook's own), the same skips (opted-out
//! objects, mirror pods, workloads being deleted), labels only added where
//! missing and chosen consistently with those present, owned ReplicaSets
//! labelled on their metadata only, standalone ones on their template too,
//! a workload's own tag copied into its pod template, and the refusal of a
//! tag with no letter or digit (on `CREATE`). What CEL cannot do is left to
//! the webhook, and [`Coverage`] says so for the configuration at hand: a tag
//! longer than a label value (its label is cut and given an FNV-1a hash:
//! CEL has no loops and no bitwise arithmetic), the sidecar keepalive, the
//! warnings and Events, and anything read from other objects (a policy
//! sees the object under admission and its namespace only).
//!
//! It never writes the bootstrap mount, never touches an owned template's
//! labels, a selector or a label that is set, and has no parameters object
//! (`paramKind`): the configuration is baked in, so regenerate after
//! changing it (`check` says when the cluster's objects differ).

mod cel;

use std::fmt;

use serde_json::{Map, Value, json};

pub use cel::TAG_FITS;

use crate::mutate::{KINDS, LabelPolicy, Policy};

/// The `MutatingAdmissionPolicy` and its binding.
pub const MUTATING_NAME: &str = "canary-injector-labels";
/// The `ValidatingAdmissionPolicy` and its binding.
pub const VALIDATING_NAME: &str = "canary-injector-tags";
/// API group of both policies.
pub const GROUP: &str = "admissionregistration.k8s.io";
/// The webhook (deploy/native-policy) that labels what the policy leaves
/// without a stage label; its match condition is [`unlabelled_condition`].
pub const FALLBACK_WEBHOOK: &str = "labels.canary-injector.io";
/// The webhook (deploy/native-policy) that gives Istio sidecars the
/// keepalive, with `failurePolicy: Ignore`.
pub const BOOTSTRAP_WEBHOOK: &str = "bootstrap.canary-injector.io";

/// An option value `policy` does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{option}: {value:?} is not one of {allowed}")]
pub struct UnknownOption {
    /// The option (`--api-version`).
    pub option: &'static str,
    /// The value given.
    pub value: String,
    /// What it may be.
    pub allowed: &'static str,
}

/// Which `admissionregistration.k8s.io` version the mutating policy and its
/// binding are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiVersion {
    /// `v1`: Kubernetes 1.36+, on by default.
    #[default]
    V1,
    /// `v1beta1`: Kubernetes 1.34 and 1.35, with the `MutatingAdmissionPolicy`
    /// feature gate and `--runtime-config=admissionregistration.k8s.io/v1beta1=true`.
    V1beta1,
}

impl ApiVersion {
    /// Every version, as spelled on the command line.
    pub const NAMES: [&'static str; 2] = ["v1", "v1beta1"];

    /// The version named `name` (`v1`, `v1beta1`).
    pub fn from_name(name: &str) -> Result<Self, UnknownOption> {
        match name {
            "v1" => Ok(Self::V1),
            "v1beta1" => Ok(Self::V1beta1),
            _ => Err(UnknownOption {
                option: "--api-version",
                value: name.into(),
                allowed: "v1 (Kubernetes 1.36+), v1beta1 (1.34-1.35 with the feature gate)",
            }),
        }
    }

    /// `v1` or `v1beta1`.
    pub fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// `admissionregistration.k8s.io/<version>`.
    pub fn api_version(self) -> String {
        format!("{GROUP}/{}", self.as_str())
    }
}

/// Whether the mutating policy runs again when a later mutation (another
/// policy, a webhook such as Istio's injector) changed the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reinvocation {
    /// `IfNeeded`, as the webhook: the labels are also right after other
    /// mutators (a second run adds nothing that is there).
    #[default]
    IfNeeded,
    /// `Never`.
    Never,
}

impl Reinvocation {
    /// Every value, as the API spells them.
    pub const NAMES: [&'static str; 2] = ["IfNeeded", "Never"];

    /// The policy named `name` (`IfNeeded`, `Never`).
    pub fn from_name(name: &str) -> Result<Self, UnknownOption> {
        match name {
            "IfNeeded" => Ok(Self::IfNeeded),
            "Never" => Ok(Self::Never),
            _ => Err(UnknownOption {
                option: "--reinvocation-policy",
                value: name.into(),
                allowed: "IfNeeded, Never",
            }),
        }
    }

    /// `IfNeeded` or `Never`.
    pub fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// How the objects are written (the choices of whoever deploys them; the
/// rules come from the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Options {
    /// The mutating policy's API version.
    pub api_version: ApiVersion,
    /// The mutating policy's `reinvocationPolicy`.
    pub reinvocation: Reinvocation,
}

/// The generated objects, as Kubernetes JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Native {
    /// `MutatingAdmissionPolicy` [`MUTATING_NAME`].
    pub mutating_policy: Value,
    /// Its `MutatingAdmissionPolicyBinding`.
    pub mutating_binding: Value,
    /// `ValidatingAdmissionPolicy` [`VALIDATING_NAME`] (`v1`, Kubernetes 1.30+).
    pub validating_policy: Value,
    /// Its `ValidatingAdmissionPolicyBinding`.
    pub validating_binding: Value,
    /// What the objects cover, and what stays with the webhook.
    pub coverage: Coverage,
}

impl Native {
    /// The four objects, in apply order (each policy before its binding).
    pub fn objects(&self) -> [&Value; 4] {
        [
            &self.mutating_policy,
            &self.mutating_binding,
            &self.validating_policy,
            &self.validating_binding,
        ]
    }

    /// The objects as a multi-document YAML stream, after a comment that
    /// says what they cover ([`Coverage`]): what `canary-injector policy`
    /// prints.
    pub fn render(&self) -> Result<String, RenderError> {
        let yaml = serde_saphyr::to_string_multiple(&self.objects())
            .map_err(|e| RenderError(e.to_string()))?;
        Ok(format!("{}{yaml}", self.coverage))
    }
}

/// The objects could not be written as YAML (a bug, never user input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot render the policy as YAML: {0}")]
pub struct RenderError(pub String);

/// What the native policy does for one configuration, and what it leaves to
/// the webhook. `Display` is the comment `policy` prints above the objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coverage {
    /// The rules the policies carry out, one line each.
    pub covered: Vec<String>,
    /// What the webhook (or a controller) keeps, and why, one line each.
    pub webhook: Vec<String>,
}

/// Comment lines are wrapped at this width.
const COMMENT_WIDTH: usize = 92;

/// Writes `text` as a `#   - ` item, wrapped at [`COMMENT_WIDTH`].
fn comment_item(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    let mut line = String::from("#   -");
    for word in text.split(' ') {
        if line.len() + 1 + word.len() > COMMENT_WIDTH && line.len() > "#     ".len() {
            writeln!(f, "{line}")?;
            line = String::from("#    ");
        }
        line.push(' ');
        line.push_str(word);
    }
    writeln!(f, "{line}")
}

impl fmt::Display for Coverage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "# canary-injector's label rules as a native admission policy (Kubernetes 1.36+; 1.34-1.35\n\
             # with --api-version v1beta1 and the MutatingAdmissionPolicy feature gate). Generated by\n\
             # `canary-injector policy` from the configuration: regenerate after changing it\n\
             # (`canary-injector check` reports objects that differ). See\n\
             # docs/native-policy.md.\n#\n# The apiserver does, with no webhook call:"
        )?;
        for line in &self.covered {
            comment_item(f, line)?;
        }
        writeln!(
            f,
            "#\n# Left to the webhook (deploy/native-policy keeps it registered for exactly this):"
        )?;
        for line in &self.webhook {
            comment_item(f, line)?;
        }
        Ok(())
    }
}

/// What the policies cover for `policy`, and what they leave to the webhook.
pub fn coverage(policy: Policy<'_>) -> Coverage {
    let l = policy.labels;
    let ns = policy.namespaces;
    let selector = if ns.opt_in.is_empty() {
        "every namespace".to_owned()
    } else {
        format!("namespaces labelled {}", ns.opt_in_selector())
    };
    let excluded = excluded_namespaces(policy);
    let never = if excluded.is_empty() {
        String::new()
    } else {
        format!(" (never {})", excluded.join(", "))
    };
    let covered = vec![
        format!(
            "Pods and ReplicaSets on CREATE in {selector}{never}, except objects labelled \
             {}=false and mirror pods: {}={} without a tag, {}={} and {}=<tag> with the \
             annotation {} (made a label value: characters outside [A-Za-z0-9._-] become '-', \
             ends trimmed); a label already set is never changed and the missing one agrees with it",
            l.opt_out_label,
            l.stage,
            l.normal_stage,
            l.stage,
            l.gray_stage,
            l.canary_tag,
            l.tag_annotation
        ),
        "a ReplicaSet with a controller: its own labels only, from its pod template; a \
         standalone one: its labels and its template's"
            .to_owned(),
        format!(
            "Deployments, StatefulSets, DaemonSets, CronJobs (CREATE, UPDATE) and Jobs (CREATE) \
             without a controller: their own {} annotation copied into the pod template",
            l.tag_annotation
        ),
        format!(
            "refused on CREATE (ValidatingAdmissionPolicy {VALIDATING_NAME}, with the webhook's \
             message): a {} annotation with no letter or digit",
            l.tag_annotation
        ),
    ];
    let mut webhook = vec![
        format!(
            "a tag longer than {} characters on a Pod or ReplicaSet: its label is cut and given \
             8 hex digits of the tag's FNV-1a hash, which CEL cannot compute. The webhook \
             {FALLBACK_WEBHOOK} gets what arrives without {} (failurePolicy Fail): such objects, \
             and those with an unusable tag, which it refuses as the policy would",
            crate::mutate::labels::MAX_VALUE_LEN,
            l.stage
        ),
        "anything read from another object: a policy sees the object under admission and its \
         namespace only, so a pod whose tag is on its Deployment's own metadata but not in the \
         pod template (the webhook's rule that reads the owner chain from a cache) is labelled \
         from its template; the policy copies a workload's own tag into its template at the \
         workload's CREATE and UPDATE, so only workloads not updated since are concerned"
            .to_owned(),
        "warnings and Events (tag-rewritten, tag-ignored, template-tag-*): the policy has no \
         way to return them; `canary-injector check` reports rewritten tags"
            .to_owned(),
    ];
    if policy.bootstrap.enabled {
        webhook.push(format!(
            "the Istio sidecar keepalive (bootstrap.enabled): the webhook {BOOTSTRAP_WEBHOOK}, \
             failurePolicy Ignore"
        ));
    }
    webhook.push(
        "pods created before the namespace opted in: the backfill (serve, as before), with the \
         routes controller and the ConfigMap copier"
            .to_owned(),
    );
    Coverage { covered, webhook }
}

/// The namespaces never acted on: the excluded ones, then the webhook's own
/// (the `NotIn` values of both selectors).
fn excluded_namespaces(policy: Policy<'_>) -> Vec<String> {
    let ns = policy.namespaces;
    let mut out = ns.excluded.clone();
    if let Some(own) = &ns.own
        && !out.contains(own)
    {
        out.push(own.clone());
    }
    out
}

/// `matchConstraints`: the admitted kinds with their operations (or
/// `CREATE` only), the namespace selector and the opt-out object selector of
/// the webhook.
fn match_constraints(policy: Policy<'_>, create_only: bool) -> Value {
    let rules: Vec<Value> = KINDS
        .iter()
        .filter(|k| k.admission)
        .map(|k| {
            let operations: &[&str] = if create_only {
                &["CREATE"]
            } else {
                k.operations()
            };
            json!({
                "apiGroups": [k.group],
                "apiVersions": [k.version],
                "operations": operations,
                "resources": [k.resource],
                "scope": k.scope.as_str(),
            })
        })
        .collect();
    let mut namespace_selector = Map::new();
    namespace_selector.insert(
        "matchLabels".into(),
        serde_json::to_value(&policy.namespaces.opt_in).unwrap_or_default(),
    );
    let excluded = excluded_namespaces(policy);
    if !excluded.is_empty() {
        namespace_selector.insert(
            "matchExpressions".into(),
            json!([{
                "key": "kubernetes.io/metadata.name",
                "operator": "NotIn",
                "values": excluded,
            }]),
        );
    }
    json!({
        "resourceRules": rules,
        "matchPolicy": "Equivalent",
        "namespaceSelector": namespace_selector,
        "objectSelector": {"matchExpressions": [{
            "key": policy.labels.opt_out_label,
            "operator": "NotIn",
            "values": ["false"],
        }]},
    })
}

fn named_list(list: Vec<cel::Named>) -> Vec<Value> {
    list.into_iter()
        .map(|n| json!({"name": n.name, "expression": n.expression}))
        .collect()
}

fn metadata(name: &str) -> Value {
    json!({
        "name": name,
        "labels": {"app.kubernetes.io/name": "canary-injector", "app.kubernetes.io/part-of": "canary-injector"},
    })
}

/// The objects for `policy`, written as `options` says.
pub fn generate(policy: Policy<'_>, options: &Options) -> Native {
    let labels = policy.labels;
    let api_version = options.api_version.api_version();
    let mutating_policy = json!({
        "apiVersion": api_version,
        "kind": "MutatingAdmissionPolicy",
        "metadata": metadata(MUTATING_NAME),
        "spec": {
            // Fail, as the webhook: a pod without its labels is in no subset.
            // The policy runs in the apiserver, so only a bug fails it.
            "failurePolicy": "Fail",
            "reinvocationPolicy": options.reinvocation.as_str(),
            "matchConstraints": match_constraints(policy, false),
            "matchConditions": named_list(cel::match_conditions(labels, true)),
            "variables": named_list(cel::variables(labels)),
            "mutations": [{
                "patchType": "JSONPatch",
                "jsonPatch": {"expression": cel::mutation(labels)},
            }],
        },
    });
    let mutating_binding = json!({
        "apiVersion": api_version,
        "kind": "MutatingAdmissionPolicyBinding",
        "metadata": metadata(MUTATING_NAME),
        "spec": {"policyName": MUTATING_NAME},
    });
    let validating_policy = json!({
        "apiVersion": format!("{GROUP}/v1"),
        "kind": "ValidatingAdmissionPolicy",
        "metadata": metadata(VALIDATING_NAME),
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": match_constraints(policy, true),
            "matchConditions": named_list(cel::match_conditions(labels, false)),
            "variables": named_list(cel::validation_variables(labels)),
            "validations": [{
                "expression": cel::validation(),
                "messageExpression": cel::refusal_message(labels),
                // As the webhook's deny: 403.
                "reason": "Forbidden",
            }],
        },
    });
    let validating_binding = json!({
        "apiVersion": format!("{GROUP}/v1"),
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": metadata(VALIDATING_NAME),
        "spec": {"policyName": VALIDATING_NAME, "validationActions": ["Deny"]},
    });
    Native {
        mutating_policy,
        mutating_binding,
        validating_policy,
        validating_binding,
        coverage: coverage(policy),
    }
}

/// The match condition (`{name, expression}`) of the webhook
/// [`FALLBACK_WEBHOOK`] in native mode: objects that reach it without the
/// stage label, i.e. what the policy left (a tag too long for CEL to make a
/// label of), or everything when the policy is missing.
pub fn unlabelled_condition(labels: &LabelPolicy) -> Value {
    let c = cel::unlabelled_condition(labels);
    json!({"name": c.name, "expression": c.expression})
}

#[cfg(test)]
mod tests;
