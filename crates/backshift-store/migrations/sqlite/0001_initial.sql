CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE api_tokens (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    sha256     TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);

-- A project is a repository source; its branches live in git/<id>.git.
CREATE TABLE projects (
    id         TEXT PRIMARY KEY,
    source     TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);

CREATE TABLE tasks (
    id         TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    prompt     TEXT NOT NULL,
    repo       TEXT NOT NULL,
    base_ref   TEXT,
    agent      TEXT NOT NULL,
    limits     TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE attempts (
    id          TEXT PRIMARY KEY,
    task_id     TEXT NOT NULL REFERENCES tasks(id),
    n           INTEGER NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT,
    detail      TEXT,
    branch      TEXT NOT NULL,
    base_commit TEXT,
    head_commit TEXT,
    summary     TEXT,
    sandbox_id  TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (task_id, n)
);
CREATE INDEX attempts_state ON attempts(state);

CREATE TABLE events (
    attempt_id TEXT NOT NULL REFERENCES attempts(id),
    seq        INTEGER NOT NULL,
    ts         INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    body       TEXT NOT NULL,
    PRIMARY KEY (attempt_id, seq)
);
