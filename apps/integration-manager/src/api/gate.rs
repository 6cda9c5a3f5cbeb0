//! What stands before every `/api/v1` operation, in one middleware: the tenant's rate limit and
//! `Idempotency-Key`. Both need the tenant, so the caller is authenticated here once and the
//! handler's [`Authenticated`] extractor reuses it. With the rate limit off and no key, a request
//! passes through untouched (no authentication, no allocation).
//!
//! **Rate limits** are a token bucket per tenant ([`governor`]'s GCRA), per instance: counting
//! across instances would cost a store round trip on every request; with N API instances behind
//! a load balancer, `rate_limits.per_tenant.rate` is the tenant's limit divided by N (as Svix
//! and Convoy do). Every answer carries `RateLimit-Limit`, `RateLimit-Remaining` and
//! `RateLimit-Reset` (IETF draft); a refusal is 429 with `Retry-After`.
//!
//! **Idempotency keys** on POST: see [`im_domain::idempotency`]. Only successful (2xx) answers
//! are kept; any other answer releases the key, so the request can be sent again. A kept answer
//! holds no secret (a webhook's signing secret is left out of its replay); the request body is
//! kept only as a digest.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use actix_web::body::{BoxBody, EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{HttpMessage as _, HttpResponse, ResponseError as _, web};
use governor::clock::{Clock as _, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use im_domain::idempotency::{Claim, IdempotencyService, SavedResponse};
use im_domain::{Caller, DomainError, TenantId};

use super::extract::{Authenticated, authenticate};
use super::problem::ApiError;
use crate::config::TenantRateLimit;
use crate::state::AppState;

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on an answer given again for a repeated `Idempotency-Key`.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
const LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
/// The headers of a kept answer that are given again with it.
const REPLAYED_HEADERS: [HeaderName; 3] = [header::CONTENT_TYPE, header::LOCATION, header::ETAG];

type Buckets = RateLimiter<TenantId, DefaultKeyedStateStore<TenantId>, DefaultClock, StateInformationMiddleware>;

/// Token buckets per tenant; tenants idle long enough to be full again are forgotten now and then.
pub struct TenantLimiter {
    buckets: Buckets,
    checks: AtomicU32,
}

/// How often (in checks) full buckets are forgotten.
const FORGET_EVERY: u32 = 4096;

/// The headers of one decision.
#[derive(Debug)]
struct Decision {
    limit: u32,
    remaining: u32,
    /// Seconds until the bucket is full again (`RateLimit-Reset`), or until the next request
    /// may pass (`Retry-After`) when refused.
    reset: u64,
}

impl TenantLimiter {
    /// `None` when the limit is off (`rate = 0`).
    pub fn new(settings: TenantRateLimit) -> Option<Self> {
        let rate = NonZeroU32::new(settings.rate)?;
        let burst = NonZeroU32::new(settings.burst).unwrap_or(rate);
        let quota = Quota::per_second(rate).allow_burst(burst);
        Some(Self { buckets: RateLimiter::dashmap(quota).with_middleware::<StateInformationMiddleware>(), checks: AtomicU32::new(0) })
    }

    fn check(&self, tenant: &TenantId) -> Result<Decision, Decision> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % FORGET_EVERY == FORGET_EVERY - 1 {
            self.buckets.retain_recent();
        }
        match self.buckets.check_key(tenant) {
            Ok(snapshot) => {
                let quota = snapshot.quota();
                let limit = quota.burst_size().get();
                let remaining = snapshot.remaining_burst_capacity();
                let refill = quota.replenish_interval().saturating_mul(limit - remaining.min(limit));
                Ok(Decision { limit, remaining, reset: ceil_secs(refill) })
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.buckets.clock().now());
                Err(Decision { limit: not_until.quota().burst_size().get(), remaining: 0, reset: ceil_secs(wait).max(1) })
            }
        }
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Decision {
    fn write(&self, headers: &mut HeaderMap) {
        headers.insert(LIMIT, HeaderValue::from(self.limit));
        headers.insert(REMAINING, HeaderValue::from(self.remaining));
        headers.insert(RESET, HeaderValue::from(self.reset));
    }
}

type Answer<B> = ServiceResponse<EitherBody<B, BoxBody>>;

pub async fn middleware<B: MessageBody + 'static>(req: ServiceRequest, next: Next<B>) -> Result<Answer<B>, actix_web::Error> {
    let keyed = req.method() == Method::POST && req.headers().contains_key(IDEMPOTENCY_KEY);
    let Some(state) = req.app_data::<web::Data<AppState>>().filter(|s| keyed || s.rate_limits.is_some()).cloned() else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    // Unauthenticated requests go on: the handler answers 401 as usual.
    // The paths past here are boxed: every request's future (the router boxes it) is as large
    // as its largest path, and the idempotent one made it 2.6 KB, past what the allocator's
    // per-thread cache serves (1,032 bytes for glibc).
    let Ok(caller) = Box::pin(authenticate(&state, req.headers())).await else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    req.extensions_mut().insert(Authenticated(caller.clone()));
    let decision = match state.rate_limits.as_ref().map(|limiter| limiter.check(&caller.tenant_id)).transpose() {
        Ok(decision) => decision,
        Err(refused) => {
            let error = ApiError::Domain(DomainError::TooManyRequests {
                reason: format!("the tenant's rate limit of {} requests at once is exhausted", refused.limit),
                retry_after: Duration::from_secs(refused.reset),
            });
            let mut response = error.error_response();
            refused.write(response.headers_mut());
            return Ok(req.into_response(response).map_into_right_body());
        }
    };
    let mut response =
        if keyed { Box::pin(idempotent(req, next, &state, &caller)).await? } else { next.call(req).await?.map_into_left_body() };
    if let Some(decision) = decision {
        decision.write(response.headers_mut());
    }
    Ok(response)
}

