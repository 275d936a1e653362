//! Stop strings matched on the streamed text, across token boundaries.
//!
//! Text arrives in deltas (from the incremental detokenizer) that cut the
//! output at arbitrary places, so a stop string may start in one delta and end
//! several deltas later. [`StopStrings`] holds back the tail of the text only
//! while it could still be the start of a stop string, and emits the rest at
//! once; when a stop string completes, the text before it is emitted and the
//! stop string and everything after it are dropped.
//!
//! Work per push is bounded by the length of the new delta plus the held-back
//! tail (shorter than the longest stop string), never by the length of the
//! whole output.

/// What one [`StopStrings::push`] lets through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopOutput {
    /// Text that may be sent to the client now (possibly empty).
    pub text: String,
    /// Index (into the list given to [`StopStrings::new`]) of the stop string
    /// completed by this push, if one was.
    pub matched: Option<usize>,
}

/// Streaming matcher for a request's stop strings.
///
/// When several stop strings occur in the text seen by one push, the one that
/// starts first wins; of those starting at the same place, the longest wins
/// (so with stops `"ab"` and `"abc"`, the text `"xabc"` pushed at once stops at
/// `"abc"`). A stop string is matched as soon as it is complete: a longer stop
/// that started earlier but could still complete in a later delta does not
/// delay it (with stops `"abcd"` and `"bc"`, the deltas `"abc"`, `"d"` match
/// `"bc"` after the first delta and emit `"a"`).
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    /// Non-empty stop strings with their index in the caller's list.
    stops: Vec<(usize, String)>,
    /// Length in bytes of the longest stop string.
    max_len: usize,
    /// Text not yet emitted because it may begin a stop string.
    held: String,
    /// The stop string that ended the text, once one has.
    matched: Option<usize>,
}

