//! `canary-injector certs`: the webhook's CA and serving certificate, into a
//! directory (`--out`) or, in-cluster, into a Secret and the webhook
//! configuration's `caBundle` (`--secret`). See certs/README.md.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tracing::{info, warn};

use canary_injector::certs;
use canary_injector::mutate::labels::{is_dns_label, is_dns_subdomain};

use super::{Failure, OrFail};

/// `canary-injector certs`: see certs/README.md.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("destination").required(true).args(["out", "secret"])))]
#[command(
    after_help = "Durations are Go-style: numbers with units ns, us, ms, s, m or h (8760h, 90m, 1h30m, 1.5h).\n\
Examples:\n  \
canary-injector certs --service canary-injector --namespace canary-injector --out certs/prod --print-ca-bundle\n  \
canary-injector certs --service canary-injector --namespace canary-injector \\\n    \
--secret canary-injector-tls --webhook-configuration canary-injector"
)]
pub(super) struct CertsArgs {
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

/// Creates or renews the certificates; bad flags are exit code 2, a failed
/// API call or file write 1.
pub(super) fn run(args: CertsArgs) -> Result<(), Failure> {
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
            .or_failed()?;
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
            .or_failed()?;
        runtime
            .block_on(async {
                let client = canary_injector::cluster::connect(super::CONNECT_LIMIT).await?;
                anyhow::Ok(certs::cluster::ensure(client, &target).await?)
            })
            .or_failed()?
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
