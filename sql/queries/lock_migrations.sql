-- Takes the session advisory lock that serialises concurrent migrators.
-- $1 lock_key bigint
SELECT pg_advisory_lock($1::bigint);
