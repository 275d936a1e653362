//! The K-quant block quantizers (super-blocks of 256 elements).
//!
//! Kept apart from the 32-element formats because their scale search is the
//! bulk of the code: each sub-block gets the scale (and for Q4_K the minimum)
//! that minimises a weighted squared error over a small sweep of candidates,
//! then those per-sub-block values are themselves quantized against one f16
//! super-block scale. The candidate sweeps and weights are llama.cpp's, so the
//! blocks agree with its reference quantizer.

use crate::quant::scale_min_k4;
use crate::quantize::{nearest, put_f16};

/// Elements per K-quant super-block.
const QK: usize = 256;

/// Ranges below this are treated as all zero (ggml's `GROUP_MAX_EPS`).
const EPS: f32 = 1e-15;

/// The best affine fit `x ≈ scale * l - min` with `l` in `0..=nmax` for one
/// sub-block: starts from the plain min/max fit, then tries `nstep + 1`
/// stretched grids, keeping the least-squares (scale, min) of whichever
/// rounding has the smallest weighted squared error. Writes the levels into
/// `levels` and returns (scale, min) with `min >= 0`.
fn fit_scale_min(
    x: &[f32],
    w: &[f32],
    nmax: i32,
    levels: &mut [u8],
    (rmin, rdelta, nstep): (f32, f32, i32),
) -> (f32, f32) {
    let mut lo = x[0];
    let mut hi = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for (&v, &wi) in x.iter().zip(w).skip(1) {
        lo = lo.min(v);
        hi = hi.max(v);
        sum_w += wi;
        sum_x += wi * v;
    }
    if lo > 0.0 {
        lo = 0.0;
    }
    if hi == lo {
        levels.fill(0);
        return (0.0, -lo);
    }
    let clamp = |v: f32| nearest(v).clamp(0, nmax);
    let mut iscale = nmax as f32 / (hi - lo);
    let mut scale = 1.0 / iscale;
    let mut best = 0f32;
    for ((l, &v), &wi) in levels.iter_mut().zip(x).zip(w) {
        *l = clamp(iscale * (v - lo)) as u8;
        let diff = scale * *l as f32 + lo - v;
        best += wi * diff * diff;
    }
    let mut trial = [0u8; 32];
    let trial = &mut trial[..x.len()];
    for step in 0..=nstep {
        iscale = (rmin + rdelta * step as f32 + nmax as f32) / (hi - lo);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for ((t, &v), &wi) in trial.iter_mut().zip(x).zip(w) {
            let l = clamp(iscale * (v - lo));
            *t = l as u8;
            let l = l as f32;
            sum_l += wi * l;
            sum_l2 += wi * l * l;
            sum_xl += wi * l * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut s = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut m = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if m > 0.0 {
                m = 0.0;
                s = sum_xl / sum_l2;
            }
            let mut err = 0f32;
            for ((&t, &v), &wi) in trial.iter().zip(x).zip(w) {
                let diff = s * t as f32 + m - v;
                err += wi * diff * diff;
            }
            if err < best {
                levels.copy_from_slice(trial);
                best = err;
                scale = s;
                lo = m;
            }
        }
    }
    (scale, -lo)
}

