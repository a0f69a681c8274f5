-- Parallel attempts: each may run its own agent (the task's when NULL),
-- and the task records the attempt chosen as its result and by whom
-- (`auto`: the best ranked once all ended; otherwise a token's name).
ALTER TABLE attempts ADD COLUMN agent TEXT;
ALTER TABLE tasks ADD COLUMN winner TEXT;
ALTER TABLE tasks ADD COLUMN winner_by TEXT;
