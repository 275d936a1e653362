//! Tool calling against the real binary on the default model (SmolLM2-135M,
//! served from the command line, so without `option.enable_auto_tool_choice`):
//! `tool_choice` `required` and a named function make even this small model
//! answer with a call whose arguments parse and match the function's schema,
//! streamed calls assemble to the same call, a later turn with the call and a
//! `role: tool` result renders and is answered, and `auto` is refused with
//! vLLM's rule (it needs the setting). The LMI routes reach the same code.

mod support;

use std::sync::OnceLock;

use serde_json::{json, Value};
use support::*;

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {"type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                "required": ["city", "days"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time",
            "description": "Local time in a time zone.",
            "parameters": {"type": "object",
                "properties": {"zone": {"type": "string", "maxLength": 30}},
                "required": ["zone"], "additionalProperties": false}}}
    ])
}

fn ask(choice: Value, seed: u64) -> Value {
    json!({"messages": [{"role": "user", "content": "What's the weather in Paris for the next 3 days?"}],
        "tools": tools(), "tool_choice": choice, "max_tokens": 80, "seed": seed})
}

fn ok(s: &Server, path: &str, body: &Value) -> Value {
    let r = s.post_json(path, body);
    assert_eq!(r.status, 200, "{path} {body}: {}", r.text());
    r.json()
}

/// Checks a call's arguments against [`tools`]' schemas by hand; returns them.
fn check_call(call: &Value) -> (String, Value) {
    assert_eq!(call["type"], "function", "{call}");
    assert!(
        call["id"].as_str().is_some_and(|i| i.starts_with("call_")),
        "{call}"
    );
    let name = call["function"]["name"].as_str().expect("name").to_string();
    let text = call["function"]["arguments"]
        .as_str()
        .unwrap_or_else(|| panic!("arguments must be a JSON string: {call}"));
    let args: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: arguments {text:?}"));
    let obj = args.as_object().expect("arguments object");
    match name.as_str() {
        "get_weather" => {
            assert!(
                obj["city"]
                    .as_str()
                    .is_some_and(|c| c.chars().count() <= 20),
                "{args}"
            );
            let days = obj["days"]
                .as_i64()
                .unwrap_or_else(|| panic!("days: {args}"));
            assert!((1..=7).contains(&days), "{args}");
            assert_eq!(obj.len(), 2, "{args}");
        }
        "get_time" => {
            assert!(obj["zone"].is_string(), "{args}");
            assert_eq!(obj.len(), 1, "{args}");
        }
        other => panic!("unknown function {other}"),
    }
    (name, args)
}

#[test]
fn required_and_named_choices_return_schema_valid_calls() {
    let s = shared_server();
    for seed in 0..4 {
        let v = ok(s, "/v1/chat/completions", &ask(json!("required"), seed));
        for call in finished_calls(&v) {
            check_call(&call);
        }
    }
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    for seed in 0..3 {
        let mut body = ask(named.clone(), seed);
        body["parallel_tool_calls"] = json!(false);
        let v = ok(s, "/v1/chat/completions", &body);
        let calls = v["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"));
        assert_eq!(calls.len(), 1, "{v}");
        assert_eq!(check_call(&calls[0]).0, "get_time");
    }
}

