//! LoRA adapters through the engine: requests on three adapters and on the
//! base model share batches and each gets exactly what transformers + peft
//! generate (the goldens of `scripts/golden/tiny_lora.py`); the prefix cache
//! never hands one adapter's keys and values to another; `max_cpu_loras`
//! evicts host copies least recently used (read back at the next request);
//! and registration refuses what it must.

use std::path::PathBuf;

use kiln_backend::cpu::CpuBackend;
use kiln_engine::{
    AdapterError, AdapterLimits, Engine, EngineConfig, Event, FinishReason, KvCapacity, Request,
    RequestStream, SpecConfig, SubmitError,
};
use kiln_model::goldens::{golden, ids, tiny_dir};
use kiln_model::LoadOptions;
use serde_json::Value;

fn engine() -> Engine {
    engine_with(None)
}

/// The tiny llama on the CPU, speculating with `speculative` when given.
fn engine_with(speculative: Option<SpecConfig>) -> Engine {
    let m = kiln_model::load(
        &CpuBackend::new(),
        &tiny_dir("llama"),
        &LoadOptions::default(),
    )
    .unwrap();
    Engine::start(
        CpuBackend::new(),
        m,
        EngineConfig {
            block_size: 4,
            max_step_tokens: 24,
            kv_capacity: KvCapacity::Tokens(1024),
            speculative,
            ..EngineConfig::default()
        },
    )
    .unwrap()
}

fn adapter_dir(name: &str) -> PathBuf {
    tiny_dir("llama").join(name)
}

fn adapter_golden(name: &str) -> Value {
    let path = adapter_dir(name).join("golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn request(prompt: Vec<u32>) -> Request {
    let mut r = Request::greedy(prompt, 16);
    r.stop.ignore_eos = true;
    r
}

fn tokens(mut s: RequestStream) -> Vec<u32> {
    let mut out = Vec::new();
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Token(t) => out.push(t.id),
            Event::Finished { reason, error, .. } => {
                assert_eq!(reason, FinishReason::Length, "{error:?}");
            }
        }
    }
    out
}

#[test]
fn three_adapters_and_the_base_in_one_batch_generate_what_peft_does() {
    three_adapters_and_the_base_in_one_batch(&engine());
}

/// Speculative decoding (issue 26: "works with ... adapters"): the guesses
/// are verified on each row's own adapter, so every request still gets
/// peft's greedy tokens, while guesses are both accepted and rejected.
#[test]
fn speculation_keeps_each_adapters_tokens_in_a_mixed_batch() {
    let e = engine_with(Some(SpecConfig::ngram(4, 1, 3)));
    three_adapters_and_the_base_in_one_batch(&e);
    let s = e.metrics().speculative;
    assert!(
        s.num_accepted_tokens > 0 && s.num_accepted_tokens < s.num_draft_tokens,
        "guesses should be both accepted and rejected: {s:?}"
    );
}

