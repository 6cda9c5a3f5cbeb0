//! `/api/v1/integrations`: a tenant's integrations.

use std::sync::LazyLock;

use actix_web::http::header::ContentType;
use actix_web::{HttpRequest, HttpResponse, web};
use im_domain::integration::{Integration, IntegrationFilter, IntegrationOAuth2App, IntegrationSpec, IntegrationStatus, OAuth2AppSpec};
use im_domain::provider::ProviderId;
use im_domain::{DomainError, FieldViolation, IntegrationId, JsonText, Stored};
use memchr::memmem;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use im_domain::audit::AuditAction;

use super::body;
use super::custom::CustomDefinitionDto;
use super::extract::{Authenticated, IfMatch, JsonBody, Write, created, etag_header, unchanged};
use super::problem::{ApiError, ApiResult, Problem};
use super::{JsonList, ListResponse, QueryParams, rfc3339};
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
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\x00-\x08\x0B-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x08\x0B-\x1F\x7F-\x9F]*$",
        example = "Acme GitHub"
    )]
    name: String,
    #[serde(default)]
    #[schema(max_length = 1000, pattern = r"^[^\x00-\x08\x0B-\x1F\x7F-\x9F]*$")]
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
    /// The tenant's OAuth app at the provider, used by OAuth2 authorization code connections.
    /// Absent (or null) on update: the current app is kept.
    #[serde(default)]
    oauth2_app: Option<OAuth2AppInput>,
}

impl IntegrationInput {
    /// The rules of `IntegrationInput` beside its fields: `customDefinition` is required with
    /// `providerId: custom` and refused with a catalog provider.
    pub fn rules() -> Value {
        let custom = im_domain::provider::CUSTOM_PROVIDER_ID;
        serde_json::json!({
            "if": {"required": ["providerId"], "properties": {"providerId": {"const": custom}}},
            "then": {"required": ["customDefinition"], "properties": {"customDefinition": {"type": "object"}}},
            "else": {"properties": {"customDefinition": {"not": {"type": "object"}}}},
        })
    }
}

/// The tenant's OAuth app at the provider (its redirect URL must be the service's
/// `oauth2.redirect_url`). The client id is kept on the integration; the client secret goes to
/// the secret store and is never returned.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = OAuth2AppInput)]
pub struct OAuth2AppInput {
    /// The client id of the tenant's OAuth app.
    #[schema(min_length = 1, max_length = 256, example = "Iv1.8a61f9b3a7aba766", pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    client_id: String,
    /// The client secret: kept in the secret store, never returned. Required on create and
    /// whenever `clientId` changes; omitted on update with the same `clientId`, the stored
    /// secret is kept. Given, it replaces the stored one (the old one is deleted).
    #[serde(default)]
    #[schema(write_only, min_length = 1, max_length = 1024, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    client_secret: Option<String>,
    /// The last four characters of the stored secret, as reads show them: may be sent back, ignored.
    #[serde(default)]
    #[schema(read_only, max_length = 4)]
    #[allow(dead_code)]
    client_secret_hint: Option<String>,
}

impl From<OAuth2AppInput> for OAuth2AppSpec {
    fn from(input: OAuth2AppInput) -> Self {
        OAuth2AppSpec { client_id: input.client_id, client_secret: input.client_secret }
    }
}

/// An integration's OAuth app as reads show it: the client id and a hint of the secret, never
/// the secret.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = OAuth2App)]
pub struct OAuth2AppView {
    /// The client id of the tenant's OAuth app.
    client_id: String,
    /// The last four characters of the client secret (secrets of at least 12 characters).
    #[serde(skip_serializing_if = "Option::is_none")]
    client_secret_hint: Option<String>,
}

impl From<&IntegrationOAuth2App> for OAuth2AppView {
    fn from(app: &IntegrationOAuth2App) -> Self {
        Self { client_id: app.client_id.clone(), client_secret_hint: app.client_secret_hint.clone() }
    }
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
            oauth2_app: input.oauth2_app.map(Into::into),
        })
    }
}

// Without a custom definition the view's JSON is the domain's encoding of an `Integration` (a
// test holds them equal), so reads serve the stored text as it is.
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
    /// The tenant's OAuth app, when one is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    oauth2_app: Option<OAuth2AppView>,
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
            oauth2_app: i.oauth2_app.as_ref().map(Into::into),
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

/// Answers `stored` as its view; `text`, when given, is its JSON text ([`JsonText::encode`]).
fn respond(
    mut builder: actix_web::HttpResponseBuilder,
    stored: &Stored<Integration>,
    text: Option<JsonText<Integration>>,
) -> ApiResult<HttpResponse> {
    let body = view_body(&stored.value, text)?;
    Ok(builder.insert_header(etag_header(&stored.etag)).content_type(ContentType::json()).body(body))
}

