//! `/api/v1/integrations/{id}/connections`: how an integration authenticates to its provider.
//! Credentials go to the secret store and are never returned; views show hints only.

use actix_web::{HttpRequest, HttpResponse, web};
use im_domain::audit::AuditAction;
use im_domain::connection::{Connection, ConnectionId, ConnectionSpec, ConnectionStatus, Credentials};
use im_domain::provider::AuthMode;
use im_domain::{Caller, DomainError, IntegrationId, PageRequest, Stored, Violations};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::body;
use super::extract::{Authenticated, IfMatch, JsonBody, Write, created, etag_header, unchanged};
use super::problem::{ApiError, ApiResult};
use super::providers::AuthModeDto;
use super::{ListResponse, QueryParams, rfc3339};
use crate::state::AppState;

/// Whether a connection can authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = ConnectionStatus)]
pub enum ConnectionStatusDto {
    Active,
    /// An OAuth2 authorization was started; the provider has not called back yet.
    PendingAuthorization,
    /// The token expired and cannot be refreshed without the user.
    Expired,
    /// The provider refused to refresh the token.
    RefreshFailed,
    Revoked,
    Error,
}

impl From<ConnectionStatus> for ConnectionStatusDto {
    fn from(status: ConnectionStatus) -> Self {
        match status {
            ConnectionStatus::Active => ConnectionStatusDto::Active,
            ConnectionStatus::PendingAuthorization => ConnectionStatusDto::PendingAuthorization,
            ConnectionStatus::Expired => ConnectionStatusDto::Expired,
            ConnectionStatus::RefreshFailed => ConnectionStatusDto::RefreshFailed,
            ConnectionStatus::Revoked => ConnectionStatusDto::Revoked,
            ConnectionStatus::Error => ConnectionStatusDto::Error,
        }
    }
}

/// Credentials of a connection: the fields of its `authMode` (`api_key`: `apiKey`; `bearer`:
/// `token`; `basic`: `username`, `password`; `oauth2_client_credentials`: `clientId`,
/// `clientSecret`, optional `scopes`). Write-only: never returned.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = ConnectionCredentials)]
pub struct CredentialsDto {
    #[serde(default)]
    #[schema(write_only, min_length = 1, max_length = 4096, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    api_key: Option<String>,
    #[serde(default)]
    #[schema(write_only, min_length = 1, max_length = 8192, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    token: Option<String>,
    #[serde(default)]
    #[schema(write_only, min_length = 1, max_length = 256, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    username: Option<String>,
    #[serde(default)]
    #[schema(write_only, max_length = 1024, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    password: Option<String>,
    #[serde(default)]
    #[schema(write_only, min_length = 1, max_length = 256, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    client_id: Option<String>,
    #[serde(default)]
    #[schema(write_only, min_length = 1, max_length = 1024, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    client_secret: Option<String>,
    #[serde(default)]
    #[schema(schema_with = super::schemas::scopes)]
    scopes: Option<Vec<String>>,
}

/// The credentials of each mode a connection is created with here: the fields it requires and
/// those it may have; every other field of [`CredentialsDto`] is refused. The document states
/// it (`ConnectionInput`'s `if`/`then` by mode, [`rules`]) and [`CredentialsDto::into_credentials`] applies it.
const MODES: [(AuthMode, &[&str], &[&str]); 4] = [
    (AuthMode::ApiKey, &["apiKey"], &[]),
    (AuthMode::Bearer, &["token"], &[]),
    (AuthMode::Basic, &["username", "password"], &[]),
    (AuthMode::Oauth2ClientCredentials, &["clientId", "clientSecret"], &["scopes"]),
];

/// Every field of [`CredentialsDto`].
const CREDENTIAL_FIELDS: [&str; 7] = ["apiKey", "token", "username", "password", "clientId", "clientSecret", "scopes"];

