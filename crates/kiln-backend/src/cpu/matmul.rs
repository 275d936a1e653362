//! Matrix products for `Linear` layers: `y = x @ w^T + b`, on f32 weights or
//! on ggml blocks (Q4_0, Q4_1, Q8_0) read as they are stored.
//!
//! **Every output element is computed by the same sequence of floating-point
//! operations, whatever the shape of the batch.** That is what makes a
//! sequence's output identical alone or batched with others, and with its
//! prompt prefilled in one step or in chunks (the engine's batch-invariance
//! guarantee). For weight row `j` and input row `i`, with the row split into
//! 32-element blocks `b`:
//!
//! ```text
//! s_b  = w[0..8]·x[0..8]  then += w[8..16]·x[8..16], [16..24], [24..32]   (8 lanes, FMA)
//! acc  = fma(d_b, s_b, acc)                                (8 lanes; d_b = 1 for f32)
//! off  = fma(c_b, sum(x_i in block b), off)                (scalar; Q4 formats' offsets)
//! y_ij = hsum(acc) + off + tail                            (tail: f32 rows not a multiple of 32)
//! ```
//!
//! Kernels differ only in how many rows of `x` (MR) and of `w` (NR) they
//! keep in registers at once, which changes speed, never results. There is no
//! switch to a differently-ordered GEMM for large batches. Blocks are
//! expanded to f32 in registers; activations are never quantized.

use rayon::prelude::*;

use super::weight::{CpuWeight, Storage};
use super::CpuTensor;
use crate::quant::GgmlType;
use crate::{BackendError, Result};

/// Elements per block (f32 rows are processed in the same 32-element blocks).
const QK: usize = 32;
/// Most weight rows per parallel task.
const MAX_BAND: usize = 64;
/// Input rows processed against one band before moving on, so they stay in cache.
const ROW_CHUNK: usize = 64;

/// The storage formats the kernels read, as a const parameter.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Format {
    F32,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl Format {
    fn of(w: &CpuWeight) -> Option<(Format, &[u8], &[f32], usize)> {
        match &w.storage {
            Storage::F32(v) => Some((Format::F32, &[], v, w.cols * 4)),
            Storage::Blocks {
                ty,
                bytes,
                row_bytes,
                ..
            } => {
                let f = match ty {
                    GgmlType::Q8_0 => Format::Q8_0,
                    GgmlType::Q4_0 => Format::Q4_0,
                    GgmlType::Q4_1 => Format::Q4_1,
                    _ => return None,
                };
                Some((f, bytes, &[], *row_bytes))
            }
        }
    }

    /// Whether the format has a per-block offset multiplying the input's block sum.
    fn has_offset(self) -> bool {
        matches!(self, Format::Q4_0 | Format::Q4_1)
    }
}

/// Everything a kernel reads, as raw parts (tasks run in parallel on bands).
#[derive(Clone, Copy)]
struct Operands<'a> {
    fmt: Format,
    /// Block rows (quantized formats).
    wq: &'a [u8],
    /// f32 rows (f32 format).
    wf: &'a [f32],
    row_bytes: usize,
    x: &'a [f32],
    /// Block sums of `x`, `[m, k / 32]` (formats with offsets).
    sums: &'a [f32],
    n: usize,
    k: usize,
}

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
    let Some((fmt, wq, wf, row_bytes)) = Format::of(w) else {
        return Err(BackendError::Invalid {
            op: "linear",
            msg: "weight blocks of a type the CPU kernels do not read".into(),
        });
    };
    let nb = k / QK;
    let sums: Vec<f32> = if fmt.has_offset() {
        x.data
            .chunks_exact(k)
            .flat_map(|row| row.chunks_exact(QK).map(|b| b.iter().sum::<f32>()))
            .collect()
    } else {
        Vec::new()
    };
    debug_assert!(sums.is_empty() || sums.len() == m * nb);
    let ops = Operands {
        fmt,
        wq,
        wf,
        row_bytes,
        x: &x.data,
        sums: &sums,
        n,
        k,
    };
    let mut out = vec![0f32; m * n];
    let out_ptr = SendPtr(out.as_mut_ptr());
    // Enough tasks per thread that uneven finishing times even out.
    let band = (n / (rayon::current_num_threads() * 8)).clamp(4, MAX_BAND);
    (0..n.div_ceil(band)).into_par_iter().for_each(|b| {
        let j0 = b * band;
        let j1 = (j0 + band).min(n);
        for i0 in (0..m).step_by(ROW_CHUNK) {
            let i1 = (i0 + ROW_CHUNK).min(m);
            // SAFETY: this task writes only columns j0..j1 of rows i0..i1 of `out`
            // (m x n); no other task writes those columns.
            unsafe { compute_block(&ops, i0, i1, j0, j1, out_ptr.get()) };
        }
    });
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

