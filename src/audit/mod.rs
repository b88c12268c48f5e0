//! The store: an append-only audit with one `toggles` row per finished job and an `attempts`
//! row per HTTP call; beside it the work in progress that makes redeliveries safe (`in_flight`
//! markers), the jobs parked until they can run (`parked`) and the rollouts.
//!
//! This module is the store's interface: plain values in and out, no SQL. Two stores answer it:
//! a SQLite file ([`sqlite`], the default, one host) and a PostgreSQL database ([`postgres`],
//! any number of workers). The logic is written once against [`db::Db`] ([`jobs`],
//! [`rollouts`]); a thread per worker owns the connection and commits every waiting write in one
//! transaction (group commit, [`writer`]), so a durable commit costs one flush per batch rather
//! than per job. The schemas come from `migrations/` and `migrations/postgres/`.

mod buckets;
pub mod db;
mod jobs;
pub mod postgres;
mod postgres_tls;
pub mod query;
mod rollouts;
mod sqlite;
#[doc(hidden)]
pub mod test_support;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::sync::oneshot;

use crate::events::ResultEvent;
use crate::rollout::{Command as RolloutCommand, Reply, Rollout, Snapshot};

pub use buckets::Bucket;
pub use rollouts::Effect;
pub use sqlite::outcome_counts;

/// Where the store is.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file (`audit.path`).
    Sqlite(PathBuf),
    /// A PostgreSQL database (`store.url`); the URL may hold a password, so it is never shown.
    Postgres(String),
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Location {
    /// Words for logs: the file's path, or the database's host and name without credentials.
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(path) => path.display().to_string(),
            Location::Postgres(url) => match postgres_tls::parse(url) {
                Ok(postgres_tls::Target { config, tls }) => {
                    let hosts: Vec<String> = config
                        .get_hosts()
                        .iter()
                        .map(|host| match host {
                            ::postgres::config::Host::Tcp(name) => name.clone(),
                            ::postgres::config::Host::Unix(path) => path.display().to_string(),
                        })
                        .collect();
                    format!(
                        "postgres database {} on {}{}",
                        config.get_dbname().unwrap_or("(default)"),
                        hosts.join(","),
                        if tls.is_some() { " over TLS" } else { "" }
                    )
                }
                Err(_) => "postgres database (unreadable URL)".into(),
            },
        }
    }
}

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
    #[error("store (PostgreSQL): {0}")]
    Postgres(String),
    #[error("store: {0}")]
    Store(String),
    #[error("store (PostgreSQL) cannot be reached: {0}")]
    Unreachable(String),
    #[error(
        "the store's schema has version {found}, which this keyturn does not know (it knows up to {known}): a newer keyturn migrated it; run that version"
    )]
    SchemaTooNew { found: String, known: String },
}

/// Refuses a store holding a migration this build does not have.
pub(crate) fn refuse_unknown_versions(
    applied: &[String],
    known: &[(&str, &str)],
) -> Result<(), AuditError> {
    match applied
        .iter()
        .find(|version| !known.iter().any(|(k, _)| k == version))
    {
        Some(found) => Err(AuditError::SchemaTooNew {
            found: found.clone(),
            known: known.last().map_or("-", |(k, _)| k).to_owned(),
        }),
        None => Ok(()),
    }
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
    /// What a valid job asked for ([`crate::job::Job::digest`]); `None` for rejections.
    pub job_digest: Option<String>,
    pub worker_id: String,
    /// The worker process whose lease on the key the record drops (see [`ClaimRequest::owner`]).
    pub lease_owner: String,
    pub attempts: Vec<AttemptRecord>,
    /// Whether the outcome counts toward the job's rollout (not for the rejection of a reused
    /// key: the job's own outcome stands).
    pub counts_for_rollout: bool,
}

/// An event as stored: the exact JSON bytes (published as they are on every replay) and the
/// event they decode to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub event: ResultEvent,
    pub json: String,
}

impl StoredEvent {
    pub fn new(event: ResultEvent) -> StoredEvent {
        let json = event.to_json();
        StoredEvent { event, json }
    }

    fn parse(json: String) -> Result<StoredEvent, AuditError> {
        Ok(StoredEvent {
            event: serde_json::from_str(&json)?,
            json,
        })
    }
}

/// When a job key was first seen, and what it asked for then (`None`: not known, older rows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub digest: Option<String>,
    pub at: String,
}

impl Seen {
    /// The key was seen asking for something other than `digest`: it is being reused.
    pub fn other_body(&self, digest: &str) -> bool {
        self.digest.as_deref().is_some_and(|seen| seen != digest)
    }
}

/// What the store knows of a job key before a delivery of it is worked on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Earlier {
    /// The final (not rejected) record of this (job_id, rerun).
    pub final_record: Option<(StoredEvent, Seen)>,
    /// The rejection of these very bytes, under this job id.
    pub rejection: Option<StoredEvent>,
    /// An in-flight marker: a Modify of this key may have gone out.
    pub marker: Option<Seen>,
    /// The key is parked.
    pub parked: Option<Seen>,
    /// The job's rollout, when it names one that the store knows.
    pub rollout: Option<RolloutView>,
}

/// What a job's admission needs of its rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutView {
    pub rollout: Rollout,
    pub declared: bool,
    pub max_per_second: Option<u32>,
}

/// A failed job of a rollout, as its final row describes it (for `retry_failed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedJob {
    pub job_id: String,
    pub rerun: u32,
    pub rollout_id: Option<String>,
    pub ticket: Option<String>,
    pub region: Option<String>,
    pub project_id: Option<String>,
    pub instance_id: Option<String>,
    pub requested_status: Option<String>,
    pub kms_key_id: Option<String>,
    pub requested_by: Option<String>,
}

