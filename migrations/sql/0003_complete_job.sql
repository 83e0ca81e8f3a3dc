-- One definition of "a job is complete", used by workers after each chunk and
-- by the coordinator's reconciler: running, and no chunk pending.
CREATE FUNCTION complete_job_if_done(job uuid) RETURNS boolean LANGUAGE sql AS $$
    WITH done AS (
        UPDATE jobs SET state = 'completed', finished_at = now()
        WHERE id = job AND state = 'running'
          AND NOT EXISTS (SELECT 1 FROM chunks WHERE job_id = job AND state = 'pending')
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM done)
$$;
