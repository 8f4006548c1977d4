//! The Gateway API backend's pure part: objects, names, status, and the
//! planner driven over a modelled cluster (Services get a ready endpoint
//! one step after they are created, as the endpoint controller gives them),
//! by hand and by proptests over random histories.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::routes::objects::observe_json;
use crate::routes::{Live, TagWeight, shape::Retries};

const UID: &str = "6b1f4c3e-0000-4000-8000-000000000001";
const GRACE: Duration = Duration::from_secs(60);
const HEADER: &str = "x-canary-tag";

fn service() -> ServiceRef {
    ServiceRef {
        namespace: "shop".into(),
        name: "checkout".into(),
        uid: Some(UID.into()),
    }
}

fn labels() -> LabelPolicy {
    LabelPolicy::default()
}

fn shape(ports: &[i32]) -> ServiceShape {
    ServiceShape::from_spec(&json!({
        "selector": {"app": "checkout"},
        "ports": ports.iter().map(|p| json!({"name": format!("p{p}"), "port": p, "targetPort": 8080})).collect::<Vec<_>>(),
    }))
    .unwrap()
}

fn t0() -> Timestamp {
    "2026-12-06T10:00:00Z".parse().unwrap()
}

// === objects ===

#[test]
fn desired_objects_for_two_canaries_on_one_port() {
    let live = Live::new(true, ["feature-login", "Feature_X"]);
    let settings = RouteSettings {
        timeout: Some("1.5s".into()),
        retries: None,
    };
    let d = desired(
        &service(),
        &shape(&[80]),
        HEADER,
        &live,
        &labels(),
        &settings,
    );
    let names: Vec<&str> = d
        .services
        .iter()
        .map(|s| s.metadata.name.as_str())
        .collect();
    let hashed = crate::routes::subset_name("Feature_X");
    assert_eq!(
        names,
        [
            "checkout--normal".to_owned(),
            format!("checkout--{hashed}"),
            "checkout--feature-login".to_owned()
        ]
    );
    assert_eq!(
        d.services[0].to_json(),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": "checkout--normal", "namespace": "shop",
                "labels": {"app.kubernetes.io/managed-by": "canary-injector",
                           "canary-injector.io/route-of": "checkout"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service",
                                     "name": "checkout", "uid": UID}],
            },
            "spec": {
                "selector": {"app": "checkout", "stage": "normal"},
                "ports": [{"name": "p80", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            },
        })
    );
    assert_eq!(
        d.services[2].spec.selector,
        BTreeMap::from([
            ("app".into(), "checkout".into()),
            ("stage".into(), "gray".into()),
            ("canarytag".into(), "feature-login".into()),
        ])
    );
    assert_eq!(
        d.services[2]
            .metadata
            .labels
            .get(TAG_LABEL)
            .map(String::as_str),
        Some("feature-login")
    );
    assert_eq!(d.routes.len(), 1);
    let rule = |tag: &str, to: &str| {
        json!({
            "matches": [{"path": {"type": "PathPrefix", "value": "/"},
                         "headers": [{"type": "Exact", "name": HEADER, "value": tag}]}],
            "backendRefs": [{"group": "", "kind": "Service", "name": to, "port": 80, "weight": 1}],
            "timeouts": {"request": "1s500ms"},
        })
    };
    assert_eq!(
        d.routes[0].to_json(),
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {
                "name": "checkout", "namespace": "shop",
                "labels": {"app.kubernetes.io/managed-by": "canary-injector",
                           "canary-injector.io/route-of": "checkout"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service",
                                     "name": "checkout", "uid": UID}],
            },
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "checkout"}],
                "rules": [
                    rule("Feature_X", &format!("checkout--{hashed}")),
                    rule("feature-login", "checkout--feature-login"),
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                     "backendRefs": [{"group": "", "kind": "Service", "name": "checkout--normal",
                                      "port": 80, "weight": 1}],
                     "timeouts": {"request": "1s500ms"}},
                ],
            },
        })
    );
}

