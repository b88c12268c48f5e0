//! What the store keeps per job key, written once for both stores: the lookup before a delivery
//! is worked on, the in-flight marker before its first Modify, parking, and the final record.

use chrono::Utc;

use super::db::{Db, Row, args};
use super::{
    AuditError, ClaimRequest, Claimed, Committed, Earlier, FinalRecord, ParkedJob, Recorded, Seen,
    StoredEvent, rollouts, timestamp,
};
use crate::rollout::State;

/// The final record of a job key. Served by the `toggles_job` index (see the plan test).
pub(super) const FIND_FINAL: &str = "SELECT event_json, job_digest, received_at FROM toggles
     WHERE job_id = ?1 AND rerun = ?2 AND outcome <> 'rejected' LIMIT 1";
const FIND_REJECTION: &str = "SELECT event_json FROM toggles
     WHERE job_id = ?1 AND outcome = 'rejected' AND body_sha256 = ?2 LIMIT 1";
/// The two reads of a key that both the lookup and the claim make, as one `UNION ALL`: a row
/// per kind found, its first column naming the kind (see [`known`]).
macro_rules! final_or_marker {
    () => {
        "SELECT 'final', event_json, job_digest, received_at FROM toggles
         WHERE job_id = ?1 AND rerun = ?2 AND outcome <> 'rejected'
         UNION ALL SELECT 'marker', CAST(NULL AS TEXT), job_digest, first_sent_at FROM in_flight
         WHERE job_id = ?1 AND rerun = ?2"
    };
}

/// A key's final record and its marker, in one round trip: what a claim reads.
pub(super) const FIND_FINAL_OR_MARKER: &str = final_or_marker!();

/// Everything a delivery's lookup reads of its key, in one statement (one snapshot, one round
/// trip): the final record and marker, the rejection of these bytes and the parking. The unique
/// indexes allow at most one final record per key, one rejection per body, one marker and one
/// parking.
pub(super) const LOOKUP: &str = concat!(
    final_or_marker!(),
    "
     UNION ALL SELECT 'rejection', event_json, CAST(NULL AS TEXT), CAST(NULL AS TEXT) FROM toggles
     WHERE job_id = ?1 AND outcome = 'rejected' AND body_sha256 = ?3
     UNION ALL SELECT 'parked', CAST(NULL AS TEXT), job_digest, parked_at FROM parked
     WHERE job_id = ?1 AND rerun = ?2"
);

/// What the rows of [`LOOKUP`] or [`FIND_FINAL_OR_MARKER`] say of a key, in whatever order they
/// came (without its rollout's view).
fn known(rows: Vec<Row>) -> Result<Earlier, AuditError> {
    let mut earlier = Earlier {
        final_record: None,
        rejection: None,
        marker: None,
        parked: None,
        rollout: None,
    };
    for row in rows {
        let kind: String = row.get(0)?;
        let seen = || -> Result<Seen, AuditError> {
            Ok(Seen {
                digest: row.get(2)?,
                at: row.get(3)?,
            })
        };
        match kind.as_str() {
            "final" if earlier.final_record.is_none() => {
                earlier.final_record = Some((StoredEvent::parse(row.get(1)?)?, seen()?));
            }
            "rejection" if earlier.rejection.is_none() => {
                earlier.rejection = Some(StoredEvent::parse(row.get(1)?)?);
            }
            "marker" if earlier.marker.is_none() => earlier.marker = Some(seen()?),
            "parked" if earlier.parked.is_none() => earlier.parked = Some(seen()?),
            _ => {}
        }
    }
    Ok(earlier)
}

/// What the store knows of a key before a delivery of it is worked on. Without a rollout this
/// is the one statement of [`LOOKUP`]; a rollout's view is read after it, in the same
/// transaction when the caller opened one.
pub(super) fn lookup(
    db: &mut dyn Db,
    job_id: &str,
    rerun: u32,
    body_sha256: &str,
    rollout_id: Option<&str>,
) -> Result<Earlier, AuditError> {
    let mut earlier = known(db.query(LOOKUP, args![job_id, rerun, body_sha256])?)?;
    if let Some(id) = rollout_id {
        earlier.rollout = rollouts::view(db, id)?;
    }
    Ok(earlier)
}

fn find_rejection(
    db: &mut dyn Db,
    job_id: &str,
    body_sha256: &str,
) -> Result<Option<StoredEvent>, AuditError> {
    db.query_opt(FIND_REJECTION, args![job_id, body_sha256])?
        .map(|row| StoredEvent::parse(row.get(0)?))
        .transpose()
}

