//! Property tests of [`super::ToolStream`] over random outputs cut at
//! random points, for every text syntax: streamed calls start with their
//! name and then give their arguments piece by piece; the pieces joined
//! parse as JSON equal to the whole parse's call; consumed markup never
//! reaches the content; an output cut short (`max_tokens`) never puts a
//! half call in the content.

use serde_json::{json, Value};

use super::*;

/// xorshift64: reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

/// A random JSON value, strings with the characters a scanner may trip on.
fn value(r: &mut Rng, depth: usize) -> Value {
    const WORDS: &[&str] = &[
        "Paris",
        "a}b",
        "q\"uote",
        "back\\slash",
        "{[",
        "é ü",
        "; ,",
        "",
    ];
    match r.next(if depth > 2 { 4 } else { 6 }) {
        0 => json!(WORDS[r.next(WORDS.len())]),
        1 => json!(r.next(1000) as i64 - 500),
        2 => json!(r.next(2) == 0),
        3 => json!(r.next(100) as f64 / 8.0),
        4 => Value::Array((0..r.next(3)).map(|_| value(r, depth + 1)).collect()),
        _ => object(r, depth + 1),
    }
}

fn object(r: &mut Rng, depth: usize) -> Value {
    let mut m = serde_json::Map::new();
    for k in 0..r.next(4) {
        m.insert(format!("k{k}"), value(r, depth));
    }
    Value::Object(m)
}

/// Random spacing, as models write it (or not).
fn ws(r: &mut Rng) -> &'static str {
    [" ", "", "\n", "  "][r.next(4)]
}

/// JSON text of `v`, compact or pretty.
fn text_of(r: &mut Rng, v: &Value) -> String {
    if r.next(2) == 0 {
        v.to_string()
    } else {
        serde_json::to_string_pretty(v).unwrap_or_default()
    }
}

/// A random output in `syntax`: optional content, then 1 to 3 calls.
fn output(r: &mut Rng, syntax: ToolSyntax) -> (String, String, Vec<(String, Value)>) {
    let calls: Vec<(String, Value)> = (0..1 + r.next(3))
        .map(|i| (format!("fn_{i}"), object(r, 0)))
        .collect();
    let content = match (syntax, r.next(2)) {
        (ToolSyntax::Llama3Json, _) | (_, 0) => String::new(),
        _ => "Let me check. ".to_string(),
    };
    let mut text = content.clone();
    match syntax {
        ToolSyntax::Hermes => {
            for (k, (name, args)) in calls.iter().enumerate() {
                if k > 0 {
                    text.push('\n');
                }
                let a = text_of(r, args);
                text.push_str(&format!(
                    "<tool_call>\n{{\"name\":{}\"{name}\", \"arguments\":{}{a}}}\n</tool_call>",
                    ws(r),
                    ws(r)
                ));
            }
        }
        ToolSyntax::Llama3Json => {
            if r.next(2) == 0 {
                text.push_str(PYTHON_TAG);
            }
            for (k, (name, args)) in calls.iter().enumerate() {
                if k > 0 {
                    text.push_str(&format!(";{}", ws(r)));
                }
                let a = text_of(r, args);
                text.push_str(&format!("{{\"name\": \"{name}\", \"parameters\": {a}}}"));
            }
        }
        ToolSyntax::Mistral => {
            if r.next(2) == 0 {
                text.push_str(MISTRAL_OPEN);
                text.push('[');
                for (k, (name, args)) in calls.iter().enumerate() {
                    if k > 0 {
                        text.push_str(&format!(",{}", ws(r)));
                    }
                    let a = text_of(r, args);
                    text.push_str(&format!("{{\"name\": \"{name}\", \"arguments\": {a}}}"));
                }
                text.push(']');
            } else {
                for (name, args) in &calls {
                    let a = text_of(r, args);
                    text.push_str(&format!("{MISTRAL_OPEN}{name}[ARGS]{a}"));
                }
            }
        }
        ToolSyntax::Harmony => unreachable!(),
    }
    (text, content, calls)
}

