//! LoRA adapters against transformers + peft, on the tiny adapters
//! `scripts/golden/tiny_lora.py` writes (`testdata/tiny/<model>/lora*/`):
//! kiln's logits with each adapter against peft's (unmerged) and the merged
//! model's, on safetensors and GGUF bases; a batch mixing three adapters and
//! the base gives each row the bits it gets alone; and every bad adapter is
//! refused with an error that says what is wrong.

use std::path::{Path, PathBuf};

use kiln_backend::cpu::CpuBackend;
use kiln_backend::StepInput;
use kiln_model::goldens::{argmax, floats, ids, run_plan_lora, tiny_dir, LOGIT_TOL};
use kiln_model::lora::{read_peft, LoraAdapter, LoraError, LoraLimits, LoraStep};
use kiln_model::{fixtures, load, LoadOptions, LoadedModel};
use serde_json::Value;

fn golden(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap()
}

fn adapter(m: &LoadedModel<CpuBackend>, dir: &Path) -> LoraAdapter<CpuBackend> {
    let host = read_peft(dir, m.decoder.config(), LoraLimits::default())
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    LoraAdapter::upload(&CpuBackend::new(), &host).unwrap()
}

/// Prefill with every position's logits, then greedy decoding, all rows on `a`.
fn run_lora(
    m: &LoadedModel<CpuBackend>,
    a: &LoraAdapter<CpuBackend>,
    prompt: &[u32],
    new_tokens: usize,
) -> (Vec<f32>, Vec<u32>) {
    let be = CpuBackend::new();
    let d = &m.decoder;
    let cfg = d.config();
    let spec = kiln_backend::KvSpec {
        n_layers: cfg.n_layers,
        num_blocks: (prompt.len() + new_tokens).div_ceil(fixtures::TEST_BLOCK_SIZE),
        block_size: fixtures::TEST_BLOCK_SIZE,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
    };
    let mut kv = kiln_backend::Backend::alloc_kv_cache(&be, &spec).unwrap();
    let mut step = StepInput::single_sequence(0, prompt, fixtures::TEST_BLOCK_SIZE);
    step.logit_rows = (0..prompt.len() as u32).collect();
    let all_rows = |n: usize| LoraStep::new(vec![(a, (0..n as u32).collect())]);
    let all = d
        .forward_lora(&be, &mut kv, &step, &all_rows(prompt.len()))
        .unwrap();
    let vocab = cfg.vocab_size;
    let mut next = argmax(&all[all.len() - vocab..]);
    let mut out = vec![next];
    for pos in prompt.len()..prompt.len() + new_tokens - 1 {
        let step = StepInput::single_sequence(pos, &[next], fixtures::TEST_BLOCK_SIZE);
        next = argmax(&d.forward_lora(&be, &mut kv, &step, &all_rows(1)).unwrap());
        out.push(next);
    }
    (all, out)
}

/// `m` with the adapter in `adapter_dir` against its golden.json.
fn check(m: &LoadedModel<CpuBackend>, adapter_dir: &Path, what: &str) {
    let a = adapter(m, adapter_dir);
    let g = golden(adapter_dir);
    let vocab = m.decoder.config().vocab_size;
    for (pi, p) in g["prompts"].as_array().unwrap().iter().enumerate() {
        let (all, greedy) = run_lora(m, &a, &ids(&p["ids"]), 16);
        let last = &all[all.len() - vocab..];
        for key in ["last_logits", "merged_last_logits"] {
            let diff =
                fixtures::max_abs_diff(&format!("{what} p{pi} {key}"), last, &floats(&p[key]));
            assert!(diff < LOGIT_TOL, "{what} p{pi}: {key} differ by {diff}");
        }
        let per_position: Vec<u32> = all.chunks_exact(vocab).map(argmax).collect();
        assert_eq!(per_position, ids(&p["argmax"]), "{what} p{pi}: argmax");
        assert_eq!(greedy, ids(&p["greedy"]), "{what} p{pi}: greedy");
    }
}

fn base(name: &str) -> LoadedModel<CpuBackend> {
    load(&CpuBackend::new(), &tiny_dir(name), &LoadOptions::default()).unwrap()
}

#[test]
fn llama_adapters_match_peft_and_the_merged_model() {
    let m = base("llama");
    for a in ["lora_a", "lora_b", "lora_c"] {
        check(&m, &tiny_dir("llama").join(a), &format!("llama/{a}"));
    }
}

#[test]
fn qwen3_phi3_and_gpt2_adapters_match_peft_and_the_merged_model() {
    // qwen3: q/k norms after the delta; phi3: fused qkv_proj and
    // gate_up_proj split by rows; gpt2: fused Conv1D c_attn.
    for name in ["qwen3", "phi3", "gpt2"] {
        check(
            &base(name),
            &tiny_dir(name).join("lora"),
            &format!("{name}/lora"),
        );
    }
}

