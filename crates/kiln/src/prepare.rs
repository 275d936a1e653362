//! `kiln prepare`: convert a model once and publish the result, a prepared
//! GGUF file, to a directory or an `s3://` prefix that `kiln serve` (and
//! `option.model_id`) can then serve directly: downloaded once, mapped, no
//! conversion at start.

use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_model::WeightDtype;

use crate::model_args::ModelArgs;

/// Arguments of `kiln prepare`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model to prepare: a local directory or GGUF file,
    /// s3://bucket/prefix, hf://org/name or a Hub id.
    pub source: String,
    /// Where to write `model.gguf`: a local directory or s3://bucket/prefix.
    #[arg(long, short = 'o')]
    pub output: String,
    /// The branch, tag or commit of a Hub model.
    #[arg(long)]
    pub revision: Option<String>,
    /// Quantize the float weight matrices to q8_0, q4_0, q4_1, q4_k or q6_k.
    #[arg(long, value_parser = crate::model_args::parse_quantize)]
    pub quantize: Option<kiln_backend::GgmlType>,
    /// Round the weights to fp16 or bf16 (auto/fp32: keep them).
    #[arg(long, value_parser = crate::model_args::parse_dtype)]
    pub dtype: Option<WeightDtype>,
    /// GiB the local prepared-model cache may hold (it keeps a copy).
    #[arg(long, env = "KILN_CACHE_MAX_GIB", value_parser = kiln_engine::load::parse_cache_max_gib)]
    pub cache_max_gib: Option<u64>,
}

/// Runs `kiln prepare`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.output.starts_with("s3://") {
        // A bad destination is found before minutes of conversion.
        kiln_sources::Source::s3(&args.output)?;
    }
    let margs = ModelArgs {
        model: Some(args.source.clone()),
        revision: args.revision.clone(),
        max_model_len: None,
        quantize: args.quantize,
        dtype: args.dtype,
        cache_max_gib: args.cache_max_gib,
        device: kiln_engine::Device::Cpu,
    };
    let (model, report) = margs.load_reporting(true)?;
    drop(model);
    let file = report
        .prepared_file()
        .context("no prepared file was written")?
        .to_path_buf();
    let size = std::fs::metadata(&file)
        .with_context(|| format!("{}", file.display()))?
        .len();
    let dest = if args.output.starts_with("s3://") {
        kiln_sources::upload_files(
            &args.output,
            &[(
                kiln_sources::prepared::PREPARED_FILE.to_string(),
                file.clone(),
            )],
        )?;
        format!(
            "{}/{}",
            args.output.trim_end_matches('/'),
            kiln_sources::prepared::PREPARED_FILE
        )
    } else {
        copy_into(&file, Path::new(&args.output))?
            .display()
            .to_string()
    };
    println!("{dest} ({size} bytes) from {}", args.source);
    Ok(())
}

/// Copies `file` to `dir/model.gguf` through a temporary name.
fn copy_into(file: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dest = dir.join(kiln_sources::prepared::PREPARED_FILE);
    if std::fs::canonicalize(&dest).ok() == std::fs::canonicalize(file).ok() {
        return Ok(dest);
    }
    let tmp = dir.join(format!(".model.gguf.{}.tmp", std::process::id()));
    let copied = std::fs::copy(file, &tmp)
        .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &dest));
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", dest.display()));
    }
    Ok(dest)
}
