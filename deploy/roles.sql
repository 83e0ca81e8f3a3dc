-- Postgres roles of a Sluice deployment. Run once per cluster as a superuser
-- (psql -f deploy/roles.sql), with your own passwords:
--
--   sluice              owns the database and its tables; runs the migrations
--                       (`sluice migrate`, or SLUICE_MIGRATE_DATABASE_URL).
--                       Used for nothing else.
--   sluice_coordinator  the coordinator's SLUICE_DATABASE_URL; also a member of
--                       sluice_control, the only role that may read API tokens
--                       and the audit of refused access
--   sluice_worker       the workers' SLUICE_DATABASE_URL
--
-- The login roles are members of sluice_app, which may read jobs, items,
-- chunks and results, insert results, mark chunks done, and only read and
-- append to the audit trail (audit_calls, audit_attempts, audit_events): they
-- own nothing, so they cannot disable its triggers, grant themselves UPDATE or
-- DELETE, truncate or drop it. The coordinator is also a member of
-- sluice_control, which may create and change jobs and results and manage API
-- tokens; a worker's role cannot (migrations 0009, 0010; tests/tests/roles.rs).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sluice_app') THEN
        CREATE ROLE sluice_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sluice_control') THEN
        CREATE ROLE sluice_control NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sluice') THEN
        CREATE ROLE sluice LOGIN CREATEDB PASSWORD 'change-me-owner';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sluice_coordinator') THEN
        CREATE ROLE sluice_coordinator LOGIN PASSWORD 'change-me-coordinator' IN ROLE sluice_app, sluice_control;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sluice_worker') THEN
        CREATE ROLE sluice_worker LOGIN PASSWORD 'change-me-worker' IN ROLE sluice_app;
    END IF;
END $$;
-- Then, as sluice: CREATE DATABASE sluice;  and `sluice migrate`.
