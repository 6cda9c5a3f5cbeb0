//! Audit records: who did what to which resource, with what outcome. The services record every
//! state change of every resource, every denied access and every secret access through the
//! [`AuditLog`] port.
//!
//! With the Logging Service, records are first kept durably in the store ([`AuditBuffer`], written
//! in the request that makes them) and shipped in batches by a worker
//! ([`crate::services::AuditShipper`]) through [`AuditSink`]; the wire form of a record is
//! [`AuditEntry`] (`docs/contracts/logging-service.md`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::auth::Caller;
use crate::common::{TenantId, UserId};
use crate::error::DomainError;

/// The kind of resource an audit record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditResource {
    Integration,
    Provider,
    Webhook,
    Delivery,
    /// An event of the outbox (a dead letter an administrator requeued).
    OutboxEvent,
    Connection,
    SyncTask,
    SyncConflict,
}

impl AuditResource {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditResource::Integration => "integration",
            AuditResource::Provider => "provider",
            AuditResource::Webhook => "webhook",
            AuditResource::Delivery => "delivery",
            AuditResource::OutboxEvent => "outbox_event",
            AuditResource::Connection => "connection",
            AuditResource::SyncTask => "sync_task",
            AuditResource::SyncConflict => "sync_conflict",
        }
    }
}

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditAction {
    Create,
    Update,
    Delete,
    RotateSecret,
    Retry,
    Recover,
    Test,
    Requeue,
    /// Reading a listing that needs a role (a denial is recorded; a success changes nothing).
    List,
    /// Credentials were read from the secret store to call a provider.
    UseCredentials,
    /// The service read a secret for its own work (a webhook's signing secret or custom headers
    /// to send a delivery); the actor is [`SERVICE_ACTOR`].
    ReadSecret,
    Run,
    Pause,
    Resume,
    Cancel,
    Reset,
    Resolve,
}

impl AuditAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Create => "create",
            AuditAction::Update => "update",
            AuditAction::Delete => "delete",
            AuditAction::RotateSecret => "rotate_secret",
            AuditAction::Retry => "retry",
            AuditAction::Recover => "recover",
            AuditAction::Test => "test",
            AuditAction::Requeue => "requeue",
            AuditAction::List => "list",
            AuditAction::UseCredentials => "use_credentials",
            AuditAction::ReadSecret => "read_secret",
            AuditAction::Run => "run",
            AuditAction::Pause => "pause",
            AuditAction::Resume => "resume",
            AuditAction::Cancel => "cancel",
            AuditAction::Reset => "reset",
            AuditAction::Resolve => "resolve",
        }
    }
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome {
    Succeeded,
    /// The caller's role did not allow it.
    Denied,
}

impl AuditOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Succeeded => "succeeded",
            AuditOutcome::Denied => "denied",
        }
    }
}

/// One audit record.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// Unique (UUIDv7): the Logging Service drops a record it already has by this id.
    pub id: Uuid,
    pub at: OffsetDateTime,
    pub tenant_id: TenantId,
    pub actor_id: UserId,
    pub resource: AuditResource,
    pub action: AuditAction,
    /// Empty when the resource was not created (a denied create).
    pub resource_id: String,
    pub outcome: AuditOutcome,
    /// Non-secret facts (counts, the reason of a denial); never a secret value.
    pub details: Value,
    /// The API request it happened in; `None` in background work. The services do not know it:
    /// the app's adapter fills it in.
    pub request_id: Option<String>,
}

impl AuditRecord {
    /// `integration.create`.
    pub fn action_name(&self) -> String {
        format!("{}.{}", self.resource.as_str(), self.action.as_str())
    }

    /// The record as it is buffered and sent.
    pub fn entry(&self) -> AuditEntry {
        AuditEntry {
            id: self.id,
            timestamp: self.at,
            tenant_id: self.tenant_id.to_string(),
            actor_id: self.actor_id.to_string(),
            action: self.action_name(),
            resource_type: self.resource.as_str().to_owned(),
            resource_id: self.resource_id.clone(),
            outcome: self.outcome.as_str().to_owned(),
            request_id: self.request_id.clone(),
            details: self.details.clone(),
        }
    }
}

