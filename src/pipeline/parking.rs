//! Jobs that cannot run now leave the worker instead of holding a delivery:
//!
//! - **Parked**: a circuit holds the job's scope. The delivery is stored whole in the audit
//!   store, then acked; when a probe passes, [`Pipeline::release`] publishes every parked job of
//!   the scope back to the queue (with confirms), then forgets it. Nothing is sent to the API
//!   meanwhile, no delivery waits on the broker's consumer timeout, and no prefetch slot is held.
//! - **Handed back**: a job that waited longer than `worker.max_hold` (rate limits, its instance's
//!   turn, the health gate) is published again to the queue's tail and the delivery acked: a
//!   fresh message, so neither the consumer timeout nor the delivery limit is spent.
//!
//! A crash between a publish and the forgetting (or the ack) leaves a second copy on the queue;
//! the job key makes it a replay, never a second toggle.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::health::Infra;
use super::{Context, Disposition, Held, Pipeline, Requeue, Turn};
use crate::audit::ParkedJob;
use crate::circuit::{self, Scope, Signal};
use crate::job::Job;
use crate::limits::LimitKey;
use crate::retry::Backoff;
use crate::rollout::{Admission, Rollout, Snapshot};

/// Parked jobs published per batch when a scope is released.
const RELEASE_BATCH: u32 = 200;

impl Pipeline {
    /// Stores the delivery until `scope` (a circuit's or `rollout:<id>`) lets it run, then acks.
    pub(super) async fn park(
        &self,
        job: &Job,
        digest: &str,
        scope: &str,
        reason: &str,
        ctx: &Context<'_>,
    ) -> Disposition {
        let delivery = ctx.delivery;
        let parked = ParkedJob {
            id: 0,
            job_id: job.id.to_string(),
            rerun: job.rerun,
            job_digest: digest.to_owned(),
            rollout_id: job.rollout_id.as_ref().map(ToString::to_string),
            scope: scope.to_owned(),
            reason: reason.to_owned(),
            body: delivery.body.clone(),
            message_id: delivery.message_id.clone(),
            correlation_id: delivery.correlation_id.clone(),
            reply_to: delivery.reply_to.clone(),
            content_type: delivery.content_type.clone(),
            parked_at: Utc::now(),
            generation: 0,
        };
        let stored = self
            .infra(Infra::Parking, ctx.shutdown, || {
                self.audit.park(parked.clone(), &self.leases.owner)
            })
            .await;
        match stored {
            Some(()) => {
                ctx.settle_lease();
                tracing::info!(scope, reason, "job parked");
                Disposition::Ack
            }
            None => Disposition::Abandon,
        }
    }

    /// A job that stopped waiting: on shutdown it goes back with the channel; held too long, it
    /// is handed back.
    pub(super) async fn held(
        &self,
        held: Held,
        turn: Option<&Turn>,
        ctx: &Context<'_>,
    ) -> Disposition {
        match held {
            Held::Shutdown => Disposition::Abandon,
            Held::TooLong => {
                tracing::warn!(
                    held_for_s = self.settings.worker.max_hold.as_secs(),
                    "job waited longer than worker.max_hold; handing it back to the queue"
                );
                self.hand_back(turn, ctx).await
            }
        }
    }

    /// Publishes the delivery again to the queue's tail and lets it be acked. Every later job of
    /// its instance already in line follows it back, so their order survives.
    pub(super) async fn hand_back(&self, turn: Option<&Turn>, ctx: &Context<'_>) -> Disposition {
        if let Some(turn) = turn {
            turn.hand_back();
        }
        // The copy continues the trace from this job's span: the next run is its child.
        let traceparent = ctx.trace.traceparent();
        let copy = Requeue {
            traceparent: Some(&traceparent),
            tracestate: ctx.trace.tracestate.as_deref(),
            ..ctx.delivery.requeue()
        };
        let requeued = self
            .infra(Infra::JobRequeue, ctx.shutdown, || self.jobs.requeue(&copy))
            .await;
        match requeued {
            Some(()) => Disposition::Ack,
            None => Disposition::Abandon,
        }
    }

    /// Probes `scope` with Describe of `job`'s instance, with capped backoff, until an answer
    /// shows no fault of the deployment; then closes the circuit and releases its parked jobs.
    pub(super) fn spawn_probe(self: &Arc<Self>, scope: Scope, job: Job) {
        let pipeline = self.clone();
        tokio::spawn(async move { pipeline.probe(scope, job).await });
    }

