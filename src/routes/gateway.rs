//! Canary routes on the Gateway API (GAMMA: Istio ambient, Linkerd, Cilium,
//! Kuma ...), the pure part. The Gateway API has no subsets: a route sends
//! requests to Services. So for a routed Service `S` canary-injector keeps
//! one Service per version next to it, and an HTTPRoute whose parent is
//! `S` itself:
//!
//! ```text
//!  Service S (canary-injector.io/routes: "true", selector app=web, port 80)
//!    S--normal         selector app=web + <stage>: <normalStage>        port 80
//!    S--<tag>          selector app=web + <stage>: <grayStage>,
//!                                         <canaryTag>: <tag>            port 80
//!  HTTPRoute S         parentRef: Service S
//!    rule: header <header> == <tag>  -> S--<tag>:80      (per live tag)
//!    rule: every request            -> S--normal:80     (weights split it)
//!                                      or S:80 while no normal pod is ready
//! ```
//!
//! Version Services ([`VersionService`]) are named by [`version_name`]:
//! `<S>--normal` and `<S>--<subset name of the tag>` (the subset names of
//! the Istio backend, [`super::subset_name`]), or, when that is longer than
//! 63 characters, its first 53 characters and `--` and 8 hex digits of a
//! hash. Every name holds `--`. A name another routed Service's version
//! Service already has is stepped around (a salted hash), and a version
//! Service keeps the name it was created with. They carry `S`'s TCP ports
//! (name, port, targetPort, protocol, appProtocol), the labels
//! [`super::MANAGED_BY_LABEL`], [`ROUTE_OF_LABEL`] and, for a canary,
//! [`TAG_LABEL`], and an ownerReference to `S`.
//!
//! Routes ([`HttpRoute`]): one per TCP port of `S` (a Service backendRef
//! needs a port, and a request must go on to the port it came in on):
//! named `S` when `S` has one port (the parentRef then names no port, so
//! meshes that do not read parentRef ports route it too), else `S-<port>`
//! each with the port in its parentRef. At most [`MAX_TAGS`] canaries get a
//! rule (an HTTPRoute holds at most 16 rules); the others are reported.
//! Every field the apiserver would default is written out (`group`, `kind`,
//! `weight`, the `/` path prefix, `type: Exact`), so what is read back
//! compares equal to what was written.
//!
//! Make before break, as for the Istio backend ([`super::plan`]), with the
//! version Services' own endpoints: a rule names a version Service only once
//! that Service exists with the rule's port and has a ready endpoint; a
//! version Service goes only when no route names it and, for a tag that is
//! gone, its grace has passed (the time is written on the Service,
//! [`super::objects::REMOVAL_DUE_ANNOTATION`]). Route writes come first.
//!
//! Retries are not written: the HTTPRoute `retry` field is not in the
//! Gateway API's standard channel (v1.6). The route timeout goes to
//! `timeouts.request`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::objects::{Meta, Observed, OwnerReference, REMOVAL_DUE_ANNOTATION, Spec};
use super::plan::{DefaultChange, Write, changes};
use super::shape::RETRIES_ANNOTATION;
use super::{
    DefaultRoute, Live, MANAGED_BY_LABEL, MANAGED_BY_VALUE, RouteSettings, RuleKind, ServiceRef,
    assign_names, weighted,
};
use crate::mutate::LabelPolicy;
use crate::mutate::labels::{fnv1a32, is_dns_label};

/// The Gateway API group.
pub const GROUP: &str = "gateway.networking.k8s.io";

/// The version canary-injector writes: HTTPRoute and GRPCRoute are `v1`
/// (standard channel) since Gateway API v1.0 and v1.1.
pub const VERSION: &str = "v1";

/// Service annotation choosing the route API for this Service, instead of
/// `routes.api`: `istio` or `gateway-api`.
pub const ROUTE_API_ANNOTATION: &str = "canary-injector.io/route-api";

pub use super::objects::{Acceptance, ParentStatus, ROUTE_OF_LABEL, RouteCondition, RouteStatus};

/// Label on a canary's version Service: its tag.
pub const TAG_LABEL: &str = "canary-injector.io/tag";

/// Most canaries routed per Service: an HTTPRoute holds at most 16 rules,
/// one of them the default rule.
pub const MAX_TAGS: usize = 15;

/// The version part of the normal Service's name.
const NORMAL: &str = "normal";

/// Separates the parts of a version Service's name.
const MARK: &str = "--";

/// Longest Service name (a DNS-1035 label).
const MAX_LEN: usize = 63;

/// Longest readable part of a hashed version Service name.
const READABLE_LEN: usize = MAX_LEN - MARK.len() - 8;

// === which API ===

/// A route API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteApi {
    /// `networking.istio.io`: DestinationRule subsets and a VirtualService.
    Istio,
    /// `gateway.networking.k8s.io`: version Services and HTTPRoutes.
    GatewayApi,
}

impl RouteApi {
    /// The name used in configuration, annotations and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Istio => "istio",
            Self::GatewayApi => "gateway-api",
        }
    }

    /// The API group, for messages.
    pub fn group(self) -> &'static str {
        match self {
            Self::Istio => super::objects::GROUP,
            Self::GatewayApi => GROUP,
        }
    }
}

