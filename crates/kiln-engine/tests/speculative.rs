//! Speculative decoding never changes the output: greedy requests give the
//! same tokens with n-gram speculation as without, alone or batched beside
//! requests with and without drafts, chunked, preempted, with stops, a
//! grammar, the prefix cache; seeded sampled requests give the same tokens
//! too (the proposals are deterministic, see `kiln_engine::spec::verify`).

mod support;

use std::path::PathBuf;

use kiln_backend::cpu::CpuBackend;
use kiln_engine::{
    Constraint, Engine, EngineConfig, FinishReason, KvCapacity, Request, SamplingParams, SpecConfig,
};
use kiln_model::LoadedModel;
use serde_json::Value;
use support::*;

fn ngram(k: usize) -> Option<SpecConfig> {
    Some(SpecConfig::ngram(k, 1, 3))
}

fn alone(e: &Engine, reqs: &[Request]) -> Vec<Output> {
    reqs.iter()
        .map(|r| collect(e.submit(r.clone()).unwrap()))
        .collect()
}

fn assert_same(got: &[Output], want: &[Output], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.ids, w.ids, "request {i}: tokens differ {what}");
        // Bit for bit (a forced token's NaN included).
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&g.logprobs),
            bits(&w.logprobs),
            "request {i}: logprobs differ {what}"
        );
        assert_eq!(g.top, w.top, "request {i}: top logprobs differ {what}");
        assert_eq!(
            g.pieces, w.pieces,
            "request {i}: streamed text differs {what}"
        );
        assert_eq!(g.reason, w.reason, "request {i}: finish differs {what}");
        assert_eq!(
            g.usage.completion_tokens, w.usage.completion_tokens,
            "request {i}: usage differs {what}"
        );
    }
}

/// Prompts over the byte vocabulary; every other one repeats itself, so
/// that prompt lookup has something to find from the first step.
fn prompts(lens: &[usize]) -> Vec<Vec<u32>> {
    lens.iter()
        .enumerate()
        .map(|(i, &n)| {
            (0..n)
                .map(|j| {
                    let j = if i % 2 == 0 { j % 7 } else { j };
                    ((i * 31 + j * 7 + 3) % 256) as u32
                })
                .collect()
        })
        .collect()
}

/// The tiny model: batched, chunked and preempted runs with n-gram
/// speculation equal the runs alone without it, logprobs included; the
/// speculation is real (guesses were accepted and rejected).
#[test]
fn tiny_model_batched_chunked_preempted_with_speculation_equals_alone_without() {
    let lens = [1, 5, 17, 40, 63, 64, 65, 130, 200];
    let reqs: Vec<Request> = prompts(&lens)
        .into_iter()
        .map(|p| {
            let mut r = greedy(p, 40);
            r.sampling.top_logprobs = 2;
            r
        })
        .collect();
    let plain = engine(tiny_model(), EngineConfig::default());
    let want = alone(&plain, &reqs);
    assert!(want.iter().all(|o| o.ids.len() == 40));
    assert_eq!(plain.metrics().speculative.num_drafts, 0);

    for (what, cfg) in [
        (
            "alone with speculation",
            EngineConfig {
                speculative: ngram(4),
                ..EngineConfig::default()
            },
        ),
        (
            "batched and chunked with speculation",
            EngineConfig {
                max_step_tokens: 48,
                max_running: 4,
                speculative: ngram(5),
                ..EngineConfig::default()
            },
        ),
        (
            "preempted with speculation",
            EngineConfig {
                kv_capacity: KvCapacity::Tokens(320),
                speculative: ngram(3),
                ..EngineConfig::default()
            },
        ),
    ] {
        let e = engine(tiny_model(), cfg);
        let got = if what.starts_with("alone") {
            alone(&e, &reqs)
        } else {
            together(&e, &reqs)
        };
        assert_same(&got, &want, what);
        let m = e.metrics();
        let s = &m.speculative;
        assert_eq!(s.method, Some("ngram"));
        assert!(
            s.num_accepted_tokens > 0 && s.num_accepted_tokens < s.num_draft_tokens,
            "{what}: guesses should be both accepted and rejected: {s:?}"
        );
        assert!(
            m.steps < plain.metrics().steps,
            "{what}: fewer steps than without speculation ({} vs {})",
            m.steps,
            plain.metrics().steps
        );
        if what.starts_with("preempted") {
            assert!(m.preemptions > 0, "the test should force preemption: {m:?}");
        }
        assert_eq!(
            s.accepted_per_pos.iter().sum::<u64>(),
            s.num_accepted_tokens
        );
    }
}

