//! The embedded store against the conformance suite, plus what only this adapter promises:
//! data survives reopening, migrations are idempotent, documents expire.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use im_domain::webhooks::ports::{DeliveryJob, DeliveryQueue};
use im_domain::{Clock, SystemClock};
use im_store_embedded::{EmbeddedStore, containers};
use time::OffsetDateTime;

async fn store(dir: &std::path::Path) -> EmbeddedStore {
    let store = EmbeddedStore::open(dir, Arc::new(SystemClock)).expect("open");
    store.migrate().await.expect("migrate");
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let documents = store.documents();
    im_testkit::store_suite!(store, async |tenant: &im_domain::TenantId| {
        let id = uuid::Uuid::now_v7();
        let body = serde_json::json!({"id": id, "eventType": "integration.created", "tenantId": tenant.as_str(), "unexpected": true});
        let row = (id.to_string(), body.to_string(), OffsetDateTime::now_utc().unix_timestamp() * 1000);
        documents
            .transaction(move |tx, _| {
                tx.execute("INSERT INTO outbox (id, body, created_at) VALUES (?1, ?2, ?3)", row)
                    .map_err(|e| im_domain::DomainError::Unexpected(e.into()))
            })
            .await
            .expect("insert an unreadable entry");
        id
    });
    im_testkit::deliveries::contract(store.deliveries_with_queue().as_ref()).await;
    im_testkit::sync::shard_manager(store.shards().as_ref()).await;
}

/// Each queue is a database of its own (the embedded queue hands out any due job); every
/// consumer of it shares the store, as the one process that owns the data directory does.
struct Queues {
    dir: tempfile::TempDir,
    stores: Mutex<HashMap<String, EmbeddedStore>>,
}

#[async_trait::async_trait]
impl im_testkit::queue::QueueBackend for Queues {
    async fn fresh(&self) -> String {
        let name = uuid::Uuid::new_v4().simple().to_string();
        let store = store(&self.dir.path().join(&name)).await;
        self.stores.lock().unwrap().insert(name.clone(), store);
        name
    }

    async fn consumer(&self, name: &str) -> Arc<dyn DeliveryQueue> {
        self.stores.lock().unwrap()[name].delivery_queue()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_queue_passes_the_queue_contract() {
    let queues = Queues { dir: tempfile::tempdir().unwrap(), stores: Mutex::default() };
    im_testkit::queue::contract(&queues).await;
    im_testkit::queue::a_duplicate_schedule_never_yields_two_concurrent_attempts(&queues).await;
}

/// With the embedded queue, a delivery and its job are written in one transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_and_their_jobs_are_written_together() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    im_testkit::deliveries::records_and_jobs_are_written_together(store.deliveries_with_queue().as_ref(), store.delivery_queue().as_ref())
        .await;
}

/// Creates the deliveries with their jobs (each a new one).
async fn queue_all(deliveries: &dyn im_domain::webhooks::ports::DeliveryRepository, records: &[im_domain::webhooks::delivery::Delivery]) {
    for outcome in deliveries.create_each_queued(records).await.unwrap() {
        outcome.unwrap();
    }
}

/// The one row `sql` finds with the parameter `param`, read in a transaction of the store.
async fn row<T: Send + 'static>(
    store: &EmbeddedStore,
    sql: &'static str,
    param: impl rusqlite::ToSql + Send + 'static,
    read: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> T {
    store
        .documents()
        .transaction(move |tx, _| tx.query_row(sql, [param], read).map_err(|e| im_domain::DomainError::Unexpected(e.into())))
        .await
        .unwrap()
}

/// The take reads the records of the jobs it leases in its own transaction and hands each to
/// the next attempt's read of that delivery (`get_for_attempt`: one read less per attempt; a
/// `get` reads the database); a write through the repository forgets it, and only the
/// delivery's tenant is handed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_take_hands_the_records_it_read_to_the_next_attempts_read() {
    use im_domain::webhooks::delivery::DeliveryStatus;
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let (deliveries, queue) = (store.deliveries_with_queue(), store.delivery_queue());
    let tenant = im_testkit::fresh_tenant();
    let records: Vec<_> = (0..3).map(|_| im_testkit::deliveries::delivery(&tenant, DeliveryStatus::Pending)).collect();
    queue_all(deliveries.as_ref(), &records).await;
    assert_eq!(queue.take_due(10, Duration::from_secs(60)).await.unwrap().len(), 3);
    // Behind the repository's back, so that where each get's answer came from shows.
    let ids: Vec<String> = records.iter().map(|d| d.id.to_string()).collect();
    let changed = ids.clone();
    store
        .documents()
        .transaction(move |tx, _| {
            for id in &changed {
                tx.execute("UPDATE documents SET etag = 'rewritten' WHERE id = ?1", [id])
                    .map_err(|e| im_domain::DomainError::Unexpected(e.into()))?;
            }
            Ok(())
        })
        .await
        .unwrap();

    // Other reads (the API's) read the database, and leave the record waiting.
    assert_eq!(deliveries.get(&tenant, records[0].id).await.unwrap().etag.as_str(), "rewritten", "a get is not handed it");
    let first = deliveries.get_for_attempt(&tenant, records[0].id).await.unwrap();
    assert_ne!(first.etag.as_str(), "rewritten", "the attempt's read after the take is the take's read");
    assert_eq!(first.value, records[0]);
    let again = deliveries.get_for_attempt(&tenant, records[0].id).await.unwrap();
    assert_eq!(again.etag.as_str(), "rewritten", "handed once, then read");

    let mut done = records[1].clone();
    done.status = DeliveryStatus::Succeeded;
    deliveries.replace(&done, None, &[]).await.unwrap();
    let after_write = deliveries.get_for_attempt(&tenant, records[1].id).await.unwrap();
    assert_eq!(after_write.value.status, DeliveryStatus::Succeeded, "a write forgets what the take read");

    let other = im_testkit::fresh_tenant();
    assert!(matches!(deliveries.get_for_attempt(&other, records[2].id).await, Err(im_domain::DomainError::NotFound { .. })));
    let kept = deliveries.get_for_attempt(&tenant, records[2].id).await.unwrap();
    assert_ne!(kept.etag.as_str(), "rewritten", "kept for its own tenant");
    assert_eq!(deliveries.get_for_attempt(&tenant, records[2].id).await.unwrap().etag.as_str(), "rewritten");
}

/// Jobs leased in the table (a row's `leased_until` in the future), and those not.
async fn leased_jobs(store: &EmbeddedStore) -> (i64, i64) {
    let sql = "SELECT count(*) FILTER (WHERE leased_until > ?1), count(*) FILTER (WHERE leased_until <= ?1) FROM delivery_jobs";
    row(store, sql, OffsetDateTime::now_utc().unix_timestamp() * 1000, |r| Ok((r.get(0)?, r.get(1)?))).await
}

/// When the job of a delivery is leased until (unix ms).
async fn lease_of(store: &EmbeddedStore, id: uuid::Uuid) -> i64 {
    row(store, "SELECT leased_until FROM delivery_jobs WHERE delivery_id = ?1", id.to_string(), |r| r.get(0)).await
}

