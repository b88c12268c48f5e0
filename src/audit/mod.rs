//! The audit log: an append-only SQLite file with one `toggles` row per finished job and an
//! `attempts` row per HTTP call, and the lookup that makes redeliveries idempotent.
//!
//! One thread owns the connection. Callers send commands over a channel; the thread takes every
//! write that is waiting and commits them in one transaction (group commit), so `synchronous=FULL`
//! costs one fsync per batch rather than per job. The schema comes from `migrations/`.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use crate::events::ResultEvent;

/// Versioned schema files, applied in order, each once.
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_init", include_str!("../../migrations/0001_init.sql")),
    (
        "0002_toggles_by_job",
        include_str!("../../migrations/0002_toggles_by_job.sql"),
    ),
];

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("audit log: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("audit log: stored event is unreadable: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("audit log writer has stopped")]
    Closed,
    #[error("audit log: the record clashes with a stored row that is not this job's")]
    Conflict,
    #[error("audit log: commit failed: {0}")]
    Batch(String),
}

/// One HTTP call made for a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    pub call: &'static str,
    pub started_at: DateTime<Utc>,
    pub latency_ms: u64,
    pub http_status: Option<u16>,
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
    pub request_id: Option<String>,
}

/// Everything written when a job finishes. The event carries the result fields.
#[derive(Debug, Clone)]
pub struct FinalRecord {
    pub event: ResultEvent,
    pub kms_key_id: Option<String>,
    pub requested_by: Option<String>,
    pub received_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub body_sha256: String,
    pub worker_id: String,
    pub attempts: Vec<AttemptRecord>,
}

/// What recording did: a new row, or the row an earlier delivery of the same job left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    New(ResultEvent),
    Existing(ResultEvent),
    /// An in-flight marker was written.
    Marked,
}

impl Recorded {
    /// The event to publish; `None` only for a marker.
    pub fn into_event(self) -> Option<ResultEvent> {
        match self {
            Recorded::New(event) | Recorded::Existing(event) => Some(event),
            Recorded::Marked => None,
        }
    }
}

enum Command {
    Find {
        job_id: String,
        body_sha256: String,
        reply: oneshot::Sender<Result<Option<ResultEvent>, AuditError>>,
    },
    WasSent {
        job_id: String,
        reply: oneshot::Sender<Result<bool, AuditError>>,
    },
    Write {
        write: Write,
        reply: oneshot::Sender<Result<Recorded, AuditError>>,
    },
}

enum Write {
    Record(Box<FinalRecord>),
    MarkSending { job_id: String, worker_id: String },
}

/// Handle to the audit log; cheap to clone.
#[derive(Clone)]
pub struct AuditStore {
    commands: mpsc::Sender<Command>,
    path: PathBuf,
}

/// How the file is opened.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    pub busy_timeout: Duration,
    pub synchronous_full: bool,
}

impl AuditStore {
    /// Opens (creating if needed) the file, applies pending migrations and starts the writer.
    pub fn open(path: &Path, options: &AuditOptions) -> Result<AuditStore, AuditError> {
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
        Ok(AuditStore {
            commands,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored event of an earlier final outcome of `job_id`, if any. A rejection counts only
    /// for the same body: a corrected resubmission under the same job id is processed.
    pub async fn find_final(
        &self,
        job_id: &str,
        body_sha256: &str,
    ) -> Result<Option<ResultEvent>, AuditError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Find {
            job_id: job_id.to_owned(),
            body_sha256: body_sha256.to_owned(),
            reply,
        })?;
        answer.await.map_err(|_| AuditError::Closed)?
    }

    /// Commits `record` durably; if the job already has a final row, returns that one instead.
    pub async fn record(&self, record: FinalRecord) -> Result<Recorded, AuditError> {
        self.write(Write::Record(Box::new(record))).await
    }

    /// Durably notes that a Modify for `job_id` is about to go out (before the first one only).
    pub async fn mark_sending(&self, job_id: &str, worker_id: &str) -> Result<(), AuditError> {
        let write = Write::MarkSending {
            job_id: job_id.to_owned(),
            worker_id: worker_id.to_owned(),
        };
        self.write(write).await.map(|_| ())
    }

    /// Whether an earlier delivery of `job_id` may have sent a Modify.
    pub async fn was_sent(&self, job_id: &str) -> Result<bool, AuditError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::WasSent {
            job_id: job_id.to_owned(),
            reply,
        })?;
        answer.await.map_err(|_| AuditError::Closed)?
    }

    async fn write(&self, write: Write) -> Result<Recorded, AuditError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Write { write, reply })?;
        answer.await.map_err(|_| AuditError::Closed)?
    }

    fn send(&self, command: Command) -> Result<(), AuditError> {
        self.commands.send(command).map_err(|_| AuditError::Closed)
    }
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