impl fmt::Display for RouteApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `routes.api`: which route API Services use unless their
/// [`ROUTE_API_ANNOTATION`] says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApiChoice {
    /// Istio's API when the cluster serves it, else the Gateway API's
    /// HTTPRoute when served.
    #[default]
    Auto,
    /// Always Istio's API.
    Istio,
    /// Always the Gateway API.
    GatewayApi,
}

impl ApiChoice {
    /// The API a Service without the annotation uses, given what the
    /// cluster serves; `None` for `auto` when neither is served.
    pub fn resolve(self, istio: bool, gateway: bool) -> Option<RouteApi> {
        match self {
            Self::Istio => Some(RouteApi::Istio),
            Self::GatewayApi => Some(RouteApi::GatewayApi),
            Self::Auto if istio => Some(RouteApi::Istio),
            Self::Auto if gateway => Some(RouteApi::GatewayApi),
            Self::Auto => None,
        }
    }
}

/// A route API annotation that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "annotation {ROUTE_API_ANNOTATION}: {0:?} is not a route API; use istio or gateway-api, or \
     remove it to use routes.api"
)]
pub struct InvalidRouteApi(pub String);

/// The route API a Service's annotations ask for, if any.
pub fn route_api(
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<Option<RouteApi>, InvalidRouteApi> {
    match annotations.and_then(|a| a.get(ROUTE_API_ANNOTATION)) {
        None => Ok(None),
        Some(v) if v == "istio" => Ok(Some(RouteApi::Istio)),
        Some(v) if v == "gateway-api" => Ok(Some(RouteApi::GatewayApi)),
        Some(v) => Err(InvalidRouteApi(v.clone())),
    }
}

// === the routed Service ===

/// A Service port's `targetPort`: a number or a container port's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetPort {
    /// A port number.
    Number(i32),
    /// A named container port.
    Name(String),
}

/// One port of a Service, the fields copied to its version Services.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Its name (required when a Service has several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port.
    #[serde(default)]
    pub port: i32,
    /// The pods' port (the apiserver sets it to `port` when left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<TargetPort>,
    /// `TCP` (written out: the apiserver's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The application protocol, which meshes read (`http`, `kubernetes.io/h2c`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// What the version Services and routes take from the routed Service: its
/// selector and TCP ports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceShape {
    /// `spec.selector`.
    pub selector: BTreeMap<String, String>,
    /// Its TCP ports, by port number.
    pub ports: Vec<ServicePort>,
}

/// Why a Service cannot be routed on the Gateway API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeProblem {
    /// Without a selector there are no pods to split by label.
    #[error(
        "it has no selector: canary-injector routes the Gateway API by Services that select \
         its pods by label"
    )]
    NoSelector,
    /// `type: ExternalName`.
    #[error("it is an ExternalName Service: there are no pods to route to")]
    ExternalName,
    /// No TCP port (HTTP runs on TCP).
    #[error("it has no TCP port")]
    NoTcpPort,
}

impl ServiceShape {
    /// Reads a Service's `spec`.
    pub fn from_spec(spec: &Value) -> Result<Self, ShapeProblem> {
        if spec.get("type").and_then(Value::as_str) == Some("ExternalName") {
            return Err(ShapeProblem::ExternalName);
        }
        let selector: BTreeMap<String, String> = spec
            .get("selector")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect();
        if selector.is_empty() {
            return Err(ShapeProblem::NoSelector);
        }
        let mut ports: Vec<ServicePort> = spec
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| ServicePort::deserialize(p).ok())
            .filter(|p| p.port > 0 && p.protocol.as_deref().is_none_or(|p| p == "TCP"))
            .map(|mut p| {
                p.protocol = Some("TCP".into());
                if p.target_port.is_none() {
                    p.target_port = Some(TargetPort::Number(p.port));
                }
                p
            })
            .collect();
        ports.sort_by_key(|p| p.port);
        ports.dedup_by_key(|p| p.port);
        if ports.is_empty() {
            return Err(ShapeProblem::NoTcpPort);
        }
        Ok(Self { selector, ports })
    }
}

// === names ===

/// A version of a routed Service: the normal pods, or a canary tag.
pub type Version = Option<String>;

/// The name of the version Service of `version` (`normal`, or a tag's
/// subset name) of `service`, salted with `salt` when not 0 (see the module
/// docs). A DNS-1035 label when `service` is one.
pub fn version_name(service: &str, version: &str, salt: u32) -> String {
    let plain = format!("{service}{MARK}{version}");
    if salt == 0 && plain.len() <= MAX_LEN {
        return plain;
    }
    let mut readable: String = plain.chars().take(READABLE_LEN).collect();
    while readable.ends_with('-') {
        readable.pop();
    }
    let hash = if salt == 0 {
        fnv1a32(plain.as_bytes())
    } else {
        fnv1a32(format!("{plain}\0{salt}").as_bytes())
    };
    format!("{readable}{MARK}{hash:08x}")
}

/// A DNS-1035 label: a Service name.
pub fn is_service_name(name: &str) -> bool {
    is_dns_label(name) && name.starts_with(|c: char| c.is_ascii_lowercase())
}

