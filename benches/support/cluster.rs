//! A synthetic cluster for the routes benchmarks, generated one object at a
//! time and fed to the index through the same conversions as the
//! controller's watch events (so the input never sits in memory whole).
//!
//! Shape: `services` Services spread over namespaces of 20, each with one
//! EndpointSlice of `pods_per_service` endpoints. Every pod is a canary
//! (the worst case for the pod cache, which holds normal pods and canaries,
//! a canary's row with its tag), with three tags per Service; one endpoint
//! per Service is not ready. With no normal pod, the default routes go to
//! the whole Service. Pod
//! metadata looks like an Istio-injected pod's (labels, sidecar status
//! annotation, ownerReference). Each Service has its DestinationRule and
//! VirtualService in step, so a reconcile writes nothing.

use std::collections::{BTreeMap, BTreeSet};

use canary_injector::config::Config;
use canary_injector::routes::index::{Change, Index, Key};
use canary_injector::routes::objects::{DestinationRuleSpec, VirtualServiceSpec};
use canary_injector::routes::{Live, ServiceRef, desired};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::DynamicObject;
use serde_json::json;

/// Services per namespace.
const NAMESPACE_SIZE: usize = 20;

/// How big the cluster is.
#[derive(Clone, Copy)]
pub struct Shape {
    pub services: usize,
    pub pods_per_service: usize,
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        uid: Some(format!("{:032x}", fnv(name))),
        resource_version: Some("123456".into()),
        ..ObjectMeta::default()
    }
}

fn dynamic(value: serde_json::Value) -> DynamicObject {
    serde_json::from_value(value).expect("a valid object")
}

impl Shape {
    fn namespace_of(&self, s: usize) -> String {
        format!("team-{:03}", s / NAMESPACE_SIZE)
    }

    fn app(&self, s: usize) -> String {
        format!("service-{s:04}")
    }

    fn tag(&self, p: usize) -> String {
        format!("feature-{}", p % 3)
    }

    fn pod_name(&self, s: usize, p: usize) -> String {
        let (app, tag) = (self.app(s), self.tag(p));
        format!(
            "{app}-{tag}-{:010x}-{p:05}",
            fnv(&format!("{app}{tag}")) & 0xff_ffff_ffff
        )
    }

    /// The opted-in namespaces.
    pub fn namespaces(&self) -> impl Iterator<Item = ObjectMeta> + '_ {
        (0..self.services.div_ceil(NAMESPACE_SIZE)).map(|n| {
            let name = format!("team-{n:03}");
            ObjectMeta {
                labels: Some(BTreeMap::from([
                    ("canary-injection".into(), "enabled".into()),
                    ("kubernetes.io/metadata.name".into(), name.clone()),
                ])),
                namespace: None,
                ..meta("", &name)
            }
        })
    }

    /// Service `s`, annotated for routes.
    pub fn service(&self, s: usize) -> ObjectMeta {
        let mut m = meta(&self.namespace_of(s), &self.app(s));
        m.annotations = Some(BTreeMap::from([(
            "canary-injector.io/routes".into(),
            "true".into(),
        )]));
        m
    }

    /// Pod `p` of Service `s`: an Istio-injected canary.
    pub fn pod(&self, s: usize, p: usize) -> ObjectMeta {
        let (app, tag, name) = (self.app(s), self.tag(p), self.pod_name(s, p));
        let hash = format!("{:010x}", fnv(&format!("{app}{tag}")) & 0xff_ffff_ffff);
        let mut m = meta(&self.namespace_of(s), &name);
        m.generate_name = Some(format!("{app}-{tag}-{hash}-"));
        m.labels = Some(BTreeMap::from([
            ("app".into(), app.clone()),
            ("version".into(), tag.clone()),
            ("pod-template-hash".into(), hash.clone()),
            ("canarytag".into(), tag.clone()),
            ("stage".into(), "gray".into()),
            ("security.istio.io/tlsMode".into(), "istio".into()),
            ("service.istio.io/canonical-name".into(), app.clone()),
            ("service.istio.io/canonical-revision".into(), tag.clone()),
        ]));
        m.annotations = Some(BTreeMap::from([
            ("prometheus.io/scrape".into(), "true".into()),
            ("prometheus.io/port".into(), "15020".into()),
            ("sidecar.istio.io/status".into(), r#"{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":["istio-envoy","istio-data","istio-podinfo","istio-token","istiod-ca-cert"],"imagePullSecrets":null,"revision":"default"}"#.into()),
        ]));
        m.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            name: format!("{app}-{tag}-{hash}"),
            uid: format!("{:032x}", fnv(&hash)),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]);
        m
    }

    fn ready(&self, p: usize) -> bool {
        p != 0
    }

    /// The EndpointSlice of Service `s`.
    pub fn slice(&self, s: usize) -> DynamicObject {
        let (ns, app) = (self.namespace_of(s), self.app(s));
        let endpoints: Vec<_> = (0..self.pods_per_service)
            .map(|p| {
                let (name, ready) = (self.pod_name(s, p), self.ready(p));
                json!({
                    "addresses": [format!("10.{}.{}.{}", s / 256, s % 256, p)],
                    "conditions": {"ready": ready, "serving": ready, "terminating": false},
                    "nodeName": format!("node-{:03}", (s + p) % 100),
                    "zone": "eu-west-1a",
                    "targetRef": {"kind": "Pod", "name": name, "namespace": ns, "uid": format!("{:032x}", fnv(&name))},
                })
            })
            .collect();
        dynamic(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{app}-x7k2p"), "namespace": ns, "resourceVersion": "1",
                         "labels": {"kubernetes.io/service-name": app,
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }))
    }

    /// The DestinationRule and VirtualService of Service `s`, in step.
    pub fn rules(&self, s: usize) -> (DynamicObject, DynamicObject) {
        let cfg = Config::default();
        let live = Live::new(
            false,
            (0..self.pods_per_service)
                .filter(|p| self.ready(*p))
                .map(|p| self.tag(p)),
        );
        let service = ServiceRef {
            namespace: self.namespace_of(s),
            name: self.app(s),
            uid: self.service(s).uid,
        };
        let d = desired(
            &service,
            &cfg.routes.header,
            &live,
            &cfg.labels,
            &Default::default(),
        );
        let rule = |mut json: serde_json::Value, salt: &str| {
            json["metadata"]["resourceVersion"] = json!("42");
            json["metadata"]["uid"] =
                json!(format!("{:032x}", fnv(&format!("{}{salt}", service.name))));
            dynamic(json)
        };
        (
            rule(d.destination_rule.to_json("networking.istio.io/v1"), "dr"),
            rule(d.virtual_service.to_json("networking.istio.io/v1"), "vs"),
        )
    }
}

