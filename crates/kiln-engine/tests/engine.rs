//! The engine end to end: continuous batching, chunked prefill, preemption,
//! prefix reuse, cancellation, stops, sampling and metrics.
//!
//! Scheduling tests use a tiny random-weight model (fast, and its output is
//! as sensitive to a wrong KV cache as a real model's); text-level tests use
//! the default model (SmolLM2-135M-Instruct from the cache).

mod support;

use std::time::{Duration, Instant};

use kiln_backend::cpu::CpuBackend;
use kiln_engine::{
    Engine, EngineConfig, Event, FinishReason, KvCapacity, Request, SamplingParams, StopConditions,
    SubmitError, Usage,
};
use kiln_model::LoadedModel;
use support::*;

/// Distinct prompts of the given lengths over the byte vocabulary.
fn prompts(lens: &[usize]) -> Vec<Vec<u32>> {
    lens.iter()
        .enumerate()
        .map(|(i, &n)| {
            (0..n)
                .map(|j| ((i * 31 + j * 7 + 3) % 256) as u32)
                .collect()
        })
        .collect()
}

/// Runs every request alone, one after another, on a fresh engine.
fn alone(
    cfg: &EngineConfig,
    reqs: &[Request],
    model: impl Fn() -> LoadedModel<CpuBackend>,
) -> Vec<Output> {
    let e = engine(model(), cfg.clone());
    reqs.iter()
        .map(|r| collect(e.submit(r.clone()).unwrap()))
        .collect()
}

fn wait_for(e: &Engine, what: &str, cond: impl Fn(&kiln_engine::MetricsSnapshot) -> bool) {
    let t0 = Instant::now();
    while !cond(&e.metrics()) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}: {:?}",
            e.metrics()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn batched_chunked_and_preempted_runs_equal_runs_alone() {
    let lens = [1, 5, 17, 40, 63, 64, 65, 130, 200];
    let reqs: Vec<Request> = prompts(&lens).into_iter().map(|p| greedy(p, 20)).collect();
    let base = EngineConfig::default();
    let want = alone(&base, &reqs, tiny_model);
    assert!(want
        .iter()
        .all(|o| o.ids.len() == 20 && o.reason == FinishReason::Length));

    // All at once, with prefill chunked to 48 tokens per step and at most 4 running.
    let e = engine(
        tiny_model(),
        EngineConfig {
            max_step_tokens: 48,
            max_running: 4,
            ..base.clone()
        },
    );
    let got = together(&e, &reqs);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.ids, w.ids,
            "prompt {i} (length {}) differs when batched",
            lens[i]
        );
        assert_eq!(
            g.logprobs, w.logprobs,
            "prompt {i}: logprobs differ when batched"
        );
    }
    wait_for(&e, "every block to be freed", |m| {
        m.steps > 0 && m.kv_blocks_used == 0
    });

    // A KV cache of 20 blocks (320 tokens) cannot hold these at once: sequences
    // are preempted, recomputed, and still produce the same tokens.
    let e = engine(
        tiny_model(),
        EngineConfig {
            kv_capacity: KvCapacity::Tokens(320),
            ..base
        },
    );
    let got = together(&e, &reqs);
    assert!(
        e.metrics().preemptions > 0,
        "the test should force preemption: {:?}",
        e.metrics()
    );
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.ids, w.ids, "prompt {i} differs after preemption");
    }
    assert_eq!(e.metrics().requests_finished, reqs.len() as u64);
}

#[test]
fn shared_prefixes_reuse_cached_blocks() {
    let e = engine(tiny_model(), EngineConfig::default());
    let prefix: Vec<u32> = (0..100).map(|i| (i * 13 % 256) as u32).collect();
    let a = collect(e.submit(greedy(prefix.clone(), 8)).unwrap());
    let mut longer = prefix.clone();
    longer.extend([1, 2, 3]);
    let b = collect(e.submit(greedy(longer.clone(), 8)).unwrap());
    // 100 tokens = 6 full blocks of 16 shared.
    assert_eq!(b.usage.cached_tokens, 96);
    assert_eq!(a.usage.cached_tokens, 0);
    let m = e.metrics();
    assert_eq!(m.prefix_hit_tokens, 96);
    assert!(m.prefix_queried_tokens >= 203);
    // Same result as without the cache.
    let fresh = engine(tiny_model(), EngineConfig::default());
    assert_eq!(collect(fresh.submit(greedy(longer, 8)).unwrap()).ids, b.ids);
}