/// Names for the version Services of `versions` of `service`: a version in
/// `existing` (its Service exists) keeps that name; the others get
/// [`version_name`], stepping around `taken` (names other routed Services'
/// version Services hold) and each other. Unique; stable for a given input.
pub fn version_names<'a>(
    service: &str,
    versions: impl IntoIterator<Item = &'a Version>,
    existing: &BTreeMap<Version, String>,
    taken: &BTreeSet<String>,
) -> BTreeMap<Version, String> {
    let versions: BTreeSet<&Version> = versions.into_iter().collect();
    let mut used: BTreeSet<String> = taken.clone();
    let mut names = BTreeMap::new();
    for version in &versions {
        if let Some(name) = existing.get(*version)
            && !used.contains(name)
        {
            used.insert(name.clone());
            names.insert((*version).clone(), name.clone());
        }
    }
    // Tags' version parts: their subset names, unique among the tags.
    let tags = versions.iter().filter_map(|v| v.as_deref());
    let parts = assign_names(tags, &BTreeMap::new());
    for version in versions {
        if names.contains_key(version) {
            continue;
        }
        let part = match version {
            None => NORMAL,
            Some(tag) => parts[tag].as_str(),
        };
        let mut salt = 0;
        let mut name = version_name(service, part, salt);
        while used.contains(&name) {
            salt += 1;
            name = version_name(service, part, salt);
        }
        used.insert(name.clone());
        names.insert(version.clone(), name);
    }
    names
}

/// The name of the HTTPRoute for `port` of a Service with `ports` TCP
/// ports: the Service's name when it has one, else `<service>-<port>`.
pub fn route_name(service: &str, port: i32, ports: usize) -> String {
    if ports == 1 {
        service.to_owned()
    } else {
        format!("{service}-{port}")
    }
}

// === the objects ===

/// A version Service as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionService {
    /// Name, namespace, labels, removal time, owner.
    pub metadata: Meta,
    /// Selector and ports.
    pub spec: VersionSpec,
}

/// A version Service's `spec`: the fields canary-injector sets.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VersionSpec {
    /// The routed Service's selector plus the version's labels.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// The routed Service's TCP ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

impl VersionService {
    /// The object as JSON (`v1` `Service`).
    pub fn to_json(&self) -> Value {
        render("v1", "Service", self)
    }
}

/// An HTTPRoute as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpRoute {
    /// Name, namespace, labels, owner.
    pub metadata: Meta,
    /// Parent and rules.
    pub spec: HttpRouteSpec,
}

impl HttpRoute {
    /// The object as JSON (`gateway.networking.k8s.io/v1` `HTTPRoute`).
    pub fn to_json(&self) -> Value {
        render(&format!("{GROUP}/{VERSION}"), "HTTPRoute", self)
    }
}

/// `HTTPRoute.spec`: the fields canary-injector sets.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// The routed Service.
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// One rule per routed tag, then the default rule.
    #[serde(default)]
    pub rules: Vec<RouteRule>,
}

/// A parentRef (group `""`, kind `Service`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// `""`: the core group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `Service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The Service.
    #[serde(default)]
    pub name: String,
    /// The port, when the Service has several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    /// One match: the `/` prefix, and the header for a tag's rule.
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    /// Where matching requests go.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// The Service's route timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
}

/// One match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RouteMatch {
    /// `PathPrefix` `/` (what the apiserver defaults to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// The header and tag of a tag's rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

/// A path match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PathMatch {
    /// `PathPrefix`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// A header match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HeaderMatch {
    /// `Exact`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// The header.
    #[serde(default)]
    pub name: String,
    /// The tag.
    #[serde(default)]
    pub value: String,
}

/// A backendRef (group `""`, kind `Service`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BackendRef {
    /// `""`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `Service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// A version Service, or the routed Service itself.
    #[serde(default)]
    pub name: String,
    /// The port the rule is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// Its share (1 for a single backend; percents when split).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// A rule's timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Timeouts {
    /// The whole request, as the Gateway API writes durations (`1s500ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

fn render<T: Serialize>(api_version: &str, kind: &str, object: &T) -> Value {
    let mut out = Map::new();
    out.insert("apiVersion".into(), Value::from(api_version));
    out.insert("kind".into(), Value::from(kind));
    if let Ok(Value::Object(fields)) = serde_json::to_value(object) {
        out.extend(fields);
    }
    Value::Object(out)
}

impl Spec for HttpRouteSpec {
    const KIND: RuleKind = RuleKind::HttpRoute;
    fn hosts(spec: &Value) -> Vec<String> {
        service_parents(spec)
    }
}

/// A GRPCRoute, read for its parents only (a foreign one with a routed
/// Service as parent is a conflict).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub struct GrpcRouteSpec {}

impl Spec for GrpcRouteSpec {
    const KIND: RuleKind = RuleKind::GrpcRoute;
    fn hosts(spec: &Value) -> Vec<String> {
        service_parents(spec)
    }
}

