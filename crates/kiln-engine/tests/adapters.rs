//! LoRA adapters through the engine: requests on three adapters and on the
//! base model share batches and each gets exactly what transformers + peft
//! generate (the goldens of `scripts/golden/tiny_lora.py`); the prefix cache
//! never hands one adapter's keys and values to another; `max_cpu_loras`
//! evicts host copies least recently used (read back at the next request),
//! never a pinned one (DJL's `pin`), and refuses to load another when every
//! slot is pinned; DJL's `preload=false` reads an adapter at its first
//! request; adapters on a mixture-of-experts model share batches with the
//! base; and registration refuses what it must.

use std::path::PathBuf;

use kiln_backend::cpu::CpuBackend;
use kiln_engine::{
    AdapterError, AdapterLimits, AdapterOptions, Engine, EngineConfig, Event, FinishReason,
    KvCapacity, Request, RequestStream, SpecConfig, SubmitError,
};
use kiln_model::goldens::{golden, golden_at, ids, tiny_dir};
use kiln_model::LoadOptions;
use serde_json::Value;

fn engine() -> Engine {
    engine_with(None)
}

/// The tiny llama on the CPU, speculating with `speculative` when given.
fn engine_with(speculative: Option<SpecConfig>) -> Engine {
    engine_of("llama", speculative)
}

