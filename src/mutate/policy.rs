//! The policy the core decides with: label vocabulary, namespace scope,
//! bootstrap and Istio settings. Each is one section of the configuration
//! file (`labels:`, `namespaces:`, `bootstrap:`, `istio:`), deserialised
//! here with its defaults and checked by its own `validate()`; the
//! configuration adapter (`crate::config`) composes them with the sections
//! the core does not need.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::StrMap;
use super::labels::{is_dns_label, is_dns_subdomain, validate_label_key, validate_label_value};
use super::version::parse_version;

/// A policy value that cannot be used. `field` is the dotted key in the
/// configuration file (`labels.canaryTag`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    /// The offending key, e.g. `labels.stage`.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> PolicyError {
    PolicyError {
        field,
        reason: reason.into(),
    }
}

/// Everything the core reads, borrowed from the sections that hold it
/// (the configuration, or a test's own values). Cheap to copy.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// The label vocabulary.
    pub labels: &'a LabelPolicy,
    /// Which namespaces are acted on.
    pub namespaces: &'a NamespacePolicy,
    /// The sidecar bootstrap fix.
    pub bootstrap: &'a BootstrapPolicy,
    /// What is assumed about Istio.
    pub istio: &'a IstioPolicy,
}

// === LabelPolicy ===

/// The labels written and the annotations read (config section `labels:`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelPolicy {
    /// Label that carries the canary version (`canarytag`).
    pub canary_tag: String,
    /// Label that carries the release stage (`stage`).
    pub stage: String,
    /// Stage value for a canary (`gray`).
    pub gray_stage: String,
    /// Stage value for everything else (`normal`).
    pub normal_stage: String,
    /// Annotation that asks for a canary; its value is the tag
    /// (`canary-injector.io/tag`).
    pub tag_annotation: String,
    /// Label whose value `"false"` opts one object out
    /// (`canary-injector.io/inject`); also the webhook's `objectSelector`.
    pub opt_out_label: String,
}

impl Default for LabelPolicy {
    fn default() -> Self {
        Self {
            canary_tag: "canarytag".into(),
            stage: "stage".into(),
            gray_stage: "gray".into(),
            normal_stage: "normal".into(),
            tag_annotation: "canary-injector.io/tag".into(),
            opt_out_label: "canary-injector.io/inject".into(),
        }
    }
}

impl LabelPolicy {
    /// Keys must be valid label/annotation keys, stage values valid
    /// non-empty label values, and the two keys and two stages must differ.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (field, key) in [
            ("labels.canaryTag", &self.canary_tag),
            ("labels.stage", &self.stage),
            ("labels.tagAnnotation", &self.tag_annotation),
            ("labels.optOutLabel", &self.opt_out_label),
        ] {
            validate_label_key(key).map_err(|reason| invalid(field, reason))?;
        }
        if self.canary_tag == self.stage {
            return Err(invalid("labels.stage", "must differ from labels.canaryTag"));
        }
        for (field, value) in [
            ("labels.grayStage", &self.gray_stage),
            ("labels.normalStage", &self.normal_stage),
        ] {
            if value.is_empty() {
                return Err(invalid(field, "must not be empty"));
            }
            validate_label_value(value).map_err(|reason| invalid(field, reason))?;
        }
        if self.gray_stage == self.normal_stage {
            return Err(invalid(
                "labels.normalStage",
                "must differ from labels.grayStage",
            ));
        }
        Ok(())
    }

    /// True when `labels` opt their object out (`<optOutLabel>: "false"`).
    pub fn opts_out<M: StrMap + ?Sized>(&self, labels: Option<&M>) -> bool {
        labels.and_then(|l| l.value(&self.opt_out_label)) == Some("false")
    }
}

// === NamespacePolicy ===

/// Which namespaces are acted on (config section `namespaces:`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct NamespacePolicy {
    /// Labels a namespace carries to opt in: the `matchLabels` of the
    /// webhook's `namespaceSelector`, and the selector every controller
    /// watches namespaces with (`{canary-injection: enabled}`).
    pub opt_in: BTreeMap<String, String>,
    /// Namespaces never acted on (system namespaces, to avoid self-deadlock).
    pub excluded: Vec<String>,
    /// The webhook's own namespace, always excluded; where the source
    /// bootstrap ConfigMap lives. Defaults to `$POD_NAMESPACE`.
    pub own: Option<String>,
}

impl Default for NamespacePolicy {
    fn default() -> Self {
        Self {
            opt_in: BTreeMap::from([("canary-injection".into(), "enabled".into())]),
            excluded: vec![
                "kube-system".into(),
                "kube-public".into(),
                "kube-node-lease".into(),
            ],
            own: None,
        }
    }
}

