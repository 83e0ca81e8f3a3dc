-- Jobs, their chunks, items and results. Postgres is the source of truth:
-- a job is complete when every one of its chunks is done, whatever NATS says.

CREATE TABLE jobs (
    id              uuid PRIMARY KEY,
    kind            text        NOT NULL,
    -- The resolved job kind (job.toml as JSON), prompt template and output
    -- schema, frozen at submission so later edits to jobs/ do not change a
    -- running job.
    spec            jsonb       NOT NULL,
    template        text        NOT NULL,
    template_hash   text        NOT NULL,
    output_schema   jsonb       NOT NULL,
    -- uploading -> running -> completed | cancelled; uploading -> rejected
    state           text        NOT NULL DEFAULT 'uploading',
    input_name      text,
    total_items     bigint      NOT NULL DEFAULT 0,
    invalid_lines   bigint      NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz
);

CREATE INDEX jobs_created_at ON jobs (created_at DESC);

-- One row per input line. `seq` is the 1-based position among accepted lines
-- and the unit chunk messages refer to; `item_id` is the user's own id.
CREATE TABLE items (
    job_id   uuid   NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq      bigint NOT NULL,
    item_id  text   NOT NULL,
    line_no  bigint NOT NULL,
    payload  jsonb  NOT NULL,
    PRIMARY KEY (job_id, seq),
    UNIQUE (job_id, item_id)
);

-- Lines refused at ingest with --skip-invalid, kept so nothing is lost silently.
CREATE TABLE rejected_lines (
    job_id   uuid   NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    line_no  bigint NOT NULL,
    reason   text   NOT NULL,
    PRIMARY KEY (job_id, line_no)
);

-- A chunk is a contiguous range of seqs; its NATS message carries only the
-- job id, chunk number and range.
CREATE TABLE chunks (
    job_id        uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    chunk_no      integer     NOT NULL,
    first_seq     bigint      NOT NULL,
    last_seq      bigint      NOT NULL,
    -- pending -> done
    state         text        NOT NULL DEFAULT 'pending',
    -- Bumped each time the reconciler republishes the chunk; part of the
    -- Nats-Msg-Id so a republish is not swallowed by JetStream dedupe.
    generation    integer     NOT NULL DEFAULT 0,
    published_at  timestamptz,
    done_at       timestamptz,
    PRIMARY KEY (job_id, chunk_no)
);

CREATE INDEX chunks_pending ON chunks (job_id) WHERE state = 'pending';

-- Exactly one row per item once it has been processed, whatever the number
-- of deliveries: writers upsert on (job_id, seq).
CREATE TABLE results (
    job_id         uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq            bigint      NOT NULL,
    item_id        text        NOT NULL,
    -- succeeded | failed
    state          text        NOT NULL,
    output         jsonb,
    -- Classification label or other short answer, for quick export and checks.
    answer         text,
    confidence     double precision,
    error_class    text,
    error          text,
    model          text,
    template_hash  text        NOT NULL,
    attempts       integer     NOT NULL,
    tokens_in      integer     NOT NULL DEFAULT 0,
    tokens_out     integer     NOT NULL DEFAULT 0,
    latency_ms     integer     NOT NULL DEFAULT 0,
    worker         text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, seq)
);
