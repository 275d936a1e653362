//! The request fields that constrain output (structured outputs), read the
//! same way on every route: OpenAI's `response_format`, vLLM's older
//! top-level `guided_json` / `guided_regex` / `guided_choice` /
//! `guided_grammar` and its newer `structured_outputs` object. The OpenAI
//! routes read them at the top level of the body, the LMI routes inside
//! `parameters` (DJL's LMI passes vLLM's sampling fields through there).
//!
//! Failing closed is the point: a constraint field kiln does not know or
//! does not implement is a 400, never ignored, so a client cannot get
//! unconstrained text while it believes it asked for JSON.

use kiln_engine::Constraint;
use serde_json::Value;

use crate::error::ApiError;
use crate::params::Fields;

/// `guided_*` fields kiln implements; any other `guided_*` field is refused.
const GUIDED: &[&str] = &[
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
];
/// Keys of `structured_outputs` kiln implements.
const STRUCTURED: &[&str] = &["json", "regex", "choice", "grammar", "json_object"];

/// The constraint a request asks for, if any; at most one may be given.
pub fn parse(f: &Fields) -> Result<Option<Constraint>, ApiError> {
    let mut found: Vec<(String, Constraint)> = Vec::new();
    if let Some(rf) = f.get("response_format") {
        if let Some(c) = response_format(rf)? {
            found.push(("response_format".into(), c));
        }
    }
    for key in f.keys() {
        if key.starts_with("guided_") && f.has(key) && !GUIDED.contains(&key.as_str()) {
            return Err(ApiError::bad_request(format!(
                "'{key}' is not supported (kiln implements {})",
                GUIDED.join(", ")
            )));
        }
    }
    for &key in GUIDED {
        if let Some(v) = f.get(key) {
            found.push((
                key.to_string(),
                constraint(key, key.trim_start_matches("guided_"), v)?,
            ));
        }
    }
    if let Some(so) = f.get("structured_outputs") {
        let sf = Fields::new(so, "structured_outputs")?;
        for key in sf.keys() {
            if !STRUCTURED.contains(&key.as_str()) && sf.has(key) {
                return Err(ApiError::bad_request(format!(
                    "'structured_outputs.{key}' is not supported (kiln implements {})",
                    STRUCTURED.join(", ")
                )));
            }
        }
        for &key in STRUCTURED {
            let Some(v) = sf.get(key) else { continue };
            let name = format!("structured_outputs.{key}");
            if key == "json_object" {
                match v {
                    Value::Bool(true) => found.push((name, Constraint::JsonObject)),
                    Value::Bool(false) => {}
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "'{name}' must be true or false, got {other}"
                        )))
                    }
                }
            } else {
                found.push((name.clone(), constraint(&name, key, v)?));
            }
        }
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop().map(|(_, c)| c)),
        _ => {
            let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
            Err(ApiError::bad_request(format!(
                "give one output constraint, not several: {}",
                names.join(", ")
            )))
        }
    }
}

/// One `guided_*` / `structured_outputs` value (`kind` is `json`, `regex`,
/// `choice` or `grammar`; `name` is the field, for messages).
fn constraint(name: &str, kind: &str, v: &Value) -> Result<Constraint, ApiError> {
    let bad = |want: &str| ApiError::bad_request(format!("'{name}' must be {want}, got {v}"));
    match kind {
        "json" => match v {
            // vLLM takes the schema as an object or as its JSON text.
            Value::String(s) => serde_json::from_str(s)
                .map(Constraint::JsonSchema)
                .map_err(|e| ApiError::bad_request(format!("'{name}' is not a JSON schema: {e}"))),
            Value::Object(_) | Value::Bool(_) => Ok(Constraint::JsonSchema(v.clone())),
            _ => Err(bad("a JSON schema (an object, or its JSON text)")),
        },
        "regex" => match v {
            Value::String(s) => Ok(Constraint::Regex(s.clone())),
            _ => Err(bad("a regular expression")),
        },
        "choice" => match v {
            Value::Array(items) if !items.is_empty() => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(bad("a non-empty list of strings")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Constraint::Choice),
            _ => Err(bad("a non-empty list of strings")),
        },
        "grammar" => match v {
            Value::String(s) if !s.trim().is_empty() => Ok(Constraint::Grammar(s.clone())),
            _ => Err(bad("a grammar in Lark syntax")),
        },
        _ => Err(ApiError::bad_request(format!("'{name}' is not supported"))),
    }
}

