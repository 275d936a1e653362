//! `kiln bench`: speed of one model through the engine.
//!
//! Three measurements:
//! - prompt processing (`pp`): a `--prompt-tokens` prompt alone, timed from
//!   submission to its first token (llama.cpp's `pp` test);
//! - decode (`tg`): `--gen-tokens` tokens after a 1-token prompt, timed from
//!   the first token to the last (llama.cpp's `tg` test);
//! - concurrency: for each of `--concurrency`, that many requests of
//!   `--batch-prompt-tokens` prompt and `--batch-gen-tokens` output
//!   submitted at once; reported as total output tokens per second of wall time.
//!
//! Prompts are synthetic (deterministic ids), distinct per request so the
//! prefix cache does not help, and EOS is ignored so lengths are fixed.
//!
//! `--dummy-weights --arch NAME` measures a published model's shape with
//! random weights and no file (`crate::dummy`); `--bandwidth` measures the
//! machine's read bandwidth instead of a model (`crate::bandwidth`), which
//! with the weight bytes a token reads (printed by every run) gives the
//! decode floor.

use std::time::Instant;

use anyhow::{bail, Context};
use kiln_engine::{Engine, EngineConfig, Event, FinishReason, KvCapacity, Request, StopConditions};

use crate::model_args::ModelArgs;

/// Arguments of `kiln bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length for the prompt-processing measurement.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens to generate for the decode measurement (after a prompt of
    /// `--gen-context` tokens).
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Prompt length before the decode measurement: decode then reads the
    /// keys and values of this many tokens at every step (llama-bench's
    /// `-d`, depth).
    #[arg(long, default_value_t = 1)]
    pub gen_context: usize,
    /// Measured repetitions of pp and tg (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Numbers of concurrent requests to measure (empty to skip).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16])]
    pub concurrency: Vec<usize>,
    /// Prompt length of each concurrent request.
    #[arg(long, default_value_t = 128)]
    pub batch_prompt_tokens: usize,
    /// Output length of each concurrent request.
    #[arg(long, default_value_t = 128)]
    pub batch_gen_tokens: usize,
    /// Most sequences in the running batch.
    #[arg(long, default_value_t = 64)]
    pub max_batch_size: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Build the model of `--arch`'s shape with random weights in memory
    /// (no file; `--quantize` or `--dtype` picks the format, f16 by default)
    /// instead of loading `--model`.
    #[arg(long, requires = "arch")]
    pub dummy_weights: bool,
    /// The shape `--dummy-weights` builds: smollm2-135m, llama3-1b,
    /// llama3-3b, llama3-8b, opt-13b or qwen3-30b-a3b (and tiny, tiny-opt,
    /// tiny-moe for tests).
    #[arg(long, requires = "dummy_weights")]
    pub arch: Option<String>,
    /// Measure the memory read bandwidth on `--threads` threads (no model
    /// is loaded): divided by the bytes a token reads, the decode floor.
    #[arg(long, conflicts_with = "dummy_weights")]
    pub bandwidth: bool,
    /// MiB the bandwidth probe reads per pass.
    #[arg(long, default_value_t = 512)]
    pub bandwidth_mib: usize,
    /// How the KV cache stores keys and values: auto (f16 on the CPU),
    /// f16, f32 or q8_0.
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: kiln_engine::KvDtype,
}

/// The peak resident memory of this process so far (`VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Bytes of weights one decoded token reads from a GGUF file served as
/// stored (`None` for other models, or when options convert it).
fn file_bytes_per_token(args: &Args, cfg: &kiln_model::config::DecoderConfig) -> Option<u64> {
    let path = args.model.model.as_deref()?;
    if args.model.quantize.is_some() || args.model.dtype.is_some() {
        return None;
    }
    let kiln_model::ModelFormat::Gguf(file) =
        kiln_model::ModelFormat::detect(std::path::Path::new(path)).ok()?
    else {
        return None;
    };
    let gguf = kiln_model::gguf::GgufFile::open(file).ok()?;
    let sizes: Vec<(&str, u64)> = gguf
        .tensors
        .values()
        .map(|t| {
            let shape = t.shape();
            let cols = shape.last().copied().unwrap_or(0);
            let rows: usize = shape[..shape.len().saturating_sub(1)].iter().product();
            let row = kiln_backend::quant::row_bytes(t.ggml_type, cols).unwrap_or(0);
            (t.name.as_str(), (rows * row) as u64)
        })
        .collect();
    Some(kiln_model::dummy::bytes_read_per_token(cfg, sizes))
}