#[test]
fn every_port_gets_its_own_route_to_the_same_port() {
    let live = Live::new(true, ["v2"]).with_weight("v2", TagWeight::Percent(10));
    let d = desired(
        &service(),
        &shape(&[9090, 80]),
        HEADER,
        &live,
        &labels(),
        &RouteSettings::default(),
    );
    let names: Vec<&str> = d.routes.iter().map(|r| r.metadata.name.as_str()).collect();
    assert_eq!(names, ["checkout-80", "checkout-9090"]);
    for (route, port) in d.routes.iter().zip([80, 9090]) {
        assert_eq!(route.spec.parent_refs[0].port, Some(port));
        for rule in &route.spec.rules {
            assert!(rule.backend_refs.iter().all(|b| b.port == Some(port)));
            assert!(rule.timeouts.is_none());
        }
        let default = route.spec.rules.last().unwrap();
        let split: Vec<(&str, u32)> = default
            .backend_refs
            .iter()
            .map(|b| (b.name.as_str(), b.weight.unwrap()))
            .collect();
        assert_eq!(split, [("checkout--normal", 90), ("checkout--v2", 10)]);
    }
    // Both version Services carry both ports, in port order.
    let ports: Vec<i32> = d.services[0].spec.ports.iter().map(|p| p.port).collect();
    assert_eq!(ports, [80, 9090]);
}

#[test]
fn without_a_ready_normal_pod_the_default_rule_goes_to_the_service_itself() {
    let d = desired(
        &service(),
        &shape(&[80]),
        HEADER,
        &Live::new(false, ["v2"]).with_weight("v2", TagWeight::Percent(30)),
        &labels(),
        &RouteSettings::default(),
    );
    let default = d.routes[0].spec.rules.last().unwrap();
    assert_eq!(default.backend_refs.len(), 1);
    assert_eq!(default.backend_refs[0].name, "checkout");
    assert_eq!(default.backend_refs[0].weight, Some(1));
    // The normal version Service exists all the same.
    assert_eq!(d.services[0].metadata.name, "checkout--normal");
}

#[test]
fn the_shape_of_a_service_is_its_selector_and_tcp_ports() {
    let s = ServiceShape::from_spec(&json!({
        "selector": {"app": "web"},
        "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "http", "port": 80, "targetPort": "http", "appProtocol": "http"},
            {"name": "grpc", "port": 81, "protocol": "TCP"},
        ],
    }))
    .unwrap();
    assert_eq!(
        s.ports,
        [
            ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(TargetPort::Name("http".into())),
                protocol: Some("TCP".into()),
                app_protocol: Some("http".into()),
            },
            ServicePort {
                name: Some("grpc".into()),
                port: 81,
                target_port: Some(TargetPort::Number(81)),
                protocol: Some("TCP".into()),
                app_protocol: None,
            },
        ]
    );
    assert_eq!(
        ServiceShape::from_spec(&json!({"ports": [{"port": 80}]})),
        Err(ShapeProblem::NoSelector)
    );
    assert_eq!(
        ServiceShape::from_spec(&json!({"type": "ExternalName", "externalName": "x.example"})),
        Err(ShapeProblem::ExternalName)
    );
    assert_eq!(
        ServiceShape::from_spec(
            &json!({"selector": {"a": "b"}, "ports": [{"port": 53, "protocol": "UDP"}]})
        ),
        Err(ShapeProblem::NoTcpPort)
    );
}

#[test]
fn the_route_api_annotation_reads_two_values() {
    let a = |v: &str| BTreeMap::from([(ROUTE_API_ANNOTATION.to_owned(), v.to_owned())]);
    assert_eq!(route_api(None), Ok(None));
    assert_eq!(route_api(Some(&a("istio"))), Ok(Some(RouteApi::Istio)));
    assert_eq!(
        route_api(Some(&a("gateway-api"))),
        Ok(Some(RouteApi::GatewayApi))
    );
    let err = route_api(Some(&a("Gateway"))).unwrap_err();
    assert!(
        err.to_string().contains("use istio or gateway-api"),
        "{err}"
    );
    assert_eq!(ApiChoice::Auto.resolve(true, true), Some(RouteApi::Istio));
    assert_eq!(
        ApiChoice::Auto.resolve(false, true),
        Some(RouteApi::GatewayApi)
    );
    assert_eq!(ApiChoice::Auto.resolve(false, false), None);
    assert_eq!(ApiChoice::Istio.resolve(false, true), Some(RouteApi::Istio));
}

