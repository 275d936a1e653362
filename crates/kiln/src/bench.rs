//! `kiln bench`: prompt-processing and decode speed of one model, measured
//! the way llama.cpp's `llama-bench` reports them (pp = prompt tokens per
//! second for an N-token prompt, tg = generated tokens per second), so the
//! two can be set side by side.

use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::bail;
use kiln_backend::cpu::CpuBackend;
use kiln_engine::{GenerateRequest, SamplingParams};

use crate::model_args::ModelArgs;

/// Arguments of `kiln bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length for the prompt-processing measurement.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens to generate for the decode measurement (after a 1-token prompt).
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Measured repetitions of each (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Deterministic, non-special token ids spread over the vocabulary.
fn synthetic_prompt(n: usize, vocab: usize) -> Vec<u32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
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

/// Runs `kiln bench`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.repeats == 0 || args.prompt_tokens == 0 || args.gen_tokens == 0 {
        bail!("--repeats, --prompt-tokens and --gen-tokens must be at least 1");
    }
    let t0 = Instant::now();
    let model = args.model.load()?;
    let load_s = t0.elapsed().as_secs_f64();
    let be = CpuBackend::new();
    let cfg = model.decoder.config();
    if args.prompt_tokens + 1 >= model.decoder.max_positions() {
        bail!(
            "--prompt-tokens {} does not fit the model's {} positions",
            args.prompt_tokens,
            model.decoder.max_positions()
        );
    }
    let prompt = synthetic_prompt(args.prompt_tokens, cfg.vocab_size);
    let run_once = |prompt: Vec<u32>, max_new_tokens: usize| {
        let req = GenerateRequest {
            prompt,
            params: SamplingParams::greedy(),
            max_new_tokens,
            ignore_eos: true,
        };
        kiln_engine::generate(&be, &model, &req, |_| ControlFlow::Continue(()))
    };

    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for i in 0..=args.repeats {
        let s = run_once(prompt.clone(), 1)?;
        let p = args.prompt_tokens as f64 / s.prefill_time.as_secs_f64();
        // The first decode forward pass happens after the first sampled token.
        let s = run_once(prompt[..1].to_vec(), args.gen_tokens + 1)?;
        let t = (s.generated.len() - 1) as f64 / s.decode_time.as_secs_f64();
        if i > 0 {
            pp.push(p);
            tg.push(t);
        }
    }
    let (pp, tg) = (median(pp), median(tg));
    let threads = rayon::current_num_threads();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": cfg.arch, "params": cfg.param_count(), "backend": be_name(&be),
                "threads": threads, "load_s": load_s,
                "prompt_tokens": args.prompt_tokens, "prompt_tok_s": pp,
                "gen_tokens": args.gen_tokens, "decode_tok_s": tg, "repeats": args.repeats,
            })
        );
    } else {
        println!(
            "model {} ({:.0}M params), {}, loaded in {load_s:.2}s",
            cfg.arch,
            cfg.param_count() as f64 / 1e6,
            be_name(&be)
        );
        println!("| test | tokens/s (median of {}) |", args.repeats);
        println!("| --- | --- |");
        println!("| pp{} | {pp:.1} |", args.prompt_tokens);
        println!("| tg{} | {tg:.1} |", args.gen_tokens);
    }
    Ok(())
}

fn be_name(be: &CpuBackend) -> String {
    use kiln_backend::Backend;
    be.name()
}
