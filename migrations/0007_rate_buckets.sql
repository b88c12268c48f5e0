-- keyturn store, version 7: token buckets for rate limits that hold for every worker on the
-- store (used on PostgreSQL, where a deployment has many workers; SQLite keeps the table, unused).
-- A bucket is refilled lazily: `tokens` as of `updated_ms`, by the store's clock.
CREATE TABLE rate_buckets (
    -- `global`, `project:<region>/<project_id>` or `rollout:<rollout_id>`.
    name       TEXT    PRIMARY KEY,
    tokens     REAL    NOT NULL,
    updated_ms INTEGER NOT NULL
);