/// The rules of `ConnectionInput` beside its fields: `authMode` picks the fields of
/// `credentials` (see [`MODES`]), one `if`/`then` a mode (generated clients read these; a
/// `oneOf` of whole bodies makes them generate one model per branch).
pub fn rules() -> Value {
    let mut by_mode: Vec<Value> = MODES
        .iter()
        .map(|(mode, required, optional)| {
            // A required field must have a value (`null` reads as absent); the other modes' are refused.
            let refused: serde_json::Map<String, Value> = CREDENTIAL_FIELDS
                .iter()
                .filter(|f| !optional.contains(f))
                .map(|f| ((*f).to_owned(), if required.contains(f) { json!({"not": {"type": "null"}}) } else { body::refused() }))
                .collect();
            json!({
                "if": {"properties": {"authMode": {"const": mode.as_str()}}, "required": ["authMode"]},
                "then": {"properties": {"credentials": {"required": required, "properties": refused}}},
            })
        })
        .collect();
    // Authorization code connections are made by `.../connections/oauth2/authorize`.
    let authorize = json!({
        "if": {"required": ["authMode"], "properties": {"authMode": {"const": AuthMode::Oauth2AuthorizationCode.as_str()}}},
        "then": {"properties": {"authMode": body::refused()}},
    });
    by_mode.push(authorize);
    json!({"allOf": by_mode})
}

impl CredentialsDto {
    /// The credentials of `mode`, with every missing field of the mode and every field of
    /// another mode reported.
    fn into_credentials(self, mode: AuthMode) -> Result<Credentials, DomainError> {
        let mut v = Violations::new();
        let (required, optional) = MODES.iter().find(|(m, ..)| *m == mode).map_or((&[][..], &[][..]), |(_, r, o)| (*r, *o));
        let mut take = |field: &str, value: Option<String>| -> String {
            match (value, required.contains(&field)) {
                (Some(value), true) => value,
                (None, true) => {
                    v.invalid(format!("credentials.{field}"), format!("is required when authMode is {}", mode.as_str()));
                    String::new()
                }
                (Some(_), false) => {
                    v.invalid(format!("credentials.{field}"), format!("is not used when authMode is {}", mode.as_str()));
                    String::new()
                }
                (None, false) => String::new(),
            }
        };
        let api_key = take("apiKey", self.api_key);
        let token = take("token", self.token);
        let username = take("username", self.username);
        let password = take("password", self.password);
        let client_id = take("clientId", self.client_id);
        let client_secret = take("clientSecret", self.client_secret);
        if self.scopes.is_some() && !optional.contains(&"scopes") {
            v.invalid("credentials.scopes", format!("is not used when authMode is {}", mode.as_str()));
        }
        let credentials = match mode {
            AuthMode::ApiKey => Credentials::ApiKey { api_key },
            AuthMode::Bearer => Credentials::Bearer { token },
            AuthMode::Basic => Credentials::Basic { username, password },
            AuthMode::Oauth2ClientCredentials => {
                Credentials::Oauth2ClientCredentials { client_id, client_secret, scopes: self.scopes.unwrap_or_default() }
            }
            AuthMode::Oauth2AuthorizationCode => {
                v.invalid("authMode", "oauth2_authorization_code connections are created by POST .../connections/oauth2/authorize");
                Credentials::Bearer { token }
            }
        };
        v.finish(|| credentials)
    }
}

/// Body of `POST .../connections` and `PUT .../connections/{connectionId}`. The read-only
/// fields of the resource may be sent back and are ignored (`api::openapi::READ_ONLY_ECHOES`);
/// `credentials` is always required.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionInput {
    #[schema(
        min_length = 1,
        max_length = 100,
        example = "Deploy bot",
        pattern = r"^[^\x00-\x08\x0B-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x08\x0B-\x1F\x7F-\x9F]*$"
    )]
    name: String,
    /// One of the modes the integration's provider (or custom definition) supports.
    auth_mode: AuthModeDto,
    credentials: CredentialsDto,
}

