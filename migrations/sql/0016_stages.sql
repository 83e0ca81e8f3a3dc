-- Multi-stage kinds (`[[stages]]` in job.toml): an item goes through the
-- stages in order, each a call with its own template, schema and model.
--
--   jobs.stage_files     each stage's template and schema, frozen with the
--                        job as `template` and `output_schema` are
--   stage_results        the accepted output of every stage before the
--                        last, per item (and segment, for the split stages
--                        to come). An item that is redelivered or resumed
--                        goes on from the first stage without a row here;
--                        the rows are written by the worker in the same
--                        transaction as the chunk's results.
--                        state: succeeded | needs_review (the item went on)
--                        | held (a gate holds the item for a reviewer) |
--                        approved (a reviewer let it on, the output perhaps
--                        edited) | rejected (the item ended there: its
--                        result is a failure naming the reason). Only a
--                        review decision changes a row, and only a held one.
--   reviews.stage        a decision at a gate: the stage, the verdict
--                        (approved, edited, rejected) and a rejection's reason
--   results.stage        for a multi-stage kind, the stage whose answer or
--                        failure ended the item (NULL for a kind of one
--                        stage). The last stage's answer is the item's
--                        result, so exports and review work unchanged.
--   audit_attempts.stage the stage a call belonged to (0 for a kind of one
--                        stage): every stage's attempts and cost stay linked
--                        to their item.
ALTER TABLE jobs ADD COLUMN stage_files jsonb NOT NULL DEFAULT '[]';

CREATE TABLE stage_results (
    job_id            uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq               bigint      NOT NULL,
    stage             smallint    NOT NULL CHECK (stage >= 0),
    seg               integer     NOT NULL DEFAULT 0 CHECK (seg >= 0),
    state             text        NOT NULL
                      CHECK (state IN ('succeeded', 'needs_review', 'held', 'approved', 'rejected')),
    output            jsonb       NOT NULL,
    answer            text,
    confidence        double precision,
    confidence_detail jsonb,
    model             text,
    attempts          integer     NOT NULL,
    tokens_in         integer     NOT NULL,
    tokens_out        integer     NOT NULL,
    latency_ms        integer     NOT NULL,
    answered_by       uuid,
    worker            text        NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, seq, stage, seg)
);

ALTER TABLE results ADD COLUMN stage smallint;
ALTER TABLE audit_attempts ADD COLUMN stage smallint NOT NULL DEFAULT 0;

CREATE INDEX stage_results_held ON stage_results (job_id) WHERE state = 'held';

ALTER TABLE reviews ADD COLUMN stage smallint;
ALTER TABLE reviews ADD COLUMN verdict text CHECK (verdict IN ('approved', 'edited', 'rejected'));
ALTER TABLE reviews ADD COLUMN reason text;

-- A job is complete when no chunk is pending and no item waits at a gate.
-- (Replacing a function keeps its owner and grants; the rest is restated.)
CREATE OR REPLACE FUNCTION complete_job_if_done(job uuid) RETURNS boolean LANGUAGE sql
    SECURITY DEFINER SET search_path = public AS $$
    WITH done AS (
        UPDATE jobs SET state = 'completed', finished_at = now()
        WHERE id = job AND state = 'running'
          AND NOT EXISTS (SELECT 1 FROM chunks WHERE job_id = job AND state = 'pending')
          AND NOT EXISTS (SELECT 1 FROM stage_results WHERE job_id = job AND state = 'held')
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM done)
$$;

GRANT SELECT, INSERT ON stage_results TO sluice_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON stage_results TO sluice_control;
