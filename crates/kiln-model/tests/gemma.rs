//! Gemma 2 and Gemma 3 (text) against Hugging Face `transformers`, on the
//! tiny random-weight checkpoints `scripts/golden/tiny_gemma.py` writes
//! (`testdata/tiny/gemma2/`, `testdata/tiny/gemma3/`): logits of the last
//! prompt position, the argmax of every position and 16 greedy tokens, as
//! `tests/architectures.rs` checks the other families; then the same
//! checkpoints as GGUF files (written here as llama.cpp's converter writes
//! them, norms shifted by one), as a multimodal Gemma 3 checkpoint's language
//! model, and batched with another prompt.

use std::path::{Path, PathBuf};

use kiln_backend::cpu::CpuBackend;
use kiln_backend::{Backend, KvSpec, SeqSlice, StepInput};
use kiln_model::fixtures;
use kiln_model::goldens::{
    argmax, check_loaded, floats, golden, ids, run, tiny_dir as dir, LOGIT_TOL,
};
use kiln_model::{load, LoadOptions};
use serde_json::Value;

/// The model at `path` against `name`'s golden outputs: last logits within
/// [`LOGIT_TOL`], per-position argmax (unless `tokens_only`) and greedy tokens exactly.
fn check(name: &str, path: &Path, what: &str) {
    let m = load(&CpuBackend::new(), path, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    check_loaded(name, &m, what);
}

#[test]
fn gemma2_softcaps_post_norms_and_alternating_windows_match_transformers() {
    check("gemma2", &dir("gemma2"), "gemma2");
}

#[test]
fn gemma3_qk_norms_and_local_global_rope_match_transformers() {
    check("gemma3", &dir("gemma3"), "gemma3");
}

#[test]
fn gemma_configs_are_read_as_the_checkpoints_mean_them() {
    use kiln_model::config::DecoderConfig;
    let c2 = DecoderConfig::from_hf_config(&dir("gemma2").join("config.json")).expect("gemma2");
    let windows: Vec<_> = (0..4).map(|i| c2.layer_attention(i).window).collect();
    assert_eq!(windows, [Some(8), None, Some(8), None]);
    assert_eq!(
        (c2.attn_logit_softcap, c2.final_logit_softcap),
        (Some(1.0), Some(2.0))
    );
    assert_eq!(
        (c2.embed_scale, c2.attn_scale, c2.norm_offset),
        (Some(8.0), Some(0.25), 1.0)
    );
    let c3 = DecoderConfig::from_hf_config(&dir("gemma3").join("config.json")).expect("gemma3");
    let local: Vec<_> = (0..6).map(|i| c3.layer_attention(i).local_rope).collect();
    assert_eq!(local, [true, true, true, true, true, false]);
    assert_eq!(c3.rope.as_ref().map(|r| r.theta), Some(1e6));
    assert_eq!(c3.local_rope.as_ref().map(|r| r.theta), Some(1e4));
    assert!(c3.qk_norm && c3.attn_logit_softcap.is_none() && c3.final_logit_softcap.is_none());
    // `kiln inspect`'s count, post norms and q/k norms included, is the file's.
    for (name, c) in [("gemma2", &c2), ("gemma3", &c3)] {
        assert_eq!(
            c.param_count(),
            golden(name)["n_params"].as_u64().unwrap(),
            "{name}"
        );
    }
}

/// A GGUF of `arch` with `layers` layers and the given extra metadata (no
/// tensors: only the config is read).
fn gemma_gguf_config(
    arch: &str,
    layers: u32,
    extra: Vec<(&str, kiln_model::gguf::Value)>,
) -> kiln_model::config::DecoderConfig {
    use kiln_model::gguf::{GgufFile, GgufWriter, Value as G};
    let mut w = GgufWriter::default();
    let key = |k: &str| format!("{arch}.{k}");
    w.meta("general.architecture", G::String(arch.into()))
        .meta(&key("vocab_size"), G::U32(320))
        .meta(&key("context_length"), G::U32(256))
        .meta(&key("embedding_length"), G::U32(64))
        .meta(&key("block_count"), G::U32(layers))
        .meta(&key("feed_forward_length"), G::U32(128))
        .meta(&key("attention.head_count"), G::U32(4))
        .meta(&key("attention.head_count_kv"), G::U32(2))
        .meta(&key("attention.key_length"), G::U32(32));
    for (k, v) in extra {
        w.meta(&key(k), v);
    }
    let path = std::env::temp_dir().join(format!(
        "kiln-gemma-cfg-{arch}-{layers}-{}.gguf",
        std::process::id()
    ));
    std::fs::write(&path, w.to_bytes()).unwrap();
    let cfg = kiln_model::config::DecoderConfig::from_gguf(&GgufFile::open(&path).unwrap());
    let _ = std::fs::remove_file(&path);
    cfg.expect("config")
}

#[test]
fn gguf_gemma_settings_follow_llama_cpp() {
    use kiln_model::gguf::Value as G;
    let windows = |c: &kiln_model::config::DecoderConfig| -> Vec<Option<usize>> {
        (0..c.n_layers)
            .map(|i| c.layer_attention(i).window)
            .collect()
    };
    // Gemma 3 27B (62 layers) scales by hidden / heads, every other size by head_dim.
    let big = gemma_gguf_config("gemma3", 62, vec![("attention.sliding_window", G::U32(8))]);
    assert_eq!(big.attn_scale, Some(1.0 / 4.0));
    let w = windows(&big);
    assert_eq!(
        (w[4], w[5], w[11]),
        (Some(8), None, None),
        "five local, one global"
    );
    let small = gemma_gguf_config("gemma3", 3, vec![]);
    assert_eq!(small.attn_scale, Some(1.0 / 32f32.sqrt()));
    // No window: every layer global, one rotary table.
    assert_eq!(windows(&small), [None, None, None]);
    assert!(small.local_rope.is_none());
    // The pattern as a count, or as one flag per layer.
    let c = gemma_gguf_config(
        "gemma3",
        4,
        vec![
            ("attention.sliding_window", G::U32(8)),
            ("attention.sliding_window_pattern", G::U32(2)),
        ],
    );
    assert_eq!(windows(&c), [Some(8), None, Some(8), None]);
    assert_eq!(c.local_rope.as_ref().map(|r| r.theta), Some(10_000.0));
    let all_local = gemma_gguf_config(
        "gemma3",
        2,
        vec![
            ("attention.sliding_window", G::U32(8)),
            ("attention.sliding_window_pattern", G::U32(0)),
        ],
    );
    assert_eq!(
        windows(&all_local),
        [Some(8), Some(8)],
        "llama.cpp's pattern 0"
    );
    let c = gemma_gguf_config(
        "gemma2",
        3,
        vec![(
            "attention.sliding_window_pattern",
            G::Array(vec![G::Bool(false), G::Bool(true), G::Bool(false)]),
        )],
    );
    // Gemma 2's defaults: a 4096 window, soft caps 50 and 30, one rotary table.
    assert_eq!(windows(&c), [None, Some(4096), None]);
    assert_eq!(
        (c.attn_logit_softcap, c.final_logit_softcap),
        (Some(50.0), Some(30.0))
    );
    assert!(c.local_rope.is_none() && c.norm_offset == 0.0 && c.post_norms);
}

/// Writes a tiny Gemma checkpoint as a GGUF file as llama.cpp's
/// `convert_hf_to_gguf.py` (`Gemma2Model`, `Gemma3Model`) does: its
/// metadata keys, canonical tensor names, every `*norm.weight` with 1 added,
/// no `output.weight` (tied), and the tiny byte-level vocabulary. Checked
/// once (2026-12-06) against files that converter wrote for the same
/// checkpoints: the same keys and tensor names (`post_attention_norm`,
/// `post_ffw_norm`), and kiln gives those files the same golden tokens. (To
/// run the converter on these checkpoints its vocabulary step needs the
/// tiny byte-level tokenizer treated as GPT-2's, with one merge added, and
/// its cut of Gemma 3's embedding rows to the `tokenizer.json` count left
/// out: the token list is padded to 320, so llama.cpp would refuse the cut
/// file too.) llama.cpp's own `llama-server` gave those files the golden
/// greedy tokens as well, all 16 of all three prompts of both families.
fn to_gguf(name: &str) -> PathBuf {
    to_gguf_from(name, &dir(name), name)
}

/// [`to_gguf`] of the checkpoint in `d` (of family `name`), written to a
/// temporary file named after `tag`.
fn to_gguf_from(name: &str, d: &Path, tag: &str) -> PathBuf {
    kiln_model::tiny_gguf::gemma(name, d, tag)
}

#[test]
fn gguf_forms_of_gemma2_and_gemma3_match_transformers() {
    for name in ["gemma2", "gemma3"] {
        let path = to_gguf(name);
        let cfg = kiln_model::config::DecoderConfig::from_gguf(
            &kiln_model::gguf::GgufFile::open(&path).expect("open"),
        )
        .expect("config");
        // The GGUF carries no offset: the converter added it.
        assert_eq!(cfg.norm_offset, 0.0, "{name}");
        check(name, &path, &format!("{name} (GGUF)"));
        let _ = std::fs::remove_file(&path);
    }
}

/// A multimodal Gemma 3 checkpoint (`Gemma3ForConditionalGeneration`):
/// the tiny text model as its `text_config`, its tensors under
/// `prefix` (and a vision tensor kiln must leave alone).
fn multimodal_dir(prefix: &str, tag: &str) -> PathBuf {
    use safetensors::tensor::{Dtype, TensorView};
    let src = dir("gemma3");
    let out = std::env::temp_dir().join(format!("kiln-gemma3-mm-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let text: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let cfg = serde_json::json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8},
        "mm_tokens_per_image": 256,
    });
    std::fs::write(out.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(src.join("tokenizer.json"), out.join("tokenizer.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let vision = vec![0u8; 4 * 8];
    let mut views: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let rest = n.strip_prefix("model.").expect("model. prefix");
            (format!("{prefix}{rest}"), v)
        })
        .collect();
    views.push((
        "vision_tower.vision_model.embeddings.patch_embedding.bias".into(),
        TensorView::new(Dtype::F32, vec![8], &vision).unwrap(),
    ));
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
    out
}

#[test]
fn multimodal_gemma3_checkpoints_load_their_language_model() {
    for (prefix, tag) in [
        ("model.language_model.", "new"),
        ("language_model.model.", "original"),
    ] {
        let d = multimodal_dir(prefix, tag);
        check("gemma3", &d, &format!("multimodal gemma3 ({prefix})"));
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// One step over several sequences, each `(tokens, first position, blocks)`,
/// asking for every sequence's last logits.
fn batched_step(parts: &[(&[u32], usize, &[u32])]) -> StepInput {
    let bs = fixtures::TEST_BLOCK_SIZE;
    let mut step = StepInput::default();
    for (tokens, start, table) in parts {
        step.seqs.push(SeqSlice {
            query_start: step.tokens.len(),
            query_len: tokens.len(),
            context_len: start + tokens.len(),
            block_table: table.to_vec(),
        });
        for (i, &t) in tokens.iter().enumerate() {
            let p = start + i;
            step.tokens.push(t);
            step.positions.push(p as u32);
            step.slots.push(table[p / bs] * bs as u32 + (p % bs) as u32);
        }
        step.logit_rows.push(step.tokens.len() as u32 - 1);
    }
    step
}

#[test]
fn batched_prompts_give_the_bits_each_gives_alone() {
    let be = CpuBackend::new();
    for name in ["gemma2", "gemma3"] {
        let m = load(&be, &dir(name), &LoadOptions::default()).expect("load");
        let cfg = m.decoder.config();
        let g = golden(name);
        let prompts: Vec<Vec<u32>> = [2, 1]
            .iter()
            .map(|&i| ids(&g["prompts"][i]["ids"]))
            .collect();
        let vocab = cfg.vocab_size;
        let steps = 6;
        let spec = KvSpec {
            n_layers: cfg.n_layers,
            num_blocks: 8,
            block_size: fixtures::TEST_BLOCK_SIZE,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        };
        // Each alone, on blocks of its own, and the tokens it chose.
        let tables: [&[u32]; 2] = [&[5, 1, 6, 2], &[3, 7]];
        let mut alone = Vec::new();
        for (p, table) in prompts.iter().zip(tables) {
            let mut kv = be.alloc_kv_cache(&spec).unwrap();
            let mut logits = vec![m
                .decoder
                .forward(&be, &mut kv, &batched_step(&[(p, 0, table)]))
                .unwrap()];
            let mut tokens = Vec::new();
            for s in 0..steps {
                let t = argmax(&logits[s]);
                tokens.push(t);
                let step = batched_step(&[(&[t], p.len() + s, table)]);
                logits.push(m.decoder.forward(&be, &mut kv, &step).unwrap());
            }
            alone.push((logits, tokens));
        }
        // Together: one cache, both prompts in one step, then both decodes in one step.
        let mut kv = be.alloc_kv_cache(&spec).unwrap();
        let both = batched_step(&[(&prompts[0], 0, tables[0]), (&prompts[1], 0, tables[1])]);
        let mut got = m.decoder.forward(&be, &mut kv, &both).unwrap();
        for s in 0..=steps {
            for (k, (logits, _)) in alone.iter().enumerate() {
                let row = &got[k * vocab..(k + 1) * vocab];
                assert!(
                    row.iter()
                        .zip(&logits[s])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name} step {s}, sequence {k}: batched logits differ from alone"
                );
            }
            if s == steps {
                break;
            }
            let (t0, t1) = ([alone[0].1[s]], [alone[1].1[s]]);
            let step = batched_step(&[
                (&t0, prompts[0].len() + s, tables[0]),
                (&t1, prompts[1].len() + s, tables[1]),
            ]);
            got = m.decoder.forward(&be, &mut kv, &step).unwrap();
        }
    }
}

/// Gemma 2's and Gemma 3's chat templates (fetched into the cache by
/// `scripts/fetch-assets.sh --tests`) render as `apply_chat_template` did
/// (`testdata/chat/gemma.json`, by `scripts/golden/chat_templates_gemma.py`):
/// Gemma 3 folds a system message into the first user turn, Gemma 2's
/// template refuses one with its own message.
#[test]
fn gemma_chat_templates_render_as_transformers_does() {
    use kiln_model::chat::{ChatMessage, ChatTemplate};
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/chat/gemma.json");
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("gemma.json")).expect("json");
    let cache = kiln_model::default_model::cache_dir().join("testdata/tokenizers");
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).unwrap_or_else(|e| {
            panic!("{}: {e} (run scripts/fetch-assets.sh --tests)", p.display())
        })
    };
    let g3: Value =
        serde_json::from_str(&read(cache.join("gemma3/tokenizer_config.json"))).unwrap();
    let sources = [
        (
            "gemma3",
            g3["chat_template"].as_str().expect("template").to_string(),
        ),
        ("gemma2", read(cache.join("gemma2/chat_template.jinja"))),
    ];
    let records = doc["records"].as_array().expect("records");
    let (mut rendered, mut refused) = (0, 0);
    for r in records {
        let name = r["template"].as_str().unwrap();
        let src = &sources
            .iter()
            .find(|(n, _)| *n == name)
            .expect("template")
            .1;
        let t = ChatTemplate::new(
            src,
            r["bos_token"].as_str().unwrap(),
            r["eos_token"].as_str().unwrap(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let messages: Vec<ChatMessage> = serde_json::from_value(r["messages"].clone()).unwrap();
        let agp = r["add_generation_prompt"].as_bool().unwrap();
        let got = t.render(&messages, agp);
        let what = format!("{name} / {} (agp={agp})", r["case"]);
        match (&r["expected"], &r["expected_error"]) {
            (Value::String(want), _) => {
                assert_eq!(
                    got.as_deref().unwrap_or_else(|e| panic!("{what}: {e}")),
                    want,
                    "{what}"
                );
                rendered += 1;
            }
            (_, Value::String(err)) => {
                let e = got.expect_err(&what).to_string();
                assert!(e.contains(err.as_str()), "{what}: {e}");
                refused += 1;
            }
            _ => panic!("{what}: no expected text or error"),
        }
    }
    // Both templates, the system-message cases of Gemma 2 refused.
    assert!(
        rendered >= 18 && refused >= 4,
        "{rendered} rendered, {refused} refused"
    );
}

/// A Gemma checkpoint converted while loading (quantized to Q8_0) and
/// written as a prepared file loads back from it as the same model: the
/// file keeps the checkpoint's norm weights and its config, so the `1 + w`
/// is applied once, at load, either way.
#[test]
fn gemma_prepared_files_load_back_as_the_same_model() {
    use kiln_model::prepared::{self, PreparedInfo, Settings, ARTIFACT_VERSION};
    let be = CpuBackend::new();
    let tmp = tempfile::tempdir().expect("tmp");
    let opts = LoadOptions {
        quantize: Some(kiln_backend::GgmlType::Q8_0),
        ..LoadOptions::default()
    };
    let prompt = ids(&golden("gemma2")["prompts"][2]["ids"]);
    for name in ["gemma2", "gemma3"] {
        let converted = run(
            &load(&be, &dir(name), &opts).expect("converting load"),
            &prompt,
            6,
        );
        let file = tmp.path().join(format!("{name}.gguf"));
        let info = PreparedInfo {
            key: "0123abcd".into(),
            source: dir(name).display().to_string(),
            identity: "[]".into(),
            settings: Settings::of(&opts),
            artifact_version: ARTIFACT_VERSION,
        };
        let (while_writing, _) = prepared::load_and_prepare(
            &be,
            &dir(name),
            &opts,
            &info,
            &file,
            &kiln_model::layouts::Layouts::Off,
        )
        .expect("prepare");
        assert_eq!(
            run(&while_writing, &prompt, 6),
            converted,
            "{name}: while writing"
        );
        let mapped = load(&be, &file, &prepared::as_prepared(&opts)).expect("load prepared");
        assert_eq!(
            mapped.decoder.config().norm_offset,
            1.0,
            "{name}: the checkpoint's config"
        );
        assert_eq!(
            run(&mapped, &prompt, 6),
            converted,
            "{name}: from the prepared file"
        );
    }
}

/// Gemma's chat turns end with `<end_of_turn>`, which its
/// `generation_config.json` lists among the EOS ids (`[1, 106]` in the real
/// models) and llama.cpp treats as end of generation in a GGUF: both forms
/// of a Gemma checkpoint with that token stop on it.
#[test]
fn end_of_turn_stops_gemma_in_both_forms() {
    let be = CpuBackend::new();
    let d = std::env::temp_dir().join(format!("kiln-gemma3-eot-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir("gemma3").join(f), d.join(f)).unwrap();
    }
    // The tiny vocabulary's id 259 becomes `<end_of_turn>`, the EOS list Gemma's.
    let tok = std::fs::read_to_string(dir("gemma3").join("tokenizer.json")).unwrap();
    assert!(tok.contains("\"<|im_end|>\""));
    std::fs::write(
        d.join("tokenizer.json"),
        tok.replace("<|im_end|>", "<end_of_turn>"),
    )
    .unwrap();
    std::fs::write(
        d.join("generation_config.json"),
        r#"{"bos_token_id": 256, "eos_token_id": [256, 259], "pad_token_id": 257}"#,
    )
    .unwrap();
    let hf = load(&be, &d, &LoadOptions::default()).expect("load");
    assert_eq!(hf.tokenizer.token_to_id("<end_of_turn>"), Some(259));
    assert!(hf.eos_ids.contains(&259), "{:?}", hf.eos_ids);
    let path = to_gguf_from("gemma3", &d, "eot");
    let gguf = load(&be, &path, &LoadOptions::default()).expect("load gguf");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&d);
    assert_eq!(gguf.tokenizer.token_to_id("<end_of_turn>"), Some(259));
    assert!(gguf.eos_ids.contains(&259), "{:?}", gguf.eos_ids);
}

/// The attention scale is `query_pre_attn_scalar^-0.5`: the tiny weights
/// under another scalar (golden.json's `variants`, from transformers)
/// give that variant's logits and tokens, not the base model's.
#[test]
fn query_pre_attn_scalar_sets_the_attention_scale() {
    for name in ["gemma2", "gemma3"] {
        let g = golden(name);
        let variants = g["variants"].as_array().expect("variants");
        assert!(!variants.is_empty(), "{name}");
        for v in variants {
            let changes = v["config_changes"].as_object().expect("config_changes");
            let d =
                std::env::temp_dir().join(format!("kiln-gemma-var-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            for f in [
                "model.safetensors",
                "tokenizer.json",
                "generation_config.json",
            ] {
                std::fs::copy(dir(name).join(f), d.join(f)).unwrap();
            }
            let mut cfg: Value = serde_json::from_str(
                &std::fs::read_to_string(dir(name).join("config.json")).unwrap(),
            )
            .unwrap();
            for (k, x) in changes {
                cfg[k] = x.clone();
            }
            std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
            let m = load(&CpuBackend::new(), &d, &LoadOptions::default()).expect("load");
            let _ = std::fs::remove_dir_all(&d);
            let vocab = m.decoder.config().vocab_size;
            for p in v["prompts"].as_array().expect("prompts") {
                let (all, greedy) = run(&m, &ids(&p["ids"]), 16);
                let what = format!("{name} with {changes:?}");
                let diff = fixtures::max_abs_diff(
                    &what,
                    &all[all.len() - vocab..],
                    &floats(&p["last_logits"]),
                );
                assert!(diff < LOGIT_TOL, "{what}: logits differ by {diff}");
                assert_eq!(greedy, ids(&p["greedy"]), "{what}: greedy tokens");
            }
        }
    }
}
