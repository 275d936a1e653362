//! End-to-end tests of `kiln serve`: the real binary on a free loopback port,
//! serving the default model (SmolLM2-135M-Instruct), driven over HTTP/1.1.
//!
//! Most tests share one server (`shared()`); those that need other flags
//! share a second one (`guarded()`: API key, CORS, body limit, request
//! timeout, log directory) or a model store (`store()`); tests that must own
//! their process (SIGTERM, the loading window) start their own. Tests that
//! register models on the shared server hold `MODELS` so that `/ping` (503
//! while a model loads) and per-model metrics stay predictable.
//!
//! `KILN_TEST_ECHO=1` copies every server's stderr to the test output.
//!
//! One test binary (a binary per file would link the whole crate again), its
//! tests grouped in modules by what they test; the servers and helpers they
//! share are here.

#[path = "../support/mod.rs"]
mod support;

mod adapters;
mod cancellation;
mod djl;
mod embeddings;
mod guarded;
mod lifecycle;
mod malformed;
mod management;
mod messages;
mod openai;
mod responses;
mod speculative;
mod store;
mod toolcalls;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

/// The shared server: default flags (no key, no CORS), a log directory, and
/// DJL's open management API (`--management-on-inference-port`, any url).
fn shared() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let logs = tempdir("logs-");
        Server::ready(Opts {
            args: vec![
                "--management-on-inference-port".into(),
                "--model-url-pattern".into(),
                ".*".into(),
                "--kv-cache-mib".into(),
                "128".into(),
                "--log-dir".into(),
                logs.display().to_string(),
            ],
            watchdog: true,
            ..Opts::default()
        })
    })
}

/// Held by tests that register or unregister models on the shared server,
/// and by those that need its model set to stay put.
static MODELS: Mutex<()> = Mutex::new(());

fn models_lock() -> MutexGuard<'static, ()> {
    MODELS.lock().unwrap_or_else(|e| e.into_inner())
}

const KEY: &str = "k-test-123";
const ALLOWED_ORIGIN: &str = "http://allowed.example";

/// A server with an API key, CORS for one origin, a 2048-byte body limit, a
/// 1-second request timeout and a log directory.
fn guarded() -> &'static (Server, std::path::PathBuf) {
    static S: OnceLock<(Server, std::path::PathBuf)> = OnceLock::new();
    S.get_or_init(|| {
        let logs = tempdir("guarded-logs-");
        let s = Server::start(Opts {
            args: [
                "--api-key",
                KEY,
                "--cors-origin",
                ALLOWED_ORIGIN,
                "--max-request-bytes",
                "2048",
                "--request-timeout",
                "1",
                "--kv-cache-mib",
                "32",
                "--log-dir",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain([logs.display().to_string()])
            .collect(),
            watchdog: true,
            ..Opts::default()
        });
        s.wait_ready();
        (s, logs)
    })
}

const AUTH: (&str, &str) = ("Authorization", "Bearer k-test-123");

/// A DJL `serving.properties` as the reference deployment writes it (OPT-13B
/// on inf2 with transformers-neuronx), pointed at the default model.
fn reference_properties(model: &Path) -> String {
    format!(
        "# OPT-13B on inf2 (transformers-neuronx)\n\
         engine=Python\n\
         option.entryPoint=djl_python.transformers_neuronx\n\
         option.model_id={}\n\
         option.tensor_parallel_degree=2\n\
         option.n_positions=512\n\
         option.rolling_batch=auto\n\
         option.dtype=fp16\n\
         option.model_loading_timeout=1500\n\
         batch_size=4\n\
         max_batch_delay=100\n",
        model.display()
    )
}

const MODEL_PY: &str = "\
from djl_python import Input, Output
import torch

model = None

def handle(inputs: Input):
    global model
    if inputs.is_empty():
        return None
    data = inputs.get_as_json()
    return Output().add_as_json({'outputs': data['text']})
";

/// A model store in the reference layout: `opt13b` (the reference
/// `serving.properties` and a `model.py`), `tiny` (one running sequence,
/// a queue of one) and `broken` (a corrupt .gguf).
fn store() -> &'static (Server, std::path::PathBuf) {
    static S: OnceLock<(Server, std::path::PathBuf)> = OnceLock::new();
    S.get_or_init(|| {
        let root = tempdir("store-");
        let models = root.join("models");
        let model = model_file();
        write(
            &models.join("opt13b/serving.properties"),
            &reference_properties(&model),
        );
        write(&models.join("opt13b/model.py"), MODEL_PY);
        write(
            &models.join("tiny/serving.properties"),
            &format!(
                "engine=Python\noption.model_id={}\noption.rolling_batch=auto\n\
                 option.max_rolling_batch_size=1\njob_queue_size=1\n",
                model.display()
            ),
        );
        write(
            &models.join("broken/model.gguf"),
            "GGUF this is not a real model file",
        );
        let logs = root.join("logs");
        let s = Server::start(Opts {
            args: vec![
                "--model-store".into(),
                models.display().to_string(),
                "--log-dir".into(),
                logs.display().to_string(),
                "--kv-cache-mib".into(),
                "16".into(),
            ],
            watchdog: true,
            ..Opts::default()
        });
        let settled = eventually(Duration::from_secs(60), || {
            let r = s.get("/models");
            let v = r.json();
            let states: Vec<String> = v["models"]
                .as_array()?
                .iter()
                .map(|m| m["status"].as_str().unwrap_or("").to_string())
                .collect();
            (states.len() == 3 && !states.iter().any(|s| s == "Loading")).then_some(())
        });
        assert!(settled.is_some(), "the store did not load:\n{}", s.stderr());
        (s, logs)
    })
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn lmi(s: &Server, path: &str, body: Value) -> Value {
    let r = s.post_json(path, &body);
    assert_eq!(r.status, 200, "{path} {body}: {}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        r.headers
    );
    r.json()
}

