-- keyturn store on PostgreSQL, version 7 (see migrations/0007 for SQLite): token buckets that
-- every worker of the deployment takes its API calls from.
CREATE TABLE rate_buckets (
    name       TEXT             PRIMARY KEY,
    tokens     DOUBLE PRECISION NOT NULL,
    updated_ms BIGINT           NOT NULL
);
