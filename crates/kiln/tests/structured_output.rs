//! Constrained decoding against the real binary on the default model
//! (SmolLM2-135M): OpenAI `response_format` (`json_schema`, `json_object`),
//! vLLM's `guided_*` fields and `structured_outputs` object, the same inside
//! LMI `parameters`, streaming, and the 400s for a schema that cannot be
//! compiled and for constraint fields kiln does not implement. Then the
//! attacks on the grammar compiler (issue 21, points 7 and 13): grammars too
//! large or too slow to compile, clients that hang up, a grammar that
//! panics llguidance or would overflow its stack, and constraints that
//! compile but cannot produce a token.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

fn ok(s: &Server, path: &str, body: &Value) -> Value {
    let r = s.post_json(path, body);
    assert_eq!(r.status, 200, "{path} {body}: {}", r.text());
    r.json()
}

/// Asserts a refusal (400 on OpenAI routes; 424, DJL's status for a bad
/// request, on LMI routes) whose message has every needle.
fn refused(s: &Server, path: &str, body: Value, needles: &[&str]) {
    let r = s.post_json(path, &body);
    let want = if path.starts_with("/v1/") { 400 } else { 424 };
    assert_eq!(r.status, want, "{body}: {}", r.text());
    let v = r.json();
    let msg = v["error"]["message"]
        .as_str()
        .or(v["error"].as_str())
        .unwrap_or_else(|| panic!("{v}"))
        .to_string();
    for n in needles {
        assert!(msg.contains(n), "{body}: {msg:?} should mention {n:?}");
    }
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150}
        },
        "required": ["name", "age"],
        "additionalProperties": false
    })
}

/// Checks `text` against [`person_schema`] by hand.
fn assert_person(text: &str) {
    let v: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("{text:?} is not an object"));
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["age", "name"], "{text}");
    let name = o["name"].as_str().unwrap_or_else(|| panic!("{text}"));
    assert!(name.chars().count() <= 12, "{text}");
    let age = o["age"].as_i64().unwrap_or_else(|| panic!("{text}"));
    assert!((0..=150).contains(&age), "{text}");
}

fn chat(messages: &str, extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": messages}],
        "max_tokens": 40,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn content(v: &Value) -> (String, String) {
    let c = &v["choices"][0];
    (
        c["message"]["content"].as_str().unwrap().to_string(),
        c["finish_reason"].as_str().unwrap().to_string(),
    )
}

#[test]
fn a_json_schema_response_format_gives_valid_json_greedy_and_sampled() {
    let s = shared_server();
    let rf = json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "person", "schema": person_schema(), "strict": true}}});
    let v = ok(
        s,
        "/v1/chat/completions",
        &chat("Describe a person as JSON.", rf.clone()),
    );
    let (text, reason) = content(&v);
    assert_person(&text);
    assert_eq!(reason, "stop", "{v}");
    for seed in 1..=4 {
        let mut body = chat("Invent a character.", rf.clone());
        body["temperature"] = json!(1.0);
        body["seed"] = json!(seed);
        let v = ok(s, "/v1/chat/completions", &body);
        let (text, reason) = content(&v);
        assert_person(&text);
        assert_eq!(reason, "stop", "{v}");
    }
}

#[test]
fn streaming_assembles_to_the_same_constrained_text() {
    let s = shared_server();
    let mut body = chat(
        "Who wrote Hamlet? Answer as JSON.",
        json!({"guided_json": person_schema()}),
    );
    let (want, _) = content(&ok(s, "/v1/chat/completions", &body));
    assert_person(&want);
    body["stream"] = json!(true);
    let mut st = s.stream(
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        &body,
    );
    let mut got = String::new();
    let mut reason = None;
    while let Some(e) = st.next_event() {
        if e == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&e).unwrap();
        let c = &v["choices"][0];
        if let Some(t) = c["delta"]["content"].as_str() {
            got.push_str(t);
        }
        if let Some(r) = c["finish_reason"].as_str() {
            reason = Some(r.to_string());
        }
    }
    assert_eq!(got, want);
    assert_eq!(reason.as_deref(), Some("stop"));
}

