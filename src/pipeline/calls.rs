//! The API phase of one job: Modify (or Describe first when an earlier attempt may have
//! landed), retried under the rate limits with capped, jittered backoff.
//!
//! The job's deadline (`retry.deadline`) counts only its own API time: the calls and the backoff
//! between them. Waiting for a rate-limit token, a 429 pause, the health gate or a circuit never
//! fails a job; a job that waits longer than `worker.max_hold` is handed back to the queue.

use std::sync::Arc;
use std::time::Duration;

use super::{Context, Held, Pipeline};
use crate::audit::{Bucket, ClaimRequest, Claimed, Seen, StoredEvent};
use crate::circuit::{self, Scope, Signal};
use crate::events::Outcome;
use crate::gaussdb::{Call, CallError, Exchange};
use crate::job::{Job, Status};
use crate::limits::LimitKey;
use crate::ops::metrics::observe;
use crate::retry::{self, Backoff, Verdict};
use crate::rollout::State;

use super::health::Infra;
use super::leases::Trust;

/// How often a job waiting for another worker's lease asks again.
const LEASE_POLL: Duration = Duration::from_millis(200);

/// How the API phase of a job ended.
pub(super) enum Ended {
    /// Succeeded or failed for good: record it.
    Finished(Run),
    /// An earlier delivery of the key asked for something else.
    Conflict(Seen),
    /// A circuit holds the job's scope: park it.
    Parked(Scope),
    /// The job's rollout was paused, halted or cancelled after the job was admitted, before
    /// its first call.
    RolloutStopped(State),
    /// Stopped waiting (shutdown, or held too long).
    Held(Held),
    /// Another worker finished the job while this one waited for its lease: replay its record.
    Replay(Box<StoredEvent>),
}

/// What the API phase of a job came to.
pub(super) struct Run {
    pub outcome: Outcome,
    pub resulting_status: Option<Status>,
    pub error: Option<(String, String)>,
    pub exchanges: Vec<Exchange>,
}

/// The loop's memory between attempts.
struct Progress {
    exchanges: Vec<Exchange>,
    last_error: Option<(String, String)>,
    /// Attempts that count against `retry.max_attempts` (a 429 does not: it is a wait).
    counted: u32,
    /// The job's own API time so far: calls and backoff sleeps.
    spent: Duration,
    retries: u32,
    /// The store holds a lease of this worker's on the job.
    leased: bool,
    /// The in-flight marker is written (by this delivery or an earlier one).
    marked: bool,
    /// This delivery sent a Modify.
    modified: bool,
}

impl Progress {
    fn failed(self, reason: &str) -> Ended {
        Ended::Finished(Run::failed(self.last_error, self.exchanges, reason))
    }
}

