"""Real NBD clients against drtool's server: nbdinfo, qemu-img, nbdcopy, qemu-io, fio."""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from pathlib import Path

import pytest

from drtool.nbd import FileExport
from tests.conftest import require_tool
from tests.nbd.conftest import EXPORT, IMAGE_SIZE, Image, Served

TIMEOUT = 60


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)


def qemu_io(uri: str, *commands: str) -> subprocess.CompletedProcess:
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    return run(*argv, uri)


@pytest.fixture(params=[False, True], ids=["unix", "tcp"])
def tcp(request: pytest.FixtureRequest) -> bool:
    return request.param


def test_nbdinfo_describes_the_export(served: Served, image: Image) -> None:
    require_tool("nbdinfo")
    info = json.loads(run("nbdinfo", "--json", served.uri()).stdout)
    assert info["protocol"] == "newstyle-fixed"
    (export,) = info["exports"]
    assert export["export-name"] == EXPORT
    assert export["description"] == "test disk"
    assert export["export-size"] == IMAGE_SIZE
    assert export["is_read_only"] is False
    for capability in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert export[capability] is True, capability
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 << 20


def test_nbdinfo_lists_every_export(serve, image: Image, tmp_path: Path) -> None:
    require_tool("nbdinfo")
    other = tmp_path / "other.img"
    other.write_bytes(bytes(65536))
    with FileExport(image.path, "disk", "first") as one, \
            FileExport(other, "spare", "second", read_only=True) as two:
        served = serve({"disk": one, "spare": two})
        listed = json.loads(run("nbdinfo", "--list", "--json", served.uri("")).stdout)
    exports = {entry["export-name"]: entry for entry in listed["exports"]}
    assert set(exports) == {"disk", "spare"}
    assert exports["spare"]["description"] == "second"
    assert exports["spare"]["export-size"] == 65536
    assert exports["spare"]["is_read_only"] is True
    assert exports["spare"]["can_trim"] is False


def test_qemu_img_reads_the_whole_export(served: Served, image: Image, tcp: bool) -> None:
    require_tool("qemu-img")
    result = run("qemu-img", "compare", "-f", "raw", "-F", "raw", served.uri(tcp=tcp), str(image.path))
    assert result.returncode == 0, result.stdout + result.stderr
    converted = image.path.parent / "converted.img"
    result = run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri(tcp=tcp), str(converted))
    assert result.returncode == 0, result.stderr
    assert converted.read_bytes() == image.data


def test_nbdcopy_both_directions(served: Served, image: Image, tmp_path: Path, tcp: bool) -> None:
    require_tool("nbdcopy")
    copy = tmp_path / "copy.img"
    result = run("nbdcopy", served.uri(tcp=tcp), str(copy))
    assert result.returncode == 0, result.stderr
    assert copy.read_bytes() == image.data

    incoming = tmp_path / "incoming.img"
    new_data = bytes(reversed(image.data))
    incoming.write_bytes(new_data)
    result = run("nbdcopy", "--flush", str(incoming), served.uri(tcp=tcp))
    assert result.returncode == 0, result.stderr
    assert image.current() == new_data


def test_qemu_io_writes_zeroes_trims_flushes(served: Served, image: Image, tcp: bool) -> None:
    require_tool("qemu-io")
    uri = served.uri(tcp=tcp)
    result = qemu_io(uri, "write -P 0xab 0 64k", "flush", "write -f -P 0xcd 64k 4k",
                     "write -z 128k 64k", "write -z -u 256k 64k", "discard 512k 64k",
                     "aio_write -P 0x11 1m 8k", "aio_write -P 0x22 2m 8k", "aio_flush",
                     "read -P 0xab 0 64k", "read -P 0xcd 64k 4k", "read -P 0 128k 64k",
                     "read -P 0 256k 64k", "read -P 0x11 1m 8k", "read -P 0x22 2m 8k")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Pattern verification failed" not in result.stdout
    expected = bytearray(image.data)
    expected[0:65536] = b"\xab" * 65536
    expected[65536:69632] = b"\xcd" * 4096
    expected[131072:196608] = bytes(65536)
    expected[262144:327680] = bytes(65536)
    expected[1 << 20:(1 << 20) + 8192] = b"\x11" * 8192
    expected[2 << 20:(2 << 20) + 8192] = b"\x22" * 8192
    current = image.current()
    trimmed = slice(512 << 10, 576 << 10)  # contents after a trim are unspecified
    assert current[:trimmed.start] == bytes(expected[:trimmed.start])
    assert current[trimmed.stop:] == bytes(expected[trimmed.stop:])


def test_qemu_io_respects_a_read_only_export(serve, image: Image) -> None:
    require_tool("qemu-io")
    with FileExport(image.path, EXPORT, read_only=True) as export:
        served = serve({EXPORT: export})
        refused = qemu_io(served.uri(), "write -P 1 0 4k")
        reading = run("qemu-io", "-r", "-f", "raw", "-c", f"read -P {image.data[0]} 0 1", served.uri())
    assert refused.returncode != 0
    assert "Permission denied" in refused.stderr
    assert reading.returncode == 0, reading.stdout + reading.stderr
    assert image.current() == image.data


def test_fio_mixed_random_io_verifies(served: Served, tcp: bool) -> None:
    require_tool("fio")
    result = run("fio", "--name=mixed", "--ioengine=nbd", f"--uri={served.uri(tcp=tcp)}",
                 "--rw=randrw", "--rwmixread=50", "--bsrange=4k-64k", "--iodepth=16",
                 f"--size={IMAGE_SIZE}", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                 "--verify_state_save=0", "--number_ios=3000", "--output-format=json")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    report = json.loads(result.stdout[result.stdout.index("{"):])
    (job,) = report["jobs"]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0


class _JitteryExport(FileExport):
    """Every 8th call waits 3 ms: the server keeps switching between running
    requests on its reader and spilling them to helper threads."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._calls = itertools.count()

    def _maybe_wait(self) -> None:
        if next(self._calls) % 8 == 0:
            time.sleep(0.003)

    def read(self, offset: int, length: int) -> list[bytes]:
        self._maybe_wait()
        return super().read(offset, length)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._maybe_wait()
        super().write(offset, data, fua)


def test_fio_verifies_while_the_export_stalls_now_and_then(serve, image: Image) -> None:
    require_tool("fio")
    with _JitteryExport(image.path, EXPORT) as export:
        served = serve({EXPORT: export}, workers=4)
        result = run("fio", "--name=jittery", "--ioengine=nbd", f"--uri={served.uri()}",
                     "--rw=randrw", "--bs=4k", "--iodepth=32", f"--size={IMAGE_SIZE}",
                     "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                     "--verify_state_save=0", "--number_ios=4000", "--output-format=json")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    (job,) = json.loads(result.stdout[result.stdout.index("{"):])["jobs"]
    assert job["error"] == 0