/// Cuts `text` at random points (on char boundaries), 1 to 12 bytes apart.
fn pieces<'a>(r: &mut Rng, text: &'a str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let mut j = (i + 1 + r.next(12)).min(text.len());
        while !text.is_char_boundary(j) {
            j += 1;
        }
        out.push(&text[i..j]);
        i = j;
    }
    out
}

const SYNTAXES: [ToolSyntax; 3] = [
    ToolSyntax::Hermes,
    ToolSyntax::Llama3Json,
    ToolSyntax::Mistral,
];

#[test]
fn streamed_arguments_join_to_the_whole_call() {
    let mut r = Rng(0x2545_f491_4f6c_dd1d);
    let mut streamed_fragments = 0;
    for syntax in SYNTAXES {
        for case in 0..400 {
            let (text, content, calls) = output(&mut r, syntax);
            let whole = parse(syntax, &text);
            let want_content = (!content.is_empty()).then_some(content.clone());
            assert_eq!(whole.0, want_content, "{syntax:?} {text:?}");
            assert_eq!(whole.1.len(), calls.len(), "{syntax:?} {text:?}");
            for (c, (name, args)) in whole.1.iter().zip(&calls) {
                assert_eq!(&c.name, name);
                let got: Value = serde_json::from_str(&c.arguments).expect("whole args");
                assert_eq!(&got, args, "{syntax:?} case {case}: {text:?}");
            }
            let mut s = ToolStream::new(syntax);
            let mut events = Vec::new();
            for p in pieces(&mut r, &text) {
                events.extend(s.push(p));
            }
            events.extend(s.finish());
            // Each call opens with its name before any of its arguments.
            let mut open = false;
            for e in &events {
                match e {
                    ToolEvent::CallStart { .. } => open = true,
                    ToolEvent::CallArguments(_) => {
                        assert!(open, "arguments before a name: {events:?}");
                        streamed_fragments += 1;
                    }
                    _ => open = false,
                }
            }
            let (c, got) = collect(events);
            assert_eq!(c, want_content, "{syntax:?} {text:?}");
            assert_eq!(got.len(), calls.len(), "{syntax:?} {text:?}");
            for (g, w) in got.iter().zip(&whole.1) {
                assert_eq!(g.name, w.name);
                let a: Value = serde_json::from_str(&g.arguments)
                    .unwrap_or_else(|e| panic!("{e}: {:?} from {text:?}", g.arguments));
                let b: Value = serde_json::from_str(&w.arguments).unwrap_or_default();
                assert_eq!(a, b, "{syntax:?} {text:?}");
            }
        }
    }
    assert!(
        streamed_fragments > 1000,
        "arguments were not streamed in pieces"
    );
}

#[test]
fn output_cut_short_never_puts_a_call_in_the_content() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    for syntax in SYNTAXES {
        for _ in 0..60 {
            let (text, content, _) = output(&mut r, syntax);
            let mut cuts: Vec<usize> = (0..text.len())
                .filter(|&i| text.is_char_boundary(i))
                .collect();
            cuts.retain(|_| r.next(3) == 0);
            for cut in cuts {
                let prefix = &text[..cut];
                for (events, how) in [
                    {
                        let mut s = ToolStream::new(syntax);
                        let mut ev = s.push(prefix);
                        ev.extend(s.finish_cut());
                        (ev, "whole")
                    },
                    {
                        let mut s = ToolStream::new(syntax);
                        let mut ev = Vec::new();
                        for p in pieces(&mut r, prefix) {
                            ev.extend(s.push(p));
                        }
                        ev.extend(s.finish_cut());
                        (ev, "streamed")
                    },
                ] {
                    let (c, _) = collect(events);
                    let c = c.unwrap_or_default();
                    assert!(
                        content.starts_with(&c),
                        "{syntax:?} {how} cut at {cut}: content {c:?} from {prefix:?}"
                    );
                }
            }
        }
    }
}