#[test]
fn durations_in_the_gateway_api_form() {
    for (istio, gateway) in [
        ("5s", "5s"),
        ("1.5s", "1s500ms"),
        ("0.25s", "250ms"),
        ("90s", "1m30s"),
        ("3600s", "1h"),
        ("3661.001s", "1h1m1s1ms"),
        ("0.0001s", "0s"),
    ] {
        assert_eq!(gateway_duration(istio).as_deref(), Some(gateway), "{istio}");
    }
    for bad in ["", "5", "s", "x.5s", "1.5ms"] {
        assert_eq!(gateway_duration(bad), None, "{bad:?}");
    }
}

#[test]
fn retries_are_reported_not_written() {
    let settings = RouteSettings {
        timeout: None,
        retries: Some(Retries {
            attempts: 3,
            per_try_timeout: Some("2s".into()),
        }),
    };
    let problem = unsupported(&settings).unwrap();
    assert!(problem.to_string().contains("\"3/2s\""), "{problem}");
    assert!(
        problem.to_string().contains("standard channel"),
        "{problem}"
    );
    assert_eq!(unsupported(&RouteSettings::default()), None);
}

#[test]
fn status_says_who_accepted_the_route() {
    let status = |parents: Value| RouteStatus::from_json(Some(&json!({"parents": parents})));
    assert_eq!(
        RouteStatus::from_json(None).acceptance(),
        Acceptance::NoImplementation
    );
    assert_eq!(status(json!([])).acceptance(), Acceptance::NoImplementation);
    let accepted = status(json!([{
        "parentRef": {"group": "", "kind": "Service", "name": "checkout"},
        "controllerName": "istio.io/gateway-controller",
        "conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted", "message": ""},
            {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs"},
        ],
    }]));
    assert_eq!(accepted.acceptance(), Acceptance::Accepted);
    let rejected = status(json!([{
        "controllerName": "linkerd.io/gateway-controller",
        "conditions": [{"type": "Accepted", "status": "False", "reason": "NotAllowedByParent",
                        "message": "port 8080 is not a port of the Service"}],
    }]));
    assert_eq!(
        rejected.acceptance(),
        Acceptance::Rejected(
            "linkerd.io/gateway-controller: NotAllowedByParent (port 8080 is not a port of the \
             Service)"
                .into()
        )
    );
    let unresolved = status(json!([{
        "controllerName": "istio.io/gateway-controller",
        "conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted"},
            {"type": "ResolvedRefs", "status": "False", "reason": "BackendNotFound",
             "message": "backend(checkout--v2) not found"},
        ],
    }]));
    assert_eq!(
        unresolved.acceptance(),
        Acceptance::RefsNotResolved(
            "istio.io/gateway-controller: BackendNotFound (backend(checkout--v2) not found)".into()
        )
    );
}

#[test]
fn a_foreign_route_with_the_service_as_parent_conflicts() {
    let route = |name: &str, managed: bool, parents: Value| -> Observed<HttpRouteSpec> {
        let mut labels = json!({});
        if managed {
            labels = json!({MANAGED_BY_LABEL: MANAGED_BY_VALUE, ROUTE_OF_LABEL: "checkout"});
        }
        observe_json(&json!({
            "metadata": {"name": name, "namespace": "shop", "labels": labels},
            "spec": {"parentRefs": parents},
        }))
    };
    let svc = |name: &str| json!([{"group": "", "kind": "Service", "name": name}]);
    let rules = [
        route("mine", true, svc("checkout")),
        route("other", false, svc("cart")),
        route("by-hand", false, svc("checkout")),
        // A Gateway parent is not a Service parent.
        route("ingress", false, json!([{"name": "checkout"}])),
        // Another namespace's Service of the same name.
        route(
            "elsewhere",
            false,
            json!([{"group": "", "kind": "Service", "name": "checkout", "namespace": "pay"}]),
        ),
        route(
            "explicit",
            false,
            json!([{"group": "core", "kind": "Service", "name": "checkout", "namespace": "shop"}]),
        ),
    ];
    let found = crate::routes::conflicts(&service(), rules.iter().map(Observed::head));
    let text: Vec<String> = found.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "HTTPRoute by-hand (not managed by canary-injector) has Service checkout as a parent",
            "HTTPRoute explicit (not managed by canary-injector) has Service checkout.shop as a \
             parent",
        ]
    );
}

