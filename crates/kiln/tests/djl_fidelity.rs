//! The shapes a DJL Serving client depends on (issue 13).
//!
//! Point 5: DJL's LMI chat-completions schema documents `model` as
//! optional, so `/v1/chat/completions` and `/v1/completions` without it are
//! answered by the only model served; with several, the 400 lists the names
//! to choose from.
//!
//! Point 3: `GET /models/{name}` answers, as DJL's management API does, a
//! list of workflow descriptions (`workflowName`, `version`, `models`), each
//! model with `modelName`, `modelUrl`, `batchSize`, `maxBatchDelay`,
//! `maxRetryTimeout`, `queueSize`, `requestInQueue`, `loadedAtStartup`,
//! `status` and `workerGroups` (`device`, `minWorkers`, `maxWorkers`,
//! `workers` with `id`, `startTime`, `status`); kiln's own fields sit
//! inside the model object.
//!
//! Points 1, 2, 4 and 6: OpenAI bodies on the LMI routes, DJL's status
//! codes there, `decoder_input_details`, and the chat-side
//! `serving.properties` keys; the DJL source each reproduces is quoted at
//! each test.

mod support;

use std::sync::OnceLock;

use serde_json::{json, Value};
use support::{model_file, store_server, tempdir, write, Opts, Server};

#[test]
fn requests_without_a_model_go_to_the_only_one_or_name_the_choices() {
    let s = Server::ready(Opts {
        args: vec![
            "--management-on-inference-port".into(),
            "--model-url-pattern".into(),
            ".*".into(),
            "--kv-cache-mib".into(),
            "64".into(),
        ],
        watchdog: true,
        ..Opts::default()
    });
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let r = s.post_json("/v1/chat/completions", &chat);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "default");
    let r = s.post_json("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "default");

    // A second model: the request must say which.
    let url: String = model_file()
        .display()
        .to_string()
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let r = s.req(
        "POST",
        &format!("/models?url={url}&model_name=second&synchronous=true&allow_duplicate=true"),
        &[],
        b"",
    );
    assert!(
        r.status == 200 || r.status == 201,
        "{} {}",
        r.status,
        r.text()
    );
    let r = s.post_json("/v1/chat/completions", &chat);
    assert_eq!(r.status, 400, "{}", r.text());
    let msg = r.text();
    assert!(msg.contains("default") && msg.contains("second"), "{msg}");
    // Naming one still works.
    let mut named = chat.clone();
    named["model"] = json!("second");
    let r = s.post_json("/v1/chat/completions", &named);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "second");

    // GET /models/{name}: DJL's workflow description.
    let d = s.get("/models/second").json();
    let w = &d[0];
    assert_eq!(w["workflowName"], "second", "{d}");
    assert!(w.get("version").is_some(), "{d}");
    let m = &w["models"][0];
    assert_eq!(m["modelName"], "second", "{d}");
    assert_eq!(m["status"], "Healthy", "{d}");
    for key in [
        "modelUrl",
        "batchSize",
        "maxBatchDelay",
        "maxRetryTimeout",
        "queueSize",
        "requestInQueue",
        "loadedAtStartup",
    ] {
        assert!(
            m.get(key).is_some_and(|v| !v.is_null()),
            "{key} missing: {d}"
        );
    }
    let g = &m["workerGroups"][0];
    assert!(
        g["device"].is_object() && g["minWorkers"].is_u64() && g["maxWorkers"].is_u64(),
        "{d}"
    );
    let worker = &g["workers"][0];
    assert_eq!(worker["status"], "READY", "{d}");
    assert!(
        worker["startTime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{d}"
    );
    // kiln's own figures, inside DJL's shape.
    assert!(m["kiln"]["kvCache"]["blocks"].is_u64(), "{d}");
    // GET /models keeps DJL's list shape.
    let l = s.get("/models").json();
    assert!(
        l["models"]
            .as_array()
            .is_some_and(|a| a.iter().any(|m| m["modelName"] == "second")),
        "{l}"
    );
}

