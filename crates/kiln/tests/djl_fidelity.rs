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

mod support;

use serde_json::json;
use support::{model_file, Opts, Server};

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
