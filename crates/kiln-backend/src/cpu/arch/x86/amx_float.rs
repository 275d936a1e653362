//! Intel AMX-BF16 tiles for F16 and BF16 weights: every row of a product,
//! prompt or decode, when `KILN_CPU_FLOAT=amx` asks for them on a CPU that
//! has them.
//!
//! **Why opt-in.** On this project's 2-core Sapphire Rapids VM, prompts run
//! 1.6-1.9x the FMA kernels' speed end to end (F16 pp512 583-715 tokens/s
//! against 370-381, same binary, alternating), and decode steps about half
//! (29 against 59 tokens/s). A one-row step still widens and splits every
//! weight into B tiles, and a tile load waits until every earlier vector
//! store has drained (about 150 ns per switch, measured), so the vector
//! and tile work of a step run one after the other. Neither kernel can
//! serve only the prompts: see below. Prompt-only work (scoring a prompt's
//! log-probabilities) is what this mode is for.
//!
//! The FMA kernels of [`super::float`] add 16 products per instruction
//! and widen every F16 weight with a two-micro-op conversion; one
//! `tdpbf16ps` adds 8192 (16 input rows by 16 weight rows by 32 elements),
//! about 20 times the FMA kernels' rate on this machine. Its operands are
//! bf16, so the values are split into exact bf16 pieces:
//!
//! - an F16 weight (11 significant bits) is `w = hi + lo` exactly, `hi` its
//!   top 8 bits and `lo` the remaining 3; a BF16 weight is one piece;
//! - an f32 activation is `x ≈ hi + lo`, each rounded to nearest: 16
//!   significant bits, relative error at most 2^-17 (llama.cpp multiplies
//!   F16 weights with activations rounded to f16, 11 bits);
//! - the products `x_hi w_hi + x_hi w_lo + x_lo w_hi` (F16; the dropped
//!   `x_lo w_lo` is below 2^-16 of `x w`) or `x_hi w + x_lo w` (BF16) are
//!   exact in f32, and the tile unit accumulates them in f32.
//!
//! **Which rows meet which arithmetic.** The tile unit's order of rounding
//! within one `tdpbf16ps` is its own (it matches no sequential order of
//! the pairs of products), so the FMA kernels cannot reproduce it. Batch
//! invariance therefore rests on this kernel taking every row of every
//! product of these formats when it is available: a row's result depends
//! on its own activations alone (the unit computes each row of a tile
//! from that row), the K steps and the pieces go in the same order for
//! every tile, and a tile of fewer rows (a decode step) is the same
//! arithmetic on fewer rows. `each_row_is_bitwise_independent_of_the_batch`
//! checks this through `linear`, and the tests below against an f64
//! reference.
//!
//! **Layouts.** A tile row is 64 bytes: 32 bf16 of one activation row (A),
//! or of pairs `(t, t + 1)` of 16 weight rows (B). Activations are split
//! once per product into [`SplitRows`]; a group's 16 weight rows are
//! widened and split into B tiles per thread, once per group and band of
//! rows, in a scratch that the band's row tiles then share.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::cpu::float_packed::{FloatFormat, FloatOperands};
use crate::cpu::packed::NR;

/// Input rows per tile.
const MT: usize = 16;
/// Elements per K step: one 64-byte tile row of bf16.
const KS: usize = 32;
/// Rows per band of a product: the weight panel is widened once per band.
pub(crate) const ROWS_PER_BAND: usize = 128;

/// Whether F16 and BF16 products may run here: the one choice of
/// instruction sets ([`crate::cpu::isa::chosen`]) admits AMX-BF16.
pub(crate) fn available() -> bool {
    crate::cpu::isa::chosen().amx_bf16
}

/// Whether products over weights of `fmt` run here: only when asked for
/// with `KILN_CPU_FLOAT=amx` (read once), because decode steps run at
/// about half the FMA kernels' speed here (see the module doc).
pub(crate) fn serves(fmt: FloatFormat) -> bool {
    static ASKED: OnceLock<bool> = OnceLock::new();
    let asked = *ASKED.get_or_init(|| std::env::var("KILN_CPU_FLOAT").as_deref() == Ok("amx"));
    fmt != FloatFormat::F32 && asked && available()
}

