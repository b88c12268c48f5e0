//! The path of one delivery: admit (parse, take the instance's turn) → identity check → circuit
//! check → signed calls with retries → audit commit → confirmed result event → a [`Disposition`]
//! telling the AMQP layer what to do.
//!
//! This is the one place that decides ack, dead-letter or leave-for-redelivery. It knows nothing
//! of lapin: deliveries arrive as [`Delivery`] values, events leave through an [`EventSink`] and
//! jobs go back to the queue through a [`JobQueue`]. Nothing that is the deployment's fault ends
//! a job: the audit store or the broker failing holds it ([`health`]); refused credentials or an
//! unreachable endpoint park it until a probe passes ([`parking`]).
//!
//! - [`calls`]: the API phase, its retries and its deadline.
//! - [`health`]: the infrastructure gate and the retry of infrastructure operations.
//! - [`locks`]: one delivery per job key, one job per instance in delivery order.
//! - [`parking`]: parking, handing back, probing and releasing.
//! - [`results`]: what a finished job's record and event say.

mod calls;
mod control;
mod health;
mod leases;
mod locks;
mod parking;
mod results;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use health::{Dependency, Health};
pub use leases::Leases;
pub use locks::{InstanceTurns, JobLocks, Turn, TurnReady};

use crate::audit::{AuditStore, Earlier, FinalRecord, Recorded, RolloutView, Seen, StoredEvent};
use crate::circuit::{AuthMode, Circuits};
use crate::config::Settings;
use crate::events::{EventSink, Outcome, Outgoing, ResultEvent};
use crate::gaussdb::Client;
use crate::job::{self, Identity, Job, ParseContext, Rejection};
use crate::limits::Limits;
use crate::ops::metrics::observe;
use crate::rollout::Admission;
use crate::trace::{TraceContext, TraceHeaders};
use calls::Ended;
use health::Infra;

/// A message as the AMQP layer hands it over.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub content_type: Option<String>,
    pub redelivered: bool,
    pub received_at: DateTime<Utc>,
    /// The W3C trace headers it came with, unchecked.
    pub trace: TraceHeaders,
}

/// What to do with a delivery once processing is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The record and event are safe, or the job is parked or handed back: acknowledge.
    Ack,
    /// The job was rejected and recorded: `basic.reject(requeue=false)` to the dead queue.
    DeadLetter,
    /// Shutting down before the job could be made safe: leave it unacked for redelivery.
    Abandon,
}

impl Delivery {
    /// This delivery as it would go back to a queue: the original body and properties.
    pub fn requeue(&self) -> Requeue<'_> {
        Requeue {
            body: &self.body,
            message_id: self.message_id.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
            reply_to: self.reply_to.as_deref(),
            content_type: self.content_type.as_deref(),
            traceparent: self.trace.traceparent.as_deref(),
            tracestate: self.trace.tracestate.as_deref(),
        }
    }
}

/// A job as it goes back to the jobs queue: the original body and properties.
#[derive(Debug, Clone, Copy)]
pub struct Requeue<'a> {
    pub body: &'a [u8],
    pub message_id: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    pub reply_to: Option<&'a str>,
    pub content_type: Option<&'a str>,
    /// W3C trace headers to send the job with.
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
}

