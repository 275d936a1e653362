//! `kiln cache ls|rm`: what the prepared-model cache holds, and removing
//! entries from it.

use std::time::SystemTime;

use kiln_sources::{DownloadDir, PreparedCache, PreparedError};

/// Arguments of `kiln cache`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

/// What to do with the cache.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// List prepared models and stored weight layouts: key, size, last
    /// use, settings (or layout), source.
    Ls,
    /// Remove one prepared model by key, or all of them (entries a running
    /// kiln process maps are kept).
    Rm {
        /// The key `kiln cache ls` shows.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        key: Option<String>,
        /// Remove every entry not in use.
        #[arg(long)]
        all: bool,
    },
}

/// Runs `kiln cache`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let cache = PreparedCache::new(&DownloadDir::from_env(), None);
    match args.command {
        Command::Ls => {
            let entries = cache.list();
            println!(
                "{:<32}  {:>10}  {:>9}  {:<24}  SOURCE",
                "KEY", "SIZE", "LAST USED", "SETTINGS"
            );
            let now = SystemTime::now();
            for e in entries.iter().rev() {
                let p = &e.record.parts;
                println!(
                    "{:<32}  {:>10}  {:>9}  {:<24}  {}",
                    e.key(),
                    size(e.record.total_size()),
                    age(now, e.last_used),
                    match &p.layout {
                        None => format!("quantize={} dtype={}", p.quantize, p.dtype),
                        Some(l) => format!("layout={l}"),
                    },
                    p.source
                );
            }
            let total: u64 = entries.iter().map(|e| e.record.total_size()).sum();
            let layouts = entries.iter().filter(|e| e.record.parts.layout.is_some());
            println!(
                "{} prepared models, {} weight layouts, {} in {}",
                entries.len() - layouts.clone().count(),
                layouts.count(),
                size(total),
                cache.root().display()
            );
        }
        Command::Rm { key: Some(key), .. } => {
            cache.remove(&key)?;
            println!("removed {key}");
        }
        Command::Rm { key: None, .. } => {
            let (removed, in_use) = cache.remove_all()?;
            for k in &removed {
                println!("removed {k}");
            }
            for k in &in_use {
                eprintln!("kept {k}: {}", PreparedError::InUse { key: k.clone() });
            }
        }
    }
    Ok(())
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn age(now: SystemTime, then: SystemTime) -> String {
    let s = now.duration_since(then).map_or(0, |d| d.as_secs());
    match s {
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86400),
    }
}