/// The fan-out leases, in the transaction that queues them, as many due jobs as the last take
/// asked for and did not get, and the next takes get them without leasing them again; the
/// others wait in the table as before. A handed job that waited more than a second is let go and
/// leased again by the table's take; one whose row was written since is not handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fan_out_leases_the_jobs_a_take_waits_for() {
    use im_domain::webhooks::delivery::DeliveryStatus;
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let (deliveries, queue) = (store.deliveries_with_queue(), store.delivery_queue());
    let tenant = im_testkit::fresh_tenant();
    let created = |n: usize| {
        let records: Vec<_> = (0..n).map(|_| im_testkit::deliveries::delivery(&tenant, DeliveryStatus::Pending)).collect();
        let deliveries = deliveries.clone();
        async move {
            queue_all(deliveries.as_ref(), &records).await;
            records.into_iter().map(|d| d.id).collect::<Vec<_>>()
        }
    };
    let lease = Duration::from_secs(60);

    // Nothing asked for yet: queued unleased.
    let first = created(1).await;
    assert_eq!(leased_jobs(&store).await, (0, 1));
    let taken = queue.take_due(3, lease).await.unwrap();
    assert_eq!(taken.iter().map(|j| j.delivery_id).collect::<Vec<_>>(), first);
    // That take asked for two more than it got: two of the next three are leased as queued.
    let next = created(3).await;
    assert_eq!(leased_jobs(&store).await, (3, 1), "the first job's lease, and two of the three new ones");
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.extend(queue.take_due(10, lease).await.unwrap().into_iter().map(|j| j.delivery_id));
    }
    seen.sort();
    let mut expected = next.clone();
    expected.sort();
    assert_eq!(seen, expected, "each new job taken once");
    assert!(queue.take_due(10, lease).await.unwrap().is_empty());

    // Jobs waiting in the table go first: while its last read found as many as it asked for,
    // nothing is leased as it is queued.
    let backlog: Vec<_> = (0..2).map(|_| DeliveryJob { tenant_id: tenant.clone(), delivery_id: uuid::Uuid::now_v7() }).collect();
    for job in &backlog {
        queue.schedule(job, OffsetDateTime::now_utc()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(queue.take_due(1, lease).await.unwrap()[0].delivery_id, backlog[0].delivery_id);
    let behind = created(1).await;
    let (leased, waiting) = leased_jobs(&store).await;
    assert_eq!(waiting, 2, "the backlog's second job and the new one wait in the table");
    let mut rest: Vec<_> = queue.take_due(10, lease).await.unwrap().into_iter().map(|j| j.delivery_id).collect();
    rest.sort();
    let mut expected = vec![backlog[1].delivery_id, behind[0]];
    expected.sort();
    assert_eq!(rest, expected, "taken from the table");
    assert_eq!(leased_jobs(&store).await, (leased + 2, 0));

    let ids = |jobs: Vec<DeliveryJob>| jobs.into_iter().map(|j| j.delivery_id).collect::<Vec<_>>();

    // A take of one whose turn it is to read the table still gets a handed job.
    assert!(queue.take_due(1, lease).await.unwrap().is_empty());
    let one = created(1).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(ids(queue.take_due(1, lease).await.unwrap()), one, "handed after the table's read");

    // A job whose row was written since it was handed is not handed out: its row says when.
    assert!(queue.take_due(2, lease).await.unwrap().is_empty());
    let moved = created(1).await;
    let later = DeliveryJob { tenant_id: tenant.clone(), delivery_id: moved[0] };
    queue.schedule(&later, OffsetDateTime::now_utc() + time::Duration::hours(1)).await.unwrap();
    assert!(queue.take_due(2, lease).await.unwrap().is_empty(), "due in an hour");

    // A handed job's lease is as fresh as a take's: one that waited more than a second is let
    // go, and the table's take leases it again at once.
    assert!(queue.take_due(2, lease).await.unwrap().is_empty());
    let late = created(1).await;
    let first = lease_of(&store, late[0]).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(ids(queue.take_due(2, lease).await.unwrap()), late, "taken once");
    assert!(lease_of(&store, late[0]).await > first, "with a new lease");
}

/// The take also reads the endpoints of the deliveries it leased, and hands each to as many
/// gets as it leased deliveries of it (each attempt reads its endpoint); a write through the
/// repository forgets it; only the endpoint's tenant is handed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_take_hands_the_endpoints_it_read_to_the_attempts() {
    use im_domain::webhooks::delivery::DeliveryStatus;
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let (deliveries, queue, webhooks) = (store.deliveries_with_queue(), store.delivery_queue(), store.webhooks());
    let tenant = im_testkit::fresh_tenant();
    let webhook = im_testkit::webhooks::webhook(&tenant);
    webhooks.create(&webhook).await.unwrap();
    let queued = |n: usize| {
        let records: Vec<_> = (0..n)
            .map(|_| {
                let mut d = im_testkit::deliveries::delivery(&tenant, DeliveryStatus::Pending);
                d.webhook_id = webhook.id;
                d
            })
            .collect();
        let deliveries = deliveries.clone();
        async move { queue_all(deliveries.as_ref(), &records).await }
    };
    // Behind the repository's back, so that where each get's answer came from shows.
    let rewrite = |etag: &'static str| {
        let id = webhook.id.to_string();
        let documents = store.documents();
        async move {
            documents
                .transaction(move |tx, _| {
                    tx.execute("UPDATE documents SET etag = ?2 WHERE id = ?1", [id.as_str(), etag])
                        .map_err(|e| im_domain::DomainError::Unexpected(e.into()))
                })
                .await
                .unwrap();
        }
    };

    queued(2).await;
    assert_eq!(queue.take_due(10, Duration::from_secs(60)).await.unwrap().len(), 2);
    rewrite("rewritten").await;
    assert!(matches!(webhooks.get(&im_testkit::fresh_tenant(), webhook.id).await, Err(im_domain::DomainError::NotFound { .. })));
    for _ in 0..2 {
        let handed = webhooks.get(&tenant, webhook.id).await.unwrap();
        assert_ne!(handed.etag.as_str(), "rewritten", "each attempt of the take gets the take's read");
        assert_eq!(handed.value, webhook);
    }
    assert_eq!(webhooks.get(&tenant, webhook.id).await.unwrap().etag.as_str(), "rewritten", "then it is read");

    queued(1).await;
    assert_eq!(queue.take_due(10, Duration::from_secs(60)).await.unwrap().len(), 1);
    let mut changed = webhook.clone();
    changed.description = "changed through the repository".into();
    webhooks.replace(&changed, None).await.unwrap();
    assert_eq!(webhooks.get(&tenant, webhook.id).await.unwrap().value, changed, "a write forgets what the take read");
}

/// With the delivery queue elsewhere (RabbitMQ), the records the fan-out creates, and their
/// endpoints, are handed to the first attempts' reads, once each; what another instance
/// writes meanwhile makes the handed version's conditional write fail, never overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fan_out_hands_its_records_and_endpoints_to_the_first_attempts() {
    use im_domain::webhooks::delivery::DeliveryStatus;
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let (deliveries, webhooks) = (store.deliveries(), store.webhooks());
    let tenant = im_testkit::fresh_tenant();
    let webhook = im_testkit::webhooks::webhook(&tenant);
    webhooks.create(&webhook).await.unwrap();
    let record = |status| {
        let mut d = im_testkit::deliveries::delivery(&tenant, status);
        d.webhook_id = webhook.id;
        d
    };
    // Behind the repositories' backs, so that where each get's answer came from shows.
    let rewrite = || {
        let documents = store.documents();
        async move {
            documents
                .transaction(|tx, _| {
                    tx.execute("UPDATE documents SET etag = 'rewritten'", []).map_err(|e| im_domain::DomainError::Unexpected(e.into()))
                })
                .await
                .unwrap();
        }
    };

    let created = [record(DeliveryStatus::Pending), record(DeliveryStatus::Pending), record(DeliveryStatus::Skipped)];
    for outcome in deliveries.create_each(&created).await.unwrap() {
        outcome.unwrap();
    }
    rewrite().await;
    assert!(deliveries.get_for_attempt(&im_testkit::fresh_tenant(), created[0].id).await.is_err(), "never to another tenant");
    for pending in &created[..2] {
        assert_eq!(deliveries.get(&tenant, pending.id).await.unwrap().etag.as_str(), "rewritten", "a get reads the database");
        let handed = deliveries.get_for_attempt(&tenant, pending.id).await.unwrap();
        assert_ne!(handed.etag.as_str(), "rewritten", "the first attempt gets the record as written");
        assert_eq!(&handed.value, pending);
        assert_eq!(deliveries.get_for_attempt(&tenant, pending.id).await.unwrap().etag.as_str(), "rewritten", "then it is read");
    }
    let skipped = deliveries.get_for_attempt(&tenant, created[2].id).await.unwrap();
    assert_eq!(skipped.etag.as_str(), "rewritten", "a skipped one is not attempted");
    for _ in 0..2 {
        let handed = webhooks.get(&tenant, webhook.id).await.unwrap();
        assert_ne!(handed.etag.as_str(), "rewritten", "each first attempt gets the endpoint as the fan-out read it");
        assert_eq!(handed.value, webhook);
    }
    assert_eq!(webhooks.get(&tenant, webhook.id).await.unwrap().etag.as_str(), "rewritten", "then it is read");

    // A write through the repository forgets the handed record.
    let mine = record(DeliveryStatus::Pending);
    deliveries.create_each(std::slice::from_ref(&mine)).await.unwrap().remove(0).unwrap();
    let mut changed = mine.clone();
    changed.status = DeliveryStatus::Succeeded;
    deliveries.replace(&changed, None, &[]).await.unwrap();
    assert_eq!(deliveries.get_for_attempt(&tenant, mine.id).await.unwrap().value, changed);

    // Another instance on the same database attempts the delivery first: the handed version's
    // conditional write fails, and the attempt reads the delivery again.
    let theirs = record(DeliveryStatus::Pending);
    deliveries.create_each(std::slice::from_ref(&theirs)).await.unwrap().remove(0).unwrap();
    let other = crate::store(dir.path()).await.deliveries();
    let current = other.get(&tenant, theirs.id).await.unwrap();
    let mut delivered = theirs.clone();
    delivered.status = DeliveryStatus::Succeeded;
    other.replace(&delivered, Some(current.etag), &[]).await.unwrap();
    assert_eq!(deliveries.get(&tenant, theirs.id).await.unwrap().value.status, DeliveryStatus::Succeeded, "a get reads the database");
    let handed = deliveries.get_for_attempt(&tenant, theirs.id).await.unwrap();
    assert_eq!(handed.value.status, DeliveryStatus::Pending, "handed as the fan-out wrote it");
    let mut held = handed.value.clone();
    held.lease_until = Some(OffsetDateTime::now_utc());
    assert!(matches!(deliveries.replace(&held, Some(handed.etag), &[]).await, Err(im_domain::DomainError::PreconditionFailed)));
    assert_eq!(deliveries.get(&tenant, theirs.id).await.unwrap().value.status, DeliveryStatus::Succeeded);
}

