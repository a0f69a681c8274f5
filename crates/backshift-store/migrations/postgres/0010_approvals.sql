-- A decision a person is asked for (an egress request an `ask` rule held,
-- an agent's permission request). Answered once: `pending` moves to
-- `approved`, `denied` or `expired`, never back.
CREATE TABLE approvals (
    id          TEXT PRIMARY KEY,
    attempt_id  TEXT NOT NULL REFERENCES attempts(id),
    kind        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    summary     TEXT NOT NULL,
    state       TEXT NOT NULL,
    scope       TEXT,
    answered_by TEXT,
    reason      TEXT,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    answered_at BIGINT
);
CREATE INDEX approvals_by_state ON approvals (state, created_at);
CREATE INDEX approvals_by_attempt ON approvals (attempt_id);

-- What an approval "for the task" or "for the project" allows from then
-- on, without asking again: a host and port (egress), or a tool (agent
-- permissions), for one task (task_id set) or the whole project.
CREATE TABLE grants (
    id          TEXT PRIMARY KEY,
    project_id  TEXT NOT NULL REFERENCES projects(id),
    task_id     TEXT REFERENCES tasks(id),
    kind        TEXT NOT NULL,
    target      TEXT NOT NULL,
    approval_id TEXT NOT NULL REFERENCES approvals(id),
    created_at  BIGINT NOT NULL
);
CREATE INDEX grants_by_project ON grants (project_id, kind, target);
