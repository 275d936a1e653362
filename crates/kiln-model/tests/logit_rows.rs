//! The last layer runs its output projection, residual and feed-forward
//! only on the rows whose logits a step asks for (`StepInput::logit_rows`).
//! Cutting the rows there must not change a single bit of what is asked
//! for, nor what later steps read from the cache (the last layer's keys and
//! values are still written for every row): checked on a tiny checkpoint of
//! each family shape (dense pre-norm, OPT's post-norm, Gemma's extra norms
//! and soft-capping, mixtures of experts, gpt-oss's sinks and biases), with
//! f32 weights and quantized to Q8_0 while loading.
//!
//! The same steps also check the CPU backend's bound on a dense
//! feed-forward's rows at once ([`Backend::feed_forward_rows`]): computed
//! in pieces of any size, every logit keeps its bits.

use kiln_backend::cpu::CpuBackend;
use kiln_backend::{Backend, KvSpec, StepInput};
use kiln_model::decoder::Decoder;
use kiln_model::goldens::{multi_step, tiny_dir, Seq};
use kiln_model::quant::GgmlType;
use kiln_model::{load, LoadOptions};

const MODELS: [&str; 9] = [
    "llama",
    "opt-postln",
    "gemma2",
    "gemma3",
    "qwen3moe",
    "mixtral",
    "qwen2moe",
    "gpt_oss",
    "phi3",
];

const BS: usize = 4;

/// Three sequences of 6, 3 and 9 tokens, each in its own blocks.
fn sequences(vocab: usize) -> Vec<Seq> {
    let mut next = 0u32;
    [6usize, 3, 9]
        .iter()
        .enumerate()
        .map(|(s, &len)| {
            let tokens: Vec<u32> = (0..len + 1)
                .map(|i| ((s * 31 + i * 7 + 3) % vocab) as u32)
                .collect();
            let n = (len + 1).div_ceil(BS) as u32;
            let blocks = (next..next + n).collect();
            next += n;
            Seq {
                tokens,
                blocks,
                done: 0,
            }
        })
        .collect()
}

/// The prompt step (every prompt but its last token, each row's logits
/// asked for) and the decode step after it (each sequence's last token).
fn steps(vocab: usize) -> (StepInput, StepInput) {
    let mut seqs = sequences(vocab);
    let lens: Vec<usize> = seqs.iter().map(|s| s.tokens.len() - 1).collect();
    let prompt = multi_step(&mut seqs, &lens, BS);
    let decode = multi_step(&mut seqs, &[1, 1, 1], BS);
    (prompt, decode)
}

/// `(prompt logits, decode logits)` with the prompt step asking for `rows`.
fn run(be: &CpuBackend, d: &Decoder<CpuBackend>, rows: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let cfg = d.config();
    let (mut prompt, decode) = steps(cfg.vocab_size);
    prompt.logit_rows = rows.to_vec();
    let mut kv = be
        .alloc_kv_cache(&KvSpec {
            n_layers: cfg.n_layers,
            num_blocks: 16,
            block_size: BS,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        })
        .unwrap();
    let p = d.forward(be, &mut kv, &prompt).unwrap();
    let t = d.forward(be, &mut kv, &decode).unwrap();
    (p, t)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Each family's tiny checkpoint, with f32 weights and quantized to Q8_0
/// while loading, as `(what, its decoder)` for the tests to check.
fn each_model(be: &CpuBackend, mut check: impl FnMut(&str, &Decoder<CpuBackend>)) {
    for name in MODELS {
        for quantize in [None, Some(GgmlType::Q8_0)] {
            let what = format!("{name} ({quantize:?})");
            let opts = LoadOptions {
                quantize,
                ..LoadOptions::default()
            };
            let m = load(be, &tiny_dir(name), &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
            check(&what, &m.decoder);
        }
    }
}

#[test]
fn a_subset_of_logit_rows_gives_the_same_bits_as_all_rows() {
    let be = CpuBackend::new();
    each_model(&be, |what, d| {
        let vocab = d.config().vocab_size;
        let n = steps(vocab).0.tokens.len() as u32;
        let (all, all_next) = run(&be, d, &(0..n).collect::<Vec<_>>());
        assert_eq!(all.len(), n as usize * vocab, "{what}");
        // Each prompt's last row (what a server asks for), one row out of
        // order, a repeated row, and none at all.
        for rows in [vec![5, 8, 17], vec![12, 0, 3], vec![4, 4], vec![]] {
            let (some, next) = run(&be, d, &rows);
            let want: Vec<f32> = rows
                .iter()
                .flat_map(|&r| &all[r as usize * vocab..(r as usize + 1) * vocab])
                .copied()
                .collect();
            assert_eq!(bits(&some), bits(&want), "{what}: rows {rows:?}");
            // The next step reads every row's keys and values of the last layer.
            assert_eq!(
                bits(&next),
                bits(&all_next),
                "{what}: decode after {rows:?}"
            );
        }
    });
}

#[test]
fn a_feed_forward_in_pieces_of_rows_gives_the_same_bits_as_all_at_once() {
    let whole = CpuBackend::new().with_feed_forward_rows(0);
    assert_eq!(whole.feed_forward_rows(), None);
    assert!(CpuBackend::new().feed_forward_rows().is_some());
    each_model(&whole, |what, d| {
        let n = steps(d.config().vocab_size).0.tokens.len() as u32;
        let rows: Vec<u32> = (0..n).collect();
        let (all, all_next) = run(&whole, d, &rows);
        // One row at a time, ragged pieces (18 rows in 7, 7 and 4), and
        // one piece short of the whole step.
        for piece in [1, 7, n as usize - 1] {
            let be = whole.with_feed_forward_rows(piece);
            assert_eq!(be.feed_forward_rows(), Some(piece));
            let (got, next) = run(&be, d, &rows);
            assert_eq!(bits(&got), bits(&all), "{what}: pieces of {piece}");
            assert_eq!(
                bits(&next),
                bits(&all_next),
                "{what}: decode, pieces of {piece}"
            );
        }
    });
}
