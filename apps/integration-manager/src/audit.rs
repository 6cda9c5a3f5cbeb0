//! The audit log. `logging.backend = "embedded"`: one structured record per state change, denied
//! access and secret access on `tracing`, under the `audit` target. `"http"`: the record is
//! first written to the store's buffer in the request that makes it ([`BufferedAudit`]), then a
//! worker ships batches to the Logging Service ([`spawn_shipper`]) and deletes what it
//! acknowledged. Either way each record carries the id of the request it happened in.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_domain::audit::{AuditBuffer, AuditLog, AuditRecord};
use im_domain::ports::{DependencyHealth, HealthCheck};
use im_domain::retry::Backoff;
use im_domain::services::AuditShipper;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

tokio::task_local! {
    /// The id of the API request being served (set by the request-id middleware).
    pub static REQUEST_ID: String;
}

/// The request id of the task, if it serves a request.
fn request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

fn log(record: &AuditRecord) {
    tracing::info!(
        target: "audit",
        record_id = %record.id,
        action = %record.action_name(),
        outcome = record.outcome.as_str(),
        tenant_id = %record.tenant_id,
        actor_id = %record.actor_id,
        resource_type = record.resource.as_str(),
        resource_id = %record.resource_id,
        request_id = record.request_id.as_deref().unwrap_or_default(),
        details = %record.details,
        "audit"
    );
}

/// Writes audit records to the service's log (`target: "audit"`).
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingAudit;

#[async_trait]
impl AuditLog for TracingAudit {
    async fn record(&self, mut record: AuditRecord) {
        record.request_id = record.request_id.or_else(request_id);
        log(&record);
    }
}

/// Keeps audit records in the store's buffer for the Logging Service. A record the store cannot
/// take (the store is down: the operation it records most likely failed too) goes to the log at
/// error level, whole, so it is not lost.
pub struct BufferedAudit {
    pub buffer: Arc<dyn AuditBuffer>,
}

#[async_trait]
impl AuditLog for BufferedAudit {
    async fn record(&self, mut record: AuditRecord) {
        record.request_id = record.request_id.or_else(request_id);
        if let Err(error) = self.buffer.append(&record.entry()).await {
            tracing::error!(%error, record_id = %record.id, "an audit record could not be buffered; it is logged instead");
            log(&record);
        }
    }
}

/// Longest wait between two rounds while the Logging Service is failing.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Ships the buffer until `shutdown`: full batches back to back, then a round every `interval`;
/// after a failure the wait grows from `interval` up to a minute. Records the service refuses
/// even alone are logged whole (target `audit`) and deleted. Sets `im_audit_backlog` and
/// `im_audit_oldest_age_seconds` after every round.
pub fn spawn_shipper(shipper: AuditShipper, batch: u32, interval: Duration, shutdown: &CancellationToken, tasks: &TaskTracker) {
    let shutdown = shutdown.clone();
    tasks.spawn(im_store_embedded::as_worker(async move {
        let backoff = Backoff { attempts: u32::MAX, first: interval, max: MAX_BACKOFF.max(interval) };
        let mut failures: u32 = 0;
        while !shutdown.is_cancelled() {
            let wait = match shipper.ship_once(batch).await {
                Ok(round) => {
                    if failures > 0 {
                        tracing::info!(failed_rounds = failures, "audit records reach the Logging Service again");
                    }
                    failures = 0;
                    for entry in &round.refused {
                        tracing::error!(
                            target: "audit", record_id = %entry.id, action = %entry.action, outcome = %entry.outcome,
                            tenant_id = %entry.tenant_id, actor_id = %entry.actor_id, resource_type = %entry.resource_type,
                            resource_id = %entry.resource_id, request_id = entry.request_id.as_deref().unwrap_or_default(),
                            details = %entry.details, "the Logging Service refused this audit record; it is logged here instead"
                        );
                    }
                    (round.claimed as u32) < batch
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(%error, failed_rounds = failures, "shipping audit records failed; they stay in the buffer");
                    true
                }
            };
            sample(shipper.buffer().as_ref()).await;
            if wait {
                let pause = if failures == 0 { interval } else { backoff.delay(failures) };
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
        tracing::debug!("audit shipper stopped");
    }));
}

/// `(count, age of the oldest in seconds)` of the buffer, also set as the backlog gauges.
async fn sample(buffer: &dyn AuditBuffer) -> Option<(u64, u64)> {
    let backlog = buffer.backlog().await.ok()?;
    let age = backlog.oldest.map_or(0, |t| (time::OffsetDateTime::now_utc() - t).whole_seconds().max(0) as u64);
    metrics::gauge!("im_audit_backlog").set(backlog.count as f64);
    metrics::gauge!("im_audit_oldest_age_seconds").set(age as f64);
    Some((backlog.count, age))
}

/// Readiness detail of the audit buffer: how many records wait and for how long; older than
/// `logging.max_backlog_age` makes readiness `degraded` (records are safe in the store, the API
/// keeps working).
pub struct AuditBacklogHealth {
    pub buffer: Arc<dyn AuditBuffer>,
    pub max_age: Duration,
}

#[async_trait]
impl HealthCheck for AuditBacklogHealth {
    fn describe(&self) -> (&'static str, bool) {
        ("audit_backlog", false)
    }

    #[tracing::instrument(skip_all, name = "audit_buffer.check")]
    async fn check(&self) -> DependencyHealth {
        match sample(self.buffer.as_ref()).await {
            Some((count, age)) => DependencyHealth {
                name: "audit_backlog".into(),
                ready: age <= self.max_age.as_secs(),
                critical: false,
                detail: format!("{count} audit record(s) waiting, oldest {age} s"),
                diagnostic: String::new(),
            },
            None => DependencyHealth {
                name: "audit_backlog".into(),
                ready: false,
                critical: false,
                detail: "not readable".into(),
                diagnostic: String::new(),
            },
        }
    }
}
