//! Reading request bodies field by field, so one answer lists every offending field: unknown
//! fields, missing ones, wrong types and invalid values alike.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use im_domain::{DomainError, FieldViolation, ViolationKind, Violations};

use super::problem::ApiError;

/// A JSON object being read into a domain value.
#[derive(Debug)]
pub struct Input {
    map: Map<String, Value>,
    violations: Violations,
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Input {
    /// Starts reading `value`, which must be an object whose keys are all in `known`.
    ///
    /// # Errors
    /// [`ApiError::Malformed`] when the body is not a JSON object.
    pub fn new(value: Value, known: &[&str]) -> Result<Self, ApiError> {
        let Value::Object(map) = value else {
            return Err(ApiError::Malformed(format!("the body must be a JSON object, not {}", type_name(&value))));
        };
        let mut violations = Violations::new();
        for key in map.keys().filter(|k| !known.contains(&k.as_str())) {
            violations.push(FieldViolation::new(
                key.clone(),
                ViolationKind::UnknownField,
                format!("is not a field of this resource (known: {})", known.join(", ")),
            ));
        }
        Ok(Self { map, violations })
    }

    /// Reads an optional field; `null` counts as absent.
    pub fn optional<T: DeserializeOwned>(&mut self, field: &str) -> Option<T> {
        let value = self.map.remove(field).filter(|v| !v.is_null())?;
        let shown = type_name(&value);
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(parsed) => Some(parsed),
            Err(e) => {
                let inner = e.path().to_string();
                let path = if inner == "." || inner.is_empty() { field.to_owned() } else { format!("{field}.{inner}") };
                let message = e.into_inner().to_string();
                let kind = if message.starts_with("unknown field") {
                    ViolationKind::UnknownField
                } else if message.starts_with("missing field") {
                    ViolationKind::Missing
                } else {
                    ViolationKind::WrongType
                };
                let message = if kind == ViolationKind::WrongType && !message.contains("invalid type") && inner == "." {
                    format!("{message} (got {shown})")
                } else {
                    message
                };
                self.violations.push(FieldViolation::new(path, kind, message));
                None
            }
        }
    }

    /// Reads a required field.
    pub fn required<T: DeserializeOwned>(&mut self, field: &str) -> Option<T> {
        if self.map.get(field).is_none_or(Value::is_null) {
            self.violations.push(FieldViolation::new(field, ViolationKind::Missing, "is required"));
            self.map.remove(field);
            return None;
        }
        self.optional(field)
    }

    /// Reads an optional string and checks it with a validated constructor.
    pub fn validated<T>(&mut self, field: &str, required: bool, parse: impl FnOnce(String) -> Result<T, FieldViolation>) -> Option<T> {
        let text: String = if required { self.required(field)? } else { self.optional(field)? };
        self.violations.check(field, parse(text))
    }

    /// Records a value problem found while reading.
    pub fn invalid(&mut self, field: &str, message: impl Into<String>) {
        self.violations.invalid(field, message);
    }

    /// Records the result of a rule check.
    pub fn check(&mut self, field: &str, result: Result<(), FieldViolation>) {
        self.violations.check(field, result);
    }

    /// Ends reading: `Ok` when every field was fine, otherwise every violation.
    ///
    /// # Errors
    /// [`DomainError::Validation`] listing every offending field.
    pub fn finish(self) -> Result<(), DomainError> {
        self.violations.finish(|| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_problem_is_collected() {
        let mut input = Input::new(json!({"name": 5, "extra": true, "nested": {"a": "x"}}), &["name", "status", "nested"]).unwrap();
        let name: Option<String> = input.required("name");
        let status: Option<String> = input.required("status");
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Nested {
            a: u32,
        }
        let nested: Option<Nested> = input.optional("nested");
        assert!(name.is_none() && status.is_none() && nested.is_none());
        let Err(DomainError::Validation(v)) = input.finish() else { panic!() };
        let got: Vec<_> = v.iter().map(|v| (v.field.as_str(), v.kind)).collect();
        assert!(got.contains(&("extra", ViolationKind::UnknownField)), "{got:?}");
        assert!(got.contains(&("name", ViolationKind::WrongType)), "{got:?}");
        assert!(got.contains(&("status", ViolationKind::Missing)), "{got:?}");
        assert!(got.contains(&("nested.a", ViolationKind::WrongType)), "{got:?}");
    }

    #[test]
    fn non_objects_are_malformed() {
        assert!(matches!(Input::new(json!([1]), &[]), Err(ApiError::Malformed(_))));
    }
}