/// The tiny checkpoint `name` as a GGUF file the way llama.cpp's converter
/// writes it: canonical names, llama's q/k rows permuted into the
/// interleaved rotary order, Phi-3's fused `attn_qkv` and double `ffn_up`.
fn to_gguf(name: &str) -> PathBuf {
    use kiln_model::gguf::{GgufWriter, Value as G};
    use kiln_model::tiny_gguf;
    use kiln_model::weights::{hf_llama_names, SafetensorsSource, WeightSource};
    let d = tiny_dir(name);
    let cfg = kiln_model::config::DecoderConfig::from_hf_config(&d.join("config.json")).unwrap();
    let src = SafetensorsSource::open_dir(&d, hf_llama_names).unwrap();
    let mut w = GgufWriter::default();
    tiny_gguf::write_hparams(&mut w, name, &cfg);
    tiny_gguf::write_rope(&mut w, name, &cfg);
    if name == "phi3" {
        w.meta(&format!("{name}.attention.sliding_window"), G::U32(0));
    }
    tiny_gguf::write_gpt2_vocab(&mut w, &d, cfg.vocab_size);
    let mut names = vec![
        "token_embd.weight".to_string(),
        "output_norm.weight".to_string(),
    ];
    if src.contains("output.weight") {
        names.push("output.weight".into());
    }
    for l in 0..cfg.n_layers {
        for p in [
            "attn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_qkv.weight",
            "attn_q_norm.weight",
            "attn_k_norm.weight",
            "attn_output.weight",
            "ffn_norm.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_gate_up.weight",
            "ffn_down.weight",
        ] {
            let n = format!("blk.{l}.{p}");
            if src.contains(&n) {
                names.push(n);
            }
        }
    }
    for n in names {
        let t = src.get(&n).unwrap();
        let heads = if n.ends_with("attn_q.weight") {
            cfg.n_heads
        } else {
            cfg.n_kv_heads
        };
        let data =
            if name == "llama" && (n.ends_with("attn_q.weight") || n.ends_with("attn_k.weight")) {
                // convert_hf_to_gguf.py's permute: each head's halves interleaved.
                tiny_gguf::permute_qk_rows(&t.data, heads, t.shape[1])
            } else {
                t.data
            };
        tiny_gguf::put_f32(&mut w, &n.replace("ffn_gate_up", "ffn_up"), &t.shape, &data);
    }
    tiny_gguf::write_temp(&w, &format!("lora-{name}"))
}

