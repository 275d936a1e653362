//! LoRA adapters on gpt-oss against transformers + peft, on the tiny
//! adapters `scripts/golden/tiny_lora_gpt_oss.py` writes
//! (`testdata/tiny/gpt_oss/lora*/`): attention only, attention with the
//! router and the experts (PEFT's `target_parameters` on the transposed,
//! gate/up-interleaved `gate_up_proj` and on `down_proj`), and the router
//! and experts alone. kiln's logits with each adapter match peft's
//! (unmerged) and the merged model's; the experts' deltas land before the
//! biases and the clamped SwiGLU; a batch mixing the adapters and the base
//! gives each row the bits it gets alone; and names gpt-oss does not have
//! are refused.

use kiln_backend::cpu::CpuBackend;
use kiln_model::goldens::{assert_lora_batch_invariant, check_lora, lora_adapter, tiny_dir};
use kiln_model::lora::{read_peft, ExpertPart, LoraAdapter, LoraLimits, Proj};
use kiln_model::{load, LoadOptions, LoadedModel};

const ADAPTERS: [&str; 3] = ["lora_attn", "lora", "lora_experts"];

fn base() -> LoadedModel<CpuBackend> {
    load(
        &CpuBackend::new(),
        &tiny_dir("gpt_oss"),
        &LoadOptions::default(),
    )
    .unwrap()
}

fn adapter(m: &LoadedModel<CpuBackend>, name: &str) -> LoraAdapter<CpuBackend> {
    lora_adapter(m, &tiny_dir("gpt_oss").join(name))
}

#[test]
fn gpt_oss_adapters_match_peft_and_the_merged_model() {
    let m = base();
    for name in ADAPTERS {
        check_lora(
            &m,
            &tiny_dir("gpt_oss").join(name),
            &format!("gpt_oss/{name}"),
        );
    }
}

/// The same adapters on the GGUF form of the base (llama.cpp's layout:
/// gate and up de-interleaved into separate 3-D expert tensors, q/k rows
/// in the checkpoint's order) give peft's logits and greedy tokens too.
/// (llama.cpp has no key for the clamped SwiGLU's limit, so a GGUF
/// gpt-oss runs at its fixed 7; the base is loaded with the tiny config's
/// 0.5, as `tests/gpt_oss.rs` checks the GGUF base itself.)
#[test]
fn gpt_oss_gguf_bases_take_the_same_adapters() {
    let path = kiln_model::tiny_gguf::gpt_oss(&tiny_dir("gpt_oss"), "lora", |w, n, shape, data| {
        kiln_model::tiny_gguf::put_f32(w, n, shape, data)
    });
    let be = CpuBackend::new();
    let hf = base();
    let file = kiln_model::gguf::GgufFile::open(&path).unwrap();
    let mut cfg = kiln_model::config::DecoderConfig::from_gguf(&file).unwrap();
    cfg.activation = hf.decoder.config().activation;
    let src = kiln_model::gpt_oss::GgufNames { inner: file };
    let d = kiln_model::decoder::Decoder::load(&be, cfg, &src, 256).unwrap();
    let m = LoadedModel { decoder: d, ..hf };
    let _ = std::fs::remove_file(&path);
    for name in ADAPTERS {
        check_lora(
            &m,
            &tiny_dir("gpt_oss").join(name),
            &format!("gpt_oss/{name} on GGUF"),
        );
    }
}