/// What only the embedded queue promises: it has one consumer, this process, so at start the
/// jobs a crashed predecessor had leased are due again at once, not when their lease ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_releases_the_leases_of_the_crashed_process() {
    let dir = tempfile::tempdir().unwrap();
    let job = im_testkit::queue::fresh_job();
    {
        let crashed = store(dir.path()).await;
        let queue = crashed.delivery_queue();
        queue.schedule(&job, OffsetDateTime::now_utc()).await.unwrap();
        assert_eq!(queue.take_due(10, Duration::from_secs(3600)).await.unwrap(), vec![job.clone()]);
    }
    let restarted = store(dir.path()).await;
    let queue = restarted.delivery_queue();
    assert!(queue.take_due(10, Duration::from_secs(60)).await.unwrap().is_empty(), "leased for an hour");
    assert_eq!(restarted.release_delivery_leases().await.unwrap(), 1);
    assert_eq!(queue.take_due(10, Duration::from_secs(60)).await.unwrap(), vec![job], "due again at start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_reopening_and_migrations_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let tenant = im_testkit::fresh_tenant();
    let item = im_testkit::integrations::integration(&tenant, "github");
    {
        let store = EmbeddedStore::open(dir.path(), Arc::new(SystemClock)).unwrap();
        let report = store.migrate().await.unwrap();
        assert!(report.version >= 7, "every migration, up to the Shard Manager's change index");
        assert_eq!(report.applied.len() as i64, report.version, "migrations are numbered 1, 2, 3... without gaps");
        store.integrations().create(&item, &[]).await.unwrap();
    }
    let store = EmbeddedStore::open(dir.path(), Arc::new(SystemClock)).unwrap();
    let report = store.migrate().await.unwrap();
    assert!(report.applied.is_empty(), "a second migrate applies nothing");
    assert_eq!(store.integrations().get(&tenant, item.id).await.unwrap().value, item);
}

struct ManualClock(Mutex<OffsetDateTime>);

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap()
    }
}

/// The start of the minute of `at`, and that minute's second `second`.
fn in_minute(at: OffsetDateTime, second: u8) -> OffsetDateTime {
    at.replace_nanosecond(0).and_then(|at| at.replace_second(second)).unwrap()
}

/// A document expires at the end of the minute in which its TTL ends: alive until then, gone
/// after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_expire_after_their_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock(Mutex::new(in_minute(OffsetDateTime::now_utc(), 20))));
    let store = EmbeddedStore::open(dir.path(), clock.clone()).unwrap();
    store.migrate().await.unwrap();
    let docs = store.documents();
    let week = Duration::from_secs(7 * 24 * 3600);
    docs.create(containers::WEBHOOK_DELIVERIES, "t1".into(), "d1".into(), "{}".into(), Some(week)).await.unwrap();
    docs.create(containers::SYNC_EXECUTIONS, "t1".into(), "e1".into(), "{}".into(), Some(Duration::from_secs(30 * 24 * 3600)))
        .await
        .unwrap();
    docs.create(containers::WEBHOOKS, "t1".into(), "w1".into(), "{}".into(), None).await.unwrap();

    *clock.0.lock().unwrap() += time::Duration::days(7) + time::Duration::seconds(39);
    assert!(docs.get(containers::WEBHOOK_DELIVERIES, "t1".into(), "d1".into()).await.unwrap().is_some(), "alive to the minute's end");
    *clock.0.lock().unwrap() += time::Duration::seconds(1);
    assert!(docs.get(containers::WEBHOOK_DELIVERIES, "t1".into(), "d1".into()).await.unwrap().is_none(), "gone after 7 days");
    assert!(docs.get(containers::SYNC_EXECUTIONS, "t1".into(), "e1".into()).await.unwrap().is_some(), "executions live 30 days");
    // An expired id can be used again.
    docs.create(containers::WEBHOOK_DELIVERIES, "t1".into(), "d1".into(), "{}".into(), Some(week)).await.unwrap();

    *clock.0.lock().unwrap() += time::Duration::days(30);
    assert_eq!(store.purge_expired().await.unwrap(), 2, "the purge deletes both expired documents");
    assert!(docs.get(containers::WEBHOOKS, "t1".into(), "w1".into()).await.unwrap().is_some(), "documents without TTL stay");
}

