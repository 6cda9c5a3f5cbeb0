//! `/api/v1/providers`: the global provider catalog (writes need the admin role).

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use im_domain::Stored;
use im_domain::provider::{AuthMode, Capabilities, Category, Provider, ProviderFilter, ProviderId, ProviderSpec};
use im_domain::{FieldViolation, Role};
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::extract::{Authenticated, JsonBody, etag_header, if_match, not_modified};
use super::input::Input;
use super::problem::{ApiError, ApiResult, Problem};
use super::{ListResponse, QueryParams};
use crate::state::AppState;

/// Body of `POST /providers` and `PUT /providers/{id}` (where `id` may be omitted).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct ProviderInput {
    /// Lowercase slug, unique in the catalog; `custom` is reserved.
    id: String,
    name: String,
    /// Lowercase slug; the catalog's partition key.
    category: String,
    description: Option<String>,
    auth_mode: AuthMode,
    /// Required for `oauth2`.
    authorization_url: Option<String>,
    /// Required for `oauth2` and `oauth2_client_credentials`.
    token_url: Option<String>,
    default_scopes: Option<Vec<String>>,
    api_base_url: String,
    docs_url: String,
    /// JSON Schema (type object) of an integration's `config`.
    #[schema(value_type = Object)]
    config_schema: Option<Value>,
    capabilities: Option<Capabilities>,
}

const FIELDS: &[&str] = &[
    "id",
    "name",
    "category",
    "description",
    "authMode",
    "authorizationUrl",
    "tokenUrl",
    "defaultScopes",
    "apiBaseUrl",
    "docsUrl",
    "configSchema",
    "capabilities",
    // read-only, ignored
    "createdAt",
    "updatedAt",
];

fn read_spec(body: Value, path_id: Option<&ProviderId>) -> ApiResult<ProviderSpec> {
    let mut input = Input::new(body, FIELDS)?;
    let id = input.validated("id", path_id.is_none(), ProviderId::new);
    if let (Some(given), Some(path)) = (&id, path_id)
        && given != path
    {
        input.invalid("id", "does not match the id in the path; a provider's id cannot change");
    }
    let name: Option<String> = input.required("name");
    let category = input.validated("category", true, Category::new);
    let description: Option<String> = input.optional("description");
    let auth_mode: Option<AuthMode> = input.required("authMode");
    let authorization_url: Option<String> = input.optional("authorizationUrl");
    let token_url: Option<String> = input.optional("tokenUrl");
    let default_scopes: Option<Vec<String>> = input.optional("defaultScopes");
    let api_base_url: Option<String> = input.required("apiBaseUrl");
    let docs_url: Option<String> = input.required("docsUrl");
    let config_schema: Option<Value> = input.optional("configSchema");
    let capabilities: Option<Capabilities> = input.optional("capabilities");
    input.finish()?;
    let missing = |f: &str| ApiError::Malformed(format!("{f} is required"));
    Ok(ProviderSpec {
        id: id.or_else(|| path_id.cloned()).ok_or_else(|| missing("id"))?,
        name: name.ok_or_else(|| missing("name"))?,
        category: category.ok_or_else(|| missing("category"))?,
        description: description.unwrap_or_default(),
        auth_mode: auth_mode.ok_or_else(|| missing("authMode"))?,
        authorization_url,
        token_url,
        default_scopes: default_scopes.unwrap_or_default(),
        api_base_url: api_base_url.ok_or_else(|| missing("apiBaseUrl"))?,
        docs_url: docs_url.ok_or_else(|| missing("docsUrl"))?,
        config_schema: config_schema.unwrap_or_else(|| serde_json::json!({"type": "object", "additionalProperties": false})),
        capabilities: capabilities.unwrap_or_default(),
    })
}

fn path_id(raw: &str) -> ApiResult<ProviderId> {
    ProviderId::new(raw).map_err(|_| ApiError::NotFound(format!("provider '{raw}' was not found")))
}

fn respond(mut builder: actix_web::HttpResponseBuilder, stored: &Stored<Provider>) -> HttpResponse {
    builder.insert_header(etag_header(&stored.etag)).json(&stored.value)
}

