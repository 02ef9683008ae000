"""Malformed and awkward NBD traffic against the real agent (``drtool agent``: the EngineExport
path, not NbdServer + FileExport): every case gets the protocol's error reply or a clean close,
and a client connected before the bad traffic keeps reading exact bytes afterwards.  Also FUA
writes, a demoted (read-only) export, and concurrent writers on two connections."""

from __future__ import annotations

import random
import socket
import subprocess
import threading

import pytest

from drtool import api
from drtool.nbd import protocol as p
from tests.conftest import make_image, require_tool
from tests.nbd.rawclient import RawClient

pytestmark = pytest.mark.slow

RS = 65536
REGIONS = 64
SIZE = REGIONS * RS
WATCHED = range(60, 64)  # no test writes here: the watcher reads these regions before and after


def region_of(data: bytes | bytearray, region: int) -> bytes:
    return bytes(data[region * RS:(region + 1) * RS])


@pytest.fixture
def volume(tmp_path, state_root, replica_server):
    path = tmp_path / "dev.img"
    data = bytearray(make_image(path, SIZE, seed=51))
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    return path, data


@pytest.fixture
def agent(volume, start_agent):
    return start_agent("vol")


def connect(agent) -> RawClient:
    client = RawClient(str(agent.sock))
    client.connect("vol")
    return client


@pytest.fixture
def watcher(agent, volume):
    """A client connected before the test's traffic; it (and a fresh client) must read exact bytes after."""
    _, data = volume
    client = connect(agent)
    assert client.read(WATCHED[0] * RS, RS) == (0, region_of(data, WATCHED[0]))
    yield client
    try:
        for region in WATCHED:
            assert client.read(region * RS, RS) == (0, region_of(data, region)), "the watcher lost its way"
    finally:
        client.close()
    with connect(agent) as fresh:
        for region in WATCHED:
            assert fresh.read(region * RS, RS) == (0, region_of(data, region))
    assert agent.proc.poll() is None, "the agent died"


def test_bad_request_magic_closes_only_that_connection(agent, watcher):
    with connect(agent) as client:
        assert client.read(0, 512)[0] == 0
        client.request(p.Command.READ, 0, 512, magic=0x12560953)
        assert client.server_closed()


def test_unknown_commands_and_flags_get_einval_and_the_connection_goes_on(agent, watcher, volume):
    _, data = volume
    with connect(agent) as client:
        assert client.command(0x4242, 0, 512) == p.NbdErrno.EINVAL
        assert client.command(p.Command.CACHE, 0, 512) == p.NbdErrno.EINVAL
        assert client.command(p.Command.BLOCK_STATUS, 0, 512) == p.NbdErrno.EINVAL
        assert client.command(p.Command.RESIZE, 0, 0) == p.NbdErrno.EINVAL
        assert client.read(0, 512, flags=p.CommandFlag.DF)[0] == p.NbdErrno.EINVAL
        assert client.read(0, 512, flags=0x8000)[0] == p.NbdErrno.EINVAL
        assert client.write(0, b"x" * 512, flags=p.CommandFlag.NO_HOLE) == p.NbdErrno.EINVAL
        assert client.command(p.Command.WRITE_ZEROES, 0, 512, flags=p.CommandFlag.FAST_ZERO) == p.NbdErrno.EINVAL
        assert client.read(0, RS) == (0, region_of(data, 0))  # still in step


def test_requests_past_the_end(agent, watcher, volume):
    path, data = volume
    with connect(agent) as client:
        assert client.read(SIZE - 512, 1024)[0] == p.NbdErrno.EINVAL
        assert client.read(SIZE, 1)[0] == p.NbdErrno.EINVAL
        assert client.read(2**63, 512)[0] == p.NbdErrno.EINVAL
        assert client.read(2**64 - 512, 512)[0] == p.NbdErrno.EINVAL  # offset + length wraps around
        assert client.write(SIZE - 512, b"\x77" * 1024) == p.NbdErrno.ENOSPC
        assert client.command(p.Command.WRITE_ZEROES, SIZE - 1, 2) == p.NbdErrno.ENOSPC
        assert client.command(p.Command.TRIM, SIZE, 512) == p.NbdErrno.EINVAL
        assert client.read(SIZE, 0) == (0, b"")
        assert client.read(SIZE - 512, 512) == (0, bytes(data[-512:]))
    assert path.read_bytes() == bytes(data)  # nothing was written


def test_oversized_requests(agent, watcher, volume):
    path, data = volume
    too_big = p.DEFAULT_MAX_REQUEST + 1
    with connect(agent) as client:
        assert client.read(0, too_big)[0] == p.NbdErrno.EINVAL
        assert client.read(0, 2**32 - 1)[0] == p.NbdErrno.EINVAL
        # The refused payload is read and dropped: the stream stays in step.
        assert client.write(0, b"\x5a" * too_big) == p.NbdErrno.EINVAL
        assert client.read(0, RS) == (0, region_of(data, 0))
    assert path.read_bytes() == bytes(data)


