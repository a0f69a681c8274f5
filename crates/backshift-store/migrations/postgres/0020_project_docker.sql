-- Whether a project's sandboxes get a Docker engine of their own (opt-in:
-- the engine runs privileged).
ALTER TABLE projects ADD COLUMN docker_engine BIGINT NOT NULL DEFAULT 0;
