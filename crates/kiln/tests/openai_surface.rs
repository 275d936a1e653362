//! The OpenAI and vLLM surface beyond single completions, against the real
//! binary on the default model: `prompt` as a list of strings or of token
//! lists (with `n` choices each, indexed as OpenAI does, streamed too),
//! `echo` (with `logprobs`: the prompt's too), the refused `suffix`, and vLLM's
//! `/tokenize` and `/detokenize`.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use support::*;

const A: &str = "The capital of France is";
const B: &str = "Once upon a time, in a small village,";

fn ok(s: &Server, path: &str, body: Value) -> Value {
    let r = s.post_json(path, &body);
    assert_eq!(r.status, 200, "{path} {body}: {}", r.text());
    r.json()
}

/// Asserts an OpenAI-shaped 400 whose message contains every needle.
fn refused(s: &Server, path: &str, body: Value, needles: &[&str]) {
    let r = s.post_json(path, &body);
    assert_eq!(r.status, 400, "{body}: {}", r.text());
    let v = r.json();
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"));
    for n in needles {
        assert!(msg.contains(n), "{body}: {msg:?} should mention {n:?}");
    }
}

/// Greedy completion of one request body: the choices' texts by index.
fn texts(s: &Server, body: Value) -> (Vec<String>, Value) {
    let v = ok(s, "/v1/completions", body);
    let choices = v["choices"].as_array().unwrap();
    for (k, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], k, "{v}");
    }
    let t = choices
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    (t, v["usage"].clone())
}

