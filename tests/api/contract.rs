//! The OpenAPI document as a contract: every request the suite sends through [`crate::helpers`]
//! and every answer it receives is checked against the served document. A mismatch fails the
//! test with the operation, the status and the JSON path.
//!
//! - the operation (method and path template) and the answer's status must be documented;
//! - an answer's body must match the schema of its status (problem bodies included);
//! - a request body the document accepts must not be refused for its shape (`400`), and one it
//!   refuses must not be accepted (`2xx`): the document and the parser agree both ways.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use jsonschema::Validator;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const DOCUMENT_URI: &str = "urn:integration-manager:openapi";

static DOCUMENT: LazyLock<Value> =
    LazyLock::new(|| serde_json::from_str(&integration_manager::api::openapi::document()).expect("the OpenAPI document is JSON"));

static VALIDATORS: LazyLock<Mutex<HashMap<String, Arc<Validator>>>> = LazyLock::new(Mutex::default);

/// A validator of the schema at `pointer` in the document.
fn validator(pointer: &str) -> Arc<Validator> {
    let mut cache = VALIDATORS.lock().unwrap_or_else(|p| p.into_inner());
    cache
        .entry(pointer.to_owned())
        .or_insert_with(|| {
            let registry = jsonschema::Registry::new()
                .add(DOCUMENT_URI, jsonschema::Draft::Draft202012.create_resource(DOCUMENT.clone()))
                .and_then(jsonschema::RegistryBuilder::prepare)
                .expect("the document is a schema resource");
            Arc::new(
                jsonschema::options()
                    .with_draft(jsonschema::Draft::Draft202012)
                    .with_registry(&registry)
                    .build(&json!({"$ref": format!("{DOCUMENT_URI}#{}", pointer.replace('{', "%7B").replace('}', "%7D"))}))
                    .unwrap_or_else(|e| panic!("the schema at {pointer} does not compile: {e}")),
            )
        })
        .clone()
}

fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// The document's path template matching `path` (query string removed).
fn template(path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap_or(path);
    let wanted: Vec<&str> = path.split('/').collect();
    DOCUMENT["paths"]
        .as_object()?
        .keys()
        .find(|t| {
            let parts: Vec<&str> = t.split('/').collect();
            parts.len() == wanted.len() && parts.iter().zip(&wanted).all(|(t, w)| (t.starts_with('{') && t.ends_with('}')) || t == w)
        })
        .cloned()
}

/// The fields a schema error refuses, with those of every branch of a failed union.
fn refused_paths(error: &jsonschema::ValidationError<'_>, out: &mut Vec<String>) {
    use jsonschema::error::ValidationErrorKind::{AnyOf, OneOfNotValid};
    out.push(im_domain::schema::pointer_to_path(error.instance_path().as_str()));
    if let OneOfNotValid { context } | AnyOf { context } = error.kind() {
        context.iter().flatten().for_each(|e| refused_paths(e, out));
    }
}

/// Whether a problem's message is a size or range rule (which a schema can state).
fn states_a_size_rule(message: &str) -> bool {
    let words: Vec<&str> = message.split_whitespace().collect();
    words.windows(3).any(|w| matches!((w[0], w[1]), ("at", "most") | ("at", "least")) && w[2].chars().all(|c| c.is_ascii_digit()))
        || words.windows(4).any(|w| w[0] == "between" && w[1].chars().all(|c| c.is_ascii_digit()) && w[2] == "and")
        || message == "must not be empty"
}

/// Problems of `instance` against the schema at `pointer`, as `path: message` lines.
fn problems(pointer: &str, instance: &Value) -> Vec<String> {
    validator(pointer).iter_errors(instance).map(|e| format!("{}: {e}", e.instance_path())).collect()
}

