//! Unit tests of the CPU ops against naive, obviously-correct formulations.

use super::test_support::*;
use super::*;
use crate::{GgmlType, KvDtype, SeqSlice};

fn t(shape: &[usize], seed: u64) -> CpuTensor {
    CpuTensor::new(shape.to_vec(), rand_vec(shape.iter().product(), seed)).unwrap()
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "index {i}: {x} vs {y}"
        );
    }
}

/// Checks `y = x @ w^T + b` against an f64 computation. f32 rounding error
/// scales with the sum of the products' magnitudes, not with the result
/// (which cancellation can make small), so that is what `rel` multiplies.
#[allow(clippy::too_many_arguments)]
fn check_linear(
    y: &[f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    rel: f64,
) {
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut mag) = (b[j] as f64, b[j].abs() as f64);
            for l in 0..k {
                let p = x[i * k + l] as f64 * w[j * k + l] as f64;
                s += p;
                mag += p.abs();
            }
            let got = y[i * n + j] as f64;
            assert!(
                (got - s).abs() <= rel * (1.0 + mag),
                "row {i} col {j}: {got} vs {s} (magnitude {mag})"
            );
        }
    }
}

#[test]
fn linear_matches_naive_for_small_and_large_batches() {
    let be = CpuBackend::new();
    for &m in &[1usize, 3, 8, 9, 40] {
        let (k, n) = (70, 45);
        let x = t(&[m, k], 1);
        let wd = rand_vec(n * k, 2);
        let w = be.upload_weight(n, k, WeightData::F32(wd.clone())).unwrap();
        let b = t(&[n], 3);
        let y = be.linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(y.shape, vec![m, n]);
        check_linear(&y.data, &x.data, &wd, &b.data, m, n, k, 1e-6);
    }
}

/// Every format's native kernel against dequantize-then-f32 on random rows.
///
/// Float formats keep f32 activations: the result matches an f64 product
/// with the dequantized weights to f32 rounding. Block formats multiply
/// 8-bit activations: the result matches the f64 product of the dequantized
/// weights with the *quantized* activations to f32 rounding (the integer
/// arithmetic is exact), and differs from the f32-activation product by no
/// more than what quantizing can move it: `sum |w_t| * dx_t / 2`.
#[test]
fn every_format_matches_dequantize_then_f32() {
    let be = CpuBackend::new();
    // n = 700 splits the work into more than one band.
    let n = 700;
    for ty in ALL_FORMATS {
        let (block, _) = ty.block();
        let k = if block == 256 { 512 } else { 96 };
        let bytes = if block == 1 {
            float_weight_bytes(ty, &rand_vec(n * k, 9))
        } else {
            random_blocks(ty, n * k / block, 4)
        };
        let wd = crate::quant::dequantize(ty, &bytes, n * k).unwrap();
        assert!(wd.iter().all(|v| v.is_finite()));
        let w = be
            .upload_weight(
                n,
                k,
                WeightData::Ggml {
                    ty,
                    bytes: bytes.into(),
                },
            )
            .unwrap();
        let b = t(&[n], 5);
        for &m in &[1usize, 4, 8, 9, 33] {
            let x = t(&[m, k], 6 + m as u64);
            let y = be.linear(&x, &w, Some(&b)).unwrap();
            if block == 1 {
                check_linear(&y.data, &x.data, &wd, &b.data, m, n, k, 1e-6);
                continue;
            }
            let bits = super::actq::ActBits::configured();
            let q = super::actq::QuantizedRows::new(&x.data, k, bits);
            let xq: Vec<f32> = (0..m * k)
                .map(|t| q.value(t) as f32 * q.dx[t / 32])
                .collect();
            check_linear(&y.data, &xq, &wd, &b.data, m, n, k, 1e-5);
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut bound) = (b.data[j] as f64, 0f64);
                    for l in 0..k {
                        let wv = wd[j * k + l] as f64;
                        exact += x.data[i * k + l] as f64 * wv;
                        bound += wv.abs() * q.dx[(i * k + l) / 32] as f64 / 2.0;
                    }
                    let got = y.data[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= bound * 1.001 + 1e-4,
                        "{ty:?} ({i},{j}): {got} vs {exact}, quantization bound {bound}"
                    );
                }
            }
        }
    }
}

