//! Command line: `serve` (the webhook), `mutate` (offline, like
//! `istioctl kube-inject`) and `certs` (the webhook's TLS certificates).
//! Exit codes: 0 success, 1 a runtime failure (API call, refused document),
//! 2 bad usage or unreadable input/configuration.

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use canary_injector::certs;
use canary_injector::config::Config;
use canary_injector::envoy_template;
use canary_injector::metrics::{self, Metrics};
use canary_injector::mutate::labels::{is_dns_label, is_dns_subdomain};
use canary_injector::offline::{self, OfflineError};
use canary_injector::reconcile::{self, BootstrapCache, ReconcileMetrics};
use canary_injector::server::tls::{self, CertPaths, Reloader, Resolver};
use canary_injector::server::{self, Limits, State};

/// Kubernetes mutating admission webhook that labels Pods and ReplicaSets
/// for Istio canary routing.
#[derive(Debug, Parser)]
#[command(name = "canary-injector", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CANARY_INJECTOR_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the admission webhook over HTTPS.
    Serve(ServeArgs),
    /// Apply the rules to manifests offline and print the result.
    Mutate(MutateArgs),
    /// Create or renew the webhook's TLS certificates: into a directory
    /// (--out) or, in-cluster, into a Secret plus the webhook
    /// configuration's caBundle (--secret).
    Certs(CertsArgs),
    /// Set the xds-grpc TCP keepalive in an Istio Envoy bootstrap template.
    BootstrapTemplate(TemplateArgs),
}

#[derive(Debug, clap::Args)]
struct TemplateArgs {
    /// The template (`/var/lib/istio/envoy/envoy_bootstrap_tmpl.json` from
    /// the proxy image), or - for stdin.
    #[arg(short = 'f', long = "filename")]
    file: String,
    /// Seconds idle before the first probe [default: config, else 30].
    #[arg(long)]
    keepalive_time: Option<u32>,
    /// Unanswered probes before the connection is dropped [default: config, else 3].
    #[arg(long)]
    keepalive_probes: Option<u32>,
    /// Seconds between probes [default: config, else 5].
    #[arg(long)]
    keepalive_interval: Option<u32>,
    /// Print a ConfigMap manifest with this name holding the template
    /// (key envoy_bootstrap_tmpl.json) instead of the template.
    #[arg(long)]
    configmap: Option<String>,
    /// Namespace of the ConfigMap [default: config webhookNamespace, else
    /// $POD_NAMESPACE, else canary-injector].
    #[arg(long, requires = "configmap")]
    namespace: Option<String>,
    /// YAML configuration file (keepalive defaults, ConfigMap namespace).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// HTTPS address for /mutate, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Plain-HTTP address for /metrics.
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// PEM certificate chain (e.g. a mounted Secret's tls.crt). Without
    /// --tls-cert/--tls-key a development certificate is created.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key (e.g. a mounted Secret's tls.key).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Where the development certificate is kept when no --tls-cert is given.
    #[arg(long, default_value = "certs/dev")]
    dev_cert_dir: PathBuf,
    /// YAML configuration file (see README); embedded defaults otherwise.
    #[arg(long)]
    config: Option<PathBuf>,
    /// How often the certificate files are checked for changes, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    cert_reload_seconds: u64,
    /// How long in-flight reviews may take to finish after SIGTERM, in seconds.
    #[arg(long, default_value_t = 10)]
    drain_seconds: u64,
    /// After SIGTERM, keep serving (unready) this many seconds before closing
    /// the listener, so the apiserver stops sending reviews here first.
    #[arg(long, default_value_t = 5)]
    shutdown_delay_seconds: u64,
    /// Open connections at most; more wait until one closes.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Benchmarks only: answer every POST /mutate with this file's bytes,
    /// without parsing (the floor that bench/run.sh compares against).
    #[arg(long, hide = true)]
    bench_floor_response: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct MutateArgs {
    /// Manifest file (YAML or JSON, several documents allowed), or - for stdin.
    #[arg(short = 'f', long = "filename")]
    file: String,
    /// Print one JSON Patch per document instead of the mutated documents.
    #[arg(long)]
    patch: bool,
    /// YAML configuration file (see README); embedded defaults otherwise.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Do not mount the patched Istio bootstrap template into sidecars.
    #[arg(long)]
    no_bootstrap: bool,
}

/// `canary-injector certs`: see certs/README.md.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("destination").required(true).args(["out", "secret"])))]
#[command(
    after_help = "Durations are Go-style: whole numbers with h, m or s (8760h, 90m, 1h30m).\n\
Examples:\n  \
canary-injector certs --service canary-injector --namespace canary-injector --out certs/prod --print-ca-bundle\n  \
canary-injector certs --service canary-injector --namespace canary-injector \\\n    \
--secret canary-injector-tls --webhook-configuration canary-injector"
)]
struct CertsArgs {
    /// Name of the webhook's Service (first DNS name of the certificate).
    #[arg(long)]
    service: String,
    /// Namespace of the Service (and of the Secret with --secret).
    #[arg(long)]
    namespace: String,
    /// Cluster DNS domain, for the <service>.<namespace>.svc.<domain> name.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Write ca.crt, ca.key, tls.crt and tls.key into DIR (keys mode 0600).
    /// A valid CA already in DIR is reused, so the caBundle stays the same.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Print base64 of the CA certificate on stdout: the value for a
    /// webhook's clientConfig.caBundle.
    #[arg(long)]
    print_ca_bundle: bool,
    /// In-cluster: keep this kubernetes.io/tls Secret in --namespace current.
    /// Credentials as kubectl finds them (KUBECONFIG or ~/.kube/config),
    /// else the pod's service account.
    #[arg(long, value_name = "NAME", requires = "webhook_configuration")]
    secret: Option<String>,
    /// In-cluster: the Secret in --namespace that holds the CA (ca.crt,
    /// ca.key), mounted by no pod. Default: --secret with "-tls" replaced by
    /// "-ca" (canary-injector-tls: canary-injector-ca), else "-ca" appended.
    #[arg(long, value_name = "NAME", requires = "secret", conflicts_with = "out")]
    ca_secret: Option<String>,
    /// In-cluster: set clientConfig.caBundle of every webhook in this
    /// MutatingWebhookConfiguration to the Secret's CA.
    // `requires = "secret"` alone would let `--out DIR --webhook-configuration`
    // through: clap does not require an argument that conflicts with one given.
    #[arg(long, value_name = "NAME", requires = "secret", conflicts_with = "out")]
    webhook_configuration: Option<String>,
    /// Validity of a new serving certificate.
    #[arg(long, default_value = "8760h", value_parser = certs::parse_duration)]
    validity: Duration,
    /// Validity of a new CA.
    #[arg(long, default_value = "87600h", value_parser = certs::parse_duration)]
    ca_validity: Duration,
    /// Renew a certificate (serving or CA) that expires within this.
    #[arg(long, default_value = "720h", value_parser = certs::parse_duration)]
    renew_before: Duration,
}

