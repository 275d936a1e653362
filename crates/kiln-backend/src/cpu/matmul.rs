//! Matrix products for `Linear` layers, `y = x @ w^T + b`, computed from the
//! weights as they are stored: F32, F16, BF16 or any ggml block format.
//!
//! **Every output element is computed by the same sequence of operations,
//! whatever the shape of the batch and whichever SIMD kernel runs.** That is
//! what makes a sequence's output identical alone or batched with others, and
//! with its prompt prefilled in one step or in chunks (the engine's
//! batch-invariance guarantee). Each family of formats has its canonical
//! computation:
//!
//! - Float weights (F32, F16, BF16): [`super::float_packed`], one FMA per
//!   element, in order, over a transposed copy of the weights.
//! - Block formats repacked at load: [`super::packed`].
//! - Block formats with `KILN_CPU_REPACK=0`, computed from the file's rows
//!   below: for input row `i` and weight row `j`, with the row split into
//!   32-element blocks `b`, the weights decoded to codes, scales and
//!   coefficients ([`super::blocks`]) against the activation quantized per
//!   32-block ([`super::actq`]):
//! ```text
//! L_b[l] = sum of code[t] * qx[t] for t in 4l..4l+4      (8 lanes, exact integers)
//! acc[l] = fma(float(L_b[l]) * dx_b, scale[l < 4 ? 2b : 2b + 1], acc[l])
//! y_ij   = hsum(acc) + offset_dot(coef, xs)   (xs: dx * sum(qx) per granule)
//! ```
//!
//! `hsum` adds lanes as (0+4, 1+5, 2+6, 3+7), then pairs, then the two;
//! `offset_dot` runs eight lanes over the granules, their `hsum`, then the
//! rest one by one. Kernels differ only in how many rows they keep in
//! registers and which instructions compute the exact integer sums (AVX2
//! `maddubs`, AVX-VNNI or AVX512-VNNI `dpbusd`), which changes speed, never
//! results: the portable code below is bit-for-bit the same computation.

use rayon::prelude::*;

use super::actq::{ActBits, ActLayout, QuantizedRows};
use super::arch::portable;
#[cfg(target_arch = "x86_64")]
use super::arch::x86;
use super::blocks::{IntFormat, IntOperands};
use super::float_packed::FloatOperands;
use super::isa;
use super::packed::{PackedOperands, PackedWeight, NR};
use super::tensor::CpuTensor;
use super::weight::CpuWeight;
use crate::{BackendError, Result};

/// Most weight rows per parallel task.
const MAX_BAND: usize = 64;
/// Input rows processed against one band before moving on, so they stay in cache.
const ROW_CHUNK: usize = 64;

pub(super) fn linear(x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuTensor>) -> Result<CpuTensor> {
    linear_with(x, w, bias, ActBits::configured())
}

/// [`linear`] of `x` against each of `ws`, one output per weight, each
/// the same bits `linear` gives (see `Backend::linear_many`). Where every
/// weight is packed, the input is quantized once and the weights' bands
/// run as one parallel pass, in order, so a thread reading the end of one
/// weight goes on into the next with its prefetches already ahead;
/// otherwise each weight is a `linear` of its own.
pub(super) fn linear_many(
    x: &CpuTensor,
    ws: &[(&CpuWeight, Option<&CpuTensor>)],
) -> Result<Vec<CpuTensor>> {
    let packed: Option<Vec<&PackedWeight>> = ws.iter().map(|(w, _)| w.packed.as_deref()).collect();
    match packed {
        Some(packed) if ws.len() > 1 => packed_products(x, ws, &packed, ActBits::configured()),
        _ => ws.iter().map(|(w, b)| linear(x, w, *b)).collect(),
    }
}

