-- Creates api_keys: one row per API key, holding only the SHA-256 of the key, its scope and whether it was revoked.
CREATE TABLE api_keys (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL CHECK (name <> '' AND length(name) <= 200),
    scope text NOT NULL CHECK (scope IN ('ingest', 'read', 'admin')),
    -- The key's first characters, so a listing can tell keys apart; not enough to use it.
    prefix text NOT NULL,
    key_hash bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
