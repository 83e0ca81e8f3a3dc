-- Each component gets only the rights it needs. Until now the coordinator and
-- the workers shared every right of sluice_app; a worker's credentials could
-- change any job's settings, delete results or create jobs.
--
--   sluice_app      (coordinator and workers) read the job tables; write
--                   results (insert only: a result is never rewritten by a
--                   worker), mark chunks done, append to the audit trail,
--                   complete a finished job through complete_job_if_done
--   sluice_control  (the coordinator only, deploy/roles.sql) also create,
--                   change and delete jobs, items, chunks, results (review
--                   decisions, resume), rejected lines and reviews, and
--                   the tokens and refused-access audit of migration 0009
REVOKE INSERT, UPDATE, DELETE ON jobs, items, chunks, results, rejected_lines, reviews FROM sluice_app;
GRANT INSERT ON results TO sluice_app;
GRANT UPDATE (state, done_at) ON chunks TO sluice_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON jobs, items, chunks, results, rejected_lines, reviews TO sluice_control;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO sluice_control;

-- The one change a worker makes to a job: completing it when no chunk is
-- pending. The function runs with its owner's rights, so the worker needs
-- no UPDATE on jobs; it can do nothing with it but apply that rule.
ALTER FUNCTION complete_job_if_done(uuid) SECURITY DEFINER SET search_path = public;