/// An audit record in its wire form: what the store buffers and the Logging Service receives
/// (`POST /api/v1/audit-events`, a JSON array of these).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    pub id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    pub tenant_id: String,
    pub actor_id: String,
    /// `{resourceType}.{action}`, e.g. `integration.create`.
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    /// `succeeded` or `denied`.
    pub outcome: String,
    pub request_id: Option<String>,
    pub details: Value,
}

/// How many records wait to be shipped, and since when.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditBacklog {
    pub count: u64,
    /// The timestamp of the oldest waiting record.
    pub oldest: Option<OffsetDateTime>,
}

/// The durable buffer of audit records in the store, drained by the shipper. Conformance:
/// `im_testkit::audit::buffer`.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait AuditBuffer: Send + Sync {
    /// Keeps an entry durably (committed when this returns `Ok`).
    ///
    /// # Errors
    /// MUST be idempotent by `id` (appending an id again keeps one entry and succeeds);
    /// [`DomainError::Unavailable`] when the store cannot be written.
    async fn append(&self, entry: &AuditEntry) -> Result<(), DomainError>;

    /// Takes up to `limit` entries, oldest first, that no other shipper holds, and holds them
    /// for `lease` on behalf of `owner`. MUST NOT hand an entry held by another owner to anyone
    /// before its hold ends (a conditional write); MUST hand the same owner its own held entries
    /// again (a retry after a failed send); an entry whose holder died comes back when the hold ends.
    async fn claim(&self, owner: &str, limit: u32, lease: Duration) -> Result<Vec<AuditEntry>, DomainError>;

    /// Deletes entries the Logging Service acknowledged. MUST be idempotent and ignore unknown ids.
    async fn acknowledge(&self, ids: &[Uuid]) -> Result<(), DomainError>;

    /// How many entries wait and the timestamp of the oldest (a store MAY count at most a
    /// bounded number, reporting at least that many).
    async fn backlog(&self) -> Result<AuditBacklog, DomainError>;
}

/// The Logging Service.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait AuditSink: Send + Sync {
    /// Delivers a batch.
    ///
    /// # Errors
    /// MUST return `Ok` only once the service acknowledged every entry (it drops an id it
    /// already has, so sending again is safe); [`DomainError::Validation`] when it refuses the
    /// batch's content (sending it again would fail again); [`DomainError::Unavailable`] when it
    /// cannot be reached or fails, after the adapter's bounded retries.
    async fn send(&self, entries: &[AuditEntry]) -> Result<(), DomainError>;
}

/// Where audit records go.
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait]
pub trait AuditLog: Send + Sync {
    /// Keeps a record.
    ///
    /// # Errors
    /// MUST NOT fail the operation it records: an adapter that cannot deliver a record keeps or
    /// logs it itself.
    async fn record(&self, record: AuditRecord);
}

/// The actor of records of what the service does on its own (background work).
pub const SERVICE_ACTOR: &str = "integration-manager";

/// What the services hold: the port, and the rule of which results are recorded.
#[derive(Clone)]
pub struct Audit {
    log: Arc<dyn AuditLog>,
    clock: Arc<dyn crate::Clock>,
    ids: Arc<dyn crate::IdGenerator>,
}

impl fmt::Debug for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Audit").finish_non_exhaustive()
    }
}

impl Audit {
    pub fn new(log: Arc<dyn AuditLog>, clock: Arc<dyn crate::Clock>) -> Self {
        Self { log, clock, ids: Arc::new(crate::UuidV7) }
    }

    /// An audit that keeps nothing, for tests of the services.
    #[cfg(any(test, feature = "test-support"))]
    pub fn discarding() -> Self {
        struct Discard;
        #[async_trait]
        impl AuditLog for Discard {
            async fn record(&self, _: AuditRecord) {}
        }
        Self { log: Arc::new(Discard), clock: Arc::new(crate::SystemClock), ids: Arc::new(crate::UuidV7) }
    }

