-- usage-middleware schema for PostgreSQL 15+ and Supabase.
-- Safe to run any number of times. Everything lives in schema "public" and is named with it.

-- ---------------------------------------------------------------------------------------------
-- Raw tables partitioned by UTC month. file_uploads (by uploaded_at) and api_requests (by
-- requested_at) are range-partitioned with native declarative partitioning: one partition per
-- UTC month, named <table>_pYYYY_MM, plus a DEFAULT partition <table>_default that catches any
-- row whose month has no partition yet, so no row is ever refused. A partitioned table's unique
-- constraints must include the partition column, so the primary key is (id, <time>); records
-- never change and a replay carries the same time, so idempotency by id holds.
-- usage_create_raw_partitions() keeps partitions ready (this file runs it, and so does
-- usage_maintain(), meant for cron) and moves rows out of the default partition into their
-- month's partition when it creates that. usage_maintain() also drops raw partitions past a
-- retention age; the rollups are never pruned. usage_retention records, per raw table, the
-- instant from which raw rows are complete: no row at or after it was ever removed (no row in
-- usage_retention: none was ever removed).
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS public.usage_retention (
    table_name        text PRIMARY KEY,
    raw_complete_from timestamptz NOT NULL
);
-- Internal: no policy, so on Supabase only the owner and service_role read it.
ALTER TABLE public.usage_retention ENABLE ROW LEVEL SECURITY;

-- Every partition of a raw table but the default, with its range [range_from, range_to);
-- range_from is NULL for MINVALUE (the partition a converted install keeps its old rows in).
CREATE OR REPLACE FUNCTION public.usage_raw_partitions(p_table text)
RETURNS TABLE (partition_name text, range_from timestamptz, range_to timestamptz)
LANGUAGE sql
STABLE
SET search_path = ''
AS $fn$
    SELECT c.relname::text,
           substring(b.bound FROM 'FROM \(''([^'']*)''\)')::timestamptz,
           substring(b.bound FROM 'TO \(''([^'']*)''\)')::timestamptz
      FROM pg_catalog.pg_inherits AS i
      JOIN pg_catalog.pg_class AS c ON c.oid = i.inhrelid
     CROSS JOIN LATERAL (SELECT pg_catalog.pg_get_expr(c.relpartbound, c.oid) AS bound) AS b
     WHERE i.inhparent = pg_catalog.to_regclass(pg_catalog.format('public.%I', p_table))
       AND b.bound <> 'DEFAULT'
     ORDER BY 2 NULLS FIRST
$fn$;

-- Create the default partition and the monthly partitions of the current and the next
-- p_months_ahead UTC months, plus one for every month that has rows in the default partition
-- (those rows move into it: a late row of a past month gets its month back). Returns how many
-- partitions were created; when all exist it creates none and takes no table lock. When it
-- creates one, writers wait (SHARE ROW EXCLUSIVE on the parent) until commit — milliseconds:
-- the new tables are empty or hold only the few rows the default partition caught — so no
-- writer routes a row by an outdated partition list.
CREATE OR REPLACE FUNCTION public.usage_create_raw_partitions(p_months_ahead integer DEFAULT 3)
RETURNS integer
LANGUAGE plpgsql
SET search_path = ''
AS $fn$
DECLARE
    t record;
    m timestamp;
    lo timestamptz;
    hi timestamptz;
    part text;
    dflt text;
    in_default timestamp[];
    locked boolean;
    created integer := 0;
    this_month timestamp := pg_catalog.date_trunc('month', pg_catalog.now() AT TIME ZONE 'UTC');
