-- Checks that the database answers; returns its clock.
SELECT now() AS database_time;
