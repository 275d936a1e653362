//! Prompt lookup (vLLM's `ngram` method): the last few tokens of a sequence
//! are looked for earlier in the sequence, and the tokens that followed
//! them there are the guess. Free to compute and good wherever the output
//! copies from its input (edits, summaries quoting the text, code changes).

use super::{ProposalRequest, Proposer};

/// The n-gram prompt-lookup proposer.
#[derive(Debug, Clone)]
pub struct NgramProposer {
    /// Shortest suffix looked up (`prompt_lookup_min`, at least 1).
    pub min: usize,
    /// Longest suffix looked up (`prompt_lookup_max`); longer ones are tried first.
    pub max: usize,
}

impl NgramProposer {
    /// A proposer matching suffixes of `min..=max` tokens.
    pub fn new(min: usize, max: usize) -> Self {
        Self {
            min: min.max(1),
            max: max.max(min.max(1)),
        }
    }

    /// The guess for one sequence: for the longest suffix of `min..=max`
    /// tokens that occurs earlier in `tokens`, the (up to `k`) tokens after
    /// its latest earlier occurrence; empty if no suffix recurs.
    pub fn lookup(&self, tokens: &[u32], k: usize) -> Vec<u32> {
        let len = tokens.len();
        if k == 0 {
            return Vec::new();
        }
        for n in (self.min..=self.max.min(len.saturating_sub(1))).rev() {
            let suffix = &tokens[len - n..];
            // Latest occurrence that ends before the suffix starts to repeat itself.
            if let Some(i) = (0..len - n).rev().find(|&i| &tokens[i..i + n] == suffix) {
                let from = i + n;
                return tokens[from..(from + k).min(len)].to_vec();
            }
        }
        Vec::new()
    }
}

impl Proposer for NgramProposer {
    fn propose(&mut self, batch: &[ProposalRequest<'_>]) -> Vec<Vec<u32>> {
        batch.iter().map(|r| self.lookup(r.tokens, r.k)).collect()
    }

    fn name(&self) -> &'static str {
        "ngram"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_recurring_suffix_gives_the_tokens_after_it() {
        let p = NgramProposer::new(1, 3);
        // "1 2 3 4 5 ... 1 2 3" -> after the earlier "1 2 3" came "4 5 6".
        let t = [1, 2, 3, 4, 5, 6, 9, 1, 2, 3];
        assert_eq!(p.lookup(&t, 3), vec![4, 5, 6]);
        assert_eq!(p.lookup(&t, 1), vec![4]);
        // Near the end the guess is cut where the sequence ends.
        let t = [7, 8, 7];
        assert_eq!(p.lookup(&t, 5), vec![8, 7]);
        // No recurring suffix: nothing.
        assert!(p.lookup(&[1, 2, 3, 4], 4).is_empty());
        assert!(p.lookup(&[], 4).is_empty());
        assert!(p.lookup(&[5], 4).is_empty());
        assert!(p.lookup(&t, 0).is_empty());
    }

    #[test]
    fn longer_matches_win_over_later_shorter_ones() {
        let p = NgramProposer::new(1, 2);
        // Suffix "2 3": occurs at 1..3 (followed by 4); "3" alone occurs
        // later at 5 (followed by 8), but the 2-gram is tried first.
        let t = [1, 2, 3, 4, 0, 3, 8, 2, 3];
        assert_eq!(p.lookup(&t, 2), vec![4, 0]);
        // With min = max = 1 the latest "3" wins.
        let p = NgramProposer::new(1, 1);
        assert_eq!(p.lookup(&t, 2), vec![8, 2]);
        // min above every recurring length: nothing.
        let p = NgramProposer::new(3, 4);
        assert!(p.lookup(&t, 2).is_empty());
    }
}
