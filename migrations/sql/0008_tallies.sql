-- Running totals behind `sluice status`, kept by triggers as results and
-- attempts are written, so a status read costs the same for a job of 100 items
-- as for one of a million (it used to aggregate every result and attempt of
-- the job, ~70 ms per read at 100,000 items, several times a second while a
-- user watches).
--
-- They are derived data: every figure can be recomputed from `results` and
-- `audit_attempts` (this migration does so for existing jobs). The trigger
-- functions run as the owner; the application roles may only read the tallies.
--
-- Each table is keyed by a slot as well as the job: the writing session's
-- backend pid modulo 8. Workers writing results at the same time then add to
-- different rows instead of queuing on one row lock; a read sums the slots.

CREATE TABLE job_tallies (
    job_id         uuid             NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    slot           smallint         NOT NULL,
    -- results: every state but failed (as `status.succeeded`), and by state
    succeeded      bigint           NOT NULL DEFAULT 0,
    needs_review   bigint           NOT NULL DEFAULT 0,
    reviewed       bigint           NOT NULL DEFAULT 0,
    failed         bigint           NOT NULL DEFAULT 0,
    -- newest results.created_at written (not lowered when a result is deleted)
    last_result_at timestamptz,
    -- audit_attempts: usage of every attempt, and attempts without a price
    tokens_in      bigint           NOT NULL DEFAULT 0,
    tokens_out     bigint           NOT NULL DEFAULT 0,
    cost_usd       double precision NOT NULL DEFAULT 0,
    unpriced       bigint           NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, slot)
);

-- Results other than failed ones by confidence strategy, with the newest note
-- (an error or the reason a strategy was skipped).
CREATE TABLE job_confidence_sources (
    job_id   uuid     NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    slot     smallint NOT NULL,
    strategy text     NOT NULL,
    n        bigint   NOT NULL,
    note     text,
    PRIMARY KEY (job_id, slot, strategy)
);

-- Attempts by provider, model and structured-output mode.
CREATE TABLE job_output_modes (
    job_id      uuid     NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    slot        smallint NOT NULL,
    provider    text     NOT NULL,
    model       text     NOT NULL,
    output_mode text     NOT NULL,
    n           bigint   NOT NULL,
    PRIMARY KEY (job_id, slot, provider, model, output_mode)
);

