-- usage-middleware: move the old per-provider running totals into daily_usage (PostgreSQL 15+).
--
-- Run it after usage_tracking_schema.sql. It is what `usage-middleware migrate URL` runs too.
--
-- The assumed legacy table (one row per provider, or per provider and API key):
--
--     public.provider_usage (
--         provider      text,         -- 'vercel', 's3', ...
--         api_key_id    uuid,         -- optional: leave out with api_key_column = 'none'
--         total_uploads bigint,       -- running count of stored files
--         total_size    bigint,       -- running sum of their bytes
--         updated_at    timestamptz   -- when the totals were last incremented
--     )
--
-- What it does, inventing nothing:
--   * Each legacy total lands in daily_usage with file_type 'unknown' (the old data has no type)
--     on the UTC date of the date column (updated_at: the day by which all those uploads had
--     happened; a NULL date is taken as today, the day the totals are known to exist), and in
--     hourly_usage and quarter_usage at 00:00 UTC of that date, so the daily, hourly and
--     quarter-hour rollups stay consistent.
--   * The old totals counted files that were stored, so they count as successful uploads.
--   * Rows with the same provider, key and date are summed; rows with nothing in them skipped.
--   * All-time per-provider totals over daily_usage grow by exactly the legacy totals.
--
-- Running it twice does not double anything: the first run records the source table in
-- public.usage_legacy_migrations (with the totals it moved) in the same transaction, and any
-- later run for the same source finds that row and does nothing.
--
-- A differently named table or columns: either edit the defaults in the DECLARE block below, or
-- set these before running (e.g. in the same SQL editor session / transaction):
--
--     SELECT set_config('usage_migrate.legacy_table',    'public.storage_stats', false);
--     SELECT set_config('usage_migrate.provider_column', 'storage_provider',     false);
--     SELECT set_config('usage_migrate.uploads_column',  'file_count',           false);
--     SELECT set_config('usage_migrate.bytes_column',    'bytes_used',           false);
--     SELECT set_config('usage_migrate.date_column',     'last_upload_at',       false);
--     SELECT set_config('usage_migrate.api_key_column',  'none',                 false);

DO $migrate$
DECLARE
    legacy_table   text := COALESCE(NULLIF(current_setting('usage_migrate.legacy_table', true), ''),
                                    'public.provider_usage');
    provider_col   text := COALESCE(NULLIF(current_setting('usage_migrate.provider_column', true), ''),
                                    'provider');
    uploads_col    text := COALESCE(NULLIF(current_setting('usage_migrate.uploads_column', true), ''),
                                    'total_uploads');
    bytes_col      text := COALESCE(NULLIF(current_setting('usage_migrate.bytes_column', true), ''),
                                    'total_size');
    date_col       text := COALESCE(NULLIF(current_setting('usage_migrate.date_column', true), ''),
                                    'updated_at');
    api_key_col    text := COALESCE(NULLIF(current_setting('usage_migrate.api_key_column', true), ''),
                                    'api_key_id');
    legacy_rel     regclass;
    api_key_expr   text;
    done_at        timestamptz;