/// List the catalog.
#[utoipa::path(get, path = "/api/v1/providers", tag = "providers",
    params(
        ("category" = Option<String>, Query, description = "Only this category (stays inside one partition)"),
        ("authMode" = Option<AuthMode>, Query, description = "Only providers with this auth mode"),
        ("q" = Option<String>, Query, description = "Case-insensitive text in id, name or description"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 200 (default 50)"),
        ("continuationToken" = Option<String>, Query, description = "Token of the next page"),
    ),
    responses(
        (status = 200, description = "A page of providers, ordered by id", body = ListResponse<Provider>),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(state: web::Data<AppState>, caller: Authenticated, req: HttpRequest) -> ApiResult<HttpResponse> {
    let mut query = QueryParams::parse(&req)?;
    let category = query.get("category", |s| Category::new(s));
    let auth_mode = query.get("authMode", |s| {
        AuthMode::parse(s)
            .ok_or_else(|| FieldViolation::invalid("", "must be one of oauth2, oauth2_client_credentials, api_key, basic, none"))
    });
    let q = query.get("q", |s| {
        if s.chars().count() > 100 { Err(FieldViolation::invalid("", "must be at most 100 characters")) } else { Ok(s.trim().to_owned()) }
    });
    let page = query.page();
    query.finish()?;
    let filter = ProviderFilter { category, auth_mode, query: q.filter(|q| !q.is_empty()) };
    let page = state.catalog.list(&caller.0, &filter, &page.unwrap_or_else(|| im_domain::PageRequest::first(50))).await?;
    Ok(HttpResponse::Ok()
        .json(ListResponse { items: page.items.into_iter().map(|s| s.value).collect(), continuation_token: page.continuation }))
}

/// Read a provider.
#[utoipa::path(get, path = "/api/v1/providers/{id}", tag = "providers",
    params(("id" = String, Path, description = "Provider id")),
    responses(
        (status = 200, description = "The provider; `ETag` is set", body = Provider),
        (status = 404, description = "No such provider", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get(state: web::Data<AppState>, caller: Authenticated, id: web::Path<String>, req: HttpRequest) -> ApiResult<HttpResponse> {
    let id = path_id(&id)?;
    let stored = state.catalog.get(&caller.0, &id).await?;
    if not_modified(&req, &stored.etag) {
        return Ok(HttpResponse::NotModified().insert_header(etag_header(&stored.etag)).finish());
    }
    Ok(respond(HttpResponse::Ok(), &stored))
}

/// Add a provider to the catalog (admin).
#[utoipa::path(post, path = "/api/v1/providers", tag = "providers",
    request_body = ProviderInput,
    responses(
        (status = 201, description = "Created; `Location` and `ETag` are set", body = Provider),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The admin role is needed", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The id is taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn create(state: web::Data<AppState>, caller: Authenticated, body: JsonBody) -> ApiResult<HttpResponse> {
    caller.0.require(Role::Admin)?;
    let spec = read_spec(body.0, None)?;
    let stored = state.catalog.create(&caller.0, spec).await?;
    tracing::info!(target: "audit", action = "provider.create", actor = %caller.0.user_id, provider_id = %stored.value.spec.id, "provider created");
    let mut builder = HttpResponse::Created();
    builder.insert_header((header::LOCATION, format!("/api/v1/providers/{}", stored.value.spec.id)));
    Ok(respond(builder, &stored))
}

/// Replace a provider (admin). Its category may change; its id may not.
#[utoipa::path(put, path = "/api/v1/providers/{id}", tag = "providers",
    params(
        ("id" = String, Path, description = "Provider id"),
        ("If-Match" = Option<String>, Header, description = "The ETag read before; a stale one is refused with 412"),
    ),
    request_body = ProviderInput,
    responses(
        (status = 200, description = "Updated", body = Provider),
        (status = 403, description = "The admin role is needed", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such provider", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`If-Match` is stale", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn update(
    state: web::Data<AppState>,
    caller: Authenticated,
    id: web::Path<String>,
    req: HttpRequest,
    body: JsonBody,
) -> ApiResult<HttpResponse> {
    caller.0.require(Role::Admin)?;
    let id = path_id(&id)?;
    let if_match = if_match(&req)?;
    let spec = read_spec(body.0, Some(&id))?;
    let stored = state.catalog.update(&caller.0, &id, spec, if_match.as_ref()).await?;
    tracing::info!(target: "audit", action = "provider.update", actor = %caller.0.user_id, provider_id = %id, "provider updated");
    Ok(respond(HttpResponse::Ok(), &stored))
}

/// Remove a provider from the catalog (admin).
#[utoipa::path(delete, path = "/api/v1/providers/{id}", tag = "providers",
    params(
        ("id" = String, Path, description = "Provider id"),
        ("If-Match" = Option<String>, Header, description = "The ETag read before; a stale one is refused with 412"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "The admin role is needed", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such provider", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`If-Match` is stale", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete(state: web::Data<AppState>, caller: Authenticated, id: web::Path<String>, req: HttpRequest) -> ApiResult<HttpResponse> {
    caller.0.require(Role::Admin)?;
    let id = path_id(&id)?;
    let if_match = if_match(&req)?;
    state.catalog.delete(&caller.0, &id, if_match.as_ref()).await?;
    tracing::info!(target: "audit", action = "provider.delete", actor = %caller.0.user_id, provider_id = %id, "provider deleted");
    Ok(HttpResponse::NoContent().finish())
}
