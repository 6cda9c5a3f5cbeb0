//! `/api/v1/admin`: operations of the whole service (admin role): the outbox's dead letters.

use actix_web::{HttpRequest, HttpResponse, web};
use im_domain::events::DeadLetter;
use serde::Serialize;
use utoipa::ToSchema;

use super::extract::Authenticated;
use super::problem::{ApiError, ApiResult};
use super::{ListResponse, QueryParams, rfc3339};
use crate::state::AppState;

/// An outbox event set aside after too many failed tries to read or publish it. Its data is not
/// shown; ids, type and tenant identify it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView {
    /// The event's id (its CloudEvents `id`).
    pub id: uuid::Uuid,
    /// The event's type, when the entry can be read that far.
    pub event_type: Option<String>,
    /// The event's tenant, when the entry can be read that far.
    pub tenant_id: Option<String>,
    /// Failed tries so far.
    pub attempts: u32,
    /// Why the last try failed.
    pub last_error: String,
    /// When the event was recorded (RFC 3339).
    pub recorded_at: String,
    /// When it was set aside (RFC 3339).
    pub dead_at: String,
}

impl From<&DeadLetter> for DeadLetterView {
    fn from(d: &DeadLetter) -> Self {
        Self {
            id: d.id,
            event_type: d.event_type.clone(),
            tenant_id: d.tenant_id.clone(),
            attempts: d.attempts,
            last_error: d.last_error.clone(),
            recorded_at: rfc3339(d.recorded_at),
            dead_at: rfc3339(d.dead_at),
        }
    }
}

/// List the outbox's dead letters (admin).
#[utoipa::path(get, operation_id = "listDeadLetters", path = "/api/v1/admin/outbox/dead-letters", tag = "operations",
    params(
        super::Paging,
    ),
    responses(
        (status = 200, description = "A page of dead letters (a page may be shorter than `limit` while a token follows)", body = ListResponse<DeadLetterView>),
    ),
    security(("bearer" = [])))]
pub async fn list_dead_letters(state: web::Data<AppState>, caller: Authenticated, req: HttpRequest) -> ApiResult<HttpResponse> {
    let mut query = QueryParams::parse(&req)?;
    let page = query.page();
    query.finish()?;
    let page = state.outbox.dead_letters(&caller.0, &page.unwrap_or_else(|| im_domain::PageRequest::first(50))).await?;
    Ok(HttpResponse::Ok()
        .json(ListResponse { items: page.items.iter().map(DeadLetterView::from).collect(), continuation_token: page.continuation }))
}

/// Put a dead letter back among the pending events, in its original place, with its tries reset (admin).
#[utoipa::path(post, operation_id = "requeueDeadLetter", path = "/api/v1/admin/outbox/dead-letters/{id}/requeue", tag = "operations",
    params(("id" = String, Path, description = "The event id")),
    responses(
        (status = 204, description = "Requeued; the relay publishes it again"),
    ),
    security(("bearer" = [])))]
pub async fn requeue_dead_letter(state: web::Data<AppState>, caller: Authenticated, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = uuid::Uuid::try_parse(&id).map_err(|_| ApiError::NotFound(format!("dead letter '{id}' was not found")))?;
    state.outbox.requeue(&caller.0, id).await?;
    Ok(HttpResponse::NoContent().finish())
}
