//! What Kubernetes and its LLM routers read from a kiln pod, against the
//! real binary: `/metrics` with vLLM's series (the same figures as kiln's
//! own), `/health` and `/health/ready`, and which of them answer without an
//! API key.

mod support;

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        Server::ready(Opts {
            args: vec!["--kv-cache-mib".into(), "64".into()],
            watchdog: true,
            ..Opts::default()
        })
    })
}

/// Held by tests that compare counters before and after their requests.
static COUNTERS: Mutex<()> = Mutex::new(());

fn counters() -> MutexGuard<'static, ()> {
    COUNTERS.lock().unwrap_or_else(|e| e.into_inner())
}

const L: &str = r#"{model_name="default",engine="0"}"#;

fn metrics(s: &Server, path: &str) -> String {
    let r = s.get(path);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain")));
    r.text()
}

fn vllm(text: &str, name: &str) -> f64 {
    metric_value(text, &format!("{name}{L}")).unwrap_or_else(|| panic!("no {name}{L} in:\n{text}"))
}

#[test]
fn metrics_carry_vllm_names_with_kilns_figures() {
    let s = server();
    let _g = counters();
    let text = metrics(s, "/metrics");
    // kiln's own names stay, on both routes.
    for route in ["/metrics", "/server/metrics"] {
        let t = metrics(s, route);
        assert!(
            t.contains("kiln_kv_blocks_total{model=\"default\"}"),
            "{route}"
        );
        assert!(
            t.contains("# TYPE vllm:num_requests_waiting gauge"),
            "{route}"
        );
    }
    let blocks = metric_value(&text, r#"kiln_kv_blocks_total{model="default"}"#).unwrap();
    assert!(blocks > 0.0);
    let info = format!(
        r#"vllm:cache_config_info{{model_name="default",engine="0",block_size="16",num_gpu_blocks="{blocks}",enable_prefix_caching="True"}}"#
    );
    assert_eq!(metric_value(&text, &info), Some(1.0), "{text}");
    for (name, kind) in [
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:kv_cache_usage_perc", "gauge"),
        ("vllm:prompt_tokens_total", "counter"),
        ("vllm:generation_tokens_total", "counter"),
        ("vllm:prefix_cache_queries_total", "counter"),
        ("vllm:prefix_cache_hits_total", "counter"),
    ] {
        assert!(text.contains(&format!("# TYPE {name} {kind}")), "{name}");
    }
    let usage = vllm(&text, "vllm:kv_cache_usage_perc");
    assert!((0.0..=1.0).contains(&usage), "{usage}");

    // The counters move by what a request used, and prefix hits show up
    // when the same long prompt comes twice.
    let prompt = "The history of bread begins in the Neolithic era. ".repeat(8);
    let mut used = Vec::new();
    for _ in 0..2 {
        let before = metrics(s, "/metrics");
        let r = s.post_json(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": true}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let u = r.json()["usage"].clone();
        let prompt_tokens = u["prompt_tokens"].as_f64().unwrap();
        // The prefix counters are published when the engine's step ends,
        // which may be a moment after the last token went out.
        let after = eventually(Duration::from_secs(5), || {
            let t = metrics(s, "/metrics");
            (vllm(&t, "vllm:prefix_cache_queries_total")
                >= vllm(&before, "vllm:prefix_cache_queries_total") + prompt_tokens)
                .then_some(t)
        })
        .expect("the prefix-cache counters did not move");
        let delta = |n: &str| vllm(&after, n) - vllm(&before, n);
        assert_eq!(delta("vllm:prompt_tokens_total"), prompt_tokens);
        assert_eq!(delta("vllm:generation_tokens_total"), 3.0);
        assert_eq!(delta("vllm:prefix_cache_queries_total"), prompt_tokens);
        assert_eq!(
            delta("vllm:prefix_cache_hits_total"),
            u["prompt_tokens_details"]["cached_tokens"]
                .as_f64()
                .unwrap()
        );
        used.push(u);
    }
    assert!(
        used[1]["prompt_tokens_details"]["cached_tokens"].as_u64() >= Some(16),
        "{used:?}"
    );
}

#[test]
fn gauges_show_a_running_request_while_it_runs() {
    let s = server();
    let _g = counters();
    let mut st = s.stream(
        "/v1/completions",
        &[("Content-Type", "application/json")],
        &json!({"prompt": "Count slowly:", "max_tokens": 1000, "temperature": 0,
            "ignore_eos": true, "stream": true}),
    );
    assert!(st.next_event().is_some());
    let seen = eventually(Duration::from_secs(10), || {
        let t = metrics(s, "/metrics");
        (vllm(&t, "vllm:num_requests_running") == 1.0 && vllm(&t, "vllm:kv_cache_usage_perc") > 0.0)
            .then_some(t)
    });
    assert!(seen.is_some(), "the running request never showed");
    st.disconnect();
    let idle = eventually(Duration::from_secs(10), || {
        let t = metrics(s, "/metrics");
        (vllm(&t, "vllm:num_requests_running") == 0.0
            && vllm(&t, "vllm:num_requests_waiting") == 0.0
            && vllm(&t, "vllm:kv_cache_usage_perc") == 0.0)
            .then_some(())
    });
    assert!(idle.is_some(), "the gauges did not return to idle");
}

#[test]
fn health_is_live_and_ready_when_every_model_serves() {
    let s = server();
    let r = s.get("/health");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.get("/health/ready");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"status": "Ready", "ready": ["default"]}));
}

