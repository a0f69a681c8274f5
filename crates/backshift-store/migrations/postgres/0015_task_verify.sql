-- A verify command given with the task: it overrides the repository's
-- backshift.toml and the server's [verify] command.
ALTER TABLE tasks ADD COLUMN verify TEXT;
