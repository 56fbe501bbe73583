"""Per-request overhead of UsageMiddleware next to its peers, measured in one run.

Variants of the same Starlette app: ``bare``; ``noop`` (a timing-only pure ASGI middleware);
``otel`` (opentelemetry-instrumentation-asgi, SDK with a batch processor to a no-op exporter);
``prometheus`` (prometheus-fastapi-instrumentator); ``ours`` (UsageMiddleware with a no-op
recorder: the capture cost alone, full rows built); ``ours+sqlite`` (UsageMiddleware with the
real recorder writing into SQLite); ``ours+postgres`` (the real recorder writing into a
PostgreSQL database the script creates and drops: ``--pg URL``, default ``USAGE_TEST_PG_URL`` or
the local server). Variants are interleaved round by round and medians are
reported, because the machine is shared and noisy.

The upload endpoint parses the form with ``request.form()``, as an upload API does.

1. In process: µs added per small GET, per 1 KiB multipart upload (the constant per-file
   costs) and per 1 MiB multipart upload (64 KiB messages). The 1 MiB figure is set against
   the floor of any streaming multipart parser, one ``bytes.find`` scan of the same chunks for
   the delimiter (``b"\\r\\n--" + BOUNDARY``): in each round, bare, ours and the scan also take
   turns one request at a time, and what ours adds is the median of its differences to the bare
   request beside it (target: at most 1.5x the median scan).
2. In process: throughput of one 256 MiB multipart upload (target: ours at least 95 % of
   bare).
3. Over loopback: req/s of a small GET, uvicorn (one worker) + wrk. Every variant's server runs
   at once (idle but for its own turn); rounds of a few seconds each take them in a shuffled
   order, and each round's ratio to bare is taken, so a machine that speeds up or slows down
   between rounds moves all variants alike. The server's CPU time per request (from /proc) is
   reported too: it depends much less than req/s on what else the machine is running; and
   split into the event loop's thread and the others (the recorder's writer and spiller).

Run: ``.venv/bin/python benchmarks/overhead.py`` (``--quick`` for a short smoke run,
``--no-loopback`` to skip part 3, ``--rounds N`` for more loopback rounds). To set a change
against the code before it in one run, serve that code too: ``git worktree add /tmp/base HEAD~1``
and ``--baseline-src /tmp/base/src`` adds ``ours@base``, ``ours+sqlite@base`` and
``ours+postgres@base`` to the loopback rounds. Needs the ``bench`` extra and, for part 3,
``wrk``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

VARIANTS = ["bare", "noop", "otel", "prometheus", "ours", "ours+sqlite", "ours+postgres"]
SCAN = "find-scan"  # in the in-process results: one bytes.find scan of the 1 MiB upload
PG_ENV = "USAGE_BENCH_OVERHEAD_PG"  # the database ours+postgres writes to, set by main()
WORKDIR_ENV = "USAGE_BENCH_OVERHEAD_DIR"  # where the loopback servers keep their files
CHUNK = 64 * 1024
BOUNDARY = b"----WebKitFormBoundary7MA4YWxkTrZu0gW"  # what a browser sends


# --- the app and its variants -----------------------------------------------------------------


async def small(request: Request) -> Response:
    return PlainTextResponse("ok")


async def upload(request: Request) -> Response:
    """What an upload API does: parse the form (Starlette spools files to disk past 1 MiB)."""
    async with request.form(max_part_size=1 << 40) as form:
        size = sum(f.size or 0 for _, f in form.multi_items() if not isinstance(f, str))
    return PlainTextResponse(str(size), status_code=201)


class TimingMiddleware:
    """The cheapest useful pure ASGI middleware: measures the request, records nothing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.total = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.total += time.perf_counter() - start


class NoopRecorder:
    def start(self) -> None:
        pass

    def submit(self, record: Any) -> None:
        pass

    def submit_many(self, records: Any) -> None:
        pass

    def shutdown(self, timeout: float = 10.0) -> None:
        pass


