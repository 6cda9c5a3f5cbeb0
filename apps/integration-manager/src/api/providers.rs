//! `/api/v1/providers`: the global provider catalog (writes need the admin role).

use actix_web::{HttpRequest, HttpResponse, web};
use im_domain::Stored;
use std::collections::BTreeMap;

use im_domain::provider::{
    ApiKeyPlacement, AuthMode, BodyExpectation, Capabilities, Category, Provider, ProviderFilter, ProviderId, ProviderSpec,
    VerificationRequest,
};
use im_domain::{DomainError, FieldViolation, Violations};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use im_domain::audit::AuditAction;

use super::body;
use super::custom::{EntityDto, HttpMethodDto, PaginationDto};
use super::extract::{Authenticated, IfMatch, JsonBody, Write, created, etag_header, unchanged};
use super::problem::{ApiError, ApiResult, Problem};
use super::{ListResponse, QueryParams, rfc3339};
use crate::state::AppState;

/// How a connection authenticates API calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = AuthMode)]
pub enum AuthModeDto {
    /// An API key in a header or query parameter (where: the provider's `apiKey`).
    ApiKey,
    /// `Authorization: Bearer <token>` with a token the user created.
    Bearer,
    /// HTTP basic authentication.
    Basic,
    /// OAuth 2.0 client credentials (needs a token URL).
    Oauth2ClientCredentials,
    /// OAuth 2.0 authorization code with PKCE (needs authorization and token URLs).
    Oauth2AuthorizationCode,
}

impl From<AuthModeDto> for AuthMode {
    fn from(dto: AuthModeDto) -> Self {
        match dto {
            AuthModeDto::ApiKey => AuthMode::ApiKey,
            AuthModeDto::Bearer => AuthMode::Bearer,
            AuthModeDto::Basic => AuthMode::Basic,
            AuthModeDto::Oauth2ClientCredentials => AuthMode::Oauth2ClientCredentials,
            AuthModeDto::Oauth2AuthorizationCode => AuthMode::Oauth2AuthorizationCode,
        }
    }
}

impl From<AuthMode> for AuthModeDto {
    fn from(mode: AuthMode) -> Self {
        match mode {
            AuthMode::ApiKey => AuthModeDto::ApiKey,
            AuthMode::Bearer => AuthModeDto::Bearer,
            AuthMode::Basic => AuthModeDto::Basic,
            AuthMode::Oauth2ClientCredentials => AuthModeDto::Oauth2ClientCredentials,
            AuthMode::Oauth2AuthorizationCode => AuthModeDto::Oauth2AuthorizationCode,
        }
    }
}

/// Where a provider expects an API key.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = ApiKeyPlacement)]
pub struct ApiKeyPlacementDto {
    #[serde(rename = "in")]
    location: super::custom::ApiKeyLocationDto,
    /// Header or query parameter name.
    #[schema(min_length = 1, max_length = 100, pattern = r"^[!-~]+$")]
    name: String,
    /// Text sent before the key in a header value (PagerDuty `Token token=`, Opsgenie
    /// `GenieKey `); only with `in: header`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 64, pattern = r"^[ -~]+$")]
    prefix: Option<String>,
}

impl From<ApiKeyPlacementDto> for ApiKeyPlacement {
    fn from(dto: ApiKeyPlacementDto) -> Self {
        ApiKeyPlacement { location: dto.location.into(), name: dto.name, prefix: dto.prefix }
    }
}

impl From<&ApiKeyPlacement> for ApiKeyPlacementDto {
    fn from(p: &ApiKeyPlacement) -> Self {
        ApiKeyPlacementDto { location: p.location.into(), name: p.name.clone(), prefix: p.prefix.clone() }
    }
}

/// What a 2xx answer to the verification request must hold for the credentials to count as
/// working (Slack answers 200 with `{"ok": false}` to a refused token).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = BodyExpectation)]
pub struct BodyExpectationDto {
    /// JSON pointer (RFC 6901) into the answer, such as `/ok`.
    #[schema(min_length = 1, max_length = 256, pattern = r"^/[^\x00-\x1F]*$", example = "/ok")]
    pointer: String,
    #[schema(schema_with = super::schemas::json_scalar)]
    equals: Value,
}

/// What a provider can do beyond plain API calls.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = Capabilities)]
pub struct CapabilitiesDto {
    /// The provider can push events to us.
    #[serde(default)]
    webhooks: bool,
    /// Entities that sync tasks can exchange with the provider.
    #[serde(default)]
    #[schema(schema_with = super::schemas::entity_names)]
    sync_entities: Vec<String>,
}

