-- keyturn store, version 6: leases. A worker claims a job key, and with it the job's instance,
-- before any API call for it; it renews the lease while the job runs and drops it with the job's
-- final record. Another worker handed the same job (or any job of the same instance) waits while
-- the lease lives; once it has expired (its worker died) it may take it over, and the in-flight
-- marker then tells whether a Modify may already have gone out.
CREATE TABLE leases (
    job_id     TEXT    NOT NULL,
    rerun      INTEGER NOT NULL,
    -- region/project/instance: one lease per instance, whatever the job.
    instance   TEXT    NOT NULL UNIQUE,
    -- The worker process holding it (its worker id and a token of this run of it).
    owner      TEXT    NOT NULL,
    -- Milliseconds since the epoch, by the store's clock.
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (job_id, rerun)
);
CREATE INDEX leases_owner ON leases (owner);
