-- Warm sandboxes are made before any attempt exists, so their labels
-- cannot name one: which attempt took a warm sandbox is recorded here.
CREATE TABLE sandbox_claims (
    sandbox_id TEXT PRIMARY KEY,
    attempt_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    claimed_at BIGINT NOT NULL
);
CREATE INDEX sandbox_claims_attempt ON sandbox_claims (attempt_id);
