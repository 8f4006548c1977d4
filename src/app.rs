//! `serve`, wired: the listeners, the certificate reloader, the caches every
//! replica needs, and the writers only the leader runs, each a named task
//! under one [`Supervisor`].
//!
//! Life of the process:
//! 1. [`App::bind`] binds both listeners and loads the serving certificate
//!    (errors here are the caller's to report: a port in use, a bad pair);
//! 2. [`App::run`] starts every task, waits (at most 10 s) for the
//!    bootstrap ConfigMap cache and the Istio injector version, then turns
//!    ready: ready means "can serve admission";
//! 3. when [`Shutdown::request`] is called (the binary does on SIGTERM):
//!    unready, keep serving for the shutdown delay (endpoints take a moment
//!    to drop the pod), then stop the writers (the Lease is released) and the
//!    listener, drain in-flight reviews, and only then stop the caches, the
//!    reloader and the metrics listener;
//! 4. when any task ends on its own (a panic in the certificate reloader, a
//!    dead listener), the same shutdown runs at once and [`App::run`]
//!    returns [`AppError::TaskEnded`] naming it, so the process exits
//!    non-zero and is restarted instead of running on half-broken.

mod supervisor;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::runtime::watcher;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

pub use supervisor::{Ended, Supervisor, TaskExit};

use crate::admission::{ClusterLookup, ConfigMapLookup};
use crate::backfill::{self, BackfillError, BackfillMetrics, BackfillSettings};
use crate::cluster::events::{self, EventMetrics, EventSink, Pace, Recorder, Reporter};
use crate::cluster::lease::{self, Elector, LeaseSettings};
use crate::cluster::watches::Shared;
use crate::cluster::{self, Cluster};
use crate::config::{Config, LeaderElectionConfig};
use crate::copier::{self, BootstrapCache, CopierSettings, CopyError};
use crate::istio::{self, DetectSettings, InjectorVersion};
use crate::metrics::{ControllerCounters, ControllerMetrics, Metrics};
use crate::mutate::{ClusterView, OwnerRef, OwnerTag};
use crate::owners::OwnerCache;
use crate::routes::controller::{
    self as routes, RouteError, RouteMetrics, RoutesSettings, RoutesWriter,
};
use crate::server::tls::{self, CertPaths, Loaded, Reloader, Resolver};
use crate::server::{self, Limits, State};
use crate::task::TaskError;

/// How long to wait for the bootstrap ConfigMap cache before turning ready
/// anyway (labels matter more than the mount).
const CACHE_SYNC_LIMIT: Duration = Duration::from_secs(10);

/// How long the caches, the reloader and the metrics listener get to stop
/// after the webhook has drained.
const REST_STOP_LIMIT: Duration = Duration::from_secs(5);

/// How long to wait for an API server outside a cluster (a laptop).
const CONNECT_LIMIT: Duration = Duration::from_secs(5);

/// Where the cluster comes from.
pub enum ClusterAccess {
    /// Connect (in-cluster service account, else kubeconfig) when the
    /// configuration needs the API; run without it when none answers.
    Discover,
    /// Never talk to an API server.
    Off,
    /// Use this client (tests: a mock apiserver).
    Client(kube::Client),
}

/// Everything `serve` takes besides the [`Config`].
pub struct ServeOptions {
    /// HTTPS address for `/mutate`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
    /// Plain-HTTP address for `/metrics`.
    pub metrics_listen: SocketAddr,
    /// The serving certificate and key (PEM files, reloaded when changed).
    pub tls: CertPaths,
    /// How often the certificate files are checked for changes.
    pub cert_reload_interval: Duration,
    /// How long to keep serving, unready, after a shutdown request.
    pub shutdown_delay: Duration,
    /// Listener limits and timeouts.
    pub limits: Limits,
    /// Benchmarks only: answer every review with these bytes.
    pub floor_response: Option<Bytes>,
    /// Where the cluster comes from.
    pub cluster: ClusterAccess,
}

