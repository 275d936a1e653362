//! Issue 21: what DJL Serving's own LMI client, and a hostile one, still
//! caught. Each test drives the real `kiln serve`; the DJL shapes are
//! checked field by field against DJL's source (deepjavalibrary/djl-serving,
//! read 2026-12), cited at each test.

mod support;

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};
use support::{eventually, model_file, store_server, tempdir, write, Opts, Server};

/// A model store: `plain`; `nostream` (`option.rolling_batch=disable`);
/// `prefill1` (`option.prefill_first_token=true`); `fewsessions`
/// (`option.max_sessions_per_client=3`); `builder` (the keys DJL's own
/// configuration builder writes); and the models kiln refuses at load.
fn store() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let root = tempdir("djl-shapes-");
        let models = root.join("models");
        let id = format!("option.model_id={}\n", model_file().display());
        let props = [
            ("plain", String::new()),
            ("nostream", "option.rolling_batch=disable\n".into()),
            ("prefill1", "option.prefill_first_token=true\n".into()),
            ("fewsessions", "option.max_sessions_per_client=3\n".into()),
            (
                "builder",
                "option.enable_reasoning=true\noption.reasoning_parser=deepseek_r1\n\
                 option.sessions_path=/tmp/djl_sessions\n"
                    .into(),
            ),
            ("noparser", "option.enable_reasoning=true\n".into()),
            (
                "speculative",
                "option.speculative_config={\"model\": \"meta-llama/Llama3.2-1B-Instruct\", \
                 \"num_speculative_tokens\": 5}\n"
                    .into(),
            ),
            ("hugequeue", "job_queue_size=18446744073709551615\n".into()),
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

/// A model's description from `GET /models/{name}` (DJL's list of one).
fn describe(s: &Server, name: &str) -> Value {
    s.get(&format!("/models/{name}")).json()[0]["models"][0].clone()
}

/// Point 1. With rolling batch off, DJL's input parser reads only `inputs`
/// and `parameters` (djl_python/input_parser.py, parse_text_inputs_params:
/// `inputs = input_map.pop("inputs", input_map)`, `param =
/// input_map.pop("parameters", {})`); `stream` is read only by
/// parse_lmi_default_request_rolling_batch ("Per request streaming is only
/// supported by rolling batch"). So `"stream": true` there is ignored and
/// the batch is answered as JSON, a list for a list.
#[test]
fn stream_is_ignored_when_rolling_batch_is_off() {
    let s = store();
    let params = json!({"max_new_tokens": 4});
    let plain = s.post_json(
        "/invocations?model_name=nostream",
        &json!({"inputs": ["Hello", "Hi"], "parameters": params}),
    );
    assert_eq!(plain.status, 200, "{}", plain.text());
    let r = s.post_json(
        "/invocations?model_name=nostream",
        &json!({"inputs": ["Hello", "Hi"], "parameters": params, "stream": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    let outs = v.as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(outs.len(), 2, "{v}");
    for o in outs {
        let keys: Vec<&String> = o
            .as_object()
            .unwrap_or_else(|| panic!("{o}"))
            .keys()
            .collect();
        assert_eq!(keys, ["generated_text"], "{o}");
        assert!(o["generated_text"].is_string(), "{o}");
    }
    assert_eq!(v, plain.json(), "greedy: the same answer as without stream");
    // One string: one JSON object, not a stream.
    let r = s.post_json(
        "/predictions/nostream",
        &json!({"inputs": "Hello", "parameters": params, "stream": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["generated_text"], outs[0]["generated_text"]);
    // A rolling-batch model still streams one input and refuses a list.
    let r = s.post_json(
        "/predictions/plain",
        &json!({"inputs": ["Hello", "Hi"], "parameters": params, "stream": true}),
    );
    assert_eq!(r.status, 424, "{}", r.text());
    let mut st = s.stream(
        "/predictions/plain",
        &[],
        &json!({"inputs": "Hello", "parameters": params, "stream": true}),
    );
    assert_eq!(st.header("content-type"), Some("application/jsonlines"));
    assert!(st.next_json_line().is_some_and(|l| l["token"].is_object()));
}

fn session_request(s: &Server, model: &str, sid: Option<&str>, kind: &str) -> support::Response {
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(id) = sid {
        headers.push(("X-Amzn-SageMaker-Session-Id", id));
    }
    s.req(
        "POST",
        &format!("/invocations?model_name={model}"),
        &headers,
        json!({"requestType": kind}).to_string().as_bytes(),
    )
}

/// The new session's id, from `X-Amzn-SageMaker-Session-Id: <id>; Expires=...`.
fn new_session(s: &Server, model: &str) -> Result<String, support::Response> {
    let r = session_request(s, model, None, "NEW_SESSION");
    if r.status != 200 {
        return Err(r);
    }
    let h = r.header("x-amzn-sagemaker-session-id").unwrap_or_default();
    Ok(h.split(';').next().unwrap_or_default().to_string())
}

/// Points 2 and 14. DJL's `close_session` (djl_python/session_utils.py)
/// answers `{"result": "Session <id> closed"}` with the header
/// `X-Amzn-SageMaker-Closed-Session-Id: <id>`
/// (HEADER_SAGEMAKER_CLOSED_SESSION_ID), and, when
/// `SessionManager.close_session` (djl_python/session_manager.py) raises
/// `session not found: <id>` for an id it does not hold, `{"error":
/// "Failed to close session: ...", "code": 424}`.
#[test]
fn closing_a_session_names_it_and_closing_an_unknown_one_is_refused() {
    let s = store();
    let id = new_session(s, "plain").unwrap_or_else(|r| panic!("{}", r.text()));
    let r = session_request(s, "plain", Some(&id), "CLOSE");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"result": format!("Session {id} closed")}));
    assert_eq!(
        r.header("x-amzn-sagemaker-closed-session-id"),
        Some(id.as_str())
    );
    // Closed already, and never opened: refused, naming the id.
    for sid in [id.as_str(), "0b7e4f0a-1c2d-4e5f-8a9b-0c1d2e3f4a5b"] {
        let r = session_request(s, "plain", Some(sid), "CLOSE");
        assert_eq!(r.status, 424, "{}", r.text());
        let v = r.json();
        assert_eq!(v["code"], 424, "{v}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(
            msg.starts_with(&format!(
                "Failed to close session: session not found: {sid}"
            )),
            "{msg}"
        );
        assert!(r.header("x-amzn-sagemaker-closed-session-id").is_none());
    }
}

/// Point 11, the attack: one client creating sessions as fast as it can.
/// DJL's `SessionManager.create_session` (djl_python/session_manager.py)
/// has no bound at all (a directory per session until expiry); kiln's
/// table has one (100 000), which a single client filled in 40 s and then
/// held for the 20 minutes of `sessions_expiration`. Now one address gets
/// `option.max_sessions_per_client` (here 3) and a 429 past it; closing one
/// gives its place back, and another model's table is untouched.
#[test]
fn one_client_cannot_fill_the_session_table() {
    let s = store();
    let mut ids = Vec::new();
    let refused = loop {
        match new_session(s, "fewsessions") {
            Ok(id) => ids.push(id),
            Err(r) => break r,
        }
        assert!(ids.len() <= 3, "more than 3 sessions for one client");
    };
    assert_eq!(ids.len(), 3);
    assert_eq!(refused.status, 429, "{}", refused.text());
    let v = refused.json();
    let msg = v["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("127.0.0.1") && msg.contains("option.max_sessions_per_client=3"),
        "{msg}"
    );
    assert!(new_session(s, "plain").is_ok());
    let r = session_request(s, "fewsessions", Some(&ids[0]), "CLOSE");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(new_session(s, "fewsessions").is_ok());
    assert_eq!(
        new_session(s, "fewsessions").map_err(|r| r.status),
        Err(429)
    );
}

/// Point 3. Chat and completions bodies streamed on the LMI routes are
/// JSON lines: DJL's vLLM handler strips vLLM's `data: ` from each chunk
/// and stops at `[DONE]` without writing it
/// (djl_python/lmi_vllm/request_response_utils.py,
/// vllm_stream_output_formatter), each chunk sent as
/// `application/jsonlines` (djl_python/async_utils.py,
/// create_stream_chunk_output), as serving/docs/lmi/user_guides/
/// chat_input_output_schema.md says ("returned token by token as
/// application/jsonlines"). `/v1/...` keeps OpenAI's server-sent events.
#[test]
fn openai_streams_on_the_lmi_routes_are_json_lines() {
    let s = store();
    let chat = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 6, "temperature": 0});
    let want =
        s.post_json("/predictions/plain", &chat).json()["choices"][0]["message"]["content"].clone();
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    for path in [
        "/invocations?model_name=plain",
        "/predictions/plain",
        "/models/plain/invoke",
    ] {
        let r = s.post_json(path, &streamed);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/jsonlines"));
        let body = r.text();
        assert!(
            !body.contains("data:") && !body.contains("[DONE]"),
            "{body}"
        );
        let lines: Vec<Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect();
        assert!(lines.len() > 2, "{body}");
        for l in &lines {
            assert_eq!(l["object"], "chat.completion.chunk", "{l}");
            assert_eq!(l["model"], "plain", "{l}");
        }
        let text: String = lines
            .iter()
            .filter_map(|l| l["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(Some(text.as_str()), want.as_str(), "{body}");
        assert!(lines
            .last()
            .is_some_and(|l| l["choices"][0]["finish_reason"].is_string()));
    }
    // A completions body: `text_completion` chunks, the usage chunk too.
    let r = s.post_json(
        "/invocations?model_name=plain",
        &json!({"prompt": "The capital of France is", "max_tokens": 3, "stream": true,
            "stream_options": {"include_usage": true}}),
    );
    assert_eq!(r.header("content-type"), Some("application/jsonlines"));
    let lines: Vec<Value> = r
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(
        lines.iter().all(|l| l["object"] == "text_completion"),
        "{lines:?}"
    );
    assert!(
        lines
            .last()
            .is_some_and(|l| l["usage"]["completion_tokens"] == 3),
        "{lines:?}"
    );
    // Asking for server-sent events gets them, as for LMI-schema streams.
    let r = s.req(
        "POST",
        "/invocations?model_name=plain",
        &[
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
        ],
        streamed.to_string().as_bytes(),
    );
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(
        r.text().trim_end().ends_with("data: [DONE]"),
        "{}",
        r.text()
    );
    // /v1 is the OpenAI API: server-sent events.
    let mut v1 = streamed.clone();
    v1["model"] = json!("plain");
    let r = s.post_json("/v1/chat/completions", &v1);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(
        r.text().trim_end().ends_with("data: [DONE]"),
        "{}",
        r.text()
    );
}

/// Checks an LMI token object: `id`, `text`, and the same log-probability
/// under `log_prob` and `logprob`.
fn check_token(t: &Value) {
    assert!(t["id"].is_u64(), "{t}");
    assert!(t["text"].is_string(), "{t}");
    assert!(
        t.get("log_prob").is_some() && t.get("logprob").is_some(),
        "{t}"
    );
    assert_eq!(t["log_prob"], t["logprob"], "{t}");
}

/// Point 6. DJL's documents write a token's log-probability as `log_prob`
/// (serving/docs/lmi/user_guides/lmi_input_output_schema.md; the
/// rolling-batch handlers' djl_python/request_io.py Token.as_dict), its
/// vLLM handler as `logprob` (djl_python/lmi_vllm/request_response_utils.py:
/// convert_completion_logprobs_to_tgi_tokens for details.tokens,
/// convert_completion_chunk_response_to_lmi_schema for streamed tokens,
/// convert_completion_prefill_to_tgi_prefill for prefill): kiln writes
/// both. The vLLM handler's prefill skips the first prompt token (vLLM's
/// `None` entry for it); the schema shows it with a null log_prob
/// (rolling_batch_vllm_utils.py, `log_prob = None` at index 0). kiln
/// follows the code unless `option.prefill_first_token=true`.
#[test]
fn token_objects_carry_both_log_prob_keys_and_prefill_follows_djls_code() {
    let s = store();
    let body = json!({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 3,
        "details": true, "decoder_input_details": true}});
    let code = s.post_json("/predictions/plain", &body);
    assert_eq!(code.status, 200, "{}", code.text());
    let code = code.json();
    let tokens = code["details"]["tokens"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(tokens.len(), 3, "{code}");
    tokens.iter().for_each(check_token);
    let prefill = code["details"]["prefill"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!prefill.is_empty(), "{code}");
    for t in &prefill {
        check_token(t);
        assert!(t["logprob"].as_f64().is_some_and(|l| l <= 0.0), "{t}");
    }
    let documented = s.post_json("/predictions/prefill1", &body).json();
    let full = documented["details"]["prefill"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(full.len(), prefill.len() + 1, "{documented}");
    assert!(
        full[0]["log_prob"].is_null() && full[0]["logprob"].is_null(),
        "{documented}"
    );
    assert!(full[0]["id"].is_u64(), "{documented}");
    assert_eq!(full[1..], prefill[..], "the rest is the same");
    // Streamed tokens, and the error token's shape is shared (lmi_stream).
    let mut st = s.stream(
        "/predictions/plain",
        &[],
        &json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}, "stream": true}),
    );
    let mut n = 0;
    while let Some(line) = st.next_json_line() {
        check_token(&line["token"]);
        n += 1;
    }
    assert_eq!(n, 2);
}

/// Point 5. DJL's configuration builder writes `option.sessions_path`
/// (djl_python/session_manager.py: the directory sessions are kept in) and
/// `option.enable_reasoning` (properties_manager/vllm_rb_properties.py:
/// reasoning is split with `reasoning_parser`, which `validate_reasoning_
/// parser` then requires). Both are known keys: no "unknown key" warning,
/// and reasoning is split. `enable_reasoning` without a parser fails the
/// model, as DJL's validator does; `option.speculative_config` (vLLM's
/// speculative decoding, serving/docs/lmi/user_guides/vllm_user_guide.md)
/// fails it with a message saying kiln does not implement it yet.
#[test]
fn djl_builder_keys_are_known_and_speculative_decoding_is_refused() {
    let s = store();
    let m = describe(s, "builder");
    assert_eq!(m["status"], "Healthy", "{m}");
    let warnings = m["warnings"].to_string();
    assert!(!warnings.contains("unknown key"), "{warnings}");
    assert!(
        warnings.contains("option.sessions_path"),
        "said to be unused: {warnings}"
    );
    let r = s.post_json(
        "/invocations?model_name=builder",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}),
    );
    let v = r.json();
    assert!(
        v["choices"][0]["message"]["reasoning_content"].is_string(),
        "{v}"
    );
    for (name, needles) in [
        (
            "noparser",
            ["option.enable_reasoning", "option.reasoning_parser"],
        ),
        (
            "speculative",
            ["option.speculative_config", "speculative decoding"],
        ),
    ] {
        let m = describe(s, name);
        assert_eq!(m["status"], "Failed", "{name}: {m}");
        let msg = m["error"].as_str().unwrap_or_default();
        for n in needles {
            assert!(msg.contains(n), "{name}: {n:?} not in {msg}");
        }
    }
    let msg = describe(s, "speculative")["error"].to_string();
    assert!(msg.contains("not implement"), "{msg}");
}

