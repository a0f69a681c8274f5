-- Where the task's result was delivered: the push to its upstream and the
-- pull request (JSON: backshift_protocol::Delivery).
ALTER TABLE tasks ADD COLUMN delivery TEXT;
