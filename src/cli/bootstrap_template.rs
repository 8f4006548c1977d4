//! `canary-injector bootstrap-template`: set the xds-grpc TCP keepalive in an
//! Istio Envoy bootstrap template, optionally wrapped in a ConfigMap.

use std::path::PathBuf;

use canary_injector::envoy_template;
use canary_injector::mutate::labels::{is_dns_label, is_dns_subdomain};

use super::{Failure, OrFail, load_config, read_input};

#[derive(Debug, clap::Args)]
pub(super) struct TemplateArgs {
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
    /// Namespace of the ConfigMap [default: config namespaces.own, else
    /// $POD_NAMESPACE, else canary-injector].
    #[arg(long, requires = "configmap")]
    namespace: Option<String>,
    /// YAML configuration file (keepalive defaults, ConfigMap namespace).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Patches the template; a template it cannot patch is unusable input (2).
pub(super) fn run(args: TemplateArgs) -> Result<(), Failure> {
    let cfg = load_config(args.config.as_deref()).or_usage()?;
    let input = read_input(&args.file).or_usage()?;
    let defaults = cfg.bootstrap.keepalive;
    let keepalive = envoy_template::Keepalive {
        time: args.keepalive_time.unwrap_or(defaults.time),
        probes: args.keepalive_probes.unwrap_or(defaults.probes),
        interval: args.keepalive_interval.unwrap_or(defaults.interval),
    };
    if keepalive.time == 0 || keepalive.probes == 0 || keepalive.interval == 0 {
        return Err(Failure::Usage(anyhow::anyhow!(
            "keepalive values must be at least 1"
        )));
    }
    let patched = envoy_template::patch_template(&input, keepalive)
        .map_err(|e| Failure::Usage(anyhow::anyhow!("{}: {e}", args.file)))?;
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
            if !is_dns_subdomain(&name) {
                return Err(Failure::Usage(anyhow::anyhow!(
                    "--configmap {name:?} is not a valid ConfigMap name (a lowercase DNS \
                     subdomain: parts of [a-z0-9-] joined by '.', each starting and ending \
                     with a letter or digit, at most 253 characters)"
                )));
            }
            if !is_dns_label(&namespace) {
                return Err(Failure::Usage(anyhow::anyhow!(
                    "--namespace {namespace:?} is not a valid namespace name (lowercase \
                     letters, digits and '-', at most 63 characters, starting and ending with \
                     a letter or digit)"
                )));
            }
            let yaml =
                envoy_template::configmap_manifest(&name, &namespace, &patched.text).or_usage()?;
            print!("{yaml}");
        }
    }
    Ok(())
}