/// The products of `x` with each of `ws`, whose interleaved layouts are
/// `packed`, activations quantized once to `bits`: every weight's bands
/// of groups are tasks of one parallel pass, in order.
fn packed_products(
    x: &CpuTensor,
    ws: &[(&CpuWeight, Option<&CpuTensor>)],
    packed: &[&PackedWeight],
    bits: ActBits,
) -> Result<Vec<CpuTensor>> {
    for (w, b) in ws {
        check_shapes(x, w, *b)?;
    }
    let (m, k) = (x.rows(), x.cols());
    let quantized = QuantizedRows::with_layout(&x.data, k, bits, ActLayout::Split);
    let ops: Vec<PackedOperands> = packed
        .iter()
        .zip(ws)
        .map(|(p, (w, _))| PackedOperands::new(p, &quantized, w.rows, k))
        .collect();
    // Every kernel writes each output element once, so the buffers start
    // unwritten: zeroing them took 4% of a prompt's time.
    let mut outs: Vec<Vec<f32>> = ws
        .iter()
        .map(|(w, _)| Vec::with_capacity(m * w.rows))
        .collect();
    let ptrs: Vec<SendPtr> = outs.iter_mut().map(|o| SendPtr(o.as_mut_ptr())).collect();
    let band = band_groups(packed.iter().map(|p| p.groups).sum());
    let tasks: Vec<(usize, usize, usize)> = packed
        .iter()
        .enumerate()
        .flat_map(|(w, p)| {
            (0..p.groups)
                .step_by(band)
                .map(move |g0| (w, g0, (g0 + band).min(p.groups)))
        })
        .collect();
    tasks.par_iter().for_each(|&(w, g0, g1)| {
        // The rows in chunks, so the band's weights stay in cache while
        // they pass by.
        for i0 in (0..m).step_by(ROW_CHUNK) {
            let i1 = (i0 + ROW_CHUNK).min(m);
            // SAFETY: this task writes only columns of groups g0..g1 of
            // rows i0..i1 of weight w's output (m x its rows); no other
            // task writes those.
            unsafe { compute_packed(&ops[w], i0, i1, g0, g1, ptrs[w].get()) };
        }
    });
    outs.into_iter()
        .zip(ws)
        .map(|(o, (w, b))| finish(x, written(o, m * w.rows), w.rows, *b))
        .collect()
}

/// A shape error unless `x`'s columns are `w`'s and `bias` has one value
/// per row of `w`.
fn check_shapes(x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuTensor>) -> Result<()> {
    if w.cols != x.cols() {
        return Err(BackendError::Shape {
            op: "linear",
            msg: format!(
                "input {:?} against weight [{}, {}]",
                x.shape, w.rows, w.cols
            ),
        });
    }
    match bias {
        Some(b) if b.data.len() != w.rows => Err(BackendError::Shape {
            op: "linear",
            msg: format!("bias of {} for {} outputs", b.data.len(), w.rows),
        }),
        _ => Ok(()),
    }
}

/// [`linear`] with activations quantized to `bits` for block formats.
fn linear_with(
    x: &CpuTensor,
    w: &CpuWeight,
    bias: Option<&CpuTensor>,
    bits: ActBits,
) -> Result<CpuTensor> {
    if let Some(p) = &w.packed {
        let mut out = packed_products(x, &[(w, bias)], &[p], bits)?;
        return out.pop().ok_or(BackendError::Invalid {
            op: "linear",
            msg: "no product for the weight".into(),
        });
    }
    check_shapes(x, w, bias)?;
    let k = x.cols();
    let m = x.rows();
    let n = w.rows;
    // Every kernel writes each of the m x n outputs once, so the buffer
    // starts unwritten: zeroing it took 4% of a prompt's time.
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let out_ptr = SendPtr(out.as_mut_ptr());
    if let Some(fw) = &w.float {
        #[cfg(target_arch = "x86_64")]
        if x86::amx_float::serves(fw.fmt) {
            // Every row of every product of these formats, so that a row's
            // arithmetic never depends on its batch (see the module).
            let split = x86::amx_float::SplitRows::new(&x.data, m, k);
            let ops = FloatOperands {
                w: fw,
                x: &x.data,
                n,
                k,
            };
            let chunk = x86::amx_float::ROWS_PER_BAND;
            over_bands(fw.groups, m, chunk, |i0, i1, g0, g1| {
                // SAFETY: AMX-BF16 is available and `split` holds these
                // rows; this task writes only columns of groups g0..g1 of
                // rows i0..i1 of `out` (m x n); no other task writes those.
                unsafe { x86::amx_float::block(&ops, &split, i0, i1, g0, g1, out_ptr.get()) };
            });
            return finish(x, written(out, m * n), n, bias);
        }
        let mr = float_tile_rows();
        // One row (a decode step) is its own interleaved layout.
        let interleaved = mr > 1 && m > 1;
        let xt = if interleaved {
            super::float_packed::interleave(&x.data, m, k, mr)
        } else {
            Vec::new()
        };
        let ops = FloatOperands {
            w: fw,
            x: if interleaved { &xt } else { &x.data },
            n,
            k,
        };
        // Whole tiles per chunk, so the chunks' tiles are the layout's.
        let chunk = (ROW_CHUNK / mr).max(1) * mr;
        over_bands(fw.groups, m, chunk, |i0, i1, g0, g1| {
            // SAFETY: this task writes only columns of groups g0..g1 of
            // rows i0..i1 of `out` (m x n); no other task writes those.
            unsafe { compute_float(&ops, i0, i1, g0, g1, out_ptr.get()) };
        });
        return finish(x, written(out, m * n), n, bias);
    }
    let Some(f) = IntFormat::of(w.ty) else {
        return Err(BackendError::Invalid {
            op: "linear",
            msg: format!("{:?} weights have no kernel", w.ty),
        });
    };
    // Block formats have whole blocks per row, so k is a multiple of 32.
    let quantized = QuantizedRows::new(&x.data, k, bits);
    let ops = IntOperands {
        f,
        w: &w.bytes,
        row_bytes: w.row_bytes,
        q: &quantized,
        n,
        k,
    };
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
    finish(x, written(out, m * n), n, bias)
}