#[test]
fn streamed_calls_assemble_to_the_same_call() {
    let s = shared_server();
    let mut body = ask(
        json!({"type": "function", "function": {"name": "get_weather"}}),
        7,
    );
    body["temperature"] = json!(0);
    // One call: with parallel calls allowed this small model repeats the
    // call until max_tokens cuts one short (which then reads as content).
    body["parallel_tool_calls"] = json!(false);
    let whole = ok(s, "/v1/chat/completions", &body);
    let want = &whole["choices"][0]["message"]["tool_calls"];
    body["stream"] = json!(true);
    let mut st = s.stream(
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        &body,
    );
    // index -> (id, name, arguments)
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let (mut content, mut reason) = (String::new(), None);
    let mut events = Vec::new();
    while let Some(e) = st.next_event() {
        if e == "[DONE]" {
            break;
        }
        events.push(e.clone());
        let v: Value = serde_json::from_str(&e).unwrap();
        let c = &v["choices"][0];
        if let Some(t) = c["delta"]["content"].as_str() {
            content.push_str(t);
        }
        for d in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = d["index"].as_u64().expect("index") as usize;
            if i == calls.len() {
                // A new call: its first delta names it.
                let name = d["function"]["name"].as_str().expect("name first");
                calls.push((
                    d["id"].as_str().expect("id").into(),
                    name.into(),
                    String::new(),
                ));
            }
            calls[i]
                .2
                .push_str(d["function"]["arguments"].as_str().unwrap_or_default());
        }
        if let Some(r) = c["finish_reason"].as_str() {
            reason = Some(r.to_string());
        }
    }
    assert_eq!(reason.as_deref(), Some("tool_calls"));
    // Content (none here: the grammar starts with the call) is the same too.
    let want_content = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(content, want_content, "{events:#?}");
    assert_eq!(content, "", "{events:#?}");
    let got: Vec<Value> = calls
        .iter()
        .map(|(id, n, a)| json!({"id": id, "type": "function", "function": {"name": n, "arguments": a}}))
        .collect();
    assert_eq!(got.len(), want.as_array().map_or(0, Vec::len), "{want}");
    for (g, w) in got.iter().zip(want.as_array().into_iter().flatten()) {
        assert_eq!(g["function"], w["function"]);
        check_call(g);
    }
}

#[test]
fn a_tool_result_turn_renders_and_is_answered() {
    let s = shared_server();
    let body = json!({"messages": [
            {"role": "user", "content": "What's the weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 1}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 18, \"sky\": \"clear\"}"}],
        "tools": tools(), "tool_choice": "none", "max_tokens": 12, "temperature": 0});
    let v = ok(s, "/v1/chat/completions", &body);
    let c = &v["choices"][0];
    assert!(
        c["message"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    assert!(c["message"].get("tool_calls").is_none(), "{v}");
    assert_ne!(c["finish_reason"], "tool_calls");
    // The tool's answer is in the prompt the model saw.
    let with = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let mut shorter = body.clone();
    shorter["messages"][2]["content"] = json!("{}");
    let w = ok(s, "/v1/chat/completions", &shorter);
    assert!(w["usage"]["prompt_tokens"].as_u64().unwrap() < with, "{w}");
    // Bad arguments in an earlier call are the client's error.
    let mut bad = body.clone();
    bad["messages"][1]["tool_calls"][0]["function"]["arguments"] = json!("{not json");
    let r = s.post_json("/v1/chat/completions", &bad);
    assert_eq!(r.status, 400, "{}", r.text());
}

/// vLLM (`serving_chat.py`): "\"auto\" tool choice requires
/// --enable-auto-tool-choice and --tool-call-parser to be set"; `auto` is
/// also the default when `tools` is given. A model served from the command
/// line has no serving.properties, so it does not enable it.
#[test]
fn auto_needs_the_setting() {
    let s = shared_server();
    for choice in [Some(json!("auto")), None] {
        let mut body = ask(json!("auto"), 0);
        if choice.is_none() {
            body.as_object_mut().unwrap().remove("tool_choice");
        }
        let r = s.post_json("/v1/chat/completions", &body);
        assert_eq!(r.status, 400, "{}", r.text());
        let msg = r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(msg.contains("option.enable_auto_tool_choice"), "{msg}");
    }
    let r = s.post_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
}

/// DJL's chat schema on `/invocations` (`chat_input_output_schema.md`): an
/// OpenAI chat body, tools included, answered in the OpenAI shape.
#[test]
fn lmi_routes_reach_tool_calling() {
    let s = shared_server();
    let v = ok(s, "/invocations", &ask(json!("required"), 3));
    check_call(&finished_calls(&v)[0]);
}

/// The calls of a `required` answer whose calls finished: it ends with
/// `tool_calls`, or with `length` when the model went on calling (parallel
/// calls allowed) until `max_tokens`, its last call then possibly cut short
/// (OpenAI's answer too: unfinished arguments under `length`), never in
/// `content`.
fn finished_calls(v: &Value) -> Vec<Value> {
    let c = &v["choices"][0];
    let mut calls = c["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls: {v}"))
        .clone();
    assert!(c["message"]["content"].is_null(), "{v}");
    match c["finish_reason"].as_str() {
        Some("tool_calls") => {}
        Some("length") => {
            assert_eq!(v["usage"]["completion_tokens"], 80, "{v}");
            let last = calls.last().expect("a call");
            let text = last["function"]["arguments"].as_str().unwrap_or_default();
            if serde_json::from_str::<Value>(text).is_err() {
                calls.pop();
            }
        }
        other => panic!("finish_reason {other:?}: {v}"),
    }
    assert!(!calls.is_empty(), "{v}");
    calls
}

/// A model store with the default model under each tool-call parser kiln
/// implements (and auto tool choice on), to hold each syntax's grammar and
/// parser to the same checks.
fn store() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let root = tempdir("tool-store-");
        let models = root.join("models");
        let names = ["hermes", "llama3_json", "mistral"];
        for p in names {
            write(
                &models.join(format!("{p}/serving.properties")),
                &format!(
                    "option.model_id={}\noption.tool_call_parser={p}\n\
                     option.enable_auto_tool_choice=true\n",
                    model_file().display()
                ),
            );
        }
        let (s, states) = store_server(&root, names.len());
        assert!(!states.contains("Failed"), "{states}: {}", s.stderr());
        s
    })
}

