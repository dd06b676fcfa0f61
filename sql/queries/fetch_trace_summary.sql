-- Returns the summary of one trace, or no row for an unknown trace.
-- $1 trace_id uuid
SELECT
    trace_id,
    start_time,
    end_time,
    event_count,
    services,
    event_types
FROM trace_summaries
WHERE trace_id = $1::uuid;