/// The request a connection test sends to tell whether credentials work (GitHub: `GET /user`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = VerificationRequest)]
pub struct VerificationRequestDto {
    /// `GET` or `POST`.
    method: HttpMethodDto,
    /// Relative to `apiBaseUrl`; starts with `/`; placeholders such as `{organization}` take the
    /// integration's configuration value of that name.
    #[schema(min_length = 1, max_length = 1024, pattern = r"^/([^\s\x00-\x1F\x7F-\x9F?#{}]|\{[A-Za-z0-9_]+\})*$")]
    path: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = super::schemas::query_parameters)]
    query: BTreeMap<String, String>,
    /// JSON body of a `POST` (a GraphQL query), at most 4096 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    body: Option<Value>,
    /// What the answer's body must hold besides a 2xx status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expect: Option<BodyExpectationDto>,
}

impl From<VerificationRequestDto> for VerificationRequest {
    fn from(dto: VerificationRequestDto) -> Self {
        Self {
            method: dto.method.into(),
            path: dto.path,
            query: dto.query,
            body: dto.body,
            expect: dto.expect.map(|e| BodyExpectation { pointer: e.pointer, equals: e.equals }),
        }
    }
}

impl From<&VerificationRequest> for VerificationRequestDto {
    fn from(v: &VerificationRequest) -> Self {
        Self {
            method: v.method.into(),
            path: v.path.clone(),
            query: v.query.clone(),
            body: v.body.clone(),
            expect: v.expect.as_ref().map(|e| BodyExpectationDto { pointer: e.pointer.clone(), equals: e.equals.clone() }),
        }
    }
}

/// Body of `POST /providers` and `PUT /providers/{id}` (where `id` must be the one in the path).
/// The read-only timestamps may be sent back and are ignored.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProviderInput {
    /// Lowercase slug, unique in the catalog; `custom` is reserved.
    #[schema(min_length = 2, max_length = 64, pattern = r"^[a-z0-9][a-z0-9-]*$", example = "acme-tracker")]
    id: String,
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\x00-\x08\x0B-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x08\x0B-\x1F\x7F-\x9F]*$"
    )]
    name: String,
    /// Lowercase slug; the catalog's partition key.
    #[schema(min_length = 2, max_length = 64, pattern = r"^[a-z0-9][a-z0-9-]*$", example = "project-management")]
    category: String,
    #[serde(default)]
    #[schema(max_length = 1000, pattern = r"^[^\x00-\x08\x0B-\x1F\x7F-\x9F]*$")]
    description: Option<String>,
    /// The modes a connection may use; at least one, each once.
    #[schema(schema_with = super::schemas::auth_modes)]
    auth_modes: Vec<AuthModeDto>,
    /// Where the API key goes: required when `authModes` has `api_key`, refused otherwise.
    #[serde(default)]
    api_key: Option<ApiKeyPlacementDto>,
    /// https (http only where the service's destination policy allows it); required when
    /// `authModes` has `oauth2_authorization_code`, refused otherwise.
    #[serde(default)]
    #[schema(
        max_length = 2048,
        pattern = r"^https?://([^\s\x00-\x1F\x7F-\x9F/?#@\[\]]*@)?([A-Za-z0-9_{}-]{1,63}(\.[A-Za-z0-9_{}-]{1,63})*|\[(([0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|([0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4}){0,2})?::([0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4}){0,2})?)\])(:([0-9]{1,4}|[0-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?([/?#][^\s\x00-\x1F\x7F-\x9F]*)?$"
    )]
    authorization_url: Option<String>,
    /// https (http only where the service's destination policy allows it); required when
    /// `authModes` has an `oauth2_*` mode, refused otherwise.
    #[serde(default)]
    #[schema(
        max_length = 2048,
        pattern = r"^https?://([^\s\x00-\x1F\x7F-\x9F/?#@\[\]]*@)?([A-Za-z0-9_{}-]{1,63}(\.[A-Za-z0-9_{}-]{1,63})*|\[(([0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|([0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4}){0,2})?::([0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4}){0,2})?)\])(:([0-9]{1,4}|[0-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?([/?#][^\s\x00-\x1F\x7F-\x9F]*)?$"
    )]
    token_url: Option<String>,
    #[serde(default)]
    #[schema(schema_with = super::schemas::scopes)]
    default_scopes: Vec<String>,
    /// https.
    #[schema(
        max_length = 2048,
        pattern = r"^https://([^\s\x00-\x1F\x7F-\x9F/?#@\[\]]*@)?([A-Za-z0-9_{}-]{1,63}(\.[A-Za-z0-9_{}-]{1,63})*|\[(([0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|([0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4}){0,2})?::([0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4}){0,2})?)\])(:([0-9]{1,4}|[0-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?([/?#][^\s\x00-\x1F\x7F-\x9F]*)?$"
    )]
    api_base_url: String,
    /// https.
    #[schema(
        max_length = 2048,
        pattern = r"^https://([^\s\x00-\x1F\x7F-\x9F/?#@\[\]]*@)?([A-Za-z0-9_{}-]{1,63}(\.[A-Za-z0-9_{}-]{1,63})*|\[(([0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|([0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4}){0,2})?::([0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4}){0,2})?)\])(:([0-9]{1,4}|[0-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?([/?#][^\s\x00-\x1F\x7F-\x9F]*)?$"
    )]
    docs_url: String,
    /// JSON Schema (type object) of an integration's `config`; default: an empty object.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    config_schema: Option<Value>,
    #[serde(default)]
    capabilities: Option<CapabilitiesDto>,
    #[serde(default)]
    verification: Option<VerificationRequestDto>,
    /// Sent with every request to the provider's API (an API version).
    #[serde(default)]
    #[schema(schema_with = super::schemas::default_headers)]
    default_headers: BTreeMap<String, String>,
    /// Query parameters sent with every request; `{name}` in a value takes the integration's
    /// configuration value of that name (Trello: `{"key": "{apiKey}"}`).
    #[serde(default)]
    #[schema(schema_with = super::schemas::default_query)]
    default_query: BTreeMap<String, String>,
    /// How the list requests of `entities` page; required with entities.
    #[serde(default)]
    pagination: Option<PaginationDto>,
    /// Entities sync tasks can exchange, in the custom-definition format; each named in
    /// `capabilities.syncEntities`.
    #[serde(default)]
    #[schema(max_items = 100)]
    entities: Vec<EntityDto>,
}