/// Why `serve` could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A listener could not be bound.
    #[error("{0}")]
    Listen(#[source] std::io::Error),
    /// The serving certificate could not be loaded or used.
    #[error("cannot load the serving certificate: {0}")]
    Tls(#[source] tls::TlsError),
    /// The listener limits do not work together.
    #[error("invalid server limits: {0}")]
    Limits(#[source] crate::server::LimitsError),
    /// Metrics could not be registered (a bug: duplicate names).
    #[error("cannot register metrics: {0}")]
    Metrics(#[source] prometheus::Error),
    /// A task ended on its own; the process stopped.
    #[error("critical {0}")]
    TaskEnded(#[source] Ended),
}

/// Asks a running [`App`] to shut down (see the module docs). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    /// A handle nobody has triggered yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the shutdown; later calls do nothing.
    pub fn request(&self) {
        self.0.cancel();
    }
}

/// A bound, not yet running `serve`.
pub struct App {
    cfg: Config,
    opts: ServeOptions,
    listener: TcpListener,
    metrics_listener: TcpListener,
    provider: Arc<rustls::crypto::CryptoProvider>,
    resolver: Arc<Resolver>,
    loaded: Loaded,
    registry: Registry,
    metrics: Metrics,
    tasks: Supervisor,
    /// Stops the caches, the reloader, the metrics listener and the tasks
    /// added with [`App::supervise`]: last, after the webhook drained.
    stop_rest: CancellationToken,
}

impl App {
    /// Binds the listeners and loads the certificate.
    /// `opts.limits` are used as given (the CLI lays the `server:` section
    /// and the flags over the defaults) and checked here.
    pub async fn bind(cfg: Config, opts: ServeOptions) -> Result<Self, AppError> {
        opts.limits.validate().map_err(AppError::Limits)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = tls::load(&opts.tls, &provider).map_err(AppError::Tls)?;
        let resolver = Arc::new(Resolver::new(&loaded));
        let listener = server::bind(opts.listen).await.map_err(AppError::Listen)?;
        let metrics_listener = server::bind(opts.metrics_listen)
            .await
            .map_err(AppError::Listen)?;
        let registry = crate::metrics::new_registry();
        let metrics = Metrics::register(&registry).map_err(AppError::Metrics)?;
        if let Some(t) = loaded.not_after {
            metrics.certificate_expiry.set(t);
        }
        Ok(Self {
            cfg,
            opts,
            listener,
            metrics_listener,
            provider,
            resolver,
            loaded,
            registry,
            metrics,
            tasks: Supervisor::new(),
            stop_rest: CancellationToken::new(),
        })
    }

    /// The addresses actually bound (`:0` picks a free port): HTTPS, metrics.
    pub fn local_addrs(&self) -> (SocketAddr, SocketAddr) {
        let addr = |l: &TcpListener| l.local_addr().expect("a bound listener has an address");
        (addr(&self.listener), addr(&self.metrics_listener))
    }

    /// Adds a task to supervise with the others: it must run until `stop`
    /// is cancelled (at shutdown, with the caches); ending earlier stops the
    /// process like any other task.
    pub fn supervise<F, Fut>(&mut self, name: &'static str, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: std::future::Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        let fut = task(self.stop_rest.clone());
        self.tasks.spawn(name, fut);
    }

    /// Serves until `shutdown` is requested or a task ends; see the module
    /// docs for the order of things.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), AppError> {
        let App {
            cfg,
            opts,
            listener,
            metrics_listener,
            provider,
            resolver,
            loaded,
            registry,
            metrics,
            mut tasks,
            stop_rest,
        } = self;
        let (https_addr, metrics_addr) = (
            listener.local_addr().map_err(AppError::Listen)?,
            metrics_listener.local_addr().map_err(AppError::Listen)?,
        );
        let stop_server = CancellationToken::new();
        let stop_writers = CancellationToken::new();
        let controller_metrics =
            ControllerMetrics::register(&registry).map_err(AppError::Metrics)?;
        let event_metrics = EventMetrics::register(&registry).map_err(AppError::Metrics)?;

        let cluster = connect(&cfg, opts.cluster).await;
        let copier_settings = CopierSettings::from_config(&cfg);
        let mut bootstrap = BootstrapCache::disabled();
        let mut events = EventSink::disabled();
        if let Some(cluster) = &cluster {
            let (sink, queue) = EventSink::channel(events::QUEUE_CAPACITY, event_metrics.clone());
            events = sink;
            let recorder = Recorder::new(
                cluster.client.clone(),
                Reporter {
                    controller: "canary-injector".into(),
                    instance: Some(cluster.identity.clone()),
                },
            );
            tasks.spawn(
                "events",
                events::publish(
                    queue,
                    recorder,
                    Pace::default(),
                    event_metrics,
                    stop_writers.clone(),
                )
                .instrument(info_span!("events")),
            );
        }
        let mut writers = Writers {
            namespace_selector: cfg.namespaces.opt_in_selector(),
            ..Writers::default()
        };
        match (&cluster, copier_settings) {
            (Some(cluster), Some(settings)) => {
                let (cache, watch, source) =
                    copier::cache(cluster.client.clone(), settings.clone());
                bootstrap = cache;
                tasks.spawn(
                    "bootstrap-cache",
                    watch
                        .run(stop_rest.clone())
                        .instrument(info_span!("bootstrap")),
                );
                if settings.copy {
                    let counters =
                        controller_metrics.controller(copier::CONTROLLER, &CopyError::REASONS);
                    writers.copier = Some((settings, source, counters));
                }
            }
            (None, Some(_)) => {}
            (_, None) => info!(
                "bootstrap mounts disabled: bootstrap.enabled is false or the webhook \
                 namespace is unknown (set POD_NAMESPACE or namespaces.own)"
            ),
        }
        let mut owners = OwnerCache::disabled();
        if let Some(cluster) = &cluster {
            let (cache, watch) = crate::owners::cache(
                cluster.client.clone(),
                cfg.labels.tag_annotation.clone(),
                cfg.namespaces.clone(),
            );
            owners = cache;
            tasks.spawn(
                "owner-cache",
                watch
                    .run(stop_rest.clone())
                    .instrument(info_span!("owners")),
            );
        }
        if cluster.is_some()
            && let Some(settings) = RoutesSettings::from_config(&cfg)
        {
            writers.routes = Some(RoutesWriter {
                settings,
                metrics: RouteMetrics::register(&registry).map_err(AppError::Metrics)?,
                counters: controller_metrics.controller(routes::CONTROLLER, &RouteError::REASONS),
                events: events.clone(),
                owners: owners.clone(),
                clock: crate::routes::controller::Clock::new(),
            });
        }
        let mut versions = InjectorVersion::disabled();
        if let (Some(cluster), Some(settings)) = (&cluster, DetectSettings::from_config(&cfg)) {
            let (version, watch) = istio::watch(cluster.client.clone(), settings);
            versions = version;
            tasks.spawn(
                "istio-version",
                watch.run(stop_rest.clone()).instrument(info_span!("istio")),
            );
        }
        // What admission knows of the cluster, from the caches: the review
        // path and the backfill decide with the same.
        let cluster_view: Arc<ConfigMapLookup> = Arc::new(Caches {
            bootstrap: bootstrap.clone(),
            versions: versions.clone(),
            owners: owners.clone(),
        });
        if cluster.is_some()
            && let Some(settings) = BackfillSettings::from_config(&cfg)
        {
            writers.backfill = Some(Backfill {
                settings: settings.with_cluster_view(cluster_view.clone()),
                counters: controller_metrics
                    .controller(backfill::CONTROLLER, &BackfillError::REASONS),
                metrics: BackfillMetrics::register(&registry).map_err(AppError::Metrics)?,
                events: events.clone(),
            });
        }
        if let Some(cluster) = &cluster
            && !writers.is_empty()
        {
            start_writers(
                &mut tasks,
                cluster,
                &cfg.leader_election,
                &controller_metrics,
                &stop_writers,
                writers,
            );
        }

        let mut state = State::new(Arc::new(cfg), metrics.clone(), opts.limits)
            .with_configmaps(cluster_view)
            .with_events(events);
        state.floor_response = opts.floor_response;
        let state = Arc::new(state);

        let reloader = Reloader::new(
            opts.tls.clone(),
            provider.clone(),
            resolver.clone(),
            &loaded,
        );
        let expiry = metrics.certificate_expiry.clone();
        let interval = opts.cert_reload_interval;
        let stop = stop_rest.clone();
        tasks.spawn("cert-reloader", async move {
            reloader
                .run(interval, stop, move |t| {
                    if let Some(t) = t {
                        expiry.set(t);
                    }
                })
                .await;
            Ok(())
        });
        let stop = stop_rest.clone();
        let metrics_limits = state.limits.clone();
        tasks.spawn("metrics-server", async move {
            server::serve_metrics_with(metrics_listener, registry, metrics_limits, stop).await;
            Ok(())
        });
        let tls_config = tls::server_config(provider, resolver).map_err(AppError::Tls)?;
        let (srv_state, stop) = (state.clone(), stop_server.clone());
        tasks.spawn("webhook-server", async move {
            server::serve(listener, tls_config, srv_state, stop).await;
            Ok(())
        });
        info!(listen = %https_addr, metrics = %metrics_addr, "serving");

        let shutdown = shutdown.0;
        let mut failed = None;
        tokio::select! {
            biased;
            ended = tasks.next_ended() => failed = Some(ended),
            () = shutdown.cancelled() => {},
            () = wait_for_caches(&bootstrap, &versions, &owners) => state.set_ready(true),
        }
        if failed.is_none() && !shutdown.is_cancelled() {
            tokio::select! {
                biased;
                ended = tasks.next_ended() => failed = Some(ended),
                () = shutdown.cancelled() => {},
            }
        }
        state.set_ready(false);
        match &failed {
            Some(ended) => {
                error!(task = ended.name, error = %ended.exit, "critical task ended; shutting down");
            }
            None => {
                info!(
                    delay_seconds = opts.shutdown_delay.as_secs(),
                    "shutdown signal received; unready, then draining"
                );
                tokio::select! {
                    biased;
                    ended = tasks.next_ended() => {
                        error!(task = ended.name, error = %ended.exit, "critical task ended; shutting down");
                        failed = Some(ended);
                    }
                    () = tokio::time::sleep(opts.shutdown_delay) => {}
                }
            }
        }
        // Writers first (the Lease is released once they have stopped), with the
        // listener: the webhook drains its in-flight reviews while metrics still serve.
        stop_writers.cancel();
        stop_server.cancel();
        let drain = state.limits.drain_timeout + REST_STOP_LIMIT;
        let late = tasks
            .wait_for(
                &["webhook-server", "controllers", "leader-election", "events"],
                drain,
            )
            .await;
        if !late.is_empty() {
            warn!(tasks = ?late, "tasks did not stop in time");
        }
        stop_rest.cancel();
        let stuck = tasks.join_all(REST_STOP_LIMIT).await;
        if !stuck.is_empty() {
            warn!(tasks = ?stuck, "tasks did not stop in time; aborted");
        }
        info!("stopped");
        match failed {
            Some(ended) => Err(AppError::TaskEnded(ended)),
            None => Ok(()),
        }
    }
}

/// What admission and the backfill know of the cluster: the caches every
/// replica keeps.
struct Caches {
    bootstrap: BootstrapCache,
    versions: InjectorVersion,
    owners: OwnerCache,
}

impl ClusterLookup for Caches {
    fn view(&self, namespace: &str) -> ClusterView {
        ClusterView {
            bootstrap_configmap: self.bootstrap.availability(namespace),
            injector_version: self.versions.get(),
            mesh: self.owners.mesh(namespace),
        }
    }

    fn owner_tag(&self, namespace: &str, controller: &OwnerRef) -> Option<OwnerTag> {
        self.owners.owner_tag(namespace, controller)
    }

    fn workload(&self, namespace: &str, controller: &OwnerRef) -> OwnerRef {
        self.owners.workload(namespace, controller)
    }

    fn owners_synced(&self) -> bool {
        !self.owners.is_enabled() || self.owners.is_synced()
    }
}

/// Resolves once the bootstrap ConfigMap cache, the injector version and
/// the owner cache have synced (those that run), or after
/// [`CACHE_SYNC_LIMIT`] (with a warning): until then pods would miss the
/// keepalive fix, or a tag only their owners carry.
async fn wait_for_caches(cache: &BootstrapCache, versions: &InjectorVersion, owners: &OwnerCache) {
    let synced = || {
        (!cache.is_enabled() || cache.is_synced())
            && (!versions.is_enabled() || versions.is_synced())
            && (!owners.is_enabled() || owners.is_synced())
    };
    let deadline = tokio::time::Instant::now() + CACHE_SYNC_LIMIT;
    while !synced() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if cache.is_enabled() && !cache.is_synced() {
        warn!("bootstrap ConfigMap cache not synced after 10 s; serving anyway");
    }
    if versions.is_enabled() && !versions.is_synced() {
        warn!("Istio injector version not known after 10 s; serving anyway");
    }
    if owners.is_enabled() && !owners.is_synced() {
        warn!(
            "owner cache not synced after 10 s; serving anyway (until it is, a pod whose tag is \
             only on its owner's metadata is labelled from its own annotations)"
        );
    }
}

/// The cluster to use, if the configuration needs one and one answers.
async fn connect(cfg: &Config, access: ClusterAccess) -> Option<Cluster> {
    let namespace = cfg.own_namespace()?.to_owned();
    let wanted = cfg.bootstrap.enabled || cfg.routes.enabled || cfg.backfill.enabled;
    let client = match access {
        ClusterAccess::Off => return None,
        ClusterAccess::Client(client) => client,
        ClusterAccess::Discover if !wanted => return None,
        ClusterAccess::Discover => match cluster::connect(CONNECT_LIMIT).await {
            Ok(client) => client,
            Err(error) => {
                warn!(%error, "no Kubernetes API reachable; bootstrap mounts, routes and backfill disabled");
                return None;
            }
        },
    };
    Some(Cluster {
        client,
        namespace,
        identity: cluster::identity(),
    })
}

/// The controllers that write, which only the leader runs. One term's
/// controllers share their watches ([`Shared`]); each is `None` when the
/// configuration turns it off.
#[derive(Default)]
struct Writers {
    /// Label selector of the opted-in namespaces (`namespaces.optIn`): the
    /// one Namespace watch every writer that needs it shares.
    namespace_selector: String,
    /// The bootstrap ConfigMap copier.
    copier: Option<(CopierSettings, copier::CopySource, ControllerCounters)>,
    /// The canary routes controller.
    routes: Option<RoutesWriter>,
    /// The backfill of objects created before the webhook.
    backfill: Option<Backfill>,
}

/// What the backfill controller runs with.
struct Backfill {
    settings: BackfillSettings,
    counters: ControllerCounters,
    metrics: BackfillMetrics,
    events: EventSink,
}

impl Writers {
    fn is_empty(&self) -> bool {
        self.copier.is_none() && self.routes.is_none() && self.backfill.is_none()
    }

    /// Runs every configured controller for one leadership term, until
    /// `term` is cancelled.
    fn run(
        &self,
        client: &kube::Client,
        term: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + use<> {
        let mut parts: Vec<futures::future::BoxFuture<'static, ()>> = Vec::new();
        if let Some(writer) = &self.routes {
            parts.push(Box::pin(
                routes::run(client.clone(), writer.clone(), term.clone())
                    .instrument(info_span!("routes")),
            ));
        }
        // One watch of the opted-in namespaces for the term, subscribed to
        // by each writer that acts per namespace (before it starts).
        let namespaces =
            (self.copier.is_some() || self.backfill.is_some()).then(Shared::<Namespace>::new);
        if let (Some(namespaces), Some((settings, source, counters))) = (&namespaces, &self.copier)
        {
            parts.push(Box::pin(
                copier::run_copier(
                    client.clone(),
                    settings.clone(),
                    source.clone(),
                    namespaces.subscribe(),
                    namespaces.store(),
                    counters.clone(),
                    term.clone(),
                )
                .instrument(info_span!("bootstrap")),
            ));
        }
        if let (Some(namespaces), Some(b)) = (&namespaces, &self.backfill) {
            parts.push(Box::pin(
                backfill::run_backfill(
                    client.clone(),
                    b.settings.clone(),
                    namespaces.subscribe(),
                    namespaces.store(),
                    b.counters.clone(),
                    b.metrics.clone(),
                    b.events.clone(),
                    term.clone(),
                )
                .instrument(info_span!("backfill")),
            ));
        }
        if let Some(namespaces) = namespaces {
            let selector = watcher::Config::default().labels(&self.namespace_selector);
            let watch = namespaces.run(Api::all(client.clone()), selector, "namespaces", term);
            parts.push(Box::pin(async move {
                let _ = watch.await;
            }));
        }
        async move {
            futures::future::join_all(parts).await;
        }
    }
}

/// Runs `writers` only on the leader: a `leader-election` task on the Lease
/// and a `controllers` task gated by it; the `leader` gauge follows. With
/// leader election off, every replica runs them (one replica only!).
fn start_writers(
    tasks: &mut Supervisor,
    cluster: &Cluster,
    election: &LeaderElectionConfig,
    metrics: &ControllerMetrics,
    stop: &CancellationToken,
    writers: Writers,
) {
    let (tx, rx) = watch::channel(!election.enabled);
    // Cancelled when the gated writers have stopped (or their task is gone):
    // the Lease is released only then.
    let writers_done = CancellationToken::new();
    if election.enabled {
        let settings = LeaseSettings {
            retry_period: Duration::from_secs(election.renew_seconds().into()),
            ..LeaseSettings::new(
                election.lease_name.clone(),
                cluster.identity.clone(),
                Duration::from_secs(election.lease_duration_seconds.into()),
            )
        };
        let elector = Elector::new(
            Api::namespaced(cluster.client.clone(), &cluster.namespace),
            settings,
        );
        let stopped = writers_done.clone();
        tasks.spawn(
            "leader-election",
            lease::run(elector, tx, stop.clone(), async move {
                stopped.cancelled().await;
            })
            .instrument(info_span!("lease")),
        );
    } else {
        info!("leader election off: this replica runs the controllers");
        // Kept open: a closed channel means the election ended.
        let stop = stop.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            drop(tx);
        });
    }
    // Something here needs a leader: the no-leader alert may fire.
    metrics.leader_candidate.set(1);
    let candidate = metrics.leader_candidate.clone();
    let gauge = metrics.leader.clone();
    let mut follow = rx.clone();
    let stop_gauge = stop.clone();
    let client = cluster.client.clone();
    let gated = cluster::while_leading(rx, stop.clone(), move |term| writers.run(&client, term));
    tasks.spawn("controllers", async move {
        let _done = writers_done.drop_guard();
        let gauge_task = async {
            loop {
                gauge.set(i64::from(*follow.borrow_and_update()));
                tokio::select! {
                    () = stop_gauge.cancelled() => break,
                    changed = follow.changed() => if changed.is_err() { break },
                }
            }
            gauge.set(0);
            candidate.set(0);
        };
        let (result, ()) = tokio::join!(gated, gauge_task);
        result
    });
}

#[cfg(test)]
mod tests;
