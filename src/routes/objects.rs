//! The Istio objects, as far as canary-injector writes and reads them: small
//! serde types for the fields it sets (rendered to JSON at the API version
//! the cluster serves), and [`Observed`], what it reads back from the
//! cluster (leniently: fields it does not set are ignored, so another
//! manager's additions never make an object look out of date).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{MANAGED_BY_LABEL, MANAGED_BY_VALUE, RuleKind};

/// Annotation on our DestinationRule: when each subset kept only for its
/// grace period may go (`{"<tag>": "<RFC 3339 time>"}`), so the grace
/// survives a restart or a change of leader.
pub const REMOVAL_DUE_ANNOTATION: &str = "canary-injector.io/removal-due";

/// Label on every version Service and HTTPRoute of the Gateway API backend
/// ([`super::gateway`]): the routed Service it is for.
pub const ROUTE_OF_LABEL: &str = "canary-injector.io/route-of";

/// The API group of DestinationRule and VirtualService.
pub const GROUP: &str = "networking.istio.io";

/// The versions of [`GROUP`] canary-injector can write, best first: `v1`
/// from Istio 1.22, `v1beta1` from 1.5, `v1alpha3` before. The fields it
/// writes mean the same in each.
pub const VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];

/// `metadata` as written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    /// The Service's name.
    pub name: String,
    /// The Service's namespace; absent offline when the manifest has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// [`MANAGED_BY_LABEL`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// [`REMOVAL_DUE_ANNOTATION`] on a DestinationRule with subsets in
    /// their grace period.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The Service, when its uid is known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
}

/// An ownerReference to the Service (no `controller`, no
/// `blockOwnerDeletion`: that one needs rights on the Service's finalizers).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    /// `v1`.
    pub api_version: String,
    /// `Service`.
    pub kind: String,
    /// The Service's name.
    pub name: String,
    /// The Service's uid.
    pub uid: String,
}

/// A DestinationRule as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DestinationRule {
    /// Name, namespace, label, owner.
    pub metadata: Meta,
    /// Host and subsets.
    pub spec: DestinationRuleSpec,
}

/// `DestinationRule.spec`: the fields canary-injector sets.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DestinationRuleSpec {
    /// The Service's short name.
    #[serde(default)]
    pub host: String,
    /// `normal` first, then one per tag.
    #[serde(default)]
    pub subsets: Vec<Subset>,
}

/// One subset.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Subset {
    /// A DNS-1123 label.
    #[serde(default)]
    pub name: String,
    /// The pod labels it selects.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A VirtualService as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VirtualService {
    /// Name, namespace, label, owner.
    pub metadata: Meta,
    /// Hosts and HTTP routes.
    pub spec: VirtualServiceSpec,
}

/// `VirtualService.spec`: the fields canary-injector sets.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VirtualServiceSpec {
    /// The Service's short name.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// One route per tag, then the default route.
    #[serde(default)]
    pub http: Vec<HttpRoute>,
}

/// One HTTP route.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HttpRoute {
    /// The subset's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The header match (none on the default route).
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatch>,
    /// One destination, or (the default route of a weighted gray stage)
    /// several with weights adding up to 100.
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    /// `timeout` (the Service's route settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// `retries` (the Service's route settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<super::shape::Retries>,
}

/// One match of a route.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HttpMatch {
    /// Header name -> how its value must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, StringMatch>,
}

/// A string match: `exact` only.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StringMatch {
    /// The tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
}

/// A route's destination wrapper.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RouteDestination {
    /// Where requests go.
    #[serde(default)]
    pub destination: Destination,
    /// Its share in percent, when the route has several destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// Host and subset of a destination (no `port`: see [`super`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Destination {
    /// The Service's short name.
    #[serde(default)]
    pub host: String,
    /// The subset's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
}

/// The JSON of an object of `kind` at `api_version` (`networking.istio.io/v1`).
fn render<T: Serialize>(kind: RuleKind, api_version: &str, object: &T) -> Value {
    let mut out = Map::new();
    out.insert("apiVersion".into(), Value::from(api_version));
    out.insert("kind".into(), Value::from(kind.as_str()));
    if let Ok(Value::Object(fields)) = serde_json::to_value(object) {
        out.extend(fields);
    }
    Value::Object(out)
}

