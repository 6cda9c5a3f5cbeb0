//! Administration of the outbox: the dead letters the relay set aside, and putting them back.

use std::sync::Arc;

use crate::audit::{Audit, AuditAction, AuditResource};
use crate::auth::{Caller, Role};
use crate::common::{Page, PageRequest};
use crate::error::DomainError;
use crate::events::DeadLetter;
use crate::ports::Outbox;

/// Lists and requeues dead letters; administrators only (the outbox is the whole service's,
/// across tenants), every requeue and every denial audited.
#[derive(Clone)]
pub struct OutboxAdmin {
    outbox: Arc<dyn Outbox>,
    audit: Audit,
}

impl std::fmt::Debug for OutboxAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxAdmin").finish_non_exhaustive()
    }
}

impl OutboxAdmin {
    pub fn new(outbox: Arc<dyn Outbox>, audit: Audit) -> Self {
        Self { outbox, audit }
    }

    /// # Errors
    /// `Forbidden` without the admin role (audited); `Validation` of `continuationToken`.
    pub async fn dead_letters(&self, caller: &Caller, page: &PageRequest) -> Result<Page<DeadLetter>, DomainError> {
        self.audit.require(caller, Role::Admin, AuditResource::OutboxEvent, AuditAction::List).await?;
        self.outbox.dead_letters(page).await
    }

    /// Puts a dead letter back in its place among the pending events.
    ///
    /// # Errors
    /// `Forbidden` without the admin role; `NotFound` when `id` is no dead letter.
    pub async fn requeue(&self, caller: &Caller, id: uuid::Uuid) -> Result<(), DomainError> {
        let result = match caller.require(Role::Admin) {
            Ok(()) => self.outbox.requeue(id).await,
            Err(e) => Err(e),
        };
        self.audit.of(caller, AuditResource::OutboxEvent, AuditAction::Requeue, id, result).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TenantId;
    use crate::audit::{AuditOutcome, MockAuditLog};
    use crate::common::UserId;
    use crate::ports::MockOutbox;
    use crate::services::block_on;

    fn caller(role: Role) -> Caller {
        Caller { tenant_id: TenantId::new("t1").unwrap(), user_id: UserId::new("alice").unwrap(), roles: vec![role] }
    }

    #[test]
    fn only_admins_list_or_requeue_and_both_outcomes_are_audited() {
        let id = uuid::Uuid::new_v4();
        let mut outbox = MockOutbox::new();
        outbox.expect_requeue().withf(move |i| *i == id).times(1).returning(|_| Ok(()));
        outbox.expect_dead_letters().times(1).returning(|_| Ok(Page { items: vec![], continuation: None }));
        let mut log = MockAuditLog::new();
        log.expect_record()
            .withf(move |r| {
                r.outcome == AuditOutcome::Succeeded && r.action_name() == "outbox_event.requeue" && r.resource_id == id.to_string()
            })
            .times(1)
            .return_const(());
        log.expect_record().withf(|r| r.outcome == AuditOutcome::Denied).times(2).return_const(());
        let admin = OutboxAdmin::new(Arc::new(outbox), Audit::new(Arc::new(log), Arc::new(crate::SystemClock)));

        assert!(matches!(block_on(admin.requeue(&caller(Role::Member), id)), Err(DomainError::Forbidden(_))));
        assert!(matches!(block_on(admin.dead_letters(&caller(Role::Member), &PageRequest::first(10))), Err(DomainError::Forbidden(_))));
        block_on(admin.requeue(&caller(Role::Admin), id)).unwrap();
        block_on(admin.dead_letters(&caller(Role::Admin), &PageRequest::first(10))).unwrap();
    }
}
