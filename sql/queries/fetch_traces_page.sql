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
-- $12 first_tag_as_text jsonb ({key: value} of the first metadata filter, value as a string)
-- $13 first_tag_as_json jsonb (the same with the value read as JSON when it is a number, true, false or null)
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
    AND (
        $4::text IS NULL
        OR EXISTS (
            SELECT 1 FROM events AS e WHERE e.trace_id = t.trace_id AND e.service = $4::text
        )
    )
    AND (
        $5::text IS NULL
        OR EXISTS (
            SELECT 1 FROM events AS e WHERE e.trace_id = t.trace_id AND e.event_type = $5::text
        )
    )
    AND (
        ($6::timestamptz IS NULL AND $7::timestamptz IS NULL)
        OR EXISTS (
            SELECT 1
            FROM events AS e
            WHERE
                e.trace_id = t.trace_id
                AND e."timestamp" >= coalesce($6::timestamptz, '-infinity')
                AND e."timestamp" <= coalesce($7::timestamptz, 'infinity')
        )
    )
    -- The first tag again, as containment: lets the GIN index find the traces of a rare tag.
    AND (
        $12::jsonb IS NULL
        OR t.trace_id IN (
            SELECT e.trace_id
            FROM events AS e
            WHERE e.data -> 'metadata' @> $12::jsonb OR e.data -> 'metadata' @> $13::jsonb
        )
    )
    AND NOT EXISTS (
        SELECT 1
        FROM unnest($8::text[], $9::text[]) AS tag (key, value)
        WHERE NOT EXISTS (
            SELECT 1
            FROM events AS e
            WHERE e.trace_id = t.trace_id AND e.data -> 'metadata' ->> tag.key = tag.value
        )
    )
    AND (
        $11::boolean IS NULL
        OR EXISTS (
            SELECT 1
            FROM events AS e
            WHERE e.trace_id = t.trace_id AND jsonb_typeof(e.data -> 'error') = 'object'
        ) = $11::boolean
    )
ORDER BY t.start_time DESC, t.trace_id DESC
LIMIT $3::integer;