impl Pipeline {
    /// Calls the API until the job succeeds, fails for good, runs out of attempts or of its
    /// own time, or is held by a circuit.
    pub(super) async fn call(
        self: &Arc<Self>,
        job: &Job,
        digest: &str,
        uncertain: bool,
        rate: Option<(String, u32)>,
        ctx: &Context<'_>,
    ) -> Ended {
        let retry = &self.settings.retry;
        let backoff = Backoff {
            base: retry.base_delay,
            cap: retry.max_delay,
        };
        let region = job.region.as_str();
        let key: LimitKey = (region.to_owned(), job.project_id.to_string());
        let mut uncertain = uncertain;
        let mut progress = Progress {
            exchanges: Vec::new(),
            last_error: None,
            counted: 0,
            spent: Duration::ZERO,
            retries: 0,
            leased: false,
            marked: uncertain,
            modified: false,
        };
        loop {
            if progress.counted >= retry.max_attempts {
                return progress.failed("keyturn.attempts_exhausted");
            }
            if progress.spent >= retry.deadline {
                return progress.failed("keyturn.deadline_exceeded");
            }
            if let Err(ended) = self.wait_until_open(region, ctx).await {
                return ended;
            }
            let mut call = if uncertain {
                Call::Describe
            } else {
                Call::Modify
            };
            // The claim comes before the call slot: its store write overlaps other jobs' calls.
            let mut marked_now = false;
            if !progress.leased || (call == Call::Modify && !progress.marked) {
                let (marker, wrote) = match self.claim(job, digest, call == Call::Modify, ctx).await
                {
                    Ok(claimed) => claimed,
                    Err(ended) => return ended,
                };
                progress.leased = true;
                if let Some(seen) = &marker
                    && seen.other_body(digest)
                {
                    return Ended::Conflict(seen.clone());
                }
                if call == Call::Modify && marker.is_some() && !wrote {
                    // Another delivery (a worker that died) may have sent the Modify: ask first.
                    uncertain = true;
                    call = Call::Describe;
                }
                progress.marked = marker.is_some();
                marked_now = wrote;
            }
            // Before this delivery's first Modify its rollout is read again, whoever wrote the
            // marker: a job marked by a delivery that died, whose Describe found nothing, has not
            // made its first Modify either.
            let first_modify = call == Call::Modify && !progress.modified;
            let slot = match self
                .ready_to_send(job, &key, rate.as_ref(), first_modify, ctx)
                .await
            {
                Ok(slot) => slot,
                Err(ended) => return self.unsent(ended, marked_now, job, ctx).await,
            };
            self.leases.calling(job.id.as_str(), job.rerun);
            progress.modified |= call == Call::Modify;
            let exchange = self.api(call, job).await;
            self.leases.called(job.id.as_str(), job.rerun);
            // The slot is for calls: the backoff, the read-back and the record go without it.
            drop(slot);
            progress.spent = progress.spent.saturating_add(exchange.latency);
            let result = exchange.result.clone();
            if let Some(scope) = self.watch_circuits(job, &result) {
                return Ended::Parked(scope);
            }
            progress.exchanges.push(exchange);
            let error = match result {
                Ok(status) if status == job.change.status() => {
                    return Ended::Finished(match call {
                        Call::Modify => {
                            self.confirm(job, status, progress.exchanges, rate.as_ref(), ctx)
                                .await
                        }
                        Call::Describe => Run::ok(status, progress.exchanges),
                    });
                }
                Ok(_) => {
                    // Modify answered another state (settle it with Describe), or Describe says
                    // the change is not there (send it).
                    progress.counted += 1;
                    uncertain = call == Call::Modify;
                    continue;
                }
                Err(error) => error,
            };
            progress.last_error = Some(super::results::error_pair(&error));
            match verdict(&error) {
                Verdict::Fatal => return progress.failed(""),
                Verdict::Throttled => {
                    let retry_after = match &error {
                        CallError::Api { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    let pause = self.limits.throttled(&key, retry_after);
                    self.metrics.throttle_pauses.inc();
                    if self.fleet_limits {
                        self.pause_fleet(&key, pause).await;
                    }
                }
                Verdict::Retry => {
                    progress.counted += 1;
                    uncertain |= call == Call::Modify && may_have_landed(&error);
                    if progress.counted >= retry.max_attempts {
                        return progress.failed("keyturn.attempts_exhausted");
                    }
                    let wait = backoff.delay(progress.retries, &mut rand::rng());
                    if progress.spent.saturating_add(wait) >= retry.deadline {
                        return progress.failed("keyturn.deadline_exceeded");
                    }
                    tokio::time::sleep(wait).await;
                    progress.spent = progress.spent.saturating_add(wait);
                    progress.retries += 1;
                    self.metrics.retries.inc();
                }
            }
        }
    }

    /// Claims the job key and its instance in the store, waiting while another worker holds
    /// either. Returns the in-flight marker as stored and whether this claim wrote it.
    pub(super) async fn claim(
        &self,
        job: &Job,
        digest: &str,
        mark: bool,
        ctx: &Context<'_>,
    ) -> Result<(Option<Seen>, bool), Ended> {
        let request = ClaimRequest {
            job_id: job.id.to_string(),
            rerun: job.rerun,
            digest: digest.to_owned(),
            worker_id: self.worker_id.clone(),
            owner: self.leases.owner.clone(),
            rollout_id: job.rollout_id.as_ref().map(|id| id.to_string()),
            instance: format!("{}/{}/{}", job.region, job.project_id, job.instance_id),
            mark,
            lease: self.leases.lease,
        };
        let mut waited = false;
        loop {
            let (claimed, asked) = self
                .infra(Infra::InFlightMarker, ctx.shutdown, || {
                    self.leases.claim(&self.audit, request.clone())
                })
                .await
                .ok_or(Ended::Held(Held::Shutdown))?;
            match claimed {
                Claimed::Leased { marker, marked_now } => {
                    let (job_id, rerun) = (&request.job_id, request.rerun);
                    let mut slot = ctx.lease.lock().expect("lease slot");
                    match &*slot {
                        // A second claim of this delivery (to mark a Modify) renewed its lease.
                        Some(_) => self.leases.confirmed(job_id, rerun, asked),
                        None => *slot = Some(self.leases.held(job_id, rerun, asked)),
                    }
                    return Ok((marker, marked_now));
                }
                Claimed::Busy { owner, job_id } => {
                    if !waited {
                        tracing::info!(held_by = %owner, holding_job = %job_id, "another worker holds this job or its instance; waiting");
                        waited = true;
                    }
                    self.hold(ctx, tokio::time::sleep(LEASE_POLL))
                        .await
                        .map_err(Ended::Held)?;
                }
                Claimed::Finished(finished) => {
                    let (stored, seen) = *finished;
                    // The key finished for another body: this one reused it.
                    if seen.other_body(digest) {
                        return Err(Ended::Conflict(seen));
                    }
                    return Err(Ended::Replay(Box::new(stored)));
                }
                Claimed::RolloutStopped(state) => return Err(Ended::RolloutStopped(state)),
            }
        }
    }

    /// Waits until the job's lease is confirmed recently enough to call the API under it.
    async fn trust_lease(&self, job: &Job, ctx: &Context<'_>) -> Result<(), Ended> {
        loop {
            match self.leases.trusted(job.id.as_str(), job.rerun) {
                Trust::Yes => return Ok(()),
                // Another worker may hold the job now: this delivery goes back to the queue,
                // and its next delivery finds the record or waits for the lease.
                Trust::Lost => return Err(Ended::Held(Held::TooLong)),
                Trust::Stale => self
                    .hold(ctx, tokio::time::sleep(Duration::from_millis(100)))
                    .await
                    .map_err(Ended::Held)?,
            }
        }
    }

    /// Waits for the health gate; a circuit that holds the region parks the job instead.
    async fn wait_until_open(&self, region: &str, ctx: &Context<'_>) -> Result<(), Ended> {
        if let Some(scope) = self.circuits.holding(region) {
            return Err(Ended::Parked(scope));
        }
        self.hold(ctx, self.health.wait_healthy())
            .await
            .map_err(Ended::Held)
    }

    /// Waits until a call may go out: a call slot, the health gate, the rollout's cap, then the
    /// rate limits; a circuit that is open (or opens meanwhile) parks the job instead. The slot
    /// is taken before the tokens, so no token is spent on a call that then waits for a slot.
    async fn wait_to_call(
        &self,
        region: &str,
        key: &LimitKey,
        rate: Option<&(String, u32)>,
        ctx: &Context<'_>,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, Ended> {
        let slot = self.unpaused_slot(key, ctx).await?;
        self.wait_until_open(region, ctx).await?;
        let holding = |pipeline: &Pipeline| pipeline.circuits.holding(region).map(Ended::Parked);
        let waiting = tokio::time::Instant::now();
        if let Some((rollout_id, per_second)) = rate {
            self.hold(ctx, self.limits.acquire_rollout(rollout_id, *per_second))
                .await
                .map_err(Ended::Held)?;
        }
        self.hold(ctx, self.limits.acquire(key))
            .await
            .map_err(Ended::Held)?;
        observe(&self.metrics.rate_limit_wait, waiting.elapsed());
        holding(self).map_or(Ok(slot), Err)
    }

    /// A call slot, taken once `key` is not paused after a 429: a paused project's jobs wait
    /// without a slot, so that the worker's jobs of other projects get the slots.
    async fn unpaused_slot(
        &self,
        key: &LimitKey,
        ctx: &Context<'_>,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, Ended> {
        loop {
            self.hold(ctx, self.limits.unpaused(key))
                .await
                .map_err(Ended::Held)?;
            let slot = self.call_slot(ctx).await?;
            // A 429 may have come while this job waited for the slot.
            if !self.limits.is_paused(key) {
                return Ok(slot);
            }
        }
    }

    /// Everything between a job's claim and its call: a call slot and the local rate limits,
    /// before a first Modify the rollout read again, the lease still trusted, the store's tokens
    /// (last, next to the call: a token spent early would bunch calls), and the lease looked at
    /// again after that wait.
    async fn ready_to_send(
        &self,
        job: &Job,
        key: &LimitKey,
        rate: Option<&(String, u32)>,
        first_modify: bool,
        ctx: &Context<'_>,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, Ended> {
        loop {
            let slot = self
                .wait_to_call(job.region.as_str(), key, rate, ctx)
                .await?;
            if first_modify {
                self.rollout_still_runs(job, ctx).await?;
            }
            self.trust_lease(job, ctx).await?;
            if !self.fleet_limits {
                return Ok(slot);
            }
            if let Some(slot) = self.fleet_tokens(slot, key, rate, ctx).await? {
                self.trust_lease(job, ctx).await?;
                return Ok(slot);
            }
        }
    }

    /// The store's tokens for a call that holds `slot`: the slot back once they are granted.
    /// `None` after a paused project (a 429 met by any worker) was waited out without the slot:
    /// the caller goes through its slot and the local limits again.
    async fn fleet_tokens<'a>(
        &'a self,
        slot: tokio::sync::SemaphorePermit<'a>,
        key: &LimitKey,
        rate: Option<&(String, u32)>,
        ctx: &Context<'_>,
    ) -> Result<Option<tokio::sync::SemaphorePermit<'a>>, Ended> {
        match self.take_fleet_tokens(key, rate, ctx).await? {
            Granted::Yes => Ok(Some(slot)),
            Granted::After(wait) => {
                drop(slot);
                self.hold(ctx, tokio::time::sleep(wait))
                    .await
                    .map_err(Ended::Held)?;
                Ok(None)
            }
        }
    }

