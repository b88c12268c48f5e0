//! Rollout state in the store: one `rollouts` row per rollout, its counts kept in the transaction
//! that writes each final record, its events written to an outbox in the transaction that changed
//! it, and control commands applied once per message id.

use chrono::Utc;

use super::db::{Db, args};
use super::{AuditError, FailedJob, FinalRecord, PendingEvent, RolloutView, timestamp};
use crate::events::{Outcome, rollout_event};
use crate::rollout::{
    BudgetUse, CanaryGate, Command, Counts, Plan, Reply, Rollout, Snapshot, State, Steer,
};

/// A rollout row as stored.
struct Row {
    rollout_id: String,
    declared: bool,
    plan_json: Option<String>,
    ticket: Option<String>,
    requested_by: Option<String>,
    expected_jobs: Option<u64>,
    budget_allowed: Option<u64>,
    canary: u64,
    canary_gate: CanaryGate,
    canary_finished: u64,
    canary_failed: u64,
    canary_done: bool,
    max_per_second: Option<u64>,
    state: State,
    reason: Option<String>,
    counts: Counts,
    created_at: String,
    updated_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    progress_at: Option<String>,
}

const COLUMNS: &str = "rollout_id, declared, plan_json, ticket, requested_by, expected_jobs,
    budget_allowed, canary, canary_gate, canary_finished, canary_done, max_per_second, state,
    reason, succeeded, failed, rejected, cancelled, created_at, updated_at, started_at,
    finished_at, progress_at, canary_failed";

static READ_ONE: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {COLUMNS} FROM rollouts WHERE rollout_id = ?1"));

fn read(db: &mut dyn Db, rollout_id: &str) -> Result<Option<Row>, AuditError> {
    db.query_opt(&READ_ONE, args![rollout_id])?
        .map(|row| row_of(&row))
        .transpose()
}

fn row_of(row: &super::db::Row) -> Result<Row, AuditError> {
    let gate: String = row.get(8)?;
    let state: String = row.get(12)?;
    Ok(Row {
        rollout_id: row.get(0)?,
        declared: row.get(1)?,
        plan_json: row.get(2)?,
        ticket: row.get(3)?,
        requested_by: row.get(4)?,
        expected_jobs: row.get(5)?,
        budget_allowed: row.get(6)?,
        canary: row.get(7)?,
        canary_gate: if gate == "manual" {
            CanaryGate::Manual
        } else {
            CanaryGate::Auto
        },
        canary_finished: row.get(9)?,
        canary_done: row.get(10)?,
        max_per_second: row.get(11)?,
        state: State::parse(&state).unwrap_or(State::Running),
        reason: row.get(13)?,
        counts: Counts {
            succeeded: row.get(14)?,
            failed: row.get(15)?,
            rejected: row.get(16)?,
            cancelled: row.get(17)?,
            parked: 0,
            in_flight: 0,
        },
        created_at: row.get(18)?,
        updated_at: row.get(19)?,
        started_at: row.get(20)?,
        finished_at: row.get(21)?,
        progress_at: row.get(22)?,
        canary_failed: row.get(23)?,
    })
}

/// Writes every mutable column of `row` back.
fn save(db: &mut dyn Db, row: &Row) -> Result<(), AuditError> {
    db.execute(
        "UPDATE rollouts SET declared = ?2, plan_json = ?3, ticket = ?4, requested_by = ?5,
             expected_jobs = ?6, budget_allowed = ?7, canary = ?8, canary_gate = ?9,
             canary_finished = ?10, canary_done = ?11, max_per_second = ?12, state = ?13,
             reason = ?14, succeeded = ?15, failed = ?16, rejected = ?17, cancelled = ?18,
             updated_at = ?19, started_at = ?20, finished_at = ?21, progress_at = ?22,
             canary_failed = ?23
         WHERE rollout_id = ?1",
        args![
            row.rollout_id,
            row.declared,
            row.plan_json,
            row.ticket,
            row.requested_by,
            row.expected_jobs,
            row.budget_allowed,
            row.canary,
            match row.canary_gate {
                CanaryGate::Auto => "auto",
                CanaryGate::Manual => "manual",
            },
            row.canary_finished,
            row.canary_done,
            row.max_per_second,
            row.state.as_str(),
            row.reason,
            row.counts.succeeded,
            row.counts.failed,
            row.counts.rejected,
            row.counts.cancelled,
            row.updated_at,
            row.started_at,
            row.finished_at,
            row.progress_at,
            row.canary_failed,
        ],
    )?;
    Ok(())
}

