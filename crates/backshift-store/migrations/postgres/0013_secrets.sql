-- Secrets, encrypted (XChaCha20-Poly1305) with the key named by key_id;
-- the plain value is never stored.
CREATE TABLE secrets (
    name       TEXT PRIMARY KEY,
    sealed     TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- A project's sandboxes get the secret as environment variable `var`.
CREATE TABLE secret_grants (
    secret     TEXT NOT NULL REFERENCES secrets(name),
    project_id TEXT NOT NULL REFERENCES projects(id),
    var        TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (secret, project_id),
    UNIQUE (project_id, var)
);
