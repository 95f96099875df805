-- pg-reflinker: reference implementation of reflink_snapshot(label).
--
-- Install as a superuser in database "postgres" of the source instance:
--   psql -d postgres -f reflink_snapshot.sql
--
-- reflink_snapshot(label) makes a self-contained, consistent copy of the running data directory
-- in a directory named <label> (a lowercase UUID), with the data directory at <label>/pgdata,
-- and returns the <label> directory's path as the server sees it. Every file is a reflink clone
-- (cp --reflink=always), so the copy costs metadata only; a filesystem that cannot reflink makes
-- the call fail rather than copy bytes.
--
-- Where the copy lands (same filesystem as the data directory, so reflinks work):
--   * default: <parent of data_directory>/.pg-reflinker/<label>, i.e. inside the volume that
--     holds PGDATA (what an unmodified CloudNativePG pod can write);
--   * <pg_reflinker.hostpath_prefix>/<label> when that setting is set in the server's
--     configuration files (a SET in the calling session is ignored), e.g.
--     ALTER SYSTEM SET pg_reflinker.hostpath_prefix = '/var/lib/pg-reflinker';
--     SELECT pg_reload_conf();
--
-- The copy is taken between pg_backup_start(label, true) and pg_backup_stop(false) in one call.
-- backup_label and tablespace_map are written byte for byte from pg_backup_stop; pg_wal is
-- copied after the stop, from the backup's start segment on, and a temporary physical
-- replication slot keeps that WAL from being recycled while the copy runs. The work happens in
-- <label>.partial, renamed into place when complete. A second call with the same label returns
-- the finished directory without copying; a leftover <label>.partial is removed first. A pg_wal
-- that links to another filesystem (a separate WAL volume) is supported: the clone gets a
-- pg_wal directory of its own, with the backup's WAL copied into it.
--
-- Core PostgreSQL only: plpgsql, COPY ... TO PROGRAM (as the function owner, a superuser), and
-- cp, mv, rm, mkdir, base64 from coreutils on the server.

-- Helpers live in their own schema, out of every caller's search_path.
CREATE SCHEMA IF NOT EXISTS reflinker;
REVOKE ALL ON SCHEMA reflinker FROM PUBLIC;

CREATE OR REPLACE FUNCTION reflinker.sh_quote(value text)
RETURNS text
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog
AS $$ SELECT '''' || replace(value, '''', '''\''''') || '''' $$;