/// What the pipeline asks of the broker besides result events (the AMQP publisher in
/// production). Every call returns once the broker confirmed the message.
#[async_trait::async_trait]
pub trait JobQueue: Send + Sync {
    /// Publishes `job` to the jobs queue.
    async fn requeue(&self, job: &Requeue<'_>) -> anyhow::Result<()>;
    /// Sends a message to the dead queue with `reason` in the `keyturn-error` header.
    async fn dead_letter(&self, message: &Requeue<'_>, reason: &str) -> anyhow::Result<()>;
    /// Answers a control command on its `reply_to` queue.
    async fn reply(
        &self,
        reply_to: &str,
        correlation_id: Option<&str>,
        body: &[u8],
    ) -> anyhow::Result<()>;
}

/// Everything one worker needs to process deliveries; shared by all in-flight jobs.
pub struct Pipeline {
    pub settings: Settings,
    pub worker_id: String,
    pub client: Client,
    pub auth: AuthMode,
    pub audit: AuditStore,
    pub events: Arc<dyn EventSink>,
    pub jobs: Arc<dyn JobQueue>,
    pub limits: Limits,
    pub health: Health,
    pub circuits: Circuits,
    pub locks: JobLocks,
    pub turns: InstanceTurns,
    /// This worker's leases on job keys in the store.
    pub leases: Arc<Leases>,
    /// The rate limits are also taken from the store's buckets, shared by every worker on it
    /// (on PostgreSQL; a SQLite store serves one host, whose workers keep their own limits).
    pub fleet_limits: bool,
    /// One job at a time per set of buckets asks the store for tokens.
    fleet_gates: JobLocks,
    /// Call slots (`worker.concurrency`): a job holds one from its rate-limit wait to its
    /// call's answer. The deliveries the worker holds (`worker.prefetch`) may be more: their
    /// store writes, result events and acks do not hold a slot.
    call_slots: tokio::sync::Semaphore,
    pub metrics: crate::ops::Metrics,
    /// Cancelled when the worker stops: ends probes and releases.
    pub stopping: CancellationToken,
    /// Poked when rollout events may be waiting in the store's outbox.
    pub outbox: tokio::sync::Notify,
    releasing: tokio::sync::Mutex<()>,
}

/// A delivery admitted by the consuming loop: parsed once, with its place in its instance's line.
pub struct Admitted {
    delivery: Delivery,
    parsed: Result<Job, Rejection>,
    body_digest: String,
    turn: Option<Turn>,
}

/// What a delivery is worked on with, besides the pipeline.
struct Context<'a> {
    delivery: &'a Delivery,
    identity: Identity,
    /// The job's place in its trace: what its result event and a hand-back carry.
    trace: TraceContext,
    body_digest: String,
    /// Past this instant the job is handed back to the queue rather than held longer, so no
    /// delivery meets RabbitMQ's consumer timeout.
    hold_until: Instant,
    shutdown: &'a CancellationToken,
    /// The job's lease in the store, once claimed; released (if no record or park dropped it)
    /// when the delivery is done with.
    lease: std::sync::Mutex<Option<leases::LeaseGuard>>,
}

impl Context<'_> {
    /// Forgets the job's lease once its record or park dropped it in the store.
    fn settle_lease(&self) {
        if let Some(lease) = self.lease.lock().expect("lease slot").take() {
            lease.settle();
        }
    }
}

/// Whether a rejection counts toward its rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    Yes,
    /// The rejection of a reused key: the job's own outcome stands.
    No,
}

/// What a job's rollout lets it do.
enum Admit {
    /// Call the API, under this rollout's rate cap (`(rollout_id, per second)`).
    Run {
        rate: Option<(String, u32)>,
    },
    Park {
        scope: String,
        reason: String,
    },
    Cancel,
}

/// Why a job stopped waiting before its work was done.
enum Held {
    Shutdown,
    TooLong,
}

