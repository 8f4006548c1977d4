//! The Istio sidecar keepalive fix, pure part: every Istio version gets the
//! configured keepalive (`bootstrap.keepalive`, 30 s / 3 probes / 5 s) in
//! the form it understands ([`KeepaliveForm`]):
//!
//! - **1.5-1.7** ([`KeepaliveForm::BootstrapTemplate`]): Envoy dials istiod
//!   over TCP from the bootstrap cluster `xds-grpc`; mount the patched
//!   bootstrap template (from a ConfigMap) over the default template path of
//!   the `istio-proxy` container. Not injected yet: Istio's
//!   `sidecar.istio.io/userVolume` / `userVolumeMount` annotations, merged
//!   into any the pod has; injected (`istio-proxy` in `containers`, or in
//!   `initContainers` with `restartPolicy: Always`): the volume and the
//!   read-only subPath mount on `istio-proxy` directly.
//! - **1.8-1.17** ([`KeepaliveForm::AgentFixed`]): the sidecar reaches
//!   istiod through its agent, whose gRPC keepalive is fixed at 30 s ping /
//!   10 s timeout: nothing to do, a counted skip
//!   ([`BootstrapSkip::AgentKeepalive`]).
//! - **1.18 and newer** ([`KeepaliveForm::AgentEnv`]): the agent reads
//!   [`GRPC_KEEPALIVE_INTERVAL`] and [`GRPC_KEEPALIVE_TIMEOUT`] from its
//!   environment. Not injected yet: merge them into the `proxyMetadata` of
//!   the pod's [`PROXY_CONFIG`] annotation (Istio's injector turns
//!   `proxyMetadata` into env); injected: append them to `istio-proxy`'s
//!   `env`. A value the pod already sets is never overridden.
//!
//! The version comes from, in order: the injected proxy's image tag, the
//! pod's [`PROXY_IMAGE`] annotation, config `istio.proxyVersion`, the
//! injector version the cluster runs (`ClusterView::injector_version`).
//! None of them: a counted skip ([`BootstrapSkip::VersionUnknown`]).

use std::borrow::Cow;
use std::collections::HashSet;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::kinds::Location;
use super::policy::{Keepalive, Policy};
use super::version::{Version, image_tag, parse_version};
use super::{ClusterView, MetaView, NamespaceMesh, SpecView, StrMap, Text, TextMap};

/// Where Istio's proxy reads its bootstrap template.
pub const TEMPLATE_PATH: &str = "/var/lib/istio/envoy/envoy_bootstrap_tmpl.json";
/// The ConfigMap key (and subPath) holding the patched template.
pub const TEMPLATE_KEY: &str = "envoy_bootstrap_tmpl.json";
/// Name of the volume we add (a numeric suffix is appended on a clash).
pub const VOLUME_NAME: &str = "canary-injector-bootstrap";
/// Istio's per-pod extra volumes (JSON map name -> Volume without name).
pub const USER_VOLUME: &str = "sidecar.istio.io/userVolume";
/// Istio's per-pod extra proxy mounts (JSON map name -> VolumeMount without name).
pub const USER_VOLUME_MOUNT: &str = "sidecar.istio.io/userVolumeMount";
/// Set by Istio's injector on pods it injected.
pub const ISTIO_STATUS: &str = "sidecar.istio.io/status";
/// Istio's per-pod injection switch (annotation or label).
pub const ISTIO_INJECT: &str = "sidecar.istio.io/inject";
/// The sidecar container's name.
pub const PROXY_CONTAINER: &str = "istio-proxy";
/// Istio's per-pod proxy configuration (a `ProxyConfig` as YAML or JSON);
/// its `proxyMetadata` map becomes the proxy's environment at injection.
pub const PROXY_CONFIG: &str = "proxy.istio.io/config";
/// Istio's per-pod proxy image override, read for its tag before injection.
pub const PROXY_IMAGE: &str = "sidecar.istio.io/proxyImage";
/// The agent's gRPC keepalive ping interval (a Go duration), Istio >= 1.18.
pub const GRPC_KEEPALIVE_INTERVAL: &str = "GRPC_KEEPALIVE_INTERVAL";
/// The agent's gRPC keepalive ping timeout (a Go duration), Istio >= 1.18.
pub const GRPC_KEEPALIVE_TIMEOUT: &str = "GRPC_KEEPALIVE_TIMEOUT";
/// First Istio minor where xds-grpc no longer uses TCP.
pub const FIRST_PIPE_VERSION: Version = Version { major: 1, minor: 8 };
/// First Istio minor whose agent reads [`GRPC_KEEPALIVE_INTERVAL`] and
/// [`GRPC_KEEPALIVE_TIMEOUT`].
pub const FIRST_AGENT_ENV_VERSION: Version = Version {
    major: 1,
    minor: 18,
};

