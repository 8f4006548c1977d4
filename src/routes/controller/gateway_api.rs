//! The routes controller on the Gateway API: reads the routed Service's
//! selector and ports, plans with [`gateway::plan`] and applies one step at
//! a time (the same loop as for Istio's API), checks conflicts with routes
//! and Services it does not own, and reads back whether a mesh accepted the
//! HTTPRoutes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use kube::runtime::events::EventType;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{
    Blocked, Memo, RouteError, Routes, STALE_RETRY, Versioned, changed_since, restored_edit,
};
use crate::routes::gateway::{
    self, Acceptance, GatewayInput, GatewayStep, HttpRouteSpec, ObservedService, ServiceShape,
    ShapeProblem, route_name,
};
use crate::routes::index::{Index, Key, ServiceEntry};
use crate::routes::objects::Observed;
use crate::routes::shape::route_settings;
use crate::routes::{Conflict, RuleKind, ServiceRef, conflicts, route_header};

/// How long an HTTPRoute may go without an implementation accepting it
/// before a Warning says so (a mesh takes a moment to write its status).
pub const ACCEPT_WAIT: Duration = Duration::from_secs(60);

/// Writes per Service per reconcile at most on the Gateway API (a route per
/// port, a Service per version; more is finished on the next pass).
const MAX_GATEWAY_STEPS: usize = 40;

impl Routes {
    /// Brings one Service in step on the Gateway API; the time to look
    /// again, if any.
    pub(super) async fn reconcile_gateway(
        &mut self,
        key: &Key,
        entry: &ServiceEntry,
        service: ServiceRef,
    ) -> Result<Option<Instant>, RouteError> {
        let shape = match self.shape(key, entry).await? {
            Some(Ok(shape)) => shape,
            Some(Err(problem)) => {
                self.block(&service, Blocked::Shape(problem));
                return Ok(None);
            }
            // Deleted meanwhile: its watch event comes next.
            None => return Ok(None),
        };
        let header = match route_header(Some(&entry.annotations), &self.writer.settings.header) {
            Ok(h) => h.to_owned(),
            Err(invalid) => {
                self.block(&service, Blocked::Header(invalid));
                return Ok(None);
            }
        };
        let live = self.index.live(key);
        let (settings, mut invalid) =
            route_settings(Some(&entry.annotations), &self.writer.settings.defaults);
        invalid.extend(gateway::unsupported(&settings));
        let mut checked = false;
        let mut warn_at = None;
        for _ in 0..MAX_GATEWAY_STEPS {
            let routes = self.observed_routes(key);
            let services = self.observed_versions(key);
            let ready: BTreeSet<String> = services
                .iter()
                .filter(|s| {
                    self.index
                        .has_ready_endpoint(&(key.0.clone(), s.name.clone()))
                })
                .map(|s| s.name.clone())
                .collect();
            let taken = self.index.names_taken(key);
            let empty = BTreeMap::new();
            let now = Instant::now();
            let plan = gateway::plan(&GatewayInput {
                service: &service,
                shape: &shape,
                header: &header,
                labels: &self.writer.settings.labels,
                live: &live,
                routes: &routes,
                services: &services,
                ready: &ready,
                taken: &taken,
                due: self.due.get(key).unwrap_or(&empty),
                now: self.writer.clock.wall(now),
                grace: self.writer.settings.grace,
                settings: &settings,
            });
            if !checked {
                let found = self.gateway_conflicts(&service, &shape, &plan.names);
                if !found.is_empty() {
                    self.block(&service, Blocked::Conflict(found));
                    return Ok(None);
                }
                if self.blocked.remove(key).is_some() {
                    info!(namespace = %key.0, service = %key.1, "routes no longer blocked");
                }
                warn_at = self.no_normal_pod(&service, live.normal);
                self.report_settings(&service, std::mem::take(&mut invalid));
                self.report_weights(&service, &live);
                self.report_over(&service, &plan.over);
                checked = true;
            }
            self.report_weight_sum(&service, plan.weights_over);
            if plan.due.is_empty() {
                self.due.remove(key);
            } else {
                self.due.insert(key.clone(), plan.due.clone());
            }
            let Some(step) = plan.step else {
                self.left_routes.insert(
                    key.clone(),
                    routes
                        .iter()
                        .map(|r| (r.name.clone(), r.spec.clone()))
                        .collect(),
                );
                self.left_versions.insert(
                    key.clone(),
                    services
                        .iter()
                        .map(|s| (s.name.clone(), Some(s.spec.clone())))
                        .collect(),
                );
                let accept_at = self.acceptance(&service, &routes);
                let wake = plan.wake_at.map(|at| self.writer.clock.instant(at));
                return Ok(wake.into_iter().chain(warn_at).chain(accept_at).min());
            };
            self.apply_step(key, &service, &header, step, &routes, &services)
                .await?;
        }
        // Not in step after so many writes: look again shortly.
        Ok(Some(Instant::now() + STALE_RETRY))
    }

