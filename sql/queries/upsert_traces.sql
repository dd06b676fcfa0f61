-- Records each trace's earliest event time and latest end (timestamp + duration); input sorted by trace_id so concurrent flushers lock rows in one order.
-- $1 trace_ids uuid[]
-- $2 start_us bigint[]: microseconds since 2000-01-01 00:00 UTC (COPY's binary format counts so)
-- $3 end_us bigint[]: the same
-- Each becomes a time as whole days, then the microseconds left: exact at any date. The one
-- product `us * interval '1 microsecond'` goes through a float8, inexact beyond 2^53 us (about
-- 285 years from 2000).
INSERT INTO traces (trace_id, start_time, end_time)
SELECT
    batch.trace_id,
    (timestamp '2000-01-01' + (batch.start_us / 86400000000) * interval '1 day'
        + (batch.start_us % 86400000000) * interval '1 microsecond') AT TIME ZONE 'UTC',
    (timestamp '2000-01-01' + (batch.end_us / 86400000000) * interval '1 day'
        + (batch.end_us % 86400000000) * interval '1 microsecond') AT TIME ZONE 'UTC'
FROM unnest($1::uuid[], $2::bigint[], $3::bigint[]) AS batch (trace_id, start_us, end_us)
ORDER BY batch.trace_id
ON CONFLICT (trace_id) DO UPDATE
SET
    start_time = least(traces.start_time, EXCLUDED.start_time),
    end_time = greatest(traces.end_time, EXCLUDED.end_time)
WHERE EXCLUDED.start_time < traces.start_time OR EXCLUDED.end_time > traces.end_time;