fn migrate(connection: &mut Connection) -> rusqlite::Result<()> {
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

fn writer_loop(mut connection: Connection, commands: mpsc::Receiver<Command>) {
    while let Ok(first) = commands.recv() {
        let mut writes = Vec::new();
        let mut next = Some(first);
        while let Some(command) = next {
            match command {
                Command::Find {
                    job_id,
                    body_sha256,
                    reply,
                } => {
                    let _ = reply.send(find_final(&connection, &job_id, &body_sha256));
                }
                Command::WasSent { job_id, reply } => {
                    let _ = reply.send(was_sent(&connection, &job_id));
                }
                Command::Write { write, reply } => writes.push((write, reply)),
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

type Pending = (Write, oneshot::Sender<Result<Recorded, AuditError>>);

fn commit_batch(connection: &mut Connection, writes: Vec<Pending>) {
    match commit_all(connection, &writes) {
        Ok(results) => {
            for ((_, reply), result) in writes.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(error) => {
            let message = error.to_string();
            tracing::error!(error = %message, batch = writes.len(), "audit commit failed");
            for (_, reply) in writes {
                let _ = reply.send(Err(AuditError::Batch(message.clone())));
            }
        }
    }
}

/// Writes every pending record in one transaction: all of them are committed, or none.
fn commit_all(
    connection: &mut Connection,
    writes: &[Pending],
) -> Result<Vec<Recorded>, AuditError> {
    let tx = connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let results = writes
        .iter()
        .map(|(write, _)| match write {
            Write::Record(record) => insert(&tx, record),
            Write::MarkSending { job_id, worker_id } => mark(&tx, job_id, worker_id),
        })
        .collect::<Result<Vec<_>, _>>()?;
    tx.commit()?;
    Ok(results)
}

/// The stored result of a job: its final record, or the rejection of these very bytes.
const FIND_FINAL: &str = "SELECT event_json FROM toggles
     WHERE job_id = ?1 AND (outcome <> 'rejected' OR body_sha256 = ?2)
     ORDER BY (outcome = 'rejected'), id LIMIT 1";

fn find_final(
    connection: &Connection,
    job_id: &str,
    body_sha256: &str,
) -> Result<Option<ResultEvent>, AuditError> {
    let json: Option<String> = connection
        .prepare_cached(FIND_FINAL)?
        .query_row(params![job_id, body_sha256], |row| row.get(0))
        .optional()?;
    Ok(json.map(|json| serde_json::from_str(&json)).transpose()?)
}

fn was_sent(connection: &Connection, job_id: &str) -> Result<bool, AuditError> {
    let mut statement =
        connection.prepare_cached("SELECT EXISTS (SELECT 1 FROM in_flight WHERE job_id = ?1)")?;
    Ok(statement.query_row([job_id], |row| row.get(0))?)
}

fn mark(
    tx: &rusqlite::Transaction<'_>,
    job_id: &str,
    worker_id: &str,
) -> Result<Recorded, AuditError> {
    tx.prepare_cached(
        "INSERT INTO in_flight (job_id, first_sent_at, worker_id) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
    )?
    .execute(params![job_id, timestamp(Utc::now()), worker_id])?;
    Ok(Recorded::Marked)
}

fn insert(tx: &rusqlite::Transaction<'_>, record: &FinalRecord) -> Result<Recorded, AuditError> {
    let event = &record.event;
    let data = &event.data;
    let inserted = tx
        .prepare_cached(
            "INSERT INTO toggles (job_id, rollout_id, ticket, region, project_id, instance_id,
             requested_status, kms_key_id, requested_by, outcome, resulting_status, http_status,
             error_code, error_msg, request_id, attempts, received_at, finished_at, duration_ms,
             event_id, event_json, body_sha256, worker_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                 ?19, ?20, ?21, ?22, ?23)
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
            event.to_json(),
            record.body_sha256,
            record.worker_id,
        ])?;
    if inserted == 0 {
        let existing = find_final(tx, &data.job_id, &record.body_sha256)?;
        return existing.map(Recorded::Existing).ok_or(AuditError::Conflict);
    }
    tx.prepare_cached("DELETE FROM in_flight WHERE job_id = ?1")?
        .execute([&data.job_id])?;
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
    Ok(Recorded::New(event.clone()))
}

/// RFC 3339 in UTC with milliseconds: sorts as text, reads as time.
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{JobResult, Outcome};

    fn store(dir: &tempfile::TempDir) -> AuditStore {
        let options = AuditOptions {
            busy_timeout: Duration::from_secs(1),
            synchronous_full: true,
        };
        AuditStore::open(&dir.path().join("audit.db"), &options).unwrap()
    }

    fn record(job_id: &str, outcome: Outcome, digest: &str) -> FinalRecord {
        let data = JobResult {
            job_id: job_id.into(),
            rollout_id: None,
            ticket: None,
            region: Some("cn-north-4".into()),
            project_id: None,
            instance_id: None,
            requested_status: Some("on".into()),
            resulting_status: Some("on".into()),
            outcome,
            attempts: 1,
            http_status: Some(200),
            error_code: None,
            error_msg: None,
            request_id: Some("req-1".into()),
            duration_ms: 5,
        };
        FinalRecord {
            event: ResultEvent::new("w-1", data, Utc::now()),
            kms_key_id: None,
            requested_by: None,
            received_at: Utc::now(),
            finished_at: Utc::now(),
            body_sha256: digest.into(),
            worker_id: "w-1".into(),
            attempts: vec![AttemptRecord {
                call: "modify",
                started_at: Utc::now(),
                latency_ms: 3,
                http_status: Some(200),
                error_code: None,
                error_msg: None,
                request_id: Some("req-1".into()),
            }],
        }
    }

    #[tokio::test]
    async fn a_second_final_record_returns_the_first_one() {
        let dir = tempfile::tempdir().unwrap();
        let audit = store(&dir);
        let first = audit
            .record(record("J-1", Outcome::Succeeded, "d1"))
            .await
            .unwrap();
        let second = audit
            .record(record("J-1", Outcome::Succeeded, "d1"))
            .await
            .unwrap();
        let Recorded::New(first) = first else {
            panic!("first write is new")
        };
        assert_eq!(second, Recorded::Existing(first.clone()));
        assert_eq!(audit.find_final("J-1", "other").await.unwrap(), Some(first));
    }

    #[tokio::test]
    async fn a_rejection_only_blocks_the_same_body() {
        let dir = tempfile::tempdir().unwrap();
        let audit = store(&dir);
        audit
            .record(record("J-2", Outcome::Rejected, "bad"))
            .await
            .unwrap();
        assert!(audit.find_final("J-2", "bad").await.unwrap().is_some());
        assert!(audit.find_final("J-2", "fixed").await.unwrap().is_none());
        let fixed = audit
            .record(record("J-2", Outcome::Succeeded, "fixed"))
            .await
            .unwrap();
        assert!(matches!(fixed, Recorded::New(_)));
        assert_eq!(
            audit
                .find_final("J-2", "bad")
                .await
                .unwrap()
                .unwrap()
                .data
                .outcome,
            Outcome::Succeeded
        );
    }

    #[tokio::test]
    async fn markers_live_until_the_final_record() {
        let dir = tempfile::tempdir().unwrap();
        let audit = store(&dir);
        assert!(!audit.was_sent("J-3").await.unwrap());
        audit.mark_sending("J-3", "w-1").await.unwrap();
        audit.mark_sending("J-3", "w-1").await.unwrap();
        assert!(audit.was_sent("J-3").await.unwrap());
        audit
            .record(record("J-3", Outcome::Succeeded, "d"))
            .await
            .unwrap();
        assert!(!audit.was_sent("J-3").await.unwrap());
    }

    #[tokio::test]
    async fn toggles_and_attempts_refuse_update_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let audit = store(&dir);
        audit
            .record(record("J-4", Outcome::Succeeded, "d"))
            .await
            .unwrap();
        let connection = Connection::open(audit.path()).unwrap();
        for sql in [
            "UPDATE toggles SET outcome = 'failed'",
            "DELETE FROM toggles",
            "UPDATE attempts SET http_status = 500",
            "DELETE FROM attempts",
        ] {
            let error = connection.execute(sql, []).unwrap_err().to_string();
            assert!(error.contains("append-only"), "{sql}: {error}");
        }
        assert_eq!(
            outcome_counts(audit.path()).unwrap(),
            vec![("succeeded".to_owned(), 1)]
        );
    }

    #[tokio::test]
    async fn every_delivery_finds_its_job_through_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let audit = store(&dir);
        let connection = Connection::open(audit.path()).unwrap();
        let plan: Vec<String> = connection
            .prepare(&format!("EXPLAIN QUERY PLAN {FIND_FINAL}"))
            .unwrap()
            .query_map(params!["J-1", "digest"], |row| row.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|step| step.contains("USING INDEX toggles_job")),
            "a table scan per delivery makes each job slower than the last: {plan:?}"
        );
    }

    #[tokio::test]
    async fn reopening_applies_no_migration_twice() {
        let dir = tempfile::tempdir().unwrap();
        drop(store(&dir));
        let audit = store(&dir);
        let connection = Connection::open(audit.path()).unwrap();
        let applied: i64 = connection
            .query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(applied, MIGRATIONS.len() as i64);
    }
}
