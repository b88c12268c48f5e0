//! The SQLite side of the audit log: one thread owns the connection, answers reads in order and
//! commits every write waiting in its channel in one transaction (group commit). A write that
//! cannot commit is retried on its own, so it never fails the writes batched with it.

use std::path::Path;
use std::sync::mpsc;

use chrono::Utc;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::oneshot;

use crate::rollout::State;

use super::{
    AuditError, AuditOptions, Claimed, Command, Committed, Earlier, FinalRecord, ParkedJob,
    Recorded, Seen, StoredEvent, Write, Written, rollouts, timestamp,
};

/// Versioned schema files, applied in order, each once.
pub(super) const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_init", include_str!("../../migrations/0001_init.sql")),
    (
        "0002_toggles_by_job",
        include_str!("../../migrations/0002_toggles_by_job.sql"),
    ),
    (
        "0003_job_keys_and_parking",
        include_str!("../../migrations/0003_job_keys_and_parking.sql"),
    ),
    (
        "0004_rollouts",
        include_str!("../../migrations/0004_rollouts.sql"),
    ),
    (
        "0005_heartbeat",
        include_str!("../../migrations/0005_heartbeat.sql"),
    ),
];

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 256;

/// Opens the file, migrates it and starts the thread that owns it.
pub(super) fn start(
    path: &Path,
    options: &AuditOptions,
) -> Result<mpsc::Sender<Command>, AuditError> {
    let open_error = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    let mut connection = Connection::open(path).map_err(open_error)?;
    configure(&connection, options).map_err(open_error)?;
    migrate(&mut connection).map_err(open_error)?;
    let (commands, receiver) = mpsc::channel();
    std::thread::Builder::new()
        .name("keyturn-audit".into())
        .spawn(move || writer_loop(connection, receiver))
        .expect("spawn the audit writer thread");
    Ok(commands)
}

fn configure(connection: &Connection, options: &AuditOptions) -> rusqlite::Result<()> {
    connection.busy_timeout(options.busy_timeout)?;
    connection
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))?;
    let synchronous = if options.synchronous_full {
        "FULL"
    } else {
        "NORMAL"
    };
    connection.pragma_update(None, "synchronous", synchronous)?;
    connection.pragma_update(None, "foreign_keys", "ON")
}

/// Applies pending migrations. Foreign keys are off meanwhile (a migration may rebuild a table
/// others refer to, as SQLite's own procedure for changing a table asks) and checked after.
fn migrate(connection: &mut Connection) -> rusqlite::Result<()> {
    connection.pragma_update(None, "foreign_keys", "OFF")?;
    apply_migrations(connection)?;
    let broken: Option<String> = connection
        .query_row(
            "SELECT \"table\" FROM pragma_foreign_key_check LIMIT 1",
            [],
            |row| row.get(0),
        )
        .optional()?;
    if let Some(table) = broken {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT),
            Some(format!("a migration left a broken foreign key in {table}")),
        ));
    }
    connection.pragma_update(None, "foreign_keys", "ON")
}

fn apply_migrations(connection: &mut Connection) -> rusqlite::Result<()> {
    connection.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version TEXT PRIMARY KEY, applied_at TEXT NOT NULL)",
    )?;
    for (version, sql) in MIGRATIONS {
        let tx = connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let applied: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = ?1)",
            [version],
            |row| row.get(0),
        )?;
        if !applied {
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                params![version, timestamp(Utc::now())],
            )?;
        }
        tx.commit()?;
    }
    Ok(())
}

type Pending = (Write, oneshot::Sender<Result<Written, AuditError>>);

fn writer_loop(mut connection: Connection, commands: mpsc::Receiver<Command>) {
    while let Ok(first) = commands.recv() {
        let mut writes = Vec::new();
        let mut next = Some(first);
        while let Some(command) = next {
            match command {
                Command::Write { write, reply } => writes.push((write, reply)),
                read => answer(&connection, read),
            }
            next = if writes.len() < MAX_BATCH {
                commands.try_recv().ok()
            } else {
                None
            };
        }
        if !writes.is_empty() {
            commit_batch(&mut connection, writes);
        }
    }
}

