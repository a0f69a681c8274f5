-- The audit log: every API mutation and every policy decision, append-only.
-- Each row's hash covers its content and the previous row's hash, so an
-- edited, inserted or deleted row breaks the chain (`backshift audit
-- verify`).
CREATE TABLE audit_log (
    seq       BIGINT PRIMARY KEY,
    ts        BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT NOT NULL,
    detail    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