/// A replace moves the expiry to its own write's: in the same second as the write before (the
/// expiry is then left as it is) and later (it is then written). Either way a stale version is
/// refused and changes nothing; a document past its expiry is not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replace_moves_the_expiry_to_its_own_write() {
    use im_domain::{DomainError, ETag};
    let dir = tempfile::tempdir().unwrap();
    // At the start of a minute: the writes' expiries, rounded up to whole minutes, fall where
    // their TTLs end.
    let start = in_minute(OffsetDateTime::now_utc(), 0);
    let clock = Arc::new(ManualClock(Mutex::new(start)));
    let store = EmbeddedStore::open(dir.path(), clock.clone()).unwrap();
    store.migrate().await.unwrap();
    let docs = store.documents();
    let day = Duration::from_secs(24 * 3600);
    let (deliveries, webhooks) = (containers::WEBHOOK_DELIVERIES, containers::WEBHOOKS);
    let replace = |container, body: &str, if_match: Option<ETag>, ttl| {
        docs.replace(container, "document", "t1".into(), "t1".into(), "d1".into(), body.into(), if_match, ttl, &[])
    };
    let body = || async { docs.get(deliveries, "t1".into(), "d1".into()).await.unwrap().map(|d| d.body) };
    let set_clock = |at: OffsetDateTime| *clock.0.lock().unwrap() = at;

    let first = docs.create(deliveries, "t1".into(), "d1".into(), r#"{"v":1}"#.into(), Some(day)).await.unwrap();
    let second = replace(deliveries, r#"{"v":2}"#, Some(first.clone()), Some(day)).await.unwrap();
    assert_ne!(first, second, "a new version");
    for stale in [Some(first.clone()), Some(ETag::new("other"))] {
        assert!(matches!(replace(deliveries, r#"{"v":0}"#, stale, Some(day)).await, Err(DomainError::PreconditionFailed)));
    }
    assert_eq!(body().await.as_deref(), Some(r#"{"v":2}"#), "the refused writes changed nothing");

    // Twelve hours on: the expiry moves a day past this write.
    set_clock(start + time::Duration::hours(12));
    assert!(matches!(replace(deliveries, r#"{"v":0}"#, Some(first), Some(day)).await, Err(DomainError::PreconditionFailed)));
    replace(deliveries, r#"{"v":3}"#, Some(second), Some(day)).await.unwrap();
    set_clock(start + time::Duration::hours(36) - time::Duration::seconds(1));
    assert_eq!(body().await.as_deref(), Some(r#"{"v":3}"#), "alive a day after the last write, not the first");
    let fourth = replace(deliveries, r#"{"v":4}"#, None, Some(day)).await.unwrap();
    set_clock(start + time::Duration::hours(60) - time::Duration::seconds(2));
    assert_eq!(body().await.as_deref(), Some(r#"{"v":4}"#));
    set_clock(start + time::Duration::hours(60) + time::Duration::seconds(1));
    assert_eq!(body().await, None, "gone a day after the last write");
    assert!(matches!(replace(deliveries, r#"{"v":5}"#, Some(fourth), Some(day)).await, Err(DomainError::NotFound { .. })));

    // Without a TTL, a replaced document is still kept.
    let kept = docs.create(webhooks, "t1".into(), "d1".into(), "{}".into(), None).await.unwrap();
    replace(webhooks, r#"{"v":1}"#, Some(kept), None).await.unwrap();
    set_clock(start + time::Duration::days(400));
    assert!(docs.get(webhooks, "t1".into(), "d1".into()).await.unwrap().is_some());
}

/// A document read again with nothing committed since is answered from the reader's copy: it
/// still expires on time, and a change made by another connection (another instance) is seen.
#[tokio::test]
async fn a_document_read_again_expires_on_time_and_shows_changes_from_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock(Mutex::new(in_minute(OffsetDateTime::now_utc(), 0))));
    let store = EmbeddedStore::open(dir.path(), clock.clone()).unwrap();
    store.migrate().await.unwrap();
    let docs = store.documents();
    docs.create(containers::WEBHOOK_DELIVERIES, "t1".into(), "d1".into(), "{}".into(), Some(Duration::from_secs(60))).await.unwrap();
    docs.create(containers::WEBHOOKS, "t1".into(), "w1".into(), r#"{"v":1}"#.into(), None).await.unwrap();
    let other = rusqlite::Connection::open(dir.path().join(im_store_embedded::DATABASE_FILE)).unwrap();
    // Everything copied into the database file: reads keep their snapshot from here.
    other.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())).unwrap();
    let get = |container, id: &str| docs.get(container, "t1".into(), id.into());

    for _ in 0..2 {
        assert!(get(containers::WEBHOOK_DELIVERIES, "d1").await.unwrap().is_some());
    }
    *clock.0.lock().unwrap() += time::Duration::seconds(61);
    assert!(get(containers::WEBHOOK_DELIVERIES, "d1").await.unwrap().is_none(), "expired, though nothing was committed");

    let first = get(containers::WEBHOOKS, "w1").await.unwrap().unwrap();
    assert_eq!(get(containers::WEBHOOKS, "w1").await.unwrap().unwrap().body, first.body);
    other
        .execute("UPDATE documents SET body = '{\"v\":2}', etag = 'e2' WHERE container = 'integration_webhooks' AND id = 'w1'", [])
        .unwrap();
    let changed = get(containers::WEBHOOKS, "w1").await.unwrap().unwrap();
    assert_eq!((changed.body.as_str(), changed.etag.as_str()), (r#"{"v":2}"#, "e2"));
    assert!(get(containers::WEBHOOKS, "w2").await.unwrap().is_none());
    other.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())).unwrap();
    assert!(get(containers::WEBHOOKS, "w2").await.unwrap().is_none());
    other
        .execute("INSERT INTO documents (container, pk, id, etag, body) VALUES ('integration_webhooks', 't1', 'w2', 'e3', '{}')", [])
        .unwrap();
    assert!(get(containers::WEBHOOKS, "w2").await.unwrap().is_some(), "a document created elsewhere is seen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queueing_a_replayed_job_changes_neither_its_due_time_nor_its_lease() {
    use im_domain::webhooks::ports::DeliveryJob;
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let queue = store.delivery_queue();
    let now = OffsetDateTime::now_utc();
    let waiting = DeliveryJob { tenant_id: im_testkit::fresh_tenant(), delivery_id: uuid::Uuid::now_v7() };
    let running = DeliveryJob { tenant_id: waiting.tenant_id.clone(), delivery_id: uuid::Uuid::now_v7() };
    queue.schedule(&waiting, now + time::Duration::minutes(5)).await.unwrap();
    queue.schedule(&running, now).await.unwrap();
    assert_eq!(queue.take_due(10, Duration::from_secs(120)).await.unwrap(), vec![running.clone()]);

    queue.schedule_if_absent(&waiting, now).await.unwrap();
    queue.schedule_if_absent(&running, now).await.unwrap();

    assert!(queue.take_due(10, Duration::from_secs(120)).await.unwrap().is_empty(), "a replay made a waiting or leased job due");
    let next = queue.next_due().await.unwrap().unwrap();
    assert!(next > now + time::Duration::seconds(100), "the waiting retry moved to {next}");

    let fresh = DeliveryJob { tenant_id: waiting.tenant_id.clone(), delivery_id: uuid::Uuid::now_v7() };
    queue.schedule_if_absent(&fresh, now).await.unwrap();
    assert_eq!(queue.take_due(10, Duration::from_secs(120)).await.unwrap(), vec![fresh], "a job that was missing is queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_write_queue_pushes_back_as_unavailable() {
    use im_domain::DomainError;
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(im_store_embedded::Db::with_write_queue(&dir.path().join("queue.db"), Arc::new(SystemClock), 1).unwrap());
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let gate = Arc::new(Mutex::new(gate));
    let holding = {
        let (db, gate) = (db.clone(), gate.clone());
        tokio::spawn(async move {
            db.write(move |_| {
                let _ = gate.lock().unwrap().recv();
                Ok(())
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiting = {
        let db = db.clone();
        tokio::spawn(async move { db.write(|_| Ok(())).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    let refused = db.write(|_| Ok(())).await;
    assert!(matches!(refused, Err(DomainError::Unavailable { retry_after: Some(_), .. })), "{refused:?}");

    // A background worker's writes still get in, in the room kept for them; one past that room
    // waits for it instead of being refused.
    let worker_write = || {
        let db = db.clone();
        tokio::spawn(im_store_embedded::as_worker(async move { db.write(|_| Ok(())).await }))
    };
    let in_room: Vec<_> = (0..im_store_embedded::WORKER_ROOM).map(|_| worker_write()).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for write in &in_room {
        assert!(!write.is_finished(), "a worker's write was answered before the writer took it: refused");
    }
    assert_eq!(db.queued_writes(), 1 + im_store_embedded::WORKER_ROOM, "the workers' writes are queued, not waiting for room");
    let past_room = worker_write();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!past_room.is_finished(), "a worker's write past its room waits, not refused");
    let refused = db.write(|_| Ok(())).await;
    assert!(matches!(refused, Err(DomainError::Unavailable { .. })), "a request's write is still refused: {refused:?}");

    release.send(()).unwrap();
    holding.await.unwrap().unwrap();
    waiting.await.unwrap().unwrap();
    for write in in_room {
        write.await.unwrap().expect("a worker's write in its room");
    }
    past_room.await.unwrap().expect("a worker's write that waited for room");
    db.write(|_| Ok(())).await.expect("room again once the writer caught up");
}

/// Writes queued together commit together. A write that fails having changed nothing leaves
/// the others of its group alone; one that fails after changing rows (`Db::write` runs no
/// savepoint per write) rolls back its whole group, whose other writes are told `Unavailable`:
/// nothing is ever half-written. `Db::write_in_savepoint` rolls back alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_failing_after_changes_never_commits_half_of_it() {
    use im_domain::DomainError;
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(im_store_embedded::Db::open(&dir.path().join("groups.db"), Arc::new(SystemClock)).unwrap());
    db.write(|tx| tx.execute_batch("CREATE TABLE t (v TEXT PRIMARY KEY)").map_err(|e| DomainError::Unexpected(e.into()))).await.unwrap();
    let insert = |tx: &rusqlite::Connection, v: &str| {
        tx.execute("INSERT INTO t (v) VALUES (?1)", [v]).map(|_| ()).map_err(|e| DomainError::Unexpected(e.into()))
    };
    let refused = || DomainError::Conflict("refused".into());
    // Holds the writer until the writes of one round are all queued, so they form one group.
    let round = |writes: Vec<(&'static str, bool, bool)>| {
        let db = db.clone();
        async move {
            let (release, gate) = std::sync::mpsc::channel::<()>();
            let holding = {
                let db = db.clone();
                tokio::spawn(async move { db.write(move |_| Ok(gate.recv().map_err(|_| ()))).await })
            };
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut answers = Vec::new();
            for (value, fail, savepoint) in writes {
                let db = db.clone();
                let job = move |tx: &rusqlite::Connection| {
                    if value != "-" {
                        insert(tx, value)?;
                    }
                    if fail { Err(refused()) } else { Ok(()) }
                };
                answers.push(tokio::spawn(async move { if savepoint { db.write_in_savepoint(job).await } else { db.write(job).await } }));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            release.send(()).unwrap();
            holding.await.unwrap().unwrap().unwrap();
            let mut results = Vec::new();
            for answer in answers {
                results.push(answer.await.unwrap());
            }
            results
        }
    };
    let stored = || {
        let db = db.clone();
        async move {
            db.write(|tx| {
                let mut s = tx.prepare("SELECT v FROM t ORDER BY v").unwrap();
                Ok(s.query_map([], |r| r.get::<_, String>(0)).unwrap().map(Result::unwrap).collect::<Vec<_>>())
            })
            .await
            .unwrap()
        }
    };

    // Failing before changing anything: the others commit.
    let results = round(vec![("a", false, false), ("-", true, false), ("b", false, false)]).await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(matches!(results[1], Err(DomainError::Conflict(_))), "{results:?}");
    assert_eq!(stored().await, vec!["a", "b"]);

    // Failing after a change: its group is rolled back, the failed write keeps its own error.
    let results = round(vec![("c", false, false), ("d", true, false), ("e", false, false)]).await;
    assert!(matches!(results[0], Err(DomainError::Unavailable { .. })), "{results:?}");
    assert!(matches!(results[1], Err(DomainError::Conflict(_))), "{results:?}");
    assert!(matches!(results[2], Err(DomainError::Unavailable { .. })), "{results:?}");
    assert_eq!(stored().await, vec!["a", "b"], "nothing of the group is committed");

    // In a savepoint of its own, it rolls back alone.
    let results = round(vec![("f", false, false), ("g", true, true), ("h", false, false)]).await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(matches!(results[1], Err(DomainError::Conflict(_))), "{results:?}");
    assert_eq!(stored().await, vec!["a", "b", "f", "h"]);
}

/// Commits reach the database file through the checkpointer thread, not in the writer's commits
/// (the writer never checkpoints: `wal_autocheckpoint` is 0 there), so the WAL does not grow
/// without end while the writer keeps committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpointer_copies_commits_into_the_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.db");
    let db = im_store_embedded::Db::open(&path, Arc::new(SystemClock)).unwrap();
    db.write(|tx| tx.execute_batch("CREATE TABLE blobs (b BLOB)").map_err(|e| im_domain::DomainError::Unexpected(e.into()))).await.unwrap();
    let empty = std::fs::metadata(&path).unwrap().len();
    for _ in 0..64 {
        db.write(|tx| {
            tx.execute("INSERT INTO blobs (b) VALUES (zeroblob(65536))", [])
                .map(|_| ())
                .map_err(|e| im_domain::DomainError::Unexpected(e.into()))
        })
        .await
        .unwrap();
    }
    // 4 MiB committed: only a checkpoint puts it into the database file.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::metadata(&path).unwrap().len() < empty + 4 * 1024 * 1024 {
        assert!(std::time::Instant::now() < deadline, "no checkpoint copied the commits into {}", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A bound `LIMIT` does not make SQLite prepare the statement again at each run (the planner
/// looks at no bound value): the cached statements stay prepared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_with_a_bound_limit_are_prepared_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = im_store_embedded::Db::open(&dir.path().join("plans.db"), Arc::new(SystemClock)).unwrap();
    db.write(|tx| {
        tx.execute_batch("CREATE TABLE t (a INTEGER); CREATE INDEX t_a ON t (a) WHERE a > 0; INSERT INTO t VALUES (1), (2), (3);")
            .map_err(|e| im_domain::DomainError::Unexpected(e.into()))
    })
    .await
    .unwrap();
    let prepared_again = db
        .read(|conn| {
            let sql = "SELECT a FROM t WHERE a > ?1 ORDER BY a LIMIT ?2";
            for limit in 1..=3 {
                let rows = conn.prepare_cached(sql)?.query_map(rusqlite::params![0, limit], |r| r.get::<_, i64>(0))?.count();
                assert_eq!(rows, limit as usize);
            }
            Ok(conn.prepare_cached(sql)?.get_status(rusqlite::StatementStatus::RePrepare))
        })
        .await
        .unwrap();
    assert_eq!(prepared_again, 0, "the statement was prepared again at each run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_busy_past_its_timeout_is_unavailable() {
    use im_domain::DomainError;
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let other = rusqlite::Connection::open(dir.path().join(im_store_embedded::DATABASE_FILE)).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let item = im_testkit::integrations::integration(&im_testkit::fresh_tenant(), "github");

    let busy = store.integrations().create(&item, &[]).await;

    assert!(matches!(busy, Err(DomainError::Unavailable { retry_after: Some(_), .. })), "{busy:?}");
    other.execute_batch("ROLLBACK").unwrap();
    store.integrations().create(&item, &[]).await.expect("writes again once the lock is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_records_pass_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    im_testkit::idempotency::contract(store.idempotency().as_ref()).await;
    im_testkit::idempotency::service(store.idempotency()).await;
}

/// The deliverable events are read by the webhook fan-out alone; `sync.task.paused` by someone
/// else too.
struct FanOutReads;
impl im_domain::ports::EventReaders for FanOutReads {
    fn reads(&self, _: im_domain::events::EventType) -> bool {
        true
    }
    fn only_for_tenants_with_webhooks(&self, event_type: im_domain::events::EventType) -> bool {
        im_domain::webhooks::endpoint::DELIVERABLE.contains(&event_type) && event_type != im_domain::events::EventType::SyncTaskPaused
    }
}

/// Told who reads the events, the store does not write an event that only the webhook fan-out
/// reads when its tenant has no webhook endpoint at the write; it writes it once the tenant has
/// one, and always writes the events something else reads. The relay is woken after the
/// commits that wrote an event, not after those whose event was not written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_only_the_webhook_fan_out_reads_need_a_tenant_with_webhooks() {
    use im_domain::events::EventType;

    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let (integrations, outbox) = (store.integrations(), store.outbox());
    let pending = async || outbox.stats().await.unwrap().pending;
    let create = async |tenant: &im_domain::TenantId, event_type: EventType| {
        let integration = im_testkit::integrations::integration(tenant, "github");
        let event = im_testkit::outbox::event(tenant, event_type, &integration.id.to_string());
        integrations.create(&integration, std::slice::from_ref(&event)).await.unwrap();
        event
    };
    let tenant = im_testkit::fresh_tenant();
    // The relay is woken after each commit that wrote an event, and after no other.
    let wakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let woken = wakes.clone();
    store.on_outbox_commit(Arc::new(move || {
        woken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }));
    let wakes = || wakes.load(std::sync::atomic::Ordering::SeqCst);

    create(&tenant, EventType::IntegrationCreated).await;
    assert_eq!(pending().await, 1, "until told its readers, the store writes every event");
    assert_eq!(wakes(), 1, "an event written wakes the relay");

    store.write_events_for(Arc::new(FanOutReads));
    create(&tenant, EventType::IntegrationCreated).await;
    assert_eq!(pending().await, 1, "no webhook endpoint: not written");
    assert_eq!(wakes(), 1, "an event not written wakes nobody");
    create(&tenant, EventType::SyncTaskPaused).await;
    assert_eq!(pending().await, 2, "read by something else: written");
    assert_eq!(wakes(), 2);

    store.documents().create(containers::WEBHOOKS, tenant.to_string(), "wh-1".into(), "{}".into(), None).await.unwrap();
    assert_eq!(wakes(), 2, "a write without events wakes nobody");
    let event = create(&tenant, EventType::IntegrationCreated).await;
    assert_eq!(pending().await, 3, "the tenant has an endpoint now: written");
    assert_eq!(wakes(), 3);
    // Written out in the write (once the endpoint was seen): the event as it was made.
    let recorded = outbox.pending(10).await.unwrap();
    assert_eq!(recorded.iter().find(|e| e.id == event.id), Some(&event));
    create(&im_testkit::fresh_tenant(), EventType::IntegrationCreated).await;
    assert_eq!(pending().await, 3, "another tenant's endpoint does not count");
    assert_eq!(wakes(), 3);
}

/// The writes of one group read whether a tenant has an endpoint, and a provider's version,
/// once: a write of the group that changes either (an endpoint created, a provider replaced) is
/// seen by the group's later writes, and a change committed by another connection between two
/// groups by the next group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writes_of_a_group_see_what_the_group_and_others_changed() {
    use im_domain::events::EventType;

    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    store.write_events_for(Arc::new(FanOutReads));
    let (integrations, providers, outbox, docs) = (store.integrations(), store.providers(), store.outbox(), store.documents());
    let written = async |event: &im_domain::events::DomainEvent| outbox.pending(100).await.unwrap().iter().any(|e| e.id == event.id);
    let provider_id = format!("grouped-{}", uuid::Uuid::now_v7().simple());
    let provider = im_testkit::providers::provider(&provider_id, "grouped", im_domain::provider::AuthMode::Bearer);
    let first = providers.create(&provider).await.unwrap();
    let tenant = im_testkit::fresh_tenant();
    let made = |tenant: &im_domain::TenantId| {
        let integration = im_testkit::integrations::integration(tenant, &provider_id);
        let event = im_testkit::outbox::event(tenant, EventType::IntegrationCreated, &integration.id.to_string());
        (integration, event)
    };

    // The writer held by a write that waits, so that the writes submitted meanwhile make one
    // group, in the order they were submitted (each is submitted at its first poll).
    let (started, running) = std::sync::mpsc::channel();
    let (release, held) = std::sync::mpsc::channel::<()>();
    let holding = store.documents();
    let holder = tokio::spawn(async move {
        holding
            .transaction(move |_, _| {
                started.send(()).unwrap();
                held.recv().unwrap();
                Ok(())
            })
            .await
    });
    tokio::task::spawn_blocking(move || running.recv().unwrap()).await.unwrap();
    let ((a, a_event), (b, b_event), (c, c_event)) = (made(&tenant), made(&tenant), made(&tenant));
    let mut create_a = std::pin::pin!(integrations.create_for_provider(&a, &first, std::slice::from_ref(&a_event)));
    let mut endpoint = std::pin::pin!(docs.create(containers::WEBHOOKS, tenant.to_string(), "wh-1".into(), "{}".into(), None));
    let mut create_b = std::pin::pin!(integrations.create_for_provider(&b, &first, std::slice::from_ref(&b_event)));
    let mut replaced = std::pin::pin!(providers.replace(&provider, Some(first.clone())));
    let mut create_c = std::pin::pin!(integrations.create_for_provider(&c, &first, std::slice::from_ref(&c_event)));
    assert!(tokio::time::timeout(Duration::ZERO, &mut create_a).await.is_err(), "submitted, waiting");
    assert!(tokio::time::timeout(Duration::ZERO, &mut endpoint).await.is_err());
    assert!(tokio::time::timeout(Duration::ZERO, &mut create_b).await.is_err());
    assert!(tokio::time::timeout(Duration::ZERO, &mut replaced).await.is_err());
    assert!(tokio::time::timeout(Duration::ZERO, &mut create_c).await.is_err());
    release.send(()).unwrap();
    holder.await.unwrap().unwrap();
    create_a.await.expect("the provider's version when the group began");
    endpoint.await.unwrap();
    create_b.await.expect("the provider unchanged yet");
    let second = replaced.await.unwrap();
    let err = create_c.await.expect_err("the provider was replaced earlier in the group");
    assert!(matches!(err, im_domain::DomainError::PreconditionFailed), "{err:?}");
    assert!(!written(&a_event).await, "no endpoint yet when it was written");
    assert!(written(&b_event).await, "the endpoint created earlier in the group is seen");

    // Another connection (another process, say) creates an endpoint between two groups.
    let other = im_testkit::fresh_tenant();
    let (d, d_event) = made(&other);
    integrations.create_for_provider(&d, &second, std::slice::from_ref(&d_event)).await.unwrap();
    assert!(!written(&d_event).await);
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute(
        "INSERT INTO documents (container, pk, id, etag, body) VALUES (?1, ?2, 'wh-2', 'e', '{}')",
        rusqlite::params![containers::WEBHOOKS, other.to_string()],
    )
    .unwrap();
    let (e, e_event) = made(&other);
    integrations.create_for_provider(&e, &second, std::slice::from_ref(&e_event)).await.unwrap();
    assert!(written(&e_event).await, "the endpoint another connection committed is seen");
}

/// With a relay told (`hand_off_events`), an event committed is handed to it in memory and its
/// row is claimed for it: no other relay's claim takes it until the relay releases it or the
/// claim ends; the relay is not woken for it. A write that fails hands nothing over. Beyond the
/// relay's room, or while it is paused, rows are written unclaimed and wake the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_handed_to_the_relay_claimed_at_commit() {
    use im_domain::DomainError;
    use im_domain::events::{DomainEvent, EventType};
    use im_store_embedded::OutboxHandoff;

    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let (integrations, outbox) = (store.integrations(), store.outbox());
    let handed: Arc<Mutex<Vec<DomainEvent>>> = Arc::default();
    let sink = handed.clone();
    let decoded = move |events: Vec<im_store_embedded::HandedEvent>| {
        let events = events.into_iter().map(|handed| {
            let event: DomainEvent = serde_json::from_str(&handed.body).unwrap();
            assert_eq!(event.id, handed.id);
            let left = handed.claim_left_ms();
            assert!((55_000..=60_000).contains(&left), "claimed for the handoff's lease: {left} ms left");
            event
        });
        sink.lock().unwrap().extend(events);
    };
    let handoff = Arc::new(OutboxHandoff::new("handed", Duration::from_secs(60), 2, Box::new(decoded)));
    store.hand_off_events(handoff.clone());
    let wakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let woken = wakes.clone();
    store.on_outbox_commit(Arc::new(move || {
        woken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }));
    let wakes = || wakes.load(std::sync::atomic::Ordering::SeqCst);
    let tenant = im_testkit::fresh_tenant();
    let create = async || {
        let integration = im_testkit::integrations::integration(&tenant, "github");
        let event = im_testkit::outbox::event(&tenant, EventType::IntegrationCreated, &integration.id.to_string());
        integrations.create(&integration, std::slice::from_ref(&event)).await.unwrap();
        (integration, event)
    };
    let long = Duration::from_secs(60);

    let (first, first_event) = create().await;
    assert_eq!(*handed.lock().unwrap(), vec![first_event.clone()], "handed over at commit");
    assert_eq!(wakes(), 0, "nobody else is woken for it");
    assert!(outbox.claim("other", 10, long).await.unwrap().is_empty(), "claimed for the relay it was handed to");
    assert_eq!(outbox.stats().await.unwrap().pending, 1, "and in the outbox until marked");

    // A write that fails (the same id again) hands nothing over and keeps no room.
    let again = im_testkit::outbox::event(&tenant, EventType::IntegrationCreated, &first.id.to_string());
    assert!(matches!(integrations.create(&first, &[again]).await, Err(DomainError::Conflict(_))));
    assert_eq!(handed.lock().unwrap().len(), 1);

    let (_, second_event) = create().await;
    assert_eq!(handed.lock().unwrap().len(), 2, "the room of two is used up");
    let (_, third_event) = create().await;
    assert_eq!(handed.lock().unwrap().len(), 2, "no room: not handed over");
    assert_eq!(wakes(), 1, "written unclaimed, it wakes the relay");
    assert_eq!(outbox.claim("other", 10, long).await.unwrap().events, vec![third_event.clone()], "any relay takes it");

    // Done with the first: published and marked. The second failed: released to any relay.
    outbox.mark_published(&[first_event.id, third_event.id]).await.unwrap();
    outbox.release("handed", &[second_event.id]).await.unwrap();
    handoff.done(2);
    assert_eq!(outbox.claim("other", 10, long).await.unwrap().events, vec![second_event.clone()]);
    outbox.mark_published(&[second_event.id]).await.unwrap();

    handoff.pause_for(long);
    let (_, paused_event) = create().await;
    assert_eq!(handed.lock().unwrap().len(), 2, "paused: not handed over");
    assert_eq!(outbox.claim("other", 10, long).await.unwrap().events, vec![paused_event]);
}

/// Under a steady stream of writes the WAL still starts over: the checkpointer holds this
/// process's writes for a last pass once the WAL is past its limit, so the file stays bounded
/// instead of growing by everything written (SQLite starts the WAL over only when a write
/// begins with all of it copied, which a stream of writes never lets a plain checkpoint reach).
/// Each start over is seen in the WAL header's checkpoint sequence number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_bounded_under_a_steady_stream_of_writes() {
    use im_domain::DomainError;
    use im_store_embedded::{Db, DbOptions};
    const STARTS_OVER: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal.db");
    let options = DbOptions { wal_restart_frames: 64, ..DbOptions::default() };
    let db = Arc::new(Db::open_with(&path, Arc::new(SystemClock), options).unwrap());
    let wal = dir.path().join("wal.db-wal");
    db.write(|tx| tx.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)").map_err(|e| DomainError::Unexpected(e.into())))
        .await
        .unwrap();
    // The WAL header's checkpoint sequence number (bytes 12 to 16), counted up at each start over.
    let sequence = |wal: &std::path::Path| {
        use std::io::Read;
        let mut header = [0u8; 16];
        std::fs::File::open(wal).and_then(|mut f| f.read_exact(&mut header)).ok()?;
        Some(u32::from_be_bytes(header[12..16].try_into().ok()?))
    };
    // Eight writers back to back (the writer thread is never idle), each write a 4 KiB row:
    // at least a 4 KiB frame in the WAL each, until the WAL started over a few times (or 20 s).
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..8i64)
        .map(|w| {
            let (db, done) = (db.clone(), done.clone());
            tokio::spawn(async move {
                let mut writes = 0u64;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = w * 1_000 + (writes % 50) as i64;
                    db.write(move |tx| {
                        tx.execute("INSERT OR REPLACE INTO t (k, v) VALUES (?1, zeroblob(4096))", [key])
                            .map(|_| ())
                            .map_err(|e| DomainError::Unexpected(e.into()))
                    })
                    .await
                    .unwrap();
                    writes += 1;
                }
                writes
            })
        })
        .collect();
    // Two readers all along: a snapshot a reader keeps must not keep the WAL from starting over.
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (db, done) = (db.clone(), done.clone());
            tokio::spawn(async move {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let _: i64 = db.read(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))).await.unwrap();
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while seen.len() <= STARTS_OVER && std::time::Instant::now() < deadline {
        // Read from a file that is written meanwhile: a torn header reads as another number,
        // so only a number seen twice in a row counts.
        let (a, b) = (sequence(&wal), sequence(&wal));
        if let (Some(a), Some(b)) = (a, b)
            && a == b
            && seen.last() != Some(&a)
        {
            seen.push(a);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    let mut written = 0;
    for w in writers {
        written += w.await.unwrap() * 4096;
    }
    let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert!(
        seen.len() > STARTS_OVER,
        "the WAL started over {} times under a stream of writes (header sequence numbers {seen:?}; {size} bytes of WAL for {written} written)",
        seen.len().saturating_sub(1)
    );
    let rows: i64 = db.read(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))).await.unwrap();
    assert_eq!(rows, 400, "every write is in the database");
}

/// A database `t.db` in a new directory, with one table `t (k INTEGER PRIMARY KEY)`.
async fn table_t() -> (tempfile::TempDir, im_store_embedded::Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = im_store_embedded::Db::open(&dir.path().join("t.db"), Arc::new(SystemClock)).unwrap();
    let create = |tx: &rusqlite::Connection| tx.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY)");
    db.write(move |tx| create(tx).map_err(|e| im_domain::DomainError::Unexpected(e.into()))).await.unwrap();
    (dir, db)
}

/// A read never sees less than what was committed before it began, also when the thread's
/// reader keeps its read transaction open between reads (it does while the WAL is all copied
/// into the database file): a commit of another connection in between (another process sharing
/// the data directory, say) ends it. Each round commits a row through another connection, reads,
/// copies the WAL into the file, reads again (a snapshot kept from here), then the next round's
/// commit must be seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_sees_every_commit_of_another_connection_made_before_it() {
    let (dir, db) = table_t().await;
    let (db, path) = (Arc::new(db), dir.path().join("t.db"));
    let other = rusqlite::Connection::open(&path).unwrap();
    // Two threads read, each with its reader; both must see every round's commit.
    let count = |db: Arc<im_store_embedded::Db>| async move {
        let count = || db.read(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)));
        (count().await.unwrap(), count().await.unwrap())
    };
    for round in 1..=50i64 {
        other.execute("INSERT INTO t (k) VALUES (?1)", [round]).unwrap();
        for reads in [tokio::spawn(count(db.clone())), tokio::spawn(count(db.clone()))] {
            assert_eq!(reads.await.unwrap(), (round, round), "round {round}, before the checkpoint");
        }
        other.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())).unwrap();
        for reads in [tokio::spawn(count(db.clone())), tokio::spawn(count(db.clone()))] {
            assert_eq!(reads.await.unwrap(), (round, round), "round {round}, after the checkpoint");
        }
    }
}

/// Reading keeps the process's hold on the WAL index: SQLite marks the index in use with a
/// shared POSIX lock (byte 128 of the `-shm` file) that every process holds while any of its
/// connections is open, and POSIX drops all of a process's locks on a file when any descriptor
/// of it is closed. Were a reader to close one (when it opens, or when its thread ends), the
/// next process to open the database would find the index unused and start it over under this
/// process's connections. Another process (python's sqlite3 module, through `fcntl(F_GETLK)`)
/// checks the lock after reads on threads that have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_keeps_the_process_hold_on_the_wal_index() {
    let (dir, db) = table_t().await;
    let (db, path) = (Arc::new(db), dir.path().join("t.db"));
    for _ in 0..3 {
        let db = db.clone();
        std::thread::spawn(move || {
            let read = db.read(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)));
            assert_eq!(tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(read).unwrap(), 0);
        })
        .join()
        .unwrap();
    }
    let _: i64 = db.read(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))).await.unwrap();
    let script = r#"
import fcntl, struct, sys
with open(sys.argv[1], "rb+") as f:
    asked = struct.pack("hhqqii", fcntl.F_WRLCK, 0, 128, 1, 0, 0)
    print(struct.unpack("hhqqii", fcntl.fcntl(f, fcntl.F_GETLK, asked))[0] == fcntl.F_UNLCK)
"#;
    let shm = format!("{}-shm", path.display());
    let out = std::process::Command::new("python3").args(["-c", script, &shm]).output().expect("python3 runs the other process");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "False",
        "another process could take the index's lock: this one dropped its hold"
    );
}

/// A reader that keeps its snapshot and then reads no more does not keep the checkpoints of
/// another connection (another process) from copying the WAL for long: the database's
/// checkpointer ends kept read transactions every 100 ms, whether or not it commits itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_snapshot_does_not_hold_back_the_checkpoints_of_others() {
    let (dir, db) = table_t().await;
    let path = dir.path().join("t.db");
    // The database's checkpointer has copied its own commit: it has nothing more to copy.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = rusqlite::Connection::open(&path).unwrap();
    let checkpoint = || other.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))).unwrap();
    let (log, copied) = checkpoint();
    assert_eq!(log, copied);
    // Kept from here (the WAL is all copied), on this thread (a current-thread read).
    let _: i64 = db.read(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))).await.unwrap();
    other.execute("INSERT INTO t (k) VALUES (1)", []).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let (log, copied) = checkpoint();
        if log == copied {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the WAL is still not copied after 2 s: {copied} of {log} frames");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Rows whose body a binary from before the `hold_until` column rewrote, leaving the column as
/// it was (during an upgrade): one made final is passed over by the hold sweep's read and takes
/// no place in its page; one still held is listed, judged by its body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_column_left_behind_by_a_body_only_write_is_judged_by_the_body() {
    use im_domain::webhooks::delivery::DeliveryStatus;
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let repo = store.deliveries();
    let tenant = im_testkit::fresh_tenant();
    let ended = OffsetDateTime::now_utc() - Duration::from_secs(600);
    let held = |minutes_ago: i64| {
        let mut d = im_testkit::deliveries::delivery(&tenant, DeliveryStatus::Pending);
        d.lease_until = Some(ended - time::Duration::minutes(minutes_ago));
        d
    };
    let (done_elsewhere, held_again, still_held) = (held(5), held(4), held(1));
    for d in [&done_elsewhere, &held_again, &still_held] {
        repo.create(d).await.unwrap();
    }
    let mut done = done_elsewhere.clone();
    done.status = DeliveryStatus::Succeeded;
    done.lease_until = None;
    let mut held_later = held_again.clone();
    held_later.lease_until = Some(ended - time::Duration::minutes(2));
    let rewrites = [
        (done.id.to_string(), serde_json::to_string(&done).unwrap()),
        (held_later.id.to_string(), serde_json::to_string(&held_later).unwrap()),
    ];
    store
        .documents()
        .transaction(move |tx, _| {
            for (id, body) in &rewrites {
                // The statement of a binary from before the column.
                tx.execute(
                    "UPDATE documents SET etag = 'old', body = ?2 WHERE container = 'integration_webhook_deliveries' AND id = ?1",
                    [id, body],
                )
                .map_err(|e| im_domain::DomainError::Unexpected(e.into()))?;
            }
            Ok(())
        })
        .await
        .unwrap();
    let now = OffsetDateTime::now_utc();

    let first = repo.holds_ended_before(now, 1).await.unwrap();
    let all = repo.holds_ended_before(now, 10).await.unwrap();

    let ids = |listed: &[im_domain::Stored<im_domain::webhooks::delivery::Delivery>]| listed.iter().map(|d| d.value.id).collect::<Vec<_>>();
    assert_eq!(ids(&first), vec![held_again.id], "the final one takes no place: {first:?}");
    assert_eq!(ids(&all), vec![held_again.id, still_held.id], "the held ones, as their bodies say");
    assert_eq!(all[0].value.lease_until, held_later.lease_until, "judged by the body");
}

/// An event's payload is stored once for the deliveries of its fan-out: each record stores
/// `null` in its place, and every read (a get, a listing, the take's, the hold sweep's) gives
/// the delivery back whole. A record written later than its payload's slack moves the
/// payload's expiry with it; a record whose event id names another payload, the one delivery
/// of an event, and a record written whole (by a single create) keep their payloads themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_payload_is_stored_once_for_its_deliveries() {
    use im_domain::webhooks::delivery::{DeliveryFilter, DeliveryStatus, delivery_id};
    use im_domain::webhooks::endpoint::WebhookId;
    use im_domain::webhooks::ports::JobAfter;
    use im_domain::{PageRequest, TenantId};
    let dir = tempfile::tempdir().unwrap();
    let start = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let clock = Arc::new(ManualClock(Mutex::new(start)));
    let store = EmbeddedStore::open(dir.path(), clock.clone()).unwrap();
    store.migrate().await.unwrap();
    let repo = store.deliveries_with_queue();
    let tenant = TenantId::new("payloads").unwrap();
    let event = |payload: serde_json::Value| {
        let mut d = im_testkit::deliveries::delivery(&tenant, DeliveryStatus::Pending);
        d.payload = payload.into();
        d.next_attempt_at = Some(start + time::Duration::hours(1));
        d.created_at = start;
        d.updated_at = start;
        d
    };
    let to = |d: &im_domain::webhooks::delivery::Delivery, webhook: u128| {
        let mut d = d.clone();
        d.webhook_id = WebhookId(uuid::Uuid::from_u128(webhook));
        d.id = delivery_id(d.webhook_id, &d.message_id);
        d
    };
    let first = event(serde_json::json!({"specversion": "1.0", "data": {"n": 1, "text": "a \"quoted\" ,\"payload\":null, text"}}));
    let (a, b) = (to(&first, 1), to(&first, 2));
    // The same event id with another payload, and another event.
    let mut other_text = to(&first, 3);
    other_text.payload = serde_json::json!({"specversion": "1.0", "data": {"n": 2}}).into();
    let next = event(serde_json::json!({"specversion": "1.0", "data": {"n": 3}}));
    let (second, second_too) = (to(&next, 1), to(&next, 2));
    // An event with one delivery alone keeps its payload in its record.
    let lone = to(&event(serde_json::json!({"specversion": "1.0", "data": {"n": 5}})), 1);
    let all = [a.clone(), b.clone(), other_text.clone(), second.clone(), second_too.clone(), lone.clone()];
    queue_all(repo.as_ref(), &all).await;
    // One made by a single create is written whole.
    let single = to(&event(serde_json::json!({"specversion": "1.0", "data": {"n": 4}})), 4);
    repo.create(&single).await.unwrap();

    let stored = |id: uuid::Uuid| {
        row(&store, "SELECT body FROM documents WHERE container = 'integration_webhook_deliveries' AND id = ?1", id.to_string(), |r| {
            r.get::<_, String>(0)
        })
    };
    let payloads =
        || row(&store, "SELECT count(*) FROM documents WHERE container = ?1", containers::WEBHOOK_PAYLOADS, |r| r.get::<_, i64>(0));
    assert_eq!(payloads().await, 2, "one payload for each event");
    for d in [&a, &b, &second, &second_too] {
        let body = stored(d.id).await;
        assert!(body.contains(r#","payload":null,"#) && !body.contains("specversion"), "{body}");
    }
    for d in [&other_text, &single, &lone] {
        assert!(stored(d.id).await.contains("specversion"), "kept whole: {}", stored(d.id).await);
    }

    // Every read gives each delivery whole.
    for d in &all {
        assert_eq!(repo.get(&tenant, d.id).await.unwrap().value, *d);
    }
    let listed = repo.list(&tenant, a.webhook_id, &DeliveryFilter::default(), &PageRequest::new(None, None).unwrap()).await.unwrap();
    let listed: HashMap<_, _> = listed.items.into_iter().map(|d| (d.value.id, d.value)).collect();
    assert_eq!((listed.get(&a.id), listed.get(&second.id)), (Some(&a), Some(&second)));
    // Their jobs due now: the take reads the records from the table.
    let queue = store.delivery_queue();
    for d in all.iter().chain([&single]) {
        let job = DeliveryJob { tenant_id: tenant.clone(), delivery_id: d.id };
        queue.schedule(&job, OffsetDateTime::now_utc() - time::Duration::seconds(1)).await.unwrap();
    }
    let taken = queue.take_due(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(taken.len(), 7);
    for d in &all {
        assert_eq!(repo.get_for_attempt(&tenant, d.id).await.unwrap().value, *d, "the take's read");
    }
    let mut held = b.clone();
    held.lease_until = Some(start + time::Duration::hours(2));
    let version = repo.get(&tenant, b.id).await.unwrap().etag;
    repo.replace(&held, Some(version), &[]).await.unwrap();
    let ended = repo.holds_ended_before(start + time::Duration::hours(3), 10).await.unwrap();
    assert_eq!(ended.into_iter().map(|d| d.value).collect::<Vec<_>>(), vec![held.clone()], "the hold sweep's read");

    // An outcome six days on: the record lives 7 days from then, its payload with it.
    *clock.0.lock().unwrap() = start + time::Duration::days(6);
    let mut done = a.clone();
    done.status = DeliveryStatus::Succeeded;
    done.next_attempt_at = None;
    let version = repo.get(&tenant, a.id).await.unwrap().etag;
    repo.replace_queued(&done, Some(version), &[], JobAfter::Complete).await.unwrap();
    assert!(stored(a.id).await.contains(r#","payload":null,"#), "still stored without its payload");
    *clock.0.lock().unwrap() = start + time::Duration::days(12);
    assert_eq!(store.purge_expired().await.unwrap(), 7, "the other records and the second event's payload");
    assert_eq!(repo.get(&tenant, a.id).await.unwrap().value, done, "its payload lives as long as it does");
    assert_eq!(payloads().await, 1);
    *clock.0.lock().unwrap() = start + time::Duration::days(30);
    assert_eq!(store.purge_expired().await.unwrap(), 2, "the record and its payload");
}
