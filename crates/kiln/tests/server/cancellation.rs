//! Cancellation: a client that disconnects cancels its generation and frees
//! its KV blocks.

use super::*;

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
