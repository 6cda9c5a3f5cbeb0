//! Deliveries on the documents table (container `integration_webhook_deliveries`, partitioned
//! by tenant, expiring after 7 days) and the durable delivery queue (`delivery_jobs`).

use std::time::Duration;

use async_trait::async_trait;
use im_domain::events::{DomainEvent, str_member};
use im_domain::webhooks::delivery::{DELIVERY_TTL, Delivery, DeliveryFilter, DeliveryStatus};
use im_domain::webhooks::endpoint::{Webhook, WebhookId};
use im_domain::webhooks::ports::{DeliveryJob, DeliveryQueue, DeliveryRepository, JobAfter};
use im_domain::{DomainError, ETag, Page, PageRequest, Stored, TenantId};
use rusqlite::{Connection, params};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::containers::{WEBHOOK_DELIVERIES, WEBHOOK_PAYLOADS, WEBHOOKS};
use crate::db::{Db, map_sqlite};
use crate::documents::{Doc, Documents, Query, expiry, insert, new_etag, read_one};
use crate::support::{decode, encode};

const RESOURCE: &str = "delivery";

/// How much longer than the record that keeps it alive an event's payload kept apart lives
/// when it is written: longer than every delivery's retries last, so that an outcome (a
/// write within that time) finds the payload's expiry later than its record's and does not
/// write the payload's row again. A record written later than that moves the payload's expiry
/// with it ([`keep_payload_alive`]).
const PAYLOAD_SLACK: Duration = Duration::from_secs(3 * 24 * 3600);

/// The member that a delivery's record writes its payload in. A record is its `Delivery`
/// written out (`encode`): the first place this text is found is that member, for the members
/// before it are ids, names and a type, JSON strings in which a quote is always escaped.
const PAYLOAD_MEMBER: &str = ",\"payload\":";

/// The text a record stores when its event's payload is kept apart: its text `full` with
/// `null` in place of `payload`. Only an object is kept apart (a payload is a CloudEvents
/// document): a record that reads `null` there names its payload by its tenant and event id.
/// Also gives where the payload is in `full`.
fn without_payload(full: &str, payload: &str) -> Option<(String, std::ops::Range<usize>)> {
    if !payload.starts_with('{') {
        return None;
    }
    let at = full.find(PAYLOAD_MEMBER)? + PAYLOAD_MEMBER.len();
    full[at..].starts_with(payload).then(|| (spliced(full, at..at + payload.len(), "null"), at..at + payload.len()))
}

/// `text` with `with` in place of its bytes `at`.
fn spliced(text: &str, at: std::ops::Range<usize>, with: &str) -> String {
    let mut out = String::with_capacity(text.len() - at.len() + with.len());
    out.push_str(&text[..at.start]);
    out.push_str(with);
    out.push_str(&text[at.end..]);
    out
}

/// A record to be stored without its payload, kept apart for its event.
struct Apart {
    /// The event id: the payload's id in its tenant's partition.
    event: String,
    /// The record's text without the payload ([`without_payload`]).
    stored: String,
    /// Where the payload is in the record's full text.
    payload: std::ops::Range<usize>,
}

/// Where a stored record has `null` in place of a payload kept apart.
fn payload_left_out(body: &str) -> Option<usize> {
    let at = body.find(PAYLOAD_MEMBER)? + PAYLOAD_MEMBER.len();
    body[at..].starts_with("null,").then_some(at)
}

/// Puts back into each record of `docs` that was stored without its payload the payload kept
/// apart, read with `conn` (in the snapshot the records were read in, or the writer's
/// transaction): a record's payload lives at least as long as the record. A payload not found
/// (never, but for a bug) leaves the record's `null`, and is logged.
fn join_payloads(conn: &Connection, docs: &mut [Doc], now: i64) -> rusqlite::Result<()> {
    let mut read: HashMap<(String, String), Option<String>> = HashMap::new();
    for doc in docs {
        let Some(at) = payload_left_out(&doc.body) else { continue };
        let Some(event) = str_member(&doc.body, &["messageId"]) else { continue };
        let payload = match read.entry((doc.pk.clone(), event)) {
            Entry::Occupied(kept) => kept.into_mut(),
            Entry::Vacant(new) => {
                let (pk, event) = new.key().clone();
                let found = read_one(conn, WEBHOOK_PAYLOADS, pk, event, now)?.map(|payload| payload.body);
                new.insert(found)
            }
        };
        match payload {
            Some(payload) => doc.body = spliced(&doc.body, at..at + "null".len(), payload),
            None => tracing::error!(tenant = %doc.pk, delivery = %doc.id, "a delivery's payload kept apart is missing"),
        }
    }
    Ok(())
}

/// The expiry of a payload kept apart for a record that expires at `record` (unix seconds).
fn payload_expiry(record: i64) -> i64 {
    expiry(record, Some(PAYLOAD_SLACK)).unwrap_or(i64::MAX)
}

/// Keeps `payload`, the payload of event `event` of tenant `pk`, apart for the records of its
/// deliveries, the first of which expires at `record`: true when it is kept (written now, or
/// the same text already there, kept alive as long as that record); false when another text
/// is kept under that event id (the record then keeps its payload itself).
fn keep_payload(tx: &Connection, pk: &str, event: &str, payload: &str, record: i64, now: i64) -> Result<bool, DomainError> {
    match insert(tx, WEBHOOK_PAYLOADS, pk, event, payload, Some(payload_expiry(record)), None, now, new_etag()) {
        Ok(_) => Ok(true),
        Err(DomainError::Conflict(_)) => {
            let kept = read_one(tx, WEBHOOK_PAYLOADS, pk.to_owned(), event.to_owned(), now).map_err(map_sqlite)?;
            if kept.is_some_and(|kept| kept.body == payload) {
                keep_payload_alive(tx, pk, event, record)?;
                Ok(true)
            } else {
                Ok(false)
            }
        }
        Err(e) => Err(e),
    }
}

/// Keeps the payload kept apart for event `event` of tenant `pk`, if there is one, at least as
/// long as a record that expires at `record`: when it would expire before, its expiry moves to
/// [`payload_expiry`] of it. One read of the key's index when it would not (an outcome's
/// write, mostly).
fn keep_payload_alive(tx: &Connection, pk: &str, event: &str, record: i64) -> Result<(), DomainError> {
    tx.prepare_cached("UPDATE documents SET expires_at = ?5 WHERE container = +?1 AND pk = ?2 AND id = ?3 AND expires_at < ?4")
        .and_then(|mut s| s.execute(params![WEBHOOK_PAYLOADS, pk, event, record, payload_expiry(record)]))
        .map_err(map_sqlite)
        .map(|changed| {
            if changed > 0 {
                crate::group_reads::changed(Some(WEBHOOK_PAYLOADS));
            }
        })
}

/// For a replace of `delivery` (`Documents::replace_then`): the text its record stores, chosen
/// in the writer's transaction (without its payload when the same payload is kept apart for
/// its event, else in full), and what then keeps that payload alive as long as the record.
#[allow(clippy::type_complexity)]
fn stored_with_payload(
    delivery: &Delivery,
) -> Result<
    (
        impl FnOnce(&Connection, i64) -> Result<String, DomainError> + Send + 'static,
        impl FnOnce(&Connection, i64) -> Result<(), DomainError> + Send + 'static,
    ),
    DomainError,
