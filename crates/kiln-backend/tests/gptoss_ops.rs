//! gpt-oss's two compute pieces on the CPU backend, against references
//! written here from their definitions (transformers'
//! `modeling_gpt_oss.py`): attention sinks (one learned logit per query head
//! that joins the softmax's denominator and adds no value) and the clamped
//! SwiGLU of its experts.

use kiln_backend::cpu::CpuBackend;
use kiln_backend::{
    Activation, AttentionParams, Backend, BackendError, KvSpec, SeqSlice, StepInput,
};

/// Deterministic values in [-1, 1) (xorshift).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

const HEADS: usize = 6;
const KV_HEADS: usize = 2;
const HD: usize = 64;
const BS: usize = 16;

/// One sequence's keys, values and queries, as rows of all its positions.
struct Seq {
    k: Vec<f32>,
    v: Vec<f32>,
    q: Vec<f32>,
    len: usize,
}

impl Seq {
    fn new(len: usize, seed: u64) -> Self {
        // Queries scaled up so that scores spread over a few units, as
        // trained models' do, and the sink competes with real keys.
        let q = rand_vec(len * HEADS * HD, seed + 2)
            .iter()
            .map(|x| 3.0 * x)
            .collect();
        Seq {
            k: rand_vec(len * KV_HEADS * HD, seed),
            v: rand_vec(len * KV_HEADS * HD, seed + 1),
            q,
            len,
        }
    }
}

/// Runs the CPU backend's paged attention over two sequences in two
/// steps: a prefill of both (all but the last position), then one decode
/// token of each. Returns every position's output, per sequence.
fn paged(seqs: &[Seq; 2], p: &AttentionParams) -> Result<[Vec<f32>; 2], BackendError> {
    let be = CpuBackend::new();
    let spec = KvSpec {
        n_layers: 1,
        num_blocks: 32,
        block_size: BS,
        n_kv_heads: KV_HEADS,
        head_dim: HD,
    };
    // f32 keys and values: the sinks' arithmetic is checked to 2e-6, below
    // the f16 default's rounding (whose own bounds the backend's attention
    // tests check).
    let mut cache = be.alloc_kv_cache_as(&spec, kiln_backend::KvDtype::F32)?;
    // Scattered blocks: sequence 0 from the top down, sequence 1 after it.
    let tables: [Vec<u32>; 2] = [(10..20).rev().collect(), (20..30).collect()];
    let mut outs = [Vec::new(), Vec::new()];
    for phase in 0..2 {
        let mut step = StepInput::default();
        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for (s, seq) in seqs.iter().enumerate() {
            let range = if phase == 0 {
                0..seq.len - 1
            } else {
                seq.len - 1..seq.len
            };
            step.seqs.push(SeqSlice {
                query_start: step.tokens.len(),
                query_len: range.len(),
                context_len: range.end,
                block_table: tables[s].clone(),
            });
            for pos in range {
                step.tokens.push(0);
                step.positions.push(pos as u32);
                let t = &tables[s];
                step.slots.push(t[pos / BS] * BS as u32 + (pos % BS) as u32);
                q.extend_from_slice(&seq.q[pos * HEADS * HD..][..HEADS * HD]);
                k.extend_from_slice(&seq.k[pos * KV_HEADS * HD..][..KV_HEADS * HD]);
                v.extend_from_slice(&seq.v[pos * KV_HEADS * HD..][..KV_HEADS * HD]);
            }
            step.logit_rows.push(step.tokens.len() as u32 - 1);
        }
        let n = step.tokens.len();
        let qt = be.upload(&[n, HEADS * HD], q)?;
        let kt = be.upload(&[n, KV_HEADS * HD], k)?;
        let vt = be.upload(&[n, KV_HEADS * HD], v)?;
        be.write_kv(&mut cache, 0, &kt, &vt, &step)?;
        let o = be.to_host(&be.attention(&qt, &cache, 0, &step, p)?)?;
        for (s, sl) in step.seqs.iter().enumerate() {
            outs[s]
                .extend_from_slice(&o[sl.query_start * HEADS * HD..][..sl.query_len * HEADS * HD]);
        }
    }
    Ok(outs)
}

/// Causal attention of one sequence in f64, the eager way transformers'
/// gpt-oss writes it: the sink appended to each row of scores, the
/// softmax over both, the sink's column dropped before the values.
fn naive(seq: &Seq, p: &AttentionParams) -> Vec<f64> {
    let group = HEADS / KV_HEADS;
    let mut out = vec![0f64; seq.len * HEADS * HD];
    for pos in 0..seq.len {
        let lo = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        for h in 0..HEADS {
            let g = h / group;
            let q = &seq.q[(pos * HEADS + h) * HD..][..HD];
            let mut logits: Vec<f64> = (lo..=pos)
                .map(|j| {
                    let k = &seq.k[(j * KV_HEADS + g) * HD..][..HD];
                    q.iter()
                        .zip(k)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * p.scale as f64
                })
                .collect();
            if let Some(s) = p.sinks {
                logits.push(s[h] as f64);
            }
            let m = logits.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = logits.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for (jj, j) in (lo..=pos).enumerate() {
                let v = &seq.v[(j * KV_HEADS + g) * HD..][..HD];
                for d in 0..HD {
                    out[(pos * HEADS + h) * HD + d] += e[jj] / z * v[d] as f64;
                }
            }
        }
    }
    out
}

