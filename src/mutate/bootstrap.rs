//! The Istio sidecar bootstrap fix, pure part: mount the patched Envoy
//! bootstrap template (from a ConfigMap) over the default template path of
//! the `istio-proxy` container.
//!
//! - Pod not injected yet (no `istio-proxy`): add Istio's
//!   `sidecar.istio.io/userVolume` / `userVolumeMount` annotations, merged
//!   into any the pod has, so Istio's injector mounts it.
//! - Pod already injected (`istio-proxy` in `containers`, or in
//!   `initContainers` with `restartPolicy: Always`): add the volume and the
//!   read-only subPath mount to `istio-proxy` directly.
//! - Only for proxies below Istio 1.8: from 1.8 `xds-grpc` is a Unix socket
//!   to the agent and TCP keepalive does not apply.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, ReplaceOperation};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{MetaView, SpecView};
use crate::config::Config;

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
/// First Istio minor where xds-grpc no longer uses TCP.
pub const FIRST_PIPE_VERSION: Version = Version { major: 1, minor: 8 };

/// An Istio `major.minor` version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

/// Parses `1.5`, `1.5.4`, `1.7.0-beta.1`, `1.5.4-distroless`, with an
/// optional leading `v`. Anything else (`latest`, a digest) is `None`.
pub fn parse_version(s: &str) -> Option<Version> {
    let s = s.strip_prefix('v').unwrap_or(s);
    let core = s.split(['-', '+']).next()?;
    let mut parts = core.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    if let Some(patch) = parts.next() {
        patch.parse::<u32>().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Version { major, minor })
}

/// The tag of an image reference (`docker.io/istio/proxyv2:1.5.4` ->
/// `1.5.4`), ignoring a digest; `None` without a tag.
pub fn image_tag(image: &str) -> Option<&str> {
    let without_digest = image.split('@').next()?;
    let last = without_digest.rsplit('/').next()?;
    last.split_once(':').map(|(_, tag)| tag)
}

/// Whether the bootstrap ConfigMap exists in the pod's namespace, as far as
/// the caller's cache knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Known to exist.
    Present,
    /// Known to be missing: mounting it would keep the pod from starting.
    Missing,
    /// Not known (no cluster reachable, or the cache has not synced).
    Unknown,
}

/// A container's fields the decision reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView {
    /// Container name.
    #[serde(default)]
    pub name: String,
    /// Image reference.
    #[serde(default)]
    pub image: Option<String>,
    /// `Always` marks a native sidecar in `initContainers`.
    #[serde(default)]
    pub restart_policy: Option<String>,
    /// Mount paths, to detect an existing template mount.
    #[serde(default)]
    pub volume_mounts: Option<Vec<MountView>>,
}

/// A volume mount's path.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountView {
    /// `mountPath`.
    #[serde(default)]
    pub mount_path: String,
}

/// Anything with a `name`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NamedView {
    /// `name`.
    #[serde(default)]
    pub name: String,
}

/// Why the bootstrap part left a pod alone. Label of the skip metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootstrapSkip {
    /// Annotated `<optOutAnnotation>: "false"`.
    OptedOut,
    /// `hostNetwork: true`: Istio does not inject it.
    HostNetwork,
    /// Injection is off for the pod, or it was injected without a proxy.
    NoSidecarExpected,
    /// The proxy is Istio >= 1.8, or its version is unknown.
    IstioVersion,
    /// The ConfigMap is known to be missing in the namespace.
    ConfigMapMissing,
    /// No cluster view: cannot tell whether the ConfigMap exists.
    ClusterUnavailable,
    /// The pod's userVolume annotations are not JSON maps.
    MalformedAnnotation,
}

impl BootstrapSkip {
    /// Stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OptedOut => "opted-out",
            Self::HostNetwork => "host-network",
            Self::NoSidecarExpected => "no-sidecar-expected",
            Self::IstioVersion => "istio-version",
            Self::ConfigMapMissing => "configmap-missing",
            Self::ClusterUnavailable => "cluster-unavailable",
            Self::MalformedAnnotation => "malformed-annotation",
        }
    }
}

/// What the bootstrap part did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootstrapOutcome {
    /// Added the userVolume annotations (pod not injected yet).
    Annotated,
    /// Added the volume and mount to `istio-proxy` (pod already injected).
    Mounted,
    /// The mount (or our annotations) is already there.
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
            _ => None,
        }
    }
}

/// A pod, or a pod template, to decide about.
pub struct PodTarget<'a> {
    /// JSON Pointer tokens of the object holding `metadata` and `spec`.
    pub holder: &'a [&'a str],
    /// Its metadata.
    pub metadata: Option<&'a MetaView>,
    /// Its pod spec.
    pub spec: Option<&'a SpecView>,
}

fn add(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path, value })
}

