//! Canary routes, the pure part: which canary tags of a Service are live,
//! the DestinationRule and VirtualService that route them, and the order in
//! which to get there (make before break). No I/O, no clock, no kube types:
//! the controller ([`controller`], leader only), `canary-injector routes -f`
//! ([`offline`]) and the tests all call these functions with plain views.
//!
//! ```text
//!  Service (annotated canary-injector.io/routes: "true") -------------------+
//!  EndpointSlices: ready endpoints -> pods -> pod_stage() -> Live ----------+--> desired()
//!    (live tags, and whether a normal pod is ready)                         |     (DR + VS)
//!  config: header, label vocabulary ----------------------------------------+
//!
//!  controller:  plan::plan(observed DR/VS, live tags, when gone tags' subsets
//!               may go (also written on the DR), now)
//!                 -> the next write (subset before route; route before subset)
//! ```
//!
//! The objects ([`objects`]):
//! - a DestinationRule named after the Service, `host: <service>`, subset
//!   [`NORMAL_SUBSET`] = `{<stage>: <normalStage>}` and one subset per tag =
//!   `{<stage>: <grayStage>, <canaryTag>: <tag>}` (label keys and values from
//!   the `labels:` configuration), named by [`names`];
//! - a VirtualService named after the Service, `hosts: [<service>]`, one HTTP
//!   route per live tag matching `<header>: {exact: <tag>}`, and last a
//!   default route ([`DefaultRoute`]): to [`NORMAL_SUBSET`] while at least
//!   one ready endpoint of the Service is a normal pod, else to the Service
//!   host without a subset (every ready endpoint, as without a
//!   VirtualService). So no route ever names a subset without a ready pod:
//!   pods that predate the opt-in, pods opted out, or a Service with gray
//!   pods only would otherwise make every request without the header fail
//!   (503 `UH`). No `port`: Istio applies the routes to every HTTP port of
//!   the Service and sends each request to the port it came in on (a
//!   single-port Service needs none either).
//!
//! Both carry `app.kubernetes.io/managed-by: canary-injector` and, when the
//! Service's uid is known, an ownerReference to it.

pub mod controller;
pub mod gateway;
pub mod index;
pub mod names;
pub mod objects;
pub mod offline;
pub mod plan;
pub mod shape;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

pub use names::{NORMAL_SUBSET, assign_names, subset_name};
pub use objects::{DestinationRule, Observed, VirtualService};
pub use shape::{PodWeight, RouteSettings, TagWeight};

use crate::mutate::LabelPolicy;
use objects::{
    Destination, DestinationRuleSpec, HttpMatch, HttpRoute, Meta, OwnerReference, RouteDestination,
    StringMatch, Subset, VirtualServiceSpec,
};

/// Service annotation that opts a Service in: value `"true"`.
pub const ROUTES_ANNOTATION: &str = "canary-injector.io/routes";

/// Service annotation naming the request header for this Service, instead
/// of `routes.header`.
pub const HEADER_ANNOTATION: &str = "canary-injector.io/route-header";

/// Label set on every object the routes controller owns.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Value of [`MANAGED_BY_LABEL`] on every object we own.
pub const MANAGED_BY_VALUE: &str = "canary-injector";

/// The Service the routes are for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    /// Its namespace (empty when a manifest names none).
    pub namespace: String,
    /// Its name: also the name of the DestinationRule and VirtualService.
    pub name: String,
    /// Its uid, for the ownerReference (unknown offline).
    pub uid: Option<String>,
}

/// True when a Service's annotations ask for routes
/// (`canary-injector.io/routes: "true"`; any other value means no).
pub fn wants_routes(annotations: Option<&BTreeMap<String, String>>) -> bool {
    annotations
        .and_then(|a| a.get(ROUTES_ANNOTATION))
        .is_some_and(|v| v == "true")
}

/// A header annotation that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "annotation {HEADER_ANNOTATION}: {0:?} is not a lowercase HTTP header name \
     ([a-z0-9] and !#$%&'*+-.^_`|~); fix it or remove it to use the default header"
)]
pub struct InvalidHeader(pub String);

