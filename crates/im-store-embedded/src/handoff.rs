//! Outbox events handed to this process's relay at commit, already claimed for it: the rows are
//! written with the relay's claim in the transaction of the change they record, and once that
//! commits the events go to the relay in memory. Its round then begins with the publish: no
//! claim, which is a write of its own on the writer thread, queued behind every other write
//! (under a steady load most of the time between a commit and the publish of its event).
//!
//! The claim is as any relay's: other relays (of this process or another on the same file)
//! leave the rows alone until it ends ([`OutboxHandoff::new`]'s lease); a process that stops
//! before publishing them leaves them to the others after that, as a relay that died in a round
//! does. Nothing is handed over beyond `capacity` events not yet done with, nor while paused
//! (the relay's publisher failed): such rows are written unclaimed, for the relay's rounds.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

/// An event handed over: its id, its JSON as written to the outbox (decoded by the relay, off
/// the writer thread), and the end of the relay's claim on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandedEvent {
    pub id: uuid::Uuid,
    pub body: String,
    /// Unix milliseconds; after this another relay may take the row, so the relay publishes
    /// only while enough of the claim is left ([`HandedEvent::claim_left_ms`]).
    pub claimed_until_ms: i64,
}

impl HandedEvent {
    /// What is left of the relay's claim on the row, in milliseconds (negative: it ended).
    pub fn claim_left_ms(&self) -> i64 {
        self.claimed_until_ms.saturating_sub(now_ms())
    }
}

/// Where the events handed over go, on the writer thread (it must not block).
pub type HandoffSink = Box<dyn Fn(Vec<HandedEvent>) + Send + Sync>;

/// This process's relay, as the store hands it events ([`crate::EmbeddedStore::hand_off_events`]).
pub struct OutboxHandoff {
    /// The relay's name in its claims.
    owner: String,
    lease_ms: i64,
    /// Events that may still be handed over before the relay is done with some.
    room: AtomicUsize,
    /// Nothing is handed over before this (unix milliseconds).
    paused_until_ms: AtomicI64,
    sink: HandoffSink,
}

impl std::fmt::Debug for OutboxHandoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxHandoff").field("owner", &self.owner).field("room", &self.room).finish_non_exhaustive()
    }
}

pub(crate) fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl OutboxHandoff {
    /// Events are handed to `sink`, claimed for `owner` for `lease` (longer than a publish
    /// takes), at most `capacity` of them not yet done with ([`OutboxHandoff::done`]).
    pub fn new(owner: impl Into<String>, lease: Duration, capacity: usize, sink: HandoffSink) -> Self {
        Self {
            owner: owner.into(),
            lease_ms: i64::try_from(lease.as_millis()).unwrap_or(i64::MAX),
            room: AtomicUsize::new(capacity),
            paused_until_ms: AtomicI64::new(0),
            sink,
        }
    }

    /// The relay's name in the claims of the rows handed over.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The relay is done with `count` events handed over (published, or given back to the
    /// outbox): as many more may be.
    pub fn done(&self, count: usize) {
        self.room.fetch_add(count, Ordering::AcqRel);
    }

    /// Hands nothing over for `wait` (from now; a longer pause already set stays): the relay's
    /// publisher is failing, and events go the relay's usual way, with its backoff.
    pub fn pause_for(&self, wait: Duration) {
        let until = now_ms().saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
        self.paused_until_ms.fetch_max(until, Ordering::AcqRel);
    }

    /// Takes the room of one event, if there is room and no pause: then it is handed over,
    /// claimed until the returned time.
    pub(crate) fn reserve(&self, now_ms: i64) -> Option<i64> {
        if now_ms < self.paused_until_ms.load(Ordering::Acquire) {
            return None;
        }
        self.room.fetch_update(Ordering::AcqRel, Ordering::Acquire, |room| room.checked_sub(1)).ok()?;
        Some(now_ms.saturating_add(self.lease_ms))
    }
}