#[test]
fn json_object_regex_choice_and_grammar_hold_on_completions() {
    let s = shared_server();
    let completion = |extra: Value, max_tokens: u64| {
        let mut body = json!({"prompt": "Here is the answer:", "max_tokens": max_tokens,
            "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let v = ok(s, "/v1/completions", &body);
        let c = &v["choices"][0];
        (
            c["text"].as_str().unwrap().to_string(),
            c["finish_reason"].as_str().unwrap().to_string(),
        )
    };

    let v = ok(
        s,
        "/v1/chat/completions",
        &chat(
            "Give the capital of France as a JSON object with the key \"capital\".",
            json!({"response_format": {"type": "json_object"}}),
        ),
    );
    let (text, reason) = content(&v);
    let obj: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(obj.is_object(), "{text}");
    assert_eq!(reason, "stop");

    for extra in [
        json!({"guided_regex": "[0-9]{3}-[0-9]{4}"}),
        json!({"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}}),
    ] {
        let (text, reason) = completion(extra, 12);
        let b = text.as_bytes();
        assert_eq!(b.len(), 8, "{text:?}");
        assert!(
            b.iter().enumerate().all(|(i, c)| if i == 3 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }),
            "{text:?}"
        );
        assert_eq!(reason, "stop");
    }

    let choices = ["Paris", "London", "a city in Germany"];
    for extra in [
        json!({"guided_choice": choices}),
        json!({"structured_outputs": {"choice": choices}}),
    ] {
        let (text, reason) = completion(extra, 10);
        assert!(choices.contains(&text.as_str()), "{text:?}");
        assert_eq!(reason, "stop");
    }

    let grammar = "start: \"The answer is \" num \".\"\nnum: /[1-9][0-9]?/";
    let (text, reason) = completion(json!({"guided_grammar": grammar}), 12);
    let num = text
        .strip_prefix("The answer is ")
        .and_then(|t| t.strip_suffix('.'))
        .unwrap_or_else(|| panic!("{text:?}"));
    assert!(
        (1..=2).contains(&num.len()) && num.bytes().all(|c| c.is_ascii_digit()),
        "{text:?}"
    );
    assert_eq!(reason, "stop");
}

#[test]
fn lmi_parameters_take_the_same_constraints() {
    let s = shared_server();
    let choices = ["yes", "no"];
    let v = ok(
        s,
        "/invocations",
        &json!({"inputs": "Is the sky blue?", "parameters":
            {"max_new_tokens": 8, "guided_choice": choices, "details": true}}),
    );
    let text = v["generated_text"].as_str().unwrap();
    assert!(choices.contains(&text), "{v}");
    assert_eq!(v["details"]["finish_reason"], "eos_token", "{v}");

    let v = ok(
        s,
        "/invocations",
        &json!({"inputs": "Describe a person as JSON:", "parameters":
            {"max_new_tokens": 40, "response_format": {"type": "json_schema",
                "json_schema": {"name": "p", "schema": person_schema()}}}}),
    );
    assert_person(v["generated_text"].as_str().unwrap());
    refused(
        s,
        "/invocations",
        json!({"inputs": "x", "parameters": {"guided_decoding_backend": "xgrammar"}}),
        &["guided_decoding_backend"],
    );
}

#[test]
fn bad_constraints_are_400s_naming_the_problem() {
    let s = shared_server();
    let path = "/v1/chat/completions";
    let bad_type = json!({"type": "object", "properties": {"a": {"type": "strng"}}});
    refused(
        s,
        path,
        chat(
            "x",
            json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "bad", "schema": bad_type}}}),
        ),
        &["strng"],
    );
    refused(
        s,
        path,
        chat("x", json!({"guided_regex": "[0-9"})),
        &["invalid constraint"],
    );
    refused(
        s,
        path,
        chat("x", json!({"guided_grammar": "start: undefined_rule"})),
        &["undefined_rule"],
    );
    refused(
        s,
        path,
        chat("x", json!({"guided_whitespace_pattern": "[ ]*"})),
        &["guided_whitespace_pattern"],
    );
    refused(
        s,
        path,
        chat("x", json!({"structured_outputs": {"structural_tag": "{}"}})),
        &["structural_tag"],
    );
    refused(
        s,
        "/v1/completions",
        json!({"prompt": "x", "response_format": {"type": "json_schema",
            "json_schema": {"name": "p", "schema": {}, "unknown": 1}}}),
        &["unknown"],
    );
}

