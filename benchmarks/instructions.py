"""Instructions per request, counted by valgrind's callgrind: what the capture costs, without
the noise of a shared machine.

Timings on a shared two-core machine move by more than a small change to the request path
(``overhead.py`` runs its variants side by side and takes medians for that reason); instruction
counts do not: the same code, inputs and interpreter give the same count whatever else the
machine is doing. This script runs ``overhead.py``'s in-process driver under
``valgrind --tool=callgrind`` twice per variant and request kind, with fewer and more requests
and the same hash seed, and reports the difference divided by the difference in requests: the
instructions of one request, the interpreter's start and the app's warm-up cancelled out (two
runs of the same code agree to about 0.05 %).

Variants (``overhead.py``'s app): ``bare``; ``noop`` (a timing-only pure ASGI middleware);
``prometheus`` (prometheus-fastapi-instrumentator); ``ours`` (UsageMiddleware with a no-op
recorder, as in ``overhead.py``); ``ours+queue`` (UsageMiddleware with the real ``Recorder``,
whose writer is never woken during the run: what a request costs the event loop in the default
set-up, up to the queue). Request kinds: ``get`` (a small GET) and ``kib`` (a 1 KiB multipart
upload: the fixed costs of an upload), both driven in process, and ``served``: a small GET
served by uvicorn (one worker, as in ``overhead.py``'s loopback runs) to a client on a
keep-alive loopback connection, the server's own instructions counted (callgrind's
instrumentation switched on with ``callgrind_control`` for the counted requests only). It is
the deterministic side of the loopback req/s ratios: what the middleware adds to everything a
request costs the server (the HTTP parsing, the event loop, the socket), where the in-process
kinds set it against the app alone. Not a megabyte: there the count per request was not
proportional to the number of requests (one ``bytes.find`` scan of its 16 messages alone came
to 221,000 to 321,000 instructions a scan, depending on how many were run), so large uploads
stay with ``overhead.py``'s timings.

``--writer`` also counts the other side of the queue: the instructions per request row the
recorder's writer spends writing the middleware's rows to SQLite (``store.write`` of the
queue's batches of 2,000 GET requests, the transaction and commit included), next to a plain
multi-row ``INSERT`` of the same rows' values as stored, formatted beforehand (what the rows
cost with no code of ours around them), and the same writes followed by the seal that folds
those rows into the request rollups (``store+seal``: what each live request costs the writer
in the end; its rows fall into about 50 groups, one per key, so this is the seal's cost per
row, hardly any per group). Each run builds the same batches and writes a different number of
them, so building them cancels out (``--kinds none --writer``: the writer alone).
``--writer-data scattered`` writes ``ingest.py``'s request data instead (50 keys, 30 routes,
their statuses and latencies), each batch a quarter hour of its own: rows that nearly all make
a rollup group of their own, where the seal's cost per group shows.

Run: ``.venv/bin/python benchmarks/instructions.py`` (``--quick`` for a short run; ``--kinds``
and ``--variants`` to choose). To set a change against the code before it, count that code too:
``git worktree add /tmp/base HEAD~1`` and ``--baseline-src /tmp/base/src`` adds
``ours@base`` and ``ours+queue@base`` (and ``store@base`` and ``store+seal@base`` with
``--writer``). Needs valgrind (Debian package ``valgrind``, with ``callgrind_control``).

``--opcodes`` needs no valgrind: it traces a few requests of each kind in process through
``bare`` and ``ours+queue`` (``sys.settrace`` opcode events) and prints the Python bytecodes per
request and the functions that ours adds them in: where the instructions above go, by name.

Instructions are not time (a cache miss costs more than an add), so the timed benchmarks keep
the last word; this one says whether a change to the request path does less work.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import overhead  # noqa: E402  (the app, its variants and the in-process driver)

VARIANTS = ["bare", "noop", "prometheus", "ours", "ours+queue"]
KINDS = ["get", "kib", "served"]
# requests per short and long run, per kind (quick, full): the long run's extra requests are
# what is counted
COUNTS = {
    "get": ((300, 1300), (1000, 5000)),
    "kib": ((50, 250), (200, 1000)),
    "served": ((100, 400), (500, 2500)),
}
# GETs a served run sends before the counted ones: the first requests' lazy set-up
_SERVED_WARMUP = 100
WRITERS = ["store", "store+seal", "raw"]
WRITE_BATCH = 2000
# batches of WRITE_BATCH written per short and long run (quick, full)
WRITE_COUNTS = ((1, 3), (3, 15))
# how many batches a writer run builds (the long run's count, in both runs of a pair)
_BUILT_ENV = "USAGE_BENCH_BATCHES_BUILT"
# what a writer run writes: "shared" (the middleware's GETs) or "scattered" (ingest.py's data)
_DATA_ENV = "USAGE_BENCH_WRITER_DATA"
WRITER_DATA = ["shared", "scattered"]
_COLLECTED = re.compile(r"Collected : (\d+)")


def build(variant: str, workdir: str) -> Any:
    """``overhead.py``'s app for ``variant``; ``ours+queue`` adds the real recorder, started, on
    an in-memory store, with a batch, queue and flush interval that keep its threads asleep for
    the whole run (a record is queued, nothing is written)."""
    if variant != "ours+queue":
        return overhead.build(variant, workdir)[0]
    from usage_middleware import Recorder, UsageMiddleware, UsageStore

    app, _ = overhead.build("bare", workdir)
    recorder = Recorder(
        UsageStore("memory://"),
        batch_size=10_000_000,
        max_queue_size=20_000_000,
        flush_interval=3600.0,
        spool_path=":memory:",
    )
    recorder.start()
    app.add_middleware(UsageMiddleware, recorder=recorder)
    return app


# valgrind's callgrind with its profile discarded: only the total it prints on exit is read
_CALLGRIND = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]


def _under_callgrind_env(env: dict[str, str]) -> dict[str, str]:
    # one hash seed: with a random one, dict and set layouts (and so the collector's timing)
    # differ between the two runs of a pair
    return {**os.environ, "PYTHONHASHSEED": "0", **env}


def request_of(kind: str) -> tuple[dict[str, Any], list[bytes]]:
    """The scope and body messages of an in-process request of ``kind`` (``get``, ``kib``)."""
    if kind == "get":
        return overhead.scope_for("GET", "/small", []), [b""]
    upload = overhead.scope_for("POST", "/upload", overhead.UPLOAD_HEADERS)
    return upload, overhead.multipart_chunks(1 << 10)


def child(variant: str, kind: str, n: int) -> None:
    """Under callgrind: ``n`` requests of ``kind``."""
    scope, chunks = request_of(kind)
    workdir = tempfile.mkdtemp(prefix="usage-bench-")
    # Every variant's app is built in every run, so that each run holds the same modules and
    # objects: the garbage collector's full collections walk all of them, and a variant run
    # alone in a smaller heap would be charged less for its collections.
    app = {v: build(v, workdir) for v in VARIANTS}[variant]

    async def run() -> None:
        for _ in range(n):
            await overhead.one(app, scope, chunks)

    asyncio.run(run())
    shutil.rmtree(workdir, ignore_errors=True)
    os._exit(0)  # no recorder shutdown, no interpreter teardown: their cost must not depend on n


def _shared_batches(built: int) -> list[list[Any]]:
    """``built`` batches of the middleware's GETs as the queue holds them, 50 keys, now."""
    import uuid
    from datetime import datetime, timezone

    from usage_middleware._recording.compact import new_request_item

    keys = [uuid.UUID(int=i + 1, version=4) for i in range(50)]
    batches = []
    for b in range(built):
        now = datetime.now(timezone.utc)
        batches.append(
            [
                new_request_item(
                    "GET", "/small", 200, 0.5, 0, 5, keys[(b + i) % 50], None, now, True
                )
                for i in range(WRITE_BATCH)
            ]
        )
    return batches


