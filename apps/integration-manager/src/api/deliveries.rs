//! `/api/v1/webhooks/{id}/deliveries`, `/recover`, `/test`: the delivery log and its operations.

use actix_web::{HttpRequest, HttpResponse, web};
use im_domain::events::EventData;
use im_domain::webhooks::delivery::{Attempt, AttemptTrigger, Delivery, DeliveryFilter, DeliveryStatus};
use im_domain::webhooks::endpoint::WebhookId;
use im_domain::{DomainError, FieldViolation, ViolationKind};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::ToSchema;

use im_domain::audit::AuditAction;

use super::body;
use super::extract::{Authenticated, JsonBody};
use super::problem::{ApiError, ApiResult, Problem};
use super::{ListResponse, QueryParams, rfc3339};
use crate::state::AppState;

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = DeliveryStatus)]
pub enum DeliveryStatusDto {
    /// Waiting for its first attempt or a retry.
    Pending,
    Succeeded,
    /// Every attempt failed (or the endpoint answered 410 Gone).
    Failed,
    /// Recorded while the endpoint was disabled; can be recovered later.
    Skipped,
}

impl From<DeliveryStatus> for DeliveryStatusDto {
    fn from(status: DeliveryStatus) -> Self {
        match status {
            DeliveryStatus::Pending => DeliveryStatusDto::Pending,
            DeliveryStatus::Succeeded => DeliveryStatusDto::Succeeded,
            DeliveryStatus::Failed => DeliveryStatusDto::Failed,
            DeliveryStatus::Skipped => DeliveryStatusDto::Skipped,
        }
    }
}

/// What started an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = AttemptTrigger)]
pub enum AttemptTriggerDto {
    Scheduled,
    Manual,
}

/// One HTTP attempt.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Attempt)]
pub struct AttemptView {
    #[schema(format = DateTime)]
    at: String,
    trigger: AttemptTriggerDto,
    /// The receiver's HTTP status, when it answered.
    status_code: Option<u16>,
    duration_ms: u64,
    /// The first 4 KiB of the response body.
    response_excerpt: Option<String>,
    /// Why the attempt failed, when it did.
    error: Option<String>,
}

impl From<Attempt> for AttemptView {
    fn from(a: Attempt) -> Self {
        Self {
            at: rfc3339(a.at),
            trigger: match a.trigger {
                AttemptTrigger::Scheduled => AttemptTriggerDto::Scheduled,
                AttemptTrigger::Manual => AttemptTriggerDto::Manual,
            },
            status_code: a.status_code,
            duration_ms: a.duration_ms,
            response_excerpt: a.response_excerpt,
            error: a.error,
        }
    }
}

/// One message to one endpoint, with every attempt.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Delivery)]
pub struct DeliveryView {
    id: uuid::Uuid,
    webhook_id: uuid::Uuid,
    /// The `webhook-id` header of every attempt (the receiver's idempotency key).
    message_id: String,
    event_type: String,
    status: DeliveryStatusDto,
    /// The newest 50 attempts, oldest first.
    attempts: Vec<AttemptView>,
    /// Older attempts, made but no longer kept.
    older_attempts: u32,
    #[schema(format = DateTime)]
    next_attempt_at: Option<String>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    /// The body that was (or will be) sent: the event's CloudEvents document.
    #[schema(value_type = Object)]
    payload: EventData,
}

impl From<Delivery> for DeliveryView {
    fn from(d: Delivery) -> Self {
        Self {
            id: d.id,
            webhook_id: d.webhook_id.0,
            message_id: d.message_id,
            event_type: d.event_type,
            status: d.status.into(),
            attempts: d.attempts.into_iter().map(Into::into).collect(),
            older_attempts: d.older_attempts,
            next_attempt_at: d.next_attempt_at.map(rfc3339),
            created_at: rfc3339(d.created_at),
            updated_at: rfc3339(d.updated_at),
            payload: d.payload,
        }
    }
}

fn webhook_id(raw: &str) -> ApiResult<WebhookId> {
    WebhookId::parse(raw).ok_or_else(|| ApiError::NotFound(format!("webhook '{raw}' was not found")))
}

fn delivery_id(raw: &str) -> ApiResult<uuid::Uuid> {
    uuid::Uuid::try_parse(raw).map_err(|_| ApiError::NotFound(format!("delivery '{raw}' was not found")))
}

fn time_param(raw: &str) -> Result<OffsetDateTime, FieldViolation> {
    OffsetDateTime::parse(raw, &Rfc3339).map_err(|_| FieldViolation::new("", ViolationKind::WrongType, "must be an RFC 3339 timestamp"))
}

/// The delivery log of an endpoint.
#[utoipa::path(get, operation_id = "listDeliveries", path = "/api/v1/webhooks/{id}/deliveries", tag = "webhooks",
    params(
        ("id" = uuid::Uuid, Path, description = "Webhook id"),
        ("status" = Option<DeliveryStatusDto>, Query, description = "pending, succeeded, failed or skipped"),
        ("eventType" = Option<String>, Query, description = "Only this event type"),
        ("since" = Option<String>, Query, format = DateTime, description = "Created at or after (RFC 3339)"),
        ("until" = Option<String>, Query, format = DateTime, description = "Created before (RFC 3339)"),
        super::Paging,
    ),
    responses(
        (status = 200, description = "A page of deliveries (kept 7 days)", body = ListResponse<DeliveryView>),
    ),
    security(("bearer" = [])))]
