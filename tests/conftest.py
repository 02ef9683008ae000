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
from hypothesis import settings

from drtool.cli import main

# Hypothesis's per-example deadline (200 ms) is a timing assertion: on a loaded 2-core machine a
# correct example can take longer, and a test must not fail for that (no timing in tests).
settings.register_profile("drtool", deadline=None)
settings.load_profile("drtool")

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


class ReplicaServer:
    """A real `drtool serve` subprocess on 127.0.0.1 with a token; restartable."""

    def __init__(self, root: Path, token_file: Path, extra: list[str] | None = None) -> None:
        self.root = root
        self.token_file = token_file
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def start(self) -> ReplicaServer:
        import re
        import time

        listen = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [*DRTOOL, "serve", "--root", str(self.root), "--listen", listen,
             "--token-file", str(self.token_file), *self.extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 20
        line = self.proc.stdout.readline()
        match = re.search(r"listening on [\d.]+:(\d+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"replica server did not start: {line!r}")
        self.port = int(match.group(1))
        assert time.monotonic() < deadline
        return self

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            self.proc.wait(timeout=20)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None

    def client(self):
        from drtool.client import ReplicaClient

        return ReplicaClient(self.url, token_file=str(self.token_file))


def state_files(root: Path, mtimes: bool = False) -> dict[str, Any]:
    """Every file under a state root and its bytes, with ``mtimes`` also when it was last written
    (the lock file aside: it names its holder, it is not state)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) if mtimes else p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "lock"}


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it does not go within ``timeout``; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


@pytest.fixture
def protect_volume(tmp_path: Path, state_root: Path, replica_server):
    """protect_volume(size, seed=1) -> (device path, its bytes): a registered volume "vol" of
    pseudo-random data with 64 KiB regions, paired with the test's replica server."""

    def make(size: int, seed: int = 1, sparse_every: int = 0) -> tuple[Path, bytearray]:
        from drtool import api

        path = tmp_path / "dev.img"
        data = bytearray(make_image(path, size, seed=seed, sparse_every=sparse_every))
        api.init_volume("vol", str(path), "64K")
        api.protect("vol", replica_server.url, str(replica_server.token_file))
        return path, data

    return make


@pytest.fixture
def replica_server(tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("t0ken-" + "x" * 26 + "\n")
    token.chmod(0o600)
    server = ReplicaServer(tmp_path / "replica-root", token).start()
    yield server
    server.stop(kill=True)


class AgentProcess:
    """A real `drtool agent` subprocess serving volumes over a Unix socket and TCP."""

    def __init__(self, state_root: Path, names: list[str], sock: Path) -> None:
        self.state_root = state_root
        self.names = names
        self.sock = sock
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log = sock.with_suffix(".log")

    def uri(self, name: str | None = None, tcp: bool = False) -> str:
        name = name or self.names[0]
        if tcp:
            return f"nbd://127.0.0.1:{self.port}/{name}"
        return f"nbd+unix:///{name}?socket={self.sock}"

    def start(self) -> AgentProcess:
        import re

        env = {**os.environ, "DRTOOL_STATE_ROOT": str(self.state_root)}
        self.proc = subprocess.Popen(
            [*DRTOOL, "agent", *self.names, "--nbd-socket", str(self.sock), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=open(self.log, "ab"), text=True, env=env)
        lines = [self.proc.stdout.readline() for _ in range(1 + len(self.names))]
        found = re.search(r"nbd://127\.0\.0\.1:(\d+)/", "".join(lines))
        if not found:
            self.stop(kill=True)
            raise RuntimeError(f"agent did not start: {lines!r}; log: {self.log.read_text()[-2000:]}")
        self.port = int(found.group(1))
        return self

    def stop(self, kill: bool = False) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
        code = self.proc.wait(timeout=60)
        self.proc.stdout.close()
        self.proc = None
        return code


@pytest.fixture
def start_agent(state_root: Path, tmp_path: Path):
    """start_agent("vol", ...) -> a running AgentProcess, stopped at the end of the test."""
    started: list[AgentProcess] = []

    def start(*names: str) -> AgentProcess:
        agent = AgentProcess(state_root, list(names), tmp_path / f"nbd{len(started)}.sock").start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop(kill=True)


class FaultyDevice:
    """A real file that fails reads with EIO in chosen byte spans.

    nbdfuse exposes an nbdkit export as a file; nbdkit's ddrescue filter answers reads of
    the spans its map marks '-' with EIO.  Read-only, like a disk that lost sectors.
    """

    def __init__(self, image: Path, mount: Path) -> None:
        self.image = image
        self.mount = mount
        self.proc: subprocess.Popen | None = None

    @property
    def path(self) -> Path:
        return self.mount / "disk"

    def start(self, bad_spans: list[tuple[int, int]] = ()) -> FaultyDevice:
        import time

        require_root()
        require_tool("nbdfuse", "nbdkit")
        if not os.path.exists("/dev/fuse"):
            if IN_CI:
                pytest.fail("/dev/fuse is missing")
            pytest.skip("no /dev/fuse")
        size = self.image.stat().st_size
        lines = ["# Rescue Logfile", "0x00000000 +"]
        position = 0
        for start, length in sorted(bad_spans):
            if start > position:
                lines.append(f"0x{position:x} 0x{start - position:x} +")
            lines.append(f"0x{start:x} 0x{length:x} -")
            position = start + length
        if position < size:
            lines.append(f"0x{position:x} 0x{size - position:x} +")
        mapfile = self.mount.parent / f"{self.mount.name}.map"
        mapfile.write_text("\n".join(lines) + "\n")
        self.mount.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["nbdfuse", str(self.path), "--command", "nbdkit", "-s", "--exit-with-parent",
             "--filter=ddrescue", "file", str(self.image), f"ddrescue-mapfile={mapfile}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not self.path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail("nbdfuse did not come up")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)
        if self.proc is not None:
            stop_process(self.proc)  # nbdfuse does not always notice a lazy unmount
            self.proc = None


@pytest.fixture
def faulty_device(tmp_path: Path):
    """faulty_device(image, [(offset, length), ...]) -> a FaultyDevice whose path fails there."""
    made: list[FaultyDevice] = []

    def make(image: Path, bad_spans: list[tuple[int, int]] = ()) -> FaultyDevice:
        device = FaultyDevice(image, tmp_path / f"fuse{len(made)}").start(bad_spans)
        made.append(device)
        return device

    yield make
    for device in made:
        device.stop()


@dataclass
class Host:
    """One of two "hosts" on this machine: a state root and its own replica server (a real
    `drtool serve` subprocess); role swaps run between two of them (tests/test_roles*.py)."""

    name: str
    root: Path
    server: ReplicaServer

    def call(self, fn, *args, **kw):
        return fn(*args, root=str(self.root), **kw)


@pytest.fixture
def hosts(tmp_path, monkeypatch):
    """Hosts a and b sharing one token file: (a, b, token path)."""
    token = tmp_path / "token"
    token.write_text("shared-token-" + "y" * 20)
    token.chmod(0o600)
    made = {}
    for name in ("a", "b"):
        server = ReplicaServer(tmp_path / f"{name}-replicas", token).start()
        made[name] = Host(name, tmp_path / f"{name}-state", server)
    monkeypatch.delenv("DRTOOL_STATE_ROOT", raising=False)
    yield made["a"], made["b"], str(token)
    for host in made.values():
        host.server.stop(kill=True)