/// Sets up the `tracing` subscriber: `RUST_LOG` filter (default `info`),
/// lines to stderr through [`crate::logging`]'s buffer.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    crate::logging::start();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::logging::BatchedStderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Exits at once (second signal), without losing the lines logged so far.
fn exit_now(code: i32) -> ! {
    crate::logging::flush();
    std::process::exit(code)
}

/// Runs the parsed command and maps failures to exit codes.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => match serve(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(Failure::Usage(e)) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
            Err(Failure::Runtime(e)) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::Mutate(args) => mutate(args),
        Command::BootstrapTemplate(args) => bootstrap_template(args),
        Command::Certs(args) => match certs_command(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(Failure::Usage(e)) => {
                eprintln!("error: {}", report(&e));
                ExitCode::from(2)
            }
            Err(Failure::Runtime(e)) => {
                eprintln!("error: {}", report(&e));
                ExitCode::from(1)
            }
        },
    }
}

fn read_input(file: &str) -> Result<String, anyhow::Error> {
    if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read standard input")?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))
    }
}

fn bootstrap_template(args: TemplateArgs) -> ExitCode {
    let fail = |e: anyhow::Error| {
        eprintln!("error: {e:#}");
        ExitCode::from(2)
    };
    let cfg = match load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let input = match read_input(&args.file) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let defaults = cfg.bootstrap.keepalive;
    let keepalive = envoy_template::Keepalive {
        time: args.keepalive_time.unwrap_or(defaults.time),
        probes: args.keepalive_probes.unwrap_or(defaults.probes),
        interval: args.keepalive_interval.unwrap_or(defaults.interval),
    };
    if keepalive.time == 0 || keepalive.probes == 0 || keepalive.interval == 0 {
        return fail(anyhow::anyhow!("keepalive values must be at least 1"));
    }
    let patched = match envoy_template::patch_template(&input, keepalive) {
        Ok(p) => p,
        Err(e) => return fail(anyhow::anyhow!("{}: {e}", args.file)),
    };
    if !patched.changed {
        eprintln!("xds-grpc keepalive already set; template unchanged");
    }
    match args.configmap {
        None => print!("{}", patched.text),
        Some(name) => {
            let namespace = args
                .namespace
                .or_else(|| cfg.own_namespace().map(str::to_owned))
                .unwrap_or_else(|| "canary-injector".into());
            match envoy_template::configmap_manifest(&name, &namespace, &patched.text) {
                Ok(yaml) => print!("{yaml}"),
                Err(e) => return fail(e.into()),
            }
        }
    }
    ExitCode::SUCCESS
}

