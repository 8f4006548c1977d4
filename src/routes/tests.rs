//! The pure part: desired objects, live tags, conflicts, the planner (as
//! tables), and proptests over random tag sets and random histories.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::objects::{DestinationRuleSpec, VirtualServiceSpec, observe_json};
use super::plan::{Plan, PlanInput, Step, plan, plan_removal, routes as vs_routes, subsets};
use super::*;
use crate::mutate::labels::is_dns_label;

const API: &str = "networking.istio.io/v1";
const UID: &str = "6b1f4c3e-0000-4000-8000-000000000001";
const GRACE: Duration = Duration::from_secs(60);

fn service() -> ServiceRef {
    ServiceRef {
        namespace: "shop".into(),
        name: "checkout".into(),
        uid: Some(UID.into()),
    }
}

/// Live tags `list`, with a ready normal pod.
fn live(list: &[&str]) -> Live {
    Live::new(true, list.iter().copied())
}

/// Live tags `list`, without a ready normal pod.
fn gray_only(list: &[&str]) -> Live {
    Live::new(false, list.iter().copied())
}

fn labels() -> LabelPolicy {
    LabelPolicy::default()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

// === desired ===

#[test]
fn desired_objects_for_two_canaries() {
    let d = desired(
        &service(),
        "x-canary-tag",
        &live(&["feature-login", "Feature_X"]),
        &labels(),
        &RouteSettings::default(),
    );
    let fx = subset_name("Feature_X");
    assert!(fx.starts_with("feature-x--"), "{fx}");
    let owner = json!([{"apiVersion": "v1", "kind": "Service", "name": "checkout", "uid": UID}]);
    assert_eq!(
        d.destination_rule.to_json(API),
        json!({
            "apiVersion": API,
            "kind": "DestinationRule",
            "metadata": {
                "name": "checkout", "namespace": "shop",
                "labels": {"app.kubernetes.io/managed-by": "canary-injector"},
                "ownerReferences": owner,
            },
            "spec": {
                "host": "checkout",
                "subsets": [
                    {"name": "normal", "labels": {"stage": "normal"}},
                    {"name": fx, "labels": {"canarytag": "Feature_X", "stage": "gray"}},
                    {"name": "feature-login", "labels": {"canarytag": "feature-login", "stage": "gray"}},
                ],
            },
        })
    );
    assert_eq!(
        d.virtual_service.to_json(API),
        json!({
            "apiVersion": API,
            "kind": "VirtualService",
            "metadata": {
                "name": "checkout", "namespace": "shop",
                "labels": {"app.kubernetes.io/managed-by": "canary-injector"},
                "ownerReferences": owner,
            },
            "spec": {
                "hosts": ["checkout"],
                "http": [
                    {"name": fx,
                     "match": [{"headers": {"x-canary-tag": {"exact": "Feature_X"}}}],
                     "route": [{"destination": {"host": "checkout", "subset": fx}}]},
                    {"name": "feature-login",
                     "match": [{"headers": {"x-canary-tag": {"exact": "feature-login"}}}],
                     "route": [{"destination": {"host": "checkout", "subset": "feature-login"}}]},
                    {"name": "normal",
                     "route": [{"destination": {"host": "checkout", "subset": "normal"}}]},
                ],
            },
        })
    );
}

/// The weighted gray stage: requests without a header split between
/// `normal` and the canaries that ask for a share; header routes as
/// always; every route gets the Service's timeout and retries.
#[test]
fn canaries_with_a_weight_share_the_default_route_and_every_route_has_the_settings() {
    let live = live(&["a", "b", "c"])
        .with_weight("a", TagWeight::Percent(10))
        .with_weight("b", TagWeight::Percent(5))
        .with_weight(
            "c",
            TagWeight::Invalid(shape::WeightProblem::NotAPercent("x".into())),
        );
    let settings = RouteSettings {
        timeout: Some("5s".into()),
        retries: Some(shape::Retries {
            attempts: 3,
            per_try_timeout: Some("2s".into()),
        }),
    };
    let d = desired(&service(), "x-canary-tag", &live, &labels(), &settings);
    let http = d.virtual_service.to_json(API)["spec"]["http"].clone();
    let retries = json!({"attempts": 3, "perTryTimeout": "2s"});
    assert_eq!(
        http[3],
        json!({"name": "normal",
               "route": [{"destination": {"host": "checkout", "subset": "normal"}, "weight": 85},
                         {"destination": {"host": "checkout", "subset": "a"}, "weight": 10},
                         {"destination": {"host": "checkout", "subset": "b"}, "weight": 5}],
               "timeout": "5s", "retries": retries})
    );
    for route in http.as_array().unwrap() {
        assert_eq!(route["timeout"], "5s");
        assert_eq!(route["retries"], retries);
    }
    assert_eq!(
        http[0]["route"],
        json!([{"destination": {"host": "checkout", "subset": "a"}}]),
        "header routes unchanged"
    );
    assert_eq!(
        super::plan::default_route(&d.virtual_service.spec, "checkout"),
        Some(DefaultRoute::Normal)
    );
    // All of it: normal gets nothing and is left out.
    let all = live_with(&["a"], &[("a", 100)]);
    let d = desired(&service(), "h", &all, &labels(), &RouteSettings::default());
    assert_eq!(
        d.virtual_service.to_json(API)["spec"]["http"][1]["route"],
        json!([{"destination": {"host": "checkout", "subset": "a"}, "weight": 100}])
    );
    // No normal pod ready: no split (the default route goes to the Service).
    let mut gray = live_with(&["a"], &[("a", 30)]);
    gray.normal = false;
    let d = desired(&service(), "h", &gray, &labels(), &RouteSettings::default());
    assert_eq!(
        d.virtual_service.to_json(API)["spec"]["http"][1]["route"],
        json!([{"destination": {"host": "checkout"}}])
    );
}

/// Live tags with these weights (and a ready normal pod).
fn live_with(tags: &[&str], weights: &[(&str, u8)]) -> Live {
    weights.iter().fold(live(tags), |l, (t, p)| {
        l.with_weight(t, TagWeight::Percent(*p))
    })
}

#[test]
fn a_weight_goes_live_with_one_write_after_its_subset_and_over_100_keeps_the_split() {
    let mut c = Cluster::new();
    let t0 = t0();
    // A new weighted canary: its subset first, then its route and its share
    // in one VirtualService write.
    let steps = c.converge(&live_with(&["a"], &[("a", 10)]), t0);
    assert_eq!(
        steps,
        [("dr", owned(&["a"]), vec![]), ("vs", owned(&["a"]), vec![])]
    );
    let split = |c: &Cluster| super::plan::split_of(c.vs.as_ref().unwrap().spec.as_ref().unwrap());
    assert_eq!(split(&c), BTreeMap::from([("a".to_owned(), 10)]));
    // The weight changes: one VirtualService write.
    let steps = c.converge(&live_with(&["a"], &[("a", 30)]), t0);
    assert_eq!(steps, [("vs", vec![], vec![])]);
    assert_eq!(split(&c), BTreeMap::from([("a".to_owned(), 30)]));
    // A second canary would make it 130: the split written before stands.
    let over = live_with(&["a", "b"], &[("a", 30), ("b", 100)]);
    let plan = c.plan(&over, t0);
    assert_eq!(plan.weights_over, None, "b has no subset yet");
    c.converge(&over, t0);
    assert_eq!(c.plan(&over, t0).weights_over, Some(130));
    assert_eq!(split(&c), BTreeMap::from([("a".to_owned(), 30)]));
    assert!(
        c.routes().contains_key("b"),
        "its header route all the same"
    );
    // The annotation removed (a new rollout): back to normal.
    c.converge(&live(&["a", "b"]), t0);
    assert!(split(&c).is_empty());
    assert_eq!(
        c.vs.as_ref()
            .unwrap()
            .spec
            .as_ref()
            .unwrap()
            .http
            .last()
            .unwrap()
            .route
            .len(),
        1
    );
}

#[test]
fn without_a_ready_normal_pod_the_default_route_goes_to_the_whole_service() {
    let d = desired(
        &service(),
        "x-canary-tag",
        &gray_only(&["feature-login"]),
        &labels(),
        &RouteSettings::default(),
    );
    // The normal subset stays (no route names it), so routing back to it
    // needs no DestinationRule write.
    assert_eq!(
        d.destination_rule.to_json(API)["spec"]["subsets"],
        json!([
            {"name": "normal", "labels": {"stage": "normal"}},
            {"name": "feature-login", "labels": {"canarytag": "feature-login", "stage": "gray"}},
        ])
    );
    assert_eq!(
        d.virtual_service.to_json(API)["spec"]["http"],
        json!([
            {"name": "feature-login",
             "match": [{"headers": {"x-canary-tag": {"exact": "feature-login"}}}],
             "route": [{"destination": {"host": "checkout", "subset": "feature-login"}}]},
            {"route": [{"destination": {"host": "checkout"}}]},
        ])
    );
    let spec = &d.virtual_service.spec;
    assert_eq!(
        super::plan::default_route(spec, "checkout"),
        Some(DefaultRoute::Service)
    );
    assert_eq!(super::plan::default_route(spec, "cart"), None);
    // Nothing ready at all: the Service host only.
    let d = desired(
        &service(),
        "x-canary-tag",
        &gray_only(&[]),
        &labels(),
        &RouteSettings::default(),
    );
    assert_eq!(
        d.virtual_service.to_json(API)["spec"]["http"],
        json!([{"route": [{"destination": {"host": "checkout"}}]}])
    );
}

#[test]
fn without_canaries_everything_goes_to_normal() {
    let d = desired(
        &service(),
        "x-canary-tag",
        &live(&[]),
        &labels(),
        &RouteSettings::default(),
    );
    assert_eq!(
        super::plan::default_route(&d.virtual_service.spec, "checkout"),
        Some(DefaultRoute::Normal)
    );
    assert_eq!(d.destination_rule.spec.subsets.len(), 1);
    let http = &d.virtual_service.spec.http;
    assert_eq!(http.len(), 1);
    assert!(http[0].matches.is_empty());
    assert_eq!(
        http[0].route[0].destination.subset.as_deref(),
        Some(NORMAL_SUBSET)
    );
}

#[test]
fn configured_label_keys_and_values_make_the_selectors() {
    let custom = LabelPolicy {
        canary_tag: "example.com/canary".into(),
        stage: "example.com/stage".into(),
        gray_stage: "canary".into(),
        normal_stage: "stable".into(),
        ..LabelPolicy::default()
    };
    let d = desired(
        &service(),
        "x-version",
        &live(&["v2"]),
        &custom,
        &RouteSettings::default(),
    );
    let subsets = &d.destination_rule.spec.subsets;
    assert_eq!(subsets[0].labels, map(&[("example.com/stage", "stable")]));
    assert_eq!(
        subsets[1].labels,
        map(&[
            ("example.com/stage", "canary"),
            ("example.com/canary", "v2")
        ])
    );
    assert!(
        d.virtual_service.spec.http[0].matches[0]
            .headers
            .contains_key("x-version")
    );
}

#[test]
fn without_a_uid_there_is_no_owner_and_without_a_namespace_none_is_written() {
    let offline = ServiceRef {
        namespace: String::new(),
        uid: None,
        ..service()
    };
    let d = desired(
        &offline,
        "x-canary-tag",
        &live(&["a"]),
        &labels(),
        &RouteSettings::default(),
    );
    let json = d.destination_rule.to_json(API);
    assert!(json["metadata"].get("ownerReferences").is_none());
    assert!(json["metadata"].get("namespace").is_none());
}

// === annotations, header, pods, endpoints ===

#[test]
fn only_true_opts_a_service_in() {
    assert!(wants_routes(Some(&map(&[(ROUTES_ANNOTATION, "true")]))));
    for v in ["false", "True", "yes", ""] {
        assert!(!wants_routes(Some(&map(&[(ROUTES_ANNOTATION, v)]))), "{v}");
    }
    assert!(!wants_routes(None));
}

#[test]
fn the_header_annotation_overrides_the_default_when_valid() {
    assert_eq!(route_header(None, "x-canary-tag"), Ok("x-canary-tag"));
    let a = map(&[(HEADER_ANNOTATION, "x-version")]);
    assert_eq!(route_header(Some(&a), "x-canary-tag"), Ok("x-version"));
    for bad in ["X-Version", "", "x version", ":path", "x\u{e9}"] {
        let a = map(&[(HEADER_ANNOTATION, bad)]);
        let err = route_header(Some(&a), "x-canary-tag").unwrap_err();
        assert!(err.to_string().contains(HEADER_ANNOTATION), "{err}");
    }
}

#[test]
fn a_pod_is_a_canary_with_both_labels() {
    let l = labels();
    assert_eq!(
        pod_tag(&l, &map(&[("canarytag", "v2"), ("stage", "gray")])),
        Some("v2")
    );
    // What the subset would not select: no stage, another stage, no tag.
    assert_eq!(pod_tag(&l, &map(&[("canarytag", "v2")])), None);
    assert_eq!(
        pod_tag(&l, &map(&[("canarytag", "v2"), ("stage", "normal")])),
        None
    );
    assert_eq!(pod_tag(&l, &map(&[("stage", "gray")])), None);
    assert_eq!(
        pod_tag(&l, &map(&[("canarytag", ""), ("stage", "gray")])),
        None
    );
}

#[test]
fn a_pod_is_normal_with_the_normal_stage() {
    let l = labels();
    assert_eq!(
        pod_stage(&l, &map(&[("app", "web"), ("stage", "normal")])),
        Some(PodStage::Normal)
    );
    // What subset normal selects: the stage alone, a stray tag or not.
    assert_eq!(
        pod_stage(&l, &map(&[("canarytag", "v2"), ("stage", "normal")])),
        Some(PodStage::Normal)
    );
    assert_eq!(
        pod_stage(&l, &map(&[("canarytag", "v2"), ("stage", "gray")])),
        Some(PodStage::Canary("v2"))
    );
    for unlabelled in [
        map(&[]),
        map(&[("app", "web")]),
        map(&[("stage", "production")]),
        map(&[("stage", "gray")]),
    ] {
        assert_eq!(pod_stage(&l, &unlabelled), None, "{unlabelled:?}");
    }
}

#[test]
fn only_ready_endpoints_make_tags_and_the_normal_stage_live() {
    let pods = map(&[
        ("a-1", "a"),
        ("a-2", "a"),
        ("b-1", "b"),
        ("c-1", "c"),
        ("n-1", ""),
        ("n-2", ""),
    ]);
    let stage_of = |pod: &str| {
        pods.get(pod).map(|t| match t.as_str() {
            "" => (PodStage::Normal, None),
            tag => (PodStage::Canary(tag), None),
        })
    };
    let e = |pod: Option<&'static str>, ready| EndpointView { pod, ready };
    let endpoints = vec![
        e(Some("a-1"), false),
        e(Some("a-2"), true),
        e(Some("b-1"), false),
        e(Some("unlabelled-1"), true),
        e(None, true),
        e(Some("c-1"), true),
        e(Some("c-1"), true),
        e(Some("n-1"), false),
    ];
    // The only normal pod is not ready: no normal.
    let found = super::live(endpoints.clone(), stage_of);
    assert_eq!(found, gray_only(&["a", "c"]));
    assert_eq!(found.default_route(), DefaultRoute::Service);
    let mut with_normal = endpoints;
    with_normal.push(e(Some("n-2"), true));
    with_normal.reverse();
    let found = super::live(with_normal, stage_of);
    assert_eq!(found, live(&["a", "c"]));
    assert_eq!(found.default_route(), DefaultRoute::Normal);
}

// === conflicts ===

#[test]
fn hosts_name_a_service_in_every_spelling() {
    for host in [
        "checkout",
        "checkout.shop",
        "checkout.shop.svc",
        "checkout.shop.svc.cluster.local",
        "checkout.shop.svc.corp.example",
    ] {
        assert!(host_names_service(host, "checkout", "shop"), "{host}");
        assert_eq!(host_service(host, "shop"), Some("checkout"), "{host}");
    }
    for host in [
        "checkout.other",
        "checkout.other.svc.cluster.local",
        "checkouts",
        "checkout-v2",
        "*.shop.svc.cluster.local",
        "*",
        "checkout.shop.svcx",
    ] {
        assert!(!host_names_service(host, "checkout", "shop"), "{host}");
    }
    assert_eq!(host_service("", "shop"), None);
}

fn rule<S: objects::Spec>(kind: &str, name: &str, managed: bool, spec: Value) -> Observed<S> {
    let mut labels = json!({});
    if managed {
        labels[MANAGED_BY_LABEL] = json!(MANAGED_BY_VALUE);
    }
    observe_json(&json!({
        "kind": kind,
        "metadata": {"name": name, "namespace": "shop", "labels": labels, "resourceVersion": "1"},
        "spec": spec,
    }))
}

#[test]
fn objects_we_do_not_own_conflict_by_name_or_host() {
    let ours_dr: Observed<DestinationRuleSpec> = rule(
        "DestinationRule",
        "checkout",
        true,
        json!({"host": "checkout"}),
    );
    let manual_dr: Observed<DestinationRuleSpec> = rule(
        "DestinationRule",
        "checkout-manual",
        false,
        json!({"host": "checkout.shop.svc.cluster.local"}),
    );
    let same_name_vs: Observed<VirtualServiceSpec> = rule(
        "VirtualService",
        "checkout",
        false,
        json!({"hosts": ["web"]}),
    );
    let other: Observed<VirtualServiceSpec> = rule(
        "VirtualService",
        "cart",
        false,
        json!({"hosts": ["cart", "*"]}),
    );

    assert_eq!(
        conflicts(&service(), [ours_dr.head(), other.head()]),
        [],
        "ours and other hosts are fine"
    );
    let found = conflicts(
        &service(),
        [
            ours_dr.head(),
            manual_dr.head(),
            same_name_vs.head(),
            other.head(),
        ],
    );
    assert_eq!(
        found,
        [
            Conflict::SameName {
                kind: RuleKind::VirtualService
            },
            Conflict::SameHost {
                kind: RuleKind::DestinationRule,
                name: "checkout-manual".into(),
                host: "checkout.shop.svc.cluster.local".into()
            },
        ]
    );
    assert_eq!(
        found[1].to_string(),
        "DestinationRule checkout-manual (not managed by canary-injector) routes host \
         checkout.shop.svc.cluster.local"
    );
}

#[test]
fn a_malformed_foreign_spec_still_names_its_hosts() {
    let broken: Observed<VirtualServiceSpec> = rule(
        "VirtualService",
        "legacy",
        false,
        json!({"hosts": ["checkout"], "http": "not a list"}),
    );
    assert!(broken.spec.is_none());
    assert_eq!(conflicts(&service(), [broken.head()]).len(), 1);
}

// === plan: tables ===

/// A fixed wall-clock time, on a whole second.
fn t0() -> Timestamp {
    "2026-12-06T10:00:00Z".parse().unwrap()
}

/// The cluster as the planner sees it, for driving [`plan`] by hand: a
/// write is applied at once with a new resourceVersion.
#[derive(Default)]
struct Cluster {
    dr: Option<Observed<DestinationRuleSpec>>,
    vs: Option<Observed<VirtualServiceSpec>>,
    due: BTreeMap<String, Timestamp>,
    version: u64,
    header: String,
}

impl Cluster {
    fn new() -> Self {
        Self {
            header: "x-canary-tag".into(),
            ..Self::default()
        }
    }

    fn plan(&self, live: &Live, now: Timestamp) -> Plan {
        plan(&PlanInput {
            service: &service(),
            header: &self.header,
            labels: &labels(),
            live,
            destination_rule: self.dr.as_ref(),
            virtual_service: self.vs.as_ref(),
            due: &self.due,
            now,
            grace: GRACE,
            settings: &RouteSettings::default(),
        })
    }

    fn observe(&mut self, mut json: Value) -> Value {
        self.version += 1;
        json["metadata"]["resourceVersion"] = json!(self.version.to_string());
        json["metadata"]["uid"] = json!("rule-uid");
        json
    }

    /// Plans once and applies the write; the step, if any.
    fn step(&mut self, live: &Live, now: Timestamp) -> Option<Step> {
        let plan = self.plan(live, now);
        self.due = plan.due;
        let step = plan.step?;
        match &step {
            Step::DestinationRule(w) => {
                assert_eq!(w.create, self.dr.is_none());
                assert_eq!(
                    w.resource_version,
                    self.dr.as_ref().and_then(|o| o.resource_version.clone())
                );
                let json = self.observe(w.object.to_json(API));
                self.dr = Some(observe_json(&json));
            }
            Step::VirtualService(w) => {
                assert_eq!(w.create, self.vs.is_none());
                let json = self.observe(w.object.to_json(API));
                self.vs = Some(observe_json(&json));
            }
        }
        self.check(live);
        Some(step)
    }

    /// Steps until nothing is left; the steps as `(kind, added, removed)`.
    fn converge(
        &mut self,
        live: &Live,
        now: Timestamp,
    ) -> Vec<(&'static str, Vec<String>, Vec<String>)> {
        let mut out = Vec::new();
        for _ in 0..10 {
            match self.step(live, now) {
                None => return out,
                Some(Step::DestinationRule(w)) => out.push(("dr", w.added, w.removed)),
                Some(Step::VirtualService(w)) => out.push(("vs", w.added, w.removed)),
            }
        }
        panic!("no convergence: {out:?}");
    }

    fn subsets(&self) -> BTreeMap<String, String> {
        self.dr
            .as_ref()
            .and_then(|o| o.spec.as_ref())
            .map(|s| subsets(s, &labels()).1)
            .unwrap_or_default()
    }

    fn routes(&self) -> BTreeMap<String, String> {
        self.vs
            .as_ref()
            .and_then(|o| o.spec.as_ref())
            .map(|s| vs_routes(s, &self.header).0)
            .unwrap_or_default()
    }

    /// The invariants after every write: every subset any route names
    /// exists, every route has one destination, the default route is last;
    /// and no route names a subset without a ready pod (a header route goes
    /// to a live tag, the default route to `normal` only with a ready
    /// normal pod, else to the Service host).
    fn check(&self, live: &Live) {
        let Some(vs) = self.vs.as_ref().and_then(|o| o.spec.as_ref()) else {
            return;
        };
        let dr = self
            .dr
            .as_ref()
            .and_then(|o| o.spec.as_ref())
            .expect("a VirtualService only after its DestinationRule");
        let names: BTreeSet<&str> = dr.subsets.iter().map(|s| s.name.as_str()).collect();
        let (last, header_routes) = vs.http.split_last().unwrap();
        for route in header_routes {
            assert_eq!(route.route.len(), 1, "one destination per header route");
        }
        for route in &vs.http {
            for d in &route.route {
                if let Some(subset) = d.destination.subset.as_deref() {
                    assert!(names.contains(subset), "route to missing subset {subset}");
                }
            }
        }
        assert!(last.matches.is_empty());
        // A weighted default route: weights add up to 100, each canary's
        // share goes to a live tag's subset.
        if last.route.len() > 1 || last.route[0].weight.is_some() {
            let sum: u32 = last.route.iter().map(|d| d.weight.unwrap()).sum();
            assert_eq!(sum, 100);
            let (_, by_tag) = subsets(dr, &labels());
            for d in &last.route {
                let subset = d.destination.subset.as_deref().unwrap();
                if subset != NORMAL_SUBSET {
                    let tag = by_tag.iter().find(|(_, n)| *n == subset).unwrap().0;
                    assert!(
                        live.tags.contains(tag),
                        "a share of {tag}, which has no ready pod"
                    );
                }
            }
        }
        assert_eq!(
            super::plan::default_route(vs, "checkout"),
            Some(live.default_route()),
            "default route with normal pods ready: {}",
            live.normal
        );
        let (_, tags) = subsets(dr, &labels());
        for (tag, _) in vs_routes(vs, &self.header).0 {
            assert!(
                live.tags.contains(&tag),
                "route to {tag}, which has no ready pod"
            );
            assert!(tags.contains_key(&tag), "route to {tag} without its subset");
        }
    }
}

fn owned(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn from_nothing_the_subsets_come_before_the_routes() {
    let mut c = Cluster::new();
    let t0 = t0();
    let live = live(&["a", "b"]);
    assert_eq!(
        c.converge(&live, t0),
        [
            ("dr", owned(&["a", "b"]), vec![]),
            ("vs", owned(&["a", "b"]), vec![]),
        ]
    );
    let d = desired(
        &service(),
        "x-canary-tag",
        &live,
        &labels(),
        &RouteSettings::default(),
    );
    assert!(
        c.dr.as_ref()
            .unwrap()
            .holds(&d.destination_rule.metadata, &d.destination_rule.spec)
    );
    assert!(
        c.vs.as_ref()
            .unwrap()
            .holds(&d.virtual_service.metadata, &d.virtual_service.spec)
    );
    assert_eq!(c.plan(&live, t0).step, None, "steady state writes nothing");
}

#[test]
fn a_new_tag_gets_its_subset_then_its_route() {
    let mut c = Cluster::new();
    let t0 = t0();
    c.converge(&live(&["a"]), t0);
    let steps = c.converge(&live(&["a", "b"]), t0);
    assert_eq!(
        steps,
        [("dr", owned(&["b"]), vec![]), ("vs", owned(&["b"]), vec![])]
    );
}

#[test]
fn a_tag_that_goes_away_loses_its_route_at_once_and_its_subset_after_the_grace() {
    let mut c = Cluster::new();
    let t0 = t0();
    c.converge(&live(&["a", "b"]), t0);
    let live = live(&["a"]);
    // The route goes first; then the DestinationRule records when the
    // subset may go.
    assert_eq!(
        c.converge(&live, t0),
        [("vs", vec![], owned(&["b"])), ("dr", vec![], vec![])]
    );
    assert!(
        c.subsets().contains_key("b"),
        "subset kept in the grace period"
    );
    assert_eq!(
        c.dr.as_ref().unwrap().removal_due.as_deref(),
        Some(r#"{"b":"2026-12-06T10:01:00Z"}"#)
    );
    let plan = c.plan(&live, t0 + Duration::from_secs(30));
    assert_eq!(plan.step, None);
    assert_eq!(plan.wake_at, Some(t0 + GRACE), "woken when the grace ends");
    assert_eq!(plan.due.get("b"), Some(&(t0 + GRACE)));
    assert_eq!(
        c.converge(&live, t0 + GRACE),
        [("dr", vec![], owned(&["b"]))]
    );
    assert_eq!(c.plan(&live, t0 + GRACE).wake_at, None);
    assert!(c.due.is_empty());
    assert_eq!(c.dr.as_ref().unwrap().removal_due.as_deref(), Some("{}"));
}

/// A restart (or a new leader) forgets what it planned: the time the
/// subset may go is read back from the DestinationRule, not started again.
#[test]
fn the_grace_survives_a_restart() {
    let mut c = Cluster::new();
    let t0 = t0();
    let both = live(&["a", "b"]);
    let only_a = live(&["a"]);
    c.converge(&both, t0);
    c.converge(&only_a, t0);
    c.due.clear();
    let plan = c.plan(&only_a, t0 + Duration::from_secs(45));
    assert_eq!(plan.step, None);
    assert_eq!(plan.wake_at, Some(t0 + GRACE));
    assert_eq!(
        c.converge(&only_a, t0 + GRACE),
        [("dr", vec![], owned(&["b"]))]
    );
    // An annotation that does not read gives the subset a fresh grace.
    c.converge(&both, t0 + GRACE);
    c.converge(&only_a, t0 + GRACE);
    c.due.clear();
    c.dr.as_mut().unwrap().removal_due = Some("not json".into());
    let later = t0 + GRACE + Duration::from_secs(5);
    assert_eq!(c.plan(&only_a, later).wake_at, Some(later + GRACE));
}

/// What a step wrote: the kind, and where the default route went.
fn default_of(step: &Step) -> (&'static str, Option<plan::DefaultChange>) {
    match step {
        Step::DestinationRule(w) => ("dr", w.default),
        Step::VirtualService(w) => ("vs", w.default),
    }
}

#[test]
fn the_default_route_goes_to_normal_only_while_a_normal_pod_is_ready() {
    use plan::DefaultChange;
    let mut c = Cluster::new();
    let t0 = t0();
    // No ready normal pod (pods predating the opt-in, opted out, or gray
    // only): the subset first, the default route to the Service host.
    let first = c.step(&gray_only(&["a"]), t0).unwrap();
    assert_eq!(default_of(&first), ("dr", None));
    let second = c.step(&gray_only(&["a"]), t0).unwrap();
    assert_eq!(
        default_of(&second),
        (
            "vs",
            Some(DefaultChange {
                from: None,
                to: DefaultRoute::Service
            })
        )
    );
    assert_eq!(c.plan(&gray_only(&["a"]), t0).step, None);
    assert!(c.subsets().contains_key("a"));
    // A normal pod turns ready: the subset is there already, one write of
    // the VirtualService.
    let steps: Vec<_> = std::iter::from_fn(|| c.step(&live(&["a"]), t0))
        .map(|s| default_of(&s))
        .collect();
    assert_eq!(
        steps,
        [(
            "vs",
            Some(DefaultChange {
                from: Some(DefaultRoute::Service),
                to: DefaultRoute::Normal
            })
        )]
    );
    // The normal pods go: back to the Service host, at once (there is no
    // grace for a subset without ready pods), and the subset stays.
    let steps: Vec<_> = std::iter::from_fn(|| c.step(&gray_only(&["a"]), t0))
        .map(|s| default_of(&s))
        .collect();
    assert_eq!(
        steps,
        [(
            "vs",
            Some(DefaultChange {
                from: Some(DefaultRoute::Normal),
                to: DefaultRoute::Service
            })
        )]
    );
    let dr = c.dr.as_ref().and_then(|o| o.spec.as_ref()).unwrap();
    assert!(subsets(dr, &labels()).0, "the normal subset stays");
    // A tag change alone leaves the default route as it is.
    let Some(Step::VirtualService(w)) = ({
        c.step(&gray_only(&["a"]), t0);
        c.plan(&gray_only(&[]), t0).step
    }) else {
        panic!("expected a VirtualService write");
    };
    assert_eq!((w.removed, w.default), (owned(&["a"]), None));
}

#[test]
fn a_deleted_destination_rule_is_recreated_before_the_virtual_service_is_touched() {
    let mut c = Cluster::new();
    let t0 = t0();
    c.converge(&live(&["a"]), t0);
    c.dr = None;
    // The VirtualService routes to subsets that are gone: the rule first.
    let steps = c.converge(&live(&["a", "b"]), t0);
    assert_eq!(
        steps,
        [
            ("dr", owned(&["a", "b"]), vec![]),
            ("vs", owned(&["b"]), vec![])
        ]
    );
}

#[test]
fn edited_objects_are_put_back() {
    let mut c = Cluster::new();
    let t0 = t0();
    let live = live(&["a"]);
    c.converge(&live, t0);
    // Someone changes the default route's subset and a selector.
    let mut vs = c.vs.clone().unwrap();
    vs.spec.as_mut().unwrap().http[1].route[0]
        .destination
        .subset = Some("a".into());
    c.vs = Some(vs);
    let mut dr = c.dr.clone().unwrap();
    dr.spec.as_mut().unwrap().subsets[1]
        .labels
        .insert("version".into(), "x".into());
    c.dr = Some(dr);
    // The subset no longer reads as tag a's, so no route may go there.
    let steps = c.converge(&live, t0);
    assert_eq!(steps.len(), 3, "{steps:?}");
    assert_eq!(steps[0].0, "vs");
    assert_eq!(c.plan(&live, t0).step, None);
    assert_eq!(c.routes(), map(&[("a", "a")]));
}

#[test]
fn a_lost_owner_reference_or_label_is_written_again() {
    let mut c = Cluster::new();
    let t0 = t0();
    let live = live(&["a"]);
    c.converge(&live, t0);
    c.dr.as_mut().unwrap().owner_uids.clear();
    let Some(Step::DestinationRule(w)) = c.plan(&live, t0).step else {
        panic!("expected a DestinationRule write");
    };
    assert!(!w.create);
    assert!(w.added.is_empty() && w.removed.is_empty());
}

#[test]
fn existing_subset_names_are_kept() {
    let mut c = Cluster::new();
    let t0 = t0();
    c.converge(&live(&["a"]), t0);
    // An older release named tag a's subset "legacy-a".
    let mut dr = c.dr.clone().unwrap();
    dr.spec.as_mut().unwrap().subsets[1].name = "legacy-a".into();
    c.dr = Some(dr);
    c.vs = None;
    c.converge(&live(&["a"]), t0);
    assert_eq!(c.subsets(), map(&[("a", "legacy-a")]));
    assert_eq!(c.routes(), map(&[("a", "legacy-a")]));
}

#[test]
fn an_unreadable_spec_is_rewritten() {
    let mut c = Cluster::new();
    let t0 = t0();
    c.converge(&live(&["a"]), t0);
    c.vs.as_mut().unwrap().spec = None;
    assert_eq!(
        c.converge(&live(&["a"]), t0),
        [("vs", owned(&["a"]), vec![])]
    );
}

#[test]
fn removal_deletes_the_virtual_service_first_and_never_foreign_objects() {
    let mut c = Cluster::new();
    c.converge(&live(&["a"]), t0());
    let r = plan_removal(c.dr.as_ref(), c.vs.as_ref()).unwrap();
    assert_eq!(r.kind, RuleKind::VirtualService);
    assert_eq!(r.uid.as_deref(), Some("rule-uid"));
    let r = plan_removal(c.dr.as_ref(), None).unwrap();
    assert_eq!(r.kind, RuleKind::DestinationRule);
    c.dr.as_mut().unwrap().managed = false;
    c.vs.as_mut().unwrap().managed = false;
    assert_eq!(plan_removal(c.dr.as_ref(), c.vs.as_ref()), None);
}

// === proptests ===

/// Valid label values, biased towards ones that need mapping.
fn tag() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,10}[a-z0-9]",
        "[A-Za-z0-9][A-Za-z0-9._-]{0,20}[A-Za-z0-9]",
        "[A-Za-z0-9]([A-Za-z0-9._-]{61}[A-Za-z0-9])?",
        Just("normal".to_owned()),
        Just("a--b".to_owned()),
    ]
}

