//! The audit log on `tracing`: one structured record per state change and per denied access,
//! under the `audit` target, carrying the request id of the span it happens in.

use async_trait::async_trait;
use im_domain::audit::{AuditLog, AuditRecord};

/// Writes audit records to the service's log (`target: "audit"`).
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingAudit;

#[async_trait]
impl AuditLog for TracingAudit {
    async fn record(&self, record: AuditRecord) {
        tracing::info!(
            target: "audit",
            action = %record.action_name(),
            outcome = record.outcome.as_str(),
            tenant_id = %record.tenant_id,
            actor_id = %record.actor_id,
            resource_type = record.resource.as_str(),
            resource_id = %record.resource_id,
            details = %record.details,
            "audit"
        );
    }
}
