"""What the browser tests share: waiting for one change to render, reading the page, axe-core.

axe-core comes from the npm registry into ``tests/browser/node`` (``npm ci`` against the
committed lock file, run once by :func:`axe_script`), is injected into the page under test and
never loaded from a CDN. A missing ``npm`` skips the browser tests locally and fails them under
``CI=true``, like a missing Chromium.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

STATE = "document.getElementById('main').dataset.state"
# The main answer is in and no panel is still waiting for its own call.
SETTLED = (
    f"{STATE} !== 'loading' && !document.querySelector('[data-panel][data-state=\"loading\"]')"
)
NODE_DIR = Path(__file__).resolve().parent / "node"
AXE = NODE_DIR / "node_modules" / "axe-core" / "axe.min.js"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# WCAG 2.1 A/AA and axe's best practices; serious and critical findings fail a test.
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]
FAILING_IMPACTS = ("serious", "critical")


def _unavailable(message: str) -> None:
    if IN_CI:
        pytest.fail(f"{message}; CI=true: the accessibility checks are required")
    pytest.skip(message)


@cache
def _install_axe() -> str | None:
    """``npm ci`` into tests/browser/node once; the error text when it cannot."""
    if AXE.exists():
        return None
    npm = shutil.which("npm")
    if npm is None:
        return "npm is missing (apt-get install npm), needed to install axe-core"
    result = subprocess.run(
        [npm, "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0 or not AXE.exists():
        return f"npm ci --prefix {NODE_DIR} failed: {result.stderr.strip()[-500:]}"
    return None


def axe_script() -> Path:
    """The axe-core bundle, installed on first use; skips (fails under CI) without it."""
    problem = _install_axe()
    if problem is not None:
        _unavailable(problem)
    return AXE


def audit(page: Any, context: str = "") -> None:
    """No serious or critical axe-core violation in the page as it is now."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.add_script_tag(path=str(axe_script()))
    result = page.evaluate(
        """tags => axe.run(document, {runOnly: {type: 'tag', values: tags},
            resultTypes: ['violations']})""",
        AXE_TAGS,
    )
    bad = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:5]}"
        for v in result["violations"]
        if v["impact"] in FAILING_IMPACTS
    ]
    assert not bad, f"accessibility violations {context or page.url}: {bad}"


def settle(page: Any, action: Any, *, check: bool = True) -> Any:
    """Run ``action`` (one user change), wait for its ``/granular`` answer, the render and the
    panels' own answers, then audit the resulting state with axe-core."""
    with page.expect_response(lambda r: "/granular?" in r.url) as answer:
        action()
    page.wait_for_function(SETTLED)
    if check:
        audit(page)
    return answer.value


def granular_calls(page: Any) -> list[str]:
    calls: list[str] = []
    page.on("request", lambda r: calls.append(r.url) if "/granular?" in r.url else None)
    return calls


def page_query(page: Any) -> str:
    from urllib.parse import urlsplit

    return urlsplit(page.url).query


def shown(page: Any) -> dict[str, Any]:
    """KPI values and the chart data as the page holds them (data attributes of the charts)."""
    kpis = page.eval_on_selector_all(
        ".kpi .value",
        "els => Object.fromEntries(els.map(e => [e.id, [e.dataset.value, e.textContent]]))",
    )
    series = page.eval_on_selector_all(
        "#uploads-chart g.col",
        """els => els.map(e => ({period: e.dataset.period, uploads: +e.dataset.uploads,
            bytes: +e.dataset.bytes, successful: +e.dataset.successful,
            failed: +e.dataset.failed}))""",
    )
    bytes_series = page.eval_on_selector_all(
        "#bytes-chart g.col", "els => els.map(e => [e.dataset.period, +e.dataset.bytes])"
    )
    shares = """els => els.map(e => [e.dataset.key, +e.dataset.uploads, +e.dataset.bytes,
        +e.dataset.percentage])"""
    return {
        "kpis": kpis,
        "series": series,
        "bytes_series": bytes_series,
        "file_types": page.eval_on_selector_all("#types-chart .share-row", shares),
        "providers": page.eval_on_selector_all("#providers-chart .share-row", shares),
    }


def assert_page_matches(page: Any, body: dict[str, Any]) -> None:
    """Every number on the page equals the ``/granular`` answer for the page's own query."""
    got = shown(page)
    totals = body["totals"]
    assert got["kpis"]["kpi-uploads"] == [str(totals["uploads"]), f"{totals['uploads']:,}"]
    assert got["kpis"]["kpi-bytes"][0] == str(totals["bytes"])
    rate = float(got["kpis"]["kpi-success"][0])
    assert rate == pytest.approx(100 * totals["successful"] / totals["uploads"])
    assert got["kpis"]["kpi-success"][1] == f"{rate:.1f}".removesuffix(".0") + "%"
    assert got["kpis"]["kpi-requests"][0] == str(body["requests"]["total"])
    keys = ("period", "uploads", "bytes", "successful", "failed")
    assert got["series"] == [{k: p[k] for k in keys} for p in body["series"]]
    assert got["bytes_series"] == [[p["period"], p["bytes"]] for p in body["series"]]
    assert got["file_types"] == [
        [r["file_type"], r["uploads"], r["bytes"], r["percentage"]] for r in body["file_types"]
    ]
    assert got["providers"] == [
        [r["provider"], r["uploads"], r["bytes"], r["percentage"]] for r in body["providers"]
    ]
