"""Fixtures for the NBD server tests: images, file-backed exports, running servers.

``serve(exports, workers=...)`` starts an NbdServer on a Unix socket and a
loopback TCP port (stopped at teardown) and returns a ``Served`` that knows
its URIs.  ``image`` is a 4 MiB random image with its expected bytes;
``served`` serves it, once per execution model (``workers``).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from drtool.errors import DeviceIOError
from drtool.nbd import FileExport, NbdExport, NbdServer
from tests.conftest import make_image

IMAGE_SIZE = 4 << 20
EXPORT = "disk"


@dataclass
class Image:
    path: Path
    data: bytes

    def current(self) -> bytes:
        return self.path.read_bytes()


@pytest.fixture(scope="session")
def image_data(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_image(tmp_path_factory.mktemp("seed") / "disk.img", IMAGE_SIZE, seed=7)


@pytest.fixture
def image(tmp_path: Path, image_data: bytes) -> Image:
    """A fresh copy of the same random image for each test."""
    path = tmp_path / "disk.img"
    path.write_bytes(image_data)
    return Image(path, image_data)


@dataclass
class Served:
    server: NbdServer
    unix_path: str
    port: int

    def uri(self, name: str = EXPORT, tcp: bool = False) -> str:
        if tcp:
            return f"nbd://127.0.0.1:{self.port}/{name}"
        return f"nbd+unix:///{name}?socket={self.unix_path}"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    servers: list[NbdServer] = []
    count = iter(range(1000))

    def start(exports: Mapping[str, NbdExport] | Callable[[], Mapping[str, NbdExport]],
              **options) -> Served:
        registry = exports if callable(exports) else (lambda: exports)
        unix_path = str(tmp_path / f"nbd{next(count)}.sock")
        server = NbdServer(registry, unix_path=unix_path, tcp=("127.0.0.1", 0), **options)
        port = server.start()
        servers.append(server)
        return Served(server, unix_path, port)

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(params=[4, 0], ids=["workers", "inline"])
def workers(request: pytest.FixtureRequest) -> int:
    """Both execution models: a worker pool, and the reader doing the work itself."""
    return request.param


@pytest.fixture
def served(serve: Callable[..., Served], image: Image, workers: int) -> Iterator[Served]:
    with FileExport(image.path, EXPORT, "test disk") as export:
        yield serve({EXPORT: export}, workers=workers)


class FaultyExport(FileExport):
    """A FileExport whose reads touching [bad_start, bad_end) fail with EIO."""

    def __init__(self, path: Path, bad_start: int, bad_end: int, **options) -> None:
        super().__init__(path, **options)
        self.bad_start = bad_start
        self.bad_end = bad_end

    def read(self, offset: int, length: int) -> list[bytes]:
        if offset < self.bad_end and offset + length > self.bad_start:
            raise DeviceIOError(str(self.path), offset, length, "simulated medium error")
        return super().read(offset, length)


class GatedExport(FileExport):
    """A FileExport whose reads at ``gated_offset`` wait until ``gate`` is set."""

    def __init__(self, path: Path, gated_offset: int, **options) -> None:
        super().__init__(path, **options)
        self.gated_offset = gated_offset
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def read(self, offset: int, length: int) -> list[bytes]:
        if offset == self.gated_offset:
            self.waiting.set()
            if not self.gate.wait(10):
                raise OSError(errno.ETIMEDOUT, "gate never opened")
        return super().read(offset, length)