CREATE OR REPLACE FUNCTION reflinker.run(script text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
BEGIN
    -- The program reads the one row COPY sends to its stdin before it does anything: a
    -- program that exits without reading can make COPY fail with "Broken pipe" under load.
    -- A non-zero exit raises an error.
    EXECUTE format('COPY (SELECT 1) TO PROGRAM %L', 'cat > /dev/null; set -eu; ' || script);
END
$$;

CREATE OR REPLACE FUNCTION public.reflink_snapshot(label text)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    datadir  text := current_setting('data_directory');
    -- Read from the configuration files (postgresql.conf, ALTER SYSTEM), never from the
    -- session: a caller's SET must not choose where the copy lands.
    prefix   text := (SELECT nullif(f.setting, '') FROM pg_catalog.pg_file_settings f
                      WHERE f.name = 'pg_reflinker.hostpath_prefix' AND f.applied
                      ORDER BY f.seqno DESC LIMIT 1);
    base     text;
    target   text;
    partial  text;
    dst      text;
    slot     text := 'pg_reflinker_' || replace(label, '-', '_');
    -- Directories whose contents a copy leaves out (as pg_basebackup does); pg_wal comes last.
    emptied  text[] := ARRAY['pg_wal', 'pg_replslot', 'pg_stat_tmp', 'pg_dynshmem', 'pg_notify',
                             'pg_serial', 'pg_snapshots', 'pg_subtrans'];
    -- Files that describe the running server, not the data.
    skipped  text[] := ARRAY['postmaster.pid', 'postmaster.opts', 'backup_label',
                             'tablespace_map', 'backup_label.old', 'standby.signal',
                             'recovery.signal'];
    entries  text := '';
    name     text;
    start_lsn pg_lsn;
    seg_size bigint := pg_size_bytes(current_setting('wal_segment_size'));
    segno    numeric;
    start_seg text;
    wal      text := '';
    stop     record;
BEGIN
    IF label IS NULL OR label !~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        RAISE EXCEPTION 'reflink_snapshot: label % is not a lowercase UUID', quote_nullable(label)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF prefix IS NOT NULL THEN
        base := rtrim(prefix, '/');
    ELSE
        base := regexp_replace(datadir, '/[^/]+/?$', '') || '/.pg-reflinker';
    END IF;
    target := base || '/' || label;
    partial := target || '.partial';
    dst := partial || '/pgdata';

    -- One session per label; a concurrent call fails at once instead of waiting.
    IF NOT pg_try_advisory_xact_lock(hashtextextended('pg_reflinker:' || label, 0)) THEN
        RAISE EXCEPTION 'reflink_snapshot: snapshot % is already being taken by another session', label
            USING ERRCODE = 'object_in_use';
    END IF;

    -- Finished before: return it untouched.
    IF (pg_stat_file(target || '/pgdata/PG_VERSION', true)).size IS NOT NULL THEN
        RETURN target;
    END IF;

    SELECT string_agg(quote_ident(spcname), ', ' ORDER BY spcname) INTO name
      FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global');
    IF name IS NOT NULL THEN
        RAISE EXCEPTION 'reflink_snapshot: tablespaces % cannot be cloned (they live outside the data directory); move their objects to pg_default', name
            USING ERRCODE = 'feature_not_supported';
    END IF;

    -- base/ is copied one database directory at a time, the rest one entry at a time, by up
    -- to four cp processes at once: reflinking is per-file kernel work that parallelises.
    FOR name IN SELECT n FROM pg_ls_dir(datadir) AS t(n) ORDER BY n LOOP
        IF NOT (name = ANY (emptied) OR name = ANY (skipped) OR name = 'base') THEN
            entries := entries || ' ' || reflinker.sh_quote(name);
        END IF;
    END LOOP;

    -- Keep every WAL segment from here on until this session ends.
    PERFORM pg_create_physical_replication_slot(slot, true, true);
    start_lsn := pg_backup_start(label, true);

    -- Files may vanish while they are copied (dropped relations, truncated SLRUs); WAL replay
    -- recreates what matters, so only "No such file" errors are tolerated. global/pg_control is
    -- copied again after every other file, as pg_basebackup sends it last: recovery from a
    -- standby's backup takes the backup's end from it.
    PERFORM reflinker.run(format(
        'rm -rf -- %3$s; mkdir -p -m 700 -- %3$s/base; cd %1$s; '
        'err=$( { printf ''%%s\0'' %2$s; for d in base/*; do printf ''%%s\0'' "$d"; done; } '
        '| xargs -0 -P 4 -I{} cp -a --reflink=always -- {} %3$s/{} 2>&1 ) || '
        'if printf ''%%s\n'' "$err" | grep -v ''No such file or directory'' | grep -q .; '
        'then printf ''%%s\n'' "$err" >&2; exit 1; fi; '
        'rm -f -- %3$s/global/pg_control; '
        'cp -a --reflink=always -- global/pg_control %3$s/global/pg_control || exit 1; '
        'cd %3$s; for d in %4$s; do mkdir -m 700 "$d"; done; mkdir -m 700 pg_wal/archive_status; '
        'rm -rf base/pgsql_tmp',
        reflinker.sh_quote(datadir), entries, reflinker.sh_quote(dst),
        array_to_string(emptied, ' ')));

    SELECT * INTO stop FROM pg_backup_stop(false);

    -- WAL from the segment holding the backup's start onward, on any timeline, plus history.
    segno := floor((start_lsn - '0/0'::pg_lsn) / seg_size);
    start_seg := upper(lpad(to_hex(floor(segno / (4294967296 / seg_size))::bigint), 8, '0')
                    || lpad(to_hex((segno % (4294967296 / seg_size))::bigint), 8, '0'));
    FOR name IN
        SELECT w.name FROM pg_ls_waldir() AS w
        WHERE (w.name ~ '^[0-9A-F]{24}$' AND substr(w.name, 9) >= start_seg)
           OR w.name ~ '^[0-9A-F]{8}\.history$'
        ORDER BY w.name
    LOOP
        wal := wal || ' ' || name;
    END LOOP;

    -- backup_label and tablespace_map byte for byte (base64 through the shell), the WAL, and
    -- the rename that makes the copy visible, in one program. WAL is reflinked when pg_wal is on
    -- the data directory's filesystem and copied byte for byte when it is a link to another
    -- one (CloudNativePG's walStorage): that is only the WAL written during the backup.
    PERFORM reflinker.run(format(
        'printf %%s %1$s | base64 -d > %2$s/backup_label; '
        'if [ -n %3$s ]; then printf %%s %3$s | base64 -d > %2$s/tablespace_map; fi; '
        'if [ -n %4$s ]; then cd %5$s/pg_wal; cp --reflink=auto -p -- %6$s %2$s/pg_wal/; fi; '
        'mv -T -- %7$s %8$s',
        reflinker.sh_quote(translate(encode(convert_to(stop.labelfile, 'UTF8'), 'base64'), E'\n', '')),
        reflinker.sh_quote(dst),
        reflinker.sh_quote(translate(encode(convert_to(coalesce(stop.spcmapfile, ''), 'UTF8'), 'base64'), E'\n', '')),
        reflinker.sh_quote(wal), reflinker.sh_quote(datadir), wal,
        reflinker.sh_quote(partial), reflinker.sh_quote(target)));
    PERFORM pg_drop_replication_slot(slot);
    RETURN target;
END
$$;

-- CloudNativePG creates streaming_replica when the instance first starts, after initdb has run
-- postInitSQL; create it here as CNPG would, so this script also works from postInitSQLRefs.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'streaming_replica') THEN
        CREATE ROLE streaming_replica LOGIN REPLICATION;
    END IF;
END
$$;

REVOKE ALL ON FUNCTION public.reflink_snapshot(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION reflinker.run(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION reflinker.sh_quote(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.reflink_snapshot(text) TO streaming_replica;
GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO streaming_replica;
GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO streaming_replica;
