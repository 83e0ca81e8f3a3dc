-- Batch queues and what batches saved.
--
-- The providers hold a limited amount of work in their batch queues, per
-- model: OpenAI counts the prompt tokens of the batches in progress ("batch
-- queue limit"), Anthropic the requests. Workers keep the cluster under the
-- limits of the providers file (batch_queue_tokens, batch_queue_requests) by
-- summing the batches they have sent and not yet collected, under an
-- advisory lock per provider and model, before they send another.
--
--   queued_tokens   the batch's prompt tokens, as estimated when it was sent
--   requests        how many requests it holds
--   answered        how many of them were answered and accepted
--   cost_usd        what its answers cost, at batch prices
--   live_cost_usd   what the same tokens cost at live prices: the difference
--                   is what the batch saved
--   state refused   the provider turned the batch away because its queue was
--                   full (OpenAI: token_limit_exceeded; Anthropic: 429). It
--                   never ran and does not count as one of the chunk's rounds.
ALTER TABLE provider_batches
    ADD COLUMN queued_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN requests integer NOT NULL DEFAULT 0,
    ADD COLUMN answered integer NOT NULL DEFAULT 0,
    ADD COLUMN cost_usd double precision NOT NULL DEFAULT 0,
    ADD COLUMN live_cost_usd double precision NOT NULL DEFAULT 0;

ALTER TABLE provider_batches DROP CONSTRAINT provider_batches_state_check;
ALTER TABLE provider_batches ADD CONSTRAINT provider_batches_state_check
    CHECK (state IN ('submitting', 'pending', 'collected', 'failed', 'refused'));

-- What a provider's queue holds: the batches sent and not yet collected.
CREATE INDEX provider_batches_queued ON provider_batches (provider, model)
    WHERE state IN ('submitting', 'pending');