    /// Applies one step of the plan and remembers its answer.
    async fn apply_step(
        &mut self,
        key: &Key,
        service: &ServiceRef,
        header: &str,
        step: GatewayStep,
        routes: &[Observed<HttpRouteSpec>],
        services: &[ObservedService],
    ) -> Result<(), RouteError> {
        let ns = &service.namespace;
        match step {
            GatewayStep::Route(w) => {
                let name = w.object.metadata.name.clone();
                let before = routes.iter().find(|r| r.name == name);
                let left = self.left_routes.get(key).and_then(|l| l.get(&name));
                let restored = changed_since(left, before);
                let split_before = before
                    .and_then(|r| r.spec.as_ref())
                    .map(|s| gateway::split_of(s, &normal_of(services), &service.name))
                    .unwrap_or_default();
                let object = self
                    .send(
                        RuleKind::HttpRoute,
                        ns,
                        &name,
                        w.object.to_json(),
                        w.create,
                        w.resource_version.as_deref(),
                    )
                    .await?;
                let result: Observed<HttpRouteSpec> = Index::observe_rule(&object);
                let kept = result.holds(&w.object.metadata, &w.object.spec);
                if let Some(was) = restored {
                    self.report_restored(service, RuleKind::HttpRoute, &name, was);
                }
                self.left_routes
                    .entry(key.clone())
                    .or_default()
                    .insert(name.clone(), result.spec.clone());
                self.memo_routes.insert(
                    (ns.clone(), name.clone()),
                    Memo {
                        prior: before.and_then(|r| r.resource_version.clone()),
                        result: Some(result),
                        of: Some(service.name.clone()),
                    },
                );
                if w.create {
                    info!(namespace = %ns, service = %service.name, route = %name, "HTTPRoute created");
                }
                let split_after =
                    gateway::split_of(&w.object.spec, &normal_of(services), &service.name);
                if split_after != split_before && before.is_some() {
                    self.report_split(service, &split_after);
                }
                self.report_route_changes(service, header, &w.added, &w.removed, w.default);
                if !kept {
                    return Err(not_kept(RuleKind::HttpRoute, ns, &name));
                }
            }
            GatewayStep::Service(w) => {
                let name = w.object.metadata.name.clone();
                let before = services.iter().find(|s| s.name == name);
                let left = self.left_versions.get(key).and_then(|l| l.get(&name));
                let restored = restored_edit(left, before.map(|b| &b.spec));
                let object = self
                    .send(
                        RuleKind::Service,
                        ns,
                        &name,
                        w.object.to_json(),
                        w.create,
                        w.resource_version.as_deref(),
                    )
                    .await?;
                let (_, row) = Index::version_row(object);
                let result = row.unwrap_or_default();
                let kept = result.holds(&w.object);
                if let Some(was) = restored {
                    self.report_restored(service, RuleKind::Service, &name, was);
                }
                self.left_versions
                    .entry(key.clone())
                    .or_default()
                    .insert(name.clone(), Some(result.spec.clone()));
                let tag = result.tag.clone();
                self.memo_versions.insert(
                    (ns.clone(), name.clone()),
                    Memo {
                        prior: before.and_then(|s| s.resource_version.clone()),
                        result: Some(result),
                        of: Some(service.name.clone()),
                    },
                );
                let version = tag.as_deref().unwrap_or("normal");
                if w.create {
                    self.writer.metrics.count("service-added", 1);
                    info!(namespace = %ns, service = %service.name, %version, version_service = %name, "version Service created");
                } else {
                    info!(namespace = %ns, service = %service.name, %version, version_service = %name, "version Service updated");
                }
                if !kept {
                    return Err(not_kept(RuleKind::Service, ns, &name));
                }
            }
            GatewayStep::Delete(d) => {
                self.delete(
                    d.kind,
                    ns,
                    &d.name,
                    d.uid.clone(),
                    d.resource_version.clone(),
                )
                .await?;
                self.forget_deleted(key, d.kind, &d.name, d.resource_version);
                match d.kind {
                    RuleKind::Service => {
                        self.writer.metrics.count("service-removed", 1);
                        info!(namespace = %ns, service = %service.name,
                              version = %d.tag.as_deref().unwrap_or("normal"),
                              version_service = %d.name, "version Service deleted");
                    }
                    _ => {
                        self.writer.metrics.count("objects-deleted", 1);
                        info!(namespace = %ns, service = %service.name, route = %d.name,
                              "HTTPRoute deleted: the Service no longer has its port");
                    }
                }
            }
        }
        Ok(())
    }

