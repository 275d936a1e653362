//! The acceptance rule that keeps the model's output distribution exact.
//!
//! The standard rule (Leviathan et al. 2023, "Fast Inference from
//! Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating
//! Large Language Model Decoding with Speculative Sampling"): with `p` the
//! target model's distribution at a position, `q` the proposer's and `d`
//! the proposed token, accept `d` with probability `min(1, p(d) / q(d))`;
//! on rejection draw from `max(0, p - q)` renormalised and stop there. The
//! emitted token is then distributed exactly as `p`.
//!
//! kiln's proposers guess without randomness (n-gram lookup, a greedy
//! draft), so `q` puts all its mass on `d`: the rule becomes "accept `d`
//! with probability `p(d)`, else draw from `p` with `d` removed", which is
//! the same joint law of (token, accepted) as "draw `x` from `p`; accept iff
//! `x == d`". The engine does the latter ([`crate::Sampler`] draws exactly
//! as without speculation), so a seeded request draws the same numbers and
//! gives the same tokens with speculation as without. [`accept_or_resample`]
//! is the general rule, for proposers that sample (EAGLE heads, a sampling
//! draft), and the tests check that both forms give `p`.

/// One position of the standard rule: `p` and `q` are probability vectors
/// over the vocabulary (summing to 1), `d` the proposed token, `u_accept`
/// and `u_draw` uniform numbers in [0, 1). Returns the emitted token and
/// whether it is the accepted proposal.
pub fn accept_or_resample(p: &[f64], q: &[f64], d: u32, u_accept: f64, u_draw: f64) -> (u32, bool) {
    let i = d as usize;
    let (pd, qd) = (
        p.get(i).copied().unwrap_or(0.0),
        q.get(i).copied().unwrap_or(0.0),
    );
    if qd > 0.0 && u_accept < (pd / qd).min(1.0) {
        return (d, true);
    }
    // The residual max(0, p - q), renormalised.
    let residual = |t: usize| (p[t] - q.get(t).copied().unwrap_or(0.0)).max(0.0);
    let mass: f64 = (0..p.len()).map(residual).sum();
    if mass <= 0.0 {
        // p == q: rejection has probability 0; keep the proposal.
        return (d, true);
    }
    let mut r = u_draw * mass;
    let mut last = 0;
    for t in 0..p.len() {
        let w = residual(t);
        if w > 0.0 {
            last = t;
            if r < w {
                return (t as u32, false);
            }
            r -= w;
        }
    }
    (last as u32, false)
}

/// Pearson's chi-square statistic of `counts` against probabilities `p`.
#[cfg(test)]
pub(crate) fn chi_square(counts: &[u64], p: &[f64]) -> f64 {
    let n: u64 = counts.iter().sum();
    counts
        .iter()
        .zip(p)
        .filter(|(_, &pi)| pi > 0.0)
        .map(|(&c, &pi)| {
            let e = pi * n as f64;
            (c as f64 - e).powi(2) / e
        })
        .sum()
}

/// The chi-square value a correct sampler exceeds with probability about
/// 0.001, for `df` degrees of freedom (Wilson-Hilferty).
#[cfg(test)]
pub(crate) fn chi_square_critical(df: usize) -> f64 {
    let k = df as f64;
    let z = 3.09;
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }
        fn draw(&mut self, p: &[f64]) -> u32 {
            let mut r = self.next();
            for (i, &w) in p.iter().enumerate() {
                if r < w {
                    return i as u32;
                }
                r -= w;
            }
            (p.len() - 1) as u32
        }
    }

    const P: [f64; 6] = [0.35, 0.25, 0.2, 0.1, 0.07, 0.03];
    const N: usize = 200_000;

    /// The emitted token follows `p` whatever the proposer's `q`: one-hot
    /// (n-gram, greedy draft), or a real distribution (a sampling draft)
    /// from which the proposal is drawn.
    #[test]
    fn the_standard_rule_emits_the_target_distribution() {
        let q_soft = [0.1, 0.1, 0.5, 0.1, 0.1, 0.1];
        let mut rng = Rng(11);
        for case in 0..3 {
            let mut counts = [0u64; 6];
            let mut accepted = 0u64;
            for _ in 0..N {
                let (q, d) = match case {
                    0 => {
                        let mut q = [0.0; 6];
                        q[4] = 1.0;
                        (q, 4)
                    }
                    1 => {
                        let mut q = [0.0; 6];
                        q[0] = 1.0;
                        (q, 0)
                    }
                    _ => {
                        let d = rng.draw(&q_soft);
                        (q_soft, d)
                    }
                };
                let (t, ok) = accept_or_resample(&P, &q, d, rng.next(), rng.next());
                counts[t as usize] += 1;
                accepted += u64::from(ok);
            }
            let x2 = chi_square(&counts, &P);
            assert!(
                x2 < chi_square_critical(5),
                "case {case}: chi2 {x2} {counts:?}"
            );
            // One-hot: acceptance is p(d).
            let want = [P[4], P[0], f64::NAN][case];
            if case < 2 {
                let rate = accepted as f64 / N as f64;
                assert!(
                    (rate - want).abs() < 0.005,
                    "case {case}: acceptance {rate}"
                );
            }
        }
        // A wrong rule is caught: always accepting a one-hot proposal.
        let counts = [0, 0, 0, 0, N as u64, 0];
        assert!(chi_square(&counts, &P) > chi_square_critical(5));
    }

    /// For a one-hot proposal, "draw from p, accept iff it equals d" (what
    /// the engine does) has the same joint law of (token, accepted) as the
    /// standard rule: compared cell by cell against the exact law.
    #[test]
    fn draw_then_compare_is_the_rule_for_one_hot_proposals() {
        let d = 1u32;
        let mut q = [0.0; 6];
        q[d as usize] = 1.0;
        // Cells: tokens 0..6 rejected, then "accepted".
        let mut exact: Vec<f64> = P.to_vec();
        exact[d as usize] = 0.0;
        exact.push(P[d as usize]);
        let mut rng = Rng(5);
        let (mut rule, mut compare) = (vec![0u64; 7], vec![0u64; 7]);
        for _ in 0..N {
            let (t, ok) = accept_or_resample(&P, &q, d, rng.next(), rng.next());
            rule[if ok { 6 } else { t as usize }] += 1;
            let x = rng.draw(&P);
            compare[if x == d { 6 } else { x as usize }] += 1;
        }
        for (name, counts) in [("rule", &rule), ("draw-then-compare", &compare)] {
            let x2 = chi_square(counts, &exact);
            assert!(x2 < chi_square_critical(5), "{name}: chi2 {x2} {counts:?}");
        }
    }
}
