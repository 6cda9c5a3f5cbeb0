//! A test consumer: a fresh exclusive queue bound to an exchange, read with a timeout.

use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};

/// One message as a test sees it.
#[derive(Debug, Clone)]
pub struct Received {
    pub routing_key: String,
    pub message_id: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub body: serde_json::Value,
}

/// Consumes everything published to `exchange` (declared here if absent, as the service does).
pub struct TestQueue {
    _connection: Connection,
    consumer: Consumer,
}

impl std::fmt::Debug for TestQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestQueue").finish_non_exhaustive()
    }
}

/// A connection to the broker at `url` with `exchange` declared (a durable topic exchange, as the
/// service declares it) and a fresh exclusive queue with `arguments` bound to it by `#`.
///
/// # Panics
/// When the broker refuses.
pub async fn bound_queue(url: &str, exchange: &str, arguments: FieldTable) -> (Connection, Channel, ShortString) {
    let connection = Connection::connect(url, ConnectionProperties::default()).await.expect("connect to rabbitmq");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("declare exchange");
    let queue = channel
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() }, arguments)
        .await
        .expect("declare queue");
    channel
        .queue_bind(queue.name().clone(), exchange.into(), "#".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .expect("bind");
    (connection, channel, queue.name().clone())
}

impl TestQueue {
    /// # Panics
    /// When the broker refuses.
    pub async fn bind(url: &str, exchange: &str) -> Self {
        let (connection, channel, queue) = bound_queue(url, exchange, FieldTable::default()).await;
        let consumer =
            channel.basic_consume(queue, "test".into(), BasicConsumeOptions::default(), FieldTable::default()).await.expect("consume");
        Self { _connection: connection, consumer }
    }

    /// The next message, or `None` after `wait`.
    ///
    /// # Panics
    /// When the body is not JSON.
    pub async fn next(&mut self, wait: Duration) -> Option<Received> {
        use futures_util::StreamExt as _;
        let delivery = tokio::time::timeout(wait, self.consumer.next()).await.ok()??.ok()?;
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
        let props = &delivery.properties;
        Some(Received {
            routing_key: delivery.routing_key.to_string(),
            message_id: props.message_id().as_ref().map(ToString::to_string),
            content_type: props.content_type().as_ref().map(ToString::to_string),
            delivery_mode: *props.delivery_mode(),
            body: serde_json::from_slice(&delivery.data).expect("a JSON body"),
        })
    }

    /// Reads until `wait` passes with no message.
    pub async fn drain(&mut self, wait: Duration) -> Vec<Received> {
        let mut out = Vec::new();
        while let Some(m) = self.next(wait).await {
            out.push(m);
        }
        out
    }
}

/// Deletes what a run declared on the broker at `url`: the work queue `{prefix}.work`, the
/// delay queue of a hold's length (where a replayed event's job waits for its delivery's hold
/// to end; the others expire by themselves, ten minutes after their last use) and the exchange
/// `exchange`, each
/// when given. `Err` when the broker cannot be reached; a queue or an exchange already gone is
/// not an error.
///
/// # Errors
/// When the broker cannot be reached.
pub async fn delete_declared(url: &str, queue_prefix: Option<&str>, exchange: Option<&str>) -> Result<(), lapin::Error> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    if let Some(prefix) = queue_prefix {
        // A whole number of minutes: a hold's length is a delay bucket of its own.
        let holds = format!("{prefix}.delay.{}", im_domain::webhooks::delivery::ATTEMPT_LEASE.as_millis());
        for queue in [format!("{prefix}.work"), holds] {
            let _ = channel.queue_delete(queue.as_str().into(), lapin::options::QueueDeleteOptions::default()).await;
        }
    }
    if let Some(exchange) = exchange {
        let _ = channel.exchange_delete(exchange.into(), lapin::options::ExchangeDeleteOptions::default()).await;
    }
    let _ = connection.close(0, "done".into()).await;
    Ok(())
}
