-- The response cache is read by key alone, and its key alone is now the
-- primary key (it covers the project since common::cache's version 2).
--
-- Measured with scripts/bench e2e and cost, pg_stat_statements and
-- auto_explain: the workers' lookup (project = $1 AND key = ANY($2)) took
-- 21 to 117 ms a chunk instead of about 1 ms. On a table autovacuum has not
-- analysed yet (the first job fills it) Postgres takes `project = $1` for a
-- selective condition and scanned every entry of the project through the
-- (project, key) index or through the age index. On a single-column unique
-- key it knows that each key matches at most one row, analysed or not.
--
-- Also: keys are hex digests, compared byte by byte (collation "C": 100
-- probes in 0.17 ms, not 1.5); the age index only served `sluice cache purge
-- --older-than` and `cache stats`, rare commands that may scan the table,
-- while every answer written paid for it. Entries under the old keys could
-- never match again, so they go.
DELETE FROM response_cache;
DROP INDEX response_cache_age;
ALTER TABLE response_cache DROP CONSTRAINT response_cache_pkey;
ALTER TABLE response_cache ALTER COLUMN key TYPE text COLLATE "C";
ALTER TABLE response_cache ADD PRIMARY KEY (key);
