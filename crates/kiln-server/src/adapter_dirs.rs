//! The adapters a model brings with it: at start, a model with
//! `option.enable_lora` has adapters turned on and each `adapters/<name>/`
//! folder beside it registered. Kept apart from `adapters.rs` (the HTTP
//! routes, which read the registry) so that the registry can call it
//! without importing back the module that imports it.

use std::path::{Path, PathBuf};

use kiln_engine::{AdapterLimits, Engine};

/// Turns adapters on for model `model` with `limits` (`None`: the model
/// has no `option.enable_lora`, nothing to do) and registers each
/// `adapters/<name>/` under every directory of `roots`. An adapter that
/// cannot be read is logged and skipped: the model serves without it.
pub fn on_start(
    model: &str,
    limits: Option<AdapterLimits>,
    roots: &[PathBuf],
    engine: &Engine,
) -> Result<(), String> {
    let Some(limits) = limits else {
        return Ok(());
    };
    engine
        .enable_adapters(limits)
        .map_err(|e| format!("option.enable_lora: {e}"))?;
    for root in roots {
        register_dir(model, engine, &root.join("adapters"));
    }
    Ok(())
}

fn register_dir(model: &str, engine: &Engine, dir: &Path) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    let mut dirs: Vec<PathBuf> = read
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for d in dirs {
        let Some(name) = d.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        match engine.register_adapter(&name, &d) {
            Ok(a) => {
                tracing::info!(model = %model, "adapter '{}' (rank {}) from {}", a.name, a.rank, d.display())
            }
            Err(e) => tracing::error!(model = %model, "adapter '{name}' not registered: {e}"),
        }
    }
}