def build(variant: str, workdir: str) -> tuple[ASGIApp, Callable[[], None]]:
    """The app for ``variant`` and a function that releases what it holds."""
    app = Starlette(routes=[Route("/small", small), Route("/upload", upload, methods=["POST"])])
    close: Callable[[], None] = lambda: None  # noqa: E731
    if variant == "noop":
        app.add_middleware(TimingMiddleware)
    elif variant == "otel":
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        class NoopExporter(SpanExporter):
            def export(self, spans: Sequence[Any]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(BatchSpanProcessor(NoopExporter()))
        meter_provider = MeterProvider()
        app.add_middleware(
            OpenTelemetryMiddleware,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )

        def close() -> None:
            tracer_provider.shutdown()
            meter_provider.shutdown()

    elif variant == "prometheus":
        from prometheus_client import CollectorRegistry
        from prometheus_fastapi_instrumentator import Instrumentator

        Instrumentator(registry=CollectorRegistry()).instrument(app)
    elif variant in ("ours", "ours+sqlite", "ours+postgres"):
        from usage_middleware import Recorder, UsageMiddleware, UsageStore

        if variant == "ours":
            app.add_middleware(UsageMiddleware, recorder=NoopRecorder())
        else:
            if variant == "ours+sqlite":
                path = os.path.join(workdir, f"usage-{os.getpid()}-{random.random()}.db")
                store = UsageStore(f"sqlite:///{path}")
            else:
                store = UsageStore(os.environ[PG_ENV])
            store.create_schema()
            recorder = Recorder(store, spool_path=os.path.join(workdir, "spool.sqlite3"))
            recorder.start()
            app.add_middleware(UsageMiddleware, recorder=recorder)

            def close() -> None:
                recorder.shutdown(30)
                store.dispose()

    elif variant != "bare":
        raise SystemExit(f"unknown variant {variant!r}")
    return app, close


# --- in-process driver ------------------------------------------------------------------------


def scope_for(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"bench"), (b"x-api-key", b"bench-key"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def one(app: ASGIApp, scope: Scope, chunks: Sequence[bytes]) -> None:
    index = 0
    last = len(chunks) - 1

    async def receive() -> Message:
        nonlocal index
        i = index
        index += 1
        if i > last:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[i], "more_body": i < last}

    async def send(message: Message) -> None:
        pass

    await app(dict(scope), receive, send)


def multipart_chunks(size: int) -> list[bytes]:
    head = (
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; '
        b'filename="photo.jpg"\r\nContent-Type: image/jpeg\r\n\r\n\xff\xd8\xff\xe0'
    )
    tail = b"\r\n--" + BOUNDARY + b"--\r\n"
    data = bytes(random.Random(7).getrandbits(8) for _ in range(CHUNK))
    rest = [data[: size % CHUNK]] if size % CHUNK else []
    return [head, *[data] * (size // CHUNK), *rest, tail]


UPLOAD_HEADERS = [(b"content-type", b"multipart/form-data; boundary=" + BOUNDARY)]
DELIMITER = b"\r\n--" + BOUNDARY


def boundary_scan(chunks: Sequence[bytes], delimiter: bytes = DELIMITER) -> int:
    """How many delimiters one streaming ``bytes.find`` pass finds in ``chunks``.

    The floor a streaming parser cannot go under: every byte is scanned once, chunk by chunk,
    and the last ``len(delimiter) - 1`` bytes of a chunk are carried into a search of the seam
    with the next one, so a delimiter split across two messages is found too. Nothing is
    copied but that seam.
    """
    keep = len(delimiter) - 1
    found = 0
    tail = b""
    for chunk in chunks:
        if tail:
            seam = tail + chunk[:keep]
            i = seam.find(delimiter)
            while i != -1:
                found += 1
                i = seam.find(delimiter, i + 1)
        i = chunk.find(delimiter)
        while i != -1:
            found += 1
            i = chunk.find(delimiter, i + 1)
        tail = chunk[-keep:] if len(chunk) >= keep else (tail + chunk)[-keep:]
    return found


def timed_scan(chunks: Sequence[bytes], n: int) -> float:
    """Seconds per ``boundary_scan`` of ``chunks`` over ``n`` scans."""
    start = time.perf_counter()
    for _ in range(n):
        boundary_scan(chunks)
    return (time.perf_counter() - start) / n


async def timed(app: ASGIApp, scope: Scope, chunks: Sequence[bytes], n: int) -> float:
    """Seconds per request over ``n`` requests."""
    start = time.perf_counter()
    for _ in range(n):
        await one(app, scope, chunks)
    return (time.perf_counter() - start) / n


async def in_process(apps: dict[str, ASGIApp], quick: bool) -> dict[str, dict[str, float]]:
    get_scope = scope_for("GET", "/small", [])
    up_scope = scope_for("POST", "/upload", UPLOAD_HEADERS)
    kib = multipart_chunks(1 << 10)
    mib = multipart_chunks(1 << 20)
    big = multipart_chunks((32 if quick else 256) << 20)
    rounds, get_n, kib_n, up_n, big_rounds = (5, 100, 20, 3, 1) if quick else (15, 400, 100, 12, 5)
    for app in apps.values():  # warm up: lazy stacks, first-request start, imports
        await timed(app, get_scope, [b""], 20)
        await timed(app, up_scope, kib, 5)
        await timed(app, up_scope, mib, 2)
    assert boundary_scan(mib) == 1  # the closing delimiter, in the last message
    samples: dict[str, dict[str, list[float]]] = {
        v: {"get": [], "kib": [], "upload": [], "big": []} for v in apps
    }
    paired: dict[str, list[float]] = {"bare": [], "ours": []}
    scans: list[float] = []
    order = list(apps)
    for r in range(rounds):
        random.Random(r).shuffle(order)
        for v in order:
            samples[v]["get"].append(await timed(apps[v], get_scope, [b""], get_n))
        for v in order:
            samples[v]["kib"].append(await timed(apps[v], up_scope, kib, kib_n))
        for v in order:
            samples[v]["upload"].append(await timed(apps[v], up_scope, mib, up_n))
        # ours against bare and the scan: one request (one scan) at a time in a new order each
        # time, so the machine's load moves the three alike and each difference is paired
        for k in range(up_n):
            turn = ["bare", "ours", SCAN]
            random.Random(1000 * r + k).shuffle(turn)
            for v in turn:
                if v == SCAN:
                    scans.append(timed_scan(mib, 1))
                else:
                    paired[v].append(await timed(apps[v], up_scope, mib, 1))
        await asyncio.sleep(0)
    for r in range(big_rounds):
        random.Random(100 + r).shuffle(order)
        for v in order:
            samples[v]["big"].append(await timed(apps[v], up_scope, big, 1))
    big_mib = sum(len(c) for c in big) / (1 << 20)
    stats = {
        v: {
            "get_us": statistics.median(s["get"]) * 1e6,
            "kib_us": statistics.median(s["kib"]) * 1e6,
            "upload_us": statistics.median(s["upload"]) * 1e6,
            "big_mib_s": big_mib / statistics.median(s["big"]),
            # each round's ratio to bare in that round, then the median: the large body goes
            # through the page cache and the disk (Starlette spools files past 1 MiB), whose
            # speed moves from one round to the next more than the capture costs
            "big_ratio": statistics.median(
                b / t for b, t in zip(samples["bare"]["big"], s["big"], strict=True)
            ),
        }
        for v, s in samples.items()
    }
    added = statistics.median(o - b for o, b in zip(paired["ours"], paired["bare"], strict=True))
    scan = statistics.median(scans)
    stats[SCAN] = {"upload_us": scan * 1e6, "added_us": added * 1e6, "ratio": added / scan}
    return stats


# --- loopback ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(variant: str, port: int) -> None:
    """Child process: serve one variant with uvicorn until terminated."""
    import uvicorn

    # under the parent's directory, which the parent removes whatever way this process ends
    workdir = tempfile.mkdtemp(prefix="usage-bench-", dir=os.environ.get(WORKDIR_ENV))
    app, close = build(variant, workdir)
    try:
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False)
    finally:
        close()
        shutil.rmtree(workdir, ignore_errors=True)


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start within {timeout} s")


def wrk(port: int, seconds: int) -> tuple[float, int]:
    """Requests per second and requests completed in one wrk run."""
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", f"http://127.0.0.1:{port}/small"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    rps = count = None
    for line in out.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            rps = float(words[1])
        elif len(words) > 2 and words[1:3] == ["requests", "in"]:
            count = int(words[0])
    if rps is None or count is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    return rps, count


def cpu_seconds(pid: int, task: int | None = None) -> float | None:
    """User + system CPU time of a process so far, or of one of its threads (``task``, Linux),
    or ``None`` where unknown."""
    path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    try:
        with open(path) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(pid: int, timeout: float = 15.0) -> None:
    """Wait until a server stops using CPU (a recorder still writing what it was sent), so its
    background work neither overlaps the next variant's run nor goes uncounted in its own."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pid)
    while last is not None and time.monotonic() < deadline:
        time.sleep(0.2)
        now = cpu_seconds(pid)
        if now is None or now - last <= 0.01:
            return
        last = now


def loopback(
    variants: list[str],
    quick: bool,
    rounds: int | None = None,
    base_env: dict[str, str] | None = None,
) -> dict[str, dict[str, float]] | None:
    """Per variant: median req/s, median of per-round req/s ratios to bare, and median server
    CPU µs per request, background writing included (``nan`` where /proc is unavailable).

    With ``base_env`` each ``ours`` variant is also served as ``<variant>@base``, its server
    run with that environment added (the baseline checkout's ``PYTHONPATH``, its own database).
    """
    if shutil.which("wrk") is None:
        print("loopback: skipped — wrk is not installed (apt-get install -y wrk)\n")
        return None
    seconds, rounds = (2, 2) if quick else (3, rounds or 7)
    serving = {v: (v, {}) for v in variants}
    if base_env is not None:
        serving.update({f"{v}@base": (v, base_env) for v in variants if v.startswith("ours")})
    variants = list(serving)
    ports = {v: free_port() for v in variants}
    workdir = tempfile.mkdtemp(prefix="usage-bench-")
    children = {
        v: subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--port", str(ports[v])],
            stdout=subprocess.DEVNULL,
            env={**os.environ, WORKDIR_ENV: workdir, **env},
        )
        for v, (kind, env) in serving.items()
    }
    rps: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    loop_cpu: dict[str, list[float]] = {v: [] for v in variants}  # the event loop's thread
    try:
        for v in variants:
            wait_for_port(ports[v], 60)
            wrk(ports[v], 1)  # warm up
            settle(children[v].pid)
        order = list(variants)
        for r in range(rounds):
            random.Random(200 + r).shuffle(order)
            for v in order:
                pid = children[v].pid
                before, loop_before = cpu_seconds(pid), cpu_seconds(pid, pid)
                rate, count = wrk(ports[v], seconds)
                settle(pid)
                after, loop_after = cpu_seconds(pid), cpu_seconds(pid, pid)
                rps[v].append(rate)
                if before is not None and after is not None:
                    cpu[v].append((after - before) / count * 1e6)
                if loop_before is not None and loop_after is not None:
                    loop_cpu[v].append((loop_after - loop_before) / count * 1e6)
    finally:
        for child in children.values():
            child.terminate()
        for child in children.values():
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        v: {
            "rps": statistics.median(rps[v]),
            "ratio": statistics.median(a / b for a, b in zip(rps[v], rps["bare"], strict=True)),
            "cpu_us": statistics.median(cpu[v]) if cpu[v] else math.nan,
            "loop_us": statistics.median(loop_cpu[v]) if loop_cpu[v] else math.nan,
        }
        for v in variants
    }


# --- report -----------------------------------------------------------------------------------


def report(stats: dict[str, dict[str, float]], loop: dict[str, dict[str, float]] | None) -> None:
    scan = stats[SCAN]
    stats = {v: s for v, s in stats.items() if v != SCAN}
    bare = stats["bare"]

    def added(v: str, key: str) -> float:
        return stats[v][key] - bare[key]

    print("in process (medians; % bare: the median of each 256 MiB round's ratio to bare):")
    print(
        f"{'variant':<12} {'GET µs':>8} {'+µs':>7} {'1KiB µs':>9} {'+µs':>7} {'1MiB µs':>9} "
        f"{'+µs':>7} {'256MiB MiB/s':>13} {'% bare':>7}"
    )
    for v, s in stats.items():
        print(
            f"{v:<12} {s['get_us']:>8.1f} {added(v, 'get_us'):>+7.1f} {s['kib_us']:>9.1f} "
            f"{added(v, 'kib_us'):>+7.1f} {s['upload_us']:>9.0f} {added(v, 'upload_us'):>+7.0f} "
            f"{s['big_mib_s']:>13.0f} {100 * s['big_ratio']:>6.0f}%"
        )
    print(f"{'find scan':<12} {'':>35} {scan['upload_us']:>9.0f}   (bytes.find only, no app)")
    if loop:
        print("\nover loopback, small GET (uvicorn, one worker; medians over rounds):")
        print(
            f"{'variant':<18} {'req/s':>8} {'% bare':>7} {'server CPU µs/req':>18} {'+µs':>6} "
            f"{'event loop':>11} {'other threads':>14}"
        )
        for v, row in loop.items():
            print(
                f"{v:<18} {row['rps']:>8.0f} {100 * row['ratio']:>6.0f}% {row['cpu_us']:>18.1f} "
                f"{row['cpu_us'] - loop['bare']['cpu_us']:>+6.1f} {row['loop_us']:>11.1f} "
                f"{row['cpu_us'] - row['loop_us']:>14.1f}"
            )

    def ratio(ours: float, peer: float) -> str:
        # A peer overhead within noise of zero makes a ratio meaningless: say so.
        return f"{max(ours, 0.0) / peer:.2f}" if peer > 1.0 else "n/a (peer overhead <= noise)"

    print("\ntargets (ratios in this run):")
    ours_get = added("ours", "get_us")
    print(
        f"  GET overhead ours/prometheus = {ratio(ours_get, added('prometheus', 'get_us'))}"
        f" (target <= 0.33); ours/otel = {ratio(ours_get, added('otel', 'get_us'))}"
        " (target <= 0.10)"
    )
    print(
        f"  1 MiB upload: ours adds {scan['added_us']:.0f} µs = {scan['ratio']:.2f}x one"
        f" bytes.find scan ({scan['upload_us']:.0f} µs) (target <= 1.5x)"
    )
    print(
        "  1 MiB upload overhead ours/prometheus = "
        f"{ratio(added('ours', 'upload_us'), added('prometheus', 'upload_us'))} (target <= 1.0); "
        f"ours/otel = {ratio(added('ours', 'upload_us'), added('otel', 'upload_us'))}"
    )
    print(
        "  256 MiB throughput: ours = "
        f"{100 * stats['ours']['big_ratio']:.0f} % of bare (target >= 95 %)"
    )
    if loop:
        print(
            f"  loopback req/s ours/bare = {loop['ours']['ratio']:.2f} (target >= 0.90); "
            f"ours+sqlite/bare = {loop['ours+sqlite']['ratio']:.2f} (target >= 0.80); "
            f"ours+postgres/bare = {loop['ours+postgres']['ratio']:.2f} (target >= 0.80)"
        )
        base = loop["bare"]["cpu_us"]
        alone = loop["ours"]["cpu_us"] - base
        for v in ("ours+sqlite", "ours+postgres"):
            print(
                f"  server CPU added per request {v} / ours = "
                f"{(loop[v]['cpu_us'] - base) / alone:.2f} (target <= 2.0 for ours+sqlite)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--no-loopback", action="store_true", help="skip uvicorn + wrk")
    parser.add_argument(
        "--pg",
        default=os.environ.get(
            "USAGE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
        help="PostgreSQL server for ours+postgres (a database is created and dropped)",
    )
    parser.add_argument(
        "--rounds", type=int, help="loopback rounds (default 7): more where the machine is noisy"
    )
    parser.add_argument(
        "--baseline-src",
        metavar="DIR",
        help="also serve the ours variants over loopback with usage_middleware imported from "
        "DIR (another checkout's src, e.g. a git worktree of the previous commit), as "
        "'<variant>@base', in the same rounds",
    )
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    started = time.monotonic()
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
    name = f"um_bench_overhead_{os.getpid()}"
    names = [name, f"{name}_base"] if args.baseline_src else [name]
    with admin.connect() as conn:
        for db in names:
            conn.execute(text(f'CREATE DATABASE "{db}"'))
    os.environ[PG_ENV] = make_url(args.pg).set(database=name).render_as_string(False)
    base_env = None
    if args.baseline_src:
        base_env = {
            "PYTHONPATH": os.path.abspath(args.baseline_src),
            PG_ENV: make_url(args.pg).set(database=names[1]).render_as_string(False),
        }
    try:
        workdir = tempfile.mkdtemp(prefix="usage-bench-")
        built = {v: build(v, workdir) for v in VARIANTS}
        try:
            stats = asyncio.run(
                in_process({v: app for v, (app, _) in built.items()}, args.quick)
            )
        finally:
            for _, close in built.values():
                close()
            shutil.rmtree(workdir, ignore_errors=True)
        loop = None if args.no_loopback else loopback(VARIANTS, args.quick, args.rounds, base_env)
    finally:
        with admin.connect() as conn:
            for db in names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"{time.monotonic() - started:.0f} s\n"
    )
    report(stats, loop)


if __name__ == "__main__":
    main()