/// The request header for a Service: [`HEADER_ANNOTATION`] when set, else
/// `default` (`routes.header`).
pub fn route_header<'a>(
    annotations: Option<&'a BTreeMap<String, String>>,
    default: &'a str,
) -> Result<&'a str, InvalidHeader> {
    match annotations.and_then(|a| a.get(HEADER_ANNOTATION)) {
        None => Ok(default),
        Some(h) if is_header_name(h) => Ok(h),
        Some(h) => Err(InvalidHeader(h.clone())),
    }
}

/// An HTTP field name (RFC 9110 `token`) without uppercase letters: what
/// HTTP/2 requires on the wire and what Istio's header matches compare
/// against (Envoy lowercases header names).
pub fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

/// The canary tag a pod serves, if it is a canary: it carries
/// `<canaryTag>: <tag>` (read through [`LabelPolicy::intent`]) and the label
/// `<stage>: <grayStage>` itself, because that is what the tag's subset
/// selects on. An empty tag is no tag.
pub fn pod_tag<'a>(labels: &'a LabelPolicy, pod: &'a BTreeMap<String, String>) -> Option<&'a str> {
    // `intent` reads the tag label as it is (borrowed), never rewritten.
    let tag = match labels.intent(Some(pod)).tag?.value {
        Cow::Borrowed(tag) => tag,
        Cow::Owned(_) => return None,
    };
    (!tag.is_empty() && pod.get(&labels.stage) == Some(&labels.gray_stage)).then_some(tag)
}

/// What a pod serves, as far as routing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodStage<'a> {
    /// Labelled `<stage>: <normalStage>`: what [`NORMAL_SUBSET`] selects.
    Normal,
    /// A canary of this tag ([`pod_tag`]).
    Canary(&'a str),
}

/// The stage of a pod: [`PodStage::Canary`] when [`pod_tag`] finds a tag,
/// [`PodStage::Normal`] when it carries `<stage>: <normalStage>` (what the
/// normal subset selects), else `None` (not labelled, or another stage).
pub fn pod_stage<'a>(
    labels: &'a LabelPolicy,
    pod: &'a BTreeMap<String, String>,
) -> Option<PodStage<'a>> {
    if let Some(tag) = pod_tag(labels, pod) {
        return Some(PodStage::Canary(tag));
    }
    (pod.get(&labels.stage) == Some(&labels.normal_stage)).then_some(PodStage::Normal)
}

/// One endpoint of a Service, as its EndpointSlices give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointView<'a> {
    /// The pod behind it (`targetRef` of kind Pod), if any.
    pub pod: Option<&'a str>,
    /// `conditions.ready` (an unset condition counts as ready, as the API
    /// says consumers should read it).
    pub ready: bool,
}

/// What is live for a Service: the pods behind its **ready** endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Live {
    /// At least one of them is a normal pod: the default route may go to
    /// [`NORMAL_SUBSET`].
    pub normal: bool,
    /// The canary tags among them: each gets a subset and a header route.
    pub tags: BTreeSet<String>,
    /// The weights their pods ask for ([`shape::WEIGHT_ANNOTATION`]), by
    /// tag: a share of the requests without a header.
    pub weights: BTreeMap<String, TagWeight>,
}

impl Live {
    /// Live tags `tags`, with a ready normal pod or without.
    pub fn new<S: Into<String>>(normal: bool, tags: impl IntoIterator<Item = S>) -> Self {
        Self {
            normal,
            tags: tags.into_iter().map(Into::into).collect(),
            weights: BTreeMap::new(),
        }
    }

    /// The same, `tag` asking for `weight`.
    pub fn with_weight(mut self, tag: &str, weight: TagWeight) -> Self {
        self.weights.insert(tag.to_owned(), weight);
        self
    }

    /// Where the default route goes: [`DefaultRoute::Normal`] only with a
    /// ready normal pod.
    pub fn default_route(&self) -> DefaultRoute {
        if self.normal {
            DefaultRoute::Normal
        } else {
            DefaultRoute::Service
        }
    }
}