#[test]
fn gpt_oss_expert_deltas_are_read_with_gate_and_up_interleaved() {
    // lora_experts: r 2, rsLoRA alpha 6; 4 experts, hidden 64, ff 32.
    let m = base();
    let cfg = m.decoder.config();
    let dir = tiny_dir("gpt_oss").join("lora_experts");
    let host = read_peft(&dir, cfg, LoraLimits::default()).unwrap();
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |name: &str| -> Vec<f32> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let (n, r, h, ff) = (4, 2, 64, 32);
    let scale = (6.0 / 2f64.sqrt()) as f32;
    for layer in 0..cfg.n_layers {
        let pre = format!("base_model.model.model.layers.{layer}.mlp");
        // The outer wrapper is the first target parameter after the router,
        // gate_up_proj, whose (in, out) is (hidden, 2 * ff); the nested one down_proj.
        let (gu_a, gu_b) = (
            f32s(&format!("{pre}.experts.base_layer.lora_A.weight")),
            f32s(&format!("{pre}.experts.base_layer.lora_B.weight")),
        );
        let (d_a, d_b) = (
            f32s(&format!("{pre}.experts.lora_A.weight")),
            f32s(&format!("{pre}.experts.lora_B.weight")),
        );
        for e in 0..n {
            let gate = host.expert(layer, e, ExpertPart::Gate).unwrap();
            let up = host.expert(layer, e, ExpertPart::Up).unwrap();
            let down = host.expert(layer, e, ExpertPart::Down).unwrap();
            assert_eq!((gate.out_dim, gate.in_dim, gate.rank), (ff, h, r));
            assert_eq!((down.out_dim, down.in_dim, down.rank), (h, ff, r));
            assert_eq!(gate.scale, scale);
            assert_eq!(gate.a, gu_a[e * r * h..(e + 1) * r * h]);
            assert_eq!(up.a, gate.a);
            assert_eq!(down.a, d_a[e * r * ff..(e + 1) * r * ff]);
            for j in 0..ff {
                for k in 0..r {
                    // lora_B [2 * ff, n * r]: expert e's column k is k * n + e.
                    let col = k * n + e;
                    assert_eq!(gate.b[j * r + k], gu_b[(2 * j) * n * r + col]);
                    assert_eq!(up.b[j * r + k], gu_b[(2 * j + 1) * n * r + col]);
                }
            }
            for o in 0..h {
                for k in 0..r {
                    assert_eq!(down.b[o * r + k], d_b[o * n * r + k * n + e]);
                }
            }
        }
        let router = host.get(layer, Proj::Router).unwrap();
        assert_eq!((router.out_dim, router.in_dim), (n, h));
        assert_eq!(router.a, f32s(&format!("{pre}.router.lora_A.weight")));
    }
}

#[test]
fn gpt_oss_batches_mixing_adapters_and_the_base_give_each_row_what_it_gets_alone() {
    // Four sequences in chunked prefills and decodes sharing every step, then
    // each alone: the same bits both ways; adapted rows differ from the base.
    let m = base();
    let (attn, all, experts) = (
        adapter(&m, "lora_attn"),
        adapter(&m, "lora"),
        adapter(&m, "lora_experts"),
    );
    assert_lora_batch_invariant(&m, &[Some(&all), None, Some(&experts), Some(&attn)]);
}

#[test]
fn gpt_oss_names_it_does_not_have_are_refused() {
    let m = base();
    let refused = |config: &str, tensors: &[(&str, Vec<usize>)]| -> String {
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
                let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
                (n.clone(), v.unwrap())
            })
            .collect();
        let path = dir.path().join("adapter_model.safetensors");
        safetensors::serialize_to_file(views, None, &path).unwrap();
        match read_peft(dir.path(), m.decoder.config(), LoraLimits::default()) {
            Ok(_) => panic!("{config}: accepted"),
            Err(e) => e.to_string(),
        }
    };
    let pre = "base_model.model.model.layers.0.mlp";
    // Mixtral's router name is not gpt-oss's.
    let e = refused(
        r#"{"r":2,"lora_alpha":4,"target_parameters":["mlp.gate.weight"]}"#,
        &[],
    );
    assert!(
        e.contains("target parameter 'mlp.gate.weight' on this gpt_oss model is not supported"),
        "{e}"
    );
    let (a, b) = (
        format!("{pre}.gate.lora_A.weight"),
        format!("{pre}.gate.lora_B.weight"),
    );
    let e = refused(
        r#"{"r":2,"lora_alpha":4}"#,
        &[(&a, vec![2, 64]), (&b, vec![4, 2])],
    );
    assert!(
        e.contains("target module 'mlp.gate' does not exist in this 4-expert gpt_oss model"),
        "{e}"
    );
    // Per-expert modules (transformers never split gpt-oss's experts).
    let (a, b) = (
        format!("{pre}.experts.1.gate_proj.lora_A.weight"),
        format!("{pre}.experts.1.gate_proj.lora_B.weight"),
    );
    let e = refused(
        r#"{"r":2,"lora_alpha":4}"#,
        &[(&a, vec![2, 64]), (&b, vec![32, 2])],
    );
    assert!(
        e.contains(
            "target module 'mlp.experts.1.gate_proj' does not exist in this 4-expert gpt_oss model"
        ),
        "{e}"
    );
    // Fused expert matrices of another size.
    let (a, b) = (
        format!("{pre}.experts.lora_A.weight"),
        format!("{pre}.experts.lora_B.weight"),
    );
    let e = refused(
        r#"{"r":2,"lora_alpha":4}"#,
        &[(&a, vec![8, 48]), (&b, vec![64, 8])],
    );
    assert!(
        e.contains("experts.lora_A.weight' has shape [8, 48], but the base model implies [8, 64]"),
        "{e}"
    );
}
