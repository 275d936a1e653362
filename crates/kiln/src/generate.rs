//! `kiln generate`: one prompt in, streamed text out.

use std::io::{Read, Write};

use anyhow::{bail, Context};
use kiln_engine::{
    EngineConfig, Event, FinishReason, KvCapacity, Request, SamplingParams, StopConditions,
};
use kiln_model::chat::ChatMessage;

use crate::model_args::ModelArgs;

/// Arguments of `kiln generate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The prompt; read from stdin when absent or `-`.
    pub prompt: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for `--chat`.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 (the default, as in DJL Serving's `do_sample=false`)
    /// always picks the most likely token.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalise tokens already in the prompt or output (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Random seed, for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Always pick the most likely token (same as `--temperature 0`).
    #[arg(long)]
    pub greedy: bool,
    /// Stop when this text is produced (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print token counts and speeds to stderr at the end.
    #[arg(long)]
    pub stats: bool,
    /// How the KV cache stores keys and values: auto (f16 on the CPU),
    /// f16, f32 or q8_0.
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: kiln_engine::KvDtype,
}

/// Runs `kiln generate`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let prompt = match args.prompt.as_deref() {
        Some(p) if p != "-" => p.to_string(),
        _ => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read the prompt from stdin")?;
            s
        }
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let model = args.model.load()?;
    let (text, add_special) = if args.chat {
        let template = model
            .chat_template()
            .context("--chat: this model has no chat template")?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system.as_str()));
        }
        messages.push(ChatMessage::new("user", prompt.as_str()));
        // The rendered template already holds every special token the model expects.
        (template.render(&messages, true)?, false)
    } else {
        (prompt, true)
    };
    let ids = model.tokenizer().encode(&text, add_special)?;
    let max_len = model.max_positions();
    // One request: a KV cache just big enough for it.
    let cfg = EngineConfig {
        kv_capacity: KvCapacity::Tokens((ids.len() + args.max_new_tokens).min(max_len) + 16),
        kv_dtype: args.kv_cache_dtype,
        ..EngineConfig::default()
    };
    let engine = model.start(cfg)?;
    let req = Request {
        prompt: ids,
        sampling: SamplingParams {
            temperature: if args.greedy { 0.0 } else { args.temperature },
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
            ..SamplingParams::default()
        },
        stop: StopConditions {
            max_new_tokens: args.max_new_tokens,
            stop_strings: args.stop.clone(),
            ..StopConditions::default()
        },
        skip_special_tokens: true,
        prompt_logprobs: false,
        constraint: None,
    };
    let t0 = std::time::Instant::now();
    let mut stream = engine.submit(req)?;
    let mut out = std::io::stdout().lock();
    let mut first_token = None;
    while let Some(ev) = stream.blocking_next() {
        match ev {
            Event::Token(t) => {
                first_token.get_or_insert_with(|| t0.elapsed());
                if out
                    .write_all(t.text.as_bytes())
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    // A closed pipe (`kiln generate … | head`): dropping the stream cancels.
                    return Ok(());
                }
            }
            Event::Finished {
                reason,
                usage,
                error,
            } => {
                let _ = writeln!(out);
                if reason == FinishReason::Error {
                    bail!("generation failed: {}", error.unwrap_or_default());
                }
                if args.stats {
                    let total = t0.elapsed();
                    let ttft = first_token.unwrap_or(total);
                    eprintln!(
                        "[{} prompt tokens, first token after {:.2?} ({:.1} prompt tok/s); {} generated in {:.2?} ({:.1} tok/s); finish: {}]",
                        usage.prompt_tokens,
                        ttft,
                        usage.prompt_tokens as f64 / ttft.as_secs_f64(),
                        usage.completion_tokens,
                        total,
                        usage.completion_tokens.saturating_sub(1) as f64 / (total - ttft).as_secs_f64(),
                        reason.as_str(),
                    );
                }
            }
        }
    }
    Ok(())
}
