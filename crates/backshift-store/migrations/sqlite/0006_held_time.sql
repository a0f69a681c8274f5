-- Milliseconds the attempt has spent paused or waiting for a person:
-- they do not count against its wall-time budget. Added to by the
-- transition that leaves such a state.
ALTER TABLE attempts ADD COLUMN held_ms INTEGER NOT NULL DEFAULT 0;