fn refuse<B>(req: ServiceRequest, error: ApiError) -> Answer<B> {
    req.into_response(error.error_response()).map_into_right_body()
}

/// Runs a POST with an `Idempotency-Key` once: see the module documentation.
async fn idempotent<B: MessageBody + 'static>(
    mut req: ServiceRequest,
    next: Next<B>,
    state: &AppState,
    caller: &Caller,
) -> Result<Answer<B>, actix_web::Error> {
    let key = req.headers().get(IDEMPOTENCY_KEY).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Ok(refuse(req, ApiError::BadHeader("Idempotency-Key must be 1 to 255 visible ASCII characters".into())));
    }
    let body = match req.extract::<web::Payload>().await?.to_bytes_limited(state.body_limit).await {
        Ok(Ok(body)) => body,
        Err(_) => return Ok(refuse(req, ApiError::PayloadTooLarge(state.body_limit))),
        Ok(Err(e)) => return Ok(refuse(req, ApiError::Malformed(format!("the body could not be read: {e}")))),
    };
    let path = req.uri().path_and_query().map_or_else(|| req.path(), |p| p.as_str());
    let fingerprint = IdempotencyService::fingerprint(req.method().as_str(), path, &body);
    req.set_payload(body.into());
    let ticket = match state.idempotency.claim(&caller.tenant_id, &key, fingerprint).await {
        Ok(Claim::Acquired(ticket)) => ticket,
        Ok(Claim::Replay(saved)) => return Ok(req.into_response(replay(saved)).map_into_right_body()),
        Ok(Claim::InProgress) => {
            let reason = "a request with this Idempotency-Key is still in progress; send it again once it has answered";
            return Ok(refuse(req, ApiError::Domain(DomainError::Conflict(reason.into()))));
        }
        Ok(Claim::Mismatch) => {
            let reason = "was used with another request (method, path or body) in the last 24 hours; use a new key";
            return Ok(refuse(req, ApiError::Domain(DomainError::invalid("Idempotency-Key", reason))));
        }
        Err(e) => return Ok(refuse(req, e.into())),
    };
    let response = next.call(req).await;
    let response = match response {
        Ok(response) if response.status().is_success() => response,
        other => {
            if let Err(error) = state.idempotency.release(ticket).await {
                tracing::warn!(%error, "an idempotency key could not be released; it frees itself when its lease ends");
            }
            return Ok(other?.map_into_left_body());
        }
    };
    let (http_req, response) = response.into_parts();
    let (head, body) = response.into_parts();
    let body = actix_web::body::to_bytes(body).await.map_err(|e| {
        let e: Box<dyn std::error::Error> = e.into();
        actix_web::error::ErrorInternalServerError(e.to_string())
    })?;
    let saved = std::str::from_utf8(&body).ok().map(|text| SavedResponse {
        status: head.status().as_u16(),
        headers: REPLAYED_HEADERS
            .iter()
            .filter_map(|name| Some((name.as_str().to_owned(), head.headers().get(name)?.to_str().ok()?.to_owned())))
            .collect(),
        body: without_secret(text),
    });
    let kept = match saved {
        Some(saved) => state.idempotency.complete(ticket, saved).await,
        None => state.idempotency.release(ticket).await,
    };
    if let Err(error) = kept {
        tracing::warn!(%error, "the answer to an idempotent request could not be kept; a repetition runs again");
    }
    Ok(ServiceResponse::new(http_req, head.set_body(body).map_into_boxed_body()).map_into_right_body())
}

/// A kept answer never holds a secret: a webhook's signing secret, shown once when created, is
/// left out of the replay (rotate it if the first answer was lost).
fn without_secret(text: &str) -> String {
    if !text.contains("\"secret\"") {
        return text.to_owned();
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(mut object)) => {
            object.remove("secret");
            serde_json::Value::Object(object).to_string()
        }
        _ => text.to_owned(),
    }
}

/// The kept answer, again.
fn replay(saved: SavedResponse) -> HttpResponse {
    let mut response = HttpResponse::build(StatusCode::from_u16(saved.status).unwrap_or(StatusCode::OK));
    for (name, value) in &saved.headers {
        response.insert_header((name.as_str(), value.as_str()));
    }
    response.insert_header((IDEMPOTENT_REPLAYED, "true"));
    response.body(saved.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_gets_its_burst_then_waits_and_others_are_unaffected() {
        let limiter = TenantLimiter::new(TenantRateLimit { rate: 1, burst: 3 }).expect("on");
        let (a, b) = (TenantId::new("tenant-a").unwrap(), TenantId::new("tenant-b").unwrap());
        let remaining: Vec<u32> = (0..3).map(|_| limiter.check(&a).map(|d| d.remaining).expect("within the burst")).collect();
        assert_eq!(remaining, [2, 1, 0]);
        let Err(refused) = limiter.check(&a) else { panic!("over the burst") };
        assert_eq!((refused.limit, refused.remaining, refused.reset), (3, 0, 1));
        let Ok(other) = limiter.check(&b) else { panic!("another tenant has its own bucket") };
        assert_eq!((other.limit, other.remaining, other.reset), (3, 2, 1));
        assert!(TenantLimiter::new(TenantRateLimit { rate: 0, burst: 5 }).is_none(), "rate 0 is off");
    }
}