impl DestinationRule {
    /// The object as JSON at `api_version`, e.g. `networking.istio.io/v1`.
    pub fn to_json(&self, api_version: &str) -> Value {
        render(RuleKind::DestinationRule, api_version, self)
    }
}

impl VirtualService {
    /// The object as JSON at `api_version`, e.g. `networking.istio.io/v1`.
    pub fn to_json(&self, api_version: &str) -> Value {
        render(RuleKind::VirtualService, api_version, self)
    }
}

// === Observed ===

/// A spec type that can be read back from the cluster.
pub trait Spec: DeserializeOwned + PartialEq {
    /// The kind.
    const KIND: RuleKind;
    /// The hosts a raw `spec` names (`host`, or `hosts`), read without
    /// trusting the rest of it.
    fn hosts(spec: &Value) -> Vec<String>;
}

impl Spec for DestinationRuleSpec {
    const KIND: RuleKind = RuleKind::DestinationRule;
    fn hosts(spec: &Value) -> Vec<String> {
        spec.get("host")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .into_iter()
            .collect()
    }
}

impl Spec for VirtualServiceSpec {
    const KIND: RuleKind = RuleKind::VirtualService;
    fn hosts(spec: &Value) -> Vec<String> {
        spec.get("hosts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    }
}

/// The metadata of an object in the cluster, as far as it matters here.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedMeta {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// uid (a delete precondition).
    pub uid: Option<String>,
    /// resourceVersion (a write precondition).
    pub resource_version: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The value of [`REMOVAL_DUE_ANNOTATION`], if set.
    pub removal_due: Option<String>,
    /// uids of its Service owners.
    pub owner_uids: Vec<String>,
}

/// A DestinationRule or VirtualService as it is in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed<S> {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// uid.
    pub uid: Option<String>,
    /// resourceVersion.
    pub resource_version: Option<String>,
    /// Labelled `app.kubernetes.io/managed-by: canary-injector`: ours.
    pub managed: bool,
    /// uids of its Service owners.
    pub owner_uids: Vec<String>,
    /// [`REMOVAL_DUE_ANNOTATION`] as written (ours only).
    pub removal_due: Option<String>,
    /// [`ROUTE_OF_LABEL`] (ours only): the Service it is for.
    pub route_of: Option<String>,
    /// The hosts it names (`spec.host` / `spec.hosts`; a Gateway API
    /// route's Service parents).
    pub hosts: Vec<String>,
    /// What implementations say of it (a Gateway API route's
    /// `status.parents`; empty otherwise).
    pub status: RouteStatus,
    /// The spec; `None` when it does not have the expected shape, and for
    /// objects that are not ours.
    pub spec: Option<S>,
}

impl<S: Spec> Observed<S> {
    /// Reads an object from its metadata and raw `spec`. The spec of an
    /// object that is not ours is not kept: only its hosts matter (for
    /// conflicts), and a mesh may hold many such objects.
    pub fn new(meta: ObservedMeta, spec: Option<&Value>) -> Self {
        let managed =
            meta.labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY_VALUE);
        let (hosts, spec) = match spec {
            Some(raw) => (
                S::hosts(raw),
                managed.then(|| S::deserialize(raw).ok()).flatten(),
            ),
            None => (Vec::new(), None),
        };
        Self {
            removal_due: meta.removal_due.filter(|_| managed),
            route_of: meta.labels.get(ROUTE_OF_LABEL).filter(|_| managed).cloned(),
            status: RouteStatus::default(),
            managed,
            name: meta.name,
            namespace: meta.namespace,
            uid: meta.uid,
            resource_version: meta.resource_version,
            owner_uids: meta.owner_uids,
            hosts,
            spec,
        }
    }

    /// The same, with what implementations say of it (`status`; read for
    /// Gateway API routes only).
    pub fn with_status(mut self, status: Option<&Value>) -> Self {
        if S::KIND.is_gateway_route() {
            self.status = RouteStatus::from_json(status);
        }
        self
    }

    /// True when this object already is `metadata` + `spec` as far as our
    /// fields go: ours, owned by the Service when an owner is wanted, the
    /// same removal times, and the same spec. Other labels and fields are
    /// someone else's business.
    pub fn holds(&self, metadata: &Meta, spec: &S) -> bool {
        self.managed
            && metadata
                .owner_references
                .iter()
                .all(|o| self.owner_uids.contains(&o.uid))
            && self.route_of.as_ref() == metadata.labels.get(ROUTE_OF_LABEL)
            && self.removal_due.as_deref()
                == metadata
                    .annotations
                    .get(REMOVAL_DUE_ANNOTATION)
                    .map(String::as_str)
            && self.spec.as_ref() == Some(spec)
    }
}