#[test]
fn linear_rejects_mismatched_shapes() {
    let be = CpuBackend::new();
    let w = be
        .upload_weight(3, 4, WeightData::F32(rand_vec(12, 2)))
        .unwrap();
    let err = be.linear(&t(&[2, 5], 1), &w, None).unwrap_err();
    assert!(err.to_string().contains("linear"), "{err}");
    // Quantized rows must be whole blocks, and the byte count must match.
    let e = be
        .upload_weight(
            2,
            40,
            WeightData::Ggml {
                ty: GgmlType::Q8_0,
                bytes: vec![0; 68].into(),
            },
        )
        .expect_err("40 columns are not whole Q8_0 blocks");
    assert!(e.to_string().contains("blocks"), "{e}");
    assert!(be
        .upload_weight(
            2,
            32,
            WeightData::Ggml {
                ty: GgmlType::Q8_0,
                bytes: vec![0; 67].into()
            }
        )
        .is_err());
}

#[test]
fn norms_match_definitions() {
    let be = CpuBackend::new();
    let x = t(&[3, 16], 4);
    let w = t(&[16], 5);
    let b = t(&[16], 6);
    let rms = be.rms_norm(&x, &w, 1e-5).unwrap();
    let ln = be.layer_norm(&x, &w, &b, 1e-5).unwrap();
    for r in 0..3 {
        let row = &x.data[r * 16..(r + 1) * 16];
        let ms: f32 = row.iter().map(|v| v * v).sum::<f32>() / 16.0;
        let mean: f32 = row.iter().sum::<f32>() / 16.0;
        let var: f32 = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 16.0;
        for (c, &v) in row.iter().enumerate() {
            let want = v / (ms + 1e-5).sqrt() * w.data[c];
            assert!((rms.data[r * 16 + c] - want).abs() < 1e-5);
            let want = (v - mean) / (var + 1e-5).sqrt() * w.data[c] + b.data[c];
            assert!((ln.data[r * 16 + c] - want).abs() < 1e-5);
        }
    }
}

