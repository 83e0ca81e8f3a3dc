-- Who may do what: projects, API tokens and the audit of refused access.
--
-- Every job belongs to a project; a token sees only its project's jobs
-- (an admin token sees all). Jobs created before projects existed are in
-- the project "default".
ALTER TABLE jobs ADD COLUMN project text NOT NULL DEFAULT 'default';
CREATE INDEX jobs_project_created ON jobs (project, created_at DESC);

-- API tokens. The token itself is never stored: `hash` is its HMAC-SHA256
-- under the coordinator's token secret (SLUICE_TOKEN_SECRET_FILE), so a copy
-- of this table is no use without the secret. Roles, least to most:
-- reader < submitter < reviewer < admin (coordinator/src/auth.rs).
CREATE TABLE api_tokens (
    id           uuid        PRIMARY KEY,
    name         text        NOT NULL,
    project      text        NOT NULL,
    role         text        NOT NULL CHECK (role IN ('reader', 'submitter', 'reviewer', 'admin')),
    hash         bytea       NOT NULL UNIQUE,
    created_by   text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    revoked_by   text,
    -- Updated at most once a minute per token.
    last_used_at timestamptz
);

-- Who was refused what: requests without a valid token, actions a token's
-- role does not allow, and jobs of another project. Append-only like the
-- rest of the audit trail; the token itself is never recorded.
CREATE TABLE audit_access (
    id       bigserial   PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    address  text        NOT NULL,
    method   text        NOT NULL,
    path     text        NOT NULL,
    -- unauthenticated (401), forbidden (403), hidden (404: another project's job)
    outcome  text        NOT NULL CHECK (outcome IN ('unauthenticated', 'forbidden', 'hidden')),
    reason   text        NOT NULL,
    -- The token's id and name when one was presented and known.
    token_id uuid,
    actor    text
);
CREATE TRIGGER audit_access_append_only BEFORE UPDATE OR DELETE ON audit_access
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_access_no_truncate BEFORE TRUNCATE ON audit_access
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
REVOKE UPDATE, DELETE, TRUNCATE ON audit_access FROM CURRENT_USER;

-- The authenticated principal is the actor of job events and review
-- decisions; what a client claimed (x-sluice-actor, a decision file's
-- "reviewer") is kept beside it as a note.
ALTER TABLE audit_events ADD COLUMN token_id uuid;
ALTER TABLE reviews ADD COLUMN token_id uuid;
ALTER TABLE reviews ADD COLUMN named_reviewer text;

-- Tokens and refused access belong to the coordinator alone: the workers
-- never read them (deploy/roles.sql makes sluice_coordinator a member of
-- sluice_control).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sluice_control') THEN
        CREATE ROLE sluice_control NOLOGIN;
    END IF;
END $$;
GRANT USAGE ON SCHEMA public TO sluice_control;
GRANT SELECT, INSERT, UPDATE ON api_tokens TO sluice_control;
GRANT SELECT, INSERT ON audit_access TO sluice_control;
GRANT USAGE ON SEQUENCE audit_access_id_seq TO sluice_control;