BEGIN
    IF p_months_ahead IS NULL OR p_months_ahead < 0 OR p_months_ahead > 120 THEN
        RAISE EXCEPTION 'p_months_ahead must be between 0 and 120, got %', p_months_ahead;
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock(7215120301);
    FOR t IN SELECT * FROM (VALUES ('file_uploads', 'uploaded_at'),
                                   ('api_requests', 'requested_at')) AS v(tbl, col) LOOP
        CONTINUE WHEN NOT EXISTS (
            SELECT 1 FROM pg_catalog.pg_class AS c
             WHERE c.oid = pg_catalog.to_regclass(pg_catalog.format('public.%I', t.tbl))
               AND c.relkind = 'p');
        locked := false;
        dflt := t.tbl || '_default';
        IF pg_catalog.to_regclass(pg_catalog.format('public.%I', dflt)) IS NULL THEN
            EXECUTE pg_catalog.format('LOCK TABLE public.%I IN SHARE ROW EXCLUSIVE MODE', t.tbl);
            locked := true;
            EXECUTE pg_catalog.format('CREATE TABLE public.%I PARTITION OF public.%I DEFAULT',
                                      dflt, t.tbl);
            -- Partitions are tables of their own (PostgREST would expose them): with row level
            -- security on and no policy, only the owner and BYPASSRLS roles read one directly.
            -- Reads through the parent apply the parent's policies.
            EXECUTE pg_catalog.format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', dflt);
            created := created + 1;
        END IF;
        EXECUTE pg_catalog.format(
            'SELECT pg_catalog.array_agg(DISTINCT pg_catalog.date_trunc(''month'', %I '
            'AT TIME ZONE ''UTC'')) FROM public.%I', t.col, dflt) INTO in_default;
        FOR m IN
            SELECT s::timestamp
              FROM pg_catalog.generate_series(
                       this_month,
                       this_month + pg_catalog.make_interval(months => p_months_ahead),
                       interval '1 month') AS s
            UNION
            SELECT pg_catalog.unnest(in_default)
            ORDER BY 1
        LOOP
            lo := m AT TIME ZONE 'UTC';
            hi := (m + interval '1 month') AT TIME ZONE 'UTC';
            CONTINUE WHEN EXISTS (
                SELECT 1 FROM public.usage_raw_partitions(t.tbl) AS p
                 WHERE (p.range_from IS NULL OR p.range_from < hi)
                   AND (p.range_to IS NULL OR p.range_to > lo));
            IF NOT locked THEN
                EXECUTE pg_catalog.format('LOCK TABLE public.%I IN SHARE ROW EXCLUSIVE MODE',
                                          t.tbl);
                locked := true;
            END IF;
            part := t.tbl || '_p' || pg_catalog.to_char(m, 'YYYY_MM');
            -- PostgreSQL refuses a partition whose range has rows in the default partition, so
            -- the month is built as a plain table, its rows moved into it, and then attached.
            EXECUTE pg_catalog.format(
                'CREATE TABLE public.%I (LIKE public.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                part, t.tbl);
            EXECUTE pg_catalog.format(
                'WITH moved AS (DELETE FROM public.%I WHERE %I >= $1 AND %I < $2 RETURNING *) '
                'INSERT INTO public.%I SELECT * FROM moved', dflt, t.col, t.col, part)
                USING lo, hi;
            EXECUTE pg_catalog.format(
                'ALTER TABLE public.%I ATTACH PARTITION public.%I FOR VALUES FROM (%L) TO (%L)',
                t.tbl, part, lo, hi);
            EXECUTE pg_catalog.format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', part);
            created := created + 1;
        END LOOP;
    END LOOP;
    RETURN created;
END
$fn$;

-- Remove raw rows older than p_raw_retention_days: every partition whose whole month is older
-- than the cutoff is dropped (the month holding the cutoff keeps all its rows: retention is by
-- whole months). A converted install's partition of old rows (<table>_legacy) loses its old rows
-- in batches of p_batch (one batch per call; more = true when the batch was full) and is dropped
-- once empty, its range going back to monthly partitions. usage_retention gets the instant from
-- which raw rows stay complete. A DROP waits at most 5 s for its lock (a long read may hold it):
-- otherwise the partition is counted in skipped and left for the next call, so writers never
-- queue long behind a blocked DROP.
CREATE OR REPLACE FUNCTION public.usage_prune_raw(
    p_raw_retention_days integer,
    p_batch integer DEFAULT 50000
)
RETURNS TABLE (partitions_dropped integer, rows_deleted bigint, more boolean, skipped integer)
LANGUAGE plpgsql
SET search_path = ''
AS $fn$
DECLARE
    t record;
    p record;
    cutoff timestamptz;
    tcut timestamptz;
    complete_from timestamptz;
    n bigint;
    empty boolean;
    old_timeout text := pg_catalog.current_setting('lock_timeout');
BEGIN
    IF p_raw_retention_days IS NULL OR p_raw_retention_days < 1 THEN
        RAISE EXCEPTION 'p_raw_retention_days must be >= 1, got %', p_raw_retention_days;
    END IF;
    IF p_batch IS NULL OR p_batch < 1 THEN
        RAISE EXCEPTION 'p_batch must be >= 1, got %', p_batch;
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock(7215120301);
    cutoff := pg_catalog.now() - pg_catalog.make_interval(days => p_raw_retention_days);
    partitions_dropped := 0;
    rows_deleted := 0;
    more := false;
    skipped := 0;
    FOR t IN SELECT * FROM (VALUES ('file_uploads', 'uploaded_at'),
                                   ('api_requests', 'requested_at')) AS v(tbl, col) LOOP
        complete_from := NULL;
        -- Requests not yet folded into the sealed rollups are never pruned (see rollup_seals).
        tcut := cutoff;
        IF t.tbl = 'api_requests' THEN
            SELECT LEAST(cutoff, s.sealed_before) INTO tcut
              FROM public.rollup_seals AS s WHERE s.dataset = 'requests';
            tcut := coalesce(tcut, cutoff);
        END IF;
        FOR p IN SELECT * FROM public.usage_raw_partitions(t.tbl) LOOP
            IF p.range_to > tcut AND p.range_from IS NOT NULL THEN
                CONTINUE;
            END IF;
            IF p.range_to > tcut THEN
                EXECUTE pg_catalog.format(
                    'DELETE FROM public.%I WHERE ctid = ANY (ARRAY('
                    'SELECT ctid FROM public.%I WHERE %I < $1 LIMIT $2))',
                    p.partition_name, p.partition_name, t.col) USING tcut, p_batch;
                GET DIAGNOSTICS n = ROW_COUNT;
                rows_deleted := rows_deleted + n;
                IF n > 0 THEN
                    complete_from := GREATEST(complete_from, tcut);
                END IF;
                IF n >= p_batch THEN
                    more := true;
                    CONTINUE;
                END IF;
                EXECUTE pg_catalog.format('SELECT NOT EXISTS (SELECT FROM public.%I)',
                                          p.partition_name) INTO empty;
                CONTINUE WHEN NOT empty;
            END IF;
            PERFORM pg_catalog.set_config('lock_timeout', '5s', true);
            BEGIN
                -- The parent first, as writers lock it (then a partition): no deadlock.
                EXECUTE pg_catalog.format('LOCK TABLE public.%I IN ACCESS EXCLUSIVE MODE', t.tbl);
                IF p.range_to > tcut THEN
                    EXECUTE pg_catalog.format('SELECT NOT EXISTS (SELECT FROM public.%I)',
                                              p.partition_name) INTO empty;
                END IF;
                IF p.range_to <= tcut OR empty THEN
                    EXECUTE pg_catalog.format('DROP TABLE public.%I', p.partition_name);
                    partitions_dropped := partitions_dropped + 1;
                    IF p.range_to <= tcut THEN
                        complete_from := GREATEST(complete_from, p.range_to);
                    END IF;
                END IF;
            EXCEPTION WHEN lock_not_available THEN
                skipped := skipped + 1;
            END;
            PERFORM pg_catalog.set_config('lock_timeout', old_timeout, true);
        END LOOP;
        IF complete_from IS NOT NULL THEN
            INSERT INTO public.usage_retention AS r (table_name, raw_complete_from)
            VALUES (t.tbl, complete_from)
            ON CONFLICT (table_name) DO UPDATE
               SET raw_complete_from = GREATEST(r.raw_complete_from, EXCLUDED.raw_complete_from);
        END IF;
    END LOOP;
    RETURN NEXT;
END
$fn$;

-- The one call for cron (pg_cron on Supabase, or `usage-middleware maintain URL`): partitions
-- ahead, and with p_raw_retention_days, raw rows older than that removed (see usage_prune_raw;
-- call again while more is true). Safe to run any number of times, concurrently too.
CREATE OR REPLACE FUNCTION public.usage_maintain(
    p_months_ahead integer DEFAULT 3,
    p_raw_retention_days integer DEFAULT NULL,
    p_batch integer DEFAULT 50000
)
RETURNS TABLE (partitions_created integer, partitions_dropped integer, rows_deleted bigint,
               more boolean, skipped integer)
LANGUAGE plpgsql
SET search_path = ''
AS $fn$
BEGIN
    partitions_created := public.usage_create_raw_partitions(p_months_ahead);
    partitions_dropped := 0;
    rows_deleted := 0;
    more := false;
    skipped := 0;
    IF p_raw_retention_days IS NOT NULL THEN
        SELECT * INTO partitions_dropped, rows_deleted, more, skipped
          FROM public.usage_prune_raw(p_raw_retention_days, p_batch);
        -- A dropped legacy partition leaves months to cover; default rows older than the
        -- cutoff got their own (dropped) month above, late rows get one here.
        partitions_created := partitions_created
                              + public.usage_create_raw_partitions(p_months_ahead);
    END IF;
    RETURN NEXT;
END
$fn$;

REVOKE ALL ON FUNCTION public.usage_create_raw_partitions(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION public.usage_prune_raw(integer, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION public.usage_maintain(integer, integer, integer) FROM PUBLIC;

-- Converting an install made before the raw tables were partitioned (plain tables, with data),
-- without copying a row: the old table is renamed <table>_legacy and becomes the partition for
-- [MINVALUE, first day of next UTC month); monthly partitions follow. Its rows dated on or after
-- that day (clock skew, test data) move to their partitions first. Steps, in one transaction
-- holding ACCESS EXCLUSIVE on the old table (writers wait, then write into the new parent):
-- rename; primary key (id) replaced by (id, <time>), using a valid unique index on those
-- columns if one exists (UsageStore.create_schema() builds it CONCURRENTLY beforehand; from
-- psql, run `CREATE UNIQUE INDEX CONCURRENTLY um_file_uploads_id_time ON public.file_uploads
-- (id, uploaded_at)` and the same for api_requests (id, requested_at) first, or the index is
-- built here, under the lock); other indexes renamed <name>_legacy, and attached to the
-- parent's equal indexes by the CREATE INDEX statements below instead of being rebuilt; a CHECK
-- (<time> < boundary) validated, one sequential scan, so that ATTACH need not scan again. The
-- lock lasts about that one scan plus milliseconds (the whole schema transaction took 0.5-0.6 s
-- for 1,000,000 uploads in benchmarks/retention.py). Grants and row level security are copied to
-- the parent, and policies moved there; the old rows' partition keeps RLS on with no policy.
DO $convert$
DECLARE
    t record;
    legacy text;
    rel oid;
    pk text;
    uix text;
    ix record;
    g record;
    pol record;
    cols text;
    boundary timestamptz := (pg_catalog.date_trunc('month', pg_catalog.now() AT TIME ZONE 'UTC')
                             + interval '1 month') AT TIME ZONE 'UTC';
BEGIN
    FOR t IN SELECT * FROM (VALUES ('file_uploads', 'uploaded_at'),
                                   ('api_requests', 'requested_at')) AS v(tbl, col) LOOP
        SELECT c.oid INTO rel FROM pg_catalog.pg_class AS c
         WHERE c.oid = pg_catalog.to_regclass(pg_catalog.format('public.%I', t.tbl))
           AND c.relkind = 'r';
        CONTINUE WHEN rel IS NULL;
        PERFORM pg_catalog.pg_advisory_xact_lock(7215120301);
        EXECUTE pg_catalog.format('LOCK TABLE public.%I IN ACCESS EXCLUSIVE MODE', t.tbl);
        legacy := t.tbl || '_legacy';
        EXECUTE pg_catalog.format('ALTER TABLE public.%I RENAME TO %I', t.tbl, legacy);

        SELECT k.conname INTO pk FROM pg_catalog.pg_constraint AS k
         WHERE k.conrelid = rel AND k.contype = 'p';
        SELECT ic.relname INTO uix
          FROM pg_catalog.pg_index AS i JOIN pg_catalog.pg_class AS ic ON ic.oid = i.indexrelid
         WHERE i.indrelid = rel AND i.indisunique AND i.indisvalid AND i.indpred IS NULL
           AND i.indexprs IS NULL
           AND i.indkey::text = (
               SELECT pg_catalog.string_agg(a.attnum::text, ' ' ORDER BY a.ord)
                 FROM (SELECT x.attnum, CASE x.attname WHEN 'id' THEN 1 ELSE 2 END AS ord
                         FROM pg_catalog.pg_attribute AS x
                        WHERE x.attrelid = rel AND x.attname IN ('id', t.col)) AS a)
         LIMIT 1;
        EXECUTE pg_catalog.format('ALTER TABLE public.%I DROP CONSTRAINT %I, ADD CONSTRAINT %I %s',
            legacy, pk, legacy || '_pkey',
            CASE WHEN uix IS NULL THEN pg_catalog.format('PRIMARY KEY (id, %I)', t.col)
                 ELSE pg_catalog.format('PRIMARY KEY USING INDEX %I', uix) END);
        FOR ix IN SELECT ic.relname
                    FROM pg_catalog.pg_index AS i
                    JOIN pg_catalog.pg_class AS ic ON ic.oid = i.indexrelid
                   WHERE i.indrelid = rel AND ic.relname <> legacy || '_pkey' LOOP
            EXECUTE pg_catalog.format('ALTER INDEX public.%I RENAME TO %I',
                                      ix.relname, pg_catalog.left(ix.relname, 56) || '_legacy');
        END LOOP;

        EXECUTE pg_catalog.format(
            'CREATE TABLE public.%I (LIKE public.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS, '
            'PRIMARY KEY (id, %I)) PARTITION BY RANGE (%I)', t.tbl, legacy, t.col, t.col);
        SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum)
          INTO cols FROM pg_catalog.pg_attribute AS a
         WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped;
        EXECUTE pg_catalog.format(
            'CREATE TEMPORARY TABLE um_convert_future ON COMMIT DROP AS '
            'SELECT %s FROM public.%I WITH NO DATA', cols, legacy);
        EXECUTE pg_catalog.format(
            'WITH moved AS (DELETE FROM public.%I WHERE %I >= $1 RETURNING %s) '
            'INSERT INTO pg_temp.um_convert_future SELECT * FROM moved', legacy, t.col, cols)
            USING boundary;
        EXECUTE pg_catalog.format('ALTER TABLE public.%I ADD CONSTRAINT %I CHECK (%I < %L)',
                                  legacy, legacy || '_range', t.col, boundary);
        EXECUTE pg_catalog.format(
            'ALTER TABLE public.%I ATTACH PARTITION public.%I FOR VALUES FROM (MINVALUE) TO (%L)',
            t.tbl, legacy, boundary);

        FOR g IN SELECT a.privilege_type, a.grantee, a.is_grantable
                   FROM pg_catalog.pg_class AS c, pg_catalog.aclexplode(c.relacl) AS a
                  WHERE c.oid = rel AND a.grantee <> c.relowner LOOP
            EXECUTE pg_catalog.format('GRANT %s ON public.%I TO %s%s', g.privilege_type, t.tbl,
                CASE WHEN g.grantee = 0 THEN 'PUBLIC'
                     ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(g.grantee)) END,
                CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        END LOOP;
        IF (SELECT c.relrowsecurity FROM pg_catalog.pg_class AS c WHERE c.oid = rel) THEN
            EXECUTE pg_catalog.format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', t.tbl);
        END IF;
        IF (SELECT c.relforcerowsecurity FROM pg_catalog.pg_class AS c WHERE c.oid = rel) THEN
            EXECUTE pg_catalog.format('ALTER TABLE public.%I FORCE ROW LEVEL SECURITY', t.tbl);
        END IF;
        FOR pol IN SELECT * FROM pg_catalog.pg_policies AS x
                    WHERE x.schemaname = 'public' AND x.tablename = legacy LOOP
            EXECUTE pg_catalog.format('CREATE POLICY %I ON public.%I AS %s FOR %s TO %s%s%s',
                pol.policyname, t.tbl, pol.permissive, pol.cmd,
                (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(r), ', ')
                   FROM pg_catalog.unnest(pol.roles) AS r),
                CASE WHEN pol.qual IS NULL THEN '' ELSE ' USING (' || pol.qual || ')' END,
                CASE WHEN pol.with_check IS NULL THEN ''
                     ELSE ' WITH CHECK (' || pol.with_check || ')' END);
            -- Moved, not copied: later edits of the parent's policies cannot miss a partition.
            EXECUTE pg_catalog.format('DROP POLICY %I ON public.%I', pol.policyname, legacy);
        END LOOP;

        EXECUTE pg_catalog.format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', legacy);

        PERFORM public.usage_create_raw_partitions();
        EXECUTE pg_catalog.format(
            'INSERT INTO public.%I (%s) SELECT * FROM pg_temp.um_convert_future', t.tbl, cols);
        DROP TABLE pg_temp.um_convert_future;
    END LOOP;
END
$convert$;

CREATE TABLE IF NOT EXISTS public.file_uploads (
    id            uuid NOT NULL,
    api_key_id    uuid,
    request_id    uuid,
    provider      text NOT NULL,
    file_type     text NOT NULL,
    declared_type text,
    file_size     bigint NOT NULL CHECK (file_size >= 0),
    file_name     text,
    upload_status text NOT NULL CHECK (upload_status IN ('success', 'failed')),
    error_message text,
    uploaded_at   timestamptz NOT NULL,
    PRIMARY KEY (id, uploaded_at)
) PARTITION BY RANGE (uploaded_at);
CREATE INDEX IF NOT EXISTS idx_file_uploads_key_time ON public.file_uploads (api_key_id, uploaded_at);
CREATE INDEX IF NOT EXISTS idx_file_uploads_time ON public.file_uploads (uploaded_at);

CREATE TABLE IF NOT EXISTS public.api_requests (
    id               uuid NOT NULL,
    api_key_id       uuid,
    method           text NOT NULL,
    path             text NOT NULL,
    status_code      integer NOT NULL,
    response_time_ms double precision NOT NULL,
    request_size     bigint NOT NULL,
    response_size    bigint NOT NULL,
    error_message    text,
    requested_at     timestamptz NOT NULL,
    route_matched    boolean NOT NULL DEFAULT true,
    PRIMARY KEY (id, requested_at)
) PARTITION BY RANGE (requested_at);
CREATE INDEX IF NOT EXISTS idx_api_requests_key_time ON public.api_requests (api_key_id, requested_at);
CREATE INDEX IF NOT EXISTS idx_api_requests_time ON public.api_requests (requested_at);

-- route_matched is false when the request's path matched no route of the application (path is
-- then the raw path, which the endpoint rollups label '(unmatched)'). An install from before
-- the column gets it here, on the parent and so on every partition, the default one included:
-- a constant default is kept in the catalog, no row is rewritten, and every stored row reads as
-- a matched route (older releases stored no other kind). Added only where it is missing, so a
-- re-run takes no lock on the table.
DO $route_matched$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute AS a
                    WHERE a.attrelid = 'public.api_requests'::regclass
                      AND a.attname = 'route_matched' AND NOT a.attisdropped) THEN
        ALTER TABLE public.api_requests
            ADD COLUMN IF NOT EXISTS route_matched boolean NOT NULL DEFAULT true;
    END IF;
