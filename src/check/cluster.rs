//! `check` against a cluster: reads what the rules need into a
//! [`Snapshot`] (a handful of GETs and LISTs, nothing written) and runs
//! [`check`](super::check).

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};

use super::native::NativeView;
use super::{CaSource, NamespaceView, Report, Snapshot, WebhookEntry, WebhookView};

/// The annotation cert-manager's cainjector fills a webhook's caBundle by.
const CERT_MANAGER_INJECT: &str = "cert-manager.io/inject-ca-from";
use crate::config::Config;
use crate::routes::controller::{Discovered, discover};
use crate::routes::gateway::RouteApi;

/// Where the webhook is installed (the defaults of `deploy/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The webhook's namespace.
    pub namespace: String,
    /// The MutatingWebhookConfiguration.
    pub webhook_configuration: String,
    /// The webhook's Service.
    pub service: String,
    /// The Secret holding the serving certificate (`tls.crt`).
    pub tls_secret: String,
    /// The ConfigMap holding the webhook's `config.yaml`.
    pub config_map: String,
    /// Check only this namespace (else every opted-in one).
    pub only_namespace: Option<String>,
}

impl Default for Target {
    fn default() -> Self {
        Self {
            namespace: "canary-injector".into(),
            webhook_configuration: "canary-injector".into(),
            service: "canary-injector".into(),
            tls_secret: "canary-injector-tls".into(),
            config_map: "canary-injector-config".into(),
            only_namespace: None,
        }
    }
}

/// Why `check` could not read what it needs.
#[derive(Debug, thiserror::Error)]
pub enum GatherError {
    /// A read failed for another reason than "not found".
    #[error("cannot read {what}: {}", brief(source))]
    Read {
        /// What was being read.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// `check -n` names a namespace that does not exist.
    #[error("namespace {0:?} not found")]
    NamespaceNotFound(String),
}

/// An API error as `message (Reason, code)`: kube's own text embeds the
/// whole `Status` in Rust's debug form.
fn brief(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(s) => format!("{} ({}, {})", s.message, s.reason, s.code),
        other => other.to_string(),
    }
}

fn read<T>(what: impl Into<String>, r: Result<T, kube::Error>) -> Result<T, GatherError> {
    r.map_err(|source| GatherError::Read {
        what: what.into(),
        source,
    })
}

fn json<T: serde::Serialize>(object: &T) -> serde_json::Value {
    serde_json::to_value(object).unwrap_or_default()
}

/// The webhook's configuration as deployed (its ConfigMap), else the
/// built-in defaults; an invalid one is reported, with defaults used.
async fn deployed_config(
    client: &Client,
    target: &Target,
) -> Result<(Config, Option<String>), GatherError> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &target.namespace);
    let what = format!("ConfigMap {}/{}", target.namespace, target.config_map);
    let text = read(&what, cms.get_opt(&target.config_map).await)?
        .and_then(|cm| cm.data?.remove("config.yaml"));
    let (mut cfg, error) = match text.as_deref().map(Config::from_yaml) {
        None => (Config::default(), None),
        Some(Ok(cfg)) => (cfg, None),
        Some(Err(e)) => (Config::default(), Some(e.to_string())),
    };
    if cfg.namespaces.own.is_none() {
        cfg.namespaces.own = Some(target.namespace.clone());
    }
    Ok((cfg, error))
}

async fn webhook(client: &Client, target: &Target) -> Result<WebhookView, GatherError> {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let configuration = read(
        format!(
            "MutatingWebhookConfiguration {}",
            target.webhook_configuration
        ),
        configs.get_opt(&target.webhook_configuration).await,
    )?;
    let cert_manager = configuration.as_ref().is_some_and(|c| {
        c.metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(CERT_MANAGER_INJECT))
    });
    let webhooks: Option<Vec<WebhookEntry>> = configuration.map(|c| {
        c.webhooks
            .unwrap_or_default()
            .into_iter()
            .map(|w| WebhookEntry {
                name: w.name,
                ca_bundle: w
                    .client_config
                    .ca_bundle
                    .map(|b| b.0)
                    .filter(|b| !b.is_empty()),
                namespace_selector: w
                    .namespace_selector
                    .and_then(|s| s.match_labels)
                    .unwrap_or_default(),
                url: w.client_config.url,
            })
            .collect()
    });
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &target.namespace);
    let mut certgen = false;
    let (serving_certificate, serving_certificate_error) = match secrets
        .get_opt(&target.tls_secret)
        .await
    {
        Ok(Some(s)) => {
            // The certgen Job's Secrets carry its field manager's name.
            certgen = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("app.kubernetes.io/managed-by"))
                .is_some_and(|m| m.starts_with("canary-injector"));
            match s.data.and_then(|mut d| d.remove("tls.crt")) {
                Some(crt) => (Some(crt.0), None),
                None => (
                    None,
                    Some(format!("Secret {} has no tls.crt", target.tls_secret)),
                ),
            }
        }
        Ok(None) => (
            None,
            Some(format!(
                "Secret {}/{} not found",
                target.namespace, target.tls_secret
            )),
        ),
        Err(kube::Error::Api(s)) if s.code == 403 => (None, Some(s.message.clone())),
        Err(e) => {
            return Err(read::<()>(format!("Secret {}", target.tls_secret), Err(e)).unwrap_err());
        }
    };
    // Webhooks called at a URL (out of the cluster) use no Service: its
    // endpoints say nothing about them.
    let uses_service = webhooks
        .as_ref()
        .is_none_or(|w| w.iter().any(|w| w.url.is_none()));
    let ready_endpoints = if uses_service {
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &target.namespace);
        let selector = format!("kubernetes.io/service-name={}", target.service);
        let slices = read(
            format!("EndpointSlices of Service {}", target.service),
            slices.list(&ListParams::default().labels(&selector)).await,
        )?;
        Some(
            slices
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter().flatten())
                // A missing condition means "unknown", which consumers treat as ready.
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
                .count(),
        )
    } else {
        None
    };
    let ca_source = if cert_manager {
        CaSource::CertManager
    } else if certgen {
        CaSource::Certgen
    } else {
        CaSource::Own
    };
    Ok(WebhookView {
        configuration_name: target.webhook_configuration.clone(),
        webhooks,
        serving_certificate,
        serving_certificate_error,
        ready_endpoints,
        service: format!("{}/{}", target.namespace, target.service),
        ca_source,
        namespace: target.namespace.clone(),
    })
}

