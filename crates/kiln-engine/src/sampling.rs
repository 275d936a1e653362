//! Choosing the next token from logits: greedy, or sampled with temperature,
//! top-k, top-p and min-p, from a seeded generator so that a seed reproduces
//! the same output; with optional repetition, presence and frequency
//! penalties, and the most likely alternatives' log-probabilities.
//!
//! Order of operations on one row of logits:
//! 1. the log-probabilities reported back ([`Choice::logprob`],
//!    [`Choice::top_logprobs`]) are the log-softmax of the model's raw logits;
//! 2. the repetition penalty (Hugging Face semantics, over prompt and output
//!    tokens), then the presence and frequency penalties (OpenAI semantics,
//!    over output tokens) adjust the logits of tokens already seen; then
//!    `logit_bias` (OpenAI semantics) is added to the logits it names;
//! 3. a grammar's mask ([`Sampler::sample_allowed`], constrained decoding)
//!    removes every token the grammar does not allow next;
//! 4. greedy decoding takes the argmax of the penalised logits; sampling
//!    divides them by the temperature, keeps the top-k, then the top-p nucleus
//!    and the tokens at least min-p times as likely as the most likely one,
//!    and draws from what is left.
//!
//! Per step the penalties cost O(distinct tokens seen), plus one copy of the
//! logits into a buffer the sampler reuses; with no penalty set there is no
//! copy. Sampling without top-k or top-p needs no sort of the vocabulary;
//! top-p sorts only as far as the nucleus reaches. The log-probability's
//! denominator (a sum over the whole vocabulary at every step) and the
//! greedy choice come from one pair of vector loops in the CPU backend
//! ([`kiln_backend::cpu::logit_stats`]).

use std::collections::{HashMap, HashSet};

use kiln_backend::cpu::logit_stats;
use llguidance::toktrie::SimpleVob;

/// Most alternatives [`SamplingParams::top_logprobs`] may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How one request wants its tokens chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = no limit).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = no limit).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0 = off).
    pub min_p: f32,
    /// Seed of the random generator; `None` draws one from the clock.
    pub seed: Option<u64>,
    /// Hugging Face's repetition penalty (1 = off): for every token id in the
    /// prompt or the output so far, a positive logit is divided by it and a
    /// negative one multiplied by it. Must be finite and > 0.
    pub repetition_penalty: f32,
    /// OpenAI's presence penalty, in [-2, 2] (0 = off): subtracted once from the
    /// logit of every token that occurs in the output so far.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty, in [-2, 2] (0 = off): subtracted from a
    /// token's logit once per occurrence in the output so far.
    pub frequency_penalty: f32,
    /// How many of the most likely tokens to report with each choice, with
    /// their log-probabilities (0 = none; at most [`MAX_TOP_LOGPROBS`]).
    pub top_logprobs: usize,
    /// OpenAI's `logit_bias`: (token id, bias in [-100, 100]) pairs, each
    /// bias added to its token's logit after the penalties, before the
    /// grammar's mask and the choice (-100 all but bans a token, 100 all
    /// but forces it). Ids are checked against the vocabulary on submit.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            top_logprobs: 0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Checks ranges, so a bad value is a clear error instead of NaN sampling.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(format!(
                "presence_penalty must be in [-2, 2], got {}",
                self.presence_penalty
            ));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(format!(
                "frequency_penalty must be in [-2, 2], got {}",
                self.frequency_penalty
            ));
        }
        if let Some(&(t, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return Err(format!(
                "logit_bias for token {t} must be in [-100, 100], got {b}"
            ));
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(format!(
                "top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {}",
                self.top_logprobs
            ));
        }
        Ok(())
    }

    fn has_repetition_penalty(&self) -> bool {
        self.repetition_penalty != 1.0
    }

    fn has_count_penalty(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// SplitMix64: tiny, fast, and good enough for sampling; reproducible across platforms.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A token choice with log-probabilities under the model's unmodified
/// distribution (the log-softmax of the raw logits, before penalties and
/// temperature).
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The chosen token.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The [`SamplingParams::top_logprobs`] most likely tokens and their
    /// log-probabilities, most likely first (ties: lower id first).
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Per-request sampling state: the random generator and the tokens seen so
/// far (for the penalties). [`Sampler::sample`] records every token it picks.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Distinct ids of the prompt and the output; kept only with a repetition penalty.
    seen: HashSet<u32>,
    /// Occurrences of each id in the output; kept only with a presence or frequency penalty.
    counts: HashMap<u32, u32>,
    /// Reused buffer for the penalised logits.
    penalised: Vec<f32>,
    /// Reused buffer of sampling candidates: (id, unnormalised probability).
    cand: Vec<(u32, f64)>,
}