fn params(window: Option<usize>, sinks: Option<&[f32]>) -> AttentionParams<'_> {
    AttentionParams {
        n_heads: HEADS,
        n_kv_heads: KV_HEADS,
        head_dim: HD,
        scale: 1.0 / (HD as f32).sqrt(),
        window,
        softcap: None,
        sinks,
    }
}

fn two_seqs() -> [Seq; 2] {
    [Seq::new(37, 1), Seq::new(5, 10)]
}

/// Paged attention with sinks is the eager softmax-with-sink reference
/// within f32 rounding, for prefill and decode tokens, with and without a
/// sliding window, and the sinks really move the output (so the
/// reference check would catch them being ignored).
#[test]
fn attention_sinks_match_the_eager_reference() {
    let seqs = two_seqs();
    // Per-head sinks around the scores' range, one head's far above them.
    let sinks: Vec<f32> = vec![0.5, -1.0, 2.0, 0.0, 1.5, 8.0];
    for window in [None, Some(7)] {
        let with = params(window, Some(&sinks));
        let got = paged(&seqs, &with).unwrap();
        let plain = paged(&seqs, &params(window, None)).unwrap();
        for (s, seq) in seqs.iter().enumerate() {
            let want = naive(seq, &with);
            let want_plain = naive(seq, &params(window, None));
            let mut moved = 0f64;
            for (i, (&g, &w)) in got[s].iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - w).abs() < 2e-6,
                    "window {window:?} seq {s} output {i}: {g} vs {w}"
                );
                moved = moved.max((g as f64 - want_plain[i]).abs());
            }
            for (i, (&g, &w)) in plain[s].iter().zip(&want_plain).enumerate() {
                assert!(
                    (g as f64 - w).abs() < 2e-6,
                    "no sinks, output {i}: {g} vs {w}"
                );
            }
            assert!(moved > 0.05, "sinks changed the output by only {moved}");
        }
    }
}

/// A head whose sink dwarfs every score attends to (almost) nothing: its
/// output goes to zero rather than to an average of the values, which is
/// what sinks are for.
#[test]
fn a_dominant_sink_takes_the_attention_mass() {
    let seqs = two_seqs();
    let sinks = vec![60.0f32; HEADS];
    let got = paged(&seqs, &params(None, Some(&sinks))).unwrap();
    for out in &got {
        let worst = out.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(worst < 1e-12, "largest output {worst}");
    }
}

/// A sink far below every score contributes an exact zero to the
/// denominator and leaves the maximum alone: the output is the no-sink
/// output bit for bit (the sink path adds no rounding of its own).
#[test]
fn a_negligible_sink_leaves_attention_bit_for_bit() {
    let seqs = two_seqs();
    let sinks = vec![-1e30f32; HEADS];
    for window in [None, Some(7)] {
        let a = paged(&seqs, &params(window, Some(&sinks))).unwrap();
        let b = paged(&seqs, &params(window, None)).unwrap();
        for s in 0..2 {
            for (i, (x, y)) in a[s].iter().zip(&b[s]).enumerate() {
                assert_eq!(x.to_bits(), y.to_bits(), "seq {s} output {i}");
            }
        }
    }
}

