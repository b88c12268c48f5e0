-- Every delivery looks its job up in `toggles` (find_final). The partial unique indexes of 0001
-- cannot serve that query (its WHERE implies neither partial condition), so SQLite scanned the
-- whole table: each job cost time in proportion to the jobs before it.
CREATE INDEX toggles_job ON toggles (job_id);
