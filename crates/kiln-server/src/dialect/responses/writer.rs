//! The Responses API's output: the model's text, pushed piece by piece,
//! turned into output items (`reasoning`, `message`, `function_call`) and
//! the events that stream them, and the response object around them.

use serde_json::{json, Map, Value};

use crate::reasoning::{ReasoningParser, Splitter};
use crate::tool_parse::{ParsedCall, ToolEvent, ToolStream, ToolSyntax};

/// A fresh id with `prefix` (`resp`, `msg`, `fc`, `rs`): 24 random hex
/// digits, so stored responses cannot be guessed.
pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 12];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b.copy_from_slice(&t.to_le_bytes()[..12]);
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{prefix}_{hex}")
}

/// Which open output item text is going to.
#[derive(Debug)]
enum Open {
    Reasoning {
        index: usize,
        id: String,
        text: String,
    },
    Message {
        index: usize,
        id: String,
        text: String,
    },
    /// A function call whose arguments stream in (`item` holds its
    /// name and ids; `arguments` grows).
    Call {
        index: usize,
        item: Value,
        arguments: String,
    },
}

/// Turns a model's output, pushed piece by piece (a stream's tokens, or a
/// whole answer at once), into the Responses API's output items and the
/// events that stream them. The same writer serves both, so a streamed
/// answer's items are the whole answer's.
#[derive(Debug)]
pub struct Writer {
    seq: u64,
    splitter: Option<Splitter>,
    tools: Option<ToolStream>,
    /// Finished output items.
    pub output: Vec<Value>,
    open: Option<Open>,
    /// Whitespace held before any message is open (it may be nothing but
    /// the gap between tool calls).
    pending_space: String,
    /// Tokens whose text went to the reasoning.
    pub reasoning_tokens: usize,
}

impl Writer {
    /// A writer splitting reasoning with `reasoning` and reading calls in
    /// `tools`, where given.
    pub fn new(reasoning: Option<ReasoningParser>, tools: Option<ToolSyntax>) -> Self {
        Self {
            seq: 0,
            splitter: reasoning.map(Splitter::new),
            tools: tools.map(ToolStream::new),
            output: Vec::new(),
            open: None,
            pending_space: String::new(),
            reasoning_tokens: 0,
        }
    }

    /// An event of type `ty` with the next sequence number.
    pub fn event(&mut self, ty: &str, mut v: Value) -> Value {
        v["type"] = json!(ty);
        v["sequence_number"] = json!(self.seq);
        self.seq += 1;
        v
    }

    /// The next index in `output`.
    fn next_index(&self) -> usize {
        self.output.len()
    }

    /// Takes one piece of output (a token's text); the events it makes.
    pub fn push(&mut self, text: &str) -> Vec<Value> {
        let mut ev = Vec::new();
        let (r, c) = match &mut self.splitter {
            Some(s) => s.push(text),
            None => (String::new(), text.to_string()),
        };
        if !r.is_empty() && c.is_empty() {
            self.reasoning_tokens += 1;
        }
        self.reasoning(&r, &mut ev);
        self.content(&c, false, &mut ev);
        ev
    }

    /// Ends the output; `status` is the items' final status (`completed`,
    /// or `incomplete` when the output was cut short).
    pub fn finish(&mut self, status: &str) -> Vec<Value> {
        let mut ev = Vec::new();
        let (r, c) = match &mut self.splitter {
            Some(s) => s.finish(),
            None => (String::new(), String::new()),
        };
        self.reasoning(&r, &mut ev);
        self.content(&c, true, &mut ev);
        if !self.pending_space.is_empty() && self.output.is_empty() && self.open.is_none() {
            let t = std::mem::take(&mut self.pending_space);
            self.text(&t, &mut ev);
        }
        self.close(status, &mut ev);
        ev
    }