// === names ===

#[test]
fn version_names_are_plain_when_they_fit_and_hashed_when_not() {
    assert_eq!(version_name("checkout", "normal", 0), "checkout--normal");
    let long = "s".repeat(60);
    let name = version_name(&long, "normal", 0);
    assert_eq!(name.len(), 63);
    assert!(name.starts_with(&"s".repeat(53)), "{name}");
    assert!(name[53..].starts_with("--"), "{name}");
    assert!(is_service_name(&name));
    assert_ne!(version_name(&long, "normal", 1), name);
    // Stable.
    assert_eq!(version_name(&long, "normal", 0), name);
}

#[test]
fn names_step_around_other_services_and_keep_what_exists() {
    let versions = [None, Some("v2".to_owned())];
    let taken = BTreeSet::from(["checkout--v2".to_owned()]);
    let names = version_names("checkout", &versions, &BTreeMap::new(), &taken);
    assert_eq!(names[&None], "checkout--normal");
    let v2 = &names[&Some("v2".into())];
    assert_ne!(v2, "checkout--v2");
    assert!(v2.starts_with("checkout--v2--"), "{v2}");
    // An existing name is kept.
    let existing = BTreeMap::from([(Some("v2".to_owned()), "checkout--old".to_owned())]);
    let names = version_names("checkout", &versions, &existing, &BTreeSet::new());
    assert_eq!(names[&Some("v2".into())], "checkout--old");
    // The tag `normal` is not the normal version.
    let versions = [None, Some("normal".to_owned())];
    let names = version_names("checkout", &versions, &BTreeMap::new(), &BTreeSet::new());
    assert_ne!(names[&None], names[&Some("normal".into())]);
}

// === the planner over a modelled cluster ===

/// The cluster as the planner sees it: every write applied at once with a
/// new resourceVersion; a version Service has a ready endpoint from the
/// step after its creation while its version has ready pods.
struct Cluster {
    shape: ServiceShape,
    routes: BTreeMap<String, Observed<HttpRouteSpec>>,
    services: BTreeMap<String, ObservedService>,
    /// Services old enough to have endpoints.
    endpoints: BTreeSet<String>,
    due: BTreeMap<String, Timestamp>,
    version: u64,
    /// When each Service was deleted, with its tag.
    deleted: Vec<(Option<String>, Timestamp)>,
}

impl Cluster {
    fn new(ports: &[i32]) -> Self {
        Self {
            shape: shape(ports),
            routes: BTreeMap::new(),
            services: BTreeMap::new(),
            endpoints: BTreeSet::new(),
            due: BTreeMap::new(),
            version: 0,
            deleted: Vec::new(),
        }
    }

    fn ready(&self, live: &Live) -> BTreeSet<String> {
        self.services
            .values()
            .filter(|s| self.endpoints.contains(&s.name))
            .filter(|s| match &s.tag {
                None => live.normal,
                Some(t) => live.tags.contains(t),
            })
            .map(|s| s.name.clone())
            .collect()
    }

    fn plan(&self, live: &Live, now: Timestamp) -> GatewayPlan {
        let routes: Vec<_> = self.routes.values().cloned().collect();
        let services: Vec<_> = self.services.values().cloned().collect();
        plan(&GatewayInput {
            service: &service(),
            shape: &self.shape,
            header: HEADER,
            labels: &labels(),
            live,
            routes: &routes,
            services: &services,
            ready: &self.ready(live),
            taken: &BTreeSet::new(),
            due: &self.due,
            now,
            grace: GRACE,
            settings: &RouteSettings::default(),
        })
    }

    fn stamp(&mut self, mut json: Value) -> Value {
        self.version += 1;
        json["metadata"]["resourceVersion"] = json!(self.version.to_string());
        json["metadata"]["uid"] = json!(format!("uid-{}", self.version));
        json
    }