/// An object read from JSON (`metadata` and `spec`), e.g. a document of a
/// manifest or an API response.
pub fn observe_json<S: Spec>(object: &Value) -> Observed<S> {
    let meta = &object["metadata"];
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let labels = meta["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect();
    let owner_uids = meta["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o["kind"] == "Service")
        .filter_map(|o| text(&o["uid"]))
        .collect();
    let observed = Observed::new(
        ObservedMeta {
            name: text(&meta["name"]).unwrap_or_default(),
            namespace: text(&meta["namespace"]).unwrap_or_default(),
            uid: text(&meta["uid"]),
            resource_version: text(&meta["resourceVersion"]),
            labels,
            removal_due: text(&meta["annotations"][REMOVAL_DUE_ANNOTATION]),
            owner_uids,
        },
        object.get("spec"),
    );
    observed.with_status(object.get("status"))
}

impl<S: Spec> Observed<S> {
    /// What [`super::conflicts`] reads of it.
    pub fn head(&self) -> super::RuleHead<'_> {
        super::RuleHead {
            kind: S::KIND,
            name: &self.name,
            managed: self.managed,
            hosts: &self.hosts,
        }
    }
}

// === Gateway API route status ===

/// One condition of a route's status for one parent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteCondition {
    /// `status: "True"`.
    pub status: bool,
    /// `reason`.
    pub reason: String,
    /// `message`.
    pub message: String,
}

/// What one implementation (`controllerName`) says of a route.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParentStatus {
    /// The implementation.
    pub controller: String,
    /// `Accepted`.
    pub accepted: Option<RouteCondition>,
    /// `ResolvedRefs`.
    pub resolved_refs: Option<RouteCondition>,
}

/// A route's `status.parents`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteStatus {
    /// One entry per implementation and parent.
    pub parents: Vec<ParentStatus>,
}

impl RouteStatus {
    /// Reads `status` (absent: no implementation said anything).
    pub fn from_json(status: Option<&Value>) -> Self {
        let parents = status
            .and_then(|s| s.get("parents"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|p| {
                let condition = |kind: &str| {
                    p.get("conditions")
                        .and_then(Value::as_array)?
                        .iter()
                        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
                        .map(|c| {
                            let text = |k: &str| {
                                c.get(k)
                                    .and_then(Value::as_str)
                                    .unwrap_or_default()
                                    .to_owned()
                            };
                            RouteCondition {
                                status: text("status") == "True",
                                reason: text("reason"),
                                message: text("message"),
                            }
                        })
                };
                ParentStatus {
                    controller: p
                        .get("controllerName")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    accepted: condition("Accepted"),
                    resolved_refs: condition("ResolvedRefs"),
                }
            })
            .collect();
        Self { parents }
    }

    /// What the implementations say, in one word.
    pub fn acceptance(&self) -> Acceptance {
        if self
            .parents
            .iter()
            .any(|p| p.accepted.as_ref().is_some_and(|c| c.status))
        {
            return match self
                .parents
                .iter()
                .find(|p| p.resolved_refs.as_ref().is_some_and(|c| !c.status))
            {
                Some(p) => Acceptance::RefsNotResolved(said(p, p.resolved_refs.as_ref())),
                None => Acceptance::Accepted,
            };
        }
        match self.parents.iter().find(|p| p.accepted.is_some()) {
            Some(p) => Acceptance::Rejected(said(p, p.accepted.as_ref())),
            None => Acceptance::NoImplementation,
        }
    }
}

fn said(p: &ParentStatus, c: Option<&RouteCondition>) -> String {
    let c = c.cloned().unwrap_or_default();
    let mut text = format!("{}: {}", p.controller, c.reason);
    if !c.message.is_empty() {
        text.push_str(&format!(" ({})", c.message));
    }
    text
}

/// Whether a mesh took up a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acceptance {
    /// Accepted, its backends resolved.
    Accepted,
    /// No implementation has written a status: without a GAMMA
    /// implementation the route does nothing.
    NoImplementation,
    /// An implementation did not accept it (who and why).
    Rejected(String),
    /// Accepted, but a backend does not resolve (who and why).
    RefsNotResolved(String),
}