> {
    let full = encode(delivery)?;
    let apart = without_payload(&full, delivery.payload.as_str());
    let (pk, event) = (delivery.tenant_id.to_string(), delivery.message_id.clone());
    let alive = apart.as_ref().map(|_| (pk.clone(), event.clone()));
    let body = move |tx: &Connection, now: i64| match apart {
        Some((stored, payload)) => {
            let kept = read_one(tx, WEBHOOK_PAYLOADS, pk, event, now).map_err(map_sqlite)?;
            Ok(if kept.is_some_and(|kept| kept.body == full[payload]) { stored } else { full })
        }
        None => Ok(full),
    };
    let then = move |tx: &Connection, now: i64| match alive {
        Some((pk, event)) => keep_payload_alive(tx, &pk, &event, expiry(now, Some(DELIVERY_TTL)).unwrap_or(i64::MAX)),
        None => Ok(()),
    };
    Ok((body, then))
}

/// Records of the deliveries whose first attempts come next, each handed to the next
/// `get_for_attempt` of its delivery (the attempts' reads; the API's `get` reads the database):
/// with the embedded queue, the records of the jobs the take just leased, read in the take's
/// own transaction on the writer (whose page cache holds them: it wrote them moments ago); with
/// a queue elsewhere (RabbitMQ), the records the fan-out just created, as written. The attempt
/// that follows reads its delivery first; without this, that read is a read transaction of its
/// own on a reader whose cache every commit empties (a fifth of the service's time when
/// delivering at saturation).
///
/// What an attempt is handed is what that transaction wrote or saw: any later write of the
/// delivery through [`SqliteDeliveries`] forgets the record first, and the job's lease (the
/// embedded queue, whose one consumer is this process) keeps other workers off it. With a
/// queue elsewhere, another instance may attempt the delivery meanwhile: a scheduled attempt's
/// first write (its hold, or the skip) is conditional on the handed version, so it fails and
/// the attempt reads the delivery again from the database (manual attempts, which send
/// before they write, are never handed records). A record handed late therefore costs at
/// most that failed write and a read, and may wait longer than a job usually waits behind a
/// backlog in a broker's queue (`make bench`, ten endpoints at saturation with RabbitMQ: from
/// commit to receipt 0.53 to 0.68 s at the median, 0.88 to 1.17 s at p99): up to
/// [`RECORD_MAX_AGE`]. Bounded: past [`LEASED_RECORDS_MAX`] waiting
/// records (or [`LEASED_RECORD_BYTES_MAX`] of their text) those older than that are dropped and
/// no more are kept until there is room (before, past 4,096 all were dropped); the others'
/// attempts read the database.
///
/// The endpoints of those deliveries are read in the same transaction too, and each handed to
/// as many `get`s of the endpoint as the transaction leased or created deliveries of it (the
/// attempts read their endpoint next). An endpoint changed after that transaction is seen by an
/// attempt as it was then, as if the attempt had read it then: a write through
/// [`SqliteWebhooks`] forgets it, before and after writing, and one not taken within
/// [`WEBHOOK_MAX_AGE`] is dropped. (Nothing later checks that an endpoint is current, as the
/// hold does for a record: so an endpoint is kept a shorter while.)
///
/// [`SqliteWebhooks`]: crate::webhooks::SqliteWebhooks
#[derive(Default)]
pub(crate) struct LeasedRecords {
    /// Records are read only once deliveries are kept in this database with their queue.
    enabled: AtomicBool,
    /// Records by delivery id, with when they were read or written.
    records: Mutex<Waiting>,
    /// Endpoints by (tenant, id).
    webhooks: Mutex<HashMap<(String, String), LeasedWebhook>>,
    /// Jobs leased as they were queued, for the next takes.
    handoff: Mutex<Handoff>,
}

/// The jobs of new deliveries that the fan-out leases in the transaction that queues them, for
/// this process's dispatcher to take without a write of its own: one commit less between an
/// event and its first attempt, one write less a delivery. (The embedded queue has one
/// consumer, this process: [`crate::EmbeddedStore::release_delivery_leases`].) Only as many
/// as the last take asked for and did not get (the dispatcher's free attempts then), and only
/// while takes come (the last within [`HANDOFF_IDLE_MS`]): a job does not wait here for a
/// dispatcher that is busy or gone. A job handed out has its lease as fresh as a take's would
/// be: one that waited here more than [`HANDED_MAX_AGE_MS`] (or half its lease) is not handed
/// out but let go, its lease released by the next read of the table, which may take it at
/// once. A write of a job's row (a retry scheduled, the job completed) or of its delivery
/// through the repository drops it from here. Jobs waiting in the table go first: a take reads
/// the table at least every [`TABLE_READ_EVERY_MS`] while jobs are handed to it, and nothing is
/// leased for the takes while the table's last read found as many due jobs as it was asked for.
#[derive(Default)]
struct Handoff {
    jobs: std::collections::VecDeque<HandedJob>,
    /// What the last take asked for and did not get, less what was leased for it since.
    wanted: usize,
    /// The lease the last take gave (ms).
    lease_ms: i64,
    /// When the last take asked, and when a take last read the table (unix ms; 0: never).
    asked_at: i64,
    read_at: i64,
    /// Whether that read found fewer due jobs than it asked for: while it found as many (a
    /// backlog in the table: retries due, jobs queued when there was no room here), nothing is
    /// leased for the takes, which then read the table each time until it runs short.
    table_short: bool,
    /// Jobs let go unhanded, whose leases (until then) the next read of the table releases.
    stale: Vec<(String, i64)>,
}

impl Handoff {
    /// Up to `max` jobs leased at most [`HANDED_MAX_AGE_MS`] ago with at least half their lease
    /// left; the older ones on the way are let go (their leases released by the next read of
    /// the table).
    fn pop(&mut self, max: usize, now: i64) -> Vec<(String, String)> {
        let mut taken = Vec::new();
        while taken.len() < max
            && let Some(job) = self.jobs.pop_front()
        {
            let left = job.leased_until.saturating_sub(now);
            let age = job.lease_ms.saturating_sub(left);
            if age <= HANDED_MAX_AGE_MS && left.saturating_mul(2) >= job.lease_ms {
                taken.push((job.id, job.tenant));
            } else {
                self.stale.push((job.id, job.leased_until));
            }
        }
        taken
    }
}

/// A job leased as it was queued.
struct HandedJob {
    id: String,
    tenant: String,
    leased_until: i64,
    lease_ms: i64,
}

/// A take within this long keeps the fan-out leasing jobs for the takes (the idle dispatcher
/// takes at least every 500 ms).
const HANDOFF_IDLE_MS: i64 = 2_000;
/// While jobs are handed to the takes, one reads the table at least this often.
const TABLE_READ_EVERY_MS: i64 = 100;
/// How long a job may wait here to be handed out.
const HANDED_MAX_AGE_MS: i64 = 1_000;

/// Records waiting for their `get_for_attempt`, and the bytes of their text.
#[derive(Default)]
struct Waiting {
    by_id: HashMap<String, (Doc, Instant)>,
    bytes: usize,
    /// No record here is older than this (when it was put, or earlier): while none can have
    /// expired, a full map is not scanned for expired ones at every put.
    oldest: Option<Instant>,
}

impl Waiting {
    fn remove(&mut self, id: &str) -> Option<(Doc, Instant)> {
        let removed = self.by_id.remove(id)?;
        self.bytes -= removed.0.body.len();
        Some(removed)
    }