/// Bytes of weights one decoded token reads from a model kiln converts at
/// load (a Hugging Face checkpoint, or a GGUF file with `--quantize` or
/// `--dtype`): the tensors a conversion of this config makes with these
/// options, the same list `--dummy-weights` builds.
fn converted_bytes_per_token(args: &Args, cfg: &kiln_model::config::DecoderConfig) -> Option<u64> {
    args.model.model.as_deref()?;
    let tensors = kiln_model::dummy::tensors(cfg, &args.model.options());
    Some(kiln_model::dummy::bytes_read_per_token(
        cfg,
        tensors.iter().map(|t| (t.name.as_str(), t.bytes())),
    ))
}

/// `kiln bench --bandwidth`.
fn run_bandwidth(args: &Args) -> anyhow::Result<()> {
    let threads = kiln_backend::cpu::threads();
    let b = crate::bandwidth::measure(args.bandwidth_mib, threads, 5)?;
    let ways = crate::bandwidth::AHEAD.iter().zip(b.by_way);
    if args.json {
        let mut js = serde_json::json!({"bandwidth_gb_s": b.bytes_per_s() / 1e9, "bytes": b.bytes,
            "threads": b.threads, "passes": b.passes});
        for (way, bw) in ways {
            js[format!("{}_gb_s", way.name())] = serde_json::json!(bw / 1e9);
        }
        println!("{js}");
    } else {
        let each: Vec<String> = ways
            .map(|(way, bw)| format!("{} {:.1}", way.name(), bw / 1e9))
            .collect();
        println!(
            "read bandwidth: {:.1} GB/s ({} MiB, {} threads, best of {} passes each way: {})",
            b.bytes_per_s() / 1e9,
            b.bytes >> 20,
            b.threads,
            b.passes,
            each.join(", ")
        );
    }
    Ok(())
}