/// The pieces of the input rows each piece of weights multiplies, in the
/// order every tile adds them.
const fn pieces(fmt: FloatFormat) -> usize {
    match fmt {
        FloatFormat::F16 => 2,
        _ => 1,
    }
}

/// The `m x k` input rows split into bf16 `hi` and `lo` pieces, laid out as
/// A tiles: per tile of [`MT`] rows (the last padded with zero rows), per
/// K step, per piece, the tile's rows of 32 bf16 (zero past `k`). With
/// fewer than [`MT`] rows the one tile holds just those rows.
pub(crate) struct SplitRows {
    data: Vec<__m512i>,
    /// Rows per tile: [`MT`], or `m` when it is smaller.
    rows: usize,
    steps: usize,
}

impl SplitRows {
    /// Splits `x` (`m` rows of `k`).
    ///
    /// # Panics
    /// If [`available`] is false (the split uses AVX-512).
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert!(available(), "AMX-BF16 kernels on a CPU without them");
        let rows = MT.min(m);
        let steps = k.div_ceil(KS);
        let per_tile = steps * 2 * rows;
        // SAFETY: an all-zero __m512i is a valid value.
        let mut data = vec![unsafe { _mm512_setzero_si512() }; m.div_ceil(rows) * per_tile];
        data.par_chunks_mut(per_tile)
            .zip(x.par_chunks(rows * k))
            .for_each(|(tile, src)| {
                // SAFETY: AVX-512 (checked by `available`); `src` holds whole rows of `k`.
                unsafe { split_tile(tile, src, k, rows, steps) }
            });
        Self { data, rows, steps }
    }

    /// Tile row 0 of `piece` of K step `s` of the tile of input row `i`.
    fn at(&self, i: usize, s: usize, piece: usize) -> *const u8 {
        let tile = i / self.rows;
        self.data[((tile * self.steps + s) * 2 + piece) * self.rows..].as_ptr() as *const u8
    }
}

/// Rounds the f32 lanes of `v` to bf16, to nearest (ties to even), as the
/// top halves of the lanes (the low halves zero). Finite inputs only.
#[inline(always)]
unsafe fn round_bf16(v: __m512i) -> __m512i {
    // SAFETY: AVX-512F per the callers.
    unsafe {
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(v), _mm512_set1_epi32(1));
        let biased = _mm512_add_epi32(_mm512_add_epi32(v, _mm512_set1_epi32(0x7fff)), odd);
        _mm512_and_si512(biased, _mm512_set1_epi32(0xffff_0000u32 as i32))
    }
}

/// One tile of [`SplitRows`]: the rows of `src` (`k` each) split.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn split_tile(tile: &mut [__m512i], src: &[f32], k: usize, rows: usize, steps: usize) {
    for (r, row) in src.chunks_exact(k).enumerate() {
        for s in 0..steps {
            let t0 = s * KS;
            let n = (k - t0).min(KS);
            for half in 0..2 {
                let (h0, hn) = (half * 16, n.saturating_sub(half * 16).min(16));
                if hn == 0 {
                    continue;
                }
                let mask: __mmask16 = if hn == 16 { !0 } else { (1u16 << hn) - 1 };
                // SAFETY: AVX-512 per the attribute; the masked load reads
                // elements t0 + h0 .. + hn of the row only; the stores
                // write inside this tile's rows.
                unsafe {
                    let x = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(t0 + h0));
                    let hi = round_bf16(_mm512_castps_si512(x));
                    let rest = _mm512_sub_ps(x, _mm512_castsi512_ps(hi));
                    let lo = round_bf16(_mm512_castps_si512(rest));
                    for (piece, v) in [hi, lo].into_iter().enumerate() {
                        let at = ((s * 2 + piece) * rows + r) * 64 + 2 * h0;
                        let dst = (tile.as_mut_ptr() as *mut u8).add(at);
                        let v16 = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(v));
                        _mm256_storeu_si256(dst as *mut __m256i, v16);
                    }
                }
            }
        }
    }
}

