//! The consuming side: a supervisor loop that (re)connects with capped backoff, declares the
//! topology, applies the prefetch, and feeds deliveries to the pipeline, at most `prefetch` at a
//! time (of which at most `concurrency` are in an API call); then settles each one as the
//! pipeline decided.
//!
//! Shutdown: on cancel the consumer is cancelled (no new deliveries), in-flight jobs get the grace
//! period, and closing the channel hands anything unfinished back to the queue.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};

use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Acker, Channel, Consumer};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{TRACEPARENT, TRACESTATE, topology};
use crate::circuit::Scope;
use crate::ops::metrics::InFlight;
use crate::pipeline::{Admitted, Delivery, Disposition, Pipeline};
use crate::retry::Backoff;
use crate::trace::TraceHeaders;

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

/// How often parked jobs of closed circuits are looked for, and limiter maps pruned.
const HOUSEKEEPING: Duration = Duration::from_secs(60);
/// Control commands taken at once.
const CONTROL_PREFETCH: u16 = 8;
/// A session that lived this long resets the reconnect backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);

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
    let mut housekeeping = None;
    let mut reconnects = Reconnects::new(backoff);
    // A worker restarted under its id takes its earlier run's jobs back once every call that run
    // can have started has ended (`api.request_timeout` after this start), not a whole lease later.
    let releasing = tokio::spawn(release_predecessors(pipeline.clone(), stop.clone()));
    while !stop.is_cancelled() {
        let started = Instant::now();
        let ended = session(&pipeline, &options, &stop, &mut housekeeping).await;
        let reason = match ended {
            Ok(SessionEnd::Shutdown) => break,
            Ok(SessionEnd::Lost(reason)) => format!("broker connection lost: {reason}"),
            Err(error) => format!("cannot consume: {error:#}"),
        };
        let ceiling = reconnects.after(started.elapsed());
        let wait = Backoff {
            base: ceiling,
            cap: ceiling,
        }
        .delay(0, &mut rand::rng())
        .max(Duration::from_millis(100));
        tracing::warn!(
            retry_in_ms = wait.as_millis() as u64,
            "{reason}; reconnecting"
        );
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
    }
    pipeline.stopping.cancel();
    releasing.abort();
    if let Some(task) = housekeeping {
        let _ = task.await;
    }
    // The leases of jobs handed back or abandoned: another worker need not wait them out.
    pipeline.leases.renew(&pipeline.audit).await;
    Ok(())
}

/// Drops the leases of earlier runs of this worker's id, `api.request_timeout` after the start.
async fn release_predecessors(pipeline: Arc<Pipeline>, stop: CancellationToken) {
    tokio::select! {
        () = stop.cancelled() => return,
        () = tokio::time::sleep(pipeline.settings.api.request_timeout) => {}
    }
    match pipeline
        .audit
        .release_predecessors(&pipeline.worker_id, &pipeline.leases.owner)
        .await
    {
        Ok(0) => {}
        Ok(released) => tracing::info!(
            released,
            "dropped the leases an earlier run of this worker left"
        ),
        Err(error) => tracing::warn!(%error, "could not drop an earlier run's leases; they expire"),
    }
}

/// The reconnect backoff: its ceiling doubles with every session that died young (or never
/// started) and starts over after one that lived [`STABLE_SESSION`].
struct Reconnects {
    backoff: Backoff,
    failures: u32,
}

impl Reconnects {
    fn new(backoff: Backoff) -> Reconnects {
        Reconnects {
            backoff,
            failures: 0,
        }
    }

    /// The ceiling of the wait after a session that lived `lived` (full jitter is drawn below it).
    fn after(&mut self, lived: Duration) -> Duration {
        if lived >= STABLE_SESSION {
            self.failures = 0;
        }
        let ceiling = self.backoff.ceiling(self.failures);
        self.failures = self.failures.saturating_add(1);
        ceiling
    }
}

/// Background work of a running worker: releasing parked jobs whose circuit is closed (a
/// release cut short, or parked by another worker), and pruning the rate limiters' maps.
fn housekeeping(pipeline: &Arc<Pipeline>) -> tokio::task::JoinHandle<()> {
    let pipeline = pipeline.clone();
    tokio::spawn(async move {
        let stopping = pipeline.stopping.clone();
        let pruning = async {
            loop {
                tokio::time::sleep(HOUSEKEEPING).await;
                pipeline.limits.prune();
            }
        };
        tokio::select! {
            () = pipeline.keep_releasing(HOUSEKEEPING, stopping.clone()) => {}
            () = pipeline.keep_publishing_rollout_events() => {}
            () = pipeline.keep_health() => {}
            () = pipeline.keep_renewing_leases() => {}
            () = pruning => {}
            () = stopping.cancelled() => {}
        }
    })
}