/// The row of a rollout; an ad-hoc one (named by jobs, not declared) is created if missing.
fn ensure(db: &mut dyn Db, rollout_id: &str) -> Result<Row, AuditError> {
    if let Some(row) = read(db, rollout_id)? {
        return Ok(row);
    }
    let now = timestamp(Utc::now());
    db.execute(
        "INSERT INTO rollouts (rollout_id, declared, state, created_at, updated_at)
         VALUES (?1, 0, 'running', ?2, ?2)",
        args![rollout_id, now],
    )?;
    read(db, rollout_id)?.ok_or(AuditError::Conflict)
}

fn snapshot(db: &mut dyn Db, row: &Row) -> Result<Snapshot, AuditError> {
    let mut count =
        |sql: &str| -> Result<u64, AuditError> { db.query_one(sql, args![row.rollout_id])?.get(0) };
    let mut counts = row.counts.clone();
    counts.parked = count("SELECT COUNT(*) FROM parked WHERE rollout_id = ?1")?;
    counts.in_flight = count("SELECT COUNT(*) FROM in_flight WHERE rollout_id = ?1")?;
    let canary_admitted = count("SELECT COUNT(*) FROM rollout_canary WHERE rollout_id = ?1")?;
    Ok(Snapshot {
        rollout_id: row.rollout_id.clone(),
        declared: row.declared,
        ticket: row.ticket.clone(),
        state: row.state,
        reason: row.reason.clone(),
        expected_jobs: row.expected_jobs,
        budget: BudgetUse {
            allowed: row.budget_allowed,
            used: counts.failures(),
        },
        counts,
        canary: row.canary,
        canary_gate: row.canary_gate,
        canary_admitted,
        canary_done: row.canary_done || row.canary == 0,
        max_per_second: row.max_per_second,
        requested_by: row.requested_by.clone(),
        created_at: row.created_at.clone(),
        updated_at: row.updated_at.clone(),
        started_at: row.started_at.clone(),
        finished_at: row.finished_at.clone(),
    })
}

/// Writes a rollout event for `row`'s current state to the outbox.
fn emit(db: &mut dyn Db, row: &Row, kind: &str, worker_id: &str) -> Result<(), AuditError> {
    let snapshot = snapshot(db, row)?;
    let now = Utc::now();
    let (event_id, json) = rollout_event(worker_id, kind, &snapshot, now);
    db.execute(
        "INSERT INTO rollout_events (rollout_id, kind, event_id, event_json, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        args![row.rollout_id, kind, event_id, json, timestamp(now)],
    )?;
    Ok(())
}

/// The state of a rollout, if the store knows it.
pub(super) fn state(db: &mut dyn Db, rollout_id: &str) -> Result<Option<State>, AuditError> {
    let state: Option<String> = db
        .query_opt(
            "SELECT state FROM rollouts WHERE rollout_id = ?1",
            args![rollout_id],
        )?
        .map(|row| row.get(0))
        .transpose()?;
    Ok(state.as_deref().and_then(State::parse))
}

