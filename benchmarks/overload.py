"""Request latency while the database cannot keep up with the records, against a no-op
middleware.

Variants of the Starlette app of ``overhead.py``, each served by uvicorn (one worker) in a
subprocess: ``noop`` (the timing-only pure ASGI middleware), ``ours`` (UsageMiddleware with a
no-op recorder: the capture alone) and ``ours+slowdb`` (UsageMiddleware with the real Recorder
writing to a PostgreSQL database the script creates and drops, slowed down). Target: under
sustained overload, the p99 latency of ours+slowdb is at most 1.1x that of noop, and the
recorder's queue and spool behave as docs/recorder.md says. ``ours`` tells the capture's share
of any difference from the recorder's.

The database is slowed in the server process: the store backend's writes are wrapped so that
a batch of n rows takes at least n / ``--write-rate`` seconds (the real write, then a sleep for
the rest). Sleeping releases the GIL, as waiting on a slow database's socket does, and a rate in
rows/s gives the same overload on every run whatever else the machine is doing (the TCP proxy
of tests/support has no delay, and a delay per packet would slow round trips, not rows/s). The
default write rate is a tenth of the offered request rate (a GET is one record), so nine
records in ten must be spooled. ``--max-queue-size`` is lowered to 10,000 so that the queue
passes half of it, and the spool takes records, within the first second.

The load is wrk with fixed connections, each pausing between requests (a Lua ``delay()``,
calibrated on noop) so that every variant is offered ``--rate`` requests/s, well below what any
of them serves flat out: latency then compares the middleware's effect on a request, not its
CPU cost per request (``overhead.py`` measures that; ``--rate 0`` drives flat out). Every
server runs at once, idle but for its own turn (the writer of ours+slowdb keeps writing at the
slow rate meanwhile), in rounds that take them in a shuffled order, because this machine is
shared and noisy. Reported: medians over rounds, the median of the per-round p99 ratios, the
server's CPU per request, and the cyclic garbage collector's pauses during the rounds (they
stop the event loop too, and records the recorder holds make them more frequent).

At the end ours+slowdb is stopped (its lifespan shutdown writes what is queued, at the slow
rate, or spools it) and reports ``recorder.stats()`` and how many records the middleware
submitted. Checked: every record is written, spooled, queued, rejected or dropped; the database
and the spool file hold exactly the written and the still spooled records; the queue passed
half of ``max_queue_size`` and never its bound; nothing was dropped while the spool had room.
Every file, spool included, is under one temporary directory removed at the end.

Run: ``.venv/bin/python benchmarks/overload.py`` (``--quick`` for a short smoke run;
``--seconds``, ``--rounds``, ``--rate``, ``--write-rate``, ``--pg``: see ``--help``). Needs
the ``bench`` extra, PostgreSQL and ``wrk``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from overhead import (  # noqa: E402
    NoopRecorder,
    TimingMiddleware,
    cpu_seconds,
    free_port,
    small,
    upload,
    wait_for_port,
)

VARIANTS = ["noop", "ours", "ours+slowdb"]
TARGET = "ours+slowdb"
STATS_PATH = "/_overload_stats"  # served by every variant, recorded by none
SHUTDOWN_TIMEOUT = 60.0  # the recorder's: long enough to drain the queue at the slow rate
API_KEY = "bench-key"


# --- the server ---------------------------------------------------------------------------------


class GcPauses:
    """Collections of the cyclic garbage collector per generation, and how long they took.

    Every thread stops while one runs, the event loop included, so they show in the tail."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.ms = [0.0, 0.0, 0.0]
        self.max_ms = [0.0, 0.0, 0.0]
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        g = info["generation"]
        ms = (time.perf_counter() - self._start) * 1000
        self.count[g] += 1
        self.ms[g] += ms
        self.max_ms[g] = max(self.max_ms[g], ms)

    def stats(self, reset_max: bool = False) -> dict[str, list[float]]:
        out = {"count": list(self.count), "ms": list(self.ms), "max_ms": list(self.max_ms)}
        if reset_max:
            self.max_ms = [0.0, 0.0, 0.0]
        return out