    /// Notes our delete of one object (the cache shows it until its watch
    /// catches up).
    fn forget_deleted(&mut self, key: &Key, kind: RuleKind, name: &str, prior: Option<String>) {
        let object = (key.0.clone(), name.to_owned());
        match kind {
            RuleKind::Service => {
                self.memo_versions.insert(
                    object,
                    Memo {
                        prior,
                        result: None,
                        of: Some(key.1.clone()),
                    },
                );
                if let Some(left) = self.left_versions.get_mut(key) {
                    left.remove(name);
                }
            }
            _ => {
                self.memo_routes.insert(
                    object,
                    Memo {
                        prior,
                        result: None,
                        of: Some(key.1.clone()),
                    },
                );
                if let Some(left) = self.left_routes.get_mut(key) {
                    left.remove(name);
                }
            }
        }
    }

    /// Deletes our HTTPRoutes, then our version Services, of a Service
    /// that no longer wants routes on the Gateway API.
    pub(super) async fn remove_gateway(&mut self, key: &Key) -> Result<(), RouteError> {
        if self.apis.gateway.is_none() {
            return Ok(());
        }
        for _ in 0..MAX_GATEWAY_STEPS {
            let routes = self.observed_routes(key);
            let services = self.observed_versions(key);
            let Some(d) = gateway::plan_removal(&key.1, &routes, &services) else {
                return Ok(());
            };
            if self
                .delete(
                    d.kind,
                    &key.0,
                    &d.name,
                    d.uid.clone(),
                    d.resource_version.clone(),
                )
                .await?
            {
                self.writer.metrics.count("objects-deleted", 1);
                info!(namespace = %key.0, service = %key.1, kind = %d.kind, name = %d.name,
                      "routing object deleted: the Service no longer asks for routes on the Gateway API");
            }
            self.forget_deleted(key, d.kind, &d.name, d.resource_version);
        }
        Ok(())
    }

    /// Our objects of one kind for the Service `key` as to plan from: the
    /// cache, or our latest write where the cache has not caught up.
    fn observed_of<T: Versioned>(
        key: &Key,
        cached: BTreeMap<String, T>,
        lookup: impl Fn(&Key) -> Option<T>,
        memo: &mut std::collections::HashMap<Key, Memo<T>>,
        newest: u64,
        ours: impl Fn(&T) -> bool,
    ) -> Vec<T> {
        let mut names: BTreeSet<String> = cached.into_keys().collect();
        names.extend(
            memo.iter()
                .filter(|(k, m)| k.0 == key.0 && m.of.as_deref() == Some(&key.1))
                .map(|(k, _)| k.1.clone()),
        );
        names
            .into_iter()
            .filter_map(|name| {
                let object = (key.0.clone(), name);
                let cached = lookup(&object);
                Self::observe(cached.as_ref(), memo, &object, newest)
            })
            .filter(|o| ours(o))
            .collect()
    }