pub async fn list(state: web::Data<AppState>, caller: Authenticated, id: web::Path<String>, req: HttpRequest) -> ApiResult<HttpResponse> {
    let webhook = webhook_id(&id)?;
    let mut query = QueryParams::parse(&req)?;
    let status = query.get("status", |s| {
        DeliveryStatus::parse(s).ok_or_else(|| FieldViolation::invalid("", "must be one of pending, succeeded, failed, skipped"))
    });
    let event_type = query.get("eventType", |s| Ok(s.to_owned()));
    let since = query.get("since", time_param);
    let until = query.get("until", time_param);
    let page = query.page();
    query.finish()?;
    let filter = DeliveryFilter { status, event_type, since, until };
    let page = state.deliveries.list(&caller.0, webhook, &filter, &page.unwrap_or_else(|| im_domain::PageRequest::first(50))).await?;
    let items = page.items.into_iter().map(|s| DeliveryView::from(s.value)).collect();
    Ok(HttpResponse::Ok().json(ListResponse { items, continuation_token: page.continuation }))
}

/// One delivery with every attempt.
#[utoipa::path(get, operation_id = "getDelivery", path = "/api/v1/webhooks/{id}/deliveries/{deliveryId}", tag = "webhooks",
    params(("id" = uuid::Uuid, Path, description = "Webhook id"), ("deliveryId" = uuid::Uuid, Path, description = "Delivery id")),
    responses(
        (status = 200, description = "The delivery", body = DeliveryView),
    ),
    security(("bearer" = [])))]
pub async fn get(state: web::Data<AppState>, caller: Authenticated, path: web::Path<(String, String)>) -> ApiResult<HttpResponse> {
    let (webhook, delivery) = (webhook_id(&path.0)?, delivery_id(&path.1)?);
    let stored = state.deliveries.get(&caller.0, webhook, delivery).await?;
    Ok(HttpResponse::Ok().json(DeliveryView::from(stored.value)))
}

/// A manual attempt now; the answer shows its outcome.
#[utoipa::path(post, operation_id = "retryDelivery", path = "/api/v1/webhooks/{id}/deliveries/{deliveryId}/retry", tag = "webhooks",
    params(("id" = uuid::Uuid, Path, description = "Webhook id"), ("deliveryId" = uuid::Uuid, Path, description = "Delivery id")),
    responses(
        (status = 200, description = "The delivery after the attempt", body = DeliveryView),
        (status = 429, description = "The endpoint's manual sends (tests and retries, `webhooks.manual_sends_per_minute`) are used up; `Retry-After` says when to try again", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn retry(state: web::Data<AppState>, caller: Authenticated, path: web::Path<(String, String)>) -> ApiResult<HttpResponse> {
    let (webhook, delivery) = (webhook_id(&path.0)?, delivery_id(&path.1)?);
    let stored = state.deliveries.retry(&caller.0, webhook, delivery).await?;
    Ok(HttpResponse::Ok().json(DeliveryView::from(stored.value)))
}

/// Body of `POST /webhooks/{id}/recover`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecoverInput {
    /// Re-queue every failed or skipped delivery created since then (RFC 3339).
    #[schema(format = DateTime, example = "2026-01-31T12:00:00Z")]
    since: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RecoverReport {
    /// How many deliveries were queued again.
    recovered: usize,
}

/// Re-queue the failed and skipped deliveries of an endpoint since a time.
#[utoipa::path(post, operation_id = "recoverDeliveries", path = "/api/v1/webhooks/{id}/recover", tag = "webhooks",
    params(("id" = uuid::Uuid, Path, description = "Webhook id")),
    request_body = RecoverInput,
    responses(
        (status = 202, description = "Queued again", body = RecoverReport),
    ),
    security(("bearer" = [])))]
pub async fn recover(state: web::Data<AppState>, caller: Authenticated, id: web::Path<String>, body: JsonBody) -> ApiResult<HttpResponse> {
    state.deliveries.authorize(&caller.0, AuditAction::Recover).await?;
    let webhook = webhook_id(&id)?;
    let convert = |input: RecoverInput| time_param(&input.since).map_err(|v| DomainError::invalid("since", v.message));
    let since = body::read(body.0, convert, async |_: &OffsetDateTime| Ok(())).await?;
    let recovered = state.deliveries.recover(&caller.0, webhook, since).await?;
    Ok(HttpResponse::Accepted().json(RecoverReport { recovered }))
}

/// Send a `webhook.test` event now and answer with the attempt's outcome.
#[utoipa::path(post, operation_id = "testWebhook", path = "/api/v1/webhooks/{id}/test", tag = "webhooks",
    params(("id" = uuid::Uuid, Path, description = "Webhook id")),
    responses(
        (status = 200, description = "The test delivery with its attempt", body = DeliveryView),
        (status = 429, description = "The endpoint's manual sends (tests and retries, `webhooks.manual_sends_per_minute`) are used up; `Retry-After` says when to try again", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn test(state: web::Data<AppState>, caller: Authenticated, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let webhook = webhook_id(&id)?;
    let stored = state.deliveries.test(&caller.0, webhook).await?;
    Ok(HttpResponse::Ok().json(DeliveryView::from(stored.value)))
}