/// One connection's life: set up, consume, and on the way out settle or hand back in-flight jobs.
async fn session(
    pipeline: &Arc<Pipeline>,
    options: &RunOptions,
    stop: &CancellationToken,
    housekeeping_task: &mut Option<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<SessionEnd> {
    let (connection, node) = super::connect_node(
        &pipeline.settings.amqp,
        &format!("keyturn-worker-{}", pipeline.worker_id),
    )
    .await?;
    tracing::info!(node = %node.shown, "connected to RabbitMQ");
    let ended = session_on(pipeline, options, stop, housekeeping_task, connection).await;
    if !matches!(ended, Ok(SessionEnd::Shutdown)) {
        // The next session starts at the next node: with a cluster, the one that lost us may
        // be down for a while.
        node.lost();
    }
    ended
}

/// The session on an open connection.
async fn session_on(
    pipeline: &Arc<Pipeline>,
    options: &RunOptions,
    stop: &CancellationToken,
    housekeeping_task: &mut Option<tokio::task::JoinHandle<()>>,
    connection: lapin::Connection,
) -> anyhow::Result<SessionEnd> {
    let settings = &pipeline.settings;
    let channel = connection.create_channel().await?;
    topology::declare(&channel, &settings.amqp).await?;
    let prefetch = settings.worker.prefetch();
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    if housekeeping_task.is_none() {
        // Jobs parked before a restart go back to the queue before anything else happens.
        pipeline.release_closed(stop).await;
        *housekeeping_task = Some(housekeeping(pipeline));
    }
    let mut consuming = Consuming::start(pipeline, &channel).await?;
    tracing::info!(queue = %settings.amqp.jobs_queue, prefetch, calls = settings.worker.concurrency, "consuming");
    // Commands have a channel and a consumer of their own: they are taken even while the
    // credentials circuit stops the jobs.
    let control_channel = connection.create_channel().await?;
    control_channel
        .basic_qos(CONTROL_PREFETCH, BasicQosOptions::default())
        .await?;
    let mut control = control_channel
        .basic_consume(
            settings.amqp.control_queue.as_str().into(),
            format!("keyturn-control-{}", uuid::Uuid::new_v4().simple())
                .as_str()
                .into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    // Commands are applied one at a time, in the order they came: "pause, resume" sent at once
    // must not be applied as "resume, pause".
    let (commands, queued) = tokio::sync::mpsc::unbounded_channel();
    let runner = tokio::spawn(apply_commands(pipeline.clone(), queued, stop.clone()));
    let mut tasks = JoinSet::new();
    let slots = Arc::new(Semaphore::new(prefetch.into()));
    let idle = IdleWatch::new(options.exit_when_idle);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut circuits = pipeline.circuits.watch();
    let connected = Connected::up(pipeline);
    let end = 'consume: loop {
        // Wait for a free slot; commands are taken meanwhile (a full worker still hears pause).
        let permit = loop {
            tokio::select! {
                () = stop.cancelled() => break 'consume SessionEnd::Shutdown,
                permit = slots.clone().acquire_owned() => break permit.expect("the semaphore is never closed"),
                command = control.next() => if let Err(end) = forward(command, &commands) {
                    break 'consume end;
                },
            }
        };
        // With a free slot, wait for the next delivery; meanwhile reap finished jobs, follow the
        // credentials circuit and watch for idleness.
        let next = loop {
            if let Err(error) = consuming.follow_circuits(pipeline, &channel).await {
                break 'consume SessionEnd::Lost(error.to_string());
            }
            tokio::select! {
                () = stop.cancelled() => break 'consume SessionEnd::Shutdown,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = circuits.changed() => {}
                _ = tick.tick(), if idle.enabled() => {
                    let busy = !tasks.is_empty() || pipeline.circuits.any_open();
                    if idle.is_over(&channel, &settings.amqp.jobs_queue, busy).await {
                        tracing::info!("queue idle; stopping");
                        stop.cancel();
                    }
                }
                next = consuming.next() => match next {
                    Some(next) => break next,
                    // The stream of a consumer we cancelled ended: wait for the circuit.
                    None => continue,
                },
                command = control.next() => if let Err(end) = forward(command, &commands) {
                    break 'consume end;
                },
            }
        };
        let mut delivery = match next {
            Ok(delivery) => delivery,
            Err(error) => break SessionEnd::Lost(error),
        };
        idle.touch();
        pipeline.metrics.deliveries.inc();
        // Admitted here, in delivery order: that is what orders the jobs of one instance.
        let admitted = pipeline.admit(to_domain(&mut delivery));
        let pipeline = pipeline.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            handle(&pipeline, admitted, delivery.acker, &stop).await;
            drop(permit);
        });
    };
    drop(connected);
    drop(commands);
    if tokio::time::timeout(settings.worker.grace_period, runner)
        .await
        .is_err()
    {
        tracing::warn!("a control command did not finish within the grace period");
    }
    match &end {
        SessionEnd::Shutdown => {
            consuming.cancel(&channel).await;
            drain(&mut tasks, settings.worker.grace_period).await;
            let _ = channel.close(200, "keyturn worker stopping".into()).await;
            let _ = connection
                .close(200, "keyturn worker stopping".into())
                .await;
        }
        // Jobs of the lost session cannot be acked; let them make their records safe (their
        // redeliveries replay them), then abort the rest before a new session admits more.
        SessionEnd::Lost(_) => drain(&mut tasks, settings.worker.grace_period).await,
    }
    Ok(end)
}