    /// Plans once and applies the write; the step, if any.
    fn step(&mut self, live: &Live, now: Timestamp) -> Option<GatewayStep> {
        // Endpoints catch up with the Services created before this step.
        self.endpoints = self.services.keys().cloned().collect();
        let plan = self.plan(live, now);
        self.due = plan.due;
        let step = plan.step?;
        match &step {
            GatewayStep::Route(w) => {
                let name = &w.object.metadata.name;
                assert_eq!(w.create, !self.routes.contains_key(name));
                let json = self.stamp(w.object.to_json());
                self.routes.insert(name.clone(), observe_json(&json));
            }
            GatewayStep::Service(w) => {
                let name = &w.object.metadata.name;
                assert_eq!(w.create, !self.services.contains_key(name));
                let json = self.stamp(w.object.to_json());
                self.services
                    .insert(name.clone(), ObservedService::from_json(&json));
            }
            GatewayStep::Delete(d) => match d.kind {
                RuleKind::HttpRoute => {
                    assert!(self.routes.remove(&d.name).is_some());
                }
                RuleKind::Service => {
                    let gone = self.services.remove(&d.name).expect("deletes what exists");
                    self.deleted.push((gone.tag, now));
                }
                other => panic!("deletes a {other}"),
            },
        }
        self.check();
        Some(step)
    }

    fn converge(&mut self, live: &Live, now: Timestamp) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..40 {
            match self.step(live, now) {
                None => return out,
                Some(GatewayStep::Route(w)) => {
                    out.push(format!("route {}", w.object.metadata.name))
                }
                Some(GatewayStep::Service(w)) => out.push(format!(
                    "{} service {}",
                    if w.create { "create" } else { "apply" },
                    w.object.metadata.name
                )),
                Some(GatewayStep::Delete(d)) => out.push(format!("delete {} {}", d.kind, d.name)),
            }
        }
        panic!("no convergence: {out:?}");
    }

    /// After every write: every backend a route names is the Service itself
    /// or a version Service of ours that exists with that port; the
    /// default rule is last and matches every request; names are valid
    /// Service names and unique.
    fn check(&self) {
        for route in self.routes.values() {
            let spec = route.spec.as_ref().unwrap();
            let (last, tagged) = spec.rules.split_last().unwrap();
            assert!(last.matches.iter().all(|m| m.headers.is_empty()));
            assert!(tagged.iter().all(|r| r.matches[0].headers.len() == 1));
            assert!(tagged.iter().all(|r| r.backend_refs.len() == 1));
            for rule in &spec.rules {
                for b in &rule.backend_refs {
                    let port = b.port.unwrap();
                    if b.name == "checkout" {
                        continue;
                    }
                    let s = self
                        .services
                        .get(&b.name)
                        .unwrap_or_else(|| panic!("route to missing Service {}", b.name));
                    assert!(s.is_version_of("checkout"));
                    assert!(s.spec.ports.iter().any(|p| p.port == port));
                }
            }
        }
        for name in self.services.keys() {
            assert!(is_service_name(name), "{name}");
        }
    }

    /// Tag -> backend of the header rules of every route (they agree).
    fn rules(&self) -> BTreeMap<String, String> {
        let mut all: Vec<BTreeMap<String, String>> = self
            .routes
            .values()
            .map(|r| header_rules(r.spec.as_ref().unwrap(), HEADER))
            .collect();
        all.dedup();
        assert!(all.len() <= 1, "routes disagree: {all:?}");
        all.pop().unwrap_or_default()
    }

    fn tags(&self) -> BTreeSet<String> {
        self.services
            .values()
            .filter_map(|s| s.tag.clone())
            .collect()
    }
}

#[test]
fn a_new_tag_gets_its_service_and_its_rule_only_once_the_service_has_endpoints() {
    let mut c = Cluster::new(&[80]);
    let now = t0();
    let live = Live::new(true, ["v2"]);
    // Nothing ready yet: the route goes to the Service itself, then the
    // version Services are created; as each gets endpoints (a step after
    // its creation here) the route names it, route writes first.
    let steps = c.converge(&live, now);
    assert_eq!(
        steps,
        [
            "route checkout",
            "create service checkout--normal",
            "route checkout",
            "create service checkout--v2",
            "route checkout",
        ]
    );
    assert_eq!(
        c.rules(),
        BTreeMap::from([("v2".into(), "checkout--v2".into())])
    );
    let spec = c.routes["checkout"].spec.clone().unwrap();
    assert_eq!(default_of(&spec, "checkout"), Some(DefaultRoute::Normal));
    assert_eq!(c.plan(&live, now).step, None, "steady");
}

