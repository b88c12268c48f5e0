//! The path of one delivery: decode → idempotency check → rate limit → signed calls with retries
//! → audit commit → confirmed result event → a [`Disposition`] telling the AMQP layer what to do.
//!
//! This is the one place that decides ack, dead-letter or leave-for-redelivery. It knows nothing
//! of lapin: deliveries arrive as [`Delivery`] values and events leave through an [`EventSink`].
//! Infrastructure faults (audit store, broker) never end a job: the job waits, unacked, until
//! they heal, and meanwhile no other job starts an API call (see [`Health`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::audit::{AttemptRecord, AuditStore, FinalRecord};
use crate::config::Settings;
use crate::events::{EventSink, JobResult, Outcome, Outgoing, ResultEvent};
use crate::gaussdb::{Call, CallError, Client, Exchange};
use crate::job::{self, Identity, Job, ParseContext, Rejection, Status};
use crate::limits::{LimitKey, Limits};
use crate::retry::{self, Backoff, Verdict};

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
}

/// What to do with a delivery once processing is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The record and event are safe: acknowledge.
    Ack,
    /// The job was rejected and recorded: `basic.reject(requeue=false)` to the dead queue.
    DeadLetter,
    /// Shutting down before the job could be made safe: leave it unacked for redelivery.
    Abandon,
}

/// An infrastructure operation a job may have to wait on; each names what its failure says
/// about the worker's dependencies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Infra {
    AuditLookup,
    InFlightMarker,
    AuditCommit,
    ResultPublish,
}

impl Infra {
    fn name(self) -> &'static str {
        match self {
            Infra::AuditLookup => "audit lookup",
            Infra::InFlightMarker => "in-flight marker",
            Infra::AuditCommit => "audit commit",
            Infra::ResultPublish => "result publish",
        }
    }

    /// The dependency whose state this operation's result reports. Lookups report none: reads
    /// can succeed while writes fail (a locked file), and must not reopen the gate.
    fn dependency(self) -> Option<Dependency> {
        match self {
            Infra::AuditLookup => None,
            Infra::InFlightMarker | Infra::AuditCommit => Some(Dependency::AuditWrites),
            Infra::ResultPublish => Some(Dependency::EventPublishing),
        }
    }
}

/// What can hold every job: the audit log refusing writes, the broker refusing result events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    AuditWrites = 0b01,
    EventPublishing = 0b10,
}

/// Infrastructure health: while the audit store or the broker fails, jobs hold before calling
/// the API, so a fault stops new toggles instead of piling up unrecorded ones. Each dependency
/// is tracked on its own, so only its own recovery reopens the gate.
#[derive(Clone)]
pub struct Health {
    failing: watch::Sender<u8>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            failing: watch::Sender::new(0),
        }
    }
}

impl Health {
    pub fn set(&self, dependency: Dependency, healthy: bool) {
        let bit = dependency as u8;
        self.failing.send_if_modified(|failing| {
            let before = *failing;
            if healthy {
                *failing &= !bit;
            } else {
                *failing |= bit;
            }
            *failing != before
        });
    }

    pub fn is_healthy(&self) -> bool {
        *self.failing.borrow() == 0
    }

    async fn wait_healthy(&self) {
        let mut receiver = self.failing.subscribe();
        let _ = receiver.wait_for(|failing| *failing == 0).await;
    }
}

/// Everything one worker needs to process deliveries; shared by all in-flight jobs.
pub struct Pipeline {
    pub settings: Settings,
    pub worker_id: String,
    pub client: Client,
    pub audit: AuditStore,
    pub events: Arc<dyn EventSink>,
    pub limits: Limits,
    pub health: Health,
    pub locks: JobLocks,
}

/// One job at a time per job id inside a worker: after a reconnect the broker may redeliver a job
/// whose first delivery is still being worked on; the second waits and then finds the record.
#[derive(Default)]
pub struct JobLocks(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl JobLocks {
    async fn lock(&self, job_id: &str) -> JobGuard<'_> {
        let lock = {
            let mut locks = self.0.lock().expect("job locks");
            locks.entry(job_id.to_owned()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        JobGuard {
            locks: self,
            job_id: job_id.to_owned(),
            lock,
            _guard: guard,
        }
    }
}

struct JobGuard<'a> {
    locks: &'a JobLocks,
    job_id: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        let mut locks = self.locks.0.lock().expect("job locks");
        // Ours, the map's and the guard's: nobody else waits for this job.
        if Arc::strong_count(&self.lock) <= 3 {
            locks.remove(&self.job_id);
        }
    }
}

/// What the API phase of a job came to.
struct Run {
    outcome: Outcome,
    resulting_status: Option<Status>,
    error: Option<(String, String)>,
    exchanges: Vec<Exchange>,
}

