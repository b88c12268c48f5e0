//! The RabbitMQ edge: connections, the declared topology, the confirmed result publisher and the
//! consuming worker with its reconnect loop.
//!
//! Consuming and publishing use separate connections, so publisher flow control can never delay
//! an ack. lapin's own auto-recovery is not used: the worker's supervisor loop reconnects, declares
//! the topology, applies its prefetch and consumes again (see `broker-and-storage-notes`).

pub mod control;
pub mod nodes;
pub mod publisher;
pub mod topology;
pub mod worker;

use lapin::protocol::{AMQPError, AMQPErrorKind};
use lapin::tcp::OwnedTLSConfig;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder, ErrorKind};

use crate::config::{AmqpSettings, ConfigError};

/// AMQP header of a job's or an event's W3C `traceparent` (the name OpenTelemetry's AMQP
/// propagation uses: the HTTP header's, in lowercase).
pub const TRACEPARENT: &str = "traceparent";
/// AMQP header of the W3C `tracestate` that goes with it.
pub const TRACESTATE: &str = "tracestate";

/// Why a connection could not be opened. The broker refusing us (credentials, vhost) or a
/// listener that does not speak AMQP will not change by retrying: those are settings to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A setting is wrong; retrying cannot help. One line naming the key and the fix.
    #[error(transparent)]
    Settings(#[from] ConfigError),
    /// The broker may come back (refused connection, timeout, reset, broker shutting down).
    #[error("cannot connect to RabbitMQ at {url}: {cause}")]
    Unavailable { url: String, cause: String },
}

impl ConnectError {
    /// True when retrying the same settings cannot succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(self, ConnectError::Settings(_))
    }
}

/// Opens a connection named `name` (visible in the management UI and `rabbitmqctl`) to the first
/// broker node that answers, in the order of [`nodes`]; see [`connect_node`].
pub async fn connect(settings: &AmqpSettings, name: &str) -> Result<Connection, ConnectError> {
    connect_node(settings, name)
        .await
        .map(|(connection, _)| connection)
}

/// Tries each node of `amqp.urls` (or the one `amqp.url`) once, starting from the one the
/// process last reached, and returns the connection with the node it reached. A node that
/// refuses the settings (credentials, vhost, not AMQP) does not stop the others from being
/// tried (one node may be booting, or one entry mistyped); when none connects, the first such
/// refusal is the error, else the error names each node with its cause.
pub async fn connect_node(
    settings: &AmqpSettings,
    name: &str,
) -> Result<(Connection, nodes::Node), ConnectError> {
    let listed = settings.nodes();
    let urls: Vec<&str> = listed.iter().map(|(_, url)| *url).collect();
    let rotation = nodes::rotation(&urls);
    let mut failures = Vec::new();
    let mut refused = None;
    for index in rotation.order() {
        let (key, url) = &listed[index];
        match connect_one(settings, key, url, name).await {
            Ok(connection) => {
                rotation.reached(index);
                let node = nodes::Node::new(rotation.clone(), index, redacted_url(url));
                return Ok((connection, node));
            }
            Err(ConnectError::Unavailable { url, cause }) => {
                rotation.failed(index);
                if listed.len() > 1 {
                    tracing::info!(node = %url, "cannot connect to this RabbitMQ node: {cause}");
                }
                failures.push((url, cause));
            }
            Err(permanent) => {
                rotation.failed(index);
                if listed.len() > 1 {
                    tracing::warn!(node = %redacted_url(url), "this RabbitMQ node refused the settings: {permanent}");
                }
                refused.get_or_insert(permanent);
            }
        }
    }
    Err(refused.unwrap_or_else(|| unavailable(failures)))
}