def _scattered_batches(built: int) -> list[list[Any]]:
    """``built`` batches of ``ingest.py``'s requests packed as the queue holds them, each the
    traffic of a quarter hour of its own (seeded: the same rows in every run)."""
    import random

    import ingest

    from usage_middleware import RequestRecord
    from usage_middleware._recording.compact import pack

    rng = random.Random(1)
    return [
        [
            pack(RequestRecord(**row))
            for row in ingest.make_requests(WRITE_BATCH, "live", rng, b * 900.0)
        ]
        for b in range(built)
    ]


def writer_child(variant: str, n: int, built: int) -> None:
    """Under callgrind: ``built`` batches of requests made as the queue holds them (the
    middleware's GETs, or with ``USAGE_BENCH_WRITER_DATA=scattered`` ``ingest.py``'s), ``n`` of
    them written to a new SQLite file (``store``: ``store.write``; ``store+seal``: then
    ``store.seal`` past them; ``raw``: the rows' values as stored, NULL as None, by a plain
    multi-row ``INSERT`` with ``ON CONFLICT (id) DO NOTHING``, in one transaction a batch, as
    the store does)."""
    import sqlite3
    from datetime import timedelta

    from usage_middleware import UsageStore
    from usage_middleware._recording.compact import PackedBatch

    workdir = tempfile.mkdtemp(prefix="usage-bench-")
    store = UsageStore(f"sqlite:///{workdir}/usage.db")
    store.create_schema()
    if os.environ.get(_DATA_ENV, "shared") == "scattered":
        batches = _scattered_batches(built)
    else:
        batches = _shared_batches(built)
    if variant.startswith("store"):
        for items in batches[:n]:
            store.write(PackedBatch(items))
        if variant == "store+seal":
            # past every row written (ingest.py's live rows lie ahead of the clock)
            store.seal(max(it[9] for items in batches[:n] for it in items) + timedelta(days=1))
    else:
        # the rows exactly as the store writes them, formatted here for every built batch
        from usage_middleware._sqlitebulk import insert_rows
        from usage_middleware._sqlitewrite import utc_text

        rows = [
            [
                ("%032x" % it[10], "%032x" % it[7], *it[1:7], it[8], utc_text(it[9]), int(it[11]))  # noqa: UP031
                for it in items
            ]
            for items in batches
        ]
        store.dispose()
        conn = sqlite3.connect(f"{workdir}/usage.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        cur = conn.cursor()
        for part in rows[:n]:
            cur.execute("BEGIN IMMEDIATE")
            insert_rows(
                cur,
                "INSERT INTO api_requests (id, api_key_id, method, path, status_code, "
                "response_time_ms, request_size, response_size, error_message, requested_at, "
                "route_matched)",
                part,
                "ON CONFLICT (id) DO NOTHING",
            )
            cur.execute("COMMIT")
    shutil.rmtree(workdir, ignore_errors=True)
    os._exit(0)  # no teardown, as child()


def serve_child(variant: str, port: int) -> None:
    """Under callgrind: serve ``variant`` with uvicorn until interrupted (every variant's app
    built, as in :func:`child`)."""
    import uvicorn

    workdir = tempfile.mkdtemp(prefix="usage-bench-")
    app = {v: build(v, workdir) for v in VARIANTS}[variant]
    try:
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _get(conn: http.client.HTTPConnection, n: int) -> None:
    for _ in range(n):
        conn.request("GET", "/small")
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"GET /small answered {response.status}")