END
$route_matched$;

SELECT public.usage_create_raw_partitions();

-- Rollup rows are updated in place many times a day; free space on each page (fillfactor 70)
-- keeps a row's new version on its page. The daily rollups' unique constraints INCLUDE the
-- counters the read path sums, so a key's months are read by an index-only scan and never touch
-- the heap. The price: an update changes INCLUDEd columns, so it is not HOT and writes new index
-- entries. The hourly rollups, updated most and read only for range edges, stay plain and HOT.
-- Index-only scans skip the heap only on pages the visibility map marks all-visible, i.e. pages
-- vacuumed since their last change; the autovacuum settings after the tables keep that current.

-- Exact rollup of file_uploads by UTC date. NULL api_key_id rows share one bucket per key.
CREATE TABLE IF NOT EXISTS public.daily_usage (
    usage_date          date NOT NULL,
    api_key_id          uuid,
    provider            text NOT NULL,
    file_type           text NOT NULL,
    total_uploads       bigint NOT NULL DEFAULT 0,
    total_file_size     bigint NOT NULL DEFAULT 0,
    successful_requests bigint NOT NULL DEFAULT 0,
    failed_requests     bigint NOT NULL DEFAULT 0,
    CONSTRAINT uq_daily_usage UNIQUE NULLS NOT DISTINCT (api_key_id, usage_date, provider, file_type)
        INCLUDE (total_uploads, total_file_size, successful_requests, failed_requests)
) WITH (fillfactor = 70);
CREATE INDEX IF NOT EXISTS idx_daily_usage_usage_date ON public.daily_usage (usage_date);

-- The same by UTC hour: local-time-zone days are sums of whole hours (plus raw edge minutes).
CREATE TABLE IF NOT EXISTS public.hourly_usage (
    usage_hour          timestamptz NOT NULL,
    api_key_id          uuid,
    provider            text NOT NULL,
    file_type           text NOT NULL,
    total_uploads       bigint NOT NULL DEFAULT 0,
    total_file_size     bigint NOT NULL DEFAULT 0,
    successful_requests bigint NOT NULL DEFAULT 0,
    failed_requests     bigint NOT NULL DEFAULT 0,
    CONSTRAINT uq_hourly_usage UNIQUE NULLS NOT DISTINCT (api_key_id, usage_hour, provider, file_type)
) WITH (fillfactor = 70);

-- api_requests rolled up by latency bucket: a mergeable log histogram (2 % relative error).
CREATE TABLE IF NOT EXISTS public.daily_request_usage (
    usage_date           date NOT NULL,
    api_key_id           uuid,
    latency_bucket       smallint NOT NULL,
    total_requests       bigint NOT NULL DEFAULT 0,
    error_requests       bigint NOT NULL DEFAULT 0,
    total_response_us    bigint NOT NULL DEFAULT 0,
    total_request_bytes  bigint NOT NULL DEFAULT 0,
    total_response_bytes bigint NOT NULL DEFAULT 0,
    CONSTRAINT uq_daily_request_usage UNIQUE NULLS NOT DISTINCT (api_key_id, usage_date, latency_bucket)
        INCLUDE (total_requests, error_requests, total_response_us)
) WITH (fillfactor = 70);
CREATE INDEX IF NOT EXISTS idx_daily_request_usage_usage_date ON public.daily_request_usage (usage_date);

CREATE TABLE IF NOT EXISTS public.hourly_request_usage (
    usage_hour           timestamptz NOT NULL,
    api_key_id           uuid,
    latency_bucket       smallint NOT NULL,
    total_requests       bigint NOT NULL DEFAULT 0,
    error_requests       bigint NOT NULL DEFAULT 0,
    total_response_us    bigint NOT NULL DEFAULT 0,
    total_request_bytes  bigint NOT NULL DEFAULT 0,
    total_response_bytes bigint NOT NULL DEFAULT 0,
    CONSTRAINT uq_hourly_request_usage UNIQUE NULLS NOT DISTINCT (api_key_id, usage_hour, latency_bucket)
) WITH (fillfactor = 70);

