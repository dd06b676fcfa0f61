-- Returns one page of trace summaries, newest start first, strictly after the keyset cursor, keeping the traces that pass every filter given (a NULL or empty parameter is no filter). Walks the traces newest first, checking each until the page is full.
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
SELECT
    t.trace_id,
    t.start_time,
    t.end_time,
    t.event_count,
    t.services,
    t.event_types
FROM trace_summaries AS t
WHERE
    (t.start_time, t.trace_id) < ($1::timestamptz, $2::uuid)
    AND ($7::timestamptz IS NULL OR t.start_time <= $7::timestamptz)
    AND ($6::timestamptz IS NULL OR t.end_time >= $6::timestamptz)
    AND (
        $10::float8 IS NULL
        OR t.end_time - t.start_time >= make_interval(secs => $10::float8 / 1000)
    )
    AND trace_matches(
        t.trace_id,
        $4::text,
        $5::text,
        $6::timestamptz,
        $7::timestamptz,
        $8::text[],
        $9::text[],
        $11::boolean
    )
ORDER BY t.start_time DESC, t.trace_id DESC
LIMIT $3::integer;