    fn observed_routes(&mut self, key: &Key) -> Vec<Observed<HttpRouteSpec>> {
        let index = &self.index;
        let cached = index
            .http_routes_of(key)
            .into_iter()
            .map(|(n, o)| (n, o.clone()))
            .collect();
        Self::observed_of(
            key,
            cached,
            |k| index.http_route(k).cloned(),
            &mut self.memo_routes,
            index.newest_rule_version(RuleKind::HttpRoute),
            |o| o.managed && o.route_of.as_deref() == Some(&key.1),
        )
    }

    fn observed_versions(&mut self, key: &Key) -> Vec<ObservedService> {
        let index = &self.index;
        let cached = index
            .versions_of(key)
            .into_iter()
            .map(|(n, o)| (n, o.clone()))
            .collect();
        Self::observed_of(
            key,
            cached,
            |k| index.version(k).cloned(),
            &mut self.memo_versions,
            index.newest_rule_version(RuleKind::Service),
            |o| o.is_version_of(&key.1),
        )
    }

    /// The routed Service's selector and ports, read again when its
    /// `resourceVersion` changed; `None` when it is gone.
    async fn shape(
        &mut self,
        key: &Key,
        entry: &ServiceEntry,
    ) -> Result<Option<Result<ServiceShape, ShapeProblem>>, RouteError> {
        if let Some((version, shape)) = self.shapes.get(key)
            && at_least(version.as_deref(), entry.resource_version.as_deref())
        {
            return Ok(Some(shape.clone()));
        }
        let api: Api<Service> = Api::namespaced(self.client.clone(), &key.0);
        let read = match api.get_opt(&key.1).await {
            Ok(Some(read)) => read,
            Ok(None) => return Ok(None),
            Err(source) => {
                return Err(RouteError::Read {
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                    source,
                });
            }
        };
        let spec = serde_json::to_value(&read.spec).unwrap_or_default();
        let shape = ServiceShape::from_spec(&spec);
        self.shapes.insert(
            key.clone(),
            (read.metadata.resource_version.clone(), shape.clone()),
        );
        Ok(Some(shape))
    }

    /// What stands in the way on the Gateway API: routes not ours with the
    /// Service as parent or with the name of one of our routes, Services
    /// not ours with the name of one of our version Services.
    fn gateway_conflicts(
        &self,
        service: &ServiceRef,
        shape: &ServiceShape,
        names: &BTreeMap<gateway::Version, String>,
    ) -> Vec<Conflict> {
        let ns = &service.namespace;
        let mut found: Vec<Conflict> = conflicts(service, self.index.gateway_routes_in(ns))
            .into_iter()
            // A GRPCRoute of the Service's name takes no name of ours.
            .filter(|c| {
                !matches!(
                    c,
                    Conflict::SameName {
                        kind: RuleKind::GrpcRoute
                    }
                )
            })
            .collect();
        for port in &shape.ports {
            let name = route_name(&service.name, port.port, shape.ports.len());
            let theirs = self
                .index
                .http_route(&(ns.clone(), name.clone()))
                .is_some_and(|r| r.managed && r.route_of.as_deref() != Some(&service.name));
            if theirs {
                found.push(Conflict::Named {
                    kind: RuleKind::HttpRoute,
                    name,
                });
            }
        }
        for name in names.values() {
            if self
                .index
                .foreign_service(&(ns.clone(), name.clone()), &service.name)
            {
                found.push(Conflict::Named {
                    kind: RuleKind::Service,
                    name: name.clone(),
                });
            }
        }
        found.sort();
        found.dedup();
        found
    }