-- The same by UTC quarter hour (usage_quarter at :00, :15, :30 or :45): the sub-hour edges of
-- local days in zones with :30 and :45 offsets, so that no answer reads raw rows. An install
-- that predates these tables gets them filled with writers held off (SHARE locks) until the
-- transaction commits: minutes 15-59 of each hour from the raw rows, and minutes 0-14 as the
-- hourly row minus those (so rollup rows without raw rows, e.g. migrated totals at 00:00 UTC,
-- carry over). The latency bucket mirrors usage_middleware._schema.latency_bucket (the divisor
-- is the bit-exact log((1 + 0.02) / (1 - 0.02))).
DO $quarter$
BEGIN
    IF pg_catalog.to_regclass('public.quarter_usage') IS NULL THEN
        LOCK TABLE public.file_uploads, public.hourly_usage IN SHARE MODE;
        CREATE TABLE public.quarter_usage (
            usage_quarter       timestamptz NOT NULL,
            api_key_id          uuid,
            provider            text NOT NULL,
            file_type           text NOT NULL,
            total_uploads       bigint NOT NULL DEFAULT 0,
            total_file_size     bigint NOT NULL DEFAULT 0,
            successful_requests bigint NOT NULL DEFAULT 0,
            failed_requests     bigint NOT NULL DEFAULT 0,
            CONSTRAINT uq_quarter_usage
                UNIQUE NULLS NOT DISTINCT (api_key_id, usage_quarter, provider, file_type)
        ) WITH (fillfactor = 70);
        INSERT INTO public.quarter_usage
        SELECT q, api_key_id, provider, file_type, sum(n), sum(b), sum(s), sum(f)
          FROM (SELECT h.usage_hour, h.api_key_id, h.provider, h.file_type, h.total_uploads,
                       h.total_file_size, h.successful_requests, h.failed_requests
                  FROM public.hourly_usage AS h
                UNION ALL
                SELECT v.q, u.api_key_id, u.provider, u.file_type, v.n, v.n * u.file_size,
                       v.n * (u.upload_status = 'success')::int,
                       v.n * (u.upload_status <> 'success')::int
                  FROM public.file_uploads AS u
                 CROSS JOIN LATERAL (VALUES
                       (pg_catalog.date_bin('15 minutes', u.uploaded_at,
                                            '2000-01-01 00:00+00'::timestamptz), 1),
                       (pg_catalog.date_bin('1 hour', u.uploaded_at,
                                            '2000-01-01 00:00+00'::timestamptz), -1)) AS v(q, n)
                 WHERE pg_catalog.date_part('minute', u.uploaded_at AT TIME ZONE 'UTC') >= 15
               ) AS t(q, api_key_id, provider, file_type, n, b, s, f)
         GROUP BY 1, 2, 3, 4
        HAVING sum(n) <> 0;
    END IF;
    IF pg_catalog.to_regclass('public.quarter_request_usage') IS NULL THEN
        LOCK TABLE public.api_requests, public.hourly_request_usage IN SHARE MODE;
        CREATE TABLE public.quarter_request_usage (
            usage_quarter        timestamptz NOT NULL,
            api_key_id           uuid,
            latency_bucket       smallint NOT NULL,
            total_requests       bigint NOT NULL DEFAULT 0,
            error_requests       bigint NOT NULL DEFAULT 0,
            total_response_us    bigint NOT NULL DEFAULT 0,
            total_request_bytes  bigint NOT NULL DEFAULT 0,
            total_response_bytes bigint NOT NULL DEFAULT 0,
            CONSTRAINT uq_quarter_request_usage
                UNIQUE NULLS NOT DISTINCT (api_key_id, usage_quarter, latency_bucket)
        ) WITH (fillfactor = 70);
        INSERT INTO public.quarter_request_usage
        SELECT q, api_key_id, lb, sum(n), sum(e), sum(us), sum(qb), sum(rb)
          FROM (SELECT h.usage_hour, h.api_key_id, h.latency_bucket, h.total_requests,
                       h.error_requests, h.total_response_us, h.total_request_bytes,
                       h.total_response_bytes
                  FROM public.hourly_request_usage AS h
                UNION ALL
                SELECT v.q, r.api_key_id,
                       CASE WHEN r.response_time_ms <= 0.001::float8 THEN 0
                            ELSE LEAST(32767, pg_catalog.ceil(
                                pg_catalog.ln(r.response_time_ms / 0.001::float8)
                                / 0.040005334613699206::float8))
                       END::smallint,
                       v.n, v.n * (r.status_code >= 400)::int,
                       v.n * pg_catalog.round(r.response_time_ms * 1000::float8)::bigint,
                       v.n * r.request_size, v.n * r.response_size
                  FROM public.api_requests AS r
                 CROSS JOIN LATERAL (VALUES
                       (pg_catalog.date_bin('15 minutes', r.requested_at,
                                            '2000-01-01 00:00+00'::timestamptz), 1),
                       (pg_catalog.date_bin('1 hour', r.requested_at,
                                            '2000-01-01 00:00+00'::timestamptz), -1)) AS v(q, n)
                 WHERE pg_catalog.date_part('minute', r.requested_at AT TIME ZONE 'UTC') >= 15
               ) AS t(q, api_key_id, lb, n, e, us, qb, rb)
         GROUP BY 1, 2, 3
        HAVING sum(n) <> 0;
    END IF;
END
$quarter$;

-- Reads over every key (ALL_KEYS) find an hour's or a quarter hour's rows in the hourly and
-- quarter-hour rollups by a btree range on the time, whatever the table's physical order
-- (history loaded out of order, a CLUSTER on the unique constraint). The index is on the UTC
-- wall-clock time, an expression only those reads use: reads of given keys stay on the (key,
-- time) constraint, where a plain btree on the time can look cheaper to the planner and then
-- reads every key's rows of an hour to find one key's. The older time-only indexes (BRIN, whose
-- block ranges all match once rows are out of time order, or plain btrees) are dropped.
DROP INDEX IF EXISTS public.idx_hourly_usage_usage_hour;
DROP INDEX IF EXISTS public.idx_hourly_request_usage_usage_hour;
DROP INDEX IF EXISTS public.idx_quarter_usage_usage_quarter;
DROP INDEX IF EXISTS public.idx_quarter_request_usage_usage_quarter;
CREATE INDEX IF NOT EXISTS idx_hourly_usage_utc_hour
    ON public.hourly_usage ((usage_hour AT TIME ZONE 'UTC'));
CREATE INDEX IF NOT EXISTS idx_hourly_request_usage_utc_hour
    ON public.hourly_request_usage ((usage_hour AT TIME ZONE 'UTC'));
CREATE INDEX IF NOT EXISTS idx_quarter_usage_utc_quarter
    ON public.quarter_usage ((usage_quarter AT TIME ZONE 'UTC'));
CREATE INDEX IF NOT EXISTS idx_quarter_request_usage_utc_quarter
    ON public.quarter_request_usage ((usage_quarter AT TIME ZONE 'UTC'));