/// `option.tool_call_parser` sets the syntax the grammar writes and the
/// parser reads: each gives schema-valid calls, streamed or not; with
/// `option.enable_auto_tool_choice=true`, `auto` is served.
#[test]
fn each_parser_setting_gives_valid_calls() {
    let s = store();
    for model in ["hermes", "llama3_json", "mistral"] {
        for stream in [false, true] {
            let mut body = ask(json!("required"), 5);
            body["model"] = json!(model);
            body["parallel_tool_calls"] = json!(false);
            body["stream"] = json!(stream);
            let r = s.post_json("/v1/chat/completions", &body);
            assert_eq!(r.status, 200, "{model}: {}", r.text());
            let call = if stream {
                let mut call = json!({"type": "function", "function": {"arguments": ""}});
                for line in r.text().lines().filter_map(|l| l.strip_prefix("data: ")) {
                    let Ok(v) = serde_json::from_str::<Value>(line) else {
                        continue;
                    };
                    for d in v["choices"][0]["delta"]["tool_calls"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        if let Some(id) = d.get("id") {
                            call["id"] = id.clone();
                            call["function"]["name"] = d["function"]["name"].clone();
                        }
                        let a = call["function"]["arguments"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string()
                            + d["function"]["arguments"].as_str().unwrap_or_default();
                        call["function"]["arguments"] = json!(a);
                    }
                }
                call
            } else {
                let v = r.json();
                assert_eq!(
                    v["choices"][0]["finish_reason"], "tool_calls",
                    "{model}: {v}"
                );
                v["choices"][0]["message"]["tool_calls"][0].clone()
            };
            check_call(&call);
        }
        let mut auto = ask(json!("auto"), 1);
        auto["model"] = json!(model);
        let r = s.post_json("/v1/chat/completions", &auto);
        assert_eq!(r.status, 200, "{model}: {}", r.text());
        // The model chose: a call it makes parses (else its text is content).
        let v = r.json();
        for call in v["choices"][0]["message"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert!(call["function"]["arguments"].is_string(), "{v}");
        }
    }
}
