//! Elementary functions in plain f32 arithmetic, so that loops over them
//! vectorise (the library's are a call per element) and every build
//! computes the same values.

/// `e^x` (for the attention softmax), within 2 ulp (3 without FMA): a power
/// of two times a polynomial on [-ln2/2, ln2/2].
#[inline(always)]
pub(crate) fn exp<const FMA: bool>(x: f32) -> f32 {
    let fma = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    if x < -87.0 {
        return 0.0;
    }
    let x = x.min(88.0);
    // k = round(x / ln2), by the 1.5 * 2^23 trick (|k| < 2^22).
    const MAGIC: f32 = 12_582_912.0;
    let k = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    // r = x - k ln2 in two steps (Cody and Waite), |r| <= ln2 / 2.
    let r = fma(k, -0.693_359_4, x);
    let r = fma(k, 2.121_944_4e-4, r);
    // e^r by its Taylor polynomial to r^6 (Horner).
    let mut p = 1.0 / 720.0;
    p = fma(p, r, 1.0 / 120.0);
    p = fma(p, r, 1.0 / 24.0);
    p = fma(p, r, 1.0 / 6.0);
    p = fma(p, r, 0.5);
    p = fma(p, r, 1.0);
    p = fma(p, r, 1.0);
    // 2^k from the exponent bits (k in -126..=127 here).
    // SAFETY: k is a whole number in -126..=127 (x was clamped above, and
    // a NaN x became 88 there), so the conversion cannot overflow; unlike
    // `as`, it compiles to one vector instruction.
    let k = unsafe { k.to_int_unchecked::<i32>() };
    let two_k = f32::from_bits(((k + 127) as u32) << 23);
    p * two_k
}

/// Sum of eight lanes in the order the AVX2 `hsum` adds them.
pub(crate) fn hsum8(a: &[f32; 8]) -> f32 {
    let s = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let t = [s[0] + s[2], s[1] + s[3]];
    t[0] + t[1]
}

/// Sum in eight lanes, then theirs as [`hsum8`] adds them, then the rest:
/// a fixed order that vectorises (a plain `.sum()` is one chain).
#[inline(always)]
pub(crate) fn sum8(a: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let c = a.chunks_exact(8);
    let tail: f32 = c.remainder().iter().sum();
    for x in c {
        for l in 0..8 {
            acc[l] += x[l];
        }
    }
    hsum8(&acc) + tail
}

#[cfg(test)]
mod tests {
    use super::exp;

    #[test]
    fn exp_is_within_a_few_ulp_of_the_library() {
        let mut worst = 0f64;
        // (Below e^-80 results near the smallest normal f32 lose relative
        // precision; a softmax weight of 1e-35 is zero for every purpose.)
        for i in 0..200_000 {
            let x = -80.0 + 168.0 * i as f32 / 200_000.0;
            for (got, fma) in [(exp::<true>(x), true), (exp::<false>(x), false)] {
                let want = (x as f64).exp();
                let ulp = (want as f32).abs() * f32::EPSILON;
                let err = (got as f64 - want).abs() / ulp as f64;
                let bound = if fma { 2.0 } else { 3.0 };
                assert!(err <= bound, "exp({x}) = {got}, want {want} (fma {fma})");
                worst = worst.max(err);
            }
        }
        assert_eq!(exp::<true>(-100.0), 0.0);
        assert_eq!(exp::<true>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp::<true>(0.0), 1.0);
        assert!(worst > 0.0);
    }
}
