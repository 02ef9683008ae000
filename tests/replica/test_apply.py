"""Records into the mirror and the overlay replica: exact bytes, idempotence, sparseness."""

from __future__ import annotations

import os
import random

import pytest

from drtool import wire
from drtool.client import ReplicaClient
from drtool.errors import Conflict, PeerProtocolError, UsageError
from tests.replica.conftest import VOLUME_ID, ServerProcess, write, zero

RS = 65536
SIZE = 10 * RS + 5000  # a partial last region


@pytest.fixture
def vol(client: ReplicaClient) -> str:
    client.ensure_volume("vol", SIZE, RS, VOLUME_ID)
    return "vol"


def mirror(server: ServerProcess, name: str = "vol") -> bytes:
    return (server.root / name / "mirror.img").read_bytes()


def test_ensure_volume_is_idempotent_and_refuses_other_geometry(client: ReplicaClient, vol: str) -> None:
    assert client.ensure_volume(vol, SIZE, RS, VOLUME_ID)["region_count"] == 11
    with pytest.raises(Conflict, match="size"):
        client.ensure_volume(vol, SIZE + RS, RS, VOLUME_ID)
    with pytest.raises(Conflict, match="volume_id"):
        client.ensure_volume(vol, SIZE, RS, "f" * 32)
    assert [v["name"] for v in client.list_volumes()] == ["vol"]


def test_records_give_exact_mirror_bytes(server: ServerProcess, client: ReplicaClient, vol: str) -> None:
    rng = random.Random(7)
    expect = bytearray(SIZE)
    chunks: list[bytes] = []
    pieces = [(0, RS), (RS + 100, 300), (3 * RS, RS), (10 * RS, 5000), (10 * RS + 10, 17), (3 * RS + 5, 10)]
    for seq, (offset, length) in enumerate(pieces, 1):
        data = rng.randbytes(length)
        expect[offset:offset + length] = data
        chunks += write(seq, offset, data)
    result = client.send_records(vol, chunks)
    assert result == {"applied_seq": 6, "applied": 6, "skipped": 0}
    assert mirror(server) == expect
    # The digests the server keeps are those of the bytes it holds (partial records included).
    results = list(client.read_regions(vol, [(0, 11)]))
    assert all(r.ok for r in results)
    assert b"".join(bytes(r.data) for r in results) == expect
    assert client.read_range(vol, RS + 50, 400) == expect[RS + 50:RS + 450]


def test_resent_batch_is_not_applied_twice(client: ReplicaClient, vol: str) -> None:
    first = write(1, 0, b"a" * RS) + write(2, RS, b"b" * 100)
    assert client.send_records(vol, first)["applied"] == 2
    client.create_snapshot(vol, "after2")
    again = first + write(3, RS, b"c" * 50)
    assert client.send_records(vol, again) == {"applied_seq": 3, "applied": 1, "skipped": 2}
    info = client.volume_info(vol)
    assert info["journal"]["records"] == 3
    # Had seq 1 been applied again after the snapshot, the snapshot would have preserved region 0.
    assert client.list_snapshots(vol)[0]["preserved_regions"] == 1
    assert client.read_range(vol, RS, 100, snapshot="after2") == b"b" * 100
    assert client.read_range(vol, RS, 100) == b"c" * 50 + b"b" * 50


def test_out_of_order_seqs_and_complete_through(client: ReplicaClient, vol: str) -> None:
    assert client.send_records(vol, write(5, 0, b"x" * 10))["applied_seq"] == 0
    assert client.volume_info(vol)["applied_ahead"] == [5]
    assert client.send_records(vol, write(1, RS, b"y" * 10))["applied_seq"] == 1
    # 2-4 were dropped by the primary (bitmap mode): complete_through covers them.
    assert client.send_records(vol, write(6, 0, b"z" * 10), complete_through=6)["applied_seq"] == 6
    assert client.send_records(vol, write(5, 0, b"x" * 10))["skipped"] == 1
    assert client.read_range(vol, 0, 10) == b"z" * 10
    assert client.volume_info(vol)["applied_ahead"] == []


def test_complete_through_beyond_what_was_sent_is_refused(server: ServerProcess, client: ReplicaClient,
                                                          vol: str) -> None:
    """Complete-Through 2**64 (or any seq past the batch and what was applied) once made the
    watermark jump there: every later record was skipped, yet acknowledged."""
    from tests.replica.conftest import assert_problem, call

    headers = {"Content-Type": wire.RECORDS_CONTENT_TYPE}
    assert client.send_records(vol, write(1, 0, b"a" * 10), complete_through=1)["applied_seq"] == 1
    for through in (2**64, 2**64 - 1, 3):
        body = b"".join(write(2, RS, b"b" * 10))
        response = call(server, "POST", "/v1/volumes/vol/records", data=body,
                        headers={**headers, "X-Drtool-Complete-Through": str(through)})
        assert_problem(response, 400, "X-Drtool-Complete-Through", kind="bad-request")
    for bad in ("²", "1" * 5000, "+2", "2x", "2, 3"):
        response = call(server, "POST", "/v1/volumes/vol/records", data=b"".join(write(2, RS, b"b" * 10)),
                        headers={**headers, "X-Drtool-Complete-Through": bad})
        assert_problem(response, 400, "X-Drtool-Complete-Through")
    with pytest.raises(UsageError, match="beyond the highest sequence"):
        client.send_records(vol, [], complete_through=2)
    # Nothing of the refused batches was applied, and the watermark did not move.
    info = client.volume_info(vol)
    assert info["applied_seq"] == 1 and info["applied_ahead"] == [] and info["journal"]["records"] == 1
    assert client.read_range(vol, RS, 10) == bytes(10)
    # Later writes land.
    assert client.send_records(vol, write(2, RS, b"b" * 10), complete_through=2) == \
        {"applied_seq": 2, "applied": 1, "skipped": 0}
    assert client.read_range(vol, RS, 10) == b"b" * 10
    # Up to what was applied out of order (a forced batch) or sent in the batch is vouched for.
    assert client.send_records(vol, write(5, 2 * RS, b"c" * 10))["applied_seq"] == 2
    assert client.send_records(vol, [], complete_through=5)["applied_seq"] == 5
    assert client.send_records(vol, write(9, 0, b"d" * 10), complete_through=9)["applied_seq"] == 9
    assert client.send_records(vol, write(10, 0, b"e" * 10))["applied_seq"] == 10
    assert client.read_range(vol, 0, 10) == b"e" * 10


