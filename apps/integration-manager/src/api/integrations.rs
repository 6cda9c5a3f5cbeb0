//! `/api/v1/integrations`: a tenant's integrations.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use im_domain::integration::{Integration, IntegrationFilter, IntegrationSpec, IntegrationStatus};
use im_domain::provider::ProviderId;
use im_domain::{DomainError, FieldViolation, IntegrationId, Stored};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use im_domain::audit::AuditAction;

use super::body;
use super::custom::CustomDefinitionDto;
use super::extract::{Authenticated, IfMatch, JsonBody, Write, etag_header, not_modified};
use super::problem::{ApiError, ApiResult, Problem};
use super::{ListResponse, QueryParams, rfc3339};
use crate::state::AppState;

/// Lifecycle state of an integration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = IntegrationStatus)]
pub enum IntegrationStatusDto {
    Active,
    Inactive,
    /// Set by the service when the integration cannot work (for example its credentials were refused).
    Error,
}

impl From<IntegrationStatusDto> for IntegrationStatus {
    fn from(dto: IntegrationStatusDto) -> Self {
        match dto {
            IntegrationStatusDto::Active => IntegrationStatus::Active,
            IntegrationStatusDto::Inactive => IntegrationStatus::Inactive,
            IntegrationStatusDto::Error => IntegrationStatus::Error,
        }
    }
}

impl From<IntegrationStatus> for IntegrationStatusDto {
    fn from(status: IntegrationStatus) -> Self {
        match status {
            IntegrationStatus::Active => IntegrationStatusDto::Active,
            IntegrationStatus::Inactive => IntegrationStatusDto::Inactive,
            IntegrationStatus::Error => IntegrationStatusDto::Error,
        }
    }
}

/// Body of `POST /integrations` and `PUT /integrations/{id}`. The read-only fields of the
/// resource (`id`, `tenantId`, timestamps, authors) may be sent back and are ignored.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IntegrationInput {
    /// A catalog provider id, or `custom` for a custom API integration. Cannot change on update.
    #[schema(min_length = 2, max_length = 64, pattern = r"^[a-z0-9][a-z0-9-]*$", example = "github")]
    provider_id: String,
    #[schema(min_length = 1, max_length = 100, example = "Acme GitHub")]
    name: String,
    #[serde(default)]
    #[schema(max_length = 1000)]
    description: Option<String>,
    /// `active` (default for new integrations) or `inactive`; absent on update keeps the current status.
    #[serde(default)]
    #[schema(schema_with = super::schemas::settable_integration_status)]
    status: Option<IntegrationStatusDto>,
    /// Settings checked against the provider's `configSchema` (at most 64 KiB of JSON).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    config: Option<Map<String, Value>>,
    /// Required when `providerId` is `custom`, refused otherwise.
    #[serde(default)]
    custom_definition: Option<CustomDefinitionDto>,
}

impl TryFrom<IntegrationInput> for IntegrationSpec {
    type Error = DomainError;

    fn try_from(input: IntegrationInput) -> Result<Self, DomainError> {
        let provider_id = ProviderId::new(input.provider_id).map_err(|v| DomainError::invalid("providerId", v.message))?;
        Ok(IntegrationSpec {
            provider_id,
            name: input.name,
            description: input.description.unwrap_or_default(),
            status: input.status.map(Into::into),
            config: input.config.unwrap_or_default(),
            custom_definition: input.custom_definition.map(Into::into),
        })
    }
}

/// An integration.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Integration)]
pub struct IntegrationView {
    id: uuid::Uuid,
    tenant_id: String,
    provider_id: String,
    name: String,
    description: String,
    status: IntegrationStatusDto,
    #[schema(value_type = Object)]
    config: Map<String, Value>,
    /// Present for custom API integrations.
    #[serde(skip_serializing_if = "Option::is_none")]
    custom_definition: Option<CustomDefinitionDto>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    created_by: String,
    updated_by: String,
}

impl From<&Integration> for IntegrationView {
    fn from(i: &Integration) -> Self {
        Self {
            id: i.id.0,
            tenant_id: i.tenant_id.to_string(),
            provider_id: i.provider_id.to_string(),
            name: i.name.clone(),
            description: i.description.clone(),
            status: i.status.into(),
            config: i.config.clone(),
            custom_definition: i.custom_definition.as_ref().map(Into::into),
            created_at: rfc3339(i.created_at),
            updated_at: rfc3339(i.updated_at),
            created_by: i.created_by.to_string(),
            updated_by: i.updated_by.to_string(),
        }
    }
}