    /// Before a delivery's first Modify, after its waits for a slot and the local rate limits:
    /// its rollout may have been paused, halted or cancelled meanwhile (the claim looked before
    /// those waits). One read of the store, on the reader connection.
    async fn rollout_still_runs(&self, job: &Job, ctx: &Context<'_>) -> Result<(), Ended> {
        let Some(rollout_id) = job.rollout_id.as_ref().map(|id| id.as_str()) else {
            return Ok(());
        };
        let read = self.infra(Infra::AuditLookup, ctx.shutdown, || {
            self.audit.rollout_state(rollout_id)
        });
        let state = self
            .hold(ctx, read)
            .await
            .map_err(Ended::Held)?
            .ok_or(Ended::Held(Held::Shutdown))?;
        match state {
            Some(state @ (State::Paused | State::Halted | State::Cancelled)) => {
                Err(Ended::RolloutStopped(state))
            }
            _ => Ok(()),
        }
    }

    /// A job that stops between its claim and its first Modify (parked, its rollout stopped,
    /// held too long, shut down): the marker its claim wrote goes, as no Modify went out under
    /// it and under the job's lease no other delivery sent one. So the job is not counted in
    /// flight while it waits, its next run need not Describe first, and a later cancel of its
    /// rollout records it cancelled unsent.
    async fn unsent(&self, ended: Ended, marked_now: bool, job: &Job, ctx: &Context<'_>) -> Ended {
        if !marked_now {
            return ended;
        }
        let unmarked = self
            .infra(Infra::InFlightMarker, ctx.shutdown, || {
                self.audit
                    .unmark(job.id.as_str(), job.rerun, &self.leases.owner)
            })
            .await;
        match unmarked {
            Some(()) => ended,
            None => Ended::Held(Held::Shutdown),
        }
    }