/// The tiny checkpoint `model` on the CPU.
fn engine_of(model: &str, speculative: Option<SpecConfig>) -> Engine {
    let m = kiln_model::load(
        &CpuBackend::new(),
        &tiny_dir(model),
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
    golden_at(&adapter_dir(name))
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
    base_and_adapters_share_steps(e, "llama", &["lora_a", "lora_b", "lora_c"]);
}

/// Registers the adapters `names` of `testdata/tiny/<model>/` on `e`, then
/// submits every golden prompt on the base and on each adapter, all before
/// the engine runs them so that they share steps: each request gets its
/// golden greedy tokens (the base model's, or peft's with its adapter).
fn base_and_adapters_share_steps(e: &Engine, model: &str, names: &[&str]) {
    e.enable_adapters(AdapterLimits::default()).unwrap();
    for &n in names {
        let info = e.register_adapter(n, &tiny_dir(model).join(n)).unwrap();
        assert_eq!(info.name, n);
    }
    let mut streams = Vec::new();
    for p in golden(model)["prompts"].as_array().unwrap() {
        let prompt = ids(&p["ids"]);
        streams.push((
            ids(&p["greedy"]),
            e.submit(request(prompt.clone())).unwrap(),
            "base",
        ));
        for &n in names {
            let g = golden_at(&tiny_dir(model).join(n));
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

#[test]
fn adapters_on_a_mixture_of_experts_model_share_batches_with_the_base() {
    // mixtral/lora adapts the router and the experts, lora_attn attention
    // only; every request still gets peft's greedy tokens.
    base_and_adapters_share_steps(
        &engine_of("mixtral", None),
        "mixtral",
        &["lora", "lora_attn"],
    );
}

#[test]
fn preload_false_reads_the_adapter_at_its_first_request() {
    let e = engine();
    e.enable_adapters(AdapterLimits::default()).unwrap();
    let lazy = AdapterOptions {
        preload: false,
        pin: false,
    };
    let info = e
        .register_adapter_with("a", &adapter_dir("lora_b"), lazy)
        .unwrap();
    // Not read yet: no rank known, nothing held.
    assert_eq!((info.loaded, info.rank, info.pin), (false, 0, false));
    let prompt = ids(&golden("llama")["prompts"][1]["ids"]);
    assert_eq!(
        tokens(
            e.submit_adapter(request(prompt.clone()), None, Some("a"))
                .unwrap()
        ),
        ids(&adapter_golden("lora_b")["prompts"][1]["greedy"])
    );
    let a = e.adapter("a").unwrap();
    assert_eq!((a.loaded, a.rank), (true, 8));
    // Without preload only the files' presence is checked at registration;
    // what is wrong inside them is refused at the first request.
    let err = e
        .register_adapter_with("none", &tiny_dir("llama").join("no_such_adapter"), lazy)
        .unwrap_err();
    assert!(
        err.to_string().contains("adapter_config.json: not found"),
        "{err}"
    );
    e.register_adapter_with("phi", &tiny_dir("phi3").join("lora"), lazy)
        .unwrap();
    match e.submit_adapter(request(prompt.clone()), None, Some("phi")) {
        Err(SubmitError::Invalid(m)) => {
            assert!(m.contains("does not exist in this llama model"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    // The default (DJL's preload=true) reads at registration.
    let b = e.register_adapter("b", &adapter_dir("lora_a")).unwrap();
    assert_eq!((b.loaded, b.rank), (true, 4));
}

#[test]
fn pinned_adapters_are_never_evicted_and_a_full_pin_set_is_refused() {
    let e = engine();
    e.enable_adapters(AdapterLimits {
        max_loras: 1,
        max_lora_rank: 16,
        max_cpu_loras: 2,
    })
    .unwrap();
    let pin = AdapterOptions {
        preload: false, // pin implies preload
        pin: true,
    };
    let a = e
        .register_adapter_with("lora_a", &adapter_dir("lora_a"), pin)
        .unwrap();
    assert_eq!((a.loaded, a.pin), (true, true));
    e.register_adapter("lora_b", &adapter_dir("lora_b"))
        .unwrap();
    // lora_a is the least recently used, but pinned: lora_b goes instead.
    e.register_adapter("lora_c", &adapter_dir("lora_c"))
        .unwrap();
    let held = |e: &Engine| -> Vec<(String, bool, bool)> {
        e.adapters()
            .into_iter()
            .map(|a| (a.name, a.loaded, a.pin))
            .collect()
    };
    assert_eq!(
        held(&e),
        vec![
            ("lora_a".into(), true, true),
            ("lora_b".into(), false, false),
            ("lora_c".into(), true, false)
        ]
    );
    // Pinning lora_b (DJL's update?pin=true) loads it; lora_c is evicted.
    let b = e
        .update_adapter_with("lora_b", None, Some(true), None)
        .unwrap();
    assert_eq!((b.loaded, b.pin), (true, true));
    assert_eq!(
        held(&e),
        vec![
            ("lora_a".into(), true, true),
            ("lora_b".into(), true, true),
            ("lora_c".into(), false, false)
        ]
    );
    // Every slot is pinned: lora_c cannot be loaded for a request, nor a
    // third adapter pinned or preloaded; the pinned ones still serve.
    let all_pinned = "all 2 of option.max_cpu_loras's slots hold pinned adapters (lora_a, lora_b)";
    let prompt = ids(&golden("llama")["prompts"][1]["ids"]);
    match e.submit_adapter(request(prompt.clone()), None, Some("lora_c")) {
        Err(SubmitError::Invalid(m)) => assert!(
            m.starts_with("adapter 'lora_c' cannot be loaded: ") && m.contains(all_pinned),
            "{m}"
        ),
        other => panic!("{other:?}"),
    }
    let err = e
        .register_adapter_with("d", &adapter_dir("lora_c"), pin)
        .unwrap_err();
    assert!(
        matches!(err, AdapterError::AllPinned { max: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains(all_pinned), "{err}");
    assert!(e.adapter("d").is_none());
    assert!(e
        .update_adapter_with("lora_c", None, Some(true), None)
        .is_err());
    for n in ["lora_a", "lora_b"] {
        assert_eq!(
            tokens(
                e.submit_adapter(request(prompt.clone()), None, Some(n))
                    .unwrap()
            ),
            ids(&adapter_golden(n)["prompts"][1]["greedy"]),
            "{n}"
        );
    }
    // Unpinning frees a slot: lora_c loads again (evicting an unpinned one).
    e.update_adapter_with("lora_b", None, Some(false), None)
        .unwrap();
    assert_eq!(
        tokens(
            e.submit_adapter(request(prompt.clone()), None, Some("lora_c"))
                .unwrap()
        ),
        ids(&adapter_golden("lora_c")["prompts"][1]["greedy"])
    );
    assert_eq!(
        held(&e),
        vec![
            ("lora_a".into(), true, true),
            ("lora_b".into(), false, false),
            ("lora_c".into(), true, false)
        ]
    );
    // Re-registering from a directory keeps the pin unless told otherwise.
    let a = e.update_adapter("lora_a", &adapter_dir("lora_a")).unwrap();
    assert!(a.pin && a.loaded);
}
