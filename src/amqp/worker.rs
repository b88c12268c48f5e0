//! The consuming side: a supervisor loop that (re)connects with capped backoff, declares the
//! topology, applies the prefetch, and feeds deliveries to the pipeline, at most `concurrency` at
//! a time; then settles each one as the pipeline decided.
//!
//! Shutdown: on cancel the consumer is cancelled (no new deliveries), in-flight jobs get the grace
//! period, and closing the channel hands anything unfinished back to the queue.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::topology;
use crate::pipeline::{Delivery, Disposition, Pipeline};
use crate::retry::Backoff;

/// How a worker run is shaped beyond the settings.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop once the queue has been empty, with nothing in flight, for this long.
    pub exit_when_idle: Option<Duration>,
}

/// Why one connected session ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// Consumes until `shutdown` fires (or the queue stays idle, with `exit_when_idle`).
pub async fn run(
    pipeline: Arc<Pipeline>,
    options: RunOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let stop = shutdown.child_token();
    let settings = &pipeline.settings.amqp;
    let backoff = Backoff {
        base: Duration::from_millis(200),
        cap: settings.reconnect_max_backoff,
    };
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        match session(&pipeline, &options, &stop).await {
            Ok(SessionEnd::Shutdown) => break,
            Ok(SessionEnd::Lost(reason)) => {
                tracing::warn!(%reason, "broker connection lost; reconnecting");
                failures = 0;
            }
            Err(error) => {
                let wait = backoff
                    .delay(failures, &mut rand::rng())
                    .max(Duration::from_millis(100));
                tracing::warn!(error = %format!("{error:#}"), retry_in_ms = wait.as_millis() as u64, "cannot consume");
                failures = failures.saturating_add(1);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    Ok(())
}

/// One connection's life: set up, consume, and on the way out settle or hand back in-flight jobs.
async fn session(
    pipeline: &Arc<Pipeline>,
    options: &RunOptions,
    stop: &CancellationToken,
) -> anyhow::Result<SessionEnd> {
    let settings = &pipeline.settings;
    let connection = super::connect(
        &settings.amqp,
        &format!("keyturn-worker-{}", pipeline.worker_id),
    )
    .await?;
    let channel = connection.create_channel().await?;
    topology::declare(&channel, &settings.amqp).await?;
    let concurrency = settings.worker.concurrency;
    channel
        .basic_qos(concurrency, BasicQosOptions::default())
        .await?;
    let tag = format!(
        "keyturn-{}-{}",
        pipeline.worker_id,
        uuid::Uuid::new_v4().simple()
    );
    let mut consumer = channel
        .basic_consume(
            settings.amqp.jobs_queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %settings.amqp.jobs_queue, prefetch = concurrency, "consuming");

    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(concurrency.into()));
    let idle = IdleWatch::new(options.exit_when_idle);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let end = 'consume: loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break SessionEnd::Shutdown,
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        // With a free slot, wait for the next delivery; meanwhile watch for idleness.
        let next = loop {
            tokio::select! {
                () = stop.cancelled() => break 'consume SessionEnd::Shutdown,
                _ = tick.tick(), if idle.enabled() => {
                    if idle.is_over(&channel, &settings.amqp.jobs_queue, &tracker).await {
                        tracing::info!("queue idle; stopping");
                        stop.cancel();
                    }
                }
                next = consumer.next() => break next,
            }
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => break SessionEnd::Lost(error.to_string()),
            None => break SessionEnd::Lost("consumer stream ended".into()),
        };
        idle.touch();
        let pipeline = pipeline.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            handle(&pipeline, delivery, &stop).await;
            drop(permit);
        });
    };
    tracker.close();
    if let SessionEnd::Shutdown = end {
        drain(
            &channel,
            &connection,
            &tag,
            &tracker,
            settings.worker.grace_period,
        )
        .await;
    }
    Ok(end)
}

/// Stops deliveries, gives in-flight jobs the grace period, then closes: the broker requeues
/// whatever is still unacked.
async fn drain(
    channel: &Channel,
    connection: &Connection,
    tag: &str,
    tracker: &TaskTracker,
    grace: Duration,
) {
    let _ = channel
        .basic_cancel(tag.into(), BasicCancelOptions::default())
        .await;
    let in_flight = tracker.len();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            unfinished = tracker.len(),
            "grace period over; unfinished jobs go back to the queue"
        );
    } else {
        tracing::info!(in_flight, "in-flight jobs finished");
    }
    let _ = channel.close(200, "keyturn worker stopping".into()).await;
    let _ = connection
        .close(200, "keyturn worker stopping".into())
        .await;
}

async fn handle(pipeline: &Pipeline, mut delivery: AmqpDelivery, stop: &CancellationToken) {
    let incoming = to_domain(&mut delivery);
    let disposition = pipeline.process(incoming, stop).await;
    let settled = match disposition {
        Disposition::Ack => delivery.acker.ack(Default::default()).await,
        Disposition::DeadLetter => {
            delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await
        }
        Disposition::Abandon => return,
    };
    match settled {
        Ok(true) => {}
        Ok(false) | Err(_) => tracing::warn!(
            ?disposition,
            "channel closed before the job could be settled; the broker redelivers it and the stored result is replayed"
        ),
    }
}

/// The pipeline's view of a delivery; the body moves over (only the acker stays behind).
fn to_domain(delivery: &mut AmqpDelivery) -> Delivery {
    let properties = &delivery.properties;
    let text =
        |value: &Option<lapin::types::ShortString>| value.as_ref().map(|s| s.as_str().to_owned());
    Delivery {
        body: std::mem::take(&mut delivery.data),
        message_id: text(properties.message_id()),
        correlation_id: text(properties.correlation_id()),
        reply_to: text(properties.reply_to()),
        content_type: text(properties.content_type()),
        redelivered: delivery.redelivered,
        received_at: chrono::Utc::now(),
    }
}

/// Tracks how long the queue has been empty with nothing in flight.
struct IdleWatch {
    after: Option<Duration>,
    since: std::sync::Mutex<Option<Instant>>,
}

impl IdleWatch {
    fn new(after: Option<Duration>) -> IdleWatch {
        IdleWatch {
            after,
            since: std::sync::Mutex::new(None),
        }
    }

    fn enabled(&self) -> bool {
        self.after.is_some()
    }

    fn touch(&self) {
        *self.since.lock().expect("idle lock") = None;
    }

    async fn is_over(&self, channel: &Channel, queue: &str, tracker: &TaskTracker) -> bool {
        let Some(after) = self.after else {
            return false;
        };
        let Ok(ready) = topology::ready_messages(channel, queue).await else {
            return false;
        };
        let mut since = self.since.lock().expect("idle lock");
        if ready > 0 || !tracker.is_empty() {
            *since = None;
            return false;
        }
        let started = *since.get_or_insert_with(Instant::now);
        started.elapsed() >= after
    }
}