fn pointer<'a>(holder: &[&'a str], tail: impl IntoIterator<Item = &'a str>) -> PointerBuf {
    PointerBuf::from_tokens(holder.iter().copied().chain(tail))
}

/// Decides the bootstrap mount for one pod (or template) and appends the
/// operations. Never fails: anything unexpected is a skip, plus a warning
/// where the user can act.
pub fn plan(
    target: &PodTarget<'_>,
    cfg: &Config,
    availability: Availability,
    ops: &mut Vec<PatchOperation>,
    warnings: &mut Vec<String>,
) -> BootstrapOutcome {
    use BootstrapOutcome::Skipped;
    let annotations = target.metadata.and_then(|m| m.annotations.as_ref());
    let labels = target.metadata.and_then(|m| m.labels.as_ref());
    let annotation = |k: &str| annotations.and_then(|a| a.get(k)).map(String::as_str);

    if annotation(&cfg.bootstrap.opt_out_annotation) == Some("false") {
        return Skipped(BootstrapSkip::OptedOut);
    }
    let empty = SpecView::default();
    let spec = target.spec.unwrap_or(&empty);
    if spec.host_network == Some(true) {
        return Skipped(BootstrapSkip::HostNetwork);
    }

    let proxy = find_proxy(spec);
    if proxy.is_none()
        && (annotation(ISTIO_INJECT) == Some("false")
            || labels.and_then(|l| l.get(ISTIO_INJECT)).map(String::as_str) == Some("false")
            || annotation(ISTIO_STATUS).is_some())
    {
        return Skipped(BootstrapSkip::NoSidecarExpected);
    }

    // The version of the proxy that will read the template.
    let version = proxy
        .and_then(|(_, _, c)| c.image.as_deref())
        .and_then(image_tag)
        .and_then(parse_version)
        .or_else(|| cfg.istio.proxy_version.as_deref().and_then(parse_version));
    if version.is_none_or(|v| v >= FIRST_PIPE_VERSION) {
        return Skipped(BootstrapSkip::IstioVersion);
    }

    match proxy {
        Some((list, index, container)) => {
            let mounted = container
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.mount_path == TEMPLATE_PATH);
            if mounted {
                return BootstrapOutcome::AlreadyDone;
            }
            if let Some(skip) = check_availability(availability, cfg, warnings) {
                return Skipped(skip);
            }
            mount_directly(target.holder, spec, cfg, list, index, container, ops);
            BootstrapOutcome::Mounted
        }
        None => {
            let parsed = (
                parse_map(annotation(USER_VOLUME)),
                parse_map(annotation(USER_VOLUME_MOUNT)),
            );
            let (volumes, mounts) = match parsed {
                (Ok(v), Ok(m)) => (v, m),
                (Err(()), _) | (_, Err(())) => {
                    warnings.push(format!(
                        "annotation {USER_VOLUME} or {USER_VOLUME_MOUNT} is not a JSON object; \
                         bootstrap keepalive template not mounted"
                    ));
                    return Skipped(BootstrapSkip::MalformedAnnotation);
                }
            };
            let has_ours = |m: &Option<Map<String, Value>>| {
                m.as_ref().is_some_and(|m| m.contains_key(VOLUME_NAME))
            };
            if has_ours(&volumes) && has_ours(&mounts) {
                return BootstrapOutcome::AlreadyDone;
            }
            if let Some(skip) = check_availability(availability, cfg, warnings) {
                return Skipped(skip);
            }
            annotate(target, annotations, cfg, volumes, mounts, ops);
            BootstrapOutcome::Annotated
        }
    }
}

fn check_availability(
    availability: Availability,
    cfg: &Config,
    warnings: &mut Vec<String>,
) -> Option<BootstrapSkip> {
    match availability {
        Availability::Present => None,
        Availability::Missing => {
            warnings.push(format!(
                "ConfigMap {} is missing in this namespace; the Istio sidecar keeps its default \
                 xds-grpc keepalive",
                cfg.bootstrap.config_map_name
            ));
            Some(BootstrapSkip::ConfigMapMissing)
        }
        Availability::Unknown => Some(BootstrapSkip::ClusterUnavailable),
    }
}

/// `istio-proxy` in `containers`, or a native sidecar in `initContainers`.
fn find_proxy(spec: &SpecView) -> Option<(&'static str, usize, &ContainerView)> {
    if let Some((i, c)) = spec
        .containers
        .iter()
        .flatten()
        .enumerate()
        .find(|(_, c)| c.name == PROXY_CONTAINER)
    {
        return Some(("containers", i, c));
    }
    spec.init_containers
        .iter()
        .flatten()
        .enumerate()
        .find(|(_, c)| c.name == PROXY_CONTAINER && c.restart_policy.as_deref() == Some("Always"))
        .map(|(i, c)| ("initContainers", i, c))
}