enum Failure {
    Usage(anyhow::Error),
    Runtime(anyhow::Error),
}

fn load_config(path: Option<&Path>) -> Result<Config, anyhow::Error> {
    Ok(Config::load(path, std::env::var("POD_NAMESPACE").ok())?)
}

fn mutate(args: MutateArgs) -> ExitCode {
    let mut cfg = match load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    if args.no_bootstrap {
        cfg.bootstrap.enabled = false;
    }
    let input = match read_input(&args.file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match offline::mutate_documents(&input, &cfg, args.patch) {
        Ok(out) => {
            for w in &out.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", out.text);
            ExitCode::SUCCESS
        }
        Err(e @ (OfflineError::Denied { .. } | OfflineError::Patch { .. })) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    let cfg = load_config(args.config.as_deref()).map_err(Failure::Usage)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let paths = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => CertPaths { cert, key },
        _ => {
            let dev = certs::ensure_dev_cert(&args.dev_cert_dir)
                .context("cannot create the development certificate; pass --tls-cert and --tls-key")
                .map_err(Failure::Usage)?;
            let host = match args.listen.port() {
                443 => "localhost".to_string(),
                port => format!("localhost:{port}"),
            };
            eprintln!(
                "no --tls-cert/--tls-key: serving a development certificate for localhost ({}). Try:\n  \
                 curl --cacert {} -H 'Content-Type: application/json' --data @tests/fixtures/pod.review.json https://{host}/mutate",
                if dev.created { "created" } else { "reused" },
                dev.ca.display(),
            );
            CertPaths {
                cert: dev.cert,
                key: dev.key,
            }
        }
    };
    let loaded = tls::load(&paths, &provider)
        .context("cannot load the serving certificate")
        .map_err(Failure::Usage)?;
    let resolver = Arc::new(Resolver::new(&loaded));
    let tls_config = tls::server_config(provider.clone(), resolver.clone())
        .map_err(|e| Failure::Runtime(e.into()))?;

    let registry = metrics::new_registry();
    let metrics = Metrics::register(&registry)
        .context("cannot register metrics")
        .map_err(Failure::Runtime)?;
    if let Some(t) = loaded.not_after {
        metrics.certificate_expiry.set(t);
    }
    let limits = Limits {
        drain_timeout: Duration::from_secs(args.drain_seconds),
        max_connections: args.max_connections as usize,
        ..Limits::default()
    };
    let floor_response = match &args.bench_floor_response {
        Some(path) => Some(bytes::Bytes::from(
            std::fs::read(path)
                .with_context(|| format!("cannot read {}", path.display()))
                .map_err(Failure::Usage)?,
        )),
        None => None,
    };
    let bootstrap_settings = reconcile::Settings::from_config(&cfg);
    let reconcile_metrics = ReconcileMetrics::register(&registry)
        .context("cannot register metrics")
        .map_err(Failure::Runtime)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::Runtime)?;
    runtime.block_on(async move {
        let listener = server::bind(args.listen)
            .await
            .map_err(|e| Failure::Runtime(e.into()))?;
        let metrics_listener = server::bind(args.metrics_listen)
            .await
            .map_err(|e| Failure::Runtime(e.into()))?;
        let local = |l: &tokio::net::TcpListener| {
            l.local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into())
        };
        let (https_addr, metrics_addr) = (local(&listener), local(&metrics_listener));
        let shutdown = CancellationToken::new();
        let (bootstrap, bootstrap_task) = match bootstrap_settings {
            None => {
                info!(
                    "bootstrap mounts disabled: bootstrap.enabled is false or the webhook \
                     namespace is unknown (set POD_NAMESPACE or webhookNamespace)"
                );
                (BootstrapCache::disabled(), None)
            }
            Some(settings) => match connect_kube(Duration::from_secs(5)).await {
                Ok(client) => {
                    let (cache, task) =
                        reconcile::start(client, settings, reconcile_metrics, shutdown.clone());
                    (cache, Some(task))
                }
                Err(error) => {
                    warn!(%error, "no Kubernetes API reachable; bootstrap mounts disabled");
                    (BootstrapCache::disabled(), None)
                }
            },
        };
        let lookup = bootstrap.clone();
        let mut state = State::new(Arc::new(cfg), metrics.clone(), limits)
            .with_configmaps(Arc::new(move |ns: &str| lookup.availability(ns)));
        state.floor_response = floor_response;
        let state = Arc::new(state);
        tokio::spawn(on_signals(
            shutdown.clone(),
            state.clone(),
            Duration::from_secs(args.shutdown_delay_seconds),
        ));
        let reloader = Reloader::new(paths, provider, resolver, &loaded);
        let expiry = metrics.certificate_expiry.clone();
        tokio::spawn(reloader.run(
            Duration::from_secs(args.cert_reload_seconds),
            shutdown.clone(),
            move |t| {
                if let Some(t) = t {
                    expiry.set(t);
                }
            },
        ));
        let metrics_task = tokio::spawn(server::serve_metrics(
            metrics_listener,
            registry,
            shutdown.clone(),
        ));
        info!(listen = %https_addr, metrics = %metrics_addr, "serving");
        if bootstrap_task.is_some() {
            // Ready once the cache knows where the ConfigMap is, so the first
            // pods are not skipped for want of a cache; bounded, since labels
            // matter more than the mount.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !bootstrap.is_synced() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !bootstrap.is_synced() {
                warn!("bootstrap ConfigMap cache not synced after 10 s; serving anyway");
            }
        }
        state.set_ready(true);
        server::serve(listener, tls_config, state, shutdown.clone()).await;
        shutdown.cancel();
        let _ = metrics_task.await;
        if let Some(task) = bootstrap_task {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        info!("stopped");
        Ok(())
    })
}