/// The 64-byte tile configuration (palette 1): tiles 0 and 1 hold the sums
/// of two row tiles, 2 to 5 their activations' pieces (`hi`, `lo` of the
/// first, then of the second), 6 and 7 the weights' B tiles. `rows` is the
/// row tiles' height; B tiles are always 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new(rows: usize) -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = if t < 6 { rows as u8 } else { 16 };
        }
        TileConfig(c)
    }
}

thread_local! {
    /// Each thread's B tiles of the group it is multiplying.
    static PANEL: RefCell<Vec<__m512i>> = const { RefCell::new(Vec::new()) };
}

/// Computes rows `i0..i1` of the columns of groups `g0..g1`: `i0` is a
/// multiple of [`ROWS_PER_BAND`] (so of the tile height), `i1` too unless
/// it is `m`.
///
/// # Safety
/// [`available`] returned true; `a` holds `ops`'s input rows split and
/// `ops.w` is F16 or BF16; `out` points to an `m x n` buffer of which no
/// other thread touches these elements.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn block(
    ops: &FloatOperands,
    a: &SplitRows,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    let cfg = TileConfig::new(a.rows);
    // (Taken and put back, not borrowed in a closure: closures do not
    // inherit the target features.)
    let mut panel = PANEL.take();
    // SAFETY: a valid palette-1 configuration; the tiles are released
    // before returning.
    unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
    let per_group = a.steps * pieces(ops.w.fmt) * 16;
    panel.resize(per_group, _mm512_setzero_si512());
    for g in g0..g1 {
        // SAFETY: AVX-512 per the attribute; group g exists; the panel
        // holds one group's tiles.
        unsafe { widen_group(ops, g, a.steps, &mut panel) };
        let b = panel.as_ptr() as *const u8;
        if g + 1 < g1 {
            // The next group's weights, fetched while the tiles work: the
            // tile instructions hold back the loads that follow them.
            let next = ops.w.group(g + 1);
            let bytes = ops.k * NR * ops.w.fmt.size();
            for o in (0..bytes).step_by(64) {
                // SAFETY: a prefetch of the next group's vectors.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(next.add(o) as *const i8) };
            }
        }
        let mut i = i0;
        while i < i1 {
            // SAFETY (both): the tiles' rows exist in `a`, and the stores
            // write rows below i1 and columns of group g only.
            unsafe {
                if i + a.rows < i1 {
                    tiles::<2>(ops, a, b, i, i1, g, out);
                    i += 2 * a.rows;
                } else {
                    tiles::<1>(ops, a, b, i, i1, g, out);
                    i += a.rows;
                }
            }
        }
    }
    // SAFETY: returns the tile state to its initial (unused) form.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
    PANEL.set(panel);
}

