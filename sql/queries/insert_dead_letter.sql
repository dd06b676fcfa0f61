-- Stores an event that the database refused, with the refusal, so it is kept rather than lost.
-- $1 payload text
-- $2 error text
INSERT INTO dead_letter_events (payload, error)
VALUES ($1::text, $2::text);