    /// Live canaries beyond [`gateway::MAX_TAGS`]: a Warning on the
    /// Service (once per set).
    fn report_over(&mut self, service: &ServiceRef, over: &[String]) {
        let key = (service.namespace.clone(), service.name.clone());
        let reported = self.reported.entry(key).or_default();
        if reported.over == over {
            return;
        }
        reported.over = over.to_vec();
        if over.is_empty() {
            return;
        }
        warn!(namespace = %service.namespace, service = %service.name, tags = %over.join(", "),
              "more live canaries than an HTTPRoute can route; these get no route");
        self.event(
            service,
            EventType::Warning,
            "RouteTooManyCanaries",
            format!(
                "an HTTPRoute holds at most {} canary rules: canaries {} get no route and no \
                 version Service (requests with their header go where requests without it go)",
                gateway::MAX_TAGS,
                over.join(", ")
            ),
        );
    }

    /// Whether a mesh took up the Service's HTTPRoutes: a Warning when no
    /// implementation has accepted them for [`ACCEPT_WAIT`], or one did
    /// not accept them, or a backend does not resolve; a Normal Event when
    /// that is over. The time to look again, while a Warning may be due.
    fn acceptance(
        &mut self,
        service: &ServiceRef,
        routes: &[Observed<HttpRouteSpec>],
    ) -> Option<Instant> {
        let key = (service.namespace.clone(), service.name.clone());
        let state = routes
            .iter()
            .map(|r| (r.name.as_str(), r.status.acceptance()))
            .find(|(_, a)| *a != Acceptance::Accepted);
        let Some((route, state)) = state else {
            self.unaccepted.remove(&key);
            if self.said_acceptance.remove(&key).is_some() {
                info!(namespace = %service.namespace, service = %service.name, "HTTPRoutes accepted");
                self.event(
                    service,
                    EventType::Normal,
                    "RouteAccepted",
                    "the HTTPRoutes of this Service are accepted and their backends resolve".into(),
                );
            }
            return None;
        };
        let now = Instant::now();
        let since = *self.unaccepted.entry(key.clone()).or_insert(now);
        let due = since + ACCEPT_WAIT;
        if now < due {
            return Some(due);
        }
        let (reason, note) = match state {
            Acceptance::NoImplementation => (
                "RouteNotAccepted",
                format!(
                    "no Gateway API implementation has accepted HTTPRoute {route} after {}s: \
                     the canary routes do nothing until a mesh that implements the Gateway API \
                     for Services (GAMMA: Istio, with a waypoint in ambient mode; Linkerd; \
                     Cilium ...) routes this Service",
                    ACCEPT_WAIT.as_secs()
                ),
            ),
            Acceptance::Rejected(who) => (
                "RouteNotAccepted",
                format!("HTTPRoute {route} is not accepted by {who}: the canary routes do nothing"),
            ),
            Acceptance::RefsNotResolved(who) => (
                "RouteRefsNotResolved",
                format!(
                    "HTTPRoute {route}: a backend does not resolve ({who}); requests routed to it \
                     fail"
                ),
            ),
            Acceptance::Accepted => return None,
        };
        if self.said_acceptance.get(&key) != Some(&note) {
            warn!(namespace = %service.namespace, service = %service.name, %reason, %note,
                  "HTTPRoute not taken up");
            self.event(service, EventType::Warning, reason, note.clone());
            self.said_acceptance.insert(key, note);
        }
        None
    }
}

/// The name of the normal version Service among `services` (for reading
/// a split), or an empty name.
fn normal_of(services: &[ObservedService]) -> String {
    services
        .iter()
        .find(|s| s.tag.is_none())
        .map(|s| s.name.clone())
        .unwrap_or_default()
}

/// True when a read at `read` is at least as new as `wanted`
/// (`resourceVersion`s compared as numbers; else for equality).
fn at_least(read: Option<&str>, wanted: Option<&str>) -> bool {
    match (read, wanted) {
        (Some(r), Some(w)) => match (r.parse::<u64>(), w.parse::<u64>()) {
            (Ok(r), Ok(w)) => r >= w,
            _ => r == w,
        },
        (_, None) => true,
        (None, Some(_)) => false,
    }
}

fn not_kept(kind: RuleKind, namespace: &str, name: &str) -> RouteError {
    RouteError::NotKept {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}