impl ProviderInput {
    /// The rules of `ProviderInput` between its fields: `authModes` decides whether `apiKey`,
    /// `authorizationUrl` and `tokenUrl` are required or refused (as `ProviderSpec::validate`
    /// does), and entities need `pagination`.
    pub fn rules() -> Value {
        let by_modes = |modes: &[AuthMode], field: &str| {
            let modes: Vec<&str> = modes.iter().map(|m| m.as_str()).collect();
            json!({
                "if": {"properties": {"authModes": {"contains": {"enum": modes}}}, "required": ["authModes"]},
                "then": {"required": [field], "properties": {field: {"not": {"type": "null"}}}},
                "else": {"properties": {field: body::refused()}},
            })
        };
        json!({
            "allOf": [
                {
                    "if": {"required": ["configSchema"], "properties": {"configSchema": {"type": "object"}}},
                    "then": {"properties": {"configSchema": {"required": ["type"], "properties": {"type": {"const": "object"}}}}},
                },
                by_modes(&[AuthMode::ApiKey], "apiKey"),
                by_modes(&[AuthMode::Oauth2AuthorizationCode], "authorizationUrl"),
                by_modes(&[AuthMode::Oauth2AuthorizationCode, AuthMode::Oauth2ClientCredentials], "tokenUrl"),
                {
                    "if": {"properties": {"entities": {"minItems": 1}}, "required": ["entities"]},
                    "then": {"required": ["pagination"], "properties": {"pagination": {"not": {"type": "null"}}}},
                },
            ]
        })
    }
}

/// The rules of `ApiKeyPlacement` beside its fields: `prefix` only with `in: header`.
pub fn api_key_rules() -> Value {
    json!({
        "if": {"required": ["in"], "properties": {"in": {"const": "query"}}},
        "then": {"properties": {"prefix": body::refused()}},
    })
}

/// The rules of `VerificationRequest` beside its fields: `GET` or `POST`.
pub fn verification_rules() -> Value {
    json!({"if": {"required": ["method"]}, "then": {"properties": {"method": {"enum": ["GET", "POST"]}}}})
}

impl TryFrom<ProviderInput> for ProviderSpec {
    type Error = DomainError;