fn path_id(raw: &str) -> ApiResult<IntegrationId> {
    IntegrationId::parse(raw).ok_or_else(|| ApiError::NotFound(format!("integration '{raw}' was not found")))
}

fn respond(mut builder: actix_web::HttpResponseBuilder, stored: &Stored<Integration>) -> HttpResponse {
    builder.insert_header(etag_header(&stored.etag)).json(IntegrationView::from(&stored.value))
}

/// Reads and checks a body; on any problem, every field the schema or the domain refuses.
async fn read_spec(state: &AppState, body: Value) -> ApiResult<IntegrationSpec> {
    body::read(
        body,
        |input: IntegrationInput| IntegrationSpec::try_from(input),
        async |spec: &IntegrationSpec| state.integrations.check(spec).await,
    )
    .await
}

/// List the caller's integrations.
#[utoipa::path(get, operation_id = "listIntegrations", path = "/api/v1/integrations", tag = "integrations",
    params(
        ("providerId" = Option<String>, Query, min_length = 2, max_length = 64, pattern = r"^[a-z0-9][a-z0-9-]*$", description = "Only integrations of this provider"),
        ("status" = Option<IntegrationStatusDto>, Query, description = "Only integrations in this status"),
        super::Paging,
    ),
    responses(
        (status = 200, description = "A page of integrations, oldest first", body = ListResponse<IntegrationView>),
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
    Ok(HttpResponse::Ok().json(ListResponse {
        items: page.items.iter().map(|s| IntegrationView::from(&s.value)).collect(),
        continuation_token: page.continuation,
    }))
}

/// Create an integration from a catalog provider or a custom API definition.
#[utoipa::path(post, operation_id = "createIntegration", path = "/api/v1/integrations", tag = "integrations",
    request_body = IntegrationInput,
    responses(
        (status = 201, description = "Created; `Location` and `ETag` are set", body = IntegrationView),
    ),
    security(("bearer" = [])))]
pub async fn create(state: web::Data<AppState>, caller: Authenticated, body: JsonBody) -> ApiResult<HttpResponse> {
    state.integrations.authorize(&caller.0, AuditAction::Create).await?;
    let spec = read_spec(&state, body.0).await?;
    let stored = state.integrations.create(&caller.0, spec).await?;
    let mut builder = HttpResponse::Created();
    builder.insert_header((header::LOCATION, format!("/api/v1/integrations/{}", stored.value.id)));
    Ok(respond(builder, &stored))
}

/// Read an integration.
#[utoipa::path(get, operation_id = "getIntegration", path = "/api/v1/integrations/{id}", tag = "integrations",
    params(("id" = uuid::Uuid, Path, description = "Integration id")),
    responses(
        (status = 200, description = "The integration; `ETag` is set", body = IntegrationView),
        (status = 304, description = "`If-None-Match` names the current version"),
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
#[utoipa::path(put, operation_id = "updateIntegration", path = "/api/v1/integrations/{id}", tag = "integrations",
    params(("id" = uuid::Uuid, Path, description = "Integration id"), IfMatch),
    request_body = IntegrationInput,
    responses((status = 200, description = "Updated; the new `ETag` is set", body = IntegrationView)),
    security(("bearer" = [])))]
pub async fn update(state: web::Data<AppState>, write: Write, id: web::Path<String>, body: JsonBody) -> ApiResult<HttpResponse> {
    state.integrations.authorize(&write.caller, AuditAction::Update).await?;
    let id = path_id(&id)?;
    let spec = read_spec(&state, body.0).await?;
    let stored = state.integrations.update(&write.caller, id, spec, write.tag()).await?;
    Ok(respond(HttpResponse::Ok(), &stored))
}

/// Delete an integration.
#[utoipa::path(delete, operation_id = "deleteIntegration", path = "/api/v1/integrations/{id}", tag = "integrations",
    params(("id" = uuid::Uuid, Path, description = "Integration id"), IfMatch),
    responses(
        (status = 204, description = "Deleted"),
        (status = 409, description = "The integration still has connections: delete them first", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete(state: web::Data<AppState>, write: Write, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = path_id(&id)?;
    state.integrations.delete(&write.caller, id, write.tag()).await?;
    Ok(HttpResponse::NoContent().finish())
}
