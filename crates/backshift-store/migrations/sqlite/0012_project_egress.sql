-- The project's own egress rules (JSON list of backshift_core::policy::Rule),
-- decided before the server's.
ALTER TABLE projects ADD COLUMN egress_rules TEXT NOT NULL DEFAULT '[]';