impl NamespacePolicy {
    /// `optIn` keys and values must be valid label keys and values, and
    /// every namespace name a valid DNS label.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (key, value) in &self.opt_in {
            validate_label_key(key).map_err(|reason| invalid("namespaces.optIn", reason))?;
            validate_label_value(value).map_err(|reason| invalid("namespaces.optIn", reason))?;
        }
        if let Some(bad) = self.excluded.iter().find(|ns| !is_dns_label(ns)) {
            return Err(invalid(
                "namespaces.excluded",
                format!("{bad:?} is not a namespace name (lowercase DNS label)"),
            ));
        }
        if let Some(own) = self.own.as_deref().filter(|ns| !is_dns_label(ns)) {
            return Err(invalid(
                "namespaces.own",
                format!("{own:?} is not a namespace name (lowercase DNS label)"),
            ));
        }
        Ok(())
    }

    /// True when objects in `namespace` must not be acted on: an excluded
    /// namespace or the webhook's own.
    pub fn is_excluded(&self, namespace: &str) -> bool {
        self.own.as_deref() == Some(namespace) || self.excluded.iter().any(|ns| ns == namespace)
    }

    /// True when a namespace with `labels` has opted in: it carries every
    /// `optIn` label (what the webhook's `namespaceSelector.matchLabels`
    /// and the controllers' watches select).
    pub fn opts_in(&self, labels: &BTreeMap<String, String>) -> bool {
        self.opt_in.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// The opt-in labels as a label selector string for watches and list
    /// calls (`canary-injection=enabled`; keys in order, comma-separated).
    pub fn opt_in_selector(&self) -> String {
        let mut selector = String::new();
        for (key, value) in &self.opt_in {
            if !selector.is_empty() {
                selector.push(',');
            }
            selector.push_str(key);
            selector.push('=');
            selector.push_str(value);
        }
        selector
    }
}

// === BootstrapPolicy ===

/// The sidecar bootstrap fix (config section `bootstrap:`; see docs/keepalive.md
/// "Fixing the xds-grpc keepalive").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct BootstrapPolicy {
    /// Give Istio sidecars the keepalive fix: the patched bootstrap template
    /// below 1.8, the agent keepalive env from 1.18.
    pub enabled: bool,
    /// Name of the ConfigMap holding the patched template (key
    /// `envoy_bootstrap_tmpl.json`): the source in the webhook's namespace
    /// and every copy.
    pub config_map_name: String,
    /// Pod annotation whose value `"false"` opts one pod out.
    pub opt_out_annotation: String,
    /// Copy the source ConfigMap into every opted-in namespace.
    pub reconcile: bool,
    /// The keepalive: written into the template by `canary-injector
    /// bootstrap-template`, and the agent's env from Istio 1.18
    /// ([`Keepalive::agent`]).
    pub keepalive: Keepalive,
}

impl Default for BootstrapPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            config_map_name: "canary-injector-bootstrap".into(),
            opt_out_annotation: "canary-injector.io/bootstrap".into(),
            reconcile: true,
            keepalive: Keepalive::default(),
        }
    }
}

impl BootstrapPolicy {
    /// The annotation must be a valid key, the ConfigMap name a DNS
    /// subdomain, and the keepalive values in range.
    pub fn validate(&self) -> Result<(), PolicyError> {
        validate_label_key(&self.opt_out_annotation)
            .map_err(|reason| invalid("bootstrap.optOutAnnotation", reason))?;
        if !is_dns_subdomain(&self.config_map_name) {
            return Err(invalid(
                "bootstrap.configMapName",
                format!(
                    "{:?} is not a valid ConfigMap name (lowercase DNS subdomain)",
                    self.config_map_name
                ),
            ));
        }
        self.keepalive.validate()
    }
}

/// TCP keepalive of the `xds-grpc` cluster (section `bootstrap.keepalive`),
/// written into the bootstrap template by `canary-injector
/// bootstrap-template`. Field names follow Envoy's `core.TcpKeepalive`
/// (`keepalive_time`, `keepalive_probes`, `keepalive_interval`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Keepalive {
    /// Seconds a connection must be idle before the first probe is sent.
    pub time: u32,
    /// Unanswered probes after which the connection is considered dead.
    pub probes: u32,
    /// Seconds between probes.
    pub interval: u32,
}

impl Default for Keepalive {
    /// 30s idle, 3 probes, 5s apart: a dead control-plane connection is
    /// noticed within about 45 seconds instead of Istio's ~975 s.
    fn default() -> Self {
        Self {
            time: 30,
            probes: 3,
            interval: 5,
        }
    }
}

impl Keepalive {
    /// The Istio agent's gRPC keepalive (1.18+) equivalent to this TCP
    /// keepalive, `(interval, timeout)` in seconds: ping after `time` idle,
    /// give up after `probes x interval` without an answer (30 s / 15 s by
    /// default: a dead istiod is noticed within 45 s, as with the template).
    pub fn agent(&self) -> (u32, u32) {
        (self.time, self.probes.saturating_mul(self.interval))
    }

    /// Each value is at least 1 and at most a sane ceiling.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (field, value, max) in [
            ("bootstrap.keepalive.time", self.time, 7200),
            ("bootstrap.keepalive.probes", self.probes, 20),
            ("bootstrap.keepalive.interval", self.interval, 600),
        ] {
            if value == 0 || value > max {
                return Err(invalid(
                    field,
                    format!("{value} is out of range (1..={max})"),
                ));
            }
        }
        Ok(())
    }
}

// === IstioPolicy ===

