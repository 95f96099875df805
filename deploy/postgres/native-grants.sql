-- pg-reflinker: what a clone without reflink_snapshot() needs (the native method).
--
-- The controller connects as streaming_replica (CNPG's certificate-authenticated role, which
-- already has REPLICATION) and runs pg_backup_start and pg_backup_stop in its own session; the
-- node plugin copies the files. Run once as a superuser in database "postgres" of the primary
-- (replicas receive the grants through replication):
--   psql -d postgres -f native-grants.sql

-- CloudNativePG creates streaming_replica when the instance first starts, after initdb has run
-- postInitSQL; create it here as CNPG would, so this script also works from postInitSQLRefs.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'streaming_replica') THEN
        CREATE ROLE streaming_replica LOGIN REPLICATION;
    END IF;
END
$$;

GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO streaming_replica;
GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO streaming_replica;
