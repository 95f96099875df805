-- pg-reflinker: what a clone without reflink_snapshot() needs (the native method).
--
-- The controller connects as streaming_replica (CNPG's certificate-authenticated role, which
-- already has REPLICATION) and runs pg_backup_start and pg_backup_stop in its own session; the
-- node plugin copies the files. Run once as a superuser in database "postgres" of the primary
-- (replicas receive the grants through replication):
--   psql -d postgres -f native-grants.sql
GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO streaming_replica;
GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO streaming_replica;
