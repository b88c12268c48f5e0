//! Read-only questions to the store, for `keyturn audit`: what ran, every HTTP call of a job,
//! what a rollout did, and whether the store still keeps its own rules.
//!
//! These open the store themselves (a SQLite file read-only; verification alone opens it
//! writable, to try an UPDATE inside a transaction it rolls back), so a person asking never
//! queues behind a worker's writer thread, and the SQL stays inside `src/audit/`: callers get
//! plain rows. On PostgreSQL the connection is the blocking client's: call these from a thread
//! that runs no async runtime.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

use super::db::{Db, Dialect, Row, Value, args};
use super::{AuditError, Location};

/// Every column of `toggles`, in the order `keyturn audit` prints them.
pub const TOGGLE_COLUMNS: &[&str] = &[
    "id",
    "job_id",
    "rerun",
    "rollout_id",
    "ticket",
    "region",
    "project_id",
    "instance_id",
    "requested_status",
    "kms_key_id",
    "requested_by",
    "outcome",
    "resulting_status",
    "http_status",
    "error_code",
    "error_msg",
    "request_id",
    "attempts",
    "received_at",
    "finished_at",
    "duration_ms",
    "event_id",
    "event_json",
    "body_sha256",
    "job_digest",
    "worker_id",
];

/// One `toggles` row: one finished run of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ToggleRow {
    pub id: i64,
    pub job_id: String,
    pub rerun: i64,
    pub rollout_id: Option<String>,
    pub ticket: Option<String>,
    pub region: Option<String>,
    pub project_id: Option<String>,
    pub instance_id: Option<String>,
    pub requested_status: Option<String>,
    pub kms_key_id: Option<String>,
    pub requested_by: Option<String>,
    pub outcome: String,
    pub resulting_status: Option<String>,
    pub http_status: Option<i64>,
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
    pub request_id: Option<String>,
    pub attempts: i64,
    pub received_at: String,
    pub finished_at: String,
    pub duration_ms: i64,
    pub event_id: String,
    pub event_json: String,
    pub body_sha256: String,
    pub job_digest: Option<String>,
    pub worker_id: String,
}

impl ToggleRow {
    /// A row selected with [`TOGGLE_COLUMNS`], in that order.
    fn read(row: &Row) -> Result<ToggleRow, AuditError> {
        Ok(ToggleRow {
            id: row.get(0)?,
            job_id: row.get(1)?,
            rerun: row.get(2)?,
            rollout_id: row.get(3)?,
            ticket: row.get(4)?,
            region: row.get(5)?,
            project_id: row.get(6)?,
            instance_id: row.get(7)?,
            requested_status: row.get(8)?,
            kms_key_id: row.get(9)?,
            requested_by: row.get(10)?,
            outcome: row.get(11)?,
            resulting_status: row.get(12)?,
            http_status: row.get(13)?,
            error_code: row.get(14)?,
            error_msg: row.get(15)?,
            request_id: row.get(16)?,
            attempts: row.get(17)?,
            received_at: row.get(18)?,
            finished_at: row.get(19)?,
            duration_ms: row.get(20)?,
            event_id: row.get(21)?,
            event_json: row.get(22)?,
            body_sha256: row.get(23)?,
            job_digest: row.get(24)?,
            worker_id: row.get(25)?,
        })
    }
}

/// Which `toggles` rows to return; every filter given must hold. Times are compared as the
/// stored RFC 3339 text (UTC, milliseconds), so give them in [`super::timestamp`]'s form.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub rollout_id: Option<String>,
    pub instance_id: Option<String>,
    pub job_id: Option<String>,
    pub outcome: Option<String>,
    pub ticket: Option<String>,
    /// `finished_at >= since`.
    pub since: Option<String>,
    /// `finished_at < until`.
    pub until: Option<String>,
    pub limit: Option<u64>,
}

/// One HTTP call of a job run, with the run it belongs to
/// (`attempts.event_id = toggles.event_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttemptRow {
    pub job_id: String,
    pub rerun: i64,
    pub outcome: String,
    pub number: i64,
    pub call: String,
    pub started_at: String,
    pub latency_ms: i64,
    pub http_status: Option<i64>,
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
    pub request_id: Option<String>,
    pub event_id: String,
}

/// A rollout's row in `rollouts`: plan, state and counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutRow {
    pub rollout_id: String,
    pub declared: bool,
    pub ticket: Option<String>,
    pub requested_by: Option<String>,
    pub expected_jobs: Option<i64>,
    pub budget_allowed: Option<i64>,
    pub canary: i64,
    pub canary_gate: String,
    pub max_per_second: Option<i64>,
    pub state: String,
    pub reason: Option<String>,
    pub succeeded: i64,
    pub failed: i64,
    pub rejected: i64,
    pub cancelled: i64,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

