-- The schema file of release 0.1.0 (plain, unpartitioned raw tables), kept for the upgrade tests.
-- usage-middleware schema for PostgreSQL 15+ and Supabase.
-- Safe to run any number of times. Everything lives in schema "public" and is named with it.

CREATE TABLE IF NOT EXISTS public.file_uploads (
    id            uuid PRIMARY KEY,
    api_key_id    uuid,
    request_id    uuid,
    provider      text NOT NULL,
    file_type     text NOT NULL,
    declared_type text,
    file_size     bigint NOT NULL CHECK (file_size >= 0),
    file_name     text,
    upload_status text NOT NULL CHECK (upload_status IN ('success', 'failed')),
    error_message text,
    uploaded_at   timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_file_uploads_key_time ON public.file_uploads (api_key_id, uploaded_at);
CREATE INDEX IF NOT EXISTS idx_file_uploads_time ON public.file_uploads (uploaded_at);

CREATE TABLE IF NOT EXISTS public.api_requests (
    id               uuid PRIMARY KEY,
    api_key_id       uuid,
    method           text NOT NULL,
    path             text NOT NULL,
    status_code      integer NOT NULL,
    response_time_ms double precision NOT NULL,
    request_size     bigint NOT NULL,
    response_size    bigint NOT NULL,
    error_message    text,
    requested_at     timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_api_requests_key_time ON public.api_requests (api_key_id, requested_at);
CREATE INDEX IF NOT EXISTS idx_api_requests_time ON public.api_requests (requested_at);

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

-- The hourly rollups' time-only indexes are BRIN: rows arrive in time order, so block ranges
-- serve the all-keys reads, cost little to maintain, and never look cheaper to the planner than
-- the (key, hour) constraint for one key's reads. A btree there would: once the table is in
-- time order it reads every key's rows of an hour to find one key's. Older btrees are replaced.
DO $brin$
DECLARE
    ix record;
BEGIN
    FOR ix IN SELECT * FROM (VALUES
        ('hourly_usage', 'idx_hourly_usage_usage_hour'),
        ('hourly_request_usage', 'idx_hourly_request_usage_usage_hour')
    ) AS v(tbl, idx) LOOP
        IF NOT EXISTS (
            SELECT 1 FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_am AS a ON a.oid = c.relam
             WHERE c.oid = pg_catalog.to_regclass(pg_catalog.format('public.%I', ix.idx))
               AND a.amname = 'brin'
        ) THEN
            EXECUTE pg_catalog.format('DROP INDEX IF EXISTS public.%I', ix.idx);
            EXECUTE pg_catalog.format(
                'CREATE INDEX %I ON public.%I USING brin (usage_hour)', ix.idx, ix.tbl);
        END IF;
    END LOOP;
END
$brin$;

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
         'UNIQUE NULLS NOT DISTINCT (api_key_id, usage_hour, latency_bucket)')
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

-- Functions are executable by PUBLIC by default. Take that away; on Supabase, also from anon,
-- and give it to signed-in users (authenticated) and the service role. On plain PostgreSQL,
-- where those roles do not exist, grant EXECUTE to your application's role yourself.
REVOKE ALL ON FUNCTION public.get_usage_by_date_range(date, date, text, text, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION public.get_file_type_breakdown(date, date, uuid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION public.get_provider_breakdown(date, date, uuid, text) FROM PUBLIC;

DO $grants$
DECLARE
    fn text;
BEGIN
    FOREACH fn IN ARRAY ARRAY[
        'public.get_usage_by_date_range(date, date, text, text, uuid)',
        'public.get_file_type_breakdown(date, date, uuid, text)',
        'public.get_provider_breakdown(date, date, uuid, text)'
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
