//! gpt-oss's parsers as the chat route chains them, on harmony text: the
//! `openai_gptoss` reasoning split, the `openai` tool calls, and the
//! streamed chat deltas, whole and streamed at every cut (test-only: it
//! imports the parsers and `crate::harmony`, which import nothing back).

use crate::tool_parse::{ParsedCall, ToolEvent};

/// Every way of cutting `text` the tests try: whole, two pieces at
/// every character boundary, a character at a time, and token-like
/// pieces (each marker alone, the text between in pieces of three).
fn cuts(text: &str) -> Vec<Vec<String>> {
    let mut all = vec![vec![text.to_string()]];
    for (i, _) in text.char_indices().skip(1) {
        all.push(vec![text[..i].to_string(), text[i..].to_string()]);
    }
    all.push(text.chars().map(String::from).collect());
    let mut tokens = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        if rest.starts_with("<|") {
            let end = rest.find("|>").map_or(rest.len(), |e| e + 2);
            tokens.push(rest[..end].to_string());
            rest = &rest[end..];
        } else {
            let n = rest.char_indices().nth(3).map_or(rest.len(), |(i, _)| i);
            let n = rest[..n].find("<|").unwrap_or(n);
            tokens.push(rest[..n].to_string());
            rest = &rest[n..];
        }
    }
    all.push(tokens);
    all
}

const ANALYSIS_CALL: &str = "<|channel|>analysis<|message|>User wants weather. Call tool.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\", \"days\": [1, 2]}<|call|>";
const CALL_MESSAGE: &str = "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\", \"days\": [1, 2]}<|call|>";

/// The `openai_gptoss` reasoning split of whole outputs, and the same
/// streamed however the output is cut.
#[test]
fn reasoning_split_whole_and_streamed() {
    use crate::reasoning::{ReasoningParser, Splitter};
    let g = ReasoningParser::GptOss;
    let cases: &[(&str, Option<&str>, &str)] = &[
        (
            "<|channel|>analysis<|message|>Need 2+2.<|end|><|start|>assistant<|channel|>final<|message|>4, é 猫.",
            Some("Need 2+2."),
            "4, é 猫.",
        ),
        // Low reasoning effort: only a final message.
        ("<|channel|>final<|message|>Hi.<|return|>", None, "Hi."),
        // Cut off while thinking.
        ("<|channel|>analysis<|message|>Let me", Some("Let me"), ""),
        // A call passes on as written, for the tool-call parser.
        (ANALYSIS_CALL, Some("User wants weather. Call tool."), CALL_MESSAGE),
        // A preamble (commentary without recipient) is content.
        (
            "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>final<|message|> Done.",
            None,
            "Checking. Done.",
        ),
        // No harmony markup at all: content.
        ("plain <|text", None, "plain <|text"),
    ];
    for &(text, want_r, want_c) in cases {
        let whole = g.split(text);
        assert_eq!(
            whole,
            (want_r.map(String::from), want_c.to_string()),
            "{text:?}"
        );
        for cut in cuts(text) {
            let mut s = Splitter::new(g);
            let (mut r, mut c) = (String::new(), String::new());
            for piece in &cut {
                let (a, b) = s.push(piece);
                r.push_str(&a);
                c.push_str(&b);
            }
            let (a, b) = s.finish();
            r.push_str(&a);
            c.push_str(&b);
            assert_eq!(
                ((!r.is_empty()).then_some(r), c),
                whole,
                "{text:?} cut as {cut:?}"
            );
        }
    }
    assert_eq!(ReasoningParser::parse("openai_gptoss"), Some(g));
    assert_eq!(g.as_str(), "openai_gptoss");
}

fn call(name: &str, args: &str) -> ParsedCall {
    ParsedCall {
        name: name.into(),
        arguments: args.into(),
    }
}

