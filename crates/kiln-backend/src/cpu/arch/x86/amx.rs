//! Intel AMX tiles for the block formats' prompt path: the canonical
//! computation of [`crate::cpu::packed`], 16 input rows against a group of 16
//! weight rows per tile multiplication.
//!
//! The VNNI kernels spend one `vpdpbusd` per four elements of a group per
//! input row (two with 16-bit activations), and that instruction issues on
//! one port: it bounds the prompt path. AMX's `tdpbssd` multiplies a tile
//! of 16 rows of signed activation bytes by a tile of signed weight bytes
//! laid out as four elements of each of 16 columns per 64-byte row, which
//! is exactly the packed layout's code vector ([`crate::cpu::packed::VB`]); one
//! instruction yields the 16 x 16 exact block sums that 128 `vpdpbusd`
//! would. The float epilogue (convert, scale, accumulate) is the VNNI
//! kernels' lane for lane, so results are the same bits: batch invariance
//! holds whichever kernel a row meets.
//!
//! Codes are made signed once per group (`u - K`, the zero point folded in,
//! so no `K * sum(x)` correction is needed): Q8_0's bytes already are, and
//! are read in place; the narrower codes are decoded into a per-thread
//! scratch of `16 k` bytes, which every tile of the call then reads.
//!
//! Only whole tiles of 16 input rows come here; the caller gives the rest
//! of a chunk (and decode steps) to the VNNI kernel.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;

use super::unpack::{by_format, codes512, format, head512, scales512};
use crate::cpu::actq::ActBits;
use crate::cpu::packed::{PackedOperands, NR, VB};

/// Input rows per tile (a tile's row count).
pub(crate) const MT: usize = 16;

/// The 64-byte tile configuration `ldtilecfg` reads (palette 1): tiles 0
/// and 1 hold the `hi` and `lo` sums (16 rows of 16 i32), 2 and 3 the
/// `hi` and `lo` activation bytes (16 rows of `kb` bytes), 4 the codes
/// (`kb / 4` rows of 64 bytes); 5, 6 and 7 are a second set of sums and
/// codes, for alternate steps.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    /// The configuration for products over `kb` elements (32, or 16 for
    /// the halves of the sub-blocks of Q2_K, Q3_K and Q6_K).
    fn new(kb: usize) -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut set = |t: usize, rows: usize, bytes: usize| {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&(bytes as u16).to_le_bytes());
            c[48 + t] = rows as u8;
        };
        set(0, MT, 64);
        set(1, MT, 64);
        set(2, MT, kb);
        set(3, MT, kb);
        set(4, kb / 4, VB);
        set(5, MT, 64);
        set(6, MT, 64);
        set(7, kb / 4, VB);
        TileConfig(c)
    }
}

/// A tile of sums stored for the vector epilogue: row `r` is input row
/// `r`'s sums against the group's 16 weight rows.
#[repr(C, align(64))]
struct Sums([i32; MT * NR]);

thread_local! {
    /// Each thread's signed codes of the group it is multiplying.
    static SCRATCH: RefCell<Vec<__m512i>> = const { RefCell::new(Vec::new()) };
}

/// Computes rows `i0..i1` (a multiple of [`MT`] of them) of the columns of
/// groups `g0..g1`.
///
/// # Safety
/// [`crate::cpu::isa::chosen`] admits AMX; the rows exist and `out` points to an
/// `m x n` buffer of which no other thread touches these elements.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn block(
    ops: &PackedOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    debug_assert_eq!((i1 - i0) % MT, 0);
    let wide = ops.q.bits == ActBits::Int16;
    // SAFETY: the caller's contract.
    unsafe {
        if wide {
            by_format!(ops.w.fmt, F => groups::<F, true>(ops, i0, i1, g0, g1, out))
        } else {
            by_format!(ops.w.fmt, F => groups::<F, false>(ops, i0, i1, g0, g1, out))
        }
    }
}

/// [`block`] for format `F` and activation width `WIDE`.
// A function of its own, as `packed::OutlinedTile::tile` is: inlined,
// every format and width made `block` one body of 170 thousand lines of
// IR. `#[inline(never)]` holds because `block`, which calls it, has the
// same target features (see `packed::outlined`).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline(never)]
unsafe fn groups<const F: u8, const WIDE: bool>(
    ops: &PackedOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    let fmt = format::<F>();
    let cfg = TileConfig::new(if fmt.halves() { 16 } else { 32 });
    let in_place = fmt.signed();
    // (Taken out and put back rather than borrowed in a closure: closures
    // do not inherit the target features, and the kernel would lose them.)
    let mut scratch = SCRATCH.take();
    // SAFETY: the configuration is valid for palette 1; the tiles are
    // released before returning, so no tile state outlives the call.
    unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
    for g in g0..g1 {
        if !in_place {
            // SAFETY: AVX-512 per the caller; group g exists.
            unsafe { decode_group::<F>(ops, g, &mut scratch) };
        }
        for i in (i0..i1).step_by(MT) {
            // SAFETY: the caller's contract; the scratch holds group g's codes.
            unsafe { tile::<F, WIDE>(ops, scratch.as_ptr() as *const u8, i, g, out) };
        }
    }
    // SAFETY: returns the tile state to its initial (unused) form.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
    SCRATCH.set(scratch);
}