    async fn probe(self: Arc<Self>, scope: Scope, job: Job) {
        let settings = &self.settings.circuit;
        let backoff = Backoff {
            base: settings.probe_interval,
            cap: settings.probe_max_interval,
        };
        let key: LimitKey = (job.region.to_string(), job.project_id.to_string());
        for attempt in 0u32.. {
            tokio::select! {
                () = self.stopping.cancelled() => return,
                () = tokio::time::sleep(backoff.ceiling(attempt)) => {}
            }
            if !self.circuits.is_open(&scope) {
                return;
            }
            tokio::select! {
                () = self.stopping.cancelled() => return,
                () = self.acquire(&key) => {}
            }
            let exchange = self.api(crate::gaussdb::Call::Describe, &job).await;
            let signal = circuit::classify(
                &exchange.result.clone().map(|_| ()),
                job.region.as_str(),
                self.auth,
            );
            if signal != Signal::Healthy {
                tracing::info!(scope = %scope.key(), attempt, error = exchange.result.err().map(|e| e.to_string()), "probe: still failing");
                continue;
            }
            self.circuits.close(&scope);
            self.release(&scope.key(), &self.stopping.clone()).await;
            return;
        }
    }

    /// Releases `scope` in the background (a rollout's canary passed, or it was resumed).
    pub(super) fn spawn_release(self: &Arc<Self>, scope: String) {
        let pipeline = self.clone();
        tokio::spawn(async move {
            let stopping = pipeline.stopping.clone();
            pipeline.release(&scope, &stopping).await;
        });
    }

    /// Whether the jobs parked under `scope` may run now.
    async fn may_run(&self, scope: &str, shutdown: &CancellationToken) -> Option<bool> {
        if let Some(circuit) = Scope::from_key(scope) {
            return Some(!self.circuits.is_open(&circuit));
        }
        let rollout_id = scope.strip_prefix("rollout:")?;
        let snapshot = self.rollout_snapshot(rollout_id, shutdown).await?;
        Some(snapshot.is_some_and(|snapshot| {
            let view = Rollout {
                state: snapshot.state,
                canary: snapshot.canary,
                canary_admitted: 0,
                canary_done: snapshot.canary_done,
            };
            let declared = snapshot.declared || !self.settings.rollouts.require_declaration;
            declared && matches!(view.admits(), Admission::Run | Admission::Canary)
        }))
    }

    pub(super) async fn rollout_snapshot(
        &self,
        rollout_id: &str,
        shutdown: &CancellationToken,
    ) -> Option<Option<Snapshot>> {
        let snapshots = self
            .infra(Infra::AuditLookup, shutdown, || {
                self.audit.snapshots(Some(rollout_id))
            })
            .await?;
        Some(snapshots.into_iter().next())
    }

    /// Publishes every parked job of `scope` back to the queue, while the scope lets them run.
    pub async fn release(&self, scope: &str, shutdown: &CancellationToken) {
        let _one_release_at_a_time = self.releasing.lock().await;
        let mut released = 0usize;
        while self.may_run(scope, shutdown).await == Some(true) {
            let batch = self
                .infra(Infra::AuditLookup, shutdown, || {
                    self.audit.parked(scope, RELEASE_BATCH)
                })
                .await;
            let Some(batch) = batch.filter(|batch| !batch.is_empty()) else {
                break;
            };
            let publishes = batch.iter().map(|job| self.requeue_parked(job, shutdown));
            if futures_util::future::join_all(publishes)
                .await
                .contains(&None)
            {
                return;
            }
            let ids = batch
                .iter()
                .map(|job| (job.id, job.generation))
                .collect::<Vec<_>>();
            let forgotten = self
                .infra(Infra::Parking, shutdown, || self.audit.unpark(ids.clone()))
                .await;
            if forgotten.is_none() {
                return;
            }
            released += batch.len();
        }
        if released > 0 {
            tracing::info!(scope, released, "parked jobs published back to the queue");
        }
    }

    async fn requeue_parked(&self, job: &ParkedJob, shutdown: &CancellationToken) -> Option<()> {
        let copy = Requeue {
            body: &job.body,
            message_id: job.message_id.as_deref(),
            correlation_id: job.correlation_id.as_deref(),
            reply_to: job.reply_to.as_deref(),
            content_type: job.content_type.as_deref(),
            // Parked rows do not keep trace headers: a released job starts a new trace.
            traceparent: None,
            tracestate: None,
        };
        self.infra(Infra::JobRequeue, shutdown, || self.jobs.requeue(&copy))
            .await
    }

    /// Releases the parked jobs of every scope that lets them run (a circuit not open here, a
    /// rollout running), and ends those of a cancelled rollout: at start (jobs parked before a
    /// restart) and now and then (a release or a cancel cut short by a crash).
    pub async fn release_closed(self: &Arc<Self>, shutdown: &CancellationToken) {
        let scopes = self
            .infra(Infra::AuditLookup, shutdown, || self.audit.parked_scopes())
            .await
            .unwrap_or_default();
        for (scope, _) in scopes {
            if let Some(rollout_id) = scope.strip_prefix("rollout:") {
                let snapshot = self.rollout_snapshot(rollout_id, shutdown).await.flatten();
                if snapshot.is_some_and(|s| s.state == crate::rollout::State::Cancelled) {
                    self.cancel_parked(rollout_id, shutdown).await;
                    continue;
                }
            }
            self.release(&scope, shutdown).await;
        }
    }

    /// Runs [`Pipeline::release_closed`] every `every` until `shutdown`.
    pub async fn keep_releasing(self: &Arc<Self>, every: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            self.release_closed(&shutdown).await;
        }
    }
}