proptest! {
    #[test]
    fn desired_objects_keep_every_promise(
        live in prop::collection::btree_set(tag(), 0..12),
        normal in any::<bool>(),
    ) {
        let l = labels();
        let d = desired(&service(), "x-canary-tag", &Live::new(normal, live.clone()), &l, &RouteSettings::default());
        let subsets = &d.destination_rule.spec.subsets;
        // Subset names: unique DNS-1123 labels, normal first and only once.
        let names: BTreeSet<&str> = subsets.iter().map(|s| s.name.as_str()).collect();
        prop_assert_eq!(names.len(), subsets.len());
        prop_assert!(names.iter().all(|n| is_dns_label(n)));
        prop_assert_eq!(subsets[0].name.as_str(), NORMAL_SUBSET);
        // Every live tag: exactly one subset and one header route to it.
        let (_, by_tag) = super::plan::subsets(&d.destination_rule.spec, &l);
        prop_assert_eq!(by_tag.keys().cloned().collect::<BTreeSet<_>>(), live.clone());
        prop_assert_eq!(subsets.len(), live.len() + 1);
        let (routed, referenced) = vs_routes(&d.virtual_service.spec, "x-canary-tag");
        prop_assert_eq!(&routed, &by_tag);
        // No route names a missing subset; every route has one destination.
        prop_assert!(referenced.iter().all(|s| names.contains(s.as_str())));
        // No route names a subset without ready pods: the live tags' and
        // `normal` only with a ready normal pod.
        let ready: BTreeSet<&str> = by_tag
            .values()
            .map(String::as_str)
            .chain(normal.then_some(NORMAL_SUBSET))
            .collect();
        prop_assert!(referenced.iter().all(|s| ready.contains(s.as_str())), "{:?}", referenced);
        let http = &d.virtual_service.spec.http;
        prop_assert!(http.iter().all(|r| r.route.len() == 1));
        prop_assert!(http.iter().all(|r| r.route[0].destination.host == "checkout"));
        prop_assert_eq!(http.len(), live.len() + 1);
        // The default route is last, matches everything, goes to normal
        // with a ready normal pod and to the whole Service without one.
        let last = http.last().unwrap();
        prop_assert!(last.matches.is_empty());
        let expected = normal.then_some(NORMAL_SUBSET);
        prop_assert_eq!(last.route[0].destination.subset.as_deref(), expected);
        prop_assert!(http[..http.len() - 1].iter().all(|r| r.matches.len() == 1));
    }

    #[test]
    fn names_do_not_depend_on_input_order(
        live in prop::collection::vec(tag(), 0..12),
        seed in any::<u64>(),
    ) {
        let mut shuffled = live.clone();
        // A deterministic shuffle from the seed.
        let mut s = seed;
        for i in (1..shuffled.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (s >> 33) as usize % (i + 1));
        }
        let a = assign_names(live.iter().map(String::as_str), &BTreeMap::new());
        let b = assign_names(shuffled.iter().map(String::as_str), &BTreeMap::new());
        prop_assert_eq!(&a, &b);
        let set = Live::new(true, live);
        let shuffled_set = Live::new(true, shuffled);
        prop_assert_eq!(
            desired(&service(), "h", &set, &labels(), &RouteSettings::default()),
            desired(&service(), "h", &shuffled_set, &labels(), &RouteSettings::default())
        );
    }

    /// Random histories of weighted canaries: after every single write the
    /// default route's weights add up to 100 and name only subsets the
    /// DestinationRule holds; without weights the routes carry none.
    #[test]
    fn weights_always_add_up_and_name_only_existing_subsets(
        history in prop::collection::vec(
            (
                prop::collection::btree_map(
                    prop::sample::select(vec!["a", "b", "c", "d"]),
                    prop::option::of(0u8..=60),
                    0..4,
                ),
                any::<bool>(),
            ),
            1..10,
        ),
    ) {
        let mut c = Cluster::new();
        let t0 = t0();
        for (set, normal) in history {
            let mut live = Live::new(normal, set.keys().copied());
            for (tag, w) in &set {
                if let Some(w) = w {
                    live = live.with_weight(tag, TagWeight::Percent(*w));
                }
            }
            for _ in 0..10 {
                if c.step(&live, t0).is_none() {
                    break;
                }
                let vs = c.vs.as_ref().and_then(|o| o.spec.as_ref());
                let dr = c.dr.as_ref().and_then(|o| o.spec.as_ref());
                let (Some(vs), Some(dr)) = (vs, dr) else { continue };
                let names: BTreeSet<&str> = dr.subsets.iter().map(|s| s.name.as_str()).collect();
                let last = vs.http.last().unwrap();
                if last.route.len() > 1 || last.route[0].weight.is_some() {
                    let sum: u32 = last.route.iter().map(|d| d.weight.unwrap()).sum();
                    prop_assert_eq!(sum, 100);
                    for d in &last.route {
                        let subset = d.destination.subset.as_deref().unwrap();
                        prop_assert!(names.contains(subset), "{} not in the DR", subset);
                    }
                }
                if set.values().all(Option::is_none) {
                    prop_assert!(vs.http.iter().all(|r| r.route.iter().all(|d| d.weight.is_none())));
                }
            }
        }
    }

    /// Random histories of live sets (tags, and whether a normal pod is
    /// ready) over time: after every single write no route names a missing
    /// subset or a subset without ready pods (checked in `step`); a subset
    /// goes only after its tag has been gone for the grace period; after
    /// each change the routes are exactly the live tags and the default
    /// route goes to `normal` exactly while a normal pod is ready; and once
    /// the grace has passed the objects are exactly the desired ones.
    #[test]
    fn make_before_break_holds_over_any_history(
        history in prop::collection::vec(
            (
                prop::collection::btree_set(prop::sample::select(vec!["a", "B_2", "c.3", "normal", "d"]), 0..5),
                any::<bool>(),
                0u64..90,
            ),
            1..12,
        ),
    ) {
        let mut c = Cluster::new();
        let t0 = t0();
        let mut now = t0;
        let mut went_away: BTreeMap<String, Timestamp> = BTreeMap::new();
        let mut live = Live::default();
        for (set, normal, wait) in history {
            now += Duration::from_secs(wait);
            let next = Live::new(normal, set);
            for t in live.tags.difference(&next.tags) {
                went_away.insert(t.clone(), now);
            }
            for t in &next.tags {
                went_away.remove(t);
            }
            live = next;
            let before = c.subsets();
            c.converge(&live, now);
            for tag in before.keys().filter(|t| !c.subsets().contains_key(*t)) {
                let since = went_away.get(tag).expect("only gone tags lose their subset");
                prop_assert!(now >= *since + GRACE, "{tag} removed early");
            }
            prop_assert_eq!(c.routes().keys().cloned().collect::<BTreeSet<_>>(), live.tags.clone());
            prop_assert!(live.tags.iter().all(|t| c.subsets().contains_key(t)));
            let vs = c.vs.as_ref().and_then(|o| o.spec.as_ref()).unwrap();
            prop_assert_eq!(super::plan::default_route(vs, "checkout"), Some(live.default_route()));
        }
        now += GRACE;
        c.converge(&live, now);
        let d = desired(&service(), "x-canary-tag", &live, &labels(), &RouteSettings::default());
        let dr = c.dr.as_ref().unwrap();
        let vs = c.vs.as_ref().unwrap();
        // Same tags, same shape (names may be older ones: compare by tag).
        prop_assert_eq!(c.subsets().keys().cloned().collect::<BTreeSet<_>>(), live.tags.clone());
        prop_assert_eq!(dr.spec.as_ref().unwrap().subsets.len(), d.destination_rule.spec.subsets.len());
        prop_assert_eq!(vs.spec.as_ref().unwrap().http.len(), d.virtual_service.spec.http.len());
        prop_assert_eq!(c.plan(&live, now).step, None);
    }
}
