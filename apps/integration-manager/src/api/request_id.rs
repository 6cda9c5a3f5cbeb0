//! Request ids and request logs: every request gets an id (the caller's `X-Request-Id` when it
//! is sane, a new UUID otherwise), a tracing span carrying it, a log line when it ends, and
//! the id back in the `X-Request-Id` response header.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use tracing::Instrument;

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

fn incoming(req: &ServiceRequest) -> Option<String> {
    let value = req.headers().get(&HEADER)?.to_str().ok()?;
    let sane = !value.is_empty() && value.len() <= 128 && value.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
    sane.then(|| value.to_owned())
}

/// A new request id: a random UUID (version 4) from a per-thread generator seeded once from
/// the OS, so ids cost no system call.
fn new_id() -> String {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut seed = [0u8; 8];
            let _ = getrandom::fill(&mut seed);
            u64::from_le_bytes(seed) | 1
        });
    }
    let next = || {
        STATE.with(|state| {
            // splitmix64
            let mut z = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
            state.set(z);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        })
    };
    let bytes = (u128::from(next()) << 64) | u128::from(next());
    uuid::Builder::from_random_bytes(bytes.to_le_bytes()).into_uuid().to_string()
}

pub async fn middleware(req: ServiceRequest, next: Next<impl MessageBody>) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = incoming(&req).unwrap_or_else(new_id);
    let span =
        tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.path(), tenant_id = tracing::field::Empty);
    let started = Instant::now();
    let method = req.method().clone();
    // The id also rides in a task-local, so audit records made while serving carry it.
    let mut response = crate::audit::REQUEST_ID.scope(id.clone(), next.call(req)).instrument(span.clone()).await?;
    let status = response.status();
    let route = match response.request().app_data::<crate::metrics::Route>() {
        Some(route) => crate::metrics::RouteLabel::Known(route.0),
        None => crate::metrics::RouteLabel::Matched(response.request().match_pattern()),
    };
    crate::metrics::record_request(&method, route, status, started.elapsed());
    span.in_scope(|| {
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), elapsed_ms, "request failed");
        } else {
            tracing::info!(status = status.as_u16(), elapsed_ms, "request done");
        }
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    Ok(response)
}
