-- Adds traces.end_time (kept by the flusher), the decision_drop_rate function, decision and metadata indexes, and the trace_summaries view.
ALTER TABLE traces ADD COLUMN end_time timestamptz;

UPDATE traces
SET end_time = spans.end_time
FROM (
    SELECT
        trace_id,
        max("timestamp" + make_interval(secs => coalesce(duration_ms, 0) / 1000.0)) AS end_time
    FROM events
    GROUP BY trace_id
) AS spans
WHERE traces.trace_id = spans.trace_id;

UPDATE traces
SET end_time = start_time
WHERE end_time IS NULL;

ALTER TABLE traces ALTER COLUMN end_time SET NOT NULL;

-- 1 - output_count / input_count of a decision event's payload; NULL when input_count is
-- missing or zero. Validation guarantees both counts are non-negative integers when present.
CREATE FUNCTION decision_drop_rate(data jsonb) RETURNS numeric
LANGUAGE sql
IMMUTABLE
PARALLEL SAFE
RETURN 1 - (data -> 'decision' ->> 'output_count')::numeric
    / nullif((data -> 'decision' ->> 'input_count')::numeric, 0);

-- Decision events by time: high-drop-traces and drop-reasons over a time window.
CREATE INDEX events_decision_time_idx ON events ("timestamp")
WHERE event_type = 'decision';

-- Decision events by drop rate, for high-drop-traces without a time window.
CREATE INDEX events_decision_drop_rate_idx ON events (decision_drop_rate(data) DESC)
WHERE event_type = 'decision';

-- Events by metadata tag (containment), so a trace filter on a rare tag finds its traces directly.
CREATE INDEX events_metadata_idx ON events USING gin ((data -> 'metadata') jsonb_path_ops);

-- One row per trace with what the trace endpoints show; computed per trace on read.
CREATE VIEW trace_summaries AS
SELECT
    t.trace_id,
    t.start_time,
    t.end_time,
    summary.event_count,
    summary.services,
    kinds.event_types
FROM traces AS t
CROSS JOIN LATERAL (
    SELECT
        count(*) AS event_count,
        coalesce(
            array_agg(DISTINCT e.service ORDER BY e.service) FILTER (WHERE e.service IS NOT NULL),
            '{}'
        ) AS services
    FROM events AS e
    WHERE e.trace_id = t.trace_id
) AS summary
CROSS JOIN LATERAL (
    SELECT coalesce(jsonb_object_agg(counted.event_type, counted.n), '{}'::jsonb) AS event_types
    FROM (
        SELECT
            e.event_type,
            count(*) AS n
        FROM events AS e
        WHERE e.trace_id = t.trace_id
        GROUP BY e.event_type
    ) AS counted
) AS kinds;
