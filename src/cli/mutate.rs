//! `canary-injector mutate -f FILE|-`: the admission rules applied to
//! manifests offline, like `istioctl kube-inject`.

use std::path::PathBuf;

use canary_injector::offline;

use super::{Failure, OrFail, load_config, print_offline, read_input, source_name};

#[derive(Debug, clap::Args)]
pub(super) struct MutateArgs {
    /// Manifest file (YAML, several documents allowed, or one JSON document),
    /// or - for stdin.
    #[arg(short = 'f', long = "filename")]
    file: String,
    /// Print one JSON Patch per document instead of the mutated documents.
    #[arg(long)]
    patch: bool,
    /// YAML configuration file (see docs/configuration.md); embedded defaults otherwise.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Istio proxy version of pods not injected yet (e.g. 1.7, 1.20): which
    /// keepalive fix they get [default: config istio.proxyVersion; none:
    /// such pods are left alone]. Injected pods carry theirs in the image tag.
    #[arg(long, value_name = "VERSION")]
    proxy_version: Option<String>,
    /// Leave Istio sidecars' keepalive alone (no bootstrap template mount,
    /// no agent keepalive env).
    #[arg(long)]
    no_bootstrap: bool,
}

/// Prints the mutated documents (or patches) in the input's format;
/// warnings go to stderr. A document the rules refuse is printed unchanged,
/// the others mutated, and the exit code is 1; unusable input is 2 and
/// prints nothing.
pub(super) fn run(args: MutateArgs) -> Result<(), Failure> {
    let mut cfg = load_config(args.config.as_deref()).or_usage()?;
    if args.no_bootstrap {
        cfg.bootstrap.enabled = false;
    }
    if let Some(version) = args.proxy_version {
        cfg.istio.proxy_version = Some(version);
        cfg.istio
            .validate()
            .map_err(|e| anyhow::anyhow!("--proxy-version: {}", e.reason))
            .or_usage()?;
    }
    let input = read_input(&args.file).or_usage()?;
    let source = source_name(&args.file);
    print_offline(
        offline::mutate_documents(&input, source, &cfg, args.patch),
        "printed unchanged",
    )
}
