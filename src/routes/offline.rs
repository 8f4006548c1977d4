//! `canary-injector routes -f FILE|-`: the DestinationRule and
//! VirtualService of every Service in the input annotated
//! `canary-injector.io/routes: "true"`, from the workloads in the same
//! input, for review and commit (GitOps).
//!
//! The workloads first go through the same label rules as `mutate -f`
//! ([`crate::offline::mutate_documents`]), so a tag annotation counts as
//! the label it becomes. Then a tag is live for a Service when a workload
//! of its namespace (a Pod, or the pod template of a ReplicaSet,
//! Deployment, StatefulSet, DaemonSet, Job or CronJob that is not scaled to
//! 0) matches the Service's selector and is a canary ([`super::pod_tag`]);
//! likewise the default route goes to subset `normal` only when such a
//! workload is a normal pod (`<stage>: <normalStage>`), else to the whole
//! Service (with a warning), as the controller does when no normal pod is
//! ready. There is no readiness offline: what the input deploys counts as
//! ready, so give it the Service's workloads along with the Service.
//! The objects are [`super::desired`], the function the controller
//! converges to; without a Service uid they carry no ownerReference.
//!
//! On the Gateway API (`--api gateway-api`, or a Service annotated
//! `canary-injector.io/route-api: gateway-api`) they are
//! [`super::gateway::desired`] instead: the version Services and the
//! HTTPRoutes. Offline every version Service counts as having a ready
//! endpoint, so every live tag gets its rule at once.

use std::collections::BTreeMap;

use serde_json::Value;

use super::gateway::{self, RouteApi, ServiceShape, route_api};
use super::shape::{self, WeightTally, route_settings};
use super::{
    Live, PodStage, ServiceRef, TagWeight, desired, pod_stage, route_header, wants_routes,
};
use crate::config::Config;
use crate::mutate::{Kind, LabelPolicy, Location, ObjectView};
use crate::offline::{self, OfflineError, Output};

/// A Service of the input that asks for routes.
struct Routed {
    index: usize,
    service: ServiceRef,
    selector: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    /// `spec`, for its shape on the Gateway API.
    spec: Value,
}

/// Which objects `routes -f` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// DestinationRules and VirtualServices of this `apiVersion`
    /// (`networking.istio.io/v1beta1`).
    Istio(String),
    /// Version Services and HTTPRoutes (`gateway.networking.k8s.io/v1`).
    GatewayApi,
}

/// The pod labels of one workload of the input.
pub(crate) struct Workload {
    /// Its namespace (empty when the document names none).
    pub(crate) namespace: String,
    /// The labels its pods get.
    pub(crate) labels: BTreeMap<String, String>,
    /// The annotations its pods get (the canary weight is one).
    pub(crate) annotations: BTreeMap<String, String>,
}

/// What is live for a Service of `namespace` with `selector` among
/// `workloads`: each matching workload stands for its pods, all ready
/// (their stages, and the weights its canaries ask for).
pub(crate) fn workloads_live(
    workloads: &[Workload],
    namespace: &str,
    selector: &BTreeMap<String, String>,
    labels: &LabelPolicy,
) -> Live {
    let mut live = Live::default();
    let mut tallies: BTreeMap<&str, WeightTally> = BTreeMap::new();
    for w in workloads
        .iter()
        .filter(|w| w.namespace == namespace && !selector.is_empty())
        .filter(|w| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
    {
        match pod_stage(labels, &w.labels) {
            Some(PodStage::Normal) => live.normal = true,
            Some(PodStage::Canary(tag)) => {
                live.tags.insert(tag.to_owned());
                tallies
                    .entry(tag)
                    .or_default()
                    .add(shape::pod_weight(Some(&w.annotations)).as_ref());
            }
            None => {}
        }
    }
    live.weights = tallies
        .into_iter()
        .filter_map(|(tag, t)| Some((tag.to_owned(), t.weight()?)))
        .collect();
    live
}

fn text<'a>(doc: &'a Value, pointer: &str) -> Option<&'a str> {
    doc.pointer(pointer).and_then(Value::as_str)
}

pub(crate) fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect()
}