/// The Services a route's raw `spec` has as parents, as hosts
/// (`name`, or `name.namespace` when the parentRef names a namespace).
fn service_parents(spec: &Value) -> Vec<String> {
    spec.get("parentRefs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|p| {
            matches!(p.get("group").and_then(Value::as_str), Some("" | "core"))
                && p.get("kind").and_then(Value::as_str) == Some("Service")
        })
        .filter_map(|p| {
            let name = p.get("name")?.as_str()?;
            Some(match p.get("namespace").and_then(Value::as_str) {
                Some(ns) => format!("{name}.{ns}"),
                None => name.to_owned(),
            })
        })
        .collect()
}

/// A duration as the Gateway API writes it (GEP-2257: up to four parts of
/// up to 5 digits, `h`, `m`, `s`, `ms`), from the Istio form
/// ([`super::shape::istio_duration`]: `1.5s`). Sub-millisecond parts are
/// dropped; `None` when it does not read.
pub fn gateway_duration(istio: &str) -> Option<String> {
    let seconds = istio.strip_suffix('s')?;
    let (whole, fraction) = seconds.split_once('.').unwrap_or((seconds, ""));
    let whole: u64 = whole.parse().ok()?;
    let millis: u64 = format!("{fraction:0<3}").get(..3)?.parse().ok()?;
    let d = Duration::from_millis(whole.checked_mul(1000)?.checked_add(millis)?);
    let total = d.as_millis();
    if total == 0 {
        return Some("0s".into());
    }
    let (h, rest) = (total / 3_600_000, total % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, ms) = (rest / 1000, rest % 1000);
    if h > 99_999 {
        return None;
    }
    let mut out = String::new();
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    Some(out)
}

// === what is read back ===

/// A version Service as the cluster holds it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedService {
    /// Name.
    pub name: String,
    /// uid.
    pub uid: Option<String>,
    /// resourceVersion.
    pub resource_version: Option<String>,
    /// Labelled [`MANAGED_BY_LABEL`]: ours.
    pub managed: bool,
    /// [`ROUTE_OF_LABEL`].
    pub route_of: Option<String>,
    /// [`TAG_LABEL`]: the canary it is for (`None`: the normal pods).
    pub tag: Option<String>,
    /// [`REMOVAL_DUE_ANNOTATION`].
    pub removal_due: Option<String>,
    /// uids of its Service owners.
    pub owner_uids: Vec<String>,
    /// Its selector and ports.
    pub spec: VersionSpec,
}

