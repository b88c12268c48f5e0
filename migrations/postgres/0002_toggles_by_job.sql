-- Every delivery looks its job up in `toggles` by job_id (see migrations/0002 for SQLite).
CREATE INDEX toggles_job ON toggles (job_id);