-- The same by UTC month (usage_month is the month's first day): a year of one key is some
-- hundreds of rows. An install that predates this table gets it filled from daily_request_usage,
-- with writers held off (SHARE lock) until the transaction commits, so no request is missed or
-- counted twice.
DO $monthly$
BEGIN
    IF pg_catalog.to_regclass('public.monthly_request_usage') IS NULL THEN
        LOCK TABLE public.daily_request_usage IN SHARE MODE;
        CREATE TABLE public.monthly_request_usage (
            usage_month          date NOT NULL,
            api_key_id           uuid,
            latency_bucket       smallint NOT NULL,
            total_requests       bigint NOT NULL DEFAULT 0,
            error_requests       bigint NOT NULL DEFAULT 0,
            total_response_us    bigint NOT NULL DEFAULT 0,
            total_request_bytes  bigint NOT NULL DEFAULT 0,
            total_response_bytes bigint NOT NULL DEFAULT 0,
            CONSTRAINT uq_monthly_request_usage
                UNIQUE NULLS NOT DISTINCT (api_key_id, usage_month, latency_bucket)
                INCLUDE (total_requests, error_requests, total_response_us)
        ) WITH (fillfactor = 70);
        ALTER TABLE public.monthly_request_usage ENABLE ROW LEVEL SECURITY;
        INSERT INTO public.monthly_request_usage
        SELECT pg_catalog.date_trunc('month', d.usage_date)::date, d.api_key_id,
               d.latency_bucket, sum(d.total_requests), sum(d.error_requests),
               sum(d.total_response_us), sum(d.total_request_bytes),
               sum(d.total_response_bytes)
          FROM public.daily_request_usage AS d
         GROUP BY 1, 2, 3;
    END IF;
END
$monthly$;
CREATE INDEX IF NOT EXISTS idx_monthly_request_usage_usage_month
    ON public.monthly_request_usage (usage_month);

-- Uploads whose declared type differs from the detected one (declared_type is stored only
-- then), by UTC quarter hour, key, provider, type and declared type: a sparse exact rollup that
-- answers /granular's type_mismatches after raw rows are pruned. An install that predates it
-- gets it filled from the raw rows with writers held off (SHARE lock) until the transaction
-- commits, so no upload is missed or counted twice. Row level security and the Supabase roles'
-- privileges as for every usage table (see the $rls$ block below).
DO $mismatch$
BEGIN
    IF pg_catalog.to_regclass('public.quarter_mismatch_usage') IS NULL THEN
        LOCK TABLE public.file_uploads IN SHARE MODE;
        CREATE TABLE public.quarter_mismatch_usage (
            usage_quarter timestamptz NOT NULL,
            api_key_id    uuid,
            provider      text NOT NULL,
            file_type     text NOT NULL,
            declared_type text NOT NULL,
            total_uploads bigint NOT NULL DEFAULT 0,
            CONSTRAINT uq_quarter_mismatch_usage UNIQUE NULLS NOT DISTINCT
                (api_key_id, usage_quarter, provider, file_type, declared_type)
        ) WITH (fillfactor = 70);
        INSERT INTO public.quarter_mismatch_usage
        SELECT pg_catalog.date_bin('15 minutes', u.uploaded_at,
                                   '2000-01-01 00:00+00'::timestamptz),
               u.api_key_id, u.provider, u.file_type, u.declared_type, count(*)
          FROM public.file_uploads AS u
         WHERE u.declared_type IS NOT NULL AND u.declared_type <> u.file_type
         GROUP BY 1, 2, 3, 4, 5;
        ALTER TABLE public.quarter_mismatch_usage ENABLE ROW LEVEL SECURITY;
    END IF;
END
$mismatch$;
CREATE INDEX IF NOT EXISTS idx_quarter_mismatch_usage_utc_quarter
    ON public.quarter_mismatch_usage ((usage_quarter AT TIME ZONE 'UTC'));
ALTER TABLE public.quarter_mismatch_usage SET
    (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.01);

-- api_requests by UTC month, day and quarter hour, key, endpoint, status code and a coarse
-- latency bucket: what GET /requests answers from (errors are the rows with status_code >= 400).
-- Labels bound the rows a key can make: method is the request's own when standard, else
-- 'OTHER'; route is the matched route template, '(unmatched)' for every path that matched no
-- route, and '(other)' for a key's named routes past the first 200 of a UTC day, which
-- endpoint_routes records (routes are admitted per batch in byte order, route COLLATE "C").
-- latency_bucket is (fine bucket + 4) / 5 of the 2 % sketch the request rollups use: five of
-- its buckets as one, so a percentile is within 9.96 % of the exact value. An install that
-- predates these tables gets them filled from the raw rows, as if every stored request had been
-- written in one batch, with writers held off (SHARE lock) until the transaction commits, so no
-- request is missed or counted twice; requests pruned by retention before are not in them.
-- Row level security and the Supabase roles' privileges as for every usage table (see the $rls$
-- block below).
DO $endpoint$
BEGIN
    IF pg_catalog.to_regclass('public.endpoint_routes') IS NULL THEN
        LOCK TABLE public.api_requests IN SHARE MODE;
        -- Memory for this transaction's sorts and hashes, so a large install's fill does not
        -- spill to disk; the unique constraints are added last, each index built in one sort.
        PERFORM pg_catalog.set_config('work_mem', '128MB', true);
        PERFORM pg_catalog.set_config('maintenance_work_mem', '256MB', true);
        CREATE TABLE public.endpoint_routes (
            api_key_id uuid,
            usage_date date NOT NULL,
            route      text COLLATE "C" NOT NULL
        );
        CREATE TABLE public.monthly_endpoint_usage (
            usage_month          date NOT NULL,
            api_key_id           uuid,
            method               text NOT NULL,
            route                text COLLATE "C" NOT NULL,
            status_code          smallint NOT NULL,
            latency_bucket       smallint NOT NULL,
            total_requests       bigint NOT NULL DEFAULT 0,
            total_response_us    bigint NOT NULL DEFAULT 0,
            total_request_bytes  bigint NOT NULL DEFAULT 0,
            total_response_bytes bigint NOT NULL DEFAULT 0
        ) WITH (fillfactor = 70);
        CREATE TABLE public.daily_endpoint_usage (
            usage_date           date NOT NULL,
            api_key_id           uuid,
            method               text NOT NULL,
            route                text COLLATE "C" NOT NULL,
            status_code          smallint NOT NULL,
            latency_bucket       smallint NOT NULL,
            total_requests       bigint NOT NULL DEFAULT 0,
            total_response_us    bigint NOT NULL DEFAULT 0,
            total_request_bytes  bigint NOT NULL DEFAULT 0,
            total_response_bytes bigint NOT NULL DEFAULT 0
        ) WITH (fillfactor = 70);
        CREATE TABLE public.quarter_endpoint_usage (
            usage_quarter        timestamptz NOT NULL,
            api_key_id           uuid,
            method               text NOT NULL,
            route                text COLLATE "C" NOT NULL,
            status_code          smallint NOT NULL,
            latency_bucket       smallint NOT NULL,
            total_requests       bigint NOT NULL DEFAULT 0,
            total_response_us    bigint NOT NULL DEFAULT 0,
            total_request_bytes  bigint NOT NULL DEFAULT 0,
            total_response_bytes bigint NOT NULL DEFAULT 0
        ) WITH (fillfactor = 70);

        INSERT INTO public.endpoint_routes
        SELECT c.api_key_id, c.d, c.path
          FROM (SELECT w.api_key_id, w.d, w.path,
                       pg_catalog.row_number() OVER (PARTITION BY w.api_key_id, w.d
                                                     ORDER BY w.path) AS n
                  FROM (SELECT DISTINCT r.api_key_id,
                               (r.requested_at AT TIME ZONE 'UTC')::date AS d,
                               r.path COLLATE "C" AS path
                          FROM public.api_requests AS r
                         WHERE r.route_matched) AS w) AS c
         WHERE c.n <= 200;
        -- The fine bucket mirrors usage_middleware._schema.latency_bucket, as in $quarter$.
        INSERT INTO public.quarter_endpoint_usage
        SELECT x.q, x.api_key_id, x.method, x.route, x.status_code, x.latency_bucket,
               count(*), sum(x.us), sum(x.request_size), sum(x.response_size)
          FROM (SELECT pg_catalog.date_bin('15 minutes', r.requested_at,
                                           '2000-01-01 00:00+00'::timestamptz) AS q,
                       r.api_key_id,
                       CASE WHEN r.method IN ('CONNECT', 'DELETE', 'GET', 'HEAD', 'OPTIONS',
                                              'PATCH', 'POST', 'PUT', 'TRACE')
                            THEN r.method ELSE 'OTHER' END AS method,
                       CASE WHEN NOT r.route_matched THEN '(unmatched)'
                            WHEN e.route IS NOT NULL THEN r.path
                            ELSE '(other)' END COLLATE "C" AS route,
                       r.status_code::smallint AS status_code,
                       ((CASE WHEN r.response_time_ms <= 0.001::float8 THEN 0
                              ELSE LEAST(32767, pg_catalog.ceil(
                                  pg_catalog.ln(r.response_time_ms / 0.001::float8)
                                  / 0.040005334613699206::float8))
                         END)::int + 4) / 5 AS latency_bucket,
                       pg_catalog.round(r.response_time_ms * 1000::float8)::bigint AS us,
                       r.request_size, r.response_size
                  FROM public.api_requests AS r
                  LEFT JOIN public.endpoint_routes AS e
                    ON r.route_matched
                   AND e.usage_date = (r.requested_at AT TIME ZONE 'UTC')::date
                   AND e.route = r.path COLLATE "C"
                   -- the same key, NULL included, as a hashable equality
                   AND (e.api_key_id IS NULL) = (r.api_key_id IS NULL)
                   AND coalesce(e.api_key_id, '00000000-0000-0000-0000-000000000000')
                       = coalesce(r.api_key_id, '00000000-0000-0000-0000-000000000000')
               ) AS x
         GROUP BY 1, 2, 3, 4, 5, 6;
        INSERT INTO public.daily_endpoint_usage
        SELECT (q.usage_quarter AT TIME ZONE 'UTC')::date, q.api_key_id, q.method, q.route,
               q.status_code, q.latency_bucket, sum(q.total_requests), sum(q.total_response_us),
               sum(q.total_request_bytes), sum(q.total_response_bytes)
          FROM public.quarter_endpoint_usage AS q
         GROUP BY 1, 2, 3, 4, 5, 6;
        INSERT INTO public.monthly_endpoint_usage
        SELECT pg_catalog.date_trunc('month', d.usage_date)::date, d.api_key_id, d.method,
               d.route, d.status_code, d.latency_bucket, sum(d.total_requests),
               sum(d.total_response_us), sum(d.total_request_bytes), sum(d.total_response_bytes)
          FROM public.daily_endpoint_usage AS d
         GROUP BY 1, 2, 3, 4, 5, 6;
        ALTER TABLE public.endpoint_routes ADD CONSTRAINT uq_endpoint_routes
            UNIQUE NULLS NOT DISTINCT (api_key_id, usage_date, route);
        ALTER TABLE public.monthly_endpoint_usage ADD CONSTRAINT uq_monthly_endpoint_usage
            UNIQUE NULLS NOT DISTINCT
                (api_key_id, usage_month, method, route, status_code, latency_bucket)
            INCLUDE (total_requests, total_response_us, total_request_bytes,
                     total_response_bytes);
        ALTER TABLE public.daily_endpoint_usage ADD CONSTRAINT uq_daily_endpoint_usage
            UNIQUE NULLS NOT DISTINCT
                (api_key_id, usage_date, method, route, status_code, latency_bucket)
            INCLUDE (total_requests, total_response_us, total_request_bytes,
                     total_response_bytes);
        ALTER TABLE public.quarter_endpoint_usage ADD CONSTRAINT uq_quarter_endpoint_usage
            UNIQUE NULLS NOT DISTINCT
                (api_key_id, usage_quarter, method, route, status_code, latency_bucket);
        ALTER TABLE public.endpoint_routes ENABLE ROW LEVEL SECURITY;
        ALTER TABLE public.monthly_endpoint_usage ENABLE ROW LEVEL SECURITY;
        ALTER TABLE public.daily_endpoint_usage ENABLE ROW LEVEL SECURITY;
        ALTER TABLE public.quarter_endpoint_usage ENABLE ROW LEVEL SECURITY;
    END IF;
