//! gpt-oss against Hugging Face `transformers` on the tiny checkpoint
//! `scripts/golden/tiny_gpt_oss.py` writes (`testdata/tiny/gpt_oss`:
//! attention sinks, alternating sliding/full layers, YaRN, 4 experts top-2
//! routed by a softmax over the chosen logits, router and expert biases,
//! the clamped SwiGLU, q/k/v/o biases): from its safetensors (experts
//! fused and interleaved as transformers keeps them), from the GGUF file
//! llama.cpp's converter would write for it (architecture `gpt-oss`, its
//! names and keys), and batched with other sequences bit for bit as alone;
//! its experts in MXFP4 (Hugging Face blocks/scales, GGUF type 39) and Q8_0
//! computed as stored, tracking the same values decoded to f32.

use std::path::{Path, PathBuf};

use kiln_backend::cpu::CpuBackend;
use kiln_model::config::DecoderConfig;
use kiln_model::decoder::Decoder;
use kiln_model::fixtures;
use kiln_model::goldens::{
    self, assert_batched_as_alone, assert_tracks_f32, floats, golden, golden_sequences, ids, run,
    tiny_dir as dir,
};
use kiln_model::quant::GgmlType;
use kiln_model::tiny_gguf;
use kiln_model::weights::WeightSource;
use kiln_model::{load, LoadOptions, LoadedModel};

const NAME: &str = "gpt_oss";

/// The model at `path` against `name`'s golden.json: last-position logits
/// within [`LOGIT_TOL`], every position's argmax (near ties aside) and the
/// greedy tokens equal.
fn check(name: &str, path: &Path, what: &str) {
    let m = load(&CpuBackend::new(), path, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{name} ({what}): {e}"));
    check_loaded(name, &m, what);
}

/// [`check`] on a model already loaded.
fn check_loaded(name: &str, m: &LoadedModel<CpuBackend>, what: &str) {
    let cfg = m.decoder.config();
    assert!(
        cfg.moe.is_some() && cfg.attn_sinks,
        "{name} ({what}): no experts or sinks"
    );
    goldens::check_loaded(name, m, what);
}

#[test]
fn gpt_oss_matches_transformers() {
    check(NAME, &dir(NAME), "safetensors");
}

/// The config.json reading: every layer sparse, top-2 then softmax, biases,
/// sinks, per-layer windows (layer 0 sliding 8, layer 1 full), the clamped
/// SwiGLU at the config's limit; the parameter count equals transformers'.
#[test]
fn config_reads_the_family_and_counts_transformers_parameters() {
    let cfg = DecoderConfig::from_hf_config(&dir(NAME).join("config.json")).unwrap();
    let m = cfg.moe.clone().expect("experts");
    assert_eq!((m.n_experts, m.n_experts_used, m.expert_ff), (4, 2, 32));
    assert_eq!(m.routing, kiln_model::moe::Routing::TopKThenSoftmax);
    assert!(m.router_bias && m.expert_bias && m.dense_layers.is_empty());
    assert!(cfg.attn_sinks && cfg.qkv_bias && cfg.out_bias);
    assert_eq!(cfg.sliding_window, None);
    assert_eq!(cfg.layer_attention(0).window, Some(8));
    assert_eq!(cfg.layer_attention(1).window, None);
    assert_eq!(
        cfg.activation,
        kiln_backend::Activation::ClampedSwiglu {
            alpha: 1.702,
            limit: 0.5
        }
    );
    assert_eq!(
        cfg.param_count(),
        golden(NAME)["n_params"].as_u64().unwrap()
    );
    assert!(cfg.active_param_count() < cfg.param_count());
}

/// How [`to_gguf`] stores the expert matrices.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Form {
    F32,
    /// Quantized: MXFP4 as llama.cpp's gpt-oss files (converted from
    /// OpenAI's), or Q8_0 as llama.cpp quantizes a bf16 gpt-oss.
    Experts(GgmlType),
    /// The values of [`Form::Experts`] decoded back to F32.
    ExpertsDecoded(GgmlType),
}

/// `data` (`cols` a row) in `ty`'s blocks.
fn quantize(ty: GgmlType, data: &[f32], cols: usize) -> Vec<u8> {
    match ty {
        GgmlType::MXFP4 => kiln_backend::quant::mxfp4::quantize(data, cols).expect("mxfp4"),
        _ => kiln_backend::quantize::quantize(ty, data, cols).expect("quantize"),
    }
}

