-- An audit trail even its owner's application cannot rewrite: the tables
-- belong to the role that runs the migrations (the owner), and the
-- coordinator and workers connect as login roles that are members of
-- sluice_app, which may read and append to the audit trail and nothing more.
-- A role that does not own a table cannot ALTER it (so cannot disable its
-- triggers), DROP it, TRUNCATE it or grant anything on it. Login roles are
-- created by the database administrator: see deploy/roles.sql.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sluice_app') THEN
        CREATE ROLE sluice_app NOLOGIN;
    END IF;
END $$;

GRANT USAGE ON SCHEMA public TO sluice_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON jobs, items, chunks, results, rejected_lines, reviews TO sluice_app;
GRANT SELECT, INSERT ON audit_attempts, audit_events, audit_calls TO sluice_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO sluice_app;
GRANT EXECUTE ON FUNCTION complete_job_if_done(uuid) TO sluice_app;
-- So a coordinator can tell whether the schema is up to date.
GRANT SELECT ON _sqlx_migrations TO sluice_app;
