-- Records each trace's earliest event time; input sorted by trace_id so concurrent flushers lock rows in one order.
-- $1 trace_ids uuid[]
-- $2 start_times timestamptz[]
INSERT INTO traces (trace_id, start_time)
SELECT
    batch.trace_id,
    batch.start_time
FROM unnest($1::uuid[], $2::timestamptz[]) AS batch (trace_id, start_time)
ORDER BY batch.trace_id
ON CONFLICT (trace_id) DO UPDATE
SET start_time = EXCLUDED.start_time
WHERE EXCLUDED.start_time < traces.start_time;
