//! Issue 13, point 5: DJL's LMI chat-completions schema documents `model`
//! as optional, so `/v1/chat/completions` and `/v1/completions` without it
//! are answered by the only model served; with several, the 400 lists the
//! names to choose from.

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
}
