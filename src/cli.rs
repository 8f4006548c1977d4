//! Command line: one file per subcommand under `cli/`, and what they share:
//! the argument types, logging set-up, input and config loading, and the one
//! mapping from a [`Failure`] to an exit code.
//!
//! Exit codes, for every subcommand:
//! - `0`: done (also when nothing needed doing);
//! - `1`: the input was understood but the rules refuse it (a document with an
//!   unusable tag), or an operation failed at run time (an API call, a file
//!   write, a critical task of `serve` that ended);
//! - `2`: the invocation cannot be used: bad flags, an unreadable or
//!   unparsable file, an invalid configuration, a template that is not one
//!   `bootstrap-template` can patch.

mod bootstrap_template;
mod certs;
mod check;
mod mutate;
mod policy;
mod routes;
mod serve;

use std::io::{IsTerminal, Read};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use canary_injector::config::Config;
use canary_injector::offline;

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
    Serve(serve::ServeArgs),
    /// Apply the rules to manifests offline and print the result.
    Mutate(mutate::MutateArgs),
    /// Create or renew the webhook's TLS certificates: into a directory
    /// (--out) or, in-cluster, into a Secret plus the webhook
    /// configuration's caBundle (--secret).
    Certs(certs::CertsArgs),
    /// Set the xds-grpc TCP keepalive in an Istio Envoy bootstrap template.
    BootstrapTemplate(bootstrap_template::TemplateArgs),
    /// Tell whether canary routing in the cluster is sound, and what to fix.
    Check(check::CheckArgs),
    /// Print the Istio DestinationRule and VirtualService of every Service
    /// annotated canary-injector.io/routes: "true", from the workloads in the
    /// same manifests.
    Routes(routes::RoutesArgs),
    /// Print the label rules of the configuration as a native
    /// MutatingAdmissionPolicy (Kubernetes 1.36+), with a
    /// ValidatingAdmissionPolicy for the tags it refuses, and their bindings.
    Policy(policy::PolicyArgs),
}

/// Why a subcommand failed; decides the exit code (see the module docs).
#[derive(Debug)]
pub enum Failure {
    /// Bad flags, unusable input or configuration: exit code 2.
    Usage(anyhow::Error),
    /// Refused by the rules, or failed at run time: exit code 1.
    Failed(anyhow::Error),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Failed(_) => 1,
        }
    }

    fn error(&self) -> &anyhow::Error {
        match self {
            Self::Usage(e) | Self::Failed(e) => e,
        }
    }
}

/// Shorthands for mapping errors into a [`Failure`].
trait OrFail<T> {
    /// Exit code 2.
    fn or_usage(self) -> Result<T, Failure>;
    /// Exit code 1.
    fn or_failed(self) -> Result<T, Failure>;
}

impl<T, E: Into<anyhow::Error>> OrFail<T> for Result<T, E> {
    fn or_usage(self) -> Result<T, Failure> {
        self.map_err(|e| Failure::Usage(e.into()))
    }

    fn or_failed(self) -> Result<T, Failure> {
        self.map_err(|e| Failure::Failed(e.into()))
    }
}

/// Sets up the `tracing` subscriber: `RUST_LOG` filter (default `info`),
/// lines to stderr through [`crate::logging`]'s buffer; JSON lines are
/// written by [`crate::logging::JsonLine`].
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    crate::logging::start();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::logging::BatchedStderr);
    match format {
        LogFormat::Json => builder
            .json()
            .event_format(crate::logging::JsonLine::new())
            .init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Exits at once (second signal), without losing the lines logged so far.
fn exit_now(code: i32) -> ! {
    crate::logging::flush();
    std::process::exit(code)
}

/// Runs the parsed command and maps a failure to its exit code, printing
/// `error: <reason>` on stderr.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Mutate(args) => mutate::run(args),
        Command::BootstrapTemplate(args) => bootstrap_template::run(args),
        Command::Certs(args) => certs::run(args),
        Command::Check(args) => check::run(args),
        Command::Routes(args) => routes::run(args),
        Command::Policy(args) => policy::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            crate::logging::flush();
            eprintln!("error: {}", report(failure.error()));
            ExitCode::from(failure.code())
        }
    }
}

/// Reads `file`, or standard input for `-`.
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

/// How an input file is named in messages: `<stdin>` for `-`.
fn source_name(file: &str) -> &str {
    if file == "-" { "<stdin>" } else { file }
}

/// Prints an offline run (`mutate -f`, `routes -f`): warnings to stderr,
/// the text to stdout. Documents the label rules refused are errors on
/// stderr and exit code 1 (`refused_note` says what became of them); input
/// that could not be used is exit code 2 and prints nothing.
fn print_offline(
    result: Result<offline::Output, offline::OfflineError>,
    refused_note: &str,
) -> Result<(), Failure> {
    let out = match result {
        Ok(out) => out,
        Err(e @ offline::OfflineError::Patch { .. }) => return Err(Failure::Failed(e.into())),
        Err(e) => return Err(Failure::Usage(e.into())),
    };
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    print!("{}", out.text);
    if out.refused.is_empty() {
        return Ok(());
    }
    for refused in &out.refused {
        eprintln!("error: {refused}");
    }
    Err(Failure::Failed(anyhow::anyhow!(
        "{} of {} documents refused by the rules; {refused_note}",
        out.refused.len(),
        out.documents
    )))
}

/// How long a subcommand waits for the Kubernetes API to answer its first
/// call (`GET /version`, outside a cluster) before giving up with a reason.
/// Longer than `serve`'s: a kubeconfig's exec credential plugin runs then.
const CONNECT_LIMIT: std::time::Duration = std::time::Duration::from_secs(15);

/// The configuration from `path` (embedded defaults without one), with the
/// webhook namespace from `$POD_NAMESPACE` when the file does not set it.
fn load_config(path: Option<&Path>) -> Result<Config, anyhow::Error> {
    Ok(Config::load(path, std::env::var("POD_NAMESPACE").ok())?)
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

    #[test]
    fn failures_map_to_the_documented_exit_codes() {
        assert_eq!(Failure::Usage(anyhow::anyhow!("x")).code(), 2);
        assert_eq!(Failure::Failed(anyhow::anyhow!("x")).code(), 1);
        let r: Result<(), std::io::Error> = Err(std::io::Error::other("gone"));
        assert_eq!(r.or_usage().unwrap_err().code(), 2);
    }
}
