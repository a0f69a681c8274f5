-- How many agent_messages rows make up the attempt's conversation as it
-- is now, mid-turn included (checkpoints hold the length at turn ends).
-- A control plane that restarts while the sandbox lives continues from
-- here, tool calls already decided included.
ALTER TABLE attempts ADD COLUMN conversation_len INTEGER;