/// OpenAI's `response_format`: `text`, `json_object`, or `json_schema` with
/// `{name, schema, strict, description}`.
fn response_format(rf: &Value) -> Result<Option<Constraint>, ApiError> {
    let f = Fields::new(rf, "response_format")?;
    let ty = f
        .str("type")?
        .ok_or_else(|| ApiError::bad_request("'response_format.type' is required"))?;
    let allowed: &[&str] = match ty {
        "text" => &["type"],
        // `schema` beside `json_object`: the convention several hosted APIs
        // take (instructor's Mode.JSON_SCHEMA sends it); kiln goes beyond
        // OpenAI, which has no such key, by constraining to the schema.
        "json_object" => &["type", "schema"],
        "json_schema" => &["type", "json_schema"],
        other => {
            return Err(ApiError::bad_request(format!(
                "response_format type '{other}' is not supported (use text, json_object or json_schema)"
            )))
        }
    };
    if let Some(k) = f
        .keys()
        .find(|k| !allowed.contains(&k.as_str()) && f.has(k))
    {
        return Err(ApiError::bad_request(format!(
            "'response_format.{k}' is not supported with type '{ty}'"
        )));
    }
    match ty {
        "text" => Ok(None),
        "json_object" => match f.get("schema") {
            None | Some(Value::Null) => Ok(Some(Constraint::JsonObject)),
            Some(s @ Value::Object(_)) => Ok(Some(Constraint::JsonSchema(s.clone()))),
            Some(other) => Err(ApiError::bad_request(format!(
                "'response_format.schema' must be a JSON schema object, got {other}"
            ))),
        },
        _ => {
            let js = f.get("json_schema").ok_or_else(|| {
                ApiError::bad_request(
                    "'response_format.json_schema' is required with type 'json_schema'",
                )
            })?;
            let jf = Fields::new(js, "response_format.json_schema")?;
            const KEYS: &[&str] = &["name", "schema", "strict", "description"];
            if let Some(k) = jf.keys().find(|k| !KEYS.contains(&k.as_str()) && jf.has(k)) {
                return Err(ApiError::bad_request(format!(
                    "'response_format.json_schema.{k}' is not supported (expected {})",
                    KEYS.join(", ")
                )));
            }
            // Read for their type checks; the name only labels the schema,
            // and the schema is enforced whether `strict` is set or not.
            jf.str("name")?;
            jf.str("description")?;
            jf.bool("strict")?;
            match jf.get("schema") {
                Some(s @ (Value::Object(_) | Value::Bool(_))) => {
                    Ok(Some(Constraint::JsonSchema(s.clone())))
                }
                Some(other) => Err(ApiError::bad_request(format!(
                    "'response_format.json_schema.schema' must be a JSON schema object, got {other}"
                ))),
                None => Err(ApiError::bad_request(
                    "'response_format.json_schema.schema' is required",
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn read(v: Value) -> Result<Option<Constraint>, String> {
        let f = Fields::new(&v, "").map_err(|e| e.message)?;
        parse(&f).map_err(|e| e.message)
    }

    #[test]
    fn each_surface_names_its_constraint() {
        let schema = json!({"type": "object"});
        let expect = Some(Constraint::JsonSchema(schema.clone()));
        let rf = json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": schema, "strict": true}}});
        assert_eq!(read(rf).unwrap(), expect);
        assert_eq!(read(json!({"guided_json": schema})).unwrap(), expect);
        assert_eq!(
            read(json!({"guided_json": "{\"type\": \"object\"}"})).unwrap(),
            expect
        );
        assert_eq!(
            read(json!({"structured_outputs": {"json": schema}})).unwrap(),
            expect
        );
        assert_eq!(
            read(json!({"response_format": {"type": "json_object"}})).unwrap(),
            Some(Constraint::JsonObject)
        );
        // instructor's Mode.JSON_SCHEMA: a schema beside `json_object`.
        assert_eq!(
            read(json!({"response_format": {"type": "json_object", "schema": schema}})).unwrap(),
            expect
        );
        assert_eq!(
            read(json!({"structured_outputs": {"json_object": true}})).unwrap(),
            Some(Constraint::JsonObject)
        );
        assert_eq!(
            read(json!({"guided_choice": ["a", "b"]})).unwrap(),
            Some(Constraint::Choice(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            read(json!({"structured_outputs": {"regex": "[0-9]+"}})).unwrap(),
            Some(Constraint::Regex("[0-9]+".into()))
        );
        assert_eq!(
            read(json!({"guided_grammar": "start: \"a\""})).unwrap(),
            Some(Constraint::Grammar("start: \"a\"".into()))
        );
        assert_eq!(
            read(json!({"response_format": {"type": "text"}})).unwrap(),
            None
        );
        assert_eq!(read(json!({"guided_json": null})).unwrap(), None);
    }

    #[test]
    fn unknown_or_unsupported_fields_are_refused() {
        for (body, needle) in [
            (
                json!({"guided_whitespace_pattern": " "}),
                "guided_whitespace_pattern",
            ),
            (
                json!({"structured_outputs": {"structural_tag": "x"}}),
                "structural_tag",
            ),
            (json!({"response_format": {"type": "grammar"}}), "grammar"),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "foo": 1}}}),
                "foo",
            ),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "json_schema",
            ),
            (
                json!({"response_format": {"type": "json_object", "schema": 3}}),
                "schema",
            ),
            (
                json!({"response_format": {"type": "text", "schema": {}}}),
                "schema",
            ),
            (json!({"guided_choice": []}), "guided_choice"),
            (json!({"guided_regex": 5}), "guided_regex"),
            (json!({"guided_json": "{not json"}), "guided_json"),
            (
                json!({"guided_regex": "a", "response_format": {"type": "json_object"}}),
                "not several",
            ),
        ] {
            let err = read(body.clone()).expect_err(&body.to_string());
            assert!(err.contains(needle), "{body}: {err}");
        }
    }
}
