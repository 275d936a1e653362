//! The model store (`store()`): the reference layout, failed models named by
//! `/ping`, full queues, requests larger than the KV cache, bad
//! `serving.properties`.

use super::*;

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
