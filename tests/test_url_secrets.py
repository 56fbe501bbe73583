"""Credentials in a database URL never reach an outlet that shows the URL.

A password may come in the user-info part (``user:pw@host``), as a ``?password=`` or
``?sslpassword=`` query parameter, or inside a conninfo string libpq expands from ``dbname``.
Each outlet — the store's repr, ``DatabaseUnavailableError``, ``recorder.stats()``, the
recorder's warnings, the OpenTelemetry metric attributes and ``/health`` — shows the same
masked URL.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount
from support.checks import wait_for

from usage_middleware import (
    ALL_KEYS,
    DatabaseUnavailableError,
    Recorder,
    UploadRecord,
    UsageRouter,
    UsageStore,
)

SECRETS = ("userinfo-pw-1", "query-pw-2", "ssl-pw-3", "conninfo-pw-4")


def closed_port() -> int:
    """A local port nothing listens on: connections to it are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def secret_url() -> str:
    return (
        f"postgresql+psycopg://writer:{SECRETS[0]}@127.0.0.1:{closed_port()}/usage"
        f"?password={SECRETS[1]}&sslpassword={SECRETS[2]}&application_name=usage-test"
        f"&service=host%3Dh+password%3D{SECRETS[3]}"
    )


def assert_masked(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, text
    assert "***" in text, text


def test_store_repr_and_unavailable_error_mask_every_password(secret_url: str) -> None:
    """The repr and the unreachable-database error show the URL with each password masked."""
    store = UsageStore(secret_url, connect_timeout=1)
    try:
        shown = repr(store)
        assert_masked(shown)
        assert "writer@127.0.0.1" not in shown and "writer:***@127.0.0.1" in shown
        assert "application_name=usage-test" in shown  # harmless parameters stay readable
        with pytest.raises(DatabaseUnavailableError) as caught:
            store.write([UploadRecord(provider="s3", file_size=1)])
        assert_masked(str(caught.value))
    finally:
        store.dispose()


def metric_attributes(reader: InMemoryMetricReader) -> list[dict[str, Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    return [
        dict(point.attributes or {})
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name.startswith("usage_middleware.recorder.")
        for point in metric.data.data_points
    ]


def test_recorder_stats_logs_metrics_and_health_mask_every_password(
    secret_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the database unreachable: stats, warnings, metric attributes and /health."""
    caplog.set_level(logging.WARNING)
    store = UsageStore(secret_url, connect_timeout=1)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    recorder = Recorder(
        store,
        spool_path=tmp_path / "spool.db",
        flush_interval=0.05,
        backoff_initial=0.05,
        backoff_max=0.2,
        meter_provider=provider,
    )

    def everything(_request: Request) -> Any:
        return ALL_KEYS

    app = Starlette(routes=[Mount("/usage", UsageRouter(store, authorize=everything))])

    async def health() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/usage/health")

    try:
        recorder.submit(UploadRecord(provider="s3", file_size=1))
        assert wait_for(lambda: recorder.stats()["failed_writes"] >= 1)
        stats = recorder.stats()
        assert_masked(stats["store"])
        assert_masked(stats["last_error"])
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("failed, will retry" in w for w in warnings), warnings
        for warning in warnings:
            for secret in SECRETS:
                assert secret not in warning, warning
        attributes = metric_attributes(reader)
        assert attributes
        for attrs in attributes:
            assert_masked(str(attrs["usage_middleware.store"]))
        response = anyio.run(health)
        assert response.status_code == 503
        assert response.json()["recorders"]
        assert_masked(response.text)
    finally:
        recorder.shutdown(1)
        provider.shutdown()
        store.dispose()