fn golden_prompts() -> Vec<(String, Vec<u32>, Vec<u32>)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden/smollm2.json");
    let g: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                ids(&p["ids"]),
                ids(&p["greedy_ids"]),
            )
        })
        .collect()
}

/// The default model on the golden prompts: with n-gram speculation the 32
/// greedy tokens are transformers' (testdata/golden), alone and all at once
/// beside prompts of other lengths (some prefilling in chunks while others
/// decode with and without drafts).
#[test]
fn default_model_golden_prompts_are_unchanged_by_speculation() {
    let golden = golden_prompts();
    let e = engine(
        default_model(),
        EngineConfig {
            speculative: ngram(5),
            ..EngineConfig::default()
        },
    );
    let reqs: Vec<Request> = golden
        .iter()
        .map(|(_, p, _)| greedy(p.clone(), 32))
        .collect();
    for ((name, _, want), got) in golden.iter().zip(alone(&e, &reqs)) {
        assert_eq!(&got.ids, want, "{name}: alone with speculation");
    }
    let alone_metrics = e.metrics().speculative;
    assert!(
        alone_metrics.num_accepted_tokens > 0,
        "the golden prompts should accept some guesses: {alone_metrics:?}"
    );
    drop(e);

    // Mixed batch, chunked prefill: the golden prompts interleaved with
    // others, one of which is a long prompt that prefills in chunks while
    // the others decode.
    let tok = default_model().tokenizer;
    let long = "The history of bread begins in the Neolithic era, when people first ground grain into flour. ".repeat(12);
    let mut reqs = reqs;
    let mut wants: Vec<Option<Vec<u32>>> = golden.iter().map(|(_, _, w)| Some(w.clone())).collect();
    for t in ["Hi", long.as_str(), "List three colours:"] {
        reqs.insert(1, greedy(tok.encode(t, false).unwrap(), 24));
        wants.insert(1, None);
    }
    let plain = engine(default_model(), EngineConfig::default());
    let want_alone = alone(&plain, &reqs);
    drop(plain);
    let e = engine(
        default_model(),
        EngineConfig {
            max_step_tokens: 64,
            speculative: ngram(4),
            ..EngineConfig::default()
        },
    );
    let got = together(&e, &reqs);
    assert_same(&got, &want_alone, "batched and chunked with speculation");
    for (g, w) in got.iter().zip(&wants) {
        if let Some(w) = w {
            assert_eq!(&g.ids, w, "against transformers");
        }
    }
    assert!(e.metrics().speculative.num_accepted_tokens > 0);
}

fn smol(e: &Engine, text: &str) -> Vec<u32> {
    e.tokenizer().encode(text, false).unwrap()
}

/// A text the model copies from: the output repeats the prompt, so most
/// guesses are accepted and several tokens come out of one step.
const COPY: &str = "Repeat the list exactly.\nList: apples, pears, plums, cherries, grapes, lemons, limes, melons, peaches, figs.\nList: apples, pears, plums,";