/// A raw output pointer that tasks writing disjoint parts may share.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

impl SendPtr {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the field).
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: used only to write disjoint elements from different tasks (see `linear`).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

/// Computes `out[i][j]` for `i in i0..i1`, `j in j0..j1`.
///
/// # Safety
/// `out` points to an `m x n` buffer; no other thread touches these elements.
unsafe fn compute_block(ops: &Operands, i0: usize, i1: usize, j0: usize, j1: usize, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::available() {
            // SAFETY: the CPU features were detected; the caller's contract carries over.
            unsafe { avx2::block(ops, i0, i1, j0, j1, out) };
            return;
        }
    }
    for i in i0..i1 {
        for j in j0..j1 {
            // SAFETY: i < m and j < n, inside the buffer; the caller owns the element.
            unsafe { *out.add(i * ops.n + j) = portable_element(ops, i, j) };
        }
    }
}

/// The canonical computation of one element, without SIMD (for CPUs without
/// AVX2/FMA; the lane structure is kept so the code reads like the AVX2 one).
fn portable_element(ops: &Operands, i: usize, j: usize) -> f32 {
    let k = ops.k;
    let nb = k / QK;
    let x = &ops.x[i * k..(i + 1) * k];
    let mut acc = [0f32; 8];
    let mut off = 0f32;
    let mut w = [0f32; QK];
    for b in 0..nb {
        let (d, c) = match ops.fmt {
            Format::F32 => {
                w.copy_from_slice(&ops.wf[j * k + b * QK..j * k + (b + 1) * QK]);
                (1.0, 0.0)
            }
            fmt => {
                let (_, bb) = match fmt {
                    Format::Q8_0 => GgmlType::Q8_0,
                    Format::Q4_0 => GgmlType::Q4_0,
                    _ => GgmlType::Q4_1,
                }
                .block();
                let p = &ops.wq[j * ops.row_bytes + b * bb..j * ops.row_bytes + (b + 1) * bb];
                let h = |o: usize| half::f16::from_le_bytes([p[o], p[o + 1]]).to_f32();
                let d = h(0);
                match fmt {
                    Format::Q8_0 => {
                        for (wv, &q) in w.iter_mut().zip(&p[2..34]) {
                            *wv = (q as i8) as f32;
                        }
                        (d, 0.0)
                    }
                    _ => {
                        let (qs, c) = if fmt == Format::Q4_0 {
                            (&p[2..18], -8.0 * d)
                        } else {
                            (&p[4..20], h(2))
                        };
                        for (l, &q) in qs.iter().enumerate() {
                            w[l] = (q & 0x0f) as f32;
                            w[l + 16] = (q >> 4) as f32;
                        }
                        (d, c)
                    }
                }
            }
        };
        let xb = &x[b * QK..(b + 1) * QK];
        let mut s = [0f32; 8];
        for q in 0..4 {
            for l in 0..8 {
                s[l] = if q == 0 {
                    w[l] * xb[l]
                } else {
                    w[q * 8 + l].mul_add(xb[q * 8 + l], s[l])
                };
            }
        }
        for l in 0..8 {
            acc[l] = d.mul_add(s[l], acc[l]);
        }
        if ops.fmt.has_offset() {
            off = c.mul_add(ops.sums[i * nb + b], off);
        }
    }
    let mut y = hsum8(&acc) + off;
    for (t, &xt) in x.iter().enumerate().skip(nb * QK) {
        y += ops.wf[j * k + t] * xt;
    }
    y
}