    /// One of the worker's `worker.concurrency` call slots.
    async fn call_slot(
        &self,
        ctx: &Context<'_>,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, Ended> {
        let slot = self.hold(ctx, self.call_slots.acquire()).await;
        Ok(slot
            .map_err(Ended::Held)?
            .expect("the call slots are never closed"))
    }

    /// Takes the call's tokens from the store's buckets, which every worker on the store shares:
    /// the global limit, the region and project's, and the rollout's cap. One job of this worker
    /// asks at a time; the others wait behind it here rather than at the store.
    async fn take_fleet_tokens(
        &self,
        key: &LimitKey,
        rate: Option<&(String, u32)>,
        ctx: &Context<'_>,
    ) -> Result<Granted, Ended> {
        let limits = &self.settings.rate_limit;
        let mut buckets = vec![
            Bucket {
                name: "global".into(),
                per_second: limits.per_second.into(),
                burst: limits.burst.into(),
            },
            self.project_bucket(key),
        ];
        if let Some((rollout_id, per_second)) = rate {
            buckets.push(Bucket {
                name: format!("rollout:{rollout_id}"),
                per_second: (*per_second).into(),
                burst: 1.0,
            });
        }
        // One job per bucket set asks at a time: a project or rollout that waits for its
        // tokens does not hold up the others.
        let gate = buckets
            .iter()
            .skip(1)
            .map(|bucket| bucket.name.as_str())
            .collect::<Vec<_>>()
            .join("|");
        let _one_at_a_time = self
            .hold(ctx, self.fleet_gates.lock(&gate))
            .await
            .map_err(Ended::Held)?;
        loop {
            let short = self
                .infra(Infra::RateTokens, ctx.shutdown, || {
                    self.audit.take_tokens(buckets.clone())
                })
                .await
                .ok_or(Ended::Held(Held::Shutdown))?;
            match short {
                None => return Ok(Granted::Yes),
                Some(wait) if is_pause(wait, &buckets) => return Ok(Granted::After(wait)),
                Some(wait) => self
                    .hold(ctx, tokio::time::sleep(wait))
                    .await
                    .map_err(Ended::Held)?,
            }
        }
    }