/// The `openai` tool-call parser on whole outputs (with or without the
/// reasoning parser before it), and the same streamed however cut.
#[test]
fn tool_calls_whole_and_streamed() {
    use crate::tool_parse::{collect, parse, ToolStream, ToolSyntax};
    let h = ToolSyntax::Harmony;
    // Arguments are the text the model wrote, as vLLM's parser gives them.
    let paris = call("get_weather", r#"{"city": "Paris", "days": [1, 2]}"#);
    let cases: Vec<(String, Option<String>, Vec<ParsedCall>)> = vec![
        // The raw output (no reasoning parser): analysis is dropped.
        (ANALYSIS_CALL.into(), None, vec![paris.clone()]),
        // What the reasoning parser passes on.
        (CALL_MESSAGE.into(), None, vec![paris.clone()]),
        // Recipient in the role part, content type without
        // <|constrain|>, and no <|call|> (it stopped generation).
        (
            " to=functions.f<|channel|>commentary json<|message|>{\"a\": null}".into(),
            None,
            vec![call("f", r#"{"a": null}"#)],
        ),
        // Two calls in one output.
        (
            format!("{CALL_MESSAGE}<|start|>assistant to=functions.b<|channel|>commentary<|message|>{{}}<|call|>"),
            None,
            vec![paris.clone(), call("b", "{}")],
        ),
        // A final answer: content only.
        (
            "<|channel|>analysis<|message|>easy<|end|><|start|>assistant<|channel|>final<|message|>Paris.".into(),
            Some("Paris.".into()),
            vec![],
        ),
        // A message to a function is a call, whatever its body (cut
        // short here by the token limit).
        (
            "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{\"k\": [1".into(),
            None,
            vec![call("f", r#"{"k": [1"#)],
        ),
        // A built-in tool (not a function): content, as written.
        (
            "<|channel|>analysis to=browser.search<|message|>{\"q\": 1}<|call|>".into(),
            Some("<|channel|>analysis to=browser.search<|message|>{\"q\": 1}<|call|>".into()),
            vec![],
        ),
    ];
    for (text, want_c, want_calls) in cases {
        let whole = parse(h, &text);
        assert_eq!(whole, (want_c, want_calls), "{text:?}");
        for cut in cuts(&text) {
            let mut s = ToolStream::new(h);
            let mut events = Vec::new();
            for piece in &cut {
                events.extend(s.push(piece));
            }
            events.extend(s.finish());
            assert_eq!(s.calls(), whole.1.len());
            assert_eq!(collect(events), whole, "{text:?} cut as {cut:?}");
        }
    }
    // Arguments stream out as they come, before the call ends.
    let mut s = ToolStream::new(h);
    let mut events = s.push("<|channel|>commentary to=functions.f json<|message|>");
    events.extend(s.push("{\"city\": \"Par"));
    assert_eq!(
        events,
        vec![
            ToolEvent::CallStart { name: "f".into() },
            ToolEvent::CallArguments("{\"city\": \"Par".into())
        ]
    );
    assert_eq!(
        s.push("is\"}"),
        vec![ToolEvent::CallArguments("is\"}".into())]
    );
    assert_eq!(s.push("<|call|>"), vec![]);
    assert_eq!(s.calls(), 1);
    assert_eq!(ToolSyntax::from_parser_name("openai"), Some(h));
    assert_eq!(
        ToolSyntax::from_template("{{- \"<|start|>assistant<|channel|>\" }}"),
        h
    );
}

/// The streamed chat answer as the OpenAI route builds it (reasoning
/// split, then tool deltas), token by token: reasoning_content, no
/// content, one call whose arguments come in more than one delta
/// when the output does, finish reason tool_calls.
#[test]
fn streamed_chat_deltas_carry_reasoning_and_the_call() {
    use crate::reasoning::{rewrite_delta, ReasoningParser, Splitter};
    use crate::tool_parse::ToolSyntax;
    use crate::tools::ToolDeltas;
    let chunk = |text: &str, finish: Option<&str>| {
        serde_json::json!({"id": "x", "choices": [{"index": 0, "delta": {"content": text},
            "logprobs": null, "finish_reason": finish}]})
    };
    for cut in cuts(ANALYSIS_CALL).into_iter().rev().take(3) {
        let mut sp = Splitter::new(ReasoningParser::GptOss);
        let mut td = ToolDeltas::new(ToolSyntax::Harmony);
        let mut out = Vec::new();
        for piece in &cut {
            let mut c = chunk(piece, None);
            rewrite_delta(&mut c, &mut sp, false);
            out.extend(td.rewrite(c, false));
        }
        let mut c = chunk("", Some("stop"));
        rewrite_delta(&mut c, &mut sp, true);
        out.extend(td.rewrite(c, true));
        let (mut reasoning, mut content, mut calls) = (String::new(), String::new(), Vec::new());
        let mut arg_deltas = 0;
        for c in &out {
            let d = &c["choices"][0]["delta"];
            reasoning.push_str(d["reasoning_content"].as_str().unwrap_or_default());
            content.push_str(d["content"].as_str().unwrap_or_default());
            for t in d["tool_calls"].as_array().into_iter().flatten() {
                if let Some(name) = t["function"]["name"].as_str() {
                    calls.push((name.to_string(), String::new()));
                }
                assert_eq!(t["index"], 0);
                let last = calls.last_mut().expect("a call's name comes first");
                let a = t["function"]["arguments"].as_str().unwrap_or_default();
                arg_deltas += usize::from(!a.is_empty());
                last.1.push_str(a);
            }
        }
        assert_eq!(reasoning, "User wants weather. Call tool.", "{cut:?}");
        assert_eq!(content, "", "{cut:?}");
        assert_eq!(
            calls,
            vec![(
                "get_weather".to_string(),
                r#"{"city": "Paris", "days": [1, 2]}"#.to_string()
            )]
        );
        if cut.len() > 3 {
            assert!(
                arg_deltas > 1,
                "arguments in {arg_deltas} delta(s) for {cut:?}"
            );
        }
        assert_eq!(
            out.last().unwrap()["choices"][0]["finish_reason"],
            "tool_calls"
        );
    }
}

/// Random outputs built from harmony's markers and the text around them
/// (well-formed or not): the reasoning split and the tool calls never
/// panic, and come out the same whole, token by token and a character at
/// a time.
#[test]
fn random_harmony_streams_equal_their_whole_parse() {
    use crate::reasoning::{ReasoningParser, Splitter};
    use crate::tool_parse::{collect, parse, ToolStream, ToolSyntax};
    const PARTS: &[&str] = &[
        "<|start|>",
        "<|channel|>",
        "<|message|>",
        "<|end|>",
        "<|call|>",
        "<|return|>",
        "<|constrain|>",
        "assistant",
        "analysis",
        "final",
        "commentary",
        " to=functions.f",
        " to=browser.search",
        " json",
        "{\"a\": 1}",
        "{",
        "x",
        "é 猫",
        "<|",
        "|>",
        " ",
        "to=",
    ];
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = |n: usize| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s % n as u64) as usize
    };
    for _ in 0..3000 {
        let len = 1 + next(14);
        let tokens: Vec<&str> = (0..len).map(|_| PARTS[next(PARTS.len())]).collect();
        let text: String = tokens.concat();
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let char_refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        let split = ReasoningParser::GptOss.split(&text);
        let tools = parse(ToolSyntax::Harmony, &text);
        for pieces in [&tokens, &char_refs] {
            let mut sp = Splitter::new(ReasoningParser::GptOss);
            let mut ts = ToolStream::new(ToolSyntax::Harmony);
            let (mut r, mut c, mut events) = (String::new(), String::new(), Vec::new());
            for p in pieces.iter() {
                let (a, b) = sp.push(p);
                r.push_str(&a);
                c.push_str(&b);
                events.extend(ts.push(p));
            }
            let (a, b) = sp.finish();
            r.push_str(&a);
            c.push_str(&b);
            events.extend(ts.finish());
            assert_eq!(((!r.is_empty()).then_some(r), c), split, "{text:?}");
            assert_eq!(collect(events), tools, "{text:?}");
        }
    }
}
