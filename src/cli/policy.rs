//! `canary-injector policy`: the label rules of the configuration as a
//! native MutatingAdmissionPolicy (plus a ValidatingAdmissionPolicy for the
//! tags it refuses) and their bindings, printed as YAML for
//! `kubectl apply -f -`.

use std::path::PathBuf;

use canary_injector::policy::{self, ApiVersion, Options, Reinvocation};

use super::{Failure, OrFail, load_config};

#[derive(Debug, clap::Args)]
pub(super) struct PolicyArgs {
    /// YAML configuration file (see docs/configuration.md); embedded defaults otherwise,
    /// as `serve`. The webhook's namespace is excluded too: config
    /// namespaces.own, else $POD_NAMESPACE, else canary-injector.
    #[arg(long)]
    config: Option<PathBuf>,
    /// admissionregistration.k8s.io version of the MutatingAdmissionPolicy
    /// and its binding: v1 needs Kubernetes 1.36+; v1beta1 1.34-1.35 with
    /// the MutatingAdmissionPolicy feature gate.
    #[arg(long, default_value = "v1", value_parser = ApiVersion::NAMES)]
    api_version: String,
    /// Whether the policy runs again after a later mutation changed the
    /// object (Istio's injector, say): IfNeeded, as the webhook, or Never.
    #[arg(long, default_value = "IfNeeded", value_parser = Reinvocation::NAMES)]
    reinvocation_policy: String,
}

/// Prints the objects; a bad configuration or option is exit code 2.
pub(super) fn run(args: PolicyArgs) -> Result<(), Failure> {
    let mut cfg = load_config(args.config.as_deref()).or_usage()?;
    if cfg.namespaces.own.is_none() {
        cfg.namespaces.own = Some("canary-injector".into());
    }
    let options = Options {
        api_version: ApiVersion::from_name(&args.api_version).or_usage()?,
        reinvocation: Reinvocation::from_name(&args.reinvocation_policy).or_usage()?,
    };
    let text = policy::generate(cfg.policy(), &options)
        .render()
        .or_failed()?;
    print!("{text}");
    Ok(())
}
