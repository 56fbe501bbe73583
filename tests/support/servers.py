"""Starting and stopping real HTTP servers for the tests: uvicorn in a thread, or uvicorn and
gunicorn as subprocesses, always on 127.0.0.1 and a free port, always stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn

SUPPORT_DIR = Path(__file__).resolve().parent
PYTHON_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers 200 (or fail when ``proc`` exits or time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def uvicorn_in_thread(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn (lifespan on) in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@contextlib.contextmanager
def server_process(
    argv: Sequence[str], env: dict[str, str], ready_url: str, timeout: float = 60.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server command, wait until ``ready_url`` answers, and stop it (SIGTERM, then KILL)."""
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        list(argv), env=full_env, cwd=SUPPORT_DIR, start_new_session=True
    )
    try:
        wait_http(ready_url, timeout=timeout, proc=proc)
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM the server's process group and wait; SIGKILL it if it does not exit in time."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


def uvicorn_argv(port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "--factory", "recorder_app:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra,
    ]  # fmt: skip


def gunicorn_argv(port: int, workers: int, *extra: str) -> list[str]:
    return [
        str(PYTHON_BIN / "gunicorn"), "recorder_app:create_app()",
        "-k", "uvicorn_worker.UvicornWorker", "-w", str(workers),
        "-b", f"127.0.0.1:{port}", "--log-level", "warning", "--graceful-timeout", "20",
        *extra,
    ]  # fmt: skip


def post_uploads(
    base: str, ids: Sequence[str], *, threads: int = 8, pace: float = 0.0, size: int = 100
) -> list[float]:
    """POST one file named ``<id>.bin`` per id from ``threads`` clients; returns latencies (s).

    Every request must succeed; ``pace`` is a pause between one client's requests.
    """
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    body = b"x" * size

    def client(chunk: Sequence[str]) -> None:
        try:
            with httpx.Client(base_url=base, timeout=10.0) as http:
                for record_id in chunk:
                    t0 = time.perf_counter()
                    response = http.post(
                        "/upload", files={"file": (f"{record_id}.bin", body, "image/png")}
                    )
                    elapsed = time.perf_counter() - t0
                    response.raise_for_status()
                    with lock:
                        latencies.append(elapsed)
                    if pace:
                        time.sleep(pace)
        except BaseException as exc:
            errors.append(exc)

    workers = [
        threading.Thread(target=client, args=(ids[i::threads],), daemon=True)
        for i in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    if errors:
        raise errors[0]
    return latencies