END
$endpoint$;
CREATE INDEX IF NOT EXISTS idx_monthly_endpoint_usage_usage_month
    ON public.monthly_endpoint_usage (usage_month);
CREATE INDEX IF NOT EXISTS idx_daily_endpoint_usage_usage_date
    ON public.daily_endpoint_usage (usage_date);
CREATE INDEX IF NOT EXISTS idx_quarter_endpoint_usage_utc_quarter
    ON public.quarter_endpoint_usage ((usage_quarter AT TIME ZONE 'UTC'));
ALTER TABLE public.monthly_endpoint_usage SET
    (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.01);
ALTER TABLE public.daily_endpoint_usage SET
    (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.01);
ALTER TABLE public.quarter_endpoint_usage SET
    (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.01);

-- rollup_seals: the instants before which the request rollups hold every raw row and after
-- which they hold none. 'requests', the seal instant, is the fine tiers' (quarter_request_usage,
-- quarter_endpoint_usage and endpoint_routes); 'request_hours', the hour instant, a whole UTC
-- hour at or before it, is the coarse tiers' (the request histograms by hour and day, the
-- endpoint rollups by day); 'request_days', the month instant, a UTC midnight at or before the
-- hour instant, is the monthly tiers' (monthly_request_usage, monthly_endpoint_usage). A writer
-- stores a new request of the seal instant or later as a raw row only; a seal
-- (usage_middleware._pgseal, every quarter hour) folds the raw rows between the old and the new
-- instant into the fine tiers; when the new one has passed a whole UTC hour, it sums the fine
-- rows of the hours it completed into the coarse tiers and moves the hour instant there; when
-- that has passed a UTC midnight, it sums the daily rows of the days it completed into the
-- monthly tiers and moves the month instant there, all in one transaction. So a coarse row is
-- written once an hour and a monthly row once a day, not once a quarter hour. Readers take the
-- monthly tiers up to the month instant, the coarse ones up to the hour instant, the fine ones
-- up to the seal instant and the raw rows from it on, so every answer is exact at every moment.
-- Writers hold advisory lock 7215120302 shared for their transaction and a seal holds it
-- exclusively, so no write of old instants commits after a seal has moved them. An install that predates this
-- table had every stored request rolled up: its seal instant starts just after the newest stored
-- request (a new install's at 0001-01-01).
DO $seal$
BEGIN
    IF pg_catalog.to_regclass('public.rollup_seals') IS NULL THEN
        LOCK TABLE public.api_requests IN SHARE MODE;
        CREATE TABLE public.rollup_seals (
            dataset       text PRIMARY KEY,
            sealed_before timestamptz NOT NULL
        );
        INSERT INTO public.rollup_seals (dataset, sealed_before)
        SELECT 'requests', coalesce(max(r.requested_at) + interval '1 microsecond',
                                    '0001-01-01 00:00:00+00'::timestamptz)
          FROM public.api_requests AS r;
        ALTER TABLE public.rollup_seals ENABLE ROW LEVEL SECURITY;
    END IF;
END
$seal$;

-- The month instant. An install whose monthly tiers followed the hour instant, or the seal
-- instant before the hour instant existed, has them cut back to the UTC midnight at or before
-- that instant: that month's rows lose the quarter-hour rows from the midnight up to the
-- instant (the quarter-hour tiers hold every request before the seal instant, which is at or
-- after the hour instant), so they hold the whole days before it. The key is matched as
-- (is null, coalesce) so that the join can hash.
DO $days$
DECLARE
    followed timestamptz;
    midnight timestamptz;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM public.rollup_seals AS s WHERE s.dataset = 'request_days') THEN
        PERFORM pg_catalog.pg_advisory_xact_lock(7215120302);
        SELECT coalesce(max(s.sealed_before) FILTER (WHERE s.dataset = 'request_hours'),
                        max(s.sealed_before) FILTER (WHERE s.dataset = 'requests'))
          INTO followed
          FROM public.rollup_seals AS s;
        midnight := pg_catalog.date_trunc('day', followed AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
        UPDATE public.monthly_request_usage AS m
           SET total_requests = m.total_requests - q.total_requests,
               error_requests = m.error_requests - q.error_requests,
               total_response_us = m.total_response_us - q.total_response_us,
               total_request_bytes = m.total_request_bytes - q.total_request_bytes,
               total_response_bytes = m.total_response_bytes - q.total_response_bytes
          FROM (SELECT f.api_key_id, f.latency_bucket, sum(f.total_requests) AS total_requests,
                       sum(f.error_requests) AS error_requests,
                       sum(f.total_response_us) AS total_response_us,
                       sum(f.total_request_bytes) AS total_request_bytes,
                       sum(f.total_response_bytes) AS total_response_bytes
                  FROM public.quarter_request_usage AS f
                 WHERE f.usage_quarter >= midnight AND f.usage_quarter < followed
                 GROUP BY 1, 2) AS q
         WHERE m.usage_month = pg_catalog.date_trunc('month', midnight AT TIME ZONE 'UTC')::date
           AND (m.api_key_id IS NULL) = (q.api_key_id IS NULL)
           AND coalesce(m.api_key_id, '00000000-0000-0000-0000-000000000000'::uuid)
               = coalesce(q.api_key_id, '00000000-0000-0000-0000-000000000000'::uuid)
           AND m.latency_bucket = q.latency_bucket;
        DELETE FROM public.monthly_request_usage AS m
         WHERE m.usage_month = pg_catalog.date_trunc('month', midnight AT TIME ZONE 'UTC')::date
           AND m.total_requests = 0;
        UPDATE public.monthly_endpoint_usage AS m
           SET total_requests = m.total_requests - q.total_requests,
               total_response_us = m.total_response_us - q.total_response_us,
               total_request_bytes = m.total_request_bytes - q.total_request_bytes,
               total_response_bytes = m.total_response_bytes - q.total_response_bytes
          FROM (SELECT f.api_key_id, f.method, f.route, f.status_code, f.latency_bucket,
                       sum(f.total_requests) AS total_requests,
                       sum(f.total_response_us) AS total_response_us,
                       sum(f.total_request_bytes) AS total_request_bytes,
                       sum(f.total_response_bytes) AS total_response_bytes
                  FROM public.quarter_endpoint_usage AS f
                 WHERE f.usage_quarter >= midnight AND f.usage_quarter < followed
                 GROUP BY 1, 2, 3, 4, 5) AS q
         WHERE m.usage_month = pg_catalog.date_trunc('month', midnight AT TIME ZONE 'UTC')::date
           AND (m.api_key_id IS NULL) = (q.api_key_id IS NULL)
           AND coalesce(m.api_key_id, '00000000-0000-0000-0000-000000000000'::uuid)
               = coalesce(q.api_key_id, '00000000-0000-0000-0000-000000000000'::uuid)
           AND m.method = q.method AND m.route = q.route AND m.status_code = q.status_code
           AND m.latency_bucket = q.latency_bucket;
        DELETE FROM public.monthly_endpoint_usage AS m
         WHERE m.usage_month = pg_catalog.date_trunc('month', midnight AT TIME ZONE 'UTC')::date
           AND m.total_requests = 0;
        INSERT INTO public.rollup_seals (dataset, sealed_before) VALUES ('request_days', midnight);
    END IF;
END
$days$;

-- The hour instant. An install whose coarse tiers followed the seal instant (before the hour
-- instant existed) has them cut back to the UTC midnight before it: their hours and days from
-- that midnight on are deleted (its monthly tiers were cut back to the same midnight above).
DO $hours$
DECLARE
    midnight timestamptz;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM public.rollup_seals AS s WHERE s.dataset = 'request_hours') THEN
        PERFORM pg_catalog.pg_advisory_xact_lock(7215120302);
        SELECT pg_catalog.date_trunc('day', s.sealed_before AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
          INTO midnight
          FROM public.rollup_seals AS s WHERE s.dataset = 'requests';
        DELETE FROM public.hourly_request_usage AS h WHERE h.usage_hour >= midnight;
        DELETE FROM public.daily_request_usage AS d
         WHERE d.usage_date >= (midnight AT TIME ZONE 'UTC')::date;
        DELETE FROM public.daily_endpoint_usage AS d
         WHERE d.usage_date >= (midnight AT TIME ZONE 'UTC')::date;
        INSERT INTO public.rollup_seals (dataset, sealed_before) VALUES ('request_hours', midnight);
    END IF;
END
$hours$;

-- GET /failures reads failed rows newest first, per key or for every key, a page at a time:
-- partial indexes hold only those rows (a small fraction), in the order of the keyset. On the
-- partitioned raw tables these are partitioned indexes (one per partition, made for new
-- partitions too). A failed request is one answered with status >= 400 or an exception.
CREATE INDEX IF NOT EXISTS idx_file_uploads_failed_key_time
    ON public.file_uploads (api_key_id, uploaded_at DESC, id DESC)
    WHERE upload_status = 'failed';
CREATE INDEX IF NOT EXISTS idx_file_uploads_failed_time
    ON public.file_uploads (uploaded_at DESC, id DESC)
    WHERE upload_status = 'failed';
CREATE INDEX IF NOT EXISTS idx_api_requests_failed_key_time
    ON public.api_requests (api_key_id, requested_at DESC, id DESC)
    WHERE status_code >= 400 OR error_message IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_api_requests_failed_time
    ON public.api_requests (requested_at DESC, id DESC)
    WHERE status_code >= 400 OR error_message IS NOT NULL;

-- Row level security on every usage table, with no policy: only the tables' owner (the writer,
-- UsageStore's role) and roles with BYPASSRLS (Supabase's service_role) read or change rows.
-- Supabase grants anon and authenticated every privilege on each new table in public, so
-- without this its REST API would serve and accept rows; supabase_rls.sql adds the read
-- policies for signed-in users. Not FORCEd, so the owner writes as before; on plain PostgreSQL
-- any other role needs a policy or BYPASSRLS to read. Only switched on where it is off, so a
-- re-run takes no table lock.
DO $rls$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['file_uploads', 'api_requests', 'daily_usage', 'hourly_usage',
                             'quarter_usage', 'monthly_request_usage', 'daily_request_usage',
                             'hourly_request_usage', 'quarter_request_usage',
                             'quarter_mismatch_usage', 'endpoint_routes',
                             'monthly_endpoint_usage', 'daily_endpoint_usage',
                             'quarter_endpoint_usage', 'rollup_seals'] LOOP
        IF NOT (SELECT c.relrowsecurity FROM pg_catalog.pg_class AS c
                 WHERE c.oid = pg_catalog.format('public.%I', t)::regclass) THEN
            EXECUTE pg_catalog.format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', t);
        END IF;
        -- Where Supabase's API roles exist: anon gets nothing, authenticated at most SELECT
        -- (TRUNCATE, for one, is not subject to row level security).
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'anon') THEN
            EXECUTE pg_catalog.format('REVOKE ALL ON public.%I FROM anon', t);
        END IF;
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
            EXECUTE pg_catalog.format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, '
                                      'TRIGGER ON public.%I FROM authenticated', t);
        END IF;
    END LOOP;
