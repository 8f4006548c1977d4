//! Configuration: embedded defaults, overridden by an optional YAML file.
//!
//! Every key is optional; an unknown key or an invalid value is an error at
//! start-up (never a surprise at admission time). Keys are camelCase, like
//! Kubernetes manifests, grouped in sections. The sections the core decides
//! with (`labels`, `namespaces`, `bootstrap`, `istio`) are defined in
//! [`crate::mutate::policy`]; this module composes them with the adapters'
//! sections (`server`, `routes`, `backfill`, `leaderElection`) and validates
//! each in turn.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::limits::Limits;
use crate::mutate::labels::is_dns_subdomain;
use crate::mutate::{
    BootstrapPolicy, IstioPolicy, LabelPolicy, NamespacePolicy, Policy, PolicyError,
};

/// Hard ceiling for `server.maxBodyBytes`, so a typo cannot let one request
/// pin gigabytes of memory.
pub const MAX_BODY_BYTES_CEILING: usize = 64 * 1024 * 1024;

/// Keys of the flat schema before configuration sections, and where each
/// one lives now. A file using one fails with a message naming the new key.
pub const MOVED_KEYS: [(&str, &str); 9] = [
    ("canaryTagLabel", "labels.canaryTag"),
    ("stageLabel", "labels.stage"),
    ("grayStage", "labels.grayStage"),
    ("normalStage", "labels.normalStage"),
    ("tagAnnotation", "labels.tagAnnotation"),
    ("optOutLabel", "labels.optOutLabel"),
    ("excludedNamespaces", "namespaces.excluded"),
    ("webhookNamespace", "namespaces.own"),
    ("maxBodyBytes", "server.maxBodyBytes"),
];

/// The whole configuration, one field per section of the file. Built from
/// [`Config::default`] or [`Config::from_yaml`]; validated by
/// [`Config::validate`], which asks each section to validate itself.
///
/// The core reads only the policy sections, through [`Config::policy`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// `labels:` the label vocabulary.
    #[serde(deserialize_with = "section")]
    pub labels: LabelPolicy,
    /// `namespaces:` which namespaces are acted on.
    #[serde(deserialize_with = "section")]
    pub namespaces: NamespacePolicy,
    /// `server:` limits of the HTTPS server.
    #[serde(deserialize_with = "section")]
    pub server: ServerConfig,
    /// `bootstrap:` the Istio sidecar bootstrap (xds-grpc keepalive) fix.
    #[serde(deserialize_with = "section")]
    pub bootstrap: BootstrapPolicy,
    /// `istio:` what the webhook assumes about Istio.
    #[serde(deserialize_with = "section")]
    pub istio: IstioPolicy,
    /// `routes:` the canary routes controller.
    #[serde(deserialize_with = "section")]
    pub routes: RoutesConfig,
    /// `backfill:` the controller that labels pods created before the webhook.
    #[serde(deserialize_with = "section")]
    pub backfill: BackfillConfig,
    /// `leaderElection:` the Lease that elects the one replica running the
    /// controllers that write.
    #[serde(deserialize_with = "section")]
    pub leader_election: LeaderElectionConfig,
}

/// A section written with no keys under it (`istio:` then only comments)
/// is YAML `null`: it means the section's defaults.
fn section<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Limits of the HTTPS server (section `server:`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ServerConfig {
    /// Largest accepted request body in bytes; larger ones get HTTP 413.
    pub max_body_bytes: usize,
    /// Body bytes held in memory at once, over all requests; beyond it a
    /// request gets a fast 503 with `Retry-After` (the apiserver retries).
    pub body_budget_bytes: usize,
    /// Open HTTPS connections at most (the `--max-connections` flag wins).
    pub max_connections: usize,
    /// Extra connections accepted at the cap, for one probe each.
    pub probe_connections: usize,
    /// Seconds a new connection has to send its first request.
    pub first_request_timeout_seconds: u32,
    /// Seconds a connection may stay idle after its last request.
    pub idle_timeout_seconds: u32,
    /// Open connections on the metrics port at most.
    pub metrics_max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let l = Limits::default();
        Self {
            max_body_bytes: l.max_body_bytes,
            body_budget_bytes: l.body_budget_bytes,
            max_connections: l.max_connections,
            probe_connections: l.probe_connections,
            first_request_timeout_seconds: l.first_request_timeout.as_secs() as u32,
            idle_timeout_seconds: l.idle_timeout.as_secs() as u32,
            metrics_max_connections: l.metrics_max_connections,
        }
    }
}