/// What a job's admission needs to know of its rollout.
pub(super) fn view(db: &mut dyn Db, rollout_id: &str) -> Result<Option<RolloutView>, AuditError> {
    let Some(row) = read(db, rollout_id)? else {
        return Ok(None);
    };
    let canary_admitted = if row.canary_done || row.canary == 0 {
        0
    } else {
        db.query_one(
            "SELECT COUNT(*) FROM rollout_canary WHERE rollout_id = ?1",
            args![rollout_id],
        )?
        .get(0)?
    };
    Ok(Some(RolloutView {
        rollout: Rollout {
            state: row.state,
            canary: row.canary,
            canary_admitted,
            canary_done: row.canary_done,
        },
        declared: row.declared,
        max_per_second: row.max_per_second.map(|n| n.min(u32::MAX.into()) as u32),
    }))
}

/// Admits a job key to the rollout's canary if a place is left (or it already has one).
pub(super) fn admit_canary(
    db: &mut dyn Db,
    rollout_id: &str,
    job_id: &str,
    rerun: u32,
) -> Result<bool, AuditError> {
    let Some(row) = read(db, rollout_id)? else {
        return Ok(true);
    };
    let member = canary_member(db, rollout_id, job_id, rerun)?;
    if member {
        return Ok(true);
    }
    let admitted: u64 = db
        .query_one(
            "SELECT COUNT(*) FROM rollout_canary WHERE rollout_id = ?1",
            args![rollout_id],
        )?
        .get(0)?;
    if admitted >= row.canary {
        return Ok(false);
    }
    db.execute(
        "INSERT INTO rollout_canary (rollout_id, job_id, rerun) VALUES (?1, ?2, ?3)",
        args![rollout_id, job_id, rerun],
    )?;
    Ok(true)
}

fn canary_member(
    db: &mut dyn Db,
    rollout_id: &str,
    job_id: &str,
    rerun: u32,
) -> Result<bool, AuditError> {
    db.query_one(
        "SELECT EXISTS (SELECT 1 FROM rollout_canary WHERE rollout_id = ?1 AND job_id = ?2 AND rerun = ?3)",
        args![rollout_id, job_id, rerun],
    )?
    .get(0)
}

/// A job of the rollout is about to make its first call: the rollout has started.
pub(super) fn started(
    db: &mut dyn Db,
    rollout_id: &str,
    worker_id: &str,
) -> Result<(), AuditError> {
    let mut row = ensure(db, rollout_id)?;
    if row.started_at.is_none() {
        let now = timestamp(Utc::now());
        row.started_at = Some(now.clone());
        row.updated_at = now;
        save(db, &row)?;
        emit(db, &row, "started", worker_id)?;
    }
    Ok(())
}

