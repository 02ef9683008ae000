"""Real replica servers for the tests: subprocesses on 127.0.0.1, port 0, real HTTP.

``start_server(...)`` starts one (and always stops it at teardown);
``server`` is a default one with a token, ``client`` a ReplicaClient for it.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from drtool import wire
from drtool.client import ReplicaClient

VOLUME_ID = "0123456789abcdef0123456789abcdef"
_LAUNCH = """
import json, sys
from drtool.replica.server import Limits, serve
settings = json.loads(sys.argv[1])
journal = {"journal_limit": settings.pop("journal_limit")} if "journal_limit" in settings else {}
sys.exit(serve(root=sys.argv[2], listen="127.0.0.1:0", token_file=sys.argv[3] or None,
               tls_cert=sys.argv[4] or None, tls_key=sys.argv[5] or None, limits=Limits(**settings), **journal,
               announce=lambda a: print(f"drtool replica server listening on {a}", flush=True)))
"""


@dataclass
class ServerProcess:
    root: Path
    token: str | None
    token_file: Path | None
    log: Path
    tls: tuple[Path, Path] | None = None
    limits: dict[str, float] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    address: str = ""

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"

    def command(self) -> list[str]:
        if self.limits:
            cert, key = (str(p) for p in self.tls) if self.tls else ("", "")
            return [sys.executable, "-c", _LAUNCH, json.dumps(self.limits), str(self.root),
                    str(self.token_file or ""), cert, key]
        cmd = [sys.executable, "-m", "drtool", "serve", "--root", str(self.root), "--listen", "127.0.0.1:0"]
        if self.token_file:
            cmd += ["--token-file", str(self.token_file)]
        if self.tls:
            cmd += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        return cmd

    def start(self, timeout: float = 20.0) -> ServerProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        line = _read_line(self.proc, timeout)
        prefix = "drtool replica server listening on "
        if not line.startswith(prefix):
            self.stop()
            raise AssertionError(f"server did not start: {line!r}\n{self.log.read_text()}")
        self.address = line[len(prefix):].strip()
        return self

    def client(self, **kwargs: object) -> ReplicaClient:
        kwargs.setdefault("token", self.token)
        return ReplicaClient(self.url, **kwargs)  # type: ignore[arg-type]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first stdout line, or '' when the process exits or the time runs out."""
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        if not selector.select(deadline - time.monotonic()):
            break
        byte = os.read(proc.stdout.fileno(), 1)
        if not byte:
            break
        line += byte
    selector.close()
    return line.decode()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(token: bool = True, tls: tuple[Path, Path] | None = None, root: Path | None = None,
              limits: dict[str, float] | None = None) -> ServerProcess:
        index = len(started)
        token_value = secrets.token_hex(16) if token else None
        token_file = None
        if token_value:
            token_file = tmp_path / f"token{index}"
            token_file.write_text(token_value + "\n")
            token_file.chmod(0o600)
        server = ServerProcess(root or tmp_path / "replicas", token_value, token_file,
                               tmp_path / f"server{index}.log", tls, limits or {})
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[ReplicaClient]:
    with server.client() as c:
        yield c


def write(seq: int, offset: int, data: bytes, overlay: bool = False, era: int = 0) -> list[bytes]:
    return wire.encode_record(wire.KIND_WRITE, seq, offset, data, era=era,
                              flags=wire.FLAG_OVERLAY if overlay else 0)


def zero(seq: int, offset: int, length: int, overlay: bool = False) -> list[bytes]:
    return wire.encode_record(wire.KIND_ZERO, seq, offset, length=length,
                              flags=wire.FLAG_OVERLAY if overlay else 0)


def call(server: ServerProcess, method: str, path: str, token: bool = True, **kwargs) -> requests.Response:  # type: ignore[no-untyped-def]
    """One raw HTTP request (no ReplicaClient): for checking statuses and problem bodies exactly."""
    headers = kwargs.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {server.token}"
    return requests.request(method, server.url + path, headers=headers, timeout=10, **kwargs)


def assert_problem(response: requests.Response, status: int, detail: str = "", title: str = "",
                   kind: str = "") -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status and problem["title"] and problem["type"]
    assert detail in problem["detail"], problem
    assert title in problem["title"], problem
    assert problem["type"].endswith(kind), problem