fn answer(connection: &Connection, command: Command) {
    match command {
        Command::Lookup {
            job_id,
            rerun,
            body_sha256,
            rollout_id,
            reply,
        } => {
            let _ = reply.send(lookup(
                connection,
                &job_id,
                rerun,
                &body_sha256,
                rollout_id.as_deref(),
            ));
        }
        Command::Snapshots { rollout_id, reply } => {
            let _ = reply.send(rollouts::snapshots(connection, rollout_id.as_deref()));
        }
        Command::FailedJobs { rollout_id, reply } => {
            let _ = reply.send(rollouts::failed_jobs(connection, &rollout_id));
        }
        Command::ParkedScopes { reply } => {
            let _ = reply.send(parked_scopes(connection));
        }
        Command::Parked {
            scope,
            limit,
            reply,
        } => {
            let _ = reply.send(parked(connection, &scope, limit));
        }
        Command::Write { .. } => unreachable!("writes are batched"),
    }
}

/// Commits the batch in one transaction; if that fails, each write alone, so one write that
/// cannot commit fails only itself.
fn commit_batch(connection: &mut Connection, writes: Vec<Pending>) {
    let batch = writes.len();
    let results = match commit_all(connection, writes.iter().map(|(write, _)| write)) {
        Ok(results) => results.into_iter().map(Ok).collect(),
        Err(error) if batch == 1 => vec![Err(error)],
        Err(error) => {
            tracing::warn!(%error, batch, "audit batch failed; committing its writes one by one");
            writes
                .iter()
                .map(|(write, _)| commit_all(connection, [write]).map(|mut one| one.remove(0)))
                .collect::<Vec<_>>()
        }
    };
    for ((_, reply), result) in writes.into_iter().zip(results) {
        if let Err(error) = &result {
            tracing::error!(%error, "audit commit failed");
        }
        let _ = reply.send(result);
    }
}

fn commit_all<'w>(
    connection: &mut Connection,
    writes: impl IntoIterator<Item = &'w Write>,
) -> Result<Vec<Written>, AuditError> {
    let tx = connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let results = writes
        .into_iter()
        .map(|write| apply(&tx, write))
        .collect::<Result<Vec<_>, _>>()?;
    tx.commit()?;
    Ok(results)
}

fn apply(tx: &Transaction<'_>, write: &Write) -> Result<Written, AuditError> {
    Ok(match write {
        Write::Record(record) => Written::Recorded(Box::new(insert(tx, record)?)),
        Write::Claim {
            job_id,
            rerun,
            digest,
            worker_id,
            rollout_id,
        } => Written::Claimed(claim(
            tx,
            job_id,
            *rerun,
            digest,
            worker_id,
            rollout_id.as_deref(),
        )?),
        Write::AdmitCanary {
            rollout_id,
            job_id,
            rerun,
        } => Written::Admitted(rollouts::admit_canary(tx, rollout_id, job_id, *rerun)?),
        Write::Apply {
            command_id,
            command,
            worker_id,
        } => Written::Applied(Box::new(rollouts::apply(
            tx,
            command_id.as_deref(),
            command,
            worker_id,
        )?)),
        Write::CommandDone {
            command_id,
            command,
        } => {
            rollouts::done(tx, command_id, command, &Ok(()))?;
            Written::Done
        }
        Write::ClaimEvents { worker_id, limit } => {
            Written::Events(rollouts::claim_events(tx, worker_id, *limit)?)
        }
        Write::Published(ids) => {
            rollouts::published(tx, ids)?;
            Written::Done
        }
        Write::Ping => {
            tx.execute(
                "UPDATE heartbeat SET at = ?1 WHERE id = 1",
                [timestamp(chrono::Utc::now())],
            )?;
            Written::Done
        }
        Write::Park(job) => {
            park(tx, job)?;
            Written::Done
        }
        Write::Unpark(ids) => {
            let mut statement =
                tx.prepare_cached("DELETE FROM parked WHERE id = ?1 AND generation = ?2")?;
            for (id, generation) in ids {
                statement.execute([id, generation])?;
            }
            Written::Done
        }
    })
}

/// The final record of a job key. Served by the `toggles_job` index (see the plan test).
pub(super) const FIND_FINAL: &str = "SELECT event_json, job_digest, received_at FROM toggles
     WHERE job_id = ?1 AND rerun = ?2 AND outcome <> 'rejected' LIMIT 1";
const FIND_REJECTION: &str = "SELECT event_json FROM toggles
     WHERE job_id = ?1 AND outcome = 'rejected' AND body_sha256 = ?2 LIMIT 1";