/// A watch's initial list of `rows`.
fn listed<V>(rows: impl Iterator<Item = (Key, Option<V>)>) -> impl Iterator<Item = Change<V>> {
    std::iter::once(Change::Init)
        .chain(rows.map(|(k, v)| Change::Listed(k, v)))
        .chain(std::iter::once(Change::InitDone))
}

/// Lists every object of `shape` into `index`, as the watches' initial
/// lists do, generating each object only when it is applied.
#[allow(dead_code)] // each bench uses one of the two
pub fn fill(index: &mut Index, shape: Shape) {
    fill_with(index, shape, |_| {});
}

/// [`fill`], calling `after` with the kind's name after each kind.
pub fn fill_with(index: &mut Index, shape: Shape, mut after: impl FnMut(&str)) {
    let mut dirty = BTreeSet::new();
    let rows: Vec<_> = shape
        .namespaces()
        .map(|m| index.namespace_row(&m))
        .collect();
    for c in listed(rows.into_iter()) {
        index.apply_namespace(c, &mut dirty);
    }
    after("namespaces");
    for c in listed((0..shape.services).map(|s| Index::service_row(&shape.service(s)))) {
        index.apply_service(c, &mut dirty);
    }
    after("services");
    index.apply_pod(Change::Init, &mut dirty);
    for s in 0..shape.services {
        for p in 0..shape.pods_per_service {
            let (k, v) = index.pod_row(&shape.pod(s, p));
            index.apply_pod(Change::Listed(k, v), &mut dirty);
        }
    }
    index.apply_pod(Change::InitDone, &mut dirty);
    after("pods");
    for c in listed((0..shape.services).map(|s| Index::slice_row(shape.slice(s)))) {
        index.apply_slice(c, &mut dirty);
    }
    after("endpointslices");
    let drs = (0..shape.services).map(|s| Index::rule_row::<DestinationRuleSpec>(shape.rules(s).0));
    for c in listed(drs) {
        index.apply_destination_rule(c, &mut dirty);
    }
    after("destinationrules");
    let vss = (0..shape.services).map(|s| Index::rule_row::<VirtualServiceSpec>(shape.rules(s).1));
    for c in listed(vss) {
        index.apply_virtual_service(c, &mut dirty);
    }
    after("virtualservices");
}
