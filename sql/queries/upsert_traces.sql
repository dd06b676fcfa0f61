-- Records each trace's earliest event time and latest end (timestamp + duration); input sorted by trace_id so concurrent flushers lock rows in one order.
-- $1 trace_ids uuid[]
-- $2 start_times timestamptz[]
-- $3 end_times timestamptz[]
INSERT INTO traces (trace_id, start_time, end_time)
SELECT
    batch.trace_id,
    batch.start_time,
    batch.end_time
FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS batch (trace_id, start_time, end_time)
ORDER BY batch.trace_id
ON CONFLICT (trace_id) DO UPDATE
SET
    start_time = least(traces.start_time, EXCLUDED.start_time),
    end_time = greatest(traces.end_time, EXCLUDED.end_time)
WHERE EXCLUDED.start_time < traces.start_time OR EXCLUDED.end_time > traces.end_time;