impl StopStrings {
    /// A matcher for `stops`; an empty list never matches. Empty strings in
    /// the list are ignored (they would match everywhere).
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<(usize, String)> = stops
            .into_iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .collect();
        let max_len = stops.iter().map(|(_, s)| s.len()).max().unwrap_or(0);
        Self {
            stops,
            max_len,
            held: String::new(),
            matched: None,
        }
    }

    /// Whether there is no stop string to look for.
    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// The index of the stop string that ended the text, once one has.
    pub fn matched(&self) -> Option<usize> {
        self.matched
    }

    /// Feeds newly decoded text. Returns the text that may be emitted now and,
    /// when this push completed a stop string, its index.
    ///
    /// Text is held back only while it could still be the start of a stop
    /// string. On a match the returned text is everything before the stop
    /// string (the stop string and anything after it are never emitted); after
    /// a match, further pushes return nothing.
    pub fn push(&mut self, delta: &str) -> StopOutput {
        if self.matched.is_some() {
            return StopOutput::default();
        }
        if self.stops.is_empty() {
            return StopOutput {
                text: delta.to_string(),
                matched: None,
            };
        }
        self.held.push_str(delta);
        if let Some((pos, index)) = self.earliest_match() {
            self.held.truncate(pos);
            self.matched = Some(index);
            return StopOutput {
                text: std::mem::take(&mut self.held),
                matched: Some(index),
            };
        }
        let keep_from = self.hold_point();
        let rest = self.held.split_off(keep_from);
        StopOutput {
            text: std::mem::replace(&mut self.held, rest),
            matched: None,
        }
    }

    /// Generation ended for another reason: returns everything held back.
    /// Returns nothing after a match.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The first complete stop string in the held text: its byte position and
    /// its index in the caller's list. Starting first wins, then longest.
    fn earliest_match(&self) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize, usize)> = None; // (pos, len, index)
        for (index, stop) in &self.stops {
            let Some(pos) = self.held.find(stop.as_str()) else {
                continue;
            };
            let better = match best {
                None => true,
                Some((bpos, blen, _)) => pos < bpos || (pos == bpos && stop.len() > blen),
            };
            if better {
                best = Some((pos, stop.len(), *index));
            }
        }
        best.map(|(pos, _, index)| (pos, index))
    }

    /// The byte position from which the held text must stay held: the start of
    /// the earliest suffix that is a proper prefix of some stop string, or the
    /// end of the text when there is none. Always a character boundary.
    fn hold_point(&self) -> usize {
        let text = &self.held;
        // A proper prefix of a stop string is shorter than the longest stop.
        let lowest = text.len().saturating_sub(self.max_len.saturating_sub(1));
        let candidates = text
            .char_indices()
            .map(|(i, _)| i)
            .skip_while(|&i| i < lowest);
        for start in candidates {
            let tail = &text[start..];
            if self.stops.iter().any(|(_, s)| s.starts_with(tail)) {
                return start;
            }
        }
        text.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(list: &[&str]) -> StopStrings {
        StopStrings::new(list.iter().map(|s| s.to_string()).collect())
    }

    /// Pushes every delta; returns the emitted text and the match.
    fn run(s: &mut StopStrings, deltas: &[&str]) -> (String, Option<usize>) {
        let mut out = String::new();
        let mut matched = None;
        for d in deltas {
            let o = s.push(d);
            out += &o.text;
            if o.matched.is_some() {
                assert!(matched.is_none(), "matched twice");
                matched = o.matched;
            }
        }
        (out, matched)
    }

    #[test]
    fn stop_split_across_three_deltas() {
        let mut s = stops(&["<END>"]);
        assert_eq!(
            s.push("hello <"),
            StopOutput {
                text: "hello ".into(),
                matched: None
            }
        );
        assert_eq!(s.push("EN"), StopOutput::default());
        assert_eq!(
            s.push("D> tail"),
            StopOutput {
                text: String::new(),
                matched: Some(0)
            }
        );
        assert_eq!(s.matched(), Some(0));
        assert_eq!(s.push("more"), StopOutput::default());
        assert_eq!(s.flush(), "");
    }

    #[test]
    fn held_prefix_that_is_not_a_stop_is_emitted() {
        let mut s = stops(&["<END>"]);
        assert_eq!(s.push("a <E").text, "a ");
        // "<EN" is still a prefix; "<ENX" is not, and neither is any suffix of it.
        assert_eq!(s.push("N").text, "");
        assert_eq!(s.push("X b").text, "<ENX b");
        assert_eq!(s.push("<").text, "");
        assert_eq!(s.flush(), "<");
    }

    #[test]
    fn held_text_restarts_a_prefix_inside_itself() {
        // "aab": after "aa" the first "a" cannot start "ab" any more, the second can.
        let mut s = stops(&["ab"]);
        assert_eq!(s.push("a").text, "");
        assert_eq!(s.push("a").text, "a");
        let o = s.push("b");
        assert_eq!(
            o,
            StopOutput {
                text: String::new(),
                matched: Some(0)
            }
        );
    }

    #[test]
    fn multibyte_stops_never_split_characters() {
        let mut s = stops(&["。", "🗼"]);
        let (out, m) = run(&mut s, &["吾輩は猫", "である", "。名前"]);
        assert_eq!((out.as_str(), m), ("吾輩は猫である", Some(0)));

        let mut s = stops(&["東京🗼"]);
        assert_eq!(s.push("に東").text, "に");
        assert_eq!(s.push("京").text, "");
        assert_eq!(s.push("タワー").text, "東京タワー");
        let (out, m) = run(&mut s, &["、東京", "🗼です"]);
        assert_eq!((out.as_str(), m), ("、", Some(0)));
    }

    #[test]
    fn stop_inside_one_delta_with_text_after_it() {
        let mut s = stops(&["\n\n"]);
        let o = s.push("first line\n\nsecond paragraph");
        assert_eq!(
            o,
            StopOutput {
                text: "first line".into(),
                matched: Some(0)
            }
        );
        assert_eq!(s.flush(), "");
    }

    #[test]
    fn earliest_stop_wins_and_ties_go_to_the_longest() {
        let mut s = stops(&["world", "lo w", "lo"]);
        let o = s.push("hello world");
        assert_eq!(
            o,
            StopOutput {
                text: "hel".into(),
                matched: Some(1)
            }
        );

        let mut s = stops(&["ab", "abc"]);
        assert_eq!(s.push("xabcd").matched, Some(1));

        // Indices refer to the caller's list, empty strings included.
        let mut s = stops(&["", "END", "STOP"]);
        let (out, m) = run(&mut s, &["run until ST", "OP or END"]);
        assert_eq!((out.as_str(), m), ("run until ", Some(2)));
    }

    #[test]
    fn a_stop_completed_first_wins_over_a_longer_pending_one() {
        let mut s = stops(&["abcd", "bc"]);
        let (out, m) = run(&mut s, &["abc", "d"]);
        assert_eq!((out.as_str(), m), ("a", Some(1)));
    }

    #[test]
    fn flush_returns_held_text() {
        let mut s = stops(&["</answer>"]);
        assert_eq!(s.push("42 </ans").text, "42 ");
        assert_eq!(s.flush(), "</ans");
        assert_eq!(s.flush(), "");
    }

    #[test]
    fn no_stops_passes_everything_through() {
        let mut s = stops(&[]);
        assert!(s.is_empty());
        assert_eq!(s.push("abc").text, "abc");
        let mut s = stops(&["", ""]);
        assert!(s.is_empty());
        assert_eq!(
            s.push("abc"),
            StopOutput {
                text: "abc".into(),
                matched: None
            }
        );
        assert_eq!(s.flush(), "");
    }

    #[test]
    fn held_back_text_stays_shorter_than_the_longest_stop() {
        let mut s = stops(&["xyz", "x"]);
        // "x" alone is a full stop: matched at once.
        assert_eq!(s.push("abx").matched, Some(1));

        let mut s = stops(&["<|im_end|>"]);
        let mut out = String::new();
        for _ in 0..10_000 {
            out += &s.push("<|im").text;
            assert!(s.held.len() < "<|im_end|>".len());
        }
        out += &s.flush();
        assert_eq!(out, "<|im".repeat(10_000));
    }

    #[test]
    fn emitted_text_plus_stop_reassembles_the_input() {
        // Every way of cutting the text into two or three deltas gives the same result.
        let text = "前置き🗼本文。おわり";
        let bounds: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect();
        let mut s0 = stops(&["本文。", "🗼本"]);
        let want = run(&mut s0, &[text]);
        assert_eq!(want, ("前置き".to_string(), Some(1)));
        for &a in &bounds {
            for &b in bounds.iter().filter(|&&b| b >= a) {
                let mut s = stops(&["本文。", "🗼本"]);
                let got = run(&mut s, &[&text[..a], &text[a..b], &text[b..]]);
                assert_eq!(got, want, "cut at {a}, {b}");
            }
        }
    }
}