/// Deterministic, non-special token ids spread over the vocabulary.
fn synthetic_prompt(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Skip the first ids, where vocabularies keep their special tokens.
            (256 + s % (vocab as u64 - 256)) as u32
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Timestamps of one request's tokens.
struct Timing {
    submitted: Instant,
    tokens: Vec<Instant>,
}

/// Submits all requests at once and waits for every one to finish.
fn run_batch(engine: &Engine, prompts: Vec<Vec<u32>>, gen: usize) -> anyhow::Result<Vec<Timing>> {
    let mut streams = Vec::new();
    for p in prompts {
        let req = Request {
            stop: StopConditions {
                max_new_tokens: gen,
                ignore_eos: true,
                ..StopConditions::default()
            },
            ..Request::greedy(p, gen)
        };
        streams.push((Instant::now(), engine.submit(req)?));
    }
    // Each stream is read to its end on its own thread, so timestamps are taken as tokens arrive.
    let handles: Vec<_> = streams
        .into_iter()
        .map(|(submitted, mut s)| {
            std::thread::spawn(move || -> anyhow::Result<Timing> {
                let mut t = Timing {
                    submitted,
                    tokens: Vec::new(),
                };
                while let Some(ev) = s.blocking_next() {
                    match ev {
                        Event::Token(_) => t.tokens.push(Instant::now()),
                        Event::Finished {
                            reason: FinishReason::Error,
                            error,
                            ..
                        } => bail!("request failed: {}", error.unwrap_or_default()),
                        Event::Finished { .. } => {}
                    }
                }
                Ok(t)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a bench thread panicked"))?
        })
        .collect()
}

/// KV-cache tokens the measurements need at once, each sequence rounded up
/// to whole blocks: the cache is sized to the work, as llama-bench sizes
/// its context, so peak RSS counts the KV cache the runs use rather than
/// pages a default-sized cache spreads the repeats over.
fn kv_tokens_needed(args: &Args, block_size: usize) -> usize {
    let blocks = |tokens: usize| tokens.div_ceil(block_size) * block_size;
    let single = blocks(args.prompt_tokens + 1).max(blocks(args.gen_context + args.gen_tokens));
    let widest = args.concurrency.iter().copied().max().unwrap_or(0);
    let batch = widest * blocks(args.batch_prompt_tokens + args.batch_gen_tokens);
    single.max(batch)
}

/// Runs `kiln bench`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.repeats == 0 || args.prompt_tokens == 0 || args.gen_context == 0 || args.gen_tokens < 2
    {
        bail!(
            "--repeats, --prompt-tokens and --gen-context must be at least 1, --gen-tokens at least 2"
        );
    }
    if args.bandwidth {
        return run_bandwidth(&args);
    }
    let t0 = Instant::now();
    let (model, per_token) = match (&args.arch, args.dummy_weights) {
        (Some(arch), true) => {
            let (model, shape) = crate::dummy::load(arch, &args.model)?;
            let bytes = crate::dummy::bytes_read_per_token(shape, &args.model.options())?;
            (model, Some(bytes))
        }
        _ => (args.model.load()?, None),
    };
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = model.config().clone();
    let per_token = per_token
        .or_else(|| file_bytes_per_token(&args, &cfg))
        .or_else(|| converted_bytes_per_token(&args, &cfg));
    let defaults = EngineConfig::default();
    let cfg_engine = EngineConfig {
        max_running: args.max_batch_size,
        kv_capacity: KvCapacity::Tokens(kv_tokens_needed(&args, defaults.block_size)),
        kv_dtype: args.kv_cache_dtype,
        ..defaults
    };
    let engine = model.start(cfg_engine).context("cannot start the engine")?;
    let vocab = cfg.vocab_size;

    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for i in 0..=args.repeats {
        let prompt = synthetic_prompt(args.prompt_tokens, vocab, 1000 + i as u64);
        let t = run_batch(&engine, vec![prompt], 1)?;
        let ttft = t[0].tokens[0] - t[0].submitted;
        let t2 = run_batch(
            &engine,
            vec![synthetic_prompt(args.gen_context, vocab, 2000 + i as u64)],
            args.gen_tokens,
        )?;
        let toks = &t2[0].tokens;
        let decode = *toks.last().unwrap_or(&toks[0]) - toks[0];
        if i > 0 {
            pp.push(args.prompt_tokens as f64 / ttft.as_secs_f64());
            tg.push((toks.len() - 1) as f64 / decode.as_secs_f64());
        }
    }
    let (pp, tg) = (median(pp), median(tg));

    // Concurrency sweep.
    let mut rows = Vec::new();
    for (k, &n) in args.concurrency.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let prompts = (0..n)
            .map(|r| {
                synthetic_prompt(
                    args.batch_prompt_tokens,
                    vocab,
                    10_000 * (k as u64 + 1) + r as u64,
                )
            })
            .collect();
        let start = Instant::now();
        let t = run_batch(&engine, prompts, args.batch_gen_tokens)?;
        let wall = start.elapsed();
        let out_tokens: usize = t.iter().map(|t| t.tokens.len()).sum();
        let ttft: Vec<f64> = t
            .iter()
            .map(|t| (t.tokens[0] - t.submitted).as_secs_f64())
            .collect();
        let itl: Vec<f64> = t
            .iter()
            .flat_map(|t| t.tokens.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()))
            .collect();
        rows.push((
            n,
            out_tokens as f64 / wall.as_secs_f64(),
            median(ttft),
            median_or_zero(itl),
            wall,
        ));
    }
    let m = engine.metrics();
    if args.json {
        let conc: Vec<_> = rows
            .iter()
            .map(|(n, tps, ttft, itl, wall)| {
                serde_json::json!({"concurrency": n, "output_tok_s": tps, "median_ttft_s": ttft,
                    "median_itl_s": itl, "wall_s": wall.as_secs_f64()})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "model": cfg.arch, "params": cfg.param_count(), "backend": engine.info().backend,
                "threads": kiln_backend::cpu::threads(),
                "load_s": load_s, "prompt_tokens": args.prompt_tokens, "prompt_tok_s": pp,
                "gen_tokens": args.gen_tokens, "gen_context": args.gen_context, "decode_tok_s": tg, "repeats": args.repeats,
                "batch_prompt_tokens": args.batch_prompt_tokens, "batch_gen_tokens": args.batch_gen_tokens,
                "concurrency": conc, "preemptions": m.preemptions,
                "dummy_arch": args.arch, "decode_bytes_per_token": per_token,
                "peak_rss_mib": peak_rss_mib(),
                "kv_cache_dtype": args.kv_cache_dtype.to_string(),
            })
        );
        return Ok(());
    }
    println!(
        "model {} ({:.0}M params), {}, loaded in {load_s:.2}s",
        cfg.arch,
        cfg.param_count() as f64 / 1e6,
        engine.info().backend
    );
    println!("| test | tokens/s (median of {}) |", args.repeats);
    println!("| --- | --- |");
    println!("| pp{} | {pp:.1} |", args.prompt_tokens);
    println!("| tg{} | {tg:.1} |", args.gen_tokens);
    if let Some(b) = per_token {
        println!(
            "\ndecode reads {:.3} GB of weights per token ({:.1} GB/s at tg)",
            b as f64 / 1e9,
            b as f64 * tg / 1e9
        );
    }
    if !rows.is_empty() {
        println!();
        println!(
            "| concurrent requests ({} prompt + {} output tokens each) | output tokens/s | median TTFT | median inter-token |",
            args.batch_prompt_tokens, args.batch_gen_tokens
        );
        println!("| --- | --- | --- | --- |");
        for (n, tps, ttft, itl, _) in &rows {
            println!(
                "| {n} | {tps:.1} | {:.0} ms | {:.1} ms |",
                ttft * 1e3,
                itl * 1e3
            );
        }
        if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
            println!(
                "\n{} concurrent requests: {:.2}x the output tokens/s of {}",
                last.0,
                last.1 / first.1,
                first.0
            );
        }
    }
    Ok(())
}

fn median_or_zero(v: Vec<f64>) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        median(v)
    }
}
