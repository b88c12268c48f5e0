-- keyturn audit log, version 3: the idempotency key becomes (job_id, rerun), every job's
-- meaning is remembered as a digest so a reused key with another body is refused, and jobs that
-- cannot run now (an open circuit; later a paused rollout) are parked here instead of being held.

-- toggles stays append-only: ALTER TABLE ADD COLUMN rewrites no row and fires no trigger.
ALTER TABLE toggles ADD COLUMN rerun INTEGER NOT NULL DEFAULT 0;
-- Digest of what a valid job asked for (job::Job::digest); NULL for rejections and for rows
-- written before version 3, which therefore never conflict.
ALTER TABLE toggles ADD COLUMN job_digest TEXT;

DROP INDEX toggles_one_final_per_job;
CREATE UNIQUE INDEX toggles_one_final_per_key ON toggles (job_id, rerun) WHERE outcome <> 'rejected';

-- The in-flight marker is keyed by (job_id, rerun) and says what the job asked for.
CREATE TABLE in_flight_v3 (
    job_id        TEXT    NOT NULL,
    rerun         INTEGER NOT NULL,
    job_digest    TEXT,
    first_sent_at TEXT    NOT NULL,
    worker_id     TEXT    NOT NULL,
    PRIMARY KEY (job_id, rerun)
);
INSERT INTO in_flight_v3 (job_id, rerun, job_digest, first_sent_at, worker_id)
    SELECT job_id, 0, NULL, first_sent_at, worker_id FROM in_flight;
DROP TABLE in_flight;
ALTER TABLE in_flight_v3 RENAME TO in_flight;

-- Parked jobs: stored durably, then acked; published again (with confirms) when their scope
-- opens again, then deleted. A row is the whole delivery, so nothing about the job is lost.
CREATE TABLE parked (
    id             INTEGER PRIMARY KEY,
    job_id         TEXT    NOT NULL,
    rerun          INTEGER NOT NULL,
    job_digest     TEXT    NOT NULL,
    rollout_id     TEXT,
    scope          TEXT    NOT NULL,
    reason         TEXT    NOT NULL,
    body           BLOB    NOT NULL,
    message_id     TEXT,
    correlation_id TEXT,
    reply_to       TEXT,
    content_type   TEXT,
    parked_at      TEXT    NOT NULL,
    -- Bumped when a parked key is parked again: a release deletes only the generation it
    -- published, so a copy parked again while the release ran is not lost.
    generation     INTEGER NOT NULL DEFAULT 0,
    UNIQUE (job_id, rerun)
);
CREATE INDEX parked_scope ON parked (scope, id);
