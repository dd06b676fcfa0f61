-- Stores a new API key's hash; returns its id and creation time.
-- $1 name text
-- $2 scope text (ingest, read or admin)
-- $3 prefix text (the key's first characters)
-- $4 key_hash bytea (SHA-256 of the key)
INSERT INTO api_keys (name, scope, prefix, key_hash)
VALUES ($1::text, $2::text, $3::text, $4::bytea)
RETURNING id, created_at;