fn volume_source(cfg: &Config) -> Value {
    json!({"configMap": {
        "name": cfg.bootstrap.config_map_name,
        "items": [{"key": TEMPLATE_KEY, "path": TEMPLATE_KEY}],
    }})
}

fn mount_fields() -> Value {
    json!({"mountPath": TEMPLATE_PATH, "subPath": TEMPLATE_KEY, "readOnly": true})
}

fn with_name(name: &str, fields: Value) -> Value {
    let mut map = Map::new();
    map.insert("name".into(), Value::String(name.into()));
    if let Value::Object(rest) = fields {
        map.extend(rest);
    }
    Value::Object(map)
}

fn mount_directly(
    holder: &[&str],
    spec: &SpecView,
    cfg: &Config,
    list: &'static str,
    index: usize,
    container: &ContainerView,
    ops: &mut Vec<PatchOperation>,
) {
    let taken: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    let name = (0..)
        .map(|n| {
            if n == 0 {
                VOLUME_NAME.to_string()
            } else {
                format!("{VOLUME_NAME}-{n}")
            }
        })
        .find(|n| !taken.contains(&n.as_str()))
        .expect("an unused name exists");
    let volume = with_name(&name, volume_source(cfg));
    match &spec.volumes {
        Some(_) => ops.push(add(pointer(holder, ["spec", "volumes", "-"]), volume)),
        None => ops.push(add(pointer(holder, ["spec", "volumes"]), json!([volume]))),
    }
    let mount = with_name(&name, mount_fields());
    let index = index.to_string();
    match &container.volume_mounts {
        Some(_) => ops.push(add(
            pointer(holder, ["spec", list, &index, "volumeMounts", "-"]),
            mount,
        )),
        None => ops.push(add(
            pointer(holder, ["spec", list, &index, "volumeMounts"]),
            json!([mount]),
        )),
    }
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

fn annotate(
    target: &PodTarget<'_>,
    annotations: Option<&BTreeMap<String, String>>,
    cfg: &Config,
    volumes: Option<Map<String, Value>>,
    mounts: Option<Map<String, Value>>,
    ops: &mut Vec<PatchOperation>,
) {
    let merged = |existing: Option<Map<String, Value>>, ours: Value| {
        let mut map = existing.unwrap_or_default();
        map.entry(VOLUME_NAME.to_string()).or_insert(ours);
        Value::Object(map).to_string()
    };
    let volume_json = merged(volumes, volume_source(cfg));
    let mount_json = merged(mounts, mount_fields());
    let holder = target.holder;
    match (target.metadata, annotations) {
        (None, _) => ops.push(add(
            pointer(holder, ["metadata"]),
            json!({"annotations": {USER_VOLUME: volume_json, USER_VOLUME_MOUNT: mount_json}}),
        )),
        (Some(_), None) => ops.push(add(
            pointer(holder, ["metadata", "annotations"]),
            json!({USER_VOLUME: volume_json, USER_VOLUME_MOUNT: mount_json}),
        )),
        (Some(_), Some(existing)) => {
            for (key, value) in [(USER_VOLUME, volume_json), (USER_VOLUME_MOUNT, mount_json)] {
                let path = pointer(holder, ["metadata", "annotations", key]);
                if existing.get(key).map(String::as_str) == Some(value.as_str()) {
                    continue;
                }
                if existing.contains_key(key) {
                    ops.push(PatchOperation::Replace(ReplaceOperation {
                        path,
                        value: Value::String(value),
                    }));
                } else {
                    ops.push(add(path, Value::String(value)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("1.5"), Some(Version { major: 1, minor: 5 }));
        assert_eq!(parse_version("1.5.4"), Some(Version { major: 1, minor: 5 }));
        assert_eq!(
            parse_version("v1.7.0-beta.1"),
            Some(Version { major: 1, minor: 7 })
        );
        assert_eq!(
            parse_version("1.5.4-distroless"),
            Some(Version { major: 1, minor: 5 })
        );
        for bad in ["latest", "", "1", "1.x", "1.5.4.3", "sha256:abc"] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
        assert!(parse_version("1.12.0").unwrap() >= FIRST_PIPE_VERSION);
        assert!(parse_version("1.7.8").unwrap() < FIRST_PIPE_VERSION);
    }

    #[test]
    fn image_tags() {
        assert_eq!(image_tag("docker.io/istio/proxyv2:1.5.4"), Some("1.5.4"));
        assert_eq!(
            image_tag("localhost:5000/istio/proxyv2:1.7.0"),
            Some("1.7.0")
        );
        assert_eq!(image_tag("localhost:5000/istio/proxyv2"), None);
        assert_eq!(image_tag("istio/proxyv2@sha256:abcd"), None);
        assert_eq!(image_tag("istio/proxyv2:1.6.1@sha256:abcd"), Some("1.6.1"));
    }
}
