//! JSON Schema handling for provider configuration schemas and integration `config` values.

use serde_json::Value;

use crate::error::FieldViolation;

/// Largest configuration schema accepted, in bytes of JSON.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;

/// Compiles a provider's configuration schema. It must be a valid JSON Schema (draft 2020-12
/// unless `$schema` says otherwise) describing an object.
///
/// # Errors
/// Every problem, with `field` relative to the schema document.
pub fn compile_config_schema(schema: &Value) -> Result<jsonschema::Validator, Vec<FieldViolation>> {
    let Some(object) = schema.as_object() else {
        return Err(vec![FieldViolation::invalid("", "must be a JSON Schema object")]);
    };
    if crate::common::json_len(schema) > MAX_SCHEMA_BYTES {
        return Err(vec![FieldViolation::invalid("", format!("must be at most {MAX_SCHEMA_BYTES} bytes"))]);
    }
    if object.get("type").and_then(Value::as_str) != Some("object") {
        return Err(vec![FieldViolation::invalid("type", "must be \"object\": an integration's config is a JSON object")]);
    }
    if let Some(reference) = find_remote_ref(schema) {
        return Err(vec![FieldViolation::invalid("", format!("must not reference external documents ({reference})"))]);
    }
    jsonschema::validator_for(schema).map_err(|e| {
        let path = pointer_to_path(&e.instance_path().to_string());
        vec![FieldViolation::invalid(path, format!("is not a valid JSON Schema: {e}"))]
    })
}

/// Finds a `$ref` that leaves the document (anything but `#...`), which would need network or file access.
fn find_remote_ref(value: &Value) -> Option<String> {
    match value {
        Value::Object(map) => map.iter().find_map(|(k, v)| match (k.as_str(), v) {
            ("$ref" | "$dynamicRef", Value::String(r)) if !r.starts_with('#') => Some(r.clone()),
            _ => find_remote_ref(v),
        }),
        Value::Array(items) => items.iter().find_map(find_remote_ref),
        _ => None,
    }
}

/// Validates a configuration value against a compiled schema.
///
/// # Errors
/// Every violation, with `field` a dotted path under `prefix` (`config.organization`).
pub fn validate_against(validator: &jsonschema::Validator, value: &Value, prefix: &str) -> Result<(), Vec<FieldViolation>> {
    let violations: Vec<FieldViolation> = validator
        .iter_errors(value)
        .map(|error| {
            let mut path = pointer_to_path(&error.instance_path().to_string());
            if let jsonschema::error::ValidationErrorKind::Required { property } = error.kind()
                && let Some(name) = property.as_str()
            {
                path = if path.is_empty() { name.to_owned() } else { format!("{path}.{name}") };
            }
            FieldViolation::invalid(path, error.to_string()).nested_in(prefix)
        })
        .collect();
    if violations.is_empty() { Ok(()) } else { Err(violations) }
}

/// `/a/0/b` -> `a[0].b`: a JSON pointer as the field path problems name.
pub fn pointer_to_path(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&segment);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths() {
        assert_eq!(pointer_to_path(""), "");
        assert_eq!(pointer_to_path("/repositories/2"), "repositories[2]");
        assert_eq!(pointer_to_path("/a~1b/c"), "a/b.c");
    }

    #[test]
    fn config_violations_name_the_path() {
        let schema = json!({
            "type": "object",
            "properties": {"organization": {"type": "string"}, "repos": {"type": "array", "items": {"type": "string"}}},
            "required": ["organization"],
            "additionalProperties": false
        });
        let validator = compile_config_schema(&schema).unwrap();
        assert!(validate_against(&validator, &json!({"organization": "acme"}), "config").is_ok());
        let errors = validate_against(&validator, &json!({"repos": ["a", 3]}), "config").unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"config.organization"), "{fields:?}");
        assert!(fields.contains(&"config.repos[1]"), "{fields:?}");
    }

    #[test]
    fn bad_schemas_are_refused() {
        assert!(compile_config_schema(&json!("x")).is_err());
        assert!(compile_config_schema(&json!({"type": "string"})).is_err());
        assert!(compile_config_schema(&json!({"type": "object", "properties": {"a": {"type": 5}}})).is_err());
        assert!(compile_config_schema(&json!({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}})).is_err());
    }
}
