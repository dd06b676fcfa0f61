-- Returns one trace's events in time order: span_id, parent_span_id and the stored payload.
-- $1 trace_id uuid
SELECT
    span_id,
    parent_span_id,
    data
FROM events
WHERE trace_id = $1::uuid
ORDER BY "timestamp", created_at, span_id;