/// A rollout event waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEvent {
    pub id: i64,
    pub kind: String,
    pub event_id: String,
    pub json: String,
}

/// What committing a final record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub recorded: Recorded,
    /// A rollout whose parked jobs may run now (its canary passed).
    pub release: Option<String>,
}

/// What recording did: a new row, or the row an earlier delivery of the same job left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    New(StoredEvent),
    Existing(StoredEvent),
}

impl Recorded {
    pub fn into_stored(self) -> StoredEvent {
        match self {
            Recorded::New(stored) | Recorded::Existing(stored) => stored,
        }
    }
}

/// A delivery kept in the store until its scope can run again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedJob {
    /// Row id; 0 for a job not stored yet.
    pub id: i64,
    pub job_id: String,
    pub rerun: u32,
    pub job_digest: String,
    pub rollout_id: Option<String>,
    /// What must open for the job to run again: `credentials`, `region:<id>`.
    pub scope: String,
    pub reason: String,
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub content_type: Option<String>,
    pub parked_at: DateTime<Utc>,
    /// How often the key was parked again while parked (see migration 0003).
    pub generation: i64,
}

enum Command {
    Lookup {
        job_id: String,
        rerun: u32,
        body_sha256: String,
        rollout_id: Option<String>,
        reply: oneshot::Sender<Result<Earlier, AuditError>>,
    },
    Snapshots {
        rollout_id: Option<String>,
        reply: oneshot::Sender<Result<Vec<Snapshot>, AuditError>>,
    },
    FailedJobs {
        rollout_id: String,
        reply: oneshot::Sender<Result<Vec<FailedJob>, AuditError>>,
    },
    ParkedScopes {
        reply: oneshot::Sender<Result<Vec<(String, u64)>, AuditError>>,
    },
    Parked {
        scope: String,
        limit: u32,
        reply: oneshot::Sender<Result<Vec<ParkedJob>, AuditError>>,
    },
    OutcomeCounts {
        reply: oneshot::Sender<Result<Vec<(String, i64)>, AuditError>>,
    },
    RolloutState {
        rollout_id: String,
        reply: oneshot::Sender<Result<Option<crate::rollout::State>, AuditError>>,
    },
    Write {
        write: Write,
        reply: oneshot::Sender<Result<Written, AuditError>>,
    },
}

enum Write {
    Record(Box<FinalRecord>),
    Claim(Box<ClaimRequest>),
    TakeTokens(Vec<Bucket>),
    PauseBucket(Bucket, Duration),
    ReleasePredecessors {
        worker_id: String,
        owner: String,
    },
    Renew {
        owner: String,
        active: Vec<(String, u32)>,
        released: Vec<(String, u32)>,
        lease: Duration,
    },
    /// The job, and the owner whose lease on it the park drops.
    Park(Box<ParkedJob>, String),
    /// Drops the in-flight marker of a key whose lease `owner` holds: its Modify was not sent.
    Unmark {
        job_id: String,
        rerun: u32,
        owner: String,
    },
    Unpark(Vec<(i64, i64)>),
    AdmitCanary {
        rollout_id: String,
        job_id: String,
        rerun: u32,
    },
    Apply {
        command_id: Option<String>,
        command: Box<RolloutCommand>,
        worker_id: String,
    },
    CommandDone {
        command_id: String,
        command: Box<RolloutCommand>,
    },
    ClaimEvents {
        worker_id: String,
        limit: u32,
    },
    Published(Vec<i64>),
    /// A write transaction that changes nothing: can the store take writes?
    Ping,
}

/// A claim on a job key before an API call for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    pub job_id: String,
    pub rerun: u32,
    /// What the job asks for ([`crate::job::Job::digest`]).
    pub digest: String,
    pub worker_id: String,
    /// The worker process asking: its worker id and a token of this run of it.
    pub owner: String,
    pub rollout_id: Option<String>,
    /// `region/project/instance`: no two workers hold a lease on one instance.
    pub instance: String,
    /// Also write the in-flight marker: a Modify is about to go out.
    pub mark: bool,
    pub lease: Duration,
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The lease is this worker's until renewed or dropped. `marker` is the in-flight marker as
    /// stored, the first delivery's if an earlier one wrote it; `marked_now` when this claim
    /// wrote it.
    Leased {
        marker: Option<Seen>,
        marked_now: bool,
    },
    /// Another worker holds a live lease on the job or on its instance: wait.
    Busy { owner: String, job_id: String },
    /// The job has its final record now (another worker finished it): replay that, unless it
    /// was for another body (its `Seen` digest differs).
    Finished(Box<(StoredEvent, Seen)>),
    /// The job's rollout stopped since the job was admitted: no marker was written.
    RolloutStopped(crate::rollout::State),
}

enum Written {
    Recorded(Box<Committed>),
    Claimed(Claimed),
    Renewed(Vec<(String, u32)>),
    Tokens(Option<Duration>),
    Released(u64),
    Admitted(bool),
    Applied(Box<(Reply, Effect)>),
    Events(Vec<PendingEvent>),
    Done,
}

/// Handle to the audit log; cheap to clone.
#[derive(Clone)]
pub struct AuditStore {
    /// The writer thread: every write, in group commits.
    writes: mpsc::Sender<Command>,
    /// The reader thread, on a connection of its own: lookups never queue behind a commit.
    reads: mpsc::Sender<Command>,
    /// Where rate-limit token takes go: a thread of their own on PostgreSQL, the writer on SQLite.
    tokens: mpsc::Sender<Command>,
    location: Location,
}