#[test]
fn the_running_batch_never_exceeds_its_limit() {
    let e = engine(
        tiny_model(),
        EngineConfig {
            max_running: 3,
            ..EngineConfig::default()
        },
    );
    let reqs: Vec<Request> = prompts(&[10; 8])
        .into_iter()
        .map(|p| greedy(p, 30))
        .collect();
    let streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    let mut max_running = 0;
    let t0 = Instant::now();
    while e.metrics().requests_finished < 8 && t0.elapsed() < Duration::from_secs(20) {
        max_running = max_running.max(e.metrics().running);
        std::thread::sleep(Duration::from_micros(200));
    }
    drop(streams);
    assert!(max_running <= 3, "{max_running} sequences ran at once");
}

#[test]
fn dropping_the_stream_cancels_and_frees_blocks() {
    let e = engine(tiny_model(), EngineConfig::default());
    let mut s = e.submit(greedy(vec![1, 2, 3], 900)).unwrap();
    for _ in 0..3 {
        assert!(matches!(s.blocking_next(), Some(Event::Token(_))));
    }
    assert!(e.metrics().kv_blocks_used > 0);
    drop(s);
    wait_for(&e, "the cancelled request's blocks to be freed", |m| {
        m.kv_blocks_used == 0 && m.running == 0 && m.requests_finished == 1
    });
    // The engine keeps serving.
    assert_eq!(collect(e.submit(greedy(vec![4], 3)).unwrap()).ids.len(), 3);
}

#[test]
fn bad_requests_are_refused_with_reasons() {
    let e = engine(
        tiny_model(),
        EngineConfig {
            kv_capacity: KvCapacity::Tokens(256),
            ..EngineConfig::default()
        },
    );
    let info = e.info().clone();
    assert_eq!(info.kv_blocks, 16);
    assert_eq!(info.kv_tokens, 256);
    assert!(matches!(
        e.submit(greedy(vec![], 4)),
        Err(SubmitError::Invalid(_))
    ));
    assert!(matches!(
        e.submit(greedy(vec![9999], 4)),
        Err(SubmitError::Invalid(_))
    ));
    assert!(matches!(
        e.submit(greedy(vec![1], 0)),
        Err(SubmitError::Invalid(_))
    ));
    let mut bad = greedy(vec![1], 4);
    bad.sampling.temperature = -1.0;
    assert!(matches!(e.submit(bad), Err(SubmitError::Invalid(_))));
    assert!(matches!(
        e.submit(greedy(vec![1; 2000], 4)),
        Err(SubmitError::Invalid(_))
    ));
    // Fits the model but never the cache: 507-style refusal.
    assert!(matches!(
        e.submit(greedy(vec![1; 200], 100)),
        Err(SubmitError::TooLarge(_))
    ));
}

#[test]
fn the_queue_bound_refuses_with_queue_full() {
    let e = engine(
        tiny_model(),
        EngineConfig {
            max_running: 1,
            max_waiting: 2,
            ..EngineConfig::default()
        },
    );
    // One long request occupies the only running slot.
    let mut first = e.submit(greedy(vec![1], 900)).unwrap();
    assert!(matches!(first.blocking_next(), Some(Event::Token(_))));
    let a = e.submit(greedy(vec![2], 5)).unwrap();
    let b = e.submit(greedy(vec![3], 5)).unwrap();
    assert_eq!(
        e.submit(greedy(vec![4], 5)).unwrap_err(),
        SubmitError::QueueFull(2)
    );
    drop(first);
    // Once the long request is gone, the queued ones run.
    assert_eq!(collect(a).ids.len(), 5);
    assert_eq!(collect(b).ids.len(), 5);
}

