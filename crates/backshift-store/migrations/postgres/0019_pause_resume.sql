-- A person's request to stop (pause) an attempt's sandbox, for the replica
-- that drives it to act on; and to start it again, for any replica to pick
-- up. Each is cleared by the state change that carries it out.
ALTER TABLE attempts ADD COLUMN pause_requested BIGINT;
ALTER TABLE attempts ADD COLUMN resume_requested BIGINT;
