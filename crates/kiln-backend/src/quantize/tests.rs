//! Round trips through the existing dequantizers, with each format's error
//! bound checked element by element.

use super::*;
use crate::quant::dequantize;

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        bits as f32 / (1u64 << 24) as f32
    }

    /// Rows mixing scales: mostly N(0, σ)-like values with a few outliers,
    /// the shape of real weight rows.
    fn rows(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let u = self.next_f32() * 2.0 - 1.0;
                let outlier = if i % 97 == 5 { 6.0 } else { 1.0 };
                u * scale * outlier
            })
            .collect()
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn round_trip(ty: GgmlType, x: &[f32], cols: usize) -> (Vec<u8>, Vec<f32>) {
    let q = quantize(ty, x, cols).expect("quantize");
    assert_eq!(
        q.len(),
        x.len() / cols * row_bytes(ty, cols).expect("whole blocks")
    );
    let y = dequantize(ty, &q, x.len()).expect("dequantize");
    (q, y)
}

fn inputs() -> Vec<Vec<f32>> {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    vec![
        rng.rows(4 * 512, 0.02),
        rng.rows(2 * 512, 3.0),
        // A row shifted off zero (Q4_1 and Q4_K must use their minimum).
        rng.rows(512, 1.0).into_iter().map(|v| v + 2.5).collect(),
    ]
}

#[test]
fn q8_0_error_is_at_most_half_a_step() {
    for x in inputs() {
        let (q, y) = round_trip(GgmlType::Q8_0, &x, 512);
        for (b, (xs, ys)) in q.chunks_exact(34).zip(x.chunks(32).zip(y.chunks(32))) {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let d16 = f16_at(b, 0);
            // Rounding to the grid of d costs d/2; storing d as f16 moves
            // the level |q| <= 127 by at most 127 * |d - d16|.
            let bound = d / 2.0 + 127.0 * (d - d16).abs() + 1e-6 * amax;
            for (a, c) in xs.iter().zip(ys) {
                assert!((a - c).abs() <= bound, "{a} -> {c}, bound {bound}");
            }
        }
    }
}

#[test]
fn q4_0_error_is_at_most_one_step() {
    for x in inputs() {
        let (q, y) = round_trip(GgmlType::Q4_0, &x, 512);
        for (b, (xs, ys)) in q.chunks_exact(18).zip(x.chunks(32).zip(y.chunks(32))) {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 8.0;
            let d16 = f16_at(b, 0).abs();
            // Levels -8..=7 around the signed extreme: the opposite extreme
            // (+8 steps) is clipped to 7, a full step; the rest round (d/2).
            let bound = d + 8.0 * (d - d16).abs() + 1e-6 * amax;
            for (a, c) in xs.iter().zip(ys) {
                assert!((a - c).abs() <= bound, "{a} -> {c}, bound {bound}");
            }
        }
    }
}

#[test]
fn q4_1_error_is_at_most_half_a_step() {
    for x in inputs() {
        let (q, y) = round_trip(GgmlType::Q4_1, &x, 512);
        for (b, (xs, ys)) in q.chunks_exact(20).zip(x.chunks(32).zip(y.chunks(32))) {
            let lo = xs.iter().fold(f32::MAX, |m, &v| m.min(v));
            let hi = xs.iter().fold(f32::MIN, |m, &v| m.max(v));
            let d = (hi - lo) / 15.0;
            let (d16, m16) = (f16_at(b, 0), f16_at(b, 2));
            let bound = d / 2.0 + 15.0 * (d - d16).abs() + (lo - m16).abs() + 1e-6 * hi.abs();
            for (a, c) in xs.iter().zip(ys) {
                assert!((a - c).abs() <= bound, "{a} -> {c}, bound {bound}");
            }
        }
    }
}

/// K-quant bounds per super-block of 256, relative to the span its grid
/// must cover: the values together with zero for the formats with a
/// minimum, [-max|x|, max|x|] for the symmetric ones.
fn check_k(ty: GgmlType, symmetric: bool, max_over_range: f32, rms_over_range: f32) {
    for x in inputs() {
        let (_, y) = round_trip(ty, &x, 512);
        for (xs, ys) in x.chunks(256).zip(y.chunks(256)) {
            let lo = xs.iter().fold(0f32, |m, &v| m.min(v));
            let hi = xs.iter().fold(0f32, |m, &v| m.max(v));
            let range = if symmetric {
                2.0 * hi.max(-lo)
            } else {
                hi - lo
            };
            let mut sq = 0f32;
            for (a, c) in xs.iter().zip(ys) {
                let e = (a - c).abs();
                assert!(
                    e <= max_over_range * range,
                    "{ty:?}: {a} -> {c}, range {range}"
                );
                sq += e * e;
            }
            let rms = (sq / 256.0).sqrt();
            assert!(
                rms <= rms_over_range * range,
                "{ty:?}: rms {rms} over range {range}"
            );
        }
    }
}

#[test]
fn q4_k_stays_within_one_coarse_step() {
    // 16 levels over the super-block's span: a step of range/15. Each
    // element is within one such step (half a step of rounding plus the
    // 6-bit rounding of its sub-block's scale and minimum), and the RMS
    // error is below that of plain rounding on the coarse grid
    // (step / sqrt(12) = range / 52).
    check_k(GgmlType::Q4K, false, 1.0 / 15.0, 1.0 / 52.0);
}