def test_truncated_request_closes_cleanly(agent, watcher, volume):
    path, data = volume
    with connect(agent) as client:
        client.send(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Command.READ, 1, 0, 512)[:13])
        client.sock.shutdown(socket.SHUT_WR)  # the request will never be completed
        assert client.server_closed()
    with connect(agent) as client:  # a write whose payload never arrives in full
        client.send(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Command.WRITE, 1, 0, RS) + b"\x77" * (RS // 2))
        client.sock.shutdown(socket.SHUT_WR)
        assert client.server_closed()
    assert path.read_bytes() == bytes(data)  # a write never received in full is not applied


def test_garbage_during_the_handshake(agent, watcher):
    with connect(agent) as client:
        pass  # a polite client first: the agent serves it, then the rude ones
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(10)
    raw.connect(str(agent.sock))
    with raw:
        raw.recv(18)
        raw.sendall(b"\x00\x00\x00\x03" + b"not an option request at all" * 20)
        try:
            while raw.recv(65536):
                pass
        except ConnectionResetError:
            pass  # closed either way
    with RawClient(str(agent.sock)) as client:
        client.greeting()
        client.option(p.Option.GO, b"\xff" * 3)
        assert client.option_reply()[:2] == (p.Option.GO, p.Reply.ERR_INVALID)
        reply, _ = client.info(p.Option.GO, "no-such-volume")
        assert reply == p.Reply.ERR_UNKNOWN


def test_writes_to_a_demoted_export_get_eperm(agent, watcher, volume, cli):
    path, data = volume
    before = connect(agent)  # connected while the volume was still the primary
    try:
        assert before.write(0, b"accepted before the demotion", flags=p.CommandFlag.FUA) == 0
        data[0:28] = b"accepted before the demotion"
        result = cli("demote", "vol", "--json")
        assert result.code == 0, result.err
        assert result.json()["role"] == "secondary"
        assert before.write(RS, b"refused") == p.NbdErrno.EPERM
        assert before.command(p.Command.WRITE_ZEROES, RS, 512) == p.NbdErrno.EPERM
        assert before.command(p.Command.TRIM, 0, RS) == p.NbdErrno.EPERM
        assert before.read(0, RS) == (0, region_of(data, 0))
        with RawClient(str(agent.sock)) as after:  # a new client is told the export is read-only
            _, flags = after.connect("vol")
            assert flags & p.TransmissionFlag.READ_ONLY
            assert after.write(RS, b"refused too") == p.NbdErrno.EPERM
            assert after.read(RS, RS) == (0, region_of(data, 1))
    finally:
        before.close()
    assert path.read_bytes() == bytes(data)


@pytest.mark.parametrize("mode", ["normal", "degraded"])
def test_fua_write_is_on_disk_when_acknowledged(volume, start_agent, cli, state_root, mode):
    path, data = volume
    agent = start_agent("vol")
    if mode == "degraded":
        assert cli("recover", "vol").code == 0
    payload = random.Random(5).randbytes(3 * RS - 1000)
    offset = 5 * RS + 1000  # partial first region, whole regions 6 and 7
    with connect(agent) as client:
        assert client.write(offset, payload, flags=p.CommandFlag.FUA) == 0
        agent.stop(kill=True)  # no FLUSH, no clean shutdown: the reply is all the client got
    data[offset:offset + len(payload)] = payload
    if mode == "normal":
        assert path.read_bytes() == bytes(data)
    else:
        overlay = (state_root / "vol" / "overlay.img").read_bytes()
        assert overlay[5 * RS:8 * RS] == bytes(data[5 * RS:8 * RS])  # whole regions in the overlay
    agent = start_agent("vol")
    with connect(agent) as client:
        assert client.read(4 * RS, 5 * RS) == (0, bytes(data[4 * RS:9 * RS]))


def test_concurrent_writers_on_two_connections(volume, start_agent, tmp_path):
    require_tool("qemu-img")
    path, data = volume
    agent = start_agent("vol")
    plans = {
        # Even regions for one connection, odd for the other; partial and whole-region writes.
        "even": [(r * RS + (r * 997) % 4096, 8192 + (r * 131) % RS // 2) for r in range(0, 60, 2)],
        "odd": [(r * RS, RS) if r % 3 else (r * RS + 300, 5000) for r in range(1, 60, 2)],
    }
    patterns = {name: [random.Random(f"{name}{i}").randbytes(length) for i, (_, length) in enumerate(plan)]
                for name, plan in plans.items()}
    failures: list[BaseException] = []
    start = threading.Barrier(2)

    def run(name: str) -> None:
        try:
            with connect(agent) as client:
                start.wait(10)
                handles = [client.request(p.Command.WRITE, offset, len(pattern), payload=pattern)
                           for (offset, _), pattern in zip(plans[name], patterns[name])]
                replies = sorted(client.reply() for _ in handles)
                assert replies == sorted((0, handle) for handle in handles)
                assert client.command(p.Command.FLUSH) == 0
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    for name, plan in plans.items():
        for (offset, _), pattern in zip(plan, patterns[name]):
            data[offset:offset + len(pattern)] = pattern
    with connect(agent) as client:
        for region in range(REGIONS):
            assert client.read(region * RS, RS) == (0, region_of(data, region)), f"region {region}"
    expected = tmp_path / "expected.img"
    expected.write_bytes(data)
    assert subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", agent.uri(), str(expected)],
                          timeout=120).returncode == 0
    agent.stop()
    assert path.read_bytes() == bytes(data)  # normal mode: the device itself holds every write
    status = api.status("vol")[0]
    assert status["bad_regions"] == [] and status["mode"] == "normal"
