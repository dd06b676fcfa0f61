-- Lists the migrations already applied, in order.
SELECT
    version,
    name,
    checksum
FROM schema_migrations
ORDER BY version;