/// Writes group `g`'s B tiles to `panel` from vector `at` on: per K step,
/// one tile per piece of the weights (16 rows, row `p` holding elements
/// `2p` and `2p + 1` of the group's 16 weight rows, zero past `k`).
///
/// # Safety
/// AVX-512; `panel` holds `at + steps * pieces * 16` vectors.
#[inline(always)]
unsafe fn widen_group(ops: &FloatOperands, g: usize, steps: usize, panel: &mut [__m512i]) {
    let fmt = ops.w.fmt;
    let np = pieces(fmt);
    let k = ops.k;
    let base = ops.w.group(g);
    let size = fmt.size();
    // SAFETY: AVX-512 per the caller; the loads read vectors t < k of the
    // group, the stores whole vectors of `panel`.
    unsafe {
        let top = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let dst = panel.as_mut_ptr();
        for s in 0..steps {
            let hi = dst.add(s * np * 16);
            for p in 0..16 {
                let t = s * KS + 2 * p;
                let (e, o) = (vector(base, t, k, size), vector(base, t + 1, k, size));
                match fmt {
                    FloatFormat::F16 => {
                        let e = _mm512_castps_si512(_mm512_cvtph_ps(e));
                        let o = _mm512_castps_si512(_mm512_cvtph_ps(o));
                        let (eh, oh) = (_mm512_and_si512(e, top), _mm512_and_si512(o, top));
                        // The rests are exact and bf16-representable: their
                        // low halves are zero.
                        let el = _mm512_sub_ps(_mm512_castsi512_ps(e), _mm512_castsi512_ps(eh));
                        let ol = _mm512_sub_ps(_mm512_castsi512_ps(o), _mm512_castsi512_ps(oh));
                        _mm512_store_si512(
                            hi.add(p),
                            _mm512_or_si512(_mm512_srli_epi32::<16>(eh), oh),
                        );
                        _mm512_store_si512(
                            hi.add(16 + p),
                            _mm512_or_si512(
                                _mm512_srli_epi32::<16>(_mm512_castps_si512(el)),
                                _mm512_castps_si512(ol),
                            ),
                        );
                    }
                    _ => {
                        let e = _mm512_cvtepu16_epi32(e);
                        let o = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(o));
                        _mm512_store_si512(hi.add(p), _mm512_or_si512(e, o));
                    }
                }
            }
        }
    }
}

/// Vector `t` of a group at `base` (16 elements of `size` bytes), or zero
/// past `k`. (A function, not a closure: closures do not inherit the
/// target features.)
#[inline(always)]
unsafe fn vector(base: *const u8, t: usize, k: usize, size: usize) -> __m256i {
    // SAFETY: the group holds `k` vectors.
    unsafe {
        if t < k {
            _mm256_loadu_si256(base.add(t * NR * size) as *const __m256i)
        } else {
            _mm256_setzero_si256()
        }
    }
}

/// `T` (1 or 2) row tiles from input row `i` against group `g`'s B tiles
/// in `b`, and their results stored.
///
/// Per K step, each row tile adds `hi·B_hi`, `hi·B_lo`, `lo·B_hi` (F16)
/// or `hi·B`, `lo·B` (BF16), in that order.
///
/// # Safety
/// As [`block`], with the tiles configured for `a`'s height.
#[inline(always)]
unsafe fn tiles<const T: usize>(
    ops: &FloatOperands,
    a: &SplitRows,
    b: *const u8,
    i: usize,
    i1: usize,
    g: usize,
    out: *mut f32,
) {
    let f16 = ops.w.fmt == FloatFormat::F16;
    let np = pieces(ops.w.fmt);
    let second = if T == 2 { i + a.rows } else { i };
    // SAFETY: the caller's contract: every pointer names a whole tile
    // inside `a` or the panel.
    unsafe {
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
        for s in 0..a.steps {
            let bs = b.add(s * np * 1024);
            let (a0h, a0l) = (a.at(i, s, 0), a.at(i, s, 1));
            let (a1h, a1l) = (a.at(second, s, 0), a.at(second, s, 1));
            match (T, f16) {
                (2, true) => asm!(
                    "tileloadd tmm6, [{b} + {st}*1]",
                    "tileloadd tmm7, [{bl} + {st}*1]",
                    "tileloadd tmm2, [{a0h} + {st}*1]",
                    "tileloadd tmm3, [{a0l} + {st}*1]",
                    "tdpbf16ps tmm0, tmm2, tmm6",
                    "tdpbf16ps tmm0, tmm2, tmm7",
                    "tdpbf16ps tmm0, tmm3, tmm6",
                    "tileloadd tmm4, [{a1h} + {st}*1]",
                    "tileloadd tmm5, [{a1l} + {st}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm1, tmm5, tmm6",
                    b = in(reg) bs,
                    bl = in(reg) bs.add(1024),
                    a0h = in(reg) a0h,
                    a0l = in(reg) a0l,
                    a1h = in(reg) a1h,
                    a1l = in(reg) a1l,
                    st = in(reg) 64usize,
                    options(nostack, readonly),
                ),
                (_, true) => asm!(
                    "tileloadd tmm6, [{b} + {st}*1]",
                    "tileloadd tmm7, [{bl} + {st}*1]",
                    "tileloadd tmm2, [{a0h} + {st}*1]",
                    "tileloadd tmm3, [{a0l} + {st}*1]",
                    "tdpbf16ps tmm0, tmm2, tmm6",
                    "tdpbf16ps tmm0, tmm2, tmm7",
                    "tdpbf16ps tmm0, tmm3, tmm6",
                    b = in(reg) bs,
                    bl = in(reg) bs.add(1024),
                    a0h = in(reg) a0h,
                    a0l = in(reg) a0l,
                    st = in(reg) 64usize,
                    options(nostack, readonly),
                ),
                (2, false) => asm!(
                    "tileloadd tmm6, [{b} + {st}*1]",
                    "tileloadd tmm2, [{a0h} + {st}*1]",
                    "tileloadd tmm3, [{a0l} + {st}*1]",
                    "tdpbf16ps tmm0, tmm2, tmm6",
                    "tdpbf16ps tmm0, tmm3, tmm6",
                    "tileloadd tmm4, [{a1h} + {st}*1]",
                    "tileloadd tmm5, [{a1l} + {st}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm5, tmm6",
                    b = in(reg) bs,
                    a0h = in(reg) a0h,
                    a0l = in(reg) a0l,
                    a1h = in(reg) a1h,
                    a1l = in(reg) a1l,
                    st = in(reg) 64usize,
                    options(nostack, readonly),
                ),
                _ => asm!(
                    "tileloadd tmm6, [{b} + {st}*1]",
                    "tileloadd tmm2, [{a0h} + {st}*1]",
                    "tileloadd tmm3, [{a0l} + {st}*1]",
                    "tdpbf16ps tmm0, tmm2, tmm6",
                    "tdpbf16ps tmm0, tmm3, tmm6",
                    b = in(reg) bs,
                    a0h = in(reg) a0h,
                    a0l = in(reg) a0l,
                    st = in(reg) 64usize,
                    options(nostack, readonly),
                ),
            }
        }
        store::<0>(ops, a.rows, i, i1, g, out);
        if T == 2 {
            store::<1>(ops, a.rows, second, i1, g, out);
        }
    }
}