def test_zero_records_keep_the_mirror_sparse(server: ServerProcess, client: ReplicaClient, vol: str) -> None:
    client.send_records(vol, write(1, 0, os.urandom(4 * RS)[:RS]) + write(2, RS, os.urandom(RS))
                        + write(3, 2 * RS, b"q" * RS))
    before = os.stat(server.root / vol / "mirror.img").st_blocks
    client.send_records(vol, zero(4, 0, RS) + zero(5, RS + 10, 20) + write(6, 2 * RS, bytes(RS)))
    after = os.stat(server.root / vol / "mirror.img").st_blocks
    assert after < before  # whole zero regions became holes (records 4 and 6)
    data = mirror(server)
    assert data[:RS] == bytes(RS) and data[RS + 10:RS + 30] == bytes(20) and data[2 * RS:3 * RS] == bytes(RS)
    results = {r.region: r for r in client.read_regions(vol, [(0, 3)])}
    assert results[0].ok and results[2].ok and results[1].ok
    assert client.volume_info(vol)["zero_regions"] == 10  # 0, 2 and 3-10


def test_overlay_records_stay_apart_from_the_mirror(server: ServerProcess, client: ReplicaClient,
                                                    vol: str) -> None:
    client.send_records(vol, write(1, 0, b"m" * RS))
    client.send_records(vol, write(1, 10, b"o" * 5, overlay=True) + write(2, RS, b"p" * RS, overlay=True),
                        overlay=True)
    assert mirror(server)[:RS] == b"m" * RS
    assert client.read_range(vol, 0, 20, overlay=True) == b"m" * 10 + b"o" * 5 + b"m" * 5
    merged = list(client.read_regions(vol, [(0, 3)], overlay=True))
    assert [r.ok for r in merged] == [True, True, True]
    assert bytes(merged[1].data) == b"p" * RS
    info = client.volume_info(vol)
    assert info["overlay"] == {"regions": 2, "applied_seq": 2} and info["applied_seq"] == 1
    client.drop_overlay(vol)
    assert client.volume_info(vol)["overlay"]["regions"] == 0
    assert client.read_range(vol, 0, 20, overlay=True) == b"m" * 20


def test_records_sent_to_the_wrong_endpoint_are_refused(client: ReplicaClient, vol: str) -> None:
    with pytest.raises(UsageError, match="OVERLAY"):
        client.send_records(vol, write(1, 0, b"a", overlay=True))
    with pytest.raises(UsageError, match="OVERLAY"):
        client.send_records(vol, write(1, 0, b"a"), overlay=True)
    assert client.volume_info(vol)["applied_seq"] == 0


def test_delete_volume(server: ServerProcess, client: ReplicaClient, vol: str) -> None:
    client.delete_volume(vol)
    assert not (server.root / vol).exists()
    assert client.list_volumes() == []


def test_state_survives_a_restart(server: ServerProcess, vol: str) -> None:
    with server.client() as c:
        c.send_records(vol, write(1, 0, b"k" * RS) + write(2, 2 * RS, b"j" * 10))
        c.create_snapshot(vol, "s")
        c.send_records(vol, write(3, 0, b"l" * RS))
    server.stop()
    server.start()
    with server.client() as c:
        info = c.volume_info(vol)
        assert info["applied_seq"] == 3 and info["journal"]["records"] == 3 and info["snapshots"] == ["s"]
        assert c.read_range(vol, 0, 4, snapshot="s") == b"kkkk"
        assert all(r.ok for r in c.read_regions(vol, [(0, 11)]))
        assert c.send_records(vol, write(3, 0, b"l" * RS))["skipped"] == 1


def test_torn_state_is_refused_not_reset(server: ServerProcess, vol: str) -> None:
    with server.client() as c:
        c.send_records(vol, write(1, 0, b"k" * 10))
    server.stop()
    applied = server.root / vol / "applied.json"
    applied.write_bytes(applied.read_bytes()[:20])
    server.start()
    with server.client() as c:
        with pytest.raises(PeerProtocolError, match="refusing state file .*applied.json.*not valid JSON"):
            c.volume_info(vol)
        assert "applied.json" in c.list_volumes()[0]["error"]
    assert len(applied.read_bytes()) == 20  # still torn: nothing was reset


def test_records_header_layout_is_unchanged() -> None:
    header = wire.encode_record_header(wire.KIND_WRITE, 1, 2, 3, 4, b"d" * 32)
    assert len(header) == wire.RECORD_HEADER_SIZE == 76