    /// Keeps `docs` (read or written at `now`) while there is room, first dropping the records
    /// older than [`RECORD_MAX_AGE`] when they would not all fit.
    /// Returns what it dropped or did not keep, to be freed once the lock is released.
    fn put(&mut self, docs: Vec<Doc>, now: Instant) -> Vec<Doc> {
        let size: usize = docs.iter().map(|d| d.body.len()).sum();
        let mut dropped = Vec::new();
        if (self.by_id.len() + docs.len() > LEASED_RECORDS_MAX || self.bytes + size > LEASED_RECORD_BYTES_MAX)
            && self.oldest.is_some_and(|oldest| now.saturating_duration_since(oldest) > RECORD_MAX_AGE)
        {
            // Records whose attempts ran elsewhere (another instance consumed their jobs).
            let (bytes, mut oldest) = (&mut self.bytes, None::<Instant>);
            dropped.extend(
                self.by_id
                    .extract_if(|_, (_, at)| {
                        let expired = now.saturating_duration_since(*at) > RECORD_MAX_AGE;
                        if !expired {
                            oldest = Some(oldest.map_or(*at, |o| o.min(*at)));
                        }
                        expired
                    })
                    .map(|(_, (doc, _))| {
                        *bytes -= doc.body.len();
                        doc
                    }),
            );
            self.oldest = oldest;
        }
        for doc in docs {
            // A newer version of a record waiting replaces it.
            if let Some((old, _)) = self.remove(&doc.id) {
                dropped.push(old);
            }
            if self.by_id.len() >= LEASED_RECORDS_MAX || self.bytes + doc.body.len() > LEASED_RECORD_BYTES_MAX {
                dropped.push(doc);
                continue;
            }
            self.bytes += doc.body.len();
            // `now` may be earlier than another put's before it (taken before the lock).
            self.oldest = Some(self.oldest.map_or(now, |oldest| oldest.min(now)));
            self.by_id.insert(doc.id.clone(), (doc, now));
        }
        if self.by_id.is_empty() {
            self.oldest = None;
        }
        dropped
    }
}

/// An endpoint a take read: the endpoint, decoded once for all the gets it still serves (as many
/// as the take leased deliveries of it: each of them decoding the same document again was 2% of
/// the service's time delivering to ten endpoints), how many those are, and when it was read.
type LeasedWebhook = (Stored<Webhook>, u32, Instant);

/// How long a record read or written for the attempt that follows may be handed to it: longer
/// than a job usually waits behind a backlog in a broker's queue. A record out of date costs
/// that attempt a failed conditional write and a read (see [`LeasedRecords`]).
const RECORD_MAX_AGE: Duration = Duration::from_secs(5);

/// How long an endpoint read for the attempts that follow may be handed to their gets.
const WEBHOOK_MAX_AGE: Duration = Duration::from_secs(1);

/// Records waiting for their `get_for_attempt`, at most; and at most this much of their text
/// (16 MiB).
const LEASED_RECORDS_MAX: usize = 16_384;
const LEASED_RECORD_BYTES_MAX: usize = 16 << 20;

/// Endpoints waiting for their gets, at most.
const LEASED_WEBHOOKS_MAX: usize = 4096;

impl std::fmt::Debug for LeasedRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let waiting = self.records.lock().map_or(0, |m| m.by_id.len());
        f.debug_struct("LeasedRecords").field("enabled", &self.enabled()).field("waiting", &waiting).finish()
    }
}

impl LeasedRecords {
    fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    fn put(&self, docs: Vec<Doc>) {
        let now = Instant::now();
        let dropped = self.records.lock().unwrap_or_else(|p| p.into_inner()).put(docs, now);
        drop(dropped);
    }

    /// The record of `id` if it was left recently, and only to a caller of its own tenant.
    fn take(&self, tenant: &str, id: &str) -> Option<Doc> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        // Nothing waits unless records are handed here (none was, or all were taken).
        if records.by_id.is_empty() {
            return None;
        }
        if records.by_id.get(id)?.0.pk != tenant {
            return None;
        }
        let (doc, at) = records.remove(id)?;
        (at.elapsed() <= RECORD_MAX_AGE).then_some(doc)
    }

    fn forget(&self, id: &str) {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    /// Endpoint documents read by a take or a fan-out, each with the number of its deliveries
    /// about to be attempted; the uses an earlier read left add up.
    fn put_webhooks(&self, docs: Vec<(Doc, u32)>) {
        // Decoded before the lock is taken. One that cannot be decoded is not handed: its gets
        // read it, and fail as they should.
        let decoded: Vec<_> =
            docs.into_iter().map(|(doc, uses)| ((doc.pk.clone(), doc.id.clone()), decode::<Webhook>(doc).ok(), uses)).collect();
        let now = Instant::now();
        let mut webhooks = self.webhooks.lock().unwrap_or_else(|p| p.into_inner());
        if webhooks.len() + decoded.len() > LEASED_WEBHOOKS_MAX {
            webhooks.clear();
        }
        for (key, webhook, uses) in decoded {
            let Some(webhook) = webhook else {
                webhooks.remove(&key);
                continue;
            };
            match webhooks.entry(key) {
                Entry::Occupied(mut waiting) => {
                    let (old, left, read_at) = waiting.get_mut();
                    *left = if read_at.elapsed() > WEBHOOK_MAX_AGE { uses } else { left.saturating_add(uses) };
                    *old = webhook;
                    *read_at = now;
                }
                Entry::Vacant(slot) => {
                    slot.insert((webhook, uses, now));
                }
            }
        }
    }

    /// The endpoint `id` of `tenant` as the last take read it, if recent and not used up.
    pub(crate) fn take_webhook(&self, tenant: &str, id: WebhookId) -> Option<Stored<Webhook>> {
        let mut webhooks = self.webhooks.lock().unwrap_or_else(|p| p.into_inner());
        // Most reads find nothing waiting (every read outside attempts): no key is built then.
        if webhooks.is_empty() {
            return None;
        }
        let key = (tenant.to_owned(), id.to_string());
        let (webhook, uses, read_at) = webhooks.get_mut(&key)?;
        if read_at.elapsed() > WEBHOOK_MAX_AGE {
            webhooks.remove(&key);
            return None;
        }
        *uses -= 1;
        if *uses == 0 { webhooks.remove(&key).map(|(webhook, _, _)| webhook) } else { Some(webhook.clone()) }
    }

    /// Room for up to `n` jobs queued now (unix ms `now`) to be leased for the takes: how many,
    /// and until when their lease runs.
    fn reserve_handoff(&self, n: usize, now: i64) -> (usize, i64) {
        let mut handoff = self.handoff.lock().unwrap_or_else(|p| p.into_inner());
        if n == 0 || handoff.asked_at == 0 || now.saturating_sub(handoff.asked_at) > HANDOFF_IDLE_MS {
            return (0, 0);
        }
        // What the last take did not get, less what was leased for it since (a take that got
        // all it asked for left nothing wanted).
        let room = handoff.wanted.min(n);
        handoff.wanted -= room;
        (room, now.saturating_add(handoff.lease_ms))
    }

    fn hand_jobs(&self, jobs: Vec<HandedJob>) {
        self.handoff.lock().unwrap_or_else(|p| p.into_inner()).jobs.extend(jobs);
    }

    /// Up to `max` handed jobs, and whether the take is to read the table too (one of `max` is
    /// left for the table when it is due).
    fn take_handed(&self, max: usize, now: i64) -> (Vec<(String, String)>, bool) {
        let mut handoff = self.handoff.lock().unwrap_or_else(|p| p.into_inner());
        let read_table = now.saturating_sub(handoff.read_at) >= TABLE_READ_EVERY_MS;
        let taken = handoff.pop(if read_table { max.saturating_sub(1) } else { max }, now);
        let read_table = read_table || taken.is_empty();
        (taken, read_table)
    }

    /// Up to `max` handed jobs (after a read of the table that left room).
    fn pop_handed(&self, max: usize, now: i64) -> Vec<(String, String)> {
        self.handoff.lock().unwrap_or_else(|p| p.into_inner()).pop(max, now)
    }

    /// The leases of the jobs let go unhanded, for the next read of the table to release.
    fn stale_handed(&self) -> Vec<(String, i64)> {
        std::mem::take(&mut self.handoff.lock().unwrap_or_else(|p| p.into_inner()).stale)
    }

    /// Leases to release at the next read of the table (after one that failed).
    fn let_go(&self, stale: Vec<(String, i64)>) {
        if !stale.is_empty() {
            self.handoff.lock().unwrap_or_else(|p| p.into_inner()).stale.extend(stale);
        }
    }

    /// Drops the handed job of delivery `id`, whose row or record is being written.
    fn forget_handed(&self, id: &str) {
        let mut handoff = self.handoff.lock().unwrap_or_else(|p| p.into_inner());
        if !handoff.jobs.is_empty() {
            handoff.jobs.retain(|job| job.id != id);
        }
    }

    /// Notes a take at `now` that asked for `wanted` more jobs than it got, with a lease of
    /// `lease_ms`, and, if it read the table, whether the table had fewer due jobs than it
    /// asked of it.
    fn note_take(&self, wanted: usize, lease_ms: i64, now: i64, table_short: Option<bool>) {
        let mut handoff = self.handoff.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(short) = table_short {
            handoff.read_at = now;
            handoff.table_short = short;
        }
        handoff.wanted = if handoff.table_short { wanted } else { 0 };
        handoff.lease_ms = lease_ms;
        handoff.asked_at = now;
    }

    pub(crate) fn forget_webhook(&self, tenant: &str, id: &str) {
        let mut webhooks = self.webhooks.lock().unwrap_or_else(|p| p.into_inner());
        if !webhooks.is_empty() {
            webhooks.remove(&(tenant.to_owned(), id.to_owned()));
        }
    }
}

