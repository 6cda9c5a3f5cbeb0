//! Prometheus metrics through the `metrics` facade: one process-wide recorder, rendered by our
//! own HTTP server at `/metrics` (the exporter runs no listener of its own).
//!
//! Recorded as things happen: `http_requests_total` and `http_request_duration_seconds` by
//! method, route template and status (the request middleware);
//! `webhook_delivery_attempts_total` by outcome and `im_delivery_commit_to_success_seconds`
//! (the delivery dispatcher); `im_secret_store_request_duration_seconds` by operation (every
//! secret store, through [`TimedSecrets`]); `im_provider_request_duration_seconds` by provider
//! host and status (the provider client). Sampled at each scrape: `outbox_pending_events`,
//! `outbox_oldest_event_age_seconds`, `im_outbox_dead_letters`, `im_delivery_queue_depth`.
//! Labels are static text or values already at hand: nothing is formatted per request.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix_web::http::{Method, StatusCode};
use im_domain::DomainError;
use im_domain::secrets::{SecretName, SecretRef, SecretStore, SecretValue};
use im_domain::services::AttemptReport;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets, in seconds: 1 ms to 10 s.
const BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0];
/// From an event's commit to its receipt, in seconds: 10 ms to 6 h (retries take hours).
const RECEIPT_BUCKETS: [f64; 14] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 21600.0];
const COMMIT_TO_SUCCESS: &str = "im_delivery_commit_to_success_seconds";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide recorder's handle, installing the recorder on first use.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(COMMIT_TO_SUCCESS.into()), &RECEIPT_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS))
                .map(PrometheusBuilder::build_recorder)
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics shows only what it records");
            }
            handle
        })
        .clone()
}

