//! `canary-injector routes -f FILE|-`: the DestinationRule and
//! VirtualService the routes controller would keep for every annotated
//! Service in the input, printed for review (GitOps).

use std::path::PathBuf;

use canary_injector::routes::objects::{GROUP, VERSIONS};
use canary_injector::routes::offline::routes_documents;

use super::{Failure, OrFail, load_config, print_offline, read_input, source_name};

#[derive(Debug, clap::Args)]
pub(super) struct RoutesArgs {
    /// Manifest file (YAML or JSON, several documents allowed), or - for
    /// stdin: Services and the workloads they select.
    #[arg(short = 'f', long = "filename")]
    file: String,
    /// YAML configuration file (see docs/configuration.md); embedded defaults otherwise.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The networking.istio.io version to write: v1 needs Istio 1.22+,
    /// v1beta1 works from Istio 1.5 on.
    #[arg(long, default_value = "v1beta1", value_parser = VERSIONS)]
    istio_api_version: String,
}

/// Prints the objects; warnings go to stderr. A document the label rules
/// refuse is exit code 1 (the objects are printed, from the labels the
/// documents have); unreadable input or a bad annotation 2, printing nothing.
pub(super) fn run(args: RoutesArgs) -> Result<(), Failure> {
    let cfg = load_config(args.config.as_deref()).or_usage()?;
    let input = read_input(&args.file).or_usage()?;
    let api_version = format!("{GROUP}/{}", args.istio_api_version);
    print_offline(
        routes_documents(&input, source_name(&args.file), &cfg, &api_version),
        "their pods count with the labels they have",
    )
}