#[test]
fn a_burst_on_an_idle_engine_fills_free_batch_slots_before_the_queue() {
    let e = engine(
        tiny_model(),
        EngineConfig {
            max_running: 4,
            max_waiting: 1,
            ..EngineConfig::default()
        },
    );
    // Four free batch slots and a queue of one: five at once are taken.
    let streams: Vec<_> = (0..5)
        .map(|i| e.submit(greedy(vec![1 + i], 50)).unwrap())
        .collect();
    assert!(matches!(
        e.submit(greedy(vec![9], 5)),
        Err(SubmitError::QueueFull(_))
    ));
    for s in streams {
        assert_eq!(collect(s).ids.len(), 50);
    }
    // Everything finished: the whole allowance is back.
    let again: Vec<_> = (0..5)
        .map(|i| e.submit(greedy(vec![1 + i], 2)).unwrap())
        .collect();
    for s in again {
        assert_eq!(collect(s).ids.len(), 2);
    }
}

#[test]
fn deadlines_and_length_limits_finish_requests_with_their_reason() {
    let e = engine(tiny_model(), EngineConfig::default());
    let mut r = greedy(vec![1, 2], 100_000);
    r.stop.max_new_tokens = 900;
    r.stop.deadline = Some(Instant::now() + Duration::from_millis(50));
    let o = collect(e.submit(r).unwrap());
    assert_eq!(o.reason, FinishReason::Deadline);
    assert!(o.ids.len() < 900);

    // Total length (prompt + output), the reference's seq_length.
    let mut r = greedy(vec![1, 2, 3, 4], 50);
    r.stop.max_total_tokens = Some(10);
    let o = collect(e.submit(r).unwrap());
    assert_eq!((o.reason, o.ids.len()), (FinishReason::Length, 6));
    assert_eq!(
        o.usage,
        Usage {
            prompt_tokens: 4,
            completion_tokens: 6,
            cached_tokens: 0
        }
    );
}

#[test]
fn stop_token_ids_and_eos_end_generation_unless_ignored() {
    let e = engine(tiny_model(), EngineConfig::default());
    let base = collect(e.submit(greedy(vec![5, 6, 7], 12)).unwrap());
    // Stop at the 4th generated token's id.
    let stop_id = base.ids[3];
    let first = base.ids.iter().position(|&t| t == stop_id).unwrap();
    let mut r = greedy(vec![5, 6, 7], 12);
    r.stop.stop_token_ids = vec![stop_id];
    let o = collect(e.submit(r).unwrap());
    assert_eq!(o.reason, FinishReason::EosToken);
    assert_eq!(o.ids, base.ids[..=first]);
}

#[test]
fn seeded_sampling_is_reproducible_and_logprobs_are_reported() {
    let e = engine(tiny_model(), EngineConfig::default());
    let sampled = |seed| {
        let mut r = greedy(vec![10, 20, 30], 24);
        r.sampling = SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed: Some(seed),
            top_logprobs: 3,
            ..SamplingParams::default()
        };
        collect(e.submit(r).unwrap())
    };
    let (a, b, c) = (sampled(1), sampled(1), sampled(2));
    assert_eq!(a.ids, b.ids);
    assert_ne!(a.ids, c.ids);
    assert_eq!(a.logprobs.len(), a.ids.len());
    assert_eq!(a.top.len(), a.ids.len());
    for (lp, top) in a.logprobs.iter().zip(&a.top) {
        assert!(*lp <= 0.0);
        assert_eq!(top.len(), 3);
        assert!(top[0].1 >= top[1].1 && top[1].1 >= top[2].1);
    }
}

#[test]
fn metrics_count_tokens_and_latencies() {
    let e = engine(tiny_model(), EngineConfig::default());
    let reqs: Vec<Request> = prompts(&[3, 9]).into_iter().map(|p| greedy(p, 5)).collect();
    together(&e, &reqs);
    wait_for(&e, "the gauges to settle", |m| {
        m.running == 0 && m.kv_blocks_used == 0
    });
    let m = e.metrics();
    assert_eq!(m.prompt_tokens, 12);
    assert_eq!(m.generated_tokens, 10);
    assert_eq!(m.requests_finished, 2);
    assert_eq!(m.time_to_first_token.count, 2);
    assert_eq!(m.inter_token_latency.count, 8);
    assert_eq!(m.kv_blocks_total, e.info().kv_blocks as u64);
    assert_eq!((m.waiting, m.running, m.kv_blocks_used), (0, 0, 0));
}

