-- keyturn audit log, version 4: rollouts (contract §6). A rollout's plan, state and counts live
-- in `rollouts`, kept as jobs finish in the transaction of their final record; rollout events go
-- out through an outbox; commands are applied once per message id.

-- `toggles` gains the outcome `cancelled`. SQLite cannot change a CHECK in place, so the table is
-- rebuilt with every row, index and append-only trigger (foreign keys are off while migrating).
CREATE TABLE toggles_v4 (
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
    outcome          TEXT    NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'rejected', 'cancelled', 'halted')),
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
    worker_id        TEXT    NOT NULL,
    rerun            INTEGER NOT NULL DEFAULT 0,
    job_digest       TEXT
);
INSERT INTO toggles_v4 (id, job_id, rollout_id, ticket, region, project_id, instance_id,
    requested_status, kms_key_id, requested_by, outcome, resulting_status, http_status, error_code,
    error_msg, request_id, attempts, received_at, finished_at, duration_ms, event_id, event_json,
    body_sha256, worker_id, rerun, job_digest)
SELECT id, job_id, rollout_id, ticket, region, project_id, instance_id,
    requested_status, kms_key_id, requested_by, outcome, resulting_status, http_status, error_code,
    error_msg, request_id, attempts, received_at, finished_at, duration_ms, event_id, event_json,
    body_sha256, worker_id, rerun, job_digest
FROM toggles;
DROP TABLE toggles;
ALTER TABLE toggles_v4 RENAME TO toggles;

CREATE UNIQUE INDEX toggles_one_final_per_key ON toggles (job_id, rerun) WHERE outcome <> 'rejected';
CREATE UNIQUE INDEX toggles_one_rejection_per_body ON toggles (job_id, body_sha256) WHERE outcome = 'rejected';
CREATE INDEX toggles_rollout ON toggles (rollout_id);
CREATE INDEX toggles_instance ON toggles (instance_id);
CREATE INDEX toggles_job ON toggles (job_id);

CREATE TRIGGER toggles_refuse_update BEFORE UPDATE ON toggles
BEGIN
    SELECT RAISE(ABORT, 'toggles is append-only');
END;

CREATE TRIGGER toggles_refuse_delete BEFORE DELETE ON toggles
BEGIN
    SELECT RAISE(ABORT, 'toggles is append-only');
END;

-- Which rollout a job in flight belongs to, for the rollout's `in_flight` count.
ALTER TABLE in_flight ADD COLUMN rollout_id TEXT;
CREATE INDEX in_flight_rollout ON in_flight (rollout_id);
CREATE INDEX parked_rollout ON parked (rollout_id);

CREATE TABLE rollouts (
    rollout_id      TEXT    PRIMARY KEY,
    -- 0: an ad-hoc rollout, named by jobs but never declared (counted, no budget).
    declared        INTEGER NOT NULL,
    -- The declaration as canonical JSON: a re-declaration must be equal.
    plan_json       TEXT,
    ticket          TEXT,
    requested_by    TEXT,
    expected_jobs   INTEGER,
    -- Failures allowed; NULL: no budget. With N, the (N+1)-th failure halts.
    budget_allowed  INTEGER,
    canary          INTEGER NOT NULL DEFAULT 0,
    canary_gate     TEXT    NOT NULL DEFAULT 'auto' CHECK (canary_gate IN ('auto', 'manual')),
    canary_finished INTEGER NOT NULL DEFAULT 0,
    canary_failed   INTEGER NOT NULL DEFAULT 0,
    canary_done     INTEGER NOT NULL DEFAULT 0,
    max_per_second  INTEGER,
    state           TEXT    NOT NULL CHECK (state IN ('running', 'paused', 'halted', 'cancelled', 'completed')),
    reason          TEXT,
    -- The latest outcome of each job_id of the rollout, counted (a rerun moves its job).
    succeeded       INTEGER NOT NULL DEFAULT 0,
    failed          INTEGER NOT NULL DEFAULT 0,
    rejected        INTEGER NOT NULL DEFAULT 0,
    cancelled       INTEGER NOT NULL DEFAULT 0,
    created_at      TEXT    NOT NULL,
    updated_at      TEXT    NOT NULL,
    started_at      TEXT,
    finished_at     TEXT,
    progress_at     TEXT
);

-- The keys admitted as canary jobs (at most `canary` per rollout).
CREATE TABLE rollout_canary (
    rollout_id TEXT    NOT NULL,
    job_id     TEXT    NOT NULL,
    rerun      INTEGER NOT NULL,
    PRIMARY KEY (rollout_id, job_id, rerun)
);

-- Rollout events, written in the transaction that changed the rollout and published after it;
-- a claim keeps two workers from publishing one row at once.
CREATE TABLE rollout_events (
    id           INTEGER PRIMARY KEY,
    rollout_id   TEXT NOT NULL,
    kind         TEXT NOT NULL,
    event_id     TEXT NOT NULL UNIQUE,
    event_json   TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    claimed_by   TEXT,
    claimed_at   TEXT,
    published_at TEXT
);
CREATE INDEX rollout_events_pending ON rollout_events (id) WHERE published_at IS NULL;
CREATE INDEX rollout_events_rollout ON rollout_events (rollout_id, kind);

-- Control commands applied, by AMQP message id: a redelivered command is answered, not re-applied.
CREATE TABLE commands (
    command_id TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    rollout_id TEXT,
    ok         INTEGER NOT NULL,
    error      TEXT,
    applied_at TEXT NOT NULL
);

-- The latest outcome of each job of a rollout: a rerun that finishes moves its job from one count
-- to another instead of counting it twice.
CREATE TABLE rollout_jobs (
    rollout_id TEXT    NOT NULL,
    job_id     TEXT    NOT NULL,
    rerun      INTEGER NOT NULL,
    outcome    TEXT    NOT NULL,
    PRIMARY KEY (rollout_id, job_id)
);