/// What the webhook assumes about the mesh, and where it looks (config
/// section `istio:`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct IstioPolicy {
    /// Istio proxy version (`"1.7"`, `"1.20.3"`) for pods that are not
    /// injected yet, or whose image tag is not a version: overrides the
    /// version detected from the injector. Unset: the detected one; none
    /// detected: such pods are skipped (a template from another version can
    /// break the proxy).
    pub proxy_version: Option<String>,
    /// Namespace of Istio's injector configuration (the adapter watches it;
    /// the core does not read this).
    pub injector_namespace: String,
    /// Names of the injector ConfigMaps (one per revision) whose
    /// `values.global.tag` tells which proxy version pods get; empty: no
    /// detection. `deploy/base/rbac.yaml` must name each one.
    pub injector_config_maps: Vec<String>,
}

impl Default for IstioPolicy {
    fn default() -> Self {
        Self {
            proxy_version: None,
            injector_namespace: "istio-system".into(),
            injector_config_maps: vec!["istio-sidecar-injector".into()],
        }
    }
}

impl IstioPolicy {
    /// `proxyVersion`, when set, must be a `major.minor[.patch]` version;
    /// the namespace a DNS label, the ConfigMap names DNS subdomains.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if let Some(v) = &self.proxy_version
            && parse_version(v).is_none()
        {
            return Err(invalid(
                "istio.proxyVersion",
                format!("{v:?} is not a version like \"1.5\" or \"1.7.8\""),
            ));
        }
        if !is_dns_label(&self.injector_namespace) {
            return Err(invalid(
                "istio.injectorNamespace",
                format!(
                    "{:?} is not a namespace name (lowercase DNS label)",
                    self.injector_namespace
                ),
            ));
        }
        if let Some(bad) = self
            .injector_config_maps
            .iter()
            .find(|n| !is_dns_subdomain(n))
        {
            return Err(invalid(
                "istio.injectorConfigMaps",
                format!("{bad:?} is not a ConfigMap name (lowercase DNS subdomain)"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        LabelPolicy::default().validate().unwrap();
        NamespacePolicy::default().validate().unwrap();
        BootstrapPolicy::default().validate().unwrap();
        IstioPolicy::default().validate().unwrap();
    }

    #[test]
    fn opt_in_renders_as_a_label_selector() {
        let ns = NamespacePolicy::default();
        assert_eq!(ns.opt_in_selector(), "canary-injection=enabled");
        let two = NamespacePolicy {
            opt_in: BTreeMap::from([
                ("team".into(), "shop".into()),
                ("example.com/mesh".into(), "".into()),
            ]),
            ..NamespacePolicy::default()
        };
        assert_eq!(two.opt_in_selector(), "example.com/mesh=,team=shop");
    }

    #[test]
    fn bad_values_name_the_field() {
        let labels = |f: fn(&mut LabelPolicy)| {
            let mut p = LabelPolicy::default();
            f(&mut p);
            p.validate().unwrap_err().field
        };
        assert_eq!(labels(|p| p.stage = "has space".into()), "labels.stage");
        assert_eq!(labels(|p| p.stage = "canarytag".into()), "labels.stage");
        assert_eq!(labels(|p| p.gray_stage = "".into()), "labels.grayStage");
        assert_eq!(
            labels(|p| p.normal_stage = "gray".into()),
            "labels.normalStage"
        );
        let ns = |f: fn(&mut NamespacePolicy)| {
            let mut p = NamespacePolicy::default();
            f(&mut p);
            p.validate().unwrap_err().field
        };
        assert_eq!(ns(|p| p.excluded.push("".into())), "namespaces.excluded");
        assert_eq!(
            ns(|p| p.excluded.push("Kube-System".into())),
            "namespaces.excluded"
        );
        assert_eq!(ns(|p| p.own = Some("a_b".into())), "namespaces.own");
        assert_eq!(
            ns(|p| {
                p.opt_in.insert("bad key".into(), "x".into());
            }),
            "namespaces.optIn"
        );
        assert_eq!(
            ns(|p| {
                p.opt_in.insert("ok".into(), "-bad".into());
            }),
            "namespaces.optIn"
        );
    }

    #[test]
    fn a_namespace_opts_in_with_every_opt_in_label() {
        let ns = NamespacePolicy::default();
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(ns.opts_in(&labels(&[("canary-injection", "enabled"), ("team", "a")])));
        assert!(!ns.opts_in(&labels(&[("canary-injection", "disabled")])));
        assert!(!ns.opts_in(&labels(&[])));
        let everything = NamespacePolicy {
            opt_in: BTreeMap::new(),
            ..NamespacePolicy::default()
        };
        assert!(
            everything.opts_in(&labels(&[])),
            "an empty selector selects all"
        );
    }

    #[test]
    fn own_namespace_is_always_excluded() {
        let ns = NamespacePolicy {
            own: Some("canary-injector".into()),
            ..NamespacePolicy::default()
        };
        assert!(ns.is_excluded("canary-injector"));
        assert!(ns.is_excluded("kube-system"));
        assert!(!ns.is_excluded("shop"));
        assert!(!NamespacePolicy::default().is_excluded("canary-injector"));
    }
}
