//! `canary-injector routes -f FILE|-`: the DestinationRule and
//! VirtualService (or, on the Gateway API, the version Services and
//! HTTPRoutes) the routes controller would keep for every annotated Service
//! in the input, printed for review (GitOps).

use std::path::PathBuf;

use canary_injector::routes::gateway::ApiChoice;
use canary_injector::routes::objects::{GROUP, VERSIONS};
use canary_injector::routes::offline::{Target, routes_documents};

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
    /// The route API: istio (DestinationRule + VirtualService) or
    /// gateway-api (version Services + HTTPRoutes). Default: the
    /// configuration's routes.api, where auto means istio offline. A
    /// Service's canary-injector.io/route-api annotation wins.
    #[arg(long, value_parser = ["istio", "gateway-api"])]
    api: Option<String>,
}

/// Prints the objects; warnings go to stderr. A document the label rules
/// refuse is exit code 1 (the objects are printed, from the labels the
/// documents have); unreadable input or a bad annotation 2, printing nothing.
pub(super) fn run(args: RoutesArgs) -> Result<(), Failure> {
    let cfg = load_config(args.config.as_deref()).or_usage()?;
    let input = read_input(&args.file).or_usage()?;
    let istio = Target::Istio(format!("{GROUP}/{}", args.istio_api_version));
    let target = match (args.api.as_deref(), cfg.routes.api) {
        (Some("gateway-api"), _) | (None, ApiChoice::GatewayApi) => Target::GatewayApi,
        _ => istio,
    };
    print_offline(
        routes_documents(&input, source_name(&args.file), &cfg, &target),
        "their pods count with the labels they have",
    )
}
