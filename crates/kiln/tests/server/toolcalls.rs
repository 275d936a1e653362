//! Issue 24, point 1, against the binary on the default model (SmolLM2,
//! Hermes `<tool_call>` syntax): tool-call markup never reaches `content`
//! (streamed or not), a call cut by `max_tokens` ends with `length` and no
//! half call in `content`, `required`/named choices refuse a `max_tokens`
//! too small for the shortest call, arguments stream in pieces that join to
//! the whole call, `cached_tokens` stays within the prompt, `logit_bias`,
//! `response_format.schema` with `json_object`, and every documented
//! request field of both OpenAI APIs is honoured or refused by name.

use super::*;

/// `body` naming the default model where it names none: another test may
/// register a second model on the shared server meanwhile.
fn with_model(body: &Value) -> Value {
    let mut body = body.clone();
    if body.get("model").is_none() {
        body["model"] = json!("default");
    }
    body
}

fn post_json(path: &str, body: &Value) -> Response {
    shared().post_json(path, &with_model(body))
}

fn stream(path: &str, headers: &[(&str, &str)], body: &Value) -> Streaming {
    shared().stream(path, headers, &with_model(body))
}

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
            "required": ["zone"], "additionalProperties": false}}}])
}

fn named() -> Value {
    json!({"type": "function", "function": {"name": "get_weather"}})
}

fn ask(choice: Value, max_tokens: u64) -> Value {
    json!({"messages": [{"role": "user", "content": "What's the weather in Paris for the next 3 days?"}],
        "tools": weather_tools(), "tool_choice": choice, "max_tokens": max_tokens, "temperature": 0})
}

fn chat(body: &Value) -> Value {
    let r = post_json("/v1/chat/completions", body);
    assert_eq!(r.status, 200, "{body}: {}", r.text());
    r.json()
}

/// What a streamed chat answer carried: its content, its calls (name,
/// arguments joined, how many argument pieces), the finish reason, and
/// whether each call's first delta had its id and name.
struct Streamed {
    content: String,
    calls: Vec<(String, String, usize)>,
    finish: String,
    usage: Value,
}

fn stream_chat(body: &Value) -> Streamed {
    let mut body = body.clone();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let mut st = stream(
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        &body,
    );
    let mut out = Streamed {
        content: String::new(),
        calls: Vec::new(),
        finish: String::new(),
        usage: Value::Null,
    };
    while let Some(e) = st.next_event() {
        if e == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&e).unwrap_or_else(|err| panic!("{err}: {e}"));
        if !v["usage"].is_null() {
            out.usage = v["usage"].clone();
        }
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        let d = &c["delta"];
        out.content
            .push_str(d["content"].as_str().unwrap_or_default());
        for t in d["tool_calls"].as_array().into_iter().flatten() {
            let i = t["index"].as_u64().expect("index") as usize;
            if i == out.calls.len() {
                assert!(
                    t["id"].as_str().is_some_and(|id| id.starts_with("call_")),
                    "first delta of a call has its id: {t}"
                );
                let name = t["function"]["name"].as_str().expect("name first");
                out.calls.push((name.to_string(), String::new(), 0));
            }
            let a = t["function"]["arguments"].as_str().unwrap_or_default();
            if !a.is_empty() {
                out.calls[i].1.push_str(a);
                out.calls[i].2 += 1;
            }
        }
        if let Some(f) = c["finish_reason"].as_str() {
            out.finish = f.to_string();
        }
    }
    out
}

fn no_markup(content: &str) {
    for m in [
        "<tool_call>",
        "</tool_call>",
        "{\"name\"",
        "<tool_call",
        "\"arguments\"",
    ] {
        assert!(!content.contains(m), "markup {m:?} in content {content:?}");
    }
}

/// Issue 24: a streamed named `tool_choice` gave the call, then its markup
/// again as content. Now: one call, its arguments in several pieces that
/// join to JSON equal to the non-streamed call, no markup in content.
#[test]
fn a_named_choice_streams_one_call_in_pieces_and_no_markup() {
    let body = ask(named(), 120);
    let s = stream_chat(&body);
    no_markup(&s.content);
    assert!(s.content.trim().is_empty(), "content {:?}", s.content);
    assert_eq!(s.calls.len(), 1, "{:?}", s.calls);
    assert_eq!(s.calls[0].0, "get_weather");
    assert!(s.calls[0].2 > 1, "arguments in one piece: {:?}", s.calls);
    let streamed: Value = serde_json::from_str(&s.calls[0].1).expect("streamed args parse");
    assert_eq!(s.finish, "tool_calls");
    let whole = chat(&body);
    let m = &whole["choices"][0]["message"];
    assert!(m["content"].is_null(), "{m}");
    let calls = m["tool_calls"].as_array().expect("tool_calls");
    assert_eq!(calls.len(), 1, "{m}");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, streamed);
    assert_eq!(whole["choices"][0]["finish_reason"], "tool_calls");
}

