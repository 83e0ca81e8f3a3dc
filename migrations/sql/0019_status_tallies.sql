-- The rest of `sluice status` kept by triggers, so a read costs the same for
-- a job of ten thousand items as for one of a million (`--watch` reads
-- twice a second, the leader's gauges every five): the job's chunks (total
-- and done, which the status counted from `chunks`) and, for multi-stage
-- jobs, where the items stand at each stage (counted from `stage_results`,
-- `results` and `audit_attempts`).
--
-- Derived data like 0008's tallies: the figures of the jobs already in the
-- database are computed here, into slot 0; the functions run as the owner.

ALTER TABLE job_tallies ADD COLUMN chunks_total bigint NOT NULL DEFAULT 0;
ALTER TABLE job_tallies ADD COLUMN chunks_done bigint NOT NULL DEFAULT 0;

-- Chunks are inserted at ingest in batches (a statement trigger) and change
-- state one at a time (done, or pending again on resume: a row trigger that
-- fires only when the state changes, not on every republish). They are only
-- deleted with their job, whose tallies go with it.
CREATE FUNCTION tally_chunks_inserted() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
BEGIN
    INSERT INTO job_tallies AS t (job_id, slot, chunks_total, chunks_done)
    SELECT job_id, pg_backend_pid() % 8, count(*), count(*) FILTER (WHERE state = 'done')
    FROM new_rows GROUP BY job_id ORDER BY job_id
    ON CONFLICT (job_id, slot) DO UPDATE SET
        chunks_total = t.chunks_total + EXCLUDED.chunks_total,
        chunks_done = t.chunks_done + EXCLUDED.chunks_done;
    RETURN NULL;
END $$;

CREATE FUNCTION tally_chunk_state() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
BEGIN
    INSERT INTO job_tallies AS t (job_id, slot, chunks_done)
    VALUES (NEW.job_id, pg_backend_pid() % 8,
            (NEW.state = 'done')::int - (OLD.state = 'done')::int)
    ON CONFLICT (job_id, slot) DO UPDATE SET chunks_done = t.chunks_done + EXCLUDED.chunks_done;
    RETURN NULL;
END $$;

CREATE TRIGGER chunks_tally_insert AFTER INSERT ON chunks
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_chunks_inserted();
CREATE TRIGGER chunks_tally_state AFTER UPDATE OF state ON chunks
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION tally_chunk_state();

-- Where a multi-stage job's items stand at each stage. `passed` counts
-- items: the segments of a split item run in order, so an item passed a
-- stage when its first segment's answer there was accepted.
CREATE TABLE job_stage_tallies (
    job_id       uuid             NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    slot         smallint         NOT NULL,
    stage        smallint         NOT NULL,
    passed       bigint           NOT NULL DEFAULT 0,
    answers      bigint           NOT NULL DEFAULT 0,
    needs_review bigint           NOT NULL DEFAULT 0,
    failed       bigint           NOT NULL DEFAULT 0,
    waiting      bigint           NOT NULL DEFAULT 0,
    attempts     bigint           NOT NULL DEFAULT 0,
    cost_usd     double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, slot, stage)
);