#[test]
fn q6_k_stays_within_one_coarse_step() {
    // 64 levels over [-max|x|, max|x|]: a step of span/64 at the coarsest
    // sub-block; one step bounds each element (half for rounding, the rest
    // for the clipped +32 level and the 8-bit sub-block scale), and the RMS
    // error is below plain rounding's step / sqrt(12) = span / 222.
    check_k(GgmlType::Q6K, true, 1.0 / 64.0, 1.0 / 222.0);
}

#[test]
fn zero_rows_stay_zero_in_every_format() {
    for (ty, _) in QUANTIZE_TARGETS {
        let (_, y) = round_trip(ty, &[0.0; 512], 256);
        assert!(y.iter().all(|&v| v == 0.0), "{ty:?}");
    }
}

#[test]
fn more_bits_mean_less_error() {
    let x = &inputs()[0];
    let err = |ty| {
        let (_, y) = round_trip(ty, x, 512);
        x.iter()
            .zip(&y)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
    };
    let (q8, q6, q4k, q40) = (
        err(GgmlType::Q8_0),
        err(GgmlType::Q6K),
        err(GgmlType::Q4K),
        err(GgmlType::Q4_0),
    );
    assert!(q8 < q6 && q6 < q4k && q4k < q40, "{q8} {q6} {q4k} {q40}");
}

#[test]
fn bad_shapes_and_formats_are_errors() {
    assert_eq!(
        quantize(GgmlType::Q4K, &[0.0; 128], 128),
        Err(QuantizeError::Ragged {
            ty: GgmlType::Q4K,
            cols: 128,
            block: 256
        })
    );
    assert_eq!(
        quantize(GgmlType::Q8_0, &[0.0; 48], 32),
        Err(QuantizeError::Shape { len: 48, cols: 32 })
    );
    let e = quantize(GgmlType::Q5K, &[0.0; 256], 256).unwrap_err();
    assert_eq!(e, QuantizeError::Unsupported(GgmlType::Q5K));
    assert!(
        e.to_string().contains("q8_0, q4_0, q4_1, q4_k, q6_k"),
        "{e}"
    );
}

/// Inputs for a rounding check: `special`, then `2 * half` values from
/// `-half / div` upward in steps of `1 / div` (every tie a multiple of a
/// half on the way), then 100,000 drawn uniformly from ±`spread`.
fn rounding_inputs(special: &[f32], half: usize, div: f32, seed: u64, spread: f32) -> Vec<f32> {
    let mut cases = special.to_vec();
    cases.extend((0..2 * half).map(|i| (i as f32 - half as f32) / div));
    let mut rng = Rng(seed);
    cases.extend((0..100_000).map(|_| (rng.next_f32() * 2.0 - 1.0) * spread));
    cases
}

#[test]
fn rounding_half_away_from_zero_matches_round_for_every_quantizer_input() {
    // The ties, the values just below them (0.49999997 + 0.5 rounds up in
    // f32 arithmetic, the classic trap), zeros, and the ends of Q8_0's range.
    let special = [
        0.0f32,
        -0.0,
        0.5,
        -0.5,
        1.5,
        -2.5,
        0.499_999_97,
        -0.499_999_97,
        126.5,
        -127.0,
        127.0,
        f32::MIN_POSITIVE,
        8_388_607.5,
    ];
    for x in rounding_inputs(&special, 50_000, 391.0, 0x5eed, 127.5) {
        // `==`: a zero's sign is lost in the cast to a code either way.
        assert!(
            round_half_away(x) == x.round(),
            "{x} ({:#x}): {} against {}",
            x.to_bits(),
            round_half_away(x),
            x.round()
        );
    }
    assert_eq!(round_half_away(f32::NAN) as i8, f32::NAN.round() as i8);
}

#[test]
fn the_vector_q8_0_gives_the_scalar_bytes() {
    let mut rng = Rng(0xc0de);
    let mut blocks: Vec<Vec<f32>> = (0..4000)
        .map(|i| rng.rows(32, [1e-3, 0.02, 1.0, 300.0][i % 4]))
        .collect();
    // Exact ties: the largest |x| is 127, so d = 1 and x / d is x itself.
    blocks.push(
        (0..32)
            .map(|i| if i == 0 { 127.0 } else { i as f32 - 15.5 })
            .collect(),
    );
    blocks.push(
        (0..32)
            .map(|i| if i == 3 { -127.0 } else { 0.5 * i as f32 - 7.5 })
            .collect(),
    );
    blocks.push(vec![0.0; 32]);
    let mut special = rng.rows(32, 1.0);
    special[5] = f32::NAN;
    blocks.push(special.clone());
    special[9] = f32::INFINITY;
    blocks.push(special);
    for (i, x) in blocks.iter().enumerate() {
        let (mut fast, mut slow) = ([0u8; 34], [0u8; 34]);
        q8_0(x, &mut fast);
        q8_0_scalar(x, &mut slow);
        assert_eq!(fast, slow, "block {i}: {x:?}");
    }
}

#[test]
fn nearest_rounds_half_to_even_like_round_ties_even() {
    let special = [
        0.0f32,
        -0.0,
        0.5,
        -0.5,
        1.5,
        2.5,
        -3.5,
        0.499_999_97,
        2_097_151.5,
        -2_097_150.5,
        2_097_152.5,
        4_194_303.5,
        -4_194_303.5,
        1e9,
        -1e9,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ];
    for x in rounding_inputs(&special, 100_000, 256.0, 0x7e57, 70.0) {
        assert_eq!(nearest(x), x.round_ties_even() as i32, "{x}");
    }
}
