//! The thread that owns a store's connection: it answers reads in order and commits every write
//! waiting in its channel in one transaction (group commit). A write that cannot commit is
//! retried on its own, so it never fails the writes batched with it. The same loop serves both
//! stores; a [`Backend`] only says how to open a transaction.

use std::sync::mpsc;

use tokio::sync::oneshot;

use super::db::{Db, args};
use super::{AuditError, Command, Write, Written, buckets, jobs, rollouts, timestamp};

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 256;

/// A store's connection as the writer thread uses it.
pub(super) trait Backend {
    /// Runs `work` in one write transaction, committed if it returns `Ok`. Write transactions
    /// of every worker on the store run one at a time.
    fn write<T>(
        &mut self,
        work: impl FnOnce(&mut dyn Db) -> Result<T, AuditError>,
    ) -> Result<T, AuditError>;

    /// Runs `work` in a read transaction: one snapshot of what is committed for all of its
    /// statements.
    fn read<T>(
        &mut self,
        work: impl FnOnce(&mut dyn Db) -> Result<T, AuditError>,
    ) -> Result<T, AuditError>;

    /// Runs `work`, which makes one statement, without opening a transaction: a statement sees
    /// one snapshot on its own, and this saves the transaction's own statements.
    fn read_statement<T>(
        &mut self,
        work: impl FnOnce(&mut dyn Db) -> Result<T, AuditError>,
    ) -> Result<T, AuditError>;
}

type Pending = (Write, oneshot::Sender<Result<Written, AuditError>>);

/// Starts the thread that serves the store's commands with the backend `open` makes on it
/// (`None`: it could not, and has said so).
pub(super) fn spawn_with<B: Backend + 'static>(
    name: &str,
    open: impl FnOnce() -> Option<B> + Send + 'static,
) -> mpsc::Sender<Command> {
    let (commands, receiver) = mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Some(backend) = open() {
                writer_loop(backend, receiver);
            }
        })
        .expect("spawn the audit writer thread");
    commands
}

fn writer_loop<B: Backend>(mut backend: B, commands: mpsc::Receiver<Command>) {
    while let Ok(first) = commands.recv() {
        let mut writes = Vec::new();
        let mut next = Some(first);
        while let Some(command) = next {
            match command {
                Command::Write { write, reply } => writes.push((write, reply)),
                read => answer(&mut backend, read),
            }
            next = if writes.len() < MAX_BATCH {
                commands.try_recv().ok()
            } else {
                None
            };
        }
        if !writes.is_empty() {
            commit_batch(&mut backend, writes);
        }
    }
}

fn answer<B: Backend>(backend: &mut B, command: Command) {
    match command {
        Command::Lookup {
            job_id,
            rerun,
            body_sha256,
            rollout_id,
            reply,
        } => {
            let lookup = |db: &mut dyn Db| {
                jobs::lookup(db, &job_id, rerun, &body_sha256, rollout_id.as_deref())
            };
            // Without a rollout the lookup is one statement; a rollout's view adds more, read
            // in the same snapshot.
            let _ = reply.send(match rollout_id {
                None => backend.read_statement(lookup),
                Some(_) => backend.read(lookup),
            });
        }
        Command::Snapshots { rollout_id, reply } => {
            let _ = reply.send(backend.read(|db| rollouts::snapshots(db, rollout_id.as_deref())));
        }
        Command::FailedJobs { rollout_id, reply } => {
            let _ = reply.send(backend.read(|db| rollouts::failed_jobs(db, &rollout_id)));
        }
        Command::ParkedScopes { reply } => {
            let _ = reply.send(backend.read(jobs::parked_scopes));
        }
        Command::Parked {
            scope,
            limit,
            reply,
        } => {
            let _ = reply.send(backend.read(|db| jobs::parked(db, &scope, limit)));
        }
        Command::OutcomeCounts { reply } => {
            let _ = reply.send(backend.read(jobs::outcome_counts));
        }
        Command::RolloutState { rollout_id, reply } => {
            let _ = reply.send(backend.read(|db| rollouts::state(db, &rollout_id)));
        }
        Command::Write { .. } => unreachable!("writes are batched"),
    }
}

/// Commits the batch in one transaction; if that fails, each write alone, so one write that
/// cannot commit fails only itself.
fn commit_batch<B: Backend>(backend: &mut B, writes: Vec<Pending>) {
    let batch = writes.len();
    let all = backend.write(|tx| {
        writes
            .iter()
            .map(|(write, _)| apply(tx, write))
            .collect::<Result<Vec<_>, _>>()
    });
    let results = match all {
        Ok(results) => results.into_iter().map(Ok).collect(),
        Err(error) if batch == 1 => vec![Err(error)],
        Err(error) => {
            tracing::warn!(%error, batch, "audit batch failed; committing its writes one by one");
            writes
                .iter()
                .map(|(write, _)| backend.write(|tx| apply(tx, write)))
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

fn apply(tx: &mut dyn Db, write: &Write) -> Result<Written, AuditError> {
    Ok(match write {
        Write::Record(record) => Written::Recorded(Box::new(jobs::insert(tx, record)?)),
        Write::Claim(request) => Written::Claimed(jobs::claim(tx, request)?),
        Write::TakeTokens(buckets) => Written::Tokens(buckets::take(tx, buckets)?),
        Write::PauseBucket(bucket, pause) => {
            buckets::pause(tx, bucket, *pause)?;
            Written::Done
        }
        Write::ReleasePredecessors { worker_id, owner } => {
            Written::Released(jobs::release_predecessors(tx, worker_id, owner)?)
        }
        Write::Renew {
            owner,
            active,
            released,
            lease,
        } => Written::Renewed(jobs::renew(tx, owner, active, released, *lease)?),
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
                args![timestamp(chrono::Utc::now())],
            )?;
            Written::Done
        }
        Write::Park(job, owner) => {
            jobs::park(tx, job, owner)?;
            Written::Done
        }
        Write::Unmark {
            job_id,
            rerun,
            owner,
        } => {
            jobs::unmark(tx, job_id, *rerun, owner)?;
            Written::Done
        }
        Write::Unpark(ids) => {
            jobs::unpark(tx, ids)?;
            Written::Done
        }
    })
}
