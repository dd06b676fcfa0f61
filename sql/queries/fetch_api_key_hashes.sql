-- What the server checks keys against: each key's hash and scope, and whether it was revoked.
SELECT id, scope, key_hash, revoked_at IS NOT NULL AS revoked
FROM api_keys;
