-- The newest filesystem snapshot (an image) of the attempt's sandbox: a
-- rebuilt sandbox starts from it. Removed with the attempt's end.
ALTER TABLE attempts ADD COLUMN snapshot_image TEXT;

-- The sandbox whose checkout was completely copied in: only that one may
-- be adopted as it is after a restart (one interrupted while being
-- prepared is rebuilt).
ALTER TABLE attempts ADD COLUMN prepared_sandbox TEXT;
