-- keyturn audit log, version 1.
-- toggles: one row per finished job, append-only. attempts: every HTTP call made for a job,
-- written in the same transaction as its toggles row.

CREATE TABLE toggles (
    id               INTEGER PRIMARY KEY,
    job_id           TEXT    NOT NULL,
    rollout_id       TEXT,
    ticket           TEXT,
    region           TEXT,
    project_id       TEXT,
    instance_id      TEXT,
    requested_status TEXT,
    kms_key_id       TEXT,
    requested_by     TEXT,
    outcome          TEXT    NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'rejected', 'halted')),
    resulting_status TEXT,
    http_status      INTEGER,
    error_code       TEXT,
    error_msg        TEXT,
    request_id       TEXT,
    attempts         INTEGER NOT NULL,
    received_at      TEXT    NOT NULL,
    finished_at      TEXT    NOT NULL,
    duration_ms      INTEGER NOT NULL,
    event_id         TEXT    NOT NULL UNIQUE,
    event_json       TEXT    NOT NULL,
    body_sha256      TEXT    NOT NULL,
    worker_id        TEXT    NOT NULL
);

-- Exactly one final record per job. A rejected body does not block a corrected resubmission
-- under the same job_id, but the same rejected bytes are recorded once.
CREATE UNIQUE INDEX toggles_one_final_per_job ON toggles (job_id) WHERE outcome <> 'rejected';
CREATE UNIQUE INDEX toggles_one_rejection_per_body ON toggles (job_id, body_sha256) WHERE outcome = 'rejected';
CREATE INDEX toggles_rollout ON toggles (rollout_id);
CREATE INDEX toggles_instance ON toggles (instance_id);

CREATE TRIGGER toggles_refuse_update BEFORE UPDATE ON toggles
BEGIN
    SELECT RAISE(ABORT, 'toggles is append-only');
END;

CREATE TRIGGER toggles_refuse_delete BEFORE DELETE ON toggles
BEGIN
    SELECT RAISE(ABORT, 'toggles is append-only');
END;

CREATE TABLE attempts (
    id          INTEGER PRIMARY KEY,
    event_id    TEXT    NOT NULL REFERENCES toggles (event_id),
    job_id      TEXT    NOT NULL,
    number      INTEGER NOT NULL,
    call        TEXT    NOT NULL CHECK (call IN ('modify', 'describe')),
    started_at  TEXT    NOT NULL,
    latency_ms  INTEGER NOT NULL,
    http_status INTEGER,
    error_code  TEXT,
    error_msg   TEXT,
    request_id  TEXT
);

CREATE INDEX attempts_job ON attempts (job_id);

CREATE TRIGGER attempts_refuse_update BEFORE UPDATE ON attempts
BEGIN
    SELECT RAISE(ABORT, 'attempts is append-only');
END;

CREATE TRIGGER attempts_refuse_delete BEFORE DELETE ON attempts
BEGIN
    SELECT RAISE(ABORT, 'attempts is append-only');
END;

-- Work in progress: a row is written (and committed) before a job's first Modify goes out, and
-- removed in the transaction that writes the job's toggles row. A redelivered job with a row here
-- may have reached the API, so the worker asks Describe before toggling again.
CREATE TABLE in_flight (
    job_id        TEXT PRIMARY KEY,
    first_sent_at TEXT NOT NULL,
    worker_id     TEXT NOT NULL
);