fn lookup(
    connection: &Connection,
    job_id: &str,
    rerun: u32,
    body_sha256: &str,
    rollout_id: Option<&str>,
) -> Result<Earlier, AuditError> {
    let final_record = connection
        .prepare_cached(FIND_FINAL)?
        .query_row(params![job_id, rerun], |row| {
            Ok((row.get::<_, String>(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?
        .map(|(json, digest, at)| StoredEvent::parse(json).map(|e| (e, Seen { digest, at })))
        .transpose()?;
    let rejection = find_rejection(connection, job_id, body_sha256)?;
    let seen = |sql: &str| -> Result<Option<Seen>, AuditError> {
        Ok(connection
            .prepare_cached(sql)?
            .query_row(params![job_id, rerun], |row| {
                Ok(Seen {
                    digest: row.get(0)?,
                    at: row.get(1)?,
                })
            })
            .optional()?)
    };
    Ok(Earlier {
        final_record,
        rejection,
        marker: seen(
            "SELECT job_digest, first_sent_at FROM in_flight WHERE job_id = ?1 AND rerun = ?2",
        )?,
        parked: seen("SELECT job_digest, parked_at FROM parked WHERE job_id = ?1 AND rerun = ?2")?,
        rollout: rollout_id
            .map(|id| rollouts::view(connection, id))
            .transpose()?
            .flatten(),
    })
}

fn find_rejection(
    connection: &Connection,
    job_id: &str,
    body_sha256: &str,
) -> Result<Option<StoredEvent>, AuditError> {
    connection
        .prepare_cached(FIND_REJECTION)?
        .query_row(params![job_id, body_sha256], |row| row.get::<_, String>(0))
        .optional()?
        .map(StoredEvent::parse)
        .transpose()
}

fn claim(
    tx: &Transaction<'_>,
    job_id: &str,
    rerun: u32,
    digest: &str,
    worker_id: &str,
    rollout_id: Option<&str>,
) -> Result<Claimed, AuditError> {
    // The rollout may have been paused, halted or cancelled since the job was admitted: check
    // again, in the transaction that would mark its first Modify.
    if let Some(state) = rollout_id
        .map(|id| rollouts::state(tx, id))
        .transpose()?
        .flatten()
        .filter(|state| matches!(state, State::Paused | State::Halted | State::Cancelled))
    {
        return Ok(Claimed::RolloutStopped(state));
    }
    let inserted = tx
        .prepare_cached(
            "INSERT INTO in_flight (job_id, rerun, job_digest, first_sent_at, worker_id, rollout_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
        )?
        .execute(params![
            job_id,
            rerun,
            digest,
            timestamp(Utc::now()),
            worker_id,
            rollout_id
        ])?;
    if let Some(rollout_id) = rollout_id
        && inserted == 1
    {
        rollouts::started(tx, rollout_id, worker_id)?;
    }
    Ok(Claimed::Marked(
        tx.prepare_cached(
            "SELECT job_digest, first_sent_at FROM in_flight WHERE job_id = ?1 AND rerun = ?2",
        )?
        .query_row(params![job_id, rerun], |row| {
            Ok(Seen {
                digest: row.get(0)?,
                at: row.get(1)?,
            })
        })?,
    ))
}

fn park(tx: &Transaction<'_>, job: &ParkedJob) -> Result<(), AuditError> {
    tx.prepare_cached(
        "INSERT INTO parked (job_id, rerun, job_digest, rollout_id, scope, reason, body,
             message_id, correlation_id, reply_to, content_type, parked_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT (job_id, rerun) DO UPDATE SET generation = generation + 1,
             scope = excluded.scope, reason = excluded.reason",
    )?
    .execute(params![
        job.job_id,
        job.rerun,
        job.job_digest,
        job.rollout_id,
        job.scope,
        job.reason,
        job.body,
        job.message_id,
        job.correlation_id,
        job.reply_to,
        job.content_type,
        timestamp(job.parked_at),
    ])?;
    Ok(())
}

fn parked_scopes(connection: &Connection) -> Result<Vec<(String, u64)>, AuditError> {
    let mut statement = connection
        .prepare_cached("SELECT scope, COUNT(*) FROM parked GROUP BY scope ORDER BY scope")?;
    let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn parked(connection: &Connection, scope: &str, limit: u32) -> Result<Vec<ParkedJob>, AuditError> {
    let mut statement = connection.prepare_cached(
        "SELECT id, job_id, rerun, job_digest, rollout_id, scope, reason, body, message_id,
                correlation_id, reply_to, content_type, parked_at, generation
         FROM parked WHERE scope = ?1 ORDER BY id LIMIT ?2",
    )?;
    let rows = statement.query_map(params![scope, limit], |row| {
        let parked_at: String = row.get(12)?;
        Ok(ParkedJob {
            id: row.get(0)?,
            job_id: row.get(1)?,
            rerun: row.get(2)?,
            job_digest: row.get(3)?,
            rollout_id: row.get(4)?,
            scope: row.get(5)?,
            reason: row.get(6)?,
            body: row.get(7)?,
            message_id: row.get(8)?,
            correlation_id: row.get(9)?,
            reply_to: row.get(10)?,
            content_type: row.get(11)?,
            parked_at: chrono::DateTime::parse_from_rfc3339(&parked_at)
                .map(|at| at.to_utc())
                .unwrap_or_else(|_| Utc::now()),
            generation: row.get(13)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn insert(tx: &Transaction<'_>, record: &FinalRecord) -> Result<Committed, AuditError> {
    let stored = StoredEvent::new(record.event.clone());
    let event = &stored.event;
    let data = &event.data;
    let inserted = tx
        .prepare_cached(
            "INSERT INTO toggles (job_id, rollout_id, ticket, region, project_id, instance_id,
             requested_status, kms_key_id, requested_by, outcome, resulting_status, http_status,
             error_code, error_msg, request_id, attempts, received_at, finished_at, duration_ms,
             event_id, event_json, body_sha256, worker_id, rerun, job_digest)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                 ?19, ?20, ?21, ?22, ?23, ?24, ?25)
         ON CONFLICT DO NOTHING",
        )?
        .execute(params![
            data.job_id,
            data.rollout_id,
            data.ticket,
            data.region,
            data.project_id,
            data.instance_id,
            data.requested_status,
            record.kms_key_id,
            record.requested_by,
            data.outcome.as_str(),
            data.resulting_status,
            data.http_status,
            data.error_code,
            data.error_msg,
            data.request_id,
            data.attempts,
            timestamp(record.received_at),
            timestamp(record.finished_at),
            data.duration_ms,
            event.id,
            stored.json,
            record.body_sha256,
            record.worker_id,
            data.rerun,
            record.job_digest,
        ])?;
    if inserted == 0 {
        // Another delivery finished the job first: this one's marker is stale.
        tx.prepare_cached("DELETE FROM in_flight WHERE job_id = ?1 AND rerun = ?2")?
            .execute(params![data.job_id, data.rerun])?;
        return Ok(Committed {
            recorded: Recorded::Existing(existing(tx, record)?),
            release: None,
        });
    }
    tx.prepare_cached("DELETE FROM in_flight WHERE job_id = ?1 AND rerun = ?2")?
        .execute(params![data.job_id, data.rerun])?;
    let mut statement = tx.prepare_cached(
        "INSERT INTO attempts (event_id, job_id, number, call, started_at, latency_ms, http_status,
             error_code, error_msg, request_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    for (number, attempt) in record.attempts.iter().enumerate() {
        statement.execute(params![
            event.id,
            data.job_id,
            number + 1,
            attempt.call,
            timestamp(attempt.started_at),
            attempt.latency_ms,
            attempt.http_status,
            attempt.error_code,
            attempt.error_msg,
            attempt.request_id,
        ])?;
    }
    let release = rollouts::count_final(tx, record)?;
    Ok(Committed {
        recorded: Recorded::New(stored),
        release,
    })
}

/// The row that made an insert of `record` a no-op: the key's final record, or the rejection
/// of the same bytes.
fn existing(tx: &Transaction<'_>, record: &FinalRecord) -> Result<StoredEvent, AuditError> {
    let data = &record.event.data;
    let found = if record.job_digest.is_some() {
        tx.prepare_cached(FIND_FINAL)?
            .query_row(params![data.job_id, data.rerun], |row| {
                row.get::<_, String>(0)
            })
            .optional()?
            .map(StoredEvent::parse)
            .transpose()?
    } else {
        find_rejection(tx, &data.job_id, &record.body_sha256)?
    };
    found.ok_or(AuditError::Conflict)
}

/// Finished jobs per outcome, read from the file at `path` (for summaries).
pub fn outcome_counts(path: &Path) -> Result<Vec<(String, i64)>, AuditError> {
    let connection = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|source| AuditError::Open {
            path: path.to_owned(),
            source,
        })?;
    let mut statement = connection
        .prepare("SELECT outcome, COUNT(*) FROM toggles GROUP BY outcome ORDER BY outcome")?;
    let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}