    fn reasoning(&mut self, r: &str, ev: &mut Vec<Value>) {
        if r.is_empty() {
            return;
        }
        if !matches!(self.open, Some(Open::Reasoning { .. })) {
            self.close("completed", ev);
            let (index, id) = (self.next_index(), new_id("rs"));
            let item = json!({"type": "reasoning", "id": id, "summary": [], "content": [],
                "status": "in_progress"});
            let e = self.event(
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            );
            ev.push(e);
            let e = self.event(
                "response.content_part.added",
                json!({"item_id": id,
                "output_index": index, "content_index": 0,
                "part": {"type": "reasoning_text", "text": ""}}),
            );
            ev.push(e);
            self.open = Some(Open::Reasoning {
                index,
                id,
                text: String::new(),
            });
        }
        if let Some(Open::Reasoning { index, id, text }) = &mut self.open {
            text.push_str(r);
            let v = json!({"item_id": id.clone(), "output_index": *index, "content_index": 0,
                "delta": r});
            let e = self.event("response.reasoning_text.delta", v);
            ev.push(e);
        }
    }

    fn content(&mut self, c: &str, end: bool, ev: &mut Vec<Value>) {
        let events = match &mut self.tools {
            Some(ts) => {
                let mut e = ts.push(c);
                if end {
                    e.extend(ts.finish());
                }
                e
            }
            None if c.is_empty() => Vec::new(),
            None => vec![ToolEvent::Content(c.to_string())],
        };
        for e in events {
            match e {
                ToolEvent::Content(t) => {
                    let open_message = matches!(self.open, Some(Open::Message { .. }));
                    if !open_message && t.trim().is_empty() {
                        self.pending_space.push_str(&t);
                        continue;
                    }
                    let t = std::mem::take(&mut self.pending_space) + &t;
                    self.text(&t, ev);
                }
                ToolEvent::Call(call) => {
                    self.pending_space.clear();
                    self.call(call, ev);
                }
                ToolEvent::CallStart { name } => {
                    self.pending_space.clear();
                    self.start_call(&name, ev);
                }
                ToolEvent::CallArguments(a) => self.call_arguments(&a, ev),
            }
        }
    }

    fn text(&mut self, t: &str, ev: &mut Vec<Value>) {
        if !matches!(self.open, Some(Open::Message { .. })) {
            self.close("completed", ev);
            let (index, id) = (self.next_index(), new_id("msg"));
            let item = json!({"type": "message", "id": id, "status": "in_progress",
                "role": "assistant", "content": []});
            let e = self.event(
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            );
            ev.push(e);
            let e = self.event(
                "response.content_part.added",
                json!({"item_id": id,
                "output_index": index, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
            );
            ev.push(e);
            self.open = Some(Open::Message {
                index,
                id,
                text: String::new(),
            });
        }
        if let Some(Open::Message { index, id, text }) = &mut self.open {
            text.push_str(t);
            let v = json!({"item_id": id.clone(), "output_index": *index, "content_index": 0,
                "delta": t, "logprobs": []});
            let e = self.event("response.output_text.delta", v);
            ev.push(e);
        }
    }

    /// A call given whole: its item opened, its arguments in one delta, closed.
    fn call(&mut self, call: ParsedCall, ev: &mut Vec<Value>) {
        self.start_call(&call.name, ev);
        self.call_arguments(&call.arguments, ev);
        self.close("completed", ev);
    }

    /// Opens a `function_call` item (closing what was open).
    fn start_call(&mut self, name: &str, ev: &mut Vec<Value>) {
        self.close("completed", ev);
        let (index, id, call_id) = (self.next_index(), new_id("fc"), crate::tools::call_id());
        let item = json!({"type": "function_call", "id": id, "call_id": call_id,
            "name": name, "arguments": "", "status": "in_progress"});
        let e = self.event(
            "response.output_item.added",
            json!({"output_index": index, "item": item.clone()}),
        );
        ev.push(e);
        self.open = Some(Open::Call {
            index,
            item,
            arguments: String::new(),
        });
    }

    /// More of the open call's arguments (nothing when no call is open).
    fn call_arguments(&mut self, a: &str, ev: &mut Vec<Value>) {
        if let Some(Open::Call {
            index,
            item,
            arguments,
        }) = &mut self.open
        {
            arguments.push_str(a);
            let v = json!({"item_id": item["id"].clone(), "output_index": *index, "delta": a});
            let e = self.event("response.function_call_arguments.delta", v);
            ev.push(e);
        }
    }

    /// Closes the open item, if any, with `status`.
    fn close(&mut self, status: &str, ev: &mut Vec<Value>) {
        match self.open.take() {
            None => {}
            Some(Open::Call {
                index,
                mut item,
                arguments,
            }) => {
                let e = self.event(
                    "response.function_call_arguments.done",
                    json!({"item_id": item["id"].clone(), "output_index": index,
                        "name": item["name"].clone(), "arguments": arguments}),
                );
                ev.push(e);
                item["arguments"] = json!(arguments);
                item["status"] = json!(status);
                let e = self.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item.clone()}),
                );
                ev.push(e);
                self.output.push(item);
            }
            Some(Open::Reasoning { index, id, text }) => {
                let part = json!({"type": "reasoning_text", "text": text});
                let e = self.event(
                    "response.reasoning_text.done",
                    json!({"item_id": id,
                    "output_index": index, "content_index": 0, "text": text}),
                );
                ev.push(e);
                let e = self.event(
                    "response.content_part.done",
                    json!({"item_id": id,
                    "output_index": index, "content_index": 0, "part": part}),
                );
                ev.push(e);
                let item = json!({"type": "reasoning", "id": id, "summary": [],
                    "content": [part], "status": status});
                let e = self.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item.clone()}),
                );
                ev.push(e);
                self.output.push(item);
            }
            Some(Open::Message { index, id, text }) => {
                let part =
                    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
                let e = self.event(
                    "response.output_text.done",
                    json!({"item_id": id,
                    "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
                );
                ev.push(e);
                let e = self.event(
                    "response.content_part.done",
                    json!({"item_id": id,
                    "output_index": index, "content_index": 0, "part": part}),
                );
                ev.push(e);
                let item = json!({"type": "message", "id": id, "status": status,
                    "role": "assistant", "content": [part]});
                let e = self.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item.clone()}),
                );
                ev.push(e);
                self.output.push(item);
            }
        }
    }
}

