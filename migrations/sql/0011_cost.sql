-- Spending less and never by surprise: answers reused from a response cache
-- and from identical items of the same job, and budget caps that pause a job.
--
--   jobs.state:  running -> paused (budget cap reached) -> running (resume)
--   results.source: model (called), cache (an earlier answer to the same
--                   request), shared (an identical item of the same job)

ALTER TABLE jobs DROP CONSTRAINT jobs_state_known;
ALTER TABLE jobs ADD CONSTRAINT jobs_state_known
    CHECK (state IN ('uploading', 'running', 'paused', 'completed', 'cancelled', 'rejected', 'abandoned'));
-- Reuse answers (the cache, and identical items of the job): on by default
-- for temperature 0. Cache entries older than cache_ttl_s are not read.
ALTER TABLE jobs ADD COLUMN reuse boolean NOT NULL DEFAULT false;
ALTER TABLE jobs ADD COLUMN cache_ttl_s bigint NOT NULL DEFAULT 2592000 CHECK (cache_ttl_s > 0);
ALTER TABLE jobs ADD COLUMN paused_reason text;

ALTER TABLE results ADD COLUMN source text NOT NULL DEFAULT 'model'
    CHECK (source IN ('model', 'cache', 'shared'));
-- The call whose answer this is: the item's own call, or the call an answer
-- was reused from.
ALTER TABLE results ADD COLUMN answered_by uuid;
-- On an audit row of a reused answer (outcome cache or shared): the call it came from.
ALTER TABLE audit_attempts ADD COLUMN reused_call uuid;

-- Items whose prompt inputs equal those of an earlier item of the same job,
-- found at ingest. They are never sent to a worker: their result is copied
-- from the original's in the transaction that writes the original's.
CREATE TABLE item_copies (
    job_id       uuid   NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq          bigint NOT NULL,
    original_seq bigint NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE INDEX item_copies_original ON item_copies (job_id, original_seq);

-- Content-addressed answers: key is a SHA-256 of everything that determines
-- an answer (models, parameters, rendered messages, schema, confidence
-- strategy; common::cache). Scoped by project: one project's answers never
-- reveal another's documents. Written in the transaction of the results
-- that produced them.
CREATE TABLE response_cache (
    project           text        NOT NULL,
    key               text        NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    job_id            uuid        NOT NULL,
    seq               bigint      NOT NULL,
    call_id           uuid        NOT NULL,
    model             text,
    output            jsonb       NOT NULL,
    answer            text,
    confidence        double precision,
    confidence_detail jsonb,
    tokens_in         integer     NOT NULL,
    tokens_out        integer     NOT NULL,
    PRIMARY KEY (project, key)
);
CREATE INDEX response_cache_age ON response_cache (project, created_at);

-- A job's spending cap. Each call reserves its worst-case cost before it is
-- made (reserve_budget) and settles it from real usage after: spent +
-- reserved never passes the cap, and `reserved` is what calls in flight may
-- still add. `alerted` is the highest alert (50, 80, 100 percent) recorded.
CREATE TABLE job_budgets (
    job_id   uuid             PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    cap_usd  double precision NOT NULL CHECK (cap_usd > 0),
    spent    double precision NOT NULL DEFAULT 0,
    reserved double precision NOT NULL DEFAULT 0,
    alerted  integer          NOT NULL DEFAULT 0
);

-- Reserves `amount` dollars of job's budget, or, when that would pass the
-- cap, pauses the job (once, with its audit event) and returns false. Runs
-- with its owner's rights: a worker may pause a job only by this rule.
CREATE FUNCTION reserve_budget(job uuid, amount double precision) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    b job_budgets;
BEGIN
    UPDATE job_budgets SET reserved = reserved + amount
    WHERE job_id = job AND spent + reserved + amount <= cap_usd
    RETURNING * INTO b;
    IF FOUND THEN
        RETURN true;
    END IF;
    SELECT * INTO b FROM job_budgets WHERE job_id = job;
    IF NOT FOUND THEN
        RETURN true;
    END IF;
    UPDATE jobs SET state = 'paused', paused_reason = 'budget' WHERE id = job AND state = 'running';
    IF FOUND THEN
        INSERT INTO audit_events (job_id, event, actor, detail)
        VALUES (job, 'paused', 'sluice', jsonb_build_object(
            'reason', 'budget', 'cap_usd', b.cap_usd, 'spent_usd', b.spent,
            'in_flight_usd', b.reserved, 'next_call_usd', amount));
    END IF;
    RETURN false;
END $$;

-- Returns a reservation and adds what the call really cost.
CREATE FUNCTION settle_budget(job uuid, reserved_usd double precision, spent_usd double precision) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = public AS $$
    UPDATE job_budgets SET reserved = greatest(reserved - reserved_usd, 0), spent = spent + spent_usd
    WHERE job_id = job;
$$;

-- Attempts by outcome kind: answers reused from the cache or from an
-- identical item are counted apart from calls.
ALTER TABLE job_tallies ADD COLUMN cache_hits bigint NOT NULL DEFAULT 0;
ALTER TABLE job_tallies ADD COLUMN shared bigint NOT NULL DEFAULT 0;
CREATE OR REPLACE FUNCTION tally_attempts() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
BEGIN
    INSERT INTO job_tallies AS t (job_id, slot, tokens_in, tokens_out, cost_usd, unpriced, cache_hits, shared)
    SELECT job_id, pg_backend_pid() % 8, coalesce(sum(tokens_in), 0), coalesce(sum(tokens_out), 0),
           coalesce(sum(cost_usd), 0), count(*) FILTER (WHERE cost_usd IS NULL),
           count(*) FILTER (WHERE outcome = 'cache'), count(*) FILTER (WHERE outcome = 'shared')
    FROM new_rows GROUP BY job_id ORDER BY job_id
    ON CONFLICT (job_id, slot) DO UPDATE SET
        tokens_in = t.tokens_in + EXCLUDED.tokens_in,
        tokens_out = t.tokens_out + EXCLUDED.tokens_out,
        cost_usd = t.cost_usd + EXCLUDED.cost_usd,
        unpriced = t.unpriced + EXCLUDED.unpriced,
        cache_hits = t.cache_hits + EXCLUDED.cache_hits,
        shared = t.shared + EXCLUDED.shared;
    INSERT INTO job_output_modes AS m (job_id, slot, provider, model, output_mode, n)
    SELECT job_id, pg_backend_pid() % 8, coalesce(provider, ''), model, output_mode, count(*)
    FROM new_rows WHERE output_mode IS NOT NULL
    GROUP BY 1, 3, 4, 5 ORDER BY 1, 3, 4, 5
    ON CONFLICT (job_id, slot, provider, model, output_mode) DO UPDATE SET n = m.n + EXCLUDED.n;
    RETURN NULL;
END $$;

-- Workers read the cache and the copies, add or renew cache entries, and settle budgets.
GRANT SELECT, INSERT, UPDATE ON response_cache TO sluice_app;
GRANT SELECT ON item_copies, job_budgets TO sluice_app;
GRANT EXECUTE ON FUNCTION reserve_budget(uuid, double precision), settle_budget(uuid, double precision, double precision)
    TO sluice_app;
-- The coordinator writes copies at ingest, purges the cache, and sets caps.
GRANT SELECT, INSERT, DELETE ON item_copies, response_cache TO sluice_control;
GRANT SELECT, INSERT, UPDATE, DELETE ON job_budgets TO sluice_control;