def count_served(variant: str, n: int, env: dict[str, str]) -> int:
    """The server's instructions for ``n`` GETs on one keep-alive connection, counted from the
    first of them to the last response (the start, the warm-up and the shutdown not)."""
    port = overhead.free_port()
    serve = [sys.executable, __file__, "--serve-child", variant, str(port)]
    server = subprocess.Popen(
        [*_CALLGRIND, "--instr-atstart=no", *serve],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_under_callgrind_env(env),
    )
    try:
        overhead.wait_for_port(port, 600)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        _get(conn, _SERVED_WARMUP)
        control = ["callgrind_control", "--instr"]
        subprocess.run([*control, "on", str(server.pid)], check=True, capture_output=True)
        _get(conn, n)
        subprocess.run([*control, "off", str(server.pid)], check=True, capture_output=True)
        conn.close()
    finally:
        server.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown; callgrind then reports
        try:
            _, stderr = server.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            server.kill()
            _, stderr = server.communicate()
    found = _COLLECTED.search(stderr)
    if found is None:
        raise RuntimeError(f"{variant} served under callgrind failed:\n{stderr[-3000:]}")
    return int(found.group(1))


def count(variant: str, kind: str, n: int, env: dict[str, str]) -> int:
    """Instructions of a whole child run (callgrind's total); ``kind`` ``write``: a writer run
    of ``n`` batches; ``served``: see :func:`count_served`."""
    if kind == "served":
        return count_served(variant, n, env)
    done = subprocess.run(
        [*_CALLGRIND, sys.executable, __file__, "--child", variant, kind, str(n)],
        capture_output=True,
        text=True,
        env=_under_callgrind_env(env),
        timeout=1800,
    )
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{variant} {kind} under callgrind failed:\n{done.stderr[-3000:]}")
    return int(found.group(1))