/// Counts a job's final record toward its rollout and moves the rollout on: the budget may halt
/// it, the canary may pass or fail, the last expected job completes it. Each change writes its
/// own event, with the state it made. Returns the rollout id when jobs parked behind its canary
/// may now run.
pub(super) fn count_final(
    db: &mut dyn Db,
    record: &FinalRecord,
) -> Result<Option<String>, AuditError> {
    let data = &record.event.data;
    let Some(rollout_id) = data
        .rollout_id
        .as_deref()
        .filter(|_| record.counts_for_rollout)
        .filter(|id| crate::job::is_token(id))
    else {
        return Ok(None);
    };
    let worker_id = record.worker_id.as_str();
    let mut row = ensure(db, rollout_id)?;
    let previous: Option<(u32, String)> = db
        .query_opt(
            "SELECT rerun, outcome FROM rollout_jobs WHERE rollout_id = ?1 AND job_id = ?2",
            args![rollout_id, data.job_id],
        )?
        .map(|r| Ok::<_, AuditError>((r.get(0)?, r.get(1)?)))
        .transpose()?;
    let rejected = data.outcome == Outcome::Rejected;
    // An older run, or a rejection of a run that already has an outcome, changes nothing.
    if let Some((rerun, outcome)) = &previous
        && (*rerun > data.rerun || (rejected && outcome != "rejected"))
    {
        return Ok(None);
    }
    db.execute(
        "INSERT INTO rollout_jobs (rollout_id, job_id, rerun, outcome) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (rollout_id, job_id) DO UPDATE SET rerun = excluded.rerun, outcome = excluded.outcome",
        args![rollout_id, data.job_id, data.rerun, data.outcome.as_str()],
    )?;
    if let Some((_, previous)) = previous {
        let count = counter(&mut row.counts, &previous);
        *count = count.saturating_sub(1);
    }
    *counter(&mut row.counts, data.outcome.as_str()) += 1;
    row.updated_at = timestamp(Utc::now());
    let failure = matches!(data.outcome, Outcome::Failed | Outcome::Rejected);
    let canary_member = !rejected && canary_member(db, rollout_id, &data.job_id, data.rerun)?;
    if canary_member && !row.canary_done {
        row.canary_finished += 1;
        if failure {
            row.canary_failed += 1;
            row.reason = Some(format!(
                "canary job {} failed ({})",
                data.job_id,
                data.error_code.as_deref().unwrap_or("-")
            ));
        }
    }
    let mut emitted = false;
    let release = judge_canary(db, &mut row, worker_id, &mut emitted)?;
    if let Some(allowed) = row.budget_allowed
        && failure
        && row.state == State::Running
        && row.counts.failures() > allowed
    {
        row.state = State::Halted;
        row.reason = Some(format!(
            "failure budget exceeded: {} failures, {allowed} allowed",
            row.counts.failures()
        ));
        transition(db, &mut row, "halted", worker_id, &mut emitted)?;
    }
    complete_if_done(db, &mut row, worker_id, &mut emitted)?;
    let progress_due = row
        .progress_at
        .as_deref()
        .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
        .is_none_or(|at| Utc::now() - at.to_utc() >= chrono::Duration::seconds(1));
    if !emitted && progress_due {
        transition(db, &mut row, "progress", worker_id, &mut emitted)?;
    }
    save(db, &row)?;
    Ok(release.then(|| rollout_id.to_owned()))
}

/// Saves `row` and writes its event; every rollout event carries the counts, so the next
/// `progress` is a second away.
fn transition(
    db: &mut dyn Db,
    row: &mut Row,
    kind: &str,
    worker_id: &str,
    emitted: &mut bool,
) -> Result<(), AuditError> {
    row.progress_at = Some(timestamp(Utc::now()));
    save(db, row)?;
    emit(db, row, kind, worker_id)?;
    *emitted = true;
    Ok(())
}

/// While the rollout runs, a failed canary job halts it and a finished canary passes it: `auto`
/// releases the rest (returns true), `manual` pauses for an operator. A canary that finishes
/// while the rollout is paused is judged when it runs again.
fn judge_canary(
    db: &mut dyn Db,
    row: &mut Row,
    worker_id: &str,
    emitted: &mut bool,
) -> Result<bool, AuditError> {
    if row.canary_done || row.canary == 0 || row.state != State::Running {
        return Ok(false);
    }
    if row.canary_failed > 0 {
        row.state = State::Halted;
        transition(db, row, "halted", worker_id, emitted)?;
        return Ok(false);
    }
    if row.canary_finished < row.canary {
        return Ok(false);
    }
    row.canary_done = true;
    match row.canary_gate {
        CanaryGate::Auto => {
            save(db, row)?;
            Ok(true)
        }
        CanaryGate::Manual => {
            row.state = State::Paused;
            row.reason = Some(format!(
                "the canary of {} passed; resume to continue",
                row.canary
            ));
            transition(db, row, "paused", worker_id, emitted)?;
            Ok(false)
        }
    }
}