/// A Lark grammar of `n` distinct string alternatives, the shape that makes
/// llguidance's compile time grow faster than linearly (one lexeme each):
/// 150,000 took 45 s before kiln limited it.
fn alternatives(n: usize) -> String {
    let alts: Vec<String> = (0..n).map(|i| format!("\"w{i}\"")).collect();
    format!("start: {}", alts.join(" | "))
}

/// The message of an error body in either shape (OpenAI's or DJL's).
fn message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .or(v["error"].as_str())
        .unwrap_or_else(|| panic!("{v}"))
        .to_string()
}

/// Sends `body` to `/v1/completions` on `port` from a thread, timing it.
fn fire(port: u16, body: Value) -> std::thread::JoinHandle<(Response, Duration)> {
    std::thread::spawn(move || {
        let t = Instant::now();
        let r = request(
            port,
            "POST",
            "/v1/completions",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        );
        (r, t.elapsed())
    })
}

fn grammar_request(grammar: &str) -> Value {
    json!({"prompt": "Answer:", "max_tokens": 4, "temperature": 0, "guided_grammar": grammar})
}

/// The test server's compile budget: small, so that grammars of a few
/// hundred kilobytes (seconds to compile) run past it.
const BUDGET: f64 = 0.3;

#[test]
fn grammar_compiles_are_bounded_in_size_time_and_number_and_starve_nothing() {
    let s = Server::ready(Opts::args(&[
        "--kv-cache-mib",
        "64",
        "--max-constraint-bytes",
        "300000",
        "--constraint-compile-timeout",
        &BUDGET.to_string(),
        "--constraint-compiles",
        "2",
    ]));
    let too_slow = |r: &Response| {
        r.status == 400 && message(&r.json()).contains("--constraint-compile-timeout")
    };
    // Warm up: the first constrained request builds the token trie.
    let r = s.post_json("/v1/completions", &grammar_request("start: \"a\""));
    assert_eq!(r.status, 200, "{}", r.text());

    // The attack as sent (150,000 alternatives, 1.3 MB): refused
    // for its size before any compiling.
    let t = Instant::now();
    let r = s.post_json("/v1/completions", &grammar_request(&alternatives(150_000)));
    assert_eq!(r.status, 400, "{}", r.text());
    let msg = message(&r.json());
    assert!(msg.contains("--max-constraint-bytes"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // Two grammars under the size limit that take seconds to compile
    // (25,000 alternatives, 220 KB): each gets a 400 once its budget is
    // spent, while a plain request and a small grammar, sent meanwhile,
    // are answered at once.
    let slow = grammar_request(&alternatives(25_000));
    let attacks: Vec<_> = (0..2).map(|_| fire(s.port, slow.clone())).collect();
    std::thread::sleep(Duration::from_millis(50));
    let plain = fire(
        s.port,
        json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}),
    );
    let small = fire(
        s.port,
        grammar_request("start: \"The answer is \" num\nnum: /[1-9]/"),
    );
    for (name, h) in [("plain", plain), ("small grammar", small)] {
        let (r, took) = h.join().unwrap();
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert!(took < Duration::from_secs(3), "{name} took {took:?}");
        if name == "small grammar" {
            let text = r.json()["choices"][0]["text"].as_str().unwrap().to_string();
            assert!(text.starts_with("The answer is "), "{text:?}");
        }
    }
    for h in attacks {
        let (r, took) = h.join().unwrap();
        assert!(too_slow(&r), "{} {}", r.status, r.text());
        // Its budget, plus a wait for a place, plus slack for a busy CI.
        assert!(
            took < Duration::from_secs_f64(3.0 * BUDGET + 2.0),
            "{took:?}"
        );
    }
    assert!(
        // The server logs the line before it sends the 400, but the test's
        // stderr reader may see it a moment after the client has the answer.
        s.stderr_soon_contains(
            "stopped compiling a constraint after",
            Duration::from_secs(10)
        ),
        "{}",
        s.stderr()
    );

    // A client that hangs up: its compile is stopped (logged) and its place
    // given back, so a small grammar still compiles.
    let gone = s.stream_open("/v1/completions", &slow);
    std::thread::sleep(Duration::from_millis(50));
    drop(gone);
    let logged = eventually(Duration::from_secs(5), || {
        s.stderr().contains("its client went away").then_some(())
    });
    assert!(logged.is_some(), "{}", s.stderr());
    let r = s.post_json("/v1/completions", &grammar_request("start: \"ok\""));
    assert_eq!(r.status, 200, "{}", r.text());

    // More slow compiles at once than places free up for within twice the
    // budget: the ones left over get a clear 503 with Retry-After.
    let many: Vec<_> = (0..8).map(|_| fire(s.port, slow.clone())).collect();
    let mut busy = 0;
    for h in many {
        let (r, _) = h.join().unwrap();
        if r.status == 503 {
            busy += 1;
            assert_eq!(r.header("retry-after"), Some("1"), "{}", r.text());
            assert!(
                message(&r.json()).contains("compile at once"),
                "{}",
                r.text()
            );
        } else {
            assert!(too_slow(&r), "{} {}", r.status, r.text());
        }
    }
    assert!(busy >= 1, "no request was refused for lack of a place");
    // And the server still answers.
    assert_eq!(s.get("/ping").status, 200);
}