fn certs_command(args: CertsArgs) -> Result<(), Failure> {
    let usage = |msg: String| Failure::Usage(anyhow::anyhow!(msg));
    for (flag, value) in [
        ("--service", &args.service),
        ("--namespace", &args.namespace),
    ] {
        if !is_dns_label(value) {
            return Err(usage(format!(
                "{flag} {value:?} is not a DNS label (lowercase letters, digits and '-', at most 63)"
            )));
        }
    }
    if !is_dns_subdomain(&args.cluster_domain) {
        return Err(usage(format!(
            "--cluster-domain {:?} is not a DNS name",
            args.cluster_domain
        )));
    }
    let lifetimes = certs::Lifetimes {
        validity: args.validity,
        ca_validity: args.ca_validity,
        renew_before: args.renew_before,
    };
    if lifetimes.validity <= lifetimes.renew_before {
        return Err(usage(
            "--validity must be longer than --renew-before, or every run would renew".into(),
        ));
    }
    if lifetimes.ca_validity < lifetimes.validity {
        return Err(usage(
            "--ca-validity must be at least --validity (a certificate cannot outlive its CA)"
                .into(),
        ));
    }
    let sans = certs::service_sans(&args.service, &args.namespace, &args.cluster_domain);

    let ca_pem = if let Some(dir) = &args.out {
        let out = certs::write_out_dir(dir, &sans, &lifetimes)
            .with_context(|| format!("cannot write certificates to {}", dir.display()))
            .map_err(Failure::Runtime)?;
        match &out.ca {
            certs::CaOrigin::Reused => info!(dir = %dir.display(), "CA reused"),
            certs::CaOrigin::Created => info!(dir = %dir.display(), "CA created"),
            certs::CaOrigin::Replaced(reason) => {
                warn!(dir = %dir.display(), %reason, "CA replaced; update the caBundle");
            }
        }
        info!(dir = %dir.display(), dns_names = %sans.join(","), "serving certificate written");
        out.ca_cert_pem
    } else {
        let (Some(secret), Some(webhook_configuration)) = (args.secret, args.webhook_configuration)
        else {
            return Err(usage("--secret needs --webhook-configuration".into()));
        };
        let ca_secret = args
            .ca_secret
            .unwrap_or_else(|| certs::cluster::default_ca_secret(&secret));
        if ca_secret == secret {
            return Err(usage("--ca-secret must differ from --secret".into()));
        }
        let target = certs::cluster::Target {
            namespace: args.namespace,
            ca_secret,
            secret,
            webhook_configuration,
            sans,
            lifetimes,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
            .map_err(Failure::Runtime)?;
        runtime
            .block_on(async {
                let client = kube::Client::try_default()
                    .await
                    .context("cannot configure the Kubernetes client")?;
                anyhow::Ok(certs::cluster::ensure(client, &target).await?)
            })
            .map_err(Failure::Runtime)?
            .ca_cert_pem
    };
    if args.print_ca_bundle {
        use base64::Engine as _;
        println!(
            "{}",
            base64::engine::general_purpose::STANDARD.encode(ca_pem)
        );
    }
    Ok(())
}

/// An error and its causes on one line, like `{:#}`, but readable for kube
/// errors: their messages repeat their causes, and an API error's message
/// embeds the whole `Status` in Debug form. So a cause already contained in
/// the previous message is left out, and an API error is shown as
/// `message (Reason, code)`.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut previous = String::new();
    for cause in e.chain() {
        let text = match cause.downcast_ref::<kube::Error>() {
            Some(kube::Error::Api(s)) => format!("{} ({}, {})", s.message, s.reason, s.code),
            _ => cause.to_string(),
        };
        if !previous.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        if matches!(
            cause.downcast_ref::<kube::Error>(),
            Some(kube::Error::Api(_))
        ) {
            break;
        }
        previous = text;
    }
    out
}

