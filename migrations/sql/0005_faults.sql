-- Surviving faults: duplicate ids found by Postgres, abandoned uploads, every
-- model call audited before it is made, and an audit trail the application
-- cannot rewrite.

-- Duplicate ids are looked for after the COPY (not in the coordinator's
-- memory), so uniqueness is checked at commit rather than row by row.
ALTER TABLE items DROP CONSTRAINT items_job_id_item_id_key;
ALTER TABLE items ADD CONSTRAINT items_job_id_item_id_key UNIQUE (job_id, item_id) DEFERRABLE INITIALLY DEFERRED;

-- uploading -> running -> completed | cancelled; uploading -> rejected | abandoned
CREATE INDEX jobs_uploading ON jobs (created_at) WHERE state = 'uploading';

-- Every model call is recorded here before it is made (batched with others),
-- and in audit_attempts with its outcome once it is answered. A call that has
-- no audit_attempts row was cut off by a crash: an unfinished attempt.
CREATE TABLE audit_calls (
    call_id        uuid        PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    job_id         uuid        NOT NULL,
    seq            bigint      NOT NULL,
    item_id        text        NOT NULL,
    attempt        integer     NOT NULL,
    worker         text        NOT NULL,
    provider       text        NOT NULL,
    model          text        NOT NULL,
    request_hash   text        NOT NULL
);
CREATE INDEX audit_calls_job ON audit_calls (job_id, seq);
ALTER TABLE audit_attempts ADD COLUMN call_id uuid;

CREATE TRIGGER audit_calls_append_only BEFORE UPDATE OR DELETE ON audit_calls
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_calls_no_truncate BEFORE TRUNCATE ON audit_calls
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
REVOKE UPDATE, DELETE, TRUNCATE ON audit_calls FROM CURRENT_USER;