/// Writes group `g`'s codes, made signed (`u - K`), to `scratch`: per file
/// block and sub-block, the eight code vectors of 64 bytes in order.
#[inline(always)]
unsafe fn decode_group<const F: u8>(ops: &PackedOperands, g: usize, scratch: &mut Vec<__m512i>) {
    let fmt = format::<F>();
    let subs = fmt.subs();
    let blocks = ops.k / 32 / subs;
    scratch.clear();
    scratch.reserve(blocks * subs * 8);
    // SAFETY: AVX-512 per the caller; every chunk is a whole chunk of the format.
    unsafe {
        let zp = _mm512_set1_epi8(fmt.zero_point() as i8);
        for fb in 0..blocks {
            let p = ops.chunk(fmt, g, fb).as_ptr();
            for s in 0..subs {
                for c in codes512::<F>(p.add(s * fmt.sub_bytes())) {
                    scratch.push(_mm512_sub_epi8(c, zp));
                }
            }
        }
    }
}

/// Sums of one step waiting for their epilogue: the step's scales and
/// the first row's `dx`, and which tile set (and buffers) hold them.
#[derive(Clone, Copy)]
struct Pending {
    sc: __m512,
    dx: *const f32,
    set: usize,
}

/// Input rows `i..i + 16` against group `g`.
///
/// The steps (sub-blocks, or their halves for Q2_K, Q3_K and Q6_K)
/// alternate between two tile sets, and each step's products are issued
/// before the previous step's epilogue: the tile unit's latency (the
/// products, then the store the vector loads wait for) overlaps the vector
/// work.
///
/// # Safety
/// As [`block`], with the tiles configured for `F`; `codes` holds group
/// `g`'s signed codes (unless `F` is Q8_0, read in place).
#[inline(always)]
unsafe fn tile<const F: u8, const WIDE: bool>(
    ops: &PackedOperands,
    codes: *const u8,
    i: usize,
    g: usize,
    out: *mut f32,
) {
    let fmt = format::<F>();
    let subs = fmt.subs();
    let nb = ops.k / 32;
    let q = ops.q;
    // Per 32-block of a row: 64 bytes (`hi` then `lo`) when wide, else 32.
    let xb = if WIDE { 64 } else { 32 };
    let xs = if WIDE { q.hilo.as_ptr() } else { q.qx.as_ptr() };
    let a_stride = xb * nb;
    // `hi` and `lo` sums of each tile set.
    let mut sums = [const { Sums([0; MT * NR]) }; 4];
    // SAFETY: the tiles read rows i..i + 16 of the activations (inside the
    // quantized rows), whole sub-blocks of codes, and write the sums
    // buffers; the scalar reads are of blocks of those rows.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); MT];
        let mut pending: Option<Pending> = None;
        let mut step = 0;
        for fb in 0..nb / subs {
            let chunk = ops.chunk(fmt, g, fb).as_ptr();
            let head = chunk.add(fmt.head());
            let (d, second) = head512::<F>(head);
            for s in 0..subs {
                let b = fb * subs + s;
                let (sc0, sc1, _, _) = scales512::<F>(head, d, second, s);
                let w = if fmt.signed() {
                    chunk
                } else {
                    codes.add(64 * 8 * b)
                };
                let a = xs.add(xb * (i * nb + b)) as *const u8;
                let dx = q.dx.as_ptr().add(i * nb + b);
                let halves = if fmt.halves() { 2 } else { 1 };
                for (h, sc) in [sc0, sc1].into_iter().take(halves).enumerate() {
                    let set = step % 2;
                    let (lo_sums, hi_sums) = sums.split_at_mut(2 * set + 1);
                    let (hi, lo) = (&mut lo_sums[2 * set], &mut hi_sums[0]);
                    let (a, w) = (a.add(16 * h), w.add(4 * VB * h));
                    if set == 0 {
                        products::<WIDE, 0>(a, a_stride, w, hi, lo);
                    } else {
                        products::<WIDE, 1>(a, a_stride, w, hi, lo);
                    }
                    if let Some(p) = pending {
                        let [h, l] = [&sums[2 * p.set], &sums[2 * p.set + 1]];
                        epilogue::<WIDE>(h, l, p.dx, nb, p.sc, &mut acc);
                    }
                    pending = Some(Pending { sc, dx, set });
                    step += 1;
                }
            }
        }
        if let Some(p) = pending {
            let [h, l] = [&sums[2 * p.set], &sums[2 * p.set + 1]];
            epilogue::<WIDE>(h, l, p.dx, nb, p.sc, &mut acc);
        }
        if fmt.has_min() {
            // The offsets' chain, after the sums' (each output's two chains
            // are independent, so this is the VNNI kernels' result).
            let mut off = [_mm512_setzero_ps(); MT];
            for fb in 0..nb / subs {
                let head = ops.chunk(fmt, g, fb).as_ptr().add(fmt.head());
                let (d, second) = head512::<F>(head);
                for s in 0..subs {
                    let (_, _, min0, min1) = scales512::<F>(head, d, second, s);
                    let b = fb * subs + s;
                    if fmt.halves() {
                        // Q2_K: a minimum per half, against the halves' sums.
                        let xsum = q.sum16.as_ptr().add(2 * (i * nb + b));
                        for (r, o) in off.iter_mut().enumerate() {
                            let x0 = _mm512_set1_ps(*xsum.add(2 * r * nb));
                            let x1 = _mm512_set1_ps(*xsum.add(2 * r * nb + 1));
                            *o = _mm512_fmadd_ps(min1, x1, _mm512_fmadd_ps(min0, x0, *o));
                        }
                    } else {
                        let xsum = q.sum32.as_ptr().add(i * nb + b);
                        for (r, o) in off.iter_mut().enumerate() {
                            *o = _mm512_fmadd_ps(min0, _mm512_set1_ps(*xsum.add(r * nb)), *o);
                        }
                    }
                }
            }
            for (a, o) in acc.iter_mut().zip(off) {
                *a = _mm512_add_ps(*a, o);
            }
        }
        let j0 = g * NR;
        let lanes = (ops.n - j0).min(NR);
        let mask: __mmask16 = if lanes == NR { !0 } else { (1u16 << lanes) - 1 };
        for (r, y) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add((i + r) * ops.n + j0), mask, *y);
        }
    }
}