def per_row_written(variant: str, quick: bool, env: dict[str, str], data: str) -> float:
    short, long = WRITE_COUNTS[0 if quick else 1]
    env = {**env, _BUILT_ENV: str(long), _DATA_ENV: data}
    return (count(variant, "write", long, env) - count(variant, "write", short, env)) / (
        (long - short) * WRITE_BATCH
    )


def per_request(variant: str, kind: str, quick: bool, env: dict[str, str]) -> float:
    short, long = COUNTS[kind][0 if quick else 1]
    return (count(variant, kind, long, env) - count(variant, kind, short, env)) / (long - short)


def opcodes(kind: str, variant: str, n: int = 10) -> collections.Counter[str]:
    """Bytecodes executed per function over ``n`` requests of ``kind`` (after a warm-up)."""
    scope, chunks = request_of(kind)
    counts: collections.Counter[str] = collections.Counter()

    def trace(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            where = "/".join(Path(code.co_filename).parts[-2:])
            counts[f"{code.co_name} ({where}:{code.co_firstlineno})"] += 1
        return trace

    async def run() -> None:
        for _ in range(50):
            await overhead.one(app, scope, chunks)
        sys.settrace(trace)
        try:
            for _ in range(n):
                await overhead.one(app, scope, chunks)
        finally:
            sys.settrace(None)

    with tempfile.TemporaryDirectory(prefix="usage-bench-") as workdir:
        app = build(variant, workdir)
        asyncio.run(run())
    return collections.Counter({name: c / n for name, c in counts.items()})


def report_opcodes(kinds: list[str]) -> None:
    for kind in kinds:
        if kind not in ("get", "kib"):
            continue  # served: the server's loop is not traced, and the app's bytecodes are get's
        bare, ours = opcodes(kind, "bare"), opcodes(kind, "ours+queue")
        added = sorted(((ours[f] - bare[f], f) for f in ours.keys() | bare.keys()), reverse=True)
        total = sum(ours.values()) - sum(bare.values())
        print(
            f"\n{kind}: Python bytecodes per request, bare {sum(bare.values()):,.0f}, "
            f"ours+queue {sum(ours.values()):,.0f} ({total:+,.0f}); where ours adds them:"
        )
        for count, name in added:
            if count >= max(5.0, total / 200):
                print(f"  {count:>8,.0f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per run")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help=f"of {','.join(KINDS)}, or none (--writer alone)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {','.join(VARIANTS)}")
    parser.add_argument(
        "--baseline-src",
        metavar="DIR",
        help="also count the ours variants with usage_middleware imported from DIR (another "
        "checkout's src), as '<variant>@base'",
    )
    parser.add_argument(
        "--writer",
        action="store_true",
        help="also count the SQLite writer's instructions per request row (store.write of the "
        "queue's batches, and a raw INSERT of the same rows)",
    )
    parser.add_argument(
        "--writer-data",
        default="shared",
        help=f"what --writer writes, of {','.join(WRITER_DATA)} (comma-separated): the "
        "middleware's GETs (few rollup groups) or ingest.py's requests (a group nearly a row)",
    )
    parser.add_argument(
        "--opcodes",
        action="store_true",
        help="instead, the Python bytecodes per request by function, bare against ours+queue "
        "(in process, no valgrind)",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--serve-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_child:
        serve_child(args.serve_child[0], int(args.serve_child[1]))
        return
    if args.child:
        variant, kind, n = args.child
        if kind == "write":
            writer_child(variant, int(n), int(os.environ[_BUILT_ENV]))
        child(variant, kind, int(n))
        return
    if args.opcodes:
        report_opcodes(args.kinds.split(","))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install -y valgrind)")
    kinds = [] if args.kinds == "none" else args.kinds.split(",")
    variants = args.variants.split(",")
    if "bare" not in variants or not set(kinds) <= set(KINDS) or not set(variants) <= set(VARIANTS):
        raise SystemExit(f"--kinds from {KINDS}; --variants from {VARIANTS}, bare among them")
    writer_data = args.writer_data.split(",")
    if not set(writer_data) <= set(WRITER_DATA):
        raise SystemExit(f"--writer-data from {WRITER_DATA}")
    base = {"PYTHONPATH": os.path.abspath(args.baseline_src)} if args.baseline_src else None
    if kinds:
        report_requests(kinds, variants, args.quick, base)
    if args.writer:
        for data in writer_data:
            report_writer(args.quick, base, data)


