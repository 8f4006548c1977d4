//! `check`'s routing rules, pure: do the DestinationRules and VirtualServices
//! (or HTTPRoutes and GRPCRoutes) of a namespace, ours or hand-written,
//! route to pods that exist, and has a mesh taken them up?
//!
//! The same rules serve the cluster (a Service's backends are the pods
//! behind its ready endpoints) and manifests (`check -f`: the pods the
//! workloads in the files will create, after the webhook's label rules).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::{Finding, Severity, finding};
use crate::mutate::LabelPolicy;
use crate::routes::gateway::{self, Acceptance, RouteApi, RouteStatus};
use crate::routes::shape;
use crate::routes::{self, RouteSettings, RuleHead, RuleKind, ServiceRef, TagWeight};

/// The namespace label of Istio's ambient mode, and the label (on the
/// namespace or the Service) that puts a waypoint in front of a Service:
/// in ambient mode, L7 routes apply only through a waypoint.
pub const AMBIENT_LABEL: &str = "istio.io/dataplane-mode";
/// See [`AMBIENT_LABEL`].
pub const WAYPOINT_LABEL: &str = "istio.io/use-waypoint";

/// A Service and the pods that back it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Its name.
    pub name: String,
    /// Its annotations (the routes opt-in).
    pub annotations: BTreeMap<String, String>,
    /// Its labels (a version Service's `route-of`; a waypoint).
    pub labels: BTreeMap<String, String>,
    /// The labels of each pod that serves it.
    pub backends: Vec<BTreeMap<String, String>>,
    /// The weights its canaries ask for (their pods' weight annotations),
    /// by tag.
    pub weights: BTreeMap<String, TagWeight>,
}

/// One namespace's Services and rules.
#[derive(Debug, Clone, Copy)]
pub struct RoutingInput<'a> {
    /// The namespace.
    pub namespace: &'a str,
    /// Its Services.
    pub services: &'a [ServiceInfo],
    /// Its DestinationRules and VirtualServices (any version), HTTPRoutes
    /// and GRPCRoutes, as JSON.
    pub rules: &'a [Value],
    /// What a backend is, for messages: `ready pod`, or `pod (from the
    /// workloads in the files)`.
    pub backend: &'a str,
    /// `services` are all the namespace has (a cluster), not only those in
    /// some files: a host that names none of them is a finding.
    pub all_services: bool,
    /// The route API of a Service without `canary-injector.io/route-api`.
    pub default_api: RouteApi,
    /// The namespace's labels (Istio's ambient mode and waypoint).
    pub namespace_labels: &'a BTreeMap<String, String>,
}

/// A rule's kind, name and whether it is ours.
fn head(rule: &Value) -> Option<(RuleKind, &str, bool)> {
    let kind = match rule["kind"].as_str()? {
        "DestinationRule" => RuleKind::DestinationRule,
        "VirtualService" => RuleKind::VirtualService,
        "HTTPRoute" => RuleKind::HttpRoute,
        "GRPCRoute" => RuleKind::GrpcRoute,
        _ => return None,
    };
    let name = rule["metadata"]["name"].as_str()?;
    let managed = rule["metadata"]["labels"][routes::MANAGED_BY_LABEL] == routes::MANAGED_BY_VALUE;
    Some((kind, name, managed))
}

