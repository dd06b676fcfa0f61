-- Returns the trace_id of up to row_limit events carrying a metadata tag (repeats included), through the GIN index: few rows mean a rare tag.
-- $1 tag_as_text jsonb ({key: value}, the value as a string)
-- $2 tag_as_json jsonb (the same with the value read as JSON when it is a number, true, false or null)
-- $3 row_limit integer
SELECT e.trace_id
FROM events AS e
WHERE e.data -> 'metadata' @> $1::jsonb OR e.data -> 'metadata' @> $2::jsonb
LIMIT $3::integer;
