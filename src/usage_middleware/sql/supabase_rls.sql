-- usage-middleware: read policies for Supabase. Run after usage_tracking_schema.sql, and again
-- after each upgrade (a table a new release adds gets its policy here). Safe to run any number
-- of times. Not run by UsageStore.create_schema(): it needs Supabase's auth schema (auth.uid())
-- and its anon / authenticated roles.
--
-- Assumed ownership table (the one the host app already has for its API keys):
--
--     public.api_keys (
--         id      uuid PRIMARY KEY,   -- the value stored in api_key_id
--         user_id uuid NOT NULL       -- auth.users.id of the key's owner
--     )
--
-- With a differently named table, replace "public.api_keys", "id" and "user_id" in the policy
-- expression below (fourteen places, one per table).
--
-- Effect:
--   * RLS is on for all fourteen usage tables (usage_tracking_schema.sql already switches it on,
--     with no policy: nobody but the owner reads) and the legacy-migration marker, if present.
--   * A signed-in user (role authenticated) may SELECT only rows whose api_key_id belongs to
--     one of their own keys; rows without a key are visible to nobody through the API.
--   * anon gets no policy, so it reads nothing; nobody gets INSERT/UPDATE/DELETE policies.
--     The writer (UsageStore) connects as the table owner or service_role, which bypass RLS.
--   * The dashboard functions are SECURITY INVOKER, so they return only what the caller's
--     policies allow (usage_tracking_schema.sql revokes EXECUTE from anon).
--   * (select auth.uid()) is evaluated once per query, not once per row (splinter's
--     auth_rls_initplan).

ALTER TABLE public.file_uploads ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.api_requests ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.daily_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.hourly_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.monthly_request_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.daily_request_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.hourly_request_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.quarter_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.quarter_request_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.quarter_mismatch_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.monthly_endpoint_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.daily_endpoint_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.quarter_endpoint_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.endpoint_routes ENABLE ROW LEVEL SECURITY;

DO $marker$
BEGIN
    IF pg_catalog.to_regclass('public.usage_legacy_migrations') IS NOT NULL THEN
        ALTER TABLE public.usage_legacy_migrations ENABLE ROW LEVEL SECURITY;
    END IF;
END
$marker$;

DROP POLICY IF EXISTS "owners read their uploads" ON public.file_uploads;
CREATE POLICY "owners read their uploads" ON public.file_uploads
    FOR SELECT TO authenticated
    USING (api_key_id IN (SELECT k.id FROM public.api_keys AS k WHERE k.user_id = (SELECT auth.uid())));

DROP POLICY IF EXISTS "owners read their requests" ON public.api_requests;
CREATE POLICY "owners read their requests" ON public.api_requests
    FOR SELECT TO authenticated
    USING (api_key_id IN (SELECT k.id FROM public.api_keys AS k WHERE k.user_id = (SELECT auth.uid())));

DROP POLICY IF EXISTS "owners read their daily usage" ON public.daily_usage;
CREATE POLICY "owners read their daily usage" ON public.daily_usage
    FOR SELECT TO authenticated
    USING (api_key_id IN (SELECT k.id FROM public.api_keys AS k WHERE k.user_id = (SELECT auth.uid())));

DROP POLICY IF EXISTS "owners read their hourly usage" ON public.hourly_usage;
CREATE POLICY "owners read their hourly usage" ON public.hourly_usage
    FOR SELECT TO authenticated
    USING (api_key_id IN (SELECT k.id FROM public.api_keys AS k WHERE k.user_id = (SELECT auth.uid())));

DROP POLICY IF EXISTS "owners read their monthly request usage" ON public.monthly_request_usage;
CREATE POLICY "owners read their monthly request usage" ON public.monthly_request_usage
    FOR SELECT TO authenticated
    USING (api_key_id IN (SELECT k.id FROM public.api_keys AS k WHERE k.user_id = (SELECT auth.uid())));

DROP POLICY IF EXISTS "owners read their daily request usage" ON public.daily_request_usage;
CREATE POLICY "owners read their daily request usage" ON public.daily_request_usage
    FOR SELECT TO authenticated
    USING (api_key_id IN (SELECT k.id FROM public.api_keys AS k WHERE k.user_id = (SELECT auth.uid())));

DROP POLICY IF EXISTS "owners read their hourly request usage" ON public.hourly_request_usage;
CREATE POLICY "owners read their hourly request usage" ON public.hourly_request_usage
    FOR SELECT TO authenticated
    USING (api_key_id IN (SELECT k.id FROM public.api_keys AS k WHERE k.user_id = (SELECT auth.uid())));