/// Stops, length limits and streaming: the same events with speculation as
/// without (each accepted token its own event, a stop string inside an
/// accepted run cuts the output exactly where it does without).
#[test]
fn stops_lengths_and_streaming_are_unchanged_by_speculation() {
    let plain = engine(default_model(), EngineConfig::default());
    let spec = engine(
        default_model(),
        EngineConfig {
            speculative: ngram(6),
            ..EngineConfig::default()
        },
    );
    let prompt = smol(&plain, COPY);
    let full = collect(plain.submit(greedy(prompt.clone(), 30)).unwrap());
    let text = full.text;
    assert!(
        text.contains("cherries, grapes"),
        "the model copies: {text:?}"
    );
    let mut reqs = vec![greedy(prompt.clone(), 30)];
    // max_new_tokens that end inside a run of accepted guesses.
    for n in [1, 2, 3, 7, 11] {
        reqs.push(greedy(prompt.clone(), n));
    }
    // Stop strings matched inside a run, one spanning tokens.
    for stop in ["grapes", "es, li", ", ", "figs"] {
        let mut r = greedy(prompt.clone(), 30);
        r.stop.stop_strings = vec![stop.to_string()];
        reqs.push(r);
    }
    // A stop token id inside a run (the id of the fourth generated token).
    let mut r = greedy(prompt.clone(), 30);
    r.stop.stop_token_ids = vec![full.ids[3]];
    reqs.push(r);
    // A total-length limit.
    let mut r = greedy(prompt.clone(), 30);
    r.stop.max_total_tokens = Some(prompt.len() + 5);
    reqs.push(r);
    let want = alone(&plain, &reqs);
    let got = alone(&spec, &reqs);
    assert_same(&got, &want, "alone with speculation");
    let got = together(&spec, &reqs);
    assert_same(&got, &want, "together with speculation");
    for i in [6, 8] {
        assert_eq!(want[i].reason, FinishReason::StopSequence, "{:?}", want[i]);
    }
    assert!(!want[8].text.contains(", "));
    let s = spec.metrics().speculative;
    assert!(
        s.acceptance_rate() > 0.5,
        "copying should accept most guesses: {s:?}"
    );
    // Several tokens per step: fewer steps than tokens.
    let m = spec.metrics();
    assert!(m.steps < m.generated_tokens, "{m:?}");
}

/// Structured output: the grammar's mask applies to every row, and a guess
/// the grammar refuses ends the run; output equals the run without
/// speculation, beside unconstrained requests.
#[test]
fn guided_requests_are_unchanged_by_speculation() {
    let plain = engine(default_model(), EngineConfig::default());
    let spec = engine(
        default_model(),
        EngineConfig {
            speculative: ngram(5),
            ..EngineConfig::default()
        },
    );
    let schema = serde_json::json!({"type": "object",
        "properties": {"fruits": {"type": "array", "items": {"type": "string"}, "maxItems": 6}},
        "required": ["fruits"], "additionalProperties": false});
    let mk = |text: &str, n: usize, c: Option<Constraint>| {
        let mut r = Request::greedy(smol(&plain, text), n);
        r.constraint = c;
        r
    };
    let reqs = vec![
        mk(
            &format!("{COPY}\nThe fruits as JSON:"),
            60,
            Some(Constraint::JsonSchema(schema)),
        ),
        mk(COPY, 20, None),
        mk(
            "Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12. Again: 1, 2, 3,",
            20,
            Some(Constraint::Regex("( [0-9]+,){1,12}".into())),
        ),
    ];
    let want = alone(&plain, &reqs);
    let v: Value = serde_json::from_str(&want[0].text).unwrap();
    assert!(v["fruits"].is_array(), "{v}");
    assert_same(&alone(&spec, &reqs), &want, "alone with speculation");
    assert_same(&together(&spec, &reqs), &want, "together with speculation");
    assert!(spec.metrics().speculative.num_accepted_tokens > 0);
}

/// The prefix cache: a second request with the same prompt reuses its
/// blocks; a prompt made of a prompt and its output reuses blocks filled
/// by accepted guesses; outputs equal those without speculation.
#[test]
fn prefix_caching_with_speculation() {
    let plain = engine(default_model(), EngineConfig::default());
    let spec = engine(
        default_model(),
        EngineConfig {
            speculative: ngram(6),
            ..EngineConfig::default()
        },
    );
    let prompt = smol(&plain, COPY);
    let a = collect(spec.submit(greedy(prompt.clone(), 40)).unwrap());
    let b = collect(spec.submit(greedy(prompt.clone(), 40)).unwrap());
    let want = collect(plain.submit(greedy(prompt.clone(), 40)).unwrap());
    assert_eq!(a.ids, want.ids);
    assert_eq!(b.ids, want.ids);
    let bs = spec.info().block_size;
    assert_eq!(b.usage.cached_tokens, (prompt.len() - 1) / bs * bs);
    // Prompt + output as a new prompt: the blocks the output filled (through
    // accepted guesses) are found too.
    let mut longer = prompt.clone();
    longer.extend(&a.ids);
    let c = collect(spec.submit(greedy(longer.clone(), 8)).unwrap());
    let want_c = collect(plain.submit(greedy(longer.clone(), 8)).unwrap());
    assert_eq!(c.ids, want_c.ids);
    assert!(
        c.usage.cached_tokens > prompt.len() / bs * bs,
        "{} cached of {} (prompt {})",
        c.usage.cached_tokens,
        longer.len(),
        prompt.len()
    );
    assert!(spec.metrics().speculative.num_accepted_tokens > 0);
}