/// Stores sum tile `C` (rows from `i`, below `i1`) into group `g`'s columns.
///
/// # Safety
/// As [`tiles`].
#[inline(always)]
unsafe fn store<const C: usize>(
    ops: &FloatOperands,
    rows: usize,
    i: usize,
    i1: usize,
    g: usize,
    out: *mut f32,
) {
    #[repr(C, align(64))]
    struct Sums([f32; MT * NR]);
    let j0 = g * NR;
    let lanes = (ops.n - j0).min(NR);
    let valid = (i1 - i).min(rows);
    // SAFETY: the caller's contract; a whole tile goes straight to the
    // output when all its rows and columns are there.
    unsafe {
        let dst = out.add(i * ops.n + j0);
        if lanes == NR && valid == rows {
            let stride = ops.n * 4;
            if C == 0 {
                asm!("tilestored [{d} + {s}*1], tmm0", d = in(reg) dst, s = in(reg) stride, options(nostack));
            } else {
                asm!("tilestored [{d} + {s}*1], tmm1", d = in(reg) dst, s = in(reg) stride, options(nostack));
            }
            return;
        }
        let mut sums = Sums([0.0; MT * NR]);
        let p = sums.0.as_mut_ptr();
        if C == 0 {
            asm!("tilestored [{d} + {s}*1], tmm0", d = in(reg) p, s = in(reg) 64usize, options(nostack));
        } else {
            asm!("tilestored [{d} + {s}*1], tmm1", d = in(reg) p, s = in(reg) 64usize, options(nostack));
        }
        let mask: __mmask16 = if lanes == NR { !0 } else { (1u16 << lanes) - 1 };
        for r in 0..valid {
            _mm512_mask_storeu_ps(dst.add(r * ops.n), mask, _mm512_loadu_ps(p.add(r * NR)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::float_packed::FloatPacked;
    use crate::cpu::test_support::{float_weight_bytes, rand_vec};
    use crate::quant::GgmlType;

    /// The formats these tiles serve.
    const FORMATS: [(GgmlType, FloatFormat); 2] = [
        (GgmlType::F16, FloatFormat::F16),
        (GgmlType::BF16, FloatFormat::BF16),
    ];

    /// An `n x k` weight of random values in `fmt`, packed.
    fn random_weight(ty: GgmlType, fmt: FloatFormat, n: usize, k: usize) -> FloatPacked {
        let bytes = float_weight_bytes(ty, &rand_vec(n * k, 3));
        FloatPacked::pack_releasing(fmt, n, k, &bytes, |_| {})
    }

    /// Products over `w` of rows `x` (`m` of `k`), through the tiles.
    fn product(w: &FloatPacked, x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let a = SplitRows::new(x, m, k);
        let ops = FloatOperands { w, x, n, k };
        let mut out = vec![f32::NAN; m * n];
        // SAFETY: AMX-BF16 is available (checked by the callers); the
        // whole buffer, one thread.
        unsafe { block(&ops, &a, 0, m, 0, w.groups, out.as_mut_ptr()) };
        out
    }

    /// What batch invariance rests on here: a row's result is the same
    /// bits alone (a one-row tile), in a short batch (a tile of that many
    /// rows) or anywhere in 16-row tiles of a long one.
    #[test]
    fn a_rows_result_does_not_depend_on_its_tile() {
        if !available() {
            eprintln!("SKIPPED: no AMX-BF16 on this CPU (or KILN_CPU_ISA caps it): a_rows_result_does_not_depend_on_its_tile checked nothing");
            return;
        }
        for (ty, fmt) in FORMATS {
            let (m, n, k) = (37, 21, 100);
            let w = random_weight(ty, fmt, n, k);
            let x = rand_vec(m * k, 5);
            let all = product(&w, &x, m, n, k);
            for (start, len) in [
                (0usize, 1usize),
                (5, 1),
                (3, 2),
                (10, 5),
                (30, 7),
                (1, 36),
                (16, 17),
            ] {
                let part = product(&w, &x[start * k..(start + len) * k], len, n, k);
                let want = &all[start * n..(start + len) * n];
                assert!(
                    part.iter()
                        .zip(want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ty:?}: rows {start}..{} differ computed as a batch of {len}",
                    start + len
                );
            }
        }
    }

    /// Against an f64 reference: each output within the error the module
    /// doc states (2^-15 of the sum of the products' magnitudes for the
    /// pieces, plus f32 accumulation over `k` terms), over partial groups,
    /// tiles and K steps.
    #[test]
    fn tiles_match_an_f64_reference_within_the_stated_error() {
        if !available() {
            eprintln!("SKIPPED: no AMX-BF16 on this CPU (or KILN_CPU_ISA caps it): tiles_match_an_f64_reference_within_the_stated_error checked nothing");
            return;
        }
        for (ty, fmt) in FORMATS {
            for (m, n, k) in [
                (1, 16, 32),
                (37, 21, 40),
                (5, 33, 96),
                (16, 16, 7),
                (33, 40, 576),
            ] {
                let w = random_weight(ty, fmt, n, k);
                let x = rand_vec(m * k, 5);
                let got = product(&w, &x, m, n, k);
                for i in 0..m {
                    for j in 0..n {
                        let (mut want, mut mag) = (0f64, 0f64);
                        for t in 0..k {
                            let p = w.at(j, t) as f64 * x[i * k + t] as f64;
                            want += p;
                            mag += p.abs();
                        }
                        let tol = mag * (2f64.powi(-15) + k as f64 * 2f64.powi(-23)) + 1e-30;
                        let y = got[i * n + j] as f64;
                        assert!(
                            (y - want).abs() <= tol,
                            "{ty:?} m {m} n {n} k {k}: ({i}, {j}) = {y}, want {want} ± {tol}"
                        );
                    }
                }
            }
        }
    }
}
