//! Events benchmark: events/s published with publisher confirms through the service's outbox
//! relay (embedded store outbox -> EventRelay -> RabbitPublisher), beside a bare `lapin`
//! publish-with-confirms loop to the same broker in the same run, with the same batch size,
//! message size and properties; the median of three alternating rounds of each.
//!
//! Usage: bench-events [AMQP_URL] [EVENTS]

#![allow(clippy::print_stdout)] // a report on stdout is what this tool is for

use std::sync::Arc;
use std::time::{Duration, Instant};

use im_bus_rabbitmq::{RabbitPublisher, RabbitSettings};
use im_domain::events::{DomainEvent, EventType};
use im_domain::services::EventRelay;
use im_domain::{SystemClock, TenantId};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};

const BATCH: u32 = 256;
/// Rounds of each side, alternating.
const ROUNDS: usize = 3;

fn event(i: usize) -> DomainEvent {
    DomainEvent {
        id: uuid::Uuid::now_v7(),
        event_type: EventType::IntegrationUpdated,
        tenant_id: TenantId::new("bench").expect("tenant"),
        subject: uuid::Uuid::now_v7().to_string(),
        time: time::OffsetDateTime::now_utc(),
        data: serde_json::json!({"id": i, "name": "benchmark integration", "providerId": "github", "config": {"organization": "acme"}})
            .into(),
    }
}

/// An exchange with a short bounded queue bound to it, so messages are routable and the broker
/// does not accumulate them.
async fn declare(url: &str, exchange: &str) -> (Connection, lapin::Channel) {
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-max-length"), AMQPValue::LongInt(1000));
    let (connection, channel, _) = im_testkit::rabbit::bound_queue(url, exchange, args).await;
    (connection, channel)
}

async fn bare_loop(url: &str, exchange: &str, events: &[DomainEvent]) -> Duration {
    let connection = Connection::connect(url, ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    let started = Instant::now();
    for chunk in events.chunks(BATCH as usize) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for e in chunk {
            let payload = serde_json::to_vec(&e.envelope()).expect("json");
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/cloudevents+json".into())
                .with_message_id(e.id.to_string().into());
            confirms.push(
                channel
                    .basic_publish(
                        exchange.into(),
                        e.event_type.as_str().into(),
                        BasicPublishOptions { mandatory: true, ..Default::default() },
                        &payload,
                        properties,
                    )
                    .await
                    .expect("publish"),
            );
        }
        for confirm in confirms {
            assert!(matches!(confirm.await.expect("confirm"), Confirmation::Ack(_)), "nacked");
        }
    }
    started.elapsed()
}

#[tokio::main]
async fn main() {
    let url = std::env::args().nth(1).unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let count: usize = std::env::args().nth(2).and_then(|n| n.parse().ok()).unwrap_or(20_000);
    let exchange = format!("im-bench-{}", uuid::Uuid::new_v4().simple());
    let (_keep, declared) = declare(&url, &exchange).await;

    // The relay's input: events committed to the outbox of an embedded store (not timed).
    let dir = std::env::temp_dir().join(format!("im-bench-events-{}", uuid::Uuid::new_v4().simple()));
    let store = im_store_embedded::EmbeddedStore::open(&dir, Arc::new(SystemClock)).expect("store");
    store.migrate().await.expect("migrate");
    let repo = store.integrations();
    let tenant = TenantId::new("bench").expect("tenant");
    let publisher = Arc::new(RabbitPublisher::new(RabbitSettings {
        exchange: exchange.clone(),
        confirm_timeout: im_domain::HumanDuration(Duration::from_secs(30)),
        ..RabbitSettings::new(url.clone())
    }));
    let relay = EventRelay::new(store.outbox(), publisher);

    // Rounds alternate the two sides (a broker's speed drifts within seconds); each side's
    // median round is reported.
    let (mut bares, mut relays) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        // The relay's input: events committed to the outbox of an embedded store (not timed).
        for i in 0..count {
            let mut integration = fixtures::integration(&tenant);
            integration.name = format!("bench {i}");
            repo.create(&integration, &[event(i)]).await.expect("create");
        }
        let bare_events: Vec<_> = (0..count).map(event).collect();
        bares.push(bare_loop(&url, &exchange, &bare_events).await);

        let started = Instant::now();
        let mut relayed = 0;
        while relayed < count {
            let n = relay.relay_once(BATCH).await.expect("relay").published;
            assert!(n > 0, "the outbox ran dry after {relayed} events");
            relayed += n;
        }
        relays.push(started.elapsed());
    }
    let _ = std::fs::remove_dir_all(&dir);
    let median = |mut runs: Vec<Duration>| {
        runs.sort();
        runs[runs.len() / 2]
    };
    let (bare, through_relay) = (median(bares), median(relays));

    let rate = |d: Duration| count as f64 / d.as_secs_f64();
    println!("\n{:<26} {:>10} {:>10} {:>8}", "events (confirms)", "events/s", "seconds", "ratio");
    println!("{:<26} {:>10.0} {:>10.2} {:>7.2}x", "bare lapin loop", rate(bare), bare.as_secs_f64(), 1.0);
    println!(
        "{:<26} {:>10.0} {:>10.2} {:>7.2}x",
        "outbox relay (service)",
        rate(through_relay),
        through_relay.as_secs_f64(),
        rate(through_relay) / rate(bare)
    );
    println!(
        "{count} events, batches of {BATCH}, persistent, mandatory, publisher confirms; relay includes outbox reads and deletes; median of {ROUNDS} alternating rounds"
    );
    println!("ROW events-relay {:.0} {:.0} {:.2} - - -", rate(through_relay), rate(bare), rate(through_relay) / rate(bare));
    // The queue goes with the connection (exclusive); the exchange is deleted: a run leaves nothing.
    let _ = declared.exchange_delete(exchange.as_str().into(), lapin::options::ExchangeDeleteOptions::default()).await;
}

mod fixtures {
    use im_domain::integration::{Integration, IntegrationStatus};
    use im_domain::provider::ProviderId;
    use im_domain::{IntegrationId, TenantId, UserId};

    pub fn integration(tenant: &TenantId) -> Integration {
        let now = time::OffsetDateTime::now_utc();
        Integration {
            id: IntegrationId(uuid::Uuid::now_v7()),
            tenant_id: tenant.clone(),
            provider_id: ProviderId::new("github").expect("provider"),
            name: String::new(),
            description: String::new(),
            status: IntegrationStatus::Active,
            config: serde_json::Map::new(),
            custom_definition: None,
            oauth2_app: None,
            created_at: now,
            updated_at: now,
            created_by: UserId::new("bench").expect("user"),
            updated_by: UserId::new("bench").expect("user"),
        }
    }
}