/// `out` (allocated for `len` values) once the kernels have written all
/// of them.
fn written(mut out: Vec<f32>, len: usize) -> Vec<f32> {
    debug_assert!(out.capacity() >= len);
    // SAFETY: the capacity holds `len` values, and every kernel of `linear`
    // writes each output element (all rows of every band of columns).
    unsafe { out.set_len(len) };
    out
}

/// Runs `f(i0, i1, g0, g1)` for every band of a few weight groups, bands in
/// parallel, and within a band for every `chunk` of the `m` input rows in
/// turn, so the band's weights stay in cache while the rows pass by.
fn over_bands(
    groups: usize,
    m: usize,
    chunk: usize,
    f: impl Fn(usize, usize, usize, usize) + Sync,
) {
    let band = band_groups(groups);
    (0..groups.div_ceil(band)).into_par_iter().for_each(|t| {
        let g0 = t * band;
        let g1 = (g0 + band).min(groups);
        for i0 in (0..m).step_by(chunk) {
            f(i0, (i0 + chunk).min(m), g0, g1);
        }
    });
}

/// Groups per parallel task over `groups` groups of weights: about four
/// tasks per thread, so uneven finishing times even out, and at most
/// [`MAX_BAND`] rows.
fn band_groups(groups: usize) -> usize {
    (groups / (rayon::current_num_threads() * 4)).clamp(1, MAX_BAND / NR)
}

/// Adds the bias to the `m x n` product `out` of `x` and shapes it like `x`
/// with `n` columns.
fn finish(
    x: &CpuTensor,
    mut out: Vec<f32>,
    n: usize,
    bias: Option<&CpuTensor>,
) -> Result<CpuTensor> {
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
unsafe fn compute_block(
    ops: &IntOperands,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(isa) = isa::chosen().simd {
            // SAFETY: the CPU features were detected; the caller's contract carries over.
            unsafe { x86::int::block(isa, ops, i0, i1, j0, j1, out) };
            return;
        }
    }
    // SAFETY: the caller's contract.
    unsafe { portable::int_block(ops, i0, i1, j0, j1, out) }
}

/// Computes rows `i0..i1` of the columns of groups `g0..g1` over packed weights.
///
/// # Safety
/// As [`compute_block`].
unsafe fn compute_packed(
    ops: &PackedOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let choice = isa::chosen();
        if let Some(isa) = choice.simd {
            let amx = isa == isa::Isa::Avx512Vnni && choice.amx;
            let kernels = x86::packed::Kernels { isa, amx };
            // SAFETY: the CPU features were detected; the caller's contract carries over.
            unsafe { x86::packed::block(kernels, ops, i0, i1, g0, g1, out) };
            return;
        }
    }
    // SAFETY: the caller's contract.
    unsafe { portable::packed_block(ops, i0, i1, g0, g1, out) }
}

/// Input rows per full tile of the float kernel this CPU runs.
fn float_tile_rows() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(isa) = isa::chosen().simd {
            return x86::float::tile_rows(isa);
        }
    }
    1
}

