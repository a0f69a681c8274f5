-- The built-in agent's conversation, message by message, so an attempt
-- can resume it after a restart or a lost sandbox.
CREATE TABLE agent_messages (
    attempt_id TEXT NOT NULL REFERENCES attempts(id),
    idx        INTEGER NOT NULL,
    body       TEXT NOT NULL,
    PRIMARY KEY (attempt_id, idx)
);

-- A checkpoint ties the working tree (a commit under
-- refs/backshift/checkpoints/<attempt> in the project's git store) to the
-- event seq and the conversation length at the end of a turn.
CREATE TABLE checkpoints (
    attempt_id TEXT NOT NULL REFERENCES attempts(id),
    n          INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    turn       INTEGER NOT NULL,
    messages   INTEGER NOT NULL,
    commit_sha TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (attempt_id, n)
);

-- When the attempt left the queue: the wall-time budget counts from here,
-- across restarts of the server.
ALTER TABLE attempts ADD COLUMN started_at INTEGER;
