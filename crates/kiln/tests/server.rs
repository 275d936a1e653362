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

mod support;

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

// ---------------------------------------------------------------------------
// DJL inference routes
// ---------------------------------------------------------------------------

#[test]
fn ping_is_healthy_when_every_model_is_ready() {
    let s = shared();
    let _g = models_lock();
    let r = s.get("/ping");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"status": "Healthy"}));
}

#[test]
fn reference_request_returns_two_texts_within_seq_length() {
    let s = shared();
    let texts = [
        "Hello, I am a language model,",
        "Welcome to Amazon Elastic Compute Cloud,",
    ];
    let v = lmi(
        s,
        "/predictions/default",
        json!({"seq_length": 24, "text": texts}),
    );
    let out = v.as_array().unwrap_or_else(|| panic!("not a list: {v}"));
    assert_eq!(out.len(), 2, "{v}");
    for o in out {
        let t = o["generated_text"].as_str().unwrap();
        assert!(!t.trim().is_empty(), "{v}");
    }
    assert_ne!(out[0], out[1]);
    // seq_length bounds prompt + output.
    let v = lmi(
        s,
        "/predictions/default",
        json!({"seq_length": 12, "text": texts, "parameters": {"details": true}}),
    );
    assert_eq!(v.as_array().map(Vec::len), Some(texts.len()), "{v}");
    for (o, text) in v.as_array().unwrap().iter().zip(texts) {
        let n = o["details"]["generated_tokens"].as_u64().unwrap();
        let p = prompt_tokens(s, text);
        assert!(n >= 1 && p + n <= 12, "{text}: {p} + {n} > 12: {o}");
    }
}

#[test]
fn batch_outputs_equal_the_same_prompts_alone() {
    let s = shared();
    let prompts = [
        "Hi",
        "The quick brown fox jumps over the lazy dog. Then the dog",
        "Once upon a time, in a small village at the foot of a great mountain, there lived an old \
         clockmaker who had never left the valley. One morning he",
    ];
    let n = 10;
    let alone: Vec<(String, Vec<u64>, String)> =
        prompts.iter().map(|p| greedy(s, "default", p, n)).collect();
    let batch = lmi(
        s,
        "/predictions/default",
        json!({"inputs": prompts, "parameters": {"max_new_tokens": n, "details": true}}),
    );
    let batch = batch.as_array().expect("a list for list input");
    assert_eq!(batch.len(), prompts.len());
    for ((b, a), p) in batch.iter().zip(&alone).zip(prompts) {
        let ids: Vec<u64> = b["details"]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, a.1, "{p:?}: batched tokens differ from alone");
        assert_eq!(b["generated_text"].as_str().unwrap(), a.0, "{p:?}");
    }
    // The reference body (a batch of texts) agrees too.
    let r = lmi(
        s,
        "/predictions/default",
        json!({"text": prompts, "seq_length": 100, "parameters": {"max_new_tokens": n}}),
    );
    assert_eq!(r.as_array().map(Vec::len), Some(alone.len()), "{r}");
    for (b, a) in r.as_array().unwrap().iter().zip(&alone) {
        assert_eq!(b["generated_text"].as_str().unwrap(), a.0);
    }
}

