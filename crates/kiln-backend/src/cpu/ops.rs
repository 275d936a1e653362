//! Row-wise and element-wise ops of the CPU backend.

use rayon::prelude::*;

use super::isa;
use super::tensor::CpuTensor;
use super::weight::CpuWeight;
use crate::{Activation, BackendError, Result, RopeLayout};

/// Rows per rayon task for cheap row-wise ops: enough work to amortise scheduling.
const ROWS_PER_TASK: usize = 4;

fn shape_err(op: &'static str, msg: String) -> BackendError {
    BackendError::Shape { op, msg }
}

pub(super) fn embedding(table: &CpuWeight, tokens: &[u32]) -> Result<CpuTensor> {
    let (vocab, dim) = (table.rows, table.cols);
    let mut out = vec![0f32; tokens.len() * dim];
    for (row, &t) in out.chunks_exact_mut(dim).zip(tokens) {
        let t = t as usize;
        if t >= vocab {
            return Err(BackendError::Invalid {
                op: "embedding",
                msg: format!("token id {t} outside the vocabulary of {vocab}"),
            });
        }
        table.rows_f32(t, row);
    }
    CpuTensor::new(vec![tokens.len(), dim], out)
}

pub(super) fn add_position_embedding(
    x: &mut CpuTensor,
    table: &CpuTensor,
    offset: usize,
    positions: &[u32],
) -> Result<()> {
    let dim = x.cols();
    let rows = table.rows();
    if table.cols() != dim || positions.len() != x.rows() {
        return Err(shape_err(
            "position_embedding",
            format!(
                "x {:?}, table {:?}, {} positions",
                x.shape,
                table.shape,
                positions.len()
            ),
        ));
    }
    for (row, &p) in x.data.chunks_exact_mut(dim).zip(positions) {
        let p = p as usize + offset;
        if p >= rows {
            return Err(BackendError::Invalid {
                op: "position_embedding",
                msg: format!("position {p} beyond the table's {rows}"),
            });
        }
        row.iter_mut()
            .zip(&table.data[p * dim..(p + 1) * dim])
            .for_each(|(a, b)| *a += b);
    }
    Ok(())
}

fn check_vec(op: &'static str, x: &CpuTensor, w: &CpuTensor) -> Result<()> {
    if w.data.len() != x.cols() {
        return Err(shape_err(
            op,
            format!("x {:?}, weight {:?}", x.shape, w.shape),
        ));
    }
    Ok(())
}

/// `f(out_row, in_row)` for every row of `x`, rows in parallel, into a new tensor.
fn map_rows(x: &CpuTensor, f: impl Fn(&mut [f32], &[f32]) + Sync) -> Result<CpuTensor> {
    let dim = x.cols();
    let mut out = vec![0f32; x.data.len()];
    out.par_chunks_mut(dim * ROWS_PER_TASK)
        .zip(x.data.par_chunks(dim * ROWS_PER_TASK))
        .for_each(|(o, xi)| {
            for (o, xi) in o.chunks_exact_mut(dim).zip(xi.chunks_exact(dim)) {
                f(o, xi);
            }
        });
    CpuTensor::new(x.shape.clone(), out)
}

/// `sum((v - mean)^2)` in eight lanes, then theirs (a sum the compiler can
/// vectorise; a single running sum cannot be reordered). With `mean` 0 it
/// is the plain sum of squares, to the bit (`v - 0.0` is `v`).
fn sum_centred_squares(x: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; 8];
    let c = x.chunks_exact(8);
    let tail: f32 = c.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
    for v in c {
        for l in 0..8 {
            acc[l] += (v[l] - mean) * (v[l] - mean);
        }
    }
    acc.iter().sum::<f32>() + tail
}

pub(super) fn rms_norm(x: &CpuTensor, w: &CpuTensor, eps: f32) -> Result<CpuTensor> {
    check_vec("rms_norm", x, w)?;
    let dim = x.cols() as f32;
    map_rows(x, |o, xi| {
        let ms = sum_centred_squares(xi, 0.0) / dim;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in o.iter_mut().zip(xi).zip(&w.data) {
            *o = v * inv * g;
        }
    })
}

pub(super) fn layer_norm(
    x: &CpuTensor,
    w: &CpuTensor,
    b: &CpuTensor,
    eps: f32,
) -> Result<CpuTensor> {
    check_vec("layer_norm", x, w)?;
    check_vec("layer_norm", x, b)?;
    let dim = x.cols() as f32;
    map_rows(x, |o, xi| {
        // Both sums in eight lanes (one running sum is a chain of adds the
        // compiler may not reorder: 5.6% of a batch of BERT inputs).
        let mean = super::math::sum8(xi) / dim;
        let var = sum_centred_squares(xi, mean) / dim;
        let inv = 1.0 / (var + eps).sqrt();
        for (((o, &v), &g), &bb) in o.iter_mut().zip(xi).zip(&w.data).zip(&b.data) {
            *o = (v - mean) * inv * g + bb;
        }
    })
}