    fn try_from(input: ProviderInput) -> Result<Self, DomainError> {
        let mut v = Violations::new();
        let id = v.check("id", ProviderId::new(input.id));
        let category = v.check("category", Category::new(input.category));
        let capabilities = input.capabilities.unwrap_or_default();
        let (Some(id), Some(category)) = (id, category) else { return Err(v.into_error()) };
        Ok(ProviderSpec {
            id,
            name: input.name,
            category,
            description: input.description.unwrap_or_default(),
            auth_modes: input.auth_modes.into_iter().map(Into::into).collect(),
            api_key: input.api_key.map(Into::into),
            authorization_url: input.authorization_url,
            token_url: input.token_url,
            default_scopes: input.default_scopes,
            api_base_url: input.api_base_url,
            docs_url: input.docs_url,
            config_schema: input.config_schema.unwrap_or_else(|| serde_json::json!({"type": "object", "additionalProperties": false})),
            capabilities: Capabilities { webhooks: capabilities.webhooks, sync_entities: capabilities.sync_entities },
            verification: input.verification.map(Into::into),
            default_headers: input.default_headers,
            default_query: input.default_query,
            pagination: input.pagination.map(Into::into),
            entities: input.entities.into_iter().map(Into::into).collect(),
        })
    }
}

/// A catalog provider.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Provider)]
pub struct ProviderView {
    id: String,
    name: String,
    category: String,
    description: String,
    /// The modes a connection to this provider may use.
    auth_modes: Vec<AuthModeDto>,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key: Option<ApiKeyPlacementDto>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authorization_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_url: Option<String>,
    default_scopes: Vec<String>,
    api_base_url: String,
    docs_url: String,
    /// JSON Schema of an integration's `config`.
    #[schema(value_type = Object)]
    config_schema: Value,
    capabilities: CapabilitiesDto,
    #[serde(skip_serializing_if = "Option::is_none")]
    verification: Option<VerificationRequestDto>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = super::schemas::default_headers)]
    default_headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = super::schemas::default_query)]
    default_query: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pagination: Option<PaginationDto>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    entities: Vec<EntityDto>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
}

impl From<&Provider> for ProviderView {
    fn from(p: &Provider) -> Self {
        let spec = &p.spec;
        Self {
            id: spec.id.to_string(),
            name: spec.name.clone(),
            category: spec.category.to_string(),
            description: spec.description.clone(),
            auth_modes: spec.auth_modes.iter().copied().map(Into::into).collect(),
            api_key: spec.api_key.as_ref().map(Into::into),
            authorization_url: spec.authorization_url.clone(),
            token_url: spec.token_url.clone(),
            default_scopes: spec.default_scopes.clone(),
            api_base_url: spec.api_base_url.clone(),
            docs_url: spec.docs_url.clone(),
            config_schema: spec.config_schema.clone(),
            capabilities: CapabilitiesDto { webhooks: spec.capabilities.webhooks, sync_entities: spec.capabilities.sync_entities.clone() },
            verification: spec.verification.as_ref().map(Into::into),
            default_headers: spec.default_headers.clone(),
            default_query: spec.default_query.clone(),
            pagination: spec.pagination.as_ref().map(Into::into),
            entities: spec.entities.iter().map(Into::into).collect(),
            created_at: rfc3339(p.created_at),
            updated_at: rfc3339(p.updated_at),
        }
    }
}

/// Reads and checks a body; on `PUT` its id must be the path's.
async fn read_spec(state: &AppState, body: Value, path_id: Option<&ProviderId>) -> ApiResult<ProviderSpec> {
    let convert = |input: ProviderInput| {
        let spec = ProviderSpec::try_from(input)?;
        match path_id {
            Some(path) if *path != spec.id => {
                Err(DomainError::invalid("id", "does not match the id in the path; a provider's id cannot change"))
            }
            _ => Ok(spec),
        }
    };
    body::read(body, convert, async |spec: &ProviderSpec| state.catalog.check(spec)).await
}

fn path_id(raw: &str) -> ApiResult<ProviderId> {
    ProviderId::new(raw).map_err(|_| ApiError::NotFound(format!("provider '{raw}' was not found")))
}

fn respond(mut builder: actix_web::HttpResponseBuilder, stored: &Stored<Provider>) -> HttpResponse {
    builder.insert_header(etag_header(&stored.etag)).json(ProviderView::from(&stored.value))
}

