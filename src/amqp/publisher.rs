//! Result events out: a dedicated connection with publisher confirms. `publish` returns only
//! once the broker confirmed the event (and its `reply_to` copy), so the pipeline can ack the job.
//! A failed publish drops the channel; the next call reconnects.
//!
//! Events go out `mandatory`: one that no binding routes comes back with its confirm, and is
//! then logged and kept in the bounded `amqp.unrouted_queue` instead of vanishing. A `reply_to`
//! copy whose queue is gone is only logged: the requester went away, the event itself is safe.

use std::sync::Arc;

use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::Mutex;

use crate::config::AmqpSettings;
use crate::events::{CONTENT_TYPE, EventSink, Outgoing};
use crate::pipeline::{JobQueue, Requeue};

/// Header on a kept unrouted event: the routing key it was published with.
pub const ROUTING_KEY_HEADER: &str = "keyturn-routing-key";

/// Longest wait for the broker to confirm one result event.
const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Publisher {
    settings: AmqpSettings,
    name: String,
    link: Mutex<Option<(Connection, Channel)>>,
}

impl Publisher {
    pub fn new(settings: &AmqpSettings, worker_id: &str) -> Arc<Publisher> {
        Arc::new(Publisher {
            settings: settings.clone(),
            name: format!("keyturn-publisher-{worker_id}"),
            link: Mutex::new(None),
        })
    }

    /// The current confirm-mode channel, connecting first if there is none or it died.
    async fn channel(&self) -> anyhow::Result<Channel> {
        let mut link = self.link.lock().await;
        if let Some((connection, channel)) = link.as_ref()
            && connection.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        *link = None;
        let connection = super::connect(&self.settings, &self.name).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        // The worker declares it too; declaring here means unrouted events have somewhere to
        // go even when this publisher is used without a worker (idempotent, same arguments).
        super::topology::declare_unrouted(&channel, &self.settings).await?;
        *link = Some((connection, channel.clone()));
        Ok(channel)
    }

    async fn forget(&self) {
        if let Some((connection, _)) = self.link.lock().await.take() {
            let _ = connection.close(200, "publisher reset".into()).await;
        }
    }

    async fn send(
        &self,
        channel: &Channel,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<Option<BasicReturnMessage>> {
        // A publish on a channel the broker is closing can wait forever for its confirm; bound
        // it so the pipeline's retry reconnects instead.
        let publish = async {
            channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    properties,
                )
                .await?
                .await
        };
        let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, publish)
            .await
            .map_err(|_| anyhow::anyhow!("no publisher confirm within {CONFIRM_TIMEOUT:?}"))??;
        match confirm {
            Confirmation::Ack(returned) => Ok(returned),
            Confirmation::Nack(_) => anyhow::bail!("broker refused the result event (nack)"),
            Confirmation::NotRequested => anyhow::bail!("publisher confirms are not enabled"),
        }
    }

    /// Closes the publishing connection.
    pub async fn close(&self) {
        self.forget().await;
    }
}

#[async_trait::async_trait]
impl EventSink for Publisher {
    async fn probe(&self) -> anyhow::Result<()> {
        let result = async {
            let channel = self.channel().await?;
            let passive = lapin::options::ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            };
            channel
                .exchange_declare(
                    self.settings.results_exchange.as_str().into(),
                    lapin::ExchangeKind::Topic,
                    passive,
                    FieldTable::default(),
                )
                .await?;
            anyhow::Ok(())
        }
        .await;
        if result.is_err() {
            self.forget().await;
        }
        result
    }

    async fn publish(&self, event: &Outgoing<'_>) -> anyhow::Result<()> {
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(2)
            .with_message_id(short(event.id))
            .with_correlation_id(short(event.correlation_id))
            .with_type(short(event.kind))
            .with_app_id("keyturn".into())
            .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64)
            .with_headers(trace_headers(event.traceparent, event.tracestate));
        let result = async {
            let channel = self.channel().await?;
            let exchange = self.settings.results_exchange.as_str();
            let returned = self
                .send(
                    &channel,
                    exchange,
                    event.routing_key,
                    event.body,
                    properties.clone(),
                )
                .await?;
            if returned.is_some() {
                self.keep_unrouted(&channel, event, properties.clone())
                    .await?;
            }
            if let Some(queue) = event.reply_to
                && self
                    .send(&channel, "", queue, event.body, properties)
                    .await?
                    .is_some()
            {
                tracing::warn!(
                    event_id = event.id,
                    reply_to = queue,
                    "the reply_to queue does not exist; the reply copy of the result event was dropped"
                );
            }
            anyhow::Ok(())
        }
        .await;
        if result.is_err() {
            self.forget().await;
        }
        result
    }
}

