-- The `command` agent's script: the whole agent of such a task.
ALTER TABLE tasks ADD COLUMN command TEXT;
