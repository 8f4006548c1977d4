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

use std::collections::BTreeMap;

use serde_json::Value;

use super::{Live, PodStage, ServiceRef, desired, pod_stage, route_header, wants_routes};
use crate::config::Config;
use crate::mutate::{Kind, Location, ObjectView};
use crate::offline::{self, OfflineError, Output};

/// A Service of the input that asks for routes.
struct Routed {
    index: usize,
    service: ServiceRef,
    selector: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

/// The pod labels of one workload of the input.
pub(crate) struct Workload {
    /// Its namespace (empty when the document names none).
    pub(crate) namespace: String,
    /// The labels its pods get.
    pub(crate) labels: BTreeMap<String, String>,
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
    let labels = match kind.info().pod {
        Location::Object => view.metadata.as_ref()?.labels.as_ref(),
        location => view
            .template_at(location)?
            .metadata
            .as_ref()?
            .labels
            .as_ref(),
    }?;
    let labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Some(Workload {
        namespace: text(doc, "/metadata/namespace")
            .unwrap_or_default()
            .to_owned(),
        labels,
    })
}

/// Prints the routes of `input` (named `source_name` in errors; see the
/// module docs) as YAML documents, a DestinationRule and a VirtualService
/// per Service in namespace and name order, at `api_version`
/// (`networking.istio.io/v1beta1`). A document the label rules refuse is
/// reported in [`Output::refused`] (its pods count with the labels they
/// have), as `mutate -f` does; input that cannot be read is an error.
pub fn routes_documents(
    input: &str,
    source_name: &str,
    cfg: &Config,
    api_version: &str,
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

    let mut out = Vec::new();
    for s in &services {
        let name = &s.service.name;
        let header = route_header(Some(&s.annotations), &cfg.routes.header).map_err(|e| {
            OfflineError::Malformed {
                index: s.index,
                kind: "Service".into(),
                name: name.clone(),
                reason: e.to_string(),
            }
        })?;
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
        let mut live = Live::default();
        for stage in workloads
            .iter()
            .filter(|w| w.namespace == s.service.namespace && !s.selector.is_empty())
            .filter(|w| s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .filter_map(|w| pod_stage(&cfg.labels, &w.labels))
        {
            match stage {
                PodStage::Normal => live.normal = true,
                PodStage::Canary(tag) => {
                    live.tags.insert(tag.to_owned());
                }
            }
        }
        if !live.normal && !s.selector.is_empty() {
            warnings.push(format!(
                "document {} (Service {name}): no workload in the input is a normal pod of it \
                 ({}={}); its default route goes to the whole Service (every ready endpoint) \
                 instead of subset normal",
                s.index, cfg.labels.stage, cfg.labels.normal_stage
            ));
        }
        let d = desired(&s.service, header, &live, &cfg.labels);
        out.push(d.destination_rule.to_json(api_version));
        out.push(d.virtual_service.to_json(api_version));
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
        let out = routes_documents(input, "<stdin>", &Config::default(), API).unwrap();
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
        let err = routes_documents(input, "<stdin>", &Config::default(), API).unwrap_err();
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
}
