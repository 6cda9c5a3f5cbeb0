//! Request bodies: one DTO per body both parses and documents it.
//!
//! A body is first checked against the DTO's schema *in the served OpenAPI document*, so the
//! document and the parser cannot disagree: every offending field is collected with its JSON
//! path (`400` for the shape of the body: unknown fields, missing ones, wrong types; `422` for
//! values: lengths, patterns, ranges, item counts). Only then is it deserialised into the DTO,
//! which converts into the domain's type with `TryFrom`.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};

use im_domain::{DomainError, FieldViolation, ViolationKind, Violations};
use jsonschema::Validator;
use jsonschema::error::{TypeKind, ValidationErrorKind};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::problem::ApiError;

/// Where the OpenAPI document is registered for `$ref`s of the compiled validators.
const DOCUMENT_URI: &str = "urn:integration-manager:openapi";

/// The document's schemas, built once, in the document's shape (`{"components": {"schemas"}}`,
/// so that its `$ref`s resolve): the operations are most of the document and no `$ref` points
/// there.
static DOCUMENT: LazyLock<Value> = LazyLock::new(|| {
    let mut spec = super::openapi::spec();
    json!({"components": {"schemas": spec["components"]["schemas"].take()}})
});

/// The schemas as one resource, indexed once for every validator.
static REGISTRY: LazyLock<Result<jsonschema::Registry<'static>, String>> = LazyLock::new(|| {
    jsonschema::Registry::new()
        .add(DOCUMENT_URI, jsonschema::Draft::Draft202012.create_resource_ref(&DOCUMENT))
        .and_then(jsonschema::RegistryBuilder::prepare)
        .map_err(|e| e.to_string())
});

/// What a body is read with, by schema name: built once a schema.
static VALIDATORS: LazyLock<RwLock<HashMap<String, Arc<BodySchema>>>> = LazyLock::new(RwLock::default);

/// A DTO's schema, compiled, and the fields it marks `readOnly` (found once, not looked up in
/// the document at every body).
struct BodySchema {
    validator: Validator,
    read_only: Vec<String>,
}

/// A DTO read from a body, with the value problems found by its schema. The caller merges those
/// with the domain's own checks (so one answer lists every field) and writes nothing unless both
/// are empty.
#[derive(Debug)]
pub struct Checked<T> {
    pub value: T,
    pub violations: Violations,
}

impl<T> Checked<T> {
    /// Combines the schema's problems with the result of the domain's checks; `Ok` only when
    /// neither found anything.
    ///
    /// # Errors
    /// [`DomainError::Validation`] with every problem, once per field and message.
    pub fn merge(self, domain: Result<(), DomainError>) -> Result<T, DomainError> {
        let mut all = self.violations.into_vec();
        match domain {
            Ok(()) => {}
            Err(DomainError::Validation(found)) => {
                for violation in found {
                    // The domain words its rules best; it replaces the schema's note on the same field.
                    all.retain(|v| v.field != violation.field);
                    all.push(violation);
                }
            }
            Err(other) => return Err(other),
        }
        let value = self.value;
        all.into_iter().collect::<Violations>().finish(|| value)
    }
}

fn validator(name: &str) -> Result<Arc<BodySchema>, ApiError> {
    if let Some(found) = VALIDATORS.read().unwrap_or_else(|p| p.into_inner()).get(name) {
        return Ok(found.clone());
    }
    let broken =
        |e: &dyn std::fmt::Display| ApiError::Domain(DomainError::Unexpected(anyhow::anyhow!("the schema {name} does not compile: {e}")));
    let registry = REGISTRY.as_ref().map_err(|e| broken(e))?;
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .with_registry(registry)
        .build(&json!({"$ref": format!("{DOCUMENT_URI}#/components/schemas/{name}")}))
        .map_err(|e| broken(&e))?;
    let read_only = DOCUMENT["components"]["schemas"][name]["properties"]
        .as_object()
        .map(|properties| properties.iter().filter(|(_, p)| p["readOnly"] == true).map(|(field, _)| field.clone()).collect())
        .unwrap_or_default();
    let compiled = Arc::new(BodySchema { validator, read_only });
    VALIDATORS.write().unwrap_or_else(|p| p.into_inner()).insert(name.to_owned(), compiled.clone());
    // What this build freed on this thread goes back now: the first build, which also made the
    // document and its registry, freed about 7 MB.
    crate::memory::release_freed();
    Ok(compiled)
}