/// Usage in the Responses shape; cached tokens never exceed the input.
pub fn usage_json(input: usize, output: usize, cached: usize, reasoning: usize) -> Value {
    json!({"input_tokens": input,
        "input_tokens_details": {"cached_tokens": cached.min(input)},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning.min(output)},
        "total_tokens": input + output})
}

/// A response object: `status` (`in_progress`, `completed`, `incomplete`,
/// `failed`), its output and usage, and the request's settings echoed.
pub fn response_json(
    id: &str,
    created_at: u64,
    model: &str,
    status: &str,
    output: &[Value],
    usage: Value,
    echo: &Map<String, Value>,
) -> Value {
    let mut v = json!({"id": id, "object": "response", "created_at": created_at,
        "status": status, "error": null, "incomplete_details": null, "model": model,
        "output": output, "usage": usage});
    for (k, e) in echo {
        v[k] = e.clone();
    }
    if status == "incomplete" {
        v["incomplete_details"] = json!({"reason": "max_output_tokens"});
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_splits_calls_and_text_into_items() {
        let mut w = Writer::new(None, Some(ToolSyntax::Hermes));
        let mut ev = Vec::new();
        for piece in [
            "Sure. ",
            "<tool_call>\n{\"name\": \"f\", ",
            "\"arguments\": {\"a\": 1}}\n</tool_call>\n",
        ] {
            ev.extend(w.push(piece));
        }
        ev.extend(w.finish("completed"));
        assert_eq!(w.output.len(), 2, "{:?}", w.output);
        assert_eq!(w.output[0]["content"][0]["text"], "Sure. ");
        assert_eq!(w.output[1]["type"], "function_call");
        assert_eq!(w.output[1]["arguments"], "{\"a\":1}");
        let seqs: Vec<u64> = ev
            .iter()
            .map(|e| e["sequence_number"].as_u64().unwrap())
            .collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
        assert!(!ev
            .iter()
            .any(|e| e["delta"].as_str().is_some_and(|d| d.contains("tool_call"))));
    }

    #[test]
    fn the_writer_puts_thinking_in_a_reasoning_item() {
        let mut w = Writer::new(Some(ReasoningParser::Qwen3), None);
        w.push("<think>hm");
        w.push("m</think>Paris");
        w.finish("completed");
        assert_eq!(w.output[0]["type"], "reasoning");
        assert_eq!(w.output[0]["content"][0]["text"], "hmm");
        assert_eq!(w.output[1]["content"][0]["text"], "Paris");
    }
}