/// Issue 24: a `required` answer carried `content: "<tool_call>\n"` beside
/// its calls (a further call begun and cut by `max_tokens`).
#[test]
fn a_required_choice_never_answers_markup_as_content() {
    for max_tokens in [60, 90, 200] {
        let body = ask(json!("required"), max_tokens);
        let whole = chat(&body);
        let choice = &whole["choices"][0];
        let m = &choice["message"];
        no_markup(m["content"].as_str().unwrap_or_default());
        let calls = m["tool_calls"].as_array().expect("tool_calls");
        assert!(!calls.is_empty(), "{m}");
        let s = stream_chat(&body);
        no_markup(&s.content);
        assert_eq!(s.finish, choice["finish_reason"], "{max_tokens}");
        assert_eq!(
            s.calls.len(),
            calls.len(),
            "{max_tokens}: {m} vs {:?}",
            s.calls
        );
        for ((name, args, _), c) in s.calls.iter().zip(calls) {
            assert_eq!(name, c["function"]["name"].as_str().unwrap());
            if choice["finish_reason"] == "tool_calls" {
                let a: Value = serde_json::from_str(args).unwrap();
                let b: Value =
                    serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
                assert_eq!(a, b);
            }
        }
    }
}

/// The shortest call `tool_choice` allows, in tokens, as the 400 for a
/// too-small `max_tokens` reports it.
fn shortest_call_tokens() -> u64 {
    let r = post_json("/v1/chat/completions", &ask(named(), 1));
    assert_openai_error(&r, 400, "max_tokens");
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("at least"), "{msg}");
    msg.split("at least ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {msg}"))
}

/// `max_tokens` that cannot hold the shortest call is a 400 naming it;
/// one that can but is cut inside the call ends with `length`, the half
/// call never in `content` (streamed or not).
#[test]
fn a_call_cut_by_max_tokens_ends_with_length_and_no_half_call_in_content() {
    let need = shortest_call_tokens();
    assert!(need > 5, "{need}");
    let r = post_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "tools": weather_tools(),
            "tool_choice": "required", "max_completion_tokens": 2}),
    );
    assert_openai_error(&r, 400, "'max_completion_tokens' is 2");
    // The model writes a city and a day count longer than the minimum.
    let body = ask(named(), need);
    let whole = chat(&body);
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "length", "{whole}");
    no_markup(choice["message"]["content"].as_str().unwrap_or_default());
    let s = stream_chat(&body);
    assert_eq!(s.finish, "length");
    no_markup(&s.content);
    // Cut anywhere inside the call: the content stays clean.
    for max_tokens in [need + 1, need + 2, need + 4] {
        let body = ask(json!("required"), max_tokens);
        let whole = chat(&body);
        no_markup(
            whole["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default(),
        );
        no_markup(&stream_chat(&body).content);
    }
}

