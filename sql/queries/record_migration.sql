-- Records one applied migration (run in the migration's own transaction).
-- $1 version integer
-- $2 name text
-- $3 checksum text
INSERT INTO schema_migrations (version, name, checksum)
VALUES ($1::integer, $2::text, $3::text);