#[test]
fn every_inference_route_gives_the_same_greedy_answer() {
    let s = shared();
    let prompt = "The capital of France is";
    let body = json!({"inputs": prompt, "parameters": {"max_new_tokens": 6}});
    let want = lmi(s, "/predictions/default", body.clone());
    let text = want["generated_text"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    for path in [
        "/predictions/default/1.0",
        "/invocations?model_name=default",
        "/models/default/invoke",
    ] {
        assert_eq!(lmi(s, path, body.clone()), want, "{path}");
    }
    // A bare JSON string and a plain-text body are one prompt with defaults (30 tokens).
    let long = greedy(s, "default", prompt, 30).0;
    let r = s.req(
        "POST",
        "/predictions/default",
        &[("Content-Type", "text/plain")],
        prompt.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["generated_text"], json!(long));
    let r = s.post_json("/predictions/default", &json!(prompt));
    assert_eq!(r.json()["generated_text"], json!(long));
    // return_full_text.
    let v = lmi(
        s,
        "/predictions/default",
        json!({"inputs": prompt, "parameters": {"max_new_tokens": 6, "return_full_text": true}}),
    );
    assert_eq!(v["generated_text"], json!(format!("{prompt}{text}")));
}

#[test]
fn lmi_stream_as_json_lines_and_as_server_sent_events() {
    let s = shared();
    let prompt = "Write a haiku about the sea:";
    let n = 12;
    let params = json!({"max_new_tokens": n, "ignore_eos": true, "details": true});
    let (want, ids, _) = greedy(s, "default", prompt, n);

    let mut st = s.stream(
        "/predictions/default",
        &[("Content-Type", "application/json")],
        &json!({"inputs": prompt, "stream": true, "parameters": params}),
    );
    assert_eq!(st.status, 200);
    assert_eq!(st.header("content-type"), Some("application/jsonlines"));
    let (tokens, last) = read_lmi(&mut st, Vec::new());
    assert_eq!(tokens.len(), n, "one token per line: {tokens:#?}");
    let mut text = String::new();
    for (t, id) in tokens.iter().zip(&ids) {
        assert_eq!(t["id"].as_u64(), Some(*id), "{t}");
        assert!(t["log_prob"].as_f64().unwrap() <= 0.0, "{t}");
        text.push_str(t["text"].as_str().unwrap());
    }
    assert_eq!(last["generated_text"].as_str(), Some(text.as_str()));
    assert_eq!(
        text, want,
        "streamed text differs from the non-streamed one"
    );
    assert_eq!(last["details"]["finish_reason"], "length");
    assert_eq!(last["details"]["generated_tokens"], json!(n));

    // Server-sent events when the client asks for them.
    let mut st = s.stream(
        "/predictions/default",
        &[
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
        ],
        &json!({"inputs": prompt, "stream": true, "parameters": params}),
    );
    assert_eq!(st.header("content-type"), Some("text/event-stream"));
    let mut events = Vec::new();
    while let Some(e) = st.next_event() {
        events.push(serde_json::from_str::<Value>(&e).unwrap());
    }
    let sse_tokens: Vec<Value> = events
        .iter()
        .filter_map(|e| e.get("token").cloned())
        .collect();
    assert_eq!(sse_tokens, tokens);
    let sse_last = events.last().unwrap();
    assert_eq!(sse_last["generated_text"], last["generated_text"]);
    assert_eq!(sse_last["details"], last["details"]);
}

/// DESIGN: "the last line also carrying `generated_text` and `details`", as
/// DJL's and TGI's streams do: every line carries a token. (This caught a
/// race: the server used to attach the summary only when the engine's
/// `Finished` happened to be queued already; the engine now marks a
/// request's last token, and the server waits for the end behind it.)
#[test]
fn lmi_stream_every_line_carries_a_token() {
    let s = shared();
    let port = s.port;
    let workers: Vec<_> = (0..4)
        .map(|w| {
            std::thread::spawn(move || {
                let mut tokenless = Vec::new();
                for i in 0..50 {
                    let mut st = Streaming::open(
                        port,
                        "POST",
                        "/predictions/default",
                        &[("Content-Type", "application/json")],
                        json!({"inputs": format!("Hi {w} {i}"), "stream": true,
                            "parameters": {"max_new_tokens": 2, "ignore_eos": true}})
                        .to_string()
                        .as_bytes(),
                    );
                    while let Some(l) = st.next_json_line() {
                        if l.get("token").is_none() {
                            tokenless.push(l);
                        }
                    }
                }
                tokenless
            })
        })
        .collect();
    let tokenless: Vec<Value> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(
        tokenless.is_empty(),
        "{} of 200 streams ended with a line without a token: {}",
        tokenless.len(),
        tokenless[0]
    );
}

#[test]
fn japanese_text_is_streamed_intact() {
    let s = shared();
    let prompt = "東京は日本の首都です。東京は";
    // Find a length at which the greedy output ends on a whole character:
    // the tokens of a multi-byte character carry no text until it is complete.
    let v = lmi(
        s,
        "/predictions/default",
        json!({"inputs": prompt, "parameters": {"max_new_tokens": 30, "details": true}}),
    );
    let toks = v["details"]["tokens"].as_array().unwrap();
    let split_tokens = toks
        .iter()
        .filter(|t| t["text"].as_str() == Some(""))
        .count();
    assert!(
        split_tokens > 0,
        "expected characters spread over several tokens: {v}"
    );
    let n = toks
        .iter()
        .rposition(|t| {
            let t = t["text"].as_str().unwrap();
            !t.is_empty() && !t.contains('\u{FFFD}')
        })
        .unwrap()
        + 1;
    let mut st = s.stream(
        "/predictions/default",
        &[("Content-Type", "application/json")],
        &json!({"inputs": prompt, "stream": true, "parameters": {"max_new_tokens": n}}),
    );
    let (tokens, last) = read_lmi(&mut st, Vec::new());
    let mut text = String::new();
    for t in &tokens {
        let piece = t["text"].as_str().unwrap();
        assert!(!piece.contains('\u{FFFD}'), "a split character in {t}");
        text.push_str(piece);
    }
    assert_eq!(last["generated_text"].as_str(), Some(text.as_str()));
    let cjk = text
        .chars()
        .filter(|c| ('\u{3040}'..='\u{9FFF}').contains(c))
        .count();
    assert!(cjk >= 5, "expected Japanese output, got {text:?}");
    assert!(!text.contains('\u{FFFD}'), "{text:?}");
    let (whole, _, _) = greedy(s, "default", prompt, n);
    assert_eq!(text, whole);
    // The OpenAI stream keeps characters whole too.
    let mut st = s.stream(
        "/v1/completions",
        &[("Content-Type", "application/json")],
        &json!({"model": "default", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": true}),
    );
    let mut text2 = String::new();
    while let Some(e) = st.next_event() {
        if e == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&e).unwrap();
        let t = v["choices"][0]["text"].as_str().unwrap();
        assert!(!t.contains('\u{FFFD}'), "{e}");
        text2.push_str(t);
    }
    assert_eq!(text2, text);
}

#[test]
fn lmi_stop_sequences_sampling_seed_and_details() {
    let s = shared();
    let prompt = "List three colors of the rainbow:";
    let (full, _, _) = greedy(s, "default", prompt, 24);
    // A stop string taken from the middle of the unconstrained output.
    let words: Vec<&str> = full.split_whitespace().collect();
    assert!(words.len() >= 4, "{full:?}");
    let stop = words[2];
    let cut = full.find(stop).unwrap();
    let v = lmi(
        s,
        "/predictions/default",
        json!({"inputs": prompt, "parameters": {"max_new_tokens": 24, "stop_sequences": [stop], "details": true}}),
    );
    assert_eq!(v["details"]["finish_reason"], "stop_sequence", "{v}");
    assert_eq!(v["generated_text"].as_str().unwrap(), &full[..cut], "{v}");

    // Sampling with a seed is reproducible.
    let sample = |seed: u64| {
        lmi(
            s,
            "/predictions/default",
            json!({"inputs": prompt, "parameters": {"max_new_tokens": 8, "do_sample": true,
                "temperature": 1.5, "top_k": 50, "seed": seed}}),
        )["generated_text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let a = sample(11);
    assert_eq!(a, sample(11));
    let others: BTreeSet<String> = [12, 13, 14].into_iter().map(sample).collect();
    assert!(
        others.len() > 1 || !others.contains(&a),
        "sampling ignores the seed: {a:?} {others:?}"
    );
    // EOS ends generation early with eos_token (the chat model stops after answering).
    let r = lmi(
        s,
        "/predictions/default",
        json!({"inputs": "<|im_start|>user\nSay OK.<|im_end|>\n<|im_start|>assistant\n",
            "parameters": {"max_new_tokens": 40, "details": true}}),
    );
    assert_eq!(r["details"]["finish_reason"], "eos_token", "{r}");
    assert!(r["details"]["generated_tokens"].as_u64().unwrap() < 40);
}

// ---------------------------------------------------------------------------
// OpenAI API
// ---------------------------------------------------------------------------

#[test]
fn openai_models_and_completions() {
    let s = shared();
    let r = s.get("/v1/models");
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "default" && m["object"] == "model"),
        "{v}"
    );

    let prompt = "The capital of France is";
    let r = s.post_json(
        "/v1/completions",
        &json!({"model": "default", "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "logprobs": 2, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "length");
    let u = &v["usage"];
    assert_eq!(u["completion_tokens"], 8);
    assert_eq!(u["prompt_tokens"].as_u64(), Some(prompt_tokens(s, prompt)));
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + 8)
    );
    let lp = &c["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 8, "{lp}");
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 8);
    assert_eq!(lp["top_logprobs"].as_array().map(Vec::len), Some(8), "{lp}");
    assert_eq!(
        lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect::<String>(),
        c["text"].as_str().unwrap()
    );
    for (top, chosen) in lp["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lp["token_logprobs"].as_array().unwrap())
    {
        let top = top.as_object().unwrap();
        assert!((1..=2).contains(&top.len()), "{top:?}");
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        // Greedy: the chosen token is the most likely one.
        assert!(
            (best - chosen.as_f64().unwrap()).abs() < 1e-4,
            "{top:?} {chosen}"
        );
    }
    // The same text as the DJL route (greedy both).
    assert_eq!(
        c["text"].as_str().unwrap(),
        greedy(s, "default", prompt, 8).0
    );

    // echo, stop.
    let r = s.post_json(
        "/v1/completions",
        &json!({"model": "default", "prompt": prompt, "max_tokens": 8, "temperature": 0, "echo": true}),
    );
    let text = r.json()["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(text.starts_with(prompt), "{text:?}");
    let r = s.post_json(
        "/v1/completions",
        &json!({"model": "default", "prompt": prompt, "max_tokens": 8, "temperature": 0, "stop": ["."]}),
    );
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert!(!v["choices"][0]["text"].as_str().unwrap().contains('.'));

    // n choices with a seed: reproducible, usage adds up.
    let body = json!({"model": "default", "prompt": "Tell me a story:", "max_tokens": 6,
        "temperature": 1.2, "n": 3, "seed": 42, "ignore_eos": true});
    let a = s.post_json("/v1/completions", &body).json();
    let b = s.post_json("/v1/completions", &body).json();
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(texts(&a).len(), 3);
    assert_eq!(texts(&a), texts(&b), "same seed, same choices");
    let idx: Vec<u64> = a["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, [0, 1, 2]);
    assert_eq!(a["usage"]["completion_tokens"], 18);
    let distinct: BTreeSet<String> = texts(&a).into_iter().collect();
    assert!(distinct.len() > 1, "n choices should differ: {a}");
}

#[test]
fn openai_chat_answers_paris_with_usage_and_logprobs() {
    let s = shared();
    let body = json!({"model": "default", "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "logprobs": true, "top_logprobs": 3});
    let r = s.post_json("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "default");
    let c = &v["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    let content = c["message"]["content"].as_str().unwrap();
    assert!(content.contains("Paris"), "{content:?}");
    let reason = c["finish_reason"].as_str().unwrap();
    assert!(reason == "stop" || reason == "length", "{reason}");
    let u = &v["usage"];
    let (p, n) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 10, "the chat template adds tokens: {u}");
    assert!((1..=24).contains(&n), "{u}");
    assert_eq!(u["total_tokens"].as_u64(), Some(p + n));
    let lp = c["logprobs"]["content"].as_array().unwrap();
    // One entry per generated token (EOS included when it ended the answer).
    assert_eq!(lp.len() as u64, n, "{c}");
    for t in lp {
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 3, "{t}");
    }

    // Streaming gives the same answer, then usage, then [DONE].
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let mut st = s.stream(
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        &sb,
    );
    assert_eq!(st.status, 200);
    assert_eq!(st.header("content-type"), Some("text/event-stream"));
    let mut events = Vec::new();
    while let Some(e) = st.next_event() {
        events.push(e);
    }
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut streamed = String::new();
    let mut reasons = Vec::new();
    for ch in &chunks {
        assert_eq!(ch["object"], "chat.completion.chunk");
        if let Some(c) = ch["choices"].as_array().and_then(|c| c.first()) {
            if let Some(t) = c["delta"]["content"].as_str() {
                streamed.push_str(t);
            }
            if let Some(r) = c["finish_reason"].as_str() {
                reasons.push(r.to_string());
            }
        }
    }
    assert_eq!(streamed, content);
    assert_eq!(reasons, [reason]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"].as_u64(), Some(n), "{usage}");
    assert_eq!(usage["prompt_tokens"].as_u64(), Some(p));
}

#[test]
fn openai_completions_stream_with_n_choices() {
    let s = shared();
    let mut st = s.stream(
        "/v1/completions",
        &[("Content-Type", "application/json")],
        &json!({"model": "default", "prompt": "Once upon a time", "max_tokens": 5, "n": 2,
            "temperature": 0.8, "seed": 5, "stream": true, "ignore_eos": true}),
    );
    let mut per_choice = [0usize; 2];
    let mut finished = [0usize; 2];
    let mut done = 0;
    while let Some(e) = st.next_event() {
        if e == "[DONE]" {
            done += 1;
            continue;
        }
        assert_eq!(done, 0, "an event after [DONE]");
        let v: Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["object"], "text_completion");
        let c = &v["choices"][0];
        let i = c["index"].as_u64().unwrap() as usize;
        if c["finish_reason"].is_string() {
            assert_eq!(c["finish_reason"], "length");
            finished[i] += 1;
        } else {
            per_choice[i] += 1;
        }
    }
    assert_eq!(done, 1);
    assert_eq!(per_choice, [5, 5]);
    assert_eq!(finished, [1, 1]);
}

// ---------------------------------------------------------------------------
// Malformed requests
// ---------------------------------------------------------------------------

#[test]
fn malformed_requests_get_clear_4xx_json_errors_and_the_server_keeps_serving() {
    let s = shared();
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let missing = Path::new("/nonexistent/kiln/model.gguf");
    // (method, path, content type, body, status, what the message must mention)
    type Case<'a> = (&'a str, String, &'a str, Vec<u8>, u16, &'a str);
    // On the LMI routes, DJL answers request-validation failures (malformed
    // JSON included: its Python handler decodes the body) with 424, and only
    // its Java front end's refusals with 400/404/405 (see kiln-server's
    // djl_status module for the DJL source locations).
    let djl: Vec<Case> = vec![
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            b"{not json".to_vec(),
            424,
            "invalid JSON",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            br#"{"inputs": 5}"#.to_vec(),
            424,
            "inputs",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            br#"{"inputs": []}"#.to_vec(),
            424,
            "empty",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            br#"{"inputs": ["a", 3]}"#.to_vec(),
            424,
            "list of strings",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            br#"{"promt": "x"}"#.to_vec(),
            424,
            "inputs",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            br#"{"inputs": "x", "parameters": 3}"#.to_vec(),
            424,
            "parameters",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            br#"{"inputs": "x", "parameters": {"max_new_tokens": 0}}"#.to_vec(),
            424,
            "max_new_tokens",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            br#"{"inputs": "x", "parameters": {"max_new_tokens": -3}}"#.to_vec(),
            424,
            "max_new_tokens",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            br#"{"inputs": "x", "parameters": {"max_new_tokens": 1e12}}"#.to_vec(),
            424,
            "max_new_tokens",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            br#"{"inputs": "x", "parameters": {"temperature": -1, "do_sample": true}}"#.to_vec(),
            424,
            "temperature",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            br#"{"inputs": "x", "parameters": {"top_p": 0}}"#.to_vec(),
            424,
            "top_p",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            br#"{"inputs": "x", "parameters": {"stop_sequences": [1]}}"#.to_vec(),
            424,
            "stop_sequences",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            br#"{"inputs": "x", "stream": "yes"}"#.to_vec(),
            424,
            "stream",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            br#"{"inputs": ["a", "b"], "stream": true}"#.to_vec(),
            424,
            "one input",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            br#"{"text": ["a"], "seq_length": 0}"#.to_vec(),
            424,
            "seq_length",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            br#"{"text": ["a long prompt of many words here"], "seq_length": 3}"#.to_vec(),
            424,
            "limit",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            Vec::new(),
            424,
            "empty",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "text/plain",
            vec![0xff, 0xfe, 0x00],
            424,
            "UTF-8",
        ),
        (
            "POST",
            "/predictions/default".into(),
            "application/json",
            deep.into_bytes(),
            424,
            "invalid JSON",
        ),
        (
            "POST",
            "/predictions/no_such_model".into(),
            "application/json",
            br#"{"inputs": "x"}"#.to_vec(),
            404,
            "no_such_model",
        ),
        (
            "POST",
            "/invocations?model_name=nope".into(),
            "application/json",
            br#"{"inputs": "x"}"#.to_vec(),
            404,
            "nope",
        ),
        (
            "GET",
            "/predictions/default".into(),
            "",
            Vec::new(),
            405,
            "GET",
        ),
        (
            "GET",
            "/no/such/route".into(),
            "",
            Vec::new(),
            404,
            "/no/such/route",
        ),
        ("POST", "/models".into(), "", Vec::new(), 400, "url"),
        (
            "POST",
            format!("/models?url={}&model_name=m1", url_escape(missing)),
            "",
            Vec::new(),
            400,
            "/nonexistent/kiln/model.gguf",
        ),
        (
            "POST",
            "/models?url=s3://Bad_Bucket/model&model_name=m2".into(),
            "",
            Vec::new(),
            400,
            "s3://Bad_Bucket/model: the bucket name",
        ),
        (
            "POST",
            "/models?url=http://example.com/model&model_name=m2".into(),
            "",
            Vec::new(),
            400,
            "http:// urls are not supported",
        ),
        (
            "POST",
            "/models?url=/tmp&model_name=bad%20name".into(),
            "",
            Vec::new(),
            400,
            "model name",
        ),
        (
            "PUT",
            "/models/default?min_worker=5&max_worker=2".into(),
            "",
            Vec::new(),
            400,
            "min_worker",
        ),
        (
            "PUT",
            "/models/default?max_worker=lots".into(),
            "",
            Vec::new(),
            400,
            "max_worker",
        ),
        (
            "GET",
            "/models?limit=abc".into(),
            "",
            Vec::new(),
            400,
            "limit",
        ),
        (
            "GET",
            "/models/no_such_model".into(),
            "",
            Vec::new(),
            404,
            "no_such_model",
        ),
        (
            "DELETE",
            "/models/no_such_model".into(),
            "",
            Vec::new(),
            404,
            "no_such_model",
        ),
    ];
    let openai: Vec<(&str, Value, u16, &str)> = vec![
        (
            "/v1/completions",
            json!({"model": "nope", "prompt": "x"}),
            404,
            "nope",
        ),
        (
            "/v1/completions",
            json!({"model": "default"}),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            json!({"model": "default", "prompt": "x", "max_tokens": "ten"}),
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"model": "default", "prompt": "x", "temperature": 3}),
            400,
            "temperature",
        ),
        (
            "/v1/completions",
            json!({"model": "default", "prompt": "x", "logprobs": 50}),
            400,
            "logprobs",
        ),
        (
            "/v1/completions",
            json!({"model": "default", "prompt": [999999]}),
            400,
            "vocabulary",
        ),
        (
            "/v1/completions",
            json!({"model": "default", "prompt": "x", "n": 0}),
            400,
            "'n'",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "default", "messages": "hi"}),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "default", "messages": []}),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "default", "messages": [{"content": "hi"}]}),
            400,
            "role",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "default", "messages": [{"role": "user", "content": 5}]}),
            400,
            "content",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "default", "messages": [{"role": "user", "content": "hi"}], "stream": 1}),
            400,
            "stream",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "default", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}),
            400,
            "tools",
        ),
    ];
    assert!(djl.len() + openai.len() >= 20);
    for (method, path, ct, body, status, needle) in &djl {
        let headers: Vec<(&str, &str)> = if ct.is_empty() {
            vec![]
        } else {
            vec![("Content-Type", *ct)]
        };
        let r = s.req(method, path, &headers, body);
        assert!(
            (400..500).contains(&r.status),
            "{method} {path}: {} {}",
            r.status,
            r.text()
        );
        assert_djl_error(&r, *status, needle);
    }
    for (path, body, status, needle) in &openai {
        let r = s.post_json(path, body);
        assert_openai_error(&r, *status, needle);
    }
    let r = s.req(
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        b"{\"model\": ",
    );
    assert_openai_error(&r, 400, "invalid JSON");
    // Still serving.
    let (t, _, _) = greedy(s, "default", "Hello", 3);
    assert!(!t.is_empty());
    assert_eq!(s.get("/v1/models").status, 200);
}