/// The documents of `yaml` (named `source_name` in errors), `kind: List`
/// items in their place, with their 1-based document number.
pub(crate) fn documents(
    yaml: &str,
    source_name: &str,
) -> Result<Vec<(usize, Value)>, OfflineError> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).map_err(|e| OfflineError::Parse {
        source_name: source_name.to_owned(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate().filter(|(_, d)| !d.is_null()) {
        match doc.get("items").and_then(Value::as_array) {
            Some(items) if text(&doc, "/kind") == Some("List") => {
                out.extend(items.iter().map(|item| (i + 1, item.clone())));
            }
            _ => out.push((i + 1, doc)),
        }
    }
    Ok(out)
}

/// The pod labels of a workload document, `None` for anything else or a
/// workload scaled to 0.
pub(crate) fn workload(doc: &Value) -> Option<Workload> {
    let kind_name = text(doc, "/kind")?;
    let kind = match text(doc, "/apiVersion") {
        Some(api_version) => Kind::from_api_version(api_version, kind_name),
        None => Kind::from_name(kind_name),
    }?;
    if doc.pointer("/spec/replicas").and_then(Value::as_u64) == Some(0) {
        return None;
    }
    let view = ObjectView::from_value(doc.clone()).ok()?;
    let meta = match kind.info().pod {
        Location::Object => view.metadata.as_ref()?,
        location => view.template_at(location)?.metadata.as_ref()?,
    };
    let owned = |m: &crate::mutate::TextMap<'_>| -> BTreeMap<String, String> {
        m.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    Some(Workload {
        namespace: text(doc, "/metadata/namespace")
            .unwrap_or_default()
            .to_owned(),
        labels: owned(meta.labels.as_ref()?),
        annotations: meta.annotations.as_ref().map(owned).unwrap_or_default(),
    })
}

/// Prints the routes of `input` (named `source_name` in errors; see the
/// module docs) as YAML documents, per Service in namespace and name order:
/// a DestinationRule and a VirtualService for [`Target::Istio`], the
/// version Services and HTTPRoutes for [`Target::GatewayApi`] (a Service's
/// `canary-injector.io/route-api` annotation chooses for it). A document the label rules refuse is
/// reported in [`Output::refused`] (its pods count with the labels they
/// have), as `mutate -f` does; input that cannot be read is an error.
pub fn routes_documents(
    input: &str,
    source_name: &str,
    cfg: &Config,
    target: &Target,
) -> Result<Output, OfflineError> {
    // The label rules, without the sidecar keepalive fix (it changes no label).
    let mut rules = cfg.clone();
    rules.bootstrap.enabled = false;
    let mutated = offline::mutate_documents(input, source_name, &rules, false)?;
    let mut warnings = mutated.warnings;

    // Workloads as the rules leave them; Services and Namespaces (which the
    // rules never change) from the input, so document numbers are the input's.
    let workloads: Vec<Workload> = documents(&mutated.text, source_name)?
        .iter()
        .filter_map(|(_, doc)| workload(doc))
        .collect();
    let mut services = Vec::new();
    let mut namespaces: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (index, doc) in documents(input, source_name)? {
        let core = matches!(text(&doc, "/apiVersion"), None | Some("v1"));
        match text(&doc, "/kind") {
            Some("Service") if core => {
                let annotations = string_map(doc.pointer("/metadata/annotations"));
                if !wants_routes(Some(&annotations)) {
                    continue;
                }
                let namespace = text(&doc, "/metadata/namespace").unwrap_or_default();
                if cfg.namespaces.is_excluded(namespace) {
                    warnings.push(format!(
                        "document {index} (Service {}): namespace {namespace} is excluded \
                         (namespaces.excluded); no routes",
                        text(&doc, "/metadata/name").unwrap_or_default()
                    ));
                    continue;
                }
                services.push(Routed {
                    index,
                    service: ServiceRef {
                        namespace: text(&doc, "/metadata/namespace").unwrap_or_default().into(),
                        name: text(&doc, "/metadata/name").unwrap_or_default().into(),
                        uid: text(&doc, "/metadata/uid").map(str::to_owned),
                    },
                    selector: string_map(doc.pointer("/spec/selector")),
                    annotations,
                    spec: doc.get("spec").cloned().unwrap_or(Value::Null),
                });
            }
            Some("Namespace") if core => {
                let name = text(&doc, "/metadata/name").unwrap_or_default().to_owned();
                namespaces.insert(name, string_map(doc.pointer("/metadata/labels")));
            }
            _ => {}
        }
    }
    services.sort_by(|a, b| a.service.cmp(&b.service));

    let defaults = cfg.routes.route_settings().unwrap_or_default();
    let mut out = Vec::new();
    for s in &services {
        let name = &s.service.name;
        let malformed = |reason: String| OfflineError::Malformed {
            index: s.index,
            kind: "Service".into(),
            name: name.clone(),
            reason,
        };
        let header = route_header(Some(&s.annotations), &cfg.routes.header)
            .map_err(|e| malformed(e.to_string()))?;
        let api = match route_api(Some(&s.annotations)).map_err(|e| malformed(e.to_string()))? {
            Some(RouteApi::Istio) if *target == Target::GatewayApi => {
                Target::Istio(format!("{}/v1beta1", super::objects::GROUP))
            }
            Some(RouteApi::GatewayApi) => Target::GatewayApi,
            _ => target.clone(),
        };
        // The Service's shape on the Gateway API; `None` on Istio's.
        let shape = match &api {
            Target::GatewayApi => match ServiceShape::from_spec(&s.spec) {
                Ok(shape) => Some(shape),
                Err(problem) => {
                    warnings.push(format!(
                        "document {} (Service {name}): not routed on the Gateway API: {problem}",
                        s.index
                    ));
                    continue;
                }
            },
            Target::Istio(_) => None,
        };
        if s.selector.is_empty() {
            warnings.push(format!(
                "document {} (Service {name}): no selector; no canary is routed and the default \
                 route goes to the whole Service",
                s.index
            ));
        }
        if let Some(labels) = namespaces.get(&s.service.namespace)
            && !cfg
                .namespaces
                .opt_in
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
        {
            warnings.push(format!(
                "document {} (Service {name}): namespace {} is not opted in ({}); the webhook \
                 labels no pod there and the controller routes nothing there",
                s.index,
                s.service.namespace,
                cfg.namespaces.opt_in_selector()
            ));
        }
        let mut live = workloads_live(&workloads, &s.service.namespace, &s.selector, &cfg.labels);
        for (tag, w) in &live.weights {
            if let TagWeight::Invalid(problem) = w {
                warnings.push(format!(
                    "document {} (Service {name}): canary {tag}: {problem}; it counts as 0",
                    s.index
                ));
            }
        }
        let routed: BTreeMap<String, String> =
            live.tags.iter().map(|t| (t.clone(), t.clone())).collect();
        if let Err(sum) = super::weighted(&routed, &live, live.default_route()) {
            warnings.push(format!(
                "document {} (Service {name}): the weights of its canaries add up to {sum}, more \
                 than 100; written without weights (the controller keeps the split it had)",
                s.index
            ));
            live.weights.clear();
        }
        let (mut settings, mut invalid) = route_settings(Some(&s.annotations), &defaults);
        if shape.is_some()
            && let Some(bad) = gateway::unsupported(&settings)
        {
            settings.retries = None;
            invalid.push(bad);
        }
        for bad in invalid {
            warnings.push(format!(
                "document {} (Service {name}): {bad}; the routes are written without it",
                s.index
            ));
        }
        if !live.normal && !s.selector.is_empty() {
            warnings.push(format!(
                "document {} (Service {name}): no workload in the input is a normal pod of it \
                 ({}={}); its default route goes to the whole Service (every ready endpoint) \
                 instead of subset normal",
                s.index, cfg.labels.stage, cfg.labels.normal_stage
            ));
        }
        if let Some(shape) = &shape {
            let d = gateway::desired(&s.service, shape, header, &live, &cfg.labels, &settings);
            out.extend(d.services.iter().map(gateway::VersionService::to_json));
            out.extend(d.routes.iter().map(gateway::HttpRoute::to_json));
        } else if let Target::Istio(api_version) = &api {
            let d = desired(&s.service, header, &live, &cfg.labels, &settings);
            out.push(d.destination_rule.to_json(api_version));
            out.push(d.virtual_service.to_json(api_version));
        }
    }
    if services.is_empty() {
        warnings.push(format!(
            "no Service in the input is annotated {}: \"true\"",
            super::ROUTES_ANNOTATION
        ));
    }
    let mut text = if out.is_empty() {
        String::new()
    } else {
        serde_saphyr::to_string_multiple(&out).map_err(|e| OfflineError::Render(e.to_string()))?
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(Output {
        text,
        warnings,
        refused: mutated.refused,
        documents: mutated.documents,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const API: &str = "networking.istio.io/v1beta1";

    fn run(input: &str) -> (Vec<Value>, Vec<String>) {
        let out = routes_documents(
            input,
            "<stdin>",
            &Config::default(),
            &Target::Istio(API.into()),
        )
        .unwrap();
        let docs = if out.text.is_empty() {
            Vec::new()
        } else {
            serde_saphyr::from_multiple(&out.text).unwrap()
        };
        (docs, out.warnings)
    }

    fn subset_tags(dr: &Value) -> Vec<String> {
        dr["spec"]["subsets"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["labels"]["canarytag"].as_str().map(str::to_owned))
            .collect()
    }

    #[test]
    fn a_list_of_workloads_routes_the_canaries_its_service_selects() {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "web", "namespace": "shop",
                          "annotations": {"canary-injector.io/routes": "true"}},
             "spec": {"selector": {"app": "web"}}},
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "web-x", "namespace": "shop",
                          "labels": {"app": "web"}, "annotations": {"canary-injector.io/tag": "x"}}},
            {"apiVersion": "apps/v1", "kind": "Deployment",
             "metadata": {"name": "web-zero", "namespace": "shop"},
             "spec": {"replicas": 0, "template": {"metadata": {"labels": {"app": "web"},
                       "annotations": {"canary-injector.io/tag": "scaled-down"}}}}},
            {"apiVersion": "apps/v1", "kind": "Deployment",
             "metadata": {"name": "other-ns", "namespace": "cart"},
             "spec": {"template": {"metadata": {"labels": {"app": "web"},
                       "annotations": {"canary-injector.io/tag": "elsewhere"}}}}},
        ]});
        let (docs, warnings) = run(&list.to_string());
        assert_eq!(docs.len(), 2);
        assert_eq!(subset_tags(&docs[0]), ["x"]);
        assert_eq!(docs[0]["apiVersion"], API);
        // Only a canary: requests without the header go to the whole
        // Service, not to a subset no pod is in.
        assert_eq!(
            docs[1]["spec"]["http"][1],
            json!({"route": [{"destination": {"host": "web"}}]})
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0]
                .contains("document 1 (Service web): no workload in the input is a normal pod"),
            "{warnings:?}"
        );

        // With the normal release in the input, the default route goes to normal.
        let mut list = list;
        list["items"].as_array_mut().unwrap().push(json!(
            {"apiVersion": "apps/v1", "kind": "Deployment",
             "metadata": {"name": "web", "namespace": "shop"},
             "spec": {"template": {"metadata": {"labels": {"app": "web"}}}}}));
        let (docs, warnings) = run(&list.to_string());
        assert_eq!(
            docs[1]["spec"]["http"][1],
            json!({"name": "normal", "route": [{"destination": {"host": "web", "subset": "normal"}}]})
        );
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn excluded_namespaces_get_no_routes() {
        let (docs, warnings) = run("apiVersion: v1\nkind: Service\nmetadata:\n  name: dns\n  \
             namespace: kube-system\n  annotations: {canary-injector.io/routes: \"true\"}\n");
        assert!(docs.is_empty());
        assert!(
            warnings[0].contains("namespace kube-system is excluded"),
            "{warnings:?}"
        );
    }

    #[test]
    fn nothing_to_route_says_so() {
        let (docs, warnings) = run("apiVersion: v1\nkind: Service\nmetadata: {name: a}\n");
        assert!(docs.is_empty());
        assert_eq!(
            warnings,
            ["no Service in the input is annotated canary-injector.io/routes: \"true\""]
        );
    }

    #[test]
    fn an_invalid_header_annotation_is_an_error_naming_the_service() {
        let input = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  annotations:\n    \
                     canary-injector.io/routes: \"true\"\n    canary-injector.io/route-header: X-Tag\n";
        let err = routes_documents(
            input,
            "<stdin>",
            &Config::default(),
            &Target::Istio(API.into()),
        )
        .unwrap_err();
        assert!(
            matches!(err, OfflineError::Malformed { index: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("Service a"), "{err}");
        assert!(err.to_string().contains("X-Tag"), "{err}");
    }

    #[test]
    fn a_namespace_that_is_not_opted_in_and_a_service_without_selector_are_warned_about() {
        let input = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
                     apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  namespace: shop\n  \
                     annotations: {canary-injector.io/routes: \"true\"}\n";
        let (docs, warnings) = run(input);
        assert_eq!(docs.len(), 2);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("no selector"), "{warnings:?}");
        assert!(
            warnings[1].contains("not opted in (canary-injection=enabled)"),
            "{warnings:?}"
        );
    }
    fn gateway(input: &str, cfg: &Config) -> (Vec<Value>, Vec<String>) {
        let out = routes_documents(input, "<stdin>", cfg, &Target::GatewayApi).unwrap();
        if out.text.is_empty() {
            return (Vec::new(), out.warnings);
        }
        (
            serde_saphyr::from_multiple(&out.text).unwrap(),
            out.warnings,
        )
    }

    fn kinds_and_names(docs: &[Value]) -> Vec<String> {
        docs.iter()
            .map(|d| {
                format!(
                    "{} {}",
                    d["kind"].as_str().unwrap(),
                    d["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect()
    }

    const GATEWAY_INPUT: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations: {canary-injector.io/routes: "true", canary-injector.io/route-retries: "2"}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: web:1}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web-beta, namespace: shop}
spec:
  template:
    metadata:
      labels: {app: web}
      annotations: {canary-injector.io/tag: beta, canary-injector.io/weight: "10"}
    spec: {containers: [{name: web, image: web:2}]}
"#;

    #[test]
    fn on_the_gateway_api_it_prints_the_version_services_and_the_route() {
        let (docs, warnings) = gateway(GATEWAY_INPUT, &Config::default());
        assert_eq!(
            kinds_and_names(&docs),
            ["Service web--normal", "Service web--beta", "HTTPRoute web"]
        );
        assert_eq!(
            docs[1]["spec"]["selector"],
            json!({"app": "web", "stage": "gray", "canarytag": "beta"})
        );
        assert_eq!(
            docs[1]["spec"]["ports"],
            json!([{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}])
        );
        assert_eq!(
            docs[1]["metadata"]["labels"]["canary-injector.io/route-of"],
            "web"
        );
        let rules = &docs[2]["spec"]["rules"];
        assert_eq!(rules[0]["matches"][0]["headers"][0]["value"], "beta");
        assert_eq!(rules[0]["backendRefs"][0]["name"], "web--beta");
        // The weighted gray stage: 10 to beta, the rest to normal.
        let default: Vec<(String, u64)> = rules[1]["backendRefs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["name"].as_str().unwrap().to_owned(),
                    b["weight"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            default,
            [("web--normal".to_owned(), 90), ("web--beta".to_owned(), 10)]
        );
        // Retries are not written on the Gateway API, and it says so.
        assert!(rules.to_string().find("retr").is_none(), "{rules}");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("canary-injector.io/route-retries")
                && warnings[0].contains("Gateway API"),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_service_chooses_its_api_and_a_bad_choice_or_shape_is_said() {
        // The annotation wins over --api, both ways.
        let istio_one = GATEWAY_INPUT.replacen(
            "canary-injector.io/routes: \"true\",",
            "canary-injector.io/routes: \"true\", canary-injector.io/route-api: istio,",
            1,
        );
        let (docs, _) = gateway(&istio_one, &Config::default());
        assert_eq!(
            kinds_and_names(&docs),
            ["DestinationRule web", "VirtualService web"]
        );
        let gateway_one = GATEWAY_INPUT.replacen(
            "canary-injector.io/routes: \"true\",",
            "canary-injector.io/routes: \"true\", canary-injector.io/route-api: gateway-api,",
            1,
        );
        let (docs, _) = run(&gateway_one);
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[2]["kind"], "HTTPRoute");

        // An unknown API: an error naming the Service and the value.
        let bad = GATEWAY_INPUT.replacen(
            "canary-injector.io/routes: \"true\",",
            "canary-injector.io/routes: \"true\", canary-injector.io/route-api: linkerd,",
            1,
        );
        let err = routes_documents(&bad, "<stdin>", &Config::default(), &Target::GatewayApi)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Service web") && err.contains("linkerd"),
            "{err}"
        );

        // No selector: nothing printed for it, and why.
        let plain = GATEWAY_INPUT.replace("  selector: {app: web}\n", "");
        let (docs, warnings) = gateway(&plain, &Config::default());
        assert!(docs.is_empty(), "{docs:?}");
        assert!(
            warnings
                .iter()
                .any(|w| w
                    .contains("(Service web): not routed on the Gateway API: it has no selector")),
            "{warnings:?}"
        );
    }
}