impl ObservedService {
    /// Reads a Service from JSON (`metadata` and `spec`).
    pub fn from_json(object: &Value) -> Self {
        let meta = &object["metadata"];
        let text = |v: &Value| v.as_str().map(str::to_owned);
        let label = |k: &str| text(&meta["labels"][k]);
        Self {
            name: text(&meta["name"]).unwrap_or_default(),
            uid: text(&meta["uid"]),
            resource_version: text(&meta["resourceVersion"]),
            managed: label(MANAGED_BY_LABEL).as_deref() == Some(MANAGED_BY_VALUE),
            route_of: label(ROUTE_OF_LABEL),
            tag: label(TAG_LABEL),
            removal_due: text(&meta["annotations"][REMOVAL_DUE_ANNOTATION]),
            owner_uids: meta["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|o| o["kind"] == "Service")
                .filter_map(|o| text(&o["uid"]))
                .collect(),
            spec: VersionSpec {
                selector: object["spec"]["selector"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect(),
                ports: object["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| ServicePort::deserialize(p).ok())
                    .collect(),
            },
        }
    }

    /// A version Service of `service` managed by canary-injector.
    pub fn is_version_of(&self, service: &str) -> bool {
        self.managed && self.route_of.as_deref() == Some(service)
    }

    /// It has `port` (routes to it on that port work).
    fn has_port(&self, port: i32) -> bool {
        self.spec.ports.iter().any(|p| p.port == port)
    }

    /// True when it already is `desired` as far as our fields go.
    pub fn holds(&self, desired: &VersionService) -> bool {
        let m = &desired.metadata;
        self.managed
            && self.route_of.as_ref() == m.labels.get(ROUTE_OF_LABEL)
            && self.tag.as_ref() == m.labels.get(TAG_LABEL)
            && m.owner_references
                .iter()
                .all(|o| self.owner_uids.contains(&o.uid))
            && self.removal_due.as_ref() == m.annotations.get(REMOVAL_DUE_ANNOTATION)
            && self.spec == desired.spec
    }
}

// === desired ===

/// The version Service of `version` named `name`.
fn version_service(
    service: &ServiceRef,
    shape: &ServiceShape,
    labels: &LabelPolicy,
    version: &Version,
    name: &str,
    due: Option<Timestamp>,
) -> VersionService {
    let mut selector = shape.selector.clone();
    let mut meta = meta(service, name);
    match version {
        None => {
            selector.insert(labels.stage.clone(), labels.normal_stage.clone());
        }
        Some(tag) => {
            selector.insert(labels.stage.clone(), labels.gray_stage.clone());
            selector.insert(labels.canary_tag.clone(), tag.clone());
            meta.labels.insert(TAG_LABEL.into(), tag.clone());
        }
    }
    if let Some(due) = due {
        meta.annotations
            .insert(REMOVAL_DUE_ANNOTATION.into(), due.to_string());
    }
    VersionService {
        metadata: meta,
        spec: VersionSpec {
            selector,
            ports: shape.ports.clone(),
        },
    }
}

fn meta(service: &ServiceRef, name: &str) -> Meta {
    Meta {
        name: name.to_owned(),
        namespace: Some(service.namespace.clone()).filter(|ns| !ns.is_empty()),
        labels: BTreeMap::from([
            (MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned()),
            (ROUTE_OF_LABEL.to_owned(), service.name.clone()),
        ]),
        annotations: BTreeMap::new(),
        owner_references: service
            .uid
            .iter()
            .map(|uid| OwnerReference {
                api_version: "v1".into(),
                kind: "Service".into(),
                name: service.name.clone(),
                uid: uid.clone(),
            })
            .collect(),
    }
}

fn backend(name: &str, port: i32, weight: u32) -> BackendRef {
    BackendRef {
        group: Some(String::new()),
        kind: Some("Service".into()),
        name: name.to_owned(),
        port: Some(port),
        weight: Some(weight),
    }
}

fn prefix_all() -> PathMatch {
    PathMatch {
        type_: Some("PathPrefix".into()),
        value: Some("/".into()),
    }
}

/// What goes into one route.
struct RouteInput<'a> {
    service: &'a ServiceRef,
    header: &'a str,
    ports: usize,
    port: i32,
    /// Routed tags: tag -> version Service.
    routed: &'a BTreeMap<String, String>,
    /// Where the default rule goes: the normal version Service, or the
    /// routed Service itself.
    default: Option<&'a str>,
    /// The canaries' shares of the default rule (version Service ->
    /// percent), when it goes to the normal version Service.
    split: &'a [(String, u8)],
    timeout: Option<&'a str>,
}

/// The HTTPRoute for one port.
fn http_route(input: &RouteInput<'_>) -> HttpRoute {
    let service = input.service;
    let timeouts = input.timeout.map(|t| Timeouts {
        request: Some(t.to_owned()),
    });
    let mut rules: Vec<RouteRule> = input
        .routed
        .iter()
        .map(|(tag, name)| RouteRule {
            matches: vec![RouteMatch {
                path: Some(prefix_all()),
                headers: vec![HeaderMatch {
                    type_: Some("Exact".into()),
                    name: input.header.to_owned(),
                    value: tag.clone(),
                }],
            }],
            backend_refs: vec![backend(name, input.port, 1)],
            timeouts: timeouts.clone(),
        })
        .collect();
    let backend_refs = match input.default {
        Some(normal) if !input.split.is_empty() => {
            let canaries: u32 = input.split.iter().map(|(_, p)| u32::from(*p)).sum();
            let mut refs = Vec::with_capacity(input.split.len() + 1);
            if canaries < 100 {
                refs.push(backend(normal, input.port, 100 - canaries));
            }
            refs.extend(
                input
                    .split
                    .iter()
                    .map(|(name, p)| backend(name, input.port, u32::from(*p))),
            );
            refs
        }
        Some(normal) => vec![backend(normal, input.port, 1)],
        None => vec![backend(&service.name, input.port, 1)],
    };
    rules.push(RouteRule {
        matches: vec![RouteMatch {
            path: Some(prefix_all()),
            headers: Vec::new(),
        }],
        backend_refs,
        timeouts,
    });
    HttpRoute {
        metadata: meta(service, &route_name(&service.name, input.port, input.ports)),
        spec: HttpRouteSpec {
            parent_refs: vec![ParentRef {
                group: Some(String::new()),
                kind: Some("Service".into()),
                name: service.name.clone(),
                port: (input.ports > 1).then_some(input.port),
            }],
            rules,
        },
    }
}

/// The tags that get a version Service and a rule: the first
/// [`MAX_TAGS`] live tags in order; and those left out.
pub fn routable(live: &Live) -> (Vec<&String>, Vec<&String>) {
    let mut tags: Vec<&String> = live.tags.iter().collect();
    let over = tags.split_off(tags.len().min(MAX_TAGS));
    (tags, over)
}

/// The objects a Service converges to on the Gateway API when every
/// version Service exists and has a ready endpoint: what `routes -f --api
/// gateway-api` prints.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayDesired {
    /// The normal version Service, then one per routable tag.
    pub services: Vec<VersionService>,
    /// One per TCP port.
    pub routes: Vec<HttpRoute>,
}

/// [`GatewayDesired`] for `service` (see the module docs).
pub fn desired(
    service: &ServiceRef,
    shape: &ServiceShape,
    header: &str,
    live: &Live,
    labels: &LabelPolicy,
    settings: &RouteSettings,
) -> GatewayDesired {
    let (tags, _) = routable(live);
    let versions: Vec<Version> = std::iter::once(None)
        .chain(tags.iter().map(|t| Some((*t).clone())))
        .collect();
    let names = version_names(&service.name, &versions, &BTreeMap::new(), &BTreeSet::new());
    let services = versions
        .iter()
        .map(|v| version_service(service, shape, labels, v, &names[v], None))
        .collect();
    let routed: BTreeMap<String, String> = tags
        .iter()
        .map(|t| ((*t).clone(), names[&Some((*t).clone())].clone()))
        .collect();
    let default = live.default_route();
    let split = weighted(&routed, live, default).unwrap_or_default();
    let normal = (default == DefaultRoute::Normal).then(|| names[&None].as_str());
    let timeout = settings.timeout.as_deref().and_then(gateway_duration);
    let routes = shape
        .ports
        .iter()
        .map(|p| {
            http_route(&RouteInput {
                service,
                header,
                ports: shape.ports.len(),
                port: p.port,
                routed: &routed,
                default: normal,
                split: &split,
                timeout: timeout.as_deref(),
            })
        })
        .collect();
    GatewayDesired { services, routes }
}

/// The route settings the Gateway API backend cannot write: retries (not
/// in the standard channel), as an [`super::shape::InvalidSetting`] to
/// report.
pub fn unsupported(settings: &RouteSettings) -> Option<super::shape::InvalidSetting> {
    settings
        .retries
        .as_ref()
        .map(|r| super::shape::InvalidSetting {
            annotation: RETRIES_ANNOTATION,
            value: match &r.per_try_timeout {
                Some(t) => format!("{}/{t}", r.attempts),
                None => r.attempts.to_string(),
            },
            reason: "is not written on the Gateway API: HTTPRoute retries are not in its \
                     standard channel"
                .into(),
        })
}

// === plan ===

/// Everything [`plan`] decides from.
#[derive(Debug, Clone, Copy)]
pub struct GatewayInput<'a> {
    /// The routed Service.
    pub service: &'a ServiceRef,
    /// Its selector and TCP ports.
    pub shape: &'a ServiceShape,
    /// The request header that selects a tag.
    pub header: &'a str,
    /// The label vocabulary.
    pub labels: &'a LabelPolicy,
    /// What has a ready endpoint among the routed Service's pods.
    pub live: &'a Live,
    /// Our HTTPRoutes of this Service (managed, [`ROUTE_OF_LABEL`] naming
    /// it), as the cluster holds them.
    pub routes: &'a [Observed<HttpRouteSpec>],
    /// Our version Services of this Service.
    pub services: &'a [ObservedService],
    /// Version Services with a ready endpoint, by name.
    pub ready: &'a BTreeSet<String>,
    /// Service names other routed Services' version Services hold.
    pub taken: &'a BTreeSet<String>,
    /// When each gone tag's Service may go, as the last plan said.
    pub due: &'a BTreeMap<String, Timestamp>,
    /// Now (wall clock).
    pub now: Timestamp,
    /// How long a gone tag's Service stays (`routes.removalGraceSeconds`).
    pub grace: Duration,
    /// The Service's route settings.
    pub settings: &'a RouteSettings,
}