impl TryFrom<ConnectionInput> for ConnectionSpec {
    type Error = DomainError;

    fn try_from(input: ConnectionInput) -> Result<Self, DomainError> {
        Ok(ConnectionSpec { name: input.name, credentials: input.credentials.into_credentials(input.auth_mode.into())? })
    }
}

/// A connection: its credentials are in the secret store; this shows hints only.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Connection)]
pub struct ConnectionView {
    id: uuid::Uuid,
    tenant_id: String,
    integration_id: uuid::Uuid,
    name: String,
    auth_mode: AuthModeDto,
    status: ConnectionStatusDto,
    /// Why the connection is not active.
    #[serde(skip_serializing_if = "Option::is_none")]
    status_reason: Option<String>,
    /// The last four characters of the secret (shown for secrets of 12 characters or more).
    #[serde(skip_serializing_if = "Option::is_none")]
    last_four: Option<String>,
    scopes: Vec<String>,
    /// When the current access token expires (OAuth2).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    token_expires_at: Option<String>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    created_by: String,
    updated_by: String,
}

impl From<&Connection> for ConnectionView {
    fn from(c: &Connection) -> Self {
        Self {
            id: c.id.0,
            tenant_id: c.tenant_id.to_string(),
            integration_id: c.integration_id.0,
            name: c.name.clone(),
            auth_mode: c.auth_mode.into(),
            status: c.status.into(),
            status_reason: c.status_reason.clone(),
            last_four: c.hints.last_four.clone(),
            scopes: c.hints.scopes.clone(),
            token_expires_at: c.hints.token_expires_at.map(rfc3339),
            created_at: rfc3339(c.created_at),
            updated_at: rfc3339(c.updated_at),
            created_by: c.created_by.to_string(),
            updated_by: c.updated_by.to_string(),
        }
    }
}

fn integration_id(raw: &str) -> ApiResult<IntegrationId> {
    IntegrationId::parse(raw).ok_or_else(|| ApiError::NotFound(format!("integration '{raw}' was not found")))
}

fn ids(path: &(String, String)) -> ApiResult<(IntegrationId, ConnectionId)> {
    let integration = integration_id(&path.0)?;
    let connection = ConnectionId::parse(&path.1).ok_or_else(|| ApiError::NotFound(format!("connection '{}' was not found", path.1)))?;
    Ok((integration, connection))
}

fn respond(mut builder: actix_web::HttpResponseBuilder, stored: &Stored<Connection>) -> HttpResponse {
    builder.insert_header(etag_header(&stored.etag)).json(ConnectionView::from(&stored.value))
}

async fn read_spec(state: &AppState, caller: &Caller, integration: IntegrationId, body: Value) -> ApiResult<ConnectionSpec> {
    body::read(
        body,
        |input: ConnectionInput| ConnectionSpec::try_from(input),
        async |spec: &ConnectionSpec| state.connections.check(caller, integration, spec).await,
    )
    .await
}

/// List an integration's connections.
#[utoipa::path(get, operation_id = "listConnections", path = "/api/v1/integrations/{id}/connections", tag = "connections",
    params(
        ("id" = uuid::Uuid, Path, description = "Integration id"),
        super::Paging,
    ),
    responses(
        (status = 200, description = "A page of connections, oldest first", body = ListResponse<ConnectionView>),
    ),
    security(("bearer" = [])))]
pub async fn list(state: web::Data<AppState>, caller: Authenticated, id: web::Path<String>, req: HttpRequest) -> ApiResult<HttpResponse> {
    let integration = integration_id(&id)?;
    let mut query = QueryParams::parse(&req)?;
    let page = query.page();
    query.finish()?;
    let page = state.connections.list(&caller.0, integration, &page.unwrap_or_else(|| PageRequest::first(50))).await?;
    Ok(HttpResponse::Ok().json(ListResponse {
        items: page.items.iter().map(|s| ConnectionView::from(&s.value)).collect(),
        continuation_token: page.continuation,
    }))
}