    /// Checks that `caller` holds `role` before an operation starts (before its input is even
    /// read), recording a denial.
    ///
    /// # Errors
    /// `Forbidden` naming the missing role.
    pub async fn require(
        &self,
        caller: &Caller,
        role: crate::Role,
        resource: AuditResource,
        action: AuditAction,
    ) -> Result<(), DomainError> {
        let result = caller.require(role);
        if result.is_err() {
            self.result(caller, resource, action, None, &result, |_| (String::new(), Value::Null)).await;
        }
        result
    }

    /// Records the result of an operation on the resource `id` (a success without details, or a
    /// denial) and returns it.
    pub async fn of<T>(
        &self,
        caller: &Caller,
        resource: AuditResource,
        action: AuditAction,
        id: impl ToString,
        result: Result<T, DomainError>,
    ) -> Result<T, DomainError> {
        self.result(caller, resource, action, Some(id.to_string()), &result, |_| (String::new(), Value::Null)).await;
        result
    }

    /// Records that the service itself read a secret of `tenant`'s resource for its own work
    /// (`details` says which; never its value).
    pub async fn service_read_secret(&self, tenant: &TenantId, resource: AuditResource, resource_id: String, details: Value) {
        let Ok(actor) = UserId::new(SERVICE_ACTOR) else { return };
        let service = Caller { tenant_id: tenant.clone(), user_id: actor, roles: Vec::new() };
        let read: Result<(), DomainError> = Ok(());
        self.result(&service, resource, AuditAction::ReadSecret, Some(resource_id), &read, |_| (String::new(), details)).await;
    }

    /// Records the result of an operation: a success (with the id `id_of` finds in it, or
    /// `known_id`) or a denial. Other failures changed nothing and are not audit records.
    pub async fn result<T>(
        &self,
        caller: &Caller,
        resource: AuditResource,
        action: AuditAction,
        known_id: Option<String>,
        result: &Result<T, DomainError>,
        describe: impl FnOnce(&T) -> (String, Value),
    ) {
        let (outcome, resource_id, details) = match result {
            Ok(value) => {
                let (id, details) = describe(value);
                (AuditOutcome::Succeeded, known_id.unwrap_or(id), details)
            }
            Err(DomainError::Forbidden(reason)) => {
                (AuditOutcome::Denied, known_id.unwrap_or_default(), serde_json::json!({ "reason": reason }))
            }
            Err(_) => return,
        };
        let record = AuditRecord {
            id: self.ids.new_uuid(),
            at: self.clock.now(),
            tenant_id: caller.tenant_id.clone(),
            actor_id: caller.user_id.clone(),
            resource,
            action,
            resource_id,
            outcome,
            details,
            request_id: None,
        };
        self.log.record(record).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;
    use crate::services::block_on;

    fn caller() -> Caller {
        Caller { tenant_id: TenantId::new("t1").unwrap(), user_id: UserId::new("alice").unwrap(), roles: vec![Role::Viewer] }
    }

    struct Fixed;
    impl crate::Clock for Fixed {
        fn now(&self) -> OffsetDateTime {
            OffsetDateTime::UNIX_EPOCH
        }
    }

    #[test]
    fn successes_and_denials_are_recorded_other_failures_are_not() {
        let mut log = MockAuditLog::new();
        log.expect_record()
            .withf(|r| r.outcome == AuditOutcome::Succeeded && r.resource_id == "w1" && r.action_name() == "webhook.create")
            .times(1)
            .return_const(());
        log.expect_record().withf(|r| r.outcome == AuditOutcome::Denied && r.details["reason"] == "needs member").times(1).return_const(());
        let audit = Audit::new(Arc::new(log), Arc::new(Fixed));
        let ok: Result<&str, DomainError> = Ok("w1");
        block_on(audit.result(&caller(), AuditResource::Webhook, AuditAction::Create, None, &ok, |v| (v.to_string(), Value::Null)));
        let denied: Result<&str, DomainError> = Err(DomainError::Forbidden("needs member".into()));
        block_on(audit.result(&caller(), AuditResource::Webhook, AuditAction::Create, None, &denied, |_| unreachable!()));
        let invalid: Result<&str, DomainError> = Err(DomainError::invalid("url", "bad"));
        block_on(audit.result(&caller(), AuditResource::Webhook, AuditAction::Create, None, &invalid, |_| unreachable!()));
    }
}
