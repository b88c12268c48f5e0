//! Rollout commands from the control queue, and the rollout events they and finished jobs leave
//! in the store's outbox.
//!
//! A command is applied in the store, once per AMQP `message_id` (so a redelivered command is
//! answered, not applied twice), then its effect runs: a `resume` releases the rollout's parked
//! jobs, a `cancel` ends them `cancelled`, a `retry_failed` republishes each failed job with the
//! next `rerun`. A command with `reply_to` is answered there with a [`Reply`]. A malformed command,
//! or a declaration whose plan changed, is dead-lettered with the reason in a header.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::health::Infra;
use super::{Delivery, Disposition, Pipeline, Requeue};
use crate::audit::FailedJob;
use crate::events::{Outgoing, rollout_event_type};
use crate::rollout::{self, Command, Reply};

/// Rollout events published per claim.
const EVENT_BATCH: u32 = 100;

impl Pipeline {
    /// Applies one control message and answers it; the delivery is then acked (a bad one is
    /// dead-lettered with its reason first).
    #[tracing::instrument(level = "warn", skip_all, fields(command_id = tracing::field::Empty))]
    pub async fn control(
        self: &Arc<Self>,
        delivery: Delivery,
        shutdown: &CancellationToken,
    ) -> Disposition {
        // Applied once per message id; a command without one is applied each time it comes
        // (pause and resume are idempotent, and a body hash would swallow a repeated pause).
        let command_id = delivery.message_id.clone().filter(|id| !id.is_empty());
        tracing::Span::current().record("command_id", command_id.as_deref().unwrap_or("-"));
        if let Some(problem) = self.reply_to_problem(delivery.reply_to.as_deref()) {
            // No answer: the reply_to itself is what is wrong.
            let reason = format!("{}: {}", problem.field, problem.reason);
            tracing::warn!(%reason, "control command refused");
            let copy = delivery.requeue();
            let kept = self
                .infra(Infra::JobRequeue, shutdown, || {
                    self.jobs.dead_letter(&copy, &reason)
                })
                .await;
            return kept.map_or(Disposition::Abandon, |()| Disposition::Ack);
        }
        let command = match rollout::parse_command(&delivery.body) {
            Ok(command) => command,
            Err(rejection) => {
                tracing::warn!(reason = %rejection, "control command rejected");
                let reply = Reply {
                    kind: kind_of(&delivery.body),
                    ok: false,
                    error: Some(rejection.to_string()),
                    rollouts: Vec::new(),
                };
                return self.refuse(&delivery, &reply, shutdown).await;
            }
        };
        let applied = self
            .infra(Infra::AuditCommit, shutdown, || {
                self.audit
                    .apply(command_id.as_deref(), &command, &self.worker_id)
            })
            .await;
        let Some((reply, effect)) = applied else {
            return Disposition::Abandon;
        };
        tracing::info!(
            kind = command.kind(),
            rollout_id = command.rollout_id().map(|id| id.as_str()),
            ok = reply.ok,
            error = reply.error.as_deref(),
            "rollout command applied"
        );
        if let (Command::RetryFailed(steer), true, false) = (&command, reply.ok, effect.repeated)
            && self
                .retry_failed(
                    steer.rollout_id.as_str(),
                    command_id.as_deref(),
                    &command,
                    shutdown,
                )
                .await
                .is_none()
        {
            return Disposition::Abandon;
        }
        if let Some(rollout_id) = command.rollout_id().map(|id| id.to_string()) {
            if effect.release {
                self.spawn_release(format!("rollout:{rollout_id}"));
            }
            if effect.cancel_parked {
                let pipeline = self.clone();
                tokio::spawn(async move {
                    let stopping = pipeline.stopping.clone();
                    pipeline.cancel_parked(&rollout_id, &stopping).await;
                });
            }
        }
        self.outbox.notify_one();
        if !reply.ok && matches!(command, Command::Declare(_)) {
            tracing::warn!(
                error = reply.error.as_deref(),
                "rollout declaration refused"
            );
            return self.refuse(&delivery, &reply, shutdown).await;
        }
        match self.answer(&delivery, &reply, shutdown).await {
            Some(()) => Disposition::Ack,
            None => Disposition::Abandon,
        }
    }

    /// Answers, then dead-letters the command with its reason, then lets it be acked.
    async fn refuse(
        &self,
        delivery: &Delivery,
        reply: &Reply,
        shutdown: &CancellationToken,
    ) -> Disposition {
        if self.answer(delivery, reply, shutdown).await.is_none() {
            return Disposition::Abandon;
        }
        let reason = reply.error.clone().unwrap_or_default();
        let copy = delivery.requeue();
        let kept = self
            .infra(Infra::JobRequeue, shutdown, || {
                self.jobs.dead_letter(&copy, &reason)
            })
            .await;
        match kept {
            Some(()) => Disposition::Ack,
            None => Disposition::Abandon,
        }
    }

    async fn answer(
        &self,
        delivery: &Delivery,
        reply: &Reply,
        shutdown: &CancellationToken,
    ) -> Option<()> {
        let Some(reply_to) = delivery.reply_to.as_deref().filter(|r| !r.is_empty()) else {
            return Some(());
        };
        let body = serde_json::to_vec(reply).expect("replies serialize");
        let correlation_id = delivery
            .correlation_id
            .as_deref()
            .or(delivery.message_id.as_deref());
        self.infra(Infra::JobRequeue, shutdown, || {
            self.jobs.reply(reply_to, correlation_id, &body)
        })
        .await
    }