/// Point 12, the attack: `job_queue_size` near 2^64, where the engine's
/// admission limit (`job_queue_size + max_rolling_batch_size`) wrapped and
/// every request was refused "queue is full (0 waiting)". Each place that
/// reads it refuses it: serving.properties (the model fails, naming the
/// range), `kiln serve --job-queue-size` (exits), `POST
/// /models?job_queue_size=` (400); the largest accepted value serves.
#[test]
fn job_queue_size_near_2_64_is_refused_where_it_is_read() {
    let s = store();
    let m = describe(s, "hugequeue");
    assert_eq!(m["status"], "Failed", "{m}");
    let msg = m["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("job_queue_size") && msg.contains("4294967295"),
        "{msg}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "serve",
            "--port",
            "0",
            "--job-queue-size",
            "18446744073709551615",
        ])
        .output()
        .expect("run kiln");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--job-queue-size") && err.contains("4294967295"),
        "{err}"
    );

    let empty = tempdir("empty-store-");
    // No model yet (so never ready): listening is enough.
    let logs = tempdir("logs-");
    let m = Server::start(Opts::args(&[
        "--model-store",
        empty.to_str().unwrap_or_default(),
        "--log-dir",
        logs.to_str().unwrap_or_default(),
        "--management-on-inference-port",
        "--model-url-pattern",
        ".*",
        "--kv-cache-mib",
        "16",
    ]));
    let url = model_file().display().to_string();
    for (queue, want) in [
        ("18446744073709551615", 400),
        ("4294967296", 400),
        ("4294967295", 200),
    ] {
        let r = m.req(
            "POST",
            &format!(
                "/models?url={url}&model_name=q{queue}&job_queue_size={queue}&synchronous=true"
            ),
            &[],
            b"",
        );
        assert_eq!(r.status, want, "{queue}: {}", r.text());
        if want == 400 {
            assert!(r.text().contains("job_queue_size"), "{}", r.text());
        }
    }
    let r = m.post_json(
        "/invocations?model_name=q4294967295",
        &json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Point 4. `cd store && kiln serve --model-store .` writes its default
/// `logs/` into the store; that directory is not a model (and neither is
/// any directory without model files: DJL's ModelStore.mapModelUrl takes
/// every non-empty directory, which then fails to load), so the one model
/// is served alone and `/invocations` needs no model name.
#[test]
fn a_store_served_from_inside_itself_keeps_its_one_model() {
    let root = tempdir("inside-store-");
    write(
        &root.join("m/serving.properties"),
        &format!("option.model_id={}\n", model_file().display()),
    );
    write(&root.join("notes/README.md"), "not a model\n");
    let s = Server::start(Opts {
        args: vec![
            "--model-store".into(),
            ".".into(),
            "--kv-cache-mib".into(),
            "16".into(),
        ],
        cwd: Some(root.clone()),
        ..Opts::default()
    });
    s.wait_ready();
    let v = s.get("/models").json();
    let names: Vec<&str> = v["models"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["modelName"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["m"], "{v}");
    let r = s.post_json(
        "/invocations",
        &json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        root.join("logs/serving.log").is_file(),
        "the logs stay where they were"
    );
    let stderr = eventually(Duration::from_secs(5), || {
        let e = s.stderr();
        e.contains("notes").then_some(e)
    })
    .unwrap_or_else(|| s.stderr());
    assert!(stderr.contains("holds no model"), "{stderr}");
    assert!(!stderr.contains("logs: holds no model"), "{stderr}");
}