/// How the file is opened.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    pub busy_timeout: Duration,
    pub synchronous_full: bool,
}

impl AuditStore {
    /// Opens (creating if needed) the SQLite file, applies pending migrations and starts the
    /// writer.
    pub fn open(path: &Path, options: &AuditOptions) -> Result<AuditStore, AuditError> {
        AuditStore::open_at(&Location::Sqlite(path.to_owned()), options)
    }

    /// Opens the store at `location`: migrates it (refusing a schema newer than this build) and
    /// starts the writer.
    pub fn open_at(location: &Location, options: &AuditOptions) -> Result<AuditStore, AuditError> {
        let (writes, reads, tokens) = match location {
            Location::Sqlite(path) => {
                let (writes, reads) = sqlite::start(path, options)?;
                (writes.clone(), reads, writes)
            }
            Location::Postgres(url) => {
                let threads = postgres::start(url)?;
                (threads.writes, threads.reads, threads.tokens)
            }
        };
        Ok(AuditStore {
            writes,
            reads,
            tokens,
            location: location.clone(),
        })
    }

    /// The SQLite file's path (a PostgreSQL store has none).
    pub fn path(&self) -> &Path {
        match &self.location {
            Location::Sqlite(path) => path,
            Location::Postgres(_) => Path::new(""),
        }
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Finished jobs per outcome.
    pub async fn outcome_counts(&self) -> Result<Vec<(String, i64)>, AuditError> {
        self.ask(|reply| Command::OutcomeCounts { reply }).await
    }

    /// Drops the in-flight marker that `owner` wrote under its lease on (`job_id`, `rerun`), when
    /// the Modify it announced was never sent (the job was parked, held too long or shut down,
    /// or its rollout stopped, before its call).
    pub async fn unmark(&self, job_id: &str, rerun: u32, owner: &str) -> Result<(), AuditError> {
        self.write(Write::Unmark {
            job_id: job_id.to_owned(),
            rerun,
            owner: owner.to_owned(),
        })
        .await
        .map(|_| ())
    }

    /// The rollout's state now; `None` for a rollout the store does not know.
    pub async fn rollout_state(
        &self,
        rollout_id: &str,
    ) -> Result<Option<crate::rollout::State>, AuditError> {
        self.ask(|reply| Command::RolloutState {
            rollout_id: rollout_id.to_owned(),
            reply,
        })
        .await
    }

    /// What the store holds about (`job_id`, `rerun`), about these body bytes, and about the
    /// job's rollout.
    pub async fn lookup(
        &self,
        job_id: &str,
        rerun: u32,
        body_sha256: &str,
        rollout_id: Option<&str>,
    ) -> Result<Earlier, AuditError> {
        self.ask(|reply| Command::Lookup {
            job_id: job_id.to_owned(),
            rerun,
            body_sha256: body_sha256.to_owned(),
            rollout_id: rollout_id.map(str::to_owned),
            reply,
        })
        .await
    }

    /// Commits `record` durably, counting it toward its rollout in the same transaction; if the
    /// job already has a final row, returns that one instead.
    pub async fn record(&self, record: FinalRecord) -> Result<Committed, AuditError> {
        match self.write(Write::Record(Box::new(record))).await? {
            Written::Recorded(committed) => Ok(*committed),
            _ => unreachable!("a record write answers Recorded"),
        }
    }

    /// Takes one of the rollout's canary places for the key; false when none is left.
    pub async fn admit_canary(
        &self,
        rollout_id: &str,
        job_id: &str,
        rerun: u32,
    ) -> Result<bool, AuditError> {
        let write = Write::AdmitCanary {
            rollout_id: rollout_id.to_owned(),
            job_id: job_id.to_owned(),
            rerun,
        };
        match self.write(write).await? {
            Written::Admitted(admitted) => Ok(admitted),
            _ => unreachable!("an admission answers Admitted"),
        }
    }

    /// Applies a control command once per `command_id` (a retry_failed is only recorded by
    /// [`AuditStore::command_done`], once its jobs are republished).
    pub async fn apply(
        &self,
        command_id: Option<&str>,
        command: &RolloutCommand,
        worker_id: &str,
    ) -> Result<(Reply, Effect), AuditError> {
        let write = Write::Apply {
            command_id: command_id.map(str::to_owned),
            command: Box::new(command.clone()),
            worker_id: worker_id.to_owned(),
        };
        match self.write(write).await? {
            Written::Applied(applied) => Ok(*applied),
            _ => unreachable!("a command answers Applied"),
        }
    }

    pub async fn command_done(
        &self,
        command_id: &str,
        command: &RolloutCommand,
    ) -> Result<(), AuditError> {
        let write = Write::CommandDone {
            command_id: command_id.to_owned(),
            command: Box::new(command.clone()),
        };
        self.write(write).await.map(|_| ())
    }

    /// Snapshots of one rollout, or of every rollout.
    pub async fn snapshots(&self, rollout_id: Option<&str>) -> Result<Vec<Snapshot>, AuditError> {
        self.ask(|reply| Command::Snapshots {
            rollout_id: rollout_id.map(str::to_owned),
            reply,
        })
        .await
    }

    /// The jobs of a rollout whose latest run failed.
    pub async fn failed_jobs(&self, rollout_id: &str) -> Result<Vec<FailedJob>, AuditError> {
        self.ask(|reply| Command::FailedJobs {
            rollout_id: rollout_id.to_owned(),
            reply,
        })
        .await
    }

    /// Claims rollout events to publish.
    pub async fn claim_events(
        &self,
        worker_id: &str,
        limit: u32,
    ) -> Result<Vec<PendingEvent>, AuditError> {
        let write = Write::ClaimEvents {
            worker_id: worker_id.to_owned(),
            limit,
        };
        match self.write(write).await? {
            Written::Events(events) => Ok(events),
            _ => unreachable!("a claim of events answers Events"),
        }
    }

    /// Rewrites the heartbeat row: succeeds once the store takes writes.
    pub async fn ping(&self) -> Result<(), AuditError> {
        self.write(Write::Ping).await.map(|_| ())
    }

    /// Marks rollout events published.
    pub async fn events_published(&self, ids: Vec<i64>) -> Result<(), AuditError> {
        self.write(Write::Published(ids)).await.map(|_| ())
    }

    /// Claims the job key and its instance for this worker before an API call (and, with
    /// `mark`, durably notes that a Modify is about to go out, unless an earlier delivery did).
    /// A job whose rollout was paused, halted or cancelled meanwhile is not marked.
    ///
    /// The claim is queued to the writer when this is called, not when the future is first
    /// polled: a caller that orders it against a renewal under a lock gets that order.
    pub fn claim(
        &self,
        request: ClaimRequest,
    ) -> impl std::future::Future<Output = Result<Claimed, AuditError>> + use<> {
        let queued = self.queue_write(Write::Claim(Box::new(request)));
        async move {
            match queued?.await.map_err(|_| AuditError::Closed)?? {
                Written::Claimed(claimed) => Ok(claimed),
                _ => unreachable!("a claim answers Claimed"),
            }
        }
    }

    /// Drops the leases of earlier runs of `worker_id` (any owner `<worker_id>/…` but `owner`);
    /// returns how many. A worker id must name one running worker at a time.
    pub async fn release_predecessors(
        &self,
        worker_id: &str,
        owner: &str,
    ) -> Result<u64, AuditError> {
        let write = Write::ReleasePredecessors {
            worker_id: worker_id.to_owned(),
            owner: owner.to_owned(),
        };
        match self.write(write).await? {
            Written::Released(count) => Ok(count),
            _ => unreachable!("a release answers Released"),
        }
    }

    /// Takes one token of each bucket for an API call, all or none; `Some(wait)`: one is short
    /// for about `wait`.
    pub async fn take_tokens(&self, buckets: Vec<Bucket>) -> Result<Option<Duration>, AuditError> {
        match self.token_write(Write::TakeTokens(buckets)).await? {
            Written::Tokens(wait) => Ok(wait),
            _ => unreachable!("a take of tokens answers Tokens"),
        }
    }

    /// Empties `bucket` for `pause`, for every worker on the store: the API answered 429 for
    /// its project.
    pub async fn pause_bucket(&self, bucket: Bucket, pause: Duration) -> Result<(), AuditError> {
        self.token_write(Write::PauseBucket(bucket, pause))
            .await
            .map(|_| ())
    }

    /// A write of the rate buckets, on the thread of token takes.
    async fn token_write(&self, write: Write) -> Result<Written, AuditError> {
        let (reply, answer) = oneshot::channel();
        self.tokens
            .send(Command::Write { write, reply })
            .map_err(|_| AuditError::Closed)?;
        answer.await.map_err(|_| AuditError::Closed)?
    }

    /// Renews `owner`'s leases on `active` keys and drops those on `released` ones; returns
    /// the active keys whose lease is gone (expired and taken, or dropped by a final record).
    /// Queued when called, like [`AuditStore::claim`].
    pub fn renew_leases(
        &self,
        owner: &str,
        active: Vec<(String, u32)>,
        released: Vec<(String, u32)>,
        lease: Duration,
    ) -> impl std::future::Future<Output = Result<Vec<(String, u32)>, AuditError>> + use<> {
        let queued = self.queue_write(Write::Renew {
            owner: owner.to_owned(),
            active,
            released,
            lease,
        });
        async move {
            match queued?.await.map_err(|_| AuditError::Closed)?? {
                Written::Renewed(lost) => Ok(lost),
                _ => unreachable!("a renewal answers Renewed"),
            }
        }
    }

    /// Stores `job` until its scope reopens (a second park of the same key keeps the first),
    /// dropping `lease_owner`'s lease on it.
    pub async fn park(&self, job: ParkedJob, lease_owner: &str) -> Result<(), AuditError> {
        self.write(Write::Park(Box::new(job), lease_owner.to_owned()))
            .await
            .map(|_| ())
    }

    /// Forgets parked rows, given as (id, generation), once they are safely back on the queue;
    /// a row parked again meanwhile has a newer generation and stays.
    pub async fn unpark(&self, ids: Vec<(i64, i64)>) -> Result<(), AuditError> {
        self.write(Write::Unpark(ids)).await.map(|_| ())
    }

    /// Scopes with parked jobs, and how many each.
    pub async fn parked_scopes(&self) -> Result<Vec<(String, u64)>, AuditError> {
        self.ask(|reply| Command::ParkedScopes { reply }).await
    }

    /// The oldest `limit` parked jobs of `scope`.
    pub async fn parked(&self, scope: &str, limit: u32) -> Result<Vec<ParkedJob>, AuditError> {
        self.ask(|reply| Command::Parked {
            scope: scope.to_owned(),
            limit,
            reply,
        })
        .await
    }

    async fn write(&self, write: Write) -> Result<Written, AuditError> {
        self.ask(|reply| Command::Write { write, reply }).await
    }

    /// Puts `write` in the writer's queue now; the answer comes through the receiver.
    fn queue_write(
        &self,
        write: Write,
    ) -> Result<oneshot::Receiver<Result<Written, AuditError>>, AuditError> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(Command::Write { write, reply })
            .map_err(|_| AuditError::Closed)?;
        Ok(answer)
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, AuditError>>) -> Command,
    ) -> Result<T, AuditError> {
        let (reply, answer) = oneshot::channel();
        let command = command(reply);
        let thread = match command {
            Command::Write { .. } => &self.writes,
            _ => &self.reads,
        };
        thread.send(command).map_err(|_| AuditError::Closed)?;
        answer.await.map_err(|_| AuditError::Closed)?
    }
}