/// Seeded sampling: the same tokens with speculation as without, run after
/// run (the engine draws exactly as without speculation and accepts a guess
/// when the draw equals it: the rejection-sampling rule for deterministic
/// proposals); over many seeds guesses are both accepted and rejected.
#[test]
fn seeded_sampling_is_reproducible_and_equal_to_no_speculation() {
    let plain = engine(default_model(), EngineConfig::default());
    let spec = engine(
        default_model(),
        EngineConfig {
            speculative: ngram(4),
            ..EngineConfig::default()
        },
    );
    let prompt = smol(&plain, COPY);
    let reqs: Vec<Request> = (0..16u64)
        .map(|seed| {
            let mut r = greedy(prompt.clone(), 20);
            r.sampling = SamplingParams {
                temperature: [0.7, 1.0, 1.5][seed as usize % 3],
                top_p: [1.0, 0.9][seed as usize % 2],
                seed: Some(seed),
                ..SamplingParams::default()
            };
            r
        })
        .collect();
    let want = alone(&plain, &reqs);
    let distinct: std::collections::HashSet<_> = want.iter().map(|o| o.ids.clone()).collect();
    assert!(
        distinct.len() > 8,
        "seeds should differ: {}",
        distinct.len()
    );
    assert_same(&together(&spec, &reqs), &want, "sampled with speculation");
    assert_same(
        &together(&spec, &reqs),
        &want,
        "sampled with speculation, again",
    );
    let s = spec.metrics().speculative;
    assert!(
        s.num_accepted_tokens > 0 && s.num_accepted_tokens < s.num_draft_tokens,
        "{s:?}"
    );
}

/// A bad setting is refused at start with its reason.
#[test]
fn bad_speculative_settings_are_refused_at_start() {
    let r = Engine::start(
        CpuBackend::new(),
        tiny_model(),
        EngineConfig {
            speculative: Some(SpecConfig::ngram(0, 1, 3)),
            ..EngineConfig::default()
        },
    );
    let e = r.err().expect("refused").to_string();
    assert!(
        e.contains("num_speculative_tokens must be in 1..=32"),
        "{e}"
    );
}

// ---- A draft model as proposer ----

fn draft_cfg(k: usize) -> EngineConfig {
    EngineConfig {
        speculative: Some(
            SpecConfig::from_vllm_json(&format!(
                r#"{{"model": "draft", "num_speculative_tokens": {k}}}"#
            ))
            .unwrap(),
        ),
        ..EngineConfig::default()
    }
}

fn with_draft(
    model: LoadedModel<CpuBackend>,
    draft: LoadedModel<CpuBackend>,
    cfg: EngineConfig,
) -> Engine {
    Engine::start_with_draft(CpuBackend::new(), model, cfg, CpuBackend::new(), draft).unwrap()
}

/// Requests of several lengths on the engines `start` makes with the tiny
/// model drafting for itself, alone and then batched and chunked: the
/// output without speculation, and every guess accepted.
fn self_draft_accepts_every_guess(start: impl Fn(EngineConfig) -> Engine) {
    let lens = [1, 5, 17, 40, 65, 130];
    let reqs: Vec<Request> = prompts(&lens).into_iter().map(|p| greedy(p, 30)).collect();
    let want = alone(&engine(tiny_model(), EngineConfig::default()), &reqs);
    for (what, cfg, batched) in [
        ("alone", draft_cfg(4), false),
        (
            "batched and chunked",
            EngineConfig {
                max_step_tokens: 48,
                max_running: 4,
                ..draft_cfg(5)
            },
            true,
        ),
    ] {
        let e = start(cfg);
        let got = if batched {
            together(&e, &reqs)
        } else {
            alone(&e, &reqs)
        };
        assert_same(&got, &want, what);
        let s = e.metrics().speculative;
        assert_eq!(s.method, Some("draft_model"));
        assert!(s.num_draft_tokens > 0, "{what}: {s:?}");
        assert_eq!(
            s.num_accepted_tokens, s.num_draft_tokens,
            "{what}: every guess accepted: {s:?}"
        );
        assert_eq!(s.acceptance_rate(), 1.0);
    }
}

