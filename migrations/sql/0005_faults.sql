-- Surviving faults: duplicate ids found by Postgres, abandoned uploads, every
-- model call audited before it is made, and an audit trail the application
-- cannot rewrite.

-- Duplicate ids are looked for after the COPY (not in the coordinator's
-- memory), so uniqueness is checked at commit rather than row by row.
ALTER TABLE items DROP CONSTRAINT items_job_id_item_id_key;
ALTER TABLE items ADD CONSTRAINT items_job_id_item_id_key UNIQUE (job_id, item_id) DEFERRABLE INITIALLY DEFERRED;

-- uploading -> running -> completed | cancelled; uploading -> rejected | abandoned
CREATE INDEX jobs_uploading ON jobs (created_at) WHERE state = 'uploading';
