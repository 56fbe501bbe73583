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
);
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
);
CREATE INDEX IF NOT EXISTS idx_hourly_usage_usage_hour ON public.hourly_usage (usage_hour);

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
);
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
);
CREATE INDEX IF NOT EXISTS idx_hourly_request_usage_usage_hour ON public.hourly_request_usage (usage_hour);
