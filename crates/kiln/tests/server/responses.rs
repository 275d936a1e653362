//! The OpenAI Responses API (`/v1/responses`): string and list input with
//! instructions answered as the chat route answers the same messages,
//! `previous_response_id` chains, `store: false`, unknown ids, the bounded
//! store, the streamed event sequence, forced tool calls and the round trip
//! with `function_call_output`, `text.format` json_schema, and the fields
//! it refuses; keys and body limits as on every route.

use super::*;

/// The text of a response's message items.
fn output_text(v: &Value) -> String {
    v["output"]
        .as_array()
        .unwrap_or_else(|| panic!("no output: {v}"))
        .iter()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["text"].as_str().map(str::to_string))
        .collect()
}

/// Posts to `/v1/responses`, naming the default model unless the body names
/// one (other tests register models on the shared server).
fn post(s: &Server, body: &Value) -> Response {
    let mut body = body.clone();
    if body.get("model").is_none() {
        body["model"] = json!("default");
    }
    s.post_json("/v1/responses", &body)
}

fn create(s: &Server, body: &Value) -> Value {
    let r = post(s, body);
    assert_eq!(r.status, 200, "{body}: {}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "response", "{v}");
    assert!(
        v["id"].as_str().is_some_and(|i| i.starts_with("resp_")),
        "{v}"
    );
    v
}

/// The greedy chat answer to `messages`.
fn chat(s: &Server, messages: Value, max_tokens: u64) -> (String, u64) {
    let r = s.post_json(
        "/v1/chat/completions",
        &json!({"model": "default", "messages": messages, "max_tokens": max_tokens,
            "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
    )
}

#[test]
fn responses_answer_string_and_list_input_as_chat_does() {
    let s = shared();
    let q = "What is the capital of France?";
    let v = create(
        s,
        &json!({"model": "default", "input": q, "max_output_tokens": 16, "temperature": 0,
            "metadata": {"k": "v"}, "user": "u1"}),
    );
    let (want, prompt) = chat(s, json!([{"role": "user", "content": q}]), 16);
    assert_eq!(output_text(&v), want, "{v}");
    assert!(want.contains("Paris"), "{want}");
    let u = &v["usage"];
    assert_eq!(u["input_tokens"].as_u64(), Some(prompt), "{u}");
    let out = u["output_tokens"].as_u64().unwrap();
    assert_eq!(u["total_tokens"].as_u64(), Some(prompt + out));
    assert!(u["input_tokens_details"]["cached_tokens"].as_u64().unwrap() <= prompt);
    assert_eq!(v["status"], "completed");
    assert_eq!(v["metadata"], json!({"k": "v"}));
    assert_eq!(v["user"], "u1");
    assert_eq!(v["max_output_tokens"], 16);
    let item = &v["output"][0];
    assert_eq!(
        (item["type"].as_str(), item["role"].as_str()),
        (Some("message"), Some("assistant"))
    );
    assert!(item["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(item["content"][0]["type"], "output_text");

    // A list of items with instructions: the same as chat with the system turns.
    let v = create(
        s,
        &json!({"input": [
            {"role": "developer", "content": "Answer in one word."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": q}]}],
            "instructions": "You are a geography teacher.",
            "max_output_tokens": 12, "temperature": 0}),
    );
    let (want, prompt) = chat(
        s,
        json!([{"role": "system", "content": "You are a geography teacher."},
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": q}]),
        12,
    );
    assert_eq!(output_text(&v), want, "{v}");
    assert_eq!(v["usage"]["input_tokens"].as_u64(), Some(prompt));
    assert_eq!(v["instructions"], "You are a geography teacher.");

    // Cut short: incomplete, with the reason.
    let v = create(
        s,
        &json!({"input": q, "max_output_tokens": 2, "temperature": 0}),
    );
    assert_eq!(v["status"], "incomplete", "{v}");
    assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(v["usage"]["output_tokens"], 2);
}

#[test]
fn responses_chain_with_previous_response_id_get_delete_and_store_false() {
    let s = shared();
    let q1 = "What is the capital of France?";
    let a = create(
        s,
        &json!({"input": q1, "max_output_tokens": 16, "temperature": 0}),
    );
    let a_text = output_text(&a);
    let q2 = "And of Germany?";
    let b = create(
        s,
        &json!({"input": q2, "previous_response_id": a["id"], "max_output_tokens": 16,
            "temperature": 0}),
    );
    assert_eq!(b["previous_response_id"], a["id"]);
    // The second turn sees the first: the same as chat with the whole conversation.
    let (want, prompt) = chat(
        s,
        json!([{"role": "user", "content": q1}, {"role": "assistant", "content": a_text},
            {"role": "user", "content": q2}]),
        16,
    );
    assert_eq!(output_text(&b), want, "{b}");
    assert_eq!(b["usage"]["input_tokens"].as_u64(), Some(prompt));

    // GET answers the stored object; input_items the request's own input.
    let id = b["id"].as_str().unwrap();
    let r = s.get(&format!("/v1/responses/{id}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), b);
    let r = s.get(&format!("/v1/responses/{id}/input_items"));
    assert_eq!(r.status, 200, "{}", r.text());
    let items = r.json();
    assert_eq!(items["object"], "list");
    assert_eq!(items["data"].as_array().unwrap().len(), 1, "{items}");
    assert_eq!(items["data"][0]["content"][0]["text"], q2);
    let r = s.get(&format!("/v1/responses/{id}/input_items?limit=0"));
    assert_openai_error(&r, 400, "limit");
    let r = s.get(&format!("/v1/responses/{id}?stream=true"));
    assert_openai_error(&r, 400, "query parameters are not supported");

    // DELETE, then it is gone everywhere.
    let r = s.req("DELETE", &format!("/v1/responses/{id}"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["deleted"], true);
    assert_openai_error(&s.get(&format!("/v1/responses/{id}")), 404, "not found");
    assert_openai_error(
        &s.get(&format!("/v1/responses/{id}/input_items")),
        404,
        "not found",
    );
    assert_openai_error(
        &s.req("DELETE", &format!("/v1/responses/{id}"), &[], b""),
        404,
        "not found",
    );
    let r = post(
        s,
        &json!({"input": "x", "previous_response_id": id, "max_output_tokens": 2}),
    );
    assert_openai_error(&r, 404, id);

    // store: false is answered but not kept.
    let c = create(
        s,
        &json!({"input": q1, "store": false, "max_output_tokens": 4, "temperature": 0}),
    );
    assert_eq!(c["store"], false);
    let cid = c["id"].as_str().unwrap();
    assert_openai_error(&s.get(&format!("/v1/responses/{cid}")), 404, "store: false");
    let r = post(s, &json!({"input": "x", "previous_response_id": cid}));
    assert_openai_error(&r, 404, "store: false");
    let r = post(
        s,
        &json!({"input": "x", "previous_response_id": "resp_unknown"}),
    );
    assert_openai_error(&r, 404, "resp_unknown");
}

/// Reads a streamed response's events (`event:` name and `data:` JSON).
fn events(s: &Server, body: &Value) -> Vec<Value> {
    // Named, as `post` does: another test may register a second model
    // on the shared server meanwhile.
    let mut body = body.clone();
    if body.get("model").is_none() {
        body["model"] = json!("default");
    }
    let mut st = s.stream(
        "/v1/responses",
        &[("Content-Type", "application/json")],
        &body,
    );
    if st.status != 200 {
        let status = st.status;
        panic!("streamed /v1/responses answered {status}: {}", st.rest());
    }
    assert_eq!(st.header("content-type"), Some("text/event-stream"));
    let mut out = Vec::new();
    while let Some(piece) = st.next_until(b"\n\n") {
        if piece.trim().is_empty() {
            continue;
        }
        let name = piece
            .lines()
            .find_map(|l| l.strip_prefix("event: "))
            .unwrap_or_else(|| panic!("no event name: {piece:?}"))
            .to_string();
        let data = piece
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap_or_else(|| panic!("no data: {piece:?}"));
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["type"], name.as_str(), "{piece}");
        out.push(v);
    }
    let seqs: Vec<u64> = out
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..out.len() as u64).collect::<Vec<_>>());
    out
}

fn types(ev: &[Value]) -> Vec<&str> {
    ev.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

#[test]
fn responses_stream_the_api_event_sequence() {
    let s = shared();
    let body = json!({"input": "What is the capital of France?", "max_output_tokens": 16,
        "temperature": 0});
    let whole = create(s, &body);
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let ev = events(s, &sb);
    let t = types(&ev);
    let deltas = t
        .iter()
        .filter(|x| **x == "response.output_text.delta")
        .count();
    assert!(deltas >= 2, "{t:?}");
    let mut want = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    want.extend(std::iter::repeat_n("response.output_text.delta", deltas));
    want.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(t, want);
    assert_eq!(ev[0]["response"]["status"], "in_progress");
    let streamed: String = ev.iter().filter_map(|e| e["delta"].as_str()).collect();
    assert_eq!(streamed, output_text(&whole));
    let done = &ev.last().unwrap()["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(output_text(done), streamed);
    assert_eq!(
        done["usage"]["output_tokens"],
        whole["usage"]["output_tokens"]
    );
    // The streamed response is stored too.
    let r = s.get(&format!("/v1/responses/{}", done["id"].as_str().unwrap()));
    assert_eq!(r.status, 200);

    sb["max_output_tokens"] = json!(2);
    let ev = events(s, &sb);
    let last = ev.last().unwrap();
    assert_eq!(last["type"], "response.incomplete", "{last}");
    assert_eq!(
        last["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );
}

fn weather_tool() -> Value {
    json!([{"type": "function", "name": "get_weather", "description": "Current weather in a city.",
        "strict": true,
        "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"], "additionalProperties": false}}])
}

fn check_weather_call(item: &Value) -> String {
    assert_eq!(item["type"], "function_call", "{item}");
    assert_eq!(item["name"], "get_weather");
    assert!(item["id"].as_str().unwrap().starts_with("fc_"), "{item}");
    let call_id = item["call_id"].as_str().unwrap();
    assert!(call_id.starts_with("call_"), "{item}");
    let args: Value = serde_json::from_str(item["arguments"].as_str().unwrap()).unwrap();
    assert!(
        args["city"].as_str().is_some_and(|c| c.len() <= 20),
        "{args}"
    );
    assert!((1..=7).contains(&args["days"].as_i64().unwrap()), "{args}");
    call_id.to_string()
}

#[test]
fn responses_forced_tool_call_and_round_trip() {
    let s = shared();
    let body = json!({"input": "What's the weather in Paris for the next 3 days?",
        "tools": weather_tool(), "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": false, "max_output_tokens": 80, "temperature": 0});
    let v = create(s, &body);
    let calls: Vec<&Value> = v["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "function_call")
        .collect();
    assert_eq!(calls.len(), 1, "{v}");
    assert_eq!(output_text(&v), "", "no markup in the message: {v}");
    assert_eq!(v["parallel_tool_calls"], false);
    assert_eq!(v["status"], "completed");
    let call_id = check_weather_call(calls[0]);
    assert_eq!(
        v["tool_choice"],
        json!({"type": "function", "name": "get_weather"})
    );
    assert_eq!(v["tools"], weather_tool());

    // The round trip: the call's output continues the stored conversation.
    let r = create(
        s,
        &json!({"previous_response_id": v["id"], "tools": weather_tool(), "tool_choice": "none",
            "input": [{"type": "function_call_output", "call_id": call_id,
                "output": "{\"forecast\": \"sunny, 24 C\"}"}],
            "max_output_tokens": 24, "temperature": 0}),
    );
    assert!(!output_text(&r).is_empty(), "{r}");
    assert_eq!(r["previous_response_id"], v["id"]);
    // The same turn, sent whole without the store, is the same prompt.
    let whole = create(
        s,
        &json!({"tools": weather_tool(), "tool_choice": "none", "store": false,
            "input": [{"role": "user", "content": "What's the weather in Paris for the next 3 days?"},
                calls[0],
                {"type": "function_call_output", "call_id": call_id,
                    "output": "{\"forecast\": \"sunny, 24 C\"}"}],
            "max_output_tokens": 24, "temperature": 0}),
    );
    assert_eq!(r["usage"]["input_tokens"], whole["usage"]["input_tokens"]);
    assert_eq!(output_text(&r), output_text(&whole));

    // Streamed: the call's events, and no markup in any text delta.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["tool_choice"] = json!("required");
    let ev = events(s, &sb);
    let t = types(&ev);
    assert!(
        t.contains(&"response.function_call_arguments.delta"),
        "{t:?}"
    );
    assert!(!t.contains(&"response.output_text.delta"), "{t:?}");
    let done = ev
        .iter()
        .find(|e| e["type"] == "response.function_call_arguments.done")
        .unwrap();
    let deltas: String = ev
        .iter()
        .filter(|e| e["type"] == "response.function_call_arguments.delta")
        .filter_map(|e| e["delta"].as_str())
        .collect();
    assert_eq!(deltas, done["arguments"].as_str().unwrap());
    let last = &ev.last().unwrap()["response"];
    assert_eq!(last["status"], "completed");
    check_weather_call(&last["output"][0]);

    // auto needs the model's setting, as on the chat route.
    let mut auto = body.clone();
    auto["tool_choice"] = json!("auto");
    assert_openai_error(&post(s, &auto), 400, "enable_auto_tool_choice");
}

#[test]
fn responses_text_format_json_schema_is_followed() {
    let s = shared();
    let schema = json!({"type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24},
            "population": {"type": "integer", "minimum": 0}},
        "required": ["city", "population"], "additionalProperties": false});
    let v = create(
        s,
        &json!({"input": "Give the largest city of France and its population as JSON.",
            "text": {"format": {"type": "json_schema", "name": "city", "schema": schema,
                "strict": true}},
            "max_output_tokens": 60, "temperature": 0}),
    );
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["text"]["format"]["type"], "json_schema");
    let out: Value = serde_json::from_str(&output_text(&v))
        .unwrap_or_else(|e| panic!("{e}: {}", output_text(&v)));
    let obj = out.as_object().unwrap();
    assert_eq!(obj.len(), 2, "{out}");
    assert!(obj["city"].as_str().is_some_and(|c| c.len() <= 24), "{out}");
    assert!(obj["population"].as_u64().is_some(), "{out}");
}

#[test]
fn responses_refuse_what_they_do_not_take() {
    let s = shared();
    for (body, needle) in [
        (json!({"input": "x", "top_k": 5}), "'top_k'"),
        (json!({"input": "x", "background": true}), "'background'"),
        (
            json!({"input": "x", "include": ["reasoning.encrypted_content"]}),
            "'include'",
        ),
        (
            json!({"input": "x", "text": {"verbosity": "low"}}),
            "text.verbosity",
        ),
        (
            json!({"input": "x", "reasoning": {"summary": "auto"}}),
            "reasoning.summary",
        ),
        (
            json!({"input": "x", "reasoning": {"effort": "high"}}),
            "reasoning.effort",
        ),
        (
            json!({"input": "x", "tools": [{"type": "web_search"}]}),
            "function tools",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image",
                "image_url": "https://example.com/a.png"}]}]}),
            "input_image",
        ),
        (
            json!({"input": [{"type": "item_reference", "id": "x"}]}),
            "item_reference",
        ),
        (json!({"input": "x", "temperature": 2.5}), "temperature"),
        (
            json!({"input": "x", "max_output_tokens": 0}),
            "max_output_tokens",
        ),
        (json!({"model": "nope", "input": "x"}), "nope"),
        (json!({"input": 5}), "'input'"),
    ] {
        let r = post(s, &body);
        let status = if needle == "nope" { 404 } else { 400 };
        assert_openai_error(&r, status, needle);
        assert_eq!(
            r.json()["error"]["type"],
            "invalid_request_error",
            "{body}: {}",
            r.text()
        );
    }
    let r = s.req(
        "POST",
        "/v1/responses",
        &[("Content-Type", "application/json")],
        b"{not json",
    );
    assert_eq!(r.status, 400, "{}", r.text());
}

#[test]
fn responses_inherit_keys_body_limits_and_the_access_log() {
    let (s, logs) = guarded();
    let body = json!({"input": "hi", "max_output_tokens": 2});
    let r = post(s, &body);
    assert_openai_error(&r, 401, "api key");
    let r = s.req(
        "POST",
        "/v1/responses",
        &[AUTH, ("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let usage = &v["usage"];
    // The access log has the request with its model and tokens.
    let line = eventually(Duration::from_secs(5), || {
        let log = std::fs::read_to_string(logs.join("access.log")).ok()?;
        log.lines()
            .rfind(|l| l.contains("\"POST /v1/responses\"") && l.contains("status=200"))
            .map(str::to_string)
    })
    .expect("no access.log line for POST /v1/responses");
    assert!(line.contains("model=default"), "{line}");
    assert!(
        line.contains(&format!("tokens_in={} ", usage["input_tokens"])),
        "{line} {usage}"
    );
    assert!(
        line.contains(&format!("tokens_out={} ", usage["output_tokens"])),
        "{line} {usage}"
    );
    let big = json!({"input": "x".repeat(4096)});
    let r = s.req(
        "POST",
        "/v1/responses",
        &[AUTH, ("Content-Type", "application/json")],
        big.to_string().as_bytes(),
    );
    assert_eq!(r.status, 413, "{}", r.text());
    let r = s.req("GET", "/v1/responses/resp_x", &[], b"");
    assert_eq!(r.status, 401);
}

#[test]
fn responses_store_is_bounded_in_count_and_age() {
    let s = Server::ready(Opts {
        args: vec!["--kv-cache-mib".into(), "32".into()],
        env: vec![
            ("KILN_RESPONSES_MAX_STORED".into(), "2".into()),
            ("KILN_RESPONSES_TTL_SECS".into(), "3".into()),
        ],
        ..Opts::default()
    });
    let ids: Vec<String> = (0..3)
        .map(|i| {
            create(
                &s,
                &json!({"input": format!("Say {i}"), "max_output_tokens": 1}),
            )["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    // The oldest is evicted beyond the count.
    assert_openai_error(&s.get(&format!("/v1/responses/{}", ids[0])), 404, "evicted");
    assert_eq!(s.get(&format!("/v1/responses/{}", ids[1])).status, 200);
    assert_eq!(s.get(&format!("/v1/responses/{}", ids[2])).status, 200);
    // And every one expires.
    std::thread::sleep(Duration::from_millis(3200));
    for id in &ids[1..] {
        assert_openai_error(&s.get(&format!("/v1/responses/{id}")), 404, "kept 3 s");
        let r = post(
            &s,
            &json!({"input": "x", "previous_response_id": id, "max_output_tokens": 1}),
        );
        assert_openai_error(&r, 404, id);
    }
}

#[test]
fn responses_client_disconnect_cancels_the_generation() {
    let s = shared();
    let _g = models_lock();
    let file = url_escape(&model_file());
    let r = register(s, &format!("url={file}&model_name=responses_cancel"));
    assert_eq!(r.status, 200, "{}", r.text());
    let f0 = model_metric(s, "kiln_requests_finished_total", "responses_cancel");
    let body = json!({"model": "responses_cancel", "stream": true, "max_output_tokens": 1000,
        "temperature": 0, "input": "Tell me everything about the history of Rome, century by century."});
    let st = s.stream(
        "/v1/responses",
        &[("Content-Type", "application/json")],
        &body,
    );
    leave_after_three_deltas(
        s,
        st,
        "event: response.output_text.delta",
        "responses_cancel",
        f0,
    );
    // The request counters and the access log saw the route.
    let metrics = s.get("/metrics").text();
    assert!(
        metrics.contains("/v1/responses"),
        "no /v1/responses in the metrics"
    );
    let r = s.req("DELETE", "/models/responses_cancel", &[], b"");
    assert_eq!(r.status, 200);
}

#[test]
fn responses_truncation_auto_drops_the_oldest_turns() {
    let s = shared();
    let long = "history ".repeat(12000);
    let q = "What is the capital of France?";
    let body = json!({"input": [{"role": "user", "content": long},
        {"role": "assistant", "content": "Noted."}, {"role": "user", "content": q}],
        "max_output_tokens": 16, "temperature": 0});
    // Too long for the model: refused as it stands.
    let r = post(s, &body);
    assert!(r.status >= 400, "{}", r.text());
    assert!(r.json()["error"]["message"].is_string(), "{}", r.text());
    // truncation auto: the oldest turn goes, the rest is answered as it stands.
    let mut auto = body.clone();
    auto["truncation"] = json!("auto");
    let v = create(s, &auto);
    assert_eq!(v["truncation"], "auto");
    let (want, prompt) = chat(
        s,
        json!([{"role": "assistant", "content": "Noted."}, {"role": "user", "content": q}]),
        16,
    );
    assert_eq!(output_text(&v), want, "{v}");
    assert_eq!(v["usage"]["input_tokens"].as_u64(), Some(prompt));
}

/// A model store with `r1` (`option.reasoning_parser=deepseek_r1`: the whole
/// output of this model, which never closes a thought, is reasoning) and
/// `tools` (auto tool choice enabled).
#[test]
fn responses_reasoning_items_and_auto_tools_follow_the_model_settings() {
    let root = tempdir("responses-store-");
    let models = root.join("models");
    let id = format!("option.model_id={}\n", model_file().display());
    for (name, extra) in [
        ("r1", "option.reasoning_parser=deepseek_r1\n"),
        (
            "tools",
            "option.enable_auto_tool_choice=true\noption.tool_call_parser=hermes\n",
        ),
    ] {
        write(
            &models.join(format!("{name}/serving.properties")),
            &format!("{id}{extra}"),
        );
    }
    let (s, states) = store_server(&root, 2);
    assert_eq!(states, "Healthy,Healthy", "{}", s.stderr());
    let body = json!({"model": "r1", "input": "Why is the sky blue?", "max_output_tokens": 12,
        "temperature": 0});
    let v = create(&s, &body);
    let item = &v["output"][0];
    assert_eq!(item["type"], "reasoning", "{v}");
    assert!(item["id"].as_str().unwrap().starts_with("rs_"), "{item}");
    assert_eq!(item["summary"], json!([]));
    assert_eq!(item["content"][0]["type"], "reasoning_text");
    let thought = item["content"][0]["text"].as_str().unwrap().to_string();
    assert!(!thought.is_empty(), "{v}");
    assert_eq!(output_text(&v), "", "nothing after the thought: {v}");
    let u = &v["usage"];
    let reasoning = u["output_tokens_details"]["reasoning_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        reasoning >= 1 && reasoning <= u["output_tokens"].as_u64().unwrap(),
        "{u}"
    );

    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let mut st = s.stream(
        "/v1/responses",
        &[("Content-Type", "application/json")],
        &sb,
    );
    assert_eq!(st.status, 200);
    let mut streamed = String::new();
    let mut last = Value::Null;
    while let Some(piece) = st.next_until(b"\n\n") {
        let Some(data) = piece.lines().find_map(|l| l.strip_prefix("data: ")) else {
            continue;
        };
        let e: Value = serde_json::from_str(data).unwrap();
        if e["type"] == "response.reasoning_text.delta" {
            streamed.push_str(e["delta"].as_str().unwrap());
        }
        last = e;
    }
    assert_eq!(streamed, thought);
    assert_eq!(
        last["response"]["output"][0]["content"][0]["text"],
        thought.as_str()
    );

    // auto tool choice, where the model enables it: taken, any call parsed.
    let v = create(
        &s,
        &json!({"model": "tools", "input": "What's the weather in Paris for the next 3 days?",
            "tools": weather_tool(), "max_output_tokens": 60, "temperature": 0}),
    );
    assert_eq!(v["tool_choice"], "auto");
    for item in v["output"].as_array().unwrap() {
        if item["type"] == "function_call" {
            serde_json::from_str::<Value>(item["arguments"].as_str().unwrap()).unwrap();
        } else {
            assert_eq!(item["type"], "message", "{item}");
            assert!(
                !item["content"][0]["text"]
                    .as_str()
                    .unwrap()
                    .contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\""),
                "{item}"
            );
        }
    }
}