impl Sampler {
    /// A sampler for `params`, seeded from `params.seed` or the clock.
    /// `prompt` is needed by the repetition penalty (which also penalises
    /// prompt tokens).
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5EED)
        });
        let seen = if params.has_repetition_penalty() {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Self {
            params,
            rng: Rng(seed),
            seen,
            counts: HashMap::new(),
            penalised: Vec::new(),
            cand: Vec::new(),
        }
    }

    /// The parameters this sampler was made with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from one row of logits and records it (for the
    /// penalties). An empty row gives token 0 with a NaN log-probability.
    pub fn sample(&mut self, logits: &[f32]) -> Choice {
        self.sample_allowed(logits, None)
    }

    /// [`Sampler::sample`] among the tokens `allowed` sets only (a grammar's
    /// mask): the others are removed after the penalties, before greedy or
    /// random choice. The reported log-probabilities stay those of the
    /// model's raw logits, as for unconstrained requests, so they show how
    /// likely the model found a token, not how likely the grammar left it.
    pub fn sample_allowed(&mut self, logits: &[f32], allowed: Option<&SimpleVob>) -> Choice {
        if logits.is_empty() {
            return Choice {
                token: 0,
                logprob: f32::NAN,
                top_logprobs: Vec::new(),
            };
        }
        let stats = logit_stats(logits);
        let log_z = stats.log_z;
        let top_logprobs = top_n(logits, self.params.top_logprobs, log_z);
        let penalised = self.params.has_repetition_penalty()
            || self.params.has_count_penalty()
            || !self.params.logit_bias.is_empty();
        let adjusted = penalised || allowed.is_some();
        let scores: &[f32] = if adjusted {
            self.penalised.clear();
            self.penalised.extend_from_slice(logits);
            apply_penalties(&self.params, &self.seen, &self.counts, &mut self.penalised);
            for &(t, b) in &self.params.logit_bias {
                if let Some(l) = self.penalised.get_mut(t as usize) {
                    *l += b;
                }
            }
            if let Some(mask) = allowed {
                let row = &mut self.penalised;
                mask.iter_unset_entries(|i| {
                    if let Some(l) = row.get_mut(i) {
                        *l = f32::NEG_INFINITY;
                    }
                });
                // Ids past the mask's end are not in the grammar's vocabulary.
                for l in row.iter_mut().skip(mask.len()) {
                    *l = f32::NEG_INFINITY;
                }
            }
            &self.penalised
        } else {
            logits
        };
        let p = &self.params;
        let token = if p.temperature == 0.0 || p.top_k == 1 {
            if adjusted {
                argmax(scores)
            } else {
                // The raw logits' argmax, found with their maximum.
                stats.argmax
            }
        } else {
            draw(p, &mut self.rng, &mut self.cand, scores)
        };
        self.record(token);
        Choice {
            token,
            logprob: logits[token as usize] - log_z,
            top_logprobs,
        }
    }

    /// Notes an output token for the penalties.
    fn record(&mut self, token: u32) {
        if self.params.has_repetition_penalty() {
            self.seen.insert(token);
        }
        if self.params.has_count_penalty() {
            *self.counts.entry(token).or_insert(0) += 1;
        }
    }
}

/// The log-probability of `token` under one row of raw logits, computed as
/// [`Sampler::sample`] reports a chosen token's (so a prompt token's value
/// equals the one the same token gets when generated at that position).
pub(crate) fn token_logprob(logits: &[f32], token: u32) -> f32 {
    match logits.get(token as usize) {
        Some(&l) => l - logit_stats(logits).log_z,
        None => f32::NAN,
    }
}

