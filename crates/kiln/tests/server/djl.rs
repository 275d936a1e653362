//! DJL inference routes: the reference request, batches, every route's
//! greedy answer, LMI streams as JSON lines and server-sent events, stop
//! sequences, sampling seeds and details.

use super::*;

#[test]
fn ping_is_healthy_when_every_model_is_ready() {
    let s = shared();
    let _g = models_lock();
    let r = s.get("/ping");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"status": "Healthy"}));
}

#[test]
fn reference_request_returns_two_texts_within_seq_length() {
    let s = shared();
    let texts = [
        "Hello, I am a language model,",
        "Welcome to Amazon Elastic Compute Cloud,",
    ];
    let v = lmi(
        s,
        "/predictions/default",
        json!({"seq_length": 24, "text": texts}),
    );
    let out = v.as_array().unwrap_or_else(|| panic!("not a list: {v}"));
    assert_eq!(out.len(), 2, "{v}");
    for o in out {
        let t = o["generated_text"].as_str().unwrap();
        assert!(!t.trim().is_empty(), "{v}");
    }
    assert_ne!(out[0], out[1]);
    // seq_length bounds prompt + output.
    let v = lmi(
        s,
        "/predictions/default",
        json!({"seq_length": 12, "text": texts, "parameters": {"details": true}}),
    );
    assert_eq!(v.as_array().map(Vec::len), Some(texts.len()), "{v}");
    for (o, text) in v.as_array().unwrap().iter().zip(texts) {
        let n = o["details"]["generated_tokens"].as_u64().unwrap();
        let p = prompt_tokens(s, text);
        assert!(n >= 1 && p + n <= 12, "{text}: {p} + {n} > 12: {o}");
    }
}

#[test]
fn batch_outputs_equal_the_same_prompts_alone() {
    let s = shared();
    let prompts = [
        "Hi",
        "The quick brown fox jumps over the lazy dog. Then the dog",
        "Once upon a time, in a small village at the foot of a great mountain, there lived an old \
         clockmaker who had never left the valley. One morning he",
    ];
    let n = 10;
    let alone: Vec<(String, Vec<u64>, String)> =
        prompts.iter().map(|p| greedy(s, "default", p, n)).collect();
    let batch = lmi(
        s,
        "/predictions/default",
        json!({"inputs": prompts, "parameters": {"max_new_tokens": n, "details": true}}),
    );
    let batch = batch.as_array().expect("a list for list input");
    assert_eq!(batch.len(), prompts.len());
    for ((b, a), p) in batch.iter().zip(&alone).zip(prompts) {
        let ids: Vec<u64> = b["details"]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, a.1, "{p:?}: batched tokens differ from alone");
        assert_eq!(b["generated_text"].as_str().unwrap(), a.0, "{p:?}");
    }
    // The reference body (a batch of texts) agrees too.
    let r = lmi(
        s,
        "/predictions/default",
        json!({"text": prompts, "seq_length": 100, "parameters": {"max_new_tokens": n}}),
    );
    assert_eq!(r.as_array().map(Vec::len), Some(alone.len()), "{r}");
    for (b, a) in r.as_array().unwrap().iter().zip(&alone) {
        assert_eq!(b["generated_text"].as_str().unwrap(), a.0);
    }
}

