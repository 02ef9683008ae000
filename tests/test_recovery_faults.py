"""Faults while the agent serves, with real processes: a span that starts failing under a
running agent, kill -9 in the middle of a write workload, a replica server that dies or hangs
while degraded reads need it.  Clients are real (qemu-img) or a raw NBD client in the test,
which knows exactly which requests were acknowledged."""

from __future__ import annotations

import itertools
import os
import random
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from drtool import api
from drtool.engine import Engine
from drtool.nbd import protocol as p
from drtool.storage.volume import Volume
from tests.conftest import corrupt, make_image, require_root, require_tool, stop_process
from tests.nbd.rawclient import RawClient, ServerClosed

pytestmark = pytest.mark.slow

RS = 65536
REGIONS = 256
SIZE = REGIONS * RS
EIO = int(p.NbdErrno.EIO)


def wait_for(predicate, timeout: float, what: str):
    """Poll ``predicate`` until it returns something true, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def compare(uri: str, expected: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", uri, str(expected)],
                          capture_output=True, text=True, timeout=120)


def set_settings(**settings) -> None:
    api.configure("vol", settings)


def region_of(data: bytes | bytearray, region: int) -> bytes:
    return bytes(data[region * RS:(region + 1) * RS])


@pytest.fixture
def volume(tmp_path, state_root, replica_server):
    require_tool("qemu-img")
    path = tmp_path / "dev.img"
    data = bytearray(make_image(path, SIZE, seed=41))
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    expected = tmp_path / "expected.img"
    expected.write_bytes(data)
    return path, data, expected


def connect(agent, timeout: float = 30.0) -> RawClient:
    client = RawClient(str(agent.sock))
    client.sock.settimeout(timeout)
    client.connect("vol")
    return client


# -- 3. an I/O error that appears while the agent serves ------------------------------------


_SCRIPT = """#!/bin/sh
# nbdkit sh plugin: {image} read-only; reads touching [{start}, {end}) fail with EIO once {trigger} exists.
case "$1" in
  get_size) echo {size} ;;
  thread_model) echo parallel ;;
  can_write) exit 3 ;;
  pread)
    count=$3; offset=$4
    if [ -e {trigger} ] && [ $((offset + count)) -gt {start} ] && [ $offset -lt {end} ]; then
      echo "EIO medium error (injected)" >&2; exit 1
    fi
    exec dd if={image} iflag=skip_bytes,count_bytes skip=$offset count=$count status=none ;;
  *) exit 2 ;;
