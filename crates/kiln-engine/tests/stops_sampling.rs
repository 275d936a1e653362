//! Penalties and log-probabilities of the sampler on hand-made logits, and
//! stop strings against a plain reference over many ways of cutting a text.

use kiln_engine::sampling::{Choice, Sampler, SamplingParams, MAX_TOP_LOGPROBS};
use kiln_engine::stops::StopStrings;

fn greedy_with(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams::greedy();
    f(&mut p);
    p.validate().expect("valid parameters");
    p
}

/// Greedy tokens for `steps` steps on the same logits every step.
fn greedy_run(p: SamplingParams, prompt: &[u32], logits: &[f32], steps: usize) -> Vec<u32> {
    let mut s = Sampler::new(p, prompt);
    (0..steps).map(|_| s.sample(logits).token).collect()
}

/// log-softmax in f64, the reference for reported log-probabilities.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &l| m.max(f64::from(l)));
    let z = max
        + logits
            .iter()
            .map(|&l| (f64::from(l) - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&l| f64::from(l) - z).collect()
}

#[test]
fn repetition_penalty_divides_positive_logits_of_prompt_tokens() {
    let logits = [2.0, 1.9, 0.0];
    assert_eq!(greedy_run(SamplingParams::greedy(), &[0], &logits, 1), [0]);
    // 2.0 / 1.2 = 1.67 < 1.9.
    let p = greedy_with(|p| p.repetition_penalty = 1.2);
    assert_eq!(greedy_run(p.clone(), &[0], &logits, 1), [1]);
    // A token the prompt does not hold is not penalised.
    assert_eq!(greedy_run(p, &[2], &logits, 1), [0]);
}

#[test]
fn repetition_penalty_multiplies_negative_logits() {
    // Dividing -1.0 by 1.2 would make it *more* likely (-0.83); HF multiplies: -1.2 < -1.1.
    let logits = [-1.0, -1.1, -5.0];
    let p = greedy_with(|p| p.repetition_penalty = 1.2);
    assert_eq!(greedy_run(p, &[0], &logits, 1), [1]);
    // A penalty below 1 rewards seen tokens: -1.1 * 0.8 = -0.88 > -1.0.
    let p = greedy_with(|p| p.repetition_penalty = 0.8);
    assert_eq!(greedy_run(p, &[1], &logits, 1), [1]);
}

#[test]
fn repetition_penalty_applies_once_per_distinct_token_of_the_output() {
    // 1.0 / 1.5 = 0.67: after both were generated, 0.67 vs 0.6 and it stays
    // there however often token 0 repeats.
    let p = greedy_with(|p| p.repetition_penalty = 1.5);
    assert_eq!(greedy_run(p, &[], &[1.0, 0.9], 5), [0, 1, 0, 0, 0]);
}

#[test]
fn presence_penalty_is_paid_once_frequency_penalty_per_occurrence() {
    let logits = [3.0, 2.5, 0.0];
    // presence 1: token 0 drops to 2.0 once and stays there; token 1 to 1.5.
    let p = greedy_with(|p| p.presence_penalty = 1.0);
    assert_eq!(greedy_run(p, &[], &logits, 6), [0, 1, 0, 0, 0, 0]);
    // frequency 1: every occurrence costs 1, so the two alternate.
    let p = greedy_with(|p| p.frequency_penalty = 1.0);
    assert_eq!(greedy_run(p, &[], &logits, 6), [0, 1, 0, 1, 0, 1]);
    // Both: 3 - (1 + 0.5 n0) against 2.5 - (1 + 0.5 n1), once a token has occurred.
    let p = greedy_with(|p| {
        p.presence_penalty = 1.0;
        p.frequency_penalty = 0.5;
    });
    // 3 vs 2.5 -> 0; 1.5 vs 2.5 -> 1; 1.5 vs 1.0 -> 0; 1.0 vs 1.0 -> 0 (ties go to
    // the lower id); 0.5 vs 1.0 -> 1; 0.5 vs 0.5 -> 0.
    assert_eq!(greedy_run(p, &[], &logits, 6), [0, 1, 0, 0, 1, 0]);
}

#[test]
fn presence_and_frequency_ignore_the_prompt() {
    let logits = [3.0, 2.5];
    let p = greedy_with(|p| {
        p.presence_penalty = 2.0;
        p.frequency_penalty = 2.0;
    });
    assert_eq!(greedy_run(p, &[0, 0, 0, 0], &logits, 2), [0, 1]);
}

#[test]
fn negative_presence_penalty_encourages_repetition() {
    let mut s = Sampler::new(greedy_with(|p| p.presence_penalty = -0.5), &[]);
    assert_eq!(s.sample(&[1.0, 0.8]).token, 0);
    // Unpenalised, 1 would win; token 0 was generated and gains 0.5: 1.1 > 1.0.
    assert_eq!(s.sample(&[0.6, 1.0]).token, 0);
}

#[test]
fn penalties_apply_when_sampling_too() {
    // Flat logits and a strong frequency penalty at a low temperature: the
    // tokens take turns, so their counts never differ by more than one.
    let p = SamplingParams {
        temperature: 0.05,
        frequency_penalty: 2.0,
        seed: Some(11),
        ..SamplingParams::default()
    };
    let mut s = Sampler::new(p, &[]);
    let mut counts = [0i32; 4];
    for _ in 0..400 {
        counts[s.sample(&[0.0; 4]).token as usize] += 1;
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(hi - lo <= 1, "{counts:?}");
    }
}

