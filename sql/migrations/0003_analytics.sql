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

-- Whether a trace passes the trace-list filters that look at its events (NULL or empty: no
-- filter): some event has the service, some event is of the type, some event falls in
-- [since, until], some event has an error object (or none has, for has_error = false), and for
-- each metadata key and value some event carries that tag. One pass over the trace's events.
CREATE FUNCTION trace_matches(
    trace uuid,
    service text,
    event_type text,
    since timestamptz,
    until timestamptz,
    tag_keys text[],
    tag_values text[],
    has_error boolean
) RETURNS boolean
LANGUAGE sql
STABLE
PARALLEL SAFE
RETURN (
    SELECT
        (trace_matches.service IS NULL OR bool_or(e.service = trace_matches.service))
        AND (
            trace_matches.event_type IS NULL
            OR bool_or(e.event_type = trace_matches.event_type)
        )
        AND (
            (trace_matches.since IS NULL AND trace_matches.until IS NULL)
            OR bool_or(
                e."timestamp" >= coalesce(trace_matches.since, '-infinity')
                AND e."timestamp" <= coalesce(trace_matches.until, 'infinity')
            )
        )
        AND (
            trace_matches.has_error IS NULL
            OR coalesce(bool_or(jsonb_typeof(e.data -> 'error') = 'object'), FALSE)
            = trace_matches.has_error
        )
        AND count(DISTINCT tag.position) FILTER (
            WHERE e.data -> 'metadata' ->> tag.key = tag.value
        ) = coalesce(cardinality(trace_matches.tag_keys), 0)
    FROM events AS e
    LEFT JOIN unnest(trace_matches.tag_keys, trace_matches.tag_values)
        WITH ORDINALITY AS tag (key, value, position) ON TRUE
    WHERE e.trace_id = trace_matches.trace
);
