//! The chat route with gpt-oss's parsers set (`option.reasoning_parser=
//! openai_gptoss`, `option.tool_call_parser=openai`) on the default model
//! (SmolLM2, which writes no harmony: its answer passes through as
//! content, whole and streamed alike), and the tool choices harmony cannot
//! be held to refused by name, and `reasoning_effort` checked and handed
//! to the template. The parsers themselves are tested on
//! harmony text in `kiln-server`'s `harmony` module.

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
            r.text().contains("with gpt-oss's harmony tool calls"),
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