#[test]
fn gguf_bases_take_the_same_adapters() {
    // llama's GGUF q/k rows are permuted (interleaved rotary), so the
    // adapter's q/k B rows must be permuted the same way to line up.
    for (name, a) in [("llama", "lora_b"), ("qwen3", "lora"), ("phi3", "lora")] {
        let path = to_gguf(name);
        let m = load(&CpuBackend::new(), &path, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let _ = std::fs::remove_file(&path);
        check(&m, &tiny_dir(name).join(a), &format!("{name} (GGUF)/{a}"));
    }
}

#[test]
fn a_batch_mixing_three_adapters_and_the_base_gives_each_row_what_it_gets_alone() {
    let m = base("llama");
    let dir = tiny_dir("llama");
    let adapters: Vec<LoraAdapter<CpuBackend>> = ["lora_a", "lora_b", "lora_c"]
        .iter()
        .map(|a| adapter(&m, &dir.join(a)))
        .collect();
    let be = CpuBackend::new();
    let seqs: Vec<Vec<u32>> = [
        &b"Kiln fires clay"[..],
        b"The cat sat",
        b"tiny",
        b"models test",
    ]
    .iter()
    .map(|s| s.iter().map(|&b| b as u32).collect())
    .collect();
    // Sequence 0 on the base, 1..3 on the three adapters.
    let per_seq: Vec<Option<&LoraAdapter<CpuBackend>>> = vec![
        None,
        Some(&adapters[0]),
        Some(&adapters[1]),
        Some(&adapters[2]),
    ];
    // Mixed: chunked prefills and decodes of all four in the same steps.
    let plan: Vec<Vec<usize>> = vec![
        vec![5, 3, 2, 4],
        vec![5, 4, 1, 3],
        vec![5, 2, 1, 2],
        vec![0, 2, 0, 2],
    ];
    let mixed = run_plan_lora(&be, &m.decoder, &seqs, &plan, &per_seq);
    for (i, s) in seqs.iter().enumerate() {
        let alone_plan: Vec<Vec<usize>> = plan
            .iter()
            .map(|p| vec![p[i]])
            .filter(|p| p[0] > 0)
            .collect();
        let alone = run_plan_lora(
            &be,
            &m.decoder,
            std::slice::from_ref(s),
            &alone_plan,
            &[per_seq[i]],
        );
        assert_eq!(mixed[i].len(), alone[0].len());
        assert!(
            mixed[i]
                .iter()
                .zip(&alone[0])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "sequence {i}: logits in the mixed batch differ from alone"
        );
    }
    // And the adapters do change the rows: each differs from the base.
    let base_runs: Vec<Vec<f32>> = seqs
        .iter()
        .map(|s| {
            run_plan_lora(
                &be,
                &m.decoder,
                std::slice::from_ref(s),
                &[vec![s.len()]],
                &[None],
            )
            .remove(0)
        })
        .collect();
    assert_eq!(mixed[0], base_runs[0]);
    for i in 1..4 {
        assert_ne!(mixed[i], base_runs[i], "adapter {i} changed nothing");
    }
}

/// A scratch adapter directory holding `config` and `tensors` (name, shape, values).
fn scratch(config: &str, tensors: &[(&str, Vec<usize>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("adapter_config.json"), config).unwrap();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s)| {
            (
                n.to_string(),
                s.clone(),
                vec![0u8; 4 * s.iter().product::<usize>()],
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("adapter_model.safetensors"))
        .unwrap();
    dir
}

const Q_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const Q_B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

fn err(dir: &Path, max_rank: usize) -> LoraError {
    let m = base("llama");
    match read_peft(dir, m.decoder.config(), LoraLimits { max_rank }) {
        Ok(_) => panic!("{}: accepted", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn bad_adapters_are_refused_with_clear_errors() {
    let cfg = r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"]}"#;
    let ok = [(Q_A, vec![4, 64]), (Q_B, vec![64, 4])];

    // Missing directory and missing weights.
    let e = err(Path::new("/nonexistent/adapter"), 16);
    assert!(matches!(e, LoraError::Missing { .. }), "{e}");
    assert!(e.to_string().contains("adapter_config.json"), "{e}");
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("adapter_config.json"), cfg).unwrap();
    let e = err(d.path(), 16);
    assert!(
        e.to_string()
            .contains("adapter_model.safetensors: not found"),
        "{e}"
    );

    // Malformed config and weights.
    let e = err(scratch("{not json", &ok).path(), 16);
    assert!(
        matches!(e, LoraError::Malformed { .. }) && e.to_string().contains("not valid JSON"),
        "{e}"
    );
    let d = scratch(cfg, &ok);
    std::fs::write(
        d.path().join("adapter_model.safetensors"),
        b"\x10\0\0\0\0\0\0\0garbage",
    )
    .unwrap();
    let e = err(d.path(), 16);
    assert!(
        e.to_string().contains("not a valid safetensors file"),
        "{e}"
    );
    let e = err(scratch(cfg, &[(Q_A, vec![4, 64])]).path(), 16);
    assert!(
        e.to_string().contains("needs both lora_A and lora_B"),
        "{e}"
    );

    // Rank above max_lora_rank.
    let e = err(scratch(cfg, &ok).path(), 2);
    assert!(
        matches!(
            e,
            LoraError::RankTooLarge {
                rank: 4,
                max: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().ends_with("rank 4 exceeds max_lora_rank 2"),
        "{e}"
    );

    // A target module the model does not have (phi3's fused names on llama).
    let e = err(&tiny_dir("phi3").join("lora"), 16);
    assert!(
        e.to_string()
            .contains("target module 'qkv_proj' does not exist in this llama model"),
        "{e}"
    );
    let e = err(&tiny_dir("gpt2").join("lora"), 16);
    assert!(matches!(e, LoraError::UnknownTarget { .. }), "{e}");

    // Shapes that do not fit: an adapter for a wider model, or more layers.
    let e = err(
        scratch(cfg, &[(Q_A, vec![4, 96]), (Q_B, vec![64, 4])]).path(),
        16,
    );
    assert!(
        e.to_string()
            .contains("has shape [4, 96], but the base model implies [4, 64]"),
        "{e}"
    );
    let deep_a = Q_A.replace("layers.0", "layers.7");
    let deep_b = Q_B.replace("layers.0", "layers.7");
    let e = err(
        scratch(cfg, &[(&deep_a, vec![4, 64]), (&deep_b, vec![64, 4])]).path(),
        16,
    );
    assert!(
        e.to_string()
            .contains("does not exist in this 2-layer llama model"),
        "{e}"
    );

    // What kiln does not adapt.
    let head = r#"{"r":4,"lora_alpha":8,"target_modules":["lm_head"]}"#;
    let e = err(scratch(head, &ok).path(), 16);
    assert!(
        e.to_string()
            .contains("target module 'lm_head' is not supported"),
        "{e}"
    );
    let dora = r#"{"r":4,"lora_alpha":8,"use_dora":true}"#;
    assert!(err(scratch(dora, &ok).path(), 16)
        .to_string()
        .contains("DoRA"));
    let wrong_rank = r#"{"r":8,"lora_alpha":8}"#;
    let e = err(scratch(wrong_rank, &ok).path(), 16);
    assert!(
        e.to_string()
            .contains("has rank 4, but adapter_config.json gives 8"),
        "{e}"
    );
}
