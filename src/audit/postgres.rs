//! The PostgreSQL store: one database for any number of workers on any hosts.
//!
//! The client is the `postgres` crate, the blocking face of `tokio-postgres`: the writer thread
//! ([`super::writer`]) is a plain thread that owns its connection, exactly as it owns SQLite's,
//! so the store's logic is one body of code for both. Every write transaction first takes one
//! transaction-scoped advisory lock: writes of the whole fleet run one at a time, as they do on
//! a SQLite file, so a read-then-write inside a transaction (a rollout's counts, a claim) sees
//! no other writer between its read and its write. Group commit keeps that cheap: a worker's
//! waiting writes share one transaction.
//!
//! A dropped connection is opened again on the next command (at most once a second); the
//! commands in between fail, and the pipeline holds their jobs until the store answers.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use postgres::types::{IsNull, ToSql, Type};
use postgres::{Client, GenericClient, NoTls, Statement};

use super::db::{Db, Dialect, POSTGRES_NOW_MS, Row, Value, numbered_dollars};
use super::writer::{self, Backend};
use super::{AuditError, Command};

/// Versioned schema files, the same versions as SQLite's, the same in meaning.
pub(super) const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_init",
        include_str!("../../migrations/postgres/0001_init.sql"),
    ),
    (
        "0002_toggles_by_job",
        include_str!("../../migrations/postgres/0002_toggles_by_job.sql"),
    ),
    (
        "0003_job_keys_and_parking",
        include_str!("../../migrations/postgres/0003_job_keys_and_parking.sql"),
    ),
    (
        "0004_rollouts",
        include_str!("../../migrations/postgres/0004_rollouts.sql"),
    ),
    (
        "0005_heartbeat",
        include_str!("../../migrations/postgres/0005_heartbeat.sql"),
    ),
    (
        "0006_leases",
        include_str!("../../migrations/postgres/0006_leases.sql"),
    ),
    (
        "0007_rate_buckets",
        include_str!("../../migrations/postgres/0007_rate_buckets.sql"),
    ),
];

/// The advisory lock every write transaction takes (any constant; "keyturn" in ASCII).
const WRITE_LOCK: i64 = 0x006b_6579_7475_726e;
/// The advisory lock migrations run under, so workers starting together migrate once.
const MIGRATE_LOCK: i64 = WRITE_LOCK + 1;
/// The advisory lock token takes run under: they touch only `rate_buckets`, so they need not
/// wait for the audit's writes.
const TOKEN_LOCK: i64 = WRITE_LOCK + 2;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A session idle inside a transaction this long is ended by the server (it holds the lock).
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(30);
/// The longest a write transaction waits for the write lock before it fails (and is retried).
const LOCK_TIMEOUT: &str = "60s";
/// After a failed connection attempt, commands fail at once for this long.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The audit's writes, under [`WRITE_LOCK`]; migrates the store when it connects.
    Writes,
    /// Lookups and other reads.
    Reads,
    /// Rate-limit token takes, under [`TOKEN_LOCK`], committed without waiting for the flush:
    /// a bucket's last takes lost in a crash of the server cost at most a burst.
    Tokens,
}

/// The store's threads, each with a connection of its own.
pub(super) struct Threads {
    pub writes: mpsc::Sender<Command>,
    pub reads: mpsc::Sender<Command>,
    pub tokens: mpsc::Sender<Command>,
}

/// Connects, migrates and starts the writer, reader and token threads. The connections are made
/// on those threads: the blocking client runs a runtime of its own, which cannot start inside
/// the worker's.
pub(super) fn start(url: &str) -> Result<Threads, AuditError> {
    Ok(Threads {
        writes: spawn(url, "keyturn-store", Role::Writes)?,
        reads: spawn(url, "keyturn-store-read", Role::Reads)?,
        tokens: spawn(url, "keyturn-store-tokens", Role::Tokens)?,
    })
}

