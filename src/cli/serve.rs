//! `canary-injector serve`: the flags, the development certificate, the
//! signal handling; the wiring itself is [`canary_injector::app`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tracing::{error, warn};

use canary_injector::app::{App, AppError, ClusterAccess, ServeOptions, Shutdown};
use canary_injector::certs;
use canary_injector::server::Limits;
use canary_injector::server::tls::CertPaths;

use super::{Failure, OrFail, exit_now, load_config};

#[derive(Debug, clap::Args)]
pub(super) struct ServeArgs {
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
    /// YAML configuration file (see docs/configuration.md); embedded defaults otherwise.
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
    /// Open connections at most; at the cap, a few more are accepted for one
    /// probe each, the rest wait until one closes [default: config
    /// server.maxConnections, else 1024].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: Option<u32>,
    /// Benchmarks only: answer every POST /mutate with this file's bytes,
    /// without parsing (the floor that bench/run.sh compares against).
    #[arg(long, hide = true)]
    bench_floor_response: Option<PathBuf>,
}

/// Serves until SIGTERM/SIGINT. A bad configuration or certificate is exit
/// code 2; a port in use or a critical task that ended is 1.
pub(super) fn run(args: ServeArgs) -> Result<(), Failure> {
    let cfg = load_config(args.config.as_deref()).or_usage()?;
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => CertPaths { cert, key },
        _ => dev_certificate(&args.dev_cert_dir, args.listen)?,
    };
    let floor_response = match &args.bench_floor_response {
        Some(path) => Some(bytes::Bytes::from(
            std::fs::read(path)
                .with_context(|| format!("cannot read {}", path.display()))
                .or_usage()?,
        )),
        None => None,
    };
    let opts = ServeOptions {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        tls,
        cert_reload_interval: Duration::from_secs(args.cert_reload_seconds),
        shutdown_delay: Duration::from_secs(args.shutdown_delay_seconds),
        limits: Limits {
            drain_timeout: Duration::from_secs(args.drain_seconds),
            max_connections: args
                .max_connections
                .map_or(cfg.server.max_connections, |n| n as usize),
            ..cfg.server.limits(Limits::default())
        },
        floor_response,
        cluster: ClusterAccess::Discover,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .or_failed()?;
    runtime.block_on(async move {
        let app = App::bind(cfg, opts).await.map_err(|e| match e {
            AppError::Tls(_) | AppError::Limits(_) => Failure::Usage(e.into()),
            _ => Failure::Failed(e.into()),
        })?;
        let shutdown = Shutdown::new();
        tokio::spawn(on_signals(shutdown.clone()));
        app.run(shutdown).await.or_failed()
    })
}

/// Creates (or reuses) the development certificate for localhost and says
/// how to try the server with it.
fn dev_certificate(dir: &std::path::Path, listen: SocketAddr) -> Result<CertPaths, Failure> {
    let dev = certs::ensure_dev_cert(dir)
        .context("cannot create the development certificate; pass --tls-cert and --tls-key")
        .or_usage()?;
    let host = match listen.port() {
        443 => "localhost".to_string(),
        port => format!("localhost:{port}"),
    };
    eprintln!(
        "no --tls-cert/--tls-key: serving a development certificate for localhost ({}). Try:\n  \
         curl --cacert {} -H 'Content-Type: application/json' --data @tests/fixtures/pod.review.json https://{host}/mutate",
        if dev.created { "created" } else { "reused" },
        dev.ca.display(),
    );
    Ok(CertPaths {
        cert: dev.cert,
        key: dev.key,
    })
}

/// First SIGTERM/SIGINT: ask the app to shut down (unready, delay, drain).
/// A second one: exit at once with 130, in-flight reviews or not.
async fn on_signals(shutdown: Shutdown) {
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
    shutdown.request();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    warn!("second signal; exiting");
    exit_now(130)
}
