//! The `scap-bridge` binary: parse arguments, run the library, print the error chain.
//! Exit status: 0 success, 1 differences found (verify), 2 error.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = scap_bridge::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match scap_bridge::cli::run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("scap-bridge: {:#}", anyhow::Error::from(e));
            ExitCode::from(2)
        }
    }
}
