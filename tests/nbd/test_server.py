"""The server's lifecycle, its export registry, export errors and concurrency."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from drtool.errors import NotPermitted, UsageError
from drtool.nbd import ExportFlags, FileExport, NbdServer
from drtool.nbd import protocol as p
from tests.conftest import require_tool
from tests.nbd.conftest import EXPORT, IMAGE_SIZE, FaultyExport, GatedExport, Image
from tests.nbd.rawclient import RawClient, ServerClosed

CHUNK = 65536


# -- listeners ------------------------------------------------------------------


def test_unix_socket_is_private_and_removed_at_stop(tmp_path: Path, image: Image) -> None:
    path = tmp_path / "nbd.sock"
    with FileExport(image.path, EXPORT) as export:
        server = NbdServer(lambda: {EXPORT: export}, unix_path=path)
        assert server.start() is None  # no TCP listener
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        server.stop()
    assert not path.exists()


def test_unix_socket_mode_can_be_widened(tmp_path: Path, image: Image) -> None:
    path = tmp_path / "nbd.sock"
    with FileExport(image.path, EXPORT) as export, \
            NbdServer(lambda: {EXPORT: export}, unix_path=path, unix_mode=0o660):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660


def test_stale_socket_is_replaced(tmp_path: Path, image: Image) -> None:
    path = tmp_path / "nbd.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed server leaves
    with FileExport(image.path, EXPORT) as export, \
            NbdServer(lambda: {EXPORT: export}, unix_path=path), RawClient(str(path)) as client:
        client.connect(EXPORT)
        assert client.read(0, 512) == (0, image.data[:512])


def test_refuses_a_path_in_use(tmp_path: Path, image: Image) -> None:
    regular = tmp_path / "file"
    regular.write_text("keep me")
    live = tmp_path / "live.sock"
    with FileExport(image.path, EXPORT) as export, NbdServer(lambda: {EXPORT: export}, unix_path=live):
        with pytest.raises(UsageError, match="not a socket"):
            NbdServer(lambda: {}, unix_path=regular).start()
        with pytest.raises(UsageError, match="another server"):
            NbdServer(lambda: {}, unix_path=live).start()
    assert regular.read_text() == "keep me"


def test_refuses_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        NbdServer(lambda: {})
    with pytest.raises(UsageError):
        NbdServer(lambda: {}, unix_path=tmp_path / "s", max_request=100)
    with pytest.raises(UsageError):
        NbdServer(lambda: {}, unix_path=tmp_path / "s", workers=-1)


def test_tcp_port_in_use(image: Image) -> None:
    with FileExport(image.path, EXPORT) as export, \
            NbdServer(lambda: {EXPORT: export}, tcp=("127.0.0.1", 0)) as first:
        with pytest.raises(UsageError, match="cannot listen"):
            NbdServer(lambda: {}, tcp=("127.0.0.1", first.tcp_port)).start()


def test_stop_finishes_requests_in_flight_then_disconnects(serve, image: Image) -> None:
    with GatedExport(image.path, CHUNK, name=EXPORT) as export:
        served = serve({EXPORT: export}, workers=4)
        with RawClient(served.unix_path) as client:
            client.connect(EXPORT)
            handle = client.request(p.Command.READ, CHUNK, CHUNK)
            assert export.waiting.wait(10)
            stopper = threading.Thread(target=served.server.stop)
            stopper.start()
            export.gate.set()
            assert client.reply() == (0, handle)
            assert client.recv_exact(CHUNK) == image.data[CHUNK:2 * CHUNK]
            assert client.server_closed()
            stopper.join(10)
            assert not stopper.is_alive()


def test_stop_disconnects_idle_and_handshaking_clients(serve, image: Image) -> None:
    with FileExport(image.path, EXPORT) as export:
        served = serve({EXPORT: export})
        with RawClient(served.unix_path) as idle, RawClient(served.unix_path) as haggling:
            idle.connect(EXPORT)
            haggling.greeting()
            served.server.stop()
            assert idle.server_closed() and haggling.server_closed()


def test_silent_client_is_dropped_after_the_handshake_timeout(serve, image: Image) -> None:
    with FileExport(image.path, EXPORT) as export:
        served = serve({EXPORT: export}, handshake_timeout=0.2)
        with RawClient(served.unix_path) as client:
            client.greeting()
            assert client.server_closed()


# -- the export registry --------------------------------------------------------


def test_registry_swaps_apply_to_connected_clients(serve, image: Image, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(b"\x42" * IMAGE_SIZE)
    with FileExport(image.path, EXPORT) as normal, FileExport(other, EXPORT) as degraded:
        registry = {EXPORT: normal}
        served = serve(lambda: registry)
        with RawClient(served.unix_path) as client:
            client.connect(EXPORT)
            assert client.read(0, 512) == (0, image.data[:512])
            registry = {EXPORT: degraded}  # e.g. normal -> degraded mode, client stays
            assert client.read(0, 512) == (0, b"\x42" * 512)
            registry = {}
            assert client.read(0, 512) == (p.NbdErrno.ESHUTDOWN, b"")


def test_empty_name_selects_the_only_export(serve, image: Image) -> None:
    with FileExport(image.path, EXPORT) as export:
        served = serve({EXPORT: export})
        with RawClient(served.unix_path) as client:
            assert client.connect("")[0] == IMAGE_SIZE


def test_export_failing_at_handshake_is_unknown(serve) -> None:
    class Broken:
        name, description = "broken", ""

        def size(self) -> int:
            raise OSError(5, "device gone")

    served = serve({"broken": Broken()})
    with RawClient(served.unix_path) as client:
        client.greeting()
        reply, _ = client.info(p.Option.GO, "broken")
        assert reply == p.Reply.ERR_UNKNOWN


# -- export errors ----------------------------------------------------------------


def test_read_errors_reach_only_the_failing_span(serve, image: Image, workers: int) -> None:
    bad = (CHUNK, 2 * CHUNK)
    with FaultyExport(image.path, *bad, name=EXPORT) as export:
        served = serve({EXPORT: export}, workers=workers)
        with RawClient(served.unix_path) as client:
            client.connect(EXPORT)
            assert client.read(CHUNK + 100, 10) == (p.NbdErrno.EIO, b"")
            assert client.read(0, 2 * CHUNK) == (p.NbdErrno.EIO, b"")
            assert client.read(0, CHUNK) == (0, image.data[:CHUNK])
            assert client.read(2 * CHUNK, CHUNK) == (0, image.data[2 * CHUNK:3 * CHUNK])


def test_qemu_io_read_of_a_failing_span_fails_and_neighbours_pass(serve, image: Image) -> None:
    require_tool("qemu-io")
    with FaultyExport(image.path, CHUNK, 2 * CHUNK, name=EXPORT) as export:
        uri = serve({EXPORT: export}).uri()

        def qemu_io(command: str) -> subprocess.CompletedProcess:
            return subprocess.run(["qemu-io", "-f", "raw", "-c", command, uri],
                                  capture_output=True, text=True, timeout=30)

        failed = qemu_io(f"read {CHUNK} {CHUNK}")
        before = qemu_io(f"read -P {image.data[0]} 0 1")
        after = qemu_io(f"read -P {image.data[2 * CHUNK]} {2 * CHUNK} 1")
    assert "Input/output error" in failed.stdout + failed.stderr
    assert "read 1/1 bytes" in before.stdout, before.stdout + before.stderr
    assert "read 1/1 bytes" in after.stdout, after.stdout + after.stderr


class _Misbehaving(FileExport):
    def flags(self) -> ExportFlags:
        return ExportFlags(can_flush=True, can_fua=True)  # no trim, no zeroes

    def read(self, offset: int, length: int) -> list[bytes]:
        if offset == 0:
            return [b"short"]  # breaks the contract: must be `length` bytes
        if offset == 512:
            raise RuntimeError("a bug in the export")
        return super().read(offset, length)

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        raise NotPermitted("volume became read-only")


def test_export_misbehaviour_becomes_error_replies(serve, image: Image, workers: int) -> None:
    with _Misbehaving(image.path, EXPORT) as export:
        served = serve({EXPORT: export}, workers=workers)
        with RawClient(served.unix_path) as client:
            size, flags = client.connect(EXPORT)
            assert not flags & (p.TransmissionFlag.SEND_TRIM | p.TransmissionFlag.SEND_WRITE_ZEROES)
            assert client.read(0, 512) == (p.NbdErrno.EIO, b"")
            assert client.read(512, 512) == (p.NbdErrno.EIO, b"")
            assert client.write(4096, b"x" * 512) == p.NbdErrno.EPERM
            assert client.command(p.Command.TRIM, 0, 512) == p.NbdErrno.EINVAL
            assert client.command(p.Command.WRITE_ZEROES, 0, 512) == p.NbdErrno.EINVAL
            assert client.command(p.Command.FLUSH, flags=p.CommandFlag.FUA) == 0
            assert client.read(1024, 512) == (0, image.data[1024:1536])
    assert image.current() == image.data


def test_read_only_export_refuses_writes_with_eperm(serve, image: Image) -> None:
    with FileExport(image.path, EXPORT, read_only=True) as export:
        served = serve({EXPORT: export})
        with RawClient(served.unix_path) as client:
            size, flags = client.connect(EXPORT)
            assert flags & p.TransmissionFlag.READ_ONLY
            assert client.write(0, b"x") == p.NbdErrno.EPERM
            assert client.command(p.Command.TRIM, 0, 512) == p.NbdErrno.EPERM
            assert client.command(p.Command.WRITE_ZEROES, 0, 512) == p.NbdErrno.EPERM
    assert image.current() == image.data


# -- concurrency --------------------------------------------------------------------


def test_a_blocked_request_does_not_hold_up_the_others(serve, image: Image) -> None:
    with GatedExport(image.path, 0, name=EXPORT) as export:
        served = serve({EXPORT: export}, workers=4)
        with RawClient(served.unix_path) as client:
            client.connect(EXPORT)
            blocked = client.request(p.Command.READ, 0, CHUNK)
            assert export.waiting.wait(10)
            for index in range(1, 9):  # answered while the first read still waits
                assert client.read(index * CHUNK, CHUNK) == \
                    (0, image.data[index * CHUNK:(index + 1) * CHUNK])
            export.gate.set()
            assert client.reply() == (0, blocked)
            assert client.recv_exact(CHUNK) == image.data[:CHUNK]


def test_a_client_that_never_reads_replies_does_not_stop_the_server(serve, image: Image) -> None:
    with FileExport(image.path, EXPORT) as export:
        served = serve({EXPORT: export}, workers=4)
        with RawClient(served.unix_path) as greedy, RawClient(served.unix_path) as polite:
            greedy.connect(EXPORT)
            greedy.sock.setblocking(False)
            request = p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Command.READ, 1, 0, 1 << 20)
            try:  # requests until the server stops reading them (back-pressure)
                while True:
                    greedy.sock.send(request)
            except BlockingIOError:
                pass
            polite.connect(EXPORT)
            assert polite.read(0, CHUNK) == (0, image.data[:CHUNK])
            served.server.stop(timeout=0.5)  # the greedy one is cut off
            with pytest.raises((ServerClosed, OSError)):
                polite.read(0, 512)


class _MeetingExport(FileExport):
    """Reads of the first ``parties`` chunks wait until all of them are in progress at once."""

    def __init__(self, path: Path, parties: int, **options) -> None:
        super().__init__(path, **options)
        self.meeting = threading.Barrier(parties, timeout=10)
        self.parties = parties

    def read(self, offset: int, length: int) -> list[bytes]:
        if offset < self.parties * CHUNK:
            self.meeting.wait()  # BrokenBarrierError (EIO to the client) unless all meet
        return super().read(offset, length)


def test_slow_calls_run_side_by_side_up_to_workers(serve, image: Image) -> None:
    with _MeetingExport(image.path, 3, name=EXPORT) as export:
        served = serve({EXPORT: export}, workers=3)
        with RawClient(served.unix_path) as client:
            client.connect(EXPORT)
            handles = {client.request(p.Command.READ, index * CHUNK, CHUNK): index
                       for index in range(3)}
            for _ in handles:
                error, handle = client.reply()
                assert error == 0
                index = handles[handle]
                assert client.recv_exact(CHUNK) == image.data[index * CHUNK:(index + 1) * CHUNK]


class _SlowFlushExport(FileExport):
    """A FileExport whose FLUSH waits until ``gate`` is set."""

    def __init__(self, path: Path, **options) -> None:
        super().__init__(path, **options)
        self.gate = threading.Event()
        self.flushing = threading.Event()

    def flush(self) -> None:
        self.flushing.set()
        if not self.gate.wait(10):
            raise OSError(errno.ETIMEDOUT, "gate never opened")
        super().flush()


def test_requests_after_a_flush_do_not_wait_for_it(serve, image: Image, monkeypatch) -> None:
    """A FLUSH waiting for the disk runs beside the requests that follow it on the connection
    (it covers only those answered before it came): their replies come first, without waiting
    for the StallWatch to notice a stuck call (here it never would)."""
    from drtool.nbd import watch

    monkeypatch.setattr(watch, "STUCK_AFTER", 3600.0)
    with _SlowFlushExport(image.path, name=EXPORT) as export:
        served = serve({EXPORT: export}, workers=4)
        with RawClient(served.unix_path) as client:
            client.connect(EXPORT)
            flush = client.request(p.Command.FLUSH)
            assert export.flushing.wait(10)
            assert client.write(CHUNK, b"w" * 4096) == 0  # answered while the flush still waits
            assert client.read(CHUNK, 4096) == (0, b"w" * 4096)
            export.gate.set()
            assert client.reply() == (0, flush)