/// What is live for a Service ([`Live`]): the stages of the pods behind
/// its **ready** endpoints, and the weights their canaries ask for.
/// `stage_of` gives a pod's stage ([`pod_stage`] of its labels; `None` for
/// a pod that is neither normal nor a canary, or not known) and its weight
/// annotation. The result does not depend on the order of `endpoints`.
pub fn live<'a, F>(endpoints: impl IntoIterator<Item = EndpointView<'a>>, stage_of: F) -> Live
where
    F: Fn(&str) -> Option<(PodStage<'a>, Option<&'a PodWeight>)>,
{
    let mut live = Live::default();
    let mut tallies: BTreeMap<&str, shape::WeightTally> = BTreeMap::new();
    for (stage, weight) in endpoints
        .into_iter()
        .filter(|e| e.ready)
        .filter_map(|e| stage_of(e.pod?))
    {
        match stage {
            PodStage::Normal => live.normal = true,
            PodStage::Canary(tag) => {
                if !live.tags.contains(tag) {
                    live.tags.insert(tag.to_owned());
                }
                tallies.entry(tag).or_default().add(weight);
            }
        }
    }
    live.weights = tallies
        .into_iter()
        .filter_map(|(tag, t)| Some((tag.to_owned(), t.weight()?)))
        .collect();
    live
}

/// Where the VirtualService's default route (the last one, without a
/// match) sends requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DefaultRoute {
    /// To [`NORMAL_SUBSET`]: a ready normal pod exists.
    Normal,
    /// To the Service host without a subset (every ready endpoint, canaries
    /// included): no ready endpoint is a normal pod.
    Service,
}

impl DefaultRoute {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Service => "service",
        }
    }
}

/// The objects a Service's routes converge to.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// The DestinationRule.
    pub destination_rule: DestinationRule,
    /// The VirtualService.
    pub virtual_service: VirtualService,
}

/// The DestinationRule and VirtualService for `service` when `live` is
/// what is live: [`NORMAL_SUBSET`] always, one subset and one header route
/// per live tag (subset names from [`assign_names`] with nothing written
/// before), the default route last ([`Live::default_route`]). What the
/// controller converges to, and what `routes -f` prints.
pub fn desired(
    service: &ServiceRef,
    header: &str,
    live: &Live,
    labels: &LabelPolicy,
    settings: &RouteSettings,
) -> Desired {
    let names = assign_names(live.tags.iter().map(String::as_str), &BTreeMap::new());
    let default = live.default_route();
    let split = weighted(&names, live, default).unwrap_or_default();
    Desired {
        destination_rule: destination_rule(service, &names, labels),
        virtual_service: virtual_service(service, header, &names, default, &split, settings),
    }
}

/// The weighted part of the default route: for routed tags (tag -> subset)
/// with a weight, their subset and percent. Only while it goes to
/// `normal` (a normal pod is ready). `Err(sum)` when the weights add up to
/// more than 100.
pub(crate) fn weighted(
    routed: &BTreeMap<String, String>,
    live: &Live,
    default: DefaultRoute,
) -> Result<Vec<(String, u8)>, u32> {
    if default != DefaultRoute::Normal {
        return Ok(Vec::new());
    }
    let shares = shape::split(routed.keys().map(String::as_str), &live.weights)?;
    Ok(shares
        .into_iter()
        .map(|(tag, p)| (routed[tag].clone(), p))
        .collect())
}

fn meta(service: &ServiceRef) -> Meta {
    Meta {
        name: service.name.clone(),
        namespace: Some(service.namespace.clone()).filter(|ns| !ns.is_empty()),
        labels: BTreeMap::from([(MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned())]),
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

/// The subset of the normal stage.
fn normal_subset(labels: &LabelPolicy) -> Subset {
    Subset {
        name: NORMAL_SUBSET.into(),
        labels: BTreeMap::from([(labels.stage.clone(), labels.normal_stage.clone())]),
    }
}

/// The subset selector of `tag`.
fn tag_selector(labels: &LabelPolicy, tag: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels.stage.clone(), labels.gray_stage.clone()),
        (labels.canary_tag.clone(), tag.to_owned()),
    ])
}