#[test]
fn rope_layouts_are_permutations_of_each_other() {
    // Rotating interleaved pairs equals rotating half-split pairs after permuting
    // dimensions [0,2,4,..,1,3,5,..]: the identity GGUF's q/k permutation relies on.
    let be = CpuBackend::new();
    let (heads, hd, max_pos) = (2, 8, 10);
    let half = hd / 2;
    let mut table = vec![0f32; max_pos * hd];
    for p in 0..max_pos {
        for i in 0..half {
            let ang = p as f32 / 10000f32.powf(2.0 * i as f32 / hd as f32);
            table[p * hd + i] = ang.cos();
            table[p * hd + half + i] = ang.sin();
        }
    }
    let cs = CpuTensor::new(vec![max_pos, hd], table).unwrap();
    let step = StepInput {
        tokens: vec![0, 0],
        positions: vec![3, 7],
        slots: vec![0, 1],
        ..Default::default()
    };
    let x = t(&[2, heads * hd], 7);
    let mut inter = x.clone();
    be.rope_inplace(
        &mut inter,
        &cs,
        &step,
        heads,
        hd,
        hd,
        RopeLayout::Interleaved,
    )
    .unwrap();
    let perm = |v: &[f32]| -> Vec<f32> {
        v.chunks(hd)
            .flat_map(|h| {
                (0..half)
                    .map(|i| h[2 * i])
                    .chain((0..half).map(|i| h[2 * i + 1]))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let mut split = CpuTensor::new(x.shape.clone(), perm(&x.data)).unwrap();
    be.rope_inplace(&mut split, &cs, &step, heads, hd, hd, RopeLayout::HalfSplit)
        .unwrap();
    close(&split.data, &perm(&inter.data), 1e-6);
    // Position 0 is the identity.
    let mut z = x.clone();
    let step0 = StepInput {
        positions: vec![0, 0],
        ..step.clone()
    };
    be.rope_inplace(&mut z, &cs, &step0, heads, hd, hd, RopeLayout::HalfSplit)
        .unwrap();
    close(&z.data, &x.data, 1e-7);
}

#[test]
fn activations_match_reference_values() {
    use super::ops::{activate, erf};
    // erf reference values from tables.
    for (x, want) in [
        (0.0f32, 0.0f32),
        (0.1, 0.112_462_92),
        (0.5, 0.520_499_9),
        (1.0, 0.842_700_8),
        (2.0, 0.995_322_3),
        (-1.5, -0.966_105_1),
        (3.5, 0.999_999_3),
    ] {
        assert!((erf(x) - want).abs() < 1e-6, "erf({x}) = {}", erf(x));
    }
    assert!((activate(1.0, Activation::Silu) - 0.731_058_6).abs() < 1e-6);
    assert!((activate(1.0, Activation::Gelu) - 0.841_344_7).abs() < 1e-6);
    assert!((activate(1.0, Activation::GeluTanh) - 0.841_192).abs() < 1e-5);
    assert_eq!(activate(-2.0, Activation::Relu), 0.0);
}

/// The GELUs run vectorised over a tensor (`activation_inplace`) and gated
/// (`gated_activation`) give the scalar definition's bits, and stay within
/// a few f32 roundings of GELU computed in f64 (erf from Cody's rational
/// approximations, tanh from the library).
#[test]
fn vectorised_gelus_match_their_definitions() {
    use super::ops::{activate, activation_inplace, erf, gated_activation};
    let mut x = rand_vec(20_000, 21)
        .iter()
        .map(|v| 12.0 * v)
        .collect::<Vec<_>>();
    x.extend([
        0.0, -0.0, 1e-30, -1e-30, 7.0, -7.0, 30.0, -30.0, 200.0, -200.0,
    ]);
    let n = x.len();
    for act in [Activation::Gelu, Activation::GeluTanh] {
        let mut t = CpuTensor::new(vec![1, n], x.clone()).unwrap();
        activation_inplace(&mut t, act);
        let ones = CpuTensor::new(vec![1, n], vec![1.0; n]).unwrap();
        let xt = CpuTensor::new(vec![1, n], x.clone()).unwrap();
        let gated = gated_activation(&xt, ones, act).unwrap();
        for (i, &v) in x.iter().enumerate() {
            let want = activate(v, act);
            assert_eq!(t.data[i].to_bits(), want.to_bits(), "{act:?}({v})");
            assert_eq!(
                gated.data[i].to_bits(),
                want.to_bits(),
                "gated {act:?}({v})"
            );
            let y = v as f64;
            let exact = match act {
                Activation::Gelu => {
                    0.5 * y * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2) as f64)
                }
                _ => {
                    let u = 0.797_884_560_802_865_4 * (y + 0.044715 * y * y * y);
                    0.5 * y * (1.0 + u.tanh())
                }
            };
            // Absolute near zero (where 1 + erf cancels for negative x in
            // any f32 formula), relative elsewhere.
            let err = (want as f64 - exact).abs();
            assert!(
                err <= 4e-7 * exact.abs().max(v.abs().min(1.0) as f64) + 1e-30,
                "{act:?}({v}) = {want}, want {exact}"
            );
        }
    }
}

/// The gated activation's vectorised loop gives the scalar definition's
/// bits, and SiLU stays within a few ulp of the library exponential's
/// (below -87 both are zero for every purpose: under 1e-30).
#[test]
fn gated_silu_matches_its_definition() {
    use super::ops::{activate, gated_activation};
    let mut g = rand_vec(10_000, 11)
        .iter()
        .map(|v| 20.0 * v)
        .collect::<Vec<_>>();
    g.extend([0.0, -0.0, 90.0, -90.0, 200.0, -200.0, 1e-30, -1e-30]);
    let u = rand_vec(g.len(), 12);
    let shape = vec![1, g.len()];
    let gt = CpuTensor::new(shape.clone(), g.clone()).unwrap();
    let ut = CpuTensor::new(shape, u.clone()).unwrap();
    let got = gated_activation(&gt, ut, Activation::Silu).unwrap();
    for (i, ((&y, &g), &u)) in got.data.iter().zip(&g).zip(&u).enumerate() {
        let want = activate(g, Activation::Silu) * u;
        assert_eq!(y.to_bits(), want.to_bits(), "element {i}: silu({g}) * {u}");
        let lib = (g as f64 / (1.0 + (-g as f64).exp())) as f32;
        let (s, l) = (activate(g, Activation::Silu), lib);
        assert!(
            (s - l).abs() <= 4.0 * f32::EPSILON * l.abs() + 1e-30,
            "silu({g}) = {s}, want {l}"
        );
    }
}

/// Dense causal attention over one sequence, the textbook way.
fn naive_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    nq: usize,
    nk: usize,
    p: &AttentionParams,
) -> Vec<f32> {
    let hd = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let mut out = vec![0f32; nq * p.n_heads * hd];
    for i in 0..nq {
        let pos = nk - nq + i;
        for h in 0..p.n_heads {
            let g = h / group;
            let qv = &q[(i * p.n_heads + h) * hd..][..hd];
            let lo = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let s: Vec<f32> = (lo..=pos)
                .map(|j| {
                    qv.iter()
                        .zip(&k[(j * p.n_kv_heads + g) * hd..][..hd])
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                        * p.scale
                })
                .map(|x| p.softcap.map_or(x, |c| (x / c).tanh() * c))
                .collect();
            let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f32 = e.iter().sum();
            for (jj, j) in (lo..=pos).enumerate() {
                for d in 0..hd {
                    out[(i * p.n_heads + h) * hd + d] +=
                        e[jj] / z * v[(j * p.n_kv_heads + g) * hd + d];
                }
            }
        }
    }
    out
}

