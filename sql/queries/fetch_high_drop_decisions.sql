-- Returns {"threshold", "count", "traces"}: decision events whose drop rate (1 - output_count / input_count, input_count > 0) is at least the threshold, highest first.
-- $1 threshold numeric (0 to 1)
-- $2 service text (NULL: any)
-- $3 since timestamptz (NULL: no lower bound)
-- $4 until timestamptz (NULL: no upper bound)
-- $5 metadata_keys text[] (each event must carry metadata.key = value for every pair)
-- $6 metadata_values text[]
-- $7 row_limit integer
WITH hits AS (
    SELECT
        e.trace_id,
        e.span_id,
        e.service,
        e."timestamp",
        (e.data -> 'decision' ->> 'input_count')::bigint AS input_count,
        (e.data -> 'decision' ->> 'output_count')::bigint AS output_count,
        decision_drop_rate(e.data) AS drop_rate,
        e.data -> 'metadata' AS metadata
    FROM events AS e
    WHERE
        e.event_type = 'decision'
        AND decision_drop_rate(e.data) >= $1::numeric
        AND ($2::text IS NULL OR e.service = $2::text)
        AND e."timestamp" >= coalesce($3::timestamptz, '-infinity')
        AND e."timestamp" <= coalesce($4::timestamptz, 'infinity')
        AND NOT EXISTS (
            SELECT 1
            FROM unnest($5::text[], $6::text[]) AS tag (key, value)
            WHERE (e.data -> 'metadata' ->> tag.key) IS DISTINCT FROM tag.value
        )
    ORDER BY decision_drop_rate(e.data) DESC, e."timestamp" DESC, e.span_id
    LIMIT $7::integer
)
SELECT json_build_object(
    'threshold', $1::numeric,
    'count', count(*),
    'traces', coalesce(
        json_agg(
            json_build_object(
                'trace_id', hits.trace_id,
                'span_id', hits.span_id,
                'service', hits.service,
                'timestamp', hits."timestamp",
                'input_count', hits.input_count,
                'output_count', hits.output_count,
                'drop_rate_percent', round(hits.drop_rate * 100, 2),
                'metadata', hits.metadata
            )
            ORDER BY hits.drop_rate DESC, hits."timestamp" DESC, hits.span_id
        ),
        '[]'
    )
) AS document
FROM hits;
