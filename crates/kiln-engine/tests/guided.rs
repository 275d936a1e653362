//! Constrained decoding in the engine, on the default model
//! (SmolLM2-135M-Instruct from the cache): the token trie's bytes, forced
//! tokens taken without a forward pass each, the grammar's end ending the
//! request, and unconstrained requests unchanged next to constrained ones.

use kiln_backend::cpu::CpuBackend;
use kiln_engine::{Constraint, Engine, EngineConfig, Event, FinishReason, Request, RequestStream};
use kiln_model::{LoadOptions, LoadedModel};
use serde_json::json;

fn default_model() -> LoadedModel<CpuBackend> {
    let path = kiln_model::default_model::default_model_path()
        .unwrap_or_else(|e| panic!("{e} (the test command scripts/test.sh fetches it)"));
    kiln_model::load(&CpuBackend::new(), &path, &LoadOptions::default()).unwrap()
}

fn engine() -> Engine {
    Engine::start(CpuBackend::new(), default_model(), EngineConfig::default()).unwrap()
}

#[derive(Debug, Clone, PartialEq)]
struct Output {
    ids: Vec<u32>,
    text: String,
    logprobs: Vec<f32>,
    reason: FinishReason,
}

fn collect(mut s: RequestStream) -> Output {
    let mut o = Output {
        ids: vec![],
        text: String::new(),
        logprobs: vec![],
        reason: FinishReason::Error,
    };
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Token(t) => {
                o.ids.push(t.id);
                o.text.push_str(&t.text);
                o.logprobs.push(t.logprob);
            }
            Event::Finished { reason, error, .. } => {
                assert!(reason != FinishReason::Error, "request failed: {error:?}");
                o.reason = reason;
            }
        }
    }
    o
}

fn request(e: &Engine, text: &str, n: usize, constraint: Option<Constraint>) -> Request {
    let mut r = Request::greedy(e.tokenizer().encode(text, false).unwrap(), n);
    r.stop.ignore_eos = constraint.is_none();
    r.constraint = constraint;
    r
}

#[test]
fn token_bytes_spell_what_the_tokenizer_decodes() {
    let m = default_model();
    let tok = &m.tokenizer;
    let n = tok.vocab_size();
    let pieces = tok.token_bytes(n);
    assert_eq!(pieces.len(), n);
    let mut specials = 0;
    for (id, p) in pieces.iter().enumerate() {
        let text = tok.decode(&[id as u32], false).unwrap();
        match std::str::from_utf8(&p.bytes) {
            Ok(s) => assert_eq!(s, text, "token {id}"),
            // Part of a character: the tokenizer decodes it as U+FFFD.
            Err(_) => assert!(text.contains('\u{FFFD}'), "token {id}: {text:?}"),
        }
        specials += usize::from(p.special);
    }
    let im_end = tok.token_to_id("<|im_end|>").unwrap() as usize;
    assert!(pieces[im_end].special);
    assert!(specials > 0 && specials < 100, "{specials} special tokens");
    // Characters split across tokens come back whole when their bytes are joined.
    let text = "naïve 吾輩は猫である 🇯🇵";
    let joined: Vec<u8> = tok
        .encode(text, false)
        .unwrap()
        .iter()
        .flat_map(|&id| pieces[id as usize].bytes.clone())
        .collect();
    assert_eq!(joined, text.as_bytes());
}

#[test]
fn forced_tokens_are_appended_without_a_step_each_and_the_grammar_end_stops() {
    let e = engine();
    // One choice: every token is forced, so no step runs at all.
    let only = "The quick brown fox jumps over the lazy dog";
    let r = request(
        &e,
        "Say something:",
        64,
        Some(Constraint::Choice(vec![only.into()])),
    );
    let out = collect(e.submit(r).unwrap());
    assert_eq!(out.text, only);
    assert_eq!(out.reason, FinishReason::EosToken);
    assert!(out.ids.len() >= 8, "{out:?}");
    assert!(out.logprobs.iter().all(|l| l.is_nan()), "{out:?}");
    assert_eq!(e.metrics().steps, 0);

    // Two choices with a common start: the start is forced (computed with
    // the prompt), then each step samples one token (the only ones with a
    // log-probability) and whatever the grammar then forces comes with it.
    let choices = vec![
        "The quick brown fox jumps over the lazy dog".to_string(),
        "The quick brown fox sleeps in the shade of a tree".to_string(),
    ];
    let r = request(
        &e,
        "Say something:",
        64,
        Some(Constraint::Choice(choices.clone())),
    );
    let out = collect(e.submit(r).unwrap());
    assert!(choices.contains(&out.text), "{out:?}");
    assert_eq!(out.reason, FinishReason::EosToken);
    let steps = e.metrics().steps as usize;
    let sampled = out.logprobs.iter().filter(|l| l.is_finite()).count();
    assert!(
        out.logprobs[0].is_nan(),
        "the shared start is forced: {out:?}"
    );
    assert_eq!(sampled, steps, "{out:?}");
    assert!(steps * 2 <= out.ids.len(), "{steps} steps for {out:?}");
}

