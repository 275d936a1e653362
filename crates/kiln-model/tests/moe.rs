//! Mixture-of-experts models (Qwen3-MoE, Mixtral, Qwen2-MoE with its shared
//! expert) against Hugging Face `transformers`, on the tiny checkpoints
//! `scripts/golden/tiny_moe.py` writes (`testdata/tiny/{qwen3moe,mixtral,qwen2moe}`):
//! from safetensors, from GGUF files written from them (3-D expert tensors,
//! llama.cpp's names and keys), from a Q8_0 GGUF whose experts stay
//! quantized, and batched with other sequences bit for bit as alone.

use std::path::{Path, PathBuf};

use kiln_backend::cpu::CpuBackend;
use kiln_backend::Backend;
use kiln_model::config::DecoderConfig;
use kiln_model::fixtures;
use kiln_model::gguf::{GgufWriter, Value as G};
use kiln_model::goldens::{
    assert_batched_as_alone, assert_tracks_f32, check_loaded, golden, golden_sequences, ids,
    tiny_dir as dir,
};
use kiln_model::quant::GgmlType;
use kiln_model::tiny_gguf::{self, permute_qk_rows};
use kiln_model::weights::{SafetensorsSource, WeightSource};
use kiln_model::{load, LoadOptions};

const MODELS: [&str; 3] = ["qwen3moe", "mixtral", "qwen2moe"];