pub(super) fn claim(tx: &mut dyn Db, request: &ClaimRequest) -> Result<Claimed, AuditError> {
    let ClaimRequest {
        job_id,
        rerun,
        digest,
        worker_id,
        owner,
        rollout_id,
        instance,
        mark,
        lease,
    } = request;
    let rerun = *rerun;
    let Earlier {
        final_record,
        marker,
        ..
    } = known(tx.query(FIND_FINAL_OR_MARKER, args![job_id, rerun])?)?;
    if let Some(finished) = final_record {
        return Ok(Claimed::Finished(Box::new(finished)));
    }
    // The rollout may have been paused, halted or cancelled since the job was admitted: check
    // again, in the transaction that would mark its first Modify.
    if *mark
        && marker.is_none()
        && let Some(state) = rollout_id
            .as_deref()
            .map(|id| rollouts::state(tx, id))
            .transpose()?
            .flatten()
            .filter(|state| matches!(state, State::Paused | State::Halted | State::Cancelled))
    {
        return Ok(Claimed::RolloutStopped(state));
    }
    let now = tx.now_ms()?;
    let holders = tx.query(
        "SELECT job_id, rerun, owner, expires_at FROM leases
         WHERE instance = ?1 OR (job_id = ?2 AND rerun = ?3)",
        args![instance, job_id, rerun],
    )?;
    for holder in &holders {
        let (held_job, held_by, expires_at): (String, String, i64) =
            (holder.get(0)?, holder.get(2)?, holder.get(3)?);
        // This process's own lease (on this job, or left by an earlier job of the instance,
        // which this process runs one at a time) is taken over; an expired one's worker died.
        let ours = held_by == *owner;
        if !ours && expires_at > now {
            return Ok(Claimed::Busy {
                owner: held_by,
                job_id: held_job,
            });
        }
    }
    // Only ours or expired ones are left: taken over. (None, mostly: no statement then.)
    if !holders.is_empty() {
        tx.execute(
            "DELETE FROM leases WHERE instance = ?1 OR (job_id = ?2 AND rerun = ?3)",
            args![instance, job_id, rerun],
        )?;
    }
    tx.execute(
        "INSERT INTO leases (job_id, rerun, instance, owner, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        args![job_id, rerun, instance, owner, now + millis(*lease)],
    )?;
    if !*mark || marker.is_some() {
        return Ok(Claimed::Leased {
            marker,
            marked_now: false,
        });
    }
    let first_sent_at = timestamp(Utc::now());
    tx.execute(
        "INSERT INTO in_flight (job_id, rerun, job_digest, first_sent_at, worker_id, rollout_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        args![job_id, rerun, digest, first_sent_at, worker_id, rollout_id],
    )?;
    if let Some(rollout_id) = rollout_id {
        rollouts::started(tx, rollout_id, worker_id)?;
    }
    Ok(Claimed::Leased {
        marker: Some(Seen {
            digest: Some(digest.clone()),
            at: first_sent_at,
        }),
        marked_now: true,
    })
}

/// Drops the leases of earlier runs of `worker_id` (owners `<worker_id>/<token>` other than
/// `owner`): a worker id names one running worker, so they belong to a process that is gone.
pub(super) fn release_predecessors(
    tx: &mut dyn Db,
    worker_id: &str,
    owner: &str,
) -> Result<u64, AuditError> {
    let prefix = format!("{worker_id}/");
    tx.execute(
        "DELETE FROM leases WHERE substr(owner, 1, ?2) = ?1 AND owner <> ?3",
        args![prefix, prefix.chars().count(), owner],
    )
}

fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX / 2)
}

/// Renews `owner`'s leases on `active` and drops its leases on `released`; returns the active
/// keys that no longer have a lease of `owner`'s.
pub(super) fn renew(
    tx: &mut dyn Db,
    owner: &str,
    active: &[(String, u32)],
    released: &[(String, u32)],
    lease: std::time::Duration,
) -> Result<Vec<(String, u32)>, AuditError> {
    for (job_id, rerun) in released {
        tx.execute(
            "DELETE FROM leases WHERE job_id = ?1 AND rerun = ?2 AND owner = ?3",
            args![job_id, rerun, owner],
        )?;
    }
    let until = tx.now_ms()? + millis(lease);
    let mut lost = Vec::new();
    for (job_id, rerun) in active {
        let renewed = tx.execute(
            "UPDATE leases SET expires_at = ?4 WHERE job_id = ?1 AND rerun = ?2 AND owner = ?3",
            args![job_id, rerun, owner, until],
        )?;
        if renewed == 0 {
            lost.push((job_id.clone(), *rerun));
        }
    }
    Ok(lost)
}

pub(super) fn park(tx: &mut dyn Db, job: &ParkedJob, owner: &str) -> Result<(), AuditError> {
    tx.execute(
        "INSERT INTO parked (job_id, rerun, job_digest, rollout_id, scope, reason, body,
             message_id, correlation_id, reply_to, content_type, parked_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT (job_id, rerun) DO UPDATE SET generation = parked.generation + 1,
             scope = excluded.scope, reason = excluded.reason",
        args![
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
        ],
    )?;
    drop_lease(tx, &job.job_id, job.rerun, owner)
}