/// The hosts a rule names: `spec.host` (DestinationRule) or `spec.hosts`;
/// for a Gateway API route, the Services among its `parentRefs` (group
/// `""`, kind `Service`).
fn hosts(rule: &Value) -> Vec<String> {
    let spec = &rule["spec"];
    if matches!(rule["kind"].as_str(), Some("HTTPRoute" | "GRPCRoute")) {
        return spec["parentRefs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["kind"] == "Service" && p["group"].as_str().is_some_and(str::is_empty))
            .filter(|p| p["namespace"].is_null() || p["namespace"] == rule["metadata"]["namespace"])
            .filter_map(|p| p["name"].as_str().map(str::to_owned))
            .collect();
    }
    let mut out: Vec<String> = spec["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h.as_str().map(str::to_owned))
        .collect();
    out.extend(spec["host"].as_str().map(str::to_owned));
    out
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect()
}

fn selector_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Every `(host, subset)` an HTTP route of a VirtualService sends to, with
/// the exact header values that select it.
fn destinations(vs: &Value) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for route in vs["spec"]["http"].as_array().into_iter().flatten() {
        let headers: Vec<String> = route["match"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|m| m["headers"].as_object().into_iter().flatten())
            .filter_map(|(_, v)| v["exact"].as_str().map(str::to_owned))
            .collect();
        for dest in route["route"].as_array().into_iter().flatten() {
            let d = &dest["destination"];
            if let (Some(host), Some(subset)) = (d["host"].as_str(), d["subset"].as_str()) {
                out.push((host.to_owned(), subset.to_owned(), headers.clone()));
            }
        }
    }
    out
}

/// Every Service a Gateway API route's rules send to (by name, with a
/// weight above 0), with the exact header values that select it.
fn backends(route: &Value) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for rule in route["spec"]["rules"].as_array().into_iter().flatten() {
        let headers: Vec<String> = rule["matches"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|m| m["headers"].as_array().into_iter().flatten())
            .filter(|h| h["type"].is_null() || h["type"] == "Exact")
            .filter_map(|h| h["value"].as_str().map(str::to_owned))
            .collect();
        for b in rule["backendRefs"].as_array().into_iter().flatten() {
            let service = (b["kind"].is_null() || b["kind"] == "Service")
                && b["group"].as_str().is_none_or(str::is_empty);
            if service
                && b["weight"].as_u64() != Some(0)
                && let Some(name) = b["name"].as_str()
            {
                out.push((name.to_owned(), headers.clone()));
            }
        }
    }
    out
}