/// List the catalog.
#[utoipa::path(get, operation_id = "listProviders", path = "/api/v1/providers", tag = "providers",
    params(
        ("category" = Option<String>, Query, min_length = 2, max_length = 64, pattern = r"^[a-z0-9][a-z0-9-]*$", description = "Only this category (stays inside one partition)"),
        ("authMode" = Option<AuthModeDto>, Query, description = "Only providers that support this auth mode"),
        ("q" = Option<String>, Query, max_length = 100, description = "Case-insensitive text in id, name or description"),
        super::Paging,
    ),
    responses(
        (status = 200, description = "A page of providers, ordered by id", body = ListResponse<ProviderView>),
    ),
    security(("bearer" = [])))]
pub async fn list(state: web::Data<AppState>, caller: Authenticated, req: HttpRequest) -> ApiResult<HttpResponse> {
    let mut query = QueryParams::parse(&req)?;
    let category = query.get("category", |s| Category::new(s));
    let auth_mode = query.get("authMode", |s| {
        AuthMode::parse(s)
            .ok_or_else(|| FieldViolation::invalid("", format!("must be one of {}", AuthMode::ALL.map(AuthMode::as_str).join(", "))))
    });
    let q = query.get("q", |s| {
        if s.chars().count() > 100 { Err(FieldViolation::invalid("", "must be at most 100 characters")) } else { Ok(s.trim().to_owned()) }
    });
    let page = query.page();
    query.finish()?;
    let filter = ProviderFilter { category, auth_mode, query: q.filter(|q| !q.is_empty()) };
    let page = state.catalog.list(&caller.0, &filter, &page.unwrap_or_else(|| im_domain::PageRequest::first(50))).await?;
    Ok(HttpResponse::Ok().json(ListResponse {
        items: page.items.iter().map(|s| ProviderView::from(&s.value)).collect(),
        continuation_token: page.continuation,
    }))
}

/// Read a provider.
#[utoipa::path(get, operation_id = "getProvider", path = "/api/v1/providers/{id}", tag = "providers",
    params(("id" = String, Path, description = "Provider id")),
    responses(
        (status = 200, description = "The provider; `ETag` is set", body = ProviderView),
    ),
    security(("bearer" = [])))]
pub async fn get(state: web::Data<AppState>, caller: Authenticated, id: web::Path<String>, req: HttpRequest) -> ApiResult<HttpResponse> {
    let id = path_id(&id)?;
    let stored = state.catalog.get(&caller.0, &id).await?;
    Ok(unchanged(&req, &stored.etag).unwrap_or_else(|| respond(HttpResponse::Ok(), &stored)))
}

/// Add a provider to the catalog (admin).
#[utoipa::path(post, operation_id = "createProvider", path = "/api/v1/providers", tag = "providers",
    request_body = ProviderInput,
    responses(
        (status = 201, description = "Created; `Location` and `ETag` are set", body = ProviderView),
        (status = 409, description = "The id is taken", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn create(state: web::Data<AppState>, caller: Authenticated, body: JsonBody) -> ApiResult<HttpResponse> {
    state.catalog.authorize(&caller.0, AuditAction::Create).await?;
    let spec = read_spec(&state, body.0, None).await?;
    let stored = state.catalog.create(&caller.0, spec).await?;
    Ok(respond(created(format!("/api/v1/providers/{}", stored.value.spec.id)), &stored))
}

/// Replace a provider (admin). Its category may change; its id may not.
#[utoipa::path(put, operation_id = "updateProvider", path = "/api/v1/providers/{id}", tag = "providers",
    params(("id" = String, Path, description = "Provider id"), IfMatch),
    request_body = ProviderInput,
    responses((status = 200, description = "Updated", body = ProviderView)),
    security(("bearer" = [])))]
pub async fn update(state: web::Data<AppState>, write: Write, id: web::Path<String>, body: JsonBody) -> ApiResult<HttpResponse> {
    state.catalog.authorize(&write.caller, AuditAction::Update).await?;
    let id = path_id(&id)?;
    let spec = read_spec(&state, body.0, Some(&id)).await?;
    let stored = state.catalog.update(&write.caller, &id, spec, write.tag()).await?;
    Ok(respond(HttpResponse::Ok(), &stored))
}

/// Remove a provider from the catalog (admin).
#[utoipa::path(delete, operation_id = "deleteProvider", path = "/api/v1/providers/{id}", tag = "providers",
    params(("id" = String, Path, description = "Provider id"), IfMatch),
    responses((status = 204, description = "Deleted")),
    security(("bearer" = [])))]
pub async fn delete(state: web::Data<AppState>, write: Write, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = path_id(&id)?;
    state.catalog.delete(&write.caller, &id, write.tag()).await?;
    Ok(HttpResponse::NoContent().finish())
}
