//! The routes controller: keeps each routed Service's routes in step with
//! its live canary tags, on Istio's API (one DestinationRule and one
//! VirtualService, [`super::plan`]) or on the Gateway API (version Services
//! and HTTPRoutes, [`super::gateway`]), per Service. Runs on the leader only
//! (a field of the app's writers), one instance per leadership term; a thin
//! adapter around the two planners.
//!
//! ```text
//!  discover: networking.istio.io (v1 > v1beta1 > v1alpha3),
//!            gateway.networking.k8s.io/v1 httproutes (grpcroutes), discovery.k8s.io
//!            no route API or no EndpointSlices -> idle, re-check every 30 s
//!            (routes_crds_present 0); while one route API is missing, look
//!            again every 30 s and start over when it appears
//!  watches:  metadata only (PartialObjectMetadata lists and watches):
//!              Namespaces (opt-in selector), Services, normal and canary pods
//!              (<stage> in (<normal>,<gray>));
//!            whole objects: EndpointSlices (kubernetes.io/service-name: readiness
//!              and pods are in the body); DestinationRules, VirtualServices
//!              (Istio); HTTPRoutes, GRPCRoutes, and our own version Services
//!              (label-selected) (Gateway API)
//!              --> Index (small rows) --> dirty Services
//!  reconcile: which API (annotation canary-injector.io/route-api, else routes.api);
//!             the other API's objects of ours for the Service are deleted first
//!             conflicts? -> report, write nothing
//!             plan() -> one write -> read the answer back -> plan() again ...
//!             not routed any more -> delete our routes, then what they route to
//! ```
//!
//! On the Gateway API the routed Service's selector and ports are read with
//! a `GET` of the Service (its watch is metadata only), again whenever its
//! `resourceVersion` changes.
//!
//! Writes: a create is a `POST` (it fails if anyone else's object took the
//! name meanwhile); a change is a server-side apply (field manager
//! [`FIELD_MANAGER`], forced, with the `resourceVersion` read as a
//! precondition, so an object changed since is never overwritten blindly);
//! a delete carries uid and `resourceVersion` preconditions. Our own writes
//! reach the watch cache a moment later (under load, after several more of
//! our writes); until the cache shows our latest write or something newer
//! (`resourceVersion`s compared, [`super::index::caught_up`]), its answer
//! stands in for the cache, so no plan ever rests on a view older than what
//! the controller wrote: a live tag's route is never dropped because the
//! watch lags. In steady state nothing is written.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::APIGroup;
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, Preconditions,
};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::EventType;
use kube::runtime::watcher::{self, watcher};
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::gateway::{
    self, ApiChoice, HttpRouteSpec, InvalidRouteApi, ObservedService, RouteApi, ShapeProblem,
};
use super::index::{Change, Index, Key, SERVICE_NAME_LABEL};
use super::objects::{self, DestinationRuleSpec, Observed, Spec, VirtualServiceSpec};
use super::plan::{self, DefaultChange, PlanInput, Removal, Step, Write};
use super::shape::{InvalidSetting, WEIGHT_ANNOTATION, route_settings};
use super::{
    Conflict, DefaultRoute, InvalidHeader, Live, NORMAL_SUBSET, RouteSettings, RuleKind,
    ServiceRef, TagWeight, conflicts, route_header,
};
use crate::cluster::events::{EventRequest, EventSink, is_namespace_terminating};
use crate::config::Config;
use crate::metrics::ControllerCounters;
use crate::mutate::{LabelPolicy, NamespacePolicy};
use crate::owners::OwnerCache;

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "routes";

/// Field manager of the routes controller's writes.
pub const FIELD_MANAGER: &str = "canary-injector-routes";

/// How often to look again for the API groups while they are not served.
pub const RECHECK: Duration = Duration::from_secs(30);

/// Reconcile every Service this often even without a change.
const RESYNC: Duration = Duration::from_secs(600);

/// First retry after a failed write; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(2);

/// Longest wait between retries of a failing Service.
const MAX_RETRY: Duration = Duration::from_secs(300);

/// Retry after a write found its object changed since it was read (the
/// watch brings the new version within moments).
const STALE_RETRY: Duration = Duration::from_secs(1);

/// Writes per Service per reconcile at most (converging takes at most
/// four: subset, route, and a repair of each).
const MAX_STEPS: usize = 6;

/// The EndpointSlice API group and the versions read, best first (the
/// fields read are the same in both).
const SLICE_GROUP: &str = "discovery.k8s.io";
const SLICE_VERSIONS: [&str; 2] = ["v1", "v1beta1"];

// === settings and metrics ===

/// What the controller takes from [`Config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutesSettings {
    /// The label vocabulary (subset selectors, which pods are canaries).
    pub labels: LabelPolicy,
    /// Which namespaces are routed (`namespaces.optIn`, minus exclusions).
    pub namespaces: NamespacePolicy,
    /// The default request header (`routes.header`).
    pub header: String,
    /// How long a subset outlives its tag (`routes.removalGraceSeconds`).
    pub grace: Duration,
    /// How long a Service may lack a ready normal pod before a Warning
    /// (`routes.noNormalPodWarningSeconds`).
    pub no_normal_pod_warning: Duration,
    /// Every route's timeout and retries unless a Service's annotations
    /// say otherwise (`routes.timeout`, `routes.retries`).
    pub defaults: RouteSettings,
    /// The route API of Services without the route API annotation
    /// (`routes.api`).
    pub api: ApiChoice,
}

impl RoutesSettings {
    /// The settings for `cfg`; `None` when `routes.enabled` is false.
    pub fn from_config(cfg: &Config) -> Option<Self> {
        cfg.routes.enabled.then(|| Self {
            labels: cfg.labels.clone(),
            namespaces: cfg.namespaces.clone(),
            header: cfg.routes.header.clone(),
            grace: Duration::from_secs(cfg.routes.removal_grace_seconds.into()),
            no_normal_pod_warning: Duration::from_secs(
                cfg.routes.no_normal_pod_warning_seconds.into(),
            ),
            // Checked when the configuration was loaded.
            defaults: cfg.routes.route_settings().unwrap_or_default(),
            api: cfg.routes.api,
        })
    }
}

/// The routes controller's own metrics (besides the shared
/// `reconcile_*{controller="routes"}`). Labels are fixed sets.
#[derive(Clone)]
pub struct RouteMetrics {
    services: IntGaugeVec,
    changes: IntCounterVec,
    restored: IntCounterVec,
    watch_errors: IntCounterVec,
    api_served: IntGaugeVec,
    /// 1 while a route API and EndpointSlices are served (on the leader; 0
    /// elsewhere).
    pub crds_present: IntGauge,
}

impl RouteMetrics {
    /// Values of the `state` label of `routes_services`.
    pub const STATES: [&'static str; 6] = [
        "routed",
        "without-normal",
        "conflict",
        "invalid-header",
        "unroutable",
        "not-accepted",
    ];

    /// Values of the `change` label of `routes_changes_total`.
    pub const CHANGES: [&'static str; 7] = [
        "route-added",
        "route-removed",
        "subset-added",
        "subset-removed",
        "service-added",
        "service-removed",
        "objects-deleted",
    ];

    /// Values of the `kind` label of `routes_restored_total`.
    pub const KINDS: [RuleKind; 4] = [
        RuleKind::DestinationRule,
        RuleKind::VirtualService,
        RuleKind::HttpRoute,
        RuleKind::Service,
    ];

    /// Values of the `watch` label of `routes_watch_errors_total`.
    pub const WATCHES: [&'static str; 9] = [
        "namespaces",
        "services",
        "endpointslices",
        "pods",
        "destinationrules",
        "virtualservices",
        "httproutes",
        "grpcroutes",
        "versionservices",
    ];

    /// Values of the `api` label of `routes_api_served`.
    pub const APIS: [RouteApi; 2] = [RouteApi::Istio, RouteApi::GatewayApi];