/// How a proxy keeps its control-plane connection alive, which decides what
/// canary-injector sets (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepaliveForm {
    /// Below 1.8: Envoy dials istiod over TCP; TCP keepalive in the
    /// bootstrap template.
    BootstrapTemplate,
    /// 1.8-1.17: the agent proxies xDS; its gRPC keepalive is fixed at 30 s
    /// ping / 10 s timeout (a dead istiod is noticed in about 40 s).
    AgentFixed,
    /// 1.18 and newer: the agent's gRPC keepalive comes from
    /// [`GRPC_KEEPALIVE_INTERVAL`] / [`GRPC_KEEPALIVE_TIMEOUT`].
    AgentEnv,
}

// `Version` is a leaf of its own (the policy parses versions too); what a
// version means for the keepalive is decided here.
impl Version {
    /// The keepalive form of a proxy of this version.
    pub fn keepalive_form(self) -> KeepaliveForm {
        if self < FIRST_PIPE_VERSION {
            KeepaliveForm::BootstrapTemplate
        } else if self < FIRST_AGENT_ENV_VERSION {
            KeepaliveForm::AgentFixed
        } else {
            KeepaliveForm::AgentEnv
        }
    }
}

/// Whether the bootstrap ConfigMap exists in the pod's namespace, as far as
/// the caller's cache knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Known to exist.
    Present,
    /// Known to be missing while the source exists (the copier has not made
    /// this copy yet): mounting it would keep the pod from starting.
    Missing,
    /// Missing here and the source is missing too: the template fix is not
    /// set up in this cluster (nobody to warn).
    NotConfigured,
    /// Not known (no cluster reachable, or the cache has not synced).
    Unknown,
}

/// A container's fields the decision reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView<'a> {
    /// Container name.
    #[serde(default, borrow)]
    pub name: Text<'a>,
    /// Image reference.
    #[serde(default, borrow)]
    pub image: Option<Text<'a>>,
    /// `Always` marks a native sidecar in `initContainers`.
    #[serde(default, borrow)]
    pub restart_policy: Option<Text<'a>>,
    /// Mount paths, to detect an existing template mount.
    #[serde(default, borrow)]
    pub volume_mounts: Option<Vec<MountView<'a>>>,
    /// `env` as written, read only when a decision needs it
    /// ([`ContainerView::env_names`]): a sidecar has dozens of variables and
    /// this is on every review. `None` without an `env` list.
    #[serde(default)]
    pub env: Option<Box<serde_json::value::RawValue>>,
}

impl ContainerView<'_> {
    /// Which agent keepalive variables `env` sets. An `env` that is not a
    /// list of variables counts as setting both, so nothing is added to it.
    pub fn env_names(&self) -> EnvNames {
        self.env.as_ref().map_or(EnvNames::default(), |raw| {
            serde_json::from_str(raw.get()).unwrap_or(EnvNames {
                interval: true,
                timeout: true,
            })
        })
    }
}

/// Which of [`GRPC_KEEPALIVE_INTERVAL`] and [`GRPC_KEEPALIVE_TIMEOUT`] a
/// container's `env` list sets, read from it without allocating.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EnvNames {
    interval: bool,
    timeout: bool,
}

impl EnvNames {
    /// Whether the list sets `name` (one of the two keepalive variables).
    pub fn sets(&self, name: &str) -> bool {
        match name {
            GRPC_KEEPALIVE_INTERVAL => self.interval,
            GRPC_KEEPALIVE_TIMEOUT => self.timeout,
            _ => false,
        }
    }
}

impl<'de> Deserialize<'de> for EnvNames {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(EnvScan)
    }
}

/// Scans an `env` list: each entry's keys and its `name` are read as raw
/// bytes (no UTF-8 validation, no allocation) and every other value is
/// skipped, as cheap as skipping the list whole.
struct EnvScan;

/// Which keepalive variable an entry names, if any.
#[derive(Clone, Copy)]
enum Var {
    Interval,
    Timeout,
}