#[test]
fn a_gone_tag_loses_its_rule_at_once_and_its_service_after_the_grace() {
    let mut c = Cluster::new(&[80]);
    let now = t0();
    c.converge(&Live::new(true, ["v2", "v3"]), now);
    let live = Live::new(true, ["v3"]);
    let steps = c.converge(&live, now);
    // The rule goes; the Service is marked with the time it may go.
    assert_eq!(steps, ["route checkout", "apply service checkout--v2"]);
    let due = c.services["checkout--v2"].removal_due.clone().unwrap();
    assert_eq!(due, (now + GRACE).to_string());
    let plan = c.plan(&live, now);
    assert_eq!(plan.step, None);
    assert_eq!(plan.wake_at, Some(now + GRACE));
    // Just before: nothing. At the time: the Service goes.
    assert!(
        c.converge(&live, now + GRACE - Duration::from_secs(1))
            .is_empty()
    );
    let steps = c.converge(&live, now + GRACE);
    assert_eq!(steps, ["delete Service checkout--v2"]);
    // A restart keeps the time: the annotation says it, not memory.
    let mut c = Cluster::new(&[80]);
    c.converge(&Live::new(true, ["v2"]), now);
    c.converge(&Live::new(true, Vec::<String>::new()), now);
    c.due.clear();
    assert!(
        c.converge(&Live::new(true, Vec::<String>::new()), now + GRACE / 2)
            .is_empty()
    );
}

#[test]
fn a_tag_back_within_the_grace_keeps_its_service_and_loses_the_mark() {
    let mut c = Cluster::new(&[80]);
    let now = t0();
    c.converge(&Live::new(true, ["v2"]), now);
    c.converge(&Live::new(true, Vec::<String>::new()), now);
    assert!(c.services["checkout--v2"].removal_due.is_some());
    let steps = c.converge(&Live::new(true, ["v2"]), now + GRACE / 2);
    assert_eq!(steps, ["route checkout", "apply service checkout--v2"]);
    assert_eq!(c.services["checkout--v2"].removal_due, None);
}

#[test]
fn the_default_rule_goes_to_normal_only_while_a_normal_pod_is_ready() {
    let mut c = Cluster::new(&[80]);
    let now = t0();
    c.converge(&Live::new(false, ["v2"]), now);
    let spec = |c: &Cluster| c.routes["checkout"].spec.clone().unwrap();
    assert_eq!(
        default_of(&spec(&c), "checkout"),
        Some(DefaultRoute::Service)
    );
    let w = match c.step(&Live::new(true, ["v2"]), now) {
        Some(GatewayStep::Route(w)) => w,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        w.default,
        Some(DefaultChange {
            from: Some(DefaultRoute::Service),
            to: DefaultRoute::Normal
        })
    );
    assert_eq!(
        default_of(&spec(&c), "checkout"),
        Some(DefaultRoute::Normal)
    );
}

#[test]
fn a_port_change_writes_the_routes_before_the_services() {
    let mut c = Cluster::new(&[80]);
    let now = t0();
    let live = Live::new(true, ["v2"]);
    c.converge(&live, now);
    c.shape = shape(&[80, 9090]);
    let steps = c.converge(&live, now);
    assert_eq!(
        steps,
        [
            // New routes per port (the second port only to the Service
            // itself: the version Services lack it), the old route goes,
            "route checkout-80",
            "route checkout-9090",
            "delete HTTPRoute checkout",
            // then the Services get the port, and the route names each
            // once it has it.
            "apply service checkout--normal",
            "route checkout-9090",
            "apply service checkout--v2",
            "route checkout-9090",
        ]
    );
    for route in c.routes.values() {
        assert_eq!(route.spec.as_ref().unwrap().rules.len(), 2);
    }
}