/// The DestinationRule with [`NORMAL_SUBSET`] and one subset per entry of
/// `subsets` (tag -> subset name), in tag order.
pub(crate) fn destination_rule(
    service: &ServiceRef,
    subsets: &BTreeMap<String, String>,
    labels: &LabelPolicy,
) -> DestinationRule {
    let mut all = Vec::with_capacity(subsets.len() + 1);
    all.push(normal_subset(labels));
    all.extend(subsets.iter().map(|(tag, name)| Subset {
        name: name.clone(),
        labels: tag_selector(labels, tag),
    }));
    DestinationRule {
        metadata: meta(service),
        spec: DestinationRuleSpec {
            host: service.name.clone(),
            subsets: all,
        },
    }
}

/// The VirtualService with one header route per entry of `routes` (tag ->
/// subset name), in tag order, then the default route: named
/// [`NORMAL_SUBSET`] to that subset (split with the subsets of `split`
/// by percent, when there are any), or unnamed to the Service host (a name
/// could collide with a tag route's, and there is no subset to name it
/// after). Every route gets `settings`.
pub(crate) fn virtual_service(
    service: &ServiceRef,
    header: &str,
    routes: &BTreeMap<String, String>,
    default: DefaultRoute,
    split: &[(String, u8)],
    settings: &RouteSettings,
) -> VirtualService {
    let dest = |subset: Option<&str>, weight: Option<u32>| RouteDestination {
        destination: Destination {
            host: service.name.clone(),
            subset: subset.map(str::to_owned),
        },
        weight,
    };
    let to = |subset: Option<&str>| vec![dest(subset, None)];
    let mut http: Vec<HttpRoute> = routes
        .iter()
        .map(|(tag, subset)| HttpRoute {
            name: Some(subset.clone()),
            matches: vec![HttpMatch {
                headers: BTreeMap::from([(
                    header.to_owned(),
                    StringMatch {
                        exact: Some(tag.clone()),
                    },
                )]),
            }],
            route: to(Some(subset)),
            ..HttpRoute::default()
        })
        .collect();
    http.push(match default {
        DefaultRoute::Normal if !split.is_empty() => {
            let canaries: u32 = split.iter().map(|(_, p)| u32::from(*p)).sum();
            let normal = 100 - canaries;
            let mut route = Vec::with_capacity(split.len() + 1);
            if normal > 0 {
                route.push(dest(Some(NORMAL_SUBSET), Some(normal)));
            }
            route.extend(
                split
                    .iter()
                    .map(|(subset, p)| dest(Some(subset), Some(u32::from(*p)))),
            );
            HttpRoute {
                name: Some(NORMAL_SUBSET.into()),
                route,
                ..HttpRoute::default()
            }
        }
        DefaultRoute::Normal => HttpRoute {
            name: Some(NORMAL_SUBSET.into()),
            route: to(Some(NORMAL_SUBSET)),
            ..HttpRoute::default()
        },
        DefaultRoute::Service => HttpRoute {
            name: None,
            route: to(None),
            ..HttpRoute::default()
        },
    });
    for route in &mut http {
        route.timeout.clone_from(&settings.timeout);
        route.retries.clone_from(&settings.retries);
    }
    VirtualService {
        metadata: meta(service),
        spec: VirtualServiceSpec {
            hosts: vec![service.name.clone()],
            http,
        },
    }
}

// === conflicts ===

/// A kind of object the routes controller writes or reads for a routed
/// Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuleKind {
    /// Istio's `DestinationRule`.
    DestinationRule,
    /// Istio's `VirtualService`.
    VirtualService,
    /// The Gateway API's `HTTPRoute`.
    HttpRoute,
    /// The Gateway API's `GRPCRoute` (read only: a foreign one conflicts).
    GrpcRoute,
    /// A version `Service` (Gateway API backend).
    Service,
}

impl RuleKind {
    /// Every kind, in the order of [`RuleKind::index`].
    pub const ALL: [Self; 5] = [
        Self::DestinationRule,
        Self::VirtualService,
        Self::HttpRoute,
        Self::GrpcRoute,
        Self::Service,
    ];