/// A delete of one of our objects, with the preconditions that make sure it
/// is still the object we saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// [`RuleKind::HttpRoute`] or [`RuleKind::Service`].
    pub kind: RuleKind,
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: Option<String>,
    /// Its resourceVersion.
    pub resource_version: Option<String>,
    /// The tag of a version Service (`None`: normal, or a route).
    pub tag: Option<String>,
}

/// The next write on the Gateway API.
#[derive(Debug, Clone, PartialEq)]
pub enum GatewayStep {
    /// Create or apply an HTTPRoute (`added`/`removed`/`default` are set on
    /// the route of the first port only, for the report).
    Route(Write<HttpRoute>),
    /// Create or apply a version Service (`added`: its tag when created).
    Service(Write<VersionService>),
    /// Delete an HTTPRoute or a version Service.
    Delete(Delete),
}

/// What [`plan`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayPlan {
    /// The next write; `None` when everything is in place (for now).
    pub step: Option<GatewayStep>,
    /// When the Service of each gone tag may go: pass it to the next plan.
    pub due: BTreeMap<String, Timestamp>,
    /// When to plan again even if nothing changes (a grace period ends).
    pub wake_at: Option<Timestamp>,
    /// The routed canaries' weights add up to this, more than 100: the
    /// default rule keeps the split it has.
    pub weights_over: Option<u32>,
    /// Live tags beyond [`MAX_TAGS`]: no Service, no rule.
    pub over: Vec<String>,
    /// The names the version Services have or will get.
    pub names: BTreeMap<Version, String>,
}

/// Tags routed by header in a route spec: tag -> backend Service.
pub fn header_rules(spec: &HttpRouteSpec, header: &str) -> BTreeMap<String, String> {
    let mut tags = BTreeMap::new();
    for rule in &spec.rules {
        let tag = rule
            .matches
            .iter()
            .flat_map(|m| &m.headers)
            .find(|h| h.name.eq_ignore_ascii_case(header))
            .map(|h| h.value.clone());
        if let (Some(tag), Some(b)) = (tag, rule.backend_refs.first()) {
            tags.entry(tag).or_insert_with(|| b.name.clone());
        }
    }
    tags
}