/// Reads a string as raw bytes and hands them to `f`.
struct RawStr<F>(F);

impl<'de, T, F: FnOnce(&[u8]) -> T> serde::de::Visitor<'de> for RawStr<F> {
    type Value = T;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string")
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<T, E> {
        Ok((self.0)(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<T, E> {
        Ok((self.0)(v.as_bytes()))
    }
}

impl<'de, T, F: FnOnce(&[u8]) -> T> serde::de::DeserializeSeed<'de> for RawStr<F> {
    type Value = T;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_bytes(self)
    }
}

/// One entry of the list: the variable its `name` is, if one of ours.
struct Entry;

impl<'de> serde::de::DeserializeSeed<'de> for Entry {
    type Value = Option<Var>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Entry {
    type Value = Option<Var>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an environment variable")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut var = None;
        while let Some(is_name) = map.next_key_seed(RawStr(|k: &[u8]| k == b"name"))? {
            if is_name {
                var = map.next_value_seed(RawStr(|v: &[u8]| match v {
                    v if v == GRPC_KEEPALIVE_INTERVAL.as_bytes() => Some(Var::Interval),
                    v if v == GRPC_KEEPALIVE_TIMEOUT.as_bytes() => Some(Var::Timeout),
                    _ => None,
                }))?;
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(var)
    }
}

impl<'de> serde::de::Visitor<'de> for EnvScan {
    type Value = EnvNames;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of environment variables")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<EnvNames, A::Error> {
        let mut names = EnvNames::default();
        while let Some(var) = seq.next_element_seed(Entry)? {
            match var {
                Some(Var::Interval) => names.interval = true,
                Some(Var::Timeout) => names.timeout = true,
                None => {}
            }
        }
        Ok(names)
    }
}

/// A volume mount's path.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountView<'a> {
    /// `mountPath`.
    #[serde(default, borrow)]
    pub mount_path: Text<'a>,
}

/// Anything with a `name`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NamedView<'a> {
    /// `name`.
    #[serde(default, borrow)]
    pub name: Text<'a>,
}

/// Why the bootstrap part left a pod alone. Label of the skip metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootstrapSkip {
    /// Annotated `<optOutAnnotation>: "false"`.
    OptedOut,
    /// `hostNetwork: true`: Istio does not inject it.
    HostNetwork,
    /// Injection is off for the pod or its namespace, or it was injected
    /// without a proxy.
    NoSidecarExpected,
    /// Its namespace is in Istio's ambient mode: no sidecar, no bootstrap.
    Ambient,
    /// Istio 1.8-1.17: the agent's fixed gRPC keepalive (30 s / 10 s)
    /// already notices a dead istiod; nothing to set.
    AgentKeepalive,
    /// No Istio version known for the pod (no version tag, no
    /// `istio.proxyVersion`, no injector detected, or injectors of
    /// different generations).
    VersionUnknown,
    /// The ConfigMap is known to be missing in the namespace.
    ConfigMapMissing,
    /// Neither the ConfigMap nor its source exists: the template fix is
    /// not set up.
    NotConfigured,
    /// No cluster view: cannot tell whether the ConfigMap exists.
    ClusterUnavailable,
    /// The pod's userVolume annotations are not JSON maps.
    MalformedAnnotation,
    /// The pod's `proxy.istio.io/config` annotation is not a YAML/JSON
    /// mapping (or its `proxyMetadata` is not one).
    MalformedProxyConfig,
}

impl BootstrapSkip {
    /// Every skip, for documentation and tests.
    pub const ALL: [Self; 11] = [
        Self::OptedOut,
        Self::HostNetwork,
        Self::NoSidecarExpected,
        Self::Ambient,
        Self::AgentKeepalive,
        Self::VersionUnknown,
        Self::ConfigMapMissing,
        Self::NotConfigured,
        Self::ClusterUnavailable,
        Self::MalformedAnnotation,
        Self::MalformedProxyConfig,
    ];

    /// Stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OptedOut => "opted-out",
            Self::HostNetwork => "host-network",
            Self::NoSidecarExpected => "no-sidecar-expected",
            Self::Ambient => "ambient",
            Self::AgentKeepalive => "agent-keepalive",
            Self::VersionUnknown => "istio-version-unknown",
            Self::ConfigMapMissing => "configmap-missing",
            Self::NotConfigured => "not-configured",
            Self::ClusterUnavailable => "cluster-unavailable",
            Self::MalformedAnnotation => "malformed-annotation",
            Self::MalformedProxyConfig => "malformed-proxy-config",
        }
    }
}