    /// Creates and registers `routes_services{state}`,
    /// `routes_changes_total{change}`, `routes_restored_total{kind}`,
    /// `routes_watch_errors_total{watch}`, `routes_api_served{api}` and
    /// `routes_crds_present`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let services = IntGaugeVec::new(
            Opts::new(
                "routes_services",
                "Services asking for canary routes in opted-in namespaces, by state: routed, \
                 without-normal (routed, but no ready endpoint is a normal pod: requests \
                 without a canary header go to every ready endpoint of the Service), \
                 conflict (an object not managed by canary-injector is in the way), \
                 invalid-header, unroutable (the route API annotation is invalid, the API \
                 is not served, or the Service cannot be split on the Gateway API), \
                 not-accepted (Gateway API: no implementation has accepted its HTTPRoute). \
                 Set by the leader.",
            ),
            &["state"],
        )?;
        let changes = IntCounterVec::new(
            Opts::new(
                "routes_changes_total",
                "Changes written to the routes (DestinationRules and VirtualServices, or \
                 version Services and HTTPRoutes), by change.",
            ),
            &["change"],
        )?;
        let restored = IntCounterVec::new(
            Opts::new(
                "routes_restored_total",
                "Routing objects of canary-injector (DestinationRules, VirtualServices, \
                 HTTPRoutes, version Services) that someone else changed or deleted and the \
                 routes controller put back, by kind.",
            ),
            &["kind"],
        )?;
        let watch_errors = IntCounterVec::new(
            Opts::new(
                "routes_watch_errors_total",
                "Failed lists and watches of the routes controller, by watch (retried with \
                 backoff; nothing is reconciled until every watch has listed once). Steady \
                 errors usually mean missing RBAC.",
            ),
            &["watch"],
        )?;
        let crds_present = IntGauge::new(
            "routes_crds_present",
            "1 while the leader finds a route API (networking.istio.io or the Gateway API's \
             HTTPRoute) and EndpointSlices served; 0 while the routes controller idles (or on \
             a replica that does not lead).",
        )?;
        let api_served = IntGaugeVec::new(
            Opts::new(
                "routes_api_served",
                "1 for each route API the leader finds served (istio, gateway-api).",
            ),
            &["api"],
        )?;
        for api in Self::APIS {
            api_served.with_label_values(&[api.as_str()]);
        }
        for state in Self::STATES {
            services.with_label_values(&[state]);
        }
        for change in Self::CHANGES {
            changes.with_label_values(&[change]);
        }
        for kind in Self::KINDS {
            restored.with_label_values(&[kind.as_str()]);
        }
        for watch in Self::WATCHES {
            watch_errors.with_label_values(&[watch]);
        }
        registry.register(Box::new(services.clone()))?;
        registry.register(Box::new(changes.clone()))?;
        registry.register(Box::new(restored.clone()))?;
        registry.register(Box::new(watch_errors.clone()))?;
        registry.register(Box::new(crds_present.clone()))?;
        registry.register(Box::new(api_served.clone()))?;
        Ok(Self {
            services,
            changes,
            restored,
            watch_errors,
            api_served,
            crds_present,
        })
    }

    fn count(&self, change: &'static str, n: usize) {
        if n > 0 {
            self.changes.with_label_values(&[change]).inc_by(n as u64);
        }
    }

    /// Services by state (tests and the gauges).
    pub fn services(&self, state: &str) -> i64 {
        self.services.with_label_values(&[state]).get()
    }

    /// Changes written so far.
    pub fn changes(&self, change: &str) -> u64 {
        self.changes.with_label_values(&[change]).get()
    }

    /// Objects of `kind` put back so far.
    pub fn restored(&self, kind: RuleKind) -> u64 {
        self.restored.with_label_values(&[kind.as_str()]).get()
    }

    /// Errors of one watch so far.
    pub fn watch_errors(&self, watch: &str) -> u64 {
        self.watch_errors.with_label_values(&[watch]).get()
    }

    /// 1 while the leader finds `api` served.
    pub fn api_served(&self, api: RouteApi) -> i64 {
        self.api_served.with_label_values(&[api.as_str()]).get()
    }

    fn serving(&self, apis: Option<&Apis>) {
        for api in Self::APIS {
            let served = apis.is_some_and(|a| a.serves(api));
            self.api_served
                .with_label_values(&[api.as_str()])
                .set(i64::from(served));
        }
        self.crds_present.set(i64::from(apis.is_some()));
    }

    /// Zero every gauge (the term ended: another replica reports now).
    fn reset(&self) {
        for state in Self::STATES {
            self.services.with_label_values(&[state]).set(0);
        }
        self.serving(None);
    }
}

/// Everything one leadership term of the controller needs; cheap to clone.
#[derive(Clone)]
pub struct RoutesWriter {
    /// From the configuration.
    pub settings: RoutesSettings,
    /// Its own metrics.
    pub metrics: RouteMetrics,
    /// `reconcile_*{controller="routes"}`.
    pub counters: ControllerCounters,
    /// Events on Services (route added / removed / conflict), and on the
    /// workloads of canaries whose weight does not read.
    pub events: EventSink,
    /// The owner chains (every replica keeps them), to report on a pod's
    /// workload.
    pub owners: OwnerCache,
    /// Wall-clock time (subsets' removal times are written on the objects).
    pub clock: Clock,
}

/// Wall-clock time read off tokio's clock: one reading of both at start,
/// then the wall time is that reading plus tokio's elapsed time. So the
/// removal times written on objects are wall-clock times (another replica
/// reads them after a restart), and tests that pause tokio's clock see
/// time pass for them as well.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall: Timestamp,
    at: Instant,
}

impl Clock {
    /// The clock, set from the system's wall clock now.
    pub fn new() -> Self {
        Self {
            wall: Timestamp::now(),
            at: Instant::now(),
        }
    }

    /// The wall-clock time of `at`.
    pub fn wall(&self, at: Instant) -> Timestamp {
        match at.checked_duration_since(self.at) {
            Some(d) => self.wall + d,
            None => self.wall - self.at.duration_since(at),
        }
    }

    /// The tokio instant of the wall-clock time `at` (now, when `at` has
    /// passed).
    pub fn instant(&self, at: Timestamp) -> Instant {
        let now = Instant::now();
        let wait = at.duration_since(self.wall(now));
        now + std::time::Duration::try_from(wait).unwrap_or_default()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

// === errors ===

/// Why a Service could not be brought in step.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The API refused a write.
    #[error("cannot write {kind} {namespace}/{name}: {source}")]
    Write {
        /// The kind written.
        kind: RuleKind,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The object changed (or appeared) since it was read; read it again.
    #[error("{kind} {namespace}/{name} changed since it was read")]
    Stale {
        /// The kind.
        kind: RuleKind,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The routed Service could not be read (Gateway API: its selector
    /// and ports).
    #[error("cannot read Service {namespace}/{name}: {source}")]
    Read {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The apiserver stored a write otherwise than it was sent (a mutating
    /// admission webhook, or a default this version does not know): writing
    /// it again would change nothing, so it is retried with backoff, not
    /// at once.
    #[error(
        "{kind} {namespace}/{name} was stored otherwise than written (a mutating admission \
         webhook, or a field defaulted by a newer API version?)"
    )]
    NotKept {
        /// The kind written.
        kind: RuleKind,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The namespace is being deleted: the apiserver refuses anything new
    /// there. Not a fault: nothing more is written into it.
    #[error("namespace {namespace} is being deleted")]
    NamespaceTerminating {
        /// Namespace.
        namespace: String,
    },
}

impl RouteError {
    /// Every `reason` label value, exported at 0 from the start.
    pub const REASONS: [&'static str; 4] = ["write", "stale", "read", "not-kept"];

    /// Bounded metric label for this error; `None` for what is no error
    /// (a namespace being deleted).
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Self::Write { .. } => Some(Self::REASONS[0]),
            Self::Stale { .. } => Some(Self::REASONS[1]),
            Self::Read { .. } => Some(Self::REASONS[2]),
            Self::NotKept { .. } => Some(Self::REASONS[3]),
            Self::NamespaceTerminating { .. } => None,
        }
    }

    /// The error of a write the apiserver stored otherwise (the Istio
    /// objects are named after their Service).
    fn not_kept(kind: RuleKind, service: &ServiceRef) -> Self {
        Self::NotKept {
            kind,
            namespace: service.namespace.clone(),
            name: service.name.clone(),
        }
    }

    /// The error of a refused write: stale (409), the namespace being
    /// deleted (403 from NamespaceLifecycle), or any other failure.
    fn of(kind: RuleKind, namespace: &str, name: &str, source: kube::Error) -> Self {
        match source {
            kube::Error::Api(s) if s.code == 409 => Self::Stale {
                kind,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            },
            e if is_namespace_terminating(&e) => Self::NamespaceTerminating {
                namespace: namespace.to_owned(),
            },
            source => Self::Write {
                kind,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                source,
            },
        }
    }
}

// === discovery ===

/// The API resources the controller reads and writes, at the versions the
/// cluster serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Apis {
    /// Istio's, when served.
    pub istio: Option<IstioApis>,
    /// The Gateway API's, when HTTPRoutes are served.
    pub gateway: Option<GatewayApis>,
    /// `endpointslices`.
    pub endpoint_slices: ApiResource,
}

/// `networking.istio.io` at the version served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioApis {
    /// `destinationrules`.
    pub destination_rules: ApiResource,
    /// `virtualservices`.
    pub virtual_services: ApiResource,
}

/// `gateway.networking.k8s.io/v1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayApis {
    /// `httproutes`.
    pub http_routes: ApiResource,
    /// `grpcroutes`, when served (read for conflicts only).
    pub grpc_routes: Option<ApiResource>,
}

impl Apis {
    /// True when `api` is served.
    pub fn serves(&self, api: RouteApi) -> bool {
        match api {
            RouteApi::Istio => self.istio.is_some(),
            RouteApi::GatewayApi => self.gateway.is_some(),
        }
    }
}

/// What discovery found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovered {
    /// EndpointSlices and at least one route API are served.
    Ready(Box<Apis>),
    /// Neither `networking.istio.io` (DestinationRules and VirtualServices)
    /// nor the Gateway API's HTTPRoute is served.
    NoRouteApi,
    /// EndpointSlices are not served (Kubernetes 1.16).
    NoEndpointSlices,
}

