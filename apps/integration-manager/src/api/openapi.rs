//! The OpenAPI document, generated from the handlers and DTOs. `docs/openapi.json` is the same
//! document, committed; a test fails when they drift (`integration-manager openapi` prints it).

use actix_web::HttpResponse;
use serde_json::{Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{
    admin, connection_test, connections, custom, deliveries, health, integrations, oauth2, problem, providers, sync_tasks, webhooks,
};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
            );
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Integration Manager",
        description = "Tenant integrations with third-party tools, the provider catalog, webhooks and sync. Errors are RFC 9457 problem details.",
        license(name = "Apache-2.0")
    ),
    paths(
        integrations::list, integrations::create, integrations::get, integrations::update, integrations::delete,
        connections::list, connections::create, connections::get, connections::update, connections::delete, connection_test::test,
        oauth2::authorize, oauth2::callback,
        providers::list, providers::create, providers::get, providers::update, providers::delete,
        webhooks::list, webhooks::create, webhooks::get, webhooks::update, webhooks::delete, webhooks::rotate_secret,
        deliveries::list, deliveries::get, deliveries::retry, deliveries::recover, deliveries::test,
        sync_tasks::list, sync_tasks::create, sync_tasks::get, sync_tasks::update, sync_tasks::delete, sync_tasks::run, sync_tasks::pause,
        sync_tasks::resume, sync_tasks::cancel, sync_tasks::reset, sync_tasks::executions, sync_tasks::execution, sync_tasks::conflicts,
        sync_tasks::resolve,
        health::live, health::ready, health::metrics, admin::list_dead_letters, admin::requeue_dead_letter, serve,
    ),
    components(schemas(
        problem::Problem, problem::ProblemField, integrations::IntegrationInput, integrations::IntegrationView, providers::ProviderInput,
        providers::ProviderView, webhooks::WebhookInput, webhooks::WebhookView, deliveries::DeliveryView, deliveries::RecoverInput,
        deliveries::RecoverReport, admin::DeadLetterView, connections::ConnectionInput, connections::ConnectionView,
        oauth2::AuthorizeInput, oauth2::AuthorizationView,
        connection_test::ConnectionTestView, sync_tasks::SyncTaskInput, sync_tasks::SyncTaskView, sync_tasks::ExecutionView,
        sync_tasks::ConflictView, sync_tasks::ResetInput, sync_tasks::ResolutionDto,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "integrations", description = "A tenant's integrations"),
        (name = "connections", description = "How an integration authenticates to its provider; credentials are write-only"),
        (name = "providers", description = "The global provider catalog"),
        (name = "sync", description = "Sync tasks between a provider's entity and a Shard Manager shard type, their executions and conflicts"),
        (name = "webhooks", description = "A tenant's webhook endpoints and their signing secrets"),
        (name = "operations", description = "Health, and the outbox's dead letters (admin)"),
    )
)]
pub struct ApiDoc;

/// Unions whose variants refuse unknown fields (`deny_unknown_fields`), which the derive does
/// not state for enum variants.
const CLOSED_UNIONS: [&str; 2] = ["CustomAuth", "Pagination"];