/// With one shared place held by a slow grammar and another queued behind
/// it, a small schema still compiles at once in the small lane's own place
/// (without it, it would wait for both slow compiles: seconds).
#[test]
fn small_constraints_are_not_starved_by_slow_grammars() {
    let s = Server::ready(Opts::args(&[
        "--kv-cache-mib",
        "64",
        "--max-constraint-bytes",
        "600000",
        "--constraint-compile-timeout",
        "20",
        "--constraint-compiles",
        "1",
    ]));
    let r = s.post_json("/v1/completions", &grammar_request("start: \"a\""));
    assert_eq!(r.status, 200, "{}", r.text());
    // Held open, not awaited: dropping them at the end stops their compiles.
    let slow = grammar_request(&alternatives(50_000));
    let attacks: Vec<_> = (0..2)
        .map(|_| s.stream_open("/v1/completions", &slow))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let r = s.post_json(
        "/v1/completions",
        &json!({"prompt": "Answer:", "max_tokens": 4, "temperature": 0,
                "guided_json": {"type": "object", "properties": {"a": {"type": "integer"}}}}),
    );
    let took = t.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    eprintln!("the small schema took {took:?}");
    assert!(
        took < Duration::from_secs(2),
        "the small schema took {took:?}"
    );
    drop(attacks);
    let stopped = eventually(Duration::from_secs(10), || {
        s.stderr().contains("its client went away").then_some(())
    });
    assert!(stopped.is_some(), "{}", s.stderr());
}

#[test]
fn a_grammar_that_panics_the_grammar_engine_is_a_clean_400() {
    // 66,000 rules: past llguidance's 16-bit symbol table, which it
    // asserts (a panic it catches, with a backtrace in the message).
    let mut g: String = "start: ".to_string();
    g.push_str(
        &(0..66_000)
            .map(|i| format!("r{i}"))
            .collect::<Vec<_>>()
            .join("|"),
    );
    g.push('\n');
    for i in 0..66_000 {
        g.push_str(&format!("r{i}: \"x\" \"y\"\n"));
    }
    let s = Server::ready(Opts::args(&[
        "--kv-cache-mib",
        "64",
        "--max-constraint-bytes",
        "2000000",
        "--constraint-compile-timeout",
        "60",
    ]));
    let r = s.post_json("/v1/completions", &grammar_request(&g));
    assert_eq!(r.status, 400, "{}", r.text());
    let msg = message(&r.json());
    assert!(msg.contains("cannot handle this constraint"), "{msg}");
    for leak in [
        "backtrace",
        ".rs:",
        "/rustc/",
        "glibc",
        "llguidance::",
        "panic",
    ] {
        assert!(!msg.contains(leak), "{leak:?} in {msg:?}");
    }
    // The details are in the log instead (which the test's reader thread
    // may see a moment after the answer, on a loaded machine).
    assert!(
        s.stderr_soon_contains("the grammar engine panicked", Duration::from_secs(10)),
        "{}",
        s.stderr()
    );
}