/// Writes the tiny checkpoint as llama.cpp's `convert_hf_to_gguf.py`
/// (`GptOssModel`) lays out an unquantized gpt-oss: architecture `gpt-oss`,
/// `gpt-oss.*` keys (YaRN as `rope.scaling.*`, `attention.sliding_window`,
/// `expert_feed_forward_length`), the pre-FFN norm as
/// `blk.N.post_attention_norm`, `blk.N.attn_sinks.weight`, the router
/// `ffn_gate_inp` with its bias, and each layer's experts as 3-D
/// `ffn_{gate,up,down}_exps` (`[E, rows, cols]`, gate and up de-interleaved,
/// transposed to `[out, in]`) with `[E, rows]` biases. `form` says how the
/// expert matrices are stored. Checked once by hand: the file llama.cpp's
/// converter writes from this checkpoint (its pre-tokenizer check patched
/// to `gpt-2`, `--outtype f32`) has the same keys that kiln reads (plus
/// `yarn_beta_fast`/`yarn_beta_slow` at their defaults), the same tensors
/// bit for bit, reads to the same config and gives the same logits.
fn to_gguf(form: Form) -> PathBuf {
    let tag = format!("{form:?}").replace(['(', ')'], "-");
    tiny_gguf::gpt_oss(&dir(NAME), &tag, |w, name, shape, data| {
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let cols = *shape.last().unwrap();
        match form {
            Form::Experts(ty) => {
                w.tensor(name, dims, ty, quantize(ty, data, cols));
            }
            Form::ExpertsDecoded(ty) => {
                let q = quantize(ty, data, cols);
                let back = kiln_backend::quant::dequantize(ty, &q, data.len()).expect("dequantize");
                tiny_gguf::put_f32(w, name, shape, &back);
            }
            _ => tiny_gguf::put_f32(w, name, shape, data),
        }
    })
}

/// The GGUF form reads to the same configuration (experts, routing, YaRN
/// without truncation, windows, sinks, the clamped SwiGLU at llama.cpp's
/// fixed limit 7, which is not the tiny config's 0.5) and, with the
/// limit as the config has it, gives transformers' logits and tokens.
#[test]
fn gguf_form_matches_transformers() {
    let path = to_gguf(Form::F32);
    let g = kiln_model::gguf::GgufFile::open(&path).unwrap();
    let cfg = DecoderConfig::from_gguf(&g).unwrap();
    let hf = DecoderConfig::from_hf_config(&dir(NAME).join("config.json")).unwrap();
    assert_eq!(cfg.moe, hf.moe);
    assert_eq!(cfg.rope, hf.rope);
    assert_eq!(cfg.layer_attention, hf.layer_attention);
    assert_eq!(cfg.sliding_window, hf.sliding_window);
    assert_eq!(
        (cfg.attn_sinks, cfg.qkv_bias, cfg.out_bias),
        (hf.attn_sinks, hf.qkv_bias, hf.out_bias)
    );
    assert_eq!(cfg.param_count(), hf.param_count());
    // llama.cpp has no key for the SwiGLU limit: a GGUF gpt-oss runs at 7.
    assert_eq!(cfg.activation, kiln_model::gpt_oss::gguf_clamped_swiglu());
    assert_ne!(cfg.activation, hf.activation);
    let be = CpuBackend::new();
    // With the file's own limit the logits differ (the tiny model's 0.5 binds)...
    let m = load(&be, &path, &LoadOptions::default()).expect("gguf");
    let p = &golden(NAME)["prompts"][0];
    let prompt = ids(&p["ids"]);
    let (all, _) = run(&m, &prompt, 1);
    let vocab = hf.vocab_size;
    let diff = fixtures::max_abs_diff(
        "limit 7",
        &all[all.len() - vocab..],
        &floats(&p["last_logits"]),
    );
    assert!(diff > 1e-3, "the clamp limit made no difference ({diff})");
    // ...and with the config's limit, the GGUF weights give transformers' results.
    let mut cfg = cfg;
    cfg.activation = hf.activation;
    let src = kiln_model::gpt_oss::GgufNames { inner: g };
    let d = Decoder::load(&be, cfg, &src, 256).expect("decoder");
    let m = LoadedModel { decoder: d, ..m };
    check_loaded(NAME, &m, "GGUF");
    let _ = std::fs::remove_file(&path);
}

