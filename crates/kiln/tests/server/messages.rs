//! Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`)
//! on the default model: whole and streamed answers (the exact event
//! order), stop sequences, the `max_tokens` stop, a tool round trip with a
//! forced `tool_choice`, token counts, `x-api-key`, and 4xx errors in
//! Anthropic's shape; with the body limit, the access log, metrics and
//! cancellation on disconnect that the other routes have.

use super::*;

const WEATHER: &str = "What's the weather in Paris for the next 3 days?";

fn ok(s: &Server, path: &str, body: &Value) -> Value {
    let r = s.post_json(path, body);
    assert_eq!(r.status, 200, "{path} {body}: {}", r.text());
    r.json()
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Asserts Anthropic's error shape `{"type": "error", "error": {"type", "message"}}`.
fn assert_anthropic_error(r: &Response, status: u16, kind: &str, needle: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message: {v}"));
    assert!(
        msg.contains(needle),
        "error {msg:?} does not mention {needle:?}"
    );
}

/// The text of a message's text blocks.
fn text_of(v: &Value) -> String {
    v["content"]
        .as_array()
        .unwrap_or_else(|| panic!("no content: {v}"))
        .iter()
        .filter(|b| b["type"] == "text")
        .map(|b| b["text"].as_str().unwrap().to_string())
        .collect()
}

/// The input tokens of a message's usage (cached and not).
fn input_tokens(v: &Value) -> u64 {
    let u = &v["usage"];
    assert_eq!(u["cache_creation_input_tokens"], 0, "{u}");
    u["input_tokens"].as_u64().unwrap() + u["cache_read_input_tokens"].as_u64().unwrap()
}

/// Reads a stream's server-sent events to the end: (event name, data).
fn sse_events(st: &mut Streaming) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    while let Some(ev) = st.next_until(b"\n\n") {
        if ev.trim().is_empty() {
            continue;
        }
        let mut name = None;
        let mut data = None;
        for line in ev.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = Some(n.to_string());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data =
                    Some(serde_json::from_str::<Value>(d).unwrap_or_else(|e| panic!("{e}: {d}")));
            }
        }
        let (name, data) = (name.expect("event name"), data.expect("event data"));
        // Each event names its type twice, as Anthropic writes them.
        assert_eq!(data["type"], name.as_str(), "{data}");
        out.push((name, data));
    }
    out
}

/// Checks the event grammar: `message_start`, `ping`, then blocks (each
/// start, deltas, stop, indexes 0, 1, ...), `message_delta`, `message_stop`;
/// returns the blocks assembled and the `message_delta`.
fn check_stream(events: &[(String, Value)]) -> (Vec<Value>, Value) {
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[..2], ["message_start", "ping"], "{names:?}");
    assert_eq!(
        names[names.len() - 2..],
        ["message_delta", "message_stop"],
        "{names:?}"
    );
    let start = &events[0].1["message"];
    assert_eq!(start["type"], "message");
    assert_eq!(start["role"], "assistant");
    assert!(start["id"].as_str().unwrap().starts_with("msg_"), "{start}");
    assert_eq!(start["content"], json!([]));
    assert!(start["stop_reason"].is_null());
    let mut blocks: Vec<Value> = Vec::new();
    let mut partial = String::new();
    let mut open: Option<u64> = None;
    for (name, d) in &events[2..events.len() - 2] {
        match name.as_str() {
            "content_block_start" => {
                assert_eq!(open, None, "a block started inside another: {d}");
                assert_eq!(d["index"].as_u64(), Some(blocks.len() as u64), "{d}");
                open = d["index"].as_u64();
                blocks.push(d["content_block"].clone());
                partial.clear();
            }
            "content_block_delta" => {
                assert_eq!(d["index"].as_u64(), open, "{d}");
                let b = blocks.last_mut().unwrap();
                let delta = &d["delta"];
                match delta["type"].as_str().unwrap() {
                    "text_delta" => {
                        assert_eq!(b["type"], "text");
                        let t = format!(
                            "{}{}",
                            b["text"].as_str().unwrap(),
                            delta["text"].as_str().unwrap()
                        );
                        b["text"] = json!(t);
                    }
                    "thinking_delta" => {
                        assert_eq!(b["type"], "thinking");
                        let t = format!(
                            "{}{}",
                            b["thinking"].as_str().unwrap(),
                            delta["thinking"].as_str().unwrap()
                        );
                        b["thinking"] = json!(t);
                    }
                    "input_json_delta" => {
                        assert_eq!(b["type"], "tool_use");
                        partial.push_str(delta["partial_json"].as_str().unwrap());
                    }
                    other => panic!("unexpected delta {other}: {d}"),
                }
            }
            "content_block_stop" => {
                assert_eq!(d["index"].as_u64(), open, "{d}");
                open = None;
                let b = blocks.last_mut().unwrap();
                if b["type"] == "tool_use" {
                    b["input"] = serde_json::from_str(&partial)
                        .unwrap_or_else(|e| panic!("{e}: partial_json {partial:?}"));
                }
            }
            "ping" => {}
            other => panic!("unexpected event {other} in {names:?}"),
        }
    }
    assert_eq!(open, None, "a block was never stopped: {names:?}");
    (blocks, events[events.len() - 2].1.clone())
}