/// Create a connection with credentials (stored in the secret store, never returned).
#[utoipa::path(post, operation_id = "createConnection", path = "/api/v1/integrations/{id}/connections", tag = "connections",
    params(("id" = uuid::Uuid, Path, description = "Integration id")),
    request_body = ConnectionInput,
    responses(
        (status = 201, description = "Created; `Location` and `ETag` are set", body = ConnectionView),
    ),
    security(("bearer" = [])))]
pub async fn create(state: web::Data<AppState>, caller: Authenticated, id: web::Path<String>, body: JsonBody) -> ApiResult<HttpResponse> {
    state.connections.authorize(&caller.0, AuditAction::Create).await?;
    let integration = integration_id(&id)?;
    let spec = read_spec(&state, &caller.0, integration, body.0).await?;
    let stored = state.connections.create(&caller.0, integration, spec).await?;
    Ok(respond(created(format!("/api/v1/integrations/{integration}/connections/{}", stored.value.id)), &stored))
}

/// Read a connection.
#[utoipa::path(get, operation_id = "getConnection", path = "/api/v1/integrations/{id}/connections/{connectionId}", tag = "connections",
    params(
        ("id" = uuid::Uuid, Path, description = "Integration id"),
        ("connectionId" = uuid::Uuid, Path, description = "Connection id"),
    ),
    responses(
        (status = 200, description = "The connection; `ETag` is set", body = ConnectionView),
        (status = 304, description = "`If-None-Match` names the current version"),
    ),
    security(("bearer" = [])))]
pub async fn get(
    state: web::Data<AppState>,
    caller: Authenticated,
    path: web::Path<(String, String)>,
    req: HttpRequest,
) -> ApiResult<HttpResponse> {
    let (integration, id) = ids(&path)?;
    let stored = state.connections.get(&caller.0, integration, id).await?;
    Ok(unchanged(&req, &stored.etag).unwrap_or_else(|| respond(HttpResponse::Ok(), &stored)))
}

/// Replace a connection's name and credentials; it is active again with the new credentials.
#[utoipa::path(put, operation_id = "updateConnection", path = "/api/v1/integrations/{id}/connections/{connectionId}", tag = "connections",
    params(
        ("id" = uuid::Uuid, Path, description = "Integration id"),
        ("connectionId" = uuid::Uuid, Path, description = "Connection id"),
        IfMatch,
    ),
    request_body = ConnectionInput,
    responses(
        (status = 200, description = "Updated; the new `ETag` is set", body = ConnectionView),
    ),
    security(("bearer" = [])))]
pub async fn update(
    state: web::Data<AppState>,
    write: Write,
    path: web::Path<(String, String)>,
    body: JsonBody,
) -> ApiResult<HttpResponse> {
    state.connections.authorize(&write.caller, AuditAction::Update).await?;
    let (integration, id) = ids(&path)?;
    let spec = read_spec(&state, &write.caller, integration, body.0).await?;
    let stored = state.connections.update(&write.caller, integration, id, spec, write.tag()).await?;
    Ok(respond(HttpResponse::Ok(), &stored))
}

/// Delete a connection and its credentials.
#[utoipa::path(delete, operation_id = "deleteConnection", path = "/api/v1/integrations/{id}/connections/{connectionId}", tag = "connections",
    params(
        ("id" = uuid::Uuid, Path, description = "Integration id"),
        ("connectionId" = uuid::Uuid, Path, description = "Connection id"),
        IfMatch,
    ),
    responses(
        (status = 204, description = "Deleted, with its credentials"),
    ),
    security(("bearer" = [])))]
pub async fn delete(state: web::Data<AppState>, write: Write, path: web::Path<(String, String)>) -> ApiResult<HttpResponse> {
    let (integration, id) = ids(&path)?;
    state.connections.delete(&write.caller, integration, id, write.tag()).await?;
    Ok(HttpResponse::NoContent().finish())
}