/// A declared rollout whose final outcomes reached `expected_jobs` is completed (once).
fn complete_if_done(
    db: &mut dyn Db,
    row: &mut Row,
    worker_id: &str,
    emitted: &mut bool,
) -> Result<(), AuditError> {
    if let Some(expected) = row.expected_jobs
        && row.declared
        && row.counts.finished() >= expected
        && !matches!(row.state, State::Cancelled | State::Completed)
    {
        row.state = State::Completed;
        row.finished_at = Some(timestamp(Utc::now()));
        transition(db, row, "completed", worker_id, emitted)?;
    }
    Ok(())
}

fn counter<'c>(counts: &'c mut Counts, outcome: &str) -> &'c mut u64 {
    match outcome {
        "succeeded" => &mut counts.succeeded,
        "failed" => &mut counts.failed,
        "rejected" => &mut counts.rejected,
        _ => &mut counts.cancelled,
    }
}

/// What applying a command asks the worker to do next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effect {
    /// Publish the rollout's parked jobs back to the queue.
    pub release: bool,
    /// End the rollout's parked jobs `cancelled`.
    pub cancel_parked: bool,
    /// The command was applied before (a redelivery): answer it, do nothing again.
    pub repeated: bool,
}

/// Applies `command` (once per `command_id`, when it has one) and returns the reply and what to
/// do next.
pub(super) fn apply(
    db: &mut dyn Db,
    command_id: Option<&str>,
    command: &Command,
    worker_id: &str,
) -> Result<(Reply, Effect), AuditError> {
    let earlier: Option<(bool, Option<String>)> = match command_id {
        Some(id) => db
            .query_opt(
                "SELECT ok, error FROM commands WHERE command_id = ?1",
                args![id],
            )?
            .map(|r| Ok::<_, AuditError>((r.get(0)?, r.get(1)?)))
            .transpose()?,
        None => None,
    };
    let rollout_id = command.rollout_id().map(|id| id.to_string());
    let (result, effect) = match earlier {
        Some((ok, error)) => (
            if ok {
                Ok(())
            } else {
                Err(error.unwrap_or_default())
            },
            Effect {
                repeated: true,
                ..Effect::default()
            },
        ),
        None => {
            let (result, effect) = match command {
                Command::Declare(plan) => declare(db, plan, worker_id)?,
                Command::Pause(steer) => steer_to(db, steer, State::Paused, worker_id)?,
                Command::Resume(steer) => steer_to(db, steer, State::Running, worker_id)?,
                Command::Cancel(steer) => steer_to(db, steer, State::Cancelled, worker_id)?,
                Command::RetryFailed(_) | Command::Status(_) => (Ok(()), Effect::default()),
            };
            if let Some(id) = command_id
                && !matches!(command, Command::Status(_) | Command::RetryFailed(_))
            {
                done(db, id, command, &result)?;
            }
            (result, effect)
        }
    };
    let rollouts = match (&rollout_id, command) {
        (None, _) => snapshots(db, None)?,
        (Some(id), _) => snapshots(db, Some(id))?,
    };
    let result = match (result, command) {
        (
            Ok(()),
            Command::Status(Some(id)) | Command::RetryFailed(Steer { rollout_id: id, .. }),
        ) if rollouts.is_empty() => Err(format!("unknown rollout {id}")),
        (result, _) => result,
    };
    Ok((
        Reply {
            kind: command.kind().into(),
            ok: result.is_ok(),
            error: result.err(),
            rollouts,
        },
        effect,
    ))
}

/// Records that `command_id` was applied (for a retry_failed: once its jobs are republished).
pub(super) fn done(
    db: &mut dyn Db,
    command_id: &str,
    command: &Command,
    result: &Result<(), String>,
) -> Result<(), AuditError> {
    db.execute(
        "INSERT INTO commands (command_id, kind, rollout_id, ok, error, applied_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
        args![
            command_id,
            command.kind(),
            command.rollout_id().map(|id| id.to_string()),
            result.is_ok(),
            result.as_ref().err(),
            timestamp(Utc::now()),
        ],
    )?;
    Ok(())
}