/// A Q4_K super-block: 8 sub-blocks of 32 four-bit levels, each with a 6-bit
/// scale and 6-bit minimum relative to the f16 `d` and `dmin`:
/// x = d * sc * q - dmin * m.
pub(crate) fn q4_k(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!((x.len(), out.len()), (QK, 144));
    let mut levels = [0u8; QK];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut weights = [0f32; 32];
    for j in 0..8 {
        let xs = &x[32 * j..32 * (j + 1)];
        let sum_x2 = xs.iter().fold(0f32, |a, v| a + v * v);
        let av = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av + v.abs();
        }
        (scales[j], mins[j]) = fit_scale_min(
            xs,
            &weights,
            15,
            &mut levels[32 * j..32 * (j + 1)],
            (-1.0, 0.1, 20),
        );
    }
    let max_scale = scales.iter().fold(0f32, |a, &s| if s > a { s } else { a });
    let max_min = mins.iter().fold(0f32, |a, &m| if m > a { m } else { a });
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let packed = &mut out[4..16];
    packed.fill(0);
    for j in 0..8 {
        let ls = (nearest(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            // The low 4 bits share a byte; the top 2 ride in the high bits
            // of the first 8 bytes.
            packed[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = put_f16(out, 0, max_scale / 63.0);
    let dmin = put_f16(out, 2, max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &out[4..16]);
        let step = d * sc as f32;
        if step == 0.0 {
            continue;
        }
        let offset = dmin * m as f32;
        for (l, &v) in levels[32 * j..32 * (j + 1)]
            .iter_mut()
            .zip(&x[32 * j..32 * (j + 1)])
        {
            *l = nearest((v + offset) / step).clamp(0, 15) as u8;
        }
    }
    let qs = &mut out[16..144];
    for c in 0..4 {
        for l in 0..32 {
            qs[32 * c + l] = levels[64 * c + l] | (levels[64 * c + l + 32] << 4);
        }
    }
}

/// The best symmetric scale for `x ≈ scale * (l - nmax)` with `l` in
/// `0..2 * nmax`, weighting each element by its square: the plain max fit,
/// then 18 nearby grids, keeping the least-squares scale of the best.
fn fit_scale(x: &[f32], nmax: i32, levels: &mut [u8]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < EPS {
        levels.fill(0);
        return 0.0;
    }
    let nm = nmax as f32;
    let level = |iscale: f32, v: f32| nearest(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        x.iter().fold((0f32, 0f32), |(lx, l2), &v| {
            let l = level(iscale, v) as f32;
            let w = v * v;
            (lx + w * v * l, l2 + w * l * l)
        })
    };
    let fill = |iscale: f32, levels: &mut [u8]| {
        for (l, &v) in levels.iter_mut().zip(x) {
            *l = (level(iscale, v) + nmax) as u8;
        }
    };
    let iscale = -nm / max;
    fill(iscale, levels);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = sumlx / suml2;
    let mut best = scale * sumlx;
    for step in (-9..=9).filter(|&s| s != 0) {
        let iscale = -(nm + 0.1 * step as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            fill(iscale, levels);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// A Q6_K super-block: 16 sub-blocks of 16 six-bit levels (low 4 bits in
/// `ql`, high 2 in `qh`), each with a signed 8-bit scale relative to the f16
/// `d`: x = d * sc * (q - 32).
pub(crate) fn q6_k(x: &[f32], out: &mut [u8]) {
    debug_assert_eq!((x.len(), out.len()), (QK, 210));
    let mut levels = [0u8; QK];
    let mut scales = [0f32; 16];
    let (mut amax, mut max_scale) = (0f32, 0f32);
    for (j, s) in scales.iter_mut().enumerate() {
        *s = fit_scale(
            &x[16 * j..16 * (j + 1)],
            32,
            &mut levels[16 * j..16 * (j + 1)],
        );
        if s.abs() > amax {
            amax = s.abs();
            max_scale = *s;
        }
    }
    out.fill(0);
    if amax < EPS {
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = put_f16(out, 208, 1.0 / iscale);
    for (j, &s) in scales.iter().enumerate() {
        let sc = nearest(iscale * s).min(127) as i8;
        out[192 + j] = sc as u8;
        let step = d * sc as f32;
        if step == 0.0 {
            continue;
        }
        for (l, &v) in levels[16 * j..16 * (j + 1)]
            .iter_mut()
            .zip(&x[16 * j..16 * (j + 1)])
        {
            *l = (nearest(v / step).clamp(-32, 31) + 32) as u8;
        }
    }
    let (ql, rest) = out.split_at_mut(128);
    let qh = &mut rest[..64];
    for half in 0..2 {
        let lv = &levels[128 * half..128 * (half + 1)];
        let ql = &mut ql[64 * half..64 * (half + 1)];
        let qh = &mut qh[32 * half..32 * (half + 1)];
        for l in 0..32 {
            let (a, b, c, e) = (lv[l], lv[l + 32], lv[l + 64], lv[l + 96]);
            ql[l] = (a & 0x0f) | ((c & 0x0f) << 4);
            ql[l + 32] = (b & 0x0f) | ((e & 0x0f) << 4);
            qh[l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
        }
    }
}
