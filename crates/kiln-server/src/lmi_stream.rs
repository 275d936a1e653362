//! Streamed responses of the LMI routes: one JSON line (or server-sent
//! event) per token, `{"token": {id, text, log_prob, logprob}}`, the last also
//! carrying `generated_text` and, when asked, `details`; a failure after
//! the 200 ends the stream with DJL's error line.

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::Response;
use kiln_engine::{Event, FinishReason, TokenOutput};
use serde_json::{json, Value};

use crate::access::AccessRecord;
use crate::dialect::lmi::{details_json, token_json, LmiRequest};
use crate::generation::Events;

/// State of a streamed response between chunks.
struct StreamState {
    events: Events,
    req: LmiRequest,
    sse: bool,
    text: String,
    tokens: Vec<TokenOutput>,
    rec: Arc<AccessRecord>,
    done: bool,
}

impl StreamState {
    fn frame(&self, v: &Value) -> Bytes {
        if self.sse {
            Bytes::from(format!("data: {v}\n\n"))
        } else {
            Bytes::from(format!("{v}\n"))
        }
    }

    /// Adds `generated_text`, `details` and any error to the final line.
    fn finish(&mut self, line: &mut Value, end: Event) {
        if let Event::Finished {
            reason,
            usage,
            error,
        } = end
        {
            let prompt = &self.req.inputs[0];
            line["generated_text"] = if self.req.return_full_text {
                Value::String(format!("{prompt}{}", self.text))
            } else {
                Value::String(self.text.clone())
            };
            if self.req.details {
                line["details"] = details_json(reason, &self.tokens, prompt, false);
            }
            if reason == FinishReason::Error {
                // The 200 is sent: DJL ends the stream with a line whose
                // details say `finish_reason: "error"` even without
                // `details` (output_formatter.py `get_details_dict`), and,
                // when no token came with the failure, the error token of
                // rolling_batch.py `stop_on_any_exception` (id -1,
                // log_prob -1, special, with the message).
                let message = error.unwrap_or_else(|| "generation failed".into());
                if !self.req.details {
                    line["details"] = json!({"finish_reason": reason.as_str()});
                }
                if line.get("token").is_none() {
                    let mut token = crate::dialect::lmi::lp_token(-1, "", json!(-1.0));
                    token["special_token"] = json!(true);
                    token["error_msg"] = json!(message);
                    line["token"] = token;
                }
                line["error"] = Value::String(message);
                line["code"] = json!(StatusCode::FAILED_DEPENDENCY.as_u16());
            }
            self.rec.add_tokens_out(usage.completion_tokens);
            self.done = true;
        }
    }
}

/// A streamed LMI response: JSON lines, or server-sent events with `sse`.
pub(crate) fn response(
    events: Events,
    req: LmiRequest,
    sse: bool,
    rec: Arc<AccessRecord>,
) -> Response {
    let state = StreamState {
        events,
        req,
        sse,
        text: String::new(),
        tokens: Vec::new(),
        rec,
        done: false,
    };
    let body = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let (ev, end) = s.events.next().await?;
        let mut line = match ev {
            Event::Token(t) => {
                s.text.push_str(&t.text);
                let line = json!({"token": token_json(&t)});
                s.tokens.push(t);
                if let Some(end) = end {
                    let mut line = line;
                    s.finish(&mut line, end);
                    line
                } else {
                    line
                }
            }
            finished => {
                let mut line = json!({});
                s.finish(&mut line, finished);
                line
            }
        };
        if line.as_object().is_some_and(|o| o.is_empty()) {
            line = json!({"generated_text": s.text});
        }
        let bytes = s.frame(&line);
        Some((Ok::<_, std::convert::Infallible>(bytes), s))
    });
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/jsonlines"
    };
    crate::generation::streamed(body, content_type)
}
