//! gpt-oss's chat template (harmony: a system message with the reasoning
//! effort, a developer message with the instructions and the tools as a
//! TypeScript namespace, calls `to=functions.NAME` and results from
//! `functions.NAME`) rendered by kiln as `transformers` renders it
//! (`testdata/chat/gpt_oss.json`, written by
//! `scripts/golden/chat_templates_gpt_oss.py`; the template is fetched into
//! the cache by `scripts/fetch-assets.sh --tests`).

use std::path::PathBuf;

use kiln_model::chat::{ChatMessage, ChatTemplate};
use serde_json::Value;

fn template_source() -> String {
    let path = kiln_model::default_model::cache_dir()
        .join("testdata/tokenizers/gpt_oss/chat_template.jinja");
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run scripts/fetch-assets.sh --tests)",
            path.display()
        )
    })
}

/// The rendering with its one `Current date: YYYY-MM-DD` line's date
/// replaced by `{DATE}`, as the expected renderings keep it.
fn without_date(text: &str) -> String {
    const AT: &str = "Current date: ";
    let Some(i) = text.find(AT) else {
        return text.to_string();
    };
    let date = &text[i + AT.len()..];
    let is_date = date.len() >= 10
        && date.as_bytes()[..10].iter().enumerate().all(|(k, b)| {
            if k == 4 || k == 7 {
                *b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    if !is_date {
        return text.to_string();
    }
    format!("{}{AT}{{DATE}}{}", &text[..i], &date[10..])
}

#[test]
fn gpt_oss_template_renders_exactly_as_transformers_does() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/chat/gpt_oss.json");
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("gpt_oss.json")).expect("json");
    let records = doc["records"].as_array().expect("records");
    let t = ChatTemplate::new(&template_source(), "", "").expect("the template compiles");
    let mut failures = Vec::new();
    let mut cases = std::collections::BTreeSet::new();
    for r in records {
        let case = r["case"].as_str().expect("case");
        cases.insert(case);
        let messages: Vec<ChatMessage> =
            serde_json::from_value(r["messages"].clone()).expect("messages");
        let agp = r["add_generation_prompt"].as_bool().expect("agp");
        let kwargs = r["kwargs"].as_object().cloned().unwrap_or_default();
        let tools = r["tools"].as_array().map(Vec::as_slice);
        let want = r["expected"].as_str().expect("expected");
        match t.render_tools(&messages, tools, agp, &kwargs) {
            Ok(g) if without_date(&g) == want => {}
            other => failures.push(format!(
                "{case} (agp={agp}): got {:?}\nwant {want:?}",
                other.map(|g| without_date(&g))
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        records.len(),
        failures.join("\n")
    );
    // A system message, a tool definition and a tool result round trip are among them.
    for c in [
        "system_user",
        "tools_user_only",
        "tools_call_and_result",
        "tools_result_answered",
    ] {
        assert!(cases.contains(c), "no case {c}");
    }
}

/// The date line is today's: the comparison above cannot pass on a
/// template that writes a fixed one.
#[test]
fn the_date_is_todays() {
    let t = ChatTemplate::new(&template_source(), "", "").unwrap();
    let text = t.render(&[ChatMessage::new("user", "hi")], true).unwrap();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let today = kiln_model::chat::format_utc(secs, "%Y-%m-%d");
    let yesterday = kiln_model::chat::format_utc(secs - 60, "%Y-%m-%d");
    assert!(
        text.contains(&format!("Current date: {today}\n"))
            || text.contains(&format!("Current date: {yesterday}\n")),
        "{text}"
    );
    assert!(
        text.ends_with("<|start|>user<|message|>hi<|end|><|start|>assistant"),
        "{text}"
    );
}
