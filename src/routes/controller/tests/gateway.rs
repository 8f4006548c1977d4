//! The controller on the Gateway API against the apiserver model, which
//! gives Services and HTTPRoutes their defaults as the real apiserver does.
//! The test plays the endpoint controller (it writes the version Services'
//! EndpointSlices) and the mesh (it writes the HTTPRoutes' status).

use super::*;

const GATEWAY: &str = "gateway.networking.k8s.io";
const ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes";
const ROUTE: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/checkout";
const SERVICES: &str = "/api/v1/namespaces/shop/services";
const NORMAL: &str = "/api/v1/namespaces/shop/services/checkout--normal";
const CANARY: &str = "/api/v1/namespaces/shop/services/checkout--feature-login";
const TAG: &str = "feature-login";

impl Apiserver {
    fn with_gateway(&self, served: bool) {
        let versions: &[&str] = if served { &["v1"] } else { &[] };
        self.0.serve_group(
            GATEWAY,
            versions,
            &[("httproutes", "HTTPRoute"), ("grpcroutes", "GRPCRoute")],
        );
    }

    /// Writes to HTTPRoutes and Services, in order.
    fn gateway_writes(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|c| c.is_write() && (c.path.contains(GATEWAY) || c.path.starts_with(SERVICES)))
            .collect()
    }

    fn gateway_lines(&self) -> Vec<String> {
        self.gateway_writes().iter().map(Seen::line).collect()
    }

    /// The endpoint controller: the slice of a version Service, its pod
    /// ready or not.
    fn endpoints(&self, service: &str, pod: &str, ready: bool) {
        self.put(
            &format!("/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/{service}-x1"),
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": format!("{service}-x1"), "namespace": "shop",
                                "labels": {"kubernetes.io/service-name": service}},
                   "addressType": "IPv4",
                   "endpoints": [{"addresses": ["10.0.0.7"], "conditions": {"ready": ready},
                                  "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}}],
                   "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}),
        );
    }

    /// The mesh: the HTTPRoute's status, as an implementation writes it.
    fn status(&self, path: &str, accepted: &str, reason: &str) {
        let mut route = self.get(path).unwrap();
        route["status"] = json!({"parents": [{
            "parentRef": {"group": "", "kind": "Service", "name": "checkout"},
            "controllerName": "istio.io/gateway-controller",
            "conditions": [{"type": "Accepted", "status": accepted, "reason": reason,
                            "message": "", "lastTransitionTime": "2026-12-06T10:00:00Z"}],
        }]});
        self.put(path, route);
    }
}

/// The Istio tests' cluster (a normal pod, a ready canary), serving the
/// Gateway API instead of Istio's.
fn gateway_cluster() -> Apiserver {
    let api = cluster(true);
    api.with_istio(false);
    api.with_gateway(true);
    api
}

fn meta(name: &str) -> Value {
    json!({"name": name, "namespace": "shop",
           "labels": {"app.kubernetes.io/managed-by": "canary-injector",
                      "canary-injector.io/route-of": "checkout"},
           "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "checkout",
                                "uid": SERVICE_UID}]})
}

fn version_service(tag: Option<&str>) -> Value {
    let (name, mut meta, selector) = match tag {
        None => (
            "checkout--normal".to_owned(),
            meta("checkout--normal"),
            json!({"app": "checkout", "stage": "normal"}),
        ),
        Some(t) => (
            format!("checkout--{t}"),
            meta(&format!("checkout--{t}")),
            json!({"app": "checkout", "stage": "gray", "canarytag": t}),
        ),
    };
    if let Some(t) = tag {
        meta["labels"]["canary-injector.io/tag"] = json!(t);
    }
    meta["name"] = json!(name);
    json!({"apiVersion": "v1", "kind": "Service", "metadata": meta,
           "spec": {"selector": selector,
                    "ports": [{"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP"}]}})
}

fn http_route(tags: &[&str], normal: bool) -> Value {
    let backend =
        |name: &str| json!({"group": "", "kind": "Service", "name": name, "port": 80, "weight": 1});
    let all = json!({"path": {"type": "PathPrefix", "value": "/"}});
    let mut rules: Vec<Value> = tags
        .iter()
        .map(|t| {
            json!({"matches": [{"path": {"type": "PathPrefix", "value": "/"},
                                "headers": [{"type": "Exact", "name": "x-canary-tag", "value": t}]}],
                   "backendRefs": [backend(&format!("checkout--{t}"))]})
        })
        .collect();
    let default = if normal {
        "checkout--normal"
    } else {
        "checkout"
    };
    rules.push(json!({"matches": [all], "backendRefs": [backend(default)]}));
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
           "metadata": meta("checkout"),
           "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "checkout"}],
                    "rules": rules}})
}