/// The view's JSON of an integration whose JSON text is `text`, when given: that text, or written
/// from the integration itself, when it has no custom definition and no OAuth app (the view is
/// the domain's encoding then: no copy of its fields), else from its view.
fn view_body(integration: &Integration, text: Option<JsonText<Integration>>) -> ApiResult<Vec<u8>> {
    let plain = integration.custom_definition.is_none() && integration.oauth2_app.is_none();
    if let (true, Some(text)) = (plain, text) {
        return Ok(text.into_string().into_bytes());
    }
    // Room for a typical integration, so that the text is not copied as it grows.
    let mut body = Vec::with_capacity(1024);
    if plain {
        serde_json::to_writer(&mut body, integration)
    } else {
        serde_json::to_writer(&mut body, &IntegrationView::from(integration))
    }
    .map_err(|e| ApiError::Domain(DomainError::Unexpected(anyhow::Error::new(e).context("encoding an integration"))))?;
    Ok(body)
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
    let page = state.integrations.list_json(&caller.0, &filter, &page.unwrap_or_else(|| im_domain::PageRequest::first(50))).await?;
    let mut list = JsonList::with_capacity(page.items.total_len() + page.items.len());
    for text in page.items.iter() {
        match view_of(text)? {
            Some(view) => list.push(&view),
            None => list.push(text),
        }
    }
    Ok(list.finish(page.continuation.as_deref()))
}

/// Create an integration from a catalog provider or a custom API definition.
#[utoipa::path(post, operation_id = "createIntegration", path = "/api/v1/integrations", tag = "integrations",
    request_body = IntegrationInput,
    responses(
        (status = 201, description = "Created; `Location` and `ETag` are set", body = IntegrationView),
    ),
    security(("bearer" = [])))]
pub async fn create(state: web::Data<AppState>, caller: Authenticated, body: JsonBody) -> ApiResult<HttpResponse> {
    // Boxed: the handler's future (boxed by the router with the extractors') stays small, and
    // so does this one (each under the 1,032 bytes the allocator's per-thread cache serves).
    Box::pin(async move {
        state.integrations.authorize(&caller.0, AuditAction::Create).await?;
        let spec = read_spec(&state, body.0).await?;
        let (stored, text) = state.integrations.create_json(&caller.0, spec).await?;
        respond(created(format!("/api/v1/integrations/{}", stored.value.id)), &stored, Some(text))
    })
    .await
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
    let stored = state.integrations.get_json(&caller.0, id).await?;
    if let Some(answer) = unchanged(&req, &stored.etag) {
        return Ok(answer);
    }
    Ok(HttpResponse::Ok().insert_header(etag_header(&stored.etag)).content_type(ContentType::json()).body(view_json(stored.value)?))
}

/// The view of an integration from its JSON text: the text itself when it has no custom
/// definition and no OAuth app (the view writes exactly the domain's encoding then); otherwise
/// decoded and written as the view (the view of a custom definition leaves out what is not set;
/// that of an app leaves out where its secret is kept).
fn view_json(text: JsonText<Integration>) -> ApiResult<String> {
    Ok(view_of(text.as_str())?.unwrap_or_else(|| text.into_string()))
}