#[test]
fn waiting_counts_requests_from_submission_and_preempted_ones() {
    let e = engine(
        tiny_model(),
        EngineConfig {
            max_running: 1,
            ..EngineConfig::default()
        },
    );
    let mut first = e.submit(greedy(vec![1, 2, 3], 900)).unwrap();
    assert!(matches!(first.blocking_next(), Some(Event::Token(_))));
    // The batch holds one sequence and it is busy: the next two wait, and
    // they are counted at once, not at the engine's next step.
    let queued: Vec<_> = prompts(&[4, 5])
        .into_iter()
        .map(|p| e.submit(greedy(p, 2)).unwrap())
        .collect();
    let m = e.metrics();
    assert_eq!(m.waiting, 2, "{m:?}");
    wait_for(&e, "the running gauge", |m| m.running == 1);
    drop(first);
    for s in queued {
        collect(s);
    }
    wait_for(&e, "the queue to empty", |m| {
        m.waiting == 0 && m.running == 0
    });

    // Preempted sequences wait again and are counted: a cache of 4 blocks
    // (64 tokens) cannot hold two sequences growing to 60 tokens each.
    let e = engine(
        tiny_model(),
        EngineConfig {
            kv_capacity: KvCapacity::Tokens(64),
            ..EngineConfig::default()
        },
    );
    let streams: Vec<_> = prompts(&[20, 20])
        .into_iter()
        .map(|p| e.submit(greedy(p, 40)).unwrap())
        .collect();
    let mut saw_preempted_waiting = false;
    let t0 = Instant::now();
    while e.metrics().requests_finished < 2 && t0.elapsed() < Duration::from_secs(20) {
        let m = e.metrics();
        saw_preempted_waiting |= m.preemptions > 0 && m.waiting == 1;
        std::thread::sleep(Duration::from_micros(100));
    }
    for s in streams {
        collect(s);
    }
    assert!(e.metrics().preemptions > 0, "{:?}", e.metrics());
    assert!(
        saw_preempted_waiting,
        "a preempted sequence was never counted as waiting"
    );
}

// ---- The default model: text-level behaviour and batch invariance ----

fn smol_prompt(e: &Engine, text: &str) -> Vec<u32> {
    e.tokenizer().encode(text, false).unwrap()
}

#[test]
fn default_model_greedy_output_is_batch_invariant() {
    let e = engine(default_model(), EngineConfig::default());
    let tok = e.tokenizer().clone();
    // Eight prompts from 1 to ~300 tokens.
    let long = "The history of bread begins in the Neolithic era, when people first ground grain into flour. ".repeat(18);
    let texts = [
        "Hi".to_string(),
        "The capital of France is".to_string(),
        "吾輩は猫である。名前はまだ無い。".to_string(),
        "List three colours:".to_string(),
        long[..200].to_string(),
        long[..600].to_string(),
        long[..1000].to_string(),
        long.clone(),
    ];
    let reqs: Vec<Request> = texts
        .iter()
        .map(|t| greedy(tok.encode(t, false).unwrap(), 16))
        .collect();
    let lens: Vec<usize> = reqs.iter().map(|r| r.prompt.len()).collect();
    assert!(
        lens.iter().min() == Some(&1) && *lens.iter().max().unwrap() >= 250,
        "prompt lengths {lens:?}"
    );
    let want: Vec<Output> = reqs
        .iter()
        .map(|r| collect(e.submit(r.clone()).unwrap()))
        .collect();
    drop(e);
    let chunked = engine(
        default_model(),
        EngineConfig {
            max_step_tokens: 64,
            ..EngineConfig::default()
        },
    );
    let got = together(&chunked, &reqs);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.ids, w.ids,
            "prompt {i} ({} tokens): batched + chunked differs from alone",
            lens[i]
        );
        assert_eq!(g.text, w.text);
    }
}