#[test]
fn more_than_fifteen_canaries_leave_the_rest_out_and_say_so() {
    let tags: Vec<String> = (0..17).map(|i| format!("t{i:02}")).collect();
    let live = Live::new(true, tags.clone());
    let mut c = Cluster::new(&[80]);
    let now = t0();
    c.converge(&live, now);
    assert_eq!(c.rules().len(), MAX_TAGS);
    assert_eq!(c.routes["checkout"].spec.as_ref().unwrap().rules.len(), 16);
    assert_eq!(c.plan(&live, now).over, ["t15", "t16"]);
}

#[test]
fn weights_over_100_keep_the_split_written_before() {
    let mut c = Cluster::new(&[80]);
    let now = t0();
    let live = Live::new(true, ["a", "b"])
        .with_weight("a", TagWeight::Percent(20))
        .with_weight("b", TagWeight::Percent(10));
    c.converge(&live, now);
    let split = |c: &Cluster| {
        split_of(
            c.routes["checkout"].spec.as_ref().unwrap(),
            "checkout--normal",
            "checkout",
        )
    };
    assert_eq!(
        split(&c),
        BTreeMap::from([("checkout--a".into(), 20), ("checkout--b".into(), 10)])
    );
    let over = Live::new(true, ["a", "b"])
        .with_weight("a", TagWeight::Percent(90))
        .with_weight("b", TagWeight::Percent(20));
    assert_eq!(c.plan(&over, now).weights_over, Some(110));
    assert!(c.converge(&over, now).is_empty());
    assert_eq!(split(&c).len(), 2);
}

#[test]
fn removal_deletes_the_routes_first_and_only_ours() {
    let mut c = Cluster::new(&[80, 81]);
    c.converge(&Live::new(true, ["v2"]), t0());
    let routes: Vec<_> = c.routes.values().cloned().collect();
    let services: Vec<_> = c.services.values().cloned().collect();
    let first = plan_removal("checkout", &routes, &services).unwrap();
    assert_eq!(first.kind, RuleKind::HttpRoute);
    let first = plan_removal("checkout", &[], &services).unwrap();
    assert_eq!(first.kind, RuleKind::Service);
    assert_eq!(plan_removal("cart", &routes, &services), None);
    let mut foreign = services.clone();
    for s in &mut foreign {
        s.managed = false;
    }
    assert_eq!(plan_removal("checkout", &[], &foreign), None);
}

// === proptests ===

fn tag() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,10}[a-z0-9]",
        "[A-Za-z0-9][A-Za-z0-9._-]{0,20}[A-Za-z0-9]",
        "[A-Za-z0-9]([A-Za-z0-9._-]{61}[A-Za-z0-9])?",
        Just("normal".to_owned()),
        Just("a--b".to_owned()),
    ]
}

/// Service names (DNS-1035 labels), some long, some with `--`.
fn service_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,20}[a-z0-9]",
        "[a-z]([a-z0-9-]{50,61}[a-z0-9])",
        Just("a--b".to_owned()),
        Just("a".to_owned()),
    ]
}

