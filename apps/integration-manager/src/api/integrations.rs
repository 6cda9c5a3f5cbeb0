//! `/api/v1/integrations`: a tenant's integrations.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use im_domain::custom::CustomApiDefinition;
use im_domain::integration::{Integration, IntegrationFilter, IntegrationSpec, IntegrationStatus};
use im_domain::provider::ProviderId;
use im_domain::{FieldViolation, IntegrationId, Stored};
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::extract::{Authenticated, JsonBody, etag_header, if_match, not_modified};
use super::input::Input;
use super::problem::{ApiError, ApiResult, Problem};
use super::{ListResponse, QueryParams};
use crate::state::AppState;

/// Body of `POST /integrations` and `PUT /integrations/{id}`. Read-only fields of the
/// resource (`id`, `tenantId`, timestamps, authors) may be sent back and are ignored.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct IntegrationInput {
    /// A catalog provider id, or `custom` for a custom API integration. Cannot change on update.
    provider_id: String,
    /// 1 to 100 characters.
    name: String,
    /// At most 1000 characters.
    description: Option<String>,
    /// `active` (default for new integrations) or `inactive`; absent on update keeps the current status.
    status: Option<IntegrationStatus>,
    /// Settings checked against the provider's `configSchema`.
    #[schema(value_type = Object)]
    config: Option<Map<String, Value>>,
    /// Required when `providerId` is `custom`, refused otherwise.
    custom_definition: Option<CustomApiDefinition>,
}

const FIELDS: &[&str] = &[
    "providerId",
    "name",
    "description",
    "status",
    "config",
    "customDefinition",
    // read-only, ignored
    "id",
    "tenantId",
    "createdAt",
    "updatedAt",
    "createdBy",
    "updatedBy",
];

fn read_spec(body: Value) -> ApiResult<IntegrationSpec> {
    let mut input = Input::new(body, FIELDS)?;
    let provider_id = input.validated("providerId", true, ProviderId::new);
    // Values are checked by the domain, which lists every invalid one at once; here only the
    // shape of the body is read.
    let name: Option<String> = input.required("name");
    let description: Option<String> = input.optional("description");
    let status: Option<IntegrationStatus> = input.optional("status");
    let config: Option<Map<String, Value>> = input.optional("config");
    let custom_definition: Option<CustomApiDefinition> = input.optional("customDefinition");
    input.finish()?;
    Ok(IntegrationSpec {
        provider_id: provider_id.ok_or_else(|| ApiError::Malformed("providerId".into()))?,
        name: name.ok_or_else(|| ApiError::Malformed("name".into()))?,
        description: description.unwrap_or_default(),
        status,
        config: config.unwrap_or_default(),
        custom_definition,
    })
}

fn path_id(raw: &str) -> ApiResult<IntegrationId> {
    IntegrationId::parse(raw).ok_or_else(|| ApiError::NotFound(format!("integration '{raw}' was not found")))
}

fn respond(mut builder: actix_web::HttpResponseBuilder, stored: &Stored<Integration>) -> HttpResponse {
    builder.insert_header(etag_header(&stored.etag)).json(&stored.value)
}

