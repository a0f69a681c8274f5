-- A grant for the setup phase only: the value goes to the devcontainer's
-- postCreateCommand, never into the sandbox's environment.
ALTER TABLE secret_grants ADD COLUMN setup_only BIGINT NOT NULL DEFAULT 0;
