-- Notifications: webhooks per project or per job, and every delivery.
--
--   webhooks:            where to tell (a URL, JSON or Slack-compatible body)
--   webhook_deliveries:  one row per webhook and occurrence of an event
--                        pending -> delivered | failed (attempts used up)
--   webhook_attempts:    every try, with the receiver's status or the error
--
-- Job events are queued by a trigger on jobs.state in the transaction that
-- changes it, whoever changes it (a worker finishing the last chunk, the
-- coordinator, a review decision): nothing is missed and nothing is queued
-- for a change that is rolled back. The leader's notifier sends them.
CREATE TABLE webhooks (
    id         bigserial   PRIMARY KEY,
    project    text,
    job_id     uuid        REFERENCES jobs (id) ON DELETE CASCADE,
    url        text        NOT NULL CHECK (url ~ '^https?://'),
    format     text        NOT NULL DEFAULT 'json' CHECK (format IN ('json', 'slack')),
    created_by text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((project IS NULL) <> (job_id IS NULL))
);
CREATE INDEX webhooks_project ON webhooks (project) WHERE project IS NOT NULL;
CREATE INDEX webhooks_job ON webhooks (job_id) WHERE job_id IS NOT NULL;

CREATE TABLE webhook_deliveries (
    id           bigserial   PRIMARY KEY,
    -- The Standard Webhooks message id: the same on every retry.
    message_id   uuid        NOT NULL DEFAULT gen_random_uuid(),
    webhook_id   bigint      NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    job_id       uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    event        text        NOT NULL
                 CHECK (event IN ('job.completed', 'job.failed', 'job.paused', 'review.ready', 'breaker.open')),
    -- One delivery per webhook, job and occurrence.
    occurrence   text        NOT NULL,
    detail       jsonb       NOT NULL DEFAULT '{}',
    -- The body, written at the first attempt and sent as is on every retry.
    payload      jsonb,
    state        text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts     integer     NOT NULL DEFAULT 0,
    next_at      timestamptz NOT NULL DEFAULT now(),
    last_status  integer,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    UNIQUE (webhook_id, job_id, occurrence)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id);

CREATE TABLE webhook_attempts (
    id          bigserial   PRIMARY KEY,
    delivery_id bigint      NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt     integer     NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    status      integer,
    error       text,
    duration_ms integer     NOT NULL
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id);

-- Queues a job's event for every webhook of the job and of its project.
CREATE FUNCTION queue_job_webhooks(job uuid, ev text, occurrence text, detail jsonb) RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path = public AS $$
    INSERT INTO webhook_deliveries (webhook_id, job_id, event, occurrence, detail)
    SELECT w.id, j.id, ev, occurrence, detail
    FROM jobs j JOIN webhooks w ON w.job_id = j.id OR w.project = j.project
    WHERE j.id = job
    ON CONFLICT (webhook_id, job_id, occurrence) DO NOTHING
$$;

-- jobs.state: completed -> job.completed (job.failed if every item failed),
-- and review.ready when answers wait for review; paused -> job.paused;
-- rejected | abandoned -> job.failed. The transaction id tells a second
-- pause (or a completion after a resume) from the first.
CREATE FUNCTION job_state_webhooks() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    t record;
    at text := NEW.state || '@' || txid_current();
BEGIN
    IF NOT EXISTS (SELECT 1 FROM webhooks WHERE job_id = NEW.id OR project = NEW.project) THEN
        RETURN NEW;
    END IF;
    SELECT COALESCE(sum(succeeded), 0) AS ok, COALESCE(sum(failed), 0) AS failed,
           COALESCE(sum(needs_review), 0) AS review
      INTO t FROM job_tallies WHERE job_id = NEW.id;
    IF NEW.state = 'completed' THEN
        IF t.ok = 0 AND t.failed > 0 THEN
            PERFORM queue_job_webhooks(NEW.id, 'job.failed', at, jsonb_build_object('reason', 'every item failed'));
        ELSE
            PERFORM queue_job_webhooks(NEW.id, 'job.completed', at, '{}');
        END IF;
        IF t.review > 0 THEN
            PERFORM queue_job_webhooks(NEW.id, 'review.ready', 'review@' || txid_current(),
                                       jsonb_build_object('needs_review', t.review));
        END IF;
    ELSIF NEW.state = 'paused' THEN
        PERFORM queue_job_webhooks(NEW.id, 'job.paused', at, jsonb_build_object('reason', NEW.paused_reason));
    ELSIF NEW.state IN ('rejected', 'abandoned') THEN
        PERFORM queue_job_webhooks(NEW.id, 'job.failed', at, jsonb_build_object('reason', NEW.state));
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER jobs_state_webhooks AFTER UPDATE OF state ON jobs
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION job_state_webhooks();

GRANT SELECT, INSERT, DELETE ON webhooks TO sluice_control;
GRANT SELECT, INSERT, UPDATE ON webhook_deliveries TO sluice_control;
GRANT SELECT, INSERT ON webhook_attempts TO sluice_control;
GRANT USAGE ON SEQUENCE webhooks_id_seq, webhook_deliveries_id_seq, webhook_attempts_id_seq TO sluice_control;
GRANT EXECUTE ON FUNCTION queue_job_webhooks(uuid, text, text, jsonb) TO sluice_control;