/// List the caller's integrations.
#[utoipa::path(get, path = "/api/v1/integrations", tag = "integrations",
    params(
        ("providerId" = Option<String>, Query, description = "Only integrations of this provider"),
        ("status" = Option<IntegrationStatus>, Query, description = "Only integrations in this status"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 200 (default 50)"),
        ("continuationToken" = Option<String>, Query, description = "Token of the next page, from the previous response"),
    ),
    responses(
        (status = 200, description = "A page of integrations, oldest first", body = ListResponse<Integration>),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(state: web::Data<AppState>, caller: Authenticated, req: HttpRequest) -> ApiResult<HttpResponse> {
    let mut query = QueryParams::parse(&req)?;
    let provider_id = query.get("providerId", |s| ProviderId::new(s));
    let status = query.get("status", |s| {
        IntegrationStatus::parse(s).ok_or_else(|| FieldViolation::invalid("", "must be one of active, inactive, error"))
    });
    let page = query.page();
    query.finish()?;
    let filter = IntegrationFilter { provider_id, status };
    let page = state.integrations.list(&caller.0, &filter, &page.unwrap_or_else(|| im_domain::PageRequest::first(50))).await?;
    Ok(HttpResponse::Ok()
        .json(ListResponse { items: page.items.into_iter().map(|s| s.value).collect(), continuation_token: page.continuation }))
}

/// Create an integration from a catalog provider or a custom API definition.
#[utoipa::path(post, path = "/api/v1/integrations", tag = "integrations",
    request_body = IntegrationInput,
    responses(
        (status = 201, description = "Created; `Location` and `ETag` are set", body = Integration),
        (status = 400, description = "Malformed body, unknown or missing fields, wrong types", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The member role is needed", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over the size limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid values: unknown provider, config against the provider's schema, custom definition", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn create(state: web::Data<AppState>, caller: Authenticated, body: JsonBody) -> ApiResult<HttpResponse> {
    caller.0.require(im_domain::Role::Member)?;
    let spec = read_spec(body.0)?;
    let stored = state.integrations.create(&caller.0, spec).await?;
    tracing::info!(target: "audit", action = "integration.create", tenant_id = %caller.0.tenant_id, actor = %caller.0.user_id, integration_id = %stored.value.id, "integration created");
    let mut builder = HttpResponse::Created();
    builder.insert_header((header::LOCATION, format!("/api/v1/integrations/{}", stored.value.id)));
    Ok(respond(builder, &stored))
}

/// Read an integration.
#[utoipa::path(get, path = "/api/v1/integrations/{id}", tag = "integrations",
    params(("id" = uuid::Uuid, Path, description = "Integration id")),
    responses(
        (status = 200, description = "The integration; `ETag` is set", body = Integration),
        (status = 304, description = "`If-None-Match` names the current version"),
        (status = 404, description = "No such integration in the caller's tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get(state: web::Data<AppState>, caller: Authenticated, id: web::Path<String>, req: HttpRequest) -> ApiResult<HttpResponse> {
    let id = path_id(&id)?;
    let stored = state.integrations.get(&caller.0, id).await?;
    if not_modified(&req, &stored.etag) {
        return Ok(HttpResponse::NotModified().insert_header(etag_header(&stored.etag)).finish());
    }
    Ok(respond(HttpResponse::Ok(), &stored))
}

/// Replace an integration's mutable fields.
#[utoipa::path(put, path = "/api/v1/integrations/{id}", tag = "integrations",
    params(
        ("id" = uuid::Uuid, Path, description = "Integration id"),
        ("If-Match" = Option<String>, Header, description = "The ETag read before; a stale one is refused with 412"),
    ),
    request_body = IntegrationInput,
    responses(
        (status = 200, description = "Updated; the new `ETag` is set", body = Integration),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such integration", body = Problem, content_type = "application/problem+json"),
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
    caller.0.require(im_domain::Role::Member)?;
    let id = path_id(&id)?;
    let if_match = if_match(&req)?;
    let spec = read_spec(body.0)?;
    let stored = state.integrations.update(&caller.0, id, spec, if_match.as_ref()).await?;
    tracing::info!(target: "audit", action = "integration.update", tenant_id = %caller.0.tenant_id, actor = %caller.0.user_id, integration_id = %id, "integration updated");
    Ok(respond(HttpResponse::Ok(), &stored))
}

/// Delete an integration.
#[utoipa::path(delete, path = "/api/v1/integrations/{id}", tag = "integrations",
    params(
        ("id" = uuid::Uuid, Path, description = "Integration id"),
        ("If-Match" = Option<String>, Header, description = "The ETag read before; a stale one is refused with 412"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such integration", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`If-Match` is stale", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete(state: web::Data<AppState>, caller: Authenticated, id: web::Path<String>, req: HttpRequest) -> ApiResult<HttpResponse> {
    let id = path_id(&id)?;
    let if_match = if_match(&req)?;
    state.integrations.delete(&caller.0, id, if_match.as_ref()).await?;
    tracing::info!(target: "audit", action = "integration.delete", tenant_id = %caller.0.tenant_id, actor = %caller.0.user_id, integration_id = %id, "integration deleted");
    Ok(HttpResponse::NoContent().finish())
}
