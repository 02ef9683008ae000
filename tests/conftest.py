"""Fixtures shared by every test: state roots, images, the CLI, external tools."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from drtool.cli import main

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
DRTOOL = [sys.executable, "-m", "drtool"]


def require_tool(*names: str) -> None:
    """Skip when a tool is missing; under CI=true a missing tool fails the test instead."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        message = f"missing tool(s): {', '.join(missing)}"
        if IN_CI:
            pytest.fail(f"{message} (CI must install them)")
        pytest.skip(message)


def require_root() -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("this test needs root under CI")
        pytest.skip("needs root")


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def state_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "state"
    monkeypatch.setenv("DRTOOL_STATE_ROOT", str(root))
    return root


@pytest.fixture
def cli(state_root: Path):
    """Run ``drtool`` in-process: cli("scrub", "vol", "--json") -> CliResult."""

    def run(*argv: str) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        code = main(list(argv), stdout=out, stderr=err)
        return CliResult(code, out.getvalue(), err.getvalue())

    return run


def run_drtool(*argv: str, env: dict[str, str] | None = None, input: bytes | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``drtool`` as a real subprocess."""
    return subprocess.run([*DRTOOL, *argv], capture_output=True, input=input, timeout=timeout,
                          env={**os.environ, **(env or {})})


def make_image(path: Path, size: int, seed: int = 1, sparse_every: int = 0) -> bytes:
    """Write ``size`` pseudo-random bytes (deterministic by seed); return them."""
    import random

    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    if sparse_every:
        chunk = 65536
        for start in range(0, size, chunk * sparse_every):
            data[start:start + chunk] = bytes(len(data[start:start + chunk]))
    path.write_bytes(data)
    return bytes(data)


def corrupt(path: Path, offset: int, data: bytes = b"\xff") -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        old = handle.read(len(data))
        if old == data:  # make sure the bytes really change
            data = bytes(b ^ 0x55 for b in data)
        handle.seek(offset)
        handle.write(data)