/// The model drafting for itself, loaded a second time as the draft,
/// guesses exactly what it then chooses.
#[test]
fn a_model_drafting_for_itself_has_every_guess_accepted() {
    self_draft_accepts_every_guess(|cfg| with_draft(tiny_model(), tiny_model(), cfg));
}

/// The model drafting for itself on its own weights, loaded once
/// (`Engine::start_self_draft`, what the server does when the draft names
/// the target), does the same.
#[test]
fn a_model_drafting_for_itself_on_shared_weights_has_every_guess_accepted() {
    self_draft_accepts_every_guess(|cfg| {
        Engine::start_self_draft(CpuBackend::new(), tiny_model(), cfg, CpuBackend::new()).unwrap()
    });
}

/// The default model drafting for itself on the golden prompts, its
/// weights loaded once and shared with the draft: 100% acceptance and
/// transformers' tokens.
#[test]
fn default_model_drafting_for_itself_on_the_golden_prompts() {
    let golden = golden_prompts();
    let e = Engine::start_self_draft(
        CpuBackend::new(),
        default_model(),
        draft_cfg(4),
        CpuBackend::new(),
    )
    .unwrap();
    let reqs: Vec<Request> = golden
        .iter()
        .map(|(_, p, _)| greedy(p.clone(), 32))
        .collect();
    for ((name, _, want), got) in golden.iter().zip(together(&e, &reqs)) {
        assert_eq!(&got.ids, want, "{name}: with the model as its own draft");
    }
    let s = e.metrics().speculative;
    assert!(s.num_draft_tokens > 0);
    assert_eq!(s.num_accepted_tokens, s.num_draft_tokens, "{s:?}");
}

/// Another model of the same vocabulary drafts: fewer guesses accepted,
/// the same output (greedy and seeded); a draft of another vocabulary is
/// refused at start.
#[test]
fn another_draft_changes_speed_not_output() {
    let lens = [3, 17, 64];
    let mut reqs: Vec<Request> = prompts(&lens).into_iter().map(|p| greedy(p, 30)).collect();
    for seed in 0..3 {
        let mut r = greedy(prompts(&[20])[0].clone(), 20);
        r.sampling = SamplingParams {
            temperature: 0.8,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        reqs.push(r);
    }
    let want = alone(&engine(tiny_model(), EngineConfig::default()), &reqs);
    let e = with_draft(tiny_model(), tiny_model_seeded(7), draft_cfg(3));
    assert_same(&together(&e, &reqs), &want, "with another draft");
    let s = e.metrics().speculative;
    assert!(s.num_draft_tokens > 0);
    assert!(s.num_accepted_tokens < s.num_draft_tokens, "{s:?}");

    let err = Engine::start_with_draft(
        CpuBackend::new(),
        tiny_model(),
        draft_cfg(3),
        CpuBackend::new(),
        default_model(),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(
        err.contains("a draft must share the target's tokenizer"),
        "{err}"
    );
    // A draft model setting without a loaded draft.
    let err = Engine::start(CpuBackend::new(), tiny_model(), draft_cfg(3))
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("must be loaded with the target"), "{err}");
}

/// Adaptive speculation: a draft that keeps missing (another model's
/// weights) stops being asked after a few drafts, with pauses that grow
/// (`kiln_engine::spec::adaptive`), so most steps carry no guesses; the
/// output is still the output without speculation, alone and batched.
#[test]
fn guesses_that_keep_missing_are_paused() {
    let reqs: Vec<Request> = prompts(&[3, 30])
        .into_iter()
        .map(|p| greedy(p, 150))
        .collect();
    let want = alone(&engine(tiny_model(), EngineConfig::default()), &reqs);
    let e = with_draft(tiny_model(), tiny_model_seeded(7), draft_cfg(4));
    assert_same(&alone(&e, &reqs[..1]), &want[..1], "alone, paused guesses");
    let s = e.metrics().speculative;
    assert!(s.acceptance_rate() < 0.3, "the draft should miss: {s:?}");
    // Without pauses every one of the ~150 steps would carry a draft; with
    // them: two drafts, then one after each pause of 4, 8, 16, 32, 64 steps.
    assert!(
        (3..=12).contains(&s.num_drafts),
        "drafts should pause: {s:?}"
    );
    assert_same(&together(&e, &reqs), &want, "batched, paused guesses");
}