/// A model store: `plain`, `r1` (`option.reasoning_parser=deepseek_r1`),
/// `qwen` (`qwen3`, and a tool-call parser without auto tool choice), and
/// one model per key value kiln refuses at load.
fn store() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let root = tempdir("djl-store-");
        let models = root.join("models");
        let id = format!("option.model_id={}\n", model_file().display());
        let props = [
            ("plain", String::new()),
            ("r1", "option.reasoning_parser=deepseek_r1\n".into()),
            (
                "qwen",
                "option.reasoning_parser=qwen3\noption.tool_call_parser=hermes\n\
                 option.enable_auto_tool_choice=false\noption.enable_stateful_sessions=false\n"
                    .into(),
            ),
            (
                "tools",
                "option.enable_auto_tool_choice=true\noption.tool_call_parser=hermes\n".into(),
            ),
            ("badparser", "option.tool_call_parser=hermes2\n".into()),
            ("granite", "option.reasoning_parser=granite\n".into()),
            (
                "nosessions",
                "option.enable_stateful_sessions=false\n".into(),
            ),
            (
                "static",
                "option.rolling_batch=disable\noption.enable_streaming=true\n".into(),
            ),
        ];
        for (name, extra) in &props {
            write(
                &models.join(format!("{name}/serving.properties")),
                &format!("{id}{extra}"),
            );
        }
        let (s, _) = store_server(&root, props.len());
        s
    })
}

/// The data lines of a server-sent-events body, parsed (`[DONE]` as null).
fn sse_data(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or(Value::Null))
        .collect()
}

