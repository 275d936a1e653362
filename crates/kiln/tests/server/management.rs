//! Management: describe, scale, register, page and unregister; corrupt models,
//! `serving.properties` quantization, `model.py` warnings, broken HTTP,
//! draining on delete, and the server's metrics.

use super::*;

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
