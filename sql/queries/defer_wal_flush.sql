-- Lets the current transaction's COMMIT return before its WAL is on disk: the flusher holds its events until fetch_wal_positions shows them flushed.
SET LOCAL synchronous_commit = off;
