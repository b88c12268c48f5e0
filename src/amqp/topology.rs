//! The broker objects keyturn owns, declared idempotently every time a worker (re)connects:
//! the quorum jobs queue with its dead-letter exchange and delivery limit, the dead queue, and
//! the results topic exchange, the quorum control queue of rollout commands, and the bounded queue
//! that keeps result events no binding routed.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::config::AmqpSettings;

/// Declares (or confirms) the whole topology on `channel`.
pub async fn declare(channel: &Channel, settings: &AmqpSettings) -> lapin::Result<()> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            settings.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            settings.dead_queue.as_str().into(),
            QueueDeclareOptions::durable(),
            quorum(),
        )
        .await?;
    channel
        .queue_bind(
            settings.dead_queue.as_str().into(),
            settings.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            settings.jobs_queue.as_str().into(),
            QueueDeclareOptions::durable(),
            jobs_arguments(settings),
        )
        .await?;
    // The control queue (rollout declarations and commands) is shaped like the jobs queue: a
    // malformed command is dead-lettered beside malformed jobs.
    channel
        .queue_declare(
            settings.control_queue.as_str().into(),
            QueueDeclareOptions::durable(),
            jobs_arguments(settings),
        )
        .await?;
    declare_unrouted(channel, settings).await?;
    channel
        .exchange_declare(
            settings.results_exchange.as_str().into(),
            ExchangeKind::Topic,
            durable_exchange,
            FieldTable::default(),
        )
        .await
}

/// Declares the bounded queue that keeps result events no binding routed.
pub async fn declare_unrouted(channel: &Channel, settings: &AmqpSettings) -> lapin::Result<()> {
    channel
        .queue_declare(
            settings.unrouted_queue.as_str().into(),
            QueueDeclareOptions::durable(),
            unrouted_arguments(),
        )
        .await
        .map(|_| ())
}

/// Most result events the unrouted queue keeps; beyond it the oldest go first.
pub const UNROUTED_MAX_LENGTH: i64 = 10_000;

/// A classic queue bounded by length, dropping its oldest message when full: an operator's
/// record of recent unrouted events must never block or fail the publishing of new ones.
fn unrouted_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(UNROUTED_MAX_LENGTH),
    );
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("drop-head")),
    );
    arguments
}

/// Messages ready in `queue` (not counting unacked ones), by a passive declare.
pub async fn ready_messages(channel: &Channel, queue: &str) -> lapin::Result<u32> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?;
    Ok(queue.message_count())
}

/// Deletes the whole topology, messages included: for throwaway runs (the demo, tests), never
/// for a production worker.
pub async fn delete(channel: &Channel, settings: &AmqpSettings) -> lapin::Result<()> {
    for queue in [
        &settings.jobs_queue,
        &settings.control_queue,
        &settings.dead_queue,
        &settings.unrouted_queue,
    ] {
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    for exchange in [&settings.dead_letter_exchange, &settings.results_exchange] {
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}

fn quorum() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    arguments
}

/// Quorum, dead-lettered to the DLX, and a delivery limit so a message that keeps killing
/// workers ends in the dead queue instead of looping. On RabbitMQ 3.10 every redelivery counts
/// toward the limit, including those caused by a closed channel.
fn jobs_arguments(settings: &AmqpSettings) -> FieldTable {
    let mut arguments = quorum();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(settings.dead_letter_exchange.as_str())),
    );
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(settings.delivery_limit.into()),
    );
    // At-least-once dead-lettering (3.10+) needs reject-publish overflow; without it the broker
    // silently falls back to at-most-once and a dead letter could be lost.
    arguments.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString(LongString::from("at-least-once")),
    );
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    arguments
}
