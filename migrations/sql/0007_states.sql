-- The states a job, a chunk and a result can be in, enforced by Postgres and
-- mirrored by `common::state::{JobState, ChunkState, ResultState}`.
--
--   jobs.state:    uploading -> running -> completed | cancelled
--                  uploading -> rejected (invalid input) | abandoned (upload never finished)
--                  completed | cancelled -> running (resume)
--   chunks.state:  pending -> done (pending again on resume)
--   results.state: succeeded | needs_review | failed; needs_review -> reviewed
ALTER TABLE jobs ADD CONSTRAINT jobs_state_known
    CHECK (state IN ('uploading', 'running', 'completed', 'cancelled', 'rejected', 'abandoned'));
ALTER TABLE chunks ADD CONSTRAINT chunks_state_known
    CHECK (state IN ('pending', 'done'));
ALTER TABLE results ADD CONSTRAINT results_state_known
    CHECK (state IN ('succeeded', 'needs_review', 'reviewed', 'failed'));

-- The publisher asks, every turn, for the next unpublished chunks of each
-- running job; without this it would step over every published one.
CREATE INDEX chunks_unpublished ON chunks (job_id, chunk_no) WHERE state = 'pending' AND published_at IS NULL;