#[test]
fn default_model_stops_on_strings_eos_and_length() {
    let e = engine(default_model(), EngineConfig::default());
    let prompt = smol_prompt(&e, "The capital of France is");
    // Greedy continuation: " Paris.\n\nThe answer is: ..." (see testdata/golden).
    let full = collect(e.submit(greedy(prompt.clone(), 12)).unwrap());
    assert!(full.text.starts_with(" Paris.\n\n"), "{:?}", full.text);

    let mut r = greedy(prompt.clone(), 12);
    r.stop.stop_strings = vec!["\n\n".into()];
    let o = collect(e.submit(r).unwrap());
    assert_eq!(
        (o.text.as_str(), o.reason),
        (" Paris.", FinishReason::StopSequence)
    );

    // A stop string that spans tokens and starts mid-token.
    let mut r = greedy(prompt.clone(), 12);
    r.stop.stop_strings = vec!["is.\n".into(), "ris".into()];
    let o = collect(e.submit(r).unwrap());
    assert_eq!(
        (o.text.as_str(), o.reason),
        (" Pa", FinishReason::StopSequence)
    );

    // The chat answer ends with the model's EOS (<|im_end|>), which is not in the text.
    let tmpl = e.chat_template().unwrap().clone();
    let chat = tmpl
        .render(
            &[kiln_model::chat::ChatMessage::new(
                "user",
                "What is the capital of France?",
            )],
            true,
        )
        .unwrap();
    let mut r = Request::greedy(smol_prompt(&e, &chat), 64);
    r.stop = StopConditions {
        max_new_tokens: 64,
        ..StopConditions::default()
    };
    let o = collect(e.submit(r).unwrap());
    assert_eq!(o.reason, FinishReason::EosToken);
    assert_eq!(o.text, "The capital of France is Paris.");
    assert!(e.info().eos_ids.contains(o.ids.last().unwrap()));
}

// ---- Prompt log-probabilities (DJL's decoder_input_details) ----

/// The log-probability the engine reports for prompt token `i` is the one
/// the same token got when the model generated it at that position: greedy
/// generation from a prompt, then the prompt plus the generated tokens sent
/// as a prompt that asks for its log-probabilities, in small chunks and
/// beside another request. The other request's output, and a request that
/// does not ask, are exactly what they are alone (asking costs them nothing).
#[test]
fn prompt_logprobs_equal_the_logprobs_of_the_same_tokens_generated() {
    let e = engine(
        default_model(),
        EngineConfig {
            max_step_tokens: 8,
            ..EngineConfig::default()
        },
    );
    let prompt = smol_prompt(
        &e,
        "The Eiffel Tower is in Paris and the Colosseum is in Rome. \
         Big Ben is in London. The capital of France is",
    );
    let generated = collect(e.submit(greedy(prompt.clone(), 10)).unwrap());
    assert_eq!(generated.ids.len(), 10);
    let mut full = prompt.clone();
    full.extend(&generated.ids);

    let other = greedy(smol_prompt(&e, "List three colours:"), 12);
    let other_alone = collect(e.submit(other.clone()).unwrap());
    let mut asking = greedy(full.clone(), 3);
    asking.prompt_logprobs = true;
    let s1 = e.submit(asking.clone()).unwrap();
    let s2 = e.submit(other.clone()).unwrap();
    let (lps, out) = collect_with_prompt(s1);
    let other_beside = collect(s2);

    let lps = lps.expect("prompt log-probabilities with the first token");
    assert_eq!(lps.len(), full.len() - 1);
    assert!(lps.iter().all(|l| l.is_finite() && *l <= 0.0), "{lps:?}");
    for (k, want) in generated.logprobs.iter().enumerate() {
        assert_eq!(
            lps[prompt.len() - 1 + k],
            *want,
            "generated token {k} ({}): prompt log-prob differs from its generated log-prob",
            generated.ids[k]
        );
    }
    // The whole prompt was computed, not taken from the prefix cache.
    assert_eq!(out.usage.cached_tokens, 0);
    assert_eq!(other_beside, other_alone, "the other request changed");

    // Not asking: no prompt values, and the prefix cache serves the prompt.
    let (none, plain) = collect_with_prompt(e.submit(greedy(full.clone(), 3)).unwrap());
    assert!(none.is_none());
    assert!(
        full.len() > 32,
        "a prompt of {} tokens fills no cache block",
        full.len()
    );
    assert!(plain.usage.cached_tokens > 0, "{:?}", plain.usage);
    assert_eq!(plain.ids, out.ids);
    assert_eq!(plain.logprobs, out.logprobs);
}
