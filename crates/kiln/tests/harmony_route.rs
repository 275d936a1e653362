//! The chat route with gpt-oss's parsers set (`option.reasoning_parser=
//! openai_gptoss`, `option.tool_call_parser=openai`) on the default model
//! (SmolLM2, which writes no harmony: its answer passes through as
//! content, whole and streamed alike; a required call is refused, as its
//! tokenizer has none of harmony's special tokens), `reasoning_effort`
//! checked and handed to the template, and the tiny gpt-oss checkpoint
//! given harmony's special tokens and a harmony template: `tool_choice:
//! "required"` and a named function always answer a call in `tool_calls`,
//! whole and streamed, with no markup in `content`. The parsers themselves
//! are tested on harmony text in `kiln-server`'s `harmony` module.

mod support;

use serde_json::{json, Value};
use support::*;

#[test]
fn harmony_parsers_on_the_chat_route() {
    let root = tempdir("harmony-store-");
    write(
        &root.join("models/gptoss/serving.properties"),
        &format!(
            "option.model_id={}\noption.reasoning_parser=openai_gptoss\n\
             option.tool_call_parser=openai\noption.enable_auto_tool_choice=true\n",
            model_file().display()
        ),
    );
    let (s, states) = store_server(&root, 1);
    assert_eq!(states, "Healthy", "{}", s.stderr());
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    for choice in [
        json!("required"),
        json!({"type": "function", "function": {"name": "get_weather"}}),
    ] {
        let r = s.post_json(
            "/v1/chat/completions",
            &json!({"model": "gptoss", "messages": [{"role": "user", "content": "Weather?"}],
                "tools": tools, "tool_choice": choice, "max_tokens": 4}),
        );
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(
            r.text().contains(
                "needs harmony's special tokens in the model's tokenizer, which has no \
                 '<|channel|>'"
            ),
            "{}",
            r.text()
        );
    }
    // OpenAI's reasoning_effort goes to the template; a value it does not
    // define is refused by name.
    let ask = |effort: &str| {
        s.post_json(
            "/v1/chat/completions",
            &json!({"model": "gptoss", "messages": [{"role": "user", "content": "Hi"}],
                "reasoning_effort": effort, "max_tokens": 2}),
        )
    };
    assert_eq!(ask("low").status, 200);
    let r = ask("extreme");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("reasoning_effort"), "{}", r.text());
    let chat = json!({"model": "gptoss", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "tools": tools, "max_tokens": 12, "temperature": 0});
    let r = s.post_json("/v1/chat/completions", &chat);
    assert_eq!(r.status, 200, "{}", r.text());
    let whole = r.json();
    let message = &whole["choices"][0]["message"];
    let content = message["content"].as_str().expect("content").to_string();
    assert!(!content.is_empty(), "{whole}");
    assert!(
        message.get("reasoning_content").is_none_or(Value::is_null),
        "{whole}"
    );
    assert!(
        message
            .get("tool_calls")
            .is_none_or(|c| c.as_array().is_none_or(Vec::is_empty)),
        "{whole}"
    );
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let r = s.post_json("/v1/chat/completions", &streamed);
    assert_eq!(r.status, 200, "{}", r.text());
    let text: String = r
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(text, content);
}

/// Harmony's special tokens, after the tiny tokenizer's 260 ids (the
/// checkpoint's vocabulary has 320 rows).
const HARMONY_TOKENS: [&str; 7] = [
    "<|start|>",
    "<|channel|>",
    "<|message|>",
    "<|end|>",
    "<|call|>",
    "<|return|>",
    "<|constrain|>",
];

/// `testdata/tiny/gpt_oss` with harmony's special tokens added to its
/// tokenizer, gpt-oss's end tokens (`<|return|>`, `<|endoftext|>`,
/// `<|call|>`, as its generation_config lists them) and a short harmony
/// template (gpt-oss's own renders more than the tiny model's 256
/// positions hold).
fn tiny_harmony_model() -> std::path::PathBuf {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny/gpt_oss");
    let dir = tempdir("tiny-harmony-");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).expect("copy the tiny checkpoint");
    }
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    let added = tok["added_tokens"].as_array_mut().expect("added_tokens");
    let first = added.len() as u64 + 256;
    for (i, t) in HARMONY_TOKENS.iter().enumerate() {
        added.push(
            json!({"id": first + i as u64, "content": t, "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
        );
    }
    write(&dir.join("tokenizer.json"), &tok.to_string());
    let id = |t: &str| first + HARMONY_TOKENS.iter().position(|h| *h == t).unwrap() as u64;
    write(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": 256, "pad_token_id": 257,
            "eos_token_id": [id("<|return|>"), 256, id("<|call|>")]})
        .to_string(),
    );
    write(
        &dir.join("chat_template.jinja"),
        "{%- for m in messages -%}\
         {%- if m.role == 'assistant' -%}<|start|>assistant<|channel|>final<|message|>\
         {{- m.content }}<|end|>\
         {%- else -%}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{%- endif -%}\
         {%- endfor -%}\
         {%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}",
    );
    dir
}

