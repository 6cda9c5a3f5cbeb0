//! OAuth2 authorization code connections: `POST /api/v1/integrations/{id}/connections/oauth2/authorize`
//! starts an authorization (a `pending_authorization` connection and the URL the user opens),
//! `GET /api/v1/oauth2/callback` completes it. The callback takes no bearer token: the signed,
//! single-use `state` names the tenant, integration, connection and user it was issued for.
//!
//! `returnUrl` is where the callback sends the user's browser after a successful authorization.
//! It is chosen by an authenticated member of the tenant when the authorization starts, checked
//! to be an absolute `https` URL (`http` only with `oauth2.allow_http_return_url`), and kept in
//! the connection's secret, never in the state or the callback URL: nobody can make the callback
//! redirect anywhere but where the tenant asked.

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use im_domain::audit::AuditAction;
use im_domain::services::{AuthorizeSpec, CallbackParams};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::body;
use super::connections::ConnectionView;
use super::extract::{Authenticated, JsonBody, etag_header};
use super::problem::{ApiError, ApiResult};
use crate::state::AppState;

/// Body of `POST .../connections/oauth2/authorize`: the connection to create. The tenant's OAuth
/// app is the integration's `oauth2App` (set on the integration first).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizeInput {
    #[schema(min_length = 1, max_length = 100, example = "GitHub (alice)")]
    name: String,
    /// Scopes to ask for; absent: the provider's default scopes.
    #[serde(default)]
    #[schema(schema_with = super::schemas::scopes)]
    scopes: Option<Vec<String>>,
    /// Where the browser goes after a successful authorization: an absolute `https` URL
    /// (`http` only where the service allows it). Absent: the callback answers JSON.
    #[serde(default)]
    #[schema(max_length = 2048, pattern = r"^https?://[^\s\x00-\x1F\x7F-\x9F]+$", example = "https://app.example.com/integrations/done")]
    return_url: Option<String>,
}

impl From<AuthorizeInput> for AuthorizeSpec {
    fn from(input: AuthorizeInput) -> Self {
        AuthorizeSpec { name: input.name, scopes: input.scopes, return_url: input.return_url }
    }
}

/// A started authorization.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = OAuth2Authorization)]
pub struct AuthorizationView {
    /// The new connection, `pending_authorization` until the callback.
    connection: ConnectionView,
    /// The provider's authorization URL to open in a browser, with the integration's client id,
    /// `state` (signed, single use, valid for `oauth2.state_ttl`, 10 minutes by default) and the
    /// S256 `code_challenge`.
    authorization_url: String,
}

/// Start an OAuth2 authorization (authorization code with PKCE) for a new connection.
#[utoipa::path(post, operation_id = "authorizeOAuth2Connection", path = "/api/v1/integrations/{id}/connections/oauth2/authorize",
    tag = "connections",
    params(("id" = uuid::Uuid, Path, description = "Integration id")),
    request_body = AuthorizeInput,
    responses(
        (status = 201, description = "The pending connection and the URL to open; `Location` and `ETag` are set", body = AuthorizationView),
        (status = 409, description = "`oauth2.redirect_url` is not configured", content_type = "application/problem+json", body = super::problem::Problem),
        (status = 422, description = "A value is refused, or the integration has no OAuth app (`oauth2App`) or its provider no authorization code flow; each problem names its field", content_type = "application/problem+json", body = super::problem::Problem),
    ),
    security(("bearer" = [])))]
pub async fn authorize(
    state: web::Data<AppState>,
    caller: Authenticated,
    id: web::Path<String>,
    body: JsonBody,
) -> ApiResult<HttpResponse> {
    state.connections.authorize(&caller.0, AuditAction::Create).await?;
    let integration =
        im_domain::IntegrationId::parse(&id).ok_or_else(|| ApiError::NotFound(format!("integration '{}' was not found", id.as_str())))?;
    let checked = body::parse::<AuthorizeInput>(body.0)?;
    let spec = AuthorizeSpec::from(checked.value);
    let found = state.connections.check_authorization(&caller.0, integration, &spec).await;
    let spec = body::Checked { value: spec, violations: checked.violations }.merge(found)?;
    let started = state.connections.start_authorization(&caller.0, integration, spec).await?;
    let connection = &started.connection;
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/api/v1/integrations/{integration}/connections/{}", connection.value.id)))
        .insert_header(etag_header(&connection.etag))
        .json(AuthorizationView { connection: ConnectionView::from(&connection.value), authorization_url: started.authorization_url }))
}

/// What the provider sends back to the callback (other parameters are ignored).
#[derive(Debug, Deserialize)]
pub struct CallbackQuery {
    /// The authorization code.
    code: Option<String>,
    /// The state of the authorization URL.
    state: Option<String>,
    /// The provider's error (`access_denied` when the user refused).
    error: Option<String>,
    error_description: Option<String>,
}

/// The OAuth2 redirect URL (`oauth2.redirect_url`): completes an authorization. No bearer token:
/// the signed, single-use `state` authenticates the request.
#[utoipa::path(get, operation_id = "oauth2Callback", path = "/api/v1/oauth2/callback", tag = "connections",
    params(
        ("code" = Option<String>, Query, description = "The authorization code"),
        ("state" = String, Query, description = "The state of the authorization URL (required: a callback without one is 400)"),
        ("error" = Option<String>, Query, description = "The provider's error (`access_denied` when the user refused)"),
        ("error_description" = Option<String>, Query, description = "The provider's description of the error"),
    ),
    responses(
        (status = 200, description = "Authorized (no `returnUrl` was given): the connection, now `active`", body = ConnectionView),
        (status = 302, description = "Authorized: the browser goes to the `returnUrl` given when the authorization started"),
        (status = 400, description = "`state` or `code` is missing, malformed or forged", content_type = "application/problem+json", body = super::problem::Problem),
        (status = 409, description = "The state was used already, the user or provider refused (`error=access_denied`), or the token endpoint refused the code; the connection shows why", content_type = "application/problem+json", body = super::problem::Problem),
        (status = 422, description = "The state expired (`oauth2.state_ttl`, 10 minutes by default); the connection is `expired` with the reason and no code was exchanged", content_type = "application/problem+json", body = super::problem::Problem),
    ))]
pub async fn callback(state: web::Data<AppState>, query: web::Query<CallbackQuery>) -> ApiResult<HttpResponse> {
    let query = query.into_inner();
    let params = CallbackParams { code: query.code, state: query.state, error: query.error, error_description: query.error_description };
    let outcome = state.connections.complete_authorization(params).await?;
    Ok(match outcome.return_url {
        Some(url) => HttpResponse::Found().insert_header((header::LOCATION, url)).finish(),
        None => {
            HttpResponse::Ok().insert_header(etag_header(&outcome.connection.etag)).json(ConnectionView::from(&outcome.connection.value))
        }
    })
}