/// The metadata of the workloads of `namespace` (`kind` and `metadata`):
/// where a pod's owner chain leads and what tag it carries. A kind the
/// apiserver does not serve (CronJobs before 1.21) has none.
async fn workloads(
    client: &Client,
    namespace: &str,
) -> Result<Vec<serde_json::Value>, GatherError> {
    async fn list<K>(
        client: &Client,
        namespace: &str,
        out: &mut Vec<serde_json::Value>,
    ) -> Result<(), GatherError>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned,
    {
        let api: Api<K> = Api::namespaced(client.clone(), namespace);
        let kind = K::kind(&());
        match api.list_metadata(&ListParams::default()).await {
            Ok(list) => out.extend(
                list.items
                    .iter()
                    .map(|o| serde_json::json!({"kind": kind, "metadata": json(&o.metadata)})),
            ),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                return Err(read::<()>(format!("{kind}s in {namespace}"), Err(e)).unwrap_err());
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    list::<Deployment>(client, namespace, &mut out).await?;
    list::<StatefulSet>(client, namespace, &mut out).await?;
    list::<DaemonSet>(client, namespace, &mut out).await?;
    list::<Job>(client, namespace, &mut out).await?;
    list::<CronJob>(client, namespace, &mut out).await?;
    Ok(out)
}

/// One object of the native admission policy, in the first of `versions`
/// that has it; `None` when none does (not installed, the API not served)
/// or it may not be read (403: the native-mode checks need `get` on it).
async fn native_object(
    client: &Client,
    versions: &[&str],
    (kind, plural): (&str, &str),
    name: &str,
) -> Result<Option<serde_json::Value>, GatherError> {
    for version in versions {
        let gvk = kube::api::GroupVersionKind::gvk(crate::policy::GROUP, version, kind);
        let api: Api<DynamicObject> = Api::all_with(
            client.clone(),
            &ApiResource::from_gvk_with_plural(&gvk, plural),
        );
        match api.get_opt(name).await {
            Ok(Some(o)) => return Ok(Some(json(&o))),
            Ok(None) => {}
            Err(kube::Error::Api(s)) if s.code == 403 => return Ok(None),
            Err(e) => return Err(read::<()>(format!("{kind} {name}"), Err(e)).unwrap_err()),
        }
    }
    Ok(None)
}

/// The native admission policy's objects (`canary-injector policy`).
async fn native(client: &Client) -> Result<NativeView, GatherError> {
    use crate::policy::{MUTATING_NAME, VALIDATING_NAME};
    let mutating = ["v1", "v1beta1"];
    Ok(NativeView {
        mutating_policy: native_object(
            client,
            &mutating,
            ("MutatingAdmissionPolicy", "mutatingadmissionpolicies"),
            MUTATING_NAME,
        )
        .await?,
        mutating_binding: native_object(
            client,
            &mutating,
            (
                "MutatingAdmissionPolicyBinding",
                "mutatingadmissionpolicybindings",
            ),
            MUTATING_NAME,
        )
        .await?,
        validating_policy: native_object(
            client,
            &["v1"],
            ("ValidatingAdmissionPolicy", "validatingadmissionpolicies"),
            VALIDATING_NAME,
        )
        .await?,
        validating_binding: native_object(
            client,
            &["v1"],
            (
                "ValidatingAdmissionPolicyBinding",
                "validatingadmissionpolicybindings",
            ),
            VALIDATING_NAME,
        )
        .await?,
    })
}

/// Reads everything the rules need. Only reads.
pub async fn gather(
    client: Client,
    target: &Target,
    now: i64,
) -> Result<(Snapshot, Config), GatherError> {
    let (cfg, config_error) = deployed_config(&client, target).await?;
    let webhook = webhook(&client, target).await?;
    let native = native(&client).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    // Each namespace with its labels: `-n` names one whether or not it
    // opted in (the rules say so when it has not).
    let named: Vec<(String, BTreeMap<String, String>)> = match &target.only_namespace {
        Some(ns) => {
            let found = read(format!("Namespace {ns}"), namespaces.get_opt(ns).await)?
                .ok_or_else(|| GatherError::NamespaceNotFound(ns.clone()))?;
            vec![(ns.clone(), found.metadata.labels.unwrap_or_default())]
        }
        None => {
            let selector = cfg.namespaces.opt_in_selector();
            read(
                format!("namespaces labelled {selector}"),
                namespaces
                    .list(&ListParams::default().labels(&selector))
                    .await,
            )?
            .items
            .into_iter()
            .filter_map(|n| Some((n.metadata.name?, n.metadata.labels.unwrap_or_default())))
            .collect()
        }
    };
    let cm_name = &cfg.bootstrap.config_map_name;
    let cm_data = |cm: Option<ConfigMap>| cm.map(|c| c.data.unwrap_or_default());
    let source = if cfg.bootstrap.enabled {
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &target.namespace);
        cm_data(read(
            format!("ConfigMap {cm_name}"),
            cms.get_opt(cm_name).await,
        )?)
    } else {
        None
    };
    // The route objects at the versions served: Istio's DestinationRules
    // and VirtualServices, the Gateway API's HTTPRoutes and GRPCRoutes.
    let (route_resources, route_api): (Vec<ApiResource>, Option<RouteApi>) =
        match read("the served APIs", discover(&client).await)? {
            Discovered::Ready(apis) => {
                let api = cfg
                    .routes
                    .api
                    .resolve(apis.istio.is_some(), apis.gateway.is_some());
                let mut resources = Vec::new();
                if let Some(i) = apis.istio {
                    resources.extend([i.destination_rules, i.virtual_services]);
                }
                if let Some(g) = apis.gateway {
                    resources.push(g.http_routes);
                    resources.extend(g.grpc_routes);
                }
                (resources, api)
            }
            Discovered::NoRouteApi | Discovered::NoEndpointSlices => (Vec::new(), None),
        };
    let mut views = Vec::with_capacity(named.len());
    for (name, labels) in named {
        // Not the webhook's to check: nothing more to read there.
        if cfg.namespaces.is_excluded(&name) || !cfg.namespaces.opts_in(&labels) {
            views.push(NamespaceView {
                name,
                labels,
                ..NamespaceView::default()
            });
            continue;
        }
        let services: Api<Service> = Api::namespaced(client.clone(), &name);
        let services = read(
            format!("Services in {name}"),
            services.list(&ListParams::default()).await,
        )?;
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &name);
        let slices = match slices.list(&ListParams::default()).await {
            Ok(list) => list.items.iter().map(json).collect(),
            // discovery.k8s.io/v1 arrives in 1.21: no readiness to judge by.
            Err(kube::Error::Api(s)) if s.code == 404 => Vec::new(),
            Err(e) => {
                return Err(read::<()>(format!("EndpointSlices in {name}"), Err(e)).unwrap_err());
            }
        };
        let mut rules = Vec::new();
        for resource in &route_resources {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &name, resource);
            let list = read(
                format!("{} in {name}", resource.plural),
                api.list(&ListParams::default()).await,
            )?;
            rules.extend(list.items.iter().map(|o| {
                let mut v = json(o);
                v["kind"] = serde_json::Value::from(resource.kind.clone());
                v
            }));
        }
        let pods: Api<Pod> = Api::namespaced(client.clone(), &name);
        let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), &name);
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &name);
        let pods = read(
            format!("pods in {name}"),
            pods.list(&ListParams::default()).await,
        )?;
        let rss = read(
            format!("ReplicaSets in {name}"),
            rss.list(&ListParams::default()).await,
        )?;
        let copy = if cfg.bootstrap.enabled {
            cm_data(read(
                format!("ConfigMap {name}/{cm_name}"),
                cms.get_opt(cm_name).await,
            )?)
        } else {
            None
        };
        let workloads = workloads(&client, &name).await?;
        views.push(NamespaceView {
            name,
            labels,
            pods: pods.items.iter().map(json).collect(),
            replicasets: rss.items.iter().map(json).collect(),
            bootstrap_copy: copy,
            services: services.items.iter().map(json).collect(),
            endpoint_slices: slices,
            rules,
            workloads,
        });
    }
    let snapshot = Snapshot {
        webhook: Some(webhook),
        bootstrap_source: source,
        namespaces: views,
        now,
        config_error,
        native,
        route_api,
    };
    Ok((snapshot, cfg))
}

/// Reads the cluster and checks it.
pub async fn run(client: Client, target: &Target, now: i64) -> Result<Report, GatherError> {
    let (snapshot, cfg) = gather(client, target, now).await?;
    Ok(super::check(&snapshot, cfg.policy()))
}
