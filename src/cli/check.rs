//! `canary-injector check`: is canary routing sound in this cluster, and
//! what to fix. Exit codes: 0 sound, 1 something needs fixing, 2 bad usage
//! or the API could not be read.

use std::io::IsTerminal;

use anyhow::Context as _;
use clap::ValueEnum;

use canary_injector::check::{self, cluster::Target};

use super::{CONNECT_LIMIT, Failure, OrFail, load_config, read_input, source_name};

/// How the report is printed.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum Output {
    /// For people: one block per finding (colour on a terminal).
    Text,
    /// One JSON object.
    Json,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit codes: 0 sound, 1 something needs fixing, 2 bad usage or the API could not be read.\n\
Credentials as kubectl finds them (KUBECONFIG or ~/.kube/config), else a pod's service account."
)]
pub(super) struct CheckArgs {
    /// Check manifests instead of a cluster (YAML or JSON, several
    /// documents allowed), or - for stdin: the routing rules against the
    /// pods the workloads in them will create.
    #[arg(short = 'f', long = "filename")]
    file: Option<String>,
    /// With -f: the webhook's YAML configuration (label keys, routes
    /// header); embedded defaults otherwise.
    #[arg(long, requires = "file")]
    config: Option<std::path::PathBuf>,
    /// Check only this namespace [default: every opted-in namespace].
    #[arg(long, short = 'n', conflicts_with = "file")]
    namespace: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    output: Output,
    /// The webhook's namespace.
    #[arg(long, default_value = "canary-injector")]
    webhook_namespace: String,
    /// The MutatingWebhookConfiguration.
    #[arg(long, default_value = "canary-injector")]
    webhook_configuration: String,
    /// The webhook's Service.
    #[arg(long, default_value = "canary-injector")]
    service: String,
    /// The Secret with the serving certificate (tls.crt).
    #[arg(long, default_value = "canary-injector-tls")]
    tls_secret: String,
    /// The ConfigMap with the webhook's config.yaml.
    #[arg(long, default_value = "canary-injector-config")]
    config_map: String,
}

/// Reads the cluster, prints the report; needs fixing is exit code 1.
pub(super) fn run(args: CheckArgs) -> Result<(), Failure> {
    let target = Target {
        namespace: args.webhook_namespace,
        webhook_configuration: args.webhook_configuration,
        service: args.service,
        tls_secret: args.tls_secret,
        config_map: args.config_map,
        only_namespace: args.namespace,
    };
    if let Some(file) = &args.file {
        let cfg = load_config(args.config.as_deref()).or_usage()?;
        let input = read_input(file).or_usage()?;
        let report =
            check::manifests::check_documents(&input, source_name(file), &cfg).or_usage()?;
        return print(&report, args.output);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .or_failed()?;
    let report = runtime
        .block_on(async {
            let client = canary_injector::cluster::connect(CONNECT_LIMIT).await?;
            anyhow::Ok(check::cluster::run(client, &target, now).await?)
        })
        .or_usage()?;
    print(&report, args.output)
}

/// Prints `report`; something to fix is exit code 1.
fn print(report: &check::Report, output: Output) -> Result<(), Failure> {
    match output {
        Output::Json => println!("{}", report.to_json()),
        Output::Text => {
            let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            print!("{}", report.render(colour));
        }
    }
    if report.is_sound() {
        Ok(())
    } else {
        let n = report
            .findings
            .iter()
            .filter(|f| f.severity != check::Severity::Info)
            .count();
        Err(Failure::Failed(anyhow::anyhow!(
            "{n} finding(s) need fixing"
        )))
    }
}