impl ServerConfig {
    /// Each value within its range, and the combination usable by the
    /// server ([`Limits::validate`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1024..=MAX_BODY_BYTES_CEILING).contains(&self.max_body_bytes) {
            return Err(invalid(
                "server.maxBodyBytes",
                format!(
                    "{} is out of range (1024..={MAX_BODY_BYTES_CEILING})",
                    self.max_body_bytes
                ),
            ));
        }
        if self.body_budget_bytes > 16 * MAX_BODY_BYTES_CEILING {
            return Err(invalid(
                "server.bodyBudgetBytes",
                format!("{} is more than 1 GiB", self.body_budget_bytes),
            ));
        }
        check_range(
            "server.firstRequestTimeoutSeconds",
            self.first_request_timeout_seconds,
            1,
            300,
        )?;
        check_range(
            "server.idleTimeoutSeconds",
            self.idle_timeout_seconds,
            1,
            3600,
        )?;
        self.limits(Limits::default()).validate().map_err(|e| {
            invalid(
                match e.field {
                    "body_budget_bytes" => "server.bodyBudgetBytes",
                    "max_connections" => "server.maxConnections",
                    "metrics_max_connections" => "server.metricsMaxConnections",
                    _ => "server",
                },
                e.reason.to_string(),
            )
        })
    }

    /// `base` with this section's values.
    pub fn limits(&self, base: Limits) -> Limits {
        Limits {
            max_body_bytes: self.max_body_bytes,
            body_budget_bytes: self.body_budget_bytes,
            max_connections: self.max_connections,
            probe_connections: self.probe_connections,
            first_request_timeout: Duration::from_secs(self.first_request_timeout_seconds.into()),
            idle_timeout: Duration::from_secs(self.idle_timeout_seconds.into()),
            metrics_max_connections: self.metrics_max_connections,
            ..base
        }
    }
}

/// The canary routes controller (section `routes:`; see
/// [`crate::routes`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct RoutesConfig {
    /// Generate routes for canary versions.
    pub enabled: bool,
    /// The route API of Services without the annotation
    /// `canary-injector.io/route-api`: `auto` (Istio's when served, else
    /// the Gateway API's HTTPRoute), `istio` or `gateway-api`.
    pub api: crate::routes::gateway::ApiChoice,
    /// The HTTP request header whose value selects a canary tag
    /// (`x-canary-tag`); a lowercase header name.
    pub header: String,
    /// How long a canary's DestinationRule subset outlives its last ready
    /// pod, in seconds (its header route is removed at once; the subset
    /// stays until every sidecar has the new routes).
    pub removal_grace_seconds: u32,
    /// How long a routed Service may have no ready normal pod before a
    /// `RouteNoNormalPod` Warning says so, in seconds (a Service whose pods
    /// are still becoming ready is no news).
    pub no_normal_pod_warning_seconds: u32,
    /// The timeout of every generated route (a Go duration), unless the
    /// Service's `canary-injector.io/route-timeout` says otherwise; unset:
    /// Istio's default (none).
    pub timeout: Option<String>,
    /// The retries of every generated route, `<attempts>` or
    /// `<attempts>/<per-try timeout>`, unless the Service's
    /// `canary-injector.io/route-retries` says otherwise; unset: Istio's
    /// default.
    pub retries: Option<String>,
}

impl Default for RoutesConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            api: crate::routes::gateway::ApiChoice::Auto,
            header: "x-canary-tag".into(),
            removal_grace_seconds: 60,
            no_normal_pod_warning_seconds: 30,
            timeout: None,
            retries: None,
        }
    }
}

