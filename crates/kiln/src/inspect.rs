//! `kiln inspect`: what a model is and what memory it needs, from its config
//! alone — the question to answer before picking an instance.

use std::path::PathBuf;

use anyhow::{bail, Context};
use kiln_model::inspect::{active_weight_bytes, dtype_bytes, parse_memory, summarize};

/// Arguments of `kiln inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF file, a Hugging Face model directory, or a config.json
    /// (default: the embedded default model, SmolLM2-135M-Instruct).
    pub model: Option<PathBuf>,
    /// Weight dtype to size for (fp32, fp16, bf16; default: as stored).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Size for the weights quantized while loading, as `--quantize` of
    /// `kiln serve` and `option.quantize` name it (q8_0, q4_0, q4_1, q4_k,
    /// q6_k; q4_k_m and q4_k_s too). Overrides --dtype.
    #[arg(long, value_parser = crate::model_args::parse_quantize)]
    pub quantize: Option<kiln_backend::GgmlType>,
    /// Device memory to check against, e.g. 16GiB, 32GiB, 80GB.
    #[arg(long)]
    pub memory: Option<String>,
    /// Tokens of context to size the KV cache for (default: the model's maximum).
    #[arg(long)]
    pub context: Option<usize>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn gb(bytes: f64) -> String {
    format!("{:.1} GB", bytes / 1e9)
}

/// Bytes of `params` weights in the block format `ty` (every weight in it:
/// the few vectors kept in f32 are a rounding error next to the matrices).
fn quantized_bytes(params: u64, ty: kiln_backend::GgmlType) -> f64 {
    let (elements, bytes) = ty.block();
    params as f64 * bytes as f64 / elements as f64
}

/// Runs `kiln inspect`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let path = match &args.model {
        Some(p) => p.clone(),
        None => kiln_model::default_model::default_model_path()
            .context("no model given, and the default model is missing")?,
    };
    let s = summarize(&path)?;
    let c = &s.config;
    let params = c.param_count();
    let quantized = s.format == "gguf" && args.dtype.is_none();
    let (dtype, weight_bytes) = match (&args.quantize, &args.dtype) {
        (Some(ty), _) => (
            kiln_model::names::quantize_name(*ty).to_string(),
            quantized_bytes(params, *ty),
        ),
        (None, Some(d)) => {
            let b = dtype_bytes(d)
                .with_context(|| format!("--dtype '{d}': expected fp32, fp16 or bf16"))?;
            (d.clone(), params as f64 * b as f64)
        }
        (None, None) if quantized => (s.stored_dtype.clone(), s.stored_bytes.unwrap_or(0) as f64),
        (None, None) => {
            let b = dtype_bytes(&s.stored_dtype).unwrap_or(2);
            (s.stored_dtype.clone(), params as f64 * b as f64)
        }
    };
    // A mixture-of-experts model needs all its weights in memory, but a
    // token reads only its experts'.
    let active_params = c.active_param_count();
    let active_bytes = active_weight_bytes(c, weight_bytes);
    // The KV cache is held in the element size of the backend that serves
    // the model (f16 by default on the CPU, see --kv-cache-dtype), whatever
    // the weights' dtype.
    let kv_elem = kiln_engine::launch::kv_element_bytes(kiln_engine::Device::Cpu);
    let kv_per_1k = c.kv_bytes_per_token(kv_elem) as f64 * 1024.0;
    let context = args.context.unwrap_or(c.max_position_embeddings);
    let kv_context = c.kv_bytes_per_token(kv_elem) as f64 * context as f64;
    let memory = match &args.memory {
        Some(m) => Some(
            parse_memory(m)
                .with_context(|| format!("--memory '{m}': expected a size such as 32GiB"))?
                as f64,
        ),
        None => None,
    };
    let verdict = memory.map(|mem| {
        if weight_bytes > mem {
            (false, format!("does not fit in {}: the weights alone need {} of {}", args.memory.clone().unwrap_or_default(), gb(weight_bytes), gb(mem)))
        } else if weight_bytes + kv_context > mem {
            let tokens = ((mem - weight_bytes) / c.kv_bytes_per_token(kv_elem) as f64) as u64;
            (false, format!(
                "the weights fit in {} ({} of {}), but a full {context}-token sequence does not: {} of KV cache fits ({tokens} tokens)",
                args.memory.clone().unwrap_or_default(), gb(weight_bytes), gb(mem), gb(mem - weight_bytes)
            ))
        } else {
            let tokens = ((mem - weight_bytes) / c.kv_bytes_per_token(kv_elem) as f64) as u64;
            (true, format!(
                "fits in {}: {} of weights + {} for one {context}-token sequence = {} of {}; the rest holds {tokens} tokens of KV cache",
                args.memory.clone().unwrap_or_default(), gb(weight_bytes), gb(kv_context), gb(weight_bytes + kv_context), gb(mem)
            ))
        }
    });
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "path": s.path, "format": s.format, "architecture": c.arch, "parameters": params,
                "layers": c.n_layers, "hidden_size": c.hidden_size, "heads": c.n_heads, "kv_heads": c.n_kv_heads,
                "vocab_size": c.vocab_size, "max_positions": c.max_position_embeddings,
                "stored_dtype": s.stored_dtype, "dtype": dtype, "weight_bytes": weight_bytes as u64,
                "kv_bytes_per_1k_tokens": kv_per_1k as u64, "fits": verdict.as_ref().map(|v| v.0),
                "active_parameters": active_params, "active_weight_bytes": active_bytes as u64,
                "experts": c.moe.as_ref().map(|m| m.n_experts),
                "experts_per_token": c.moe.as_ref().map(|m| m.n_experts_used),
                "shared_expert": c.moe.as_ref().map(|m| m.shared_expert_ff.is_some()),
                "verdict": verdict.as_ref().map(|v| v.1.clone()),
            })
        );
        return Ok(());
    }
    println!("model:         {} ({})", s.path.display(), s.format);
    println!("architecture:  {}", c.arch);
    println!("parameters:    {:.2}B ({params})", params as f64 / 1e9);
    if let Some(m) = &c.moe {
        println!(
            "experts:       {} per MoE layer ({} of {} layers), {} per token, FFN {} each{}",
            m.n_experts,
            m.sparse_layers(c.n_layers),
            c.n_layers,
            m.n_experts_used,
            m.expert_ff,
            m.shared_expert_ff.map_or(String::new(), |s| format!(
                ", plus a shared expert of FFN {s}"
            ))
        );
        println!(
            "active:        {:.2}B parameters per token ({active_params})",
            active_params as f64 / 1e9
        );
    }
    println!(
        "shape:         {} layers, hidden {}, {} heads / {} KV heads of {}, FFN {}, vocab {}, context {}",
        c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size,
        c.max_position_embeddings
    );
    println!("stored dtype:  {}", s.stored_dtype);
    println!("weights:       {} in {dtype}", gb(weight_bytes));
    if c.moe.is_some() {
        println!(
            "per token:     {} of weights read (the active parameters; all {} must be in memory)",
            gb(active_bytes),
            gb(weight_bytes)
        );
    }
    println!(
        "KV cache:      {:.1} MB per 1K tokens ({}-bit), {} for one {context}-token sequence",
        kv_per_1k / 1e6,
        kv_elem * 8,
        gb(kv_context)
    );
    if let Some((_, v)) = verdict {
        println!("memory:        {v}");
    }
    if weight_bytes == 0.0 {
        bail!("could not size the weights");
    }
    Ok(())
}