/// Drops the key's in-flight marker, only while `owner` holds the key's lease: under it no other
/// delivery can have marked (or sent) the key.
pub(super) fn unmark(
    tx: &mut dyn Db,
    job_id: &str,
    rerun: u32,
    owner: &str,
) -> Result<(), AuditError> {
    tx.execute(
        "DELETE FROM in_flight WHERE job_id = ?1 AND rerun = ?2 AND EXISTS (
             SELECT 1 FROM leases WHERE job_id = ?1 AND rerun = ?2 AND owner = ?3)",
        args![job_id, rerun, owner],
    )?;
    Ok(())
}

fn drop_lease(tx: &mut dyn Db, job_id: &str, rerun: u32, owner: &str) -> Result<(), AuditError> {
    tx.execute(
        "DELETE FROM leases WHERE job_id = ?1 AND rerun = ?2 AND owner = ?3",
        args![job_id, rerun, owner],
    )?;
    Ok(())
}

pub(super) fn unpark(tx: &mut dyn Db, ids: &[(i64, i64)]) -> Result<(), AuditError> {
    for (id, generation) in ids {
        tx.execute(
            "DELETE FROM parked WHERE id = ?1 AND generation = ?2",
            args![id, generation],
        )?;
    }
    Ok(())
}

pub(super) fn parked_scopes(db: &mut dyn Db) -> Result<Vec<(String, u64)>, AuditError> {
    db.query(
        "SELECT scope, COUNT(*) FROM parked GROUP BY scope ORDER BY scope",
        &[],
    )?
    .iter()
    .map(|row| Ok((row.get(0)?, row.get(1)?)))
    .collect()
}

pub(super) fn parked(
    db: &mut dyn Db,
    scope: &str,
    limit: u32,
) -> Result<Vec<ParkedJob>, AuditError> {
    db.query(
        "SELECT id, job_id, rerun, job_digest, rollout_id, scope, reason, body, message_id,
                correlation_id, reply_to, content_type, parked_at, generation
         FROM parked WHERE scope = ?1 ORDER BY id LIMIT ?2",
        args![scope, limit],
    )?
    .iter()
    .map(|row| {
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
    })
    .collect()
}

pub(super) fn insert(tx: &mut dyn Db, record: &FinalRecord) -> Result<Committed, AuditError> {
    let stored = StoredEvent::new(record.event.clone());
    let event = &stored.event;
    let data = &event.data;
    let inserted = tx.execute(
        "INSERT INTO toggles (job_id, rollout_id, ticket, region, project_id, instance_id,
             requested_status, kms_key_id, requested_by, outcome, resulting_status, http_status,
             error_code, error_msg, request_id, attempts, received_at, finished_at, duration_ms,
             event_id, event_json, body_sha256, worker_id, rerun, job_digest)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                 ?19, ?20, ?21, ?22, ?23, ?24, ?25)
         ON CONFLICT DO NOTHING",
        args![
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
        ],
    )?;
    // The marker goes with the job's final record, this delivery's or another's; a rejection
    // (of a reused key, say) leaves the marker of the body that may have been sent.
    if let Some(digest) = &record.job_digest {
        tx.execute(
            "DELETE FROM in_flight WHERE job_id = ?1 AND rerun = ?2
             AND (job_digest = ?3 OR job_digest IS NULL)",
            args![data.job_id, data.rerun, digest],
        )?;
    }
    // Only this worker's own lease: another's may cover a call still in flight.
    drop_lease(tx, &data.job_id, data.rerun, &record.lease_owner)?;
    if inserted == 0 {
        return Ok(Committed {
            recorded: Recorded::Existing(existing(tx, record)?),
            release: None,
        });
    }
    for (number, attempt) in record.attempts.iter().enumerate() {
        tx.execute(
            "INSERT INTO attempts (event_id, job_id, number, call, started_at, latency_ms,
                 http_status, error_code, error_msg, request_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            args![
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
            ],
        )?;
    }
    let release = rollouts::count_final(tx, record)?;
    Ok(Committed {
        recorded: Recorded::New(stored),
        release,
    })
}

/// The row that made an insert of `record` a no-op: the key's final record, or the rejection
/// of the same bytes.
fn existing(tx: &mut dyn Db, record: &FinalRecord) -> Result<StoredEvent, AuditError> {
    let data = &record.event.data;
    let found = if record.job_digest.is_some() {
        tx.query_opt(FIND_FINAL, args![data.job_id, data.rerun])?
            .map(|row| StoredEvent::parse(row.get(0)?))
            .transpose()?
    } else {
        find_rejection(tx, &data.job_id, &record.body_sha256)?
    };
    found.ok_or(AuditError::Conflict)
}

/// Finished jobs per outcome (for summaries).
pub(super) fn outcome_counts(db: &mut dyn Db) -> Result<Vec<(String, i64)>, AuditError> {
    db.query(
        "SELECT outcome, COUNT(*) FROM toggles GROUP BY outcome ORDER BY outcome",
        &[],
    )?
    .iter()
    .map(|row| Ok((row.get(0)?, row.get(1)?)))
    .collect()
}
