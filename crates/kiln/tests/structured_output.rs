//! Constrained decoding against the real binary on the default model
//! (SmolLM2-135M): OpenAI `response_format` (`json_schema`, `json_object`),
//! vLLM's `guided_*` fields and `structured_outputs` object, the same inside
//! LMI `parameters`, streaming, and the 400s for a schema that cannot be
//! compiled and for constraint fields kiln does not implement.

mod support;

use serde_json::{json, Value};
use support::*;

fn ok(s: &Server, path: &str, body: &Value) -> Value {
    let r = s.post_json(path, body);
    assert_eq!(r.status, 200, "{path} {body}: {}", r.text());
    r.json()
}

/// Asserts a refusal (400 on OpenAI routes; 424, DJL's status for a bad
/// request, on LMI routes) whose message has every needle.
fn refused(s: &Server, path: &str, body: Value, needles: &[&str]) {
    let r = s.post_json(path, &body);
    let want = if path.starts_with("/v1/") { 400 } else { 424 };
    assert_eq!(r.status, want, "{body}: {}", r.text());
    let v = r.json();
    let msg = v["error"]["message"]
        .as_str()
        .or(v["error"].as_str())
        .unwrap_or_else(|| panic!("{v}"))
        .to_string();
    for n in needles {
        assert!(msg.contains(n), "{body}: {msg:?} should mention {n:?}");
    }
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150}
        },
        "required": ["name", "age"],
        "additionalProperties": false
    })
}

/// Checks `text` against [`person_schema`] by hand.
fn assert_person(text: &str) {
    let v: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("{text:?} is not an object"));
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["age", "name"], "{text}");
    let name = o["name"].as_str().unwrap_or_else(|| panic!("{text}"));
    assert!(name.chars().count() <= 12, "{text}");
    let age = o["age"].as_i64().unwrap_or_else(|| panic!("{text}"));
    assert!((0..=150).contains(&age), "{text}");
}

fn chat(messages: &str, extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": messages}],
        "max_tokens": 40,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn content(v: &Value) -> (String, String) {
    let c = &v["choices"][0];
    (
        c["message"]["content"].as_str().unwrap().to_string(),
        c["finish_reason"].as_str().unwrap().to_string(),
    )
}

#[test]
fn a_json_schema_response_format_gives_valid_json_greedy_and_sampled() {
    let s = shared_server();
    let rf = json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "person", "schema": person_schema(), "strict": true}}});
    let v = ok(
        s,
        "/v1/chat/completions",
        &chat("Describe a person as JSON.", rf.clone()),
    );
    let (text, reason) = content(&v);
    assert_person(&text);
    assert_eq!(reason, "stop", "{v}");
    for seed in 1..=4 {
        let mut body = chat("Invent a character.", rf.clone());
        body["temperature"] = json!(1.0);
        body["seed"] = json!(seed);
        let v = ok(s, "/v1/chat/completions", &body);
        let (text, reason) = content(&v);
        assert_person(&text);
        assert_eq!(reason, "stop", "{v}");
    }
}

#[test]
fn streaming_assembles_to_the_same_constrained_text() {
    let s = shared_server();
    let mut body = chat(
        "Who wrote Hamlet? Answer as JSON.",
        json!({"guided_json": person_schema()}),
    );
    let (want, _) = content(&ok(s, "/v1/chat/completions", &body));
    assert_person(&want);
    body["stream"] = json!(true);
    let mut st = s.stream(
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        &body,
    );
    let mut got = String::new();
    let mut reason = None;
    while let Some(e) = st.next_event() {
        if e == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&e).unwrap();
        let c = &v["choices"][0];
        if let Some(t) = c["delta"]["content"].as_str() {
            got.push_str(t);
        }
        if let Some(r) = c["finish_reason"].as_str() {
            reason = Some(r.to_string());
        }
    }
    assert_eq!(got, want);
    assert_eq!(reason.as_deref(), Some("stop"));
}

