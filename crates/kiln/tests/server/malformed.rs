//! Malformed requests get clear 4xx JSON errors and the server keeps serving.

use super::*;

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