/// The chunks of a streamed answer: the lines of a JSON-lines body (the
/// LMI routes), or the data of a server-sent-events one (`/v1`).
fn chunks(body: &str) -> Vec<Value> {
    if body.starts_with("data: ") {
        return sse_data(body);
    }
    body.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

/// Point 1. DJL's LMI handler (djl_python/lmi_vllm/vllm_async_service.py,
/// preprocess_request) reads a body with `prompt` as an OpenAI completions
/// request and one with `messages` as a chat-completions request, answered
/// in the OpenAI shapes (their chunks streamed as JSON lines, see
/// djl_shapes.rs); bodies with `tools`
/// go the chat way (where kiln, without tool calling yet, refuses them).
#[test]
fn openai_bodies_on_the_lmi_routes_get_openai_answers() {
    let s = store();
    let chat = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 6, "temperature": 0});
    let want = s.post_json("/v1/chat/completions", &{
        let mut c = chat.clone();
        c["model"] = json!("plain");
        c
    });
    assert_eq!(want.status, 200, "{}", want.text());
    let want_text = want.json()["choices"][0]["message"]["content"].clone();
    assert!(
        want_text.as_str().is_some_and(|t| !t.is_empty()),
        "{}",
        want.text()
    );
    for path in [
        "/invocations?model_name=plain",
        "/predictions/plain",
        "/models/plain/invoke",
    ] {
        let r = s.post_json(path, &chat);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let v = r.json();
        assert_eq!(v["object"], "chat.completion", "{path}: {v}");
        assert_eq!(v["model"], "plain", "{path}: {v}");
        assert_eq!(
            v["choices"][0]["message"]["content"], want_text,
            "{path}: {v}"
        );
        assert!(
            v["usage"]["prompt_tokens"].as_u64().is_some_and(|n| n > 0),
            "{v}"
        );
    }
    // The route's model answers, whatever the body's `model` says.
    let mut named = chat.clone();
    named["model"] = json!("qwen");
    let v = s.post_json("/predictions/plain", &named).json();
    assert_eq!(v["model"], "plain", "{v}");

    // Streaming: OpenAI's chunks, as JSON lines (issue 21, point 3).
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let r = s.post_json("/invocations?model_name=plain", &streamed);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/jsonlines"));
    let events = chunks(&r.text());
    let text: String = events
        .iter()
        .filter(|e| e["object"] == "chat.completion.chunk")
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(Some(text.as_str()), want_text.as_str());

    // `prompt`: a completions request.
    let r = s.post_json(
        "/predictions/plain",
        &json!({"prompt": "The capital of France is", "max_tokens": 3}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion", "{v}");
    assert!(v["choices"][0]["text"].is_string(), "{v}");

    // `tools` reach the chat path, which refuses `auto` on a model without
    // option.enable_auto_tool_choice (vLLM's rule); on the LMI route in
    // DJL's error shape and code.
    let mut tools = chat.clone();
    tools["tools"] = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    tools["tool_choice"] = json!("auto");
    let r = s.post_json("/invocations?model_name=plain", &tools);
    assert_eq!(r.status, 424, "{}", r.text());
    let v = r.json();
    assert_eq!(v["code"], 424, "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("option.enable_auto_tool_choice")),
        "{v}"
    );
}

/// Point 6, SageMaker stateful sessions (DJL's LMI handler:
/// `vllm_async_service.py` `preprocess_request` and `session_utils.py`):
/// `{"requestType": "NEW_SESSION"}` answers `{"result": "Session <id>
/// created"}` with `X-Amzn-SageMaker-Session-Id: <id>; Expires=<time>`,
/// requests may name the session, `CLOSE` closes it; an id that is not a
/// UUID, or any of it on a model with sessions off, is a 424.
#[test]
fn sagemaker_sessions_open_serve_and_close() {
    let s = store();
    let r = s.post_json(
        "/invocations?model_name=plain",
        &json!({"requestType": "NEW_SESSION"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let h = r
        .header("x-amzn-sagemaker-session-id")
        .unwrap_or_default()
        .to_string();
    let (id, expires) = h.split_once("; Expires=").unwrap_or_else(|| panic!("{h}"));
    assert_eq!(id.len(), 36, "{h}");
    assert!(expires.ends_with('Z'), "{h}");
    assert_eq!(r.json()["result"], format!("Session {id} created"));
    let ask = |model: &str, sid: &str| {
        s.req(
            "POST",
            &format!("/invocations?model_name={model}"),
            &[
                ("X-Amzn-SageMaker-Session-Id", sid),
                ("Content-Type", "application/json"),
            ],
            json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
                .to_string()
                .as_bytes(),
        )
    };
    let r = ask("plain", id);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["generated_text"].is_string());
    let r = ask("plain", "abc");
    assert_eq!(r.status, 424, "{}", r.text());
    assert!(r.text().contains("invalid session_id"), "{}", r.text());
    let r = s.req(
        "POST",
        "/invocations?model_name=plain",
        &[
            ("X-Amzn-SageMaker-Session-Id", id),
            ("Content-Type", "application/json"),
        ],
        br#"{"requestType": "CLOSE"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["result"], format!("Session {id} closed"));
    let r = s.post_json(
        "/invocations?model_name=plain",
        &json!({"requestType": "RESET"}),
    );
    assert_eq!(r.status, 424, "{}", r.text());
    // Sessions off: the header and session requests are refused, naming why.
    let r = ask("nosessions", id);
    assert_eq!(r.status, 424, "{}", r.text());
    assert!(r.text().contains("not enabled"), "{}", r.text());
    let r = s.post_json(
        "/invocations?model_name=nosessions",
        &json!({"requestType": "NEW_SESSION"}),
    );
    assert_eq!(r.status, 424, "{}", r.text());
}

/// Point 6, `option.enable_streaming` with `option.rolling_batch=disable`:
/// DJL's Hugging Face handler then streams every request through
/// `StreamingUtils`, one `{"outputs": [...]}` line per step with each
/// input's new text (`_default_stream_output_formatter`). Each input's
/// column of lines joins into the text the same input generates alone.
#[test]
fn static_batch_models_stream_outputs_lines() {
    let s = store();
    let params = json!({"max_new_tokens": 6, "do_sample": false});
    let prompts = ["The capital of France is", "Water boils at"];
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            let r = s.post_json(
                "/predictions/plain",
                &json!({"inputs": p, "parameters": params}),
            );
            assert_eq!(r.status, 200, "{}", r.text());
            r.json()["generated_text"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    // A list, with or without "stream": every request streams.
    for body in [
        json!({"inputs": prompts, "parameters": params}),
        json!({"inputs": prompts, "parameters": params, "stream": true}),
    ] {
        let mut st = s.stream("/predictions/static", &[], &body);
        assert_eq!(st.status, 200);
        assert_eq!(st.header("content-type"), Some("application/jsonlines"));
        let mut joined = vec![String::new(); prompts.len()];
        let mut lines = 0;
        while let Some(line) = st.next_json_line() {
            let outs = line["outputs"]
                .as_array()
                .unwrap_or_else(|| panic!("{line}"));
            assert_eq!(outs.len(), prompts.len(), "{line}");
            for (j, o) in joined.iter_mut().zip(outs) {
                j.push_str(o.as_str().unwrap_or_else(|| panic!("{line}")));
            }
            lines += 1;
        }
        assert_eq!(joined, alone);
        assert!((1..=6).contains(&lines), "{lines} lines");
    }
    // One string is a batch of one.
    let mut st = s.stream(
        "/invocations?model_name=static",
        &[],
        &json!({"inputs": prompts[0], "parameters": params}),
    );
    let mut text = String::new();
    while let Some(line) = st.next_json_line() {
        let outs = line["outputs"]
            .as_array()
            .unwrap_or_else(|| panic!("{line}"));
        assert_eq!(outs.len(), 1, "{line}");
        text.push_str(outs[0].as_str().unwrap_or_default());
    }
    assert_eq!(text, alone[0]);
    // A rolling-batch model still refuses a streamed list, with DJL's 424.
    let r = s.post_json(
        "/predictions/plain",
        &json!({"inputs": prompts, "parameters": params, "stream": true}),
    );
    assert_eq!(r.status, 424, "{}", r.text());
}

/// Point 2. DJL's status codes on the LMI routes (see kiln-server's
/// djl_status module for the sources): request validation, malformed JSON
/// included, is 424 `{"error", "code": 424}` (vllm_async_service.py
/// "Input parsing failed", input_parser.py + utils.py code 424); an unknown
/// model is 404 and `/invocations` without a name among several models is
/// 400 (the Java front end: ModelNotFoundException, BadRequestException
/// "Parameter model_name is required."). `/v1` keeps OpenAI's 400.
#[test]
fn lmi_routes_answer_validation_failures_with_424_and_v1_keeps_400() {
    let s = store();
    let long = "word ".repeat(9000);
    let cases = [
        json!({"inputs": "Hi", "parameters": {"top_p": 0}}),
        json!({"inputs": "Hi", "parameters": {"max_new_tokens": -1}}),
        json!({"inputs": long, "parameters": {"max_new_tokens": 1}}),
        json!({"messages": "hi"}),
        json!({"prompt": "x", "temperature": 5}),
        json!({"nothing": "useful"}),
        json!({"requestType": "OPEN_SESSION"}),
        json!({"inputs": "Hi", "stream": true, "parameters": {"details": true, "decoder_input_details": true}}),
    ];
    for body in &cases {
        for path in ["/predictions/plain", "/invocations?model_name=plain"] {
            let r = s.post_json(path, body);
            assert_eq!(r.status, 424, "{path} {body}: {}", r.text());
            let v = r.json();
            assert_eq!(v["code"], 424, "{v}");
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        }
    }
    let r = s.req(
        "POST",
        "/predictions/plain",
        &[("Content-Type", "application/json")],
        b"{\"inputs\": ",
    );
    assert_eq!(r.status, 424, "{}", r.text());
    assert!(r.text().contains("invalid JSON"), "{}", r.text());
    let r = s.post_json("/predictions/nope", &json!({"inputs": "Hi"}));
    assert_eq!(r.status, 404, "{}", r.text());
    let r = s.post_json("/invocations", &json!({"inputs": "Hi"}));
    assert_eq!(r.status, 400, "{}", r.text());
    // The same bad values on /v1: OpenAI's 400 and error shape.
    let r = s.post_json(
        "/v1/chat/completions",
        &json!({"model": "plain", "messages": "hi"}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["error"]["message"].is_string(), "{}", r.text());
    let r = s.post_json(
        "/v1/completions",
        &json!({"model": "plain", "prompt": "x", "temperature": 5}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
}

/// Point 4. `parameters.decoder_input_details` with `details` returns
/// `details.prefill`, the prompt tokens as `{"id", "text", "log_prob"}`
/// after the first, which has none (DJL's vLLM handler leaves it out:
/// lmi_vllm/request_response_utils.py convert_completion_prefill_to_tgi_prefill;
/// `option.prefill_first_token=true` writes it with a null, see
/// djl_shapes.rs; output_formatter.py get_details_dict adds "prefill" when
/// decoder_input_details is set, inside details). The values are checked against the model itself: the tokens a
/// greedy run generated, sent back as the end of a prompt, get the same
/// log-probabilities as when they were generated.
#[test]
fn decoder_input_details_returns_the_prompts_log_probabilities() {
    let s = store();
    let prompt = "The capital of France is";
    let r = s.post_json(
        "/predictions/plain",
        // Two tokens (" Paris", "."): text that tokenizes back to the same ids
        // (the newlines that follow would merge into one token).
        &json!({"inputs": prompt, "parameters": {"max_new_tokens": 2, "details": true}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let gen = r.json();
    assert!(gen["details"].get("prefill").is_none(), "not asked: {gen}");
    let tokens = gen["details"]["tokens"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(tokens.len(), 2, "{gen}");
    let text = gen["generated_text"].as_str().unwrap_or_default();

    let full = format!("{prompt}{text}");
    let r = s.post_json(
        "/predictions/plain",
        &json!({"inputs": full, "parameters": {"max_new_tokens": 1, "details": true,
            "decoder_input_details": true}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let prefill = v["details"]["prefill"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(prefill.len() > tokens.len(), "{v}");
    let joined: String = prefill.iter().filter_map(|t| t["text"].as_str()).collect();
    // The prompt's tokens after the first.
    assert!(
        full.ends_with(&joined) && joined.len() + 8 > full.len(),
        "{joined:?} vs {full:?}"
    );
    for t in &prefill {
        assert!(t["log_prob"].as_f64().is_some_and(|l| l <= 0.0), "{t}");
        assert!(t["id"].is_u64(), "{t}");
    }
    let tail = &prefill[prefill.len() - tokens.len()..];
    for (p, g) in tail.iter().zip(&tokens) {
        assert_eq!(
            p["id"], g["id"],
            "the generated text tokenizes back to the same ids"
        );
        assert_eq!(p["log_prob"], g["log_prob"], "prefill {p} vs generated {g}");
    }
    // Without `details`, no details at all (DJL only adds prefill inside them).
    let r = s.post_json(
        "/predictions/plain",
        &json!({"inputs": prompt, "parameters": {"max_new_tokens": 1, "decoder_input_details": true}}),
    );
    assert!(r.json().get("details").is_none(), "{}", r.text());
}

/// Point 6. The chat-side keys of DJL's vLLM handler
/// (properties_manager/vllm_rb_properties.py: tool_call_parser,
/// enable_auto_tool_choice, reasoning_parser; vllm_async_service.py:
/// enable_stateful_sessions): the ones kiln does not implement are refused
/// at load, naming the key; tool_call_parser names are vLLM's; the
/// reasoning parsers split `<think>` output into `reasoning_content`.
#[test]
fn chat_keys_are_validated_at_load_and_reasoning_is_split() {
    let s = store();
    // enable_auto_tool_choice=true is taken, and lets `tool_choice: "auto"`
    // through (vLLM's --enable-auto-tool-choice); without it, "auto" is
    // refused naming the key, on /v1 (400) and on the LMI routes (424).
    let tools = json!({"messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": "auto", "max_tokens": 8, "temperature": 0});
    let mut auto = tools.clone();
    auto["model"] = json!("tools");
    let r = s.post_json("/v1/chat/completions", &auto);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["object"], "chat.completion");
    auto["model"] = json!("plain");
    let r = s.post_json("/v1/chat/completions", &auto);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("option.enable_auto_tool_choice"),
        "{}",
        r.text()
    );
    let r = s.post_json("/predictions/plain", &tools);
    assert_eq!(r.status, 424, "{}", r.text());
    assert!(
        r.text().contains("option.enable_auto_tool_choice"),
        "{}",
        r.text()
    );
    let failed = [("badparser", "hermes2"), ("granite", "does not implement")];
    for (name, needle) in failed {
        let d = s.get(&format!("/models/{name}")).json();
        let m = &d[0]["models"][0];
        assert_eq!(m["status"], "Failed", "{name}: {d}");
        let msg = m["error"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{name}: {needle:?} not in {msg}");
    }
    let chat = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 6, "temperature": 0});
    let ask = |model: &str, stream: bool| {
        let mut c = chat.clone();
        c["model"] = json!(model);
        c["stream"] = json!(stream);
        let r = s.post_json("/v1/chat/completions", &c);
        assert_eq!(r.status, 200, "{model}: {}", r.text());
        r
    };
    let plain = ask("plain", false).json();
    let answer = plain["choices"][0]["message"]["content"].clone();
    assert!(plain["choices"][0]["message"]
        .get("reasoning_content")
        .is_none());
    // qwen3: no <think> block in this model's answer, so all of it is content.
    let q = ask("qwen", false).json();
    assert_eq!(q["choices"][0]["message"]["content"], answer, "{q}");
    assert!(
        q["choices"][0]["message"]["reasoning_content"].is_null(),
        "{q}"
    );
    // deepseek_r1: thinking opens in the prompt, so output that never closes
    // it is all reasoning.
    let r1 = ask("r1", false).json();
    assert_eq!(
        r1["choices"][0]["message"]["reasoning_content"], answer,
        "{r1}"
    );
    assert_eq!(r1["choices"][0]["message"]["content"], "", "{r1}");
    // Streamed, as delta.reasoning_content, also on the LMI route.
    for r in [ask("r1", true), {
        let mut c = chat.clone();
        c["stream"] = json!(true);
        s.post_json("/invocations?model_name=r1", &c)
    }] {
        let events = chunks(&r.text());
        let reasoning: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["reasoning_content"].as_str())
            .collect();
        let content: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(Some(reasoning.as_str()), answer.as_str(), "{}", r.text());
        assert_eq!(content, "", "{}", r.text());
    }
}
