//! Matrix products for `Linear` layers: `y = x @ w^T + b`.
//!
//! Decode steps multiply a handful of rows by each weight matrix, which is
//! bound by memory bandwidth: a row-parallel dot-product kernel streams each
//! weight row once for all input rows (straight from quantized blocks where
//! the weight is quantized). Larger batches (prefill) go to the `gemm`
//! crate's blocked, cache-aware kernels, quantized weights a dequantized
//! panel at a time.

use rayon::prelude::*;

use super::qdot;
use super::weight::{CpuWeight, Storage};
use super::CpuTensor;
use crate::{BackendError, Result};

/// Up to this many input rows, the streaming kernel beats blocked GEMM.
const SMALL_M: usize = 8;
/// Output columns per parallel task in the streaming kernel.
const COLS_PER_TASK: usize = 32;
/// Weight elements dequantized at a time for a blocked GEMM on quantized weights.
const PANEL_ELEMS: usize = 1 << 16;

pub(super) fn linear(x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuTensor>) -> Result<CpuTensor> {
    let k = x.cols();
    let m = x.rows();
    if w.cols != k {
        return Err(BackendError::Shape {
            op: "linear",
            msg: format!(
                "input {:?} against weight [{}, {}]",
                x.shape, w.rows, w.cols
            ),
        });
    }
    let n = w.rows;
    if let Some(b) = bias {
        if b.data.len() != n {
            return Err(BackendError::Shape {
                op: "linear",
                msg: format!("bias of {} for {n} outputs", b.data.len()),
            });
        }
    }
    let mut out = vec![0f32; m * n];
    match &w.storage {
        Storage::F32(wd) if m <= SMALL_M => small_m(&mut out, m, n, |j, i| {
            dot(&x.data[i * k..(i + 1) * k], &wd[j * k..(j + 1) * k])
        }),
        Storage::Blocks {
            ty,
            bytes,
            row_bytes,
            ..
        } if m <= SMALL_M => {
            let inputs: Vec<qdot::BlockInput> =
                x.data.chunks_exact(k).map(qdot::BlockInput::new).collect();
            small_m(&mut out, m, n, |j, i| {
                qdot::dot_row(*ty, &bytes[j * row_bytes..(j + 1) * row_bytes], &inputs[i])
            })
        }
        Storage::F32(wd) => gemm_into(
            &mut out,
            &x.data,
            wd,
            m,
            n,
            k,
            n,
            rayon::current_num_threads(),
        ),
        Storage::Blocks { .. } => panel_gemm(&mut out, x, w),
    }
    if let Some(b) = bias {
        out.par_chunks_mut(n).for_each(|row| {
            row.iter_mut().zip(&b.data).for_each(|(y, b)| *y += b);
        });
    }
    let mut shape = x.shape.clone();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    CpuTensor::new(shape, out)
}

/// `out[:, 0..n] = x @ w^T` for row-major `x: [m, k]` and `w: [n, k]`, where
/// `out` rows are `ld` apart (so a panel can fill a band of a wider output).
#[allow(clippy::too_many_arguments)]
fn gemm_into(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    m: usize,
    n: usize,
    k: usize,
    ld: usize,
    threads: usize,
) {
    assert!(out.len() >= (m - 1) * ld + n && x.len() >= m * k && w.len() >= n * k);
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assert above bounds every access the strides describe: dst m×n
    // (row stride ld), lhs m×k (row stride k), rhs k×n read as the transpose of
    // the n×k weight (column stride k, row stride 1).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            ld as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// GEMM on a quantized weight: bands of weight rows are dequantized into a
/// small scratch panel and multiplied there, bands in parallel.
fn panel_gemm(out: &mut [f32], x: &CpuTensor, w: &CpuWeight) {
    let (m, n, k) = (x.rows(), w.rows, w.cols);
    let band = (PANEL_ELEMS / k).clamp(16, n.max(16));
    // Each band writes only its own columns of `out`: gather per band, then scatter.
    let results: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(band))
        .into_par_iter()
        .map(|b| {
            let j0 = b * band;
            let rows = band.min(n - j0);
            let mut panel = vec![0f32; rows * k];
            w.rows_f32(j0, &mut panel);
            let mut part = vec![0f32; m * rows];
            gemm_into(&mut part, &x.data, &panel, m, rows, k, rows, 1);
            (j0, part)
        })
        .collect();
    for (j0, part) in results {
        let rows = part.len() / m;
        for (i, src) in part.chunks_exact(rows).enumerate() {
            out[i * n + j0..i * n + j0 + rows].copy_from_slice(src);
        }
    }
}

/// `out[i][j] = f(j, i)` for few rows `i`, parallel over output columns `j`
/// so that each weight row is streamed from memory once for all inputs.
fn small_m(out: &mut [f32], m: usize, n: usize, f: impl Fn(usize, usize) -> f32 + Sync) {
    if m == 1 {
        out.par_chunks_mut(COLS_PER_TASK)
            .enumerate()
            .for_each(|(band, o)| {
                for (c, v) in o.iter_mut().enumerate() {
                    *v = f(band * COLS_PER_TASK + c, 0);
                }
            });
        return;
    }
    // Tasks fill disjoint bands of the transposed result `[n, m]`, which is then
    // transposed into place.
    let mut t = vec![0f32; n * m];
    t.par_chunks_mut(COLS_PER_TASK * m)
        .enumerate()
        .for_each(|(band, o)| {
            for (c, col) in o.chunks_exact_mut(m).enumerate() {
                for (i, v) in col.iter_mut().enumerate() {
                    *v = f(band * COLS_PER_TASK + c, i);
                }
            }
        });
    for (j, col) in t.chunks_exact(m).enumerate() {
        for (i, v) in col.iter().enumerate() {
            out[i * n + j] = *v;
        }
    }
}

/// Dot product, using AVX2+FMA when the CPU has them.
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features the function is compiled for were just detected.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_generic(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes::<true>(a, b)
}

fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes::<false>(a, b)
}

/// Sixteen independent accumulators let the compiler vectorise without
/// reassociating a single running sum.
#[inline(always)]
fn dot_lanes<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; L];
    let ca = a.chunks_exact(L);
    let cb = b.chunks_exact(L);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for l in 0..L {
            acc[l] = if FMA {
                xa[l].mul_add(xb[l], acc[l])
            } else {
                acc[l] + xa[l] * xb[l]
            };
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    // Pairwise reduction of the lanes.
    let mut width = L / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0] + tail
}
