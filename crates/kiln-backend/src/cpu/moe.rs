//! A mixture-of-experts layer's routed experts in one call
//! ([`crate::Backend::moe_experts`]), spread over the thread pool.
//!
//! Run one at a time, an expert's products are small: a decode step gives
//! each of its (say) 8 experts one row, so every product is one short pass
//! over a few megabytes of weights with a barrier at its end, and the cores
//! wait at 24 barriers a layer. Here the experts are tasks of one parallel
//! loop; each still splits its products into bands of weight rows, and
//! rayon's work stealing lets an idle core take bands of any expert. No
//! arithmetic changes: every product is [`super::matmul::linear`]'s, whose
//! output elements do not depend on how the work is split, and the experts'
//! outputs are added to their rows afterwards, one expert after another in
//! the order given, exactly as the per-expert sequence does. A token's
//! result is therefore the same bits whatever the thread count and whatever
//! else shares the step.

use rayon::prelude::*;

use super::matmul;
use super::ops;
use super::tensor::CpuTensor;
use super::weight::CpuWeight;
use crate::{Activation, MoeExpert, Result};

/// Experts computed in parallel before their outputs are added: enough
/// tasks for several cores (a decode step's usual 8 experts are one group),
/// few enough that a prompt's outputs held at once stay a few megabytes.
const EXPERTS_AT_ONCE: usize = 16;