/// What the bootstrap part did: the metric view of [`BootstrapDecision`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootstrapOutcome {
    /// Added the userVolume annotations (pod not injected yet).
    Annotated,
    /// Added the volume and mount to `istio-proxy` (pod already injected).
    Mounted,
    /// Set the agent keepalive in `proxy.istio.io/config` (not injected yet).
    ProxyConfig,
    /// Added the agent keepalive env to `istio-proxy` (already injected).
    Env,
    /// The mount, our annotations or the keepalive values are already there.
    AlreadyDone,
    /// Left alone.
    Skipped(BootstrapSkip),
}

impl BootstrapOutcome {
    /// The mutations-metric type, when something was changed.
    pub fn mutation(self) -> Option<&'static str> {
        match self {
            Self::Annotated => Some("bootstrap-annotations"),
            Self::Mounted => Some("bootstrap-volume"),
            Self::ProxyConfig => Some("keepalive-proxy-config"),
            Self::Env => Some("keepalive-env"),
            _ => None,
        }
    }
}

/// What the bootstrap part decided for one pod or pod template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootstrapDecision<'a> {
    /// Below 1.8, not injected yet: set Istio's userVolume annotations.
    Annotate(Annotate),
    /// Below 1.8, already injected: add the volume and the mount to
    /// `istio-proxy`.
    Mount(Mount<'a>),
    /// 1.18+, not injected yet: set [`PROXY_CONFIG`] with the keepalive
    /// merged into its `proxyMetadata`.
    ProxyConfig(ProxyConfig),
    /// 1.18+, already injected: add the keepalive env to `istio-proxy`.
    Env(AgentEnv),
    /// The mount, our annotations or the keepalive values are already there.
    AlreadyDone,
    /// Left alone, and why.
    Skipped(BootstrapSkip),
}

impl BootstrapDecision<'_> {
    /// The metric view.
    pub fn outcome(&self) -> BootstrapOutcome {
        match self {
            Self::Annotate(_) => BootstrapOutcome::Annotated,
            Self::Mount(_) => BootstrapOutcome::Mounted,
            Self::ProxyConfig(_) => BootstrapOutcome::ProxyConfig,
            Self::Env(_) => BootstrapOutcome::Env,
            Self::AlreadyDone => BootstrapOutcome::AlreadyDone,
            Self::Skipped(skip) => BootstrapOutcome::Skipped(*skip),
        }
    }
}

/// Where annotations go: a pod or pod template, and what of its metadata
/// exists (absent parts are created whole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnotationTarget {
    /// The pod or pod template.
    pub location: Location,
    /// Whether it has `metadata` (absent: created).
    pub has_metadata: bool,
    /// Whether `metadata.annotations` exists and is not null (absent: created).
    pub has_annotations: bool,
}

/// The [`PROXY_CONFIG`] annotation to set on a pod Istio has not injected
/// yet (Istio 1.18+).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Where the annotation goes.
    pub target: AnnotationTarget,
    /// The new value: the pod's own proxy config (every field kept, in its
    /// format: JSON stays JSON, YAML stays YAML) with the missing keepalive
    /// keys added to `proxyMetadata`.
    pub value: AnnotationEdit,
}

/// The agent keepalive env to add to an injected `istio-proxy` (Istio 1.18+).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEnv {
    /// The pod or pod template.
    pub location: Location,
    /// Where `istio-proxy` is.
    pub container: ContainerList,
    /// Its index in that list.
    pub index: usize,
    /// Whether the container has `env` (absent: created).
    pub has_env: bool,
    /// The variables it lacks, `(name, value)`, in order.
    pub vars: Vec<(&'static str, String)>,
}

/// The userVolume annotations to set on a pod Istio has not injected yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotate {
    /// Where the annotations go.
    pub target: AnnotationTarget,
    /// The new [`USER_VOLUME`] value: the pod's own map with ours merged in.
    pub user_volume: AnnotationEdit,
    /// The new [`USER_VOLUME_MOUNT`] value, likewise.
    pub user_volume_mount: AnnotationEdit,
}