/// Counts one more attempt of endpoint `id` of tenant `pk` among `webhooks`, reading it in
/// `tx` the first time (an endpoint that is gone is not counted).
fn count_webhook(tx: &Connection, webhooks: &mut Vec<(Doc, u32)>, pk: &str, id: String, now: i64) -> Result<(), DomainError> {
    match webhooks.iter_mut().find(|(doc, _)| doc.pk == pk && doc.id == id) {
        Some((_, uses)) => *uses += 1,
        None => {
            let doc = read_one(tx, WEBHOOKS, pk.to_owned(), id, now).map_err(map_sqlite)?;
            webhooks.extend(doc.map(|d| (d, 1)));
        }
    }
    Ok(())
}

/// The earliest time one of `jobs` (due time and lease end, in unix ms, in due order) can be
/// taken: the later of its due time and its lease's end. Reads up to the first job due no
/// earlier than the earliest such time found so far (none after it can be earlier), not all.
fn earliest_ready<E>(jobs: impl Iterator<Item = Result<(i64, i64), E>>) -> Result<Option<i64>, E> {
    let mut earliest: Option<i64> = None;
    for job in jobs {
        let (due, leased_until) = job?;
        if earliest.is_some_and(|earliest| due >= earliest) {
            break;
        }
        let ready = due.max(leased_until);
        earliest = Some(earliest.map_or(ready, |earliest| earliest.min(ready)));
    }
    Ok(earliest)
}

/// The endpoint a delivery record names, read up to its `webhookId` member and no further
/// ([`str_member`]): this runs in the writer's transaction for every delivery a take leases,
/// and the member comes third in every version's records, the payload sixth.
fn webhook_of(delivery: &Doc) -> Option<String> {
    str_member(&delivery.body, &["webhookId"])
}

pub(crate) struct SqliteDeliveries {
    docs: Documents,
    /// The delivery queue in use is this database's `delivery_jobs` (`events.backend = "embedded"`).
    keeps_queue: bool,
    /// Records (and endpoints) handed to the attempts that follow: those the queue's take read
    /// when the queue is here, those the fan-out created when it is elsewhere.
    leased: Arc<LeasedRecords>,
}

impl SqliteDeliveries {
    /// Deliveries whose queue is elsewhere (RabbitMQ): the records the fan-out creates, and
    /// their endpoints, are handed to the gets of their first attempts.
    pub(crate) fn new(docs: Documents, leased: Arc<LeasedRecords>) -> Self {
        Self { docs, keeps_queue: false, leased }
    }

    /// Deliveries whose queue is this database's: a record and its job are written in one
    /// transaction, and the records the take reads are handed to the gets that follow.
    pub(crate) fn with_queue(docs: Documents, leased: Arc<LeasedRecords>) -> Self {
        leased.enabled.store(true, Ordering::Relaxed);
        Self { docs, keeps_queue: true, leased }
    }

    /// Reads delivery `id` of tenant `pk` from the database.
    async fn read(&self, pk: String, id: uuid::Uuid) -> Result<Stored<Delivery>, DomainError> {
        match self.docs.get(WEBHOOK_DELIVERIES, pk, id.to_string()).await? {
            Some(doc) => self.joined(vec![doc]).await?.pop().map_or_else(|| Err(DomainError::not_found(RESOURCE, id)), decode),
            None => Err(DomainError::not_found(RESOURCE, id)),
        }
    }

    /// `docs`, records read from the database, with the payloads kept apart put back
    /// ([`join_payloads`]), read in one read transaction when any is.
    async fn joined(&self, mut docs: Vec<Doc>) -> Result<Vec<Doc>, DomainError> {
        if docs.iter().all(|doc| payload_left_out(&doc.body).is_none()) {
            return Ok(docs);
        }
        let now = self.docs.db().now();
        self.docs
            .db()
            .read(move |conn| {
                join_payloads(conn, &mut docs, now)?;
                Ok(docs)
            })
            .await
    }

    fn forget_leased(&self, id: uuid::Uuid) {
        let id = id.to_string();
        self.leased.forget(&id);
        self.leased.forget_handed(&id);
    }

