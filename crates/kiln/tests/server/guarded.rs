//! API keys, CORS, body limits, request timeouts and logs, on the guarded
//! server (`guarded()`).

use super::*;

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