/// `/a/0/b` -> `a[0].b`, with `child` appended.
fn path(pointer: &str, child: Option<&str>) -> String {
    let parent = im_domain::schema::pointer_to_path(pointer);
    match child {
        Some(child) if parent.is_empty() => child.to_owned(),
        Some(child) => format!("{parent}.{child}"),
        None => parent,
    }
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

fn expected(kind: &TypeKind) -> String {
    let names: Vec<String> = match kind {
        TypeKind::Single(t) => vec![t.to_string()],
        TypeKind::Multiple(set) => set.iter().map(|t| t.to_string()).filter(|t| t != "null").collect(),
    };
    names.join(" or ")
}

/// The branch of a failed union (`oneOf`, `anyOf`) that the instance meant: not the ones whose
/// type differs (`null` of an optional value) or whose tag (`type`, `style`, `authMode`) names
/// another variant.
/// Of a union with a value rule, the one branch nearest to the instance (the fewest problems)
/// when several remain.
fn meant_branch<'a>(
    at: &str,
    branches: &'a [Vec<jsonschema::ValidationError<'static>>],
    ruled: bool,
) -> Option<&'a [jsonschema::ValidationError<'static>]> {
    let candidates: Vec<&Vec<_>> = branches
        .iter()
        .filter(|errors| {
            !errors.iter().any(|e| match e.kind() {
                ValidationErrorKind::Type { .. } => e.instance_path().as_str() == at,
                // A tag names the branch; a value a rule's `then` refuses does not.
                ValidationErrorKind::Enum { .. } | ValidationErrorKind::Constant { .. } => {
                    is_child(at, e.instance_path().as_str()) && !conditional(e)
                }
                _ => false,
            })
        })
        .collect();
    match candidates.as_slice() {
        [only] => Some(only.as_slice()),
        [_, _, ..] if ruled => {
            let fewest = candidates.iter().map(|errors| errors.len()).min().unwrap_or_default();
            let mut nearest = candidates.iter().filter(|errors| errors.len() == fewest);
            match (nearest.next(), nearest.next()) {
                (Some(only), None) => Some(only.as_slice()),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Whether `path` is a field of the object at `parent`.
fn is_child(parent: &str, path: &str) -> bool {
    path.strip_prefix(parent).is_some_and(|rest| rest.starts_with('/') && !rest[1..].contains('/'))
}

/// The tag of a union that no branch takes: the field whose `const` every branch refuses, with
/// the values the branches take.
fn refused_tag(at: &str, branches: &[Vec<jsonschema::ValidationError<'static>>]) -> Option<(String, Vec<String>)> {
    let mut tag: Option<String> = None;
    let mut values = Vec::new();
    for errors in branches {
        let (path, value) = errors.iter().find_map(|e| match e.kind() {
            ValidationErrorKind::Constant { expected_value } if is_child(at, e.instance_path().as_str()) => {
                Some((e.instance_path().as_str().to_owned(), expected_value.to_string()))
            }
            _ => None,
        })?;
        if tag.get_or_insert_with(|| path.clone()) != &path {
            return None;
        }
        values.push(value);
    }
    tag.map(|tag| (tag, values))
}

/// The value rule (`x-rule`) stated beside the `oneOf` at `schema_path` in the document, if any.
///
/// A union with a rule is chosen by values, not by shape: by a tag (a connection's `authMode`
/// picks the fields of its `credentials`) or by which of several fields is given (a schedule has
/// exactly one of `cron`, `every`, `manual`). What the chosen branch requires or refuses is then
/// a value problem (422), and a body that no branch (or more than one) takes is reported at the
/// rule's `field` (relative to the union) with its `message`.
fn rule_of(schema_path: &str) -> Option<&'static Value> {
    // The path is the union's place in the document (where its `oneOf` is written, whatever
    // `$ref`s led there), and the rule is the `oneOf`'s sibling.
    let union = schema_path.strip_suffix("/oneOf").or_else(|| schema_path.strip_suffix("/anyOf"))?;
    DOCUMENT.pointer(union)?.get(RULE)
}

/// The extension keyword of a union's value rule (see [`rule_of`]).
pub const RULE: &str = "x-rule";

/// How a union's failure reads.
struct Union {
    /// Inside the branch chosen by a rule's values: what it requires or refuses is a value problem.
    ruled: bool,
}

/// The schema of a field a rule refuses: `{"not": {}}`, which every value fails (the document
/// avoids the boolean schema `false`, which generated clients cannot read).
pub fn refused() -> Value {
    json!({"not": {}})
}

/// Whether a `then` or `else` found the error: what it requires depends on the value its `if`
/// looked at.
fn conditional(error: &jsonschema::ValidationError<'_>) -> bool {
    error.schema_path().as_str().split('/').any(|s| s == "then" || s == "else")
}

/// One schema error as the violations it stands for.
fn violations_of(error: &jsonschema::ValidationError<'_>, ctx: &Union, out: &mut Vec<FieldViolation>) {
    let at = error.instance_path().as_str();
    let ctx = &Union { ruled: ctx.ruled || conditional(error) };
    match error.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected } | ValidationErrorKind::UnevaluatedProperties { unexpected } => {
            for name in unexpected {
                out.push(FieldViolation::new(path(at, Some(name)), ViolationKind::UnknownField, "is not a field of this resource"));
            }
        }
        ValidationErrorKind::Required { property } if ctx.ruled => {
            let name = property.as_str().unwrap_or_default();
            out.push(FieldViolation::invalid(path(at, Some(name)), "is required with the values given"));
        }
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            out.push(FieldViolation::new(path(at, Some(name)), ViolationKind::Missing, "is required"));
        }
        // A field a rule refuses (never echoing its value: it may be a credential).
        // The document says `{"not": {}}` rather than `false`: generated clients read only object schemas.
        ValidationErrorKind::FalseSchema => out.push(FieldViolation::invalid(path(at, None), "is not used with the values given")),
        ValidationErrorKind::Not { .. } => out.push(FieldViolation::invalid(path(at, None), "is not used with the values given")),
        // Never the value itself: it may be a credential.
        ValidationErrorKind::Pattern { .. } => {
            out.push(FieldViolation::invalid(path(at, None), "does not have the form the document gives for this field (its pattern)"));
        }
        ValidationErrorKind::MaxLength { limit } => {
            out.push(FieldViolation::invalid(path(at, None), format!("must be at most {limit} characters")));
        }
        ValidationErrorKind::MinLength { limit } => {
            out.push(FieldViolation::invalid(path(at, None), format!("must be at least {limit} characters")));
        }
        ValidationErrorKind::Type { kind } => out.push(FieldViolation::new(
            path(at, None),
            ViolationKind::WrongType,
            format!("must be {} (got {})", expected(kind), type_name(error.instance())),
        )),
        // A value another field's value rules out (a rule's `then`) is a value problem, not one of shape.
        ValidationErrorKind::Enum { options } => {
            let names: Vec<String> = options.as_array().into_iter().flatten().filter(|o| !o.is_null()).map(ToString::to_string).collect();
            let kind = if ctx.ruled { ViolationKind::Invalid } else { ViolationKind::WrongType };
            out.push(FieldViolation::new(path(at, None), kind, format!("must be one of {}", names.join(", "))));
        }
        ValidationErrorKind::Constant { expected_value } => {
            let kind = if ctx.ruled { ViolationKind::Invalid } else { ViolationKind::WrongType };
            out.push(FieldViolation::new(path(at, None), kind, format!("must be {expected_value}")));
        }
        ValidationErrorKind::OneOfNotValid { context } | ValidationErrorKind::AnyOf { context } => {
            let rule = rule_of(error.schema_path().as_str());
            let ruled = Union { ruled: ctx.ruled || rule.is_some() };
            match (meant_branch(at, context, rule.is_some()), rule) {
                (Some(errors), _) => errors.iter().for_each(|e| violations_of(e, &ruled, out)),
                (None, Some(rule)) => match refused_tag(at, context) {
                    Some((tag, values)) => {
                        out.push(FieldViolation::invalid(path(&tag, None), format!("must be one of {}", values.join(", "))));
                    }
                    None => out.push(broken_rule(at, rule)),
                },
                (None, None) => {
                    out.push(FieldViolation::new(path(at, None), ViolationKind::WrongType, "matches none of the allowed forms"))
                }
            }
        }
        ValidationErrorKind::OneOfMultipleValid { .. } if let Some(rule) = rule_of(error.schema_path().as_str()) => {
            out.push(broken_rule(at, rule));
        }
        _ => out.push(FieldViolation::new(path(at, None), ViolationKind::Invalid, error.to_string())),
    }
}

/// A union's rule that no branch (or more than one) meets, at the rule's field.
fn broken_rule(at: &str, rule: &Value) -> FieldViolation {
    let field = rule["field"].as_str().filter(|f| !f.is_empty());
    let message = rule["message"].as_str().unwrap_or("matches none of the allowed forms");
    FieldViolation::invalid(path(at, field), message)
}

fn structural(found: Vec<FieldViolation>) -> ApiError {
    ApiError::Domain(found.into_iter().collect::<Violations>().into_error())
}

/// `body` without the fields its schema marks `readOnly` (a resource's own fields, sent back by
/// a client that read them: accepted, checked for their type, and ignored).
fn without_read_only(mut body: Value, read_only: &[String]) -> Value {
    if let (Some(object), false) = (body.as_object_mut(), read_only.is_empty()) {
        object.retain(|field, _| !read_only.contains(field));
    }
    body
}

/// `body` with every number written with a fraction of zero (`955.0`) as the integer it is: JSON
/// Schema's `integer` means it, and the document is what a client goes by, so the checks and the
/// parser take it too (the validator and serde refuse a float for an integer). Other numbers are
/// left alone.
fn whole_numbers_as_integers(body: &mut Value) {
    match body {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Within ±2^53 a whole f64 is exactly the integer it prints as.
            if f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0 {
                *body = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_numbers_as_integers),
        Value::Object(fields) => fields.values_mut().for_each(whole_numbers_as_integers),
        _ => {}
    }
}

/// Reads `body` into the DTO `T` (whose schema is registered in the OpenAPI document under
/// `T::name()`).
///
/// # Errors
/// [`ApiError::Malformed`] when the body is not a JSON object; [`DomainError::Validation`] with
/// every problem when the shape is wrong (400). Value problems alone come back in
/// [`Checked::violations`].
pub fn parse<T: DeserializeOwned + ToSchema>(mut body: Value) -> Result<Checked<T>, ApiError> {
    if !body.is_object() {
        return Err(ApiError::Malformed(format!("the body must be a JSON object, not {}", type_name(&body))));
    }
    whole_numbers_as_integers(&mut body);
    let schema = validator(&T::name())?;
    let validator = &schema.validator;
    let mut found = Vec::new();
    // Most bodies are valid: the short-circuiting check is far cheaper than collecting errors.
    if !validator.is_valid(&body) {
        let ctx = Union { ruled: false };
        validator.iter_errors(&body).for_each(|error| violations_of(&error, &ctx, &mut found));
    }
    if found.iter().any(|v| v.kind.is_structural()) {
        return Err(structural(found));
    }
    match serde_path_to_error::deserialize::<_, T>(without_read_only(body, &schema.read_only)) {
        Ok(value) => Ok(Checked { value, violations: found.into_iter().collect() }),
        Err(e) => {
            // The schema let through what the type refuses (a format the schema only annotates,
            // such as a UUID): the type's word, at its path.
            let at = e.path().to_string();
            let at = if at == "." { String::new() } else { at };
            found.retain(|v| v.field != at);
            found.push(FieldViolation::new(at, ViolationKind::WrongType, e.into_inner().to_string()));
            Err(structural(found))
        }
    }
}

/// Reads a body into the domain's type: the DTO `T` is checked and parsed, then converted. When
/// the schema found value problems, the domain's own checks (`check`, which writes nothing) run
/// too, so one answer lists every offending field; nothing is accepted unless both pass.
///
/// # Errors
/// 400 for the shape of the body, 422 for its values (see [`parse`]).
pub async fn read<T, S>(
    body: Value,
    convert: impl FnOnce(T) -> Result<S, DomainError>,
    check: impl AsyncFnOnce(&S) -> Result<(), DomainError>,
) -> Result<S, ApiError>
where
    T: DeserializeOwned + ToSchema,
{
    let Checked { value, violations } = parse::<T>(body)?;
    // A value that cannot even be converted (an unreadable id or partition key) is reported
    // alone: the other rules depend on it.
    let converted = convert(value)?;
    if violations.is_empty() {
        return Ok(converted);
    }
    let outcome = check(&converted).await;
    match (Checked { value: (), violations }).merge(outcome) {
        Err(e) => Err(e.into()),
        Ok(()) => Err(ApiError::Domain(DomainError::invalid("", "is not valid"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory a validator's build freed goes back once, from the thread that built it; a
    /// read with the validator already built hands nothing back.
    #[test]
    fn a_validators_build_alone_hands_its_freed_memory_back() {
        thread_local!(static RELEASED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) });
        crate::memory::on_release(|| RELEASED.with(|n| n.set(n.get() + 1)));
        let released = || RELEASED.with(std::cell::Cell::get);
        // A schema no other test of this binary reads.
        let name = "RecoverInput";
        assert!(!VALIDATORS.read().unwrap().contains_key(name));
        validator(name).unwrap();
        assert_eq!(released(), 1);
        validator(name).unwrap();
        assert_eq!(released(), 1);
    }

    /// A schema's read-only fields are found when it is built, and a body keeps every other field.
    #[test]
    fn a_schemas_read_only_fields_are_dropped_from_a_body() {
        let schema = validator("IntegrationInput").unwrap();
        let mut found = schema.read_only.clone();
        found.sort();
        assert_eq!(found, ["createdAt", "createdBy", "id", "tenantId", "updatedAt", "updatedBy"]);
        let body = json!({"name": "x", "id": "1", "createdAt": null, "config": {"id": "kept"}});
        assert_eq!(without_read_only(body, &schema.read_only), json!({"name": "x", "config": {"id": "kept"}}));
        assert!(validator("AuthorizeInput").unwrap().read_only.is_empty(), "a schema without read-only fields");
    }

    #[test]
    fn whole_numbers_are_integers() {
        let mut normal = json!({"a": 955.0, "b": [1.5, -3.0, 7], "c": {"d": 1e300, "e": "2.0"}});
        whole_numbers_as_integers(&mut normal);
        assert!(normal["a"].is_i64() && normal["a"] == 955);
        assert_eq!(normal["b"], json!([1.5, -3, 7]));
        assert!(normal["c"]["d"].is_f64(), "beyond 2^53 stays a float");
        assert_eq!(normal["c"]["e"], "2.0");
        #[derive(serde::Deserialize)]
        struct Sized {
            #[allow(dead_code)]
            size: u32,
        }
        let mut sized = json!({"size": 955.0});
        whole_numbers_as_integers(&mut sized);
        assert!(serde_json::from_value::<Sized>(sized).is_ok());
    }

    #[test]
    fn paths() {
        assert_eq!(path("", None), "");
        assert_eq!(path("", Some("name")), "name");
        assert_eq!(path("/entities/2", Some("name")), "entities[2].name");
        assert_eq!(path("/a~1b/c", None), "a/b.c");
    }
}