fn greedy_one(s: &Server, prompt: Value) -> String {
    let (t, _) = texts(
        s,
        json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(t.len(), 1);
    t[0].clone()
}

fn tokens(s: &Server, text: &str, special: bool) -> Vec<u64> {
    let v = ok(
        s,
        "/tokenize",
        json!({"prompt": text, "add_special_tokens": special}),
    );
    let ids: Vec<u64> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(v["count"], ids.len(), "{v}");
    ids
}

#[test]
fn a_list_of_prompts_gets_n_choices_each_indexed_prompt_major() {
    let s = shared_server();
    let alone_a = greedy_one(s, json!(A));
    let alone_b = greedy_one(s, json!(B));
    assert_ne!(alone_a, alone_b);
    let (t, usage) = texts(
        s,
        json!({"prompt": [A, B], "n": 2, "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(
        t,
        [
            alone_a.clone(),
            alone_a.clone(),
            alone_b.clone(),
            alone_b.clone()
        ]
    );
    let (ta, tb) = (tokens(s, A, true), tokens(s, B, true));
    assert_eq!(
        usage["prompt_tokens"],
        (ta.len() + tb.len()) as u64,
        "{usage}"
    );
    assert_eq!(usage["completion_tokens"], 24, "{usage}");

    // The same prompts as token ids, one list and a list of lists.
    assert_eq!(greedy_one(s, json!(ta)), alone_a);
    let (t, usage) = texts(
        s,
        json!({"prompt": [ta, tb], "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(t, [alone_a.clone(), alone_b.clone()]);
    assert_eq!(usage["prompt_tokens"], (ta.len() + tb.len()) as u64);
}

#[test]
fn a_list_of_prompts_streams_every_choice_under_its_index() {
    let s = shared_server();
    let (want, _) = texts(
        s,
        json!({"prompt": [A, B], "n": 2, "max_tokens": 5, "temperature": 0, "ignore_eos": true}),
    );
    let mut st = s.stream(
        "/v1/completions",
        &[("Content-Type", "application/json")],
        &json!({"prompt": [A, B], "n": 2, "max_tokens": 5, "temperature": 0, "ignore_eos": true,
            "stream": true, "stream_options": {"include_usage": true}}),
    );
    let mut got: BTreeMap<u64, String> = BTreeMap::new();
    let mut finished: BTreeMap<u64, String> = BTreeMap::new();
    let mut usage = Value::Null;
    let mut done = false;
    while let Some(e) = st.next_event() {
        if e == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&e).unwrap();
        if v["usage"].is_object() {
            usage = v["usage"].clone();
            continue;
        }
        let c = &v["choices"][0];
        let i = c["index"].as_u64().unwrap();
        got.entry(i)
            .or_default()
            .push_str(c["text"].as_str().unwrap());
        if let Some(r) = c["finish_reason"].as_str() {
            finished.insert(i, r.to_string());
        }
    }
    assert!(done);
    assert_eq!(got.values().cloned().collect::<Vec<_>>(), want);
    assert_eq!(finished.len(), 4, "{finished:?}");
    assert!(finished.values().all(|r| r == "length"), "{finished:?}");
    let prompt_tokens = tokens(s, A, true).len() + tokens(s, B, true).len();
    assert_eq!(usage["prompt_tokens"], prompt_tokens as u64, "{usage}");
    assert_eq!(usage["completion_tokens"], 20, "{usage}");
}

#[test]
fn echo_prepends_each_prompt_also_when_streamed() {
    let s = shared_server();
    let plain = greedy_one(s, json!(A));
    let (t, _) = texts(
        s,
        json!({"prompt": [A, B], "max_tokens": 6, "temperature": 0, "ignore_eos": true, "echo": true}),
    );
    assert_eq!(t[0], format!("{A}{plain}"));
    assert!(t[1].starts_with(B), "{t:?}");
    // Token-id prompts echo their text.
    let ids = tokens(s, A, false);
    let (t, _) = texts(
        s,
        json!({"prompt": ids, "max_tokens": 2, "temperature": 0, "echo": true}),
    );
    assert!(t[0].starts_with(A), "{t:?}");

    let mut st = s.stream(
        "/v1/completions",
        &[("Content-Type", "application/json")],
        &json!({"prompt": A, "max_tokens": 6, "temperature": 0, "ignore_eos": true,
            "echo": true, "stream": true}),
    );
    let first: Value = serde_json::from_str(&st.next_event().unwrap()).unwrap();
    assert_eq!(first["choices"][0]["text"], A, "{first}");
    let mut rest = String::new();
    while let Some(e) = st.next_event() {
        if e != "[DONE]" {
            let v: Value = serde_json::from_str(&e).unwrap();
            rest.push_str(v["choices"][0]["text"].as_str().unwrap());
        }
    }
    assert_eq!(rest, plain);
}

/// `echo` with `logprobs` (what lm-evaluation-harness asks for to score a
/// continuation): the prompt's tokens come first in `logprobs`, the first
/// with null, each other with its log-probability given the tokens before
/// it and its alternatives. A prompt that ends with tokens the model chose
/// greedily gets, at those positions, the log-probabilities they had when
/// generated, and they are their positions' top choices.
#[test]
fn echo_with_logprobs_scores_the_prompt_tokens() {
    let s = shared_server();
    let c = "/v1/completions";
    let v = ok(
        s,
        c,
        json!({"prompt": A, "max_tokens": 2, "temperature": 0, "ignore_eos": true, "logprobs": 1}),
    );
    let gen = &v["choices"][0]["logprobs"];
    let gen_lps: Vec<f64> = gen["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    // The ids the text prompt was given (special tokens included), then
    // the same text with the continuation.
    let mut ids = tokens(s, A, true);
    let prompt_len = ids.len();
    let text = v["choices"][0]["text"].as_str().unwrap();
    let continued = tokens(s, &format!("{A}{text}"), true);
    assert_eq!(continued.len(), prompt_len + gen_lps.len(), "{continued:?}");
    assert!(continued.starts_with(&ids), "{ids:?} vs {continued:?}");
    ids = continued;
    let v = ok(
        s,
        c,
        json!({"prompt": ids, "max_tokens": 1, "temperature": 0, "echo": true, "logprobs": 1}),
    );
    let lp = &v["choices"][0]["logprobs"];
    let lps = lp["token_logprobs"].as_array().unwrap();
    let tops = lp["top_logprobs"].as_array().unwrap();
    let toks = lp["tokens"].as_array().unwrap();
    assert_eq!(lps.len(), ids.len() + 1, "{lp}");
    assert_eq!((tops.len(), toks.len()), (lps.len(), lps.len()), "{lp}");
    assert!(lps[0].is_null() && tops[0].is_null(), "{lp}");
    for (k, x) in lps.iter().enumerate().skip(1) {
        let x = x.as_f64().unwrap_or_else(|| panic!("token {k}: {lp}"));
        assert!(x <= 0.0 && x.is_finite(), "token {k}: {x}");
        assert_eq!(tops[k].as_object().map(|m| m.len()), Some(1), "{lp}");
    }
    // The greedy continuation's tokens, now in the prompt.
    for (j, want) in gen_lps.iter().enumerate() {
        let k = prompt_len + j;
        let got = lps[k].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-4,
            "position {k}: {got} vs {want} when generated"
        );
        let top = tops[k].as_object().unwrap();
        assert!(
            top.contains_key(toks[k].as_str().unwrap()),
            "position {k}: {top:?}"
        );
    }
    let offsets = lp["text_offset"].as_array().unwrap();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0].as_u64() <= w[1].as_u64()));
}

#[test]
fn unsupported_and_malformed_completion_fields_are_refused_clearly() {
    let s = shared_server();
    let c = "/v1/completions";
    refused(
        s,
        c,
        json!({"prompt": A, "echo": true, "logprobs": 1, "stream": true}),
        &["echo", "logprobs", "stream"],
    );
    refused(
        s,
        c,
        json!({"prompt": A, "suffix": " end."}),
        &["suffix", "not supported"],
    );
    refused(
        s,
        c,
        json!({"prompt": A, "suffix": 3}),
        &["suffix", "string"],
    );
    refused(s, c, json!({"prompt": [A, 7]}), &["prompt[1]"]);
    refused(
        s,
        c,
        json!({"prompt": [[1, 2], []]}),
        &["prompt[1]", "empty"],
    );
    refused(s, c, json!({"prompt": []}), &["empty"]);
    refused(s, c, json!({"prompt": [A, ""]}), &["prompt[1]", "empty"]);
    refused(s, c, json!({"prompt": {"text": A}}), &["prompt"]);
    let many: Vec<&str> = vec![A; 20];
    refused(
        s,
        c,
        json!({"prompt": many, "n": 16}),
        &["320 choices", "at most 256"],
    );
    refused(s, c, json!({"prompt": [[1], [999999]]}), &["999999"]);
    // An empty suffix asks for nothing and is taken.
    let (t, _) = texts(s, json!({"prompt": A, "suffix": "", "max_tokens": 1}));
    assert_eq!(t.len(), 1);
}

#[test]
fn tokenize_and_detokenize_round_trip_in_vllms_shapes() {
    let s = shared_server();
    for text in ["Hello world", "日本語のテキスト 🦀", "  spaced\n\tout  "] {
        let v = ok(
            s,
            "/tokenize",
            json!({"model": "default", "prompt": text, "add_special_tokens": false}),
        );
        let ids = v["tokens"].as_array().unwrap().clone();
        assert_eq!(v["count"], ids.len());
        let described = s.get("/models/default").json();
        assert_eq!(
            v["max_model_len"], described[0]["models"][0]["kiln"]["maxModelLen"],
            "{v} {described}"
        );
        assert!(v.get("token_strs").is_none(), "{v}");
        let back = ok(s, "/detokenize", json!({"model": "default", "tokens": ids}));
        assert_eq!(back, json!({"prompt": text}));
    }
    // The count is the one completions use for the same prompt.
    let (_, usage) = texts(s, json!({"prompt": B, "max_tokens": 1}));
    assert_eq!(usage["prompt_tokens"], tokens(s, B, true).len());

    let v = ok(
        s,
        "/tokenize",
        json!({"prompt": "Hello world", "return_token_strs": true}),
    );
    let strs = v["token_strs"].as_array().unwrap();
    assert_eq!(strs.len(), v["count"].as_u64().unwrap() as usize);
    assert!(strs.iter().all(|t| !t.as_str().unwrap().is_empty()), "{v}");
}

#[test]
fn tokenize_renders_chat_messages_as_chat_completions_do() {
    let s = shared_server();
    let messages = json!([{"role": "user", "content": "What is the capital of France?"}]);
    let chat = ok(
        s,
        "/v1/chat/completions",
        json!({"messages": messages, "max_tokens": 1}),
    );
    let v = ok(s, "/tokenize", json!({"messages": messages}));
    assert_eq!(v["count"], chat["usage"]["prompt_tokens"], "{v} {chat}");
    let without = ok(
        s,
        "/tokenize",
        json!({"messages": messages, "add_generation_prompt": false}),
    );
    assert!(
        without["count"].as_u64() < v["count"].as_u64(),
        "{without} {v}"
    );
    let text = ok(s, "/detokenize", json!({"tokens": v["tokens"]}));
    let text = text["prompt"].as_str().unwrap();
    assert!(
        text.contains("What is the capital of France?") && text.contains("assistant"),
        "{text}"
    );
}

#[test]
fn tokenize_and_detokenize_refuse_bad_input() {
    let s = shared_server();
    refused(s, "/tokenize", json!({}), &["'prompt' or 'messages'"]);
    refused(
        s,
        "/tokenize",
        json!({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}),
        &["not both"],
    );
    refused(s, "/tokenize", json!({"prompt": 5}), &["prompt", "string"]);
    refused(s, "/tokenize", json!({"messages": []}), &["messages"]);
    refused(
        s,
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "b"}], "continue_final_message": true}),
        &["continue_final_message"],
    );
    refused(s, "/detokenize", json!({}), &["tokens", "required"]);
    refused(s, "/detokenize", json!({"tokens": "abc"}), &["tokens"]);
    refused(s, "/detokenize", json!({"tokens": [1, -1]}), &["tokens"]);
    refused(
        s,
        "/detokenize",
        json!({"tokens": [49152]}),
        &["49152", "vocabulary"],
    );
    let r = s.post_json("/tokenize", &json!({"model": "nope", "prompt": "a"}));
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("nope"));
    let r = s.req(
        "POST",
        "/detokenize",
        &[("Content-Type", "application/json")],
        b"{",
    );
    assert_eq!(r.status, 400, "{}", r.text());
}