#[test]
fn paged_attention_matches_dense_for_mixed_prefill_and_decode() {
    let be = CpuBackend::new();
    let spec = KvSpec {
        n_layers: 1,
        num_blocks: 16,
        block_size: 4,
        n_kv_heads: 2,
        head_dim: 8,
    };
    // A cap of 0.5 bends every score of these inputs (their spread is larger).
    // Each cache type within its rounding of these [-1, 1) keys and values:
    // f32 1e-5, f16 (2^-11 relative per element) 2e-3, q8_0 (half a step
    // of amax / 127 per element) 2e-2.
    let cases = [
        (KvDtype::F32, 1e-5),
        (KvDtype::F16, 2e-3),
        (KvDtype::Q8_0, 2e-2),
    ]
    .into_iter()
    .flat_map(|(d, tol)| {
        [(None, None), (Some(3), None), (Some(3), Some(0.5))].map(|(w, c)| (d, tol, w, c))
    });
    for (dtype, tol, window, softcap) in cases {
        let p = AttentionParams {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            scale: 0.35,
            window,
            softcap,
            sinks: None,
        };
        let mut cache = be.alloc_kv_cache_as(&spec, dtype).unwrap();
        // Sequence A: 7 tokens of which the last 3 are computed now (4 cached earlier).
        // Sequence B: 5 tokens, all new (prefill). Scattered, non-contiguous blocks.
        let tables = [vec![9u32, 2], vec![5u32, 11]];
        let lens = [7usize, 5];
        let new = [3usize, 5];
        let kv_w = 16;
        let keys: Vec<Vec<f32>> = (0..2)
            .map(|s| rand_vec(lens[s] * kv_w, 10 + s as u64))
            .collect();
        let vals: Vec<Vec<f32>> = (0..2)
            .map(|s| rand_vec(lens[s] * kv_w, 20 + s as u64))
            .collect();
        let slot = |s: usize, j: usize| tables[s][j / 4] * 4 + (j % 4) as u32;
        // Earlier step: A's first 4 tokens.
        let early = StepInput {
            tokens: vec![0; 4],
            positions: (0..4).collect(),
            slots: (0..4).map(|j| slot(0, j)).collect(),
            seqs: vec![SeqSlice {
                query_start: 0,
                query_len: 4,
                context_len: 4,
                block_table: tables[0].clone(),
            }],
            logit_rows: vec![3],
        };
        let kt = CpuTensor::new(vec![4, kv_w], keys[0][..4 * kv_w].to_vec()).unwrap();
        let vt = CpuTensor::new(vec![4, kv_w], vals[0][..4 * kv_w].to_vec()).unwrap();
        be.write_kv(&mut cache, 0, &kt, &vt, &early).unwrap();
        // This step.
        let mut step = StepInput::default();
        let (mut kn, mut vn) = (vec![], vec![]);
        for s in 0..2 {
            let start = lens[s] - new[s];
            step.seqs.push(SeqSlice {
                query_start: step.tokens.len(),
                query_len: new[s],
                context_len: lens[s],
                block_table: tables[s].clone(),
            });
            for j in start..lens[s] {
                step.tokens.push(0);
                step.positions.push(j as u32);
                step.slots.push(slot(s, j));
                kn.extend_from_slice(&keys[s][j * kv_w..(j + 1) * kv_w]);
                vn.extend_from_slice(&vals[s][j * kv_w..(j + 1) * kv_w]);
            }
        }
        let n = step.tokens.len();
        be.write_kv(
            &mut cache,
            0,
            &CpuTensor::new(vec![n, kv_w], kn).unwrap(),
            &CpuTensor::new(vec![n, kv_w], vn).unwrap(),
            &step,
        )
        .unwrap();
        let q = t(&[n, 32], 30);
        let out = be.attention(&q, &cache, 0, &step, &p).unwrap();
        let mut row = 0;
        for s in 0..2 {
            let qs = &q.data[row * 32..(row + new[s]) * 32];
            let want = naive_attention(qs, &keys[s], &vals[s], new[s], lens[s], &p);
            close(&out.data[row * 32..(row + new[s]) * 32], &want, tol);
            row += new[s];
        }
    }
}

