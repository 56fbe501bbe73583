"""Every benchmark runs to its end on a small data set.

The benchmarks are scripts, run by hand, so nothing else notices when a change to the package
breaks one (a moved import, a new column type): each is run here with sizes small enough for a
few seconds, and must finish cleanly, having made its own checks (answers identical between the
ways it compares, records accounted for) and printed its figures. The figures themselves are
not judged: timings belong to the benchmarks, not to tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.pg import IN_CI, require_postgres

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"

# script, arguments, a line of its output that says it reached its figures
RUNS = [
    ("ingest.py", "--rows 4000 --batch 1000 --repeats 1", "ratio"),
    ("query.py", "--rows 20000 --requests 20000 --sqlite-rows 5000 --runs 1", "/granular"),
    ("failures.py", "--requests 20000 --uploads 5000 --runs 1", "/export"),
    ("retention.py", "--rows 20000", "ratio DELETE / DROP"),
    ("recorder.py", "--seconds 1", "submit"),
    (
        "sqlite_steps.py",
        "--rows 2000 --repeats 1 --seal-rows 2000 --claim-rows 500 --read-rows 5000",
        "a seal of",
    ),
    ("sqlite_indexes.py", "--batches 4 --rounds 1 --reads 20000 --days 2", "time windows"),
    ("multipart_parsers.py", "--rounds 1", "python-multipart"),
    ("overhead.py", "--quick --no-loopback", "find scan"),
    ("overload.py", "--quick", "p99"),
    ("instructions.py", "--quick --kinds get,served --variants bare,ours", "served"),
    ("instructions.py", "--quick --kinds none --writer", "the writer: SQLite"),
    (
        "instructions.py",
        "--quick --kinds none --writer --writer-data scattered",
        "scattered data",
    ),
    ("instructions.py", "--opcodes", "Python bytecodes per request"),
]
# what tells the runs of one script apart in their test ids
ID_FLAGS = ("--writer", "--opcodes", "scattered")
NEEDS = {"overload.py": "wrk", "instructions.py": "valgrind"}  # and the Debian package's name
# seconds a run of those may take: instructions.py --quick --writer took 540 s (9 min) on a
# machine that ran Python five times slower than usual, past the suite's 300 s per test
SLOW_TIMEOUT = 1140
# overhead.py makes its database first
NO_POSTGRES = {"sqlite_steps.py", "sqlite_indexes.py", "multipart_parsers.py", "instructions.py"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args", "marker"),
    [
        pytest.param(
            *run,
            id=run[0] + "".join(f" {flag}" for flag in ID_FLAGS if flag in run[1]),
            marks=(
                *(() if run[0] in NO_POSTGRES else (pytest.mark.postgres,)),
                # valgrind runs Python several times over: minutes on a slow, shared machine
                *((pytest.mark.timeout(SLOW_TIMEOUT + 60),) if run[0] in NEEDS else ()),
            ),
        )
        for run in RUNS
    ],
)
def test_the_benchmark_runs_to_its_figures(
    script: str, args: str, marker: str, tmp_path: Path
) -> None:
    if script not in NO_POSTGRES:
        require_postgres()  # the scripts take USAGE_TEST_PG_URL too
    tool = NEEDS.get(script)
    if tool is not None and shutil.which(tool) is None:
        if IN_CI:  # CI installs it (.ci/run): a missing tool there is a broken set-up
            pytest.fail(f"{tool} is missing (Debian package {tool})")
        pytest.skip(f"needs {tool} (Debian package {tool})")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args.split()],
        capture_output=True,
        text=True,
        timeout=SLOW_TIMEOUT if script in NEEDS else 240,  # valgrind and wrk runs take longer
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert marker in done.stdout, done.stdout[-2000:]


def test_every_benchmark_is_run_here() -> None:
    """A new benchmark joins the list above (benchmarks/clickhouse.py takes minutes at any size:
    its parts are run by tests/test_benchmark_baselines.py)."""
    scripts = {p.name for p in BENCHMARKS.glob("*.py")}
    assert scripts - {"clickhouse.py", "query_requests.py"} == {run[0] for run in RUNS}