/// How often histogram samples are folded into their buckets when nobody scrapes: the recorder
/// keeps every sample until then, so without it memory would grow with the request count.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The route template of a resource, set as its `app_data` where routes are registered, so the
/// request middleware labels a request without matching its path against every route again.
#[derive(Debug, Clone, Copy)]
pub struct Route(pub &'static str);

/// The route label of a finished request.
pub enum RouteLabel {
    /// A resource registered with its [`Route`].
    Known(&'static str),
    /// Another template actix matched (operations endpoints); `None` for unmatched paths.
    Matched(Option<String>),
}

type SeriesKey = (&'static str, &'static str, &'static str);

thread_local! {
    /// This thread's handles of the request series, by (method, route, status): recording a
    /// request is two atomic updates instead of building and looking up two keys.
    static SERIES: RefCell<HashMap<SeriesKey, (metrics::Counter, metrics::Histogram), foldhash::fast::RandomState>> =
        RefCell::new(HashMap::default());
}

/// One finished request. Labels are static text except the route template, which actix already
/// built (unmatched paths are one label, so unknown URLs cannot grow the series). Nothing is
/// recorded before the process-wide recorder is installed ([`handle`]).
pub fn record_request(method: &Method, route: RouteLabel, status: StatusCode, elapsed: Duration) {
    if HANDLE.get().is_none() {
        return;
    }
    let method = match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let status = status_label(status);
    let seconds = elapsed.as_secs_f64();
    let route = match route {
        RouteLabel::Known(route) => route,
        RouteLabel::Matched(route) => {
            // Not a registered API resource: not worth a cached handle.
            let (counter, histogram) = series(method, route.map_or("unmatched".into(), Into::into), status);
            counter.increment(1);
            histogram.record(seconds);
            return;
        }
    };
    SERIES.with(|cell| {
        let mut cached = cell.borrow_mut();
        let (counter, histogram) = cached.entry((method, route, status)).or_insert_with(|| series(method, route.into(), status));
        counter.increment(1);
        histogram.record(seconds);
    });
}

fn series(method: &'static str, route: metrics::SharedString, status: &'static str) -> (metrics::Counter, metrics::Histogram) {
    let labels = [("method", metrics::SharedString::from(method)), ("route", route), ("status", status.into())];
    (metrics::counter!("http_requests_total", &labels), metrics::histogram!("http_request_duration_seconds", &labels))
}

fn status_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200 => "200",
        201 => "201",
        202 => "202",
        204 => "204",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        412 => "412",
        413 => "413",
        415 => "415",
        422 => "422",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s if s < 300 => "2xx",
        s if s < 400 => "3xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}

/// One delivery attempt the dispatcher made, by outcome.
pub fn record_attempt(report: &Result<AttemptReport, DomainError>) {
    let outcome = match report {
        Ok(AttemptReport::Delivered { committed_at }) => {
            if let Some(committed_at) = committed_at {
                let elapsed = (time::OffsetDateTime::now_utc() - *committed_at).as_seconds_f64().max(0.0);
                metrics::histogram!(COMMIT_TO_SUCCESS).record(elapsed);
            }
            "delivered"
        }
        Ok(AttemptReport::RetryAt(_)) => "retry_scheduled",
        Ok(AttemptReport::Failed) => "failed",
        Ok(AttemptReport::Throttled) => "throttled",
        Ok(AttemptReport::Postponed { .. }) => "postponed",
        Ok(AttemptReport::Nothing) => "nothing",
        Err(_) => "incomplete",
    };
    metrics::counter!("webhook_delivery_attempts_total", "outcome" => outcome).increment(1);
}

/// Deliveries whose hold ended without their attempt recorded, queued again by a sweep.
pub fn record_holds_requeued(count: usize) {
    metrics::counter!("im_webhook_holds_requeued_total").increment(count as u64);
}

/// A finished sync execution, by status, and its records by direction and action.
pub fn record_sync(status: im_domain::sync::ExecutionStatus, counts: &im_domain::sync::DirectionCounts) {
    metrics::counter!("im_sync_executions_total", "status" => status.as_str()).increment(1);
    for (direction, c) in [("inbound", &counts.inbound), ("outbound", &counts.outbound)] {
        for (action, n) in [
            ("read", c.read),
            ("created", c.created),
            ("updated", c.updated),
            ("deleted", c.deleted),
            ("unchanged", c.unchanged),
            ("echo_skipped", c.echoes_skipped),
            ("conflict", c.conflicts),
            ("failed", c.failed),
        ] {
            if n > 0 {
                metrics::counter!("im_sync_records_total", "direction" => direction, "action" => action).increment(n);
            }
        }
    }
}

/// The outbox's backlog and dead letters, sampled at a scrape.
pub fn record_outbox(pending: u64, oldest_age_secs: u64, dead_letters: u64) {
    metrics::gauge!("outbox_pending_events").set(pending as f64);
    metrics::gauge!("outbox_oldest_event_age_seconds").set(oldest_age_secs as f64);
    metrics::gauge!("im_outbox_dead_letters").set(dead_letters as f64);
}

/// Delivery jobs waiting for an attempt, sampled at a scrape.
pub fn record_queue_depth(depth: u64) {
    metrics::gauge!("im_delivery_queue_depth").set(depth as f64);
}

/// Any secret store, timed: `im_secret_store_request_duration_seconds{op}` whatever the backend.
pub struct TimedSecrets(pub Arc<dyn SecretStore>);

fn timed_secret_call(op: &'static str, started: Instant) {
    metrics::histogram!("im_secret_store_request_duration_seconds", "op" => op).record(started.elapsed().as_secs_f64());
}

#[async_trait::async_trait]
impl SecretStore for TimedSecrets {
    async fn put(&self, name: &SecretName, value: &SecretValue, metadata: &BTreeMap<String, String>) -> Result<SecretRef, DomainError> {
        let started = Instant::now();
        let result = self.0.put(name, value, metadata).await;
        timed_secret_call("put", started);
        result
    }

    async fn get(&self, reference: &SecretRef) -> Result<SecretValue, DomainError> {
        let started = Instant::now();
        let result = self.0.get(reference).await;
        timed_secret_call("get", started);
        result
    }

    async fn delete(&self, name: &SecretName) -> Result<(), DomainError> {
        let started = Instant::now();
        let result = self.0.delete(name).await;
        timed_secret_call("delete", started);
        result
    }

    async fn prune(&self, current: &SecretRef) -> Result<(), DomainError> {
        let started = Instant::now();
        let result = self.0.prune(current).await;
        timed_secret_call("prune", started);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_attempts_are_rendered_with_their_labels() {
        let handle = handle();
        record_request(&Method::POST, RouteLabel::Known("/api/v1/integrations"), StatusCode::CREATED, Duration::from_millis(3));
        record_request(&Method::POST, RouteLabel::Known("/api/v1/integrations"), StatusCode::CREATED, Duration::from_millis(3));
        record_request(&Method::GET, RouteLabel::Matched(Some("/health/live".into())), StatusCode::OK, Duration::from_millis(1));
        record_request(&Method::GET, RouteLabel::Matched(None), StatusCode::NOT_FOUND, Duration::from_millis(1));
        record_attempt(&Ok(AttemptReport::Delivered { committed_at: Some(time::OffsetDateTime::now_utc() - time::Duration::seconds(2)) }));
        record_outbox(3, 4, 5);
        record_queue_depth(6);
        let text = handle.render();
        assert!(text.contains(r#"http_requests_total{method="POST",route="/api/v1/integrations",status="201"} 2"#), "{text}");
        assert!(text.contains(r#"http_requests_total{method="GET",route="/health/live",status="200"} 1"#), "{text}");
        assert!(text.contains(r#"route="unmatched",status="404""#), "{text}");
        assert!(
            text.contains(r#"http_request_duration_seconds_bucket{method="POST",route="/api/v1/integrations",status="201",le="0.005"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"webhook_delivery_attempts_total{outcome="delivered"}"#), "{text}");
        // Two seconds from commit to receipt: in the 2.5 s bucket, not in the 1 s one.
        assert!(text.contains(r#"im_delivery_commit_to_success_seconds_bucket{le="1"} 0"#), "{text}");
        assert!(text.contains(r#"im_delivery_commit_to_success_seconds_bucket{le="2.5"} 1"#), "{text}");
        assert!(text.contains(r#"im_delivery_commit_to_success_seconds_bucket{le="21600"} 1"#), "{text}");
        assert!(text.contains("im_outbox_dead_letters 5"), "{text}");
        assert!(text.contains("im_delivery_queue_depth 6"), "{text}");
        let mut counts = im_domain::sync::DirectionCounts::default();
        counts.inbound.created = 7;
        record_sync(im_domain::sync::ExecutionStatus::Partial, &counts);
        let text = handle.render();
        assert!(text.contains(r#"im_sync_executions_total{status="partial"} 1"#), "{text}");
        assert!(text.contains(r#"im_sync_records_total{direction="inbound",action="created"} 7"#), "{text}");
    }
}
