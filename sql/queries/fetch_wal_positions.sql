-- Where the WAL ends, and how far it is flushed to disk, as byte positions: a commit that returned before this ran is on disk once `flushed` reaches this `inserted` (read in the same run of the database).
SELECT
    (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint AS inserted,
    (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint AS flushed;
