use std::sync::Arc;

use crate::error::DomainError;
use crate::events::DomainEvent;
use crate::ports::{EventPublisher, Outbox};

/// How long a relay holds the events it took: longer than a publish takes; a relay that died
/// leaves its events to the others after this.
pub const CLAIM_LEASE: std::time::Duration = std::time::Duration::from_secs(30);

/// Failed tries after which an outbox entry becomes a dead letter, unless configured.
pub const DEFAULT_MAX_PUBLISH_ATTEMPTS: u32 = 10;

/// What one round of the relay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Entries claimed (readable or not): a full batch means more may wait.
    pub claimed: usize,
    /// Events published and marked.
    pub published: usize,
    /// Entries that became dead letters in this round.
    pub dead_letters: Vec<uuid::Uuid>,
}

/// Why events a relay already held were not published and marked ([`EventRelay::publish_claimed`]).
#[derive(Debug)]
pub enum ClaimedNotPublished {
    /// The publisher refused them; the holds were released to the next round of any relay.
    Refused(DomainError),
    /// Published, but not marked: still held, they are published again once the hold ends.
    NotMarked(DomainError),
    /// The publisher refused them (`refused`) and releasing the holds failed (`release`): still
    /// held, any relay takes them once the hold ends, unless they are released at a later try.
    NotReleased { refused: DomainError, release: DomainError },
}

/// Moves events from the outbox to the publisher: claim them (so that another instance's relay
/// leaves them alone), publish, and only once that is confirmed, mark them published. A crash
/// anywhere in between publishes again once the claim ends (at least once); nothing is ever lost.
///
/// An entry that cannot be read, or that the publisher refuses while it accepts other events,
/// has its failed try counted; after `max_attempts` it is a dead letter and blocks nothing. A
/// publisher that refuses everything is down: nothing is counted, the relay waits and retries.
#[derive(Clone)]
pub struct EventRelay {
    outbox: Arc<dyn Outbox>,
    publisher: Arc<dyn EventPublisher>,
    /// This relay's name in its claims.
    owner: String,
    max_attempts: u32,
}

impl std::fmt::Debug for EventRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRelay").field("max_attempts", &self.max_attempts).finish_non_exhaustive()
    }
}

impl EventRelay {
    pub fn new(outbox: Arc<dyn Outbox>, publisher: Arc<dyn EventPublisher>) -> Self {
        Self { outbox, publisher, owner: uuid::Uuid::new_v4().to_string(), max_attempts: DEFAULT_MAX_PUBLISH_ATTEMPTS }
    }

    /// Another relay on the same outbox and publisher, with a name of its own: its rounds
    /// claim other events than this one's, so both may have a round under way at once (as the
    /// relays of two instances do).
    #[must_use]
    pub fn lane(&self) -> Self {
        Self { owner: uuid::Uuid::new_v4().to_string(), ..self.clone() }
    }

    /// Failed tries (at least 1) after which an entry becomes a dead letter.
    #[must_use]
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// Relays up to `batch` pending entries: how many events were published, and which
    /// entries became dead letters.
    ///
    /// # Errors
    /// When the outbox cannot be read or the publisher accepts none of the events; nothing is
    /// marked or counted then.
    pub async fn relay_once(&self, batch: u32) -> Result<Relayed, DomainError> {
        let claimed = self.outbox.claim(&self.owner, batch, CLAIM_LEASE).await?;
        let mut round = Relayed { claimed: claimed.events.len() + claimed.unreadable.len(), ..Relayed::default() };
        for entry in &claimed.unreadable {
            self.failed(entry.id, &format!("the entry cannot be read: {}", entry.reason), &mut round).await?;
        }
        let events = claimed.events;
        if events.is_empty() {
            return Ok(round);
        }
        let batch_error = match self.publisher.publish(&events).await {
            Ok(()) => {
                let ids: Vec<_> = events.iter().map(|e| e.id).collect();
                self.outbox.mark_published(&ids).await?;
                round.published = ids.len();
                return Ok(round);
            }
            Err(e) => e,
        };
        // Find the events the publisher refuses: each alone, in order (a batch that failed
        // half-way may have published some already: at least once).
        let mut published = Vec::new();
        let mut refused = Vec::new();
        for event in &events {
            match self.publisher.publish(std::slice::from_ref(event)).await {
                Ok(()) => published.push(event.id),
                Err(e) => refused.push((event.id, e)),
            }
        }
        if published.is_empty() {
            return Err(batch_error);
        }
        self.outbox.mark_published(&published).await?;
        round.published = published.len();
        for (id, error) in refused {
            self.failed(id, &format!("the publisher refused it: {error}"), &mut round).await?;
        }
        Ok(round)
    }