DROP POLICY IF EXISTS "owners read their quarter-hour usage" ON public.quarter_usage;
CREATE POLICY "owners read their quarter-hour usage" ON public.quarter_usage
    FOR SELECT TO authenticated
    USING (api_key_id IN (SELECT k.id FROM public.api_keys AS k WHERE k.user_id = (SELECT auth.uid())));

DROP POLICY IF EXISTS "owners read their quarter-hour request usage" ON public.quarter_request_usage;
CREATE POLICY "owners read their quarter-hour request usage" ON public.quarter_request_usage
    FOR SELECT TO authenticated
    USING (api_key_id IN (SELECT k.id FROM public.api_keys AS k WHERE k.user_id = (SELECT auth.uid())));

DROP POLICY IF EXISTS "owners read their type mismatches" ON public.quarter_mismatch_usage;
CREATE POLICY "owners read their type mismatches" ON public.quarter_mismatch_usage
    FOR SELECT TO authenticated
    USING (api_key_id IN (SELECT k.id FROM public.api_keys AS k WHERE k.user_id = (SELECT auth.uid())));
REVOKE ALL ON public.quarter_mismatch_usage FROM anon;
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON public.quarter_mismatch_usage FROM authenticated;
GRANT SELECT ON public.quarter_mismatch_usage TO authenticated;

DROP POLICY IF EXISTS "owners read their monthly endpoint usage" ON public.monthly_endpoint_usage;
CREATE POLICY "owners read their monthly endpoint usage" ON public.monthly_endpoint_usage
    FOR SELECT TO authenticated
    USING (api_key_id IN (SELECT k.id FROM public.api_keys AS k WHERE k.user_id = (SELECT auth.uid())));

DROP POLICY IF EXISTS "owners read their daily endpoint usage" ON public.daily_endpoint_usage;
CREATE POLICY "owners read their daily endpoint usage" ON public.daily_endpoint_usage
    FOR SELECT TO authenticated
    USING (api_key_id IN (SELECT k.id FROM public.api_keys AS k WHERE k.user_id = (SELECT auth.uid())));

DROP POLICY IF EXISTS "owners read their quarter-hour endpoint usage" ON public.quarter_endpoint_usage;
CREATE POLICY "owners read their quarter-hour endpoint usage" ON public.quarter_endpoint_usage
    FOR SELECT TO authenticated
    USING (api_key_id IN (SELECT k.id FROM public.api_keys AS k WHERE k.user_id = (SELECT auth.uid())));

DROP POLICY IF EXISTS "owners read their endpoint routes" ON public.endpoint_routes;
CREATE POLICY "owners read their endpoint routes" ON public.endpoint_routes
    FOR SELECT TO authenticated
    USING (api_key_id IN (SELECT k.id FROM public.api_keys AS k WHERE k.user_id = (SELECT auth.uid())));

REVOKE ALL ON public.monthly_endpoint_usage, public.daily_endpoint_usage,
    public.quarter_endpoint_usage, public.endpoint_routes FROM anon;
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON public.monthly_endpoint_usage,
    public.daily_endpoint_usage, public.quarter_endpoint_usage, public.endpoint_routes
    FROM authenticated;
GRANT SELECT ON public.monthly_endpoint_usage, public.daily_endpoint_usage,
    public.quarter_endpoint_usage, public.endpoint_routes TO authenticated;

-- rollup_seals holds the seal instants and nothing about any key: every signed-in user reads
-- them, so that get_request_breakdown adds the requests that no roll or no seal holds yet.
ALTER TABLE public.rollup_seals ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS "signed-in users read the seal instants" ON public.rollup_seals;
CREATE POLICY "signed-in users read the seal instants" ON public.rollup_seals
    FOR SELECT TO authenticated
    USING (true);
REVOKE ALL ON public.rollup_seals FROM anon;
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON public.rollup_seals FROM authenticated;
GRANT SELECT ON public.rollup_seals TO authenticated;

-- Supabase grants table privileges to anon and authenticated by default. Reading is all the
-- dashboard needs; anon needs nothing.
REVOKE ALL ON public.file_uploads, public.api_requests, public.daily_usage, public.hourly_usage,
    public.monthly_request_usage, public.daily_request_usage, public.hourly_request_usage,
    public.quarter_usage, public.quarter_request_usage
    FROM anon;
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON public.file_uploads, public.api_requests,
    public.daily_usage, public.hourly_usage, public.monthly_request_usage,
    public.daily_request_usage, public.hourly_request_usage, public.quarter_usage,
    public.quarter_request_usage FROM authenticated;
GRANT SELECT ON public.file_uploads, public.api_requests, public.daily_usage,
    public.hourly_usage, public.monthly_request_usage, public.daily_request_usage,
    public.hourly_request_usage, public.quarter_usage, public.quarter_request_usage
    TO authenticated;
