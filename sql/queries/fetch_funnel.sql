-- Returns the funnel of one trace: its decision events in time order with drop rates, plus the initial input, final output and cumulative drop; NULL when the trace has no decision event.
-- $1 trace_id uuid
WITH steps AS (
    SELECT
        e.span_id,
        e.service,
        e."timestamp",
        (e.data -> 'decision' ->> 'input_count')::bigint AS input_count,
        (e.data -> 'decision' ->> 'output_count')::bigint AS output_count,
        round(decision_drop_rate(e.data) * 100, 2) AS drop_rate_percent,
        coalesce(e.data -> 'decision' -> 'kept', '[]'::jsonb) AS kept,
        coalesce(e.data -> 'decision' -> 'dropped', '[]'::jsonb) AS dropped,
        row_number() OVER (ORDER BY e."timestamp", e.created_at, e.span_id) AS step
    FROM events AS e
    WHERE e.trace_id = $1::uuid AND e.event_type = 'decision'
),
ends AS (
    SELECT
        (SELECT steps.input_count FROM steps ORDER BY steps.step LIMIT 1) AS initial_input,
        (SELECT steps.output_count FROM steps ORDER BY steps.step DESC LIMIT 1) AS final_output
)
SELECT json_build_object(
    'trace_id', $1::uuid,
    'decision_count', count(*),
    'initial_input', ends.initial_input,
    'final_output', ends.final_output,
    'cumulative_drop_rate', round(
        (1 - ends.final_output::numeric / nullif(ends.initial_input, 0)) * 100, 2
    ),
    'funnel', json_agg(
        json_build_object(
            'step', steps.step,
            'span_id', steps.span_id,
            'service', steps.service,
            'timestamp', steps."timestamp",
            'input_count', steps.input_count,
            'output_count', steps.output_count,
            'drop_rate_percent', steps.drop_rate_percent,
            'cumulative_drop_rate_percent', round(
                (1 - steps.output_count::numeric / nullif(ends.initial_input, 0)) * 100, 2
            ),
            'kept', steps.kept,
            'dropped', steps.dropped
        )
        ORDER BY steps.step
    )
) AS document
FROM steps
CROSS JOIN ends
GROUP BY ends.initial_input, ends.final_output
HAVING count(*) > 0;
