//! What a finished job's audit record and result event say, built from the job's [`Identity`]
//! and its API phase, in one place.

use chrono::Utc;

use super::calls::Run;
use super::{Context, Pipeline, since};
use crate::audit::{AttemptRecord, FinalRecord};
use crate::events::{JobResult, Outcome, ResultEvent};
use crate::gaussdb::{CallError, Exchange};
use crate::job::{Identity, Job, Rejection};

impl Pipeline {
    /// The record of a job whose API phase ended.
    pub(super) fn record_of(
        &self,
        job: &Job,
        digest: &str,
        run: Run,
        ctx: &Context<'_>,
    ) -> FinalRecord {
        let last = run.exchanges.last();
        let (error_code, error_msg) = run
            .error
            .map_or((None, None), |(code, msg)| (Some(code), Some(msg)));
        let result = JobResult {
            resulting_status: run.resulting_status.map(|s| s.as_str().into()),
            attempts: run.exchanges.len() as u32,
            http_status: last.and_then(|e| e.http_status),
            error_code,
            error_msg,
            request_id: last.and_then(|e| e.request_id.clone()),
            ..result_of(&ctx.identity, run.outcome, ctx)
        };
        FinalRecord {
            kms_key_id: job.change.kms_key_id().map(|k| k.to_string()),
            job_digest: Some(digest.to_owned()),
            attempts: run.exchanges.iter().map(attempt_record).collect(),
            ..self.record(result, ctx)
        }
    }

    /// The record of a rejected job: no API call, the error names the field(s).
    pub(super) fn rejection_record(
        &self,
        rejection: &Rejection,
        counts_for_rollout: bool,
        ctx: &Context<'_>,
    ) -> FinalRecord {
        let result = JobResult {
            error_code: Some(format!("keyturn.invalid.{}", rejection.field())),
            error_msg: Some(rejection.to_string()),
            ..result_of(&ctx.identity, Outcome::Rejected, ctx)
        };
        FinalRecord {
            counts_for_rollout,
            ..self.record(result, ctx)
        }
    }

    /// The record of a job whose rollout was cancelled before it ran: no API call.
    pub(super) fn cancelled_record(
        &self,
        job: &Job,
        digest: &str,
        ctx: &Context<'_>,
    ) -> FinalRecord {
        let rollout = job.rollout_id.as_ref().map_or("-", |id| id.as_str());
        let result = JobResult {
            error_code: Some("keyturn.cancelled".into()),
            error_msg: Some(format!(
                "rollout {rollout} was cancelled before the job ran"
            )),
            ..result_of(&ctx.identity, Outcome::Cancelled, ctx)
        };
        FinalRecord {
            kms_key_id: job.change.kms_key_id().map(|k| k.to_string()),
            job_digest: Some(digest.to_owned()),
            ..self.record(result, ctx)
        }
    }

    fn record(&self, result: JobResult, ctx: &Context<'_>) -> FinalRecord {
        FinalRecord {
            event: ResultEvent::new(&self.worker_id, result, Utc::now()).in_trace(&ctx.trace),
            kms_key_id: None,
            requested_by: ctx.identity.requested_by.clone(),
            received_at: ctx.delivery.received_at,
            finished_at: Utc::now(),
            body_sha256: ctx.body_digest.clone(),
            job_digest: None,
            worker_id: self.worker_id.clone(),
            lease_owner: self.leases.owner.clone(),
            attempts: Vec::new(),
            counts_for_rollout: true,
        }
    }
}

/// What every result shares: who asked for what, the outcome, and how long it took.
fn result_of(identity: &Identity, outcome: Outcome, ctx: &Context<'_>) -> JobResult {
    JobResult {
        job_id: identity.job_id.clone(),
        rerun: identity.rerun,
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
        duration_ms: since(ctx.delivery.received_at).as_millis() as u64,
    }
}

pub(super) fn identity_of(job: &Job) -> Identity {
    Identity {
        job_id: job.id.to_string(),
        rerun: job.rerun,
        rollout_id: job.rollout_id.as_ref().map(ToString::to_string),
        ticket: job.ticket.as_ref().map(ToString::to_string),
        region: Some(job.region.to_string()),
        project_id: Some(job.project_id.to_string()),
        instance_id: Some(job.instance_id.to_string()),
        requested_status: Some(job.change.status().as_str().into()),
        requested_by: job.requested_by.as_ref().map(ToString::to_string),
    }
}

/// The `(error_code, error_msg)` reported for a failed attempt.
pub(super) fn error_pair(error: &CallError) -> (String, String) {
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
        CallError::Credentials(_) => ("keyturn.credentials".into(), error.to_string()),
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

pub(super) fn log_exchange(exchange: &Exchange) {
    tracing::info!(
        call = exchange.call.as_str(),
        http_status = exchange.http_status,
        request_id = exchange.request_id.as_deref().unwrap_or("-"),
        latency_ms = exchange.latency.as_millis() as u64,
        error = exchange.result.as_ref().err().map(|e| e.to_string()),
        "api attempt"
    );
}