/// Declares the rollout (idempotently); jobs parked waiting for the declaration may run.
fn declare(
    db: &mut dyn Db,
    plan: &Plan,
    worker_id: &str,
) -> Result<(Result<(), String>, Effect), AuditError> {
    let release = Effect {
        release: true,
        ..Effect::default()
    };
    let result = declare_plan(db, plan, worker_id)?;
    Ok(match result {
        Ok(()) => (Ok(()), release),
        Err(error) => (Err(error), Effect::default()),
    })
}

fn declare_plan(
    db: &mut dyn Db,
    plan: &Plan,
    worker_id: &str,
) -> Result<Result<(), String>, AuditError> {
    let rollout_id = plan.rollout_id.as_str();
    let canonical = plan.canonical().to_string();
    let mut row = ensure(db, rollout_id)?;
    if row.declared {
        return Ok(match row.plan_json.as_deref() {
            Some(stored) if stored == canonical => Ok(()),
            stored => Err(format!(
                "rollout {rollout_id} was declared with another plan ({}); a changed plan needs a new rollout_id",
                stored.unwrap_or("-")
            )),
        });
    }
    row.declared = true;
    row.plan_json = Some(canonical);
    row.ticket = plan.ticket.as_ref().map(ToString::to_string);
    row.requested_by = plan.requested_by.as_ref().map(ToString::to_string);
    row.expected_jobs = Some(plan.expected_jobs.into());
    row.budget_allowed = plan.allowed_failures();
    row.canary = plan.canary.into();
    row.canary_gate = plan.canary_gate;
    row.max_per_second = plan.max_per_second.map(Into::into);
    row.updated_at = timestamp(Utc::now());
    save(db, &row)?;
    emit(db, &row, "declared", worker_id)?;
    // Jobs that ran before the declaration may already be all it expects.
    complete_if_done(db, &mut row, worker_id, &mut false)?;
    Ok(Ok(()))
}

/// Pause, resume or cancel.
fn steer_to(
    db: &mut dyn Db,
    steer: &Steer,
    target: State,
    worker_id: &str,
) -> Result<(Result<(), String>, Effect), AuditError> {
    let rollout_id = steer.rollout_id.as_str();
    let Some(mut row) = read(db, rollout_id)? else {
        return Ok((
            Err(format!("unknown rollout {rollout_id}")),
            Effect::default(),
        ));
    };
    let effect = Effect {
        release: target == State::Running,
        cancel_parked: target == State::Cancelled,
        repeated: false,
    };
    let refused = |why: &str| {
        Ok((
            Err(format!("rollout {rollout_id} {why}")),
            Effect::default(),
        ))
    };
    let kind = match (row.state, target) {
        (State::Cancelled, State::Cancelled) => return Ok((Ok(()), effect)),
        (State::Cancelled, _) => return refused("is cancelled"),
        (State::Completed, _) => return refused("is completed"),
        (State::Paused | State::Halted, State::Paused) => return Ok((Ok(()), Effect::default())),
        (State::Running, State::Running) => return Ok((Ok(()), effect)),
        (State::Running, State::Paused) => "paused",
        (State::Paused | State::Halted, State::Running) => {
            if !row.canary_done && row.canary > 0 {
                // Resuming a halted canary accepts it; resuming after a canary that finished
                // cleanly (a pause during it, or a manual gate) approves it.
                let passed = row.canary_finished >= row.canary && row.canary_failed == 0;
                row.canary_done = row.state == State::Halted || passed;
            }
            "resumed"
        }
        (_, State::Cancelled) => {
            row.finished_at = Some(timestamp(Utc::now()));
            "cancelled"
        }
        (_, State::Halted | State::Completed) => {
            return refused("cannot be moved there by a command");
        }
    };
    let who = steer
        .requested_by
        .as_ref()
        .map_or_else(String::new, |by| format!(" by {by}"));
    row.reason = Some(match &steer.reason {
        Some(reason) => format!("{kind}{who}: {reason}"),
        None => format!("{kind}{who}"),
    });
    row.state = target;
    row.updated_at = timestamp(Utc::now());
    save(db, &row)?;
    emit(db, &row, kind, worker_id)?;
    // A canary job that failed while the rollout was paused halts it now.
    judge_canary(db, &mut row, worker_id, &mut false)?;
    Ok((Ok(()), effect))
}