    /// The store's bucket of a region and project: the unit the API gateway throttles.
    fn project_bucket(&self, key: &LimitKey) -> Bucket {
        let limits = &self.settings.rate_limit;
        Bucket {
            name: format!("project:{}/{}", key.0, key.1),
            per_second: limits.per_project_per_second.into(),
            burst: limits.per_project_burst.into(),
        }
    }

    /// After a 429: the project's bucket in the store grants no token for `pause`, so every
    /// worker on the store waits, not only this one. A store that does not take the write
    /// within a second leaves the pause to this worker alone (the others pause when they meet a
    /// 429 themselves).
    async fn pause_fleet(&self, key: &LimitKey, pause: Duration) {
        let write = self.audit.pause_bucket(self.project_bucket(key), pause);
        let failed = match tokio::time::timeout(Duration::from_secs(1), write).await {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error.to_string(),
            // The write stays queued and may still reach the store, later.
            Err(_) => "the store did not answer within 1 s".to_owned(),
        };
        tracing::warn!(error = %failed, region = %key.0, project_id = %key.1, "the fleet-wide pause of the project's calls is not confirmed; this worker pauses meanwhile");
    }

    /// Feeds an answer to the circuits; returns the scope that holds this job if the answer
    /// showed a fault of the deployment (opening its circuit and starting its probe).
    fn watch_circuits(
        self: &Arc<Self>,
        job: &Job,
        result: &Result<Status, CallError>,
    ) -> Option<Scope> {
        let region = job.region.as_str();
        let signal = circuit::classify(&result.clone().map(|_| ()), region, self.auth);
        let is_fault = matches!(signal, Signal::Fault(_));
        let fault_scope = match &signal {
            Signal::Fault(fault) => Some(fault.scope.clone()),
            _ => None,
        };
        if let Some(opened) = self.circuits.report(region, signal) {
            self.spawn_probe(opened.scope.clone(), job.clone());
            return Some(opened.scope);
        }
        if is_fault {
            return fault_scope;
        }
        // Another job's answer may have opened a circuit meanwhile: retry no further there.
        result
            .as_ref()
            .err()
            .and_then(|_| self.circuits.holding(region))
    }

