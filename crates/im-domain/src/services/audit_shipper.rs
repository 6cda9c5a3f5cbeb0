use std::sync::Arc;

use crate::audit::{AuditBuffer, AuditEntry, AuditSink};
use crate::error::DomainError;

/// How long a shipper holds the entries it took: longer than a send takes (the adapter's
/// retries included); a shipper that died leaves its entries to the others after this.
pub const AUDIT_CLAIM_LEASE: std::time::Duration = std::time::Duration::from_secs(60);

/// What one round of the shipper did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shipped {
    /// Entries claimed: a full batch means more may wait.
    pub claimed: usize,
    /// Entries the Logging Service acknowledged (deleted from the buffer).
    pub sent: usize,
    /// Entries it refused even alone: handed back to the caller to be logged, then deleted.
    pub refused: Vec<AuditEntry>,
}

/// Moves audit records from the store's buffer to the Logging Service: claim a batch (so another
/// instance's shipper leaves it alone), send it, and only once it is acknowledged delete it. A
/// crash or an outage anywhere in between sends the batch again later (at least once; the
/// service drops duplicates by record id); nothing is lost.
///
/// A batch the service refuses as invalid is sent again one entry at a time; an entry refused
/// alone cannot ever be accepted: it is returned (the caller writes it to its log) and deleted,
/// so it blocks nothing. A service that is down refuses nothing: the round fails, the entries
/// stay held by this shipper and it sends them again on its next round.
#[derive(Clone)]
pub struct AuditShipper {
    buffer: Arc<dyn AuditBuffer>,
    sink: Arc<dyn AuditSink>,
    owner: String,
}

impl std::fmt::Debug for AuditShipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditShipper").field("owner", &self.owner).finish_non_exhaustive()
    }
}

impl AuditShipper {
    pub fn new(buffer: Arc<dyn AuditBuffer>, sink: Arc<dyn AuditSink>) -> Self {
        Self { buffer, sink, owner: uuid::Uuid::new_v4().to_string() }
    }

    pub fn buffer(&self) -> &Arc<dyn AuditBuffer> {
        &self.buffer
    }

    /// Ships up to `batch` entries.
    ///
    /// # Errors
    /// When the buffer cannot be read or the service accepts nothing; nothing is deleted then.
    pub async fn ship_once(&self, batch: u32) -> Result<Shipped, DomainError> {
        let entries = self.buffer.claim(&self.owner, batch, AUDIT_CLAIM_LEASE).await?;
        let mut round = Shipped { claimed: entries.len(), ..Shipped::default() };
        if entries.is_empty() {
            return Ok(round);
        }
        match self.sink.send(&entries).await {
            Ok(()) => {
                let ids: Vec<_> = entries.iter().map(|e| e.id).collect();
                self.buffer.acknowledge(&ids).await?;
                round.sent = ids.len();
                return Ok(round);
            }
            Err(DomainError::Validation(_)) => {}
            Err(e) => return Err(e),
        }
        // The service refuses something in the batch: find what, one entry at a time.
        let mut done = Vec::new();
        for entry in entries {
            match self.sink.send(std::slice::from_ref(&entry)).await {
                Ok(()) => {
                    done.push(entry.id);
                    round.sent += 1;
                }
                Err(DomainError::Validation(_)) => {
                    done.push(entry.id);
                    round.refused.push(entry);
                }
                Err(e) => {
                    self.buffer.acknowledge(&done).await?;
                    return Err(e);
                }
            }
        }
        self.buffer.acknowledge(&done).await?;
        Ok(round)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{MockAuditBuffer, MockAuditSink};
    use crate::services::block_on;

    fn entry() -> AuditEntry {
        AuditEntry {
            id: uuid::Uuid::now_v7(),
            timestamp: time::OffsetDateTime::UNIX_EPOCH,
            tenant_id: "t".into(),
            actor_id: "u".into(),
            action: "integration.create".into(),
            resource_type: "integration".into(),
            resource_id: "i".into(),
            outcome: "succeeded".into(),
            request_id: None,
            details: serde_json::Value::Null,
        }
    }

    fn buffer_with(entries: Vec<AuditEntry>) -> MockAuditBuffer {
        let mut buffer = MockAuditBuffer::new();
        buffer.expect_claim().returning(move |_, _, _| Ok(entries.clone()));
        buffer
    }

    #[test]
    fn nothing_is_deleted_while_the_service_is_down() {
        let mut buffer = buffer_with(vec![entry(), entry()]);
        buffer.expect_acknowledge().never();
        let mut sink = MockAuditSink::new();
        sink.expect_send().times(1).returning(|_| Err(DomainError::unavailable("down")));
        let result = block_on(AuditShipper::new(Arc::new(buffer), Arc::new(sink)).ship_once(10));
        assert!(matches!(result, Err(DomainError::Unavailable { .. })), "{result:?}");
    }

    #[test]
    fn an_acknowledged_batch_is_deleted() {
        let entries = vec![entry(), entry()];
        let ids: Vec<_> = entries.iter().map(|e| e.id).collect();
        let mut buffer = buffer_with(entries.clone());
        buffer.expect_acknowledge().withf(move |acked| acked == ids.as_slice()).times(1).returning(|_| Ok(()));
        let mut sink = MockAuditSink::new();
        sink.expect_send().withf(move |sent| sent == entries.as_slice()).times(1).returning(|_| Ok(()));
        let round = block_on(AuditShipper::new(Arc::new(buffer), Arc::new(sink)).ship_once(10)).unwrap();
        assert_eq!((round.claimed, round.sent), (2, 2));
    }

    #[test]
    fn an_entry_refused_alone_is_handed_back_and_blocks_nothing() {
        let entries = vec![entry(), entry(), entry()];
        let poison = entries[1].clone();
        let all: Vec<_> = entries.iter().map(|e| e.id).collect();
        let mut buffer = buffer_with(entries);
        buffer.expect_acknowledge().withf(move |acked| acked == all.as_slice()).times(1).returning(|_| Ok(()));
        let mut sink = MockAuditSink::new();
        let poison_id = poison.id;
        sink.expect_send()
            .returning(move |sent| if sent.iter().any(|e| e.id == poison_id) { Err(DomainError::invalid("[0]", "bad")) } else { Ok(()) });
        let round = block_on(AuditShipper::new(Arc::new(buffer), Arc::new(sink)).ship_once(10)).unwrap();
        assert_eq!((round.sent, round.refused), (2, vec![poison]));
    }

    #[test]
    fn an_outage_while_sending_one_by_one_keeps_the_rest() {
        let entries = vec![entry(), entry()];
        let first = vec![entries[0].id];
        let mut buffer = buffer_with(entries);
        buffer.expect_acknowledge().withf(move |acked| acked == first.as_slice()).times(1).returning(|_| Ok(()));
        let mut sink = MockAuditSink::new();
        let mut calls = 0;
        sink.expect_send().returning(move |_| {
            calls += 1;
            match calls {
                1 => Err(DomainError::invalid("[1]", "bad")),
                2 => Ok(()),
                _ => Err(DomainError::unavailable("down")),
            }
        });
        let result = block_on(AuditShipper::new(Arc::new(buffer), Arc::new(sink)).ship_once(10));
        assert!(matches!(result, Err(DomainError::Unavailable { .. })), "{result:?}");
    }
}