/// GGUF expert matrices in MXFP4 (llama.cpp's gpt-oss files) or Q8_0
/// stay quantized: their logits are close to, but not the bits of, the
/// same values decoded to f32 (kiln's kernels quantize the activations
/// too), and the argmaxes agree.
#[test]
fn quantized_gguf_experts_stay_quantized_and_track_their_f32_values() {
    let be = CpuBackend::new();
    for ty in [GgmlType::MXFP4, GgmlType::Q8_0] {
        let (q, decoded) = (
            to_gguf(Form::Experts(ty)),
            to_gguf(Form::ExpertsDecoded(ty)),
        );
        let g = kiln_model::gguf::GgufFile::open(&q).unwrap();
        assert_eq!(
            g.tensor_info("blk.0.ffn_gate_exps.weight")
                .unwrap()
                .ggml_type,
            ty
        );
        let mq = load(&be, &q, &LoadOptions::default()).unwrap();
        let mf = load(&be, &decoded, &LoadOptions::default()).unwrap();
        let _ = (std::fs::remove_file(&q), std::fs::remove_file(&decoded));
        let prompt = ids(&golden(NAME)["prompts"][2]["ids"]);
        let what = format!("{ty:?} experts");
        assert_tracks_f32(&be, &mq.decoder, &mf.decoder, &prompt, &what);
    }
}

/// A token's experts, window and sinks do not depend on the batch: each
/// sequence of a mixed run (prompts prefilled in chunks while others decode)
/// gets the same logits, bit for bit, as alone. The sequences run past the
/// sliding window of 8.
#[test]
fn mixed_batches_give_each_sequence_its_logits_alone_bit_for_bit() {
    let be = CpuBackend::new();
    let m = load(&be, &dir(NAME), &LoadOptions::default()).unwrap();
    let mut seqs = golden_sequences(&golden(NAME));
    seqs.push((
        13,
        b"Sinks, windows and experts per token"
            .map(u32::from)
            .to_vec(),
    ));
    assert!(seqs.iter().any(|s| s.1.len() > 8));
    assert_batched_as_alone(&be, &m.decoder, &seqs, NAME);
}

