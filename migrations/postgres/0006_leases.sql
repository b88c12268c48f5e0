-- keyturn store on PostgreSQL, version 6 (see migrations/0006 for SQLite): leases. A worker
-- claims a job key, and with it the job's instance, before any API call for it; it renews the
-- lease while the job runs and drops it with the job's final record.
CREATE TABLE leases (
    job_id     TEXT    NOT NULL,
    rerun      BIGINT  NOT NULL,
    -- region/project/instance: one lease per instance, whatever the job.
    instance   TEXT    NOT NULL UNIQUE,
    -- The worker process holding it (its worker id and a token of this run of it).
    owner      TEXT    NOT NULL,
    -- Milliseconds since the epoch, by the store's clock.
    expires_at BIGINT  NOT NULL,
    PRIMARY KEY (job_id, rerun)
);
CREATE INDEX leases_owner ON leases (owner);