    /// Creates each delivery in one transaction (a conflict fails its item alone); with
    /// `queue`, each created pending delivery's job is queued at its `next_attempt_at` in the
    /// same transaction. Without (the queue is elsewhere), each created pending record, and
    /// its endpoint as this transaction reads it, is handed to the `get_for_attempt` of its
    /// first attempt (see [`LeasedRecords`]); the take does that with the queue here.
    async fn create_many(&self, deliveries: &[Delivery], queue: bool) -> Result<Vec<Result<ETag, DomainError>>, DomainError> {
        // With the queue here, the jobs due now that the takes wait for are leased for them as
        // they are queued, and their records and endpoints handed like the take's ([`Handoff`]).
        let now_ms = now_millis();
        let due_now =
            |d: &Delivery| queue && d.status == DeliveryStatus::Pending && d.next_attempt_at.is_some_and(|at| millis(at) <= now_ms);
        let (mut handing, leased_until) =
            if queue { self.leased.reserve_handoff(deliveries.iter().filter(|d| due_now(d)).count(), now_ms) } else { (0, 0) };
        let lease_ms = leased_until.saturating_sub(now_ms);
        // A payload is kept apart only for an event with several deliveries here: for one
        // alone it would be a row more to write and read.
        let mut per_event: HashMap<(&TenantId, &str), usize> = HashMap::new();
        for d in deliveries {
            *per_event.entry((&d.tenant_id, d.message_id.as_str())).or_default() += 1;
        }
        let items = deliveries
            .iter()
            .map(|d| {
                let pending = d.status == DeliveryStatus::Pending;
                let due = d.next_attempt_at.filter(|_| queue && pending).map(millis);
                let leased = (handing > 0 && due_now(d)).then(|| {
                    handing -= 1;
                    leased_until
                });
                // One created held is attempted by its creator with what it has in hand: no read to spare.
                let hand = ((!queue && pending && d.lease_until.is_none()) || leased.is_some()).then(|| d.webhook_id.to_string());
                let full = encode(d)?;
                let shared = per_event.get(&(&d.tenant_id, d.message_id.as_str())).is_some_and(|n| *n > 1);
                let apart = without_payload(&full, d.payload.as_str()).filter(|_| shared).map(|(stored, payload)| Apart {
                    event: d.message_id.clone(),
                    stored,
                    payload,
                });
                Ok((d.tenant_id.to_string(), d.id.to_string(), full, apart, hold_of(d)?, due, leased, hand))
            })
            .collect::<Result<Vec<_>, DomainError>>()?;
        let (outcomes, handed) = self
            .docs
            .transaction(move |tx, now| {
                let expires_at = expiry(now, Some(DELIVERY_TTL));
                let mut outcomes = Vec::with_capacity(items.len());
                let mut records = Vec::new();
                let mut webhooks: Vec<(Doc, u32)> = Vec::new();
                let mut jobs = Vec::new();
                // The payload kept apart for each event of this transaction (None: another
                // text was there, and the records of this one keep theirs themselves).
                let mut kept: HashMap<(String, String), Option<String>> = HashMap::new();
                for (pk, id, body, apart, hold, due, leased, hand) in items {
                    let stored = match &apart {
                        Some(apart) => {
                            let payload = &body[apart.payload.clone()];
                            let same = match kept.entry((pk.clone(), apart.event.clone())) {
                                Entry::Occupied(first) => first.get().as_deref() == Some(payload),
                                Entry::Vacant(first) => {
                                    let is_kept = keep_payload(tx, &pk, &apart.event, payload, expires_at.unwrap_or(i64::MAX), now)?;
                                    first.insert(is_kept.then(|| payload.to_owned()));
                                    is_kept
                                }
                            };
                            if same { &apart.stored } else { &body }
                        }
                        None => &body,
                    };
                    match insert(tx, WEBHOOK_DELIVERIES, &pk, &id, stored, expires_at, hold.as_deref(), now, new_etag()) {
                        Ok(etag) => {
                            if let Some(due) = due {
                                match leased {
                                    Some(until) if put_leased_job(tx, &id, &pk, due, until, now_ms)? => {
                                        jobs.push(HandedJob { id: id.clone(), tenant: pk.clone(), leased_until: until, lease_ms });
                                    }
                                    _ => put_job(tx, &id, &pk, due, SCHEDULE)?,
                                }
                            }
                            if let Some(webhook) = hand {
                                count_webhook(tx, &mut webhooks, &pk, webhook, now)?;
                                records.push(Doc { pk, id, etag: etag.clone(), body });
                            }
                            outcomes.push(Ok(etag));
                        }
                        Err(e @ DomainError::Conflict(_)) => outcomes.push(Err(e)),
                        Err(e) => return Err(e),
                    }
                }
                Ok((outcomes, (records, webhooks, jobs)))
            })
            .await?;
        let (records, webhooks, jobs) = handed;
        if !records.is_empty() {
            self.leased.put(records);
        }
        if !webhooks.is_empty() {
            self.leased.put_webhooks(webhooks);
        }
        if !jobs.is_empty() {
            self.leased.hand_jobs(jobs);
        }
        Ok(outcomes)
    }
}

/// Queues the job of a delivery; a job already there is moved to the new time, unleased (what
/// [`DeliveryQueue::schedule`] does).
const SCHEDULE: &str = "INSERT INTO delivery_jobs (delivery_id, tenant_id, due_at, leased_until) VALUES (?1, ?2, ?3, 0) \
                        ON CONFLICT (delivery_id) DO UPDATE SET due_at = excluded.due_at, leased_until = 0";
/// Queues the job of a delivery unless one is there (what [`DeliveryQueue::schedule_if_absent`] does).
const IF_ABSENT: &str =
    "INSERT INTO delivery_jobs (delivery_id, tenant_id, due_at, leased_until) VALUES (?1, ?2, ?3, 0) ON CONFLICT (delivery_id) DO NOTHING";

/// Runs `statement` (`SCHEDULE` or `IF_ABSENT`) for the job of a delivery inside a transaction.
fn put_job(tx: &Connection, id: &str, tenant: &str, due: i64, statement: &'static str) -> Result<(), DomainError> {
    tx.prepare_cached(statement).and_then(|mut s| s.execute(params![id, tenant, due])).map_err(map_sqlite)?;
    Ok(())
}

/// Queues the job of a new delivery leased until `until` (unix ms) for this process's takes:
/// false, writing nothing, when a job of that delivery is there leased (then [`SCHEDULE`]
/// moves it, as for any other).
fn put_leased_job(tx: &Connection, id: &str, tenant: &str, due: i64, until: i64, now: i64) -> Result<bool, DomainError> {
    let changed = tx
        .prepare_cached(
            "INSERT INTO delivery_jobs (delivery_id, tenant_id, due_at, leased_until) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (delivery_id) DO UPDATE SET due_at = excluded.due_at, leased_until = excluded.leased_until \
             WHERE delivery_jobs.leased_until <= ?5",
        )
        .and_then(|mut s| s.execute(params![id, tenant, due, until, now]))
        .map_err(map_sqlite)?;
    Ok(changed > 0)
}

/// The end of a pending delivery's hold as its record writes it (RFC 3339), kept in the row's
/// `hold_until` for the index of held deliveries ([`DeliveryRepository::holds_ended_before`]):
/// a column the delivery's writes set, where an index on the body's fields would parse each
/// delivery's JSON at every write.
fn hold_of(delivery: &Delivery) -> Result<Option<String>, DomainError> {
    match delivery.lease_until {
        Some(until) if delivery.status == DeliveryStatus::Pending => {
            // Written as the body writes it (the two are compared as text): every hold is
            // taken in UTC.
            debug_assert!(until.offset().is_utc(), "a hold's end in UTC: {until}");
            until
                .format(&time::format_description::well_known::Rfc3339)
                .map(Some)
                .map_err(|e| DomainError::Unexpected(anyhow::Error::new(e).context("writing a delivery's hold")))
        }
        _ => Ok(None),
    }
}

fn remove_job(tx: &Connection, id: &str) -> Result<(), DomainError> {
    tx.prepare_cached("DELETE FROM delivery_jobs WHERE delivery_id = ?1").and_then(|mut s| s.execute([id])).map_err(map_sqlite)?;
    Ok(())
}

#[async_trait]
impl DeliveryRepository for SqliteDeliveries {
    #[tracing::instrument(skip_all, name = "deliveries.create", fields(tenant = %delivery.tenant_id, delivery = %delivery.id))]
    async fn create(&self, delivery: &Delivery) -> Result<ETag, DomainError> {
        let (pk, id, body, hold) = (delivery.tenant_id.to_string(), delivery.id.to_string(), encode(delivery)?, hold_of(delivery)?);
        self.docs
            .transaction(move |tx, now| {
                insert(tx, WEBHOOK_DELIVERIES, &pk, &id, &body, expiry(now, Some(DELIVERY_TTL)), hold.as_deref(), now, new_etag())
            })
            .await
    }

    #[tracing::instrument(skip_all, name = "deliveries.get", fields(tenant = %tenant, delivery = %id))]
    async fn get(&self, tenant: &TenantId, id: uuid::Uuid) -> Result<Stored<Delivery>, DomainError> {
        self.read(tenant.to_string(), id).await
    }