#[test]
fn every_inference_route_gives_the_same_greedy_answer() {
    let s = shared();
    let prompt = "The capital of France is";
    let body = json!({"inputs": prompt, "parameters": {"max_new_tokens": 6}});
    let want = lmi(s, "/predictions/default", body.clone());
    let text = want["generated_text"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    for path in [
        "/predictions/default/1.0",
        "/invocations?model_name=default",
        "/models/default/invoke",
    ] {
        assert_eq!(lmi(s, path, body.clone()), want, "{path}");
    }
    // A bare JSON string and a plain-text body are one prompt with defaults (30 tokens).
    let long = greedy(s, "default", prompt, 30).0;
    let r = s.req(
        "POST",
        "/predictions/default",
        &[("Content-Type", "text/plain")],
        prompt.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["generated_text"], json!(long));
    let r = s.post_json("/predictions/default", &json!(prompt));
    assert_eq!(r.json()["generated_text"], json!(long));
    // return_full_text.
    let v = lmi(
        s,
        "/predictions/default",
        json!({"inputs": prompt, "parameters": {"max_new_tokens": 6, "return_full_text": true}}),
    );
    assert_eq!(v["generated_text"], json!(format!("{prompt}{text}")));
}

#[test]
fn lmi_stream_as_json_lines_and_as_server_sent_events() {
    let s = shared();
    let prompt = "Write a haiku about the sea:";
    let n = 12;
    let params = json!({"max_new_tokens": n, "ignore_eos": true, "details": true});
    let (want, ids, _) = greedy(s, "default", prompt, n);

    let mut st = s.stream(
        "/predictions/default",
        &[("Content-Type", "application/json")],
        &json!({"inputs": prompt, "stream": true, "parameters": params}),
    );
    assert_eq!(st.status, 200);
    assert_eq!(st.header("content-type"), Some("application/jsonlines"));
    let (tokens, last) = read_lmi(&mut st, Vec::new());
    assert_eq!(tokens.len(), n, "one token per line: {tokens:#?}");
    let mut text = String::new();
    for (t, id) in tokens.iter().zip(&ids) {
        assert_eq!(t["id"].as_u64(), Some(*id), "{t}");
        assert!(t["log_prob"].as_f64().unwrap() <= 0.0, "{t}");
        text.push_str(t["text"].as_str().unwrap());
    }
    assert_eq!(last["generated_text"].as_str(), Some(text.as_str()));
    assert_eq!(
        text, want,
        "streamed text differs from the non-streamed one"
    );
    assert_eq!(last["details"]["finish_reason"], "length");
    assert_eq!(last["details"]["generated_tokens"], json!(n));

    // Server-sent events when the client asks for them.
    let mut st = s.stream(
        "/predictions/default",
        &[
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
        ],
        &json!({"inputs": prompt, "stream": true, "parameters": params}),
    );
    assert_eq!(st.header("content-type"), Some("text/event-stream"));
    let mut events = Vec::new();
    while let Some(e) = st.next_event() {
        events.push(serde_json::from_str::<Value>(&e).unwrap());
    }
    let sse_tokens: Vec<Value> = events
        .iter()
        .filter_map(|e| e.get("token").cloned())
        .collect();
    assert_eq!(sse_tokens, tokens);
    let sse_last = events.last().unwrap();
    assert_eq!(sse_last["generated_text"], last["generated_text"]);
    assert_eq!(sse_last["details"], last["details"]);
}

/// DESIGN: "the last line also carrying `generated_text` and `details`", as
/// DJL's and TGI's streams do: every line carries a token. (This caught a
/// race: the server used to attach the summary only when the engine's
/// `Finished` happened to be queued already; the engine now marks a
/// request's last token, and the server waits for the end behind it.)
#[test]
fn lmi_stream_every_line_carries_a_token() {
    let s = shared();
    let port = s.port;
    let workers: Vec<_> = (0..4)
        .map(|w| {
            std::thread::spawn(move || {
                let mut tokenless = Vec::new();
                for i in 0..50 {
                    let mut st = Streaming::open(
                        port,
                        "POST",
                        "/predictions/default",
                        &[("Content-Type", "application/json")],
                        json!({"inputs": format!("Hi {w} {i}"), "stream": true,
                            "parameters": {"max_new_tokens": 2, "ignore_eos": true}})
                        .to_string()
                        .as_bytes(),
                    );
                    while let Some(l) = st.next_json_line() {
                        if l.get("token").is_none() {
                            tokenless.push(l);
                        }
                    }
                }
                tokenless
            })
        })
        .collect();
    let tokenless: Vec<Value> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(
        tokenless.is_empty(),
        "{} of 200 streams ended with a line without a token: {}",
        tokenless.len(),
        tokenless[0]
    );
}

#[test]
fn japanese_text_is_streamed_intact() {
    let s = shared();
    let prompt = "東京は日本の首都です。東京は";
    // Find a length at which the greedy output ends on a whole character:
    // the tokens of a multi-byte character carry no text until it is complete.
    let v = lmi(
        s,
        "/predictions/default",
        json!({"inputs": prompt, "parameters": {"max_new_tokens": 30, "details": true}}),
    );
    let toks = v["details"]["tokens"].as_array().unwrap();
    let split_tokens = toks
        .iter()
        .filter(|t| t["text"].as_str() == Some(""))
        .count();
    assert!(
        split_tokens > 0,
        "expected characters spread over several tokens: {v}"
    );
    let n = toks
        .iter()
        .rposition(|t| {
            let t = t["text"].as_str().unwrap();
            !t.is_empty() && !t.contains('\u{FFFD}')
        })
        .unwrap()
        + 1;
    let mut st = s.stream(
        "/predictions/default",
        &[("Content-Type", "application/json")],
        &json!({"inputs": prompt, "stream": true, "parameters": {"max_new_tokens": n}}),
    );
    let (tokens, last) = read_lmi(&mut st, Vec::new());
    let mut text = String::new();
    for t in &tokens {
        let piece = t["text"].as_str().unwrap();
        assert!(!piece.contains('\u{FFFD}'), "a split character in {t}");
        text.push_str(piece);
    }
    assert_eq!(last["generated_text"].as_str(), Some(text.as_str()));
    let cjk = text
        .chars()
        .filter(|c| ('\u{3040}'..='\u{9FFF}').contains(c))
        .count();
    assert!(cjk >= 5, "expected Japanese output, got {text:?}");
    assert!(!text.contains('\u{FFFD}'), "{text:?}");
    let (whole, _, _) = greedy(s, "default", prompt, n);
    assert_eq!(text, whole);
    // The OpenAI stream keeps characters whole too.
    let mut st = s.stream(
        "/v1/completions",
        &[("Content-Type", "application/json")],
        &json!({"model": "default", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": true}),
    );
    let mut text2 = String::new();
    while let Some(e) = st.next_event() {
        if e == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&e).unwrap();
        let t = v["choices"][0]["text"].as_str().unwrap();
        assert!(!t.contains('\u{FFFD}'), "{e}");
        text2.push_str(t);
    }
    assert_eq!(text2, text);
}

#[test]
fn lmi_stop_sequences_sampling_seed_and_details() {
    let s = shared();
    let prompt = "List three colors of the rainbow:";
    let (full, _, _) = greedy(s, "default", prompt, 24);
    // A stop string taken from the middle of the unconstrained output.
    let words: Vec<&str> = full.split_whitespace().collect();
    assert!(words.len() >= 4, "{full:?}");
    let stop = words[2];
    let cut = full.find(stop).unwrap();
    let v = lmi(
        s,
        "/predictions/default",
        json!({"inputs": prompt, "parameters": {"max_new_tokens": 24, "stop_sequences": [stop], "details": true}}),
    );
    assert_eq!(v["details"]["finish_reason"], "stop_sequence", "{v}");
    assert_eq!(v["generated_text"].as_str().unwrap(), &full[..cut], "{v}");

    // Sampling with a seed is reproducible.
    let sample = |seed: u64| {
        lmi(
            s,
            "/predictions/default",
            json!({"inputs": prompt, "parameters": {"max_new_tokens": 8, "do_sample": true,
                "temperature": 1.5, "top_k": 50, "seed": seed}}),
        )["generated_text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let a = sample(11);
    assert_eq!(a, sample(11));
    let others: BTreeSet<String> = [12, 13, 14].into_iter().map(sample).collect();
    assert!(
        others.len() > 1 || !others.contains(&a),
        "sampling ignores the seed: {a:?} {others:?}"
    );
    // EOS ends generation early with eos_token (the chat model stops after answering).
    let r = lmi(
        s,
        "/predictions/default",
        json!({"inputs": "<|im_start|>user\nSay OK.<|im_end|>\n<|im_start|>assistant\n",
            "parameters": {"max_new_tokens": 40, "details": true}}),
    );
    assert_eq!(r["details"]["finish_reason"], "eos_token", "{r}");
    assert!(r["details"]["generated_tokens"].as_u64().unwrap() < 40);
}