/// Rules between the fields of a body, stated beside them by the DTO's module (`oneOf` or
/// `if`/`then` with an `x-rule`, see `api::body`): the derive states each field alone.
/// The schema's name and the function that gives its rules.
type Rules = (&'static str, fn() -> Value);

const RULES: [Rules; 10] = [
    ("IntegrationInput", integrations::IntegrationInput::rules),
    ("ConnectionInput", connections::rules),
    ("ProviderInput", providers::ProviderInput::rules),
    ("ApiKeyPlacement", providers::api_key_rules),
    ("VerificationRequest", providers::verification_rules),
    ("SyncTaskInput", sync_tasks::SyncTaskInput::rules),
    ("Entity", custom::EntityDto::rules),
    ("CustomAuth", custom::auth_rules),
    ("SyncSchedule", sync_tasks::ScheduleDto::rules),
    ("SyncConflictResolution", sync_tasks::ResolutionDto::rules),
];

fn problem_response(description: &str) -> Value {
    json!({"description": description, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
}

/// Adds the answers every operation can give and the handlers do not list one by one, so the
/// document names every status the API answers with.
fn common_responses(path: &str, method: &str, op: &mut Value) {
    let params = op["parameters"].as_array().cloned().unwrap_or_default();
    let has_query = params.iter().any(|p| p["in"] == "query");
    let has_if_match = params.iter().any(|p| p["in"] == "header" && p["name"] == "If-Match");
    let has_body = op.get("requestBody").is_some();
    if path.starts_with("/api/") {
        add(op, "401", "Missing or invalid token");
        add(op, "403", "The caller's role does not allow this");
        add(op, "429", "Too many requests (the tenant's rate limit, or a limit of the operation); `Retry-After` says when to try again");
        op["responses"]["429"]["headers"] = rate_limit_headers();
    }
    let idempotent = method == "post" && path.starts_with("/api/");
    if idempotent && let Some(params) = op.as_object_mut().map(|o| o.entry("parameters").or_insert_with(|| json!([]))) {
        params.as_array_mut().into_iter().for_each(|p| p.push(idempotency_key()));
    }
    if idempotent {
        add(op, "400", "Malformed request: unknown or missing fields, wrong types, a bad header");
        add(op, "409", "A request with the same `Idempotency-Key` is still in progress");
        add(op, "422", "Invalid values, each named by its JSON path; or `Idempotency-Key` was used with another request");
    }
    if has_query || has_body || has_if_match {
        add(op, "400", "Malformed request: unknown or missing fields, wrong types, a bad header");
    }
    if has_query || has_body {
        add(op, "422", "Invalid values, each named by its JSON path");
    }
    if path.contains('{') {
        add(op, "404", "No such resource in the caller's tenant");
    }
    if has_if_match {
        add(op, "412", "`If-Match` is stale");
    }
    if has_body {
        add(op, "413", "Body over the size limit");
        add(op, "415", "Body is not JSON");
    }
    if method != "get" || path.starts_with("/api/") {
        add(op, "500", "Unexpected error; the request id identifies it in the logs");
    }
    add(op, "503", "A dependency is unavailable; `Retry-After` says when to try again");
}

/// Adds a problem answer with `code` unless the operation lists its own.
fn add(op: &mut Value, code: &str, description: &str) {
    if let Some(responses) = op["responses"].as_object_mut() {
        responses.entry(code).or_insert_with(|| problem_response(description));
    }
}

/// `RateLimit-*` (IETF draft) and `Retry-After`, as a refusal carries them.
fn rate_limit_headers() -> Value {
    let integer = |description: &str| json!({"description": description, "schema": {"type": "integer", "minimum": 0}});
    json!({
        "Retry-After": integer("Seconds until a request may pass"),
        "RateLimit-Limit": integer("Requests the tenant may make at once (the bucket's size); sent on every answer when limits are on"),
        "RateLimit-Remaining": integer("Requests left in the bucket now"),
        "RateLimit-Reset": integer("Seconds until the bucket is full again"),
    })
}

/// The optional `Idempotency-Key` header of every POST.
fn idempotency_key() -> Value {
    json!({
        "name": "Idempotency-Key",
        "in": "header",
        "required": false,
        "description": "Makes the POST safe to repeat: the same key with the same request within 24 hours answers the first \
            (successful) response again (`Idempotent-Replayed: true`) without doing it twice; with another request it is 422; \
            while the first still runs, 409. Keys belong to the caller's tenant.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"}
    })
}

/// The document as JSON: generated from the handlers and DTOs, completed with the common
/// answers and closed unions.
pub fn spec() -> Value {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let mut value = serde_json::to_value(&doc).unwrap_or(Value::Null);
    if let Some(paths) = value["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            for (method, op) in item.as_object_mut().into_iter().flatten() {
                common_responses(path, method, op);
            }
        }
    }
    read_only_echoes(&mut value["components"]["schemas"]);
    for (name, rules) in RULES {
        if let (Some(schema), Value::Object(rules)) = (value["components"]["schemas"][name].as_object_mut(), rules()) {
            schema.extend(rules);
        }
    }
    for name in CLOSED_UNIONS {
        for variant in value["components"]["schemas"][name]["oneOf"].as_array_mut().into_iter().flatten() {
            if variant["type"] == "object" {
                variant["additionalProperties"] = Value::Bool(false);
            }
        }
    }
    value
}

/// Request bodies that may carry the read-only fields of their resource (a client sends back
/// what it read): the body's schema lists them, as strings (null allowed) in the format the
/// resource's view gives them, marked `readOnly`; `api::body` checks and then drops them.
const READ_ONLY_ECHOES: [(&str, &str, &[&str]); 5] = [
    ("IntegrationInput", "Integration", &["id", "tenantId", "createdAt", "updatedAt", "createdBy", "updatedBy"]),
    (
        "WebhookInput",
        "Webhook",
        &["id", "tenantId", "disabledReason", "previousSecretExpiresAt", "createdAt", "updatedAt", "createdBy", "updatedBy"],
    ),
    ("ProviderInput", "Provider", &["createdAt", "updatedAt"]),
    (
        "ConnectionInput",
        "Connection",
        &[
            "id",
            "tenantId",
            "integrationId",
            "status",
            "statusReason",
            "lastFour",
            "scopes",
            "tokenExpiresAt",
            "createdAt",
            "updatedAt",
            "createdBy",
            "updatedBy",
        ],
    ),
    (
        "SyncTaskInput",
        "SyncTask",
        &[
            "id",
            "tenantId",
            "statusReason",
            "nextRunAt",
            "lastExecution",
            "consecutiveFailures",
            "createdAt",
            "updatedAt",
            "createdBy",
            "updatedBy",
        ],
    ),
];

fn read_only_echoes(schemas: &mut Value) {
    for (input, view, fields) in READ_ONLY_ECHOES {
        for field in fields {
            let shown = &schemas[view]["properties"][field];
            let is_array = shown["type"] == json!("array");
            let mut echo = if is_array {
                json!({ "type": ["array", "null"], "items": { "type": "string" }, "readOnly": true })
            } else if shown["type"] == json!("integer") {
                json!({ "type": ["integer", "null"], "readOnly": true })
            } else if shown.get("$ref").is_some() || shown.get("oneOf").is_some() {
                json!({ "anyOf": [{ "type": "null" }, shown], "readOnly": true })
            } else {
                json!({ "type": ["string", "null"], "readOnly": true })
            };
            if let Some(format) = schemas[view]["properties"][field].get("format") {
                echo["format"] = format.clone();
            }
            schemas[input]["properties"][field] = echo;
        }
    }
}

/// The document as pretty JSON, with a trailing newline (as committed).
pub fn document() -> String {
    let mut text = serde_json::to_string_pretty(&spec()).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

/// This OpenAPI 3.1 document.
#[utoipa::path(get, operation_id = "openapi", path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document of this API", body = serde_json::Value)))]
pub async fn serve() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(document())
}
