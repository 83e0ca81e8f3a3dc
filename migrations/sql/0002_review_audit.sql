-- Confidence, the review queue and the audit trail.

-- How each result's confidence was reached (strategy, raw score, penalties).
ALTER TABLE results ADD COLUMN confidence_detail jsonb;
-- The human decision, once a reviewer has made one (see reviews).
ALTER TABLE results ADD COLUMN human_answer text;
ALTER TABLE results ADD COLUMN reviewer text;
ALTER TABLE results ADD COLUMN reviewed_at timestamptz;

-- The review threshold of a job: the kind's, or the one given at submit.
ALTER TABLE jobs ADD COLUMN review_below double precision;
-- Who submitted the job.
ALTER TABLE jobs ADD COLUMN submitted_by text;

CREATE INDEX results_review ON results (job_id, seq) WHERE state = 'needs_review';

-- Every human decision imported, in order; the latest per item is shown.
CREATE TABLE reviews (
    id          bigserial   PRIMARY KEY,
    job_id      uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq         bigint      NOT NULL,
    answer      text        NOT NULL,
    reviewer    text        NOT NULL,
    decided_at  timestamptz NOT NULL,
    imported_at timestamptz NOT NULL DEFAULT now(),
    source      text        NOT NULL
);

-- The audit trail: every model attempt and every job event. Append-only:
-- the application role may not change it, and a trigger refuses changes even
-- to the tables' owner. No foreign keys, so it outlives the rows it describes.
CREATE TABLE audit_attempts (
    id             bigserial   PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    job_id         uuid        NOT NULL,
    seq            bigint      NOT NULL,
    item_id        text        NOT NULL,
    attempt        integer     NOT NULL,
    worker         text        NOT NULL,
    model          text        NOT NULL,
    fallback       boolean     NOT NULL,
    template_hash  text        NOT NULL,
    request_hash   text        NOT NULL,
    outcome        text        NOT NULL,
    error_class    text,
    http_status    integer,
    latency_ms     integer     NOT NULL,
    tokens_in      integer     NOT NULL,
    tokens_out     integer     NOT NULL,
    cost_usd       double precision NOT NULL,
    api_key_id     text        NOT NULL,
    -- Redacted copies: e-mail addresses, phone, card and IBAN numbers are
    -- replaced by a hash and length.
    prompt         text        NOT NULL,
    output         text
);
CREATE INDEX audit_attempts_job ON audit_attempts (job_id, seq);

CREATE TABLE audit_events (
    id      bigserial   PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    job_id  uuid        NOT NULL,
    event   text        NOT NULL,
    actor   text        NOT NULL,
    detail  jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_events_job ON audit_events (job_id, id);

CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER audit_attempts_append_only BEFORE UPDATE OR DELETE ON audit_attempts
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_attempts_no_truncate BEFORE TRUNCATE ON audit_attempts
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();

-- The role running the migrations is the application's role.
REVOKE UPDATE, DELETE, TRUNCATE ON audit_attempts, audit_events FROM CURRENT_USER;