/// One finding of [`Reader::verify`]: `ok` lines say what was checked, the others what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub ok: bool,
    pub text: String,
}

impl Finding {
    fn ok(text: impl Into<String>) -> Finding {
        Finding {
            ok: true,
            text: text.into(),
        }
    }

    fn problem(text: impl Into<String>) -> Finding {
        Finding {
            ok: false,
            text: text.into(),
        }
    }
}

enum Connected {
    Sqlite(Connection),
    Postgres(Box<super::postgres::Postgres>),
}

/// An open store.
pub struct Reader {
    connection: RefCell<Connected>,
    location: Location,
}

impl Reader {
    /// Opens an existing audit file read-only; a missing file is an error, never created.
    pub fn open(path: &Path) -> Result<Reader, AuditError> {
        Reader::open_with(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
    }

    /// Opens an existing audit file for [`Reader::verify`], which must try a write.
    pub fn open_for_verify(path: &Path) -> Result<Reader, AuditError> {
        Reader::open_with(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
    }

    /// Opens the store at `location` (for verification: a SQLite file is opened writable).
    pub fn open_at(location: &Location, verify: bool) -> Result<Reader, AuditError> {
        match location {
            Location::Sqlite(path) if verify => Reader::open_for_verify(path),
            Location::Sqlite(path) => Reader::open(path),
            Location::Postgres(url) => Ok(Reader {
                connection: RefCell::new(Connected::Postgres(Box::new(
                    super::postgres::connect_reader(url)?,
                ))),
                location: location.clone(),
            }),
        }
    }

    fn open_with(path: &Path, flags: OpenFlags) -> Result<Reader, AuditError> {
        let open_error = |source| AuditError::Open {
            path: path.to_owned(),
            source,
        };
        let connection = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(open_error)?;
        connection
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_error)?;
        Ok(Reader {
            connection: RefCell::new(Connected::Sqlite(connection)),
            location: Location::Sqlite(path.to_owned()),
        })
    }

    /// The SQLite file's path; empty for PostgreSQL.
    pub fn path(&self) -> PathBuf {
        match &self.location {
            Location::Sqlite(path) => path.clone(),
            Location::Postgres(_) => PathBuf::new(),
        }
    }

    /// Where the store is, in words that hold no password.
    pub fn describe(&self) -> String {
        self.location.describe()
    }

    fn with<T>(
        &self,
        work: impl FnOnce(&mut dyn Db) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        match &mut *self.connection.borrow_mut() {
            Connected::Sqlite(connection) => work(&mut super::sqlite::Lite(connection)),
            Connected::Postgres(backend) => backend.with(work),
        }
    }

    fn rows(&self, sql: &str, args: &[Value]) -> Result<Vec<Row>, AuditError> {
        self.with(|db| db.query(sql, args))
    }

    /// The `toggles` rows `filter` selects, oldest first.
    pub fn toggles(&self, filter: &Filter) -> Result<Vec<ToggleRow>, AuditError> {
        let mut clauses = Vec::new();
        let mut values: Vec<Value> = Vec::new();
        let mut add = |clause: &str, value: &Option<String>| {
            if let Some(value) = value {
                values.push(Value::Text(value.clone()));
                clauses.push(format!("{clause} ?{}", values.len()));
            }
        };
        add("rollout_id =", &filter.rollout_id);
        add("instance_id =", &filter.instance_id);
        add("job_id =", &filter.job_id);
        add("outcome =", &filter.outcome);
        add("ticket =", &filter.ticket);
        add("finished_at >=", &filter.since);
        add("finished_at <", &filter.until);
        let mut sql = format!("SELECT {} FROM toggles", TOGGLE_COLUMNS.join(", "));
        if !clauses.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&clauses.join(" AND "));
        }
        sql.push_str(" ORDER BY finished_at, id");
        if let Some(limit) = filter.limit {
            sql.push_str(&format!(" LIMIT {limit}"));
        }
        self.rows(&sql, &values)?
            .iter()
            .map(ToggleRow::read)
            .collect()
    }

    /// Every HTTP call of `job_id` (of one run when `rerun` is given), in the order made.
    pub fn attempts(
        &self,
        job_id: &str,
        rerun: Option<i64>,
    ) -> Result<Vec<AttemptRow>, AuditError> {
        self.rows(
            "SELECT t.job_id, t.rerun, t.outcome, a.number, a.call, a.started_at, a.latency_ms,
                    a.http_status, a.error_code, a.error_msg, a.request_id, a.event_id
             FROM attempts a JOIN toggles t ON t.event_id = a.event_id AND a.job_id = t.job_id
             WHERE t.job_id = ?1 AND (CAST(?2 AS BIGINT) IS NULL OR t.rerun = ?2)
             ORDER BY t.rerun, t.id, a.number, a.id",
            args![job_id, rerun],
        )?
        .iter()
        .map(|row| {
            Ok(AttemptRow {
                job_id: row.get(0)?,
                rerun: row.get(1)?,
                outcome: row.get(2)?,
                number: row.get(3)?,
                call: row.get(4)?,
                started_at: row.get(5)?,
                latency_ms: row.get(6)?,
                http_status: row.get(7)?,
                error_code: row.get(8)?,
                error_msg: row.get(9)?,
                request_id: row.get(10)?,
                event_id: row.get(11)?,
            })
        })
        .collect()
    }

    /// The rollout's row, if the store knows it.
    pub fn rollout(&self, rollout_id: &str) -> Result<Option<RolloutRow>, AuditError> {
        self.rows(
            "SELECT rollout_id, declared, ticket, requested_by, expected_jobs, budget_allowed,
                        canary, canary_gate, max_per_second, state, reason, succeeded, failed,
                        rejected, cancelled, created_at, started_at, finished_at
                 FROM rollouts WHERE rollout_id = ?1",
            args![rollout_id],
        )?
        .first()
        .map(|row| {
            Ok(RolloutRow {
                rollout_id: row.get(0)?,
                declared: row.get(1)?,
                ticket: row.get(2)?,
                requested_by: row.get(3)?,
                expected_jobs: row.get(4)?,
                budget_allowed: row.get(5)?,
                canary: row.get(6)?,
                canary_gate: row.get(7)?,
                max_per_second: row.get(8)?,
                state: row.get(9)?,
                reason: row.get(10)?,
                succeeded: row.get(11)?,
                failed: row.get(12)?,
                rejected: row.get(13)?,
                cancelled: row.get(14)?,
                created_at: row.get(15)?,
                started_at: row.get(16)?,
                finished_at: row.get(17)?,
            })
        })
        .transpose()
    }

    /// Checks the store's own rules; every finding, good and bad.
    pub fn verify(&self) -> Result<Vec<Finding>, AuditError> {
        let mut findings = Vec::new();
        self.check_triggers(&mut findings)?;
        self.check_migrations(&mut findings)?;
        self.check_rollout_counts(&mut findings)?;
        self.check_rollout_jobs(&mut findings)?;
        self.check_attempts_join(&mut findings)?;
        Ok(findings)
    }

    fn check_triggers(&self, findings: &mut Vec<Finding>) -> Result<(), AuditError> {
        for table in ["toggles", "attempts"] {
            for action in ["update", "delete"] {
                let name = format!("{table}_refuse_{action}");
                let exists: bool = self.with(|db| {
                    let sql = match db.dialect() {
                        Dialect::Sqlite => "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?1 AND tbl_name = ?2)",
                        Dialect::Postgres => "SELECT EXISTS (SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid WHERE t.tgname = ?1 AND c.relname = ?2 AND t.tgenabled <> 'D')",
                    };
                    db.query_one(sql, args![name, table])?.get(0)
                })?;
                findings.push(if exists {
                    Finding::ok(format!("trigger {name} exists"))
                } else {
                    Finding::problem(format!(
                        "trigger {name} is missing: {table} is no longer append-only"
                    ))
                });
            }
            findings.push(self.try_update(table)?);
        }
        Ok(())
    }

    /// Tries an UPDATE of one row inside a transaction that is always rolled back.
    fn try_update(&self, table: &str) -> Result<Finding, AuditError> {
        let column = if table == "toggles" {
            "outcome"
        } else {
            "http_status"
        };
        let tried = self.with(|db| {
            db.execute("BEGIN", &[])?;
            let tried = db.execute(
                &format!(
                    "UPDATE {table} SET {column} = {column} WHERE id = (SELECT MIN(id) FROM {table})"
                ),
                &[],
            );
            db.execute("ROLLBACK", &[])?;
            Ok(tried)
        })?;
        Ok(match tried {
            Err(error) if error.to_string().contains("append-only") => {
                Finding::ok(format!("an UPDATE of {table} is refused"))
            }
            Err(error) => Finding::problem(format!(
                "an UPDATE of {table} failed for another reason: {error}"
            )),
            Ok(0) => Finding::ok(format!("{table} is empty; no UPDATE to try")),
            Ok(_) => Finding::problem(format!(
                "an UPDATE of {table} was accepted (rolled back): {table} is not append-only"
            )),
        })
    }

    fn check_migrations(&self, findings: &mut Vec<Finding>) -> Result<(), AuditError> {
        let applied = self.strings("SELECT version FROM schema_migrations")?;
        let missing: Vec<&str> = super::sqlite::MIGRATIONS
            .iter()
            .map(|(version, _)| *version)
            .filter(|version| !applied.iter().any(|a| a == version))
            .collect();
        findings.push(if missing.is_empty() {
            Finding::ok(format!(
                "all {} migrations applied",
                super::sqlite::MIGRATIONS.len()
            ))
        } else {
            Finding::problem(format!("migrations not applied: {}", missing.join(", ")))
        });
        Ok(())
    }

    /// The counts in `rollouts` equal those derived from `rollout_jobs`.
    fn check_rollout_counts(&self, findings: &mut Vec<Finding>) -> Result<(), AuditError> {
        let rows = self.rows(
            "SELECT r.rollout_id, r.succeeded, r.failed, r.rejected, r.cancelled,
                    COUNT(CASE WHEN j.outcome = 'succeeded' THEN 1 END),
                    COUNT(CASE WHEN j.outcome = 'failed' THEN 1 END),
                    COUNT(CASE WHEN j.outcome = 'rejected' THEN 1 END),
                    COUNT(CASE WHEN j.outcome = 'cancelled' THEN 1 END)
             FROM rollouts r LEFT JOIN rollout_jobs j ON j.rollout_id = r.rollout_id
             GROUP BY r.rollout_id, r.succeeded, r.failed, r.rejected, r.cancelled
             ORDER BY r.rollout_id",
            &[],
        )?;
        let (mut rollouts, mut wrong) = (0, 0);
        for row in &rows {
            let id: String = row.get(0)?;
            let stored: [i64; 4] = [row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?];
            let derived: [i64; 4] = [row.get(5)?, row.get(6)?, row.get(7)?, row.get(8)?];
            rollouts += 1;
            if stored != derived {
                wrong += 1;
                findings.push(Finding::problem(format!(
                    "rollout {id}: counts (succeeded, failed, rejected, cancelled) are {stored:?} in rollouts but {derived:?} in rollout_jobs"
                )));
            }
        }
        if wrong == 0 {
            findings.push(Finding::ok(format!(
                "{rollouts} rollouts: counts checked against rollout_jobs"
            )));
        }
        Ok(())
    }

    /// `rollout_jobs` names the latest run of each job as `toggles` records it.
    fn check_rollout_jobs(&self, findings: &mut Vec<Finding>) -> Result<(), AuditError> {
        let disagreeing = self.strings(
            "SELECT j.rollout_id || ' ' || j.job_id || ' rerun ' || j.rerun || ' ' || j.outcome
             FROM rollout_jobs j
             WHERE NOT EXISTS (SELECT 1 FROM toggles t WHERE t.job_id = j.job_id
                                 AND t.rerun = j.rerun AND t.outcome = j.outcome)
                OR EXISTS (SELECT 1 FROM toggles t WHERE t.job_id = j.job_id
                             AND t.rollout_id = j.rollout_id AND t.rerun > j.rerun
                             AND t.outcome <> 'rejected')
             ORDER BY j.rollout_id, j.job_id",
        )?;
        for job in &disagreeing {
            findings.push(Finding::problem(format!(
                "rollout_jobs {job} is not the latest toggles row of that job"
            )));
        }
        let unlisted = self.strings(
            "SELECT t.rollout_id || ' ' || t.job_id || ' rerun ' || t.rerun FROM toggles t
             WHERE t.rollout_id IS NOT NULL AND t.outcome <> 'rejected'
               AND NOT EXISTS (SELECT 1 FROM rollout_jobs j
                                 WHERE j.rollout_id = t.rollout_id AND j.job_id = t.job_id)
             ORDER BY t.id",
        )?;
        for job in &unlisted {
            findings.push(Finding::problem(format!(
                "toggles row of {job} has no rollout_jobs row"
            )));
        }
        if disagreeing.is_empty() && unlisted.is_empty() {
            findings.push(Finding::ok(
                "rollout_jobs agrees with the latest toggles row of each job",
            ));
        }
        Ok(())
    }

    fn check_attempts_join(&self, findings: &mut Vec<Finding>) -> Result<(), AuditError> {
        let orphans = self.strings(
            "SELECT a.job_id || ' attempt ' || a.number || ' (event ' || a.event_id || ')'
             FROM attempts a WHERE NOT EXISTS (SELECT 1 FROM toggles t WHERE t.event_id = a.event_id)
             ORDER BY a.id",
        )?;
        for orphan in &orphans {
            findings.push(Finding::problem(format!(
                "attempts row {orphan} joins no toggles row"
            )));
        }
        if orphans.is_empty() {
            findings.push(Finding::ok("every attempts row joins a toggles row"));
        }
        Ok(())
    }

    fn strings(&self, sql: &str) -> Result<Vec<String>, AuditError> {
        self.rows(sql, &[])?.iter().map(|row| row.get(0)).collect()
    }
}