/// Checks one exchange; panics with the operation, status and JSON path of any mismatch.
pub fn check(method: &Method, path: &str, request: Option<&Value>, status: StatusCode, content_type: Option<&str>, body: &[u8]) {
    let Some(template) = template(path) else {
        // Unknown routes answer a problem 404, which is all the document can say of them.
        assert_eq!(status, StatusCode::NOT_FOUND, "contract: {method} {path} is not in the OpenAPI document");
        let value: Value = serde_json::from_slice(body).expect("a problem body");
        let found = problems("/components/schemas/Problem", &value);
        assert!(found.is_empty(), "contract: {method} {path} 404: {found:?}");
        return;
    };
    let op_pointer = format!("/paths/{}/{}", escape(&template), method.as_str().to_lowercase());
    let op = DOCUMENT.pointer(&op_pointer).unwrap_or_else(|| panic!("contract: {method} {template} is not documented"));
    let operation = format!("{method} {template}");

    if let Some(request) = request
        && op.pointer("/requestBody/content/application~1json/schema").is_some()
    {
        let refused = problems(&format!("{op_pointer}/requestBody/content/application~1json/schema"), request);
        if refused.is_empty() {
            let shape_refused = status == StatusCode::BAD_REQUEST
                && serde_json::from_slice::<Value>(body).is_ok_and(|b| b["type"] == "urn:integration-manager:problem:invalid-request");
            assert!(
                !shape_refused,
                "contract: {operation}: the document accepts the body but the API refused its shape: {}\n{request}",
                String::from_utf8_lossy(body)
            );
        } else {
            assert!(
                !status.is_success(),
                "contract: {operation}: the API accepted ({status}) a body the document refuses: {refused:?}\n{request}"
            );
        }
    }

    // A size or range rule the API enforces must be stated by the document too: every field the
    // API refuses for one is a field the document refuses.
    if let Some(request) = request
        && status == StatusCode::UNPROCESSABLE_ENTITY
        && op.pointer("/requestBody/content/application~1json/schema").is_some()
        && let Ok(problem) = serde_json::from_slice::<Value>(body)
    {
        let pointer = format!("{op_pointer}/requestBody/content/application~1json/schema");
        let mut stated = Vec::new();
        validator(&pointer).iter_errors(request).for_each(|e| refused_paths(&e, &mut stated));
        let unstated: Vec<&Value> = problem["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["message"].as_str().is_some_and(states_a_size_rule))
            .filter(|e| !stated.iter().any(|s| e["field"].as_str() == Some(s.as_str())))
            .collect();
        assert!(
            unstated.is_empty(),
            "contract: {operation}: the API refused fields for a rule the document does not state: {unstated:?}\n{request}"
        );
    }

    let code = status.as_u16().to_string();
    let response = op
        .pointer(&format!("/responses/{code}"))
        .or_else(|| op.pointer("/responses/default"))
        .unwrap_or_else(|| panic!("contract: {operation}: status {status} is not documented"));
    let Some(content) = response.get("content").and_then(Value::as_object) else {
        return;
    };
    if body.is_empty() && status == StatusCode::NOT_MODIFIED {
        return;
    }
    let media = content_type.unwrap_or_default().split(';').next().unwrap_or_default().trim().to_owned();
    let (media, entry) = content.get_key_value(media.as_str()).unwrap_or_else(|| {
        panic!("contract: {operation} {status}: content type {media:?} is not documented (documented: {:?})", content.keys())
    });
    if entry.get("schema").is_none() {
        return;
    }
    if !media.ends_with("json") {
        // A text body (Prometheus metrics): any text is the string the document promises.
        assert_eq!(entry["schema"]["type"], "string", "contract: {operation} {status}: a {media} body documented as a string");
        assert!(std::str::from_utf8(body).is_ok(), "contract: {operation} {status}: the {media} body is not UTF-8");
        return;
    }
    let value: Value = serde_json::from_slice(body).unwrap_or_else(|e| panic!("contract: {operation} {status}: the body is not JSON: {e}"));
    let pointer =
        format!("/paths/{}/{}/responses/{code}/content/{}/schema", escape(&template), method.as_str().to_lowercase(), escape(media));
    let pointer = if DOCUMENT.pointer(&pointer).is_some() {
        pointer
    } else {
        format!("/paths/{}/{}/responses/default/content/{}/schema", escape(&template), method.as_str().to_lowercase(), escape(media))
    };
    let found = problems(&pointer, &value);
    assert!(found.is_empty(), "contract: {operation} {status}: the body does not match the document: {found:?}\n{value}");
}

/// Generators name one function per operation id: a duplicate id drops an operation.
#[test]
fn every_operation_has_a_unique_id() {
    let mut seen = std::collections::BTreeSet::new();
    for (path, item) in DOCUMENT["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("operations") {
            let id = op["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path} has no operationId"));
            assert!(seen.insert(id.to_owned()), "operationId {id} of {method} {path} is used twice");
        }
    }
}
