-- Tasks from webhooks: each signed delivery is accepted once (a replay
-- is refused), and the task remembers where it came from to report its
-- outcome there, once.
CREATE TABLE webhook_deliveries (
    source      TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (source, delivery_id)
);
ALTER TABLE tasks ADD COLUMN origin TEXT;
ALTER TABLE tasks ADD COLUMN reported_at BIGINT;