#[test]
fn step_validation_rejects_inconsistent_plans() {
    let spec = KvSpec {
        n_layers: 1,
        num_blocks: 2,
        block_size: 4,
        n_kv_heads: 1,
        head_dim: 4,
    };
    let ok = StepInput {
        tokens: vec![1, 2],
        positions: vec![0, 1],
        slots: vec![0, 1],
        seqs: vec![SeqSlice {
            query_start: 0,
            query_len: 2,
            context_len: 2,
            block_table: vec![0],
        }],
        logit_rows: vec![1],
    };
    ok.validate(&spec).unwrap();
    let mut bad = ok.clone();
    bad.seqs[0].block_table = vec![7];
    assert!(bad.validate(&spec).is_err());
    let mut bad = ok.clone();
    bad.seqs[0].context_len = 9;
    assert!(bad.validate(&spec).is_err());
    let mut bad = ok.clone();
    bad.slots[1] = 8;
    assert!(bad.validate(&spec).is_err());
    let mut bad = ok;
    bad.logit_rows = vec![2];
    assert!(bad.validate(&spec).is_err());
}

#[test]
fn embedding_looks_up_rows_and_rejects_out_of_vocab_ids() {
    let be = CpuBackend::new();
    let data = rand_vec(15, 1);
    let table = be
        .upload_weight(5, 3, WeightData::F32(data.clone()))
        .unwrap();
    let step = StepInput {
        tokens: vec![1, 4],
        ..Default::default()
    };
    let e = be.embedding(&table, &step).unwrap();
    assert_eq!(&e.data[3..6], &data[12..15]);
    let bad = StepInput {
        tokens: vec![5],
        ..Default::default()
    };
    assert!(be.embedding(&table, &bad).is_err());

    // A quantized table gives its dequantized rows.
    let bytes = random_blocks(GgmlType::Q8_0, 4, 3);
    let want = crate::quant::dequantize(GgmlType::Q8_0, &bytes, 128).unwrap();
    let table = be
        .upload_weight(
            2,
            64,
            WeightData::Ggml {
                ty: GgmlType::Q8_0,
                bytes: bytes.into(),
            },
        )
        .unwrap();
    let e = be
        .embedding(
            &table,
            &StepInput {
                tokens: vec![1, 0],
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(&e.data[..64], &want[64..]);
    assert_eq!(&e.data[64..], &want[..64]);
}

/// A table uploaded for row lookups keeps the given bytes (no rearranged
/// copy) and looks up the same bits as the rearranged upload, in every
/// block format the packed kernels take.
#[test]
fn tables_keep_their_bytes_and_look_up_the_same_rows() {
    let be = CpuBackend::new();
    let (rows, cols) = (packed::NR + 3, 512);
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ] {
        let bytes = random_blocks(ty, rows * cols / ty.block().0, 7);
        let data = || WeightData::Ggml {
            ty,
            bytes: bytes.clone().into(),
        };
        let packed = be.upload_weight(rows, cols, data()).unwrap();
        let table = be.upload_table(rows, cols, data()).unwrap();
        assert!(packed.laid_out().is_some(), "{ty:?}");
        assert!(table.laid_out().is_none(), "{ty:?}: rearranged");
        let step = StepInput {
            tokens: vec![rows as u32 - 1, 0, 5, 5],
            ..Default::default()
        };
        let want = be.embedding(&packed, &step).unwrap();
        let got = be.embedding(&table, &step).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.data), bits(&want.data), "{ty:?}");
    }
}