/// Greedy LMI generation of one prompt: (text, token ids, finish reason).
fn greedy(s: &Server, model: &str, prompt: &str, n: usize) -> (String, Vec<u64>, String) {
    let v = lmi(
        s,
        &format!("/predictions/{model}"),
        json!({"inputs": prompt, "parameters": {"max_new_tokens": n, "details": true}}),
    );
    let ids = v["details"]["tokens"]
        .as_array()
        .expect("details.tokens")
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    (
        v["generated_text"].as_str().unwrap().to_string(),
        ids,
        v["details"]["finish_reason"].as_str().unwrap().to_string(),
    )
}

/// Prompt tokens of `prompt` as the server counts them.
fn prompt_tokens(s: &Server, prompt: &str) -> u64 {
    let r = s.post_json(
        "/v1/completions",
        &json!({"model": "default", "prompt": prompt, "max_tokens": 1, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["usage"]["prompt_tokens"].as_u64().unwrap()
}

/// Asserts a DJL-shaped JSON error `{"error": "...", "code": N}`.
fn assert_djl_error(r: &Response, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "not JSON: {:?} {}",
        r.headers,
        r.text()
    );
    let v = r.json();
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {v}"));
    assert_eq!(v["code"].as_u64(), Some(status as u64), "{v}");
    assert!(
        msg.to_lowercase().contains(&needle.to_lowercase()),
        "error {msg:?} does not mention {needle:?}"
    );
}

/// Asserts an OpenAI-shaped JSON error `{"error": {"message", "type", "code"}}`.
fn assert_openai_error(r: &Response, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("not an OpenAI error: {v}"));
    assert!(v["error"]["type"].is_string(), "{v}");
    assert_eq!(v["error"]["code"].as_u64(), Some(status as u64), "{v}");
    assert!(
        msg.to_lowercase().contains(&needle.to_lowercase()),
        "error {msg:?} does not mention {needle:?}"
    );
}

fn model_metric(s: &Server, name: &str, model: &str) -> f64 {
    s.metric(&format!("{name}{{model=\"{model}\"}}"))
        .unwrap_or_else(|| panic!("no {name} for {model}"))
}

/// Reads the SSE stream `st` until 3 events starting with `event` have come
/// (`model` is generating and holds KV blocks), leaves, and waits (10 s at
/// most) for `model` to hold no blocks and count one more finished request
/// than `finished_before`: a client leaving a stream cancels its generation.
fn leave_after_three_deltas(
    s: &Server,
    mut st: Streaming,
    event: &str,
    model: &str,
    finished_before: f64,
) {
    let used = |s: &Server| model_metric(s, "kiln_kv_blocks_used", model);
    let finished = |s: &Server| model_metric(s, "kiln_requests_finished_total", model);
    assert_eq!(st.status, 200);
    let mut deltas = 0;
    while deltas < 3 {
        let ev = st.next_until(b"\n\n").expect("an event");
        if ev.starts_with(event) {
            deltas += 1;
        }
    }
    assert!(used(s) > 0.0, "no KV blocks held while generating");
    st.disconnect();
    let freed = eventually(Duration::from_secs(10), || {
        (used(s) == 0.0 && finished(s) == finished_before + 1.0).then_some(())
    });
    assert!(
        freed.is_some(),
        "blocks used {} and finished {} (was {finished_before}) after the client left",
        used(s),
        finished(s)
    );
}

/// Reads a DJL JSON-lines stream to its end, after the lines already read:
/// the streamed tokens in order and the last line (the one that carries
/// `generated_text` and `details`). Every line before the last must carry a
/// token. The last line usually carries the last token too, but may carry
/// none when the engine's `Finished` event reaches the server after its last
/// token (see `lmi_stream_every_line_carries_a_token`).
fn read_lmi(st: &mut Streaming, mut lines: Vec<Value>) -> (Vec<Value>, Value) {
    while let Some(l) = st.next_json_line() {
        lines.push(l);
    }
    let last = lines.last().cloned().expect("an empty stream");
    assert!(last["generated_text"].is_string(), "the last line: {last}");
    let mut tokens = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        match l.get("token") {
            Some(t) => tokens.push(t.clone()),
            None => assert_eq!(i, lines.len() - 1, "a line without a token: {l}"),
        }
        if i + 1 < lines.len() {
            assert!(l.get("generated_text").is_none(), "only the last line: {l}");
        }
    }
    (tokens, last)
}

/// `POST /models?{query}`, allowing a second copy of weights already served
/// (these tests register the default model under several names).
fn register(s: &Server, query: &str) -> Response {
    s.req(
        "POST",
        &format!("/models?{query}&allow_duplicate=true"),
        &[],
        b"",
    )
}

fn url_escape(p: &Path) -> String {
    let mut out = String::new();
    for b in p.display().to_string().bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