/// The first of `versions` of `group` the cluster serves with all of
/// `resources`; `None` when there is none.
async fn served(
    client: &Client,
    group: &str,
    versions: &[&str],
    resources: &[&str],
) -> Result<Option<String>, kube::Error> {
    let request = http::Request::get(format!("/apis/{group}"))
        .body(Vec::new())
        .expect("a static URI is valid");
    let doc: APIGroup = match client.request(request).await {
        Ok(doc) => doc,
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
        Err(e) => return Err(e),
    };
    for version in versions {
        if !doc.versions.iter().any(|v| v.version == *version) {
            continue;
        }
        let list = match client
            .list_api_group_resources(&format!("{group}/{version}"))
            .await
        {
            Ok(list) => list,
            Err(kube::Error::Api(s)) if s.code == 404 => continue,
            Err(e) => return Err(e),
        };
        if resources
            .iter()
            .all(|r| list.resources.iter().any(|l| l.name == *r))
        {
            return Ok(Some((*version).to_owned()));
        }
    }
    Ok(None)
}

/// Core `v1` Services, as a dynamic resource (our version Services are
/// read and written as JSON).
fn core_services() -> ApiResource {
    resource("", "v1", "Service", "services")
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk(group, version, kind),
        plural,
    )
}

/// Finds what the cluster serves: `networking.istio.io` `v1`, else
/// `v1beta1`, else `v1alpha3`; `gateway.networking.k8s.io/v1` HTTPRoutes
/// (and GRPCRoutes); EndpointSlices `v1`, else `v1beta1`.
pub async fn discover(client: &Client) -> Result<Discovered, kube::Error> {
    let rules = ["destinationrules", "virtualservices"];
    let istio = served(client, objects::GROUP, &objects::VERSIONS, &rules)
        .await?
        .map(|v| IstioApis {
            destination_rules: resource(objects::GROUP, &v, "DestinationRule", rules[0]),
            virtual_services: resource(objects::GROUP, &v, "VirtualService", rules[1]),
        });
    let versions = [gateway::VERSION];
    let gateway = match served(client, gateway::GROUP, &versions, &["httproutes"]).await? {
        Some(v) => {
            let grpc = served(client, gateway::GROUP, &versions, &["grpcroutes"]).await?;
            Some(GatewayApis {
                http_routes: resource(gateway::GROUP, &v, "HTTPRoute", "httproutes"),
                grpc_routes: grpc.map(|v| resource(gateway::GROUP, &v, "GRPCRoute", "grpcroutes")),
            })
        }
        None => None,
    };
    if istio.is_none() && gateway.is_none() {
        return Ok(Discovered::NoRouteApi);
    }
    let Some(slices) = served(client, SLICE_GROUP, &SLICE_VERSIONS, &["endpointslices"]).await?
    else {
        return Ok(Discovered::NoEndpointSlices);
    };
    Ok(Discovered::Ready(Box::new(Apis {
        istio,
        gateway,
        endpoint_slices: resource(SLICE_GROUP, &slices, "EndpointSlice", "endpointslices"),
    })))
}

// === run ===

/// Runs the controller for one leadership term, until `term` is cancelled:
/// discovers the APIs (idling with one log line while they are missing,
/// re-checking every [`RECHECK`]), then routes. Never ends on its own.
pub async fn run(client: Client, writer: RoutesWriter, term: CancellationToken) {
    let mut idle_reason = None;
    loop {
        match discover(&client).await {
            Ok(Discovered::Ready(apis)) => {
                idle_reason = None;
                writer.metrics.serving(Some(&apis));
                let version = |r: Option<&ApiResource>| {
                    r.map_or_else(|| "not served".to_owned(), |r| r.api_version.clone())
                };
                info!(
                    istio = %version(apis.istio.as_ref().map(|i| &i.destination_rules)),
                    gateway_api = %version(apis.gateway.as_ref().map(|g| &g.http_routes)),
                    endpoint_slices = %apis.endpoint_slices.api_version,
                    default_api = %writer
                        .settings
                        .api
                        .resolve(apis.istio.is_some(), apis.gateway.is_some())
                        .map_or("none", RouteApi::as_str),
                    "routes controller started"
                );
                let routes = Routes::new(client.clone(), writer.clone(), *apis);
                if routes.run(&term).await == Exit::Stopped {
                    break;
                }
                writer.metrics.serving(None);
                info!("route APIs served changed; discovering again");
            }
            Ok(missing) => {
                writer.metrics.serving(None);
                if idle_reason.as_ref() != Some(&missing) {
                    match missing {
                        Discovered::NoEndpointSlices => info!(
                            recheck_seconds = RECHECK.as_secs(),
                            "discovery.k8s.io EndpointSlices not served; routes controller idle"
                        ),
                        _ => info!(
                            recheck_seconds = RECHECK.as_secs(),
                            "neither networking.istio.io DestinationRules/VirtualServices nor \
                             gateway.networking.k8s.io/v1 HTTPRoutes are served (no Istio, no \
                             Gateway API CRDs?); routes controller idle"
                        ),
                    }
                    idle_reason = Some(missing);
                }
            }
            Err(error) => {
                writer.metrics.serving(None);
                warn!(%error, "cannot discover the route APIs; retrying");
            }
        }
        tokio::select! {
            biased;
            () = term.cancelled() => break,
            () = tokio::time::sleep(RECHECK) => {}
        }
    }
    writer.metrics.reset();
    info!("routes controller stopped");
}

/// Why [`Routes::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// The term ended.
    Stopped,
    /// A route API went away or appeared: discover again.
    Rediscover,
}

/// One watch's events.
enum Update {
    Namespace(watcher::Result<watcher::Event<PartialObjectMeta<Namespace>>>),
    Service(watcher::Result<watcher::Event<PartialObjectMeta<Service>>>),
    Slice(watcher::Result<watcher::Event<DynamicObject>>),
    Pod(watcher::Result<watcher::Event<PartialObjectMeta<Pod>>>),
    DestinationRule(watcher::Result<watcher::Event<DynamicObject>>),
    VirtualService(watcher::Result<watcher::Event<DynamicObject>>),
    HttpRoute(watcher::Result<watcher::Event<DynamicObject>>),
    GrpcRoute(watcher::Result<watcher::Event<DynamicObject>>),
    Version(watcher::Result<watcher::Event<DynamicObject>>),
}

/// Why a Service gets no writes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Blocked {
    Conflict(Vec<Conflict>),
    Header(InvalidHeader),
    RouteApi(InvalidRouteApi),
    NotServed(RouteApi),
    Shape(ShapeProblem),
}

/// Our latest write to an object, standing in for the watch cache until the
/// cache has caught up with it ([`super::index::caught_up`]): `prior` is
/// the `resourceVersion` the write started from (`None`: it was absent),
/// `result` the object as the API answered (`None`: deleted).
#[derive(Debug, Clone)]
struct Memo<T> {
    prior: Option<String>,
    result: Option<T>,
    /// The routed Service it is for (Gateway API objects, whose names
    /// are not the Service's).
    of: Option<String>,
}

/// An object as read back, with its `resourceVersion`.
trait Versioned: Clone {
    /// The kind (logs, and which watch's progress to compare with).
    const KIND: RuleKind;
    fn version(&self) -> Option<&str>;
}