/// The exact sums of 16 activation rows (the `hi` bytes at `a`, rows
/// `stride` apart, and when `WIDE` the `lo` bytes 32 further) against the
/// code vectors at `w`, into `hi` and `lo`, on tile set `SET`: sums in
/// tiles 0 and 1 and codes in 4 (set 0), or 5, 6 and 7 (set 1); the
/// activations in 2 and 3 either way.
#[inline(always)]
unsafe fn products<const WIDE: bool, const SET: usize>(
    a: *const u8,
    stride: usize,
    w: *const u8,
    hi: &mut Sums,
    lo: &mut Sums,
) {
    // SAFETY: the caller's contract: the tiles are configured, and the
    // rows and code vectors they load exist.
    unsafe {
        macro_rules! run {
            ($c_hi:literal, $c_lo:literal, $b:literal) => {
                asm!(
                    concat!("tilezero ", $c_hi),
                    "tileloadd tmm2, [{a} + {stride}*1]",
                    concat!("tileloadd ", $b, ", [{w} + {vb}*1]"),
                    concat!("tdpbssd ", $c_hi, ", tmm2, ", $b),
                    concat!("tilestored [{hi} + {vb}*1], ", $c_hi),
                    a = in(reg) a,
                    stride = in(reg) stride,
                    w = in(reg) w,
                    vb = in(reg) VB,
                    hi = in(reg) hi.0.as_mut_ptr(),
                    options(nostack),
                );
                if WIDE {
                    asm!(
                        concat!("tilezero ", $c_lo),
                        "tileloadd tmm3, [{a} + {stride}*1]",
                        concat!("tdpbssd ", $c_lo, ", tmm3, ", $b),
                        concat!("tilestored [{lo} + {vb}*1], ", $c_lo),
                        a = in(reg) a.add(32),
                        stride = in(reg) stride,
                        vb = in(reg) VB,
                        lo = in(reg) lo.0.as_mut_ptr(),
                        options(nostack),
                    );
                }
            };
        }
        if SET == 0 {
            run!("tmm0", "tmm1", "tmm4");
        } else {
            run!("tmm5", "tmm6", "tmm7");
        }
    }
}

/// `acc[r] = fma(float(S_r) * dx_r, sc, acc[r])` for the 16 rows, with
/// `S = 255 * hi + lo` when `WIDE` (else `hi`), `dx_r` at `dx + r * nb`.
#[inline(always)]
unsafe fn epilogue<const WIDE: bool>(
    hi: &Sums,
    lo: &Sums,
    dx: *const f32,
    nb: usize,
    sc: __m512,
    acc: &mut [__m512; MT],
) {
    // SAFETY: AVX-512 per the caller; `dx + r * nb` are blocks of the tile's rows.
    unsafe {
        for (r, a) in acc.iter_mut().enumerate() {
            let h = _mm512_load_si512(hi.0.as_ptr().add(NR * r) as *const __m512i);
            let s = if WIDE {
                let l = _mm512_load_si512(lo.0.as_ptr().add(NR * r) as *const __m512i);
                _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32::<8>(h), h), l)
            } else {
                h
            };
            let v = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(*dx.add(r * nb)));
            *a = _mm512_fmadd_ps(v, sc, *a);
        }
    }
}