/// The tiny checkpoint's fused expert tensors (`gate_up_proj`
/// `[E, h, 2ff]`, `down_proj` `[E, ff, h]`) quantized to MXFP4 row by row of
/// their `[out, in]` transposes with kiln's quantizer, written twice into
/// copies of the checkpoint: as OpenAI publishes gpt-oss (`*_blocks`
/// `[E, out, in / 32, 16]`, two E2M1 codes a byte, element `2i` low;
/// `*_scales` `[E, out, in / 32]` E8M0 exponents) and as the same values
/// decoded back to f32 in transformers' layout. Returns (mxfp4, decoded).
fn mxfp4_copies() -> (tempfile::TempDir, tempfile::TempDir) {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let d = dir(NAME);
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (packed, decoded) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for t in [&packed, &decoded] {
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(d.join(f), t.path().join(f)).unwrap();
        }
    }
    // (name, dtype, shape, bytes) of each copy.
    type Entry = (String, Dtype, Vec<usize>, Vec<u8>);
    let (mut p_out, mut d_out): (Vec<Entry>, Vec<Entry>) = (Vec::new(), Vec::new());
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        if !(name.ends_with("experts.gate_up_proj") || name.ends_with("experts.down_proj")) {
            let e = (name, view.dtype(), shape, view.data().to_vec());
            p_out.push(e.clone());
            d_out.push(e);
            continue;
        }
        let vals: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let [e, inp, out] = shape[..] else {
            panic!("{name}: {shape:?}")
        };
        let groups = inp / 32;
        let (mut blocks, mut scales, mut back) = (Vec::new(), Vec::new(), vec![0f32; vals.len()]);
        for (x, b) in vals
            .chunks_exact(inp * out)
            .zip(back.chunks_exact_mut(inp * out))
        {
            // [in, out] -> [out, in] rows, quantized.
            let t: Vec<f32> = (0..out)
                .flat_map(|r| (0..inp).map(move |c| (r, c)))
                .map(|(r, c)| x[c * out + r])
                .collect();
            let q = kiln_backend::quant::mxfp4::quantize(&t, inp).unwrap();
            let deq = kiln_backend::quant::dequantize(GgmlType::MXFP4, &q, t.len()).unwrap();
            for r in 0..out {
                for c in 0..inp {
                    b[c * out + r] = deq[r * inp + c];
                }
            }
            // ggml's 17-byte block (exponent, element j low / j + 16 high
            // in byte j) to the checkpoint's pair.
            for blk in q.chunks_exact(17) {
                scales.push(blk[0]);
                let code = |t: usize| (blk[1 + t % 16] >> (4 * (t / 16))) & 0x0f;
                blocks.extend((0..16).map(|i| code(2 * i) | (code(2 * i + 1) << 4)));
            }
        }
        p_out.push((
            format!("{name}_blocks"),
            Dtype::U8,
            vec![e, out, groups, 16],
            blocks,
        ));
        p_out.push((
            format!("{name}_scales"),
            Dtype::U8,
            vec![e, out, groups],
            scales,
        ));
        let back = back.iter().flat_map(|v| v.to_le_bytes()).collect();
        d_out.push((name, Dtype::F32, shape, back));
    }
    for (dir, entries) in [(&packed, &p_out), (&decoded, &d_out)] {
        let views: Vec<(String, TensorView)> = entries
            .iter()
            .map(|(n, dt, s, b)| (n.clone(), TensorView::new(*dt, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    }
    (packed, decoded)
}

/// gpt-oss as OpenAI publishes it, experts in MXFP4 blocks/scales: they
/// load as ggml MXFP4 rows (gate and up rows separated, never widened to
/// floats) and are computed as stored: logits close to, but not the bits
/// of, the same values decoded to f32, argmaxes agreeing.
#[test]
fn mxfp4_hugging_face_experts_stay_mxfp4_and_track_their_f32_values() {
    let be = CpuBackend::new();
    let (packed, decoded) = mxfp4_copies();
    let src = kiln_model::loader::open_hf_weights(packed.path(), "gpt_oss").unwrap();
    for n in [
        "blk.0.ffn_gate_exps.weight",
        "blk.1.ffn_up_exps.weight",
        "blk.1.ffn_down_exps.weight",
    ] {
        let (shape, w) = src.get_weight(n).unwrap();
        assert!(
            matches!(
                w,
                kiln_backend::WeightData::Ggml {
                    ty: GgmlType::MXFP4,
                    ..
                }
            ),
            "{n} is not MXFP4"
        );
        // As floats, the MXFP4 rows are the decoded copy's values exactly.
        let want = kiln_model::loader::open_hf_weights(decoded.path(), "gpt_oss")
            .unwrap()
            .get(n)
            .unwrap();
        assert_eq!(shape, want.shape, "{n}");
        assert_eq!(src.get(n).unwrap(), want, "{n}");
    }
    let mq = load(&be, packed.path(), &LoadOptions::default()).unwrap();
    let mf = load(&be, decoded.path(), &LoadOptions::default()).unwrap();
    let prompt = ids(&golden(NAME)["prompts"][2]["ids"]);
    assert_tracks_f32(&be, &mq.decoder, &mf.decoder, &prompt, "MXFP4 experts");
}

/// A blocks/scales pair that does not fit its shape is refused, naming it.
#[test]
fn bad_mxfp4_expert_tensors_are_a_clear_error() {
    use safetensors::tensor::TensorView;
    let d = dir(NAME);
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(d.join(f), tmp.path().join(f)).unwrap();
    }
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let zeros = vec![0u8; 4 * 64 * 2 * 16];
    let mut views: Vec<(String, TensorView)> = Vec::new();
    for (name, view) in st.tensors() {
        if name.ends_with("experts.gate_up_proj") || name.ends_with("experts.down_proj") {
            // Scales of the wrong shape: one exponent short per row.
            let blocks =
                TensorView::new(safetensors::Dtype::U8, vec![4, 64, 2, 16], &zeros).unwrap();
            let scales =
                TensorView::new(safetensors::Dtype::U8, vec![4, 64, 1], &zeros[..256]).unwrap();
            views.push((format!("{name}_blocks"), blocks));
            views.push((format!("{name}_scales"), scales));
        } else {
            views.push((name, view));
        }
    }
    safetensors::serialize_to_file(views, None, &tmp.path().join("model.safetensors")).unwrap();
    let e = match load(&CpuBackend::new(), tmp.path(), &LoadOptions::default()) {
        Ok(_) => panic!("bad MXFP4 experts loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("gate_up_proj_blocks") && e.contains("scales"),
        "{e}"
    );
}

/// A gpt-oss prepared file (`kiln prepare`: the weights as the decoder
/// took them, under kiln's names, with the checkpoint's config carried)
/// answers as the model it was prepared from: from f32 safetensors with
/// `--quantize q8_0`, and from MXFP4 experts (safetensors pairs, or a
/// llama.cpp-named GGUF), which stay MXFP4 in it.
#[test]
fn gpt_oss_round_trips_through_its_prepared_file() {
    use kiln_model::prepared::{self, PreparedInfo, Settings, ARTIFACT_VERSION};
    let be = CpuBackend::new();
    let (packed, _decoded) = mxfp4_copies();
    let q8 = LoadOptions {
        quantize: Some(GgmlType::Q8_0),
        ..LoadOptions::default()
    };
    let plain = LoadOptions::default();
    let gguf = to_gguf(Form::Experts(GgmlType::MXFP4));
    for (src, opts, expert_type) in [
        (dir(NAME), &q8, GgmlType::Q8_0),
        (packed.path().to_path_buf(), &plain, GgmlType::MXFP4),
        (gguf.clone(), &plain, GgmlType::MXFP4),
    ] {
        let info = PreparedInfo {
            key: "0123abcd".into(),
            source: "/models/x".into(),
            identity: "[]".into(),
            settings: Settings::of(opts),
            artifact_version: ARTIFACT_VERSION,
        };
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("model.gguf");
        let prompt = ids(&golden(NAME)["prompts"][2]["ids"]);
        let (m, _) = prepared::load_and_prepare(
            &be,
            &src,
            opts,
            &info,
            &file,
            &kiln_model::layouts::Layouts::Off,
        )
        .unwrap();
        let (want, _) = fixtures::prefill(&be, &m.decoder, &prompt, 0).unwrap();
        let g = kiln_model::gguf::GgufFile::open(&file).unwrap();
        let types: Vec<GgmlType> = g
            .tensors
            .iter()
            .filter(|(n, _)| n.starts_with("blk.0.ffn_gate_exps") && !n.ends_with(".bias"))
            .map(|(_, t)| t.ggml_type)
            .collect();
        assert!(
            !types.is_empty() && types.iter().all(|&t| t == expert_type),
            "{types:?}"
        );
        let back = load(&be, &file, &prepared::as_prepared(opts)).unwrap();
        assert!(back.decoder.config().attn_sinks);
        let (got, _) = fixtures::prefill(&be, &back.decoder, &prompt, 0).unwrap();
        assert!(
            got == want,
            "{src:?}: the prepared file answers differently"
        );
    }
    let _ = std::fs::remove_file(&gguf);
}

/// A bf16 copy of the checkpoint (as the community's unquantized gpt-oss
/// uploads) keeps its experts in bf16 through the split (no f32 copy) and
/// answers bit for bit as the f32 checkpoint loaded with `--dtype bf16`.
#[test]
fn bf16_experts_stay_bf16_and_match_the_rounded_f32_model() {
    use safetensors::tensor::TensorView;
    let d = dir(NAME);
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(d.join(f), tmp.path().join(f)).unwrap();
    }
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let halves: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let b = v
                .data()
                .chunks_exact(4)
                .flat_map(|c| {
                    half::bf16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes()
                })
                .collect();
            (n, v.shape().to_vec(), b)
        })
        .collect();
    let views: Vec<(String, TensorView)> = halves
        .iter()
        .map(|(n, s, b)| {
            let v = TensorView::new(safetensors::Dtype::BF16, s.clone(), b).unwrap();
            (n.clone(), v)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &tmp.path().join("model.safetensors")).unwrap();
    let src = kiln_model::loader::open_hf_weights(tmp.path(), "gpt_oss").unwrap();
    let (shape, w) = src.get_weight("blk.1.ffn_gate_exps.weight").unwrap();
    assert_eq!(shape, [4, 32, 64]);
    assert!(
        matches!(
            w,
            kiln_backend::WeightData::Ggml {
                ty: GgmlType::BF16,
                ..
            }
        ),
        "the split experts are not bf16"
    );
    let be = CpuBackend::new();
    let m = load(&be, tmp.path(), &LoadOptions::default()).unwrap();
    let rounded = LoadOptions {
        dtype: kiln_model::WeightDtype::Bf16,
        ..LoadOptions::default()
    };
    let r = load(&be, &d, &rounded).unwrap();
    let prompt = ids(&golden(NAME)["prompts"][1]["ids"]);
    let (a, _) = fixtures::prefill(&be, &m.decoder, &prompt, 0).unwrap();
    let (b, _) = fixtures::prefill(&be, &r.decoder, &prompt, 0).unwrap();
    assert!(
        a == b,
        "the bf16 checkpoint and the f32 one rounded to bf16 differ"
    );
}
