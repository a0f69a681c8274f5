-- Several servers can share one database: each active attempt is driven
-- by the replica holding its lease, renewed by heartbeats; an expired
-- lease lets another replica take the attempt over.
ALTER TABLE attempts ADD COLUMN owner TEXT;
ALTER TABLE attempts ADD COLUMN lease_until INTEGER;

-- The replica that wrote each event (who drove the attempt then).
ALTER TABLE events ADD COLUMN driver TEXT;