BEGIN
    legacy_rel := pg_catalog.to_regclass(legacy_table);
    IF legacy_rel IS NULL THEN
        RAISE EXCEPTION 'legacy usage table % does not exist', legacy_table
            USING HINT = 'set usage_migrate.legacy_table (see the top of this file)';
    END IF;
    -- Dates are UTC dates, whatever the session's time zone.
    PERFORM pg_catalog.set_config('timezone', 'UTC', true);

    CREATE TABLE IF NOT EXISTS public.usage_legacy_migrations (
        source          text PRIMARY KEY,
        migrated_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
        legacy_rows     bigint NOT NULL,
        total_uploads   bigint NOT NULL,
        total_file_size bigint NOT NULL
    );
    ALTER TABLE public.usage_legacy_migrations ENABLE ROW LEVEL SECURITY;
    -- One migration at a time; a second concurrent run waits, then finds the marker.
    PERFORM pg_catalog.pg_advisory_xact_lock(7215120302);

    SELECT m.migrated_at INTO done_at
      FROM public.usage_legacy_migrations AS m WHERE m.source = legacy_rel::text;
    IF FOUND THEN
        RAISE NOTICE 'usage-middleware: % was already migrated at %; nothing done', legacy_rel, done_at;
        RETURN;
    END IF;

    api_key_expr := CASE WHEN pg_catalog.lower(api_key_col) = 'none' THEN 'NULL::uuid'
                         ELSE pg_catalog.format('l.%I::uuid', api_key_col) END;

    EXECUTE pg_catalog.format($sql$
        WITH legacy AS (
            SELECT %1$s                                              AS api_key_id,
                   COALESCE(NULLIF(pg_catalog.btrim(l.%2$I::text), ''), 'unknown') AS provider,
                   COALESCE((l.%3$I::timestamptz AT TIME ZONE 'UTC')::date,
                            (pg_catalog.now() AT TIME ZONE 'UTC')::date) AS usage_date,
                   COALESCE(l.%4$I, 0)::bigint                       AS uploads,
                   COALESCE(l.%5$I, 0)::bigint                       AS bytes
              FROM %6$s AS l
        ), grouped AS (
            SELECT api_key_id, usage_date, provider,
                   sum(uploads)::bigint AS uploads, sum(bytes)::bigint AS bytes, count(*) AS n
              FROM legacy
             WHERE uploads <> 0 OR bytes <> 0
             GROUP BY api_key_id, usage_date, provider
        ), daily AS (
            INSERT INTO public.daily_usage AS t
                (api_key_id, usage_date, provider, file_type,
                 total_uploads, total_file_size, successful_requests, failed_requests)
            SELECT api_key_id, usage_date, provider, 'unknown', uploads, bytes, uploads, 0
              FROM grouped
             ORDER BY api_key_id, usage_date, provider
            ON CONFLICT ON CONSTRAINT uq_daily_usage DO UPDATE SET
                total_uploads = t.total_uploads + EXCLUDED.total_uploads,
                total_file_size = t.total_file_size + EXCLUDED.total_file_size,
                successful_requests = t.successful_requests + EXCLUDED.successful_requests
            RETURNING 1
        ), hourly AS (
            INSERT INTO public.hourly_usage AS t
                (api_key_id, usage_hour, provider, file_type,
                 total_uploads, total_file_size, successful_requests, failed_requests)
            SELECT api_key_id, usage_date::timestamp AT TIME ZONE 'UTC', provider, 'unknown',
                   uploads, bytes, uploads, 0
              FROM grouped
             ORDER BY api_key_id, usage_date, provider
            ON CONFLICT ON CONSTRAINT uq_hourly_usage DO UPDATE SET
                total_uploads = t.total_uploads + EXCLUDED.total_uploads,
                total_file_size = t.total_file_size + EXCLUDED.total_file_size,
                successful_requests = t.successful_requests + EXCLUDED.successful_requests
            RETURNING 1
        ), quarter AS (
            INSERT INTO public.quarter_usage AS t
                (api_key_id, usage_quarter, provider, file_type,
                 total_uploads, total_file_size, successful_requests, failed_requests)
            SELECT api_key_id, usage_date::timestamp AT TIME ZONE 'UTC', provider, 'unknown',
                   uploads, bytes, uploads, 0
              FROM grouped
             ORDER BY api_key_id, usage_date, provider
            ON CONFLICT ON CONSTRAINT uq_quarter_usage DO UPDATE SET
                total_uploads = t.total_uploads + EXCLUDED.total_uploads,
                total_file_size = t.total_file_size + EXCLUDED.total_file_size,
                successful_requests = t.successful_requests + EXCLUDED.successful_requests
            RETURNING 1
        )
        INSERT INTO public.usage_legacy_migrations
            (source, legacy_rows, total_uploads, total_file_size)
        SELECT %7$L, COALESCE(sum(n), 0), COALESCE(sum(uploads), 0), COALESCE(sum(bytes), 0)
          FROM grouped
    $sql$, api_key_expr, provider_col, date_col, uploads_col, bytes_col, legacy_rel, legacy_rel::text);

    RAISE NOTICE 'usage-middleware: migrated % into daily_usage, hourly_usage and quarter_usage',
        legacy_rel;
END
$migrate$;
