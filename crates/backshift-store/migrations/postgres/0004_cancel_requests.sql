-- A cancellation asked of a replica that does not drive the attempt: the
-- driving replica sees it on its next heartbeat and ends the attempt.
ALTER TABLE attempts ADD COLUMN cancel_requested BIGINT;