/// Computes rows `i0..i1` of the columns of groups `g0..g1` over float
/// weights (`i0` a multiple of the tile height, `i1` too unless it is `m`).
///
/// # Safety
/// As [`compute_block`].
unsafe fn compute_float(
    ops: &FloatOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(isa) = isa::chosen().simd {
            // SAFETY: the CPU features were detected; the caller's contract carries over.
            unsafe { x86::float::block(isa, ops, i0, i1, g0, g1, out) };
            return;
        }
    }
    // SAFETY: the caller's contract.
    unsafe { portable::float_block(ops, i0, i1, g0, g1, out) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_support::{
        float_weight_bytes, rand_vec as rand, random_blocks, Coverage, Path, ALL_FORMATS,
    };
    use crate::quant::GgmlType;
    use crate::WeightData;

    fn weight_bytes(ty: GgmlType, n: usize, k: usize, seed: u64) -> Vec<u8> {
        if IntFormat::of(ty).is_some() {
            random_blocks(ty, n * k / ty.block().0, seed)
        } else {
            float_weight_bytes(ty, &rand(n * k, seed))
        }
    }

    fn weight(ty: GgmlType, n: usize, k: usize, seed: u64) -> CpuWeight {
        let bytes = weight_bytes(ty, n, k, seed).into();
        CpuWeight::new(n, k, WeightData::Ggml { ty, bytes }).unwrap()
    }

    /// The same weight as [`weight`] in the file's row layout (block formats
    /// unpacked, their bytes kept).
    fn rowwise_weight(ty: GgmlType, n: usize, k: usize, seed: u64) -> CpuWeight {
        let bytes = weight_bytes(ty, n, k, seed).into();
        CpuWeight::unpacked(n, k, WeightData::Ggml { ty, bytes }).unwrap()
    }

    fn k_for(ty: GgmlType) -> usize {
        if ty.block().0 == 256 {
            512
        } else {
            96
        }
    }

    /// The property the engine's batch invariance rests on: a row's result does
    /// not depend on which other rows share the call, bit for bit, in every format.
    #[test]
    fn each_row_is_bitwise_independent_of_the_batch() {
        for (ty, bits) in ALL_FORMATS
            .into_iter()
            .flat_map(|ty| [(ty, ActBits::Int8), (ty, ActBits::Int16)])
        {
            let linear = |x: &CpuTensor, w: &CpuWeight, b| linear_with(x, w, b, bits);
            let (k, n) = (k_for(ty), 150);
            let w = weight(ty, n, k, 9);
            let xs = rand(37 * k, 5);
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
                    "{ty:?} ({bits:?}): rows {start}..{} differ when computed as a batch of {len}",
                    start + len
                );
            }
        }
    }

    /// `linear_many` gives each weight exactly what `linear` gives it, bit
    /// for bit and shape for shape: weights of different formats and row
    /// counts (partial last groups among them) in one pass, with and
    /// without biases, for one row (a decode step) and several; a float
    /// weight among them sends every weight to `linear`; and a weight of
    /// the wrong width is refused whichever its place.
    #[test]
    fn linear_many_gives_each_weight_the_bits_linear_gives_it() {
        let k = 512;
        let shapes = [
            (GgmlType::Q4K, 200),
            (GgmlType::Q6K, 40),
            (GgmlType::Q8_0, 64),
            (GgmlType::Q4_0, 17),
        ];
        let ws: Vec<CpuWeight> = shapes
            .iter()
            .enumerate()
            .map(|(s, &(ty, n))| weight(ty, n, k, 40 + s as u64))
            .collect();
        let biases: Vec<CpuTensor> = shapes
            .iter()
            .enumerate()
            .map(|(s, &(_, n))| CpuTensor::new(vec![n], rand(n, 60 + s as u64)).unwrap())
            .collect();
        let float = weight(GgmlType::F32, 24, k, 70);
        for m in [1, 3, 70] {
            let x = CpuTensor::new(vec![m, k], rand(m * k, m as u64)).unwrap();
            for with_float in [false, true] {
                let mut pairs: Vec<(&CpuWeight, Option<&CpuTensor>)> = ws
                    .iter()
                    .zip(&biases)
                    .enumerate()
                    .map(|(s, (w, b))| (w, (s % 2 == 0).then_some(b)))
                    .collect();
                if with_float {
                    pairs.insert(1, (&float, None));
                }
                let many = linear_many(&x, &pairs).unwrap();
                assert_eq!(many.len(), pairs.len());
                for (s, ((w, b), got)) in pairs.iter().zip(&many).enumerate() {
                    let want = linear(&x, w, *b).unwrap();
                    assert_eq!(got.shape, want.shape, "m {m}, weight {s}");
                    assert!(
                        got.data
                            .iter()
                            .zip(&want.data)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "m {m}, weight {s} ({:?}, float among them: {with_float}): \
                         not the bits linear gives",
                        w.ty
                    );
                }
            }
            let narrow = weight(GgmlType::Q8_0, 16, k - 32, 80);
            for at in [0, 2] {
                let mut pairs: Vec<(&CpuWeight, Option<&CpuTensor>)> =
                    ws.iter().map(|w| (w, None)).collect();
                pairs.insert(at, (&narrow, None));
                assert!(
                    matches!(
                        linear_many(&x, &pairs),
                        Err(BackendError::Shape { op: "linear", .. })
                    ),
                    "a weight {} wide against an input {k} wide, at {at}",
                    k - 32
                );
            }
        }
    }

    /// The kernels over interleaved weights, on every instruction set this
    /// CPU runs, compute the canonical result of [`super::super::packed`]
    /// bit for bit, for partial last groups and tiles too; and that result
    /// is the per-row kernels' within activation quantization error.
    #[test]
    fn packed_kernels_agree_with_the_portable_one_bit_for_bit() {
        use super::super::packed::{PackedFormat, PackedWeight};
        let mut cov = Coverage::new("packed_kernels_agree_with_the_portable_one_bit_for_bit");
        for (ty, fmt) in ALL_FORMATS
            .into_iter()
            .filter_map(|ty| Some((ty, PackedFormat::of(ty)?)))
        {
            // Two whole AMX tiles of rows and a part one.
            let (k, n, m) = (k_for(ty), 21, 37);
            let w = rowwise_weight(ty, n, k, 4);
            // (Packed here whatever KILN_CPU_REPACK says.)
            let p = &PackedWeight::pack(fmt, n, k / ty.block().0, &w.bytes);
            let x = rand(m * k, 8);
            for bits in [ActBits::Int8, ActBits::Int16] {
                let q = QuantizedRows::with_layout(&x, k, bits, ActLayout::Split);
                let ops = PackedOperands::new(p, &q, n, k);
                let mut want = vec![0f32; m * n];
                // SAFETY: the whole m x n buffer, one thread.
                unsafe { portable::packed_block(&ops, 0, m, 0, p.groups, want.as_mut_ptr()) };
                cov.ran(Path::Portable);
                #[cfg(target_arch = "x86_64")]
                for (isa, amx) in isa::Isa::all_supported()
                    .into_iter()
                    .map(|isa| (isa, false))
                    .chain(isa::chosen().amx.then_some((isa::Isa::Avx512Vnni, true)))
                {
                    // All rows at once, then the first 1..=8 rows alone, so
                    // that every tile height (rows left at a block's end)
                    // runs.
                    for rows in (1..=8).chain([m]) {
                        let mut got = vec![0f32; rows * n];
                        // SAFETY: as above; the ISA (and AMX) is supported by this CPU.
                        unsafe {
                            x86::packed::block(
                                x86::packed::Kernels { isa, amx },
                                &ops,
                                0,
                                rows,
                                0,
                                p.groups,
                                got.as_mut_ptr(),
                            )
                        };
                        for (e, (a, b)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "{ty:?} on {isa:?} (AMX {amx}) with {bits:?}, {rows} rows, element {e}: {a} vs portable {b}"
                            );
                        }
                    }
                    cov.ran(if amx { Path::Amx } else { Path::of(isa) });
                }
                let xt = CpuTensor::new(vec![m, k], x.clone()).unwrap();
                let rowwise = linear_with(&xt, &w, None, bits).unwrap();
                // The same quantized values, summed in another order: f32
                // rounding of terms as large as the largest output.
                let scale = rowwise.data.iter().fold(1f32, |a, v| a.max(v.abs()));
                let tol = 1e-4 * scale;
                for (e, (a, b)) in want.iter().zip(&rowwise.data).enumerate() {
                    assert!(
                        (a - b).abs() <= tol,
                        "{ty:?} with {bits:?}, element {e}: packed {a} vs per-row {b}"
                    );
                }
            }
        }
        cov.finish(&[
            Path::Portable,
            Path::Avx2,
            Path::AvxVnni,
            Path::Avx512,
            Path::Amx,
        ]);
    }

    /// Every SIMD kernel this CPU can run computes the canonical result bit
    /// for bit over the file's rows (the portable kernel is its definition).
    #[test]
    fn every_kernel_agrees_with_the_portable_one_bit_for_bit() {
        let mut cov = Coverage::new("every_kernel_agrees_with_the_portable_one_bit_for_bit");
        for ty in ALL_FORMATS {
            let Some(f) = IntFormat::of(ty) else {
                continue;
            };
            let (k, n, m) = (k_for(ty), 19, 9);
            let w = rowwise_weight(ty, n, k, 4);
            let x = rand(m * k, 8);
            for bits in [ActBits::Int8, ActBits::Int16] {
                let q = QuantizedRows::new(&x, k, bits);
                let ops = IntOperands {
                    f,
                    w: &w.bytes,
                    row_bytes: w.row_bytes,
                    q: &q,
                    n,
                    k,
                };
                let mut want = vec![0f32; m * n];
                // SAFETY: the whole m x n buffer, one thread.
                unsafe { portable::int_block(&ops, 0, m, 0, n, want.as_mut_ptr()) };
                cov.ran(Path::Portable);
                #[cfg(target_arch = "x86_64")]
                for isa in isa::Isa::all_supported() {
                    let mut got = vec![0f32; m * n];
                    // SAFETY: as above; the ISA is supported by this CPU.
                    unsafe { x86::int::block(isa, &ops, 0, m, 0, n, got.as_mut_ptr()) };
                    for (e, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{ty:?} on {isa:?} with {bits:?}, element {e}: {a} vs portable {b}"
                        );
                    }
                    cov.ran(Path::of(isa));
                }
            }
        }
        cov.finish(&[Path::Portable, Path::Avx2, Path::AvxVnni, Path::Avx512]);
    }

    /// The float kernels, on every instruction set this CPU runs and for
    /// every tile shape (1 to 13 rows, partial last groups, odd k), compute
    /// the canonical chain of [`super::super::float_packed`] bit for bit; and
    /// that is the exact product within f32 rounding.
    #[test]
    fn float_kernels_agree_with_the_portable_one_bit_for_bit() {
        let mut cov = Coverage::new("float_kernels_agree_with_the_portable_one_bit_for_bit");
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            let (k, n) = (37, 16 * 5 + 3);
            let w = weight(ty, n, k, 4);
            let fw = w.float.as_ref().expect("float weights are packed");
            for m in [1usize, 2, 3, 5, 7, 9, 12, 13, 25] {
                let x = rand(m * k, 8 + m as u64);
                let ops = FloatOperands { w: fw, x: &x, n, k };
                let mut want = vec![0f32; m * n];
                // SAFETY: the whole m x n buffer, one thread.
                unsafe { portable::float_block(&ops, 0, m, 0, fw.groups, want.as_mut_ptr()) };
                for i in 0..m {
                    for j in 0..n {
                        let exact: f64 = (0..k)
                            .map(|t| fw.at(j, t) as f64 * x[i * k + t] as f64)
                            .sum();
                        let mag: f64 = (0..k)
                            .map(|t| (fw.at(j, t) as f64 * x[i * k + t] as f64).abs())
                            .sum();
                        let got = want[i * n + j] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-6 * mag.max(1e-30) * k as f64,
                            "{ty:?} m={m} ({i}, {j}): {got} vs exact {exact}"
                        );
                    }
                }
                cov.ran(Path::Portable);
                #[cfg(target_arch = "x86_64")]
                for isa in isa::Isa::all_supported() {
                    let mr = x86::float::tile_rows(isa);
                    let xt = super::super::float_packed::interleave(&x, m, k, mr);
                    let ops = FloatOperands {
                        w: fw,
                        x: &xt,
                        n,
                        k,
                    };
                    // Uneven group ranges too: tiles of G groups and the rest.
                    for (g0, g1) in [(0, fw.groups), (1, fw.groups), (0, 2)] {
                        let mut got = want.clone();
                        for i in 0..m {
                            for j in g0 * 16..(g1 * 16).min(n) {
                                got[i * n + j] = f32::NAN;
                            }
                        }
                        // SAFETY: inside the m x n buffer, one thread; the ISA is supported.
                        unsafe { x86::float::block(isa, &ops, 0, m, g0, g1, got.as_mut_ptr()) };
                        for (e, (a, b)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "{ty:?} on {isa:?}, m={m}, groups {g0}..{g1}, element {e}: {a} vs portable {b}"
                            );
                        }
                    }
                    cov.ran(Path::of(isa));
                }
            }
        }
        cov.finish(&[Path::Portable, Path::Avx2, Path::AvxVnni, Path::Avx512]);
    }
}