/// The model at `path` against `name`'s golden.json: last-position logits
/// within [`LOGIT_TOL`], every position's argmax (near ties aside) and the
/// greedy tokens equal.
fn check(name: &str, path: &Path, what: &str) {
    let m = load(&CpuBackend::new(), path, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{name} ({what}): {e}"));
    assert!(
        m.decoder.config().moe.is_some(),
        "{name} ({what}): no experts"
    );
    check_loaded(name, &m, what);
}

#[test]
fn qwen3_moe_with_renormalised_top_k_matches_transformers() {
    let cfg = DecoderConfig::from_hf_config(&dir("qwen3moe").join("config.json")).unwrap();
    let moe = cfg.moe.as_ref().expect("experts");
    assert_eq!(
        (moe.n_experts, moe.n_experts_used, moe.expert_ff),
        (8, 2, 32)
    );
    assert_eq!(
        moe.routing,
        kiln_model::moe::Routing::SoftmaxTopK { renormalize: true }
    );
    check("qwen3moe", &dir("qwen3moe"), "safetensors");
}

#[test]
fn mixtral_matches_transformers() {
    check("mixtral", &dir("mixtral"), "safetensors");
}

#[test]
fn qwen2_moe_with_a_gated_shared_expert_matches_transformers() {
    let cfg = DecoderConfig::from_hf_config(&dir("qwen2moe").join("config.json")).unwrap();
    let moe = cfg.moe.as_ref().expect("experts");
    assert_eq!(moe.shared_expert_ff, Some(48));
    assert!(moe.shared_expert_gate);
    assert_eq!(
        moe.routing,
        kiln_model::moe::Routing::SoftmaxTopK { renormalize: false }
    );
    check("qwen2moe", &dir("qwen2moe"), "safetensors");
}

/// Parameter counts: all of the file's tensors, and of them what one token reads.
#[test]
fn parameter_counts_include_every_expert_and_active_counts_the_top_k() {
    for name in MODELS {
        let cfg = DecoderConfig::from_hf_config(&dir(name).join("config.json")).unwrap();
        let g = golden(name);
        assert_eq!(cfg.param_count(), g["n_params"].as_u64().unwrap(), "{name}");
        let m = cfg.moe.as_ref().unwrap();
        let per_expert = 3 * cfg.hidden_size * m.expert_ff;
        let unused = cfg.n_layers * (m.n_experts - m.n_experts_used) * per_expert;
        assert_eq!(
            cfg.param_count() - cfg.active_param_count(),
            unused as u64,
            "{name}"
        );
    }
}

/// How the GGUF file stores its matrices.
#[derive(Clone, Copy, PartialEq)]
enum Form {
    F32,
    /// Every expert tensor Q8_0 (the rest F32).
    ExpertsQ8,
    /// The values of [`Form::ExpertsQ8`] decoded back to F32.
    ExpertsQ8Decoded,
    /// Every matrix Q8_0 but the routers (what `--quantize q8_0` makes of it).
    AllQ8,
    /// F32, each expert its own 2-D `blk.N.ffn_gate.E.weight` (older
    /// llama.cpp Mixtral files).
    PerExpert,
}

/// Writes tiny `name` as a GGUF file the way llama.cpp's converter lays it
/// out: architecture `qwen3moe`/`qwen2moe`, or `llama` with
/// `llama.expert_count` for Mixtral (q/k rows permuted); each layer's
/// experts stacked into 3-D `ffn_{gate,up,down}_exps` (`[E, rows, cols]`),
/// the router `ffn_gate_inp`, Qwen2-MoE's shared expert `ffn_*_shexp` and
/// its gate `ffn_gate_inp_shexp` (1-D here; llama.cpp's converter writes it
/// `[1, hidden]`, which loads too). Checked once by hand against the files
/// llama.cpp's `convert_hf_to_gguf.py` wrote for these checkpoints (same
/// names, shapes and keys; those files give the golden logits within 2e-6).
fn to_gguf(name: &str, form: Form) -> PathBuf {
    let d = dir(name);
    let cfg = DecoderConfig::from_hf_config(&d.join("config.json")).expect("config");
    let moe = cfg.moe.clone().expect("experts");
    let src = SafetensorsSource::open_dir(&d, kiln_model::weights::hf_names(&cfg.arch))
        .expect("safetensors");
    let arch = match name {
        "mixtral" => "llama",
        other => other,
    };
    let mut w = GgufWriter::default();
    let u = |v: usize| G::U32(v as u32);
    let key = |k: &str| format!("{arch}.{k}");
    tiny_gguf::write_hparams(&mut w, arch, &cfg);
    tiny_gguf::write_rope(&mut w, arch, &cfg);
    w.meta(&key("expert_count"), u(moe.n_experts))
        .meta(&key("expert_used_count"), u(moe.n_experts_used));
    if arch != "llama" {
        w.meta(&key("expert_feed_forward_length"), u(moe.expert_ff));
    }
    if let Some(s) = moe.shared_expert_ff {
        w.meta(&key("expert_shared_feed_forward_length"), u(s));
    }
    tiny_gguf::write_gpt2_vocab(&mut w, &d, cfg.vocab_size);
    // (GGUF name, row-major shape, values, quantizable expert tensor)
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>, bool)> = Vec::new();
    let plain = |n: &str, tensors: &mut Vec<(String, Vec<usize>, Vec<f32>, bool)>| {
        let t = src.get(n).expect(n);
        let data = match (arch, n.rsplit('.').nth(1)) {
            ("llama", Some("attn_q")) => permute_qk_rows(&t.data, cfg.n_heads, cfg.hidden_size),
            ("llama", Some("attn_k")) => permute_qk_rows(&t.data, cfg.n_kv_heads, cfg.hidden_size),
            _ => t.data,
        };
        tensors.push((n.to_string(), t.shape, data, false));
    };
    for n in ["token_embd.weight", "output_norm.weight", "output.weight"] {
        plain(n, &mut tensors);
    }
    for l in 0..cfg.n_layers {
        for p in [
            "attn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_q.bias",
            "attn_k.bias",
            "attn_v.bias",
            "attn_q_norm.weight",
            "attn_k_norm.weight",
            "attn_output.weight",
            "ffn_norm.weight",
            "ffn_gate_inp.weight",
            "ffn_gate_shexp.weight",
            "ffn_up_shexp.weight",
            "ffn_down_shexp.weight",
        ] {
            let n = format!("blk.{l}.{p}");
            if src.contains(&n) {
                plain(&n, &mut tensors);
            }
        }
        let gate = format!("blk.{l}.ffn_gate_inp_shexp.weight");
        if src.contains(&gate) {
            let t = src.get(&gate).unwrap();
            tensors.push((gate, vec![cfg.hidden_size], t.data, false));
        }
        for part in ["ffn_gate", "ffn_up", "ffn_down"] {
            if form == Form::PerExpert {
                for e in 0..moe.n_experts {
                    plain(&format!("blk.{l}.{part}.{e}.weight"), &mut tensors);
                }
                continue;
            }
            let mut data = Vec::new();
            let mut shape = Vec::new();
            for e in 0..moe.n_experts {
                let t = src.get(&format!("blk.{l}.{part}.{e}.weight")).unwrap();
                shape = t.shape;
                data.extend(t.data);
            }
            shape.insert(0, moe.n_experts);
            tensors.push((format!("blk.{l}.{part}_exps.weight"), shape, data, true));
        }
    }
    for (n, shape, data, expert) in tensors {
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let cols = *shape.last().unwrap();
        let q8 = || kiln_backend::quantize::quantize(GgmlType::Q8_0, &data, cols).expect("q8_0");
        let router = n.contains("ffn_gate_inp");
        match form {
            Form::AllQ8 if shape.len() >= 2 && !router && cols % 32 == 0 => {
                w.tensor(&n, dims, GgmlType::Q8_0, q8());
            }
            Form::ExpertsQ8 if expert => {
                w.tensor(&n, dims, GgmlType::Q8_0, q8());
            }
            Form::ExpertsQ8Decoded if expert => {
                let back =
                    kiln_backend::quant::dequantize(GgmlType::Q8_0, &q8(), data.len()).unwrap();
                tiny_gguf::put_f32(&mut w, &n, &shape, &back);
            }
            _ => tiny_gguf::put_f32(&mut w, &n, &shape, &data),
        }
    }
    let tag = match form {
        Form::F32 => "f32",
        Form::ExpertsQ8 => "q8",
        Form::ExpertsQ8Decoded => "q8f32",
        Form::AllQ8 => "allq8",
        Form::PerExpert => "per-expert",
    };
    tiny_gguf::write_temp(&w, &format!("moe-{name}-{tag}"))
}