    /// Republishes each failed job of the rollout with the next `rerun`, then records the
    /// command as applied (a crash before that republishes the same keys again: replays).
    async fn retry_failed(
        &self,
        rollout_id: &str,
        command_id: Option<&str>,
        command: &Command,
        shutdown: &CancellationToken,
    ) -> Option<()> {
        let failed = self
            .infra(Infra::AuditLookup, shutdown, || {
                self.audit.failed_jobs(rollout_id)
            })
            .await?;
        for job in &failed {
            let body = rerun_body(job).to_string().into_bytes();
            let copy = Requeue {
                body: &body,
                message_id: Some(&job.job_id),
                correlation_id: None,
                reply_to: None,
                content_type: Some("application/json"),
                traceparent: None,
                tracestate: None,
            };
            self.infra(Infra::JobRequeue, shutdown, || self.jobs.requeue(&copy))
                .await?;
        }
        if let Some(command_id) = command_id {
            self.infra(Infra::AuditCommit, shutdown, || {
                self.audit.command_done(command_id, command)
            })
            .await?;
        }
        tracing::info!(
            rollout_id,
            republished = failed.len(),
            "failed jobs republished with the next rerun"
        );
        Some(())
    }

    /// Ends every parked job of a cancelled rollout `cancelled`: each goes through the normal
    /// path, which finds its rollout cancelled, records that and publishes its event.
    pub(super) async fn cancel_parked(
        self: &Arc<Self>,
        rollout_id: &str,
        shutdown: &CancellationToken,
    ) {
        let scope = format!("rollout:{rollout_id}");
        let mut cancelled = 0usize;
        loop {
            let batch = self
                .infra(Infra::AuditLookup, shutdown, || {
                    self.audit.parked(&scope, 200)
                })
                .await;
            let Some(batch) = batch.filter(|batch| !batch.is_empty()) else {
                break;
            };
            for parked in &batch {
                let delivery = Delivery {
                    body: parked.body.clone(),
                    message_id: parked.message_id.clone(),
                    correlation_id: parked.correlation_id.clone(),
                    reply_to: parked.reply_to.clone(),
                    content_type: parked.content_type.clone(),
                    redelivered: false,
                    received_at: parked.parked_at,
                    trace: Default::default(),
                };
                match self.process(self.admit(delivery.clone()), shutdown).await {
                    Disposition::Abandon => return,
                    // A body that no longer parses (a changed rule) goes where rejected jobs go.
                    Disposition::DeadLetter => {
                        let copy = delivery.requeue();
                        let kept = self
                            .infra(Infra::JobRequeue, shutdown, || {
                                self.jobs.dead_letter(&copy, "rejected")
                            })
                            .await;
                        if kept.is_none() {
                            return;
                        }
                    }
                    Disposition::Ack => {}
                }
                let forgotten = self
                    .infra(Infra::Parking, shutdown, || {
                        self.audit.unpark(vec![(parked.id, parked.generation)])
                    })
                    .await;
                if forgotten.is_none() {
                    return;
                }
                cancelled += 1;
            }
        }
        if cancelled > 0 {
            tracing::info!(
                rollout_id,
                cancelled,
                "parked jobs of a cancelled rollout ended"
            );
        }
    }

    /// Publishes the rollout events waiting in the outbox; `None` only when shutting down.
    pub async fn publish_rollout_events(&self, shutdown: &CancellationToken) -> Option<()> {
        loop {
            let pending = self
                .infra(Infra::AuditCommit, shutdown, || {
                    self.audit.claim_events(&self.worker_id, EVENT_BATCH)
                })
                .await?;
            if pending.is_empty() {
                return Some(());
            }
            for event in &pending {
                let kind = rollout_event_type(&event.kind);
                let routing_key = format!("rollout.{}", event.kind);
                let subject = serde_json::from_str::<Value>(&event.json)
                    .ok()
                    .and_then(|v| v["subject"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                let outgoing = Outgoing {
                    id: &event.event_id,
                    kind: &kind,
                    routing_key: &routing_key,
                    body: event.json.as_bytes(),
                    correlation_id: &subject,
                    reply_to: None,
                    traceparent: None,
                    tracestate: None,
                };
                self.infra(Infra::ResultPublish, shutdown, || {
                    self.events.publish(&outgoing)
                })
                .await?;
            }
            let ids = pending.iter().map(|event| event.id).collect::<Vec<_>>();
            self.infra(Infra::AuditCommit, shutdown, || {
                self.audit.events_published(ids.clone())
            })
            .await?;
        }
    }

    /// Publishes rollout events as they are written (poked by [`Pipeline::outbox`]) and at
    /// least every second, until the worker stops.
    pub async fn keep_publishing_rollout_events(&self) {
        let stopping = self.stopping.clone();
        loop {
            if self.publish_rollout_events(&stopping).await.is_none() {
                return;
            }
            tokio::select! {
                () = stopping.cancelled() => return,
                () = self.outbox.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// The `kind` of a control message, if it has a readable one.
fn kind_of(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["kind"].as_str().map(crate::job::sanitize))
        .unwrap_or_else(|| "unknown".into())
}

/// A failed job again, with the next `rerun`, from its final row.
fn rerun_body(job: &FailedJob) -> Value {
    let mut body = json!({
        "job_id": job.job_id,
        "rerun": job.rerun + 1,
        "region": job.region,
        "project_id": job.project_id,
        "instance_id": job.instance_id,
        "encryption_status": job.requested_status,
        "rollout_id": job.rollout_id,
        "ticket": job.ticket,
        "requested_by": job.requested_by,
    });
    if job.requested_status.as_deref() == Some("on") {
        body["type"] = "kms".into();
        body["kms_key_id"] = job.kms_key_id.clone().into();
    }
    if let Some(object) = body.as_object_mut() {
        object.retain(|_, value| !value.is_null());
    }
    body
}