#[async_trait::async_trait]
impl JobQueue for Publisher {
    async fn requeue(&self, job: &Requeue<'_>) -> anyhow::Result<()> {
        let queue = self.settings.jobs_queue.clone();
        self.publish_to("", &queue, job.body, properties_of(job), "the jobs queue")
            .await
    }

    async fn dead_letter(&self, message: &Requeue<'_>, reason: &str) -> anyhow::Result<()> {
        let mut headers = trace_headers(message.traceparent, message.tracestate);
        headers.insert(
            DEAD_LETTER_REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        let exchange = self.settings.dead_letter_exchange.clone();
        let properties = properties_of(message).with_headers(headers);
        self.publish_to(&exchange, "", message.body, properties, "the dead queue")
            .await
    }

    async fn reply(
        &self,
        reply_to: &str,
        correlation_id: Option<&str>,
        body: &[u8],
    ) -> anyhow::Result<()> {
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_app_id("keyturn".into());
        if let Some(id) = correlation_id {
            properties = properties.with_correlation_id(short(id));
        }
        let result = async {
            let channel = self.channel().await?;
            self.send(&channel, "", reply_to, body, properties).await
        }
        .await;
        match result {
            // The asker went away (its reply queue is gone): nothing to retry, and the
            // connection is fine.
            Ok(Some(_)) => {
                tracing::warn!(
                    reply_to,
                    "control reply returned: the reply_to queue is gone"
                );
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(error) => {
                self.forget().await;
                Err(error)
            }
        }
    }
}

/// Header on a dead-lettered control command: why it was refused.
pub const DEAD_LETTER_REASON_HEADER: &str = "keyturn-error";

/// The W3C trace headers of a message (an empty table without them).
fn trace_headers(traceparent: Option<&str>, tracestate: Option<&str>) -> FieldTable {
    let mut headers = FieldTable::default();
    for (name, value) in [
        (super::TRACEPARENT, traceparent),
        (super::TRACESTATE, tracestate),
    ] {
        if let Some(value) = value {
            headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
        }
    }
    headers
}

/// A job's original properties, persistent, with its trace headers.
fn properties_of(job: &Requeue<'_>) -> BasicProperties {
    let text = |value: Option<&str>| value.map(short);
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(trace_headers(job.traceparent, job.tracestate));
    if let Some(value) = text(job.message_id) {
        properties = properties.with_message_id(value);
    }
    if let Some(value) = text(job.correlation_id) {
        properties = properties.with_correlation_id(value);
    }
    if let Some(value) = text(job.reply_to) {
        properties = properties.with_reply_to(value);
    }
    if let Some(value) = text(job.content_type) {
        properties = properties.with_content_type(value);
    }
    properties
}

impl Publisher {
    /// Publishes mandatory and confirmed; a message no queue took is an error naming `what`.
    async fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        what: &str,
    ) -> anyhow::Result<()> {
        let result = async {
            let channel = self.channel().await?;
            let returned = self
                .send(&channel, exchange, routing_key, body, properties)
                .await?;
            anyhow::ensure!(returned.is_none(), "{what} ({routing_key}) does not exist");
            anyhow::Ok(())
        }
        .await;
        if result.is_err() {
            self.forget().await;
        }
        result
    }
}

impl Publisher {
    /// Keeps an event no binding routed in the unrouted queue, confirmed, with its routing key.
    async fn keep_unrouted(
        &self,
        channel: &Channel,
        event: &Outgoing<'_>,
        properties: BasicProperties,
    ) -> anyhow::Result<()> {
        let queue = self.settings.unrouted_queue.as_str();
        tracing::warn!(
            event_id = event.id,
            routing_key = event.routing_key,
            exchange = %self.settings.results_exchange,
            unrouted_queue = queue,
            "no queue is bound for this result event; kept in the unrouted queue"
        );
        let mut headers = trace_headers(event.traceparent, event.tracestate);
        headers.insert(
            ROUTING_KEY_HEADER.into(),
            AMQPValue::LongString(LongString::from(event.routing_key)),
        );
        let returned = self
            .send(
                channel,
                "",
                queue,
                event.body,
                properties.with_headers(headers),
            )
            .await?;
        anyhow::ensure!(
            returned.is_none(),
            "the unrouted queue {queue} does not exist"
        );
        Ok(())
    }
}

/// AMQP short strings hold at most 255 bytes; longer values are cut at a character boundary.
fn short(text: &str) -> ShortString {
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].into()
}
