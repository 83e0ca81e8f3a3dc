-- A response cache entry names the result that holds its answer instead of
-- copying it, and its key is the 32-byte digest rather than 64 hex digits.
--
-- Measured with scripts/bench cost (pg_stat_statements, EXPLAIN (ANALYZE,
-- BUFFERS, WAL)): writing the entries was most of what reuse cost, about
-- 26 microseconds an entry. Every entry lands on a different leaf of an
-- index of random digests, so the smaller the index and the rows, the fewer
-- pages each chunk's entries touch and log. The answer is in `results`
-- already, which no worker may change (0010) and from which only failed
-- rows are ever deleted (resume), while entries are made only of answers.
ALTER TABLE response_cache
    DROP COLUMN call_id,
    DROP COLUMN model,
    DROP COLUMN output,
    DROP COLUMN answer,
    DROP COLUMN confidence,
    DROP COLUMN confidence_detail,
    DROP COLUMN tokens_in,
    DROP COLUMN tokens_out,
    ALTER COLUMN key TYPE bytea USING decode(key, 'hex');
