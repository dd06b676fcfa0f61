-- Returns {"count", "reasons"}: dropped[].count of decision events summed by reason, most dropped first, with the traces affected and the average share of the event's input_count.
-- $1 service text (NULL: any)
-- $2 since timestamptz (NULL: no lower bound)
-- $3 until timestamptz (NULL: no upper bound)
-- $4 metadata_keys text[] (each event must carry metadata.key = value for every pair)
-- $5 metadata_values text[]
-- $6 trace_id uuid (NULL: any)
-- $7 row_limit integer
WITH drops AS (
    SELECT
        e.trace_id,
        dropped.reason,
        dropped.count,
        (e.data -> 'decision' ->> 'input_count')::numeric AS input_count
    FROM events AS e
    CROSS JOIN LATERAL jsonb_to_recordset(
        coalesce(e.data -> 'decision' -> 'dropped', '[]'::jsonb)
    ) AS dropped (count bigint, reason text)
    WHERE
        e.event_type = 'decision'
        AND ($1::text IS NULL OR e.service = $1::text)
        AND e."timestamp" >= coalesce($2::timestamptz, '-infinity')
        AND e."timestamp" <= coalesce($3::timestamptz, 'infinity')
        AND NOT EXISTS (
            SELECT 1
            FROM unnest($4::text[], $5::text[]) AS tag (key, value)
            WHERE (e.data -> 'metadata' ->> tag.key) IS DISTINCT FROM tag.value
        )
        AND ($6::uuid IS NULL OR e.trace_id = $6::uuid)
),
reasons AS (
    SELECT
        drops.reason,
        sum(drops.count) AS total_count,
        count(DISTINCT drops.trace_id) AS affected_traces,
        count(*) AS occurrences,
        round(avg(drops.count / nullif(drops.input_count, 0) * 100), 2) AS avg_percentage
    FROM drops
    GROUP BY drops.reason
    ORDER BY total_count DESC NULLS LAST, drops.reason
    LIMIT $7::integer
)
SELECT json_build_object(
    'count', count(*),
    'reasons', coalesce(
        json_agg(
            json_build_object(
                'reason', reasons.reason,
                'total_count', reasons.total_count,
                'affected_traces', reasons.affected_traces,
                'occurrences', reasons.occurrences,
                'avg_percentage', reasons.avg_percentage
            )
            ORDER BY reasons.total_count DESC NULLS LAST, reasons.reason
        ),
        '[]'
    )
) AS document
FROM reasons;
