//! The portable kernels: each family's canonical computation written out
//! element by element ([`crate::cpu::matmul`] states them). They run where
//! no vector kernel does (`KILN_CPU_ISA=portable`, or a CPU without one),
//! and they are what every vector kernel's results are compared with, bit
//! for bit.

use crate::cpu::actq::ActBits;
use crate::cpu::blocks::{self, IntOperands, Unpacked, QK};
use crate::cpu::float_packed::FloatOperands;
use crate::cpu::math::hsum8;
use crate::cpu::packed::{PackedOperands, PackedWeight, NR};

// The block formats from the file's rows (`KILN_CPU_REPACK=0`).

/// The portable kernel: the canonical computation, element by element.
///
/// # Safety
/// `out` points to an `m x n` buffer of which no other thread touches
/// these elements.
pub(crate) unsafe fn int_block(
    ops: &IntOperands,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
    out: *mut f32,
) {
    let mut scratch = PortableScratch::default();
    for i in i0..i1 {
        for j in j0..j1 {
            let y = portable_int(ops, i, j, &mut scratch);
            // SAFETY: i < m and j < n, inside the buffer; the caller owns the element.
            unsafe { *out.add(i * ops.n + j) = y };
        }
    }
}

/// Reused buffers of the portable integer kernel.
#[derive(Default)]
struct PortableScratch {
    block: Unpacked,
    coefs: Vec<f32>,
}

fn portable_int(ops: &IntOperands, i: usize, j: usize, scratch: &mut PortableScratch) -> f32 {
    let f = &ops.f;
    let (k, nb) = (ops.k, ops.k / QK);
    let cpb = f.coefs_per_block();
    let row = &ops.w[j * ops.row_bytes..(j + 1) * ops.row_bytes];
    let dx = &ops.q.dx[i * nb..(i + 1) * nb];
    let u = &mut scratch.block;
    scratch.coefs.clear();
    let mut acc = [0f32; 8];
    for (blk_i, blk) in row.chunks_exact(f.bytes).enumerate() {
        blocks::unpack(f, blk, u);
        scratch.coefs.extend_from_slice(&u.coef[..cpb]);
        for s in 0..f.elems / QK {
            let b = blk_i * (f.elems / QK) + s;
            let code = |t: usize| {
                let c = u.codes[QK * s + t];
                if f.signed {
                    c as i8 as i32
                } else {
                    c as i32
                }
            };
            let x0 = i * k + QK * b;
            for (l, a) in acc.iter_mut().enumerate() {
                let lane: i32 = lane_elements(ops.q.bits, l)
                    .iter()
                    .map(|&t| code(t) * ops.q.value(x0 + t))
                    .sum();
                *a = (lane as f32 * dx[b]).mul_add(u.scale[2 * s + l / 4], *a);
            }
        }
    }
    hsum8(&acc) + offset_dot(&scratch.coefs, ops.sums(i))
}

/// The four elements of a 32-block whose products lane `l` sums: neighbours
/// for 8-bit activations (`dpbusd` and `maddubs` sum groups of four bytes);
/// for 16-bit ones, two pairs of [`crate::cpu::actq::slot16`]'s layout.
fn lane_elements(bits: ActBits, l: usize) -> [usize; 4] {
    match bits {
        ActBits::Int8 => [4 * l, 4 * l + 1, 4 * l + 2, 4 * l + 3],
        ActBits::Int16 => {
            let e = 2 * l + if l >= 4 { 8 } else { 0 };
            [e, e + 1, e + 8, e + 9]
        }
    }
}

/// `sum(c[g] * s[g])`: eight lanes over `g`, their [`hsum8`], then the rest one by one.
fn offset_dot(c: &[f32], s: &[f32]) -> f32 {
    let n = c.len().min(s.len());
    let mut acc = [0f32; 8];
    let mut g = 0;
    while g + 8 <= n {
        for (l, a) in acc.iter_mut().enumerate() {
            *a = c[g + l].mul_add(s[g + l], *a);
        }
        g += 8;
    }
    let mut y = hsum8(&acc);
    while g < n {
        y = c[g].mul_add(s[g], y);
        g += 1;
    }
    y
}

// The block formats repacked at load ([`crate::cpu::packed`]).

/// The portable kernel: the canonical computation for input rows `i0..i1`
/// and groups `g0..g1`.
///
/// # Safety
/// `out` points to an `m x n` buffer of which no other thread touches
/// these elements.
pub(crate) unsafe fn packed_block(
    ops: &PackedOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    let fmt = ops.w.fmt;
    let q = ops.q;
    let nb = ops.k / QK;
    let (subs, parts) = (fmt.subs(), if fmt.halves() { 2 } else { 1 });
    let len = QK / parts;
    for i in i0..i1 {
        for g in g0..g1 {
            for r in 0..NR {
                let j = g * NR + r;
                if j >= ops.n {
                    break;
                }
                let (mut acc, mut off) = (0f32, 0f32);
                for b in 0..nb {
                    let (chunk, s) = (ops.chunk(fmt, g, b / subs), b % subs);
                    let ib = i * nb + b;
                    for h in 0..parts {
                        let dot: i32 = (h * len..(h + 1) * len)
                            .map(|t| PackedWeight::code(fmt, chunk, s, r, t) * q.value(ib * QK + t))
                            .sum();
                        let xsum = if parts == 2 {
                            q.isum16[2 * ib + h]
                        } else {
                            q.isum[ib]
                        };
                        let sum = dot - fmt.zero_point() * xsum;
                        let scale = PackedWeight::scale(fmt, chunk, s, h, r);
                        acc = (sum as f32 * q.dx[ib]).mul_add(scale, acc);
                    }
                    if fmt.has_min() {
                        for h in 0..parts {
                            let xsum = if parts == 2 {
                                q.sum16[2 * ib + h]
                            } else {
                                q.sum32[ib]
                            };
                            let min = PackedWeight::min(fmt, chunk, s, h, r);
                            off = min.mul_add(xsum, off);
                        }
                    }
                }
                // SAFETY: i < m and j < n, inside the buffer; the caller owns the element.
                unsafe { *out.add(i * ops.n + j) = acc + off };
            }
        }
    }
}

// The float formats ([`crate::cpu::float_packed`]).

/// The portable kernel: the canonical computation for input rows `i0..i1`
/// and groups `g0..g1`.
///
/// # Safety
/// `out` points to an `m x n` buffer of which no other thread touches
/// these elements.
pub(crate) unsafe fn float_block(
    ops: &FloatOperands,
    i0: usize,
    i1: usize,
    g0: usize,
    g1: usize,
    out: *mut f32,
) {
    let (k, size) = (ops.k, ops.w.fmt.size());
    let group_bytes = k * NR * size;
    for i in i0..i1 {
        let x = &ops.x[i * k..(i + 1) * k];
        for g in g0..g1 {
            let vectors = &ops.w.data[g * group_bytes..(g + 1) * group_bytes];
            let mut acc = [0f32; NR];
            for (&xt, v) in x.iter().zip(vectors.chunks_exact(NR * size)) {
                for (a, e) in acc.iter_mut().zip(v.chunks_exact(size)) {
                    *a = ops.w.fmt.widen(e).mul_add(xt, *a);
                }
            }
            let j0 = g * NR;
            for (r, &y) in acc.iter().enumerate().take(ops.n.saturating_sub(j0)) {
                // SAFETY: i < m and j0 + r < n, inside the buffer; the caller
                // owns the element.
                unsafe { *out.add(i * ops.n + j0 + r) = y };
            }
        }
    }
}
