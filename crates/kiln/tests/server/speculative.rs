//! Speculative decoding over HTTP: model directories whose
//! serving.properties ask for it, DJL's way (`option.speculative_draft_model`,
//! here the model itself, whose weights are then shared rather than loaded
//! again) and vLLM's (`option.speculative_config` with the n-gram method),
//! give the plain model's greedy tokens, whole and streamed, and count
//! their guesses on `/metrics` under vLLM's names.

use super::*;

fn spec_metric(s: &Server, name: &str, model: &str) -> f64 {
    s.metric(&format!("{name}{{model_name=\"{model}\",engine=\"0\"}}"))
        .unwrap_or_else(|| panic!("no {name} for {model}"))
}

/// The streamed text of a greedy OpenAI completion.
fn streamed(s: &Server, model: &str, prompt: &str, n: usize) -> String {
    let r = s.post_json(
        "/v1/completions",
        &json!({"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["text"].as_str().unwrap_or("").to_string()
        })
        .collect()
}

#[test]
fn speculation_over_http_gives_the_plain_models_greedy_tokens() {
    let s = shared();
    let _g = models_lock();
    let root = tempdir("spec-models-");
    let file = model_file().display().to_string();
    write(
        &root.join("selfdraft/serving.properties"),
        &format!(
            "option.model_id={file}\noption.speculative_draft_model={file}\noption.speculative_length=4\n"
        ),
    );
    write(
        &root.join("ngram/serving.properties"),
        &format!(
            "option.model_id={file}\noption.speculative_config={{\"method\": \"ngram\", \
             \"num_speculative_tokens\": 4, \"prompt_lookup_max\": 3, \"prompt_lookup_min\": 1}}\n"
        ),
    );
    for name in ["selfdraft", "ngram"] {
        let r = register(
            s,
            &format!("url={}&model_name={name}", url_escape(&root.join(name))),
        );
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
    let prompt = "Copy this list: red, green, blue, red, green, blue, red, green, blue, red,";
    let (text, ids, _) = greedy(s, "default", prompt, 24);
    let plain_stream = streamed(s, "default", prompt, 24);
    assert_eq!(plain_stream, text);
    for name in ["selfdraft", "ngram"] {
        let (t, i, _) = greedy(s, name, prompt, 24);
        assert_eq!(i, ids, "{name}: tokens");
        assert_eq!(t, text, "{name}: text");
        assert_eq!(streamed(s, name, prompt, 24), text, "{name}: streamed");
    }
    // The model drafting for itself guesses exactly what it then chooses.
    let drafted = spec_metric(s, "vllm:spec_decode_num_draft_tokens_total", "selfdraft");
    let accepted = spec_metric(s, "vllm:spec_decode_num_accepted_tokens_total", "selfdraft");
    assert!(drafted > 0.0, "self-draft made no guesses");
    assert_eq!(
        accepted, drafted,
        "a greedy self-draft has every guess accepted"
    );
    // The list repeats, so the prompt has n-grams to copy.
    let accepted = spec_metric(s, "vllm:spec_decode_num_accepted_tokens_total", "ngram");
    assert!(accepted > 0.0, "n-gram lookup had no guess accepted");
    assert!(
        s.stderr_soon_contains(
            "is the model itself: sharing its weights",
            Duration::from_secs(5)
        ),
        "the self-draft was loaded a second time"
    );
    for name in ["selfdraft", "ngram"] {
        let r = s.req("DELETE", &format!("/models/{name}"), &[], b"");
        assert_eq!(r.status, 200, "{}", r.text());
    }
}
