//! Chat templates rendered as `transformers` renders them: the templates of
//! Qwen2.5, Qwen3, Llama 3 / 3.1 / 3.2 and Mistral NeMo (fetched into the
//! cache by `scripts/fetch-assets.sh --tests`; Llama's may not be committed)
//! against the strings `apply_chat_template` produced
//! (`testdata/chat/expected.json`, written by `scripts/golden/chat_templates.py`),
//! with and without `tools` (and tool calls and results in the messages).

use std::path::PathBuf;

use kiln_model::chat::{ChatMessage, ChatTemplate};
use serde_json::Value;

fn template_source(name: &str) -> String {
    let path = kiln_model::default_model::cache_dir()
        .join("testdata/tokenizers")
        .join(name)
        .join("tokenizer_config.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run scripts/fetch-assets.sh --tests)",
            path.display()
        )
    });
    let cfg: Value = serde_json::from_str(&text).expect("tokenizer_config.json");
    match &cfg["chat_template"] {
        Value::String(s) => s.clone(),
        Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .expect("default template")
            .to_string(),
        other => panic!("{name}: no chat_template ({other})"),
    }
}

#[test]
fn templates_render_exactly_as_transformers_does() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/chat/expected.json");
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(path).expect("expected.json")).expect("json");
    assert!(cases.len() >= 90);
    let mut failures = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for c in &cases {
        let name = c["template"].as_str().expect("template");
        seen.insert(name.to_string());
        let tok = |k: &str| c[k].as_str().unwrap_or_default().to_string();
        let t = ChatTemplate::new(&template_source(name), &tok("bos_token"), &tok("eos_token"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let messages: Vec<ChatMessage> =
            serde_json::from_value(c["messages"].clone()).expect("messages");
        let agp = c["add_generation_prompt"]
            .as_bool()
            .expect("add_generation_prompt");
        let kwargs = c["kwargs"].as_object().cloned().unwrap_or_default();
        // Records with `tools` were rendered with `apply_chat_template(tools=...)`.
        let tools = c["tools"].as_array().map(Vec::as_slice);
        let got = t.render_tools(&messages, tools, agp, &kwargs);
        let want = c["expected"].as_str().expect("expected");
        match got {
            Ok(g) if g == want => {}
            other => failures.push(format!(
                "{name} / {} (agp={agp}): got {other:?}\nwant {want:?}",
                c["case"]
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    for t in ["qwen2_5", "qwen3", "llama3_2", "mistral_nemo"] {
        assert!(seen.contains(t), "no cases for {t}");
        // Each template that supports tools is checked with them, including a
        // turn that calls a tool and the tool's result.
        assert!(
            cases.iter().any(|c| c["template"] == t
                && c["case"] == "tools_call_and_result"
                && c["tools"].is_array()),
            "no tool cases for {t}"
        );
    }
}
