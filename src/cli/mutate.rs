//! `canary-injector mutate -f FILE|-`: the admission rules applied to
//! manifests offline, like `istioctl kube-inject`.

use std::path::PathBuf;

use canary_injector::offline::{self, OfflineError};

use super::{Failure, OrFail, load_config, read_input};

#[derive(Debug, clap::Args)]
pub(super) struct MutateArgs {
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

/// Prints the mutated documents (or patches); warnings go to stderr. A
/// document the rules refuse is exit code 1, unreadable input 2.
pub(super) fn run(args: MutateArgs) -> Result<(), Failure> {
    let mut cfg = load_config(args.config.as_deref()).or_usage()?;
    if args.no_bootstrap {
        cfg.bootstrap.enabled = false;
    }
    let input = read_input(&args.file).or_usage()?;
    match offline::mutate_documents(&input, &cfg, args.patch) {
        Ok(out) => {
            for w in &out.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", out.text);
            Ok(())
        }
        Err(e @ (OfflineError::Denied { .. } | OfflineError::Patch { .. })) => {
            Err(Failure::Failed(e.into()))
        }
        Err(e) => Err(Failure::Usage(e.into())),
    }
}
