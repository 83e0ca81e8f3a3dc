-- History that stays small: results and the audit trail (audit_calls,
-- audit_attempts, audit_events) become tables partitioned by month (native
-- range partitioning), so old months can be dropped whole by
-- `prune_history` (`sluice admin prune --before DATE`) instead of deleted row
-- by row.
--
-- The partition key is `job_time`: when the row's job was created, read from
-- the job's id (a UUIDv7 carries its creation time in its first 48 bits;
-- `job_time(id)`). A job's results and audit rows therefore all live in the
-- month its job was created, the primary keys stay what they were plus the
-- key (a function of job_id, so (job_id, seq) is still unique), and a prune
-- removes whole jobs. Writers add `job_time(job_id)` to every insert.
--
-- Partitions:
--   <table>_p0           jobs whose id carries no time (made before Sluice used
--                        UUIDv7): job_time is the epoch, and a prune goes by
--                        their jobs.created_at and their rows' own times
--   <table>_pYYYYMM      one month (UTC): the months of the jobs already here,
--                        then created ahead by the leading coordinator
--                        (`ensure_history_partitions`, hourly)
--
-- The audit partitions keep the append-only guarantees of their parents: the
-- row triggers refusing UPDATE and DELETE are cloned to every partition by
-- Postgres, and `create_history_month` adds to each the statement trigger
-- refusing TRUNCATE and revokes UPDATE, DELETE and TRUNCATE from the owner.
-- The application roles have no rights on a partition itself (only through
-- its parent), so they cannot read around the parent's grants either.

-- The creation time of a job from its id, to the second: a UUIDv7's 48-bit
-- millisecond Unix time (RFC 9562, section 5.7); the epoch for any other
-- version (ids made before Sluice used UUIDv7). Only immutable functions on
-- the id's bytes, and not STRICT, so Postgres inlines it into each insert:
-- about 0.4 us a row, where a version on the id's text took 5 us.
CREATE FUNCTION job_time(id uuid) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN get_byte(uuid_send(id), 6) >> 4 = 7
                THEN to_timestamp((((get_byte(uuid_send(id), 0)::bigint << 40) | (get_byte(uuid_send(id), 1)::bigint << 32)
                                   | (get_byte(uuid_send(id), 2)::bigint << 24) | (get_byte(uuid_send(id), 3)::bigint << 16)
                                   | (get_byte(uuid_send(id), 4)::bigint << 8) | get_byte(uuid_send(id), 5)::bigint)
                                  / 1000)::double precision)
                ELSE to_timestamp(0) END
$$;