/// Snapshots of one rollout, or of all (most recent first).
pub(super) fn snapshots(
    db: &mut dyn Db,
    rollout_id: Option<&str>,
) -> Result<Vec<Snapshot>, AuditError> {
    let rows: Vec<Row> = match rollout_id {
        Some(id) => read(db, id)?.into_iter().collect(),
        None => {
            let sql =
                format!("SELECT {COLUMNS} FROM rollouts ORDER BY created_at DESC, rollout_id");
            db.query(&sql, &[])?
                .iter()
                .map(row_of)
                .collect::<Result<_, _>>()?
        }
    };
    rows.iter().map(|row| snapshot(db, row)).collect()
}

/// The jobs of `rollout_id` whose latest run failed, as their final rows describe them.
pub(super) fn failed_jobs(db: &mut dyn Db, rollout_id: &str) -> Result<Vec<FailedJob>, AuditError> {
    db.query(
        "SELECT t.job_id, t.rerun, t.rollout_id, t.ticket, t.region, t.project_id, t.instance_id,
                t.requested_status, t.kms_key_id, t.requested_by
         FROM rollout_jobs j
         JOIN toggles t ON t.job_id = j.job_id AND t.rerun = j.rerun AND t.outcome = 'failed'
         WHERE j.rollout_id = ?1 AND j.outcome = 'failed'
         ORDER BY t.id",
        args![rollout_id],
    )?
    .iter()
    .map(|r| {
        Ok(FailedJob {
            job_id: r.get(0)?,
            rerun: r.get(1)?,
            rollout_id: r.get(2)?,
            ticket: r.get(3)?,
            region: r.get(4)?,
            project_id: r.get(5)?,
            instance_id: r.get(6)?,
            requested_status: r.get(7)?,
            kms_key_id: r.get(8)?,
            requested_by: r.get(9)?,
        })
    })
    .collect()
}

/// Claims up to `limit` unpublished rollout events for `worker_id` (one not published within
/// 30 s of its claim may be claimed again: its worker died).
pub(super) fn claim_events(
    db: &mut dyn Db,
    worker_id: &str,
    limit: u32,
) -> Result<Vec<PendingEvent>, AuditError> {
    let now = Utc::now();
    let stale = timestamp(now - chrono::Duration::seconds(30));
    let rows = db.query(
        "UPDATE rollout_events SET claimed_by = ?1, claimed_at = ?2
         WHERE id IN (SELECT id FROM rollout_events
                      WHERE published_at IS NULL AND (claimed_at IS NULL OR claimed_at < ?3)
                      ORDER BY id LIMIT ?4)
         RETURNING id, kind, event_id, event_json",
        args![worker_id, timestamp(now), stale, limit],
    )?;
    let mut events = rows
        .iter()
        .map(|r| {
            Ok(PendingEvent {
                id: r.get(0)?,
                kind: r.get(1)?,
                event_id: r.get(2)?,
                json: r.get(3)?,
            })
        })
        .collect::<Result<Vec<_>, AuditError>>()?;
    events.sort_by_key(|event| event.id);
    Ok(events)
}

pub(super) fn published(db: &mut dyn Db, ids: &[i64]) -> Result<(), AuditError> {
    let now = timestamp(Utc::now());
    for id in ids {
        db.execute(
            "UPDATE rollout_events SET published_at = ?2 WHERE id = ?1",
            args![id, now],
        )?;
    }
    Ok(())
}
