//! The `kiln` command: a thin shell over the kiln crates.
//!
//! `kiln serve` runs the HTTP server; `kiln generate` answers one prompt,
//! streaming tokens to stdout; `kiln bench` measures prompt and decode speed;
//! `kiln inspect` sizes a model; `kiln prepare` converts one once into a
//! prepared file; `kiln cache` lists and removes prepared models. Everything it does is in the library crates;
//! this file parses arguments and reports errors.

mod bandwidth;
mod bench;
mod cache;
mod dummy;
mod generate;
mod inspect;
mod model_args;
mod prepare;
mod serve;

use clap::{Parser, Subcommand};

/// kiln: a large-language-model server.
#[derive(Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// CPU threads for the model's computation (default: RAYON_NUM_THREADS,
    /// else the number of physical cores).
    #[arg(long, global = true, env = "KILN_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models over HTTP (DJL Serving routes and the OpenAI API).
    Serve(Box<serve::Args>),
    /// Generate text for one prompt, streaming tokens to stdout.
    Generate(generate::Args),
    /// Measure prompt-processing and decode speed.
    Bench(bench::Args),
    /// Show a model's architecture, size and memory needs from its config.
    Inspect(inspect::Args),
    /// Convert a model once (--quantize, --dtype) into a prepared GGUF file
    /// in a directory or an s3:// prefix, which serves with no conversion.
    Prepare(prepare::Args),
    /// Show (ls) or remove (rm) entries of the prepared-model cache.
    Cache(cache::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = kiln_backend::cpu::init_threads(cli.threads.map(usize::from)) {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Serve(args) => serve::config(&args).and_then(|cfg| {
            init_logging("info", cfg.log_dir.as_deref())?;
            serve::run(cfg)
        }),
        Command::Generate(args) => init_logging("warn", None).and_then(|()| generate::run(args)),
        Command::Bench(args) => init_logging("warn", None).and_then(|()| bench::run(args)),
        Command::Inspect(args) => init_logging("warn", None).and_then(|()| inspect::run(args)),
        Command::Prepare(args) => init_logging("info", None).and_then(|()| prepare::run(args)),
        Command::Cache(args) => init_logging("warn", None).and_then(|()| cache::run(args)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr (and to `serving.log` in `log_dir`), filtered by
/// `KILN_LOG` (default: `default_level`).
fn init_logging(default_level: &str, log_dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level))
    };
    // Colours only for a person at a terminal (and never under NO_COLOR).
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let file_only = format!("{}=off", kiln_server::FILE_ONLY_LOG_TARGET).parse()?;
    let stderr = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .with_filter(filter().add_directive(file_only));
    let file = match log_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("serving.log"))?;
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(std::sync::Mutex::new(f))
                    .with_filter(filter()),
            )
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .try_init()?;
    Ok(())
}