#[test]
fn json_object_regex_choice_and_grammar_hold_on_completions() {
    let s = shared_server();
    let completion = |extra: Value, max_tokens: u64| {
        let mut body = json!({"prompt": "Here is the answer:", "max_tokens": max_tokens,
            "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let v = ok(s, "/v1/completions", &body);
        let c = &v["choices"][0];
        (
            c["text"].as_str().unwrap().to_string(),
            c["finish_reason"].as_str().unwrap().to_string(),
        )
    };

    let v = ok(
        s,
        "/v1/chat/completions",
        &chat(
            "Give the capital of France as a JSON object with the key \"capital\".",
            json!({"response_format": {"type": "json_object"}}),
        ),
    );
    let (text, reason) = content(&v);
    let obj: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(obj.is_object(), "{text}");
    assert_eq!(reason, "stop");

    for extra in [
        json!({"guided_regex": "[0-9]{3}-[0-9]{4}"}),
        json!({"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}}),
    ] {
        let (text, reason) = completion(extra, 12);
        let b = text.as_bytes();
        assert_eq!(b.len(), 8, "{text:?}");
        assert!(
            b.iter().enumerate().all(|(i, c)| if i == 3 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }),
            "{text:?}"
        );
        assert_eq!(reason, "stop");
    }

    let choices = ["Paris", "London", "a city in Germany"];
    for extra in [
        json!({"guided_choice": choices}),
        json!({"structured_outputs": {"choice": choices}}),
    ] {
        let (text, reason) = completion(extra, 10);
        assert!(choices.contains(&text.as_str()), "{text:?}");
        assert_eq!(reason, "stop");
    }

    let grammar = "start: \"The answer is \" num \".\"\nnum: /[1-9][0-9]?/";
    let (text, reason) = completion(json!({"guided_grammar": grammar}), 12);
    let num = text
        .strip_prefix("The answer is ")
        .and_then(|t| t.strip_suffix('.'))
        .unwrap_or_else(|| panic!("{text:?}"));
    assert!(
        (1..=2).contains(&num.len()) && num.bytes().all(|c| c.is_ascii_digit()),
        "{text:?}"
    );
    assert_eq!(reason, "stop");
}

#[test]
fn lmi_parameters_take_the_same_constraints() {
    let s = shared_server();
    let choices = ["yes", "no"];
    let v = ok(
        s,
        "/invocations",
        &json!({"inputs": "Is the sky blue?", "parameters":
            {"max_new_tokens": 8, "guided_choice": choices, "details": true}}),
    );
    let text = v["generated_text"].as_str().unwrap();
    assert!(choices.contains(&text), "{v}");
    assert_eq!(v["details"]["finish_reason"], "eos_token", "{v}");

    let v = ok(
        s,
        "/invocations",
        &json!({"inputs": "Describe a person as JSON:", "parameters":
            {"max_new_tokens": 40, "response_format": {"type": "json_schema",
                "json_schema": {"name": "p", "schema": person_schema()}}}}),
    );
    assert_person(v["generated_text"].as_str().unwrap());
    refused(
        s,
        "/invocations",
        json!({"inputs": "x", "parameters": {"guided_decoding_backend": "xgrammar"}}),
        &["guided_decoding_backend"],
    );
}

#[test]
fn bad_constraints_are_400s_naming_the_problem() {
    let s = shared_server();
    let path = "/v1/chat/completions";
    let bad_type = json!({"type": "object", "properties": {"a": {"type": "strng"}}});
    refused(
        s,
        path,
        chat(
            "x",
            json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "bad", "schema": bad_type}}}),
        ),
        &["strng"],
    );
    refused(
        s,
        path,
        chat("x", json!({"guided_regex": "[0-9"})),
        &["invalid constraint"],
    );
    refused(
        s,
        path,
        chat("x", json!({"guided_grammar": "start: undefined_rule"})),
        &["undefined_rule"],
    );
    refused(
        s,
        path,
        chat("x", json!({"guided_whitespace_pattern": "[ ]*"})),
        &["guided_whitespace_pattern"],
    );
    refused(
        s,
        path,
        chat("x", json!({"structured_outputs": {"structural_tag": "{}"}})),
        &["structural_tag"],
    );
    refused(
        s,
        "/v1/completions",
        json!({"prompt": "x", "response_format": {"type": "json_schema",
            "json_schema": {"name": "p", "schema": {}, "unknown": 1}}}),
        &["unknown"],
    );
}