/// `cached_tokens` never exceeds `prompt_tokens` (issue 24 saw 48 for a
/// 37-token prompt), and a repeated prompt reports its cache hit.
#[test]
fn cached_tokens_stay_within_the_prompt() {
    let body = json!({"messages": [{"role": "user", "content": "Name three rivers of Europe, one per line, and nothing else at all."}],
        "max_tokens": 24, "temperature": 0});
    let mut hit = false;
    for _ in 0..3 {
        let u = &chat(&body)["usage"];
        let cached = u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        assert!(cached <= u["prompt_tokens"].as_u64().unwrap(), "{u}");
        hit |= cached > 0;
        let su = stream_chat(&body).usage;
        let cached = su["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        assert!(cached <= su["prompt_tokens"].as_u64().unwrap(), "{su}");
    }
    assert!(hit, "a repeated prompt never hit the prefix cache");
}

fn tokens_of(text: &str) -> Vec<u64> {
    let r = post_json(
        "/tokenize",
        &json!({"prompt": text, "add_special_tokens": false}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

fn complete(extra: Value) -> Value {
    let mut body = json!({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = post_json("/v1/completions", &body);
    assert_eq!(r.status, 200, "{body}: {}", r.text());
    r.json()
}

/// `logit_bias` with OpenAI's semantics: -100 bans the greedy token, +100
/// forces another; ids outside the vocabulary and biases outside -100..100
/// are 400s naming the field.
#[test]
fn logit_bias_bans_and_forces_tokens() {
    let plain = complete(json!({}))["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    let first = tokens_of(&plain)[0];
    let banned = complete(json!({"logit_bias": {first.to_string(): -100}}));
    let text = banned["choices"][0]["text"].as_str().unwrap();
    assert_ne!(
        tokens_of(text).first(),
        Some(&first),
        "{plain:?} vs {text:?}"
    );
    let rome = tokens_of(" Rome")[0];
    let forced = complete(json!({"logit_bias": {rome.to_string(): 100}, "max_tokens": 1}));
    assert_eq!(
        tokens_of(forced["choices"][0]["text"].as_str().unwrap()),
        [rome]
    );
    let r = post_json(
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 1, "logit_bias": {"99999999": 1}}),
    );
    assert_openai_error(&r, 400, "logit_bias");
    let r = post_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "logit_bias": {"1": 200}}),
    );
    assert_openai_error(&r, 400, "logit_bias");
}

/// instructor's Mode.JSON_SCHEMA: `json_object` with a `schema` gives
/// output valid against the schema.
#[test]
fn json_object_with_a_schema_constrains_to_it() {
    let schema = json!({"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"], "additionalProperties": false});
    let v = chat(
        &json!({"messages": [{"role": "user", "content": "Invent a person; answer in JSON."}],
        "response_format": {"type": "json_object", "schema": schema}, "max_tokens": 60, "temperature": 0}),
    );
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    let out: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let o = out.as_object().unwrap();
    assert_eq!(o.len(), 2, "{out}");
    assert!(
        o["name"].as_str().is_some_and(|n| n.chars().count() <= 12),
        "{out}"
    );
    assert!(
        o["age"].as_i64().is_some_and(|a| (0..=150).contains(&a)),
        "{out}"
    );
}

/// What one documented field does.
enum Does {
    /// Taken: the check holds on the answer (given the answer without it).
    Honoured(fn(&Value, &Value) -> bool),
    /// A 400 whose message names the field.
    Refused,
}

fn text_of(v: &Value) -> String {
    let c = &v["choices"][0];
    c["text"]
        .as_str()
        .or(c["message"]["content"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Every field of the `openai` package's `CompletionCreateParams` and
/// chat `CompletionCreateParams` (openai 3.51.0, the e2e venv's), and
/// `stream`: each honoured (a behaviour check against the answer without
/// it) or refused with a 400 naming it. None is silently ignored.
#[test]
fn every_documented_field_is_honoured_or_refused() {
    use Does::{Honoured, Refused};
    let same: fn(&Value, &Value) -> bool = |a, b| text_of(a) == text_of(b);
    let completions: Vec<(&str, Value, Does)> = vec![
        ("best_of", json!({"best_of": 3}), Refused),
        (
            "echo",
            json!({"echo": true}),
            Honoured(|a, b| text_of(a) == format!("The capital of France is{}", text_of(b))),
        ),
        (
            "frequency_penalty",
            json!({"frequency_penalty": 2, "max_tokens": 40, "ignore_eos": true}),
            Honoured(|a, _| {
                text_of(a) != text_of(&complete(json!({"max_tokens": 40, "ignore_eos": true})))
            }),
        ),
        // Applied as asked: `logit_bias_bans_and_forces_tokens`.
        (
            "logit_bias",
            json!({"logit_bias": {"99999999": 1}}),
            Refused,
        ),
        (
            "logprobs",
            json!({"logprobs": 2}),
            Honoured(|a, _| {
                a["choices"][0]["logprobs"]["top_logprobs"][0]
                    .as_object()
                    .is_some_and(|m| (1..=2).contains(&m.len()))
            }),
        ),
        (
            "max_tokens",
            json!({"max_tokens": 1}),
            Honoured(|a, _| a["usage"]["completion_tokens"] == 1),
        ),
        ("model", json!({"model": "no-such-model"}), Refused),
        (
            "n",
            json!({"n": 2}),
            Honoured(|a, _| a["choices"].as_array().unwrap().len() == 2),
        ),
        (
            "presence_penalty",
            json!({"presence_penalty": 2, "max_tokens": 40, "ignore_eos": true}),
            Honoured(|a, _| {
                text_of(a) != text_of(&complete(json!({"max_tokens": 40, "ignore_eos": true})))
            }),
        ),
        (
            "prompt",
            json!({"prompt": ["a", "b"]}),
            Honoured(|a, _| a["choices"].as_array().unwrap().len() == 2),
        ),
        (
            "seed",
            json!({"seed": 3, "temperature": 1, "max_tokens": 12}),
            Honoured(|a, _| {
                text_of(a)
                    == text_of(&complete(
                        json!({"seed": 3, "temperature": 1, "max_tokens": 12}),
                    ))
            }),
        ),
        ("stream", json!({"stream": "yes"}), Refused),
        (
            "stop",
            json!({"stop": [" Paris"], "max_tokens": 8}),
            Honoured(|a, _| !text_of(a).contains("Paris")),
        ),
        (
            "stream_options",
            json!({"stream_options": {"include_usage": "yes"}}),
            Refused,
        ),
        ("suffix", json!({"suffix": "!"}), Refused),
        ("temperature", json!({"temperature": 3}), Refused),
        ("top_p", json!({"top_p": 0}), Refused),
        ("user", json!({"user": 5}), Refused),
        ("user", json!({"user": "u-1"}), Honoured(same)),
    ];
    let base = complete(json!({}));
    for (field, extra, does) in completions {
        let mut body =
            json!({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        check_field("/v1/completions", field, &body, &base, does);
    }
    let chat_fields: Vec<(&str, Value, Does)> = vec![
        (
            "audio",
            json!({"audio": {"voice": "alloy", "format": "wav"}}),
            Refused,
        ),
        (
            "frequency_penalty",
            json!({"frequency_penalty": 3}),
            Refused,
        ),
        ("function_call", json!({"function_call": "auto"}), Refused),
        ("functions", json!({"functions": [{"name": "f"}]}), Refused),
        ("logit_bias", json!({"logit_bias": {"-1": 1}}), Refused),
        (
            "logprobs",
            json!({"logprobs": true, "top_logprobs": 2}),
            Honoured(|a, _| {
                a["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
                    .as_array()
                    .is_some_and(|t| t.len() == 2)
            }),
        ),
        (
            "max_completion_tokens",
            json!({"max_completion_tokens": 1}),
            Honoured(|a, _| a["usage"]["completion_tokens"] == 1),
        ),
        (
            "max_tokens",
            json!({"max_tokens": 2}),
            Honoured(|a, _| a["usage"]["completion_tokens"] == 2),
        ),
        ("messages", json!({"messages": []}), Refused),
        ("metadata", json!({"metadata": {"k": "v"}}), Refused),
        (
            "modalities",
            json!({"modalities": ["text", "audio"]}),
            Refused,
        ),
        (
            "modalities",
            json!({"modalities": ["text"]}),
            Honoured(same),
        ),
        ("model", json!({"model": "no-such-model"}), Refused),
        (
            "moderation",
            json!({"moderation": {"mode": "block"}}),
            Refused,
        ),
        (
            "n",
            json!({"n": 3}),
            Honoured(|a, _| a["choices"].as_array().unwrap().len() == 3),
        ),
        (
            "parallel_tool_calls",
            json!({"parallel_tool_calls": "no"}),
            Refused,
        ),
        (
            "prediction",
            json!({"prediction": {"type": "content", "content": "x"}}),
            Refused,
        ),
        ("presence_penalty", json!({"presence_penalty": -3}), Refused),
        (
            "prompt_cache_key",
            json!({"prompt_cache_key": "k"}),
            Honoured(same),
        ),
        (
            "prompt_cache_options",
            json!({"prompt_cache_options": {"ttl": "1h"}}),
            Refused,
        ),
        (
            "prompt_cache_retention",
            json!({"prompt_cache_retention": "24h"}),
            Refused,
        ),
        (
            "prompt_cache_retention",
            json!({"prompt_cache_retention": "in_memory"}),
            Honoured(same),
        ),
        (
            "reasoning_effort",
            json!({"reasoning_effort": "extreme"}),
            Refused,
        ),
        (
            "reasoning_effort",
            json!({"reasoning_effort": "low"}),
            Honoured(|a, _| a["choices"][0]["message"]["content"].is_string()),
        ),
        (
            "response_format",
            json!({"response_format": {"type": "json_object"}, "max_tokens": 30}),
            Honoured(|a, _| {
                let t = text_of(a);
                t.trim_start().starts_with('{')
            }),
        ),
        (
            "safety_identifier",
            json!({"safety_identifier": "s-1"}),
            Honoured(same),
        ),
        ("seed", json!({"seed": -1}), Refused),
        ("service_tier", json!({"service_tier": "priority"}), Refused),
        (
            "service_tier",
            json!({"service_tier": "auto"}),
            Honoured(same),
        ),
        (
            "stop",
            json!({"stop": [text_first_word()], "max_tokens": 8}),
            Honoured(|a, _| a["choices"][0]["finish_reason"] == "stop"),
        ),
        ("store", json!({"store": true}), Refused),
        ("store", json!({"store": false}), Honoured(same)),
        ("stream", json!({"stream": "yes"}), Refused),
        (
            "stream_options",
            json!({"stream_options": {"include_usage": 1}}),
            Refused,
        ),
        ("temperature", json!({"temperature": -1}), Refused),
        ("tool_choice", json!({"tool_choice": "required"}), Refused),
        ("tools", json!({"tools": [{"type": "retrieval"}]}), Refused),
        (
            "top_logprobs",
            json!({"logprobs": true, "top_logprobs": 21}),
            Refused,
        ),
        ("top_p", json!({"top_p": 2}), Refused),
        ("user", json!({"user": "u-1"}), Honoured(same)),
        ("verbosity", json!({"verbosity": "low"}), Refused),
        (
            "web_search_options",
            json!({"web_search_options": {}}),
            Refused,
        ),
    ];
    let chat_body = json!({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6, "temperature": 0});
    let base = chat(&chat_body);
    for (field, extra, does) in chat_fields {
        let mut body = chat_body.clone();
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        check_field("/v1/chat/completions", field, &body, &base, does);
    }
    // Streaming (both APIs' `stream`) and tools are honoured in the tests above.
}

/// The first word the greedy chat answer writes after its first token.
fn text_first_word() -> String {
    let v = chat(
        &json!({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6, "temperature": 0}),
    );
    let t = text_of(&v);
    t.split_whitespace().nth(1).unwrap_or("hello").to_string()
}

fn check_field(path: &str, field: &str, body: &Value, base: &Value, does: Does) {
    let r = post_json(path, body);
    match does {
        Does::Refused => {
            // An unknown model is OpenAI's 404, naming it.
            let status = if field == "model" { 404 } else { 400 };
            assert_eq!(r.status, status, "{path} {field}: {body} -> {}", r.text());
            let msg = r.json()["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let named = msg.contains(field) || (field == "model" && msg.contains("no-such-model"));
            assert!(named, "{path} {field}: the 400 does not name it: {msg}");
        }
        Does::Honoured(check) => {
            assert_eq!(r.status, 200, "{path} {field}: {body} -> {}", r.text());
            assert!(
                check(&r.json(), base),
                "{path} {field}: {body} -> {}",
                r.text()
            );
        }
    }
}

/// `/v1/messages` takes the same streamed calls: a forced tool's input
/// arrives in several `input_json_delta` pieces that join to JSON equal to
/// the non-streamed `input`.
#[test]
fn messages_stream_tool_input_in_pieces() {
    let tools = json!([{"name": "get_weather", "description": "Current weather in a city.",
        "input_schema": weather_tools()[0]["function"]["parameters"].clone()}]);
    let body = json!({"model": "default", "max_tokens": 120, "temperature": 0, "tools": tools,
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "messages": [{"role": "user", "content": "What's the weather in Paris for the next 3 days?"}]});
    let r = post_json("/v1/messages", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let whole = r.json();
    let input = whole["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "tool_use")
        .unwrap_or_else(|| panic!("no tool_use: {whole}"))["input"]
        .clone();
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let mut st = stream(
        "/v1/messages",
        &[("Content-Type", "application/json")],
        &streamed,
    );
    let (mut pieces, mut joined) = (0, String::new());
    while let Some(ev) = st.next_until(b"\n\n") {
        let Some(d) = ev.lines().find_map(|l| l.strip_prefix("data: ")) else {
            continue;
        };
        let v: Value = serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}"));
        if v["delta"]["type"] == "input_json_delta" {
            pieces += 1;
            joined.push_str(v["delta"]["partial_json"].as_str().unwrap());
        }
        if v["type"] == "message_stop" {
            break;
        }
    }
    assert!(pieces > 1, "input in {pieces} piece(s): {joined}");
    let got: Value = serde_json::from_str(&joined).unwrap_or_else(|e| panic!("{e}: {joined}"));
    assert_eq!(got, input);
}
