//! The `kiln` command: a thin shell over the kiln crates.
//!
//! `kiln generate` answers one prompt, streaming tokens to stdout;
//! `kiln bench` measures prompt and decode speed. Everything it does is in
//! the library crates; this file parses arguments and reports errors.

mod bench;
mod generate;
mod model_args;

use clap::{Parser, Subcommand};

/// kiln: a large-language-model server.
#[derive(Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text for one prompt, streaming tokens to stdout.
    Generate(generate::Args),
    /// Measure prompt-processing and decode speed.
    Bench(bench::Args),
}

fn main() -> std::process::ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, filtered by `KILN_LOG` (default: warnings and errors).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
