//! Reading request JSON field by field, so that every malformed value is a
//! 400 naming the field and what was expected.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// A JSON object whose fields are read with type checks.
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    /// Where the object sits in the request, for messages (`parameters`).
    path: &'static str,
}

impl<'a> Fields<'a> {
    /// Wraps `value`, which must be an object.
    pub fn new(value: &'a Value, path: &'static str) -> Result<Self, ApiError> {
        match value.as_object() {
            Some(map) => Ok(Self { map, path }),
            None => Err(ApiError::bad_request(format!(
                "'{path}' must be a JSON object"
            ))),
        }
    }

    /// `key` as errors name it: with the object's path (`parameters.top_p`).
    pub fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn bad(&self, key: &str, want: &str, got: &Value) -> ApiError {
        ApiError::bad_request(format!("'{}' must be {want}, got {got}", self.name(key)))
    }

    /// The raw value, treating JSON `null` as absent.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// Whether the object has a non-null `key`.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Keys of the object.
    pub fn keys(&self) -> impl Iterator<Item = &'a String> {
        self.map.keys()
    }

    /// A boolean.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(key, "true or false", v)),
        }
    }

    /// A non-negative integer no larger than `max`.
    pub fn uint(&self, key: &str, max: u64) -> Result<Option<u64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= max => Ok(Some(n)),
                _ => Err(self.bad(key, &format!("an integer from 0 to {max}"), v)),
            },
        }
    }

    /// A number in `lo..=hi`.
    pub fn float(&self, key: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(Some(x)),
                _ => Err(self.bad(key, &format!("a number from {lo} to {hi}"), v)),
            },
        }
    }

    /// A string.
    pub fn str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad(key, "a string", v)),
        }
    }

    /// A string or a list of strings (stop sequences), as a list.
    pub fn strings(&self, key: &str) -> Result<Vec<String>, ApiError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.bad(key, "a list of strings", other)),
                })
                .collect(),
            Some(v) => Err(self.bad(key, "a string or a list of strings", v)),
        }
    }

    /// A list of token ids.
    pub fn ids(&self, key: &str) -> Result<Vec<u32>, ApiError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .filter(|&n| n <= u32::MAX as u64)
                        .map(|n| n as u32)
                        .ok_or_else(|| self.bad(key, "a list of token ids", v))
                })
                .collect(),
            Some(v) => Err(self.bad(key, "a list of token ids", v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field_and_the_expectation() {
        let v = serde_json::json!({"a": "x", "n": -1, "t": 3.0, "s": [1], "b": null});
        let f = Fields::new(&v, "parameters").unwrap();
        let e = f.uint("n", 10).unwrap_err();
        assert!(
            e.message.contains("parameters.n") && e.message.contains("0 to 10"),
            "{}",
            e.message
        );
        assert!(f
            .float("t", 0.0, 2.0)
            .unwrap_err()
            .message
            .contains("parameters.t"));
        assert!(f
            .strings("s")
            .unwrap_err()
            .message
            .contains("list of strings"));
        assert_eq!(f.bool("b").unwrap(), None, "null is absent");
        assert_eq!(f.strings("a").unwrap(), vec!["x".to_string()]);
        assert!(Fields::new(&serde_json::json!([1]), "parameters").is_err());
    }
}