/// One node's failure as it always was; several as "any of N nodes" with each node's cause.
fn unavailable(mut failures: Vec<(String, String)>) -> ConnectError {
    if failures.len() == 1 {
        let (url, cause) = failures.remove(0);
        return ConnectError::Unavailable { url, cause };
    }
    ConnectError::Unavailable {
        url: format!("any of {} nodes", failures.len()),
        cause: failures
            .iter()
            .map(|(url, cause)| format!("{url}: {cause}"))
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// Connects to the node at `url` (named `key` in errors), with the configured heartbeat unless
/// the URL sets one, trusting `amqp.ca_file` for `amqps://`.
async fn connect_one(
    settings: &AmqpSettings,
    key: &str,
    url: &str,
    name: &str,
) -> Result<Connection, ConnectError> {
    let url_error = |problem: String| ConfigError {
        key: key.into(),
        problem,
    };
    let mut uri: AMQPUri = url
        .parse()
        .map_err(|_: String| url_error(crate::config::NOT_AN_AMQP_URL.to_owned()))?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(settings.heartbeat_secs);
    }
    if uri.query.connection_timeout.is_none() {
        uri.query.connection_timeout = Some(10_000);
    }
    // lapin bounds the TCP connect only; a listener that accepts and then says nothing would
    // hold the handshake forever.
    let limit = std::time::Duration::from_millis(uri.query.connection_timeout.unwrap_or(10_000))
        + std::time::Duration::from_secs(1);
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: if settings.ca_file.as_os_str().is_empty() {
            None
        } else {
            Some(settings.ca_bundle()?)
        },
    };
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let url = redacted_url(url);
    let builder = DefaultConnectionBuilder::new().map_err(|error| ConnectError::Unavailable {
        url: url.clone(),
        cause: one_line(&error.to_string()),
    })?;
    let handshake = builder
        .with_uri(uri)
        .with_properties(properties)
        .with_tls_config(tls);
    match tokio::time::timeout(limit, handshake.connect()).await {
        Ok(connected) => connected.map_err(|error| classify(key, &url, &error)),
        Err(_) => Err(ConnectError::Unavailable {
            url,
            cause: format!("no AMQP handshake within {limit:?}"),
        }),
    }
}

/// Sorts a connect failure into "fix the settings" or "try again", with one line saying which.
fn classify(key: &str, url: &str, error: &lapin::Error) -> ConnectError {
    let refused = |what: String, fix: &str| {
        ConnectError::Settings(ConfigError {
            key: key.into(),
            problem: format!("the broker at {url} {what}; {fix}"),
        })
    };
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.get_id() {
            403 => refused(
                format!("refused the credentials ({})", amqp_reason(amqp)),
                "check the user and password",
            ),
            530 | 402 => refused(
                format!("refused the virtual host ({})", amqp_reason(amqp)),
                "check the vhost at the end of the URL (%2f is the default /) and the user's permissions on it",
            ),
            _ => ConnectError::Unavailable {
                url: url.into(),
                cause: one_line(&amqp.to_string()),
            },
        },
        ErrorKind::ParsingError(_) | ErrorKind::InvalidProtocolVersion(_) => refused(
            "does not speak AMQP 0-9-1".into(),
            "check the host and port (RabbitMQ listens on 5672, or 5671 for amqps)",
        ),
        ErrorKind::AuthProviderError(problem) => refused(
            format!("refused the credentials ({})", one_line(problem)),
            "check the user and password",
        ),
        _ => ConnectError::Unavailable {
            url: url.into(),
            cause: one_line(&error.to_string()),
        },
    }
}

/// `ACCESS-REFUSED - Login was refused ...`: the code name and the broker's own words.
fn amqp_reason(error: &AMQPError) -> String {
    let code = match error.kind() {
        AMQPErrorKind::Soft(soft) => soft.to_string(),
        AMQPErrorKind::Hard(hard) => hard.to_string(),
    };
    let message = error.get_message().as_str();
    // RabbitMQ repeats the code name at the start of its message.
    let message = message
        .strip_prefix(code.replace('-', "_").as_str())
        .map(|rest| rest.trim_start_matches([' ', '-']))
        .unwrap_or(message);
    one_line(&format!("{code}: {message}"))
}

/// Library errors can span lines; a log line or an error line must not.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
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

/// Every node of `settings` without its password, for logs: `amqp://guest@host:5672/%2f, ...`.
pub fn redacted_nodes(settings: &AmqpSettings) -> String {
    settings
        .nodes()
        .iter()
        .map(|(_, url)| redacted_url(url))
        .collect::<Vec<_>>()
        .join(", ")
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
    use super::{ConnectError, connect_node, redacted_url};
    use crate::config::AmqpSettings;

    /// A loopback port nothing listens on (bound, then released).
    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn when_no_node_answers_the_error_names_each_without_its_password() {
        let urls: Vec<String> = (0..2)
            .map(|_| format!("amqp://ops:s3cret@127.0.0.1:{}/%2f", closed_port()))
            .collect();
        let settings = AmqpSettings {
            urls: urls.clone(),
            ..AmqpSettings::default()
        };
        let error = connect_node(&settings, "keyturn-test").await.unwrap_err();
        assert!(matches!(error, ConnectError::Unavailable { .. }), "{error}");
        let shown = error.to_string();
        assert!(shown.contains("any of 2 nodes"), "{shown}");
        for url in &urls {
            assert!(shown.contains(&redacted_url(url)), "{shown}");
        }
        assert!(!shown.contains("s3cret"), "{shown}");
    }

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