impl<S: Spec + Clone> Versioned for Observed<S> {
    const KIND: RuleKind = S::KIND;
    fn version(&self) -> Option<&str> {
        self.resource_version.as_deref()
    }
}

impl Versioned for ObservedService {
    const KIND: RuleKind = RuleKind::Service;
    fn version(&self) -> Option<&str> {
        self.resource_version.as_deref()
    }
}

/// One leadership term's state (see the module docs).
pub struct Routes {
    client: Client,
    writer: RoutesWriter,
    apis: Apis,
    index: Index,
    dirty: BTreeSet<Key>,
    timers: HashMap<Key, Instant>,
    failures: HashMap<Key, u32>,
    /// Services whose last write was stored otherwise than sent: not
    /// reconciled before this time, whatever the watches say (our own write
    /// comes back as a change, which would start the write again at once).
    held: HashMap<Key, Instant>,
    due: HashMap<Key, BTreeMap<String, Timestamp>>,
    blocked: HashMap<Key, Blocked>,
    /// Routed Services without a ready normal pod (default route to the
    /// whole Service), since when.
    without_normal: HashMap<Key, Instant>,
    /// Those of them warned about (`RouteNoNormalPod`).
    warned_no_normal: BTreeSet<Key>,
    /// What was last reported about a Service's settings, weights and
    /// weight sum (said again only when it changes).
    reported: HashMap<Key, Reported>,
    memo_dr: HashMap<Key, Memo<Observed<DestinationRuleSpec>>>,
    memo_vs: HashMap<Key, Memo<Observed<VirtualServiceSpec>>>,
    /// The spec each of our objects was left with (our write's, or as seen
    /// in step; `None`: absent): a difference later is someone else's edit.
    left_dr: HashMap<Key, Option<DestinationRuleSpec>>,
    left_vs: HashMap<Key, Option<VirtualServiceSpec>>,
    /// Gateway API: our latest writes of HTTPRoutes and version Services,
    /// by the object's key.
    memo_routes: HashMap<Key, Memo<Observed<HttpRouteSpec>>>,
    memo_versions: HashMap<Key, Memo<ObservedService>>,
    /// Gateway API: the spec each of a routed Service's HTTPRoutes and
    /// version Services was left with, by object name.
    left_routes: HashMap<Key, BTreeMap<String, Option<HttpRouteSpec>>>,
    left_versions: HashMap<Key, BTreeMap<String, Option<gateway::VersionSpec>>>,
    /// Gateway API: each routed Service's selector and ports, at the
    /// resourceVersion read.
    shapes: HashMap<Key, (Option<String>, Result<gateway::ServiceShape, ShapeProblem>)>,
    /// Gateway API: routed Services whose HTTPRoutes are not (yet) taken up
    /// by an implementation, since when; and what was said about it.
    unaccepted: HashMap<Key, Instant>,
    said_acceptance: HashMap<Key, String>,
    failing: BTreeSet<&'static str>,
}

impl Routes {
    /// A controller with an empty index.
    pub fn new(client: Client, writer: RoutesWriter, apis: Apis) -> Self {
        let mut index = Index::new(
            writer.settings.labels.clone(),
            writer.settings.namespaces.clone(),
        );
        let gateway = apis.gateway.as_ref();
        index.watching(
            apis.istio.is_some(),
            gateway.is_some(),
            gateway.is_some_and(|g| g.grpc_routes.is_some()),
        );
        Self {
            client,
            writer,
            apis,
            index,
            dirty: BTreeSet::new(),
            timers: HashMap::new(),
            failures: HashMap::new(),
            held: HashMap::new(),
            due: HashMap::new(),
            blocked: HashMap::new(),
            without_normal: HashMap::new(),
            warned_no_normal: BTreeSet::new(),
            reported: HashMap::new(),
            memo_dr: HashMap::new(),
            memo_vs: HashMap::new(),
            left_dr: HashMap::new(),
            left_vs: HashMap::new(),
            memo_routes: HashMap::new(),
            memo_versions: HashMap::new(),
            left_routes: HashMap::new(),
            left_versions: HashMap::new(),
            shapes: HashMap::new(),
            unaccepted: HashMap::new(),
            said_acceptance: HashMap::new(),
            failing: BTreeSet::new(),
        }
    }

    /// The index and the dirty set (benchmarks fill them directly).
    pub fn index_mut(&mut self) -> (&mut Index, &mut BTreeSet<Key>) {
        (&mut self.index, &mut self.dirty)
    }

