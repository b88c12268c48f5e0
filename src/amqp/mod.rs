//! The RabbitMQ edge: connections, the declared topology, the confirmed result publisher and the
//! consuming worker with its reconnect loop.
//!
//! Consuming and publishing use separate connections, so publisher flow control can never delay
//! an ack. lapin's own auto-recovery is not used: the worker's supervisor loop reconnects, declares
//! the topology, applies its prefetch and consumes again (see `broker-and-storage-notes`).

pub mod publisher;
pub mod topology;
pub mod worker;

use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use crate::config::AmqpSettings;

/// Opens a connection named `name` (visible in the management UI and `rabbitmqctl`), with the
/// configured heartbeat unless the URL sets one.
pub async fn connect(settings: &AmqpSettings, name: &str) -> anyhow::Result<Connection> {
    let mut uri: AMQPUri = settings
        .url
        .parse()
        .map_err(|problem: String| anyhow::anyhow!("amqp.url: {problem}"))?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(settings.heartbeat_secs);
    }
    if uri.query.connection_timeout.is_none() {
        uri.query.connection_timeout = Some(10_000);
    }
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect_uri(uri, properties)
        .await
        .map_err(|error| {
            anyhow::anyhow!(
                "cannot connect to RabbitMQ at {}: {error}",
                redacted_url(&settings.url)
            )
        })
}

/// The URL with any password replaced, for logs and error messages.
pub fn redacted_url(url: &str) -> String {
    match url.parse::<AMQPUri>() {
        Ok(uri) => format!(
            "{}://{}@{}:{}/{}",
            if uri.scheme == lapin::uri::AMQPScheme::AMQPS {
                "amqps"
            } else {
                "amqp"
            },
            uri.authority.userinfo.username,
            uri.authority.host,
            uri.authority.port,
            // As written in a URL: the default vhost "/" is "%2f".
            uri.vhost.replace('%', "%25").replace('/', "%2f")
        ),
        Err(_) => "<unparseable AMQP URL>".into(),
    }
}

/// Publishes jobs `(job_id, body)` to `queue` through the default exchange, persistent, as JSON
/// with `message_id` = job id, and waits for every confirm.
pub async fn publish_jobs(
    channel: &lapin::Channel,
    queue: &str,
    jobs: &[(String, Vec<u8>)],
) -> anyhow::Result<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut confirms = Vec::with_capacity(jobs.len());
    for (job_id, body) in jobs {
        let properties = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(job_id.as_str().into());
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await?,
        );
    }
    for confirm in confirms {
        anyhow::ensure!(confirm.await?.is_ack(), "the broker refused a job");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::redacted_url;

    #[test]
    fn a_redacted_url_keeps_where_but_never_the_password() {
        let shown = redacted_url("amqp://guest:s3cret@127.0.0.1:5672/%2f");
        assert_eq!(shown, "amqp://guest@127.0.0.1:5672/%2f");
        assert_eq!(
            redacted_url("amqps://ops:pw@mq.example:5671/fleet"),
            "amqps://ops@mq.example:5671/fleet"
        );
        assert_eq!(redacted_url("http://nope"), "<unparseable AMQP URL>");
    }
}
