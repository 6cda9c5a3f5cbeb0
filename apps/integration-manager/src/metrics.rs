//! Prometheus metrics through the `metrics` facade: one process-wide recorder, rendered by our
//! own HTTP server at `/metrics` (the exporter runs no listener of its own).
//!
//! Recorded as things happen: `http_requests_total` and `http_request_duration_seconds` by
//! method, route template and status (the request middleware), and
//! `webhook_delivery_attempts_total` by outcome (the delivery dispatcher). Sampled at each scrape:
//! `outbox_pending_events` and `outbox_oldest_event_age_seconds`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use actix_web::http::{Method, StatusCode};
use im_domain::services::AttemptReport;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets, in seconds: 1 ms to 10 s.
const BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide recorder's handle, installing the recorder on first use.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
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
    static SERIES: RefCell<HashMap<SeriesKey, (metrics::Counter, metrics::Histogram)>> = RefCell::new(HashMap::new());
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
pub fn record_attempt(report: &Result<AttemptReport, im_domain::DomainError>) {
    let outcome = match report {
        Ok(AttemptReport::Delivered) => "delivered",
        Ok(AttemptReport::RetryAt(_)) => "retry_scheduled",
        Ok(AttemptReport::Failed) => "failed",
        Ok(AttemptReport::Throttled) => "throttled",
        Ok(AttemptReport::Postponed { .. }) => "postponed",
        Ok(AttemptReport::Nothing) => "nothing",
        Err(_) => "incomplete",
    };
    metrics::counter!("webhook_delivery_attempts_total", "outcome" => outcome).increment(1);
}

/// The outbox's backlog, sampled at a scrape.
pub fn record_outbox(pending: u64, oldest_age_secs: u64) {
    metrics::gauge!("outbox_pending_events").set(pending as f64);
    metrics::gauge!("outbox_oldest_event_age_seconds").set(oldest_age_secs as f64);
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
        record_attempt(&Ok(AttemptReport::Delivered));
        let text = handle.render();
        assert!(text.contains(r#"http_requests_total{method="POST",route="/api/v1/integrations",status="201"} 2"#), "{text}");
        assert!(text.contains(r#"http_requests_total{method="GET",route="/health/live",status="200"} 1"#), "{text}");
        assert!(text.contains(r#"route="unmatched",status="404""#), "{text}");
        assert!(
            text.contains(r#"http_request_duration_seconds_bucket{method="POST",route="/api/v1/integrations",status="201",le="0.005"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"webhook_delivery_attempts_total{outcome="delivered"}"#), "{text}");
    }
}
