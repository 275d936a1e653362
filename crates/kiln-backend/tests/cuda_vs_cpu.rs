//! Every op of the CUDA backend against the CPU backend on the same random
//! inputs (rounded to bf16 first, so both start from identical values),
//! within bf16 tolerances; a NaN or infinity never passes. Needs a GPU:
//! `cargo test -p kiln-backend --features cuda --test cuda_vs_cpu --
//! --ignored` (what `scripts/gpu/check.sh` is to run). Never run yet.
#![cfg(feature = "cuda")]

use kiln_backend::cpu::CpuBackend;
use kiln_backend::cuda::backend::CudaBackend;
use kiln_backend::cuda::cache::KernelCache;
use kiln_backend::{
    Activation, AttentionParams, Backend, KvSpec, RopeLayout, SeqSlice, StepInput, WeightData,
};

/// Deterministic values in [-1, 1), rounded to bf16.
fn rand_bf16(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            half::bf16::from_f32(v).to_f32()
        })
        .collect()
}

fn gpu() -> CudaBackend {
    let info = kiln_backend::cuda::probe(0).unwrap_or_else(|e| panic!("{e}"));
    println!("GPU: {info:?}");
    let include = kiln_backend::cuda::nvrtc::find_include_dir().unwrap_or_else(|e| panic!("{e}"));
    CudaBackend::new(0, &KernelCache::new(KernelCache::default_dir()), &include)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `got` within bf16 rounding of `want`: |got - want| <= atol + rtol |want|.
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}[{i}] = {g} (CPU {w})");
        let err = (g - w).abs();
        assert!(
            err <= atol + rtol * w.abs(),
            "{what}[{i}]: GPU {g} vs CPU {w}"
        );
        worst = worst.max(err);
    }
    println!(
        "{what:>28}: {} values, worst abs error {worst:.2e}",
        got.len()
    );
}

const ATOL: f32 = 2e-2;
const RTOL: f32 = 2e-2;

/// The row-wise and element-wise ops, run the same way on any backend.
fn elementwise<B: Backend>(be: &B) -> Vec<(String, Vec<f32>)> {
    let (rows, dim, vocab) = (7, 96, 50);
    let mut out = Vec::new();
    let table = be
        .upload_weight(vocab, dim, WeightData::F32(rand_bf16(vocab * dim, 1)))
        .expect("table");
    let step = StepInput {
        tokens: vec![3, 49, 0, 17, 17, 8, 22],
        positions: vec![0, 1, 2, 3, 4, 5, 6],
        slots: (0..7).collect(),
        seqs: vec![SeqSlice {
            query_start: 0,
            query_len: 7,
            context_len: 7,
            block_table: vec![0],
        }],
        logit_rows: vec![6, 2],
    };
    let kv = KvSpec {
        n_layers: 1,
        num_blocks: 1,
        block_size: 16,
        n_kv_heads: 1,
        head_dim: 96,
    };
    let _cache = be.alloc_kv_cache(&kv).expect("cache");
    let st = be.prepare_step(&step).expect("step");
    let mut x = be.embedding(&table, &st).expect("embedding");
    out.push(("embedding".into(), be.to_host(&x).expect("host")));
    let pos = be.upload(&[16, dim], rand_bf16(16 * dim, 2)).expect("pos");
    be.add_position_embedding(&mut x, &pos, 2, &st)
        .expect("pos emb");
    out.push((
        "add_position_embedding".into(),
        be.to_host(&x).expect("host"),
    ));
    let w = be.upload(&[dim], rand_bf16(dim, 3)).expect("w");
    let b = be.upload(&[dim], rand_bf16(dim, 4)).expect("b");
    let y = be
        .upload(&[rows, dim], rand_bf16(rows * dim, 5))
        .expect("y");
    out.push((
        "rms_norm".into(),
        be.to_host(&be.rms_norm(&x, &w, 1e-5).expect("rms"))
            .expect("host"),
    ));
    out.push((
        "layer_norm".into(),
        be.to_host(&be.layer_norm(&x, &w, &b, 1e-5).expect("ln"))
            .expect("host"),
    ));
    be.add_inplace(&mut x, &y).expect("add");
    out.push(("add_inplace".into(), be.to_host(&x).expect("host")));
    let lin = be
        .upload_weight(40, dim, WeightData::F32(rand_bf16(40 * dim, 6)))
        .expect("lin");
    let bias = be.upload(&[40], rand_bf16(40, 7)).expect("bias");
    out.push((
        "linear".into(),
        be.to_host(&be.linear(&x, &lin, Some(&bias)).expect("linear"))
            .expect("host"),
    ));
    out.push((
        "linear (no bias)".into(),
        be.to_host(&be.linear(&x, &lin, None).expect("linear"))
            .expect("host"),
    ));
    // Rotary tables as the decoder builds them: cosines, then sines.
    let (heads, hd, rot) = (4, 24, 16);
    let mut cs = Vec::new();
    for p in 0..16 {
        let angles: Vec<f32> = (0..rot / 2)
            .map(|i| p as f32 * 10000f32.powf(-(2.0 * i as f32) / rot as f32))
            .collect();
        cs.extend(angles.iter().map(|a| a.cos()));
        cs.extend(angles.iter().map(|a| a.sin()));
    }
    let cs: Vec<f32> = cs
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    let cos_sin = be.upload(&[16, rot], cs).expect("cos_sin");
    for layout in [RopeLayout::Interleaved, RopeLayout::HalfSplit] {
        let mut q = be
            .upload(&[rows, heads * hd], rand_bf16(rows * heads * hd, 8))
            .expect("q");
        be.rope_inplace(&mut q, &cos_sin, &st, heads, hd, rot, layout)
            .expect("rope");
        out.push((format!("rope {layout:?}"), be.to_host(&q).expect("host")));
    }
    for act in [
        Activation::Silu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Relu,
    ] {
        let g = be
            .upload(
                &[rows, dim],
                rand_bf16(rows * dim, 9).iter().map(|v| 4.0 * v).collect(),
            )
            .expect("g");
        let u = be
            .upload(&[rows, dim], rand_bf16(rows * dim, 10))
            .expect("u");
        out.push((
            format!("gated {act:?}"),
            be.to_host(&be.gated_activation(&g, &u, act).expect("gated"))
                .expect("host"),
        ));
        let mut g2 = g;
        be.activation_inplace(&mut g2, act).expect("act");
        out.push((
            format!("activation {act:?}"),
            be.to_host(&g2).expect("host"),
        ));
    }
    out.push((
        "select_logit_rows".into(),
        be.to_host(&be.select_logit_rows(&x, &st).expect("select"))
            .expect("host"),
    ));
    out
}

