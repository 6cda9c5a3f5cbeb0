//! Audit records: who did what to which resource, with what outcome. The services record every
//! state change of every resource and every denied access through the [`AuditLog`] port.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use time::OffsetDateTime;

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
}

impl AuditRecord {
    /// `integration.create`.
    pub fn action_name(&self) -> String {
        format!("{}.{}", self.resource.as_str(), self.action.as_str())
    }
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

/// What the services hold: the port, and the rule of which results are recorded.
#[derive(Clone)]
pub struct Audit {
    log: Arc<dyn AuditLog>,
    clock: Arc<dyn crate::Clock>,
}

impl fmt::Debug for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Audit").finish_non_exhaustive()
    }
}

impl Audit {
    pub fn new(log: Arc<dyn AuditLog>, clock: Arc<dyn crate::Clock>) -> Self {
        Self { log, clock }
    }

    /// An audit that keeps nothing, for tests of the services.
    #[cfg(any(test, feature = "test-support"))]
    pub fn discarding() -> Self {
        struct Discard;
        #[async_trait]
        impl AuditLog for Discard {
            async fn record(&self, _: AuditRecord) {}
        }
        Self { log: Arc::new(Discard), clock: Arc::new(crate::SystemClock) }
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
            at: self.clock.now(),
            tenant_id: caller.tenant_id.clone(),
            actor_id: caller.user_id.clone(),
            resource,
            action,
            resource_id,
            outcome,
            details,
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