impl Pipeline {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Settings,
        worker_id: String,
        client: Client,
        auth: AuthMode,
        audit: AuditStore,
        events: Arc<dyn EventSink>,
        jobs: Arc<dyn JobQueue>,
    ) -> Pipeline {
        Pipeline {
            leases: Arc::new(Leases::new(
                &worker_id,
                settings.store.lease,
                settings.api.request_timeout,
            )),
            fleet_limits: matches!(audit.location(), crate::audit::Location::Postgres(_)),
            fleet_gates: JobLocks::default(),
            call_slots: tokio::sync::Semaphore::new(settings.worker.concurrency.into()),
            limits: Limits::new(&settings.rate_limit),
            circuits: Circuits::new(settings.circuit.strikes_to_open),
            settings,
            worker_id,
            client,
            auth,
            audit,
            events,
            jobs,
            health: Health::default(),
            locks: JobLocks::default(),
            turns: InstanceTurns::default(),
            metrics: crate::ops::Metrics::new(),
            stopping: CancellationToken::new(),
            outbox: tokio::sync::Notify::new(),
            releasing: tokio::sync::Mutex::new(()),
        }
    }

    /// Parses a delivery and takes its instance's ticket. Call in delivery order: the tickets
    /// give jobs of one instance their order.
    pub fn admit(&self, delivery: Delivery) -> Admitted {
        let body_digest = job::body_digest(&delivery.body);
        let mut parsed = job::parse(&delivery.body, &self.parse_context(&delivery));
        if let Some(problem) = self.reply_to_problem(delivery.reply_to.as_deref()) {
            let mut problems = parsed
                .err()
                .map(|r| r.problems().to_vec())
                .unwrap_or_default();
            problems.push(problem);
            parsed = Err(Rejection::of(problems));
        }
        let turn = parsed
            .as_ref()
            .ok()
            .map(|job| self.turns.take(job.instance_id.as_str()));
        Admitted {
            delivery,
            parsed,
            body_digest,
            turn,
        }
    }

    /// Processes one admitted delivery to the point where it can be acked or rejected.
    // The span is at WARN so that it stays enabled, and names the job, under a warn-only filter.
    #[tracing::instrument(level = "warn", skip_all, fields(job_id = tracing::field::Empty, rerun = tracing::field::Empty, rollout_id = tracing::field::Empty, instance_id = tracing::field::Empty, redelivered = admitted.delivery.redelivered, trace_id = tracing::field::Empty, span_id = tracing::field::Empty, parent_span_id = tracing::field::Empty))]
    pub async fn process(
        self: &Arc<Self>,
        admitted: Admitted,
        shutdown: &CancellationToken,
    ) -> Disposition {
        let Admitted {
            delivery,
            parsed,
            body_digest,
            turn,
        } = admitted;
        let identity = match &parsed {
            Ok(job) => results::identity_of(job),
            Err(_) => job::identify(&delivery.body, delivery.message_id.as_deref()),
        };
        let span = tracing::Span::current();
        span.record("job_id", identity.job_id.as_str());
        span.record("rerun", identity.rerun);
        span.record("rollout_id", identity.rollout_id.as_deref().unwrap_or("-"));
        span.record(
            "instance_id",
            identity.instance_id.as_deref().unwrap_or("-"),
        );
        let trace = join_trace(&span, &delivery.trace);
        #[cfg(debug_assertions)]
        injected_panic(&identity.job_id);
        let hold_for = self.settings.worker.max_hold;
        let received = Instant::now()
            .checked_sub(since(delivery.received_at))
            .unwrap_or_else(Instant::now);
        let ctx = Context {
            delivery: &delivery,
            identity,
            trace,
            body_digest,
            hold_until: received + hold_for,
            shutdown,
            lease: std::sync::Mutex::new(None),
        };
        // The instance's turn first, then the job key's lock: a task holding a lock never waits
        // for a turn, so two copies of one job cannot wait for each other.
        if let Some(turn) = &turn {
            match self.hold(&ctx, turn.ready()).await {
                Ok(TurnReady::Go) => {}
                // An earlier job of this instance went back to the queue: follow it, in order.
                Ok(TurnReady::FollowHandBack) => return self.hand_back(Some(turn), &ctx).await,
                Err(held) => return self.held(held, Some(turn), &ctx).await,
            }
        }
        let lock_key = format!("{}#{}", ctx.identity.job_id, ctx.identity.rerun);
        let _one_at_a_time = match self.hold(&ctx, self.locks.lock(&lock_key)).await {
            Ok(guard) => guard,
            Err(held) => return self.held(held, turn.as_ref(), &ctx).await,
        };
        let rerun = parsed.as_ref().map_or(0, |job| job.rerun);
        let rollout_id = parsed
            .as_ref()
            .ok()
            .and_then(|job| job.rollout_id.as_ref().map(|id| id.as_str()));
        let earlier = self
            .infra(Infra::AuditLookup, shutdown, || {
                self.audit
                    .lookup(&ctx.identity.job_id, rerun, &ctx.body_digest, rollout_id)
            })
            .await;
        let Some(earlier) = earlier else {
            return Disposition::Abandon;
        };
        match parsed {
            Err(rejection) => match earlier.rejection {
                Some(stored) => self.replay(stored, &ctx).await,
                None => self.reject(&rejection, Counted::Yes, &ctx).await,
            },
            Ok(job) => self.process_job(&job, earlier, turn.as_ref(), &ctx).await,
        }
    }

    async fn process_job(
        self: &Arc<Self>,
        job: &Job,
        earlier: Earlier,
        turn: Option<&Turn>,
        ctx: &Context<'_>,
    ) -> Disposition {
        let digest = job.digest();
        if let Some(seen) = conflict(&earlier, &digest) {
            return self.reject(&reused_key(job, &seen), Counted::No, ctx).await;
        }
        if let Some((stored, _)) = earlier.final_record {
            return self.replay(stored, ctx).await;
        }
        let rate = match self.admission(job, earlier.rollout.as_ref(), ctx).await {
            Some(Admit::Run { rate }) => rate,
            Some(Admit::Park { scope, reason }) => {
                return self.park(job, &digest, &scope, &reason, ctx).await;
            }
            // A job whose Modify may already have gone out finishes (Describe first) rather than
            // being recorded as cancelled before it ran.
            Some(Admit::Cancel) if earlier.marker.is_some() => None,
            Some(Admit::Cancel) => {
                // Under a lease no other worker is sending this job; with no marker stored
                // under it, none sent it before: only then is it cancelled unsent.
                match self.claim(job, &digest, false, ctx).await {
                    Ok((None, _)) => {
                        let record = self.cancelled_record(job, &digest, ctx);
                        return self.commit(record, ctx).await;
                    }
                    Ok((Some(seen), _)) if seen.other_body(&digest) => {
                        return self.reject(&reused_key(job, &seen), Counted::No, ctx).await;
                    }
                    Ok((Some(_), _)) => {
                        return self.run(job, &digest, true, None, turn, ctx).await;
                    }
                    Err(ended) => return self.ended(job, &digest, ended, turn, ctx).await,
                }
            }
            None => return Disposition::Abandon,
        };
        let uncertain = earlier.marker.is_some();
        self.run(job, &digest, uncertain, rate, turn, ctx).await
    }

    /// The API phase of a job, and what its end means for the delivery.
    async fn run(
        self: &Arc<Self>,
        job: &Job,
        digest: &str,
        uncertain: bool,
        rate: Option<(String, u32)>,
        turn: Option<&Turn>,
        ctx: &Context<'_>,
    ) -> Disposition {
        let ended = self.call(job, digest, uncertain, rate, ctx).await;
        self.ended(job, digest, ended, turn, ctx).await
    }

    async fn ended(
        self: &Arc<Self>,
        job: &Job,
        digest: &str,
        ended: Ended,
        turn: Option<&Turn>,
        ctx: &Context<'_>,
    ) -> Disposition {
        match ended {
            Ended::Finished(run) => {
                let record = self.record_of(job, digest, run, ctx);
                self.commit(record, ctx).await
            }
            Ended::Conflict(seen) => self.reject(&reused_key(job, &seen), Counted::No, ctx).await,
            Ended::Parked(scope) => {
                self.park(job, digest, &scope.key(), "circuit open", ctx)
                    .await
            }
            Ended::RolloutStopped(crate::rollout::State::Cancelled) => {
                let record = self.cancelled_record(job, digest, ctx);
                self.commit(record, ctx).await
            }
            Ended::RolloutStopped(state) => {
                let rollout = job.rollout_id.as_ref().map_or("", |id| id.as_str());
                let reason = format!("rollout {state}");
                self.park(job, digest, &format!("rollout:{rollout}"), &reason, ctx)
                    .await
            }
            Ended::Held(held) => self.held(held, turn, ctx).await,
            Ended::Replay(stored) => self.replay(*stored, ctx).await,
        }
    }

    /// What the job's rollout lets it do now; `None` only when shutting down.
    async fn admission(
        &self,
        job: &Job,
        view: Option<&RolloutView>,
        ctx: &Context<'_>,
    ) -> Option<Admit> {
        let Some(rollout_id) = job.rollout_id.as_ref().map(|id| id.as_str()) else {
            return Some(Admit::Run { rate: None });
        };
        let scope = format!("rollout:{rollout_id}");
        let park = |reason: &str| Admit::Park {
            scope: scope.clone(),
            reason: reason.to_owned(),
        };
        let declared = view.is_some_and(|view| view.declared);
        if self.settings.rollouts.require_declaration && !declared {
            return Some(park("waiting for the rollout's declaration"));
        }
        let Some(view) = view else {
            return Some(Admit::Run { rate: None });
        };
        let rate = view.max_per_second.map(|n| (rollout_id.to_owned(), n));
        Some(match view.rollout.admits() {
            Admission::Run => Admit::Run { rate },
            Admission::Park(reason) => park(&reason),
            Admission::Cancel => Admit::Cancel,
            Admission::Canary => {
                let admitted = self
                    .infra(Infra::Parking, ctx.shutdown, || {
                        self.audit
                            .admit_canary(rollout_id, job.id.as_str(), job.rerun)
                    })
                    .await?;
                if admitted {
                    Admit::Run { rate }
                } else {
                    park("waiting for the canary jobs to finish")
                }
            }
        })
    }

    /// A `reply_to` naming one of keyturn's own queues, or outside `amqp.reply_to_prefix`.
    pub(super) fn reply_to_problem(&self, reply_to: Option<&str>) -> Option<job::Problem> {
        let amqp = &self.settings.amqp;
        let reserved = [
            amqp.jobs_queue.as_str(),
            amqp.control_queue.as_str(),
            amqp.dead_queue.as_str(),
            amqp.unrouted_queue.as_str(),
        ];
        job::reply_to_problem(reply_to, &reserved, &amqp.reply_to_prefix)
    }

    fn parse_context<'a>(&'a self, delivery: &'a Delivery) -> ParseContext<'a> {
        ParseContext {
            default_region: Some(self.settings.worker.default_region.as_str())
                .filter(|r| !r.is_empty()),
            any_region: !self.settings.api.endpoint.is_empty(),
            message_id: delivery.message_id.as_deref(),
            content_type: delivery.content_type.as_deref(),
        }
    }

    /// Waits for `wait`, unless shutdown comes first or the job has been held too long.
    async fn hold<T>(
        &self,
        ctx: &Context<'_>,
        wait: impl std::future::Future<Output = T>,
    ) -> Result<T, Held> {
        // Biased: a wait that is ready wins over a hold that ran out at the same moment.
        tokio::select! {
            biased;
            value = wait => Ok(value),
            () = ctx.shutdown.cancelled() => Err(Held::Shutdown),
            () = tokio::time::sleep_until(ctx.hold_until) => Err(Held::TooLong),
        }
    }

    /// Records a rejection (the API is never called) and dead-letters the original.
    async fn reject(
        self: &Arc<Self>,
        rejection: &Rejection,
        counted: Counted,
        ctx: &Context<'_>,
    ) -> Disposition {
        tracing::warn!(field = rejection.field(), reason = %rejection, "job rejected");
        let record = self.rejection_record(rejection, counted == Counted::Yes, ctx);
        self.commit(record, ctx).await
    }

    /// Commits the record (and its rollout's counts), then publishes its event.
    async fn commit(self: &Arc<Self>, record: FinalRecord, ctx: &Context<'_>) -> Disposition {
        let committed = self
            .infra(Infra::AuditCommit, ctx.shutdown, || async {
                let started = Instant::now();
                let committed = self.audit.record(record.clone()).await;
                observe(&self.metrics.store_commit, started.elapsed());
                committed
            })
            .await;
        let Some(committed) = committed else {
            return Disposition::Abandon;
        };
        // The record dropped the lease in its transaction: nothing is left to renew.
        ctx.settle_lease();
        match &committed.recorded {
            Recorded::New(stored) => self
                .metrics
                .job_finished(stored.event.data.outcome.as_str()),
            Recorded::Existing(_) => {
                self.metrics.jobs_replayed.inc();
            }
        }
        if record.event.data.rollout_id.is_some() {
            self.outbox.notify_one();
        }
        if let Some(rollout_id) = committed.release {
            self.spawn_release(format!("rollout:{rollout_id}"));
        }
        self.finish(committed.recorded.into_stored(), ctx).await
    }

    async fn replay(&self, stored: StoredEvent, ctx: &Context<'_>) -> Disposition {
        tracing::info!(event_id = %stored.event.id, outcome = stored.event.data.outcome.as_str(), "duplicate delivery: replaying the stored result");
        self.metrics.jobs_replayed.inc();
        self.finish(stored, ctx).await
    }

    /// Publishes the stored event's bytes and picks the disposition its outcome calls for.
    async fn finish(&self, stored: StoredEvent, ctx: &Context<'_>) -> Disposition {
        let event = &stored.event;
        let correlation_id = ctx
            .delivery
            .correlation_id
            .clone()
            .unwrap_or_else(|| ctx.identity.job_id.clone());
        let routing_key = event.routing_key();
        let outgoing = Outgoing {
            id: &event.id,
            kind: &event.kind,
            routing_key: &routing_key,
            body: stored.json.as_bytes(),
            correlation_id: &correlation_id,
            reply_to: ctx.delivery.reply_to.as_deref().filter(|r| !r.is_empty()),
            // The stored event's own, so a replay sends the same headers as the first time.
            traceparent: event.traceparent.as_deref(),
            tracestate: event.tracestate.as_deref(),
        };
        let published = self
            .infra(Infra::ResultPublish, ctx.shutdown, || async {
                let started = Instant::now();
                let published = self.events.publish(&outgoing).await;
                observe(&self.metrics.publish_confirm, started.elapsed());
                published
            })
            .await;
        if published.is_some() {
            // A job's whole stay: from its delivery to its result confirmed, just before the ack.
            observe(&self.metrics.job_duration, since(ctx.delivery.received_at));
        }
        match (published, event.data.outcome) {
            (None, _) => Disposition::Abandon,
            (Some(()), Outcome::Rejected) => Disposition::DeadLetter,
            (Some(()), _) => {
                log_finished(event);
                Disposition::Ack
            }
        }
    }
}