    /// The kind name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DestinationRule => "DestinationRule",
            Self::VirtualService => "VirtualService",
            Self::HttpRoute => "HTTPRoute",
            Self::GrpcRoute => "GRPCRoute",
            Self::Service => "Service",
        }
    }

    /// Its position in [`RuleKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// True for the Gateway API's route kinds, whose "hosts" are the
    /// Services they have as parents.
    pub fn is_gateway_route(self) -> bool {
        matches!(self, Self::HttpRoute | Self::GrpcRoute)
    }
}

impl fmt::Display for RuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An object canary-injector does not own that stands in the way of a
/// Service's routes. While there is one, nothing is written for the Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Conflict {
    /// An object not labelled as ours has the Service's name.
    SameName {
        /// Its kind.
        kind: RuleKind,
    },
    /// An object not labelled as ours has the name of one we would create
    /// (an HTTPRoute `<service>-<port>`, a version Service).
    Named {
        /// Its kind.
        kind: RuleKind,
        /// Its name.
        name: String,
    },
    /// An object not labelled as ours in the namespace names the Service as
    /// a host (Istio does not merge two of them for one host), or as its
    /// parent (a Gateway API route: the mesh would merge its rules with
    /// ours).
    SameHost {
        /// Its kind.
        kind: RuleKind,
        /// Its name.
        name: String,
        /// The host as it names the Service.
        host: String,
    },
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SameName { kind } => write!(
                f,
                "a {kind} of the same name exists and is not managed by canary-injector"
            ),
            Self::Named { kind, name } => write!(
                f,
                "{kind} {name} exists and is not managed by canary-injector"
            ),
            Self::SameHost { kind, name, host } if kind.is_gateway_route() => write!(
                f,
                "{kind} {name} (not managed by canary-injector) has Service {host} as a parent"
            ),
            Self::SameHost { kind, name, host } => write!(
                f,
                "{kind} {name} (not managed by canary-injector) routes host {host}"
            ),
        }
    }
}

/// True when `host`, written in a rule in `namespace`, names the Service
/// `service` of that namespace: the short name, `<service>.<namespace>`,
/// `<service>.<namespace>.svc` or `<service>.<namespace>.svc.<domain>` (any
/// cluster domain). Wildcards are not expanded.
pub fn host_names_service(host: &str, service: &str, namespace: &str) -> bool {
    let Some(rest) = host.strip_prefix(service) else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    let Some(rest) = rest
        .strip_prefix('.')
        .and_then(|r| r.strip_prefix(namespace))
    else {
        return false;
    };
    rest.is_empty() || rest == ".svc" || rest.starts_with(".svc.")
}

/// What [`conflicts`] needs to know of a rule in the Service's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleHead<'a> {
    /// Its kind.
    pub kind: RuleKind,
    /// Its name.
    pub name: &'a str,
    /// Labelled as ours.
    pub managed: bool,
    /// The hosts it names.
    pub hosts: &'a [String],
}

/// The conflicts of `service` among the rules of its namespace (ours
/// included: only those not labelled as ours count). Sorted, so the report
/// is stable.
pub fn conflicts<'a>(
    service: &ServiceRef,
    rules: impl IntoIterator<Item = RuleHead<'a>>,
) -> Vec<Conflict> {
    let mut found = Vec::new();
    for rule in rules.into_iter().filter(|r| !r.managed) {
        if rule.name == service.name {
            found.push(Conflict::SameName { kind: rule.kind });
        }
        found.extend(
            rule.hosts
                .iter()
                .filter(|h| host_names_service(h, &service.name, &service.namespace))
                .map(|h| Conflict::SameHost {
                    kind: rule.kind,
                    name: rule.name.to_owned(),
                    host: h.clone(),
                }),
        );
    }
    found.sort();
    found.dedup();
    found
}

/// The Service of `namespace` that `host` names, if it names one (see
/// [`host_names_service`]).
pub fn host_service<'a>(host: &'a str, namespace: &str) -> Option<&'a str> {
    let service = host.split('.').next()?;
    (!service.is_empty() && host_names_service(host, service, namespace)).then_some(service)
}

#[cfg(test)]
mod tests;