/// One annotation's new value and how it relates to the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationEdit {
    /// The value to set.
    pub value: String,
    /// Add, replace, or keep as it is.
    pub edit: Edit,
}

/// How a value relates to what the object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    /// Absent: add it.
    Add,
    /// Present with another value: replace it.
    Replace,
    /// Present with this value already.
    Keep,
}

/// The volume and mount to add to an injected pod's `istio-proxy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount<'a> {
    /// The pod or pod template.
    pub location: Location,
    /// Where `istio-proxy` is.
    pub container: ContainerList,
    /// Its index in that list.
    pub index: usize,
    /// The volume name: [`VOLUME_NAME`], or with a numeric suffix when the
    /// pod already has a volume of that name.
    pub volume_name: Cow<'static, str>,
    /// The ConfigMap the volume reads.
    pub config_map_name: &'a str,
    /// Whether `spec.volumes` exists (absent: created).
    pub has_volumes: bool,
    /// Whether the container has `volumeMounts` (absent: created).
    pub has_volume_mounts: bool,
}

/// Which container list holds `istio-proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerList {
    /// `spec.containers` (a classic sidecar).
    Containers,
    /// `spec.initContainers` (a native sidecar, Istio 1.27+).
    InitContainers,
}

impl ContainerList {
    /// The field name.
    pub fn field(self) -> &'static str {
        match self {
            Self::Containers => "containers",
            Self::InitContainers => "initContainers",
        }
    }
}

/// A pod, or a pod template, to decide about.
pub struct PodTarget<'a> {
    /// Where it is in the object.
    pub location: Location,
    /// Its metadata.
    pub metadata: Option<&'a MetaView<'a>>,
    /// Its pod spec.
    pub spec: Option<&'a SpecView<'a>>,
}

/// Decides the keepalive fix for one pod (or template). Never fails:
/// anything unexpected is a skip ([`BootstrapSkip`]); the caller tells the
/// user about the skips they can act on.
pub fn decide<'a>(
    target: &PodTarget<'_>,
    policy: Policy<'a>,
    cluster: &ClusterView,
) -> BootstrapDecision<'a> {
    use BootstrapDecision::Skipped;
    let annotations = target.metadata.and_then(|m| m.annotations.as_ref());
    let labels = target.metadata.and_then(|m| m.labels.as_ref());
    let annotation = |k: &str| annotations.and_then(|a| a.value(k));

    if annotation(&policy.bootstrap.opt_out_annotation) == Some("false") {
        return Skipped(BootstrapSkip::OptedOut);
    }
    let empty = SpecView::default();
    let spec = target.spec.unwrap_or(&empty);
    if spec.host_network == Some(true) {
        return Skipped(BootstrapSkip::HostNetwork);
    }

    let proxy = find_proxy(spec);
    let inject_label = labels.and_then(|l| l.value(ISTIO_INJECT));
    if proxy.is_none()
        && (annotation(ISTIO_INJECT) == Some("false")
            || inject_label == Some("false")
            || annotation(ISTIO_STATUS).is_some())
    {
        return Skipped(BootstrapSkip::NoSidecarExpected);
    }
    // Not injected yet, in a namespace that will not inject it: no sidecar
    // is coming, whatever its version would be.
    if proxy.is_none() {
        match cluster.mesh {
            NamespaceMesh::Ambient => return Skipped(BootstrapSkip::Ambient),
            NamespaceMesh::NoInjection if inject_label != Some("true") => {
                return Skipped(BootstrapSkip::NoSidecarExpected);
            }
            _ => {}
        }
    }

    let Some(version) = pod_version(
        proxy.and_then(|(_, _, c)| c.image.as_deref()),
        annotation(PROXY_IMAGE),
        policy,
        cluster,
    ) else {
        return Skipped(BootstrapSkip::VersionUnknown);
    };
    let at = AnnotationTarget {
        location: target.location,
        has_metadata: target.metadata.is_some(),
        has_annotations: annotations.is_some(),
    };
    match version.keepalive_form() {
        KeepaliveForm::AgentFixed => Skipped(BootstrapSkip::AgentKeepalive),
        KeepaliveForm::AgentEnv => agent_keepalive(
            at,
            proxy,
            annotation(PROXY_CONFIG),
            policy.bootstrap.keepalive,
        ),
        KeepaliveForm::BootstrapTemplate => {
            template_mount(at, spec, proxy, annotations, policy, cluster)
        }
    }
}