#[test]
fn a_deeply_nested_grammar_compiles_instead_of_crashing_the_server() {
    // 1,000 rules each nesting the next: llguidance's Lark compiler
    // recurses once per level, which overflowed a 2 MiB thread stack and
    // aborted the whole server.
    let s = shared_server();
    let mut g = String::from("start: r0\n");
    for i in 0..1000 {
        g.push_str(&format!("r{i}: \"a\" r{}\n", i + 1));
    }
    g.push_str("r1000: \"b\"\n");
    let v = ok(s, "/v1/completions", &grammar_request(&g));
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(!text.is_empty() && text.bytes().all(|b| b == b'a'), "{v}");
    assert_eq!(s.get("/ping").status, 200);
}

#[test]
fn constraints_that_cannot_produce_a_token_are_400s_at_compile_time() {
    let s = shared_server();
    let cycle = json!({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]});
    for (extra, needle) in [
        // Every object must hold another one: no finite output.
        (json!({"guided_json": cycle}), "Too many items"),
        (json!({"guided_json": {"$ref": "#"}}), "first token"),
        // Too large for the lexer.
        (json!({"guided_regex": "x{1000000}"}), "lexer"),
    ] {
        for path in ["/v1/completions", "/invocations"] {
            let body = if path == "/invocations" {
                let mut p = json!({"max_new_tokens": 8});
                for (k, v) in extra.as_object().unwrap() {
                    p[k] = v.clone();
                }
                json!({"inputs": "x", "parameters": p})
            } else {
                let mut b = json!({"prompt": "x", "max_tokens": 8});
                for (k, v) in extra.as_object().unwrap() {
                    b[k] = v.clone();
                }
                b
            };
            let r = s.post_json(path, &body);
            let v = r.json();
            if path == "/invocations" {
                // DJL's validation shape (djl_status).
                assert_eq!(r.status, 424, "{extra}: {v}");
                assert_eq!(v["code"], 424, "{v}");
            } else {
                assert_eq!(r.status, 400, "{extra}: {v}");
                assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
            }
            let msg = message(&v);
            assert!(msg.starts_with("invalid constraint"), "{msg}");
            assert!(msg.contains(needle), "{extra}: {msg}");
            // No parser dump.
            for dump in ["<state>", "<non-verbose", "Tokens:", "Parser:", "\n"] {
                assert!(!msg.contains(dump), "{dump:?} in {msg:?}");
            }
        }
    }
}

#[test]
fn a_constraint_failing_part_way_is_a_client_error_not_a_server_error() {
    // Any letter, then one of 3,000 alternatives: the first token is free,
    // and the second overflows llguidance's 2,000 items per row.
    let s = shared_server();
    let alts: Vec<String> = (0..3000).map(|i| format!("\"a{i:04}\"")).collect();
    let g = format!("start: /[a-z]/ ({})", alts.join(" | "));
    let r = s.post_json("/v1/completions", &grammar_request(&g));
    assert_eq!(r.status, 400, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    let msg = message(&v);
    assert!(msg.starts_with("constrained decoding failed"), "{msg}");
    assert!(msg.contains("max is 2000"), "{msg}");
    assert!(!msg.contains("<non-verbose"), "{msg}");
    // DJL's validation status and shape on the LMI routes.
    let r = s.post_json(
        "/invocations",
        &json!({"inputs": "Answer:", "parameters": {"max_new_tokens": 4, "guided_grammar": g}}),
    );
    assert_eq!(r.status, 424, "{}", r.text());
    assert_eq!(r.json()["code"], 424, "{}", r.text());
}