/// The experts' summed, scaled outputs for `x: [n, d]` (see the module).
pub(super) fn moe_experts(
    x: &CpuTensor,
    experts: &[MoeExpert<'_, CpuWeight, CpuTensor>],
    act: Activation,
) -> Result<CpuTensor> {
    let (n, d) = (x.rows(), x.cols());
    for e in experts {
        e.check(n)?;
    }
    let mut out = vec![0f32; n * d];
    // A few experts' outputs at a time, so a long prompt's (every expert
    // with many rows) are not all held at once; the order of the adds is
    // the same however the experts are grouped.
    for group in experts.chunks(EXPERTS_AT_ONCE) {
        let ys = group
            .par_iter()
            .map(|e| {
                if e.rows.is_empty() {
                    return Ok(None);
                }
                let xs = CpuTensor::new(
                    vec![e.rows.len(), d],
                    crate::rows::gather_rows(&x.data, d, e.rows)?,
                )?;
                let g = matmul::linear(&xs, e.gate, e.bias(0))?;
                let u = matmul::linear(&xs, e.up, e.bias(1))?;
                let a = ops::gated_activation(&g, u, act)?;
                matmul::linear(&a, e.down, e.bias(2)).map(Some)
            })
            .collect::<Result<Vec<_>>>()?;
        for (e, y) in group.iter().zip(&ys) {
            if let Some(y) = y {
                crate::rows::add_rows_scaled(&mut out, d, &y.data, e.rows, e.scales)?;
            }
        }
    }
    CpuTensor::new(vec![n, d], out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_support::{float_weight_bytes, rand_vec, random_blocks};
    use crate::{GgmlType, WeightData};

    fn weight(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> CpuWeight {
        let bytes = if ty == GgmlType::F16 {
            float_weight_bytes(ty, &rand_vec(rows * cols, seed))
        } else {
            random_blocks(ty, rows * cols / ty.block().0, seed)
        };
        let bytes = bytes.into();
        CpuWeight::new(rows, cols, WeightData::Ggml { ty, bytes }).unwrap()
    }

    /// The per-expert sequence the trait's default runs, one op at a time
    /// (the CPU backend's `gather_rows`, `linear`, `gated_activation` and
    /// `add_rows_scaled` are these functions).
    fn one_by_one(
        x: &CpuTensor,
        experts: &[MoeExpert<'_, CpuWeight, CpuTensor>],
        act: Activation,
    ) -> Vec<f32> {
        let d = x.cols();
        let mut out = vec![0f32; x.data.len()];
        for e in experts {
            let xs = CpuTensor::new(
                vec![e.rows.len(), d],
                crate::rows::gather_rows(&x.data, d, e.rows).unwrap(),
            )
            .unwrap();
            let g = matmul::linear(&xs, e.gate, e.bias(0)).unwrap();
            let u = matmul::linear(&xs, e.up, e.bias(1)).unwrap();
            let a = ops::gated_activation(&g, u, act).unwrap();
            let y = matmul::linear(&a, e.down, e.bias(2)).unwrap();
            crate::rows::add_rows_scaled(&mut out, d, &y.data, e.rows, e.scales).unwrap();
        }
        out
    }

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The fused call computes the per-expert sequence's bits, on one
    /// thread and on several, and a token's row is the same computed alone
    /// or with the rest of the step, for packed block formats and floats.
    #[test]
    fn fused_experts_match_the_sequence_bit_for_bit_at_any_thread_count() {
        for ty in [GgmlType::Q8_0, GgmlType::Q4K, GgmlType::F16] {
            let (d, ff, tokens) = (256, 256, 9);
            // More experts than one parallel group holds.
            let n_experts = EXPERTS_AT_ONCE as u64 + 4;
            let w: Vec<[CpuWeight; 3]> = (0..n_experts)
                .map(|e| {
                    [
                        weight(ty, ff, d, 10 * e + 1),
                        weight(ty, ff, d, 10 * e + 2),
                        weight(ty, d, ff, 10 * e + 3),
                    ]
                })
                .collect();
            // Tokens of each expert, ascending, and made-up router weights.
            let routes: Vec<(Vec<u32>, Vec<f32>)> = (0..n_experts as u32)
                .map(|e| {
                    let rows: Vec<u32> = (0..tokens as u32).filter(|t| (t + e) % 3 != 0).collect();
                    let scales = rows.iter().map(|&t| 0.1 + 0.05 * (t + e) as f32).collect();
                    (rows, scales)
                })
                .collect();
            // Every other expert with gate, up and down biases (gpt-oss).
            let b: Vec<[CpuTensor; 3]> = (0..n_experts)
                .map(|e| {
                    let t =
                        |n: usize, seed: u64| CpuTensor::new(vec![n], rand_vec(n, seed)).unwrap();
                    [t(ff, 100 + e), t(ff, 200 + e), t(d, 300 + e)]
                })
                .collect();
            let experts: Vec<MoeExpert<'_, CpuWeight, CpuTensor>> = w
                .iter()
                .zip(&routes)
                .zip(&b)
                .enumerate()
                .map(
                    |(i, (([gate, up, down], (rows, scales)), [bg, bu, bd]))| MoeExpert {
                        gate,
                        up,
                        down,
                        rows,
                        scales,
                        biases: (i % 2 == 1).then_some([bg, bu, bd]),
                    },
                )
                .collect();
            let x = CpuTensor::new(vec![tokens, d], rand_vec(tokens * d, 7)).unwrap();
            let want = bits(&one_by_one(&x, &experts, Activation::Silu));
            for threads in [1, 2, 3] {
                let got = pool(threads)
                    .install(|| moe_experts(&x, &experts, Activation::Silu))
                    .unwrap();
                assert_eq!(bits(&got.data), want, "{ty:?} on {threads} threads");
            }
            // Token 4 alone: its experts, each with one row.
            let t = 4u32;
            let alone_routes: Vec<(Vec<u32>, Vec<f32>)> = routes
                .iter()
                .map(|(rows, scales)| match rows.iter().position(|&r| r == t) {
                    Some(i) => (vec![0], vec![scales[i]]),
                    None => (vec![], vec![]),
                })
                .collect();
            let alone: Vec<MoeExpert<'_, CpuWeight, CpuTensor>> = experts
                .iter()
                .zip(&alone_routes)
                .map(|(e, (rows, scales))| MoeExpert { rows, scales, ..*e })
                .collect();
            let xt = CpuTensor::new(
                vec![1, d],
                x.data[t as usize * d..(t as usize + 1) * d].to_vec(),
            )
            .unwrap();
            let got = pool(2)
                .install(|| moe_experts(&xt, &alone, Activation::Silu))
                .unwrap();
            let row = &want[t as usize * d..(t as usize + 1) * d];
            assert_eq!(bits(&got.data), row, "{ty:?}: token {t} alone");
        }
    }

    /// Rows past the input and scale counts that differ from the row count
    /// are refused before any work.
    #[test]
    fn bad_routes_are_refused() {
        let w = weight(GgmlType::Q8_0, 32, 64, 1);
        let d = weight(GgmlType::Q8_0, 64, 32, 2);
        let x = CpuTensor::new(vec![2, 64], rand_vec(128, 3)).unwrap();
        let e = |rows: &'static [u32], scales: &'static [f32]| MoeExpert {
            gate: &w,
            up: &w,
            down: &d,
            rows,
            scales,
            biases: None,
        };
        assert!(moe_experts(&x, &[e(&[2], &[1.0])], Activation::Silu).is_err());
        assert!(moe_experts(&x, &[e(&[0, 1], &[1.0])], Activation::Silu).is_err());
        assert!(moe_experts(&x, &[e(&[0, 1], &[1.0, 0.5])], Activation::Silu).is_ok());
    }
}