#[test]
#[ignore = "needs a GPU: scripts/gpu/check.sh"]
fn elementwise_ops_match_the_cpu_backend() {
    let (cpu, gpu) = (CpuBackend::new(), gpu());
    let want = elementwise(&cpu);
    let got = elementwise(&gpu);
    assert_eq!(got.len(), want.len());
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        // Products over 96 terms accumulate bf16 rounding of their inputs' sums.
        let atol = if name.starts_with("linear") {
            0.1
        } else {
            ATOL
        };
        assert_close(name, g, w, atol, RTOL);
    }
}

/// A prefill step of two sequences (one long enough for split decode, its
/// blocks in reverse order) then a decode step of both; returns both
/// steps' attention outputs.
fn attention<B: Backend>(be: &B, window: Option<usize>) -> Vec<f32> {
    let (heads, kv_heads, hd, bs) = (8, 2, 64, 16);
    let (long, short) = (1499usize, 37usize);
    let spec = KvSpec {
        n_layers: 1,
        num_blocks: 128,
        block_size: bs,
        n_kv_heads: kv_heads,
        head_dim: hd,
    };
    let mut cache = be.alloc_kv_cache(&spec).expect("cache");
    let table_a: Vec<u32> = (0..94).rev().collect();
    let table_b: Vec<u32> = (94..97).collect();
    let slot = |t: &[u32], p: usize| t[p / bs] * bs as u32 + (p % bs) as u32;
    let params = AttentionParams {
        n_heads: heads,
        n_kv_heads: kv_heads,
        head_dim: hd,
        scale: 1.0 / (hd as f32).sqrt(),
        window,
        softcap: None,
        sinks: None,
    };
    let mut outs = Vec::new();
    for (i, (ranges, seed)) in [
        ((0..long, 0..short), 11u64),
        ((long..long + 1, short..short + 1), 12),
    ]
    .into_iter()
    .enumerate()
    {
        let (ra, rb) = ranges;
        let (na, nb) = (ra.len(), rb.len());
        let mut step = StepInput::default();
        for p in ra.clone() {
            step.tokens.push(1);
            step.positions.push(p as u32);
            step.slots.push(slot(&table_a, p));
        }
        for p in rb.clone() {
            step.tokens.push(1);
            step.positions.push(p as u32);
            step.slots.push(slot(&table_b, p));
        }
        step.seqs = vec![
            SeqSlice {
                query_start: 0,
                query_len: na,
                context_len: ra.end,
                block_table: table_a.clone(),
            },
            SeqSlice {
                query_start: na,
                query_len: nb,
                context_len: rb.end,
                block_table: table_b.clone(),
            },
        ];
        step.logit_rows = vec![(na - 1) as u32, (na + nb - 1) as u32];
        let n = na + nb;
        let st = be.prepare_step(&step).expect("step");
        let k = be
            .upload(&[n, kv_heads * hd], rand_bf16(n * kv_heads * hd, seed))
            .expect("k");
        let v = be
            .upload(
                &[n, kv_heads * hd],
                rand_bf16(n * kv_heads * hd, seed + 100),
            )
            .expect("v");
        let q = be
            .upload(&[n, heads * hd], rand_bf16(n * heads * hd, seed + 200))
            .expect("q");
        be.write_kv(&mut cache, 0, &k, &v, &st).expect("write");
        let o = be
            .attention(&q, &cache, 0, &st, &params)
            .expect("attention");
        let o = be.to_host(&o).expect("host");
        println!("attention step {i}: {n} tokens");
        outs.extend(o);
    }
    outs
}

#[test]
#[ignore = "needs a GPU: scripts/gpu/check.sh"]
fn paged_attention_prefill_and_split_decode_match_the_cpu_backend() {
    let (cpu, gpu) = (CpuBackend::new(), gpu());
    for window in [None, Some(100)] {
        let want = attention(&cpu, window);
        let got = attention(&gpu, window);
        assert_close(
            &format!("attention window {window:?}"),
            &got,
            &want,
            ATOL,
            RTOL,
        );
    }
}