/// The default rule's split: backend Service -> percent, for the backends
/// other than `normal` (the normal version Service) and the routed
/// Service `service` itself.
pub fn split_of(spec: &HttpRouteSpec, normal: &str, service: &str) -> BTreeMap<String, u8> {
    spec.rules
        .last()
        .filter(|r| r.matches.iter().all(|m| m.headers.is_empty()))
        .into_iter()
        .flat_map(|r| &r.backend_refs)
        .filter(|b| b.name != normal && b.name != service)
        .filter_map(|b| Some((b.name.clone(), u8::try_from(b.weight?).ok()?)))
        .collect()
}

/// Where a route's default rule goes, when it is one canary-injector
/// writes.
pub fn default_of(spec: &HttpRouteSpec, service: &str) -> Option<DefaultRoute> {
    let last = spec
        .rules
        .last()
        .filter(|r| r.matches.iter().all(|m| m.headers.is_empty()))?;
    match last.backend_refs.as_slice() {
        [only] if only.name == service => Some(DefaultRoute::Service),
        [] => None,
        _ => Some(DefaultRoute::Normal),
    }
}

/// `now + grace`, rounded up to a whole second.
fn due_after(now: Timestamp, grace: Duration) -> Timestamp {
    let at = now + grace;
    let whole = at.as_second() + i64::from(at.subsec_nanosecond() > 0);
    Timestamp::from_second(whole).unwrap_or(at)
}