END
$rls$;

-- Installs whose unique constraints differ from the definitions below get them here: the
-- constraint is rebuilt in place (one ALTER TABLE, so nothing is ever without it; it holds an
-- exclusive lock on the rollup table while its index is rebuilt). A constraint that already
-- reads as intended is left alone, so a re-run does nothing.
DO $covering$
DECLARE
    c record;
    have text;
BEGIN
    FOR c IN SELECT * FROM (VALUES
        ('daily_usage', 'uq_daily_usage',
         'UNIQUE NULLS NOT DISTINCT (api_key_id, usage_date, provider, file_type) '
         'INCLUDE (total_uploads, total_file_size, successful_requests, failed_requests)'),
        ('hourly_usage', 'uq_hourly_usage',
         'UNIQUE NULLS NOT DISTINCT (api_key_id, usage_hour, provider, file_type)'),
        ('monthly_request_usage', 'uq_monthly_request_usage',
         'UNIQUE NULLS NOT DISTINCT (api_key_id, usage_month, latency_bucket) '
         'INCLUDE (total_requests, error_requests, total_response_us)'),
        ('daily_request_usage', 'uq_daily_request_usage',
         'UNIQUE NULLS NOT DISTINCT (api_key_id, usage_date, latency_bucket) '
         'INCLUDE (total_requests, error_requests, total_response_us)'),
        ('hourly_request_usage', 'uq_hourly_request_usage',
         'UNIQUE NULLS NOT DISTINCT (api_key_id, usage_hour, latency_bucket)'),
        ('quarter_usage', 'uq_quarter_usage',
         'UNIQUE NULLS NOT DISTINCT (api_key_id, usage_quarter, provider, file_type)'),
        ('quarter_request_usage', 'uq_quarter_request_usage',
         'UNIQUE NULLS NOT DISTINCT (api_key_id, usage_quarter, latency_bucket)')
    ) AS v(tbl, con, def) LOOP
        SELECT pg_catalog.pg_get_constraintdef(k.oid) INTO have
          FROM pg_catalog.pg_constraint AS k
         WHERE k.conrelid = pg_catalog.format('public.%I', c.tbl)::regclass
           AND k.conname = c.con;
        IF have IS DISTINCT FROM c.def THEN
            EXECUTE pg_catalog.format(
                'ALTER TABLE public.%I DROP CONSTRAINT IF EXISTS %I, ADD CONSTRAINT %I %s',
                c.tbl, c.con, c.con, c.def);
        END IF;
    END LOOP;
END
$covering$;

-- Vacuum the rollups after 1 % of their rows changed or were added (default 20 %), so that all
-- but the most recently written pages are all-visible for index-only scans.
ALTER TABLE public.daily_usage SET
    (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.01);
ALTER TABLE public.hourly_usage SET
    (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.01);
ALTER TABLE public.monthly_request_usage SET
    (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.01);
ALTER TABLE public.daily_request_usage SET
    (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.01);
ALTER TABLE public.hourly_request_usage SET
    (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.01);
ALTER TABLE public.quarter_usage SET
    (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.01);
ALTER TABLE public.quarter_request_usage SET
    (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.01);

-- ---------------------------------------------------------------------------------------------
-- Dashboard functions. They read daily_usage, so days are UTC days; both dates are
-- inclusive. p_file_type is an exact MIME type ('image/jpeg') or a family ('image/*'). NULL
-- filters match everything. SECURITY INVOKER: callers see only the rows they could read anyway
-- (row level security applies, see supabase_rls.sql). The empty search_path plus
-- schema-qualified names mean no object in a caller's schema can be substituted.
-- ---------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION public.get_usage_by_date_range(
    p_start_date date,
    p_end_date   date,
    p_provider   text DEFAULT NULL,
    p_file_type  text DEFAULT NULL,
    p_api_key_id uuid DEFAULT NULL
)
RETURNS TABLE (
    usage_date          date,
    provider            text,
    file_type           text,
    total_uploads       bigint,
    total_file_size     bigint,
    successful_requests bigint,
    failed_requests     bigint
)
LANGUAGE sql
STABLE
SECURITY INVOKER
SET search_path = ''
AS $fn$
    SELECT d.usage_date,
           d.provider,
           d.file_type,
           sum(d.total_uploads)::bigint,
           sum(d.total_file_size)::bigint,
           sum(d.successful_requests)::bigint,
           sum(d.failed_requests)::bigint
      FROM public.daily_usage AS d
     WHERE d.usage_date BETWEEN p_start_date AND p_end_date
       AND (p_provider IS NULL OR d.provider = p_provider)
       AND (p_file_type IS NULL
            OR d.file_type = p_file_type
            OR (pg_catalog.right(p_file_type, 2) = '/*'
                AND pg_catalog.starts_with(d.file_type, pg_catalog.left(p_file_type, -1))))
       AND (p_api_key_id IS NULL OR d.api_key_id = p_api_key_id)
     GROUP BY d.usage_date, d.provider, d.file_type
     ORDER BY d.usage_date, d.provider, d.file_type
$fn$;

CREATE OR REPLACE FUNCTION public.get_file_type_breakdown(
    p_start_date date,
    p_end_date   date,
    p_api_key_id uuid DEFAULT NULL,
    p_provider   text DEFAULT NULL
)
RETURNS TABLE (
    file_type    text,
    upload_count bigint,
    total_size   bigint,
    percentage   numeric
)
LANGUAGE sql
STABLE
SECURITY INVOKER
SET search_path = ''
AS $fn$
    SELECT g.file_type,
           g.upload_count,
           g.total_size,
           pg_catalog.round(
               100.0 * g.upload_count / NULLIF(pg_catalog.sum(g.upload_count) OVER (), 0),
               2)
      FROM (SELECT d.file_type,
                   sum(d.total_uploads)::bigint   AS upload_count,
                   sum(d.total_file_size)::bigint AS total_size
              FROM public.daily_usage AS d
             WHERE d.usage_date BETWEEN p_start_date AND p_end_date
               AND (p_api_key_id IS NULL OR d.api_key_id = p_api_key_id)
               AND (p_provider IS NULL OR d.provider = p_provider)
             GROUP BY d.file_type) AS g
     WHERE g.upload_count > 0
     ORDER BY g.upload_count DESC, g.file_type