/// The Istio version of the pod's proxy: the injected proxy's image tag,
/// else the pod's [`PROXY_IMAGE`] annotation's tag, else config
/// `istio.proxyVersion`, else the injector version the cluster runs.
fn pod_version(
    proxy_image: Option<&str>,
    annotated_image: Option<&str>,
    policy: Policy<'_>,
    cluster: &ClusterView,
) -> Option<Version> {
    let tag_version = |image: &str| image_tag(image).and_then(parse_version);
    proxy_image
        .and_then(tag_version)
        .or_else(|| annotated_image.and_then(tag_version))
        .or_else(|| {
            policy
                .istio
                .proxy_version
                .as_deref()
                .and_then(parse_version)
        })
        .or(cluster.injector_version)
}

/// Istio 1.18+: the agent keepalive as `istio-proxy` env (injected) or in
/// the `proxyMetadata` of [`PROXY_CONFIG`] (not injected yet); what the pod
/// already sets is kept.
fn agent_keepalive<'a>(
    at: AnnotationTarget,
    proxy: Option<(ContainerList, usize, &ContainerView<'_>)>,
    proxy_config: Option<&str>,
    keepalive: Keepalive,
) -> BootstrapDecision<'a> {
    let (interval, timeout) = keepalive.agent();
    let wanted = [
        (GRPC_KEEPALIVE_INTERVAL, format!("{interval}s")),
        (GRPC_KEEPALIVE_TIMEOUT, format!("{timeout}s")),
    ];
    if let Some((container, index, proxy)) = proxy {
        let env = proxy.env_names();
        let set = |name: &str| env.sets(name);
        let vars: Vec<(&'static str, String)> =
            wanted.into_iter().filter(|(name, _)| !set(name)).collect();
        if vars.is_empty() {
            return BootstrapDecision::AlreadyDone;
        }
        return BootstrapDecision::Env(AgentEnv {
            location: at.location,
            container,
            index,
            has_env: proxy.env.is_some(),
            vars,
        });
    }
    match merge_proxy_metadata(proxy_config, wanted) {
        Err(()) => BootstrapDecision::Skipped(BootstrapSkip::MalformedProxyConfig),
        Ok(None) => BootstrapDecision::AlreadyDone,
        Ok(Some(value)) => BootstrapDecision::ProxyConfig(ProxyConfig {
            target: at,
            value: AnnotationEdit {
                value,
                edit: if proxy_config.is_some() {
                    Edit::Replace
                } else {
                    Edit::Add
                },
            },
        }),
    }
}