-- When a job was created, for a prune: its id's time, or for an id without
-- one, the row's created_at.
CREATE FUNCTION job_born(id uuid, created_at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN job_time(id) < timestamptz '1970-01-02 00:00:00+00' THEN created_at ELSE job_time(id) END
$$;

-- The four tables, rebuilt as partitioned tables with the same columns.
ALTER TABLE results RENAME TO results_unpartitioned;
ALTER TABLE audit_calls RENAME TO audit_calls_unpartitioned;
ALTER TABLE audit_attempts RENAME TO audit_attempts_unpartitioned;
ALTER TABLE audit_events RENAME TO audit_events_unpartitioned;

CREATE TABLE results (LIKE results_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
                      job_time timestamptz NOT NULL) PARTITION BY RANGE (job_time);
CREATE TABLE audit_calls (LIKE audit_calls_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
                          job_time timestamptz NOT NULL) PARTITION BY RANGE (job_time);
CREATE TABLE audit_attempts (LIKE audit_attempts_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
                             job_time timestamptz NOT NULL) PARTITION BY RANGE (job_time);
CREATE TABLE audit_events (LIKE audit_events_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
                           job_time timestamptz NOT NULL) PARTITION BY RANGE (job_time);

-- The id sequences move to the new tables (dropping the old ones would drop them).
ALTER SEQUENCE audit_attempts_id_seq OWNED BY audit_attempts.id;
ALTER SEQUENCE audit_events_id_seq OWNED BY audit_events.id;

-- Creates the partitions of `results` and the audit tables holding jobs
-- created in the month (UTC) of `month`, unless they exist (or the month is
-- the first partition's); returns how many tables it created.
CREATE FUNCTION create_history_month(month timestamptz) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    lo timestamptz := date_trunc('month', month AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    hi timestamptz := (date_trunc('month', month AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC';
    t text;
    part text;
    made integer := 0;
BEGIN
    IF lo < timestamptz '1970-02-01 00:00:00+00' THEN
        RETURN 0;
    END IF;
    FOREACH t IN ARRAY ARRAY['results', 'audit_calls', 'audit_attempts', 'audit_events'] LOOP
        part := t || '_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMM');
        CONTINUE WHEN to_regclass(part) IS NOT NULL;
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)', part, t, lo, hi);
        IF t LIKE 'audit_%' THEN
            EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only()',
                           part || '_no_truncate', part);
            EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE ON %I FROM CURRENT_USER', part);
        END IF;
        made := made + 1;
    END LOOP;
    RETURN made;
END $$;

-- Creates `t`'s first partition, for the jobs whose id carries no time.
CREATE FUNCTION create_history_first(t text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
BEGIN
    EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (MINVALUE) TO (%L)', t || '_p0', t,
                   timestamptz '1970-01-02 00:00:00+00');
    IF t LIKE 'audit_%' THEN
        EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only()',
                       t || '_p0_no_truncate', t || '_p0');
        EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE ON %I FROM CURRENT_USER', t || '_p0');
    END IF;
END $$;

-- Makes sure the partitions of this month and the next `months_ahead` exist.
CREATE FUNCTION ensure_history_partitions(months_ahead integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    made integer := 0;
BEGIN
    FOR i IN 0..greatest(months_ahead, 0) LOOP
        made := made + create_history_month(now() + make_interval(months => i));
    END LOOP;
    RETURN made;
END $$;

-- The first partitions, the months of the rows already here, the months ahead.
DO $$
DECLARE
    t text;
    m timestamptz;
BEGIN
    FOREACH t IN ARRAY ARRAY['results', 'audit_calls', 'audit_attempts', 'audit_events'] LOOP
        PERFORM create_history_first(t);
    END LOOP;
    FOR m IN SELECT DISTINCT date_trunc('month', job_time(job_id)) FROM (
                 SELECT job_id FROM results_unpartitioned UNION SELECT job_id FROM audit_calls_unpartitioned
                 UNION SELECT job_id FROM audit_attempts_unpartitioned UNION SELECT job_id FROM audit_events_unpartitioned) a
    LOOP
        PERFORM create_history_month(m);
    END LOOP;
END $$;
SELECT ensure_history_partitions(3);

-- The rows so far, before any trigger exists (their tallies are counted already).
INSERT INTO results SELECT o.*, job_time(o.job_id) FROM results_unpartitioned o;
INSERT INTO audit_calls SELECT o.*, job_time(o.job_id) FROM audit_calls_unpartitioned o;
INSERT INTO audit_attempts SELECT o.*, job_time(o.job_id) FROM audit_attempts_unpartitioned o;
INSERT INTO audit_events SELECT o.*, job_time(o.job_id) FROM audit_events_unpartitioned o;
DROP TABLE results_unpartitioned, audit_calls_unpartitioned, audit_attempts_unpartitioned, audit_events_unpartitioned;

-- Keys and indexes: those of before, with the partition key (Postgres wants
-- it in every unique index of a partitioned table).
ALTER TABLE results ADD PRIMARY KEY (job_id, seq, job_time);
ALTER TABLE results ADD FOREIGN KEY (job_id) REFERENCES jobs (id) ON DELETE CASCADE;
CREATE INDEX results_review ON results (job_id, seq) WHERE state = 'needs_review';
ALTER TABLE audit_calls ADD PRIMARY KEY (call_id, job_time);
CREATE INDEX audit_calls_job ON audit_calls (job_id, seq);
ALTER TABLE audit_attempts ADD PRIMARY KEY (id, job_time);
CREATE INDEX audit_attempts_job ON audit_attempts (job_id, seq);
ALTER TABLE audit_events ADD PRIMARY KEY (id, job_time);
CREATE INDEX audit_events_job ON audit_events (job_id, id);

-- Triggers: the tallies (0008, 0019) and the append-only guarantees (0002, 0005).
CREATE TRIGGER results_tally_insert AFTER INSERT ON results
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_results();
CREATE TRIGGER results_tally_update AFTER UPDATE ON results
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_results();
CREATE TRIGGER results_tally_delete AFTER DELETE ON results
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_results();
CREATE TRIGGER results_stage_tally_insert AFTER INSERT ON results
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_stage_answers();
CREATE TRIGGER results_stage_tally_update AFTER UPDATE ON results
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_stage_answers();
CREATE TRIGGER results_stage_tally_delete AFTER DELETE ON results
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_stage_answers();
CREATE TRIGGER audit_attempts_tally AFTER INSERT ON audit_attempts
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_attempts();
CREATE TRIGGER audit_attempts_stage_tally AFTER INSERT ON audit_attempts
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_stage_attempts();

CREATE TRIGGER audit_calls_append_only BEFORE UPDATE OR DELETE ON audit_calls
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_calls_no_truncate BEFORE TRUNCATE ON audit_calls
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_attempts_append_only BEFORE UPDATE OR DELETE ON audit_attempts
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_attempts_no_truncate BEFORE TRUNCATE ON audit_attempts
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();

-- Rights: those of before (0002, 0005, 0006, 0010).
REVOKE UPDATE, DELETE, TRUNCATE ON audit_calls, audit_attempts, audit_events FROM CURRENT_USER;
GRANT SELECT, INSERT ON results TO sluice_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON results TO sluice_control;
GRANT SELECT, INSERT ON audit_calls, audit_attempts, audit_events TO sluice_app;
GRANT EXECUTE ON FUNCTION ensure_history_partitions(integer) TO sluice_control;
REVOKE EXECUTE ON FUNCTION create_history_month(timestamptz) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION create_history_first(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION ensure_history_partitions(integer) FROM PUBLIC;

-- The budget's pause event (0011) names its job's month.
CREATE OR REPLACE FUNCTION reserve_budget(job uuid, amount double precision) RETURNS boolean
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
        INSERT INTO audit_events (job_id, event, actor, detail, job_time)
        VALUES (job, 'paused', 'sluice', jsonb_build_object(
            'reason', 'budget', 'cap_usd', b.cap_usd, 'spent_usd', b.spent,
            'in_flight_usd', b.reserved, 'next_call_usd', amount), job_time(job));
    END IF;
    RETURN false;
END $$;

-- Every prune, append-only like the rest of the audit trail (it is small:
-- one row per prune, never pruned itself).
CREATE TABLE audit_prunes (
    id          bigserial   PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL,
    before      timestamptz NOT NULL,
    -- Jobs created before this were removed (the start of before's month).
    boundary    timestamptz NOT NULL,
    partitions  text[]      NOT NULL,
    jobs        bigint      NOT NULL,
    -- Rows dropped, by table.
    rows        jsonb       NOT NULL
);
CREATE TRIGGER audit_prunes_append_only BEFORE UPDATE OR DELETE ON audit_prunes
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_prunes_no_truncate BEFORE TRUNCATE ON audit_prunes
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
REVOKE UPDATE, DELETE, TRUNCATE ON audit_prunes FROM CURRENT_USER;
GRANT SELECT ON audit_prunes TO sluice_control;

-- Removes the jobs created before the start of `before`'s month (UTC) with
-- their results and audit trail: drops the partitions that hold only such
-- jobs, then deletes the jobs (their items, chunks, reviews and tallies go
-- with them). Refuses, changing nothing, while any of those jobs is still
-- needed: not finished (uploading, running, paused: `resume` and the workers
-- need it) or with answers waiting for a reviewer. Returns what it did or,
-- when refused, {"refused": [{"job", "state", "waiting_review"}, ...]} (the
-- first 20). With `dry_run` it only reports. Runs with its owner's rights;
-- only sluice_control may call it.
CREATE FUNCTION prune_history(before timestamptz, actor text, dry_run boolean) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    boundary timestamptz := date_trunc('month', before AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    refused jsonb;
    parts text[] := ARRAY[]::text[];
    counts jsonb := '{}';
    p record;
    n bigint;
    young boolean;
    jobs_n bigint;
BEGIN
    IF before > now() THEN
        RAISE EXCEPTION 'prune before % is in the future', before USING ERRCODE = '22023';
    END IF;
    SELECT coalesce(jsonb_agg(r), '[]') INTO refused FROM (
        SELECT j.id AS job, j.state,
               coalesce((SELECT sum(t.needs_review) FROM job_tallies t WHERE t.job_id = j.id), 0)
             + (SELECT count(*) FROM stage_results s WHERE s.job_id = j.id AND s.state = 'held') AS waiting_review
        FROM jobs j
        WHERE job_born(j.id, j.created_at) < boundary
          AND (j.state IN ('uploading', 'running', 'paused')
               -- (a slot may be negative: the tallies are sums over slots)
               OR (SELECT coalesce(sum(t.needs_review), 0) FROM job_tallies t WHERE t.job_id = j.id) > 0
               OR EXISTS (SELECT 1 FROM stage_results s WHERE s.job_id = j.id AND s.state = 'held'))
        ORDER BY j.created_at LIMIT 20) r;
    IF jsonb_array_length(refused) > 0 THEN
        RETURN jsonb_build_object('boundary', boundary, 'refused', refused);
    END IF;
    -- The months that end by the boundary, and each first partition (ids
    -- without a time) once none of its rows is from the boundary on.
    FOR p IN
        SELECT c.relname::text AS name, parent.relname::text AS parent
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class parent ON parent.oid = i.inhparent
        WHERE parent.relname IN ('results', 'audit_calls', 'audit_attempts', 'audit_events')
          AND (c.relname::text ~ '_p0$'
               OR (c.relname::text ~ '_p[0-9]{6}$'
                   AND ((to_date(right(c.relname::text, 6), 'YYYYMM') + interval '1 month')::timestamp
                        AT TIME ZONE 'UTC') <= boundary))
        ORDER BY 2, 1
    LOOP
        IF p.name ~ '_p0$' THEN
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE %I >= $1)', p.name,
                           CASE p.parent WHEN 'results' THEN 'created_at' ELSE 'at' END)
                INTO young USING boundary;
            CONTINUE WHEN young;
        END IF;
        EXECUTE format('SELECT count(*) FROM %I', p.name) INTO n;
        -- An empty first partition stays (dropping it gains nothing).
        CONTINUE WHEN n = 0 AND p.name ~ '_p0$';
        parts := parts || p.name;
        counts := jsonb_set(counts, ARRAY[p.parent], to_jsonb(coalesce((counts->>p.parent)::bigint, 0) + n));
    END LOOP;
    SELECT count(*) INTO jobs_n FROM jobs j WHERE job_born(j.id, j.created_at) < boundary;
    IF NOT dry_run THEN
        FOR i IN 1..coalesce(array_length(parts, 1), 0) LOOP
            EXECUTE format('DROP TABLE %I', parts[i]);
            IF parts[i] ~ '_p0$' THEN
                PERFORM create_history_first(left(parts[i], -3));
            END IF;
        END LOOP;
        -- Their rows left in a first partition that stays go with their jobs.
        DELETE FROM jobs j WHERE job_born(j.id, j.created_at) < boundary;
        INSERT INTO audit_prunes (actor, before, boundary, partitions, jobs, rows)
        VALUES (actor, before, boundary, parts, jobs_n, counts);
    END IF;
    RETURN jsonb_build_object('boundary', boundary, 'partitions', to_jsonb(parts), 'jobs', jobs_n,
                              'rows', counts, 'dry_run', dry_run);
END $$;
REVOKE EXECUTE ON FUNCTION prune_history(timestamptz, text, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION prune_history(timestamptz, text, boolean) TO sluice_control;