/// The next write for one Service on the Gateway API (see the module
/// docs): route writes first, then route deletes, then version Service
/// creates and changes, then version Service deletes.
pub fn plan(input: &GatewayInput<'_>) -> GatewayPlan {
    let service = input.service;
    let ours: Vec<&ObservedService> = input
        .services
        .iter()
        .filter(|s| s.is_version_of(&service.name))
        .collect();
    let routes: Vec<&Observed<HttpRouteSpec>> = input
        .routes
        .iter()
        .filter(|r| r.managed && r.route_of.as_deref() == Some(&service.name))
        .collect();
    // Every Service a route of ours names still.
    let referenced: BTreeSet<&str> = routes
        .iter()
        .filter_map(|r| r.spec.as_ref())
        .flat_map(|s| &s.rules)
        .flat_map(|r| &r.backend_refs)
        .map(|b| b.name.as_str())
        .collect();

    // Names: what exists keeps its name (the first of duplicates, by name).
    let mut existing: BTreeMap<Version, String> = BTreeMap::new();
    let mut by_name: BTreeMap<&str, &ObservedService> = BTreeMap::new();
    for s in &ours {
        by_name.insert(&s.name, s);
    }
    for s in by_name.values() {
        existing
            .entry(s.tag.clone())
            .or_insert_with(|| s.name.clone());
    }
    let (tags, over) = routable(input.live);
    let live: BTreeSet<&String> = tags.iter().copied().collect();
    let wanted: Vec<Version> = std::iter::once(None)
        .chain(tags.iter().map(|t| Some((*t).clone())))
        .collect();

    // Gone tags: due as written on their Service, else as planned before,
    // else a grace from now.
    let mut due = BTreeMap::new();
    for s in by_name.values() {
        let Some(tag) = s.tag.as_ref().filter(|t| !live.contains(t)) else {
            continue;
        };
        let persisted = s
            .removal_due
            .as_deref()
            .and_then(|d| d.parse::<Timestamp>().ok());
        let at = persisted
            .or_else(|| input.due.get(tag).copied())
            .unwrap_or_else(|| due_after(input.now, input.grace));
        due.entry(tag.clone()).or_insert(at);
    }
    let in_grace = |tag: &str| due.get(tag).is_some_and(|at| input.now < *at);
    let kept: Vec<Version> = existing
        .iter()
        .filter(|(v, name)| {
            v.as_ref().is_some_and(|t| {
                !live.contains(t) && (in_grace(t) || referenced.contains(name.as_str()))
            })
        })
        .map(|(v, _)| v.clone())
        .collect();
    let names = version_names(
        &service.name,
        wanted.iter().chain(&kept),
        &existing,
        input.taken,
    );
    let observed = |name: &str| by_name.get(name).copied();
    let usable = |name: &str, port: i32| {
        observed(name).is_some_and(|s| s.has_port(port)) && input.ready.contains(name)
    };

    // 1. Routes: tag rules and the normal default rule only to version
    //    Services that exist with the port and have a ready endpoint.
    let timeout = input.settings.timeout.as_deref().and_then(gateway_duration);
    let mut weights_over = None;
    let mut first_route = None;
    let desired_routes: Vec<(HttpRoute, BTreeMap<String, String>, Option<DefaultRoute>)> = input
        .shape
        .ports
        .iter()
        .map(|p| {
            let routed: BTreeMap<String, String> = tags
                .iter()
                .map(|t| ((*t).clone(), names[&Some((*t).clone())].clone()))
                .filter(|(_, name)| usable(name, p.port))
                .collect();
            let normal = &names[&None];
            let to_normal = input.live.normal && usable(normal, p.port);
            let to = if to_normal {
                DefaultRoute::Normal
            } else {
                DefaultRoute::Service
            };
            let name = route_name(&service.name, p.port, input.shape.ports.len());
            let before = routes.iter().find(|r| r.name == name);
            let split = match weighted(&routed, input.live, to) {
                Ok(split) => split,
                Err(sum) => {
                    weights_over = Some(sum);
                    let kept: BTreeSet<&String> = routed.values().collect();
                    before
                        .and_then(|r| r.spec.as_ref())
                        .map(|s| split_of(s, normal, &service.name))
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|(n, _)| kept.contains(n))
                        .collect()
                }
            };
            let route = http_route(&RouteInput {
                service,
                header: input.header,
                ports: input.shape.ports.len(),
                port: p.port,
                routed: &routed,
                default: to_normal.then_some(normal.as_str()),
                split: &split,
                timeout: timeout.as_deref(),
            });
            (route, routed, Some(to))
        })
        .collect();
    for (i, (route, routed, to)) in desired_routes.iter().enumerate() {
        let before = routes.iter().find(|r| r.name == route.metadata.name);
        if before.is_some_and(|o| o.holds(&route.metadata, &route.spec)) {
            continue;
        }
        let before_spec = before.and_then(|o| o.spec.as_ref());
        let (added, removed, default) = if i == 0 {
            let was = before_spec
                .map(|s| header_rules(s, input.header))
                .unwrap_or_default();
            let (added, removed) = changes(&was, routed);
            let from = before_spec.and_then(|s| default_of(s, &service.name));
            let to = to.unwrap_or(DefaultRoute::Service);
            let change = (from != Some(to)).then_some(DefaultChange { from, to });
            (added, removed, change)
        } else {
            (Vec::new(), Vec::new(), None)
        };
        first_route = Some(GatewayStep::Route(Write {
            create: before.is_none(),
            resource_version: before.and_then(|o| o.resource_version.clone()),
            object: route.clone(),
            added,
            removed,
            default,
        }));
        break;
    }

    // 2. Routes for ports the Service no longer has.
    let route_names: BTreeSet<&str> = desired_routes
        .iter()
        .map(|(r, _, _)| r.metadata.name.as_str())
        .collect();
    let route_delete = routes
        .iter()
        .find(|r| !route_names.contains(r.name.as_str()))
        .map(|r| {
            GatewayStep::Delete(Delete {
                kind: RuleKind::HttpRoute,
                name: r.name.clone(),
                uid: r.uid.clone(),
                resource_version: r.resource_version.clone(),
                tag: None,
            })
        });

    // 3. Version Services: the wanted ones, and gone tags' in their grace
    //    (with the time they may go).
    let service_write = wanted.iter().chain(&kept).find_map(|v| {
        let name = &names[v];
        let keep_until = v
            .as_ref()
            .filter(|t| !live.contains(t))
            .and_then(|t| due.get(t).copied());
        let object = version_service(service, input.shape, input.labels, v, name, keep_until);
        match observed(name) {
            Some(o) if o.holds(&object) => None,
            o => Some(GatewayStep::Service(Write {
                create: o.is_none(),
                resource_version: o.and_then(|o| o.resource_version.clone()),
                object,
                added: if o.is_none() {
                    v.iter().cloned().collect()
                } else {
                    Vec::new()
                },
                removed: Vec::new(),
                default: None,
            })),
        }
    });

    // 4. Version Services neither wanted nor kept, once no route names
    //    them.
    let keep_names: BTreeSet<&str> = names.values().map(String::as_str).collect();
    let service_delete = by_name
        .values()
        .find(|s| !keep_names.contains(s.name.as_str()) && !referenced.contains(s.name.as_str()))
        .map(|s| {
            GatewayStep::Delete(Delete {
                kind: RuleKind::Service,
                name: s.name.clone(),
                uid: s.uid.clone(),
                resource_version: s.resource_version.clone(),
                tag: s.tag.clone(),
            })
        });

    let wake_at = due
        .iter()
        .filter(|(tag, _)| kept.iter().any(|k| k.as_ref() == Some(*tag)))
        .map(|(_, at)| *at)
        .filter(|at| *at > input.now)
        .min();
    GatewayPlan {
        step: first_route
            .or(route_delete)
            .or(service_write)
            .or(service_delete),
        due,
        wake_at,
        weights_over,
        over: over.into_iter().cloned().collect(),
        names,
    }
}

/// The next delete when a Service no longer wants routes on the Gateway
/// API: its HTTPRoutes first, then its version Services. Only objects
/// labelled as ours and as its are deleted.
pub fn plan_removal(
    service: &str,
    routes: &[Observed<HttpRouteSpec>],
    services: &[ObservedService],
) -> Option<Delete> {
    if let Some(r) = routes
        .iter()
        .find(|r| r.managed && r.route_of.as_deref() == Some(service))
    {
        return Some(Delete {
            kind: RuleKind::HttpRoute,
            name: r.name.clone(),
            uid: r.uid.clone(),
            resource_version: r.resource_version.clone(),
            tag: None,
        });
    }
    services
        .iter()
        .find(|s| s.is_version_of(service))
        .map(|s| Delete {
            kind: RuleKind::Service,
            name: s.name.clone(),
            uid: s.uid.clone(),
            resource_version: s.resource_version.clone(),
            tag: s.tag.clone(),
        })
}

#[cfg(test)]
mod tests;
