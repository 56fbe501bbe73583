"""Property: after any sequence of batches (with duplicates and replays) rollups = GROUP BY."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.endpoints import EndpointReference, stored_endpoints, stored_request_rows
from support.rollups import FAR, assert_rollups_exact, raw_counts

from usage_middleware import RequestRecord, UploadRecord, UsageStore

UTC = timezone.utc
BASE = datetime(2025, 3, 29, 20, tzinfo=UTC)
KEYS = [None, uuid.UUID(int=1, version=4), uuid.UUID(int=2, version=4)]

# Ids come from a small pool so batches collide with each other and with themselves.
ids = st.integers(min_value=1, max_value=60).map(lambda i: uuid.UUID(int=i, version=4))
moments = st.integers(min_value=0, max_value=3 * 86400).map(lambda s: BASE + timedelta(seconds=s))

uploads = st.builds(
    UploadRecord,
    id=ids,
    api_key_id=st.sampled_from(KEYS),
    provider=st.sampled_from(["vercel", "s3", "unknown"]),
    file_type=st.sampled_from(["image/png", "application/pdf", "text/plain"]),
    file_size=st.integers(min_value=0, max_value=2**40),
    upload_status=st.sampled_from(["success", "failed"]),
    uploaded_at=moments,
)
requests = st.builds(
    RequestRecord,
    id=ids,
    api_key_id=st.sampled_from(KEYS),
    method=st.sampled_from(["GET", "POST", "DELETE", "PROPFIND"]),
    path=st.sampled_from(["/files/{id}", "/upload", "/.env"]),
    route_matched=st.booleans(),
    status_code=st.sampled_from([200, 204, 400, 404, 503]),
    response_time_ms=st.floats(min_value=0, max_value=60_000, allow_nan=False),
    request_size=st.integers(min_value=0, max_value=2**31),
    response_size=st.integers(min_value=0, max_value=2**31),
    requested_at=moments,
)
batches = st.lists(st.lists(st.one_of(uploads, requests), max_size=25), min_size=1, max_size=4)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batches=batches)
def test_rollups_equal_group_by_for_random_batches(
    store: UsageStore, batches: list[list[UploadRecord | RequestRecord]]
) -> None:
    """Whatever batches arrive, in whatever order and repetition, every rollup stays exact, and
    the endpoint rollups follow the route rule batch by batch."""
    seen: set[tuple[str, uuid.UUID]] = set()
    # PostgreSQL: every request late (before the seal instant), so each batch carries its
    # rollups and admits its routes as one group, as the reference does (test_seal.py: sealing)
    store.seal(FAR)
    reference = EndpointReference(by_time=store.dialect == "postgresql")
    reference.write(stored_request_rows(store), stored=True)
    before = raw_counts(store)
    for batch in batches:
        new = {(type(r).__name__, r.id) for r in batch}
        stored_before = raw_counts(store)
        written = store.write(batch)
        reference.write([r for r in batch if isinstance(r, RequestRecord)])
        assert sum(stored_before) + written == sum(raw_counts(store))
        seen |= new
        store.write(batch)  # a replay adds nothing
    assert sum(raw_counts(store)) >= sum(before)
    assert_rollups_exact(store)
    assert stored_endpoints(store) == reference.rollups()