    /// This relay's name in its claims.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Publishes events this relay already holds (a store claimed them for it in the write
    /// that recorded them, and handed them over at commit), then marks them published.
    ///
    /// # Errors
    /// [`ClaimedNotPublished::Refused`] when the publisher refuses the batch: the holds are
    /// released first, so that the next round of any relay takes the events, counts the failed
    /// tries of those refused for good, and backs off while the publisher is down;
    /// [`ClaimedNotPublished::NotReleased`] when that release failed (the holds end with their
    /// lease, unless the caller releases them at a later try).
    /// [`ClaimedNotPublished::NotMarked`] when they were published but marking them failed: they
    /// stay held and are published again once the hold ends (at least once).
    pub async fn publish_claimed(&self, events: &[DomainEvent]) -> Result<(), ClaimedNotPublished> {
        let ids: Vec<_> = events.iter().map(|e| e.id).collect();
        if let Err(refused) = self.publisher.publish(events).await {
            // A release that fails leaves the holds to end on their own: nothing is lost.
            return Err(match self.outbox.release(&self.owner, &ids).await {
                Ok(()) => ClaimedNotPublished::Refused(refused),
                Err(release) => ClaimedNotPublished::NotReleased { refused, release },
            });
        }
        self.outbox.mark_published(&ids).await.map_err(ClaimedNotPublished::NotMarked)
    }

    async fn failed(&self, id: uuid::Uuid, reason: &str, round: &mut Relayed) -> Result<(), DomainError> {
        if self.outbox.record_failure(id, reason, self.max_attempts).await? {
            round.dead_letters.push(id);
        }
        Ok(())
    }