/// A streamed answer put together: content, and each call's name and arguments.
fn assemble(text: &str) -> (String, Vec<(String, String)>, String) {
    let mut content = String::new();
    let mut calls: Vec<(String, String)> = Vec::new();
    let mut finish = String::new();
    for c in text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
    {
        let choice = &c["choices"][0];
        let d = &choice["delta"];
        if let Some(t) = d["content"].as_str() {
            content.push_str(t);
        }
        for t in d["tool_calls"].as_array().into_iter().flatten() {
            let i = t["index"].as_u64().expect("index") as usize;
            if calls.len() <= i {
                calls.resize(i + 1, (String::new(), String::new()));
            }
            if let Some(n) = t["function"]["name"].as_str() {
                calls[i].0.push_str(n);
            }
            if let Some(a) = t["function"]["arguments"].as_str() {
                calls[i].1.push_str(a);
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (content, calls, finish)
}

#[test]
fn required_and_named_tool_choices_on_a_harmony_model_answer_calls() {
    let root = tempdir("harmony-tiny-store-");
    write(
        &root.join("models/tinyoss/serving.properties"),
        &format!(
            "option.model_id={}\noption.reasoning_parser=openai_gptoss\n\
             option.tool_call_parser=openai\n",
            tiny_harmony_model().display()
        ),
    );
    let (s, states) = store_server(&root, 1);
    assert_eq!(states, "Healthy", "{}", s.stderr());
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "additionalProperties": false, "required": ["city"],
            "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}}}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {
            "type": "object", "additionalProperties": false, "required": ["zone"],
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}}}}
    ]);
    let cases = [
        (json!("required"), None),
        (
            json!({"type": "function", "function": {"name": "get_time"}}),
            Some("get_time"),
        ),
        (
            json!({"type": "function", "function": {"name": "get_weather"}}),
            Some("get_weather"),
        ),
    ];
    for (choice, named) in cases {
        for prompt in ["Weather?", "What time is it in Paris?"] {
            let body = json!({"model": "tinyoss", "messages": [{"role": "user", "content": prompt}],
                "tools": tools, "tool_choice": choice, "max_tokens": 120, "temperature": 0});
            let what = format!("{choice} on {prompt:?}");
            let r = s.post_json("/v1/chat/completions", &body);
            assert_eq!(r.status, 200, "{what}: {}", r.text());
            let whole = r.json();
            let choice0 = &whole["choices"][0];
            assert_eq!(choice0["finish_reason"], "tool_calls", "{what}: {whole}");
            let m = &choice0["message"];
            let content = m["content"].as_str().unwrap_or_default();
            assert!(!content.contains("<|"), "{what}: {whole}");
            let calls = m["tool_calls"].as_array().expect("tool_calls");
            assert_eq!(calls.len(), 1, "{what}: {whole}");
            let f = &calls[0]["function"];
            let name = f["name"].as_str().expect("name");
            if let Some(n) = named {
                assert_eq!(name, n, "{what}");
            }
            let args: Value =
                serde_json::from_str(f["arguments"].as_str().expect("arguments")).expect("JSON");
            let (key, allowed) = match name {
                "get_weather" => ("city", ["Paris", "Tokyo"]),
                "get_time" => ("zone", ["UTC", "CET"]),
                other => panic!("{what}: called {other}"),
            };
            assert_eq!(args.as_object().map(|o| o.len()), Some(1), "{what}: {args}");
            assert!(
                allowed.contains(&args[key].as_str().unwrap_or("")),
                "{what}: {args}"
            );
            // Streamed: the same call, in deltas, and no markup in the content.
            let mut streamed = body.clone();
            streamed["stream"] = json!(true);
            let r = s.post_json("/v1/chat/completions", &streamed);
            assert_eq!(r.status, 200, "{what}: {}", r.text());
            let (content_s, calls_s, finish) = assemble(&r.text());
            assert_eq!(finish, "tool_calls", "{what}");
            assert!(!content_s.contains("<|"), "{what}: {content_s:?}");
            assert_eq!(
                calls_s,
                vec![(
                    name.to_string(),
                    f["arguments"].as_str().unwrap().to_string()
                )],
                "{what}"
            );
        }
    }
    // A max_tokens too small for the shortest call is refused up front.
    let r = s.post_json(
        "/v1/chat/completions",
        &json!({"model": "tinyoss", "messages": [{"role": "user", "content": "Weather?"}],
            "tools": tools, "tool_choice": "required", "max_tokens": 8}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("shortest tool call"), "{}", r.text());
}