#[test]
fn a_schema_constrained_request_parses_and_leaves_its_neighbours_unchanged() {
    let e = engine();
    let plain: Vec<Request> = ["The capital of France is", "List three colours:", "Hi"]
        .iter()
        .map(|t| request(&e, t, 16, None))
        .collect();
    let want: Vec<Output> = plain
        .iter()
        .map(|r| collect(e.submit(r.clone()).unwrap()))
        .collect();
    let schema = json!({"type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"], "additionalProperties": false});
    let guided = [
        request(
            &e,
            "The capital of France as JSON:",
            30,
            Some(Constraint::JsonSchema(schema)),
        ),
        request(
            &e,
            "A phone number:",
            12,
            Some(Constraint::Regex("[0-9]{3}-[0-9]{4}".into())),
        ),
    ];
    // Submitted together and interleaved, so that they share steps.
    let streams: Vec<RequestStream> = [&plain[0], &guided[0], &plain[1], &guided[1], &plain[2]]
        .into_iter()
        .map(|r| e.submit(r.clone()).unwrap())
        .collect();
    let got: Vec<Output> = streams.into_iter().map(collect).collect();
    assert_eq!([&got[0], &got[2], &got[4]], [&want[0], &want[1], &want[2]]);
    let v: serde_json::Value =
        serde_json::from_str(&got[1].text).unwrap_or_else(|err| panic!("{:?}: {err}", got[1].text));
    assert!(v["city"].is_string(), "{v}");
    assert_eq!(got[1].reason, FinishReason::EosToken);
    let phone = got[3].text.as_bytes();
    assert_eq!(phone.len(), 8, "{:?}", got[3].text);
    assert!(phone.iter().enumerate().all(|(i, c)| if i == 3 {
        *c == b'-'
    } else {
        c.is_ascii_digit()
    }));
}

#[test]
fn a_constraint_that_cannot_compile_is_refused_at_submit() {
    let e = engine();
    let bad = request(
        &e,
        "x",
        4,
        Some(Constraint::JsonSchema(
            json!({"type": "object", "properties": {"a": {"type": "strng"}}}),
        )),
    );
    match e.submit(bad) {
        Err(kiln_engine::SubmitError::Invalid(msg)) => assert!(msg.contains("strng"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn compiles_run_on_their_own_deep_stack_and_can_be_stopped() {
    let e = engine();
    let guide = e.guide().unwrap().clone();
    // 3,000 nested rules: past what a 2 MiB stack holds in llguidance's
    // Lark compiler (which would abort the process, not fail).
    let mut g = String::from("start: r0\n");
    for i in 0..3000 {
        g.push_str(&format!("r{i}: \"a\" r{}\n", i + 1));
    }
    g.push_str("r3000: \"b\"\n");
    let c = Constraint::Grammar(g);
    let compiled = guide.compile(&c).unwrap();
    let r = request(&e, "x", 4, Some(c.clone()));
    let out = collect(e.submit_compiled(r, Some(compiled)).unwrap());
    assert!(out.text.bytes().all(|b| b == b'a'), "{:?}", out.text);

    // A compile stopped before it starts reports so, and never compiles.
    let cancel = kiln_engine::CompileCancel::default();
    cancel.cancel();
    let (tx, rx) = std::sync::mpsc::channel();
    guide
        .compile_in_background(c, cancel, move |r| tx.send(r).unwrap())
        .unwrap();
    assert_eq!(
        rx.recv().unwrap().map(|_| ()),
        Err(kiln_engine::CompileError::Cancelled)
    );
}

#[test]
fn a_constraint_with_no_first_token_is_refused_at_compile_time() {
    let e = engine();
    let guide = e.guide().unwrap();
    for (c, needle) in [
        (Constraint::JsonSchema(json!({"$ref": "#"})), "first token"),
        (Constraint::Regex("x{1000000}".into()), "lexer"),
    ] {
        match guide.compile(&c) {
            Err(kiln_engine::CompileError::Invalid(m)) => {
                assert!(m.contains(needle), "{m}");
                assert!(!m.contains('\n'), "{m:?}");
            }
            other => panic!("{c:?}: {other:?}"),
        }
    }
}