fn spawn(url: &str, name: &str, role: Role) -> Result<mpsc::Sender<Command>, AuditError> {
    let url = url.to_owned();
    let (ready, opened) = mpsc::channel();
    let commands = writer::spawn_with(name, move || {
        let opened = Postgres::connect(&url).and_then(|mut backend| {
            backend.role = role;
            if role == Role::Writes {
                migrate(backend.client()?)?;
            }
            Ok(backend)
        });
        match opened {
            Ok(backend) => {
                let _ = ready.send(Ok(()));
                Some(backend)
            }
            Err(error) => {
                let _ = ready.send(Err(error));
                None
            }
        }
    });
    opened
        .recv()
        .map_err(|_| AuditError::Closed)?
        .map(|()| commands)
}

/// Opens a connection for the audit queries (on the caller's thread, which must not run an
/// async runtime).
pub(super) fn connect_reader(url: &str) -> Result<Postgres, AuditError> {
    let mut backend = Postgres::connect(url)?;
    let applied = applied_versions(backend.client()?)?;
    super::refuse_unknown_versions(&applied, MIGRATIONS)?;
    Ok(backend)
}

fn applied_versions(client: &mut Client) -> Result<Vec<String>, AuditError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .map_err(error)?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    Ok(client
        .query("SELECT version FROM schema_migrations", &[])
        .map_err(error)?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

/// Applies pending migrations, each in its own transaction, under a session advisory lock.
fn migrate(client: &mut Client) -> Result<(), AuditError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
        .map_err(error)?;
    let result = (|| {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version TEXT PRIMARY KEY, applied_at TEXT NOT NULL)",
            )
            .map_err(error)?;
        let applied = applied_versions(client)?;
        super::refuse_unknown_versions(&applied, MIGRATIONS)?;
        for (version, sql) in MIGRATIONS {
            if applied.iter().any(|a| a == version) {
                continue;
            }
            let mut tx = client.transaction().map_err(error)?;
            tx.batch_execute(sql).map_err(error)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[version, &super::timestamp(chrono::Utc::now())],
            )
            .map_err(error)?;
            tx.commit().map_err(error)?;
        }
        Ok(())
    })();
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK])
        .map_err(error)?;
    result
}

/// A connection to the store, opened again when it drops.
pub(super) struct Postgres {
    url: String,
    client: Option<Client>,
    statements: HashMap<String, Statement>,
    role: Role,
    /// When the last connection attempt failed, and how.
    failed_at: Option<(Instant, Failure)>,
}

/// Why a connection could not be made.
#[derive(Clone)]
enum Failure {
    /// No answer (refused, timed out, name unknown): the server may come back.
    Unreachable(String),
    /// The server answered no (a password, a database that does not exist).
    Refused(String),
}

impl Failure {
    fn error(&self) -> AuditError {
        match self {
            Failure::Unreachable(problem) => AuditError::Unreachable(problem.clone()),
            Failure::Refused(problem) => AuditError::Postgres(problem.clone()),
        }
    }
}

impl Postgres {
    fn connect(url: &str) -> Result<Postgres, AuditError> {
        let mut backend = Postgres {
            url: url.to_owned(),
            client: None,
            statements: HashMap::new(),
            role: Role::Reads,
            failed_at: None,
        };
        backend.client()?;
        Ok(backend)
    }

    /// The open connection, or a new one.
    fn client(&mut self) -> Result<&mut Client, AuditError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            if let Some((at, failure)) = &self.failed_at
                && at.elapsed() < RECONNECT_PAUSE
            {
                return Err(failure.error());
            }
            let super::postgres_tls::Target { mut config, tls } =
                super::postgres_tls::parse(&self.url)
                    .map_err(|problem| AuditError::Postgres(format!("store.url {problem}")))?;
            config.connect_timeout(CONNECT_TIMEOUT);
            config.application_name("keyturn");
            // A worker cut off mid-transaction would hold the write lock until TCP noticed
            // (hours, by default): the server ends such a session, and keepalives notice a dead
            // peer within a minute.
            config.keepalives(true);
            config.keepalives_idle(Duration::from_secs(30));
            let options = format!(
                "{} -c idle_in_transaction_session_timeout={}",
                config.get_options().unwrap_or_default(),
                IDLE_IN_TRANSACTION.as_millis()
            );
            config.options(options.trim());
            let refused = |error: postgres::Error| {
                let problem = describe(&error);
                if error.as_db_error().is_some() {
                    Failure::Refused(problem)
                } else {
                    Failure::Unreachable(problem)
                }
            };
            let connected = match tls.map(|tls| tls.connector()) {
                None => config.connect(NoTls).map_err(refused),
                Some(Ok(connector)) => config.connect(connector).map_err(refused),
                // The certificates named went missing since the start: hold, as for a server
                // that does not answer, until the file is back.
                Some(Err(problem)) => Err(Failure::Unreachable(format!("store.url {problem}"))),
            };
            match connected {
                Ok(client) => {
                    self.client = Some(client);
                    self.statements.clear();
                    self.failed_at = None;
                }
                Err(failure) => {
                    let error = failure.error();
                    self.failed_at = Some((Instant::now(), failure));
                    return Err(error);
                }
            }
        }
        Ok(self.client.as_mut().expect("connected above"))
    }
}