pub(super) fn rope(
    x: &mut CpuTensor,
    cos_sin: &CpuTensor,
    positions: &[u32],
    n_heads: usize,
    head_dim: usize,
    rot_dim: usize,
    layout: RopeLayout,
) -> Result<()> {
    let row = n_heads * head_dim;
    if x.cols() != row || positions.len() != x.rows() {
        return Err(shape_err(
            "rope",
            format!(
                "x {:?} for {n_heads}x{head_dim}, {} positions",
                x.shape,
                positions.len()
            ),
        ));
    }
    if rot_dim > head_dim || !rot_dim.is_multiple_of(2) || cos_sin.cols() != rot_dim {
        return Err(shape_err(
            "rope",
            format!(
                "rotary dim {rot_dim}, head dim {head_dim}, table {:?}",
                cos_sin.shape
            ),
        ));
    }
    let half = rot_dim / 2;
    let max_pos = cos_sin.rows();
    if let Some(&p) = positions.iter().find(|&&p| p as usize >= max_pos) {
        return Err(BackendError::Invalid {
            op: "rope",
            msg: format!("position {p} beyond the rotary table's {max_pos}"),
        });
    }
    x.data
        .par_chunks_mut(row)
        .zip(positions.par_iter())
        .for_each(|(xr, &p)| {
            let cs = &cos_sin.data[p as usize * rot_dim..(p as usize + 1) * rot_dim];
            let (cos, sin) = cs.split_at(half);
            for h in xr.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = match layout {
                        RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                        RopeLayout::HalfSplit => (i, i + half),
                    };
                    let (x0, x1) = (h[a], h[b]);
                    h[a] = x0 * cos[i] - x1 * sin[i];
                    h[b] = x0 * sin[i] + x1 * cos[i];
                }
            }
        });
    Ok(())
}

/// `act(gate) * up`, element-wise, written over `up` (which it takes):
/// each piece of `up` is copied to the stack first, so the loops read and
/// write separate slices and compute the same bits as into a new buffer.
pub(super) fn gated_activation(
    gate: &CpuTensor,
    mut up: CpuTensor,
    act: Activation,
) -> Result<CpuTensor> {
    if gate.shape != up.shape {
        return Err(shape_err(
            "gated_activation",
            format!("{:?} vs {:?}", gate.shape, up.shape),
        ));
    }
    const PIECE: usize = 4096;
    up.data
        .par_chunks_mut(PIECE)
        .zip(gate.data.par_chunks(PIECE))
        .for_each(|(o, g)| {
            let mut piece = [0f32; PIECE];
            let u = &mut piece[..o.len()];
            u.copy_from_slice(o);
            #[cfg(target_arch = "x86_64")]
            if gate_vector() {
                // SAFETY: AVX2 is present (the choice admits vector code).
                unsafe { gate_avx2(o, g, u, act) };
                return;
            }
            gate_rows(o, g, u, act);
        });
    Ok(up)
}

/// Whether the gated activation runs its AVX2 loop: where the one choice
/// of instruction sets admits vector code ([`isa::chosen`]).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn gate_vector() -> bool {
    isa::chosen().vector()
}

/// `o = act(g) * u`, element by element (SiLU, the common case, inlined
/// so that the loop vectorises).
#[inline(always)]
fn gate_rows(o: &mut [f32], g: &[f32], u: &[f32], act: Activation) {
    if let Activation::ClampedSwiglu { limit, .. } = act {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = (u.clamp(-limit, limit) + 1.0) * activate(g, act);
        }
    } else if act == Activation::Silu {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = silu(g) * u;
        }
    } else if act == Activation::Gelu {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = gelu(g) * u;
        }
    } else if act == Activation::GeluTanh {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = gelu_tanh(g) * u;
        }
    } else {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = activate(g, act) * u;
        }
    }
}

/// `x * sigmoid(x)`, with the exponential in plain arithmetic without FMAs
/// ([`super::math::exp`]): the same bits on every CPU and build, and a
/// loop over it vectorises.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + super::math::exp::<false>(-x))
}

/// [`gate_rows`] compiled for AVX2: SiLU's exponential is plain arithmetic
/// ([`super::math::exp`]), so the loop runs eight lanes wide, with the
/// same IEEE operations and so the same bits as the baseline build.
///
/// # Safety
/// AVX2 is present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gate_avx2(o: &mut [f32], g: &[f32], u: &[f32], act: Activation) {
    gate_rows(o, g, u, act)
}

pub(super) fn activation_inplace(x: &mut CpuTensor, act: Activation) {
    x.data.par_chunks_mut(4096).for_each(|c| {
        #[cfg(target_arch = "x86_64")]
        if gate_vector() {
            // SAFETY: AVX2 is present (the choice admits vector code).
            unsafe { activate_avx2(c, act) };
            return;
        }
        activate_rows(c, act);
    });
}

