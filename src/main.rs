//! `canary-injector`: parse the command line, set up logging and the crypto
//! provider, run the chosen subcommand. Everything else lives in the library.

mod cli;
mod logging;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // One crypto provider, chosen deliberately: ring (kube's choice too).
    // Installing it fails only if one is installed already, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = cli::Cli::parse();
    cli::init_tracing(args.log_format);
    let code = cli::run(args);
    logging::flush();
    code
}
