"""Streaming multipart parsers on the chunks of overhead.py's uploads, in one run.

    .venv/bin/python benchmarks/multipart_parsers.py [--rounds 9]

The middleware captures uploads with python-multipart, the parser Starlette reads the same body
with, behind a shortcut that only counts a long file's messages that hold no delimiter
(``MultipartCapture``). This times, per upload (a 1 KiB and a 1 MiB file, 64 KiB messages, the
request overhead.py sends):

* ``find scan``: one ``bytes.find`` pass for the delimiter, the floor of any streaming parser;
* ``capture``: ``MultipartCapture`` (parser, shortcut, file type sniffing): what the middleware
  does per upload;
* ``capture, parsed``: the same with every message handed to the parser (no shortcut): what
  the shortcut saves;
* ``python-multipart``: its ``MultipartParser`` alone, with callbacks that only count;
* ``multipart``: the ``multipart`` package's ``PushMultipartParser`` (defnull/multipart, the
  parser of Bottle), consuming its events and counting.

The last two are the two well-kept pure-Python streaming parsers; neither has a shortcut. The
medians of ``--rounds`` rounds, each timing every variant in a shuffled order. Needs the
``bench`` extra.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from multipart import PushMultipartParser
from python_multipart.multipart import MultipartParser

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import BOUNDARY, boundary_scan, multipart_chunks

from usage_middleware._capture.multipart import MultipartCapture


def capture(chunks: Sequence[bytes], shortcut: bool = True) -> int:
    c = MultipartCapture(BOUNDARY, max_files=1000, max_parts=2000)
    if not shortcut:
        c._count_after = 1 << 62  # every message through the parser, as the tests compare
    for chunk in chunks:
        c.feed(chunk)
    c.close(True)
    return sum(f.size for f in c.files)


def capture_parsed(chunks: Sequence[bytes]) -> int:
    return capture(chunks, shortcut=False)


def python_multipart(chunks: Sequence[bytes]) -> int:
    size = 0

    def on_part_data(data: bytes, start: int, end: int) -> None:
        nonlocal size
        size += end - start

    parser = MultipartParser(BOUNDARY, {"on_part_data": on_part_data})
    for chunk in chunks:
        parser.write(chunk)
    parser.finalize()
    return size


def defnull_multipart(chunks: Sequence[bytes]) -> int:
    size = 0
    with PushMultipartParser(BOUNDARY) as parser:
        for chunk in chunks:
            for event in parser.parse(chunk):
                if isinstance(event, (bytes, bytearray, memoryview)):
                    size += len(event)
    return size


VARIANTS: dict[str, Callable[[Sequence[bytes]], int]] = {
    "find scan": boundary_scan,
    "capture": capture,
    "capture, parsed": capture_parsed,
    "python-multipart": python_multipart,
    "multipart": defnull_multipart,
}


def timed(fn: Callable[[Sequence[bytes]], int], chunks: Sequence[bytes], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn(chunks)
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    uploads = {"1 KiB": (multipart_chunks(1 << 10), 400), "1 MiB": (multipart_chunks(1 << 20), 40)}
    for name, (chunks, _) in uploads.items():
        size = len(chunks[1]) if name == "1 KiB" else 1 << 20
        for variant in ("capture", "capture, parsed", "python-multipart", "multipart"):
            got = VARIANTS[variant](chunks)
            assert got == size + 4, (variant, name, got)  # the head's 4 JPEG bytes and the file
    samples: dict[tuple[str, str], list[float]] = {(v, u): [] for v in VARIANTS for u in uploads}
    order = list(VARIANTS)
    for r in range(args.rounds):
        random.Random(r).shuffle(order)
        for upload, (chunks, n) in uploads.items():
            for variant in order:
                samples[variant, upload].append(timed(VARIANTS[variant], chunks, n))
    print(f"µs per upload, median of {args.rounds} rounds; x: times the find scan")
    print(f"{'':<18}" + "".join(f"{u:>20}" for u in uploads))
    for variant in VARIANTS:
        cells = []
        for upload in uploads:
            us = statistics.median(samples[variant, upload]) * 1e6
            scan = statistics.median(samples["find scan", upload]) * 1e6
            cells.append(f"{us:>10.1f} ({us / scan:>5.2f}x)")
        print(f"{variant:<18}" + "".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
