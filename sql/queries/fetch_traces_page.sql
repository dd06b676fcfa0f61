-- Returns one page of traces, newest start first, strictly after the keyset cursor (start_time, trace_id).
-- $1 after_start_time timestamptz ('infinity' for the first page)
-- $2 after_trace_id uuid (the largest uuid for the first page)
-- $3 page_size integer
WITH page AS (
    SELECT
        trace_id,
        start_time
    FROM traces
    WHERE (start_time, trace_id) < ($1::timestamptz, $2::uuid)
    ORDER BY start_time DESC, trace_id DESC
    LIMIT $3::integer
)
SELECT
    page.trace_id,
    page.start_time,
    summary.end_time,
    summary.event_count,
    summary.services,
    kinds.event_types
FROM page
CROSS JOIN LATERAL (
    SELECT
        max(e."timestamp" + make_interval(secs => coalesce(e.duration_ms, 0) / 1000.0)) AS end_time,
        count(*) AS event_count,
        coalesce(
            array_agg(DISTINCT e.service ORDER BY e.service) FILTER (WHERE e.service IS NOT NULL),
            '{}'
        ) AS services
    FROM events AS e
    WHERE e.trace_id = page.trace_id
) AS summary
CROSS JOIN LATERAL (
    SELECT coalesce(jsonb_object_agg(counted.event_type, counted.n), '{}'::jsonb) AS event_types
    FROM (
        SELECT
            e.event_type,
            count(*) AS n
        FROM events AS e
        WHERE e.trace_id = page.trace_id
        GROUP BY e.event_type
    ) AS counted
) AS kinds
ORDER BY page.start_time DESC, page.trace_id DESC;
