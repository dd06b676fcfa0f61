-- Moves the staged batch into events, skipping events already stored (a retry repeats trace_id, span_id and timestamp).
INSERT INTO events (
    id,
    event_type,
    trace_id,
    span_id,
    parent_span_id,
    service,
    "timestamp",
    duration_ms,
    data
)
SELECT
    id,
    event_type,
    trace_id,
    span_id,
    parent_span_id,
    service,
    "timestamp",
    duration_ms,
    data
FROM events_staging
ON CONFLICT (trace_id, span_id, "timestamp") DO NOTHING;
