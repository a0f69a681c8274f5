-- SHA-256 of the attempt's model-gateway token (the plain token lives only
-- in its sandbox's environment). Valid while the attempt is active; a
-- rebuilt sandbox gets a new one.
ALTER TABLE attempts ADD COLUMN gateway_token_sha256 TEXT;