/// Sum of eight lanes in the order the AVX2 `hsum` adds them.
fn hsum8(a: &[f32; 8]) -> f32 {
    let s = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let t = [s[0] + s[2], s[1] + s[3]];
    t[0] + t[1]
}

/// Whether the CPU has AVX2, FMA and F16C (checked once).
pub(super) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Format, Operands, QK};

    /// Whether the CPU has AVX2, FMA and F16C (checked once).
    pub(super) fn available() -> bool {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        })
    }

    /// Horizontal sum of eight lanes: (0+4, 1+5, 2+6, 3+7), then pairs, then the two.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The two f16 values at `p` as f32, in lanes 0 and 1.
    ///
    /// # Safety
    /// Four bytes are readable at `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16x2(p: *const u8) -> __m128 {
        // SAFETY: guaranteed by the caller.
        _mm_cvtph_ps(_mm_cvtsi32_si128(unsafe {
            std::ptr::read_unaligned(p as *const i32)
        }))
    }

    /// Eight signed bytes at `p` as f32.
    ///
    /// # Safety
    /// Eight bytes are readable at `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn i8x8(p: *const u8) -> __m256 {
        // SAFETY: guaranteed by the caller.
        let v = unsafe { _mm_loadl_epi64(p as *const __m128i) };
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
    }

    /// One weight block expanded: 32 values as four vectors, its scale `d`
    /// (broadcast) and its offset coefficient `c`.
    struct Block {
        w: [__m256; 4],
        d: __m256,
        c: f32,
    }

    /// Reads block `b` of weight row `j`.
    ///
    /// # Safety
    /// `j < n` and `b < k / 32` for the operands' shapes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load<const F: u8>(ops: &Operands, j: usize, b: usize) -> Block {
        // SAFETY (all pointer reads below): block b of row j lies inside the
        // weight buffer, whose size was checked when it was uploaded.
        unsafe {
            if F == Format::F32 as u8 {
                let p = ops.wf.as_ptr().add(j * ops.k + b * QK);
                return Block {
                    w: [
                        _mm256_loadu_ps(p),
                        _mm256_loadu_ps(p.add(8)),
                        _mm256_loadu_ps(p.add(16)),
                        _mm256_loadu_ps(p.add(24)),
                    ],
                    d: _mm256_set1_ps(1.0),
                    c: 0.0,
                };
            }
            if F == Format::Q8_0 as u8 {
                let p = ops.wq.as_ptr().add(j * ops.row_bytes + b * 34);
                return Block {
                    w: [
                        i8x8(p.add(2)),
                        i8x8(p.add(10)),
                        i8x8(p.add(18)),
                        i8x8(p.add(26)),
                    ],
                    d: _mm256_broadcastss_ps(f16x2(p)),
                    c: 0.0,
                };
            }
            let (qs, d, c) = if F == Format::Q4_0 as u8 {
                let p = ops.wq.as_ptr().add(j * ops.row_bytes + b * 18);
                let d = f16x2(p);
                (p.add(2), d, -8.0 * _mm_cvtss_f32(d))
            } else {
                let p = ops.wq.as_ptr().add(j * ops.row_bytes + b * 20);
                // d and m are adjacent: one conversion gives both.
                let dm = f16x2(p);
                (p.add(4), dm, _mm_cvtss_f32(_mm_movehdup_ps(dm)))
            };
            // Widen bytes to 32-bit lanes, then split nibbles with a mask and a shift.
            let mask = _mm256_set1_epi32(0x0f);
            let b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs as *const __m128i));
            let b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs.add(8) as *const __m128i));
            Block {
                w: [
                    _mm256_cvtepi32_ps(_mm256_and_si256(b0, mask)),
                    _mm256_cvtepi32_ps(_mm256_and_si256(b1, mask)),
                    _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(b0)),
                    _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(b1)),
                ],
                d: _mm256_broadcastss_ps(d),
                c,
            }
        }
    }

    /// `sum(c[b] * s[b])` in a fixed order: eight lanes over `b`, their
    /// `hsum`, then the remaining `b` one by one.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn offset_dot(c: &[f32], s: &[f32]) -> f32 {
        let n = c.len().min(s.len());
        let mut acc = _mm256_setzero_ps();
        let mut b = 0;
        while b + 8 <= n {
            // SAFETY: b + 8 <= n, both slices hold n floats.
            unsafe {
                acc = _mm256_fmadd_ps(
                    _mm256_loadu_ps(c.as_ptr().add(b)),
                    _mm256_loadu_ps(s.as_ptr().add(b)),
                    acc,
                );
            }
            b += 8;
        }
        let mut y = hsum(acc);
        while b < n {
            y = c[b].mul_add(s[b], y);
            b += 1;
        }
        y
    }

    /// `MR` input rows from `i` times `NR` weight rows from `j`, into `out`.
    /// `cbuf` is scratch for the weight rows' offset coefficients (`NR * k / 32`).
    ///
    /// # Safety
    /// `i + MR <= m`, `j + NR <= n`; the caller owns those output elements.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const F: u8, const MR: usize, const NR: usize>(
        ops: &Operands,
        i: usize,
        j: usize,
        cbuf: &mut [f32],
        out: *mut f32,
    ) {
        let k = ops.k;
        let nb = k / QK;
        let offsets = F == Format::Q4_0 as u8 || F == Format::Q4_1 as u8;
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        for b in 0..nb {
            for jj in 0..NR {
                // SAFETY: j + jj < n and b < nb.
                let blk = unsafe { load::<F>(ops, j + jj, b) };
                if offsets {
                    cbuf[jj * nb + b] = blk.c;
                }
                for (ii, acc_i) in acc.iter_mut().enumerate() {
                    // SAFETY: row i + ii < m of x holds k >= 32 (b + 1) floats.
                    unsafe {
                        let xp = ops.x.as_ptr().add((i + ii) * k + b * QK);
                        let mut s = _mm256_mul_ps(blk.w[0], _mm256_loadu_ps(xp));
                        s = _mm256_fmadd_ps(blk.w[1], _mm256_loadu_ps(xp.add(8)), s);
                        s = _mm256_fmadd_ps(blk.w[2], _mm256_loadu_ps(xp.add(16)), s);
                        s = _mm256_fmadd_ps(blk.w[3], _mm256_loadu_ps(xp.add(24)), s);
                        acc_i[jj] = _mm256_fmadd_ps(blk.d, s, acc_i[jj]);
                    }
                }
            }
        }
        for (ii, acc_i) in acc.iter().enumerate() {
            for (jj, a) in acc_i.iter().enumerate() {
                let mut y = hsum(*a);
                if offsets {
                    y += offset_dot(
                        &cbuf[jj * nb..(jj + 1) * nb],
                        &ops.sums[(i + ii) * nb..(i + ii + 1) * nb],
                    );
                }
                for t in nb * QK..k {
                    y += ops.wf[(j + jj) * k + t] * ops.x[(i + ii) * k + t];
                }
                // SAFETY: inside the buffer and owned by the caller.
                unsafe { *out.add((i + ii) * ops.n + j + jj) = y };
            }
        }
    }

    /// Covers rows `i0..i1` x columns `j0..j1` with tiles of up to 6 input rows
    /// by one weight row (one row by one in decode).
    ///
    /// # Safety
    /// As `compute_block`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn block(
        ops: &Operands,
        i0: usize,
        i1: usize,
        j0: usize,
        j1: usize,
        out: *mut f32,
    ) {
        // SAFETY: every tile below stays inside i0..i1 x j0..j1.
        unsafe {
            match ops.fmt {
                Format::F32 => cover::<{ Format::F32 as u8 }>(ops, i0, i1, j0, j1, out),
                Format::Q8_0 => cover::<{ Format::Q8_0 as u8 }>(ops, i0, i1, j0, j1, out),
                Format::Q4_0 => cover::<{ Format::Q4_0 as u8 }>(ops, i0, i1, j0, j1, out),
                Format::Q4_1 => cover::<{ Format::Q4_1 as u8 }>(ops, i0, i1, j0, j1, out),
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn cover<const F: u8>(
        ops: &Operands,
        i0: usize,
        i1: usize,
        j0: usize,
        j1: usize,
        out: *mut f32,
    ) {
        let mut cbuf = vec![0f32; 4 * (ops.k / QK)];
        let c = &mut cbuf[..];
        // SAFETY (all tiles): each stays inside i0..i1 x j0..j1, which the caller owns.
        unsafe {
            // A tile's input rows stay in L1 while the band's weight rows pass by.
            let mut i = i0;
            while i < i1 {
                let rows = (i1 - i).min(MR_MAX);
                for j in j0..j1 {
                    match rows {
                        1 => tile::<F, 1, 1>(ops, i, j, c, out),
                        2 => tile::<F, 2, 1>(ops, i, j, c, out),
                        3 => tile::<F, 3, 1>(ops, i, j, c, out),
                        4 => tile::<F, 4, 1>(ops, i, j, c, out),
                        5 => tile::<F, 5, 1>(ops, i, j, c, out),
                        _ => tile::<F, MR_MAX, 1>(ops, i, j, c, out),
                    }
                }
                i += rows;
            }
        }
    }

    /// Input rows per tile in prefill: enough to amortise expanding a weight
    /// block, few enough that accumulators and the block stay in registers.
    const MR_MAX: usize = 6;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::tests::{rand_vec as rand, random_blocks};
    use crate::WeightData;

    fn weights(k: usize, n: usize) -> Vec<(GgmlType, CpuWeight)> {
        let mut out = vec![(
            GgmlType::F32,
            CpuWeight::new(n, k, WeightData::F32(rand(n * k, 3))).unwrap(),
        )];
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            let bytes = random_blocks(ty, n * k / 32, 9);
            out.push((
                ty,
                CpuWeight::new(n, k, WeightData::Ggml { ty, bytes }).unwrap(),
            ));
        }
        out
    }

    /// The property the engine's batch invariance rests on: a row's result does
    /// not depend on which other rows share the call, bit for bit.
    #[test]
    fn each_row_is_bitwise_independent_of_the_batch() {
        let (k, n) = (96, 150);
        let xs = rand(37 * k, 5);
        for (ty, w) in weights(k, n) {
            let all = linear(&CpuTensor::new(vec![37, k], xs.clone()).unwrap(), &w, None).unwrap();
            for (start, len) in [(0usize, 1usize), (5, 1), (3, 2), (10, 5), (30, 7), (1, 36)] {
                let part = CpuTensor::new(vec![len, k], xs[start * k..(start + len) * k].to_vec())
                    .unwrap();
                let y = linear(&part, &w, None).unwrap();
                let want = &all.data[start * n..(start + len) * n];
                assert!(
                    y.data
                        .iter()
                        .zip(want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ty:?}: rows {start}..{} differ when computed as a batch of {len}",
                    start + len
                );
            }
        }
    }

    #[test]
    fn the_portable_kernel_agrees_with_the_simd_one() {
        let (k, n, m) = (64, 9, 3);
        let x = rand(m * k, 8);
        for (ty, w) in weights(k, n) {
            let (fmt, wq, wf, row_bytes) = Format::of(&w).unwrap();
            let sums: Vec<f32> = x.chunks_exact(QK).map(|b| b.iter().sum()).collect();
            let ops = Operands {
                fmt,
                wq,
                wf,
                row_bytes,
                x: &x,
                sums: &sums,
                n,
                k,
            };
            let y = linear(&CpuTensor::new(vec![m, k], x.clone()).unwrap(), &w, None).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let p = portable_element(&ops, i, j);
                    let a = y.data[i * n + j];
                    assert!(
                        (p - a).abs() <= 1e-4 * (1.0 + a.abs()),
                        "{ty:?} ({i},{j}): {p} vs {a}"
                    );
                }
            }
        }
    }
}