    /// The record handed for this attempt ([`LeasedRecords`]), if one waits; else as [`Self::get`].
    #[tracing::instrument(skip_all, name = "deliveries.get_for_attempt", fields(tenant = %tenant, delivery = %id))]
    async fn get_for_attempt(&self, tenant: &TenantId, id: uuid::Uuid) -> Result<Stored<Delivery>, DomainError> {
        let pk = tenant.to_string();
        if let Some(doc) = self.leased.take(&pk, &id.to_string()) {
            return decode(doc);
        }
        self.read(pk, id).await
    }

    #[tracing::instrument(skip_all, name = "deliveries.list", fields(tenant = %tenant, webhook = %webhook))]
    async fn list(
        &self,
        tenant: &TenantId,
        webhook: WebhookId,
        filter: &DeliveryFilter,
        page: &PageRequest,
    ) -> Result<Page<Stored<Delivery>>, DomainError> {
        // Time-range filters are applied on the page read (ids are not time-ordered); the
        // equality filters run in SQLite.
        let mut filters = vec![("$.webhookId", webhook.to_string())];
        if let Some(status) = filter.status {
            filters.push(("$.status", status.as_str().to_owned()));
        }
        if let Some(event_type) = &filter.event_type {
            filters.push(("$.eventType", event_type.clone()));
        }
        let query = Query {
            container: WEBHOOK_DELIVERIES,
            pk: Some(tenant.to_string()),
            filters,
            search: None,
            contains: Vec::new(),
            page: page.clone(),
        };
        let (docs, continuation) = self.docs.query(query).await?;
        let items = self
            .joined(docs)
            .await?
            .into_iter()
            .map(decode::<Delivery>)
            .filter(|d| d.as_ref().map_or(true, |d| filter.matches(&d.value)))
            .collect::<Result<_, _>>()?;
        Ok(Page { items, continuation })
    }

    #[tracing::instrument(skip_all, name = "deliveries.replace", fields(tenant = %delivery.tenant_id, delivery = %delivery.id, events = events.len()))]
    async fn replace(&self, delivery: &Delivery, if_match: Option<ETag>, events: &[DomainEvent]) -> Result<ETag, DomainError> {
        self.forget_leased(delivery.id);
        let pk = delivery.tenant_id.to_string();
        let (body, then) = stored_with_payload(delivery)?;
        self.docs
            .replace_then(
                WEBHOOK_DELIVERIES,
                RESOURCE,
                pk.clone(),
                pk,
                delivery.id.to_string(),
                body,
                if_match,
                Some(DELIVERY_TTL),
                hold_of(delivery)?,
                events,
                then,
            )
            .await
    }

