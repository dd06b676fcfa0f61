-- Returns one page of trace summaries, newest start first, strictly after the keyset cursor, keeping the traces that pass every filter given (a NULL or empty parameter is no filter).
-- $1 after_start_time timestamptz (year 9999 for the first page)
-- $2 after_trace_id uuid (the largest uuid for the first page)
-- $3 page_size integer
-- $4 service text (some event of the trace has it)
-- $5 event_type text (some event of the trace is one)
-- $6 since timestamptz (some event at or after it ...)
-- $7 until timestamptz (... and at or before it)
-- $8 metadata_keys text[] (for each key and value, some event carries metadata.key = value)
-- $9 metadata_values text[]
-- $10 min_duration_ms double precision
-- $11 has_error boolean (whether some event has an error object)
-- $12 candidate_trace_ids uuid[] (NULL: any; else only these, known to carry a rare tag)
SELECT
    t.trace_id,
    t.start_time,
    t.end_time,
    t.event_count,
    t.services,
    t.event_types
FROM trace_summaries AS t
-- One pass over the trace's events answers every per-event filter. As a lateral subquery it is
-- probed trace by trace while the newest-first walk fills the page; the planner cannot turn it
-- into a scan of every matching event, as it does with EXISTS on a common service.
CROSS JOIN LATERAL (
    SELECT
        bool_or(e.service = $4::text) AS has_service,
        bool_or(e.event_type = $5::text) AS has_event_type,
        bool_or(
            e."timestamp" >= coalesce($6::timestamptz, '-infinity')
            AND e."timestamp" <= coalesce($7::timestamptz, 'infinity')
        ) AS in_window,
        bool_or(jsonb_typeof(e.data -> 'error') = 'object') AS has_error,
        coalesce(
            array_agg(DISTINCT tag.position) FILTER (
                WHERE e.data -> 'metadata' ->> tag.key = tag.value
            ),
            '{}'
        ) AS tags_found
    FROM events AS e
    LEFT JOIN unnest($8::text[], $9::text[]) WITH ORDINALITY AS tag (key, value, position)
        ON TRUE
    WHERE e.trace_id = t.trace_id
) AS found
WHERE
    (t.start_time, t.trace_id) < ($1::timestamptz, $2::uuid)
    AND ($7::timestamptz IS NULL OR t.start_time <= $7::timestamptz)
    AND ($6::timestamptz IS NULL OR t.end_time >= $6::timestamptz)
    AND (
        $10::float8 IS NULL
        OR t.end_time - t.start_time >= make_interval(secs => $10::float8 / 1000)
    )
    AND ($12::uuid[] IS NULL OR t.trace_id = ANY($12::uuid[]))
    AND ($4::text IS NULL OR found.has_service)
    AND ($5::text IS NULL OR found.has_event_type)
    AND (($6::timestamptz IS NULL AND $7::timestamptz IS NULL) OR found.in_window)
    AND ($11::boolean IS NULL OR coalesce(found.has_error, FALSE) = $11::boolean)
    AND cardinality(found.tags_found) = cardinality($8::text[])
ORDER BY t.start_time DESC, t.trace_id DESC
LIMIT $3::integer;