/// The words for a `store.url` that does not parse: never the text itself, which may hold a
/// password.
pub const NOT_A_POSTGRES_URL: &str =
    "is not a PostgreSQL URL (postgres://user:password@host:port/database)";

impl Backend for Postgres {
    fn write<T>(
        &mut self,
        work: impl FnOnce(&mut dyn Db) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        let (lock, durability) = match self.role {
            Role::Tokens => (TOKEN_LOCK, "SET LOCAL synchronous_commit = off;"),
            Role::Writes | Role::Reads => (WRITE_LOCK, ""),
        };
        // Read committed (pinned, whatever the server's default): each statement sees what
        // the transactions before the lock committed. The transaction's start, its settings,
        // the lock and the clock once the lock is held go in one round trip; the transaction's
        // writes (a batch of them) take that clock as their `now_ms`.
        let begin = format!(
            "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; {durability} SELECT pg_advisory_xact_lock({lock}); {POSTGRES_NOW_MS}"
        );
        self.transaction(&begin, true, work)
    }

    /// One snapshot for all of `work`'s statements (a lookup with a rollout reads several
    /// tables).
    fn read<T>(
        &mut self,
        work: impl FnOnce(&mut dyn Db) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        self.transaction(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            false,
            work,
        )
    }

    fn read_statement<T>(
        &mut self,
        work: impl FnOnce(&mut dyn Db) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        self.with(work)
    }
}

impl Postgres {
    /// Runs `begin` (which opens a transaction, and may set it up), then `work`; commits if
    /// `work` returns `Ok`, and rolls back otherwise. With `clocked`, `begin`'s last statement
    /// reads the clock (as [`POSTGRES_NOW_MS`]), and `work`'s `now_ms` is that reading.
    fn transaction<T>(
        &mut self,
        begin: &str,
        clocked: bool,
        work: impl FnOnce(&mut dyn Db) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        self.client()?;
        let client = self.client.as_mut().expect("connected");
        let result = client
            .simple_query(begin)
            .map_err(error)
            .and_then(|answers| {
                if clocked {
                    clock_of(&answers).map(Some)
                } else {
                    Ok(None)
                }
            })
            .and_then(|clock| {
                work(&mut Pg {
                    client: &mut *client,
                    statements: &mut self.statements,
                    clock,
                })
            });
        match result {
            Ok(value) => {
                client.batch_execute("COMMIT").map_err(error)?;
                Ok(value)
            }
            Err(failure) => {
                // A connection that cannot even roll back is dropped and opened anew next time:
                // it must not carry a transaction over into the next command.
                if client.batch_execute("ROLLBACK").is_err() {
                    self.client = None;
                }
                Err(failure)
            }
        }
    }
}

impl Postgres {
    /// Runs `work` on the connection outside any transaction (for a lookup that is one
    /// statement, and for the audit queries, whose verification opens and rolls back one of
    /// its own).
    pub(super) fn with<T>(
        &mut self,
        work: impl FnOnce(&mut dyn Db) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        self.client()?;
        let client = self.client.as_mut().expect("connected");
        work(&mut Pg {
            client,
            statements: &mut self.statements,
            clock: None,
        })
    }
}

