-- Several providers: each attempt names its provider, how structured output
-- was asked for, and the cached and reasoning tokens it was billed for. The
-- cost of a model without a price is unknown (NULL), not zero.
ALTER TABLE audit_attempts ADD COLUMN provider text;
ALTER TABLE audit_attempts ADD COLUMN output_mode text;
ALTER TABLE audit_attempts ADD COLUMN tokens_cached integer NOT NULL DEFAULT 0;
ALTER TABLE audit_attempts ADD COLUMN tokens_reasoning integer NOT NULL DEFAULT 0;
ALTER TABLE audit_attempts ALTER COLUMN cost_usd DROP NOT NULL;
