//! The OpenAI API: models, completions, chat with usage and logprobs, and
//! streamed completions with several choices.

use super::*;

#[test]
fn openai_models_and_completions() {
    let s = shared();
    let r = s.get("/v1/models");
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "default" && m["object"] == "model"),
        "{v}"
    );

    let prompt = "The capital of France is";
    let r = s.post_json(
        "/v1/completions",
        &json!({"model": "default", "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "logprobs": 2, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "length");
    let u = &v["usage"];
    assert_eq!(u["completion_tokens"], 8);
    assert_eq!(u["prompt_tokens"].as_u64(), Some(prompt_tokens(s, prompt)));
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + 8)
    );
    let lp = &c["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 8, "{lp}");
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 8);
    assert_eq!(lp["top_logprobs"].as_array().map(Vec::len), Some(8), "{lp}");
    assert_eq!(
        lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect::<String>(),
        c["text"].as_str().unwrap()
    );
    for (top, chosen) in lp["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lp["token_logprobs"].as_array().unwrap())
    {
        let top = top.as_object().unwrap();
        assert!((1..=2).contains(&top.len()), "{top:?}");
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        // Greedy: the chosen token is the most likely one.
        assert!(
            (best - chosen.as_f64().unwrap()).abs() < 1e-4,
            "{top:?} {chosen}"
        );
    }
    // The same text as the DJL route (greedy both).
    assert_eq!(
        c["text"].as_str().unwrap(),
        greedy(s, "default", prompt, 8).0
    );

    // echo, stop.
    let r = s.post_json(
        "/v1/completions",
        &json!({"model": "default", "prompt": prompt, "max_tokens": 8, "temperature": 0, "echo": true}),
    );
    let text = r.json()["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(text.starts_with(prompt), "{text:?}");
    let r = s.post_json(
        "/v1/completions",
        &json!({"model": "default", "prompt": prompt, "max_tokens": 8, "temperature": 0, "stop": ["."]}),
    );
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert!(!v["choices"][0]["text"].as_str().unwrap().contains('.'));

    // n choices with a seed: reproducible, usage adds up.
    let body = json!({"model": "default", "prompt": "Tell me a story:", "max_tokens": 6,
        "temperature": 1.2, "n": 3, "seed": 42, "ignore_eos": true});
    let a = s.post_json("/v1/completions", &body).json();
    let b = s.post_json("/v1/completions", &body).json();
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(texts(&a).len(), 3);
    assert_eq!(texts(&a), texts(&b), "same seed, same choices");
    let idx: Vec<u64> = a["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, [0, 1, 2]);
    assert_eq!(a["usage"]["completion_tokens"], 18);
    let distinct: BTreeSet<String> = texts(&a).into_iter().collect();
    assert!(distinct.len() > 1, "n choices should differ: {a}");
}

#[test]
fn openai_chat_answers_paris_with_usage_and_logprobs() {
    let s = shared();
    let body = json!({"model": "default", "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "logprobs": true, "top_logprobs": 3});
    let r = s.post_json("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "default");
    let c = &v["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    let content = c["message"]["content"].as_str().unwrap();
    assert!(content.contains("Paris"), "{content:?}");
    let reason = c["finish_reason"].as_str().unwrap();
    assert!(reason == "stop" || reason == "length", "{reason}");
    let u = &v["usage"];
    let (p, n) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 10, "the chat template adds tokens: {u}");
    assert!((1..=24).contains(&n), "{u}");
    assert_eq!(u["total_tokens"].as_u64(), Some(p + n));
    let lp = c["logprobs"]["content"].as_array().unwrap();
    // One entry per generated token (EOS included when it ended the answer).
    assert_eq!(lp.len() as u64, n, "{c}");
    for t in lp {
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 3, "{t}");
    }

    // Streaming gives the same answer, then usage, then [DONE].
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let mut st = s.stream(
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        &sb,
    );
    assert_eq!(st.status, 200);
    assert_eq!(st.header("content-type"), Some("text/event-stream"));
    let mut events = Vec::new();
    while let Some(e) = st.next_event() {
        events.push(e);
    }
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut streamed = String::new();
    let mut reasons = Vec::new();
    for ch in &chunks {
        assert_eq!(ch["object"], "chat.completion.chunk");
        if let Some(c) = ch["choices"].as_array().and_then(|c| c.first()) {
            if let Some(t) = c["delta"]["content"].as_str() {
                streamed.push_str(t);
            }
            if let Some(r) = c["finish_reason"].as_str() {
                reasons.push(r.to_string());
            }
        }
    }
    assert_eq!(streamed, content);
    assert_eq!(reasons, [reason]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"].as_u64(), Some(n), "{usage}");
    assert_eq!(usage["prompt_tokens"].as_u64(), Some(p));
}

#[test]
fn openai_completions_stream_with_n_choices() {
    let s = shared();
    let mut st = s.stream(
        "/v1/completions",
        &[("Content-Type", "application/json")],
        &json!({"model": "default", "prompt": "Once upon a time", "max_tokens": 5, "n": 2,
            "temperature": 0.8, "seed": 5, "stream": true, "ignore_eos": true}),
    );
    let mut per_choice = [0usize; 2];
    let mut finished = [0usize; 2];
    let mut done = 0;
    while let Some(e) = st.next_event() {
        if e == "[DONE]" {
            done += 1;
            continue;
        }
        assert_eq!(done, 0, "an event after [DONE]");
        let v: Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["object"], "text_completion");
        let c = &v["choices"][0];
        let i = c["index"].as_u64().unwrap() as usize;
        if c["finish_reason"].is_string() {
            assert_eq!(c["finish_reason"], "length");
            finished[i] += 1;
        } else {
            per_choice[i] += 1;
        }
    }
    assert_eq!(done, 1);
    assert_eq!(per_choice, [5, 5]);
    assert_eq!(finished, [1, 1]);
}