impl RoutesConfig {
    /// The header must be a lowercase HTTP header name (RFC 9110 token) and
    /// the grace at most an hour.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !crate::routes::is_header_name(&self.header) {
            return Err(invalid(
                "routes.header",
                format!(
                    "{:?} is not a lowercase HTTP header name ([a-z0-9] and !#$%&'*+-.^_`|~)",
                    self.header
                ),
            ));
        }
        check_range(
            "routes.removalGraceSeconds",
            self.removal_grace_seconds,
            0,
            3600,
        )?;
        check_range(
            "routes.noNormalPodWarningSeconds",
            self.no_normal_pod_warning_seconds,
            0,
            3600,
        )?;
        self.route_settings().map(drop)
    }

    /// `timeout` and `retries` as every generated route gets them (unless a
    /// Service's annotations say otherwise).
    pub fn route_settings(&self) -> Result<crate::routes::RouteSettings, ConfigError> {
        use crate::routes::shape::{istio_duration, parse_retries};
        let timeout = self
            .timeout
            .as_deref()
            .map(|t| istio_duration(t).map_err(|e| invalid("routes.timeout", format!("{t:?} {e}"))))
            .transpose()?;
        let retries = self
            .retries
            .as_deref()
            .map(|r| parse_retries(r).map_err(|e| invalid("routes.retries", format!("{r:?} {e}"))))
            .transpose()?;
        Ok(crate::routes::RouteSettings { timeout, retries })
    }
}

/// The controller that labels pods created before the webhook (section
/// `backfill:`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct BackfillConfig {
    /// Label running pods that lack the labels.
    pub enabled: bool,
    /// At most this many label patches per second, to spare the apiserver.
    pub patches_per_second: u32,
}

impl Default for BackfillConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            patches_per_second: 20,
        }
    }
}

impl BackfillConfig {
    /// `patchesPerSecond` must be within 1..=1000.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_range(
            "backfill.patchesPerSecond",
            self.patches_per_second,
            1,
            1000,
        )
    }
}

/// Leader election among replicas (section `leaderElection:`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct LeaderElectionConfig {
    /// Elect a leader; when off, every replica runs the writers (fine with
    /// one replica only).
    pub enabled: bool,
    /// Name of the `coordination.k8s.io` Lease in the webhook's namespace.
    pub lease_name: String,
    /// How long a lease holds without renewal, in seconds.
    pub lease_duration_seconds: u32,
    /// How often the leader renews, in seconds; unset: 2/15 of
    /// `leaseDurationSeconds` (client-go's 2 s for 15 s), at most a third
    /// ([`LeaderElectionConfig::renew_seconds`]).
    pub renew_seconds: Option<u32>,
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            lease_name: "canary-injector".into(),
            lease_duration_seconds: 15,
            renew_seconds: None,
        }
    }
}

impl LeaderElectionConfig {
    /// The lease name must be a DNS subdomain, the duration within
    /// 5..=300 seconds and the renewal period shorter than the duration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_dns_subdomain(&self.lease_name) {
            return Err(invalid(
                "leaderElection.leaseName",
                format!(
                    "{:?} is not a valid Lease name (lowercase DNS subdomain)",
                    self.lease_name
                ),
            ));
        }
        check_range(
            "leaderElection.leaseDurationSeconds",
            self.lease_duration_seconds,
            5,
            300,
        )?;
        if let Some(renew) = self.renew_seconds {
            // At least two renewals must fit in the renew deadline (two
            // thirds of the duration) before the leader steps down.
            check_range(
                "leaderElection.renewSeconds",
                renew,
                1,
                (self.lease_duration_seconds / 3).max(1),
            )?;
        }
        Ok(())
    }

    /// The renewal period: `renewSeconds`, else client-go's proportion
    /// (2 s for a 15 s lease).
    pub fn renew_seconds(&self) -> u32 {
        self.renew_seconds
            .unwrap_or((self.lease_duration_seconds * 2 / 15).max(1))
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
    /// A key of the old flat schema, which now lives in a section.
    #[error("invalid config: {old} moved to {new}")]
    Moved {
        /// The old key.
        old: &'static str,
        /// Its dotted place now.
        new: &'static str,
    },
    /// A value is out of range or not a valid Kubernetes name.
    #[error("invalid config: {field}: {reason}")]
    Invalid {
        /// The offending key, dotted (`labels.stage`).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl From<PolicyError> for ConfigError {
    fn from(e: PolicyError) -> Self {
        Self::Invalid {
            field: e.field,
            reason: e.reason,
        }
    }
}

fn invalid(field: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { field, reason }
}

fn check_range(field: &'static str, value: u32, min: u32, max: u32) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{value} is out of range ({min}..={max})"),
        ))
    }
}