-- One trigger function for insert, update (review decisions) and delete
-- (resume drops failed results): each passes its transition rows, signed (+1
-- written, -1 removed). PL/pgSQL, not SQL, so its plans are kept for the
-- session rather than made anew for every statement. Rows are grouped in job
-- order, so two sessions that share a slot lock rows in the same order.
CREATE FUNCTION tally_results() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    job_ids uuid[]; states text[]; created timestamptz[]; details jsonb[]; signs int[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(job_id), array_agg(state), array_agg(created_at), array_agg(confidence_detail), array_agg(1)
        INTO job_ids, states, created, details, signs FROM new_rows;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(job_id), array_agg(state), array_agg(created_at), array_agg(confidence_detail), array_agg(-1)
        INTO job_ids, states, created, details, signs FROM old_rows;
    ELSE
        SELECT array_agg(job_id), array_agg(state), array_agg(created_at), array_agg(confidence_detail), array_agg(d)
        INTO job_ids, states, created, details, signs
        FROM (SELECT job_id, state, created_at, confidence_detail, 1 AS d FROM new_rows
              UNION ALL
              SELECT job_id, state, created_at, confidence_detail, -1 FROM old_rows) c;
    END IF;
    IF job_ids IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO job_tallies AS t (job_id, slot, succeeded, needs_review, reviewed, failed, last_result_at)
    SELECT job_id, pg_backend_pid() % 8,
           coalesce(sum(d) FILTER (WHERE state <> 'failed'), 0),
           coalesce(sum(d) FILTER (WHERE state = 'needs_review'), 0),
           coalesce(sum(d) FILTER (WHERE state = 'reviewed'), 0),
           coalesce(sum(d) FILTER (WHERE state = 'failed'), 0),
           max(created_at) FILTER (WHERE d > 0)
    FROM unnest(job_ids, states, created, signs) AS u(job_id, state, created_at, d)
    GROUP BY job_id ORDER BY job_id
    ON CONFLICT (job_id, slot) DO UPDATE SET
        succeeded = t.succeeded + EXCLUDED.succeeded,
        needs_review = t.needs_review + EXCLUDED.needs_review,
        reviewed = t.reviewed + EXCLUDED.reviewed,
        failed = t.failed + EXCLUDED.failed,
        last_result_at = GREATEST(t.last_result_at, EXCLUDED.last_result_at);
    INSERT INTO job_confidence_sources AS s (job_id, slot, strategy, n, note)
    SELECT job_id, pg_backend_pid() % 8, coalesce(detail->>'strategy', 'none'), sum(d),
           max(coalesce(detail->>'error', detail->'skipped'->0->>'reason'))
    FROM unnest(job_ids, states, details, signs) AS u(job_id, state, detail, d)
    WHERE state <> 'failed'
    GROUP BY 1, 3 ORDER BY 1, 3
    ON CONFLICT (job_id, slot, strategy) DO UPDATE SET
        n = s.n + EXCLUDED.n,
        note = GREATEST(s.note, EXCLUDED.note);
    RETURN NULL;
END $$;

CREATE TRIGGER results_tally_insert AFTER INSERT ON results
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_results();
CREATE TRIGGER results_tally_update AFTER UPDATE ON results
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_results();
CREATE TRIGGER results_tally_delete AFTER DELETE ON results
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_results();

-- Attempts are only ever inserted (the audit trail is append-only).
CREATE FUNCTION tally_attempts() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
BEGIN
    INSERT INTO job_tallies AS t (job_id, slot, tokens_in, tokens_out, cost_usd, unpriced)
    SELECT job_id, pg_backend_pid() % 8, coalesce(sum(tokens_in), 0), coalesce(sum(tokens_out), 0),
           coalesce(sum(cost_usd), 0), count(*) FILTER (WHERE cost_usd IS NULL)
    FROM new_rows GROUP BY job_id ORDER BY job_id
    ON CONFLICT (job_id, slot) DO UPDATE SET
        tokens_in = t.tokens_in + EXCLUDED.tokens_in,
        tokens_out = t.tokens_out + EXCLUDED.tokens_out,
        cost_usd = t.cost_usd + EXCLUDED.cost_usd,
        unpriced = t.unpriced + EXCLUDED.unpriced;
    INSERT INTO job_output_modes AS m (job_id, slot, provider, model, output_mode, n)
    SELECT job_id, pg_backend_pid() % 8, coalesce(provider, ''), model, output_mode, count(*)
    FROM new_rows WHERE output_mode IS NOT NULL
    GROUP BY 1, 3, 4, 5 ORDER BY 1, 3, 4, 5
    ON CONFLICT (job_id, slot, provider, model, output_mode) DO UPDATE SET n = m.n + EXCLUDED.n;
    RETURN NULL;
END $$;

CREATE TRIGGER audit_attempts_tally AFTER INSERT ON audit_attempts
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_attempts();

-- Tallies of the jobs already in the database, in slot 0.
INSERT INTO job_tallies (job_id, slot, succeeded, needs_review, reviewed, failed, last_result_at)
SELECT job_id, 0, count(*) FILTER (WHERE state <> 'failed'), count(*) FILTER (WHERE state = 'needs_review'),
       count(*) FILTER (WHERE state = 'reviewed'), count(*) FILTER (WHERE state = 'failed'), max(created_at)
FROM results GROUP BY job_id;
INSERT INTO job_confidence_sources (job_id, slot, strategy, n, note)
SELECT job_id, 0, coalesce(confidence_detail->>'strategy', 'none'), count(*),
       max(coalesce(confidence_detail->>'error', confidence_detail->'skipped'->0->>'reason'))
FROM results WHERE state <> 'failed' GROUP BY 1, 3;
INSERT INTO job_tallies AS t (job_id, slot, tokens_in, tokens_out, cost_usd, unpriced)
SELECT job_id, 0, sum(tokens_in), sum(tokens_out), coalesce(sum(cost_usd), 0), count(*) FILTER (WHERE cost_usd IS NULL)
FROM audit_attempts GROUP BY job_id
ON CONFLICT (job_id, slot) DO UPDATE SET
    tokens_in = EXCLUDED.tokens_in, tokens_out = EXCLUDED.tokens_out,
    cost_usd = EXCLUDED.cost_usd, unpriced = EXCLUDED.unpriced;
INSERT INTO job_output_modes (job_id, slot, provider, model, output_mode, n)
SELECT job_id, 0, coalesce(provider, ''), model, output_mode, count(*)
FROM audit_attempts WHERE output_mode IS NOT NULL GROUP BY 1, 3, 4, 5;

GRANT SELECT ON job_tallies, job_confidence_sources, job_output_modes TO sluice_app;