/// The [`PROXY_CONFIG`] text with `vars` added to its `proxyMetadata` where
/// missing; `Ok(None)` when none is. Every other field is kept; JSON stays
/// JSON, YAML stays YAML (as data: comments and quoting are not kept), an
/// absent or empty annotation becomes compact JSON. `Err` when the text is
/// not a YAML/JSON mapping or its `proxyMetadata` is not one.
fn merge_proxy_metadata(
    text: Option<&str>,
    vars: [(&'static str, String); 2],
) -> Result<Option<String>, ()> {
    let text = text.unwrap_or_default();
    let (parsed, json) = if text.trim().is_empty() {
        (Value::Null, true)
    } else {
        match serde_json::from_str::<Value>(text) {
            Ok(value) => (value, true),
            Err(_) => (
                serde_saphyr::from_str::<Value>(text).map_err(|_| ())?,
                false,
            ),
        }
    };
    let mut config = match parsed {
        Value::Object(map) => map,
        Value::Null => Map::new(),
        _ => return Err(()),
    };
    // The ProxyConfig field, as the user spelled it (protobuf JSON accepts
    // both; writing the other one too would be a duplicate field).
    let key = if config.contains_key("proxy_metadata") {
        "proxy_metadata"
    } else {
        "proxyMetadata"
    };
    let metadata = config
        .entry(key)
        .or_insert_with(|| Value::Object(Map::new()));
    if metadata.is_null() {
        *metadata = Value::Object(Map::new());
    }
    let Value::Object(metadata) = metadata else {
        return Err(());
    };
    let mut added = false;
    for (name, value) in vars {
        if !metadata.contains_key(name) {
            metadata.insert(name.to_owned(), Value::String(value));
            added = true;
        }
    }
    if !added {
        return Ok(None);
    }
    let config = Value::Object(config);
    if json {
        Ok(Some(config.to_string()))
    } else {
        serde_saphyr::to_string(&config).map(Some).map_err(|_| ())
    }
}

/// Below 1.8: the patched bootstrap template, by userVolume annotations
/// (not injected yet) or a volume and mount on `istio-proxy` (injected).
fn template_mount<'a>(
    at: AnnotationTarget,
    spec: &SpecView<'_>,
    proxy: Option<(ContainerList, usize, &ContainerView<'_>)>,
    annotations: Option<&TextMap<'_>>,
    policy: Policy<'a>,
    cluster: &ClusterView,
) -> BootstrapDecision<'a> {
    use BootstrapDecision::Skipped;
    let annotation = |k: &str| annotations.and_then(|a| a.value(k));
    let availability = cluster.bootstrap_configmap;
    let config_map_name = policy.bootstrap.config_map_name.as_str();
    match proxy {
        Some((container, index, proxy)) => {
            let mounted = proxy
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.mount_path == TEMPLATE_PATH);
            if mounted {
                return BootstrapDecision::AlreadyDone;
            }
            if let Some(skip) = check_availability(availability) {
                return Skipped(skip);
            }
            BootstrapDecision::Mount(Mount {
                location: at.location,
                container,
                index,
                volume_name: free_volume_name(spec),
                config_map_name,
                has_volumes: spec.volumes.is_some(),
                has_volume_mounts: proxy.volume_mounts.is_some(),
            })
        }
        None => {
            let parsed = (
                parse_map(annotation(USER_VOLUME)),
                parse_map(annotation(USER_VOLUME_MOUNT)),
            );
            let (volumes, mounts) = match parsed {
                (Ok(v), Ok(m)) => (v, m),
                (Err(()), _) | (_, Err(())) => {
                    return Skipped(BootstrapSkip::MalformedAnnotation);
                }
            };
            let has_ours = |m: &Option<Map<String, Value>>| {
                m.as_ref().is_some_and(|m| m.contains_key(VOLUME_NAME))
            };
            if has_ours(&volumes) && has_ours(&mounts) {
                return BootstrapDecision::AlreadyDone;
            }
            if let Some(skip) = check_availability(availability) {
                return Skipped(skip);
            }
            let edit = |key: &str, existing: Option<Map<String, Value>>, ours: Value| {
                let mut map = existing.unwrap_or_default();
                map.entry(VOLUME_NAME.to_string()).or_insert(ours);
                let value = Value::Object(map).to_string();
                let edit = match annotation(key) {
                    None => Edit::Add,
                    Some(current) if current == value => Edit::Keep,
                    Some(_) => Edit::Replace,
                };
                AnnotationEdit { value, edit }
            };
            BootstrapDecision::Annotate(Annotate {
                target: at,
                user_volume: edit(USER_VOLUME, volumes, volume_source(config_map_name)),
                user_volume_mount: edit(USER_VOLUME_MOUNT, mounts, mount_fields()),
            })
        }
    }
}

fn check_availability(availability: Availability) -> Option<BootstrapSkip> {
    match availability {
        Availability::Present => None,
        Availability::Missing => Some(BootstrapSkip::ConfigMapMissing),
        Availability::NotConfigured => Some(BootstrapSkip::NotConfigured),
        Availability::Unknown => Some(BootstrapSkip::ClusterUnavailable),
    }
}

/// `istio-proxy` in `containers`, or a native sidecar in `initContainers`.
fn find_proxy<'s, 'a>(
    spec: &'s SpecView<'a>,
) -> Option<(ContainerList, usize, &'s ContainerView<'a>)> {
    if let Some((i, c)) = spec
        .containers
        .iter()
        .flatten()
        .enumerate()
        .find(|(_, c)| c.name == PROXY_CONTAINER)
    {
        return Some((ContainerList::Containers, i, c));
    }
    spec.init_containers
        .iter()
        .flatten()
        .enumerate()
        .find(|(_, c)| c.name == PROXY_CONTAINER && c.restart_policy.as_deref() == Some("Always"))
        .map(|(i, c)| (ContainerList::InitContainers, i, c))
}