/// [`token_logprob`] of `token` and the `n` most likely tokens of the same
/// row, as [`Sampler::sample`] reports a chosen token's alternatives.
pub(crate) fn token_logprob_and_top(
    logits: &[f32],
    token: u32,
    n: usize,
) -> (f32, Vec<(u32, f32)>) {
    let log_z = logit_stats(logits).log_z;
    let lp = logits.get(token as usize).map_or(f32::NAN, |&l| l - log_z);
    (lp, top_n(logits, n, log_z))
}

/// The `n` largest logits as (id, logit - log_z), largest first, ties to the lower id.
fn top_n(logits: &[f32], n: usize, log_z: f32) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() || (top.len() == n && top.last().is_some_and(|&(_, min)| l <= min)) {
            continue;
        }
        // After every equal value: lower ids (seen first) stay ahead.
        let at = top.partition_point(|&(_, v)| v >= l);
        top.insert(at, (i as u32, l));
        top.truncate(n);
    }
    for entry in &mut top {
        entry.1 -= log_z;
    }
    top
}

/// Index of the largest value (the first of equals); NaNs are skipped.
fn argmax(scores: &[f32]) -> u32 {
    scores
        .iter()
        .enumerate()
        .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0 as u32
}

/// Applies the repetition penalty to every seen id, then the presence and
/// frequency penalties to every generated id. Ids outside the row are ignored.
fn apply_penalties(
    p: &SamplingParams,
    seen: &HashSet<u32>,
    counts: &HashMap<u32, u32>,
    scores: &mut [f32],
) {
    if p.has_repetition_penalty() {
        let r = p.repetition_penalty;
        for &id in seen {
            if let Some(l) = scores.get_mut(id as usize) {
                *l = if *l > 0.0 { *l / r } else { *l * r };
            }
        }
    }
    if p.has_count_penalty() {
        for (&id, &count) in counts {
            if let Some(l) = scores.get_mut(id as usize) {
                *l -= p.presence_penalty + p.frequency_penalty * count as f32;
            }
        }
    }
}