/// The view of the integration whose stored JSON text is `text`, when it is not `text` itself
/// ([`view_json`]).
fn view_of(text: &str) -> ApiResult<Option<String>> {
    // Searchers built once (`str::contains` prepares its search at every call: a tenth of the
    // instructions of a page of 50).
    static CUSTOM: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(br#""customDefinition":"#));
    static APP: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(br#""oauth2App":"#));
    let bytes = text.as_bytes();
    if CUSTOM.find(bytes).is_none() && APP.find(bytes).is_none() {
        return Ok(None);
    }
    let integration: Integration = serde_json::from_str(text)
        .map_err(|e| ApiError::Domain(DomainError::Unexpected(anyhow::Error::new(e).context("decoding a stored integration"))))?;
    serde_json::to_string(&IntegrationView::from(&integration))
        .map(Some)
        .map_err(|e| ApiError::Domain(DomainError::Unexpected(anyhow::Error::new(e).context("encoding an integration"))))
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
    respond(HttpResponse::Ok(), &stored, None)
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

#[cfg(test)]
mod tests {
    use im_domain::custom::CustomApiDefinition;
    use serde_json::json;

    use super::*;

    fn integration(custom: Option<Value>) -> Integration {
        let now = time::OffsetDateTime::now_utc();
        Integration {
            id: IntegrationId(uuid::Uuid::now_v7()),
            tenant_id: im_domain::TenantId::new("t1").unwrap(),
            provider_id: ProviderId::new(if custom.is_some() { "custom" } else { "github" }).unwrap(),
            name: "Acme \"GitHub\" ✓".into(),
            description: "line\nbreak".into(),
            status: IntegrationStatus::Error,
            config: json!({"organization": "acme", "n": 1.5, "list": [1, null, true], "nested": {"z": 1, "a": 2}})
                .as_object()
                .cloned()
                .unwrap(),
            custom_definition: custom.map(|d| serde_json::from_value::<CustomApiDefinition>(d).unwrap()),
            oauth2_app: None,
            created_at: now,
            updated_at: now + time::Duration::seconds(1),
            created_by: im_domain::UserId::new("alice").unwrap(),
            updated_by: im_domain::UserId::new("bob").unwrap(),
        }
    }

    fn definitions() -> Vec<Value> {
        let entity = json!({
            "name": "ticket", "idField": "id", "updatedAtField": "updated_at",
            "list": {"method": "GET", "path": "/tickets", "itemsPath": "data", "query": {"a": "b"}},
            "get": {"method": "GET", "path": "/tickets/{id}"},
            "upsert": {"method": "PUT", "path": "/tickets/{id}"},
            "delete": {"method": "DELETE", "path": "/tickets/{id}"}
        });
        let mut all = Vec::new();
        for auth in [
            json!({"type": "api_key", "in": "query", "name": "key"}),
            json!({"type": "bearer"}),
            json!({"type": "basic"}),
            json!({"type": "oauth2_client_credentials", "tokenUrl": "https://auth.example.com/token", "scopes": ["read"]}),
        ] {
            for pagination in [
                json!({"style": "cursor", "cursorParam": "cursor", "nextCursorPath": "meta.next", "limitParam": "limit", "pageSize": 100}),
                json!({"style": "cursor", "cursorParam": "cursor", "nextCursorPath": "meta.next"}),
                json!({"style": "page", "pageParam": "page"}),
                json!({"style": "offset", "offsetParam": "offset", "limitParam": "limit", "pageSize": 50}),
                json!({"style": "link"}),
                json!({"style": "link", "limitParam": "per_page", "pageSize": 10}),
                json!({"style": "none"}),
            ] {
                all.push(json!({
                    "baseUrl": "https://api.example.com/v2", "auth": auth, "defaultHeaders": {"Accept": "application/json"},
                    "pagination": pagination, "entities": [entity]
                }));
            }
        }
        all
    }

    /// Reads serve the view of what is stored: the stored text itself, or the view written from
    /// it; writes, the view of what they wrote.
    #[test]
    fn reads_answer_the_view() {
        let plain = integration(None);
        assert_eq!(serde_json::to_string(&IntegrationView::from(&plain)).unwrap(), JsonText::encode(&plain).unwrap().into_string());
        let mut with_app = integration(None);
        let secret_name = im_domain::secrets::SecretName::new(&with_app.tenant_id, "oauth2-app", "i-1");
        with_app.oauth2_app = Some(IntegrationOAuth2App {
            client_id: "app-1".into(),
            client_secret_hint: Some("wxyz".into()),
            client_secret: im_domain::secrets::SecretRef { secret_name, version: "2".into() },
        });
        let shown = view_json(JsonText::encode(&with_app).unwrap()).unwrap();
        assert!(shown.contains(r#""oauth2App":{"clientId":"app-1","clientSecretHint":"wxyz"}"#), "{shown}");
        assert!(!shown.contains("oauth2-app/i-1") && !shown.contains("secretName"), "where the secret is kept is not shown: {shown}");
        let mut cases = vec![plain, with_app];
        cases.extend(definitions().into_iter().map(|d| integration(Some(d))));
        for i in cases {
            let view = serde_json::to_string(&IntegrationView::from(&i)).unwrap();
            assert_eq!(view_json(JsonText::encode(&i).unwrap()).unwrap(), view, "the answer is not the view");
            assert_eq!(String::from_utf8(view_body(&i, None).unwrap()).unwrap(), view, "the answer to a write is not the view");
            let text = JsonText::encode(&i).unwrap();
            assert_eq!(String::from_utf8(view_body(&i, Some(text)).unwrap()).unwrap(), view, "the answer to a create is not the view");
        }
    }

    #[test]
    fn a_page_of_texts_is_the_list_response() {
        let items = [integration(None), integration(None)];
        for continuation in [None, Some("djE6YWJj\"\\".to_owned())] {
            let texts: Vec<String> = items.iter().map(|i| JsonText::encode(i).unwrap().into_string()).collect();
            let expected = serde_json::to_vec(&ListResponse {
                items: items.iter().map(IntegrationView::from).collect(),
                continuation_token: continuation.clone(),
            })
            .unwrap();
            assert_eq!(body_of(crate::api::json_list(&texts, continuation.as_deref())), expected);
        }
        assert_eq!(body_of(crate::api::json_list(&[], None)), br#"{"items":[],"continuationToken":null}"#.to_vec());
    }

    fn body_of(response: HttpResponse) -> Vec<u8> {
        let bytes = actix_web::body::to_bytes(response.into_body());
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(bytes).unwrap().to_vec()
    }
}