/// [`VOLUME_NAME`], else the first `VOLUME_NAME-<n>` the pod does not use.
/// One pass over the pod's volumes into a set, so a pod with thousands of
/// volumes (user input) costs linear time.
fn free_volume_name(spec: &SpecView<'_>) -> Cow<'static, str> {
    let volumes = spec.volumes.as_deref().unwrap_or_default();
    if volumes.iter().all(|v| v.name != VOLUME_NAME) {
        return Cow::Borrowed(VOLUME_NAME);
    }
    let taken: HashSet<&str> = volumes.iter().map(|v| &*v.name).collect();
    // Ends: `taken` is finite, so some suffix is free.
    let mut n = 1_usize;
    loop {
        let name = format!("{VOLUME_NAME}-{n}");
        if !taken.contains(name.as_str()) {
            return Cow::Owned(name);
        }
        n += 1;
    }
}

/// The volume source of the template ConfigMap (`volumes[]` without `name`).
pub fn volume_source(config_map_name: &str) -> Value {
    json!({"configMap": {
        "name": config_map_name,
        "items": [{"key": TEMPLATE_KEY, "path": TEMPLATE_KEY}],
    }})
}

/// The read-only subPath mount over [`TEMPLATE_PATH`] (without `name`).
pub fn mount_fields() -> Value {
    json!({"mountPath": TEMPLATE_PATH, "subPath": TEMPLATE_KEY, "readOnly": true})
}

/// Parses an optional JSON-object annotation; `Err` when present but not an object.
fn parse_map(value: Option<&str>) -> Result<Option<Map<String, Value>>, ()> {
    match value {
        None => Ok(None),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Ok(Some(map)),
            _ => Err(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_see_the_keepalive_variables_only() {
        let env = r#"[{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                      {"name": "GRPC_KEEPALIVE_TIMEOUT", "value": "20s"},
                      {"value": "x", "name": "ISTIO_META_MESH_ID"}]"#;
        let names: EnvNames = serde_json::from_str(env).unwrap();
        assert!(names.sets(GRPC_KEEPALIVE_TIMEOUT));
        assert!(!names.sets(GRPC_KEEPALIVE_INTERVAL));
        assert!(
            !names.sets("POD_NAME"),
            "only the two variables are tracked"
        );
        // An escaped name is the same name.
        let escaped = r#"[{"name": "GRPC_KEEPALIVE\u005fINTERVAL"}]"#;
        let names: EnvNames = serde_json::from_str(escaped).unwrap();
        assert!(names.sets(GRPC_KEEPALIVE_INTERVAL));
        // From a parsed document (the offline path) too.
        let value: serde_json::Value = serde_json::from_str(env).unwrap();
        let names: EnvNames = serde_json::from_value(value).unwrap();
        assert!(names.sets(GRPC_KEEPALIVE_TIMEOUT));
        assert_eq!(
            serde_json::from_str::<EnvNames>("[]").unwrap(),
            EnvNames::default()
        );
        // Not a list of objects: an error, as for any malformed pod.
        assert!(serde_json::from_str::<EnvNames>(r#"[{"name": 5}]"#).is_err());
        assert!(serde_json::from_str::<EnvNames>(r#"{"name": "x"}"#).is_err());
    }

    #[test]
    fn the_first_pipe_version_splits_the_template_fix_from_the_agent() {
        assert!(parse_version("1.12.0").unwrap() >= FIRST_PIPE_VERSION);
        assert!(parse_version("1.7.8").unwrap() < FIRST_PIPE_VERSION);
    }

    #[test]
    fn a_container_reads_its_env_only_when_asked_and_never_adds_to_a_broken_one() {
        let c: ContainerView = serde_json::from_str(
            r#"{"name": "istio-proxy", "env": [{"name": "GRPC_KEEPALIVE_INTERVAL", "value": "60s"}]}"#,
        )
        .unwrap();
        assert!(c.env_names().sets(GRPC_KEEPALIVE_INTERVAL));
        assert!(!c.env_names().sets(GRPC_KEEPALIVE_TIMEOUT));
        let none: ContainerView = serde_json::from_str(r#"{"name": "istio-proxy"}"#).unwrap();
        assert_eq!(none.env_names(), EnvNames::default());
        let broken: ContainerView =
            serde_json::from_str(r#"{"name": "istio-proxy", "env": {"not": "a list"}}"#).unwrap();
        assert!(
            broken.env_names().sets(GRPC_KEEPALIVE_INTERVAL)
                && broken.env_names().sets(GRPC_KEEPALIVE_TIMEOUT)
        );
    }
}