/// The value of the last row among a simple query's answers: the clock `begin` read.
fn clock_of(answers: &[postgres::SimpleQueryMessage]) -> Result<i64, AuditError> {
    answers
        .iter()
        .rev()
        .find_map(|answer| match answer {
            postgres::SimpleQueryMessage::Row(row) => row.get(0),
            _ => None,
        })
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| AuditError::Store("the store's clock was not read".into()))
}

/// A connection or transaction as a [`Db`], with statements prepared once per connection.
struct Pg<'a, C: GenericClient> {
    client: &'a mut C,
    statements: &'a mut HashMap<String, Statement>,
    /// The server's clock as read when the transaction took its lock (`now_ms` answers it).
    clock: Option<i64>,
}

impl<C: GenericClient> Pg<'_, C> {
    fn statement(&mut self, sql: &str) -> Result<Statement, AuditError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(&numbered_dollars(sql)).map_err(error)?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }
}

fn bound(args: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter().map(|arg| arg as &(dyn ToSql + Sync)).collect()
}

impl<C: GenericClient> Db for Pg<'_, C> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64, AuditError> {
        let statement = self.statement(sql)?;
        self.client.execute(&statement, &bound(args)).map_err(error)
    }

    fn now_ms(&mut self) -> Result<i64, AuditError> {
        match self.clock {
            Some(ms) => Ok(ms),
            None => self.query_one(POSTGRES_NOW_MS, &[])?.get(0),
        }
    }

    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, AuditError> {
        let statement = self.statement(sql)?;
        let rows = self.client.query(&statement, &bound(args)).map_err(error)?;
        rows.iter()
            .map(|row| {
                (0..row.len())
                    .map(|index| row.try_get::<_, Value>(index).map_err(error))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Row)
            })
            .collect()
    }
}

/// The server's own words for a failed statement, or the client's for a failed connection;
/// neither includes the URL.
fn describe(failure: &postgres::Error) -> String {
    if let Some(db) = failure.as_db_error() {
        return format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
    }
    // The crate's words name the step ("error performing TLS handshake"); its causes say why
    // (an untrusted certificate, a refused connection).
    let mut words = failure.to_string();
    let mut cause = std::error::Error::source(failure);
    while let Some(error) = cause {
        let said = error.to_string();
        if !words.contains(&said) {
            words = format!("{words}: {said}");
        }
        cause = error.source();
    }
    words
}

fn error(failure: postgres::Error) -> AuditError {
    AuditError::Postgres(describe(&failure))
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(n) => match *ty {
                Type::INT8 => n.to_sql(ty, out),
                Type::INT4 => i32::try_from(*n)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*n)?.to_sql(ty, out),
                Type::BOOL => (*n != 0).to_sql(ty, out),
                Type::FLOAT8 => (*n as f64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => n.to_string().to_sql(ty, out),
                _ => Err(format!("an integer cannot be bound as {ty}").into()),
            },
            Value::Real(x) => match *ty {
                Type::FLOAT8 => x.to_sql(ty, out),
                Type::FLOAT4 => (*x as f32).to_sql(ty, out),
                _ => Err(format!("a real cannot be bound as {ty}").into()),
            },
            // PostgreSQL text cannot hold NUL, which SQLite keeps: it is stored as U+FFFD
            // rather than failing the record (the event JSON escapes it and keeps it).
            Value::Text(_)
                if !matches!(*ty, Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME) =>
            {
                Err(format!("text cannot be bound as {ty}").into())
            }
            Value::Text(text) if text.contains('\0') => {
                text.replace('\0', "\u{fffd}").to_sql(ty, out)
            }
            Value::Text(text) => text.as_str().to_sql(ty, out),
            Value::Blob(bytes) => bytes.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

impl<'a> postgres::types::FromSql<'a> for Value {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Value, Box<dyn std::error::Error + Sync + Send>> {
        Ok(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)?.into()),
            Type::BOOL => Value::Int(bool::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Value::Real(f32::from_sql(ty, raw)?.into()),
            Type::BYTEA => Value::Blob(raw.to_vec()),
            Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR => {
                Value::Text(String::from_sql(ty, raw)?)
            }
            _ => return Err(format!("a column of type {ty} is not read by keyturn").into()),
        })
    }

    fn from_sql_null(_: &Type) -> Result<Value, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Value::Null)
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}