def slow_down(store: Any, rows_per_second: float) -> None:
    """Make ``store``'s backend take at least n / ``rows_per_second`` seconds per n rows, in
    both of its writes (records, and the recorder's packed batches: records and rows given as
    values)."""
    backend = store.backend
    write, write_packed = backend.write, backend.write_packed

    def pause(start: float, rows: int) -> None:
        rest = rows / rows_per_second - (time.monotonic() - start)
        if rest > 0:
            time.sleep(rest)

    def slow_write(uploads: Any, requests: Any) -> int:
        start = time.monotonic()
        written = int(write(uploads, requests))
        pause(start, len(uploads) + len(requests))
        return written

    def slow_write_packed(uploads: Any, requests: Any, packed: Any) -> int:
        start = time.monotonic()
        written = int(write_packed(uploads, requests, packed))
        pause(start, len(uploads) + len(requests) + len(packed.requests) + len(packed.uploads))
        return written

    backend.write = slow_write
    backend.write_packed = slow_write_packed


def slow_recorder(args: argparse.Namespace) -> Any:
    """The real recorder on the slowed database, counting what the middleware submits.

    A plain ``Recorder``, not a subclass: the middleware hands its own recorder a request as
    the tuple the queue holds, and anything else (a subclass may override ``submit``) a record,
    a dearer path than users run. The count wraps the instance's ``submit_item``, through which
    every submission passes (on the event loop thread, the only one that submits).
    """
    from usage_middleware import Recorder, UsageStore

    store = UsageStore(args.db_url)
    store.create_schema()
    slow_down(store, args.write_rate)
    recorder = Recorder(
        store,
        max_queue_size=args.max_queue_size,
        spool_path=os.path.join(args.workdir, "spool.sqlite3"),
    )
    counts = {"submitted": 0, "max_queued": 0}
    submit_item = recorder.submit_item

    def counting_submit_item(item: object) -> None:
        counts["submitted"] += 1
        submit_item(item)
        n = len(recorder._queue)
        if n > counts["max_queued"]:
            counts["max_queued"] = n

    recorder.submit_item = counting_submit_item  # type: ignore[method-assign]
    recorder.counts = counts  # type: ignore[attr-defined]
    return recorder


def recorder_report(recorder: Any) -> dict[str, Any]:
    return {
        **recorder.stats(),
        **recorder.counts,
        "max_queue_size": recorder.max_queue_size,
        "max_spool_records": recorder.max_spool_records,
    }


def build_app(args: argparse.Namespace) -> tuple[Any, Any]:
    """The app of ``args.serve`` (with a stats endpoint) and its recorder, if a real one."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from usage_middleware import UsageMiddleware

    gc_pauses = GcPauses()
    recorder = slow_recorder(args) if args.serve == TARGET else None

    async def stats(request: Request) -> Response:
        reset = "reset" in request.query_params  # the longest GC pause from now on
        return JSONResponse(
            {"gc": gc_pauses.stats(reset), "recorder": recorder and recorder_report(recorder)}
        )

    app = Starlette(
        routes=[
            Route("/small", small),
            Route("/upload", upload, methods=["POST"]),
            Route(STATS_PATH, stats),
        ]
    )
    if args.serve == "noop":
        app.add_middleware(TimingMiddleware)
    else:
        app.add_middleware(
            UsageMiddleware,
            recorder=recorder or NoopRecorder(),
            exclude_paths=[STATS_PATH],
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
    return app, recorder


def on_shutdown(app: Any, hook: Any) -> Any:
    """``app`` calling ``hook()`` once its lifespan shutdown is complete (the recorder stopped).

    uvicorn re-raises SIGTERM once it has shut down, so code after ``uvicorn.run`` never runs.
    """

    async def served(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def send_(message: Any) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                hook()
            await send(message)

        await app(scope, receive, send_)

    return served


def serve(args: argparse.Namespace) -> None:
    """Child process: serve one variant until SIGTERM; ours+slowdb then writes its stats."""
    import uvicorn

    app, recorder = build_app(args)

    def close() -> None:
        if recorder is not None:
            report = recorder_report(recorder)
            Path(args.workdir, "final-stats.json").write_text(json.dumps(report))
            recorder.store.dispose()

    uvicorn.run(
        on_shutdown(app, close),  # every variant, so that all pay for the extra layer
        host="127.0.0.1",
        port=args.port,
        log_level="error",
        access_log=False,
    )


# --- the load -----------------------------------------------------------------------------------


PACING = """\
local base, frac = {base}, {frac}
function delay()
  if math.random() < frac then return base + 1 end
  return base
