//! The request funnel (issue 22, point 1) through the binary: an OpenAI
//! body is read by one dialect and checked by one funnel whichever route it
//! comes in on, so DJL's LMI routes and `/v1` give it the same answer, and
//! refuse the same bad values with the same message (OpenAI's 400 and error
//! shape on `/v1`, DJL's 424 and `{"error", "code"}` on the LMI routes).
//! The table of per-dialect rules is `kiln-server`'s
//! `dialect::tests::the_same_rules_reach_every_dialect`; the answers' shapes
//! on the LMI routes are `djl_fidelity.rs`'s
//! `openai_bodies_on_the_lmi_routes_get_openai_answers`.

mod support;

use serde_json::{json, Value};
use support::shared_server;

/// The LMI routes that take an OpenAI body, for the default model.
const LMI_ROUTES: [&str; 3] = [
    "/predictions/default",
    "/invocations?model_name=default",
    "/models/default/invoke",
];

/// The `/v1` route for a body: chat with `messages`, else completions.
fn v1_route(body: &Value) -> &'static str {
    if body.get("messages").is_some() {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    }
}

#[test]
fn an_openai_body_gets_the_same_answer_on_v1_and_on_the_lmi_routes() {
    let s = shared_server();
    let bodies = [
        json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
            "top_k": -1, "stop_token_ids": [], "ignore_eos": true}),
        json!({"messages": [{"role": "user", "content": "Name a colour."}],
            "max_completion_tokens": 5, "temperature": 0, "stop": ["\n\n"]}),
    ];
    for body in &bodies {
        let want = s.post_json(v1_route(body), body);
        assert_eq!(want.status, 200, "{body}: {}", want.text());
        let want = want.json();
        for path in LMI_ROUTES {
            let r = s.post_json(path, body);
            assert_eq!(r.status, 200, "{path} {body}: {}", r.text());
            let got = r.json();
            assert_eq!(got["object"], want["object"], "{path}: {got}");
            assert_eq!(got["choices"], want["choices"], "{path}: {got}");
            // The prompt is the same tokens; only the prefix cache's share
            // of it (`cached_tokens`) depends on what ran before.
            for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
                assert_eq!(got["usage"][k], want["usage"][k], "{path}: {got}");
            }
        }
    }
}

#[test]
fn an_openai_body_is_refused_alike_on_v1_and_on_the_lmi_routes() {
    let s = shared_server();
    let stops: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    let bodies = [
        json!({"prompt": "x", "temperature": 5}),
        json!({"prompt": "x", "top_p": 0}),
        json!({"prompt": "x", "max_tokens": 0}),
        json!({"prompt": "x", "max_completion_tokens": 0}),
        json!({"prompt": "x", "top_k": -2}),
        json!({"prompt": "x", "stop": stops}),
        json!({"prompt": "x", "min_p": 2}),
        json!({"prompt": "x", "n": 0}),
        json!({"messages": "hi"}),
        json!({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3}),
        json!({"messages": [{"role": "user", "content": "hi"}], "guided_grammar": "x"}),
    ];
    for body in &bodies {
        let v1 = s.post_json(v1_route(body), body);
        assert_eq!(v1.status, 400, "{body}: {}", v1.text());
        let message = v1.json()["error"]["message"].clone();
        assert!(message.as_str().is_some_and(|m| !m.is_empty()), "{body}");
        for path in LMI_ROUTES {
            let r = s.post_json(path, body);
            assert_eq!(r.status, 424, "{path} {body}: {}", r.text());
            let v = r.json();
            assert_eq!(v["code"], 424, "{path}: {v}");
            assert_eq!(v["error"], message, "{path} {body}");
        }
    }
}
