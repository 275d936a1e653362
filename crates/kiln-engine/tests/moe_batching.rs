//! Batch invariance of mixture-of-experts models through the engine: the
//! tiny Qwen3-MoE, Mixtral and Qwen2-MoE checkpoints (`testdata/tiny/`)
//! give every request the same tokens and log-probabilities batched with
//! others (chunked prefill, several running) and after preemption as alone.
//! Each token's experts are chosen from its own router logits and its
//! experts' outputs are added in expert order, so what shares a step
//! cannot change them.

use std::path::PathBuf;

use kiln_backend::cpu::CpuBackend;
use kiln_engine::{Engine, EngineConfig, Event, FinishReason, KvCapacity, Request, RequestStream};
use kiln_model::{LoadOptions, LoadedModel};

fn model(name: &str) -> LoadedModel<CpuBackend> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/tiny")
        .join(name);
    let m = kiln_model::load(&CpuBackend::new(), &dir, &LoadOptions::default()).unwrap();
    assert!(m.decoder.config().moe.is_some(), "{name}: no experts");
    m
}

/// The ids and log-probabilities a request produced.
fn collect(mut s: RequestStream) -> (Vec<u32>, Vec<f32>) {
    let (mut ids, mut lp) = (vec![], vec![]);
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Token(t) => {
                ids.push(t.id);
                lp.push(t.logprob);
            }
            Event::Finished { reason, error, .. } => {
                assert_eq!(reason, FinishReason::Length, "{error:?}");
            }
        }
    }
    (ids, lp)
}

fn greedy(prompt: Vec<u32>, n: usize) -> Request {
    let mut r = Request::greedy(prompt, n);
    r.stop.ignore_eos = true;
    r
}

#[test]
fn moe_requests_batched_chunked_and_preempted_equal_runs_alone() {
    let lens = [1, 5, 17, 40, 63, 100, 90, 75];
    let reqs: Vec<Request> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let p = (0..n)
                .map(|j| ((i * 31 + j * 7 + 3) % 256) as u32)
                .collect();
            greedy(p, 16)
        })
        .collect();
    for name in ["qwen3moe", "mixtral", "qwen2moe"] {
        let base = EngineConfig::default();
        let e = Engine::start(CpuBackend::new(), model(name), base.clone()).unwrap();
        let want: Vec<_> = reqs
            .iter()
            .map(|r| collect(e.submit(r.clone()).unwrap()))
            .collect();
        drop(e);
        let runs = [
            // Prefill chunked to 24 tokens a step, at most 4 running.
            EngineConfig {
                max_step_tokens: 24,
                max_running: 4,
                ..base.clone()
            },
            // A cache of 128 tokens cannot hold them all: preemption and recompute.
            EngineConfig {
                kv_capacity: KvCapacity::Tokens(128),
                ..base.clone()
            },
        ];
        for (k, cfg) in runs.into_iter().enumerate() {
            let e = Engine::start(CpuBackend::new(), model(name), cfg).unwrap();
            let streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
            let got: Vec<_> = streams.into_iter().map(collect).collect();
            if k == 1 {
                assert!(
                    e.metrics().preemptions > 0,
                    "{name}: no preemption: {:?}",
                    e.metrics()
                );
            }
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.0, w.0,
                    "{name} run {k}: prompt {i} (length {}) tokens",
                    lens[i]
                );
                assert_eq!(g.1, w.1, "{name} run {k}: prompt {i} log-probabilities");
            }
        }
    }
}
