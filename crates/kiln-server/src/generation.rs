//! What the DJL and OpenAI routes share: submitting the funnel's requests
//! ([`crate::funnel`]) to the engine, and reading a request's events to the
//! end.

use std::time::{Duration, Instant};

use kiln_engine::{
    Compiled, Constraint, Engine, Event, FinishReason, Request, RequestStream, TokenOutput, Usage,
};

use crate::error::ApiError;

/// Tokenizes a text prompt (adding the tokenizer's BOS where it does).
pub fn encode(engine: &Engine, text: &str, add_special: bool) -> Result<Vec<u32>, ApiError> {
    engine
        .tokenizer()
        .encode(text, add_special)
        .map_err(|e| ApiError::bad_request(format!("cannot tokenize the input: {e}")))
}

/// Submits one request with its deadline (`timeout` from now), asking
/// with `prompt_logprobs` for the log-probability of each prompt token
/// (DJL's `decoder_input_details`), which costs the engine a logits row per
/// prompt token and so is computed only when asked. `guide` is
/// `req.constraint` compiled (see [`crate::cpu::compile`]).
fn submit_with(
    engine: &Engine,
    mut req: Request,
    timeout: Duration,
    prompt_logprobs: bool,
    guide: Option<Compiled>,
) -> Result<RequestStream, ApiError> {
    req.stop.deadline = Some(Instant::now() + timeout);
    req.prompt_logprobs = prompt_logprobs;
    Ok(engine.submit_compiled(req, guide)?)
}

/// Submits `jobs` (the funnel's requests, each with its prompt), in order. Constraints
/// are compiled first, each distinct one once, on the compile pool and
/// within its limits ([`crate::cpu::compile`]), so that a costly grammar
/// never holds the threads that answer HTTP or the tokenization pool.
pub async fn submit_all(
    engine: &Engine,
    jobs: Vec<Request>,
    timeout: Duration,
    prompt_logprobs: bool,
) -> Result<Vec<RequestStream>, ApiError> {
    let mut compiled: Vec<(&Constraint, Compiled)> = Vec::new();
    let mut guides: Vec<Option<Compiled>> = Vec::with_capacity(jobs.len());
    for c in jobs.iter().map(|r| r.constraint.as_ref()) {
        let guide = match c {
            None => None,
            Some(c) => match compiled.iter().find(|(k, _)| *k == c) {
                Some((_, g)) => Some(g.clone()),
                None => {
                    let g = crate::cpu::compile(engine, c).await?;
                    compiled.push((c, g.clone()));
                    Some(g)
                }
            },
        };
        guides.push(guide);
    }
    jobs.into_iter()
        .zip(guides)
        .map(|(r, g)| submit_with(engine, r, timeout, prompt_logprobs, g))
        .collect()
}

/// Everything one prompt produced.
#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<TokenOutput>,
    pub reason: FinishReason,
    pub usage: Usage,
    pub error: Option<String>,
}

/// Reads a request's events to the end.
pub async fn complete(mut stream: RequestStream) -> Completion {
    let mut c = Completion {
        text: String::new(),
        tokens: Vec::new(),
        reason: FinishReason::Error,
        usage: Usage::default(),
        error: Some("the engine stopped before the request finished".into()),
    };
    while let Some(ev) = stream.next().await {
        match ev {
            Event::Token(t) => {
                c.text.push_str(&t.text);
                c.tokens.push(t);
            }
            Event::Finished {
                reason,
                usage,
                error,
            } => {
                c.reason = reason;
                c.usage = usage;
                c.error = error;
            }
        }
    }
    c
}

/// The error a failed completion answers with, if it failed: 400 when its
/// constraint failed part way (the client asked for more than the grammar
/// engine can follow), 424 when the model did.
pub fn failure(c: &Completion) -> Option<ApiError> {
    (c.reason == FinishReason::Error).then(|| {
        let msg = c
            .error
            .clone()
            .unwrap_or_else(|| "generation failed".into());
        if msg.starts_with(kiln_engine::guided::CONSTRAINT_FAILED) {
            ApiError::bad_request(msg)
        } else {
            ApiError::model_failure(msg)
        }
    })
}

/// A request's events, pairing a request's last token with the `Finished`
/// that the engine sends right behind it (`TokenOutput::last`), so a streamed
/// response can put the final summary on the last token's line.
pub struct Events {
    stream: RequestStream,
}

impl Events {
    /// Wraps a request's stream.
    pub fn new(stream: RequestStream) -> Self {
        Self { stream }
    }

    /// The next event, and the `Finished` that ends the request with it when
    /// it is the request's last token.
    pub async fn next(&mut self) -> Option<(Event, Option<Event>)> {
        let ev = self.stream.next().await?;
        let end = match &ev {
            Event::Token(t) if t.last => self.stream.next().await,
            _ => None,
        };
        Some((ev, end))
    }
}

/// A streamed response: `body`'s chunks as they are produced, as
/// `content_type`, never cached (what every streaming route answers).
pub fn streamed<S>(body: S, content_type: &'static str) -> axum::response::Response
where
    S: futures_util::Stream<Item = Result<axum::body::Bytes, std::convert::Infallible>>
        + Send
        + 'static,
{
    use axum::http::{header, HeaderValue};
    let mut resp = axum::response::Response::new(axum::body::Body::from_stream(body));
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
