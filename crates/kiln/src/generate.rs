//! `kiln generate`: one prompt in, streamed text out.

use std::io::{Read, Write};
use std::ops::ControlFlow;

use anyhow::{bail, Context};
use kiln_backend::cpu::CpuBackend;
use kiln_engine::{GenerateRequest, SamplingParams};
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
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.7)]
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
    /// Random seed, for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Always pick the most likely token (same as `--temperature 0`).
    #[arg(long)]
    pub greedy: bool,
    /// Print token counts and speeds to stderr at the end.
    #[arg(long)]
    pub stats: bool,
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
            .chat_template
            .as_ref()
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
    let ids = model.tokenizer.encode(&text, add_special)?;
    let params = SamplingParams {
        temperature: if args.greedy { 0.0 } else { args.temperature },
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        seed: args.seed,
    };
    let req = GenerateRequest {
        prompt: ids,
        params,
        max_new_tokens: args.max_new_tokens,
        ignore_eos: false,
    };
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    let stats = kiln_engine::generate(&CpuBackend::new(), &model, &req, |ev| {
        match out.write_all(ev.text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            // A closed pipe (`kiln generate … | head`) ends generation quietly.
            Err(e) => {
                write_err = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    if write_err.is_none() {
        // Best effort: a closed stdout has nothing left to say.
        let _ = writeln!(out);
    }
    if args.stats {
        let n = stats.generated.len();
        eprintln!(
            "[{} prompt tokens in {:.2?} ({:.1} tok/s); {n} generated in {:.2?} ({:.1} tok/s); finish: {:?}]",
            stats.prompt_tokens,
            stats.prefill_time,
            stats.prompt_tokens as f64 / stats.prefill_time.as_secs_f64(),
            stats.decode_time,
            n.saturating_sub(1) as f64 / stats.decode_time.as_secs_f64(),
            stats.finish,
        );
    }
    Ok(())
}