/// Most likely first; equal weights by lower id.
fn by_weight_desc(a: &(u32, f64), b: &(u32, f64)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Draws a token from the tempered `scores` restricted by top-k, top-p and min-p.
/// `cand` is a scratch buffer.
fn draw(p: &SamplingParams, rng: &mut Rng, cand: &mut Vec<(u32, f64)>, scores: &[f32]) -> u32 {
    // NaN scores can never be picked.
    cand.clear();
    cand.extend(scores.iter().enumerate().map(|(i, &l)| {
        (
            i as u32,
            if l.is_nan() {
                f64::NEG_INFINITY
            } else {
                f64::from(l)
            },
        )
    }));
    if p.top_k > 0 && p.top_k < cand.len() {
        cand.select_nth_unstable_by(p.top_k - 1, by_weight_desc);
        cand.truncate(p.top_k);
    }
    let top = cand.iter().fold(f64::NEG_INFINITY, |m, &(_, l)| m.max(l));
    if !top.is_finite() {
        // Nothing to weigh (all -inf, or an infinite logit): take the best.
        return argmax(scores);
    }
    // Unnormalised probabilities; the most likely token weighs exactly 1.
    let (top, inv_t) = (top as f32, 1.0 / p.temperature);
    let mut total = 0.0;
    for c in cand.iter_mut() {
        c.1 = f64::from((c.1 as f32 - top) * inv_t).exp();
        total += c.1;
    }
    let floor = f64::from(p.min_p);
    let keep = if p.top_p < 1.0 {
        // The nucleus and the min-p set are both prefixes of the candidates in
        // order of likelihood: sort only as far as the shorter one reaches.
        let n_min_p = if p.min_p > 0.0 {
            cand.iter().filter(|c| c.1 >= floor).count()
        } else {
            cand.len()
        };
        let target = f64::from(p.top_p) * total;
        let (mut sorted, mut chunk, mut acc) = (0usize, 64usize, 0.0f64);
        let mut keep = n_min_p;
        'grow: while sorted < n_min_p {
            let end = (sorted + chunk).min(cand.len());
            let rest = &mut cand[sorted..];
            let len = end - sorted;
            if len < rest.len() {
                rest.select_nth_unstable_by(len - 1, by_weight_desc);
            }
            rest[..len].sort_unstable_by(by_weight_desc);
            for (i, c) in cand[sorted..end].iter().enumerate() {
                acc += c.1;
                if acc >= target {
                    keep = keep.min(sorted + i + 1);
                    break 'grow;
                }
            }
            sorted = end;
            chunk *= 4;
        }
        keep.max(1)
    } else {
        if p.min_p > 0.0 {
            cand.retain(|c| c.1 >= floor);
        }
        cand.len()
    };
    let kept = &cand[..keep];
    let mass: f64 = kept.iter().map(|c| c.1).sum();
    let mut r = rng.next_f64() * mass;
    for &(id, w) in kept {
        if r < w {
            return id;
        }
        r -= w;
    }
    kept.last().map_or(0, |c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// OpenAI's `logit_bias`: added to the logits, so +100 all but forces
    /// a token and -100 all but bans one; out-of-range biases are refused.
    #[test]
    fn logit_bias_is_added_to_the_logits() {
        let logits = [1.0f32, 3.0, 2.0, 0.5];
        let with = |bias: Vec<(u32, f32)>, temperature: f32, seed: u64| {
            let mut s = Sampler::new(
                SamplingParams {
                    temperature,
                    seed: Some(seed),
                    logit_bias: bias,
                    ..SamplingParams::default()
                },
                &[],
            );
            s.sample(&logits).token
        };
        assert_eq!(with(vec![], 0.0, 1), 1);
        assert_eq!(with(vec![(1, -100.0)], 0.0, 1), 2);
        assert_eq!(with(vec![(1, -1.5)], 0.0, 1), 2, "3 - 1.5 < 2");
        assert_eq!(with(vec![(1, -0.5)], 0.0, 1), 1, "3 - 0.5 > 2");
        for seed in 0..50 {
            assert_eq!(with(vec![(3, 100.0)], 1.0, seed), 3);
            assert_ne!(with(vec![(1, -100.0), (2, -100.0)], 1.0, seed), 1);
        }
        // The reported log-probability stays the model's.
        let mut s = Sampler::new(
            SamplingParams {
                logit_bias: vec![(3, 100.0)],
                ..SamplingParams::default()
            },
            &[],
        );
        let c = s.sample(&logits);
        assert_eq!(c.token, 3);
        assert!((c.logprob - token_logprob(&logits, 3)).abs() < 1e-6);
        let bad = SamplingParams {
            logit_bias: vec![(0, 100.5)],
            ..SamplingParams::default()
        };
        assert!(bad.validate().unwrap_err().contains("logit_bias"));
    }

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_argmax_with_its_logprob() {
        let mut s = Sampler::new(SamplingParams::greedy(), &[]);
        let c = s.sample(&[0.0, 2.0, 1.0]);
        assert_eq!(c.token, 1);
        let z = (0f32.exp() + 2f32.exp() + 1f32.exp()).ln();
        assert!((c.logprob - (2.0 - z)).abs() < 1e-6);
        assert!(c.top_logprobs.is_empty());
    }

    #[test]
    fn same_seed_same_tokens_and_different_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |p: SamplingParams| {
            let mut s = Sampler::new(p, &[1, 2, 3]);
            (0..40).map(|_| s.sample(&logits).token).collect::<Vec<_>>()
        };
        assert_eq!(run(params(1.0, 0, 1.0, 7)), run(params(1.0, 0, 1.0, 7)));
        assert_ne!(run(params(1.0, 0, 1.0, 7)), run(params(1.0, 0, 1.0, 8)));
        // With everything on, too.
        let all = |seed| SamplingParams {
            top_k: 30,
            top_p: 0.8,
            min_p: 0.05,
            repetition_penalty: 1.3,
            presence_penalty: 0.5,
            frequency_penalty: 0.5,
            top_logprobs: 3,
            ..params(0.9, 0, 1.0, seed)
        };
        assert_eq!(run(all(7)), run(all(7)));
        assert_ne!(run(all(7)), run(all(8)));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [5.0, 4.9, 1.0, 0.5, 0.0];
        let mut s = Sampler::new(params(1.0, 2, 1.0, 1), &[]);
        for _ in 0..200 {
            assert!(s.sample(&logits).token < 2);
        }
        // The top two hold ~97% of the mass: top_p 0.9 keeps only them.
        let mut s = Sampler::new(params(1.0, 0, 0.9, 2), &[]);
        for _ in 0..200 {
            assert!(s.sample(&logits).token < 2);
        }
    }

    #[test]
    fn top_p_over_a_large_vocabulary_keeps_exactly_the_nucleus() {
        // 1000 tokens with geometric weights: the nucleus of 0.5 is the first
        // few hundred in order, found without sorting the whole row.
        let n = 1000;
        let logits: Vec<f32> = (0..n).map(|i| -(i as f32) * 0.002).collect();
        let w: Vec<f64> = logits.iter().map(|&l| f64::from(l).exp()).collect();
        let total: f64 = w.iter().sum();
        let mut acc = 0.0;
        let nucleus = w.iter().take_while(|&&x| {
            let inside = acc < 0.5 * total;
            acc += x;
            inside
        });
        let size = nucleus.count();
        assert!(
            size > 64 * 4,
            "the test should need several chunks, got {size}"
        );
        let mut s = Sampler::new(params(1.0, 0, 0.5, 4), &[]);
        let mut max_seen = 0;
        for _ in 0..5000 {
            max_seen = max_seen.max(s.sample(&logits).token);
        }
        assert!((max_seen as usize) < size, "{max_seen} >= {size}");
        assert!((max_seen as usize) > size * 9 / 10, "{max_seen} vs {size}");
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // p ∝ [1, 0.5, 0.05]: min_p 0.1 drops the last.
        let logits = [0.0, 0.5f32.ln(), 0.05f32.ln()];
        let mut s = Sampler::new(
            SamplingParams {
                min_p: 0.1,
                ..params(1.0, 0, 1.0, 5)
            },
            &[],
        );
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[s.sample(&logits).token as usize] += 1;
        }
        assert_eq!(counts[2], 0, "{counts:?}");
        assert!(counts[1] > 700, "{counts:?}");
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = [0.5, 0.25, 0.25]
        let logits = [2f32.ln(), 0.0, 0.0];
        let mut s = Sampler::new(params(1.0, 0, 1.0, 3), &[]);
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            counts[s.sample(&logits).token as usize] += 1;
        }
        let f0 = counts[0] as f64 / 20_000.0;
        assert!((f0 - 0.5).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn validation_rejects_bad_ranges() {
        assert!(params(-1.0, 0, 1.0, 0).validate().is_err());
        assert!(params(1.0, 0, 0.0, 0).validate().is_err());
        assert!(params(f32::NAN, 0, 1.0, 0).validate().is_err());
        assert!(params(0.7, 40, 0.9, 0).validate().is_ok());
    }

    #[test]
    fn validation_of_penalties_and_top_logprobs() {
        let ok = params(0.7, 40, 0.9, 0);
        let with = |f: &dyn Fn(&mut SamplingParams)| {
            let mut p = ok.clone();
            f(&mut p);
            p.validate()
        };
        assert!(with(&|p| p.repetition_penalty = 0.0).is_err());
        assert!(with(&|p| p.repetition_penalty = -1.0).is_err());
        assert!(with(&|p| p.repetition_penalty = f32::INFINITY).is_err());
        assert!(with(&|p| p.repetition_penalty = f32::NAN).is_err());
        assert!(with(&|p| p.repetition_penalty = 0.5).is_ok());
        assert!(with(&|p| p.presence_penalty = 2.5).is_err());
        assert!(with(&|p| p.presence_penalty = f32::NAN).is_err());
        assert!(with(&|p| p.presence_penalty = -2.0).is_ok());
        assert!(with(&|p| p.frequency_penalty = -2.01).is_err());
        assert!(with(&|p| p.frequency_penalty = 2.0).is_ok());
        assert!(with(&|p| p.top_logprobs = 21).is_err());
        assert!(with(&|p| p.top_logprobs = 20).is_ok());
        let msg = with(&|p| p.top_logprobs = 21).unwrap_err();
        assert!(msg.contains("top_logprobs"), "{msg}");
    }

    #[test]
    fn penalties_do_not_touch_ids_outside_the_row() {
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                frequency_penalty: 1.0,
                ..SamplingParams::greedy()
            },
            &[7, 1_000_000],
        );
        assert_eq!(s.sample(&[1.0, 0.0]).token, 0);
        assert_eq!(s.sample(&[]).token, 0);
    }
}