fn stream(s: &Server, body: &Value) -> Vec<(String, Value)> {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let mut st = s.stream(
        "/v1/messages",
        &[
            ("Content-Type", "application/json"),
            ("anthropic-version", "2023-06-01"),
        ],
        &body,
    );
    if st.status != 200 {
        let status = st.status;
        panic!("status {status}: {}", st.rest());
    }
    assert!(
        st.header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream")),
        "{:?}",
        st.headers
    );
    sse_events(&mut st)
}

#[test]
fn messages_answer_like_chat_completions_with_usage() {
    let s = shared();
    let body = json!({"model": "default", "max_tokens": 12, "temperature": 0,
        "system": "You are a geography teacher.",
        "messages": user("What is the capital of France?")});
    let v = ok(s, "/v1/messages", &body);
    assert_eq!(v["type"], "message", "{v}");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "default");
    assert!(v["id"].as_str().unwrap().starts_with("msg_"), "{v}");
    assert!(
        ["end_turn", "max_tokens"].contains(&v["stop_reason"].as_str().unwrap()),
        "{v}"
    );
    assert!(v["stop_sequence"].is_null(), "{v}");
    let out = v["usage"]["output_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&out), "{v}");
    // The same conversation through the chat route: the same prompt, the
    // same greedy answer.
    let chat = ok(
        s,
        "/v1/chat/completions",
        &json!({"model": "default", "max_tokens": 12, "temperature": 0, "messages": [
            {"role": "system", "content": "You are a geography teacher."},
            {"role": "user", "content": "What is the capital of France?"}]}),
    );
    assert_eq!(
        text_of(&v),
        chat["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(
        Some(input_tokens(&v)),
        chat["usage"]["prompt_tokens"].as_u64()
    );
    assert_eq!(Some(out), chat["usage"]["completion_tokens"].as_u64());
    let want_reason = match chat["choices"][0]["finish_reason"].as_str().unwrap() {
        "length" => "max_tokens",
        _ => "end_turn",
    };
    assert_eq!(v["stop_reason"], want_reason);
    // count_tokens counts the same prompt.
    let c = ok(
        s,
        "/v1/messages/count_tokens",
        &json!({"model": "default", "system": "You are a geography teacher.",
            "messages": user("What is the capital of France?")}),
    );
    assert_eq!(c, json!({"input_tokens": input_tokens(&v)}));
    // The second time, the prompt's prefix comes from the cache: the usage
    // splits it, and the parts add up to the prompt.
    let again = ok(s, "/v1/messages", &body);
    assert_eq!(input_tokens(&again), input_tokens(&v));
    assert!(
        again["usage"]["cache_read_input_tokens"].as_u64().unwrap() > 0,
        "{again}"
    );
    assert_eq!(text_of(&again), text_of(&v));
}

#[test]
fn max_tokens_and_stop_sequences_end_the_message_with_their_reasons() {
    let s = shared();
    let body = json!({"model": "default", "max_tokens": 3, "temperature": 0,
        "messages": user("Count from 1 to 100, separated by commas.")});
    let v = ok(s, "/v1/messages", &body);
    assert_eq!(v["stop_reason"], "max_tokens", "{v}");
    assert_eq!(v["usage"]["output_tokens"], 3, "{v}");

    let mut body = body;
    body["max_tokens"] = json!(24);
    let whole = text_of(&ok(s, "/v1/messages", &body));
    // A stop sequence taken from the middle of the greedy answer: the answer
    // ends just before it, and the message says which one matched.
    let chars: Vec<char> = whole.chars().collect();
    assert!(chars.len() > 8, "{whole:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = &whole[..whole.find(&stop).unwrap()];
    body["stop_sequences"] = json!(["never-in-this-answer", stop]);
    let v = ok(s, "/v1/messages", &body);
    assert_eq!(v["stop_reason"], "stop_sequence", "{v}");
    assert_eq!(v["stop_sequence"], stop.as_str(), "{v}");
    assert_eq!(text_of(&v), cut);
    // Streamed: the same text, the same reason and sequence.
    let events = stream(s, &body);
    let (blocks, delta) = check_stream(&events);
    assert_eq!(delta["delta"]["stop_reason"], "stop_sequence", "{delta}");
    assert_eq!(delta["delta"]["stop_sequence"], stop.as_str(), "{delta}");
    let text: String = blocks
        .iter()
        .map(|b| b["text"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(text, cut);
}

#[test]
fn streamed_messages_follow_anthropics_event_order() {
    let s = shared();
    let body = json!({"model": "default", "max_tokens": 10, "temperature": 0,
        "messages": user("Tell me about the moon.")});
    let whole = ok(s, "/v1/messages", &body);
    let events = stream(s, &body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    // One text block: exactly this order.
    let deltas = names
        .iter()
        .filter(|n| **n == "content_block_delta")
        .count();
    assert!(deltas >= 1, "{names:?}");
    let mut want = vec!["message_start", "ping", "content_block_start"];
    want.extend(std::iter::repeat_n("content_block_delta", deltas));
    want.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, want);
    let (blocks, delta) = check_stream(&events);
    assert_eq!(blocks, whole["content"].as_array().unwrap().clone());
    assert_eq!(
        events[2].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    assert_eq!(delta["delta"]["stop_reason"], whole["stop_reason"]);
    assert!(delta["delta"]["stop_sequence"].is_null());
    assert_eq!(
        delta["usage"]["output_tokens"],
        whole["usage"]["output_tokens"]
    );
    assert_eq!(input_tokens(&delta), input_tokens(&whole));
    let start_usage = &events[0].1["message"]["usage"];
    assert_eq!(start_usage["output_tokens"], 0);
    assert_eq!(
        start_usage["input_tokens"].as_u64(),
        Some(input_tokens(&whole))
    );
}

fn weather_tools() -> Value {
    json!([
        {"name": "get_weather", "description": "Current weather in a city.",
            "input_schema": {"type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                "required": ["city", "days"], "additionalProperties": false}},
        {"name": "get_time", "description": "Local time in a time zone.",
            "input_schema": {"type": "object",
                "properties": {"zone": {"type": "string", "maxLength": 30}},
                "required": ["zone"], "additionalProperties": false}}
    ])
}

/// Checks a `tool_use` block of `get_weather` against its schema.
fn check_weather_call(b: &Value) {
    assert_eq!(b["type"], "tool_use", "{b}");
    assert_eq!(b["name"], "get_weather", "{b}");
    assert!(b["id"].as_str().unwrap().starts_with("toolu_"), "{b}");
    let input = b["input"]
        .as_object()
        .unwrap_or_else(|| panic!("input: {b}"));
    assert!(
        input["city"]
            .as_str()
            .is_some_and(|c| c.chars().count() <= 20),
        "{b}"
    );
    assert!(
        input["days"].as_i64().is_some_and(|d| (1..=7).contains(&d)),
        "{b}"
    );
    assert_eq!(input.len(), 2, "{b}");
}

#[test]
fn a_forced_tool_makes_a_call_and_its_result_is_answered() {
    let s = shared();
    let ask = json!({"model": "default", "max_tokens": 80, "temperature": 0,
        "tools": weather_tools(),
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
        "messages": user(WEATHER)});
    let v = ok(s, "/v1/messages", &ask);
    assert_eq!(v["stop_reason"], "tool_use", "{v}");
    let content = v["content"].as_array().unwrap();
    let uses: Vec<&Value> = content.iter().filter(|b| b["type"] == "tool_use").collect();
    assert_eq!(uses.len(), 1, "{v}");
    check_weather_call(uses[0]);
    // No call markup leaks into text.
    assert!(!text_of(&v).contains("tool_call"), "{v}");

    // Streamed: the same call, its input in input_json_delta pieces.
    let events = stream(s, &ask);
    let (blocks, delta) = check_stream(&events);
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    let streamed: Vec<&Value> = blocks.iter().filter(|b| b["type"] == "tool_use").collect();
    assert_eq!(streamed.len(), 1, "{blocks:?}");
    check_weather_call(streamed[0]);
    assert_eq!(streamed[0]["input"], uses[0]["input"]);
    let start = events
        .iter()
        .find(|(n, d)| n == "content_block_start" && d["content_block"]["type"] == "tool_use")
        .unwrap();
    assert_eq!(start.1["content_block"]["input"], json!({}));

    // A call that max_tokens cuts short: the reason says so, and none of
    // it comes back as text (whole or streamed).
    let mut short = ask.clone();
    short["max_tokens"] = json!(6);
    let v_short = ok(s, "/v1/messages", &short);
    assert_eq!(v_short["stop_reason"], "max_tokens", "{v_short}");
    assert_eq!(v_short["content"], json!([]), "{v_short}");
    assert_eq!(v_short["usage"]["output_tokens"], 6, "{v_short}");
    let events = stream(s, &short);
    let (blocks, delta) = check_stream(&events);
    assert!(blocks.is_empty(), "{blocks:?}");
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");

    // The round trip: the call and its result go back; the model answers
    // in text (tool_choice none: the tools stay in the prompt).
    let id = uses[0]["id"].as_str().unwrap();
    let follow = json!({"model": "default", "max_tokens": 20, "temperature": 0,
        "tools": weather_tools(), "tool_choice": {"type": "none"},
        "messages": [
            {"role": "user", "content": WEATHER},
            {"role": "assistant", "content": v["content"]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": id,
                "content": [{"type": "text", "text": "Sunny, 24 C, all three days."}]}]}]});
    let answer = ok(s, "/v1/messages", &follow);
    assert!(
        ["end_turn", "max_tokens"].contains(&answer["stop_reason"].as_str().unwrap()),
        "{answer}"
    );
    assert!(!text_of(&answer).is_empty(), "{answer}");
    assert!(answer["content"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["type"] == "text"));
    // The result is in the prompt: it counts, and an error result differs.
    let mut counted = follow.clone();
    for k in ["model", "max_tokens", "temperature"] {
        counted.as_object_mut().unwrap().remove(k);
    }
    counted["model"] = json!("default");
    let n = ok(s, "/v1/messages/count_tokens", &counted)["input_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(n, input_tokens(&answer));
    counted["messages"][2]["content"][0]["is_error"] = json!(true);
    let n_err = ok(s, "/v1/messages/count_tokens", &counted)["input_tokens"]
        .as_u64()
        .unwrap();
    assert!(n_err > n, "an error result is marked: {n_err} vs {n}");
    // With tools, the count is the forced request's prompt (the tools
    // rendered as the model's template renders them).
    let with_tools = ok(
        s,
        "/v1/messages/count_tokens",
        &json!({"model": "default", "messages": user(WEATHER), "tools": weather_tools()}),
    );
    assert_eq!(with_tools["input_tokens"].as_u64(), Some(input_tokens(&v)));
    // `any` makes a call too; `auto` needs the model's setting, as on the chat route.
    let mut any = ask.clone();
    any["tool_choice"] = json!({"type": "any", "disable_parallel_tool_use": true});
    let v = ok(s, "/v1/messages", &any);
    assert_eq!(v["stop_reason"], "tool_use", "{v}");
    // With parallel calls allowed this small model repeats its call until
    // max_tokens cuts the turn: the reason is then max_tokens, with the
    // complete calls kept.
    any["tool_choice"] = json!({"type": "any"});
    let v = ok(s, "/v1/messages", &any);
    if v["stop_reason"] == "max_tokens" {
        assert!(
            v["content"]
                .as_array()
                .unwrap()
                .iter()
                .all(|b| b["type"] == "tool_use"),
            "{v}"
        );
    } else {
        assert_eq!(v["stop_reason"], "tool_use", "{v}");
    }
    let mut auto = ask;
    auto.as_object_mut().unwrap().remove("tool_choice");
    let r = s.post_json("/v1/messages", &auto);
    assert_anthropic_error(&r, 400, "invalid_request_error", "enable_auto_tool_choice");
}

#[test]
fn bad_bodies_get_anthropics_error_shape() {
    let s = shared();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"model": "default", "messages": user("Hi")}),
            "'max_tokens' is required",
        ),
        (
            json!({"model": "default", "max_tokens": 5, "messages": user("Hi"), "frequency_penalty": 1}),
            "unknown field 'frequency_penalty'",
        ),
        (
            json!({"model": "default", "max_tokens": 5, "messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}),
            "'image' content blocks are not supported",
        ),
        (
            json!({"model": "default", "max_tokens": 5, "messages": user("Hi"), "temperature": 1.5}),
            "'temperature' must be a number from 0 to 1",
        ),
        (
            json!({"model": "default", "max_tokens": 2000, "messages": user("Hi"),
                "thinking": {"type": "enabled", "budget_tokens": 1024}}),
            "no reasoning parser",
        ),
        (
            json!({"model": "default", "max_tokens": 5}),
            "'messages' is required",
        ),
    ];
    for (body, needle) in cases {
        let r = s.post_json("/v1/messages", &body);
        assert_anthropic_error(&r, 400, "invalid_request_error", needle);
    }
    let r = s.req(
        "POST",
        "/v1/messages",
        &[("Content-Type", "application/json")],
        b"{not json",
    );
    assert_anthropic_error(&r, 400, "invalid_request_error", "invalid JSON");
    let r = s.post_json(
        "/v1/messages",
        &json!({"model": "claude-no-such", "max_tokens": 5, "messages": user("Hi")}),
    );
    assert_anthropic_error(&r, 404, "not_found_error", "claude-no-such");
    let r = s.get("/v1/messages");
    assert_anthropic_error(&r, 405, "invalid_request_error", "GET is not allowed");
    let r = s.post_json("/v1/messages/batches", &json!({}));
    assert_anthropic_error(&r, 404, "not_found_error", "no route");
    let r = s.post_json(
        "/v1/messages/count_tokens",
        &json!({"model": "default", "messages": user("Hi"), "max_tokens": 5}),
    );
    assert_anthropic_error(
        &r,
        400,
        "invalid_request_error",
        "unknown field 'max_tokens'",
    );
}

#[test]
fn x_api_key_is_taken_like_a_bearer_token() {
    let (s, logs) = guarded();
    let body = json!({"model": "default", "max_tokens": 2, "messages": user("Hi")});
    let bytes = body.to_string();
    let ct = ("Content-Type", "application/json");
    let version = ("anthropic-version", "2023-06-01");
    for path in ["/v1/messages", "/v1/messages/count_tokens"] {
        let b = if path.ends_with("count_tokens") {
            json!({"model": "default", "messages": user("Hi")}).to_string()
        } else {
            bytes.clone()
        };
        for bad in [
            vec![],
            vec![("x-api-key", "wrong")],
            vec![("Authorization", "Bearer wrong")],
        ] {
            let mut h = vec![ct, version];
            h.extend(bad.iter().copied());
            let r = s.req("POST", path, &h, b.as_bytes());
            assert_anthropic_error(&r, 401, "authentication_error", "API key");
        }
        for good in [("x-api-key", KEY), AUTH] {
            let r = s.req("POST", path, &[ct, version, good], b.as_bytes());
            assert_eq!(r.status, 200, "{path} with {good:?}: {}", r.text());
        }
    }
    // A browser may send the key and the version cross-origin.
    let r = s.req(
        "OPTIONS",
        "/v1/messages",
        &[
            ("Origin", ALLOWED_ORIGIN),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "x-api-key,anthropic-version,content-type",
            ),
        ],
        b"",
    );
    assert_eq!(r.status, 200, "{:?}", r.headers);
    let allowed = r
        .header("access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    for h in ["x-api-key", "anthropic-version", "content-type"] {
        assert!(
            allowed.split(',').any(|n| n.trim() == h),
            "{h} missing from {allowed:?}"
        );
    }
    // The key works on the other routes too.
    let r = s.req("GET", "/v1/models", &[("x-api-key", KEY)], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    // This server's body limit (2048 bytes): 413 in Anthropic's shape.
    let big = json!({"model": "default", "max_tokens": 2, "messages": user(&"a ".repeat(2000))});
    let r = s.req(
        "POST",
        "/v1/messages",
        &[ct, ("x-api-key", KEY)],
        big.to_string().as_bytes(),
    );
    assert_anthropic_error(&r, 413, "request_too_large", "--max-request-bytes");
    // The access log and the route's metrics see the requests.
    let r = s.req(
        "POST",
        "/v1/messages",
        &[ct, ("x-api-key", KEY)],
        bytes.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let line = format!(
        "\"POST /v1/messages\" model=default status=200 tokens_in={} tokens_out={} ",
        input_tokens(&v),
        v["usage"]["output_tokens"]
    );
    let found = eventually(Duration::from_secs(5), || {
        let log = std::fs::read_to_string(logs.join("access.log")).ok()?;
        log.lines().any(|l| l.contains(&line)).then_some(())
    });
    assert!(found.is_some(), "no access.log line with {line}");
    let metrics = s.req("GET", "/server/metrics", &[AUTH], b"").text();
    let m = metric_value(
        &metrics,
        r#"kiln_http_requests_total{route="/v1/messages",status="200"}"#,
    )
    .unwrap_or(0.0);
    assert!(m >= 3.0, "{m}");
}

#[test]
fn a_client_leaving_a_stream_cancels_its_message() {
    let s = shared();
    let _g = models_lock();
    let file = url_escape(&model_file());
    let r = register(s, &format!("url={file}&model_name=anthropic_cancel"));
    assert_eq!(r.status, 200, "{}", r.text());
    let finished = |s: &Server| model_metric(s, "kiln_requests_finished_total", "anthropic_cancel");
    let generated = |s: &Server| model_metric(s, "kiln_generated_tokens_total", "anthropic_cancel");
    let (f0, g0) = (finished(s), generated(s));
    let st = s.stream(
        "/v1/messages",
        &[("Content-Type", "application/json")],
        &json!({"model": "anthropic_cancel", "max_tokens": 1000, "stream": true, "temperature": 0,
            "messages": user("Count from 1 to 1000, separated by commas.")}),
    );
    leave_after_three_deltas(s, st, "event: content_block_delta", "anthropic_cancel", f0);
    let g1 = generated(s);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(generated(s), g1, "still generating");
    assert!(g1 - g0 < 500.0, "generated {} tokens", g1 - g0);
    let r = s.req("DELETE", "/models/anthropic_cancel", &[], b"");
    assert_eq!(r.status, 200);
}

#[test]
fn output_config_format_constrains_the_answer_to_the_schema() {
    let s = shared();
    let schema = json!({"type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "capital": {"type": "boolean"}},
        "required": ["city", "capital"], "additionalProperties": false});
    let v = ok(
        s,
        "/v1/messages",
        &json!({"model": "default", "max_tokens": 60, "temperature": 0,
            "messages": user("Describe Paris as JSON."),
            "output_config": {"format": {"type": "json_schema", "schema": schema}}}),
    );
    assert_eq!(v["stop_reason"], "end_turn", "{v}");
    let out: Value = serde_json::from_str(&text_of(&v)).unwrap_or_else(|e| panic!("{e}: {v}"));
    let obj = out.as_object().unwrap();
    assert_eq!(obj.len(), 2, "{out}");
    assert!(
        obj["city"]
            .as_str()
            .is_some_and(|c| c.chars().count() <= 12),
        "{out}"
    );
    assert!(obj["capital"].is_boolean(), "{out}");
}

/// A server whose one model, `r1`, is the default model with
/// `option.reasoning_parser=deepseek_r1`: its output counts as thinking
/// until a `</think>` (which this model never writes), so every answer is
/// thinking, and the same output reaches the chat route's
/// `reasoning_content`.
fn reasoning_server() -> &'static Server {
    static S: std::sync::OnceLock<Server> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        let root = tempdir("anthropic-r1-");
        write(
            &root.join("models/r1/serving.properties"),
            &format!(
                "option.model_id={}\noption.reasoning_parser=deepseek_r1\n",
                model_file().display()
            ),
        );
        let (s, states) = store_server(&root, 1);
        assert_eq!(states, "Healthy", "{}", s.stderr());
        s
    })
}

#[test]
fn thinking_comes_back_in_thinking_blocks_on_a_reasoning_model() {
    let s = reasoning_server();
    let body = json!({"model": "r1", "max_tokens": 10, "temperature": 0,
        "thinking": {"type": "adaptive"}, "messages": user("Why is the sky blue?")});
    let v = ok(s, "/v1/messages", &body);
    let content = v["content"].as_array().unwrap();
    assert_eq!(content.len(), 1, "{v}");
    assert_eq!(content[0]["type"], "thinking", "{v}");
    assert_eq!(content[0]["signature"], "", "{v}");
    let chat = ok(
        s,
        "/v1/chat/completions",
        &json!({"model": "r1", "max_tokens": 10, "temperature": 0,
            "messages": [{"role": "user", "content": "Why is the sky blue?"}]}),
    );
    let reasoning = chat["choices"][0]["message"]["reasoning_content"]
        .as_str()
        .unwrap();
    assert_eq!(content[0]["thinking"], reasoning, "{v} vs {chat}");
    // Streamed: a thinking block of thinking_delta events.
    let events = stream(s, &body);
    let (blocks, delta) = check_stream(&events);
    assert_eq!(blocks, content.clone());
    assert_eq!(
        events[2].1["content_block"],
        json!({"type": "thinking", "thinking": "", "signature": ""})
    );
    assert_eq!(delta["delta"]["stop_reason"], v["stop_reason"]);
    // Manual thinking checks its budget as Anthropic does, and is counted.
    let mut manual = body.clone();
    manual["thinking"] = json!({"type": "enabled", "budget_tokens": 1024});
    let r = s.post_json("/v1/messages", &manual);
    assert_anthropic_error(
        &r,
        400,
        "invalid_request_error",
        "greater than 'thinking.budget_tokens'",
    );
    let n = ok(
        s,
        "/v1/messages/count_tokens",
        &json!({"model": "r1", "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": user("Why is the sky blue?")}),
    );
    assert_eq!(n["input_tokens"].as_u64(), Some(input_tokens(&v)));
}

/// A stream that fails after it began (here: the grace period after
/// SIGTERM ends, which aborts every request still running) ends with an
/// `error` event in Anthropic's shape, and no `message_stop`.
#[test]
fn a_failure_mid_stream_is_an_error_event() {
    let s = Server::ready(Opts::args(&[
        "--kv-cache-mib",
        "256",
        "--grace-period",
        "2",
    ]));
    // A schema that cannot end before 4000 characters: the answer runs
    // until the grace period ends it.
    let mut st = s.stream(
        "/v1/messages",
        &[("Content-Type", "application/json")],
        &json!({"model": "default", "max_tokens": 3000, "stream": true,
            "messages": user("Write a very long story."),
            "output_config": {"format": {"type": "json_schema",
                "schema": {"type": "string", "minLength": 4000}}}}),
    );
    assert_eq!(st.status, 200);
    let first = st.next_until(b"\n\n").expect("message_start");
    assert!(first.starts_with("event: message_start"), "{first}");
    s.signal("TERM");
    let events = sse_events(&mut st);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let (last, data) = events.last().expect("events after SIGTERM");
    assert_eq!(last, "error", "{names:?}");
    assert!(!names.contains(&"message_stop"), "{names:?}");
    assert_eq!(data["error"]["type"], "api_error", "{data}");
    let msg = data["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("grace period"), "{data}");
    assert!(
        s.wait_exit(Duration::from_secs(15)).is_some(),
        "{}",
        s.stderr()
    );
}