    /// Waits for `key`'s rate-limit tokens, timed.
    pub(super) async fn acquire(&self, key: &LimitKey) {
        let waiting = tokio::time::Instant::now();
        self.limits.acquire(key).await;
        observe(&self.metrics.rate_limit_wait, waiting.elapsed());
    }

    /// One API attempt, logged and counted.
    pub(super) async fn api(&self, call: Call, job: &Job) -> Exchange {
        let exchange = match call {
            Call::Modify => self.client.modify(job).await,
            Call::Describe => self.client.describe(job).await,
        };
        super::results::log_exchange(&exchange);
        // Without a credential nothing was sent: that is not an API call.
        if !matches!(exchange.result, Err(CallError::Credentials(_))) {
            self.metrics
                .api_call(call.as_str(), exchange.http_status, job.region.as_str());
        }
        exchange
    }

    /// After a successful Modify: optionally read the state back, as the operator asked.
    async fn confirm(
        &self,
        job: &Job,
        status: Status,
        mut exchanges: Vec<Exchange>,
        rate: Option<&(String, u32)>,
        ctx: &Context<'_>,
    ) -> Run {
        if !self.settings.api.confirm_after {
            return Run::ok(status, exchanges);
        }
        let key: LimitKey = (job.region.to_string(), job.project_id.to_string());
        // The Modify landed: a wait cut short by shutdown or a hold still reads nothing back.
        // A pause is waited without the slot, as before a Modify.
        let _slot = loop {
            let Ok(slot) = self.unpaused_slot(&key, ctx).await else {
                return Run::ok(status, exchanges);
            };
            if self.hold(ctx, self.acquire(&key)).await.is_err() {
                return Run::ok(status, exchanges);
            }
            if !self.fleet_limits {
                break slot;
            }
            match self.fleet_tokens(slot, &key, rate, ctx).await {
                Ok(Some(slot)) => break slot,
                Ok(None) => {}
                Err(_) => return Run::ok(status, exchanges),
            }
        };
        self.leases.calling(job.id.as_str(), job.rerun);
        let confirmation = self.api(Call::Describe, job).await;
        self.leases.called(job.id.as_str(), job.rerun);
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
}

/// A wait for the store's tokens longer than both this and the interval at which its buckets
/// refill (so a project paused after a 429) is waited without the job's call slot; others, a
/// bucket refilling at its rate, are waited with it, next to the call.
const LONG_TOKEN_WAIT: Duration = Duration::from_millis(250);

/// Whether the store's `wait` for `buckets` is a pause after a 429: longer than
/// [`LONG_TOKEN_WAIT`] and than any of them takes to refill one token (with a millisecond of
/// slack, as the store rounds its wait up to a microsecond).
fn is_pause(wait: Duration, buckets: &[Bucket]) -> bool {
    let refill = buckets
        .iter()
        .map(Bucket::interval)
        .max()
        .unwrap_or_default();
    wait > (refill + Duration::from_millis(1)).max(LONG_TOKEN_WAIT)
}

/// What the store's buckets said to a take.
enum Granted {
    Yes,
    /// Nothing before this long: wait without holding a call slot.
    After(Duration),
}

/// True when a Modify that failed this way may still have been applied: no answer came (a
/// timeout, a cut connection) or the server failed after maybe applying it (5xx, 504).
fn may_have_landed(error: &CallError) -> bool {
    match error {
        CallError::Api { status, .. } => (500..=599).contains(status),
        other => other.may_have_landed(),
    }
}

fn verdict(error: &CallError) -> Verdict {
    match error {
        CallError::Api { status, code, .. } => retry::classify(*status, code.as_deref()),
        CallError::Timeout
        | CallError::Connect(_)
        | CallError::Protocol(_)
        | CallError::Credentials(_) => Verdict::Retry,
    }
}

impl Run {
    pub(super) fn ok(status: Status, exchanges: Vec<Exchange>) -> Run {
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