proptest! {
    /// Every live tag (up to the limit) has one version Service and one
    /// rule; names are valid, unique Service names; the default rule is
    /// last; every rule names one of our Services or the Service itself.
    #[test]
    fn desired_objects_keep_every_promise(
        name in service_name(),
        tags in prop::collection::btree_set(tag(), 0..20),
        normal in any::<bool>(),
        ports in prop::collection::btree_set(1i32..65535, 1..4),
    ) {
        let svc = ServiceRef { namespace: "shop".into(), name: name.clone(), uid: None };
        let ports: Vec<i32> = ports.into_iter().collect();
        let live = Live::new(normal, tags.clone());
        let d = desired(&svc, &shape(&ports), HEADER, &live, &labels(), &RouteSettings::default());
        let names: BTreeSet<&str> = d.services.iter().map(|s| s.metadata.name.as_str()).collect();
        prop_assert_eq!(names.len(), d.services.len());
        prop_assert!(names.iter().all(|n| is_service_name(n)), "{:?}", names);
        let routable: BTreeSet<String> = tags.iter().take(MAX_TAGS).cloned().collect();
        let service_tags: Vec<String> = d.services.iter().filter_map(|s| s.metadata.labels.get(TAG_LABEL).cloned()).collect();
        prop_assert_eq!(service_tags.iter().cloned().collect::<BTreeSet<_>>(), routable.clone());
        prop_assert_eq!(service_tags.len(), routable.len());
        prop_assert_eq!(d.routes.len(), ports.len());
        let route_names: BTreeSet<&str> = d.routes.iter().map(|r| r.metadata.name.as_str()).collect();
        prop_assert_eq!(route_names.len(), ports.len());
        for route in &d.routes {
            let rules = &route.spec.rules;
            prop_assert!(rules.len() <= 16);
            let (last, tagged) = rules.split_last().unwrap();
            prop_assert!(last.matches.iter().all(|m| m.headers.is_empty()));
            let by_tag = header_rules(&route.spec, HEADER);
            prop_assert_eq!(by_tag.keys().cloned().collect::<BTreeSet<_>>(), routable.clone());
            prop_assert_eq!(tagged.len(), routable.len());
            for rule in rules {
                for b in &rule.backend_refs {
                    prop_assert!(b.name == name || names.contains(b.name.as_str()), "{}", b.name);
                }
            }
            let to = default_of(&route.spec, &name);
            prop_assert_eq!(to, Some(live.default_route()));
        }
    }

    /// Version names never collide, with each other or with names other
    /// Services hold, and stay valid.
    #[test]
    fn version_names_are_unique_and_valid(
        name in service_name(),
        tags in prop::collection::btree_set(tag(), 0..20),
        taken in prop::collection::btree_set("[a-z][a-z0-9-]{0,20}--[a-z0-9]{1,10}", 0..5),
    ) {
        let versions: Vec<Version> = std::iter::once(None).chain(tags.into_iter().map(Some)).collect();
        let mut taken = taken;
        // Take the plain names of a few versions, as another Service might.
        taken.insert(version_name(&name, "normal", 0));
        let names = version_names(&name, &versions, &BTreeMap::new(), &taken);
        let unique: BTreeSet<&String> = names.values().collect();
        prop_assert_eq!(unique.len(), versions.len());
        prop_assert!(names.values().all(|n| !taken.contains(n)));
        prop_assert!(names.values().all(|n| is_service_name(n) && n.contains("--")), "{:?}", names);
    }

    /// Random histories: after every write no rule names a Service that
    /// is not ours or does not exist (checked in `step`); a version Service
    /// goes only once its tag has been gone for the grace; after each change
    /// the rules are exactly the live tags and every live tag has its
    /// Service; once the grace has passed nothing else is left.
    #[test]
    fn make_before_break_holds_over_any_history(
        history in prop::collection::vec(
            (
                prop::collection::btree_set(prop::sample::select(vec!["a", "B_2", "c.3", "normal", "d"]), 0..5),
                any::<bool>(),
                0u64..90,
                prop::sample::select(vec![vec![80], vec![80, 9090], vec![9090]]),
            ),
            1..12,
        ),
    ) {
        let mut c = Cluster::new(&[80]);
        let mut now = t0();
        let mut went_away: BTreeMap<String, Timestamp> = BTreeMap::new();
        let mut live = Live::default();
        for (set, normal, wait, ports) in history {
            now += Duration::from_secs(wait);
            let next = Live::new(normal, set);
            for t in live.tags.difference(&next.tags) {
                went_away.insert(t.clone(), now);
            }
            for t in &next.tags {
                went_away.remove(t);
            }
            live = next;
            c.shape = shape(&ports);
            c.deleted.clear();
            c.converge(&live, now);
            for (tag, at) in &c.deleted {
                let tag = tag.as_ref().expect("the normal Service stays");
                let since = went_away.get(tag).expect("only gone tags lose their Service");
                prop_assert!(*at >= *since + GRACE, "{tag} removed early");
            }
            prop_assert_eq!(c.rules().keys().cloned().collect::<BTreeSet<_>>(), live.tags.clone());
            prop_assert!(live.tags.is_subset(&c.tags()));
            prop_assert_eq!(c.routes.len(), ports.len());
            for route in c.routes.values() {
                prop_assert_eq!(default_of(route.spec.as_ref().unwrap(), "checkout"), Some(live.default_route()));
            }
        }
        now += GRACE;
        c.converge(&live, now);
        prop_assert_eq!(c.tags(), live.tags.clone());
        prop_assert_eq!(c.plan(&live, now).step, None);
    }
}