/// The events the writer thread's group under way handed over so far.
#[derive(Default)]
struct Handed {
    to: Option<Arc<OutboxHandoff>>,
    events: Vec<HandedEvent>,
    /// Where the events of the write under way begin in `events`.
    write_began: usize,
}

impl Handed {
    /// Drops the events from `from` on, giving their room back.
    fn drop_from(&mut self, from: usize) {
        let dropped = self.events.len().saturating_sub(from);
        self.events.truncate(from);
        if dropped > 0
            && let Some(to) = &self.to
        {
            to.done(dropped);
        }
    }
}

thread_local! {
    static HANDED: RefCell<Handed> = RefCell::default();
}

/// On the writer thread, in a write: `event` was written claimed for `to` (its room taken).
pub(crate) fn note(to: &Arc<OutboxHandoff>, event: HandedEvent) {
    HANDED.with_borrow_mut(|handed| {
        if handed.to.is_none() {
            handed.to = Some(to.clone());
        }
        handed.events.push(event);
    });
}

/// The write under way ended: what it handed over stays with its group if it succeeded; a
/// write that failed wrote none of it.
pub(crate) fn write_ended(succeeded: bool) {
    HANDED.with_borrow_mut(|handed| {
        if !succeeded {
            handed.drop_from(handed.write_began);
        }
        handed.write_began = handed.events.len();
    });
}

/// The group ended: when it committed, its events go to the relay; else none of it was written.
pub(crate) fn group_ended(committed: bool) {
    // Taken out of the thread's state before the sink sees them: it runs with nothing borrowed.
    let committed_events = HANDED.with_borrow_mut(|handed| {
        if !committed {
            handed.drop_from(0);
        }
        handed.write_began = 0;
        if handed.events.is_empty() { None } else { Some((handed.to.clone()?, std::mem::take(&mut handed.events))) }
    });
    if let Some((to, events)) = committed_events {
        (to.sink)(events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn event() -> HandedEvent {
        HandedEvent { id: uuid::Uuid::new_v4(), body: "{}".to_owned(), claimed_until_ms: now_ms() + 30_000 }
    }

    #[test]
    fn room_and_pause_bound_what_is_handed_over() {
        let handoff = OutboxHandoff::new("relay", Duration::from_secs(30), 2, Box::new(|_| {}));
        let now = now_ms();
        assert_eq!(handoff.reserve(now), Some(now + 30_000));
        assert!(handoff.reserve(now).is_some());
        assert_eq!(handoff.reserve(now), None, "no room left");
        handoff.done(1);
        assert!(handoff.reserve(now).is_some(), "room given back");
        handoff.done(2);
        handoff.pause_for(Duration::from_secs(60));
        assert_eq!(handoff.reserve(now_ms()), None, "paused");
        assert!(handoff.reserve(now_ms() + 61_000).is_some(), "the pause ended");
    }

    #[test]
    fn only_what_a_committed_group_wrote_reaches_the_relay() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        let to = Arc::new(OutboxHandoff::new("relay", Duration::from_secs(30), 10, Box::new(move |e| sink.lock().unwrap().push(e))));
        let room = |to: &OutboxHandoff| to.room.load(Ordering::Acquire);
        let (kept, failed) = (event(), event());
        for e in [&kept, &failed] {
            to.reserve(now_ms()).unwrap();
            note(&to, e.clone());
            write_ended(e.id == kept.id);
        }
        assert_eq!(room(&to), 9, "the failed write's room is given back");
        group_ended(true);
        assert_eq!(*got.lock().unwrap(), vec![vec![kept]]);

        to.reserve(now_ms()).unwrap();
        note(&to, event());
        write_ended(true);
        group_ended(false);
        assert_eq!(got.lock().unwrap().len(), 1, "a group rolled back hands nothing over");
        assert_eq!(room(&to), 9);
    }
}
