//! The API dialects: one file per API, declaring as a
//! [`Dialect`](crate::funnel::Dialect) only what its reference does
//! differently, reading its JSON into the request funnel
//! ([`crate::funnel`]) and writing the engine's events back as its answers.
//! Adding an API (the Responses API is next; Anthropic's Messages API is
//! [`anthropic`], routed by [`crate::messages`]) is one file here, plus its
//! routes: a handler module that finds the model and submits (as
//! [`crate::openai`] does) and its lines in [`crate`]'s router.
//! LMI's two ways of streaming, which depend on the model's
//! `serving.properties`, stay beside its routes ([`crate::lmi_stream`],
//! [`crate::lmi_outputs`]).

pub mod anthropic;
pub mod lmi;
pub mod openai;
pub mod responses;

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use serde_json::{json, Value};

    use kiln_engine::Request;

    use super::{anthropic, lmi, openai};
    use crate::error::ApiError;
    use crate::funnel::{request, MAX_NEW_TOKENS};
    use crate::params::Fields;

    /// What a dialect makes of one set of parameters.
    enum Want {
        /// Accepted, and the request passes the check.
        Takes(fn(&Request) -> bool),
        /// Refused with 400 and exactly this message.
        Refuses(&'static str),
    }
    use Want::{Refuses, Takes};

    /// `params` as the LMI routes read them: `{"inputs", "parameters"}`.
    fn via_lmi(params: &Value) -> Result<Request, ApiError> {
        let body = json!({"inputs": "x", "parameters": params});
        lmi::parse(Some("application/json"), body.to_string().as_bytes()).map(|r| r.params)
    }

    /// `params` as `/v1/completions` reads them: beside `prompt`.
    fn via_openai(params: &Value) -> Result<Request, ApiError> {
        let mut body = params.clone();
        body["prompt"] = json!("x");
        let f = Fields::new(&body, "")?;
        openai::common(&f, 16).map(|c| c.params)
    }

    fn check(dialect: &str, params: &Value, got: Result<Request, ApiError>, want: &Want) {
        match (got, want) {
            (Ok(r), Takes(ok)) => assert!(ok(&r), "{dialect} {params}: {r:?}"),
            (Err(e), Refuses(msg)) => {
                assert_eq!(e.status, StatusCode::BAD_REQUEST, "{dialect} {params}");
                assert_eq!(e.message, *msg, "{dialect} {params}");
                if dialect == lmi::LMI.name {
                    // The LMI routes answer validation failures with DJL's 424.
                    let e = crate::djl_status::validation(e);
                    assert_eq!(e.status.as_u16(), 424, "{dialect} {params}");
                }
            }
            (Ok(r), Refuses(msg)) => panic!("{dialect} {params}: took {r:?}, want '{msg}'"),
            (Err(e), Takes(_)) => panic!("{dialect} {params}: refused: {}", e.message),
        }
    }

    /// The shared extras (penalties, seed, stop ids) as both dialects
    /// read them: the same field names, the same values.
    fn takes_the_shared_extras(r: &Request) -> bool {
        r.sampling.min_p == 0.1
            && r.sampling.repetition_penalty == 1.1
            && r.sampling.presence_penalty == -1.0
            && r.sampling.frequency_penalty == 0.5
            && r.sampling.seed == Some(7)
            && r.stop.stop_token_ids == [3]
            && r.stop.ignore_eos
    }

    /// One table of sampling parameters, read through both dialects: the
    /// shared rules answer alike (the messages naming the field where the
    /// API puts it), and the differences are the dialects' own: field
    /// names, defaults, LMI's `do_sample` and OpenAI's temperature bound.
    #[test]
    fn the_same_rules_reach_every_dialect() {
        let stops: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
        let cases: Vec<(Value, Want, Want)> = vec![
            (
                json!({}),
                Takes(|r| r.stop.max_new_tokens == 30 && r.sampling.temperature == 0.0),
                Takes(|r| r.stop.max_new_tokens == 16 && r.sampling.temperature == 1.0),
            ),
            (
                json!({"temperature": 0.5}),
                Takes(|r| r.sampling.temperature == 0.0),
                Takes(|r| r.sampling.temperature == 0.5),
            ),
            (
                json!({"temperature": 0.5, "do_sample": true}),
                Takes(|r| r.sampling.temperature == 0.5),
                Takes(|r| r.sampling.temperature == 0.5),
            ),
            (
                json!({"temperature": 5, "do_sample": true}),
                Takes(|r| r.sampling.temperature == 5.0),
                Refuses("'temperature' must be a number from 0 to 2, got 5"),
            ),
            (
                json!({"temperature": 101, "do_sample": true}),
                Refuses("'parameters.temperature' must be a number from 0 to 100, got 101"),
                Refuses("'temperature' must be a number from 0 to 2, got 101"),
            ),
            (
                json!({"top_p": 0}),
                Refuses("'parameters.top_p' must be greater than 0"),
                Refuses("'top_p' must be greater than 0"),
            ),
            (
                json!({"top_p": 1.5}),
                Refuses("'parameters.top_p' must be a number from 0 to 1, got 1.5"),
                Refuses("'top_p' must be a number from 0 to 1, got 1.5"),
            ),
            (
                json!({"top_k": -1}),
                Takes(|r| r.sampling.top_k == 0),
                Takes(|r| r.sampling.top_k == 0),
            ),
            (
                json!({"top_k": 40}),
                Takes(|r| r.sampling.top_k == 40),
                Takes(|r| r.sampling.top_k == 40),
            ),
            (
                json!({"top_k": -2}),
                Refuses("'parameters.top_k' must be an integer from 0 to 4294967295, got -2"),
                Refuses("'top_k' must be an integer from 0 to 4294967295, got -2"),
            ),
            (
                json!({"max_new_tokens": 0}),
                Refuses("'parameters.max_new_tokens' must be at least 1"),
                Takes(|r| r.stop.max_new_tokens == 16),
            ),
            (
                json!({"max_tokens": 0}),
                Takes(|r| r.stop.max_new_tokens == 30),
                Refuses("'max_tokens' must be at least 1"),
            ),
            (
                json!({"max_completion_tokens": 5, "max_tokens": 9}),
                Takes(|r| r.stop.max_new_tokens == 30),
                Takes(|r| r.stop.max_new_tokens == 5),
            ),
            (
                json!({"max_new_tokens": 7}),
                Takes(|r| r.stop.max_new_tokens == 7),
                Takes(|r| r.stop.max_new_tokens == 16),
            ),
            (
                json!({"max_new_tokens": MAX_NEW_TOKENS + 1, "max_tokens": MAX_NEW_TOKENS + 1}),
                Refuses(
                    "'parameters.max_new_tokens' must be an integer from 0 to 1048576, got 1048577",
                ),
                Refuses("'max_tokens' must be an integer from 0 to 1048576, got 1048577"),
            ),
            (
                json!({"stop": stops}),
                Refuses("'parameters.stop_sequences' takes at most 16 sequences, got 17"),
                Refuses("'stop' takes at most 16 sequences, got 17"),
            ),
            (
                json!({"stop": &stops[..16]}),
                Takes(|r| r.stop.stop_strings.len() == 16),
                Takes(|r| r.stop.stop_strings.len() == 16),
            ),
            (
                json!({"stop_sequences": ["a"], "stop": "b"}),
                Takes(|r| r.stop.stop_strings == ["a", "b"]),
                Takes(|r| r.stop.stop_strings == ["b"]),
            ),
            (
                json!({"stop": [1]}),
                Refuses("'parameters.stop' must be a list of strings, got 1"),
                Refuses("'stop' must be a list of strings, got 1"),
            ),
            (
                json!({"min_p": 0.1, "repetition_penalty": 1.1, "presence_penalty": -1,
                    "frequency_penalty": 0.5, "seed": 7, "stop_token_ids": [3], "ignore_eos": true}),
                Takes(takes_the_shared_extras),
                Takes(takes_the_shared_extras),
            ),
            (
                json!({"logit_bias": {"5": -100, "7": 2.5}}),
                Takes(|r| {
                    let mut b = r.sampling.logit_bias.clone();
                    b.sort_by_key(|e| e.0);
                    b == [(5, -100.0), (7, 2.5)]
                }),
                Takes(|r| {
                    let mut b = r.sampling.logit_bias.clone();
                    b.sort_by_key(|e| e.0);
                    b == [(5, -100.0), (7, 2.5)]
                }),
            ),
            (
                json!({"logit_bias": {"5": 101}}),
                Refuses(
                    "'parameters.logit_bias' of token 5 must be a number from -100 to 100, got 101",
                ),
                Refuses("'logit_bias' of token 5 must be a number from -100 to 100, got 101"),
            ),
            (
                json!({"logit_bias": {"the": 1}}),
                Refuses("'parameters.logit_bias' keys must be token ids, got 'the'"),
                Refuses("'logit_bias' keys must be token ids, got 'the'"),
            ),
            (
                json!({"logit_bias": [1]}),
                Refuses(
                    "'parameters.logit_bias' must be an object from token ids to biases, got [1]",
                ),
                Refuses("'logit_bias' must be an object from token ids to biases, got [1]"),
            ),
            (
                json!({"min_p": 2}),
                Refuses("'parameters.min_p' must be a number from 0 to 1, got 2"),
                Refuses("'min_p' must be a number from 0 to 1, got 2"),
            ),
            (
                json!({"presence_penalty": -3}),
                Refuses("'parameters.presence_penalty' must be a number from -2 to 2, got -3"),
                Refuses("'presence_penalty' must be a number from -2 to 2, got -3"),
            ),
            (
                json!({"top_n_tokens": 3}),
                Takes(|r| r.sampling.top_logprobs == 3),
                // OpenAI's `logprobs` is read per endpoint, by its module.
                Takes(|r| r.sampling.top_logprobs == 0),
            ),
            (
                json!({"top_n_tokens": 21}),
                Refuses("'parameters.top_n_tokens' must be an integer from 0 to 20, got 21"),
                Takes(|r| r.sampling.top_logprobs == 0),
            ),
            (
                json!({"guided_choice": ["yes", "no"]}),
                Takes(|r| r.constraint.is_some()),
                Takes(|r| r.constraint.is_some()),
            ),
            (
                json!({"ignore_eos": "yes"}),
                Refuses("'parameters.ignore_eos' must be true or false, got \"yes\""),
                Refuses("'ignore_eos' must be true or false, got \"yes\""),
            ),
        ];
        for (params, lmi_want, openai_want) in &cases {
            check(lmi::LMI.name, params, via_lmi(params), lmi_want);
            check(openai::OPENAI.name, params, via_openai(params), openai_want);
        }
    }

    /// `params` as `/v1/messages` reads them: beside `messages`, with
    /// `max_tokens` (required there) unless given.
    fn via_anthropic(params: &Value) -> Result<Request, ApiError> {
        let mut body = params.clone();
        body["messages"] = json!([{"role": "user", "content": "x"}]);
        if body.get("max_tokens").is_none() {
            body["max_tokens"] = json!(16);
        }
        let f = Fields::new(&body, "")?;
        anthropic::parse(&f).map(|p| p.params)
    }

    /// The shared rules reach Anthropic's dialect too, with its own names
    /// and bounds: `stop_sequences`, temperature from 0 to 1, and only the
    /// fields of Anthropic's reference (vLLM's extras are refused by name).
    #[test]
    fn the_same_rules_reach_the_anthropic_dialect() {
        let cases: Vec<(Value, Want)> = vec![
            (
                json!({}),
                Takes(|r| r.stop.max_new_tokens == 16 && r.sampling.temperature == 1.0),
            ),
            (
                json!({"temperature": 0.5}),
                Takes(|r| r.sampling.temperature == 0.5),
            ),
            (
                json!({"temperature": 2}),
                Refuses("'temperature' must be a number from 0 to 1, got 2"),
            ),
            (
                json!({"top_p": 0}),
                Refuses("'top_p' must be greater than 0"),
            ),
            (json!({"top_k": 40}), Takes(|r| r.sampling.top_k == 40)),
            (
                json!({"max_tokens": 0}),
                Refuses("'max_tokens' must be at least 1"),
            ),
            (
                json!({"max_tokens": MAX_NEW_TOKENS + 1}),
                Refuses("'max_tokens' must be an integer from 0 to 1048576, got 1048577"),
            ),
            (
                json!({"stop_sequences": (0..17).map(|i| format!("s{i}")).collect::<Vec<_>>()}),
                Refuses("'stop_sequences' takes at most 16 sequences, got 17"),
            ),
            (
                json!({"stop_sequences": ["a", "b"]}),
                Takes(|r| r.stop.stop_strings == ["a", "b"]),
            ),
            (
                json!({"stop": ["a"]}),
                Refuses("the request: unknown field 'stop'"),
            ),
            (
                json!({"min_p": 0.1}),
                Refuses("the request: unknown field 'min_p'"),
            ),
        ];
        for (params, want) in &cases {
            check(
                anthropic::ANTHROPIC.name,
                params,
                via_anthropic(params),
                want,
            );
        }
    }

    /// A body without parameters gets each dialect's defaults.
    #[test]
    fn no_parameters_is_each_dialects_defaults() {
        let r = request(None, &lmi::LMI, 30).unwrap();
        assert_eq!((r.stop.max_new_tokens, r.sampling.temperature), (30, 0.0));
        let r = request(None, &openai::OPENAI, 16).unwrap();
        assert_eq!((r.stop.max_new_tokens, r.sampling.temperature), (16, 1.0));
        assert!(r.prompt.is_empty() && r.skip_special_tokens && !r.prompt_logprobs);
    }
}