def report_requests(
    kinds: list[str], variants: list[str], quick: bool, base: dict[str, str] | None
) -> None:
    runs: list[tuple[str, str, dict[str, str]]] = [(v, v, {}) for v in variants]
    if base is not None:
        runs += [(f"{v}@base", v, base) for v in variants if v.startswith("ours")]
    started = time.monotonic()
    table: dict[str, dict[str, float]] = {}
    for name, variant, env in runs:
        table[name] = {k: per_request(variant, k, quick, env) for k in kinds}
    print(
        f"python {sys.version.split()[0]}, instructions per request (callgrind), "
        f"{time.monotonic() - started:.0f} s\n"
    )
    bare = table["bare"]
    print(f"{'variant':<16}" + "".join(f" {k:>12} {'+':>10} {'x bare':>7}" for k in kinds))
    for name, row in table.items():
        print(
            f"{name:<16}"
            + "".join(
                f" {row[k]:>12,.0f} {row[k] - bare[k]:>+10,.0f} {row[k] / bare[k]:>7.3f}"
                for k in kinds
            )
        )
    print("\nadded instructions, ours against its peers (lower is better):")
    for k in kinds:
        ours = table["ours"][k] - bare[k] if "ours" in table else None
        line = f"  {k}:"
        for peer in ("noop", "prometheus"):
            if ours is not None and peer in table and table[peer][k] - bare[k] > 0:
                line += f" ours/{peer} {ours / (table[peer][k] - bare[k]):.2f};"
        print(line.rstrip(";"))


def report_writer(quick: bool, base: dict[str, str] | None, data: str) -> None:
    started = time.monotonic()
    writers: list[tuple[str, str, dict[str, str]]] = [(w, w, {}) for w in WRITERS]
    if base is not None:
        writers += [("store@base", "store", base), ("store+seal@base", "store+seal", base)]
    rows = {name: per_row_written(w, quick, env, data) for name, w, env in writers}
    print(
        f"\nthe writer: SQLite, instructions per request row written, batches of "
        f"{WRITE_BATCH:,}, {data} data ({time.monotonic() - started:.0f} s)"
    )
    seals = {"the seal": rows["store+seal"] - rows["store"]}
    if base is not None:
        seals["the seal@base"] = rows["store+seal@base"] - rows["store@base"]
    for name, value in {**rows, **seals}.items():
        print(f"  {name:<15} {value:>10,.0f} {value / rows['raw']:>7.3f} x raw")


if __name__ == "__main__":
    main()