#[test]
fn ready_is_503_naming_a_model_that_cannot_serve() {
    let root = tempdir("routing-store-");
    write(
        &root.join("good/serving.properties"),
        &format!(
            "engine=Python\noption.model_id={}\n",
            model_file().display()
        ),
    );
    write(&root.join("broken/model.gguf"), "GGUF not a real model");
    let s = Server::start(Opts {
        args: vec![
            "--model-store".into(),
            root.display().to_string(),
            "--log-dir".into(),
            tempdir("routing-logs-").display().to_string(),
            "--kv-cache-mib".into(),
            "16".into(),
        ],
        ..Opts::default()
    });
    // The live probe answers while the models load.
    assert_eq!(s.get("/health").status, 200);
    let settled = eventually(Duration::from_secs(60), || {
        let v = s.get("/models").json();
        let states: Vec<Value> = v["models"]
            .as_array()?
            .iter()
            .map(|m| m["status"].clone())
            .collect();
        (states.len() == 2 && !states.contains(&json!("Loading"))).then_some(())
    });
    assert!(settled.is_some(), "{}", s.stderr());
    let r = s.get("/health/ready");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    let v = r.json();
    assert_eq!(v["ready"], json!(["good"]), "{v}");
    assert_eq!(v["not_ready"]["broken"]["status"], "Failed", "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("'broken' (Failed)"),
        "{v}"
    );
    // DJL's /ping keeps serving the working model.
    assert_eq!(s.get("/ping").status, 200);
    assert_eq!(s.get("/health").status, 200);

    // With no model at all, nothing can be served.
    let empty = tempdir("routing-empty-");
    let s = Server::start(Opts {
        args: vec![
            "--model-store".into(),
            empty.display().to_string(),
            "--log-dir".into(),
            tempdir("routing-logs-").display().to_string(),
        ],
        ..Opts::default()
    });
    let r = s.get("/health/ready");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap().contains("no model"));
}

#[test]
fn probes_and_router_metrics_need_no_api_key_but_the_rest_does() {
    let s = Server::ready(Opts {
        args: vec![
            "--api-key".into(),
            "k-route".into(),
            "--kv-cache-mib".into(),
            "16".into(),
        ],
        ..Opts::default()
    });
    for path in ["/health", "/health/ready", "/metrics", "/ping"] {
        assert_eq!(s.get(path).status, 200, "{path}");
    }
    assert_eq!(s.get("/server/metrics").status, 401);
    let r = s.post_json("/tokenize", &json!({"prompt": "a"}));
    assert_eq!(r.status, 401, "{}", r.text());
    // In OpenAI's shape, as the route's other errors.
    assert!(r.json()["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("API key")));
    let r = s.req(
        "GET",
        "/server/metrics",
        &[("Authorization", "Bearer k-route")],
        b"",
    );
    assert_eq!(r.status, 200);
}
