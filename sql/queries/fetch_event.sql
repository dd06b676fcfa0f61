-- Returns the stored payload of the event with this span_id (the earliest, if a span_id repeats across traces).
-- $1 span_id uuid
SELECT data
FROM events
WHERE span_id = $1::uuid
ORDER BY "timestamp"
LIMIT 1;
