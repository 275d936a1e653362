//! DJL's static-batch streaming: with `option.rolling_batch=disable` and
//! `option.enable_streaming`, DJL's Hugging Face handler streams every
//! request through `StreamingUtils`, which yields per decoding step the new
//! text of each input of the batch, written as one JSON line
//! `{"outputs": [text_0, text_1, ...]}` (in input order; a single string
//! input is a batch of one). A failure ends the stream with
//! `{"error_msg": ...}`, as its default stream formatter writes an exception.
//!
//! kiln runs the inputs as sequences of its continuous batch and writes a
//! line each time every unfinished input has produced its next token. Where
//! DJL's padded batch keeps emitting the decoded pad token for an input
//! that has finished, kiln writes an empty string.

use std::sync::Arc;

use axum::body::Bytes;
use axum::response::Response;
use kiln_engine::{Event, FinishReason};
use serde_json::{json, Value};

use crate::access::AccessRecord;
use crate::generation::Events;

/// The inputs' event streams between lines; `None` once an input finished.
struct Batch {
    inputs: Vec<Option<Events>>,
    rec: Arc<AccessRecord>,
    /// The stream ended (every input finished, or one failed).
    done: bool,
}

impl Batch {
    /// Records an input's end; its error message if it failed.
    fn finish(&mut self, i: usize, end: Event) -> Option<String> {
        self.inputs[i] = None;
        match end {
            Event::Finished {
                reason,
                usage,
                error,
            } => {
                self.rec.add_tokens_out(usage.completion_tokens);
                (reason == FinishReason::Error)
                    .then(|| error.unwrap_or_else(|| "generation failed".into()))
            }
            Event::Token(_) => None,
        }
    }

    /// The next line: each unfinished input's next token text ("" for
    /// those already finished), or the error line. `None` at the end.
    async fn next_line(&mut self) -> Option<Value> {
        if self.done {
            return None;
        }
        let mut texts = vec![String::new(); self.inputs.len()];
        let mut error = None;
        let mut any = false;
        for (i, text) in texts.iter_mut().enumerate() {
            let Some(events) = self.inputs[i].as_mut() else {
                continue;
            };
            match events.next().await {
                Some((Event::Token(t), end)) => {
                    any = true;
                    *text = t.text;
                    if let Some(end) = end {
                        error = error.or(self.finish(i, end));
                    }
                }
                Some((end, _)) => error = error.or(self.finish(i, end)),
                None => {
                    self.inputs[i] = None;
                    error = error.or(Some("the request ended without finishing".into()));
                }
            }
        }
        if let Some(message) = error {
            // Dropping the other inputs' streams cancels their sequences.
            self.inputs.clear();
            self.done = true;
            return Some(json!({"error_msg": message}));
        }
        if self.inputs.iter().all(Option::is_none) {
            self.done = true;
            if !any {
                return None;
            }
        }
        Some(json!({ "outputs": texts }))
    }
}

/// The streamed response of a static-batch model to one request whose
/// inputs were submitted as `streams` (in input order).
pub(crate) fn response(streams: Vec<Events>, rec: Arc<AccessRecord>) -> Response {
    let batch = Batch {
        inputs: streams.into_iter().map(Some).collect(),
        rec,
        done: false,
    };
    let body = futures_util::stream::unfold(batch, |mut b| async move {
        let line = b.next_line().await?;
        let bytes = Bytes::from(format!("{line}\n"));
        Some((Ok::<_, std::convert::Infallible>(bytes), b))
    });
    crate::generation::streamed(body, "application/jsonlines")
}
