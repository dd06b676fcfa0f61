-- Creates this connection's staging table for batches that may repeat stored events.
CREATE TEMPORARY TABLE IF NOT EXISTS events_staging
    (LIKE events INCLUDING DEFAULTS)
    ON COMMIT DELETE ROWS;
