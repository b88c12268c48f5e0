//! The SQLite store: one file on one host. Opening applies the migrations under `migrations/`;
//! the writer thread ([`super::writer`]) owns the connection, and its `BEGIN IMMEDIATE`
//! transactions take the file's write lock, so every process on the file writes one at a time.

use std::path::Path;
use std::sync::mpsc;

use chrono::Utc;
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};

use super::db::{Db, Dialect, Row, Value};
use super::writer::{self, Backend};
use super::{AuditError, AuditOptions, Command, timestamp};

/// Versioned schema files, applied in order, each once. PostgreSQL has the same versions
/// ([`super::postgres::MIGRATIONS`]), the same in meaning.
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
    (
        "0006_leases",
        include_str!("../../migrations/0006_leases.sql"),
    ),
    (
        "0007_rate_buckets",
        include_str!("../../migrations/0007_rate_buckets.sql"),
    ),
];

/// Statements each connection keeps prepared. A job's claim and record with its rollout's counts
/// use more than rusqlite's default of 16, and the cache evicts the least recently used: a cycle
/// longer than it would prepare every statement anew each time.
const STATEMENT_CACHE: usize = 64;

/// Opens the file, migrates it and starts the writer thread and the reader thread, each owning a
/// connection (WAL: the reader sees every committed write and never waits for the writer).
pub(super) fn start(
    path: &Path,
    options: &AuditOptions,
) -> Result<(mpsc::Sender<Command>, mpsc::Sender<Command>), AuditError> {
    // Workers starting together on a new file contend for it while one of them turns on WAL and
    // migrates; a "database is locked" that outlasts the busy timeout then is tried again.
    let mut attempt = 0;
    let connection = loop {
        match open_writer(path, options) {
            Err(error) if attempt < 4 && busy(&error) => {
                attempt += 1;
                tracing::warn!(
                    attempt,
                    "the audit file is locked by another process; trying again"
                );
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            opened => break opened?,
        }
    };
    let open_error = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    // The reader needs no pragma but the busy timeout: WAL is the file's own setting.
    let reader = Connection::open(path).map_err(open_error)?;
    reader
        .busy_timeout(options.busy_timeout)
        .map_err(open_error)?;
    reader.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    let writes = writer::spawn_with("keyturn-audit", move || Some(Sqlite { connection }));
    let reads = writer::spawn_with("keyturn-audit-read", move || {
        Some(Sqlite { connection: reader })
    });
    Ok((writes, reads))
}

fn busy(error: &AuditError) -> bool {
    let source = match error {
        AuditError::Open { source, .. } | AuditError::Sql(source) => source,
        _ => return false,
    };
    source.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
}

/// The writer's connection: configured, checked and migrated.
fn open_writer(path: &Path, options: &AuditOptions) -> Result<Connection, AuditError> {
    let open_error = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    let mut connection = Connection::open(path).map_err(open_error)?;
    configure(&connection, options).map_err(open_error)?;
    refuse_newer(&connection)?;
    migrate(&mut connection).map_err(open_error)?;
    Ok(connection)
}

fn configure(connection: &Connection, options: &AuditOptions) -> rusqlite::Result<()> {
    connection.busy_timeout(options.busy_timeout)?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
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

/// A file migrated by a newer keyturn may hold rows this one would misread: refuse it.
fn refuse_newer(connection: &Connection) -> Result<(), AuditError> {
    let exists: bool = connection.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations')",
        [],
        |row| row.get(0),
    )?;
    if !exists {
        return Ok(());
    }
    let mut statement = connection.prepare("SELECT version FROM schema_migrations")?;
    let applied = statement
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    super::refuse_unknown_versions(&applied, MIGRATIONS)
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

/// The writer thread's connection.
struct Sqlite {
    connection: Connection,
}

impl Backend for Sqlite {
    fn write<T>(
        &mut self,
        work: impl FnOnce(&mut dyn Db) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        self.transaction(rusqlite::TransactionBehavior::Immediate, work)
    }

    /// One snapshot for all of `work`'s statements (a lookup with a rollout makes several).
    fn read<T>(
        &mut self,
        work: impl FnOnce(&mut dyn Db) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        self.transaction(rusqlite::TransactionBehavior::Deferred, work)
    }

    fn read_statement<T>(
        &mut self,
        work: impl FnOnce(&mut dyn Db) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        work(&mut Lite(&self.connection))
    }
}

impl Sqlite {
    fn transaction<T>(
        &mut self,
        behavior: rusqlite::TransactionBehavior,
        work: impl FnOnce(&mut dyn Db) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        let tx = self.connection.transaction_with_behavior(behavior)?;
        let result = work(&mut Lite(&tx))?;
        tx.commit()?;
        Ok(result)
    }
}

/// A SQLite connection (or a transaction on it) as a [`Db`]. Statements are prepared once per
/// connection and cached.
pub(super) struct Lite<'c>(pub &'c Connection);

impl Db for Lite<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64, AuditError> {
        let changed = self
            .0
            .prepare_cached(sql)?
            .execute(params_from_iter(args.iter()))?;
        Ok(changed as u64)
    }

    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, AuditError> {
        let mut statement = self.0.prepare_cached(sql)?;
        let columns = statement.column_count();
        let mut rows = statement.query(params_from_iter(args.iter()))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let values = (0..columns)
                .map(|index| row.get_ref(index).map(value_of))
                .collect::<Result<_, _>>()?;
            out.push(Row(values));
        }
        Ok(out)
    }
}

fn value_of(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(n) => Value::Int(n),
        ValueRef::Real(x) => Value::Real(x),
        ValueRef::Text(text) => Value::Text(String::from_utf8_lossy(text).into_owned()),
        ValueRef::Blob(bytes) => Value::Blob(bytes.to_vec()),
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(n) => ValueRef::Integer(*n),
            Value::Real(x) => ValueRef::Real(*x),
            Value::Text(text) => ValueRef::Text(text.as_bytes()),
            Value::Blob(bytes) => ValueRef::Blob(bytes),
        }))
    }
}

/// Finished jobs per outcome, read from the file at `path` (for summaries).
pub fn outcome_counts(path: &Path) -> Result<Vec<(String, i64)>, AuditError> {
    let connection = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|source| AuditError::Open {
            path: path.to_owned(),
            source,
        })?;
    super::jobs::outcome_counts(&mut Lite(&connection))
}
