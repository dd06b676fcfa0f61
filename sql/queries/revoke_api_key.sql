-- Revokes an active API key; returns its id, or no row when no active key has that id.
-- $1 id bigint
UPDATE api_keys
SET revoked_at = now()
WHERE id = $1::bigint
  AND revoked_at IS NULL
RETURNING id;