fn three_adapters_and_the_base_in_one_batch(e: &Engine) {
    e.enable_adapters(AdapterLimits::default()).unwrap();
    let names = ["lora_a", "lora_b", "lora_c"];
    for n in names {
        let info = e.register_adapter(n, &adapter_dir(n)).unwrap();
        assert_eq!(info.name, n);
    }
    // Every prompt on the base and on each adapter, all submitted before
    // the engine runs them, so they share steps.
    let mut streams = Vec::new();
    let base = golden("llama");
    for p in base["prompts"].as_array().unwrap() {
        let prompt = ids(&p["ids"]);
        streams.push((
            ids(&p["greedy"]),
            e.submit(request(prompt.clone())).unwrap(),
            "base",
        ));
        for n in names {
            let g = adapter_golden(n);
            let want = g["prompts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|q| ids(&q["ids"]) == prompt)
                .map(|q| ids(&q["greedy"]))
                .unwrap();
            streams.push((
                want,
                e.submit_adapter(request(prompt.clone()), None, Some(n))
                    .unwrap(),
                n,
            ));
        }
    }
    for (i, (want, s, n)) in streams.into_iter().enumerate() {
        assert_eq!(tokens(s), want, "request {i} on {n}");
    }
}

#[test]
fn the_prefix_cache_keeps_adapters_apart() {
    let e = engine();
    e.enable_adapters(AdapterLimits::default()).unwrap();
    e.register_adapter("a", &adapter_dir("lora_b")).unwrap();
    let base = golden("llama");
    let p = &base["prompts"][2]; // 40 tokens: ten full blocks of 4
    let prompt = ids(&p["ids"]);
    let on_a = ids(&adapter_golden("lora_b")["prompts"][2]["greedy"]);
    // The adapter first, then the base on the same prompt, then the adapter again.
    assert_eq!(
        tokens(
            e.submit_adapter(request(prompt.clone()), None, Some("a"))
                .unwrap()
        ),
        on_a
    );
    assert_eq!(
        tokens(e.submit(request(prompt.clone())).unwrap()),
        ids(&p["greedy"])
    );
    assert_eq!(
        tokens(
            e.submit_adapter(request(prompt.clone()), None, Some("a"))
                .unwrap()
        ),
        on_a
    );
    // Re-registered under the same name with other weights: no stale blocks.
    e.update_adapter("a", &adapter_dir("lora_c")).unwrap();
    assert_eq!(
        tokens(e.submit_adapter(request(prompt), None, Some("a")).unwrap()),
        ids(&adapter_golden("lora_c")["prompts"][2]["greedy"])
    );
}

#[test]
fn max_cpu_loras_evicts_the_least_recently_used_and_reads_it_back() {
    let e = engine();
    e.enable_adapters(AdapterLimits {
        max_loras: 1,
        max_lora_rank: 16,
        max_cpu_loras: 2,
    })
    .unwrap();
    for n in ["lora_a", "lora_b"] {
        e.register_adapter(n, &adapter_dir(n)).unwrap();
    }
    let loaded = |e: &Engine| -> Vec<(String, bool)> {
        e.adapters()
            .into_iter()
            .map(|a| (a.name, a.loaded))
            .collect()
    };
    let prompt = ids(&golden("llama")["prompts"][1]["ids"]);
    // lora_a used, so lora_b is the least recently used when lora_c arrives.
    let want_a = ids(&adapter_golden("lora_a")["prompts"][1]["greedy"]);
    assert_eq!(
        tokens(
            e.submit_adapter(request(prompt.clone()), None, Some("lora_a"))
                .unwrap()
        ),
        want_a
    );
    e.register_adapter("lora_c", &adapter_dir("lora_c"))
        .unwrap();
    assert_eq!(
        loaded(&e),
        vec![
            ("lora_a".into(), true),
            ("lora_b".into(), false),
            ("lora_c".into(), true)
        ]
    );
    // lora_b is read back from its directory; with max_loras 1 the three
    // requests run one adapter at a time, each still exact.
    let streams: Vec<_> = ["lora_b", "lora_a", "lora_c"]
        .iter()
        .map(|n| {
            (
                n,
                e.submit_adapter(request(prompt.clone()), None, Some(n))
                    .unwrap(),
            )
        })
        .collect();
    for (n, s) in streams {
        assert_eq!(
            tokens(s),
            ids(&adapter_golden(n)["prompts"][1]["greedy"]),
            "{n}"
        );
    }
    assert_eq!(loaded(&e).iter().filter(|(_, l)| *l).count(), 2);
}

#[test]
fn registration_and_requests_refuse_what_they_must() {
    let e = engine();
    let dir = adapter_dir("lora_a");
    assert!(matches!(
        e.register_adapter("a", &dir),
        Err(AdapterError::Disabled)
    ));
    e.enable_adapters(AdapterLimits {
        max_lora_rank: 4,
        ..AdapterLimits::default()
    })
    .unwrap();
    for bad in ["", ".hidden", "a/b", "x y", &"n".repeat(129)] {
        assert!(
            matches!(
                e.register_adapter(bad, &dir),
                Err(AdapterError::InvalidName(_))
            ),
            "{bad:?}"
        );
    }
    e.register_adapter("a", &dir).unwrap();
    let err = e.register_adapter("a", &dir).unwrap_err();
    assert_eq!(err.to_string(), "adapter 'a' is already registered");
    // lora_b has rank 8.
    let err = e.register_adapter("b", &adapter_dir("lora_b")).unwrap_err();
    assert!(
        err.to_string().ends_with("rank 8 exceeds max_lora_rank 4"),
        "{err}"
    );
    assert!(e.adapter("b").is_none());
    let err = e
        .register_adapter("p", &tiny_dir("phi3").join("lora"))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("does not exist in this llama model"),
        "{err}"
    );
    let err = e.update_adapter("zzz", &dir).unwrap_err();
    assert_eq!(err.to_string(), "adapter 'zzz' is not registered");

    let prompt = ids(&golden("llama")["prompts"][1]["ids"]);
    match e.submit_adapter(request(prompt.clone()), None, Some("nope")) {
        Err(SubmitError::Invalid(m)) => assert_eq!(m, "adapter 'nope' is not registered"),
        other => panic!("{other:?}"),
    }
    e.unregister_adapter("a").unwrap();
    assert!(matches!(
        e.unregister_adapter("a"),
        Err(AdapterError::NotFound(_))
    ));
    assert!(e
        .submit_adapter(request(prompt.clone()), None, Some("a"))
        .is_err());
    // The base model keeps serving.
    assert_eq!(
        tokens(e.submit(request(prompt)).unwrap()),
        ids(&golden("llama")["prompts"][1]["greedy"])
    );
}