fn log_finished(event: &ResultEvent) {
    let data = &event.data;
    if data.outcome == Outcome::Failed {
        tracing::warn!(
            event_id = %event.id,
            error_code = data.error_code.as_deref().unwrap_or("-"),
            attempts = data.attempts,
            rollout_id = data.rollout_id.as_deref().unwrap_or("-"),
            "job failed: {}",
            data.error_msg.as_deref().unwrap_or("-")
        );
    } else {
        tracing::info!(event_id = %event.id, outcome = data.outcome.as_str(), "job finished");
    }
}

/// The job's trace context from its headers, recorded on the job span so that every log line of
/// the job carries it (and, with the `otlp` feature, made the parent of the exported span).
fn join_trace(span: &tracing::Span, headers: &TraceHeaders) -> TraceContext {
    let trace = crate::telemetry::join_trace(span, headers);
    span.record("trace_id", trace.trace_id_hex());
    span.record("span_id", trace.span_id_hex());
    if let Some(parent) = trace.parent_id_hex() {
        span.record("parent_span_id", parent);
    }
    trace
}

/// When the store saw this job key ask for something else, that earlier sighting.
fn conflict(earlier: &Earlier, digest: &str) -> Option<Seen> {
    let seen = [
        earlier.final_record.as_ref().map(|(_, seen)| seen),
        earlier.marker.as_ref(),
        earlier.parked.as_ref(),
    ];
    seen.into_iter()
        .flatten()
        .find(|seen| seen.other_body(digest))
        .cloned()
}

/// The rejection of a job key reused with another body: it names `job_id` and when the key was
/// first seen, so the sender can tell which of its messages won.
fn reused_key(job: &Job, seen: &Seen) -> Rejection {
    Rejection::single(
        "job_id",
        format!(
            "{} (rerun {}) was first seen at {} with a different body; send it under a new job_id, or with a higher rerun to run it again",
            job.id, job.rerun, seen.at
        ),
    )
}

/// Debug builds only: panics while processing the job named by `KEYTURN_DEBUG_PANIC_JOB`, so
/// tests can show that a panicking job neither leaks its slot nor wedges the worker.
#[cfg(debug_assertions)]
fn injected_panic(job_id: &str) {
    static TARGET: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let target = TARGET.get_or_init(|| std::env::var("KEYTURN_DEBUG_PANIC_JOB").ok());
    if target.as_deref() == Some(job_id) {
        panic!("injected panic for job {job_id} (KEYTURN_DEBUG_PANIC_JOB)");
    }
}

/// Time since `since`, never negative.
fn since(at: DateTime<Utc>) -> Duration {
    (Utc::now() - at).to_std().unwrap_or_default()
}