esac
"""


class LateFailingDevice:
    """A real file (nbdfuse over nbdkit's sh plugin) whose span starts failing with EIO when told.

    Unlike the FaultyDevice fixture (nbdkit's ddrescue filter reads its map once, so a new
    span means a new mount, and a process holding the old file would only see a dead mount),
    the file stays the same open file: an agent that opened it healthy sees the span go bad.
    The page cache is dropped for the file (posix_fadvise) so that reads reach nbdkit.
    """

    def __init__(self, image: Path, workdir: Path, span: tuple[int, int]) -> None:
        self.image = image
        self.mount = workdir / "late-fuse"
        self.trigger = workdir / "late-fuse.fail"
        self.script = workdir / "late-fuse.sh"
        self.span = span
        self.proc: subprocess.Popen | None = None

    @property
    def path(self) -> Path:
        return self.mount / "disk"

    def start(self) -> LateFailingDevice:
        require_root()
        require_tool("nbdfuse", "nbdkit")
        if not os.path.exists("/dev/fuse"):
            pytest.skip("no /dev/fuse")
        start, length = self.span
        self.script.write_text(_SCRIPT.format(image=self.image, trigger=self.trigger, start=start,
                                              end=start + length, size=self.image.stat().st_size))
        self.script.chmod(0o755)
        self.mount.mkdir()
        self.proc = subprocess.Popen(["nbdfuse", str(self.path), "--command", "nbdkit", "-s",
                                      "--exit-with-parent", "sh", str(self.script)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.path.exists() or self.proc.poll() is not None, 20, "nbdfuse to mount")
        if not self.path.exists():
            pytest.fail("nbdfuse did not come up")
        return self

    def drop_cache(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def fail_now(self) -> None:
        self.trigger.touch()
        self.drop_cache()

    def stop(self) -> None:
        subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


SPAN_REGIONS = (40, 3)  # regions 40-42 fail, from the middle of region 40 into region 42
SPAN = (40 * RS + 4096, 2 * RS)


@pytest.fixture
def late_eio(tmp_path, state_root, replica_server, start_agent):
    """A protected volume on a LateFailingDevice, served by a running agent in normal mode,
    never scrubbed; the span has just started failing (after the agent served healthy reads)."""
    require_tool("qemu-img")
    size = 64 * RS
    image = tmp_path / "disk.img"
    data = make_image(image, size, seed=43)
    device = LateFailingDevice(image, tmp_path, SPAN).start()
    agent = None
    try:
        api.init_volume("vol", str(device.path), "64K")
        api.protect("vol", replica_server.url, str(replica_server.token_file))
        device.drop_cache()  # init and protect read everything through the page cache
        agent = start_agent("vol")
        status = api.status("vol")[0]
        assert status["mode"] == "normal" and status["bad_regions"] == [] and status["last_scrub"] is None
        with connect(agent) as client:
            for region in (0, 1, 20, 63):
                assert client.read(region * RS, RS) == (0, region_of(data, region))
        device.fail_now()
        fd = os.open(device.path, os.O_RDONLY)  # the fault is real, and new
        try:
            with pytest.raises(OSError) as failed:
                os.pread(fd, 4096, 41 * RS)
            assert failed.value.errno == 5
        finally:
            os.close(fd)
        assert api.status("vol")[0]["mode"] == "normal"
        expected = tmp_path / "expected.img"
        expected.write_bytes(data)
        yield agent, data, expected
    finally:
        if agent is not None:
            agent.stop(kill=True)  # before the mount goes away under it
        device.stop()


def test_eio_appearing_under_a_running_agent_is_served_from_the_replica(late_eio):
    agent, data, expected = late_eio
    with connect(agent) as client:  # a client reading the span itself first
        assert client.read(SPAN[0] - 100, SPAN[1] + 200) == (0, data[SPAN[0] - 100:SPAN[0] + SPAN[1] + 100])
    assert compare(agent.uri(), expected).returncode == 0  # and a real client reading everything
    status = api.status("vol")[0]
    assert status["mode"] == "degraded" and status["recovery"]["auto"] is True
    assert status["recovery"]["reason"] == "regions [(40, 3)] failed verification while serving"
    assert status["bad_regions"] == [list(SPAN_REGIONS)]
    assert status["recovery"]["fetched_regions"] == 3
    assert status["agent"]["running"] is True


def test_eio_appearing_under_a_running_agent_is_recorded_as_an_io_error(late_eio, state_root):
    agent, data, _ = late_eio
    with connect(agent) as client:
        assert client.read(40 * RS, 3 * RS) == (0, data[40 * RS:43 * RS])
    volume = Volume.inspect(state_root, "vol")
    assert list(volume.bad) == [40, 41, 42]
    assert list(volume.ioerror) == [40, 41, 42]  # an I/O error, not a checksum mismatch


# -- 4. kill -9 in the middle of a write workload with FLUSHes --------------------------------


class FlushingWriter(threading.Thread):
    """Writes distinct patterns in batches of BATCH pipelined WRITEs, each batch followed by a
    FLUSH once all its writes were acknowledged; knows exactly what was acknowledged when."""

    BATCH = 8

    def __init__(self, agent, slots: list[tuple[int, int]], flushes_before_signal: int) -> None:
        super().__init__(daemon=True)
        self.agent = agent
        self.slots = slots  # (offset, length) of every write, in order
        self.patterns = [random.Random(1000 + i).randbytes(length) for i, (_, length) in enumerate(slots)]
        self.flushes_before_signal = flushes_before_signal
        self.acked: set[int] = set()  # writes whose reply said success
        self.flushed_through = 0  # writes [0, flushed_through) were acknowledged before an acknowledged FLUSH
        self.flushes = 0
        self.sent = 0
        self.in_flight = threading.Event()  # a batch is out after enough FLUSHes, replies not yet read
        self.ended: BaseException | None = None

    def run(self) -> None:
        try:
            with connect(self.agent) as client:
                for start in range(0, len(self.slots), self.BATCH):
                    batch = range(start, min(start + self.BATCH, len(self.slots)))
                    handles = {}
                    for index in batch:
                        offset, _ = self.slots[index]
                        handles[client.request(p.Command.WRITE, offset, len(self.patterns[index]),
                                               payload=self.patterns[index])] = index
                        self.sent = index + 1
                    if self.flushes >= self.flushes_before_signal:
                        self.in_flight.set()
                    for _ in batch:
                        error, handle = client.reply()
                        assert error == 0, f"write {handles[handle]} failed with NBD error {error}"
                        self.acked.add(handles[handle])
                    flush = client.request(p.Command.FLUSH)
                    assert client.reply() == (0, flush)
                    self.flushes += 1
                    self.flushed_through = batch.stop
                self.in_flight.set()
        except (ServerClosed, ConnectionError) as exc:
            self.ended = exc  # the agent was killed
        except BaseException as exc:
            self.ended = exc
            self.in_flight.set()


def test_kill_dash_nine_mid_workload_keeps_every_flushed_write(volume, start_agent, cli, tmp_path):
    path, data, expected = volume
    bad = [3 * 2, 3 * 7 + 1]  # two writes land partly in bad regions: filled from the replica first
    for region in bad:
        corrupt(path, region * RS + 50)
    api.scrub_volume("vol")
    agent = start_agent("vol")
    assert cli("recover", "vol").code == 0
    # Write i covers the last 8 KiB of region 3i and the first 16 KiB of region 3i+1.
    slots = [(3 * i * RS + RS - 8192, 24576) for i in range(REGIONS // 3)]
    writer = FlushingWriter(agent, slots, flushes_before_signal=5)
    writer.start()
    assert writer.in_flight.wait(120), "the workload did not get going"
    assert writer.ended is None, writer.ended
    agent.stop(kill=True)  # SIGKILL while the batch after the fifth FLUSH is in flight
    writer.join(30)
    assert not writer.is_alive()
    assert isinstance(writer.ended, (ServerClosed, ConnectionError)), writer.ended
    flushed, sent = writer.flushed_through, writer.sent
    assert flushed >= 5 * FlushingWriter.BATCH and sent > flushed  # the kill landed mid-workload
    assert writer.flushed_through < len(slots)

    agent = start_agent("vol")
    with connect(agent) as client:
        for index, (offset, length) in enumerate(slots):
            error, got = client.read(offset, length)
            assert error == 0, f"write {index}: NBD error {error}"
            new, old = writer.patterns[index], bytes(data[offset:offset + length])
            if index < flushed:
                assert got == new, f"write {index} was flushed but did not survive kill -9"
            elif index in writer.acked:
                # A process crash keeps what reached the kernel: acknowledged writes survive too.
                assert got == new, f"write {index} was acknowledged but did not survive kill -9"
            else:
                # In flight: each region holds the write or the old bytes, never a mixture or garbage.
                cut = RS - offset % RS
                for part in (slice(0, cut), slice(cut, length)):
                    assert got[part] in (new[part], old[part]), f"write {index} is torn inside a region"
            data[offset:offset + length] = got
    expected.write_bytes(data)
    assert compare(agent.uri(), expected).returncode == 0  # and nothing else changed
    status = cli("status", "vol", "--json").json()
    assert status["mode"] == "degraded" and status["lost_regions"] == []


# -- 5. the replica server dies, or hangs, while degraded reads need it -----------------------


class RemoteReader(threading.Thread):
    """Reads bad regions over and over on one NBD connection, recording each outcome."""

    def __init__(self, agent, regions: list[int], data: bytes | bytearray) -> None:
        super().__init__(daemon=True)
        self.agent = agent
        self.regions = regions
        self.data = data
        self.results: list[tuple[int, int, bool]] = []  # region, NBD error, bytes exact
        self.halt = threading.Event()
        self.failure: BaseException | None = None

    def count(self, error: int, exact: bool | None = None, since: int = 0) -> int:
        return sum(1 for _, e, ok in self.results[since:] if e == error and (exact is None or ok == exact))

    def run(self) -> None:
        try:
            with connect(self.agent, timeout=60) as client:
                for region in itertools.cycle(self.regions):
                    if self.halt.is_set():
                        return
                    error, got = client.read(region * RS, RS)
                    self.results.append((region, error, error == 0 and got == region_of(self.data, region)))
        except BaseException as exc:  # a hung read (socket timeout) lands here and fails the test
            self.failure = exc


@pytest.fixture
def make_degraded(volume, start_agent, cli):
    """make_degraded(**settings): regions 100-139 bad, copy-on-read off (every read of them goes to
    the replica, no readahead), the given engine settings, an agent in degraded mode."""

    def make(**settings):
        path, data, expected = volume
        bad = list(range(100, 140))
        for region in bad:
            corrupt(path, region * RS + 123, b"\x01\x02")
        api.scrub_volume("vol")
        set_settings(copy_on_read=False, **settings)
        agent = start_agent("vol")
        assert cli("recover", "vol").code == 0
        return agent, data, expected, bad

    return make


@pytest.fixture
def degraded_agent(make_degraded):
    return make_degraded()


def test_replica_server_killed_during_degraded_reads(degraded_agent, replica_server):
    agent, data, expected, bad = degraded_agent
    reader = RemoteReader(agent, bad, data)
    reader.start()
    try:
        wait_for(lambda: reader.count(0, True) >= 5 or reader.failure, 60, "remote reads to succeed")
        replica_server.stop(kill=True)  # SIGKILL in the middle of the read stream
        killed_at = len(reader.results)
        wait_for(lambda: reader.count(EIO, since=killed_at) >= 2 or reader.failure, 60, "EIO from remote reads")
        with connect(agent) as healthy:  # local healthy reads go on meanwhile
            for region in (0, 50, 99, 140, 255):
                assert healthy.read(region * RS, RS) == (0, region_of(data, region))
        replica_server.start()
        back_at = len(reader.results)
        wait_for(lambda: reader.count(0, True, since=back_at + 1) >= 5 or reader.failure, 60,
                 "remote reads to succeed again")
    finally:
        reader.halt.set()
        reader.join(90)
    assert reader.failure is None, f"a remote read failed badly: {reader.failure!r}"
    errors = {error for _, error, _ in reader.results}
    assert errors == {0, EIO}  # nothing but exact bytes or EIO
    assert all(exact for _, error, exact in reader.results if error == 0)  # never a wrong byte
    assert compare(agent.uri(), expected).returncode == 0


class HangingServer:
    """Accepts TCP connections and reads requests, never answers: a wedged replica server."""

    def __init__(self, port: int) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(16)
        self.conns: list[socket.socket] = []
        self.received = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def requests(self) -> int:
        with self.lock:
            return self.received.count(b" HTTP/1.1\r\n")

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._swallow, args=(conn,), daemon=True).start()

    def _swallow(self, conn: socket.socket) -> None:
        try:
            while chunk := conn.recv(65536):
                with self.lock:
                    self.received += chunk
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            except OSError:
                pass


@pytest.fixture
def hanging(replica_server):
    """The real replica server is stopped; a HangingServer holds its port."""
    port = replica_server.port
    replica_server.stop(kill=True)
    server = HangingServer(port)
    yield server
    server.close()


def test_hanging_replica_blocks_only_the_reads_that_need_it(degraded_agent, replica_server, hanging):
    agent, data, expected, bad = degraded_agent
    outcome: list[tuple[int, bytes]] = []
    stuck = connect(agent, timeout=300)
    waiter = threading.Thread(target=lambda: outcome.append(stuck.read(bad[0] * RS, RS)), daemon=True)
    waiter.start()
    try:
        wait_for(lambda: b"POST /v1/volumes/vol/read" in hanging.received, 30,
                 "the agent to ask the hanging replica")
        with connect(agent) as healthy:  # other clients, other regions: served while that read waits
            for region in (0, 1, 99, 140, 200, 255):
                assert healthy.read(region * RS, RS) == (0, region_of(data, region))
            assert healthy.write(10 * RS, b"written while the replica hangs") == 0
            data[10 * RS:10 * RS + 31] = b"written while the replica hangs"
            assert healthy.read(10 * RS, RS) == (0, region_of(data, 10))
        assert not outcome and waiter.is_alive()  # still waiting on the replica
        hanging.close()  # the wedged server goes away; the real one is not back yet
        waiter.join(60)
        assert not waiter.is_alive(), "the read did not finish once the hanging server was gone"
        assert outcome == [(EIO, b"")]
    finally:
        stuck.close()
    replica_server.start()  # the real server returns on its port
    with connect(agent) as client:
        for region in bad[:5]:
            assert client.read(region * RS, RS) == (0, region_of(data, region))
    expected.write_bytes(data)
    assert compare(agent.uri(), expected).returncode == 0


def test_hanging_replica_read_fails_with_eio_within_the_fetch_timeout(make_degraded, replica_server, request):
    # fetch_timeout: the seconds one replica request may wait while a client's read needs it.
    agent, _, _, bad = make_degraded(fetch_timeout=2)
    port = replica_server.port
    replica_server.stop(kill=True)
    hanging = HangingServer(port)
    request.addfinalizer(hanging.close)
    with connect(agent, timeout=20) as client:  # generous: 4 attempts of 2 s plus backoff
        try:
            error, _ = client.read(bad[0] * RS, RS)
        except TimeoutError:
            pytest.fail("a read of a region on a hung replica got no answer within 20 s")
    assert error == EIO