impl Config {
    /// Parses YAML (an empty document means "all defaults") and validates it.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        // A key of the flat schema gets a message naming its new place
        // rather than "unknown field".
        if let Ok(top) = serde_saphyr::from_str::<BTreeMap<String, IgnoredAny>>(text)
            && let Some((old, new)) = MOVED_KEYS.iter().find(|(old, _)| top.contains_key(*old))
        {
            return Err(ConfigError::Moved { old, new });
        }
        let cfg: Config =
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
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

    /// Loads `path` if given, else the defaults; then fills the webhook's
    /// own namespace from `pod_namespace` (the `POD_NAMESPACE` env) if unset.
    pub fn load(path: Option<&Path>, pod_namespace: Option<String>) -> Result<Self, ConfigError> {
        let mut cfg = match path {
            Some(p) => Self::from_file(p)?,
            None => Self::default(),
        };
        if cfg.namespaces.own.is_none() {
            cfg.namespaces.own = pod_namespace.filter(|ns| !ns.is_empty());
        }
        Ok(cfg)
    }

    /// Checks every section; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.labels.validate()?;
        self.namespaces.validate()?;
        self.server.validate()?;
        self.bootstrap.validate()?;
        self.istio.validate()?;
        self.routes.validate()?;
        self.backfill.validate()?;
        self.leader_election.validate()
    }

    /// The sections the core decides with.
    pub fn policy(&self) -> Policy<'_> {
        Policy {
            labels: &self.labels,
            namespaces: &self.namespaces,
            bootstrap: &self.bootstrap,
            istio: &self.istio,
        }
    }

    /// The webhook's own namespace, where the source ConfigMap lives.
    pub fn own_namespace(&self) -> Option<&str> {
        self.namespaces.own.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::from_yaml("").unwrap(), Config::default());
        assert_eq!(
            Config::from_yaml("# only a comment\n").unwrap(),
            Config::default()
        );
        Config::default().validate().unwrap();
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let cfg = Config::default();
        assert_eq!(cfg.labels.canary_tag, "canarytag");
        assert_eq!(cfg.namespaces.opt_in_selector(), "canary-injection=enabled");
        assert_eq!(
            cfg.server.max_body_bytes,
            crate::limits::DEFAULT_MAX_BODY_BYTES
        );
        assert_eq!(
            cfg.routes,
            RoutesConfig {
                enabled: true,
                api: crate::routes::gateway::ApiChoice::Auto,
                header: "x-canary-tag".into(),
                removal_grace_seconds: 60,
                no_normal_pod_warning_seconds: 30,
                timeout: None,
                retries: None,
            }
        );
        assert_eq!(
            cfg.backfill,
            BackfillConfig {
                enabled: true,
                patches_per_second: 20
            }
        );
        assert_eq!(cfg.leader_election.lease_name, "canary-injector");
        assert_eq!(cfg.leader_election.lease_duration_seconds, 15);
        assert_eq!(cfg.leader_election.renew_seconds(), 2);
    }

    #[test]
    fn overrides_are_applied() {
        let cfg = Config::from_yaml(
            "labels:\n  canaryTag: example.com/canary\n  grayStage: canary\n\
             server: {maxBodyBytes: 2048}\n\
             namespaces: {optIn: {team: shop, mesh: istio}, own: injector}\n\
             routes: {header: x-version, removalGraceSeconds: 0}\n\
             backfill: {enabled: false, patchesPerSecond: 1000}\n\
             leaderElection: {leaseName: ci.example.com, leaseDurationSeconds: 30, renewSeconds: 8}\n",
        )
        .unwrap();
        assert_eq!(cfg.labels.canary_tag, "example.com/canary");
        assert_eq!(cfg.labels.gray_stage, "canary");
        assert_eq!(cfg.labels.stage, "stage");
        assert_eq!(cfg.server.max_body_bytes, 2048);
        assert_eq!(cfg.namespaces.opt_in_selector(), "mesh=istio,team=shop");
        assert_eq!(cfg.own_namespace(), Some("injector"));
        assert_eq!(cfg.namespaces.excluded.len(), 3, "default kept");
        assert_eq!(cfg.routes.header, "x-version");
        assert_eq!(cfg.routes.removal_grace_seconds, 0);
        assert!(cfg.routes.enabled);
        assert!(!cfg.backfill.enabled);
        assert_eq!(cfg.leader_election.renew_seconds(), 8);
        assert_eq!(cfg.policy().labels, &cfg.labels);
    }

    #[test]
    fn the_server_section_becomes_the_listener_limits() {
        let cfg = Config::from_yaml(
            "server: {maxBodyBytes: 2097152, bodyBudgetBytes: 8388608, maxConnections: 50, \
             probeConnections: 2, firstRequestTimeoutSeconds: 3, idleTimeoutSeconds: 30, \
             metricsMaxConnections: 5}\n",
        )
        .unwrap();
        let l = cfg.server.limits(Limits::default());
        assert_eq!((l.max_body_bytes, l.body_budget_bytes), (2097152, 8388608));
        assert_eq!(
            (
                l.max_connections,
                l.probe_connections,
                l.metrics_max_connections
            ),
            (50, 2, 5)
        );
        assert_eq!(l.first_request_timeout, Duration::from_secs(3));
        assert_eq!(l.idle_timeout, Duration::from_secs(30));
        assert_eq!(
            l.header_timeout,
            Limits::default().header_timeout,
            "the rest stays"
        );
        assert_eq!(
            Config::default()
                .server
                .limits(Limits::default())
                .max_body_bytes,
            Limits::default().max_body_bytes
        );
        for (yaml, field) in [
            (
                "server: {maxBodyBytes: 8388608, bodyBudgetBytes: 4194304}\n",
                "server.bodyBudgetBytes",
            ),
            ("server: {maxConnections: 0}\n", "server.maxConnections"),
            (
                "server: {idleTimeoutSeconds: 0}\n",
                "server.idleTimeoutSeconds",
            ),
        ] {
            let err = Config::from_yaml(yaml).unwrap_err().to_string();
            assert!(err.contains(field), "{yaml}: {err}");
        }
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        for (yaml, key) in [
            ("stageLable: stage\n", "stageLable"),
            ("labels: {stageLabel: x}\n", "stageLabel"),
            ("routes: {headers: x}\n", "headers"),
        ] {
            let err = Config::from_yaml(yaml).unwrap_err();
            assert!(matches!(err, ConfigError::Parse(_)), "{err}");
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn routes_api_reads_its_three_values_and_refuses_others() {
        use crate::routes::gateway::ApiChoice;
        for (value, want) in [
            ("auto", ApiChoice::Auto),
            ("istio", ApiChoice::Istio),
            ("gateway-api", ApiChoice::GatewayApi),
        ] {
            let cfg = Config::from_yaml(&format!("routes: {{api: {value}}}\n")).unwrap();
            assert_eq!(cfg.routes.api, want);
        }
        let err = Config::from_yaml("routes: {api: linkerd}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("linkerd") && err.contains("gateway-api"),
            "names the value and what is allowed: {err}"
        );
    }

    #[test]
    fn old_flat_keys_name_their_new_place() {
        for (old, new) in MOVED_KEYS {
            let err = Config::from_yaml(&format!("{old}: x\n")).unwrap_err();
            assert!(
                matches!(err, ConfigError::Moved { old: o, new: n } if o == old && n == new),
                "{err}"
            );
            assert_eq!(
                err.to_string(),
                format!("invalid config: {old} moved to {new}")
            );
        }
        // Among valid new keys too.
        let err = Config::from_yaml("labels: {stage: s}\nexcludedNamespaces: []\n").unwrap_err();
        assert!(err.to_string().contains("namespaces.excluded"), "{err}");
    }

    #[test]
    fn wrong_type_is_an_error() {
        for yaml in [
            "server: {maxBodyBytes: lots}\n",
            "namespaces: {optIn: [canary-injection]}\n",
            "- a list\n",
        ] {
            let err = Config::from_yaml(yaml).unwrap_err();
            assert!(matches!(err, ConfigError::Parse(_)), "{yaml}: {err}");
        }
    }

    #[test]
    fn bad_values_name_the_field() {
        for (yaml, field) in [
            ("labels: {stage: 'has space'}\n", "labels.stage"),
            ("labels: {grayStage: 'feature/x'}\n", "labels.grayStage"),
            ("labels: {normalStage: gray}\n", "labels.normalStage"),
            ("labels: {stage: canarytag}\n", "labels.stage"),
            ("labels: {tagAnnotation: ''}\n", "labels.tagAnnotation"),
            ("labels: {optOutLabel: 'a b'}\n", "labels.optOutLabel"),
            ("server: {maxBodyBytes: 10}\n", "server.maxBodyBytes"),
            (
                "server: {maxBodyBytes: 1000000000}\n",
                "server.maxBodyBytes",
            ),
            ("namespaces: {excluded: ['']}\n", "namespaces.excluded"),
            ("namespaces: {own: 'Not_A_Namespace'}\n", "namespaces.own"),
            ("namespaces: {optIn: {'bad key': x}}\n", "namespaces.optIn"),
            ("namespaces: {optIn: {ok: '-bad'}}\n", "namespaces.optIn"),
            (
                "bootstrap: {configMapName: Bad_Name}\n",
                "bootstrap.configMapName",
            ),
            (
                "bootstrap: {optOutAnnotation: '/x'}\n",
                "bootstrap.optOutAnnotation",
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
            (
                "istio: {injectorNamespace: Istio_System}\n",
                "istio.injectorNamespace",
            ),
            (
                "istio: {injectorConfigMaps: [ok, Not-OK]}\n",
                "istio.injectorConfigMaps",
            ),
            ("bootstrap: {enable: true}\n", "enable"),
            ("routes: {header: X-Canary-Tag}\n", "routes.header"),
            ("routes: {header: ''}\n", "routes.header"),
            ("routes: {header: 'x canary'}\n", "routes.header"),
            ("routes: {header: ':path'}\n", "routes.header"),
            (
                "routes: {removalGraceSeconds: 3601}\n",
                "routes.removalGraceSeconds",
            ),
            (
                "routes: {noNormalPodWarningSeconds: 3601}\n",
                "routes.noNormalPodWarningSeconds",
            ),
            ("routes: {timeout: soon}\n", "routes.timeout"),
            ("routes: {timeout: 10us}\n", "routes.timeout"),
            ("routes: {retries: many}\n", "routes.retries"),
            ("routes: {retries: 3/x}\n", "routes.retries"),
            (
                "backfill: {patchesPerSecond: 0}\n",
                "backfill.patchesPerSecond",
            ),
            (
                "backfill: {patchesPerSecond: 1001}\n",
                "backfill.patchesPerSecond",
            ),
            (
                "leaderElection: {leaseName: 'Lease'}\n",
                "leaderElection.leaseName",
            ),
            (
                "leaderElection: {leaseDurationSeconds: 4}\n",
                "leaderElection.leaseDurationSeconds",
            ),
            (
                "leaderElection: {leaseDurationSeconds: 301}\n",
                "leaderElection.leaseDurationSeconds",
            ),
            (
                "leaderElection: {renewSeconds: 6}\n",
                "leaderElection.renewSeconds",
            ),
            (
                "leaderElection: {renewSeconds: 0}\n",
                "leaderElection.renewSeconds",
            ),
        ] {
            let err = Config::from_yaml(yaml).unwrap_err().to_string();
            assert!(err.contains(field), "{yaml}: {err}");
        }
    }

    #[test]
    fn route_settings_are_read_as_istio_writes_them() {
        let cfg = Config::from_yaml("routes: {timeout: 1m30s, retries: 3/500ms}\n").unwrap();
        let settings = cfg.routes.route_settings().unwrap();
        assert_eq!(settings.timeout.as_deref(), Some("90s"));
        let retries = settings.retries.unwrap();
        assert_eq!(
            (retries.attempts, retries.per_try_timeout.as_deref()),
            (3, Some("0.5s"))
        );
        let err = Config::from_yaml("routes: {retries: many}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"many\" is not <attempts>"), "{err}");
        assert_eq!(
            Config::default().routes.route_settings().unwrap(),
            crate::routes::RouteSettings::default()
        );
    }

    #[test]
    fn range_edges_are_accepted() {
        for yaml in [
            "routes: {removalGraceSeconds: 3600, header: 'x-b3_tag.1'}\n",
            "backfill: {patchesPerSecond: 1}\n",
            "leaderElection: {leaseDurationSeconds: 6, renewSeconds: 2}\n",
            "leaderElection: {leaseDurationSeconds: 300}\n",
            "server: {maxBodyBytes: 1024}\n",
            "namespaces: {optIn: {}, excluded: []}\n",
        ] {
            Config::from_yaml(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        }
    }

    #[test]
    fn empty_sections_are_their_defaults() {
        let cfg =
            Config::from_yaml("istio:\n  # proxyVersion: '1.5'\nroutes:\nlabels: {}\n").unwrap();
        assert_eq!(cfg, Config::default());
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

    /// deploy/base/config.yaml embeds the configuration users start from:
    /// every value in it is the built-in default, as it says; no Istio
    /// version is pinned (it is detected).
    #[test]
    fn shipped_configmap_is_the_defaults() {
        let manifest = include_str!("../deploy/base/config.yaml");
        assert!(manifest.contains("Every value below is the built-in default"));
        let cm: Value = serde_saphyr::from_str(manifest).unwrap();
        let text = cm["data"]["config.yaml"].as_str().unwrap();
        let cfg = Config::from_yaml(text).unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.istio.proxy_version, None);
        for key in ["proxyVersion", "injectorNamespace", "injectorConfigMaps"] {
            assert!(text.contains(key), "{key} documented");
        }
    }

    /// docs/configuration.md "Configuration file" shows every section with its
    /// defaults.
    #[test]
    fn documented_configuration_block_is_the_defaults() {
        let page = include_str!("../docs/configuration.md");
        let section = &page[page.find("\n## Configuration file\n").unwrap()..];
        let start = section.find("```yaml\n").unwrap() + "```yaml\n".len();
        let block = &section[start..start + section[start..].find("```").unwrap()];
        assert_eq!(Config::from_yaml(block).unwrap(), Config::default());
        for key in [
            "labels:",
            "namespaces:",
            "server:",
            "bootstrap:",
            "istio:",
            "routes:",
            "backfill:",
            "leaderElection:",
        ] {
            assert!(block.lines().any(|l| l.starts_with(key)), "{key} missing");
        }
    }

    /// The webhook configuration and the policy defaults name the same
    /// opt-in selector, opt-out label and excluded namespaces.
    #[test]
    fn shipped_webhook_selectors_match_the_defaults() {
        let manifest = include_str!("../deploy/base/webhook.yaml");
        let hook: Value = serde_saphyr::from_str(manifest).unwrap();
        let cfg = Config::default();
        for w in hook["webhooks"].as_array().unwrap() {
            let ns_selector = &w["namespaceSelector"];
            let match_labels: BTreeMap<String, String> =
                serde_json::from_value(ns_selector["matchLabels"].clone()).unwrap();
            assert_eq!(match_labels, cfg.namespaces.opt_in);

            let own = w["clientConfig"]["service"]["namespace"].as_str().unwrap();
            let not_in: Vec<&str> = ns_selector["matchExpressions"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["key"] == "kubernetes.io/metadata.name" && e["operator"] == "NotIn")
                .flat_map(|e| e["values"].as_array().unwrap())
                .map(|v| v.as_str().unwrap())
                .collect();
            for ns in cfg
                .namespaces
                .excluded
                .iter()
                .map(String::as_str)
                .chain([own])
            {
                assert!(not_in.contains(&ns), "{ns} not excluded by the webhook");
            }

            let object_selector = w["objectSelector"]["matchExpressions"].as_array().unwrap();
            assert_eq!(object_selector.len(), 1);
            assert_eq!(object_selector[0]["key"], cfg.labels.opt_out_label.as_str());
            assert_eq!(object_selector[0]["operator"], "NotIn");
            assert_eq!(object_selector[0]["values"], serde_json::json!(["false"]));
        }
    }

    #[test]
    fn own_namespace_comes_from_env_when_unset() {
        let cfg = Config::load(None, Some("canary-injector".into())).unwrap();
        assert_eq!(cfg.own_namespace(), Some("canary-injector"));
        assert!(cfg.namespaces.is_excluded("canary-injector"));
        assert!(cfg.namespaces.is_excluded("kube-system"));
        assert!(!cfg.namespaces.is_excluded("shop"));
        let none = Config::load(None, Some(String::new())).unwrap();
        assert_eq!(none.own_namespace(), None);
    }

    #[test]
    fn own_namespace_in_the_file_wins_over_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "namespaces: {own: from-file}\n").unwrap();
        let cfg = Config::load(Some(&path), Some("from-env".into())).unwrap();
        assert_eq!(cfg.own_namespace(), Some("from-file"));
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let err = Config::load(Some(Path::new("/nonexistent/c.yaml")), None).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().contains("/nonexistent/c.yaml"));
    }
}