#[tokio::test(start_paused = true)]
async fn a_service_then_its_rule_once_it_has_a_ready_endpoint_and_steady_state_writes_nothing() {
    let api = gateway_cluster();
    let r = start(&api);
    r.until("the route and both Services", |a| {
        a.gateway_writes().len() == 3
    })
    .await;
    // The route first, to the Service itself (no version Service yet),
    // then the version Services.
    assert_eq!(
        api.gateway_lines(),
        [
            format!("POST {ROUTES}"),
            format!("POST {SERVICES}"),
            format!("POST {SERVICES}"),
        ]
    );
    let writes = api.gateway_writes();
    assert_eq!(writes[0].body, http_route(&[], false));
    assert_eq!(writes[1].body, version_service(None));
    assert_eq!(writes[2].body, version_service(Some(TAG)));
    assert_eq!(
        writes[1].query.get("fieldManager").map(String::as_str),
        Some(FIELD_MANAGER)
    );
    // No endpoints yet: nothing routes to the new Services.
    r.idle(Duration::from_secs(5)).await;
    assert_eq!(api.gateway_writes().len(), 3);

    // The endpoint controller catches up: the rules come, in one apply
    // over the version read.
    let version = api.get(ROUTE).unwrap()["metadata"]["resourceVersion"].clone();
    api.endpoints("checkout--normal", "checkout-7c6d-a1", true);
    api.endpoints("checkout--feature-login", "checkout-gray-7d9f-x1", true);
    r.until("the rules", |a| a.gateway_writes().len() == 5)
        .await;
    let writes = api.gateway_writes();
    assert_eq!(writes[3].line(), format!("PATCH {ROUTE}"));
    let mut expected = http_route(&[], true);
    expected["metadata"]["resourceVersion"] = version;
    assert_eq!(
        writes[3].body, expected,
        "the normal Service's endpoint came first"
    );
    assert_eq!(
        without_version(writes[4].body.clone()),
        http_route(&[TAG], true)
    );
    // What the apiserver holds (with its defaults) reads as in step.
    r.idle(RESYNC * 2).await;
    assert_eq!(api.gateway_writes().len(), 5, "{:#?}", api.gateway_lines());
    assert_eq!(r.metrics.changes("route-added"), 1);
    assert_eq!(r.metrics.changes("service-added"), 2);
    assert_eq!(r.metrics.api_served(RouteApi::GatewayApi), 1);
    assert_eq!(r.metrics.api_served(RouteApi::Istio), 0);
    // Istio is not served: nothing of it was read.
    assert!(
        api.seen()
            .iter()
            .all(|c| !c.path.contains("/namespaces/shop/virtualservices"))
    );
    r.until("the event", |a| {
        a.events().iter().any(|e| e.0 == "RouteAdded")
    })
    .await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_gone_canary_loses_its_rule_at_once_and_its_service_after_the_grace() {
    let api = gateway_cluster();
    let r = start(&api);
    r.until("the Services", |a| a.gateway_writes().len() == 3)
        .await;
    api.endpoints("checkout--normal", "checkout-7c6d-a1", true);
    api.endpoints("checkout--feature-login", "checkout-gray-7d9f-x1", true);
    r.until("the rules", |a| {
        a.get(ROUTE).unwrap()["spec"] == http_route(&[TAG], true)["spec"]
    })
    .await;
    let before = api.gateway_writes().len();
    // The canary stops being ready.
    api.put(SLICE, slice(false));
    api.endpoints("checkout--feature-login", "checkout-gray-7d9f-x1", false);
    r.until("the rule removal and the mark", |a| {
        a.gateway_writes().len() == before + 2
    })
    .await;
    let writes = api.gateway_writes();
    assert_eq!(
        writes[before..].iter().map(Seen::line).collect::<Vec<_>>(),
        [format!("PATCH {ROUTE}"), format!("PATCH {CANARY}")]
    );
    let removed_at = writes[before].at;
    assert_eq!(
        api.get(ROUTE).unwrap()["spec"],
        http_route(&[], true)["spec"]
    );
    let due = api.get(CANARY).unwrap()["metadata"]["annotations"]["canary-injector.io/removal-due"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(due.parse::<Timestamp>().is_ok(), "{due}");
    let uid = api.get(CANARY).unwrap()["metadata"]["uid"].clone();
    r.until("the Service removal", |a| {
        a.gateway_writes().len() == before + 3
    })
    .await;
    let w = &api.gateway_writes()[before + 2];
    assert_eq!(w.line(), format!("DELETE {CANARY}"));
    assert!(w.at - removed_at >= GRACE, "kept for the grace period");
    assert!(w.at - removed_at < GRACE + Duration::from_secs(2));
    assert_eq!(w.body["preconditions"]["uid"], uid, "only the Service seen");
    assert!(api.get(CANARY).is_none());
    assert!(api.get(NORMAL).is_some());
    r.idle(RESYNC).await;
    assert_eq!(api.gateway_writes().len(), before + 3);
    assert_eq!(r.metrics.changes("route-removed"), 1);
    assert_eq!(r.metrics.changes("service-removed"), 1);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn routes_and_services_not_ours_block_every_write_until_they_are_gone() {
    let api = gateway_cluster();
    let foreign = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/by-hand";
    api.put(
        foreign,
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"name": "by-hand", "namespace": "shop"},
               "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "checkout"}],
                        "rules": [{"backendRefs": [{"name": "checkout", "port": 80}]}]}}),
    );
    let r = start(&api);
    r.until("the conflict", |a| {
        a.events().iter().any(|e| e.0 == "RouteConflict")
    })
    .await;
    r.idle(RESYNC).await;
    assert!(
        api.gateway_writes().is_empty(),
        "{:#?}",
        api.gateway_lines()
    );
    assert_eq!(r.metrics.services("conflict"), 1);
    let note = api
        .seen()
        .into_iter()
        .find(|c| c.path == EVENTS && c.body["reason"] == "RouteConflict")
        .unwrap()
        .body["note"]
        .clone();
    assert!(
        note.as_str().unwrap().contains(
            "HTTPRoute by-hand (not managed by canary-injector) has Service checkout as a parent"
        ),
        "{note}"
    );
    // Gone: the routes come. A Service of the name of a version Service,
    // not ours, blocks them again.
    api.delete(foreign);
    r.until("routes", |a| !a.gateway_writes().is_empty()).await;
    r.stop().await;

    let api = gateway_cluster();
    let mut squatter = version_service(None);
    squatter["metadata"] = json!({"name": "checkout--normal", "namespace": "shop"});
    api.put(NORMAL, squatter);
    let r = start(&api);
    r.until("the conflict", |a| {
        a.events().iter().any(|e| e.0 == "RouteConflict")
    })
    .await;
    r.idle(Duration::from_secs(5)).await;
    assert!(
        api.gateway_writes().is_empty(),
        "{:#?}",
        api.gateway_lines()
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_route_no_mesh_accepts_is_reported_and_its_acceptance_too() {
    let api = gateway_cluster();
    let r = start(&api);
    r.until("the route", |a| a.get(ROUTE).is_some()).await;
    r.idle(Duration::from_secs(30)).await;
    assert!(
        api.events().iter().all(|e| e.0 != "RouteNotAccepted"),
        "a mesh gets a moment to write its status"
    );
    r.until("the warning", |a| {
        a.events().iter().any(|e| e.0 == "RouteNotAccepted")
    })
    .await;
    assert_eq!(r.metrics.services("not-accepted"), 1);
    // The mesh rejects it: said with its reason.
    api.status(ROUTE, "False", "NoMatchingParent");
    r.until("the rejection", |a| {
        a.seen().iter().any(|c| {
            c.path == EVENTS
                && c.body["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("NoMatchingParent"))
        })
    })
    .await;
    // Then accepts it.
    api.status(ROUTE, "True", "Accepted");
    r.until("accepted", |a| {
        a.events().iter().any(|e| e.0 == "RouteAccepted")
    })
    .await;
    assert_eq!(r.metrics.services("not-accepted"), 0);
    // Status changes are no reason to write.
    assert_eq!(
        api.gateway_writes()
            .iter()
            .filter(|w| w.path.contains(GATEWAY))
            .count(),
        1
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn without_any_route_api_it_idles_then_routes_once_httproutes_appear() {
    let api = gateway_cluster();
    api.with_gateway(false);
    let r = start(&api);
    r.idle(RECHECK * 2 + Duration::from_secs(1)).await;
    assert!(
        api.seen().iter().all(|c| !c.query.contains_key("watch")),
        "no watch while idle"
    );
    assert_eq!(r.metrics.crds_present.get(), 0);
    api.with_gateway(true);
    r.until("routes", |a| a.get(ROUTE).is_some()).await;
    assert_eq!(r.metrics.crds_present.get(), 1);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn switching_a_service_to_the_gateway_api_deletes_its_istio_objects_first() {
    let api = cluster(true);
    api.with_gateway(true);
    let r = start(&api);
    // Istio first (auto prefers it).
    r.until("Istio routes", |a| {
        a.get(VS).is_some() && a.get(DR).is_some()
    })
    .await;
    assert!(api.get(ROUTE).is_none());
    let before = api.seen().len();
    api.put(
        SERVICE,
        service(json!({"canary-injector.io/routes": "true",
                       "canary-injector.io/route-api": "gateway-api"})),
    );
    r.until("the HTTPRoute", |a| a.get(ROUTE).is_some()).await;
    let lines: Vec<String> = api.seen()[before..]
        .iter()
        .filter(|c| c.is_write() && !c.path.contains("/events"))
        .map(Seen::line)
        .collect();
    assert_eq!(
        lines[..3],
        [
            format!("DELETE {VS}"),
            format!("DELETE {DR}"),
            format!("POST {ROUTES}"),
        ]
    );
    // And back: the Gateway API's objects go, routes first.
    api.put(SERVICE, routed());
    r.until("Istio again", |a| {
        a.get(VS).is_some() && a.get(ROUTE).is_none()
    })
    .await;
    assert!(api.get(NORMAL).is_none() && api.get(CANARY).is_none());
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_annotation_for_an_api_not_served_or_unknown_is_reported() {
    let api = gateway_cluster();
    api.put(
        SERVICE,
        service(json!({"canary-injector.io/routes": "true",
                       "canary-injector.io/route-api": "istio"})),
    );
    let r = start(&api);
    r.until("the warning", |a| {
        a.events().iter().any(|e| e.0 == "RouteApiNotServed")
    })
    .await;
    assert_eq!(r.metrics.services("unroutable"), 1);
    api.put(
        SERVICE,
        service(json!({"canary-injector.io/routes": "true",
                       "canary-injector.io/route-api": "gateway"})),
    );
    r.until("the warning", |a| {
        a.events().iter().any(|e| e.0 == "RouteApiInvalid")
    })
    .await;
    assert!(api.gateway_writes().is_empty());
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_service_without_a_selector_is_reported_and_its_ports_are_followed() {
    let api = gateway_cluster();
    let mut bare = routed();
    bare["spec"] = json!({"ports": [{"name": "http", "port": 80}]});
    api.put(SERVICE, bare);
    let r = start(&api);
    r.until("the warning", |a| {
        a.events().iter().any(|e| e.0 == "RouteServiceUnsupported")
    })
    .await;
    assert!(api.gateway_writes().is_empty());
    // A selector and a second port: one route per port.
    let mut two = routed();
    two["spec"]["ports"] = json!([{"name": "http", "port": 80}, {"name": "grpc", "port": 9090}]);
    api.put(SERVICE, two);
    r.until("two routes", |a| {
        a.get(&format!("{ROUTES}/checkout-80")).is_some()
            && a.get(&format!("{ROUTES}/checkout-9090")).is_some()
    })
    .await;
    r.until("the normal Service", |a| a.get(NORMAL).is_some())
        .await;
    let normal = api.get(NORMAL).unwrap();
    assert_eq!(normal["spec"]["ports"].as_array().unwrap().len(), 2);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn opting_out_deletes_the_routes_then_the_services() {
    let api = gateway_cluster();
    let r = start(&api);
    r.until("the Services", |a| a.gateway_writes().len() == 3)
        .await;
    let before = api.gateway_writes().len();
    api.put(SERVICE, service(json!({})));
    r.until("all gone", |a| {
        a.get(ROUTE).is_none() && a.get(NORMAL).is_none() && a.get(CANARY).is_none()
    })
    .await;
    let lines: Vec<String> = api.gateway_lines()[before..].to_vec();
    assert_eq!(lines[0], format!("DELETE {ROUTE}"));
    assert_eq!(lines.len(), 3);
    assert_eq!(r.metrics.changes("objects-deleted"), 3);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn edits_of_our_service_and_route_are_put_back() {
    let api = gateway_cluster();
    let r = start(&api);
    api.endpoints("checkout--normal", "checkout-7c6d-a1", true);
    r.until("in step", |a| {
        a.get(ROUTE)
            .is_some_and(|o| o["spec"] == http_route(&[], true)["spec"])
            && a.get(CANARY).is_some()
    })
    .await;
    let mut edited = api.get(NORMAL).unwrap();
    edited["spec"]["selector"]["stage"] = json!("gray");
    api.put(NORMAL, edited);
    r.until("put back", |a| {
        a.get(NORMAL).unwrap()["spec"]["selector"]["stage"] == "normal"
    })
    .await;
    assert_eq!(r.metrics.restored(RuleKind::Service), 1);
    api.delete(ROUTE);
    r.until("recreated", |a| a.get(ROUTE).is_some()).await;
    assert_eq!(r.metrics.restored(RuleKind::HttpRoute), 1);
    r.stop().await;
}

/// A mutating admission webhook that changes what the controller writes
/// (here: a label added to a version Service's selector) must not make it
/// write again and again: the write is retried with backoff, counted as
/// `not-kept`, and the other Service's writes are not starved.
#[tokio::test(start_paused = true)]
async fn a_write_the_apiserver_stores_otherwise_is_retried_with_backoff_not_at_once() {
    let api = gateway_cluster();
    api.0.mutate_writes(
        NORMAL,
        json!({"spec": {"selector": {"injected.example.com/by": "someone"}}}),
    );
    let r = start(&api);
    r.until("the normal Service", |a| a.get(NORMAL).is_some())
        .await;
    r.idle(Duration::from_secs(60)).await;
    let normal_writes = api
        .gateway_writes()
        .iter()
        .filter(|w| {
            w.path == NORMAL
                || (w.path == SERVICES && w.body["metadata"]["name"] == "checkout--normal")
        })
        .count();
    assert!(
        (2..=8).contains(&normal_writes),
        "retried with backoff, not in a loop: {normal_writes} writes in a minute"
    );
    assert!(r.counters.errors("not-kept") >= 1);
    r.stop().await;
}

/// The tags an HTTPRoute write routes by header.
fn header_tags(w: &Seen) -> Vec<String> {
    w.body["spec"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["matches"][0]["headers"][0]["value"].as_str())
        .map(str::to_owned)
        .collect()
}

/// The creation-burst flicker of the Istio backend, on the Gateway API: the
/// HTTPRoute watch lags behind the controller's own writes while two
/// canaries become ready one after the other. The second rule is added to
/// what the controller wrote, not to the old route the watch still shows,
/// so `feat-a` keeps its rule throughout.
#[tokio::test(start_paused = true)]
async fn a_lagging_route_watch_never_removes_the_rule_of_a_live_tag() {
    let api = two_canaries(false, false);
    api.with_istio(false);
    api.with_gateway(true);
    let r = start(&api);
    r.until("the route and the normal Service", |a| {
        a.gateway_writes().len() == 2
    })
    .await;
    api.endpoints("checkout--normal", "checkout-7c6d-a1", true);
    r.until("the default rule to normal", |a| {
        a.gateway_writes().len() == 3
    })
    .await;
    api.0
        .hold_watch("/apis/gateway.networking.k8s.io/v1/httproutes");
    let ready = |i: usize| {
        let mut s = api.get(SLICE).unwrap();
        s["endpoints"][i]["conditions"]["ready"] = json!(true);
        api.put(SLICE, s);
    };
    ready(1);
    r.until("feat-a's Service", |a| {
        a.get("/api/v1/namespaces/shop/services/checkout--feat-a")
            .is_some()
    })
    .await;
    api.endpoints("checkout--feat-a", "checkout-a-1", true);
    r.until("feat-a's rule", |a| {
        a.get(ROUTE).unwrap()["spec"]["rules"]
            .as_array()
            .unwrap()
            .len()
            == 2
    })
    .await;
    ready(2);
    r.until("feat-b's Service", |a| {
        a.get("/api/v1/namespaces/shop/services/checkout--feat-b")
            .is_some()
    })
    .await;
    api.endpoints("checkout--feat-b", "checkout-b-1", true);
    r.until("feat-b's rule", |a| {
        a.get(ROUTE).unwrap()["spec"]["rules"]
            .as_array()
            .unwrap()
            .len()
            == 3
    })
    .await;
    r.idle(Duration::from_secs(2)).await;
    api.0
        .release_watch("/apis/gateway.networking.k8s.io/v1/httproutes");
    r.idle(RESYNC).await;
    let routes: Vec<Vec<String>> = api
        .gateway_writes()
        .iter()
        .filter(|w| w.path.starts_with(ROUTES))
        .map(header_tags)
        .collect();
    assert_eq!(
        routes,
        [
            vec![],
            vec![],
            vec!["feat-a".to_owned()],
            vec!["feat-a".into(), "feat-b".into()]
        ],
        "{:#?}",
        api.gateway_lines()
    );
    assert_eq!(r.metrics.changes("route-removed"), 0);
    assert_eq!(r.counters.errors("stale"), 0, "{:#?}", api.gateway_lines());
    r.stop().await;
}
