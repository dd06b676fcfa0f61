-- Releases the migrators' session advisory lock.
-- $1 lock_key bigint
SELECT pg_advisory_unlock($1::bigint);