impl Pipeline {
    /// Processes one delivery to the point where it can be acked or rejected.
    // The span is at WARN so that it stays enabled, and names the job, under a warn-only filter.
    #[tracing::instrument(level = "warn", skip_all, fields(job_id = tracing::field::Empty, instance_id = tracing::field::Empty, redelivered = delivery.redelivered))]
    pub async fn process(&self, delivery: Delivery, shutdown: &CancellationToken) -> Disposition {
        let digest = job::body_digest(&delivery.body);
        let parsed = job::parse(&delivery.body, &self.parse_context(&delivery));
        let identity = match &parsed {
            Ok(job) => identity_of(job),
            Err(_) => job::identify(&delivery.body, delivery.message_id.as_deref()),
        };
        let span = tracing::Span::current();
        span.record("job_id", identity.job_id.as_str());
        span.record(
            "instance_id",
            identity.instance_id.as_deref().unwrap_or("-"),
        );
        let _one_at_a_time = self.locks.lock(&identity.job_id).await;

        let earlier = self.infra(Infra::AuditLookup, shutdown, || {
            self.audit.find_final(&identity.job_id, &digest)
        });
        let Some(earlier) = earlier.await else {
            return Disposition::Abandon;
        };
        if let Some(event) = earlier {
            tracing::info!(event_id = %event.id, outcome = event.data.outcome.as_str(), "duplicate delivery: replaying the stored result");
            return self.finish(event, &delivery, &identity, shutdown).await;
        }
        let (result, kms_key_id, attempts) = match &parsed {
            Err(rejection) => (
                self.rejected(&identity, rejection, &delivery),
                None,
                Vec::new(),
            ),
            Ok(job) => {
                let Some(run) = self.run(job, delivery.redelivered, shutdown).await else {
                    return Disposition::Abandon;
                };
                let attempts = run.exchanges.iter().map(attempt_record).collect();
                (
                    self.result(&identity, run, &delivery),
                    job.change.kms_key_id().map(|k| k.to_string()),
                    attempts,
                )
            }
        };
        let record = FinalRecord {
            event: ResultEvent::new(&self.worker_id, result, Utc::now()),
            kms_key_id,
            requested_by: identity.requested_by.clone(),
            received_at: delivery.received_at,
            finished_at: Utc::now(),
            body_sha256: digest,
            worker_id: self.worker_id.clone(),
            attempts,
        };
        let stored = self
            .infra(Infra::AuditCommit, shutdown, || {
                self.audit.record(record.clone())
            })
            .await;
        let Some(event) = stored.and_then(|recorded| recorded.into_event()) else {
            return Disposition::Abandon;
        };
        self.finish(event, &delivery, &identity, shutdown).await
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

    /// Publishes the stored event and picks the disposition its outcome calls for.
    async fn finish(
        &self,
        event: ResultEvent,
        delivery: &Delivery,
        identity: &Identity,
        shutdown: &CancellationToken,
    ) -> Disposition {
        let correlation_id = delivery
            .correlation_id
            .clone()
            .unwrap_or_else(|| identity.job_id.clone());
        let reply_to = delivery.reply_to.as_deref().filter(|r| !r.is_empty());
        let body = event.to_json();
        let routing_key = event.routing_key();
        let outgoing = Outgoing {
            id: &event.id,
            kind: &event.kind,
            routing_key: &routing_key,
            body: body.as_bytes(),
            correlation_id: &correlation_id,
            reply_to,
        };
        let published = self
            .infra(Infra::ResultPublish, shutdown, || {
                self.events.publish(&outgoing)
            })
            .await;
        match (published, event.data.outcome) {
            (None, _) => Disposition::Abandon,
            (Some(()), Outcome::Rejected) => Disposition::DeadLetter,
            (Some(()), _) => {
                tracing::info!(event_id = %event.id, outcome = event.data.outcome.as_str(), "job finished");
                Disposition::Ack
            }
        }
    }

    /// Retries an infrastructure operation until it succeeds; `None` only when shutting down.
    async fn infra<T, E, F, Fut>(
        &self,
        what: Infra,
        shutdown: &CancellationToken,
        mut op: F,
    ) -> Option<T>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let backoff = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
        };
        for failures in 0u32.. {
            match op().await {
                Ok(value) => {
                    if let Some(dependency) = what.dependency() {
                        self.health.set(dependency, true);
                    }
                    return Some(value);
                }
                Err(error) => {
                    if let Some(dependency) = what.dependency() {
                        self.health.set(dependency, false);
                    }
                    tracing::error!(%error, failures, "{} failed; holding the job until it heals", what.name());
                    let wait = backoff.ceiling(failures);
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        None
    }

    /// Calls the API until the job succeeds, fails for good, or runs out of attempts or time.
    async fn run(&self, job: &Job, redelivered: bool, shutdown: &CancellationToken) -> Option<Run> {
        let retry = &self.settings.retry;
        let deadline = Instant::now() + retry.deadline;
        let backoff = Backoff {
            base: retry.base_delay,
            cap: retry.max_delay,
        };
        let key: LimitKey = (job.region.to_string(), job.project_id.to_string());
        let mut uncertain = redelivered
            && self
                .infra(Infra::AuditLookup, shutdown, || {
                    self.audit.was_sent(job.id.as_str())
                })
                .await?;
        let mut marked = uncertain;
        let mut exchanges: Vec<Exchange> = Vec::new();
        let mut last_error: Option<(String, String)> = None;
        let mut retries = 0u32;
        loop {
            if exchanges.len() as u32 >= retry.max_attempts {
                return Some(Run::failed(
                    last_error,
                    exchanges,
                    "keyturn.attempts_exhausted",
                ));
            }
            self.health.wait_healthy().await;
            if tokio::time::timeout_at(deadline, self.limits.acquire(&key))
                .await
                .is_err()
            {
                return Some(Run::failed(
                    last_error,
                    exchanges,
                    "keyturn.deadline_exceeded",
                ));
            }
            let call = if uncertain {
                Call::Describe
            } else {
                Call::Modify
            };
            if call == Call::Modify && !marked {
                self.infra(Infra::InFlightMarker, shutdown, || {
                    self.audit.mark_sending(job.id.as_str(), &self.worker_id)
                })
                .await?;
                marked = true;
            }
            let exchange = match call {
                Call::Modify => self.client.modify(job).await,
                Call::Describe => self.client.describe(job).await,
            };
            log_exchange(&exchange);
            let result = exchange.result.clone();
            exchanges.push(exchange);
            let error = match result {
                Ok(status) if call == Call::Modify => {
                    return Some(self.succeeded(job, status, exchanges).await);
                }
                Ok(status) if status == job.change.status() => {
                    return Some(Run::ok(status, exchanges));
                }
                Ok(_) => {
                    uncertain = false;
                    continue;
                }
                Err(error) => error,
            };
            last_error = Some(error_pair(&error));
            match verdict(&error) {
                Verdict::Fatal => return Some(Run::failed(last_error, exchanges, "")),
                Verdict::Throttled => {
                    let retry_after = match &error {
                        CallError::Api { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    self.limits.throttled(&key, retry_after);
                }
                Verdict::Retry => {
                    uncertain |= call == Call::Modify && error.may_have_landed();
                    let wait = backoff.delay(retries, &mut rand::rng());
                    if Instant::now() + wait >= deadline {
                        return Some(Run::failed(
                            last_error,
                            exchanges,
                            "keyturn.deadline_exceeded",
                        ));
                    }
                    tokio::time::sleep(wait).await;
                }
            }
            retries += 1;
        }
    }

    /// After a successful Modify: optionally read the state back, as the operator asked.
    async fn succeeded(&self, job: &Job, status: Status, mut exchanges: Vec<Exchange>) -> Run {
        if !self.settings.api.confirm_after {
            return Run::ok(status, exchanges);
        }
        let key: LimitKey = (job.region.to_string(), job.project_id.to_string());
        self.limits.acquire(&key).await;
        let confirmation = self.client.describe(job).await;
        log_exchange(&confirmation);
        let confirmed = confirmation.result.clone();
        exchanges.push(confirmation);
        match confirmed {
            Ok(read) if read == job.change.status() => Run::ok(read, exchanges),
            Ok(read) => Run {
                outcome: Outcome::Failed,
                resulting_status: Some(read),
                error: Some((
                    "keyturn.not_confirmed".into(),
                    format!("Describe reports {} after Modify", read.as_str()),
                )),
                exchanges,
            },
            // The toggle was accepted; a failed read-back does not undo it.
            Err(_) => Run::ok(status, exchanges),
        }
    }

    fn result(&self, identity: &Identity, run: Run, delivery: &Delivery) -> JobResult {
        let last = run.exchanges.last();
        let (error_code, error_msg) = run
            .error
            .map_or((None, None), |(code, msg)| (Some(code), Some(msg)));
        JobResult {
            resulting_status: run.resulting_status.map(|s| s.as_str().into()),
            attempts: run.exchanges.len() as u32,
            http_status: last.and_then(|e| e.http_status),
            error_code,
            error_msg,
            request_id: last.and_then(|e| e.request_id.clone()),
            ..result_of(identity, run.outcome, delivery)
        }
    }

    fn rejected(
        &self,
        identity: &Identity,
        rejection: &Rejection,
        delivery: &Delivery,
    ) -> JobResult {
        tracing::warn!(field = %rejection.field, reason = %rejection.reason, "job rejected");
        JobResult {
            error_code: Some(format!("keyturn.invalid.{}", rejection.field)),
            error_msg: Some(rejection.to_string()),
            ..result_of(identity, Outcome::Rejected, delivery)
        }
    }
}

/// What every result shares: who asked for what, the outcome, and how long it took; no API detail.
fn result_of(identity: &Identity, outcome: Outcome, delivery: &Delivery) -> JobResult {
    JobResult {
        job_id: identity.job_id.clone(),
        rollout_id: identity.rollout_id.clone(),
        ticket: identity.ticket.clone(),
        region: identity.region.clone(),
        project_id: identity.project_id.clone(),
        instance_id: identity.instance_id.clone(),
        requested_status: identity.requested_status.clone(),
        resulting_status: None,
        outcome,
        attempts: 0,
        http_status: None,
        error_code: None,
        error_msg: None,
        request_id: None,
        duration_ms: elapsed_ms(delivery.received_at),
    }
}

impl Run {
    fn ok(status: Status, exchanges: Vec<Exchange>) -> Run {
        Run {
            outcome: Outcome::Succeeded,
            resulting_status: Some(status),
            error: None,
            exchanges,
        }
    }

    /// A failed run keeps the last API error; a non-empty `reason` (the loop ran out of attempts
    /// or time) is appended to its message, or is the error when no attempt was made.
    fn failed(last_error: Option<(String, String)>, exchanges: Vec<Exchange>, reason: &str) -> Run {
        let error = match (last_error, reason) {
            (Some(error), "") => error,
            (Some((code, msg)), reason) => (code, format!("{msg} ({reason})")),
            (None, reason) => (
                reason.to_owned(),
                "no attempt could be made in time".to_owned(),
            ),
        };
        Run {
            outcome: Outcome::Failed,
            resulting_status: None,
            error: Some(error),
            exchanges,
        }
    }
}

fn verdict(error: &CallError) -> Verdict {
    match error {
        CallError::Api { status, code, .. } => retry::classify(*status, code.as_deref()),
        CallError::Timeout | CallError::Connect(_) | CallError::Protocol(_) => Verdict::Retry,
    }
}

/// The `(error_code, error_msg)` reported for a failed attempt.
fn error_pair(error: &CallError) -> (String, String) {
    match error {
        CallError::Api {
            status, code, msg, ..
        } => (
            code.clone().unwrap_or_else(|| format!("HTTP.{status}")),
            msg.clone().unwrap_or_default(),
        ),
        CallError::Timeout => ("keyturn.timeout".into(), error.to_string()),
        CallError::Connect(_) => ("keyturn.connect".into(), error.to_string()),
        CallError::Protocol(_) => ("keyturn.protocol".into(), error.to_string()),
    }
}

fn attempt_record(exchange: &Exchange) -> AttemptRecord {
    let (error_code, error_msg) = match &exchange.result {
        Ok(_) => (None, None),
        Err(error) => {
            let (code, msg) = error_pair(error);
            (Some(code), Some(msg))
        }
    };
    AttemptRecord {
        call: exchange.call.as_str(),
        started_at: exchange.started_at,
        latency_ms: exchange.latency.as_millis() as u64,
        http_status: exchange.http_status,
        error_code,
        error_msg,
        request_id: exchange.request_id.clone(),
    }
}

fn log_exchange(exchange: &Exchange) {
    tracing::info!(
        call = exchange.call.as_str(),
        http_status = exchange.http_status,
        request_id = exchange.request_id.as_deref().unwrap_or("-"),
        latency_ms = exchange.latency.as_millis() as u64,
        error = exchange.result.as_ref().err().map(|e| e.to_string()),
        "api attempt"
    );
}

fn identity_of(job: &Job) -> Identity {
    Identity {
        job_id: job.id.to_string(),
        rollout_id: job.rollout_id.as_ref().map(ToString::to_string),
        ticket: job.ticket.as_ref().map(ToString::to_string),
        region: Some(job.region.to_string()),
        project_id: Some(job.project_id.to_string()),
        instance_id: Some(job.instance_id.to_string()),
        requested_status: Some(job.change.status().as_str().into()),
        requested_by: job.requested_by.as_ref().map(ToString::to_string),
    }
}

fn elapsed_ms(since: DateTime<Utc>) -> u64 {
    (Utc::now() - since).num_milliseconds().max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::{Dependency, Health};

    #[test]
    fn only_the_failing_dependency_reopens_the_gate() {
        let health = Health::default();
        health.set(Dependency::EventPublishing, false);
        health.set(Dependency::AuditWrites, true);
        assert!(
            !health.is_healthy(),
            "audit writes working says nothing of publishing"
        );
        health.set(Dependency::AuditWrites, false);
        health.set(Dependency::EventPublishing, true);
        assert!(!health.is_healthy());
        health.set(Dependency::AuditWrites, true);
        assert!(health.is_healthy());
    }
}
