-- Returns {"field", "values"}: the distinct values of metadata.<field> with how many events carry each, most common first.
-- $1 field text
-- $2 event_type text (NULL: any)
-- $3 row_limit integer
WITH counted AS (
    SELECT
        e.data -> 'metadata' ->> $1::text AS value,
        count(*) AS n
    FROM events AS e
    WHERE e.data -> 'metadata' ? $1::text AND ($2::text IS NULL OR e.event_type = $2::text)
    GROUP BY 1
    ORDER BY n DESC, value
    LIMIT $3::integer
)
SELECT json_build_object(
    'field', $1::text,
    'values', coalesce(
        json_agg(json_build_object('value', counted.value, 'count', counted.n) ORDER BY counted.n DESC, counted.value),
        '[]'
    )
) AS document
FROM counted;