/// Marks the broker session up (for `/readyz` and `keyturn_broker_connected`) while it lives.
struct Connected<'a>(&'a Pipeline);

impl<'a> Connected<'a> {
    fn up(pipeline: &'a Pipeline) -> Connected<'a> {
        pipeline.metrics.session_started();
        Connected(pipeline)
    }
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.metrics.broker_connected.set(0);
    }
}

/// The consumer, and whether the credentials circuit has paused it.
struct Consuming {
    consumer: Option<Consumer>,
    tag: String,
    /// We cancelled the consumer: its stream ends after the deliveries it still holds.
    paused: bool,
}

impl Consuming {
    async fn start(pipeline: &Pipeline, channel: &Channel) -> anyhow::Result<Consuming> {
        let mut consuming = Consuming {
            consumer: None,
            tag: String::new(),
            paused: false,
        };
        if !pipeline.circuits.is_open(&Scope::Credentials) {
            consuming.subscribe(pipeline, channel).await?;
        } else {
            consuming.paused = true;
        }
        Ok(consuming)
    }

    async fn subscribe(&mut self, pipeline: &Pipeline, channel: &Channel) -> anyhow::Result<()> {
        self.tag = format!(
            "keyturn-{}-{}",
            pipeline.worker_id,
            uuid::Uuid::new_v4().simple()
        );
        let queue = pipeline.settings.amqp.jobs_queue.as_str();
        self.consumer = Some(
            channel
                .basic_consume(
                    queue.into(),
                    self.tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?,
        );
        self.paused = false;
        Ok(())
    }

    /// While the credentials circuit is open no job can be served: stop taking deliveries (the
    /// ones already delivered are parked as usual), and take them again once it closes.
    async fn follow_circuits(
        &mut self,
        pipeline: &Pipeline,
        channel: &Channel,
    ) -> anyhow::Result<()> {
        let open = pipeline.circuits.is_open(&Scope::Credentials);
        if open && !self.paused {
            tracing::warn!("credentials circuit open: not taking deliveries until it closes");
            channel
                .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
                .await?;
            self.paused = true;
        } else if !open && self.paused && self.consumer.is_none() {
            tracing::info!("credentials circuit closed: taking deliveries again");
            self.subscribe(pipeline, channel).await?;
        }
        Ok(())
    }

    /// The next delivery; `None` while paused and the cancelled stream is done.
    async fn next(&mut self) -> Option<Result<AmqpDelivery, String>> {
        let Some(consumer) = self.consumer.as_mut() else {
            return std::future::pending().await;
        };
        match consumer.next().await {
            Some(Ok(delivery)) => Some(Ok(delivery)),
            Some(Err(error)) => Some(Err(error.to_string())),
            None if self.paused => {
                self.consumer = None;
                None
            }
            None => Some(Err("consumer stream ended".into())),
        }
    }

    async fn cancel(&self, channel: &Channel) {
        if self.consumer.is_some() {
            let _ = channel
                .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
    }
}

/// Gives in-flight jobs the grace period, then aborts the rest: closing the channel hands them
/// back to the queue.
async fn drain(tasks: &mut JoinSet<()>, grace: Duration) {
    let in_flight = tasks.len();
    let finished =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        tracing::warn!(
            unfinished = tasks.len(),
            "grace period over; unfinished jobs go back to the queue"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    } else if in_flight > 0 {
        tracing::info!(in_flight, "in-flight jobs finished");
    }
}

async fn handle(
    pipeline: &Arc<Pipeline>,
    admitted: Admitted,
    acker: Acker,
    stop: &CancellationToken,
) {
    let _counted = InFlight::enter(&pipeline.metrics.in_flight);
    let processed = AssertUnwindSafe(pipeline.process(admitted, stop))
        .catch_unwind()
        .await;
    let settled = match processed {
        Ok(Disposition::Ack) => acker.ack(Default::default()).await,
        Ok(Disposition::DeadLetter) => acker.reject(BasicRejectOptions { requeue: false }).await,
        Ok(Disposition::Abandon) => return,
        // A bug, not the job's fault: the delivery goes back (counting toward the queue's
        // delivery limit, so a job that always panics ends in the dead queue), and the slot,
        // the job's lock and its instance's turn are freed as the task unwinds.
        Err(_) => {
            tracing::error!("job processing panicked; returning the delivery to the queue");
            acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
        }
    };
    match settled {
        Ok(true) => {}
        Ok(false) | Err(_) => tracing::warn!(
            "channel closed before the job could be settled; the broker redelivers it and the stored result is replayed"
        ),
    }
}

/// Hands a control delivery to the command runner; a consumer that failed ends the session.
fn forward(
    command: Option<Result<AmqpDelivery, lapin::Error>>,
    commands: &tokio::sync::mpsc::UnboundedSender<AmqpDelivery>,
) -> Result<(), SessionEnd> {
    match command {
        Some(Ok(command)) => {
            // The runner lives as long as the session; a send can only fail while it ends.
            let _ = commands.send(command);
            Ok(())
        }
        Some(Err(error)) => Err(SessionEnd::Lost(error.to_string())),
        None => Err(SessionEnd::Lost("control consumer ended".into())),
    }
}

/// Applies the session's control commands one after another, in delivery order.
async fn apply_commands(
    pipeline: Arc<Pipeline>,
    mut queued: tokio::sync::mpsc::UnboundedReceiver<AmqpDelivery>,
    stop: CancellationToken,
) {
    while let Some(command) = queued.recv().await {
        handle_control(&pipeline, command, &stop).await;
    }
}

/// Applies one control command and settles its delivery.
async fn handle_control(
    pipeline: &Arc<Pipeline>,
    mut delivery: AmqpDelivery,
    stop: &CancellationToken,
) {
    let incoming = to_domain(&mut delivery);
    let processed = AssertUnwindSafe(pipeline.control(incoming, stop))
        .catch_unwind()
        .await;
    let acker = delivery.acker;
    let _ = match processed {
        Ok(Disposition::Ack) => acker.ack(Default::default()).await,
        Ok(Disposition::DeadLetter) => acker.reject(BasicRejectOptions { requeue: false }).await,
        Ok(Disposition::Abandon) => return,
        Err(_) => {
            tracing::error!("control command panicked; returning it to the queue");
            acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
        }
    };
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
        trace: TraceHeaders {
            traceparent: header_text(properties.headers(), TRACEPARENT),
            tracestate: header_text(properties.headers(), TRACESTATE),
        },
    }
}

/// A text header's value; other types, and text that is not UTF-8, count as absent.
fn header_text(headers: &Option<FieldTable>, name: &str) -> Option<String> {
    let bytes = match headers.as_ref()?.inner().get(name)? {
        AMQPValue::LongString(text) => text.as_bytes(),
        AMQPValue::ShortString(text) => text.as_str().as_bytes(),
        _ => return None,
    };
    std::str::from_utf8(bytes).ok().map(str::to_owned)
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

    async fn is_over(&self, channel: &Channel, queue: &str, busy: bool) -> bool {
        let Some(after) = self.after else {
            return false;
        };
        let Ok(ready) = topology::ready_messages(channel, queue).await else {
            return false;
        };
        let mut since = self.since.lock().expect("idle lock");
        if ready > 0 || busy {
            *since = None;
            return false;
        }
        let started = *since.get_or_insert_with(Instant::now);
        started.elapsed() >= after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_back_off_while_sessions_die_young_and_start_over_after_a_stable_one() {
        let mut reconnects = Reconnects::new(Backoff {
            base: Duration::from_millis(200),
            cap: Duration::from_secs(30),
        });
        let young = Duration::from_millis(50);
        let ceilings: Vec<u128> = (0..10)
            .map(|_| reconnects.after(young).as_millis())
            .collect();
        assert_eq!(
            ceilings,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
        assert_eq!(reconnects.after(STABLE_SESSION).as_millis(), 200);
        assert_eq!(reconnects.after(young).as_millis(), 400);
    }
}