/// First SIGTERM/SIGINT: turn unready, keep serving for `delay` (endpoints
/// take a moment to drop this pod), then stop accepting and drain. Second
/// signal: exit now.
async fn on_signals(shutdown: CancellationToken, state: Arc<State>, delay: Duration) {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            error!("cannot install signal handlers");
            return;
        }
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    info!(
        delay_seconds = delay.as_secs(),
        "shutdown signal received; unready, then draining"
    );
    state.set_ready(false);
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = term.recv() => { warn!("second signal; exiting"); exit_now(130) }
        _ = int.recv() => { warn!("second signal; exiting"); exit_now(130) }
    }
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    warn!("second signal; exiting without waiting for in-flight requests");
    exit_now(130)
}

/// A client for the cluster (in-cluster service account, else kubeconfig).
/// In a cluster the watches retry on their own, so no probe; elsewhere the
/// API must answer `GET /version` within `limit`, or bootstrap mounts stay off.
async fn connect_kube(limit: Duration) -> anyhow::Result<kube::Client> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    tokio::time::timeout(limit, async {
        let client = kube::Client::try_default().await?;
        if !in_cluster {
            client.apiserver_version().await?;
        }
        Ok::<_, kube::Error>(client)
    })
    .await
    .map_err(|_| anyhow::anyhow!("no answer within {limit:?}"))?
    .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_shows_an_api_error_once_and_briefly() {
        let status =
            kube::core::Status::failure("secrets \"x\" is forbidden", "Forbidden").with_code(403);
        let e =
            anyhow::Error::new(kube::Error::Api(status.boxed())).context("cannot get Secret ns/x");
        assert_eq!(
            report(&e),
            "cannot get Secret ns/x: secrets \"x\" is forbidden (Forbidden, 403)"
        );
    }

    #[test]
    fn report_skips_causes_repeated_in_the_message() {
        let io = std::io::Error::other("connection refused");
        let e = anyhow::Error::new(io)
            .context("tcp connect error: connection refused")
            .context("cannot get Secret ns/x");
        assert_eq!(
            report(&e),
            "cannot get Secret ns/x: tcp connect error: connection refused"
        );
    }
}