/// `v = act(v)`, element by element, with a loop per activation so that
/// each vectorises (BERT's GELU took 30% of a batch of 256-token inputs
/// while it was a scalar call per element).
#[inline(always)]
fn activate_rows(v: &mut [f32], act: Activation) {
    match act {
        Activation::Silu => v.iter_mut().for_each(|x| *x = silu(*x)),
        Activation::Gelu => v.iter_mut().for_each(|x| *x = gelu(*x)),
        Activation::GeluTanh => v.iter_mut().for_each(|x| *x = gelu_tanh(*x)),
        _ => v.iter_mut().for_each(|x| *x = activate(*x, act)),
    }
}

/// [`activate_rows`] compiled for AVX2, with the same IEEE operations and
/// so the same bits as the baseline build (as [`gate_avx2`]).
///
/// # Safety
/// AVX2 is present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn activate_avx2(v: &mut [f32], act: Activation) {
    activate_rows(v, act)
}

/// GELU, `x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`, in plain f32
/// arithmetic ([`erf_f32`]) so that a loop over it vectorises.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU's tanh approximation, `0.5 x (1 + tanh(u))` with
/// `u = sqrt(2/pi) (x + 0.044715 x^3)`, written as the equal
/// `x / (1 + e^(-2u))`: one exponential in plain arithmetic
/// ([`super::math::exp`], which saturates rather than overflows), no
/// library tanh.
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    let u = C * (x + 0.044715 * x * x * x);
    x / (1.0 + super::math::exp::<false>(-2.0 * u))
}

/// erf in plain f32 arithmetic (Abramowitz and Stegun 7.1.26: a
/// polynomial in `1 / (1 + p|x|)` times `e^(-x^2)`, within 1.5e-7 of erf
/// plus the f32 rounding, against 1.2e-7 for f32 itself near 1). [`erf`]
/// is the f64 reference the tests hold it to.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let ax = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * ax);
    let mut p = 1.061_405_4;
    p = p * t - 1.453_152_1;
    p = p * t + 1.421_413_7;
    p = p * t - 0.284_496_74;
    p = p * t + 0.254_829_6;
    let r = 1.0 - p * t * super::math::exp::<false>(-ax * ax);
    r.copysign(x)
}

/// One activation value.
#[inline]
pub fn activate(x: f32, act: Activation) -> f32 {
    match act {
        Activation::Silu => silu(x),
        Activation::Relu => x.max(0.0),
        Activation::Gelu => gelu(x),
        Activation::GeluTanh => gelu_tanh(x),
        // The gate's half of gpt-oss's clamped SwiGLU (`gate_rows` clamps
        // and adds the up projection): `g * sigmoid(alpha * g)`, g = min(x, limit).
        Activation::ClampedSwiglu { alpha, limit } => {
            let g = x.min(limit);
            g / (1.0 + super::math::exp::<false>(-alpha * g))
        }
    }
}

/// Error function, to f32 precision (W. J. Cody's rational approximations,
/// evaluated in f64): the reference the activations' [`erf_f32`] is
/// tested against.
// The coefficients are Cody's published values, kept digit for digit.
#[cfg(test)]
#[allow(clippy::excessive_precision)]
pub fn erf(x: f32) -> f32 {
    let x = x as f64;
    let ax = x.abs();
    let r = if ax < 0.5 {
        // erf(x) = x * P(x^2)/Q(x^2)
        let t = x * x;
        let p = [
            3.209377589138469e3,
            3.774852376853020e2,
            1.138641541510502e2,
            3.161123743870566,
            1.857777061846032e-1,
        ];
        let q = [
            2.844236833439171e3,
            1.282616526077372e3,
            2.440246379344442e2,
            2.360129095234412e1,
            1.0,
        ];
        let num = (((p[4] * t + p[3]) * t + p[2]) * t + p[1]) * t + p[0];
        let den = (((q[4] * t + q[3]) * t + q[2]) * t + q[1]) * t + q[0];
        return (x * num / den) as f32;
    } else if ax < 4.0 {
        let p = [
            1.23033935479799725e3,
            2.05107837782607147e3,
            1.71204761263407058e3,
            8.81952221241769090e2,
            2.98635138197400131e2,
            6.61191906371416295e1,
            8.88314979438837594,
            5.64188496988670089e-1,
            2.15311535474403846e-8,
        ];
        let q = [
            1.23033935480374942e3,
            3.43936767414372164e3,
            4.36261909014324716e3,
            3.29079923573345963e3,
            1.62138957456669019e3,
            5.37181101862009858e2,
            1.17693950891312499e2,
            1.57449261107098347e1,
            1.0,
        ];
        let mut num = p[8];
        let mut den = q[8];
        for i in (0..8).rev() {
            num = num * ax + p[i];
            den = den * ax + q[i];
        }
        1.0 - (-ax * ax).exp() * num / den
    } else {
        1.0
    };
    (if x < 0.0 { -r } else { r }) as f32
}
