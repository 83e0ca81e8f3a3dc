-- Batch mode: a job may send its calls through the providers' batch APIs
-- (half the price, answered within hours) instead of live calls.
--
--   jobs.mode          live (each item a call) | batch (each chunk's items a
--                      provider batch) | auto (batch, and live for what a
--                      batch did not answer, small remainders, and whatever
--                      is left near the deadline)
--   jobs.deadline      auto: when the job should be done
--   provider_batches   one row per batch a chunk has sent: which items, the
--                      provider's batch id once created, and whether its
--                      answers are collected. A chunk's batches are numbered
--                      by round: items a batch did not answer (failed,
--                      expired) go in the chunk's next round. Workers insert
--                      a row before creating the provider's batch and set its
--                      id after, so a worker that restarts polls the batch
--                      rather than sending it again.
ALTER TABLE jobs ADD COLUMN mode text NOT NULL DEFAULT 'live';
ALTER TABLE jobs ADD CONSTRAINT jobs_mode_known CHECK (mode IN ('live', 'batch', 'auto'));
ALTER TABLE jobs ADD COLUMN deadline timestamptz;

CREATE TABLE provider_batches (
    job_id      uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    chunk_no    integer     NOT NULL,
    generation  integer     NOT NULL,
    round       integer     NOT NULL,
    provider    text        NOT NULL,
    model       text        NOT NULL,
    -- The provider's id of the batch; NULL while it is being created.
    batch_id    text,
    -- submitting -> pending -> collected, or failed (refused, or never created)
    state       text        NOT NULL DEFAULT 'submitting'
                CHECK (state IN ('submitting', 'pending', 'collected', 'failed')),
    seqs        bigint[]    NOT NULL,
    -- A capped job's budget held for the batch's worst case until it is
    -- collected (reserve_budget, settle_budget).
    reserved_usd double precision NOT NULL DEFAULT 0,
    -- Why the batch failed as a whole, or the last failure of its requests.
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz,
    PRIMARY KEY (job_id, chunk_no, generation, round)
);

GRANT SELECT, INSERT, UPDATE ON provider_batches TO sluice_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON provider_batches TO sluice_control;