    fn watches(&self) -> SelectAll<BoxStream<'static, Update>> {
        let client = &self.client;
        let settings = &self.writer.settings;
        let mut namespaces = watcher::Config::default();
        let selector = settings.namespaces.opt_in_selector();
        if !selector.is_empty() {
            namespaces = namespaces.labels(&selector);
        }
        // Normal pods and canaries: the default route needs a ready normal
        // pod, a tag a ready canary. Pods of no stage are not cached.
        let staged = format!(
            "{} in ({},{})",
            settings.labels.stage, settings.labels.normal_stage, settings.labels.gray_stage
        );
        let all = watcher::Config::default;
        // Namespaces, Services and pods: only metadata is read (labels,
        // annotations, uid). An `Api<PartialObjectMeta<K>>` makes kube send
        // metadata-only lists and watches (`Accept:
        // application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1`,
        // `...as=PartialObjectMetadata...` for the watch), so the apiserver
        // sends metadata only: whole pods and Services never cross the wire
        // nor get decoded. (kube-runtime's `metadata_watcher` does the same
        // and is deprecated since kube 3.1 for this.) The tests' apiserver
        // model fails any other read of these kinds.
        let mut streams: Vec<BoxStream<'static, Update>> = vec![
            watcher(
                Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
                namespaces,
            )
            .default_backoff()
            .map(Update::Namespace)
            .boxed(),
            watcher(
                Api::<PartialObjectMeta<Service>>::all(client.clone()),
                all(),
            )
            .default_backoff()
            .map(Update::Service)
            .boxed(),
            watcher(
                Api::<DynamicObject>::all_with(client.clone(), &self.apis.endpoint_slices),
                all().labels(SERVICE_NAME_LABEL),
            )
            .default_backoff()
            .map(Update::Slice)
            .boxed(),
            watcher(
                Api::<PartialObjectMeta<Pod>>::all(client.clone()),
                all().labels(&staged),
            )
            .default_backoff()
            .map(Update::Pod)
            .boxed(),
        ];
        let whole = |resource: &ApiResource, config: watcher::Config| {
            watcher(
                Api::<DynamicObject>::all_with(client.clone(), resource),
                config,
            )
            .default_backoff()
        };
        if let Some(istio) = &self.apis.istio {
            streams.push(
                whole(&istio.destination_rules, all())
                    .map(Update::DestinationRule)
                    .boxed(),
            );
            streams.push(
                whole(&istio.virtual_services, all())
                    .map(Update::VirtualService)
                    .boxed(),
            );
        }
        if let Some(gateway) = &self.apis.gateway {
            streams.push(
                whole(&gateway.http_routes, all())
                    .map(Update::HttpRoute)
                    .boxed(),
            );
            if let Some(grpc) = &gateway.grpc_routes {
                streams.push(whole(grpc, all()).map(Update::GrpcRoute).boxed());
            }
            // Our version Services, whole (their selector and ports): the
            // only Services read in full, selected by our labels.
            let ours = format!(
                "{}={},{}",
                super::MANAGED_BY_LABEL,
                super::MANAGED_BY_VALUE,
                gateway::ROUTE_OF_LABEL
            );
            streams.push(
                whole(&core_services(), all().labels(&ours))
                    .map(Update::Version)
                    .boxed(),
            );
        }
        futures::stream::select_all(streams)
    }

    /// Watches and reconciles until `term` is cancelled or a route API
    /// goes away (or, while one is missing, appears). Reconciles nothing
    /// before every watch has listed once (a half-filled index would make
    /// tags look gone and conflicts absent).
    async fn run(mut self, term: &CancellationToken) -> Exit {
        let mut updates = self.watches();
        let mut resync = tokio::time::interval_at(Instant::now() + RESYNC, RESYNC);
        let mut recheck = tokio::time::interval_at(Instant::now() + RECHECK, RECHECK);
        let partial = self.apis.istio.is_none()
            || self
                .apis
                .gateway
                .as_ref()
                .is_none_or(|g| g.grpc_routes.is_none());
        let exit = loop {
            let next = self.timers.values().min().copied();
            tokio::select! {
                biased;
                () = term.cancelled() => break Exit::Stopped,
                update = updates.next() => match update {
                    Some(u) => if self.apply(u) == Some(Exit::Rediscover) { break Exit::Rediscover },
                    None => break Exit::Rediscover,
                },
                () = sleep_until(next) => {}
                _ = resync.tick() => self.dirty.extend(self.index.all_keys()),
                _ = recheck.tick(), if partial => {
                    if self.apis_changed().await {
                        break Exit::Rediscover;
                    }
                }
            }
            // Take in what else is waiting before reconciling.
            let mut rediscover = false;
            while let Some(Some(u)) = updates.next().now_or_never() {
                rediscover |= self.apply(u) == Some(Exit::Rediscover);
            }
            if rediscover {
                break Exit::Rediscover;
            }
            if self.index.is_synced() {
                tokio::select! {
                    biased;
                    () = term.cancelled() => break Exit::Stopped,
                    () = self.process() => {}
                }
            }
        };
        self.writer.metrics.reset();
        exit
    }

    /// True when discovery finds other route APIs served than this term
    /// started with (a missing one was installed).
    async fn apis_changed(&self) -> bool {
        match discover(&self.client).await {
            Ok(Discovered::Ready(apis)) => *apis != self.apis,
            Ok(_) => true,
            Err(error) => {
                debug!(%error, "cannot discover the route APIs; looking again later");
                false
            }
        }
    }

    /// Takes one watch event into the index; `Rediscover` when a route API
    /// is gone.
    fn apply(&mut self, update: Update) -> Option<Exit> {
        let index = &mut self.index;
        let dirty = &mut self.dirty;
        let (watch, result) = match update {
            Update::Namespace(r) => (
                "namespaces",
                r.map(|e| {
                    let change = Change::from_event(e, |o| index.namespace_row(&o.metadata));
                    index.apply_namespace(change, dirty)
                }),
            ),
            Update::Service(r) => (
                "services",
                r.map(|e| {
                    index.apply_dashed(
                        Change::from_event(e.clone(), |o| Index::dashed_row(&o.metadata)),
                        dirty,
                    );
                    index.apply_service(
                        Change::from_event(e, |o| Index::service_row(&o.metadata)),
                        dirty,
                    );
                }),
            ),
            Update::Slice(r) => (
                "endpointslices",
                r.map(|e| index.apply_slice(Change::from_event(e, Index::slice_row), dirty)),
            ),
            Update::Pod(r) => (
                "pods",
                r.map(|e| {
                    let change = Change::from_event(e, |o| index.pod_row(&o.metadata));
                    index.apply_pod(change, dirty)
                }),
            ),
            Update::DestinationRule(r) => (
                "destinationrules",
                r.map(|e| {
                    index.saw_rule_version(RuleKind::DestinationRule, event_version(&e));
                    index.apply_destination_rule(Change::from_event(e, Index::rule_row), dirty)
                }),
            ),
            Update::VirtualService(r) => (
                "virtualservices",
                r.map(|e| {
                    index.saw_rule_version(RuleKind::VirtualService, event_version(&e));
                    index.apply_virtual_service(Change::from_event(e, Index::rule_row), dirty)
                }),
            ),
            Update::HttpRoute(r) => (
                "httproutes",
                r.map(|e| {
                    index.saw_rule_version(RuleKind::HttpRoute, event_version(&e));
                    index.apply_http_route(Change::from_event(e, Index::rule_row), dirty)
                }),
            ),
            Update::GrpcRoute(r) => (
                "grpcroutes",
                r.map(|e| index.apply_grpc_route(Change::from_event(e, Index::rule_row), dirty)),
            ),
            Update::Version(r) => (
                "versionservices",
                r.map(|e| {
                    index.saw_rule_version(RuleKind::Service, event_version(&e));
                    index.apply_version(Change::from_event(e, Index::version_row), dirty)
                }),
            ),
        };
        match result {
            Ok(()) => {
                if self.failing.remove(watch) {
                    info!(watch, "watch recovered");
                }
                None
            }
            Err(error) => {
                self.writer
                    .metrics
                    .watch_errors
                    .with_label_values(&[watch])
                    .inc();
                if self.failing.insert(watch) {
                    warn!(watch, %error, "watch failed; retrying with backoff");
                }
                let api = matches!(
                    watch,
                    "destinationrules" | "virtualservices" | "httproutes" | "grpcroutes"
                );
                (api && is_not_found(&error)).then_some(Exit::Rediscover)
            }
        }
    }

    /// Reconciles every dirty Service and every Service whose timer is due.
    pub async fn process(&mut self) {
        let now = Instant::now();
        let due: Vec<Key> = self
            .timers
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.timers.remove(&key);
            self.dirty.insert(key);
        }
        while let Some(key) = self.dirty.pop_first() {
            // Its timer brings it back.
            if self.held.get(&key).is_some_and(|until| *until > now) {
                continue;
            }
            match self.reconcile(&key).await {
                Ok(wake) => {
                    self.failures.remove(&key);
                    self.held.remove(&key);
                    match wake {
                        Some(at) => self.timers.insert(key, at),
                        None => self.timers.remove(&key),
                    };
                }
                Err(error) => {
                    let delay = match &error {
                        // Not a fault: the namespace and our objects in it
                        // are going away. Nothing more is written there.
                        RouteError::NamespaceTerminating { namespace } => {
                            debug!(%namespace, "namespace being deleted; nothing more is written there");
                            self.index.note_terminating(namespace);
                            self.forget(&key);
                            self.timers.remove(&key);
                            continue;
                        }
                        RouteError::Stale { .. } => {
                            debug!(%error, "read again");
                            STALE_RETRY
                        }
                        RouteError::Write { .. }
                        | RouteError::Read { .. }
                        | RouteError::NotKept { .. } => {
                            let n = self.failures.entry(key.clone()).or_insert(0);
                            *n += 1;
                            let delay = FIRST_RETRY
                                .saturating_mul(1 << (*n - 1).min(8))
                                .min(MAX_RETRY);
                            warn!(%error, retry_seconds = delay.as_secs(), "cannot route a Service");
                            delay
                        }
                    };
                    if matches!(error, RouteError::NotKept { .. }) {
                        self.held.insert(key.clone(), Instant::now() + delay);
                    }
                    if let Some(reason) = error.reason() {
                        self.writer.counters.error(reason);
                    }
                    self.timers.insert(key, Instant::now() + delay);
                }
            }
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let mut counts = [0_i64; RouteMetrics::STATES.len()];
        for key in self.index.services() {
            if self.index.routed(key).is_none() {
                continue;
            }
            let i = match self.blocked.get(key) {
                None if self.said_acceptance.contains_key(key) => 5,
                None if self.without_normal.contains_key(key) => 1,
                None => 0,
                Some(Blocked::Conflict(_)) => 2,
                Some(Blocked::Header(_)) => 3,
                Some(Blocked::RouteApi(_) | Blocked::NotServed(_) | Blocked::Shape(_)) => 4,
            };
            counts[i] += 1;
        }
        for (state, n) in RouteMetrics::STATES.iter().zip(counts) {
            self.writer
                .metrics
                .services
                .with_label_values(&[state])
                .set(n);
        }
    }

    /// The view of one object to plan from: the cache once it has caught
    /// up with our latest write to it, else that write's answer.
    fn observe<T: Versioned>(
        cached: Option<&T>,
        memo: &mut HashMap<Key, Memo<T>>,
        key: &Key,
        newest: u64,
    ) -> Option<T> {
        let cached_version = cached.and_then(Versioned::version);
        match memo.get(key) {
            Some(m)
                if !super::index::caught_up(
                    cached.map(|c| c.version().unwrap_or_default()),
                    m.prior.as_deref(),
                    m.result.as_ref().map(|r| r.version().unwrap_or_default()),
                    newest,
                ) =>
            {
                debug!(
                    namespace = %key.0,
                    name = %key.1,
                    kind = %T::KIND,
                    cached = cached_version.unwrap_or("absent"),
                    "watch cache behind our last write; planning from the write's answer"
                );
                m.result.clone()
            }
            Some(_) => {
                memo.remove(key);
                cached.cloned()
            }
            None => cached.cloned(),
        }
    }

    fn observed(
        &mut self,
        key: &Key,
    ) -> (
        Option<Observed<DestinationRuleSpec>>,
        Option<Observed<VirtualServiceSpec>>,
    ) {
        (
            Self::observe(
                self.index.destination_rule(key),
                &mut self.memo_dr,
                key,
                self.index.newest_rule_version(RuleKind::DestinationRule),
            ),
            Self::observe(
                self.index.virtual_service(key),
                &mut self.memo_vs,
                key,
                self.index.newest_rule_version(RuleKind::VirtualService),
            ),
        )
    }

    /// Drops what the controller keeps about one Service.
    fn forget(&mut self, key: &Key) {
        self.blocked.remove(key);
        self.due.remove(key);
        self.without_normal.remove(key);
        self.warned_no_normal.remove(key);
        self.reported.remove(key);
        self.failures.remove(key);
        self.held.remove(key);
        self.left_dr.remove(key);
        self.left_vs.remove(key);
        self.shapes.remove(key);
        self.left_routes.remove(key);
        self.left_versions.remove(key);
        self.unaccepted.remove(key);
        self.said_acceptance.remove(key);
    }

    /// Brings one Service in step; the time to look again, if any.
    pub async fn reconcile(&mut self, key: &Key) -> Result<Option<Instant>, RouteError> {
        // A namespace being deleted takes our objects with it: nothing is
        // written there (creates would be refused), nothing reported.
        if self.index.terminating(&key.0) {
            self.forget(key);
            return Ok(None);
        }
        let Some(entry) = self.index.routed(key).cloned() else {
            self.forget(key);
            self.remove_gateway(key).await?;
            return self.remove(key).await.map(|()| None);
        };
        let service = ServiceRef {
            namespace: key.0.clone(),
            name: key.1.clone(),
            uid: entry.uid.clone(),
        };
        let api = match gateway::route_api(Some(&entry.annotations)) {
            Ok(Some(api)) => api,
            Ok(None) => match self
                .writer
                .settings
                .api
                .resolve(self.apis.istio.is_some(), self.apis.gateway.is_some())
            {
                Some(api) => api,
                None => return Ok(None),
            },
            Err(invalid) => {
                self.block(&service, Blocked::RouteApi(invalid));
                return Ok(None);
            }
        };
        if !self.apis.serves(api) {
            self.block(&service, Blocked::NotServed(api));
            return Ok(None);
        }
        // One API per Service: what we wrote on the other goes first.
        match api {
            RouteApi::Istio => self.remove_gateway(key).await?,
            RouteApi::GatewayApi => {
                self.remove(key).await?;
                return self.reconcile_gateway(key, &entry, service).await;
            }
        }
        let found = conflicts(&service, self.index.rules_in(&key.0));
        if !found.is_empty() {
            self.block(&service, Blocked::Conflict(found));
            return Ok(None);
        }
        let header = match route_header(Some(&entry.annotations), &self.writer.settings.header) {
            Ok(h) => h.to_owned(),
            Err(invalid) => {
                self.block(&service, Blocked::Header(invalid));
                return Ok(None);
            }
        };
        if self.blocked.remove(key).is_some() {
            info!(namespace = %key.0, service = %key.1, "routes no longer blocked");
        }
        let live = self.index.live(key);
        let warn_at = self.no_normal_pod(&service, live.normal);
        let (settings, invalid) =
            route_settings(Some(&entry.annotations), &self.writer.settings.defaults);
        self.report_settings(&service, invalid);
        self.report_weights(&service, &live);
        for _ in 0..MAX_STEPS {
            let (dr, vs) = self.observed(key);
            let empty = BTreeMap::new();
            let now = Instant::now();
            let plan = plan::plan(&PlanInput {
                service: &service,
                header: &header,
                labels: &self.writer.settings.labels,
                live: &live,
                destination_rule: dr.as_ref(),
                virtual_service: vs.as_ref(),
                due: self.due.get(key).unwrap_or(&empty),
                now: self.writer.clock.wall(now),
                grace: self.writer.settings.grace,
                settings: &settings,
            });
            self.report_weight_sum(&service, plan.weights_over);
            if plan.due.is_empty() {
                self.due.remove(key);
            } else {
                self.due.insert(key.clone(), plan.due);
            }
            let Some(step) = plan.step else {
                self.left_dr.insert(key.clone(), dr.and_then(|o| o.spec));
                self.left_vs.insert(key.clone(), vs.and_then(|o| o.spec));
                let wake = plan.wake_at.map(|at| self.writer.clock.instant(at));
                return Ok(wake.into_iter().chain(warn_at).min());
            };
            match step {
                Step::DestinationRule(w) => {
                    let restored = changed_since(self.left_dr.get(key), dr.as_ref());
                    let prior = dr.and_then(|o| o.resource_version);
                    let json = w
                        .object
                        .to_json(&self.istio_version(RuleKind::DestinationRule));
                    let result: Observed<DestinationRuleSpec> = self
                        .write(RuleKind::DestinationRule, &service, json, &w)
                        .await?;
                    let kept = result.holds(&w.object.metadata, &w.object.spec);
                    if let Some(was) = restored {
                        self.report_restored(
                            &service,
                            RuleKind::DestinationRule,
                            &service.name,
                            was,
                        );
                    }
                    self.left_dr.insert(key.clone(), result.spec.clone());
                    self.memo_dr.insert(
                        key.clone(),
                        Memo {
                            prior,
                            result: Some(result),
                            of: None,
                        },
                    );
                    self.report_subsets(&service, &w);
                    if !kept {
                        return Err(RouteError::not_kept(RuleKind::DestinationRule, &service));
                    }
                }
                Step::VirtualService(w) => {
                    let restored = changed_since(self.left_vs.get(key), vs.as_ref());
                    let split_before = vs
                        .as_ref()
                        .and_then(|o| o.spec.as_ref())
                        .map(plan::split_of)
                        .unwrap_or_default();
                    let prior = vs.and_then(|o| o.resource_version);
                    let json = w
                        .object
                        .to_json(&self.istio_version(RuleKind::VirtualService));
                    let result: Observed<VirtualServiceSpec> = self
                        .write(RuleKind::VirtualService, &service, json, &w)
                        .await?;
                    let kept = result.holds(&w.object.metadata, &w.object.spec);
                    if let Some(was) = restored {
                        self.report_restored(
                            &service,
                            RuleKind::VirtualService,
                            &service.name,
                            was,
                        );
                    }
                    let split_after = plan::split_of(&w.object.spec);
                    if split_after != split_before {
                        self.report_split(&service, &split_after);
                    }
                    self.left_vs.insert(key.clone(), result.spec.clone());
                    self.memo_vs.insert(
                        key.clone(),
                        Memo {
                            prior,
                            result: Some(result),
                            of: None,
                        },
                    );
                    self.report_routes(&service, &w);
                    if !kept {
                        return Err(RouteError::not_kept(RuleKind::VirtualService, &service));
                    }
                }
            }
        }
        // Not in step after MAX_STEPS writes: someone keeps changing the
        // objects. Look again shortly.
        Ok(Some(Instant::now() + STALE_RETRY))
    }

    /// The apiVersion Istio's objects are written at.
    fn istio_version(&self, kind: RuleKind) -> String {
        let istio = self.apis.istio.as_ref();
        match kind {
            RuleKind::DestinationRule => istio.map(|i| i.destination_rules.api_version.clone()),
            _ => istio.map(|i| i.virtual_services.api_version.clone()),
        }
        .unwrap_or_default()
    }

    /// The API of `kind` in `namespace`; `None` when it is not served.
    fn api(&self, kind: RuleKind, namespace: &str) -> Option<Api<DynamicObject>> {
        let istio = self.apis.istio.as_ref();
        let resource = match kind {
            RuleKind::DestinationRule => istio.map(|i| i.destination_rules.clone()),
            RuleKind::VirtualService => istio.map(|i| i.virtual_services.clone()),
            RuleKind::HttpRoute => self.apis.gateway.as_ref().map(|g| g.http_routes.clone()),
            RuleKind::GrpcRoute => self
                .apis
                .gateway
                .as_ref()
                .and_then(|g| g.grpc_routes.clone()),
            RuleKind::Service => Some(core_services()),
        }?;
        Some(Api::namespaced_with(
            self.client.clone(),
            namespace,
            &resource,
        ))
    }

    /// Creates (`POST`: fails if anyone else's object took the name) or
    /// applies (forced, with the `resourceVersion` read as a precondition)
    /// one object; the object as the API answered.
    async fn send(
        &self,
        kind: RuleKind,
        namespace: &str,
        name: &str,
        mut json: serde_json::Value,
        create: bool,
        resource_version: Option<&str>,
    ) -> Result<DynamicObject, RouteError> {
        let Some(api) = self.api(kind, namespace) else {
            return Err(RouteError::of(
                kind,
                namespace,
                name,
                kube::Error::Api(Box::new(
                    kube::core::Status::failure(&format!("{kind} is not served"), "NotFound")
                        .with_code(404),
                )),
            ));
        };
        let result = if create {
            match serde_json::from_value::<DynamicObject>(json) {
                Ok(object) => {
                    let params = PostParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..PostParams::default()
                    };
                    api.create(&params, &object).await
                }
                Err(e) => Err(kube::Error::SerdeError(e)),
            }
        } else {
            if let Some(rv) = resource_version {
                json["metadata"]["resourceVersion"] = rv.into();
            }
            api.patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&json),
            )
            .await
        };
        match result {
            Ok(object) => {
                self.writer.counters.applied();
                Ok(object)
            }
            Err(source) => Err(RouteError::of(kind, namespace, name, source)),
        }
    }

    /// Writes one DestinationRule or VirtualService; its state as the API
    /// answered.
    async fn write<T, S: Spec>(
        &self,
        kind: RuleKind,
        service: &ServiceRef,
        json: serde_json::Value,
        w: &Write<T>,
    ) -> Result<Observed<S>, RouteError> {
        let object = self
            .send(
                kind,
                &service.namespace,
                &service.name,
                json,
                w.create,
                w.resource_version.as_deref(),
            )
            .await?;
        Ok(Index::observe_rule(&object))
    }

    /// Deletes one object with uid and `resourceVersion` preconditions; a
    /// 404 is success (gone already).
    async fn delete(
        &self,
        kind: RuleKind,
        namespace: &str,
        name: &str,
        uid: Option<String>,
        resource_version: Option<String>,
    ) -> Result<bool, RouteError> {
        let Some(api) = self.api(kind, namespace) else {
            return Ok(false);
        };
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid,
                resource_version,
            }),
            ..DeleteParams::default()
        };
        match api.delete(name, &params).await {
            Ok(_) => {
                self.writer.counters.applied();
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(source) => Err(RouteError::of(kind, namespace, name, source)),
        }
    }

    /// Deletes our VirtualService, then our DestinationRule, of a Service
    /// that no longer wants routes.
    async fn remove(&mut self, key: &Key) -> Result<(), RouteError> {
        for _ in 0..2 {
            let (dr, vs) = self.observed(key);
            let Some(Removal {
                kind,
                uid,
                resource_version,
            }) = plan::plan_removal(dr.as_ref(), vs.as_ref())
            else {
                return Ok(());
            };
            if self
                .delete(kind, &key.0, &key.1, uid, resource_version.clone())
                .await?
            {
                self.writer.metrics.count("objects-deleted", 1);
                info!(namespace = %key.0, service = %key.1, %kind, "routing object deleted: the Service no longer asks for routes (on this route API)");
            }
            match kind {
                RuleKind::DestinationRule => {
                    self.memo_dr.insert(
                        key.clone(),
                        Memo {
                            prior: resource_version,
                            result: None,
                            of: None,
                        },
                    );
                }
                _ => {
                    self.memo_vs.insert(
                        key.clone(),
                        Memo {
                            prior: resource_version,
                            result: None,
                            of: None,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    fn block(&mut self, service: &ServiceRef, why: Blocked) {
        let key = (service.namespace.clone(), service.name.clone());
        if self.blocked.get(&key) == Some(&why) {
            return;
        }
        let (reason, note) = match &why {
            Blocked::Conflict(found) => {
                let list: Vec<String> = found.iter().map(ToString::to_string).collect();
                warn!(
                    namespace = %service.namespace,
                    service = %service.name,
                    conflicts = %list.join("; "),
                    "canary routes conflict with objects canary-injector does not own; writing nothing"
                );
                (
                    "RouteConflict",
                    format!(
                        "canary-injector writes no routes for this Service while {}; delete or \
                         rename them, or remove the annotation canary-injector.io/routes",
                        list.join("; ")
                    ),
                )
            }
            Blocked::Header(invalid) => {
                warn!(
                    namespace = %service.namespace,
                    service = %service.name,
                    error = %invalid,
                    "invalid route header annotation; writing nothing"
                );
                ("RouteHeaderInvalid", invalid.to_string())
            }
            Blocked::RouteApi(invalid) => {
                warn!(
                    namespace = %service.namespace,
                    service = %service.name,
                    error = %invalid,
                    "invalid route API annotation; writing nothing"
                );
                ("RouteApiInvalid", invalid.to_string())
            }
            Blocked::NotServed(api) => {
                warn!(
                    namespace = %service.namespace,
                    service = %service.name,
                    %api,
                    "the route API this Service uses is not served; writing nothing"
                );
                (
                    "RouteApiNotServed",
                    format!(
                        "this Service's routes use the {api} API ({}), which the cluster does not \
                         serve: install it, or choose the other with the annotation \
                         {} or routes.api",
                        api.group(),
                        gateway::ROUTE_API_ANNOTATION
                    ),
                )
            }
            Blocked::Shape(problem) => {
                warn!(
                    namespace = %service.namespace,
                    service = %service.name,
                    %problem,
                    "the Service cannot be routed on the Gateway API; writing nothing"
                );
                (
                    "RouteServiceUnsupported",
                    format!(
                        "canary-injector cannot route this Service on the Gateway API: {problem}"
                    ),
                )
            }
        };
        self.event(service, EventType::Warning, reason, note);
        self.blocked.insert(key, why);
    }

    fn event(&self, service: &ServiceRef, type_: EventType, reason: &str, note: String) {
        self.writer.events.emit(EventRequest {
            regarding: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Service".into()),
                name: Some(service.name.clone()),
                namespace: Some(service.namespace.clone()),
                uid: service.uid.clone(),
                ..ObjectReference::default()
            },
            type_,
            reason: reason.into(),
            action: "Route".into(),
            note,
        });
    }

    fn report_subsets(&self, service: &ServiceRef, w: &Write<super::DestinationRule>) {
        let metrics = &self.writer.metrics;
        metrics.count("subset-added", w.added.len());
        metrics.count("subset-removed", w.removed.len());
        if w.create {
            info!(namespace = %service.namespace, service = %service.name, "destination rule created");
        }
        for tag in &w.added {
            info!(namespace = %service.namespace, service = %service.name, %tag, "canary subset added");
        }
        for tag in &w.removed {
            info!(namespace = %service.namespace, service = %service.name, %tag, "canary subset removed");
        }
    }

    fn report_routes(&self, service: &ServiceRef, w: &Write<super::VirtualService>) {
        if w.create {
            info!(namespace = %service.namespace, service = %service.name, "virtual service created");
        }
        let header = w
            .object
            .spec
            .http
            .iter()
            .flat_map(|r| r.matches.iter().flat_map(|m| m.headers.keys()))
            .next()
            .cloned()
            .unwrap_or_default();
        self.report_route_changes(service, &header, &w.added, &w.removed, w.default);
    }

    /// Tags that gained or lost their route, and a change of where the
    /// default route goes: counts, logs and Events on the Service.
    fn report_route_changes(
        &self,
        service: &ServiceRef,
        header: &str,
        added: &[String],
        removed: &[String],
        default: Option<DefaultChange>,
    ) {
        let metrics = &self.writer.metrics;
        metrics.count("route-added", added.len());
        metrics.count("route-removed", removed.len());
        for tag in added {
            info!(namespace = %service.namespace, service = %service.name, %tag, %header, "canary route added");
            self.event(
                service,
                EventType::Normal,
                "RouteAdded",
                format!("requests with {header}: {tag} now go to the ready pods of canary {tag}"),
            );
        }
        for tag in removed {
            info!(namespace = %service.namespace, service = %service.name, %tag, "canary route removed");
            self.event(
                service,
                EventType::Normal,
                "RouteRemoved",
                format!(
                    "canary {tag} has no ready pod; requests with its header go where requests \
                     without it go"
                ),
            );
        }
        if let Some(change) = default {
            self.report_default(service, change);
        }
    }

    /// Route settings that do not read: a Warning on the Service (once per
    /// change), the routes written without them.
    fn report_settings(&mut self, service: &ServiceRef, invalid: Vec<InvalidSetting>) {
        let key = (service.namespace.clone(), service.name.clone());
        let texts: Vec<String> = invalid.iter().map(ToString::to_string).collect();
        let reported = self.reported.entry(key).or_default();
        if reported.settings == texts {
            return;
        }
        reported.settings = texts.clone();
        if texts.is_empty() {
            return;
        }
        warn!(namespace = %service.namespace, service = %service.name,
              error = %texts.join("; "), "invalid route settings; routes written without them");
        self.event(
            service,
            EventType::Warning,
            "RouteSettingsInvalid",
            format!("{}; the routes are written without it", texts.join("; ")),
        );
    }

    /// Canaries whose weight annotation does not read: a Warning on their
    /// workload (once per problem); they count as 0.
    fn report_weights(&mut self, service: &ServiceRef, live: &Live) {
        let key = (service.namespace.clone(), service.name.clone());
        let problems: BTreeMap<String, String> = live
            .weights
            .iter()
            .filter_map(|(tag, w)| match w {
                TagWeight::Invalid(p) => Some((tag.clone(), p.to_string())),
                TagWeight::Percent(_) => None,
            })
            .collect();
        let before = std::mem::take(&mut self.reported.entry(key.clone()).or_default().weights);
        for (tag, problem) in &problems {
            if before.get(tag) == Some(problem) {
                continue;
            }
            warn!(namespace = %service.namespace, service = %service.name, %tag,
                  error = %problem, "canary weight unusable; it counts as 0");
            for owner in self.index.weight_owners(&key, tag) {
                let workload = self.writer.owners.workload(&service.namespace, &owner);
                self.writer.events.emit(EventRequest {
                    regarding: ObjectReference {
                        api_version: Some(workload.api_version.clone()),
                        kind: Some(workload.kind.clone()),
                        name: Some(workload.name.clone()),
                        namespace: Some(service.namespace.clone()),
                        uid: Some(workload.uid.clone()).filter(|u| !u.is_empty()),
                        ..ObjectReference::default()
                    },
                    type_: EventType::Warning,
                    reason: "RouteWeightInvalid".into(),
                    action: "Route".into(),
                    note: format!(
                        "{problem}: canary {tag} gets no share of the requests to Service {} \
                         without a header (it counts as 0)",
                        service.name
                    ),
                });
            }
        }
        self.reported.entry(key).or_default().weights = problems;
    }

    /// Weights adding up to more than 100: a Warning on the Service (once
    /// per sum); the split written before stands.
    fn report_weight_sum(&mut self, service: &ServiceRef, sum: Option<u32>) {
        let key = (service.namespace.clone(), service.name.clone());
        let reported = self.reported.entry(key).or_default();
        if reported.sum == sum {
            return;
        }
        reported.sum = sum;
        let Some(sum) = sum else {
            return;
        };
        warn!(namespace = %service.namespace, service = %service.name, sum,
              "canary weights add up to more than 100; the default route keeps its split");
        self.event(
            service,
            EventType::Warning,
            "RouteWeightsInvalid",
            format!(
                "the {WEIGHT_ANNOTATION} annotations of this Service's live canaries add up to \
                 {sum}, more than 100: requests without a header keep the split they had; lower \
                 the weights"
            ),
        );
    }

    /// The default route's split changed: where requests without a header
    /// go now.
    fn report_split(&self, service: &ServiceRef, split: &BTreeMap<String, u8>) {
        let canaries: u32 = split.values().map(|p| u32::from(*p)).sum();
        let mut parts = vec![format!("{}% to {NORMAL_SUBSET}", 100 - canaries.min(100))];
        parts.extend(split.iter().map(|(subset, p)| format!("{p}% to {subset}")));
        let text = parts.join(", ");
        info!(namespace = %service.namespace, service = %service.name, split = %text,
              "default route split");
        self.event(
            service,
            EventType::Normal,
            "RouteWeights",
            format!("requests without a canary header now go {text}"),
        );
    }

    /// Someone else changed or deleted one of our objects, and our write
    /// just put it back: a log line, an Event on the Service, a count.
    fn report_restored(&self, service: &ServiceRef, kind: RuleKind, name: &str, was: Edit) {
        let what = match was {
            Edit::Changed => "changed",
            Edit::Deleted => "deleted",
        };
        info!(
            namespace = %service.namespace,
            service = %service.name,
            %kind,
            %name,
            edit = what,
            "routing object restored after someone else's edit"
        );
        self.writer
            .metrics
            .restored
            .with_label_values(&[kind.as_str()])
            .inc();
        let owned = match kind {
            RuleKind::DestinationRule => "host and subsets",
            RuleKind::VirtualService => "hosts and http routes",
            RuleKind::HttpRoute => "parentRefs and rules",
            RuleKind::GrpcRoute => "parentRefs and rules",
            RuleKind::Service => "selector and ports",
        };
        self.event(
            service,
            EventType::Normal,
            "RoutesRestored",
            format!(
                "{kind} {name} was {what} by someone else; canary-injector put back its \
                 {owned}, which it owns (add other fields with your own field manager)"
            ),
        );
    }

    /// The default route switched between `normal` and the whole Service.
    /// Only logged: the Warning comes from [`Routes::no_normal_pod`] once
    /// the condition has held for a while.
    fn report_default(&self, service: &ServiceRef, change: DefaultChange) {
        match change.to {
            DefaultRoute::Service => info!(
                namespace = %service.namespace,
                service = %service.name,
                "no ready normal pod: the default route goes to every ready endpoint of the Service"
            ),
            DefaultRoute::Normal => info!(
                namespace = %service.namespace,
                service = %service.name,
                "normal pods ready: the default route goes to subset normal"
            ),
        }
    }

    /// Tracks how long a routed Service has had no ready normal pod. A
    /// Service whose pods are still becoming ready is no news: the
    /// `RouteNoNormalPod` Warning comes once the condition has held for
    /// `routes.noNormalPodWarningSeconds`, and a `RouteToNormal` Event
    /// when it ends after that Warning. The time to look again, while the
    /// Warning is still to come.
    fn no_normal_pod(&mut self, service: &ServiceRef, normal: bool) -> Option<Instant> {
        let key = (service.namespace.clone(), service.name.clone());
        let labels = &self.writer.settings.labels;
        let selector = format!("{}={}", labels.stage, labels.normal_stage);
        if normal {
            self.without_normal.remove(&key);
            if self.warned_no_normal.remove(&key) {
                self.event(
                    service,
                    EventType::Normal,
                    "RouteToNormal",
                    format!(
                        "a pod labelled {selector} is ready; requests without a canary header \
                         go to subset {NORMAL_SUBSET} again"
                    ),
                );
            }
            return None;
        }
        let now = Instant::now();
        let since = *self.without_normal.entry(key.clone()).or_insert(now);
        let due = since + self.writer.settings.no_normal_pod_warning;
        if now < due {
            return Some(due);
        }
        if self.warned_no_normal.insert(key) {
            warn!(
                namespace = %service.namespace,
                service = %service.name,
                normal_pods = %selector,
                waited_seconds = self.writer.settings.no_normal_pod_warning.as_secs(),
                "no ready normal pod: the default route goes to every ready endpoint of the Service"
            );
            self.event(
                service,
                EventType::Warning,
                "RouteNoNormalPod",
                format!(
                    "no ready endpoint of this Service is a pod labelled {selector}; requests \
                     without a canary header go to all its ready endpoints (canaries \
                     included) instead of subset {NORMAL_SUBSET}"
                ),
            );
        }
        None
    }
}

/// What was last said about a Service's route settings and weights.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Reported {
    settings: Vec<String>,
    weights: BTreeMap<String, String>,
    sum: Option<u32>,
    over: Vec<String>,
}

/// How someone else changed one of our objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edit {
    Changed,
    Deleted,
}

/// Whether our object is no longer as we left it (`left`: its spec after
/// our last write, or as seen in step; `None` in the map: absent), and
/// how. Unknown (never seen in step) is no edit.
fn changed_since<S: PartialEq>(
    left: Option<&Option<S>>,
    observed: Option<&Observed<S>>,
) -> Option<Edit> {
    let left = left?.as_ref()?;
    match observed {
        None => Some(Edit::Deleted),
        Some(o) if o.spec.as_ref() != Some(left) => Some(Edit::Changed),
        Some(_) => None,
    }
}

/// The same for a spec read without [`Observed`] (a version Service's).
fn restored_edit<S: PartialEq>(left: Option<&Option<S>>, observed: Option<&S>) -> Option<Edit> {
    let left = left?.as_ref()?;
    match observed {
        None => Some(Edit::Deleted),
        Some(o) if o != left => Some(Edit::Changed),
        Some(_) => None,
    }
}

/// The `resourceVersion` of the object a watch event carries.
fn event_version(event: &watcher::Event<DynamicObject>) -> Option<&str> {
    match event {
        watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o) => {
            o.metadata.resource_version.as_deref()
        }
        watcher::Event::Init | watcher::Event::InitDone => None,
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// True when a watch error is the resource not being served (404).
fn is_not_found(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

mod gateway_api;
#[cfg(test)]
mod tests;
