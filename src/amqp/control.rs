//! The client side of the control protocol: `keyturn submit` and `keyturn rollout` publish a
//! rollout [`Command`] to the control queue and wait for the worker's [`Reply`].
//!
//! Each command goes to the default exchange with routing key = the control queue, persistent,
//! with publisher confirms, a fresh UUID as `message_id` (the worker applies a message id once)
//! and `correlation_id`, and `reply_to` naming an exclusive, auto-delete, server-named queue this
//! client consumes. The command also carries `expiration` = the wait: a command nobody took
//! within the time the operator was willing to wait leaves the queue instead of pausing or
//! declaring something long after the command line gave up.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};

use super::ConnectError;
use crate::config::AmqpSettings;
use crate::rollout::{Command, Reply};

/// Why a command got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// Nobody has declared the control queue: no worker ever ran on these settings.
    #[error(
        "the control queue {queue} does not exist; is a worker running on {queue}? (it declares the queue at start)"
    )]
    NoQueue { queue: String },
    /// The command was published but no reply came in time.
    #[error(
        "no worker answered within {}; is a worker running on {queue}?",
        humantime::format_duration(*.timeout)
    )]
    NoAnswer { timeout: Duration, queue: String },
    #[error("the broker refused the command (nack)")]
    Nacked,
    #[error("an answer that is not a keyturn reply: {0}")]
    BadReply(String),
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
}

impl ControlError {
    /// True when the worker did not answer (exit 3), as opposed to a broken exchange (exit 1).
    pub fn is_no_answer(&self) -> bool {
        matches!(
            self,
            ControlError::NoQueue { .. } | ControlError::NoAnswer { .. }
        )
    }
}

/// One connection to the broker, with a confirm-mode channel and a private reply queue.
pub struct ControlClient {
    connection: Connection,
    channel: Channel,
    replies: Consumer,
    reply_queue: String,
    control_queue: String,
}

impl ControlClient {
    /// Connects, checks that the control queue exists, and sets up the reply queue.
    pub async fn connect(settings: &AmqpSettings, name: &str) -> Result<Self, ControlError> {
        let connection = super::connect(settings, name).await?;
        ensure_queue(&connection, &settings.control_queue).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let private = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        let queue = channel
            .queue_declare("".into(), private, FieldTable::default())
            .await?;
        let reply_queue = queue.name().to_string();
        let replies = channel
            .basic_consume(
                reply_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(ControlClient {
            connection,
            channel,
            replies,
            reply_queue,
            control_queue: settings.control_queue.clone(),
        })
    }

    /// The confirm-mode channel, for publishing the jobs after the declaration.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes `command` and waits up to `timeout` for its reply.
    pub async fn request(
        &mut self,
        command: &Command,
        timeout: Duration,
    ) -> Result<Reply, ControlError> {
        let id = uuid::Uuid::new_v4().to_string();
        let body = serde_json::to_vec(&command.to_json()).expect("a JSON value serializes");
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(id.as_str().into())
            .with_correlation_id(id.as_str().into())
            .with_reply_to(self.reply_queue.as_str().into())
            .with_expiration(timeout.as_millis().max(1).to_string().into());
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.control_queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?
            .await?;
        if !confirm.is_ack() {
            return Err(ControlError::Nacked);
        }
        tracing::debug!(kind = command.kind(), correlation_id = %id, "command published");
        let deadline = tokio::time::Instant::now() + timeout;
        tokio::time::timeout_at(deadline, self.reply_to(&id))
            .await
            .unwrap_or_else(|_| {
                Err(ControlError::NoAnswer {
                    timeout,
                    queue: self.control_queue.clone(),
                })
            })
    }

    /// The first reply carrying `id`; replies to earlier commands that came too late are skipped.
    async fn reply_to(&mut self, id: &str) -> Result<Reply, ControlError> {
        while let Some(delivery) = self.replies.next().await {
            let delivery = delivery?;
            let correlation = delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str());
            if correlation != Some(id) {
                continue;
            }
            return parse_reply(&delivery.data);
        }
        Err(ControlError::BadReply("the reply queue was closed".into()))
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// A reply body as the worker writes it.
pub fn parse_reply(body: &[u8]) -> Result<Reply, ControlError> {
    serde_json::from_slice(body).map_err(|error| ControlError::BadReply(error.to_string()))
}

/// Checks by a passive declare on a channel of its own (a missing queue closes the channel).
async fn ensure_queue(connection: &Connection, queue: &str) -> Result<(), ControlError> {
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        Ok(_) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(())
        }
        Err(error) if is_not_found(&error) => Err(ControlError::NoQueue {
            queue: queue.to_owned(),
        }),
        Err(error) => Err(error.into()),
    }
}

fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_reads_as_the_worker_writes_it() {
        let reply = parse_reply(
            br#"{"kind":"pause","ok":false,"error":"unknown rollout R","rollouts":[]}"#,
        )
        .unwrap();
        assert!(!reply.ok);
        assert_eq!(reply.error.as_deref(), Some("unknown rollout R"));
        assert!(matches!(parse_reply(b"{}"), Err(ControlError::BadReply(_))));
    }

    #[test]
    fn no_answer_names_the_wait_and_the_queue() {
        let error = ControlError::NoAnswer {
            timeout: Duration::from_secs(30),
            queue: "keyturn.control".into(),
        };
        assert_eq!(
            error.to_string(),
            "no worker answered within 30s; is a worker running on keyturn.control?"
        );
        assert!(error.is_no_answer());
    }
}
