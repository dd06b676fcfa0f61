-- Creates events (one row per event, payload kept as sent), the span_id lookup index and the dead-letter table.
CREATE TABLE events (
    id uuid NOT NULL,
    event_type varchar(50) NOT NULL,
    trace_id uuid NOT NULL,
    span_id uuid NOT NULL,
    parent_span_id uuid,
    service varchar(255),
    "timestamp" timestamptz NOT NULL,
    duration_ms integer,
    data jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (trace_id, span_id, "timestamp")
);

CREATE INDEX events_span_id_idx ON events (span_id);

CREATE TABLE dead_letter_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payload text NOT NULL,
    error text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
