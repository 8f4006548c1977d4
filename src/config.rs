//! Configuration: embedded defaults, overridden by an optional YAML file.
//!
//! Every key is optional; an unknown key or an invalid value is an error at
//! start-up (never a surprise at admission time). Keys are camelCase, like
//! Kubernetes manifests.

use std::path::Path;

use serde::Deserialize;

use crate::mutate::labels::{is_dns_subdomain, validate_label_key, validate_label_value};

/// Default upper bound for a request body. The apiserver caps an object at
/// 3 MiB and a review can hold `object` and `oldObject`.
pub const DEFAULT_MAX_BODY_BYTES: usize = 6 * 1024 * 1024;

/// Hard ceiling for `maxBodyBytes`, so a typo cannot let one request pin
/// gigabytes of memory.
pub const MAX_BODY_BYTES_CEILING: usize = 64 * 1024 * 1024;

/// The mutation policy and server limits. Built from [`Config::default`] or
/// [`Config::from_yaml`]; validated by [`Config::validate`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Label that carries the canary version (`canarytag`).
    pub canary_tag_label: String,
    /// Label that carries the release stage (`stage`).
    pub stage_label: String,
    /// Stage value for a canary (`gray`).
    pub gray_stage: String,
    /// Stage value for everything else (`normal`).
    pub normal_stage: String,
    /// Annotation that asks for a canary; its value is the tag.
    pub tag_annotation: String,
    /// Label whose value `"false"` opts one object out.
    pub opt_out_label: String,
    /// Namespaces never acted on (system namespaces, to avoid self-deadlock).
    pub excluded_namespaces: Vec<String>,
    /// The webhook's own namespace, always excluded. Defaults to `$POD_NAMESPACE`.
    pub webhook_namespace: Option<String>,
    /// Largest accepted request body in bytes; larger ones get HTTP 413.
    pub max_body_bytes: usize,
    /// The Istio sidecar bootstrap (xds-grpc keepalive) fix.
    pub bootstrap: BootstrapConfig,
    /// What the webhook assumes about Istio.
    pub istio: IstioConfig,
}

/// Settings of the sidecar bootstrap fix (see README "Fixing the xds-grpc
/// keepalive").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct BootstrapConfig {
    /// Mount the patched bootstrap template into Istio sidecars.
    pub enabled: bool,
    /// Name of the ConfigMap holding the patched template (key
    /// `envoy_bootstrap_tmpl.json`): the source in the webhook's namespace
    /// and every copy.
    pub config_map_name: String,
    /// Pod annotation whose value `"false"` opts one pod out.
    pub opt_out_annotation: String,
    /// Copy the source ConfigMap into every opted-in namespace.
    pub reconcile: bool,
    /// The keepalive written by `canary-injector bootstrap-template`.
    pub keepalive: KeepaliveConfig,
}

impl Default for BootstrapConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            config_map_name: "canary-injector-bootstrap".into(),
            opt_out_annotation: "canary-injector.io/bootstrap".into(),
            reconcile: true,
            keepalive: KeepaliveConfig::default(),
        }
    }
}

/// TCP keepalive of the `xds-grpc` cluster, in seconds and probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct KeepaliveConfig {
    /// Idle time before the first probe (`keepalive_time`).
    pub time: u32,
    /// Unanswered probes before the connection is dropped (`keepalive_probes`).
    pub probes: u32,
    /// Time between probes (`keepalive_interval`).
    pub interval: u32,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        Self {
            time: 30,
            probes: 3,
            interval: 5,
        }
    }
}