    pub fn outbox(&self) -> &Arc<dyn Outbox> {
        &self.outbox
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TenantId;
    use crate::events::{Claimed, DomainEvent, EventType, UnreadableEntry};
    use crate::ports::{MockEventPublisher, MockOutbox};
    use crate::services::block_on;

    fn event() -> DomainEvent {
        DomainEvent {
            id: uuid::Uuid::new_v4(),
            event_type: EventType::IntegrationCreated,
            tenant_id: TenantId::new("t").unwrap(),
            subject: "s".into(),
            time: time::OffsetDateTime::UNIX_EPOCH,
            data: serde_json::json!({}).into(),
        }
    }

    #[test]
    fn nothing_is_marked_when_publishing_fails() {
        let mut outbox = MockOutbox::new();
        let events = vec![event(), event()];
        let returned = events.clone();
        outbox.expect_claim().returning(move |_, _, _| Ok(Claimed { events: returned.clone(), unreadable: vec![] }));
        outbox.expect_mark_published().never();
        let mut publisher = MockEventPublisher::new();
        publisher.expect_publish().returning(|_| Err(DomainError::unavailable("broker down")));
        let relay = EventRelay::new(Arc::new(outbox), Arc::new(publisher));
        let result = block_on(relay.relay_once(10));
        assert!(matches!(result, Err(DomainError::Unavailable { .. })));
    }

    #[test]
    fn published_events_are_marked() {
        let mut outbox = MockOutbox::new();
        let events = vec![event(), event()];
        let ids: Vec<_> = events.iter().map(|e| e.id).collect();
        let returned = events.clone();
        outbox.expect_claim().returning(move |_, _, _| Ok(Claimed { events: returned.clone(), unreadable: vec![] }));
        outbox.expect_mark_published().withf(move |marked| marked == ids.as_slice()).times(1).returning(|_| Ok(()));
        let mut publisher = MockEventPublisher::new();
        publisher.expect_publish().withf(move |published| published == events.as_slice()).times(1).returning(|_| Ok(()));
        let relay = EventRelay::new(Arc::new(outbox), Arc::new(publisher));
        assert_eq!(block_on(relay.relay_once(10)).unwrap().published, 2);
    }

    #[test]
    fn events_handed_over_claimed_are_published_and_marked_without_a_claim() {
        let events = vec![event(), event()];
        let ids: Vec<_> = events.iter().map(|e| e.id).collect();
        let mut outbox = MockOutbox::new();
        outbox.expect_claim().never();
        outbox.expect_release().never();
        outbox.expect_mark_published().withf(move |marked| marked == ids.as_slice()).times(1).returning(|_| Ok(()));
        let mut publisher = MockEventPublisher::new();
        let published = events.clone();
        publisher.expect_publish().withf(move |batch| batch == published.as_slice()).times(1).returning(|_| Ok(()));
        let relay = EventRelay::new(Arc::new(outbox), Arc::new(publisher));
        block_on(relay.publish_claimed(&events)).unwrap();
    }

    #[test]
    fn events_handed_over_that_fail_to_publish_are_released_to_any_relay() {
        let events = vec![event(), event()];
        let ids: Vec<_> = events.iter().map(|e| e.id).collect();
        let mut outbox = MockOutbox::new();
        let relay_owner = Arc::new(std::sync::Mutex::new(String::new()));
        let seen = relay_owner.clone();
        outbox.expect_release().withf(move |_, released| released == ids.as_slice()).times(1).returning(move |owner, _| {
            *seen.lock().unwrap() = owner.to_owned();
            Ok(())
        });
        outbox.expect_mark_published().never();
        let mut publisher = MockEventPublisher::new();
        publisher.expect_publish().returning(|_| Err(DomainError::unavailable("broker down")));
        let relay = EventRelay::new(Arc::new(outbox), Arc::new(publisher));
        assert!(matches!(block_on(relay.publish_claimed(&events)), Err(ClaimedNotPublished::Refused(DomainError::Unavailable { .. }))));
        assert_eq!(*relay_owner.lock().unwrap(), relay.owner(), "the relay's own holds");
    }

    #[test]
    fn events_handed_over_refused_and_not_released_say_so() {
        let events = vec![event()];
        let mut outbox = MockOutbox::new();
        outbox.expect_release().times(1).returning(|_, _| Err(DomainError::unavailable("store busy")));
        outbox.expect_mark_published().never();
        let mut publisher = MockEventPublisher::new();
        publisher.expect_publish().returning(|_| Err(DomainError::unavailable("broker down")));
        let relay = EventRelay::new(Arc::new(outbox), Arc::new(publisher));
        let outcome = block_on(relay.publish_claimed(&events));
        assert!(matches!(outcome, Err(ClaimedNotPublished::NotReleased { .. })), "{outcome:?}");
    }

    #[test]
    fn events_handed_over_published_but_not_marked_stay_held() {
        let events = vec![event()];
        let mut outbox = MockOutbox::new();
        outbox.expect_release().never();
        outbox.expect_mark_published().times(1).returning(|_| Err(DomainError::unavailable("store down")));
        let mut publisher = MockEventPublisher::new();
        publisher.expect_publish().times(1).returning(|_| Ok(()));
        let relay = EventRelay::new(Arc::new(outbox), Arc::new(publisher));
        let outcome = block_on(relay.publish_claimed(&events));
        assert!(matches!(outcome, Err(ClaimedNotPublished::NotMarked(DomainError::Unavailable { .. }))), "{outcome:?}");
    }

    fn claimed(events: &[DomainEvent], unreadable: &[uuid::Uuid]) -> Claimed {
        Claimed {
            events: events.to_vec(),
            unreadable: unreadable.iter().map(|id| UnreadableEntry { id: *id, reason: "expected struct DomainEvent".into() }).collect(),
        }
    }

    #[test]
    fn an_unreadable_entry_is_counted_and_blocks_no_later_event() {
        let good = vec![event(), event()];
        let poison = uuid::Uuid::new_v4();
        let ids: Vec<_> = good.iter().map(|e| e.id).collect();
        let mut outbox = MockOutbox::new();
        let returned = claimed(&good, &[poison]);
        outbox.expect_claim().returning(move |_, _, _| Ok(returned.clone()));
        outbox
            .expect_record_failure()
            .withf(move |id, reason, max| *id == poison && reason.contains("cannot be read") && *max == 3)
            .times(1)
            .returning(|_, _, _| Ok(true));
        outbox.expect_mark_published().withf(move |marked| marked == ids.as_slice()).times(1).returning(|_| Ok(()));
        let mut publisher = MockEventPublisher::new();
        publisher.expect_publish().times(1).returning(|_| Ok(()));
        let relay = EventRelay::new(Arc::new(outbox), Arc::new(publisher)).with_max_attempts(3);
        let round = block_on(relay.relay_once(10)).unwrap();
        assert_eq!(round, Relayed { claimed: 3, published: 2, dead_letters: vec![poison] });
    }

    #[test]
    fn an_event_the_publisher_refuses_alone_is_counted_and_the_others_are_published() {
        let events = vec![event(), event(), event()];
        let poison = events[1].id;
        let others = vec![events[0].id, events[2].id];
        let mut outbox = MockOutbox::new();
        let returned = claimed(&events, &[]);
        outbox.expect_claim().returning(move |_, _, _| Ok(returned.clone()));
        outbox.expect_mark_published().withf(move |marked| marked == others.as_slice()).times(1).returning(|_| Ok(()));
        outbox
            .expect_record_failure()
            .withf(move |id, reason, max| *id == poison && reason.contains("refused") && *max == DEFAULT_MAX_PUBLISH_ATTEMPTS)
            .times(1)
            .returning(|_, _, _| Ok(false));
        let mut publisher = MockEventPublisher::new();
        publisher
            .expect_publish()
            .returning(move |batch| if batch.iter().any(|e| e.id == poison) { Err(DomainError::unavailable("too large")) } else { Ok(()) });
        let relay = EventRelay::new(Arc::new(outbox), Arc::new(publisher));
        let round = block_on(relay.relay_once(10)).unwrap();
        assert_eq!(round, Relayed { claimed: 3, published: 2, dead_letters: vec![] });
    }

    #[test]
    fn a_publisher_that_refuses_everything_is_down_and_nothing_is_counted() {
        let mut outbox = MockOutbox::new();
        let returned = claimed(&[event(), event()], &[]);
        outbox.expect_claim().returning(move |_, _, _| Ok(returned.clone()));
        outbox.expect_mark_published().never();
        outbox.expect_record_failure().never();
        let mut publisher = MockEventPublisher::new();
        publisher.expect_publish().times(3).returning(|_| Err(DomainError::unavailable("broker down")));
        let relay = EventRelay::new(Arc::new(outbox), Arc::new(publisher)).with_max_attempts(1);
        assert!(matches!(block_on(relay.relay_once(10)), Err(DomainError::Unavailable { .. })));
    }
}