/// Sinks from a checkpoint that do not fit the heads, or are not finite,
/// are refused with an error naming the op, not used.
#[test]
fn wrong_or_non_finite_sinks_are_refused() {
    let seqs = two_seqs();
    let short = vec![0.0f32; HEADS - 1];
    let e = paged(&seqs, &params(None, Some(&short)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("attention") && e.contains("5 attention sinks for 6 heads"),
        "{e}"
    );
    let mut nan = vec![0.0f32; HEADS];
    nan[3] = f32::NAN;
    let e = paged(&seqs, &params(None, Some(&nan)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not finite"), "{e}");
}

/// gpt-oss's clamped SwiGLU (`GptOssExperts._apply_gate`): gate clamped
/// above at the limit, up clamped to [-limit, limit], `(up + 1) * gate *
/// sigmoid(alpha * gate)`, checked in f64 over values inside and beyond
/// the limit, and at points worked by hand.
#[test]
fn clamped_swiglu_matches_its_definition() {
    let be = CpuBackend::new();
    let (alpha, limit) = (1.702f32, 7.0f32);
    let act = Activation::ClampedSwiglu { alpha, limit };
    let mut g: Vec<f32> = rand_vec(5000, 21).iter().map(|x| 12.0 * x).collect();
    let mut u: Vec<f32> = rand_vec(5000, 22).iter().map(|x| 12.0 * x).collect();
    // gate 10 -> 7, up -10 -> -7; gate -100 (sigmoid underflows); gate
    // and up exactly at the limit; zero.
    g.extend([10.0, -100.0, 7.0, 0.0, 1.0]);
    u.extend([-10.0, 3.0, 7.0, 5.0, 0.0]);
    let n = g.len();
    let gt = be.upload(&[1, n], g.clone()).unwrap();
    let ut = be.upload(&[1, n], u.clone()).unwrap();
    let got = be
        .to_host(&be.gated_activation(&gt, &ut, act).unwrap())
        .unwrap();
    for i in 0..n {
        let gc = (g[i] as f64).min(limit as f64);
        let uc = (u[i] as f64).clamp(-limit as f64, limit as f64);
        let want = (uc + 1.0) * gc / (1.0 + (-(alpha as f64) * gc).exp());
        assert!(
            (got[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
            "gate {} up {}: {} vs {want}",
            g[i],
            u[i],
            got[i]
        );
    }
    // By hand: (-7 + 1) * 7 * sigmoid(11.914) = -41.999719...
    let at = |x: f64| (-6.0 * 7.0 / (1.0 + (-11.914f64).exp()) - x).abs();
    assert!(at(got[n - 5] as f64) < 1e-4, "{}", got[n - 5]);
    assert!(got[n - 4].abs() < 1e-30, "{}", got[n - 4]);
    // gate 1, up 0: (0 + 1) * 1 * sigmoid(1.702) = 0.84579...
    assert!((got[n - 1] - 0.845_79).abs() < 1e-5, "{}", got[n - 1]);
    assert_eq!(got[n - 2], 0.0);
}

/// The clamped SwiGLU needs both projections: the one-input activation op
/// refuses it instead of computing half of it.
#[test]
fn clamped_swiglu_is_refused_as_a_plain_activation() {
    let be = CpuBackend::new();
    let mut x = be.upload(&[1, 4], vec![1.0; 4]).unwrap();
    let e = be
        .activation_inplace(
            &mut x,
            Activation::ClampedSwiglu {
                alpha: 1.702,
                limit: 7.0,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("gated_activation"), "{e}");
}

/// Paged attention with sinks against transformers' own gpt-oss
/// `eager_attention_forward` (`testdata/golden/attention_sinks.json`,
/// written by `scripts/golden/sinks_golden.py`): one sequence as a prefill
/// of all but its last token and then that token's decode, without and
/// with a sliding window.
#[test]
fn attention_sinks_match_transformers() {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/golden/attention_sinks.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("attention_sinks.json"))
            .unwrap();
    let n = |k: &str| doc[k].as_u64().unwrap() as usize;
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let (heads, kv_heads, hd, len) = (n("heads"), n("kv_heads"), n("head_dim"), n("len"));
    let (q, k, v, sinks) = (
        floats(&doc["q"]),
        floats(&doc["k"]),
        floats(&doc["v"]),
        floats(&doc["sinks"]),
    );
    let be = CpuBackend::new();
    for case in doc["cases"].as_array().unwrap() {
        let window = case["window"].as_u64().map(|w| w as usize);
        let want = floats(&case["out"]);
        let p = AttentionParams {
            n_heads: heads,
            n_kv_heads: kv_heads,
            head_dim: hd,
            scale: doc["scale"].as_f64().unwrap() as f32,
            window,
            softcap: None,
            sinks: Some(&sinks),
        };
        let spec = KvSpec {
            n_layers: 1,
            num_blocks: 4,
            block_size: 4,
            n_kv_heads: kv_heads,
            head_dim: hd,
        };
        // f32 keys and values, as in `paged`: checked to 2e-6.
        let mut cache = be
            .alloc_kv_cache_as(&spec, kiln_backend::KvDtype::F32)
            .unwrap();
        let mut got = Vec::new();
        for range in [0..len - 1, len - 1..len] {
            let toks: Vec<u32> = vec![0; range.len()];
            let mut step = StepInput::single_sequence(range.start, &toks, spec.block_size);
            step.seqs[0].block_table = vec![0, 1];
            let rows = |x: &[f32], w: usize| x[range.start * w..range.end * w].to_vec();
            let m = range.len();
            let qt = be.upload(&[m, heads * hd], rows(&q, heads * hd)).unwrap();
            let kt = be
                .upload(&[m, kv_heads * hd], rows(&k, kv_heads * hd))
                .unwrap();
            let vt = be
                .upload(&[m, kv_heads * hd], rows(&v, kv_heads * hd))
                .unwrap();
            be.write_kv(&mut cache, 0, &kt, &vt, &step).unwrap();
            got.extend(
                be.to_host(&be.attention(&qt, &cache, 0, &step, &p).unwrap())
                    .unwrap(),
            );
        }
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() < 2e-6,
                "window {window:?} output {i}: {g} vs {w}"
            );
        }
    }
}
