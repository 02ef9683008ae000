"""What the replica's read path sends when the image fails it, in process (drtool/replica/reading.py).

The server no longer hashes what it sends, and with ``sendfile`` a read error shows up when a
region's frame is already on its way: the rest of that region goes as zeros (which the client's
digest check refuses), its neighbours still go out whole, and the region is remembered as bad,
so the retry reads and hashes it first and answers an ERROR frame that says why (or its bytes,
if they read good now).
"""

from __future__ import annotations

import errno
import os
import random
import socket
import threading

import blake3
import pytest

from drtool import wire
from drtool.errors import DeviceIOError
from drtool.replica import reading, scrub
from drtool.replica.apply import apply_batch, parse_batch
from drtool.replica.store import ReplicaRoot
from drtool.storage.device import Device
from tests.replica.conftest import VOLUME_ID

RS = 65536
COUNT = 8
BAD = 2


@pytest.fixture
def volume(tmp_path):
    root = ReplicaRoot(str(tmp_path / "replicas"))
    _, volume = root.ensure("vol", COUNT * RS, RS, VOLUME_ID)
    rng = random.Random(5)
    content = rng.randbytes(COUNT * RS)
    chunks = [c for r in range(COUNT) for c in wire.encode_record(wire.KIND_WRITE, r + 1, r * RS,
                                                                  content[r * RS:(r + 1) * RS])]
    apply_batch(volume, parse_batch(volume, memoryview(b"".join(chunks)), False, 1000), COUNT, False)
    yield volume, content
    root.close()


def read_frames(volume, copy: bool | None = None) -> list[tuple[int, int, bytes, bytes]]:
    """A batched read of every region as RUN frames, through a socket pair, split into
    (region, frame kind, bytes, digest sent) per region."""
    resolve = reading.resolver(volume, None, False)
    plan = reading.plan_frames(volume, list(range(COUNT)), resolve, runs=True)
    ours, theirs = socket.socketpair()
    received = bytearray()

    def drain() -> None:
        while chunk := theirs.recv(1 << 20):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    with ours:
        ours.settimeout(10)
        reading.stream_frames(volume, plan, resolve, ours, copy=copy)
        ours.shutdown(socket.SHUT_WR)
    reader.join(10)
    theirs.close()
    assert len(received) == plan.length  # the Content-Length declared up front holds
    return split(memoryview(bytes(received)))


def split(view: memoryview) -> list[tuple[int, int, bytes, bytes]]:
    out = []
    while True:
        header = wire.decode_frame_header(view[:wire.FRAME_HEADER_SIZE])
        payload = view[wire.FRAME_HEADER_SIZE:wire.FRAME_HEADER_SIZE + header.payload_length]
        view = view[wire.FRAME_HEADER_SIZE + header.payload_length:]
        if header.kind == wire.FRAME_END:
            assert not view and header.region == COUNT
            return out
        if header.kind == wire.FRAME_RUN:
            length, digests, data = wire.decode_run(header, payload)
            for index in range(len(digests) // 32):
                out.append((header.region + index, wire.FRAME_RUN, bytes(data[index * length:(index + 1) * length]),
                            bytes(digests[32 * index:32 * index + 32])))
        else:
            out.append((header.region, header.kind, bytes(payload), header.digest))


def failing_sendfile(monkeypatch, image: str) -> list[int]:
    """os.sendfile that fails with EIO inside region BAD of ``image`` (after sending what comes
    before it, as the kernel does); returns the offsets it failed at."""
    real = os.sendfile
    failures: list[int] = []
    bad_fds = set()

    def sendfile(out: int, fd: int, offset: int, count: int) -> int:
        if fd not in bad_fds and os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(image):
            bad_fds.add(fd)
        if fd in bad_fds and offset < (BAD + 1) * RS and offset + count > BAD * RS:
            if offset < BAD * RS:
                return real(out, fd, offset, BAD * RS - offset)
            failures.append(offset)
            raise OSError(errno.EIO, "Input/output error")
        return real(out, fd, offset, count)

    monkeypatch.setattr(reading.os, "sendfile", sendfile)
    return failures


def failing_reads(monkeypatch) -> None:
    real = Device.readinto

    def readinto(self, buffer, offset):
        if self.path.endswith("mirror.img") and offset < (BAD + 1) * RS and offset + len(buffer) > BAD * RS:
            raise DeviceIOError(self.path, offset, len(buffer), "I/O error (EIO)")
        real(self, buffer, offset)

    monkeypatch.setattr(Device, "readinto", readinto)


def check_first_read(frames, content: bytes) -> None:
    """Region BAD went out as zeros under its real digest (refused by any client); the rest whole."""
    assert [f[0] for f in frames] == list(range(COUNT))
    assert {f[1] for f in frames} == {wire.FRAME_RUN}
    for region, _, data, digest in frames:
        real = content[region * RS:(region + 1) * RS]
        assert digest == blake3.blake3(real).digest()
        if region == BAD:
            assert data == bytes(RS) and blake3.blake3(data).digest() != digest
        else:
            assert data == real


def test_a_sendfile_read_error_sends_zeros_marks_the_region_and_the_retry_says_why(volume, monkeypatch):
    volume, content = volume
    failures = failing_sendfile(monkeypatch, volume.mirror.image_path)
    check_first_read(read_frames(volume), content)
    assert failures and scrub.state_of(volume).marked() == {"mirror": frozenset({BAD})}

    # The retry: region BAD is read and hashed first; unreadable, it is an ERROR frame saying so.
    failing_reads(monkeypatch)
    frames = read_frames(volume)
    assert [f[1] for f in frames if f[0] == BAD] == [wire.FRAME_ERROR]
    assert b"I/O error" in frames[BAD][2] and len(frames[BAD][2]) == RS
    assert [f[2] for f in frames if f[0] != BAD] == [content[r * RS:(r + 1) * RS] for r in range(COUNT) if r != BAD]


def test_a_marked_region_that_reads_good_again_is_sent(volume, monkeypatch):
    volume, content = volume
    failing_sendfile(monkeypatch, volume.mirror.image_path)
    read_frames(volume)
    monkeypatch.undo()
    frames = read_frames(volume)
    assert frames[BAD][1] == wire.FRAME_DATA and frames[BAD][2] == content[BAD * RS:(BAD + 1) * RS]
    assert frames[BAD][3] == blake3.blake3(frames[BAD][2]).digest()


def test_the_copy_path_tls_uses_fails_the_same_way(volume, monkeypatch):
    volume, content = volume
    failing_reads(monkeypatch)
    check_first_read(read_frames(volume, copy=True), content)
    assert scrub.state_of(volume).marked() == {"mirror": frozenset({BAD})}


def test_a_region_damaged_at_rest_is_sent_as_stored_and_left_to_the_client(volume):
    """No re-hash on the way out: a region the server does not know is bad goes out with the
    digest it stored, and it is the client's check that refuses it (tests/replica/test_reads.py)."""
    volume, content = volume
    with open(volume.mirror.image_path, "r+b") as handle:
        handle.seek(5 * RS + 7)
        handle.write(b"\xff\x00")
    frames = read_frames(volume)
    assert frames[5][3] == blake3.blake3(content[5 * RS:6 * RS]).digest()
    assert blake3.blake3(frames[5][2]).digest() != frames[5][3]
    assert scrub.state_of(volume).marked() == {}