    #[tracing::instrument(skip_all, name = "deliveries.holds_ended_before")]
    async fn holds_ended_before(&self, before: time::OffsetDateTime, limit: u32) -> Result<Vec<Stored<Delivery>>, DomainError> {
        // The index holds the rows whose `hold_until` is set: the deliveries this repository
        // wrote pending with a hold ([`hold_of`]), by its end as stored: RFC 3339 text in UTC,
        // where a fraction of a second sorts before the whole second (`.5Z` < `Z`). So the text
        // is compared with the second after `before` (every hold that ends before it, and a few
        // within that second), and the decoded holds exactly, in order.
        let cutoff = im_domain::webhooks::delivery::hold_text_cutoff(before)?;
        let live = self.docs.db().now();
        let docs = self
            .docs
            .db()
            .read(move |conn| {
                // The body is checked too, on these few rows only: one made final by a write
                // that left the column as it was (a binary from before the column) is passed
                // over, not counted against `limit`; one still held is listed whatever its
                // column says (decoded and judged by its body below; its claim sets the column).
                let sql = "SELECT pk, id, etag, body FROM documents INDEXED BY deliveries_by_hold \
                    WHERE hold_until IS NOT NULL AND hold_until <= ?1 AND container = 'integration_webhook_deliveries' \
                    AND (expires_at IS NULL OR expires_at > ?2) \
                    AND json_extract(body, '$.status') = 'pending' AND json_extract(body, '$.leaseUntil') IS NOT NULL \
                    ORDER BY hold_until LIMIT ?3";
                let mut docs = conn
                    .prepare_cached(sql)?
                    .query_map(params![cutoff, live, i64::from(limit)], |r| {
                        Ok(Doc { pk: r.get(0)?, id: r.get(1)?, etag: ETag::new(r.get::<_, String>(2)?), body: r.get(3)? })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                join_payloads(conn, &mut docs, live)?;
                Ok(docs)
            })
            .await?;
        let mut ended = docs.into_iter().map(decode::<Delivery>).collect::<Result<Vec<_>, _>>()?;
        ended.retain(|d| d.value.status == DeliveryStatus::Pending && d.value.lease_until.is_some_and(|until| until < before));
        ended.sort_by_key(|d| d.value.lease_until);
        Ok(ended)
    }

    #[tracing::instrument(skip_all, name = "deliveries.create_each", fields(deliveries = deliveries.len()))]
    async fn create_each(&self, deliveries: &[Delivery]) -> Result<Vec<Result<ETag, DomainError>>, DomainError> {
        self.create_many(deliveries, false).await
    }

    fn keeps_queue(&self) -> bool {
        self.keeps_queue
    }

    #[tracing::instrument(skip_all, name = "deliveries.create_each_queued", fields(deliveries = deliveries.len()))]
    async fn create_each_queued(&self, deliveries: &[Delivery]) -> Result<Vec<Result<ETag, DomainError>>, DomainError> {
        if !self.keeps_queue {
            return Err(DomainError::Unexpected(anyhow::anyhow!("this delivery repository keeps no delivery queue")));
        }
        self.create_many(deliveries, true).await
    }

    #[tracing::instrument(skip_all, name = "deliveries.replace_queued", fields(tenant = %delivery.tenant_id, delivery = %delivery.id, events = events.len()))]
    async fn replace_queued(
        &self,
        delivery: &Delivery,
        if_match: Option<ETag>,
        events: &[DomainEvent],
        job: JobAfter,
    ) -> Result<ETag, DomainError> {
        if !self.keeps_queue {
            return Err(DomainError::Unexpected(anyhow::anyhow!("this delivery repository keeps no delivery queue")));
        }
        self.forget_leased(delivery.id);
        let pk = delivery.tenant_id.to_string();
        let id = delivery.id.to_string();
        let (job_id, job_tenant) = (id.clone(), pk.clone());
        let (body, payload_alive) = stored_with_payload(delivery)?;
        self.docs
            .replace_then(
                WEBHOOK_DELIVERIES,
                RESOURCE,
                pk.clone(),
                pk,
                id,
                body,
                if_match,
                Some(DELIVERY_TTL),
                hold_of(delivery)?,
                events,
                move |tx, now| {
                    payload_alive(tx, now)?;
                    match job {
                        JobAfter::Complete => remove_job(tx, &job_id),
                        JobAfter::RetryAt(at) => put_job(tx, &job_id, &job_tenant, millis(at), SCHEDULE),
                    }
                },
            )
            .await
    }
}

/// The delivery queue in the embedded database: a job is a row with its due time and lease.
pub(crate) struct SqliteDeliveryQueue {
    db: Arc<Db>,
    /// Where the take leaves the records of the jobs it leased.
    leased: Arc<LeasedRecords>,
}

impl SqliteDeliveryQueue {
    pub(crate) fn new(db: Arc<Db>, leased: Arc<LeasedRecords>) -> Self {
        Self { db, leased }
    }
}

impl SqliteDeliveryQueue {
    /// Runs `statement` (`SCHEDULE` or `IF_ABSENT`) for the job's row.
    async fn insert(&self, job: &DeliveryJob, due: time::OffsetDateTime, statement: &'static str) -> Result<(), DomainError> {
        let (tenant, id, due) = (job.tenant_id.to_string(), job.delivery_id.to_string(), millis(due));
        self.leased.forget_handed(&id);
        self.db.write(move |tx| put_job(tx, &id, &tenant, due, statement)).await
    }
}

fn millis(t: time::OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn now_millis() -> i64 {
    millis(time::OffsetDateTime::now_utc())
}

#[async_trait]
impl DeliveryQueue for SqliteDeliveryQueue {
    #[tracing::instrument(skip_all, name = "delivery_queue.schedule", fields(tenant = %job.tenant_id, delivery = %job.delivery_id))]
    async fn schedule(&self, job: &DeliveryJob, due: time::OffsetDateTime) -> Result<(), DomainError> {
        self.insert(job, due, SCHEDULE).await
    }

    #[tracing::instrument(skip_all, name = "delivery_queue.schedule_if_absent", fields(tenant = %job.tenant_id, delivery = %job.delivery_id))]
    async fn schedule_if_absent(&self, job: &DeliveryJob, due: time::OffsetDateTime) -> Result<(), DomainError> {
        self.insert(job, due, IF_ABSENT).await
    }

    #[tracing::instrument(skip_all, name = "delivery_queue.take_due", fields(max = max))]
    async fn take_due(&self, max: u32, lease: Duration) -> Result<Vec<DeliveryJob>, DomainError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let asked = usize::try_from(max).unwrap_or(usize::MAX);
        // First the jobs the fan-out leased for the takes ([`Handoff`]), without a write.
        let (mut rows, read_table) = self.leased.take_handed(asked, now_millis());
        let read_table = read_table && rows.len() < asked;
        let mut table_short = None;
        if read_table {
            let of_table = asked - rows.len();
            let limit = i64::try_from(of_table).unwrap_or(i64::MAX);
            let (read_records, today) = (self.leased.enabled(), self.db.now());
            let stale = self.leased.stale_handed();
            let (released, unreleased) = (stale.clone(), &self.leased);
            let read = self
                .db
                .write(move |tx| {
                    let now = now_millis();
                    // Jobs let go unhanded: released unless their rows were written since.
                    for (id, until) in &released {
                        tx.prepare_cached("UPDATE delivery_jobs SET leased_until = 0 WHERE delivery_id = ?1 AND leased_until = ?2")
                            .and_then(|mut s| s.execute(params![id, until]))
                            .map_err(map_sqlite)?;
                    }
                    // One statement: the due jobs are found and leased together.
                    let rows: Vec<(String, String)> = tx
                        .prepare_cached(
                            "UPDATE delivery_jobs SET leased_until = ?3 WHERE delivery_id IN \
                             (SELECT delivery_id FROM delivery_jobs WHERE due_at <= ?1 AND leased_until <= ?1 ORDER BY due_at LIMIT ?2) \
                             RETURNING delivery_id, tenant_id",
                        )
                        .and_then(|mut s| {
                            s.query_map(params![now, limit, now.saturating_add(lease_ms)], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
                        })
                        .map_err(map_sqlite)?;
                    let mut records = Vec::new();
                    let mut webhooks: Vec<(Doc, u32)> = Vec::new();
                    if read_records {
                        for (id, tenant) in &rows {
                            records.extend(read_one(tx, WEBHOOK_DELIVERIES, tenant.clone(), id.clone(), today).map_err(map_sqlite)?);
                        }
                        join_payloads(tx, &mut records, today).map_err(map_sqlite)?;
                        for (pk, webhook) in records.iter().filter_map(|r| webhook_of(r).map(|w| (&r.pk, w))) {
                            count_webhook(tx, &mut webhooks, pk, webhook, today)?;
                        }
                    }
                    Ok((rows, (records, webhooks)))
                })
                .await;
            let (taken, (records, webhooks)) = match read {
                Ok(read) => {
                    table_short = Some(read.0.len() < of_table);
                    read
                }
                Err(error) => {
                    unreleased.let_go(stale);
                    // The handed jobs are leased to this process: attempted now rather than
                    // when their lease ends.
                    rows.extend(self.leased.pop_handed(asked - rows.len(), now_millis()));
                    if rows.is_empty() {
                        return Err(error);
                    }
                    tracing::warn!(%error, "reading the delivery queue failed; the jobs leased as they were queued go on");
                    (Vec::new(), (Vec::new(), Vec::new()))
                }
            };
            if !records.is_empty() {
                self.leased.put(records);
            }
            if !webhooks.is_empty() {
                self.leased.put_webhooks(webhooks);
            }
            rows.extend(taken);
            // Room the table left: handed jobs (a take of one, whose one was the table's).
            if rows.len() < asked {
                rows.extend(self.leased.pop_handed(asked - rows.len(), now_millis()));
            }
        }
        self.leased.note_take(asked.saturating_sub(rows.len()), lease_ms, now_millis(), table_short);
        rows.into_iter()
            .map(|(id, tenant)| {
                Ok(DeliveryJob {
                    tenant_id: TenantId::new(tenant)
                        .map_err(|e| DomainError::Unexpected(anyhow::anyhow!("a queued job's tenant: {}", e.message)))?,
                    delivery_id: uuid::Uuid::parse_str(&id).map_err(|e| DomainError::Unexpected(e.into()))?,
                })
            })
            .collect()
    }

    #[tracing::instrument(skip_all, name = "delivery_queue.complete", fields(tenant = %job.tenant_id, delivery = %job.delivery_id))]
    async fn complete(&self, job: &DeliveryJob) -> Result<(), DomainError> {
        let id = job.delivery_id.to_string();
        self.leased.forget_handed(&id);
        self.db.write(move |tx| remove_job(tx, &id)).await
    }

    #[tracing::instrument(skip_all, name = "delivery_queue.next_due")]
    async fn next_due(&self) -> Result<Option<time::OffsetDateTime>, DomainError> {
        // Read in due order (the index by due time), each row only as far as `earliest_ready`
        // needs: every idle dispatcher asks after an empty take, and the retries due in hours
        // may be many.
        let due: Option<i64> = self
            .db
            .read(|conn| {
                let mut statement = conn.prepare_cached("SELECT due_at, leased_until FROM delivery_jobs ORDER BY due_at")?;
                let jobs = statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                earliest_ready(jobs)
            })
            .await?;
        Ok(due.and_then(|ms| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()))
    }

    async fn depth(&self) -> Result<Option<u64>, DomainError> {
        let jobs: i64 = self.db.read(|conn| conn.query_row("SELECT count(*) FROM delivery_jobs", [], |r| r.get(0))).await?;
        Ok(Some(u64::try_from(jobs).unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(body: &str) -> Doc {
        Doc { pk: "t".into(), id: "d".into(), etag: ETag::new("e"), body: body.into() }
    }

    #[test]
    fn the_endpoint_a_record_names_is_read_wherever_its_member_is() {
        let payload = r#"{"specversion":"1.0","data":{"webhookId":"not this","n":[1,{"a":"\"}"}]}}"#;
        let first = format!(r#"{{"id":"d","tenantId":"t","webhookId":"w-1","messageId":"m","payload":{payload},"status":"pending"}}"#);
        assert_eq!(webhook_of(&record(&first)).as_deref(), Some("w-1"));
        // After the payload (and a nested member of the same name), and written with an escape.
        let last = format!(r#"{{"id":"d","payload":{payload},"attempts":[],"webhookId":"w-\u0032"}}"#);
        assert_eq!(webhook_of(&record(&last)).as_deref(), Some("w-2"));
        for body in [r#"{"id":"d","payload":{"webhookId":"nested"}}"#, r#"{"webhookId":7}"#, "[]", "not json", r#"{"id":"#] {
            assert_eq!(webhook_of(&record(body)), None, "{body}");
        }
        // A delivery as this store writes it.
        let delivery = a_delivery();
        let text = encode(&delivery).unwrap();
        assert_eq!(webhook_of(&record(&text)), Some(delivery.webhook_id.to_string()));
    }

    #[test]
    fn the_earliest_ready_job_is_found_without_reading_past_it() {
        // Against every job read, over pseudo-random queues in due order.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |below: i64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % below as u64) as i64
        };
        for _ in 0..2_000 {
            let mut jobs: Vec<(i64, i64)> = (0..next(12)).map(|_| (next(100), if next(2) == 0 { 0 } else { next(200) })).collect();
            jobs.sort_unstable_by_key(|(due, _)| *due);
            let every = jobs.iter().map(|(due, leased)| *due.max(leased)).min();
            let mut read = 0;
            let found = earliest_ready(jobs.iter().map(|job| {
                read += 1;
                Ok::<_, ()>(*job)
            }));
            assert_eq!(found, Ok(every), "{jobs:?}");
            // Those due no later than the answer, and the one that ends the read.
            let before = jobs.iter().filter(|(due, _)| Some(*due) <= every).count();
            assert!(read <= (before + 1).min(jobs.len()), "read {read} of {jobs:?}");
        }
    }

    #[test]
    fn waiting_records_keep_those_first_put_within_their_bounds_and_count_their_bytes() {
        let doc = |id: usize, size: usize| Doc { pk: "t".into(), id: format!("d{id}"), etag: ETag::new("e"), body: "x".repeat(size) };
        let total = |w: &Waiting| w.by_id.values().map(|(d, _)| d.body.len()).sum::<usize>();
        let start = Instant::now();
        let mut waiting = Waiting::default();
        // Past the count: the first ones are kept (their attempts come first), the rest not.
        waiting.put((0..LEASED_RECORDS_MAX + 10).map(|i| doc(i, 4)).collect(), start);
        assert_eq!(waiting.by_id.len(), LEASED_RECORDS_MAX);
        assert!(waiting.by_id.contains_key("d0") && !waiting.by_id.contains_key(&format!("d{LEASED_RECORDS_MAX}")));
        assert_eq!(waiting.bytes, total(&waiting));
        // Full of fresh records: one more is not kept, and none of them is dropped.
        let bytes = waiting.bytes;
        let refused = waiting.put(vec![doc(usize::MAX, 4)], start + RECORD_MAX_AGE);
        assert_eq!((waiting.by_id.len(), waiting.bytes, refused.len()), (LEASED_RECORDS_MAX, bytes, 1));
        assert!(!waiting.by_id.contains_key(&format!("d{}", usize::MAX)));
        // A newer version of a waiting record replaces it, full or not.
        let replaced = waiting.put(vec![doc(0, 6)], start);
        assert_eq!((waiting.by_id.len(), waiting.bytes, replaced.len()), (LEASED_RECORDS_MAX, bytes + 2, 1));
        assert_eq!(waiting.by_id["d0"].0.body.len(), 6);
        // Once they are older than the bound, they make room for new ones.
        waiting.put(vec![doc(usize::MAX, 4)], start + RECORD_MAX_AGE + Duration::from_millis(1));
        assert_eq!(waiting.by_id.len(), 1);
        assert_eq!(waiting.bytes, 4);
        // Past the bytes: those that fit are kept; taking one makes room again.
        let mut waiting = Waiting::default();
        let big = LEASED_RECORD_BYTES_MAX / 4;
        waiting.put((0..6).map(|i| doc(i, big)).collect(), start);
        assert_eq!(waiting.by_id.len(), 4);
        assert_eq!(waiting.bytes, LEASED_RECORD_BYTES_MAX);
        assert!(waiting.remove("d0").is_some() && waiting.remove("d0").is_none());
        assert_eq!(waiting.bytes, 3 * big);
        waiting.put(vec![doc(5, big)], start);
        assert!(waiting.by_id.contains_key("d5"));
        assert_eq!(waiting.bytes, total(&waiting));
        // A record put again is counted once, as it is now.
        let mut waiting = Waiting::default();
        waiting.put(vec![doc(7, 3)], start);
        waiting.put(vec![doc(7, 5)], start);
        assert_eq!((waiting.by_id.len(), waiting.bytes), (1, 5));

        // Partly expired: the scan keeps the younger ones and starts the next scan from them.
        let mut waiting = Waiting::default();
        let half = LEASED_RECORDS_MAX / 2;
        waiting.put((0..half).map(|i| doc(i, 1)).collect(), start);
        let later = start + Duration::from_secs(3);
        waiting.put((half..LEASED_RECORDS_MAX).map(|i| doc(i, 1)).collect(), later);
        let past_first = start + RECORD_MAX_AGE + Duration::from_millis(1);
        waiting.put(vec![doc(LEASED_RECORDS_MAX, 1)], past_first);
        assert_eq!((waiting.by_id.len(), waiting.bytes), (LEASED_RECORDS_MAX - half + 1, LEASED_RECORDS_MAX - half + 1));
        assert_eq!(waiting.oldest, Some(later));
        waiting.put((0..half).map(|i| doc(i, 1)).collect(), past_first);
        assert_eq!(waiting.by_id.len(), LEASED_RECORDS_MAX, "refilled");
        let past_second = later + RECORD_MAX_AGE + Duration::from_millis(1);
        waiting.put(vec![doc(LEASED_RECORDS_MAX + 1, 1)], past_second);
        assert_eq!(waiting.by_id.len(), half + 1, "the second batch expired in its turn");
        assert!(waiting.by_id.contains_key(&format!("d{}", LEASED_RECORDS_MAX + 1)));

        // A record found too old when its attempt asks is not handed, and leaves.
        let leased = LeasedRecords::default();
        let long_ago = Instant::now().checked_sub(RECORD_MAX_AGE + Duration::from_secs(1)).expect("the monotonic clock has run 6 s");
        let _ = leased.records.lock().unwrap().put(vec![doc(8, 5)], long_ago);
        assert!(leased.take("t", "d8").is_none());
        assert_eq!(leased.records.lock().map(|r| (r.by_id.len(), r.bytes)).unwrap(), (0, 0));
        leased.put(vec![doc(9, 5)]);
        assert!(leased.take("other tenant", "d9").is_none(), "never to another tenant");
        assert_eq!(leased.take("t", "d9").map(|d| d.body.len()), Some(5));
        assert!(leased.take("t", "d9").is_none(), "handed once");
    }

    fn a_delivery() -> Delivery {
        let at = time::OffsetDateTime::UNIX_EPOCH;
        Delivery {
            id: uuid::Uuid::from_u128(1),
            tenant_id: TenantId::new("t").unwrap(),
            webhook_id: WebhookId(uuid::Uuid::from_u128(2)),
            message_id: "m".into(),
            event_type: "integration.created".into(),
            payload: serde_json::from_str(r#"{"webhookId":"in the payload"}"#).unwrap(),
            status: DeliveryStatus::Pending,
            attempts: Vec::new(),
            older_attempts: 0,
            next_attempt_at: Some(at),
            lease_until: None,
            created_at: at,
            updated_at: at,
        }
    }
}
