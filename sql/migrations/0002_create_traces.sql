-- Creates traces (one row per trace_id with its start time), kept by the flusher so trace lists page by index.
CREATE TABLE traces (
    trace_id uuid PRIMARY KEY,
    start_time timestamptz NOT NULL
);

CREATE INDEX traces_start_time_idx ON traces (start_time, trace_id);
