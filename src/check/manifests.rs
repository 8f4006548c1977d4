//! `check -f FILE`: the routing rules on manifests, before they reach a
//! cluster. A Service's pods are those the workloads in the files will
//! create (a Pod, or the pod template of a ReplicaSet, Deployment,
//! StatefulSet, DaemonSet, Job or CronJob not scaled to 0, whose labels
//! match its selector), with the labels the webhook's rules give them; a
//! Service annotated for routes counts with the rules `routes -f` generates
//! for it. Nothing is read from a cluster.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::Report;
use super::routing::{RoutingInput, ServiceInfo, check_routing};
use crate::config::Config;
use crate::offline::{self, OfflineError};
use crate::routes::gateway::RouteApi;
use crate::routes::offline::{
    Target, documents, routes_documents, string_map, workload, workloads_live,
};
use crate::routes::wants_routes;

/// A namespace not in the files: no labels known.
static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// What `backend` means in this mode's messages.
const BACKEND: &str = "pod (from the workloads in the files)";

/// Checks the manifests in `input` (named `source_name` in errors).
pub fn check_documents(
    input: &str,
    source_name: &str,
    cfg: &Config,
) -> Result<Report, OfflineError> {
    let mut rules_cfg = cfg.clone();
    rules_cfg.bootstrap.enabled = false;
    let mutated = offline::mutate_documents(input, source_name, &rules_cfg, false)?;
    let workloads: Vec<_> = documents(&mutated.text, source_name)?
        .iter()
        .filter_map(|(_, doc)| workload(doc))
        .collect();

    let mut services: BTreeMap<String, Vec<ServiceInfo>> = BTreeMap::new();
    let mut rules: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut namespace_labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let generate = std::cell::Cell::new(false);
    // Takes one document of the input (or of the generated routes).
    let mut take = |doc: Value| {
        let ns = doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let api = doc["apiVersion"].as_str().unwrap_or_default();
        match doc["kind"].as_str() {
            Some("Service") if matches!(api, "" | "v1") => {
                if cfg.namespaces.is_excluded(&ns) {
                    return;
                }
                let selector = string_map(doc.pointer("/spec/selector"));
                let annotations = string_map(doc.pointer("/metadata/annotations"));
                generate.set(generate.get() || wants_routes(Some(&annotations)));
                let matching: Vec<_> = workloads
                    .iter()
                    .filter(|w| w.namespace == ns && !selector.is_empty())
                    .filter(|w| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                    .collect();
                let live = workloads_live(&workloads, &ns, &selector, &cfg.labels);
                services.entry(ns).or_default().push(ServiceInfo {
                    name: doc["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    annotations,
                    labels: string_map(doc.pointer("/metadata/labels")),
                    backends: matching.iter().map(|w| w.labels.clone()).collect(),
                    weights: live.weights,
                });
            }
            Some("Namespace") if matches!(api, "" | "v1") => {
                let name = doc["metadata"]["name"].as_str().unwrap_or_default();
                namespace_labels
                    .insert(name.to_owned(), string_map(doc.pointer("/metadata/labels")));
            }
            Some("DestinationRule" | "VirtualService")
                if api.starts_with("networking.istio.io/") =>
            {
                rules.entry(ns).or_default().push(doc);
            }
            Some("HTTPRoute" | "GRPCRoute") if api.starts_with("gateway.networking.k8s.io/") => {
                rules.entry(ns).or_default().push(doc);
            }
            _ => {}
        }
    };
    for (_, doc) in documents(input, source_name)? {
        take(doc);
    }
    let default_api = cfg
        .routes
        .api
        .resolve(true, true)
        .unwrap_or(RouteApi::Istio);
    if generate.get() {
        let target = match default_api {
            RouteApi::Istio => Target::Istio("networking.istio.io/v1beta1".into()),
            RouteApi::GatewayApi => Target::GatewayApi,
        };
        let generated = routes_documents(input, source_name, cfg, &target)?;
        for (_, doc) in documents(&generated.text, source_name)? {
            take(doc);
        }
    }

    let namespaces: BTreeSet<&String> = services.keys().chain(rules.keys()).collect();
    let mut findings = Vec::new();
    for ns in &namespaces {
        check_routing(
            &RoutingInput {
                namespace: ns,
                services: services.get(*ns).map_or(&[], Vec::as_slice),
                rules: rules.get(*ns).map_or(&[], Vec::as_slice),
                backend: BACKEND,
                all_services: false,
                default_api,
                namespace_labels: namespace_labels.get(*ns).unwrap_or(&NO_LABELS),
            },
            &cfg.labels,
            &mut findings,
        );
    }
    Ok(Report::counting(
        findings,
        namespaces.into_iter().cloned().collect(),
        workloads.len(),
        "workload",
    ))
}