/// What the webhook assumes about the mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct IstioConfig {
    /// Istio proxy version (`"1.5"`, `"1.7.8"`) assumed for pods that are not
    /// injected yet, or whose image tag is not a version. Unset: such pods
    /// are skipped, because a template from another version can break the proxy.
    pub proxy_version: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            canary_tag_label: "canarytag".into(),
            stage_label: "stage".into(),
            gray_stage: "gray".into(),
            normal_stage: "normal".into(),
            tag_annotation: "canary-injector.io/tag".into(),
            opt_out_label: "canary-injector.io/inject".into(),
            excluded_namespaces: vec![
                "kube-system".into(),
                "kube-public".into(),
                "kube-node-lease".into(),
            ],
            webhook_namespace: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            bootstrap: BootstrapConfig::default(),
            istio: IstioConfig::default(),
        }
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path given.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML did not parse or had an unknown key / wrong type.
    #[error("invalid config: {0}")]
    Parse(String),
    /// A value is out of range or not a valid Kubernetes name.
    #[error("invalid config: {field}: {reason}")]
    Invalid {
        /// The offending key.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl Config {
    /// Parses YAML (an empty document means "all defaults") and validates it.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a YAML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Loads `path` if given, else the defaults; then fills the webhook
    /// namespace from `pod_namespace` (the `POD_NAMESPACE` env) if unset.
    pub fn load(path: Option<&Path>, pod_namespace: Option<String>) -> Result<Self, ConfigError> {
        let mut cfg = match path {
            Some(p) => Self::from_file(p)?,
            None => Self::default(),
        };
        if cfg.webhook_namespace.is_none() {
            cfg.webhook_namespace = pod_namespace.filter(|ns| !ns.is_empty());
        }
        Ok(cfg)
    }

    /// Checks every key and value; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let keys: [(&'static str, &str); 4] = [
            ("canaryTagLabel", &self.canary_tag_label),
            ("stageLabel", &self.stage_label),
            ("tagAnnotation", &self.tag_annotation),
            ("optOutLabel", &self.opt_out_label),
        ];
        for (field, key) in keys {
            validate_label_key(key).map_err(|reason| ConfigError::Invalid { field, reason })?;
        }
        if self.canary_tag_label == self.stage_label {
            return Err(ConfigError::Invalid {
                field: "stageLabel",
                reason: "must differ from canaryTagLabel".into(),
            });
        }
        for (field, value) in [
            ("grayStage", &self.gray_stage),
            ("normalStage", &self.normal_stage),
        ] {
            if value.is_empty() {
                return Err(ConfigError::Invalid {
                    field,
                    reason: "must not be empty".into(),
                });
            }
            validate_label_value(value).map_err(|reason| ConfigError::Invalid { field, reason })?;
        }
        if self.gray_stage == self.normal_stage {
            return Err(ConfigError::Invalid {
                field: "normalStage",
                reason: "must differ from grayStage".into(),
            });
        }
        if self.max_body_bytes < 1024 || self.max_body_bytes > MAX_BODY_BYTES_CEILING {
            return Err(ConfigError::Invalid {
                field: "maxBodyBytes",
                reason: format!(
                    "{} is out of range (1024..={MAX_BODY_BYTES_CEILING})",
                    self.max_body_bytes
                ),
            });
        }
        validate_label_key(&self.bootstrap.opt_out_annotation).map_err(|reason| {
            ConfigError::Invalid {
                field: "bootstrap.optOutAnnotation",
                reason,
            }
        })?;
        if !is_dns_subdomain(&self.bootstrap.config_map_name) {
            return Err(ConfigError::Invalid {
                field: "bootstrap.configMapName",
                reason: format!(
                    "{:?} is not a valid ConfigMap name (lowercase DNS subdomain)",
                    self.bootstrap.config_map_name
                ),
            });
        }
        let ka = self.bootstrap.keepalive;
        for (field, value, max) in [
            ("bootstrap.keepalive.time", ka.time, 7200),
            ("bootstrap.keepalive.probes", ka.probes, 20),
            ("bootstrap.keepalive.interval", ka.interval, 600),
        ] {
            if value == 0 || value > max {
                return Err(ConfigError::Invalid {
                    field,
                    reason: format!("{value} is out of range (1..={max})"),
                });
            }
        }
        if let Some(v) = &self.istio.proxy_version
            && crate::mutate::bootstrap::parse_version(v).is_none()
        {
            return Err(ConfigError::Invalid {
                field: "istio.proxyVersion",
                reason: format!("{v:?} is not a version like \"1.5\" or \"1.7.8\""),
            });
        }
        if self.excluded_namespaces.iter().any(|ns| ns.is_empty()) {
            return Err(ConfigError::Invalid {
                field: "excludedNamespaces",
                reason: "contains an empty name".into(),
            });
        }
        Ok(())
    }

    /// The webhook's own namespace, where the source ConfigMap lives.
    pub fn own_namespace(&self) -> Option<&str> {
        self.webhook_namespace.as_deref()
    }

    /// True when the webhook must not act on objects in `namespace`.
    pub fn is_excluded_namespace(&self, namespace: &str) -> bool {
        self.webhook_namespace.as_deref() == Some(namespace)
            || self.excluded_namespaces.iter().any(|ns| ns == namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::from_yaml("").unwrap(), Config::default());
        assert_eq!(
            Config::from_yaml("# only a comment\n").unwrap(),
            Config::default()
        );
    }

    #[test]
    fn overrides_are_applied() {
        let cfg = Config::from_yaml(
            "canaryTagLabel: example.com/canary\ngrayStage: canary\nmaxBodyBytes: 2048\n",
        )
        .unwrap();
        assert_eq!(cfg.canary_tag_label, "example.com/canary");
        assert_eq!(cfg.gray_stage, "canary");
        assert_eq!(cfg.max_body_bytes, 2048);
        assert_eq!(cfg.stage_label, "stage");
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = Config::from_yaml("stageLable: stage\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("stageLable"), "{err}");
    }

    #[test]
    fn wrong_type_is_an_error() {
        let err = Config::from_yaml("maxBodyBytes: lots\n").unwrap_err();
        assert!(matches!(err, ConfigError::Parse(_)), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        for (yaml, field) in [
            ("stageLabel: 'has space'\n", "stageLabel"),
            ("grayStage: 'feature/x'\n", "grayStage"),
            ("normalStage: gray\n", "normalStage"),
            ("stageLabel: canarytag\n", "stageLabel"),
            ("maxBodyBytes: 10\n", "maxBodyBytes"),
            ("tagAnnotation: ''\n", "tagAnnotation"),
            ("excludedNamespaces: ['']\n", "excludedNamespaces"),
            (
                "bootstrap: {configMapName: Bad_Name}\n",
                "bootstrap.configMapName",
            ),
            (
                "bootstrap: {keepalive: {time: 0}}\n",
                "bootstrap.keepalive.time",
            ),
            (
                "bootstrap: {keepalive: {probes: 100}}\n",
                "bootstrap.keepalive.probes",
            ),
            ("istio: {proxyVersion: latest}\n", "istio.proxyVersion"),
            ("bootstrap: {enable: true}\n", "enable"),
        ] {
            let err = Config::from_yaml(yaml).unwrap_err().to_string();
            assert!(err.contains(field), "{yaml}: {err}");
        }
    }

    #[test]
    fn nested_sections_take_partial_overrides() {
        let cfg = Config::from_yaml(
            "bootstrap:\n  keepalive: {time: 60}\n  reconcile: false\nistio:\n  proxyVersion: '1.5'\n",
        )
        .unwrap();
        assert_eq!(cfg.bootstrap.keepalive.time, 60);
        assert_eq!(cfg.bootstrap.keepalive.probes, 3);
        assert!(!cfg.bootstrap.reconcile);
        assert!(cfg.bootstrap.enabled);
        assert_eq!(cfg.istio.proxy_version.as_deref(), Some("1.5"));
    }

    #[test]
    fn shipped_configmap_parses() {
        // deploy/base/config.yaml embeds the configuration users start from.
        let manifest = include_str!("../deploy/base/config.yaml");
        let cm: serde_json::Value = serde_saphyr::from_str(manifest).unwrap();
        let text = cm["data"]["config.yaml"].as_str().unwrap();
        Config::from_yaml(text).unwrap();
    }

    #[test]
    fn webhook_namespace_comes_from_env_when_unset() {
        let cfg = Config::load(None, Some("canary-injector".into())).unwrap();
        assert!(cfg.is_excluded_namespace("canary-injector"));
        assert!(cfg.is_excluded_namespace("kube-system"));
        assert!(!cfg.is_excluded_namespace("shop"));
        let none = Config::load(None, Some(String::new())).unwrap();
        assert_eq!(none.webhook_namespace, None);
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let err = Config::load(Some(Path::new("/nonexistent/c.yaml")), None).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().contains("/nonexistent/c.yaml"));
    }
}