$fn$;

CREATE OR REPLACE FUNCTION public.get_provider_breakdown(
    p_start_date date,
    p_end_date   date,
    p_api_key_id uuid DEFAULT NULL,
    p_file_type  text DEFAULT NULL
)
RETURNS TABLE (
    provider     text,
    upload_count bigint,
    total_size   bigint,
    percentage   numeric
)
LANGUAGE sql
STABLE
SECURITY INVOKER
SET search_path = ''
AS $fn$
    SELECT g.provider,
           g.upload_count,
           g.total_size,
           pg_catalog.round(
               100.0 * g.upload_count / NULLIF(pg_catalog.sum(g.upload_count) OVER (), 0),
               2)
      FROM (SELECT d.provider,
                   sum(d.total_uploads)::bigint   AS upload_count,
                   sum(d.total_file_size)::bigint AS total_size
              FROM public.daily_usage AS d
             WHERE d.usage_date BETWEEN p_start_date AND p_end_date
               AND (p_api_key_id IS NULL OR d.api_key_id = p_api_key_id)
               AND (p_file_type IS NULL
                    OR d.file_type = p_file_type
                    OR (pg_catalog.right(p_file_type, 2) = '/*'
                        AND pg_catalog.starts_with(d.file_type, pg_catalog.left(p_file_type, -1))))
             GROUP BY d.provider) AS g
     WHERE g.upload_count > 0
     ORDER BY g.upload_count DESC, g.provider
$fn$;

-- Requests per endpoint (method and route labels as the endpoint rollups hold them, see
-- daily_endpoint_usage): whole calendar months inside the range are read from
-- monthly_endpoint_usage, the other days and those after the month instant from
-- daily_endpoint_usage, the hours after the hour instant from quarter_endpoint_usage and what no
-- seal holds from api_requests. Days are UTC
-- days, both dates inclusive; errors are requests answered with status >= 400. percentage is
-- the share of requests with two decimals adding up to exactly 100, as GET /requests gives it
-- (every share floored to 0.01 %, the missing hundredths to the largest remainders); most
-- requests first.
CREATE OR REPLACE FUNCTION public.get_request_breakdown(
    p_start_date date,
    p_end_date   date,
    p_api_key_id uuid DEFAULT NULL
)
RETURNS TABLE (
    method          text,
    route           text,
    requests        bigint,
    errors          bigint,
    avg_response_ms double precision,
    percentage      numeric
)
LANGUAGE sql
STABLE
SECURITY INVOKER
SET search_path = ''
AS $fn$
    WITH months AS (
        -- the whole months inside the range: [first, stop) (none when first >= stop), and the
        -- first day the monthly rows do not hold yet (the month instant, see rollup_seals)
        SELECT (pg_catalog.date_trunc('month', (p_start_date - 1)::timestamp)
                + interval '1 month')::date AS first,
               pg_catalog.date_trunc('month', (p_end_date + 1)::timestamp)::date AS stop,
               coalesce((SELECT (s.sealed_before AT TIME ZONE 'UTC')::date
                           FROM public.rollup_seals AS s WHERE s.dataset = 'request_days'),
                        'infinity'::date) AS unrolled
    ),
    picked AS (
        SELECT m.method, m.route, m.status_code, m.total_requests, m.total_response_us
          FROM public.monthly_endpoint_usage AS m, months AS w
         WHERE m.usage_month >= w.first AND m.usage_month < w.stop
           AND (p_api_key_id IS NULL OR m.api_key_id = p_api_key_id)
        UNION ALL
        SELECT d.method, d.route, d.status_code, d.total_requests, d.total_response_us
          FROM public.daily_endpoint_usage AS d, months AS w
         WHERE d.usage_date BETWEEN p_start_date AND p_end_date
           AND (w.first >= w.stop OR d.usage_date < w.first OR d.usage_date >= w.stop
                OR d.usage_date >= w.unrolled)
           AND (p_api_key_id IS NULL OR d.api_key_id = p_api_key_id)
        UNION ALL
        -- the sealed requests of the hours no roll has reached yet (see rollup_seals); the
        -- range twice: on the time for one key's constraint, on the UTC wall clock for the
        -- all-keys index
        SELECT q.method, q.route, q.status_code, q.total_requests, q.total_response_us
          FROM public.quarter_endpoint_usage AS q,
               (SELECT GREATEST(
                           coalesce((SELECT s.sealed_before FROM public.rollup_seals AS s
                                      WHERE s.dataset = 'request_hours'),
                                    'infinity'::timestamptz),
                           p_start_date::timestamp AT TIME ZONE 'UTC') AS lo,
                       (p_end_date + 1)::timestamp AT TIME ZONE 'UTC' AS hi) AS w
         WHERE q.usage_quarter >= w.lo AND q.usage_quarter < w.hi
           AND q.usage_quarter AT TIME ZONE 'UTC' >= w.lo AT TIME ZONE 'UTC'
           AND q.usage_quarter AT TIME ZONE 'UTC' < w.hi AT TIME ZONE 'UTC'
           AND (p_api_key_id IS NULL OR q.api_key_id = p_api_key_id)
        UNION ALL
        -- the requests no seal holds yet (see rollup_seals), labelled as the writer labels them
        -- (a key past its route cap has them under their own route until they are sealed)
        SELECT CASE WHEN r.method IN ('CONNECT', 'DELETE', 'GET', 'HEAD', 'OPTIONS', 'PATCH',
                                      'POST', 'PUT', 'TRACE')
                    THEN r.method ELSE 'OTHER' END,
               (CASE WHEN r.route_matched IS FALSE THEN '(unmatched)' ELSE r.path END)
                   COLLATE "C",
               r.status_code::smallint, 1::bigint,
               pg_catalog.round(r.response_time_ms * 1000::float8)::bigint
          FROM public.api_requests AS r
         WHERE r.requested_at >= GREATEST(
                   coalesce((SELECT s.sealed_before FROM public.rollup_seals AS s
                              WHERE s.dataset = 'requests'), 'infinity'::timestamptz),
                   p_start_date::timestamp AT TIME ZONE 'UTC')
           AND r.requested_at < (p_end_date + 1)::timestamp AT TIME ZONE 'UTC'
           AND (p_api_key_id IS NULL OR r.api_key_id = p_api_key_id)
    ),
    g AS (
        SELECT p.method,
               p.route::text COLLATE "C" AS route,
               sum(p.total_requests)::bigint AS requests,
               coalesce(sum(p.total_requests) FILTER (WHERE p.status_code >= 400), 0)::bigint
                   AS errors,
               sum(p.total_response_us) AS response_us
          FROM picked AS p
         GROUP BY p.method, p.route
        HAVING sum(p.total_requests) > 0
    ),
    shares AS (  -- in hundredths of a percent: each share's floor and remainder
        SELECT g.*,
               g.requests * 10000 / t.total AS floor,
               g.requests * 10000 % t.total AS remainder
          FROM g, (SELECT sum(x.requests)::bigint AS total FROM g AS x) AS t
    ),
    ranked AS (
        SELECT s.*,
               pg_catalog.sum(s.floor) OVER () AS floors,
               pg_catalog.row_number() OVER (
                   ORDER BY s.remainder DESC, s.requests DESC, s.method COLLATE "C", s.route
               ) AS by_remainder
          FROM shares AS s
    )
    SELECT r.method,
           r.route,
           r.requests,
           r.errors,
           r.response_us::double precision / r.requests / 1000,
           pg_catalog.round(
               (r.floor + CASE WHEN r.by_remainder <= 10000 - r.floors THEN 1 ELSE 0 END)
               / 100.0,
               2)
      FROM ranked AS r
     ORDER BY r.requests DESC, r.method COLLATE "C", r.route
$fn$;

-- Functions are executable by PUBLIC by default. Take that away; on Supabase, also from anon,
-- and give it to signed-in users (authenticated) and the service role. On plain PostgreSQL,
-- where those roles do not exist, grant EXECUTE to your application's role yourself.
REVOKE ALL ON FUNCTION public.get_usage_by_date_range(date, date, text, text, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION public.get_file_type_breakdown(date, date, uuid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION public.get_provider_breakdown(date, date, uuid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION public.get_request_breakdown(date, date, uuid) FROM PUBLIC;

DO $grants$
DECLARE
    fn text;
BEGIN
    FOREACH fn IN ARRAY ARRAY[
        'public.get_usage_by_date_range(date, date, text, text, uuid)',
        'public.get_file_type_breakdown(date, date, uuid, text)',
        'public.get_provider_breakdown(date, date, uuid, text)',
        'public.get_request_breakdown(date, date, uuid)'
    ] LOOP
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'anon') THEN
            EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM anon', fn);
        END IF;
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO authenticated', fn);
        END IF;
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO service_role', fn);
        END IF;
    END LOOP;
END
$grants$;