end
"""


def pacing_script(workdir: str, connections: int, rate: float, busy_ms: float = 0.0) -> str | None:
    """A wrk script making each connection wait ``connections / rate`` s per request, less
    ``busy_ms`` (the time a request itself takes); whole milliseconds, rounded at random so
    that the mean is right."""
    if rate <= 0:
        return None
    ms = max(connections / rate * 1000 - busy_ms, 0.0)
    path = os.path.join(workdir, "pacing.lua")
    with open(path, "w") as f:
        f.write(PACING.format(base=int(ms), frac=ms - int(ms)))
    return path


def seconds_of(text: str) -> float:
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0), ("m", 60.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise ValueError(f"unexpected wrk duration {text!r}")


def wrk(port: int, seconds: float, connections: int, script: str | None) -> dict[str, float]:
    """One wrk run with --latency: req/s, requests, p50/p90/p99 in ms."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    argv += ["-H", f"x-api-key: {API_KEY}"]
    if script:
        argv += ["-s", script]
    out = subprocess.run(
        [*argv, f"http://127.0.0.1:{port}/small"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    row: dict[str, float] = {}
    for line in out.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            row["rps"] = float(words[1])
        elif len(words) > 2 and words[1:3] == ["requests", "in"]:
            row["requests"] = int(words[0])
        elif len(words) == 2 and words[0] in ("50%", "90%", "99%"):
            row[f"p{words[0][:-1]}"] = seconds_of(words[1]) * 1000
    if len(row) != 5:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    return row


def get_json(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return dict(json.loads(response.read()))


# --- the run ------------------------------------------------------------------------------------


def child_argv(
    args: argparse.Namespace, variant: str, port: int, db_url: str, workdir: str
) -> list[str]:
    argv = [sys.executable, __file__, "--serve", variant, "--port", str(port)]
    argv += ["--db-url", db_url, "--workdir", workdir, "--max-queue-size", str(args.max_queue_size)]
    if args.write_rate is not None:
        argv += ["--write-rate", str(args.write_rate)]
    return argv


def stop(child: subprocess.Popen[bytes], timeout: float) -> None:
    child.terminate()
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(10)


def count_rows(db_url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM api_requests")).scalar() or 0)
    finally:
        engine.dispose()


def count_spooled(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM spool").fetchone()[0])
    finally:
        conn.close()


def gc_during(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[float]]:
    b, a = before["gc"], after["gc"]
    return {
        "count": [y - x for x, y in zip(b["count"], a["count"], strict=True)],
        "ms": [y - x for x, y in zip(b["ms"], a["ms"], strict=True)],
        "max_ms": a["max_ms"],  # since before
    }


def run(args: argparse.Namespace, db_url: str, workdir: str) -> dict[str, Any]:
    """Start noop, warm it up (its req/s sets the default write rate), then the others; run the
    rounds; stop every server and collect the recorder's final stats and what was stored."""
    ports = {v: free_port() for v in VARIANTS}
    script = pacing_script(workdir, args.connections, args.rate)
    children: dict[str, subprocess.Popen[bytes]] = {}
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    try:
        for v in VARIANTS:
            children[v] = subprocess.Popen(
                child_argv(args, v, ports[v], db_url, workdir), stdout=subprocess.DEVNULL
            )
            wait_for_port(ports[v], 60)
            warm = wrk(ports[v], 2, args.connections, script)
            if v == "noop" and args.rate > 0:  # wait less by what a request itself takes
                busy_ms = (args.connections / warm["rps"] - args.connections / args.rate) * 1000
                script = pacing_script(workdir, args.connections, args.rate, busy_ms)
                warm = wrk(ports[v], 2, args.connections, script)
            if v == "noop" and args.write_rate is None:
                args.write_rate = round((args.rate or warm["rps"]) / 10)
        print(f"database slowed to {args.write_rate:,.0f} rows/s", flush=True)
        gc_before = {v: get_json(ports[v], f"{STATS_PATH}?reset") for v in VARIANTS}
        order = list(VARIANTS)
        for r in range(args.rounds):
            random.Random(300 + r).shuffle(order)
            for v in order:
                before = cpu_seconds(children[v].pid)
                row = wrk(ports[v], args.seconds, args.connections, script)
                after = cpu_seconds(children[v].pid)
                if before is not None and after is not None:
                    row["cpu_us"] = (after - before) / row["requests"] * 1e6
                rows[v].append(row)
            snap = get_json(ports[TARGET], STATS_PATH)["recorder"]
            print(
                f"round {r + 1}/{args.rounds}: "
                + "; ".join(f"{v} p99 {rows[v][-1]['p99']:.2f} ms" for v in VARIANTS)
                + f"; {TARGET} queued {snap['queued']:,} spooled {snap['spooled']:,} "
                f"written {snap['written']:,} dropped {snap['dropped']:,}",
                flush=True,
            )
        gc_pauses = {v: gc_during(gc_before[v], get_json(ports[v], STATS_PATH)) for v in VARIANTS}
    finally:
        for child in children.values():
            stop(child, SHUTDOWN_TIMEOUT + 30)
    final_path = Path(workdir, "final-stats.json")
    final = json.loads(final_path.read_text()) if final_path.exists() else None
    spool_file = os.path.join(workdir, "spool.sqlite3")
    return {
        "rows": rows,
        "gc": gc_pauses,
        "final": final,
        "in_db": count_rows(db_url),
        "in_spool": count_spooled(spool_file) if os.path.exists(spool_file) else 0,
    }


# --- report -------------------------------------------------------------------------------------


def report(args: argparse.Namespace, result: dict[str, Any]) -> bool:
    """Print the tables; False when a record is unaccounted for or the recorder misbehaved (a
    missed latency target is a measurement, not a failure of the run)."""
    rows, gcs = result["rows"], result["gc"]
    pace = f"paced at about {args.rate:,.0f} req/s" if args.rate > 0 else "flat out"
    print(
        f"\nGET /small, wrk -c{args.connections} {pace}, {args.rounds} rounds of {args.seconds:g} s"
        f"; database slowed to {args.write_rate:,.0f} rows/s; max_queue_size "
        f"{args.max_queue_size:,}; medians over rounds (p99 ratio: median of per-round ratios);"
        " GC: collections of generation 1 / 2 in the server during the rounds, their total and"
        " longest pause"
    )
    print(
        f"{'variant':<12} {'req/s':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
        f"{'p99/noop':>9} {'CPU µs/req':>10} {'GC gen1/gen2':>13} {'GC ms':>7} {'max ms':>7}"
    )
    ratios: dict[str, list[float]] = {}
    for v in VARIANTS:
        med = {k: statistics.median(r.get(k, float("nan")) for r in rows[v]) for k in rows[v][0]}
        ratios[v] = [o["p99"] / n["p99"] for o, n in zip(rows[v], rows["noop"], strict=True)]
        g = gcs[v]
        print(
            f"{v:<12} {med['rps']:>7,.0f} {med['p50']:>7.2f} {med['p90']:>7.2f} {med['p99']:>7.2f}"
            f" {statistics.median(ratios[v]):>8.2f}x {med.get('cpu_us', float('nan')):>10.1f}"
            f" {g['count'][1]:>6}/{g['count'][2]:<6} {sum(g['ms']):>7.0f}"
            f" {max(g['max_ms']):>7.1f}"
        )
    ratio = statistics.median(ratios[TARGET])
    print(
        f"\np99 {TARGET} / noop = {ratio:.2f}x (per round: "
        + ", ".join(f"{x:.2f}" for x in ratios[TARGET])
        + f") (target <= 1.1x: {'met' if ratio <= 1.1 else 'NOT met'})"
    )
    final = result["final"]
    if final is None:
        print("recorder: no final stats (the server did not shut down cleanly)")
        return False
    print(
        "\nrecorder of ours+slowdb after shutdown: "
        + ", ".join(
            f"{k} {final[k]:,}"
            for k in (
                "submitted",
                "written",
                "replayed",
                "spooled",
                "spool_pending",
                "queued",
                "dropped",
                "rejected",
                "quarantined",
                "spool_errors",
                "failed_writes",
                "max_queued",
            )
        )
    )
    fresh = final["written"] - final["replayed"]
    settled = fresh + final["spooled"] + final["queued"] + final["dropped"] + final["rejected"]
    checks = [
        (
            "submitted = written - replayed + spooled + queued + dropped + rejected",
            final["submitted"] == settled,
            f"{final['submitted']:,} vs {settled:,}",
        ),
        (
            "rows in the database = written",
            result["in_db"] == final["written"],
            f"{result['in_db']:,} vs {final['written']:,}",
        ),
        (
            "rows in the spool file = spooled - replayed",
            result["in_spool"] == final["spooled"] - final["replayed"] == final["spool_pending"],
            f"{result['in_spool']:,} vs {final['spooled'] - final['replayed']:,}",
        ),
        (
            "queue passed half of max_queue_size and the spool took records",
            final["max_queued"] > final["max_queue_size"] // 2 and final["spooled"] > 0,
            f"max queued {final['max_queued']:,} of {final['max_queue_size']:,}",
        ),
        (
            "queue within max_queue_size",
            final["max_queued"] <= final["max_queue_size"],
            f"max queued {final['max_queued']:,}",
        ),
        (
            "nothing dropped while the spool had room",
            final["dropped"] == 0 or final["spool_pending"] >= final["max_spool_records"],
            f"dropped {final['dropped']:,}, spool {final['spool_pending']:,} of "
            f"{final['max_spool_records']:,}",
        ),
    ]
    print("checks:")
    for name, ok, detail in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {name} ({detail})")
    return all(ok for _, ok, _ in checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (2 rounds of 3 s)")
    parser.add_argument("--seconds", type=float, help="length of one wrk run (default 10)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument(
        "--rate",
        type=float,
        default=8000.0,
        help="requests/s offered, each connection paced (default 8000); 0: flat out",
    )
    parser.add_argument(
        "--write-rate",
        type=float,
        help="rows/s the slowed database takes (default: a tenth of --rate, or of noop's req/s)",
    )
    parser.add_argument(
        "--max-queue-size", type=int, default=10_000, help="the recorder's (default 10,000)"
    )
    parser.add_argument(
        "--pg",
        default=os.environ.get(
            "USAGE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
        help="PostgreSQL server (a database is created and dropped)",
    )
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--db-url", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    quick = args.quick
    args.seconds = args.seconds or (3.0 if quick else 10.0)
    args.rounds = args.rounds or (2 if quick else 5)
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk (apt-get install -y wrk)")
    from support.pg import create_database, drop_database

    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="usage-overload-")
    db_url = create_database(args.pg, "um_bench_overload_")
    try:
        result = run(args, db_url, workdir)
    finally:
        drop_database(args.pg, db_url)
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}, {time.monotonic() - started:.0f} s"
    )
    ok = report(args, result)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
