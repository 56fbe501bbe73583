"""Hypothesis strategies for records, shared by the read-path properties."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from hypothesis import strategies as st

from usage_middleware import RequestRecord, UploadRecord


def upload_records(
    instant: st.SearchStrategy[datetime],
    keys: list[UUID | None],
    providers: list[str],
    types: list[str],
    declared: st.SearchStrategy[str | None] | None = None,
    max_file_size: int = 10**9,
) -> st.SearchStrategy[UploadRecord]:
    """Uploads at ``instant`` of one of ``keys``, successful or failed, up to
    ``max_file_size`` bytes, with a declared type drawn from ``declared`` (none by default)."""

    def build(at: datetime, key: UUID | None, provider: str, ft: str, size: int, ok: bool,
              claimed: str | None) -> UploadRecord:  # fmt: skip
        return UploadRecord(
            api_key_id=key,
            provider=provider,
            file_type=ft,
            file_size=size,
            upload_status="success" if ok else "failed",
            declared_type=claimed,
            uploaded_at=at,
        )

    return st.builds(
        build,
        instant,
        st.sampled_from(keys),
        st.sampled_from(providers),
        st.sampled_from(types),
        st.integers(0, max_file_size),
        st.booleans(),
        declared if declared is not None else st.none(),
    )


def request_records(
    instant: st.SearchStrategy[datetime],
    keys: list[UUID | None],
    statuses: list[int],
    response_ms: st.SearchStrategy[float] | None = None,
) -> st.SearchStrategy[RequestRecord]:
    """``POST /files`` requests at ``instant`` of one of ``keys``, answered with one of
    ``statuses`` in ``response_ms`` milliseconds (2 ms by default)."""

    def build(at: datetime, key: UUID | None, ms: float, status: int) -> RequestRecord:
        return RequestRecord(
            api_key_id=key,
            method="POST",
            path="/files",
            status_code=status,
            response_time_ms=ms,
            request_size=10,
            response_size=20,
            requested_at=at,
        )

    ms: Any = response_ms if response_ms is not None else st.just(2.0)
    return st.builds(build, instant, st.sampled_from(keys), ms, st.sampled_from(statuses))