/// A matrix handed back in the layout it was rearranged into (as a later
/// start maps it from a file) computes exactly what the rearranged upload
/// does, row lookups included; bytes of another length, or for another
/// shape, are refused.
#[test]
fn laid_out_bytes_upload_back_to_the_same_products() {
    let be = CpuBackend::new();
    let (rows, cols, m) = (packed::NR + 5, 512, 3);
    let x = CpuTensor::new(vec![m, cols], rand_vec(m * cols, 9)).unwrap();
    let floats = WeightData::F32(rand_vec(rows * cols, 4));
    let cases = [
        (GgmlType::Q4_1, None),
        (GgmlType::Q8_0, None),
        (GgmlType::Q4K, None),
        (GgmlType::Q6K, None),
        (GgmlType::F32, Some(floats.clone())),
        (
            GgmlType::F16,
            Some(floats.into_float(GgmlType::F16).unwrap()),
        ),
    ];
    assert!(be.weight_layout().is_some());
    for (ty, data) in cases {
        let data = data.unwrap_or_else(|| WeightData::Ggml {
            ty,
            bytes: random_blocks(ty, rows * cols / ty.block().0, 7).into(),
        });
        let w = be.upload_weight(rows, cols, data).unwrap();
        let (got_ty, laid) = be.laid_out(&w).expect("rearranged");
        assert_eq!(got_ty, ty);
        // A separate copy, as a file's bytes would be.
        let copy = HostBytes::from(laid.to_vec());
        let back = be.upload_laid_out(rows, cols, ty, copy).unwrap();
        let (a, b) = (
            be.linear(&x, &w, None).unwrap(),
            be.linear(&x, &back, None).unwrap(),
        );
        assert_eq!(a.data.len(), m * rows);
        for (i, (p, q)) in a.data.iter().zip(&b.data).enumerate() {
            assert_eq!(p.to_bits(), q.to_bits(), "{ty:?} output {i}: {p} vs {q}");
        }
        let (mut r1, mut r2) = (vec![0f32; cols], vec![0f32; cols]);
        w.rows_f32(rows - 1, &mut r1);
        back.rows_f32(rows - 1, &mut r2);
        assert_eq!(r1, r2, "{ty:?}: the last row read back");

        let short = HostBytes::from(laid[..laid.len() - 1].to_vec());
        assert!(be.upload_laid_out(rows, cols, ty, short).is_err(), "{ty:?}");
        let err = be
            .upload_laid_out(rows + packed::NR, cols, ty, laid.clone())
            .expect_err("another shape");
        assert!(
            err.to_string().contains("bytes of cpu-interleaved"),
            "{err}"
        );
    }
    // A format without a rearranged layout.
    let q8k = HostBytes::from(vec![0u8; 16]);
    assert!(be.upload_laid_out(1, 256, GgmlType::Q8K, q8k).is_err());
}

/// `KILN_CPU_ISA=portable` reaches every path that has vector code, the
/// two that used to read the CPU's features themselves (the activation
/// quantizer and the gated activation) included: a child run of this test
/// binary under the cap checks what each path asks the one choice.
#[test]
fn the_portable_cap_reaches_every_vector_path() {
    if std::env::var_os("KILN_ISA_CHILD").is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "cpu::tests::portable_cap_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KILN_CPU_ISA", "portable")
        .env("KILN_ISA_CHILD", "1")
        .output()
        .expect("the test binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "the child under KILN_CPU_ISA=portable failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The child of [`the_portable_cap_reaches_every_vector_path`]: passes
/// trivially unless run by it.
#[test]
fn portable_cap_child() {
    if std::env::var_os("KILN_ISA_CHILD").is_none() {
        return;
    }
    assert_eq!(std::env::var("KILN_CPU_ISA").as_deref(), Ok("portable"));
    let c = isa::chosen();
    assert!(!c.vector() && !c.avx512 && !c.amx && !c.amx_bf16, "{c:?}");
    assert!(!actq::split_avx512(), "the quantizer ignores the cap");
    assert!(!ops::gate_vector(), "the gated activation ignores the cap");
    // And a product still runs, on the portable kernels.
    let x = t(&[3, 64], 1);
    let bytes = random_blocks(GgmlType::Q4_0, 16, 2);
    let w = CpuBackend::new()
        .upload_weight(
            8,
            64,
            WeightData::Ggml {
                ty: GgmlType::Q4_0,
                bytes: HostBytes::from(bytes),
            },
        )
        .unwrap();
    let y = CpuBackend::new().linear(&x, &w, None).unwrap();
    assert_eq!(y.shape, vec![3, 8]);
}