#[test]
fn greedy_takes_the_penalised_argmax_but_reports_raw_logprobs() {
    let logits = [2.0, 1.9, -3.0];
    let mut s = Sampler::new(
        greedy_with(|p| {
            p.repetition_penalty = 1.2;
            p.top_logprobs = 3;
        }),
        &[0],
    );
    let c = s.sample(&logits);
    let want = log_softmax(&logits);
    assert_eq!(c.token, 1);
    assert!((f64::from(c.logprob) - want[1]).abs() < 1e-6);
    // The alternatives are those of the raw distribution: 0 first, though it was penalised.
    let ids: Vec<u32> = c.top_logprobs.iter().map(|e| e.0).collect();
    assert_eq!(ids, [0, 1, 2]);
}

fn check_top_logprobs(c: &Choice, logits: &[f32], n: usize) {
    let want = log_softmax(logits);
    assert_eq!(c.top_logprobs.len(), n.min(logits.len()));
    assert!((f64::from(c.logprob) - want[c.token as usize]).abs() < 1e-5);
    let mut expected: Vec<(u32, f64)> = want
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    expected.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    for (got, want) in c.top_logprobs.iter().zip(&expected) {
        assert_eq!(got.0, want.0);
        assert!(
            (f64::from(got.1) - want.1).abs() < 1e-5,
            "{got:?} vs {want:?}"
        );
    }
    assert!(
        c.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1),
        "not sorted"
    );
    let mass: f64 = c.top_logprobs.iter().map(|e| f64::from(e.1).exp()).sum();
    assert!(mass <= 1.0 + 1e-5, "{mass}");
}

#[test]
fn top_logprobs_are_the_raw_log_softmax_sorted() {
    let logits: Vec<f32> = (0..1000)
        .map(|i| ((i * 7919) % 1000) as f32 * 0.013 - 6.0)
        .collect();
    for n in [1, 5, MAX_TOP_LOGPROBS] {
        let p = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            repetition_penalty: 1.3,
            frequency_penalty: 0.7,
            top_logprobs: n,
            seed: Some(n as u64),
            ..SamplingParams::default()
        };
        p.validate().unwrap();
        let mut s = Sampler::new(p, &[1, 2, 3]);
        for _ in 0..20 {
            let c = s.sample(&logits);
            check_top_logprobs(&c, &logits, n);
        }
    }
    // A vocabulary smaller than the request gives every token; ties keep the lower id first.
    let mut s = Sampler::new(greedy_with(|p| p.top_logprobs = 20), &[]);
    let c = s.sample(&[0.5, 1.0, 0.5]);
    check_top_logprobs(&c, &[0.5, 1.0, 0.5], 20);
    assert_eq!(
        c.top_logprobs.iter().map(|e| e.0).collect::<Vec<_>>(),
        [1, 0, 2]
    );
    let total: f64 = c.top_logprobs.iter().map(|e| f64::from(e.1).exp()).sum();
    assert!((total - 1.0).abs() < 1e-6, "{total}");
}

#[test]
fn validation_errors_name_the_parameter() {
    let bad: [(&str, SamplingParams); 6] = [
        (
            "repetition_penalty",
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
        ),
        (
            "repetition_penalty",
            SamplingParams {
                repetition_penalty: f32::NAN,
                ..Default::default()
            },
        ),
        (
            "presence_penalty",
            SamplingParams {
                presence_penalty: -2.5,
                ..Default::default()
            },
        ),
        (
            "frequency_penalty",
            SamplingParams {
                frequency_penalty: 3.0,
                ..Default::default()
            },
        ),
        (
            "frequency_penalty",
            SamplingParams {
                frequency_penalty: f32::INFINITY,
                ..Default::default()
            },
        ),
        (
            "top_logprobs",
            SamplingParams {
                top_logprobs: MAX_TOP_LOGPROBS + 1,
                ..Default::default()
            },
        ),
    ];
    for (name, p) in bad {
        let err = p.validate().expect_err(name);
        assert!(err.contains(name), "{err}");
    }
    assert!(SamplingParams::default().validate().is_ok());
}

/// Tiny deterministic generator for the cutting test.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// What a stop matcher must emit: at the first cut where some stop is complete,
/// the text before the earliest one (ties: longest).
fn reference(text: &str, cuts: &[usize], stops: &[&str]) -> (String, Option<usize>) {
    for &end in cuts {
        let seen = &text[..end];
        let best = stops
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .filter_map(|(i, s)| seen.find(s).map(|pos| (pos, std::cmp::Reverse(s.len()), i)))
            .min();
        if let Some((pos, _, i)) = best {
            return (text[..pos].to_string(), Some(i));
        }
    }
    (text.to_string(), None)
}

#[test]
fn stop_strings_match_a_reference_however_the_text_is_cut() {
    let stops = ["ab", "aab", "ba", "。", "🗼東", "", "xyzzy"];
    let alphabet = ["a", "b", "x", "y", "z", "。", "🗼", "東", " "];
    let mut rng = Lcg(42);
    let mut matched = 0;
    for _ in 0..3000 {
        let text: String = (0..rng.below(12))
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect();
        // Random cuts on character boundaries.
        let bounds: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect();
        let mut cuts: Vec<usize> = (0..rng.below(5))
            .map(|_| bounds[rng.below(bounds.len())])
            .collect();
        cuts.push(text.len());
        cuts.sort_unstable();
        let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()).collect());
        let (mut out, mut got, mut start) = (String::new(), None, 0);
        for &end in &cuts {
            let o = s.push(&text[start..end]);
            out += &o.text;
            got = got.or(o.matched);
            start = end;
        }
        if got.is_none() {
            out += &s.flush();
        }
        let want = reference(&text, &cuts, &stops);
        assert_eq!((out, got), want, "text {text:?} cut at {cuts:?}");
        matched += usize::from(want.1.is_some());
    }
    assert!(matched > 1000, "the cases should often stop: {matched}");
}
