-- The review page's undo: a decision taken back is recorded, not erased.
--   reviews.verdict 'undone'  the row takes back the decision `undoes` names;
--                             the decision before it (if any) stands again
ALTER TABLE reviews ADD COLUMN undoes bigint REFERENCES reviews (id);
ALTER TABLE reviews DROP CONSTRAINT reviews_verdict_check;
ALTER TABLE reviews ADD CONSTRAINT reviews_verdict_check
    CHECK (verdict IN ('approved', 'edited', 'rejected', 'undone'));
CREATE UNIQUE INDEX reviews_undoes ON reviews (undoes) WHERE undoes IS NOT NULL;
