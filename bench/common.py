"""Helpers shared by the benchmarks: scratch space, random images, medians, table rows."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

DRTOOL = [sys.executable, "-m", "drtool"]


def scratch_dir(prefix: str) -> str:
    """A scratch directory on the disk (not tmpfs: we measure the real read path)."""
    base = os.environ.get("DRTOOL_BENCH_DIR", os.path.join(os.path.dirname(__file__), "results"))
    os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def random_image(path: str, size: int, chunk: int = 64 << 20) -> None:
    with open(path, "wb") as handle:
        left = size
        while left:
            step = min(chunk, left)
            handle.write(os.urandom(step))
            left -= step


def warm(path: str) -> None:
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def parse_size(text: str) -> int:
    from drtool.units import parse_size as parse

    return parse(text)