/// Checks one namespace's routing and appends the findings.
pub fn check_routing(input: &RoutingInput<'_>, labels: &LabelPolicy, out: &mut Vec<Finding>) {
    use Severity::{Error, Warning};
    let ns = input.namespace;
    let by_name: BTreeMap<&str, &ServiceInfo> = input
        .services
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect();
    // Each Service's rules, by kind.
    let mut rules_of: BTreeMap<(&str, RuleKind), Vec<&Value>> = BTreeMap::new();
    for rule in input.rules {
        let Some((kind, _, _)) = head(rule) else {
            continue;
        };
        let named: BTreeSet<&str> = hosts(rule)
            .iter()
            .filter_map(|h| routes::host_service(h, ns))
            .filter_map(|s| by_name.get_key_value(s).map(|(k, _)| *k))
            .collect();
        for service in named {
            rules_of.entry((service, kind)).or_default().push(rule);
        }
    }
    let place = |kind: RuleKind, rule: &Value| {
        format!(
            "{ns}/{kind}/{}",
            rule["metadata"]["name"].as_str().unwrap_or("<unnamed>")
        )
    };

    // Rules whose host names a Service of this namespace that is not there.
    if input.all_services {
        for rule in input.rules {
            let Some((kind, _, _)) = head(rule) else {
                continue;
            };
            for host in hosts(rule) {
                let Some(missing) =
                    routes::host_service(&host, ns).filter(|s| !by_name.contains_key(s))
                else {
                    continue;
                };
                let subsets: Vec<&str> = rule["spec"]["subsets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["name"].as_str())
                    .collect();
                let what = match kind {
                    RuleKind::DestinationRule if !subsets.is_empty() => {
                        format!("its subsets {} select nothing", subsets.join(", "))
                    }
                    RuleKind::DestinationRule => "it applies to nothing".to_owned(),
                    k if k.is_gateway_route() => {
                        "it is the route's parent: the route applies to nothing".to_owned()
                    }
                    _ => "its routes apply to nothing".to_owned(),
                };
                out.push(finding(
                    Warning,
                    "host-not-found",
                    place(kind, rule),
                    format!("host {host} names Service {missing}, which namespace {ns} does not have: {what}"),
                    format!(
                        "create Service {missing}, or fix the host (a Service of another namespace is <name>.<namespace>), or delete the {kind}"
                    ),
                ));
            }
        }
    }

    for service in input.services {
        // Our version Services are the routes' backends, not routed.
        if service.labels.contains_key(gateway::ROUTE_OF_LABEL) {
            continue;
        }
        let api = gateway::route_api(Some(&service.annotations))
            .ok()
            .flatten()
            .unwrap_or(input.default_api);
        let gateway_routes: Vec<&Value> = [RuleKind::HttpRoute, RuleKind::GrpcRoute]
            .iter()
            .flat_map(|k| {
                rules_of
                    .get(&(service.name.as_str(), *k))
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        check_gateway_routes(input, &by_name, service, &gateway_routes, out);
        let drs = rules_of
            .get(&(service.name.as_str(), RuleKind::DestinationRule))
            .cloned()
            .unwrap_or_default();
        let vss = rules_of
            .get(&(service.name.as_str(), RuleKind::VirtualService))
            .cloned()
            .unwrap_or_default();
        let routed: Vec<(String, String, Vec<String>)> = vss
            .iter()
            .flat_map(|vs| destinations(vs))
            .filter(|(host, _, _)| routes::host_names_service(host, &service.name, ns))
            .collect();

        for (kind, found) in [
            (RuleKind::DestinationRule, &drs),
            (RuleKind::VirtualService, &vss),
        ] {
            if found.len() > 1 {
                let names: Vec<&str> = found
                    .iter()
                    .filter_map(|r| r["metadata"]["name"].as_str())
                    .collect();
                out.push(finding(
                    Warning,
                    "duplicate-rules",
                    format!("{ns}/Service/{}", service.name),
                    format!(
                        "{} {kind}s name this Service ({}): Istio applies one of them, not both",
                        found.len(),
                        names.join(", ")
                    ),
                    format!("merge them into one {kind}"),
                ));
            }
        }

        // Subsets that select nothing.
        let mut defined = BTreeSet::new();
        for dr in &drs {
            for subset in dr["spec"]["subsets"].as_array().into_iter().flatten() {
                let Some(name) = subset["name"].as_str() else {
                    continue;
                };
                defined.insert(name.to_owned());
                let want = string_map(&subset["labels"]);
                let selects = service
                    .backends
                    .iter()
                    .any(|b| want.iter().all(|(k, v)| b.get(k) == Some(v)));
                let is_routed = routed.iter().any(|(_, s, _)| s == name);
                // Ours and unrouted: a canary that went away, kept for the
                // removal grace period on purpose.
                let in_grace = head(dr).is_some_and(|(_, _, managed)| managed) && !is_routed;
                if !selects && !in_grace {
                    out.push(finding(
                        if is_routed { Error } else { Warning },
                        "subset-selects-no-pod",
                        place(RuleKind::DestinationRule, dr),
                        format!(
                            "Service {} has no {} that subset {name} ({}) selects{}",
                            service.name,
                            input.backend,
                            selector_text(&want),
                            if is_routed { ": requests routed to it get 503 no healthy upstream" } else { "" }
                        ),
                        "deploy pods with those labels, fix the subset's labels, or remove the subset and its routes",
                    ));
                }
            }
        }
        // Routes to subsets no DestinationRule defines.
        for vs in &vss {
            for (host, subset, _) in destinations(vs) {
                if routes::host_names_service(&host, &service.name, ns)
                    && !defined.contains(&subset)
                {
                    out.push(finding(
                        Error,
                        "route-to-missing-subset",
                        place(RuleKind::VirtualService, vs),
                        format!("a route sends {host} to subset {subset}, which no DestinationRule of Service {} defines: 503s", service.name),
                        format!("add subset {subset} to the Service's DestinationRule, or route elsewhere"),
                    ));
                }
            }
        }
        // Live canaries nobody routes to.
        let live: BTreeSet<&str> = service
            .backends
            .iter()
            .filter_map(|b| routes::pod_tag(labels, b))
            .collect();
        let gateway_routed: Vec<(String, Vec<String>)> =
            gateway_routes.iter().flat_map(|r| backends(r)).collect();
        let header_routed: BTreeSet<&str> = routed
            .iter()
            .flat_map(|(_, _, headers)| headers.iter().map(String::as_str))
            .chain(
                gateway_routed
                    .iter()
                    .flat_map(|(_, h)| h.iter().map(String::as_str)),
            )
            .collect();
        for tag in live.difference(&header_routed) {
            out.push(finding(
                Warning,
                "live-tag-without-route",
                format!("{ns}/Service/{}", service.name),
                format!(
                    "canary {tag} has a {} behind Service {} but no header route reaches it{}",
                    input.backend,
                    service.name,
                    if vss.is_empty() && gateway_routes.is_empty() { " (without a route it gets a share of all traffic)" } else { "" }
                ),
                format!(
                    "annotate the Service {}: \"true\" to have the routes generated, or add a header route for {tag}",
                    routes::ROUTES_ANNOTATION
                ),
            ));
        }
        // A routed Service without a normal pod: requests without the
        // header go to every pod, canaries included (what `routes -f`
        // warns about, and the controller's RouteNoNormalPod).
        let normal = labels.normal_stage.as_str();
        if routes::wants_routes(Some(&service.annotations))
            && !service.backends.is_empty()
            && !service
                .backends
                .iter()
                .any(|b| b.get(&labels.stage).map(String::as_str) == Some(normal))
        {
            out.push(finding(
                Warning,
                "no-normal-pod",
                format!("{ns}/Service/{}", service.name),
                format!(
                    "Service {} asks for routes but no {} of it is labelled {}={normal}: requests \
                     without a canary header go to all of them (canaries included) instead of \
                     subset {}",
                    service.name,
                    input.backend,
                    labels.stage,
                    routes::NORMAL_SUBSET
                ),
                format!(
                    "deploy the normal release, or label its pods {}={normal} (the backfill does \
                     for pods created before the namespace opted in)",
                    labels.stage
                ),
            ));
        }
        // A routed Service's weights and settings, as the controller reads
        // them.
        if routes::wants_routes(Some(&service.annotations)) {
            let at = format!("{ns}/Service/{}", service.name);
            for (tag, w) in &service.weights {
                if let TagWeight::Invalid(problem) = w {
                    out.push(finding(
                        Warning,
                        "route-weight-invalid",
                        at.clone(),
                        format!("canary {tag}: {problem}; it counts as 0"),
                        format!(
                            "set {} to one integer from 0 to 100 in the canary's pod template",
                            shape::WEIGHT_ANNOTATION
                        ),
                    ));
                }
            }
            let live: Vec<&str> = service.weights.keys().map(String::as_str).collect();
            if let Err(sum) = shape::split(live, &service.weights) {
                let each: Vec<String> = service
                    .weights
                    .iter()
                    .filter(|(_, w)| w.percent() > 0)
                    .map(|(t, w)| format!("{t} {}", w.percent()))
                    .collect();
                out.push(finding(
                    Warning,
                    "route-weights-invalid",
                    at.clone(),
                    format!(
                        "the weights of its canaries add up to {sum} ({}), more than 100: the \
                         routes controller keeps the split it had",
                        each.join(", ")
                    ),
                    format!("lower the {} annotations", shape::WEIGHT_ANNOTATION),
                ));
            }
            let (_, invalid) =
                shape::route_settings(Some(&service.annotations), &RouteSettings::default());
            for bad in invalid {
                out.push(finding(
                    Warning,
                    "route-settings-invalid",
                    at.clone(),
                    format!("{bad}; the routes are written without it"),
                    format!(
                        "fix the annotation {} (see docs/routing.md \"Shaping routes\")",
                        bad.annotation
                    ),
                ));
            }
        }
        // Services that ask for routes but have hand-written rules in the way.
        if routes::wants_routes(Some(&service.annotations)) {
            // The kinds of the Service's route API: an HTTPRoute is no
            // conflict for a Service routed by Istio's API, nor a
            // VirtualService for one on the Gateway API.
            let heads: Vec<(RuleKind, &str, bool, Vec<String>)> = input
                .rules
                .iter()
                .filter_map(|r| head(r).map(|(k, n, m)| (k, n, m, hosts(r))))
                .filter(|(k, ..)| k.is_gateway_route() == (api == RouteApi::GatewayApi))
                .collect();
            let conflicts = routes::conflicts(
                &ServiceRef {
                    namespace: ns.to_owned(),
                    name: service.name.clone(),
                    uid: None,
                },
                heads.iter().map(|(kind, name, managed, hosts)| RuleHead {
                    kind: *kind,
                    name,
                    managed: *managed,
                    hosts,
                }),
            );
            for conflict in conflicts {
                out.push(finding(
                    Error,
                    "routes-conflict",
                    format!("{ns}/Service/{}", service.name),
                    format!("{conflict}: the routes controller writes nothing for this Service"),
                    "delete or rename the hand-written object, or remove the canary-injector.io/routes annotation",
                ));
            }
        }
    }
}

/// A Service's Gateway API routes: backends without pods, what the mesh
/// says of our routes, and ambient mode without a waypoint.
fn check_gateway_routes(
    input: &RoutingInput<'_>,
    by_name: &BTreeMap<&str, &ServiceInfo>,
    service: &ServiceInfo,
    found: &[&Value],
    out: &mut Vec<Finding>,
) {
    use Severity::{Error, Warning};
    let ns = input.namespace;
    let at = |rule: &Value| {
        format!(
            "{ns}/{}/{}",
            rule["kind"].as_str().unwrap_or_default(),
            rule["metadata"]["name"].as_str().unwrap_or("<unnamed>")
        )
    };
    for route in found {
        let mut seen = BTreeSet::new();
        for (backend, _) in backends(route) {
            if !seen.insert(backend.clone()) {
                continue;
            }
            match by_name.get(backend.as_str()) {
                None if input.all_services => out.push(finding(
                    Error,
                    "backend-not-found",
                    at(route),
                    format!(
                        "a rule sends Service {}'s requests to Service {backend}, which namespace {ns} does not have: they fail (500)",
                        service.name
                    ),
                    format!("create Service {backend}, or send the rule elsewhere"),
                )),
                Some(b) if b.backends.is_empty() => out.push(finding(
                    Error,
                    "backend-selects-no-pod",
                    at(route),
                    format!(
                        "a rule sends Service {}'s requests to Service {backend}, which has no {}: they fail (503)",
                        service.name, input.backend
                    ),
                    "deploy pods the Service selects, or send the rule elsewhere",
                )),
                _ => {}
            }
        }
        let ours = head(route).is_some_and(|(_, _, managed)| managed);
        if ours && input.all_services {
            let why = match RouteStatus::from_json(route.get("status")).acceptance() {
                Acceptance::Accepted => None,
                Acceptance::NoImplementation => Some(
                    "no Gateway API implementation has written a status for it: without a mesh that implements GAMMA (Service parents) the route does nothing"
                        .to_owned(),
                ),
                Acceptance::Rejected(said) => Some(format!("not accepted ({said})")),
                Acceptance::RefsNotResolved(said) => {
                    Some(format!("a backend does not resolve ({said})"))
                }
            };
            if let Some(why) = why {
                out.push(finding(
                    Warning,
                    "route-not-accepted",
                    at(route),
                    format!("the route of Service {}: {why}", service.name),
                    "install a mesh that routes HTTPRoutes with Service parents (Istio ambient with a waypoint, Linkerd, Cilium, Kuma), or annotate the Service canary-injector.io/route-api: istio",
                ));
            }
        }
    }
    let ambient = input
        .namespace_labels
        .get(AMBIENT_LABEL)
        .map(String::as_str)
        == Some("ambient");
    let waypoint = input.namespace_labels.contains_key(WAYPOINT_LABEL)
        || service.labels.contains_key(WAYPOINT_LABEL);
    if ambient && !waypoint && !found.is_empty() {
        out.push(finding(
            Warning,
            "ambient-without-waypoint",
            format!("{ns}/Service/{}", service.name),
            format!(
                "namespace {ns} is in Istio's ambient mode ({AMBIENT_LABEL}=ambient) but neither it nor Service {} has {WAYPOINT_LABEL}: ztunnel does not apply HTTPRoutes, so the canary routes do nothing",
                service.name
            ),
            format!(
                "deploy a waypoint (istioctl waypoint apply -n {ns} --enroll-namespace), or label the namespace or the Service {WAYPOINT_LABEL}=<waypoint>"
            ),
        ));
    }
}
