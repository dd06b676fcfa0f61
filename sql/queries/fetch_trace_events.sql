-- Returns the stored payloads of one trace's events in time order.
-- $1 trace_id uuid
SELECT data
FROM events
WHERE trace_id = $1::uuid
ORDER BY "timestamp", created_at, span_id;