// ---------------------------------------------------------------------------
// Management
// ---------------------------------------------------------------------------

#[test]
fn management_describe_scale_register_page_and_unregister() {
    let s = shared();
    let _g = models_lock();
    let r = s.get("/models/default");
    assert_eq!(r.status, 200);
    let v = r.json();
    let d = &v[0]["models"][0];
    assert_eq!(d["modelName"], "default");
    assert_eq!(d["status"], "Healthy");
    assert!(d["kiln"]["kvCache"]["blocks"].as_u64().unwrap() > 0, "{d}");

    let r = s.req("PUT", "/models/default?min_worker=1&max_worker=3", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let d = s.get("/models/default").json();
    assert_eq!(
        (
            d[0]["models"][0]["workerGroups"][0]["minWorkers"].clone(),
            d[0]["models"][0]["workerGroups"][0]["maxWorkers"].clone()
        ),
        (json!(1), json!(3))
    );

    let file = url_escape(&model_file());
    // Synchronous registration answers 200 once the model is ready.
    let r = register(s, &format!("url={file}&model_name=page_a&job_queue_size=7"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["status"].as_str().unwrap().contains("page_a"));
    assert_eq!(
        s.get("/models/page_a").json()[0]["models"][0]["status"],
        "Healthy"
    );
    assert_eq!(
        s.get("/models/page_a").json()[0]["models"][0]["jobQueueSize"],
        7
    );
    // Asynchronous registration answers 202 at once.
    let r = register(
        s,
        &format!("url={file}&model_name=page_b&synchronous=false"),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(eventually(Duration::from_secs(30), || {
        (s.get("/models/page_b").json()[0]["models"][0]["status"] == "Healthy").then_some(())
    })
    .is_some());
    // A name taken is a conflict.
    let r = register(s, &format!("url={file}&model_name=page_a"));
    assert_djl_error(&r, 409, "already registered");

    // Paging through every model, one at a time.
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..10 {
        let path = match &token {
            Some(t) => format!("/models?limit=1&next_page_token={t}"),
            None => "/models?limit=1".to_string(),
        };
        let v = s.get(&path).json();
        let page = v["models"].as_array().unwrap();
        assert_eq!(page.len(), 1, "{v}");
        names.push(page[0]["modelName"].as_str().unwrap().to_string());
        match v["nextPageToken"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    assert_eq!(names, ["default", "page_a", "page_b"]);
    let v = s.get("/models?limit=2").json();
    assert_eq!(v["models"].as_array().unwrap().len(), 2);
    assert_eq!(v["nextPageToken"], "2");

    // Each registered model serves, and /v1/models lists it.
    let (t, _, _) = greedy(s, "page_b", "Hello", 3);
    assert_eq!(t, greedy(s, "default", "Hello", 3).0);
    let ids: Vec<String> = s.get("/v1/models").json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["default", "page_a", "page_b"]);

    for name in ["page_a", "page_b"] {
        let r = s.req("DELETE", &format!("/models/{name}"), &[], b"");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(s.get(&format!("/models/{name}")).status, 404);
        let r = s.post_json(&format!("/predictions/{name}"), &json!({"inputs": "x"}));
        assert_djl_error(&r, 404, name);
    }
    assert_eq!(s.get("/ping").status, 200);
}

#[test]
fn registering_a_corrupt_model_fails_cleanly() {
    let s = shared();
    let _g = models_lock();
    let dir = tempdir("corrupt-");
    let bad = dir.join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let r = register(s, &format!("url={}&model_name=corrupt", url_escape(&bad)));
    assert_djl_error(&r, 400, "corrupt");
    // Nothing is left behind: the name is free and /ping is healthy.
    assert_eq!(s.get("/models/corrupt").status, 404);
    assert_eq!(s.get("/ping").status, 200);
    // A model directory whose option.model_id points nowhere: 400 naming the key, path and file.
    let mdir = dir.join("nowhere");
    write(
        &mdir.join("serving.properties"),
        "engine=Python\noption.model_id=/nonexistent/weights\n",
    );
    let r = register(s, &format!("url={}&model_name=nowhere", url_escape(&mdir)));
    assert_djl_error(&r, 400, "/nonexistent/weights");
    let msg = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        msg.contains("option.model_id") && msg.contains("serving.properties"),
        "{msg}"
    );
}

#[test]
fn serving_properties_quantize_converts_at_load_and_refuses_what_kiln_cannot_do() {
    let s = shared();
    let _g = models_lock();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny/llama");
    let dir = tempdir("quantize-");
    let q8 = dir.join("tiny_q8");
    write(
        &q8.join("serving.properties"),
        &format!(
            "engine=Python\noption.model_id={}\noption.quantize=q8_0\n",
            tiny.display()
        ),
    );
    let r = register(s, &format!("url={}", url_escape(&q8)));
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, ids, finish) = greedy(s, "tiny_q8", "Hello", 4);
    assert_eq!((ids.len(), finish.as_str()), (4, "length"));
    assert!(
        s.stderr()
            .contains("quantizing float weight matrices to q8_0 while loading"),
        "no conversion logged"
    );
    assert_eq!(s.req("DELETE", "/models/tiny_q8", &[], b"").status, 200);
    // A DJL method kiln cannot run: 400 at load, naming what kiln supports.
    let awq = dir.join("tiny_awq");
    write(
        &awq.join("serving.properties"),
        &format!(
            "engine=Python\noption.model_id={}\noption.quantize=awq\n",
            tiny.display()
        ),
    );
    let r = register(s, &format!("url={}", url_escape(&awq)));
    assert_djl_error(&r, 400, "option.quantize = 'awq'");
    let msg = r.json()["error"].as_str().unwrap().to_string();
    assert!(msg.contains("q8_0, q4_0, q4_1, q4_k, q6_k"), "{msg}");
    assert_eq!(s.get("/models/tiny_awq").status, 404);
}

#[test]
fn registering_a_directory_with_model_py_warns_once() {
    let s = shared();
    let _g = models_lock();
    let dir = tempdir("modelpy-").join("with_handler");
    write(
        &dir.join("serving.properties"),
        &format!(
            "engine=Python\noption.model_id={}\n",
            model_file().display()
        ),
    );
    write(&dir.join("model.py"), MODEL_PY);
    let r = register(s, &format!("url={}", url_escape(&dir)));
    assert_eq!(r.status, 200, "{}", r.text());
    let d = s.get("/models/with_handler").json();
    assert!(
        d[0]["models"][0]["warnings"]
            .to_string()
            .contains("model.py"),
        "{d}"
    );
    let needle = dir.join("model.py").display().to_string();
    let lines: Vec<String> = s
        .stderr()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("cannot run"),
        "{}",
        lines[0]
    );
    let r = s.req("DELETE", "/models/with_handler", &[], b"");
    assert_eq!(r.status, 200);
}

#[test]
fn broken_http_is_refused_and_the_server_keeps_serving() {
    use std::io::{Read, Write};
    let s = shared();
    let cases: [&[u8]; 4] = [
        b"GARBAGE\r\n\r\n",
        b"POST /predictions/default HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /predictions/default HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n",
        b"POST /predictions/default HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"inputs\":",
    ];
    for raw in cases {
        let mut c = std::net::TcpStream::connect(s.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c.write_all(raw).unwrap();
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        let head = String::from_utf8_lossy(&out);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(400);
        assert!(
            (400..500).contains(&status),
            "{:?}: {head}",
            String::from_utf8_lossy(raw)
        );
    }
    assert!(!greedy(s, "default", "Hello", 2).2.is_empty());
}

#[test]
fn delete_drains_in_flight_requests_first() {
    let s = shared();
    let _g = models_lock();
    let file = url_escape(&model_file());
    let r = register(s, &format!("url={file}&model_name=drain_me"));
    assert_eq!(r.status, 200, "{}", r.text());
    let n = 40;
    let t0 = Instant::now();
    let mut st = s.stream(
        "/predictions/drain_me",
        &[("Content-Type", "application/json")],
        &json!({"inputs": "Count to one hundred:", "stream": true,
            "parameters": {"max_new_tokens": n, "ignore_eos": true, "details": true}}),
    );
    assert_eq!(st.status, 200);
    let first = st.next_json_line().expect("a first token");
    assert!(first["token"]["id"].is_u64());
    let port = s.port;
    let deleter = std::thread::spawn(move || {
        let r = support::request(port, "DELETE", "/models/drain_me", &[], b"");
        (r, Instant::now())
    });
    // The name goes at once: new requests get 404 while the stream goes on.
    assert!(eventually(Duration::from_secs(5), || {
        (s.get("/models/drain_me").status == 404).then_some(())
    })
    .is_some());
    let (tokens, last) = read_lmi(&mut st, vec![first]);
    let stream_done = Instant::now();
    assert_eq!(tokens.len(), n, "the stream was cut short");
    assert_eq!(last["details"]["finish_reason"], "length", "{last}");
    let (r, deleted) = deleter.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        deleted + Duration::from_millis(100) >= stream_done,
        "DELETE answered {:?} before the stream finished ({:?} in)",
        stream_done - deleted,
        stream_done - t0
    );
}

#[test]
fn server_metrics_have_engine_series_and_route_counters() {
    let s = shared();
    let _g = models_lock();
    let r = s.get("/server/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = r.text();
    assert_eq!(
        metric_value(
            &text,
            r#"kiln_model_ready{model="default",state="Healthy"}"#
        ),
        Some(1.0)
    );
    for series in [
        "kiln_kv_blocks_total",
        "kiln_kv_blocks_used",
        "kiln_queue_length",
        "kiln_running_sequences",
        "kiln_generated_tokens_total",
        "kiln_requests_finished_total",
        "kiln_prompt_tokens_total",
    ] {
        assert!(
            metric_value(&text, &format!("{series}{{model=\"default\"}}")).is_some(),
            "no {series}:\n{text}"
        );
    }
    assert!(text.contains("# TYPE kiln_time_to_first_token_seconds histogram"));
    assert!(text.contains(r#"kiln_inter_token_latency_seconds_bucket{model="default",le="+Inf"}"#));
    assert!(model_metric(s, "kiln_kv_blocks_total", "default") > 0.0);

    let pings = |s: &Server| {
        s.metric(r#"kiln_http_requests_total{route="/ping",status="200"}"#)
            .unwrap_or(0.0)
    };
    let before = pings(s);
    assert_eq!(s.get("/ping").status, 200);
    assert!(
        eventually(Duration::from_secs(2), || (pings(s) >= before + 1.0)
            .then_some(()))
        .is_some(),
        "the /ping counter did not move"
    );
    let gen0 = model_metric(s, "kiln_generated_tokens_total", "default");
    lmi(
        s,
        "/predictions/default",
        json!({"inputs": "Hi", "parameters": {"max_new_tokens": 5, "ignore_eos": true}}),
    );
    assert!(model_metric(s, "kiln_generated_tokens_total", "default") >= gen0 + 5.0);
    let r = s.get("/server/metrics").text();
    assert!(
        metric_value(
            &r,
            r#"kiln_http_requests_total{route="/predictions/{model}",status="200"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{r}"
    );
    // Requests to no route are counted too, under one label (not one per path).
    assert_eq!(s.get("/metrics-probe/no/such/route").status, 404);
    let unmatched = |s: &Server| {
        s.metric(r#"kiln_http_requests_total{route="unmatched",status="404"}"#)
            .unwrap_or(0.0)
    };
    assert!(
        eventually(Duration::from_secs(2), || (unmatched(s) >= 1.0)
            .then_some(()))
        .is_some(),
        "no counter for unmatched routes"
    );
    assert!(!s.get("/server/metrics").text().contains("metrics-probe"));
}

// ---------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------

#[test]
fn client_disconnect_cancels_generation_and_frees_kv_blocks() {
    let s = shared();
    let _g = models_lock();
    let file = url_escape(&model_file());
    let r = register(s, &format!("url={file}&model_name=cancel_me"));
    assert_eq!(r.status, 200, "{}", r.text());
    let used = |s: &Server| model_metric(s, "kiln_kv_blocks_used", "cancel_me");
    let finished = |s: &Server| model_metric(s, "kiln_requests_finished_total", "cancel_me");
    let generated = |s: &Server| model_metric(s, "kiln_generated_tokens_total", "cancel_me");

    let cases: [(&str, Value); 2] = [
        (
            "/predictions/cancel_me",
            json!({"inputs": "Tell me everything about the history of Rome.", "stream": true,
                "parameters": {"max_new_tokens": 1000, "ignore_eos": true}}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "cancel_me", "stream": true, "max_tokens": 1000, "ignore_eos": true,
                "messages": [{"role": "user", "content": "Tell me everything about Rome."}]}),
        ),
    ];
    // A non-streamed request whose client goes away before the answer.
    {
        let f0 = finished(s);
        let st = s.stream_open(
            "/predictions/cancel_me",
            &json!({"inputs": "Tell me everything about the history of Rome.",
                "parameters": {"max_new_tokens": 1000, "ignore_eos": true}}),
        );
        assert!(
            eventually(Duration::from_secs(10), || (used(s) > 0.0).then_some(())).is_some(),
            "the request never started"
        );
        drop(st);
        let freed = eventually(Duration::from_secs(10), || {
            (used(s) == 0.0 && finished(s) == f0 + 1.0).then_some(())
        });
        assert!(
            freed.is_some(),
            "non-streamed: blocks used {} after the client left",
            used(s)
        );
    }
    for (path, body) in cases {
        assert_eq!(used(s), 0.0);
        let f0 = finished(s);
        let g0 = generated(s);
        let mut st = s.stream(path, &[("Content-Type", "application/json")], &body);
        assert_eq!(st.status, 200);
        // Three tokens in (the chat stream starts with a role chunk sent
        // before the engine has done anything).
        let mut tokens = 0;
        while tokens < 3 {
            let piece = if path.starts_with("/v1/") {
                st.next_event().expect("an event")
            } else {
                st.next_json_line().expect("a line").to_string()
            };
            if piece.contains("\"token\"")
                || (piece.contains("\"content\":\"") && !piece.contains("\"role\""))
            {
                tokens += 1;
            }
        }
        assert!(used(s) > 0.0, "{path}: no KV blocks held while generating");
        st.disconnect();
        let freed = eventually(Duration::from_secs(10), || {
            (used(s) == 0.0 && finished(s) == f0 + 1.0).then_some(())
        });
        assert!(
            freed.is_some(),
            "{path}: blocks used {} and finished {} (was {f0}) after the client left",
            used(s),
            finished(s)
        );
        let g1 = generated(s);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(generated(s), g1, "{path}: still generating");
        assert!(g1 - g0 < 500.0, "{path}: generated {} tokens", g1 - g0);
        let d = s.get("/models/cancel_me").json();
        assert_eq!(d[0]["models"][0]["kiln"]["kvCache"]["blocksUsed"], 0);
    }
    let r = s.req("DELETE", "/models/cancel_me", &[], b"");
    assert_eq!(r.status, 200);
}

// ---------------------------------------------------------------------------
// API keys, CORS, limits, logs (the guarded server)
// ---------------------------------------------------------------------------

#[test]
fn cors_is_off_by_default() {
    let s = shared();
    let r = s.req("GET", "/v1/models", &[("Origin", ALLOWED_ORIGIN)], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), None);
    let r = s.req(
        "OPTIONS",
        "/v1/chat/completions",
        &[
            ("Origin", ALLOWED_ORIGIN),
            ("Access-Control-Request-Method", "POST"),
        ],
        b"",
    );
    assert_eq!(r.header("access-control-allow-origin"), None);
    assert!(r.status >= 400, "{}", r.status);
}

#[test]
fn cors_allows_the_configured_origin() {
    let (s, _) = guarded();
    let r = s.req("GET", "/ping", &[("Origin", ALLOWED_ORIGIN)], b"");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some(ALLOWED_ORIGIN)
    );
    let r = s.req("GET", "/ping", &[("Origin", "http://other.example")], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), None);
    // A browser's preflight carries no key and must still be answered.
    let r = s.req(
        "OPTIONS",
        "/v1/chat/completions",
        &[
            ("Origin", ALLOWED_ORIGIN),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization,content-type",
            ),
        ],
        b"",
    );
    assert_eq!(r.status, 200, "{:?} {}", r.headers, r.text());
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some(ALLOWED_ORIGIN)
    );
    assert!(r
        .header("access-control-allow-methods")
        .is_some_and(|m| m.contains("POST")));
    // Actual responses carry it too, with the key.
    let r = s.req(
        "GET",
        "/v1/models",
        &[("Origin", ALLOWED_ORIGIN), AUTH],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some(ALLOWED_ORIGIN)
    );
}

#[test]
fn api_key_is_required_on_every_route_but_ping() {
    let (s, _) = guarded();
    let lmi_body = br#"{"inputs": "Hi", "parameters": {"max_new_tokens": 2}}"#.to_vec();
    // (method, path, body, status with the key)
    let routes: Vec<(&str, String, Vec<u8>, u16)> = vec![
        ("GET", "/server/metrics".into(), vec![], 200),
        ("POST", "/predictions/default".into(), lmi_body.clone(), 200),
        ("POST", "/predictions/default/1".into(), lmi_body.clone(), 200),
        ("POST", "/invocations".into(), lmi_body.clone(), 200),
        ("POST", "/models/default/invoke".into(), lmi_body.clone(), 200),
        ("GET", "/models".into(), vec![], 200),
        ("GET", "/models/default".into(), vec![], 200),
        ("PUT", "/models/default?max_worker=2".into(), vec![], 200),
        // (a url that does not exist: nothing is registered, which would
        // change what /ping and /invocations answer for the other tests)
        // (outside the model store and the cache: refused, whether it exists or not)
        ("POST", "/models?url=/nonexistent/model.gguf&model_name=auth_probe".into(), vec![], 403),
        ("DELETE", "/models/no_such".into(), vec![], 404),
        ("GET", "/v1/models".into(), vec![], 200),
        ("POST", "/v1/completions".into(), br#"{"model": "default", "prompt": "Hi", "max_tokens": 2}"#.to_vec(), 200),
        ("POST", "/v1/chat/completions".into(), br#"{"model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}"#.to_vec(), 200),
        ("GET", "/no/such/route".into(), vec![], 404),
    ];
    let ct = ("Content-Type", "application/json");
    for (method, path, body, ok) in &routes {
        for bad in [
            None,
            Some("Bearer wrong"),
            Some("k-test-123"),
            Some("Basic k-test-123"),
        ] {
            let mut h = vec![ct];
            if let Some(b) = bad {
                h.push(("Authorization", b));
            }
            let r = s.req(method, path, &h, body);
            assert_eq!(r.status, 401, "{method} {path} with {bad:?}: {}", r.text());
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
            let v = r.json();
            let msg = if path.starts_with("/v1/") {
                v["error"]["message"].as_str()
            } else {
                v["error"].as_str()
            };
            assert!(msg.is_some_and(|m| m.contains("API key")), "{v}");
        }
        let r = s.req(method, path, &[ct, AUTH], body);
        assert_eq!(r.status, *ok, "{method} {path} with the key: {}", r.text());
    }
    assert_eq!(s.get("/ping").status, 200, "/ping needs no key");
}

#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let (s, _) = guarded();
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let auth = format!("{scheme} {KEY}");
        let r = s.req("GET", "/v1/models", &[("Authorization", &auth)], b"");
        assert_eq!(r.status, 200, "{auth}: {}", r.text());
    }
}

#[test]
fn cors_preflight_names_authorization_and_content_type() {
    let (s, _) = guarded();
    let r = s.req(
        "OPTIONS",
        "/v1/chat/completions",
        &[
            ("Origin", ALLOWED_ORIGIN),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization,content-type",
            ),
        ],
        b"",
    );
    assert_eq!(r.status, 200, "{:?}", r.headers);
    // `*` does not cover Authorization in browsers: the names must be listed.
    let allowed = r
        .header("access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let names: Vec<&str> = allowed.split(',').map(str::trim).collect();
    for h in ["authorization", "content-type", "accept"] {
        assert!(names.contains(&h), "{h} missing from {allowed:?}");
    }
    assert!(!names.contains(&"*"), "{allowed:?}");
}

#[test]
fn oversized_bodies_get_413_json() {
    let (s, _) = guarded();
    let big = json!({"inputs": "a ".repeat(3000)}).to_string();
    let r = s.req(
        "POST",
        "/predictions/default",
        &[("Content-Type", "application/json"), AUTH],
        big.as_bytes(),
    );
    assert_djl_error(&r, 413, "max-request-bytes");
    let big = json!({"model": "default", "prompt": "a ".repeat(3000)}).to_string();
    let r = s.req(
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json"), AUTH],
        big.as_bytes(),
    );
    assert_openai_error(&r, 413, "limit");
    // Still serving.
    let r = s.req(
        "POST",
        "/predictions/default",
        &[("Content-Type", "application/json"), AUTH],
        br#"{"inputs": "Hi", "parameters": {"max_new_tokens": 2}}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn request_timeout_finishes_with_reason_deadline() {
    let (s, _) = guarded();
    let t0 = Instant::now();
    let r = s.req(
        "POST",
        "/predictions/default",
        &[("Content-Type", "application/json"), AUTH],
        json!({"inputs": "Count:", "parameters": {"max_new_tokens": 600, "ignore_eos": true, "details": true}})
            .to_string()
            .as_bytes(),
    );
    let took = t0.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        v["details"]["finish_reason"], "deadline",
        "{}",
        v["details"]
    );
    let n = v["details"]["generated_tokens"].as_u64().unwrap();
    assert!(n < 600, "{n}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "{took:?}"
    );
    // Streams end with it too.
    let mut st = s.stream(
        "/predictions/default",
        &[("Content-Type", "application/json"), AUTH],
        &json!({"inputs": "Count:", "stream": true,
            "parameters": {"max_new_tokens": 600, "ignore_eos": true, "details": true}}),
    );
    let (_, last) = read_lmi(&mut st, Vec::new());
    assert_eq!(last["details"]["finish_reason"], "deadline", "{last}");
}

#[test]
fn access_log_has_a_line_per_request_and_serving_log_is_written() {
    let (s, logs) = guarded();
    let n = 5;
    let r = s.req(
        "POST",
        "/predictions/default/access-probe",
        &[("Content-Type", "application/json"), AUTH],
        json!({"inputs": "Hello there",
            "parameters": {"max_new_tokens": n, "ignore_eos": true, "details": true}})
        .to_string()
        .as_bytes(),
    );
    assert_eq!(r.status, 200);
    // This server's 1 s request timeout may cut it short on a busy machine.
    let n = r.json()["details"]["generated_tokens"].as_u64().unwrap();
    assert!((1..=5).contains(&n));
    let tokens_in = prompt_tokens_guarded(s, "Hello there");
    let r = s.req("GET", "/models/unauthorized-probe", &[], b"");
    assert_eq!(r.status, 401);
    let mut st = s.stream(
        "/predictions/default/stream-probe",
        &[("Content-Type", "application/json"), AUTH],
        &json!({"inputs": "Hello there", "stream": true, "parameters": {"max_new_tokens": 4, "ignore_eos": true}}),
    );
    let (streamed, _) = read_lmi(&mut st, Vec::new());

    let find = |needle: &str| {
        eventually(Duration::from_secs(5), || {
            let log = std::fs::read_to_string(logs.join("access.log")).ok()?;
            log.lines().find(|l| l.contains(needle)).map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no access.log line for {needle}"))
    };
    let l = find("\"POST /predictions/default/access-probe\"");
    assert!(l.contains("model=default"), "{l}");
    assert!(l.contains("status=200"), "{l}");
    assert!(l.contains(&format!("tokens_in={tokens_in} ")), "{l}");
    assert!(l.contains(&format!("tokens_out={n} ")), "{l}");
    let latency: f64 = l
        .split("latency_ms=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no latency: {l}"));
    assert!(latency > 0.0, "{l}");
    let l = find("\"GET /models/unauthorized-probe\"");
    assert!(l.contains("status=401") && l.contains("model=-"), "{l}");
    let l = find("\"POST /predictions/default/stream-probe\"");
    assert!(
        l.contains("status=200") && l.contains(&format!("tokens_out={} ", streamed.len())),
        "{l}"
    );

    let serving = std::fs::read_to_string(logs.join("serving.log")).expect("serving.log");
    assert!(
        serving.contains("listening on http://127.0.0.1:"),
        "{serving}"
    );
    assert!(serving.contains("ready in"), "{serving}");
}

fn prompt_tokens_guarded(s: &Server, prompt: &str) -> u64 {
    let r = s.req(
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json"), AUTH],
        json!({"model": "default", "prompt": prompt, "max_tokens": 1})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["usage"]["prompt_tokens"].as_u64().unwrap()
}

#[test]
fn invocations_without_a_name_uses_the_only_model() {
    let (s, _) = guarded();
    let r = s.req(
        "POST",
        "/invocations",
        &[("Content-Type", "application/json"), AUTH],
        br#"{"inputs": "Hi", "parameters": {"max_new_tokens": 3}}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["generated_text"].is_string());
}

// ---------------------------------------------------------------------------
// The model store
// ---------------------------------------------------------------------------

#[test]
fn model_store_in_the_reference_layout_serves_with_one_model_py_warning() {
    let (s, logs) = store();
    let v = s.get("/models").json();
    let models: Vec<(String, String)> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["modelName"].as_str().unwrap().to_string(),
                m["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        models,
        [
            ("broken".to_string(), "Failed".to_string()),
            ("opt13b".to_string(), "Healthy".to_string()),
            ("tiny".to_string(), "Healthy".to_string())
        ]
    );
    // The reference request against the reference model name.
    let r = s.post_json(
        "/predictions/opt13b",
        &json!({"seq_length": 24, "text": ["Hello, I am a language model,", "Welcome to Amazon Elastic Compute Cloud,"]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().as_array().map(Vec::len), Some(2));
    // Its properties are reported, with warnings for what kiln does not do.
    let d = s.get("/models/opt13b").json();
    assert_eq!(
        d[0]["models"][0]["properties"]["option.tensor_parallel_degree"], "2",
        "{d}"
    );
    assert_eq!(
        d[0]["models"][0]["kiln"]["maxModelLen"], 512,
        "option.n_positions: {d}"
    );
    let warnings = d[0]["models"][0]["warnings"].to_string();
    assert!(warnings.contains("tensor_parallel_degree"), "{warnings}");
    assert!(warnings.contains("model.py"), "{warnings}");
    // With a 16 MiB KV cache (364 tokens), a chat request without max_tokens
    // is still served (the default is capped by what the cache can hold).
    let r = s.post_json(
        "/v1/chat/completions",
        &json!({"model": "opt13b", "temperature": 0, "stop": [".", "\n"],
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // Exactly one warning that model.py is not run, on stderr and in serving.log.
    let about = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains("model.py"))
            .map(str::to_string)
            .collect()
    };
    let stderr = about(&s.stderr());
    assert_eq!(stderr.len(), 1, "{stderr:#?}");
    assert!(stderr[0].contains("WARN"), "{}", stderr[0]);
    assert!(stderr[0].contains("opt13b/model.py"), "{}", stderr[0]);
    assert!(stderr[0].contains("cannot run"), "{}", stderr[0]);
    let serving = std::fs::read_to_string(logs.join("serving.log")).unwrap();
    assert_eq!(about(&serving).len(), 1, "{serving}");
}

#[test]
fn a_failed_model_is_named_by_ping_without_failing_it_for_the_others() {
    let (s, _) = store();
    let r = s.get("/ping");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "Healthy");
    let failed = v["failed"].as_object().unwrap();
    assert_eq!(failed.keys().collect::<Vec<_>>(), ["broken"], "{v}");
    assert!(
        failed["broken"].as_str().unwrap().contains("model.gguf"),
        "{v}"
    );
    // Requests to it get 424 with the reason; the others still serve.
    let r = s.post_json("/predictions/broken", &json!({"inputs": "Hi"}));
    assert_djl_error(&r, 424, "failed to load");
    let r = s.post_json(
        "/predictions/opt13b",
        &json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let (s, _) = store();
    // tiny runs one sequence and queues one more; the rest are turned away.
    let port = s.port;
    let workers: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                support::request(
                    port,
                    "POST",
                    "/predictions/tiny",
                    &[("Content-Type", "application/json")],
                    json!({"inputs": format!("Request number {i}:"),
                        "parameters": {"max_new_tokens": 24, "ignore_eos": true}})
                    .to_string()
                    .as_bytes(),
                )
            })
        })
        .collect();
    let results: Vec<Response> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.status == 200).count();
    let full: Vec<&Response> = results.iter().filter(|r| r.status == 503).collect();
    assert_eq!(
        ok + full.len(),
        8,
        "{:?}",
        results
            .iter()
            .map(|r| (r.status, r.text()))
            .collect::<Vec<_>>()
    );
    assert!(ok >= 1, "nothing was served");
    assert!(!full.is_empty(), "no request was turned away");
    for r in full {
        assert_djl_error(r, 503, "queue is full");
        let after: u64 = r
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .unwrap();
        assert!(after >= 1);
    }
    // And once the queue drains, it serves again.
    let r = s.post_json(
        "/predictions/tiny",
        &json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_request_larger_than_the_kv_cache_is_507() {
    let (s, _) = store();
    let r = s.post_json(
        "/predictions/tiny",
        &json!({"inputs": "Hi", "parameters": {"max_new_tokens": 5000}}),
    );
    assert_djl_error(&r, 507, "KV cache");
}

#[test]
fn a_bad_serving_properties_fails_its_model_and_the_rest_serve() {
    let root = tempdir("badprops-");
    let model = model_file();
    // (file contents, what the model's error must mention)
    let cases = [
        (
            format!(
                "engine=Python\noption.model_id={}\noption.max_rolling_batch_size=lots\n",
                model.display()
            ),
            vec!["option.max_rolling_batch_size", "lots", ":3"],
        ),
        (
            "engine=Python\noption.model_id=/nonexistent/opt-13b\n".to_string(),
            vec!["option.model_id", "/nonexistent/opt-13b", ":2"],
        ),
        (
            format!("option.model_id={}\noption.dtype=fp8\n", model.display()),
            vec!["option.dtype", "fp8"],
        ),
    ];
    let store = root.join("store");
    write(
        &store.join("good/serving.properties"),
        &format!("option.model_id={}\n", model.display()),
    );
    let mut props = Vec::new();
    for (i, (text, _)) in cases.iter().enumerate() {
        let p = store.join(format!("bad{i}/serving.properties"));
        write(&p, text);
        props.push(p);
    }
    let s = Server::ready(Opts::args(&[
        "--model-store",
        store.to_str().unwrap(),
        "--log-dir",
        root.join("logs").to_str().unwrap(),
        "--kv-cache-mib",
        "16",
    ]));
    for (i, (_, needles)) in cases.iter().enumerate() {
        let d = s.get(&format!("/models/bad{i}")).json();
        assert_eq!(d[0]["models"][0]["status"], "Failed", "{d}");
        let msg = d[0]["models"][0]["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(&props[i].display().to_string()),
            "case {i}: the file is not named: {msg}"
        );
        for n in needles {
            assert!(msg.contains(n), "case {i}: {n:?} not in {msg}");
        }
        assert!(s.stderr().contains(&format!("bad{i}")), "{}", s.stderr());
        let r = s.post_json(&format!("/predictions/bad{i}"), &json!({"inputs": "Hi"}));
        assert_djl_error(&r, 424, "failed to load");
    }
    let r = s.post_json(
        "/predictions/good",
        &json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = s.get("/ping").json();
    assert_eq!(v["status"], "Healthy", "{v}");
    assert_eq!(v["failed"].as_object().map(|f| f.len()), Some(3), "{v}");
}

// ---------------------------------------------------------------------------
// Lifecycle: loading, SIGTERM
// ---------------------------------------------------------------------------

#[test]
fn ping_is_503_while_startup_models_load_and_200_naming_models_registered_later() {
    // At start-up the server is not ready until its models load (caught
    // here when the load is slower than the first ping; sources.rs holds a
    // start-up download to see it every time).
    let s = Server::start(Opts::args(&[
        "--kv-cache-mib",
        "16",
        "--management-on-inference-port",
    ]));
    let p = s.get("/ping");
    if p.status != 200 {
        assert_eq!(p.status, 503, "{}", p.text());
        assert!(p.header("retry-after").is_some());
        assert_eq!(p.json()["status"], "Loading", "{}", p.text());
        assert_eq!(p.json()["loading"], json!(["default"]), "{}", p.text());
    }
    s.wait_ready();
    // A model registered later does not take the server out of service
    // while it loads (DJL's ping answers 200 while one is pending): it is
    // named under `loading`, and its own requests get 503.
    let file = url_escape(&model_file());
    let mut seen = false;
    for attempt in 0..5 {
        let name = format!("late{attempt}");
        let r = register(
            &s,
            &format!("url={file}&model_name={name}&synchronous=false"),
        );
        assert_eq!(r.status, 202, "{}", r.text());
        let p = s.get("/ping");
        let d = s.get(&format!("/models/{name}")).json();
        let q = s.post_json(&format!("/predictions/{name}"), &json!({"inputs": "Hi"}));
        assert_eq!(p.status, 200, "{}", p.text());
        let v = p.json();
        assert_eq!(v["status"], "Healthy", "{v}");
        assert_eq!(d[0]["models"][0]["loadedAtStartup"], false, "{d}");
        if v.get("loading").is_none() {
            // Loading finished before we asked: try again.
            continue;
        }
        assert_eq!(v["loading"], json!([name]), "{v}");
        if d[0]["models"][0]["status"] == "Loading" {
            assert_djl_error(&q, 503, "loading");
        }
        seen = true;
        break;
    }
    assert!(seen, "never saw /ping name a model while it loaded");
    let d = s.get("/models/default").json();
    assert_eq!(d[0]["models"][0]["loadedAtStartup"], true, "{d}");
}

#[test]
fn sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0() {
    let s = Server::ready(Opts::args(&[
        "--kv-cache-mib",
        "16",
        "--grace-period",
        "20",
    ]));
    let n = 40;
    let mut st = s.stream(
        "/predictions/default",
        &[("Content-Type", "application/json")],
        &json!({"inputs": "Count to one hundred:", "stream": true,
            "parameters": {"max_new_tokens": n, "ignore_eos": true, "details": true}}),
    );
    let first = st.next_json_line().expect("a first token");
    s.signal("TERM");
    // New connections are refused once the server has seen the signal.
    let refused = eventually(Duration::from_secs(5), || {
        std::net::TcpStream::connect(s.addr())
            .is_err()
            .then_some(())
    });
    assert!(
        refused.is_some(),
        "still accepting connections after SIGTERM"
    );
    let (tokens, last) = read_lmi(&mut st, vec![first]);
    assert_eq!(tokens.len(), n, "the in-flight stream was cut short");
    assert_eq!(last["details"]["finish_reason"], "length");
    // Nothing is left in flight: it exits at once, not at the end of the grace period.
    let status = s
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("did not exit once idle:\n{}", s.stderr()));
    assert!(status.success(), "{status:?}\n{}", s.stderr());
    assert!(s.stderr().contains("shutting down"), "{}", s.stderr());
}

#[test]
fn sigterm_exits_0_when_the_grace_period_is_over() {
    let grace = 8;
    let s = Server::ready(Opts::args(&[
        "--kv-cache-mib",
        "256",
        "--grace-period",
        &grace.to_string(),
    ]));
    let stream = |n: usize| {
        s.stream(
            "/predictions/default",
            &[("Content-Type", "application/json")],
            &json!({"inputs": "Count to one thousand:", "stream": true,
                "parameters": {"max_new_tokens": n, "ignore_eos": true, "details": true}}),
        )
    };
    let (mut short, mut long) = (stream(10), stream(1400));
    let mut chat = s.stream(
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        &json!({"model": "default", "stream": true, "max_tokens": 1400, "ignore_eos": true,
            "messages": [{"role": "user", "content": "Count to one thousand."}]}),
    );
    // Without `details`: DJL's last line still says finish_reason "error".
    let mut bare = s.stream(
        "/predictions/default",
        &[("Content-Type", "application/json")],
        &json!({"inputs": "Count to one thousand:", "stream": true,
            "parameters": {"max_new_tokens": 1400, "ignore_eos": true}}),
    );
    let first = short.next_json_line().expect("a first token");
    assert!(long.next_json_line().is_some());
    assert!(chat.next_event().is_some());
    assert!(bare.next_json_line().is_some());
    let t0 = Instant::now();
    s.signal("TERM");
    let (tokens, last) = read_lmi(&mut short, vec![first]);
    assert_eq!(tokens.len(), 10, "the short stream was cut short");
    assert_eq!(last["details"]["finish_reason"], "length");
    // The long ones end when the grace period ends, each with a last line
    // saying so, and the process exits 0 then.
    let (tokens, last) = read_lmi(&mut long, Vec::new());
    assert!(tokens.len() < 1399, "{} tokens", tokens.len());
    assert_eq!(last["details"]["finish_reason"], "error", "{last}");
    assert!(
        last["error"]
            .as_str()
            .is_some_and(|e| e.contains("grace period")),
        "{last}"
    );
    // DJL (lmi_input_output_schema.md, "Error Responses"; output_formatter.py
    // get_details_dict; rolling_batch.py stop_on_any_exception): the stream
    // that failed after its 200 ends with details.finish_reason "error" and,
    // where no token came with the failure, the error token (id -1).
    let (_, last) = read_lmi(&mut bare, Vec::new());
    assert_eq!(last["details"]["finish_reason"], "error", "{last}");
    assert_eq!(last["token"]["id"], -1, "{last}");
    assert_eq!(last["code"], 424, "{last}");
    let rest = chat.rest();
    assert!(rest.contains("grace period"), "{rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    let status = s
        .wait_exit(Duration::from_secs(grace + 10))
        .unwrap_or_else(|| panic!("did not exit:\n{}", s.stderr()));
    let took = t0.elapsed();
    assert!(status.success(), "{status:?}\n{}", s.stderr());
    assert!(
        took < Duration::from_secs(grace + 2),
        "exited {took:?} after SIGTERM with a grace period of {grace} s"
    );
    assert!(
        s.stderr().contains("grace period of 8s is over"),
        "{}",
        s.stderr()
    );
}

#[test]
fn the_queue_size_of_file_models_comes_from_the_flag_or_the_environment() {
    let file = model_file().display().to_string();
    let queue = |s: &Server, name: &str| {
        s.get(&format!("/models/{name}")).json()[0]["models"][0]["jobQueueSize"].clone()
    };
    let s = Server::start(Opts::args(&[
        "--job-queue-size",
        "7",
        "--kv-cache-mib",
        "16",
    ]));
    assert_eq!(queue(&s, "default"), 7);
    drop(s);
    for (var, n) in [
        ("SERVING_JOB_QUEUE_SIZE", 5),
        ("MAX_CONCURRENT_REQUESTS", 6),
    ] {
        let s = Server::start(Opts {
            args: [
                "--models",
                &format!("m={file}"),
                "--job-queue-size",
                "7",
                "--kv-cache-mib",
                "16",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            env: vec![(var.to_string(), n.to_string())],
            ..Opts::default()
        });
        assert_eq!(queue(&s, "m"), n, "{var}");
    }
}

#[test]
fn ping_stays_fast_while_huge_prompts_are_tokenized() {
    let s = Server::ready(Opts::args(&["--kv-cache-mib", "16"]));
    let port = s.port;
    // Four clients, each sending 3.9 MB prompts (refused as too long, after
    // tokenizing them) one after the other.
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(3_900_000 / 45);
    let body = json!({"inputs": prompt, "parameters": {"max_new_tokens": 1}}).to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (body, stop) = (body.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = support::request(
                        port,
                        "POST",
                        "/predictions/default",
                        &[("Content-Type", "application/json")],
                        body.as_bytes(),
                    );
                    // Too long: DJL's 424 for request validation.
                    assert_eq!(r.status, 424, "{}", r.text());
                    n += 1;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut times = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        let t = Instant::now();
        assert_eq!(s.get("/ping").status, 200);
        times.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let done: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    times.sort();
    let median = times[times.len() / 2];
    let worst = times[times.len() - 1];
    eprintln!(
        "/ping under {done} huge prompts: median {median:?}, worst {worst:?} of {}",
        times.len()
    );
    assert!(
        done >= 4,
        "the prompts were not being tokenized ({done} done)"
    );
    assert!(median < Duration::from_millis(50), "median {median:?}");
    assert!(worst < Duration::from_millis(500), "worst {worst:?}");
}