-- Rows in, signed (+1 written, -1 removed), as 0008's tallies take them:
-- one function per table for insert, update and delete.
CREATE FUNCTION tally_stage_results() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    job_ids uuid[]; stages smallint[]; segs int[]; states text[]; signs int[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(job_id), array_agg(stage), array_agg(seg), array_agg(state), array_agg(1)
        INTO job_ids, stages, segs, states, signs FROM new_rows;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(job_id), array_agg(stage), array_agg(seg), array_agg(state), array_agg(-1)
        INTO job_ids, stages, segs, states, signs FROM old_rows;
    ELSE
        SELECT array_agg(job_id), array_agg(stage), array_agg(seg), array_agg(state), array_agg(d)
        INTO job_ids, stages, segs, states, signs
        FROM (SELECT job_id, stage, seg, state, 1 AS d FROM new_rows
              UNION ALL
              SELECT job_id, stage, seg, state, -1 FROM old_rows) c;
    END IF;
    IF job_ids IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO job_stage_tallies AS t (job_id, slot, stage, passed, answers, needs_review, waiting)
    SELECT job_id, pg_backend_pid() % 8, stage,
           coalesce(sum(d) FILTER (WHERE seg = 0 AND state IN ('succeeded', 'needs_review', 'approved')), 0),
           coalesce(sum(d) FILTER (WHERE state IN ('succeeded', 'needs_review', 'approved')), 0),
           coalesce(sum(d) FILTER (WHERE state = 'needs_review'), 0),
           coalesce(sum(d) FILTER (WHERE state = 'held'), 0)
    FROM unnest(job_ids, stages, segs, states, signs) AS u(job_id, stage, seg, state, d)
    GROUP BY job_id, stage ORDER BY job_id, stage
    ON CONFLICT (job_id, slot, stage) DO UPDATE SET
        passed = t.passed + EXCLUDED.passed,
        answers = t.answers + EXCLUDED.answers,
        needs_review = t.needs_review + EXCLUDED.needs_review,
        waiting = t.waiting + EXCLUDED.waiting;
    RETURN NULL;
END $$;

CREATE TRIGGER stage_results_tally_insert AFTER INSERT ON stage_results
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_stage_results();
CREATE TRIGGER stage_results_tally_update AFTER UPDATE ON stage_results
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_stage_results();
CREATE TRIGGER stage_results_tally_delete AFTER DELETE ON stage_results
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_stage_results();

-- The last stage's answers are the `results` rows with a stage (single-stage
-- jobs write none: their rows are skipped at once).
CREATE FUNCTION tally_stage_answers() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    job_ids uuid[]; stages smallint[]; states text[]; signs int[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(job_id), array_agg(stage), array_agg(state), array_agg(1)
        INTO job_ids, stages, states, signs FROM new_rows WHERE stage IS NOT NULL;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(job_id), array_agg(stage), array_agg(state), array_agg(-1)
        INTO job_ids, stages, states, signs FROM old_rows WHERE stage IS NOT NULL;
    ELSE
        SELECT array_agg(job_id), array_agg(stage), array_agg(state), array_agg(d)
        INTO job_ids, stages, states, signs
        FROM (SELECT job_id, stage, state, 1 AS d FROM new_rows WHERE stage IS NOT NULL
              UNION ALL
              SELECT job_id, stage, state, -1 FROM old_rows WHERE stage IS NOT NULL) c;
    END IF;
    IF job_ids IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO job_stage_tallies AS t (job_id, slot, stage, passed, answers, needs_review, failed)
    SELECT job_id, pg_backend_pid() % 8, stage,
           coalesce(sum(d) FILTER (WHERE state <> 'failed'), 0),
           coalesce(sum(d) FILTER (WHERE state <> 'failed'), 0),
           coalesce(sum(d) FILTER (WHERE state = 'needs_review'), 0),
           coalesce(sum(d) FILTER (WHERE state = 'failed'), 0)
    FROM unnest(job_ids, stages, states, signs) AS u(job_id, stage, state, d)
    GROUP BY job_id, stage ORDER BY job_id, stage
    ON CONFLICT (job_id, slot, stage) DO UPDATE SET
        passed = t.passed + EXCLUDED.passed,
        answers = t.answers + EXCLUDED.answers,
        needs_review = t.needs_review + EXCLUDED.needs_review,
        failed = t.failed + EXCLUDED.failed;
    RETURN NULL;
END $$;

CREATE TRIGGER results_stage_tally_insert AFTER INSERT ON results
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_stage_answers();
CREATE TRIGGER results_stage_tally_update AFTER UPDATE ON results
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_stage_answers();
CREATE TRIGGER results_stage_tally_delete AFTER DELETE ON results
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_stage_answers();

-- Attempts and their cost by stage, for multi-stage jobs only (every other
-- job's attempts are stage 0 and already in job_tallies).
CREATE FUNCTION tally_stage_attempts() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
BEGIN
    INSERT INTO job_stage_tallies AS t (job_id, slot, stage, attempts, cost_usd)
    SELECT a.job_id, pg_backend_pid() % 8, a.stage, count(*), coalesce(sum(a.cost_usd), 0)
    FROM new_rows a
    WHERE a.job_id IN (SELECT j.id FROM jobs j
                       WHERE j.id IN (SELECT DISTINCT job_id FROM new_rows)
                         AND jsonb_array_length(coalesce(j.spec->'stages', '[]')) > 0)
    GROUP BY a.job_id, a.stage ORDER BY a.job_id, a.stage
    ON CONFLICT (job_id, slot, stage) DO UPDATE SET
        attempts = t.attempts + EXCLUDED.attempts,
        cost_usd = t.cost_usd + EXCLUDED.cost_usd;
    RETURN NULL;
END $$;

CREATE TRIGGER audit_attempts_stage_tally AFTER INSERT ON audit_attempts
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_stage_attempts();

-- The figures of the jobs already in the database, in slot 0.
INSERT INTO job_tallies AS t (job_id, slot, chunks_total, chunks_done)
SELECT job_id, 0, count(*), count(*) FILTER (WHERE state = 'done') FROM chunks GROUP BY job_id
ON CONFLICT (job_id, slot) DO UPDATE SET chunks_total = EXCLUDED.chunks_total, chunks_done = EXCLUDED.chunks_done;

INSERT INTO job_stage_tallies AS t (job_id, slot, stage, passed, answers, needs_review, failed, waiting, attempts, cost_usd)
SELECT job_id, 0, stage, sum(passed), sum(answers), sum(needs_review), sum(failed), sum(waiting), sum(attempts), sum(cost)
FROM (SELECT job_id, stage,
             count(*) FILTER (WHERE seg = 0 AND state IN ('succeeded', 'needs_review', 'approved')) AS passed,
             count(*) FILTER (WHERE state IN ('succeeded', 'needs_review', 'approved')) AS answers,
             count(*) FILTER (WHERE state = 'needs_review') AS needs_review, 0 AS failed,
             count(*) FILTER (WHERE state = 'held') AS waiting, 0 AS attempts, 0 AS cost
      FROM stage_results GROUP BY job_id, stage
      UNION ALL
      SELECT job_id, stage, count(*) FILTER (WHERE state <> 'failed'), count(*) FILTER (WHERE state <> 'failed'),
             count(*) FILTER (WHERE state = 'needs_review'), count(*) FILTER (WHERE state = 'failed'), 0, 0, 0
      FROM results WHERE stage IS NOT NULL GROUP BY job_id, stage
      UNION ALL
      SELECT a.job_id, a.stage, 0, 0, 0, 0, 0, count(*), coalesce(sum(a.cost_usd), 0)
      FROM audit_attempts a JOIN jobs j ON j.id = a.job_id
      WHERE jsonb_array_length(coalesce(j.spec->'stages', '[]')) > 0
      GROUP BY a.job_id, a.stage) s
GROUP BY job_id, stage;

GRANT SELECT ON job_stage_tallies TO sluice_app;
