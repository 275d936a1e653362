//! The engine set-up the engine's integration tests share (`mod support;`
//! in `tests/engine.rs` and `tests/speculative.rs`): the tiny random-weight
//! model and the default model, an engine over either, greedy requests and
//! a request's output collected event by event.

// Each test crate uses its own subset of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Mutex;

use kiln_backend::cpu::CpuBackend;
use kiln_engine::{Engine, EngineConfig, Event, FinishReason, Request, RequestStream, Usage};
use kiln_model::fixtures::{self, TinySpec};
use kiln_model::{LoadOptions, LoadedModel};

/// The tiny model's shape (two layers, 64 wide, grouped-query attention).
pub const TINY: TinySpec = TinySpec {
    hidden: 64,
    heads: 4,
    kv_heads: 2,
    ffn: 96,
    layers: 2,
    max_positions: 1024,
    tied: false,
};

/// The tiny model with the weights of `seed` (42 in most tests), written
/// once per process and seed to a temporary GGUF.
pub fn tiny_model_seeded(seed: u64) -> LoadedModel<CpuBackend> {
    static WRITTEN: Mutex<Vec<(u64, PathBuf)>> = Mutex::new(Vec::new());
    let path = {
        let mut w = WRITTEN.lock().unwrap_or_else(|e| e.into_inner());
        match w.iter().find(|(s, _)| *s == seed) {
            Some((_, p)) => p.clone(),
            None => {
                let p = std::env::temp_dir().join(format!(
                    "kiln-engine-tests-tiny-{}-{seed}.gguf",
                    std::process::id()
                ));
                fixtures::write_tiny_llama_gguf(&p, &TINY, seed).unwrap();
                w.push((seed, p.clone()));
                p
            }
        }
    };
    kiln_model::load(&CpuBackend::new(), &path, &LoadOptions::default()).unwrap()
}

/// The tiny model most tests use.
pub fn tiny_model() -> LoadedModel<CpuBackend> {
    tiny_model_seeded(42)
}

/// The default model (SmolLM2-135M-Instruct) from the cache.
pub fn default_model() -> LoadedModel<CpuBackend> {
    let path = kiln_model::default_model::default_model_path()
        .unwrap_or_else(|e| panic!("{e} (the test command scripts/test.sh fetches it)"));
    kiln_model::load(&CpuBackend::new(), &path, &LoadOptions::default()).unwrap()
}

/// An engine on the CPU.
pub fn engine(model: LoadedModel<CpuBackend>, cfg: EngineConfig) -> Engine {
    Engine::start(CpuBackend::new(), model, cfg).unwrap()
}

/// Everything a finished request produced, event by event.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub ids: Vec<u32>,
    /// The text of each token event, as streamed.
    pub pieces: Vec<String>,
    /// The pieces joined.
    pub text: String,
    pub reason: FinishReason,
    pub usage: Usage,
    pub logprobs: Vec<f32>,
    pub top: Vec<Vec<(u32, f32)>>,
}

/// Reads a request's stream to its end; a request that failed fails the test.
pub fn collect(s: RequestStream) -> Output {
    collect_with_prompt(s).1
}

/// [`collect`], with the prompt log-probabilities that came with the first
/// token (DJL's `decoder_input_details`); a later token carrying any fails
/// the test.
pub fn collect_with_prompt(mut s: RequestStream) -> (Option<Vec<f32>>, Output) {
    let mut first = None;
    let mut o = Output {
        ids: vec![],
        pieces: vec![],
        text: String::new(),
        reason: FinishReason::Error,
        usage: Usage::default(),
        logprobs: vec![],
        top: vec![],
    };
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Token(t) => {
                if o.ids.is_empty() {
                    first = t.prompt_logprobs;
                } else {
                    assert!(
                        t.prompt_logprobs.is_none(),
                        "only the first token carries prompt log-probabilities"
                    );
                }
                o.ids.push(t.id);
                o.text.push_str(&t.text);
                o.pieces.push(t.text);
                o.logprobs.push(t.logprob);
                o.top.push(t.top_logprobs);
            }
            Event::Finished {
                reason,
                usage,
                error,
            } => {
                assert!(reason != FinishReason::Error, "request failed: {error:?}");
                o.reason = reason;
                o.usage = usage;
            }
        }
    }
    (first, o)
}

/// A greedy request for `n` tokens that does not stop at end-of-sequence.
pub fn greedy(prompt: Vec<u32>, n: usize) -> Request {
    let mut r = Request::greedy(prompt, n);
    r.stop.ignore_eos = true;
    r
}

/// Submits every request at once and collects them all.
pub fn together(e: &Engine, reqs: &[Request]) -> Vec<Output> {
    let streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    streams.into_iter().map(collect).collect()
}