/// Checks a `store.url` and the certificates it names; the problem in words that never show the
/// URL, which may hold a password.
pub fn check_store_url(url: &str) -> Result<(), String> {
    postgres_tls::check(url)
}

/// RFC 3339 in UTC with milliseconds: sorts as text, reads as time.
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::db::Dialect;
    use crate::events::{JobResult, Outcome};
    use rusqlite::{Connection, params};
    use test_support::TestDatabase;

    /// A store of a test's own, of either kind, and what must outlive it.
    struct Store {
        audit: AuditStore,
        _dir: tempfile::TempDir,
        db: Option<TestDatabase>,
    }

    impl std::ops::Deref for Store {
        type Target = AuditStore;
        fn deref(&self) -> &AuditStore {
            &self.audit
        }
    }

    fn options() -> AuditOptions {
        AuditOptions {
            busy_timeout: Duration::from_secs(1),
            synchronous_full: true,
        }
    }

    fn store(kind: Dialect) -> Store {
        let dir = tempfile::tempdir().unwrap();
        let db = (kind == Dialect::Postgres).then(|| TestDatabase::create("audit"));
        let location = match &db {
            Some(db) => Location::Postgres(db.url.clone()),
            None => Location::Sqlite(dir.path().join("audit.db")),
        };
        Store {
            audit: AuditStore::open_at(&location, &options()).unwrap(),
            _dir: dir,
            db,
        }
    }

    /// Each test runs on a SQLite file and on a PostgreSQL database.
    macro_rules! on_both_stores {
        ($($name:ident),* $(,)?) => {$(
            mod $name {
                use super::*;
                #[tokio::test]
                async fn sqlite() {
                    super::$name(store(Dialect::Sqlite)).await
                }
                #[tokio::test]
                async fn postgres() {
                    super::$name(store(Dialect::Postgres)).await
                }
            }
        )*};
    }

    on_both_stores!(
        a_second_final_record_of_a_key_returns_the_first_one,
        a_rerun_is_a_key_of_its_own,
        a_rejection_is_found_only_by_its_own_bytes,
        a_claim_keeps_the_first_digest_and_lives_until_the_final_record,
        a_live_lease_keeps_the_job_and_its_instance_from_other_workers,
        an_expired_lease_is_taken_over_and_its_marker_seen,
        a_restarted_worker_drops_only_its_earlier_runs_leases,
        a_bucket_gives_its_burst_then_a_token_per_interval_all_or_none,
        a_paused_bucket_grants_nothing_until_its_pause_is_over,
        parked_jobs_are_kept_once_per_key_until_unparked,
        one_write_that_cannot_commit_fails_alone,
        toggles_and_attempts_refuse_update_and_delete,
        reopening_applies_no_migration_twice,
        a_schema_newer_than_this_build_is_refused,
    );

    fn record(job_id: &str, rerun: u32, outcome: Outcome, digest: &str) -> FinalRecord {
        let data = JobResult {
            job_id: job_id.into(),
            rerun,
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
            job_digest: (outcome != Outcome::Rejected).then(|| format!("job-{digest}")),
            worker_id: "w-1".into(),
            lease_owner: "w-1".into(),
            attempts: vec![AttemptRecord {
                call: "modify",
                started_at: Utc::now(),
                latency_ms: 3,
                http_status: Some(200),
                error_code: None,
                error_msg: None,
                request_id: Some("req-1".into()),
            }],
            counts_for_rollout: true,
        }
    }

    async fn a_second_final_record_of_a_key_returns_the_first_one(audit: Store) {
        let first = audit
            .record(record("J-1", 0, Outcome::Succeeded, "d1"))
            .await
            .unwrap()
            .recorded;
        let second = audit
            .record(record("J-1", 0, Outcome::Succeeded, "d1"))
            .await
            .unwrap()
            .recorded;
        let Recorded::New(first) = first else {
            panic!("first write is new")
        };
        assert_eq!(second, Recorded::Existing(first.clone()));
        let earlier = audit.lookup("J-1", 0, "other", None).await.unwrap();
        let (stored, seen) = earlier.final_record.unwrap();
        assert_eq!(stored, first);
        assert_eq!(seen.digest.as_deref(), Some("job-d1"));
    }

    async fn a_rerun_is_a_key_of_its_own(audit: Store) {
        audit
            .record(record("J-9", 0, Outcome::Failed, "d"))
            .await
            .unwrap();
        assert!(
            audit
                .lookup("J-9", 1, "d", None)
                .await
                .unwrap()
                .final_record
                .is_none()
        );
        let rerun = audit
            .record(record("J-9", 1, Outcome::Succeeded, "d"))
            .await
            .unwrap();
        assert!(matches!(rerun.recorded, Recorded::New(_)));
        let counts = audit.outcome_counts().await.unwrap();
        assert_eq!(
            counts,
            vec![("failed".to_owned(), 1), ("succeeded".to_owned(), 1)],
            "the audit keeps every run"
        );
    }

    async fn a_rejection_is_found_only_by_its_own_bytes(audit: Store) {
        audit
            .record(record("J-2", 0, Outcome::Rejected, "bad"))
            .await
            .unwrap();
        assert!(
            audit
                .lookup("J-2", 0, "bad", None)
                .await
                .unwrap()
                .rejection
                .is_some()
        );
        assert_eq!(
            audit.lookup("J-2", 0, "fixed", None).await.unwrap(),
            Earlier::default()
        );
        let fixed = audit
            .record(record("J-2", 0, Outcome::Succeeded, "fixed"))
            .await
            .unwrap();
        assert!(matches!(fixed.recorded, Recorded::New(_)));
    }

    fn claim_of(job_id: &str, instance: &str, owner: &str, digest: &str) -> ClaimRequest {
        ClaimRequest {
            job_id: job_id.into(),
            rerun: 0,
            digest: digest.into(),
            worker_id: owner.into(),
            owner: owner.into(),
            rollout_id: None,
            instance: instance.into(),
            mark: true,
            lease: Duration::from_secs(30),
        }
    }

    async fn a_claim_keeps_the_first_digest_and_lives_until_the_final_record(audit: Store) {
        assert!(
            audit
                .lookup("J-3", 0, "d", None)
                .await
                .unwrap()
                .marker
                .is_none()
        );
        let first = audit
            .claim(claim_of("J-3", "r/p/i-3", "w-1", "job-d"))
            .await
            .unwrap();
        let again = audit
            .claim(claim_of("J-3", "r/p/i-3", "w-1", "other"))
            .await
            .unwrap();
        let Claimed::Leased {
            marker: Some(first),
            marked_now: true,
        } = first
        else {
            panic!("no rollout, so marked: {first:?}")
        };
        assert_eq!(
            again,
            Claimed::Leased {
                marker: Some(first.clone()),
                marked_now: false
            },
            "the first marker stands"
        );
        assert_eq!(first.digest.as_deref(), Some("job-d"));
        assert!(
            audit
                .lookup("J-3", 0, "d", None)
                .await
                .unwrap()
                .marker
                .is_some()
        );
        audit
            .record(record("J-3", 0, Outcome::Succeeded, "d"))
            .await
            .unwrap();
        assert!(
            audit
                .lookup("J-3", 0, "d", None)
                .await
                .unwrap()
                .marker
                .is_none()
        );
        let after = audit
            .claim(claim_of("J-3", "r/p/i-3", "w-2", "job-d"))
            .await
            .unwrap();
        assert!(
            matches!(after, Claimed::Finished(_)),
            "a claim after the final record replays it: {after:?}"
        );
    }

    async fn a_live_lease_keeps_the_job_and_its_instance_from_other_workers(audit: Store) {
        let leased = audit
            .claim(claim_of("L-1", "r/p/i-1", "w-a", "d"))
            .await
            .unwrap();
        assert!(matches!(leased, Claimed::Leased { .. }), "{leased:?}");
        for other in [
            claim_of("L-1", "r/p/i-1", "w-b", "d"),
            claim_of("L-2", "r/p/i-1", "w-b", "d"),
        ] {
            let busy = audit.claim(other).await.unwrap();
            assert_eq!(
                busy,
                Claimed::Busy {
                    owner: "w-a".into(),
                    job_id: "L-1".into()
                }
            );
        }
        let elsewhere = audit
            .claim(claim_of("L-3", "r/p/i-2", "w-b", "d"))
            .await
            .unwrap();
        assert!(matches!(elsewhere, Claimed::Leased { .. }), "{elsewhere:?}");
        // Renewal keeps a lease; a dropped one frees the instance at once.
        let lost = audit
            .renew_leases(
                "w-a",
                vec![("L-1".into(), 0), ("L-9".into(), 0)],
                vec![],
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        assert_eq!(lost, vec![("L-9".to_owned(), 0)], "only held leases renew");
        audit
            .renew_leases(
                "w-a",
                vec![],
                vec![("L-1".into(), 0)],
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        let next = audit
            .claim(claim_of("L-2", "r/p/i-1", "w-b", "d"))
            .await
            .unwrap();
        assert!(matches!(next, Claimed::Leased { .. }), "{next:?}");
    }

    async fn a_restarted_worker_drops_only_its_earlier_runs_leases(audit: Store) {
        for (job, instance, owner) in [
            ("R-1", "r/p/1", "w-a/old"),
            ("R-2", "r/p/2", "w-a/new"),
            ("R-3", "r/p/3", "w-ab/other"),
        ] {
            let leased = audit
                .claim(claim_of(job, instance, owner, "d"))
                .await
                .unwrap();
            assert!(matches!(leased, Claimed::Leased { .. }), "{leased:?}");
        }
        assert_eq!(
            audit.release_predecessors("w-a", "w-a/new").await.unwrap(),
            1
        );
        let free = audit
            .claim(claim_of("R-1", "r/p/1", "w-b/x", "d"))
            .await
            .unwrap();
        assert!(
            matches!(free, Claimed::Leased { .. }),
            "the old run's lease is gone: {free:?}"
        );
        for (job, instance) in [("R-2", "r/p/2"), ("R-3", "r/p/3")] {
            let busy = audit
                .claim(claim_of(job, instance, "w-b/x", "d"))
                .await
                .unwrap();
            assert!(matches!(busy, Claimed::Busy { .. }), "{job} kept: {busy:?}");
        }
    }

    async fn an_expired_lease_is_taken_over_and_its_marker_seen(audit: Store) {
        let mut short = claim_of("E-1", "r/p/i-e", "w-dead", "d");
        short.lease = Duration::from_millis(200);
        audit.claim(short).await.unwrap();
        let busy = audit
            .claim(claim_of("E-1", "r/p/i-e", "w-next", "d"))
            .await
            .unwrap();
        assert!(matches!(busy, Claimed::Busy { .. }), "{busy:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let taken = audit
            .claim(claim_of("E-1", "r/p/i-e", "w-next", "d"))
            .await
            .unwrap();
        let Claimed::Leased {
            marker: Some(marker),
            marked_now: false,
        } = taken
        else {
            panic!("the dead worker's marker tells the next one to Describe first: {taken:?}")
        };
        assert_eq!(marker.digest.as_deref(), Some("d"));
    }

    async fn a_bucket_gives_its_burst_then_a_token_per_interval_all_or_none(audit: Store) {
        let bucket = |name: &str, per_second: f64, burst: f64| Bucket {
            name: name.into(),
            per_second,
            burst,
        };
        let global = bucket("global", 10.0, 3.0);
        // Refills once in 1,000 s: only takes move it during the test.
        let project = bucket("project:r/p", 0.001, 5.0);
        for _ in 0..3 {
            let taken = audit
                .take_tokens(vec![global.clone(), project.clone()])
                .await
                .unwrap();
            assert_eq!(taken, None, "the burst");
        }
        let short = audit
            .take_tokens(vec![global.clone(), project.clone()])
            .await
            .unwrap()
            .expect("the global burst is spent");
        assert!(
            short > Duration::ZERO && short <= Duration::from_millis(100),
            "a token every 100 ms: {short:?}"
        );
        // The refused take took nothing: the project bucket still has its last two.
        for _ in 0..2 {
            assert_eq!(
                audit.take_tokens(vec![project.clone()]).await.unwrap(),
                None
            );
        }
        assert!(
            audit
                .take_tokens(vec![project.clone()])
                .await
                .unwrap()
                .is_some()
        );
        tokio::time::sleep(short).await;
        assert_eq!(
            audit.take_tokens(vec![global.clone()]).await.unwrap(),
            None,
            "refilled after the wait it named"
        );
    }

    async fn a_paused_bucket_grants_nothing_until_its_pause_is_over(audit: Store) {
        let project = Bucket {
            name: "project:r/p".into(),
            per_second: 100.0,
            burst: 20.0,
        };
        let other = Bucket {
            name: "project:r/q".into(),
            ..project.clone()
        };
        assert_eq!(
            audit.take_tokens(vec![project.clone()]).await.unwrap(),
            None
        );
        audit
            .pause_bucket(project.clone(), Duration::from_millis(1_500))
            .await
            .unwrap();
        let short = audit
            .take_tokens(vec![project.clone()])
            .await
            .unwrap()
            .expect("a paused bucket grants nothing");
        assert!(
            short > Duration::from_millis(1_300) && short <= Duration::from_millis(1_500),
            "about the pause: {short:?}"
        );
        assert_eq!(
            audit.take_tokens(vec![other.clone()]).await.unwrap(),
            None,
            "another project's bucket is not paused"
        );
        // A shorter pause later does not cut the longer one short.
        audit
            .pause_bucket(project.clone(), Duration::from_millis(100))
            .await
            .unwrap();
        let still = audit
            .take_tokens(vec![project.clone()])
            .await
            .unwrap()
            .expect("still paused");
        assert!(still > Duration::from_millis(1_000), "{still:?}");

        // A worker configured with a far lower rate reads the longest pause of one with a far
        // higher rate: its wait is never longer than that pause.
        let fast = Bucket {
            name: "project:r/fast".into(),
            per_second: 100_000.0,
            burst: 20.0,
        };
        audit
            .pause_bucket(fast.clone(), crate::limits::MAX_PAUSE)
            .await
            .unwrap();
        let slow = Bucket {
            per_second: 1.0,
            ..fast
        };
        let wait = audit
            .take_tokens(vec![slow])
            .await
            .unwrap()
            .expect("paused");
        assert_eq!(wait, crate::limits::MAX_PAUSE);
    }

    fn parked_job(job_id: &str, scope: &str) -> ParkedJob {
        ParkedJob {
            id: 0,
            job_id: job_id.into(),
            rerun: 0,
            job_digest: "job-d".into(),
            rollout_id: Some("R-1".into()),
            scope: scope.into(),
            reason: "test".into(),
            body: b"{}".to_vec(),
            message_id: None,
            correlation_id: Some("c-1".into()),
            reply_to: None,
            content_type: Some("application/json".into()),
            parked_at: Utc::now(),
            generation: 0,
        }
    }

    async fn parked_jobs_are_kept_once_per_key_until_unparked(audit: Store) {
        audit
            .park(parked_job("P-1", "credentials"), "w-1")
            .await
            .unwrap();
        audit
            .park(parked_job("P-1", "credentials"), "w-1")
            .await
            .unwrap();
        audit
            .park(parked_job("P-2", "region:cn-north-4"), "w-1")
            .await
            .unwrap();
        assert_eq!(
            audit.parked_scopes().await.unwrap(),
            vec![
                ("credentials".to_owned(), 1),
                ("region:cn-north-4".to_owned(), 1)
            ]
        );
        let parked = audit.parked("credentials", 10).await.unwrap();
        assert_eq!(parked.len(), 1);
        assert_eq!(parked[0].correlation_id.as_deref(), Some("c-1"));
        assert!(
            audit
                .lookup("P-1", 0, "x", None)
                .await
                .unwrap()
                .parked
                .is_some()
        );
        assert_eq!(parked[0].generation, 1, "parked twice");
        audit.unpark(vec![(parked[0].id, 0)]).await.unwrap();
        assert_eq!(
            audit.parked("credentials", 10).await.unwrap().len(),
            1,
            "a stale release keeps a row parked again"
        );
        audit.unpark(vec![(parked[0].id, 1)]).await.unwrap();
        assert!(audit.parked("credentials", 10).await.unwrap().is_empty());
    }

    async fn one_write_that_cannot_commit_fails_alone(audit: Store) {
        // Two different events claiming one event id: the second can never commit.
        let good = record("J-5", 0, Outcome::Succeeded, "d");
        let mut clash = record("J-6", 0, Outcome::Succeeded, "d");
        clash.event.id = good.event.id.clone();
        let others: Vec<_> = (0..20)
            .map(|n| record(&format!("J-7-{n}"), 0, Outcome::Succeeded, "d"))
            .collect();
        audit.record(good).await.unwrap();
        let mut writes = vec![tokio::spawn({
            let audit = audit.clone();
            async move { audit.record(clash).await.is_ok() }
        })];
        for other in others {
            let audit = audit.clone();
            writes.push(tokio::spawn(
                async move { audit.record(other).await.is_ok() },
            ));
        }
        let mut ok = Vec::new();
        for write in writes {
            ok.push(write.await.unwrap());
        }
        assert!(!ok[0], "the clashing write fails");
        assert!(ok[1..].iter().all(|ok| *ok), "the writes beside it commit");
    }

    /// Runs `sql` on the store over a connection of its own (not through the writer); the
    /// error's text if it fails.
    fn raw(audit: &Store, sql: &'static str) -> Result<u64, String> {
        match &audit.db {
            Some(db) => db.with_client(move |client| {
                client.execute(sql, &[]).map_err(|error| {
                    error
                        .as_db_error()
                        .map_or_else(|| error.to_string(), |db| db.message().to_owned())
                })
            }),
            None => Connection::open(audit.path())
                .unwrap()
                .execute(sql, [])
                .map(|n| n as u64)
                .map_err(|error| error.to_string()),
        }
    }

    fn reopen(audit: Store) -> (Result<AuditStore, AuditError>, Store) {
        let location = audit.location().clone();
        let Store { audit, _dir, db } = audit;
        drop(audit);
        let reopened = AuditStore::open_at(&location, &options());
        let kept = Store {
            audit: AuditStore {
                writes: std::sync::mpsc::channel().0,
                reads: std::sync::mpsc::channel().0,
                tokens: std::sync::mpsc::channel().0,
                location,
            },
            _dir,
            db,
        };
        (reopened, kept)
    }

    async fn toggles_and_attempts_refuse_update_and_delete(audit: Store) {
        audit
            .record(record("J-4", 0, Outcome::Succeeded, "d"))
            .await
            .unwrap();
        let mut refused = vec![
            "UPDATE toggles SET outcome = 'failed'",
            "DELETE FROM toggles",
            "UPDATE attempts SET http_status = 500",
            "DELETE FROM attempts",
        ];
        if audit.db.is_some() {
            refused.extend(["TRUNCATE toggles CASCADE", "TRUNCATE attempts"]);
        }
        for sql in refused {
            let error = raw(&audit, sql).unwrap_err();
            assert!(error.contains("append-only"), "{sql}: {error}");
        }
        assert_eq!(
            audit.outcome_counts().await.unwrap(),
            vec![("succeeded".to_owned(), 1)]
        );
    }

    #[tokio::test]
    async fn every_delivery_finds_its_job_through_an_index() {
        let audit = store(Dialect::Sqlite);
        let connection = Connection::open(audit.path()).unwrap();
        let plan_of = |sql: &str, args: &[&dyn rusqlite::ToSql]| -> Vec<String> {
            connection
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map(args, |row| row.get(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        let plan = plan_of(jobs::FIND_FINAL, params!["J-1", 0]);
        assert!(
            plan.iter().any(|step| step.contains("USING INDEX")),
            "a table scan per delivery makes each job slower than the last: {plan:?}"
        );
        // The lookup and the claim read several tables in one statement: each part by an
        // index, none scanned.
        for (sql, parts, plan) in [
            (
                "lookup",
                4,
                plan_of(jobs::LOOKUP, params!["J-1", 0, "digest"]),
            ),
            (
                "claim",
                2,
                plan_of(jobs::FIND_FINAL_OR_MARKER, params!["J-1", 0]),
            ),
        ] {
            let searches = plan
                .iter()
                .filter(|step| step.starts_with("SEARCH"))
                .count();
            assert!(
                searches == parts && !plan.iter().any(|step| step.starts_with("SCAN")),
                "each part of the {sql}'s read searches an index: {plan:?}"
            );
        }
    }

    async fn reopening_applies_no_migration_twice(audit: Store) {
        let (reopened, audit) = reopen(audit);
        reopened.expect("a second open of the same store");
        let applied = raw(&audit, "UPDATE schema_migrations SET version = version").unwrap();
        assert_eq!(applied, sqlite::MIGRATIONS.len() as u64);
        assert_eq!(sqlite::MIGRATIONS.len(), postgres::MIGRATIONS.len());
    }

    async fn a_schema_newer_than_this_build_is_refused(audit: Store) {
        raw(
            &audit,
            "INSERT INTO schema_migrations (version, applied_at) VALUES ('9999_from_the_future', '')",
        )
        .unwrap();
        let (reopened, _audit) = reopen(audit);
        let Err(error) = reopened else {
            panic!("a store migrated by a newer keyturn opened")
        };
        assert!(
            matches!(&error, AuditError::SchemaTooNew { found, .. } if found == "9999_from_the_future"),
            "{error}"
        );
    }
}