#[test]
fn gguf_forms_with_3d_expert_tensors_match_transformers() {
    for name in MODELS {
        let path = to_gguf(name, Form::F32);
        let g = kiln_model::gguf::GgufFile::open(&path).unwrap();
        let cfg = DecoderConfig::from_gguf(&g).unwrap();
        let hf = DecoderConfig::from_hf_config(&dir(name).join("config.json")).unwrap();
        assert_eq!(
            cfg.moe, hf.moe,
            "{name}: GGUF and config.json expert settings"
        );
        assert_eq!(cfg.param_count(), hf.param_count(), "{name}");
        check(name, &path, "GGUF");
        let _ = std::fs::remove_file(&path);
    }
    let path = to_gguf("mixtral", Form::PerExpert);
    check("mixtral", &path, "GGUF, one tensor per expert");
    let _ = std::fs::remove_file(&path);
}

/// Q8_0 experts load as the 3-D quantized tensors split into each expert's
/// row band, and are computed quantized: the logits are close to, but not
/// the same bits as, the same values decoded to f32 (kiln's Q8_0 kernels
/// quantize the activations too, which an f32 copy would not).
#[test]
fn q8_0_experts_stay_quantized_and_track_the_f32_model() {
    let be = CpuBackend::new();
    for name in MODELS {
        let q8 = to_gguf(name, Form::ExpertsQ8);
        let decoded = to_gguf(name, Form::ExpertsQ8Decoded);
        let g = kiln_model::gguf::GgufFile::open(&q8).unwrap();
        assert_eq!(
            g.tensor_info("blk.0.ffn_down_exps.weight")
                .unwrap()
                .ggml_type,
            GgmlType::Q8_0
        );
        let mq = load(&be, &q8, &LoadOptions::default()).unwrap();
        let mf = load(&be, &decoded, &LoadOptions::default()).unwrap();
        let _ = (std::fs::remove_file(&q8), std::fs::remove_file(&decoded));
        let prompt = ids(&golden(name)["prompts"][2]["ids"]);
        let what = format!("{name} Q8_0 experts");
        assert_tracks_f32(&be, &mq.decoder, &mf.decoder, &prompt, &what);
    }
}

/// A token's experts and result do not depend on the batch: each sequence
/// of a mixed run (prompts of different lengths prefilled in chunks while
/// others decode, one token a step) gets the same logits, bit for bit, as
/// when it runs alone with its prompt in one step.
#[test]
fn mixed_batches_give_each_sequence_its_logits_alone_bit_for_bit() {
    let be = CpuBackend::new();
    for name in MODELS {
        let m = load(&be, &dir(name), &LoadOptions::default()).unwrap();
        // Each golden prompt followed by its greedy tokens, plus one more prompt.
        let mut seqs = golden_sequences(&golden(name));
        seqs.push((
            13,
            b"Mixture of experts, routed per token"
                .map(u32::from)
                .to_vec(),
        ));
        assert_batched_as_alone(&be, &m.decoder, &seqs, name);
    }
}

/// Copies tiny `name` into a temporary directory with its experts the way
/// transformers 5 holds them in memory: fused 3-D `mlp.experts.gate_up_proj`
/// (`[E, 2 * ff, hidden]`, each expert's gate rows then its up rows) and
/// `mlp.experts.down_proj` (`[E, hidden, ff]`), Mixtral's modules under
/// `mlp.` rather than `block_sparse_moe.`.
/// (Checked once by hand: these tensors equal the `state_dict()` of the
/// checkpoints loaded with transformers 5.24.)
fn fused_copy(name: &str) -> PathBuf {
    use safetensors::tensor::TensorView;
    use safetensors::{Dtype, SafeTensors};
    let d = dir(name);
    let out = std::env::temp_dir().join(format!("kiln-moe-fused-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(d.join(f), out.join(f)).unwrap();
    }
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (gate, up, down) = if name == "mixtral" {
        ("w1", "w3", "w2")
    } else {
        ("gate_proj", "up_proj", "down_proj")
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut layers = std::collections::BTreeMap::<usize, ()>::new();
    for (n, t) in st.tensors() {
        if n.contains(".experts.") {
            let l: usize = n.split('.').nth(2).unwrap().parse().unwrap();
            layers.insert(l, ());
            continue;
        }
        let n = n.replace(".block_sparse_moe.", ".mlp.");
        tensors.push((n, t.shape().to_vec(), t.data().to_vec()));
    }
    let block = if name == "mixtral" {
        "block_sparse_moe"
    } else {
        "mlp"
    };
    for &l in layers.keys() {
        let get = |e: usize, p: &str| {
            st.tensor(&format!("model.layers.{l}.{block}.experts.{e}.{p}.weight"))
                .map(|t| (t.shape().to_vec(), t.data().to_vec()))
        };
        let (mut gate_up, mut downs, mut e) = (Vec::new(), Vec::new(), 0);
        let (mut ff, mut h) = (0, 0);
        while let Ok((shape, g)) = get(e, gate) {
            (ff, h) = (shape[0], shape[1]);
            gate_up.extend(g);
            gate_up.extend(get(e, up).unwrap().1);
            downs.extend(get(e, down).unwrap().1);
            e += 1;
        }
        let p = format!("model.layers.{l}.mlp.experts");
        tensors.push((format!("{p}.gate_up_proj"), vec![e, 2 * ff, h], gate_up));
        tensors.push((format!("{p}.down_proj"), vec![e, h, ff], downs));
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let file = safetensors::serialize(views, None).unwrap();
    std::fs::write(out.join("model.safetensors"), file).unwrap();
    out
}

/// Checkpoints with transformers 5's fused 3-D expert tensors (what its
/// modules hold; `save_pretrained` writes per-expert names, which the
/// goldens' files have) load to the same results.
#[test]
fn fused_3d_hugging_face_expert_tensors_match_transformers() {
    for name in MODELS {
        let d = fused_copy(name);
        let src = SafetensorsSource::open_dir(
            &d,
            kiln_model::weights::hf_names(
                &DecoderConfig::from_hf_config(&d.join("config.json"))
                    .unwrap()
                    .arch,
            ),
        )
        .unwrap();
        assert!(
            src.contains("blk.0.ffn_gate_up_exps.weight") && !src.contains("blk.0.ffn_up.0.weight")
        );
        check(name, &d, "fused safetensors");
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// `--quantize q8_0` on a Hugging Face MoE checkpoint, or on an f32 GGUF
/// with 3-D expert tensors, quantizes every matrix, experts included, but
/// keeps the routers as stored: the same bits as a GGUF file quantized
/// that way. (Qwen's; Mixtral's GGUF form permutes
/// q and k, which changes the rotary arithmetic's order.)
#[test]
fn quantizing_while_loading_keeps_routers_and_quantizes_experts() {
    let be = CpuBackend::new();
    for name in ["qwen3moe", "qwen2moe"] {
        let opts = LoadOptions {
            quantize: Some(GgmlType::Q8_0),
            ..LoadOptions::default()
        };
        let m = load(&be, &dir(name), &opts).unwrap();
        let path = to_gguf(name, Form::AllQ8);
        let g = load(&be, &path, &LoadOptions::default()).unwrap();
        let _ = std::fs::remove_file(&path);
        let prompt = ids(&golden(name)["prompts"][2]["ids"]);
        let (lq, _) = fixtures::prefill(&be, &m.decoder, &prompt, 0).unwrap();
        let (lg, _) = fixtures::prefill(&be, &g.decoder, &prompt, 0).unwrap();
        assert!(
            lq == lg,
            "{name}: --quantize q8_0 differs from the Q8_0 GGUF"
        );
        // And from an f32 GGUF, whose 3-D expert tensors quantize whole.
        let f32_path = to_gguf(name, Form::F32);
        let f = load(&be, &f32_path, &opts).unwrap();
        let _ = std::fs::remove_file(&f32_path);
        let (lf, _) = fixtures::prefill(&be, &f.decoder, &prompt, 0).unwrap();
        assert!(
            lf == lg,
            "{name}: --quantize q8_0 of 3-D f32 experts differs"
        );
    }
}

/// Each expert's band of a 3-D quantized tensor is one matrix of the CPU
/// layout file (recorded under the tensor's name, one part per expert) and
/// maps back: the model from the file answers bit for bit as rearranged.
#[test]
fn q8_0_experts_round_trip_through_a_layout_file() {
    use kiln_model::layouts::{LayoutFile, LayoutRecorder, Layouts};
    const KEY: &str = "00112233445566778899aabbccddeeff";
    let be = CpuBackend::new();
    let Some(layout) = be.weight_layout() else {
        return; // KILN_CPU_REPACK=0: nothing is rearranged, so nothing to store.
    };
    let gguf = to_gguf("qwen3moe", Form::ExpertsQ8);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("weights.layout");
    let prompt = ids(&golden("qwen3moe")["prompts"][2]["ids"]);
    let rec = Layouts::Record(LayoutRecorder::default());
    let m = kiln_model::load_with(&be, &gguf, &LoadOptions::default(), &rec).unwrap();
    let (want, _) = fixtures::prefill(&be, &m.decoder, &prompt, 0).unwrap();
    let Layouts::Record(r) = &rec else {
        unreachable!()
    };
    r.write(&file, layout, KEY).unwrap();
    // At least every expert matrix: 2 layers x 8 experts x 3.
    assert!(r.len() >= 48, "{} matrices recorded", r.len());
    let mapped = Layouts::Mapped(LayoutFile::open(&file, layout, KEY).unwrap());
    let m = kiln_model::load_with(&be, &gguf, &LoadOptions::default(), &mapped).unwrap();
    let _ = std::fs::remove_file(&gguf);
    assert_eq!(mapped.finish(), Ok(()), "every matrix came from the file");
    let (got, _) = fixtures::prefill(&be, &m.decoder, &prompt, 0).unwrap();
    assert!(got == want, "mapped experts answer differently");
}

/// Expert settings a GGUF header gets wrong are refused with the key and
/// the file named, before anything is sized from them.
#[test]
fn bad_gguf_expert_metadata_is_a_clear_error() {
    let config_of = |arch: &str, keys: &[(&str, u32)]| -> String {
        let mut w = GgufWriter::default();
        w.meta("general.architecture", G::String(arch.into()));
        for (k, v) in [
            ("block_count", 2),
            ("context_length", 256),
            ("embedding_length", 64),
            ("feed_forward_length", 128),
            ("attention.head_count", 4),
            ("vocab_size", 320),
        ]
        .iter()
        .chain(keys)
        {
            w.meta(&format!("{arch}.{k}"), G::U32(*v));
        }
        w.tensor(
            "blk.0.ffn_gate_inp.weight",
            vec![64, 8],
            GgmlType::F32,
            vec![0; 64 * 8 * 4],
        );
        let path = std::env::temp_dir().join(format!("kiln-moe-bad-{}.gguf", std::process::id()));
        std::fs::write(&path, w.to_bytes()).unwrap();
        let g = kiln_model::gguf::GgufFile::open(&path).unwrap();
        let e = DecoderConfig::from_gguf(&g).unwrap_err().to_string();
        let _ = std::fs::remove_file(&path);
        assert!(e.contains("kiln-moe-bad-"), "{e}");
        e
    };
    let e = config_of("qwen3moe", &[]);
    assert!(e.contains("missing or zero 'qwen3moe.expert_count'"), "{e}");
    let e = config_of(
        "qwen3moe",
        &[("expert_count", 1 << 20), ("expert_used_count", 2)],
    );
    assert!(
        e.contains("1048576 experts (1 to 4096 are supported)"),
        "{e}"
    );
    let e = config_of("llama", &[("expert_count", 8), ("expert_used_count", 9)]);
    assert!(e.contains("9 experts per token out of 8"), "{e}");
    let e = config_of("llama", &[("expert_count", 8), ("block_count", 1 << 30)]);
    assert!(e.contains("1073741824 layers"), "{e}");
    let e = config_of("qwen2moe", &[("expert_count", 8)]);
    assert!(
        e.contains("missing or non-integer 'qwen2moe.expert_used_count'"),
        "{e}"
    );
}

/// A Hugging Face MoE checkpoint quantized while loading and written as a
/// prepared file at the same time (every per-expert matrix under its
/// canonical name, the router as stored) loads back from that file with
/// the same logits, bit for bit.
#[test]
fn a_quantized_moe_round_trips_through_its_prepared_file() {
    use kiln_model::prepared::{self, PreparedInfo, Settings, ARTIFACT_VERSION};
    let be = CpuBackend::new();
    let opts = LoadOptions {
        quantize: Some(GgmlType::Q8_0),
        ..LoadOptions::default()
    };
    let info = PreparedInfo {
        key: "0123abcd".into(),
        source: "/models/x".into(),
        identity: "[]".into(),
        settings: Settings::of(&opts),
        artifact_version: ARTIFACT_VERSION,
    };
    for name in ["qwen2moe", "mixtral"] {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("model.gguf");
        let prompt = ids(&golden(name)["prompts"][2]["ids"]);
        let (m, _) = prepared::load_and_prepare(
            &be,
            &dir(name),
            &opts,
            &info,
            &file,
            &kiln_model::layouts::Layouts::Off,
        )
        .unwrap();
        let (want, _) = fixtures::prefill(&be, &m.decoder, &prompt, 0).unwrap();
        let g = kiln_model::gguf::GgufFile::open(&file).unwrap();
        assert_eq!(
            g.tensor_info("blk.0.ffn_gate.3.weight").unwrap().ggml_type,
            GgmlType::Q8_0,
            "{name}"
        );
        assert_eq!(
            g.tensor_info("blk.0.ffn_gate_inp.weight")
                .unwrap()
                .ggml_type,
            GgmlType::F32,
            "{name}"
        );
        let back = load(&be, &file, &prepared::as_prepared(&opts)).unwrap();
        assert!(back.decoder.config().moe.is_some());
        let (got, _) = fixtures::prefill(&be, &back.decoder, &prompt, 0).unwrap();
        assert!(got == want, "{name}: the prepared file answers differently");
    }
}
