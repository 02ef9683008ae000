"""Reads: batched verified frames, plain ranges (curl), snapshots, the change log."""

from __future__ import annotations

import random
import subprocess

import blake3
import pytest

from drtool import wire
from drtool.client import ReplicaClient
from drtool.errors import DataUnavailable, UsageError
from tests.conftest import corrupt, require_tool
from tests.replica.conftest import VOLUME_ID, ServerProcess, call, write, zero

RS = 4096
COUNT = 300
SIZE = COUNT * RS - 1000  # partial last region


@pytest.fixture
def content(client: ReplicaClient) -> bytearray:
    """A volume whose every third region is zero, the rest random."""
    client.ensure_volume("vol", SIZE, RS, VOLUME_ID)
    rng = random.Random(3)
    data = bytearray(SIZE)
    chunks: list[bytes] = []
    for region in range(COUNT):
        if region % 3 == 0:
            continue
        start = region * RS
        piece = rng.randbytes(min(RS, SIZE - start))
        data[start:start + len(piece)] = piece
        chunks += write(region + 1, start, piece)
    client.send_records("vol", chunks, complete_through=COUNT)
    return data


def digests(data: bytes | bytearray) -> dict[int, bytes]:
    return {r: blake3.blake3(bytes(data[r * RS:(r + 1) * RS])).digest() for r in range(COUNT)}


def test_batched_read_of_many_runs_verifies(client: ReplicaClient, content: bytearray) -> None:
    expected = digests(content)
    runs = [(0, 10), (20, 1), (50, 100), (299, 1), (5, 3)]  # request order is kept, even unsorted
    wanted = [r for a, n in runs for r in range(a, a + n)]
    results = list(client.read_regions("vol", runs, expected=expected.__getitem__))
    assert [r.region for r in results] == wanted
    for result in results:
        assert result.ok, result.reason
        assert bytes(result.data) == content[result.region * RS:(result.region + 1) * RS]
        assert result.digest == expected[result.region]


def test_expected_digest_mismatch_is_not_ok(client: ReplicaClient, content: bytearray) -> None:
    results = list(client.read_regions("vol", [(0, 3)], expected=lambda r: b"\1" * 32 if r == 1 else None))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].data is None and "other data than expected" in (results[1].reason or "")


def test_corrupted_mirror_byte_fails_exactly_that_region(server: ServerProcess, client: ReplicaClient,
                                                         content: bytearray) -> None:
    corrupt(server.root / "vol" / "mirror.img", 41 * RS + 17)
    results = list(client.read_regions("vol", [(0, COUNT)]))
    assert [r.region for r in results if not r.ok] == [41]
    assert "damaged on the secondary" in (results[41].reason or "")


def test_runs_outside_the_volume_are_refused(client: ReplicaClient, content: bytearray) -> None:
    with pytest.raises(UsageError, match="outside the volume"):
        list(client.read_regions("vol", [(COUNT - 1, 2)]))
    assert all(r.ok for r in client.read_regions("vol", [(COUNT - 1, 1)]))


def test_curl_range_reads(server: ServerProcess, content: bytearray) -> None:
    require_tool("curl")
    url = f"{server.url}/v1/volumes/vol/data"
    auth = ["-H", f"Authorization: Bearer {server.token}"]
    got = subprocess.run(["curl", "-sf", *auth, "-r", "0-1048575", url], capture_output=True, check=True)
    assert got.stdout == content[:1048576]
    got = subprocess.run(["curl", "-sf", *auth, "-r", f"{SIZE - 10}-", url], capture_output=True, check=True)
    assert got.stdout == content[-10:]
    got = subprocess.run(["curl", "-sf", *auth, url], capture_output=True, check=True)
    assert got.stdout == content
    past = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *auth, "-r",
                           f"{SIZE}-{SIZE + 10}", url], capture_output=True, check=True)
    assert past.stdout == b"416"


def test_snapshot_reads_do_not_see_later_writes(client: ReplicaClient, content: bytearray) -> None:
    client.create_snapshot("vol", "before")
    client.create_snapshot("vol", "other")
    client.send_records("vol", write(COUNT + 1, RS, b"n" * RS) + zero(COUNT + 2, 2 * RS, RS)
                        + write(COUNT + 3, 3 * RS + 5, b"t" * 7))
    assert client.read_range("vol", 0, 4 * RS, snapshot="before") == content[:4 * RS]
    now = client.read_range("vol", 0, 4 * RS)
    assert now[RS:2 * RS] == b"n" * RS and now[2 * RS:3 * RS] == bytes(RS)
    snap = list(client.read_regions("vol", [(0, 5)], snapshot="before", expected=digests(content).get))
    assert all(r.ok for r in snap)
    assert {s["name"]: s["preserved_regions"] for s in client.list_snapshots("vol")} == {"before": 3, "other": 3}
    client.delete_snapshot("vol", "before")
    assert [s["name"] for s in client.list_snapshots("vol")] == ["other"]
    with pytest.raises(UsageError, match="no snapshot before"):
        client.read_range("vol", 0, 10, snapshot="before")


def test_changes_after_seq_for_given_regions(client: ReplicaClient, content: bytearray) -> None:
    c = COUNT
    client.send_records("vol", write(c + 1, RS + 1, b"a" * 10) + write(c + 2, 2 * RS, b"b" * RS)
                        + write(c + 3, RS + 1, b"c" * 5) + write(c + 4, 7 * RS + 1, b"d" * 3))
    got = list(client.changes("vol", c + 1, [(1, 2)]))
    assert [(h.seq, h.offset, data) for h, data in got] == [(c + 2, 2 * RS, b"b" * RS), (c + 3, RS + 1, b"c" * 5)]
    everything = [h.seq for h, _ in client.changes("vol", 0, [(0, COUNT)])]
    assert everything == [r + 1 for r in range(COUNT) if r % 3] + [c + 1, c + 2, c + 3, c + 4]


def test_changes_older_than_the_journal_are_gone(start_server) -> None:  # type: ignore[no-untyped-def]
    big = 1 << 20  # with a 1-byte limit, each 1 MiB record fills a journal segment of its own
    server = start_server(limits={"journal_limit": 1})
    with server.client() as c:
        c.ensure_volume("vol", 4 * big, big, VOLUME_ID)
        for seq in range(1, 5):
            c.send_records("vol", write(seq, 0, bytes([seq]) * big))
        assert c.volume_info("vol")["journal"]["base_seq"] == 3
        with pytest.raises(DataUnavailable, match="no longer reaches back"):
            list(c.changes("vol", 2, [(0, 1)]))
        assert [h.seq for h, _ in c.changes("vol", 3, [(0, 1)])] == [4]


def test_a_zero_journal_limit_turns_the_journal_off_and_back_on(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(limits={"journal_limit": 0})
    with server.client() as c:
        c.ensure_volume("vol", SIZE, RS, VOLUME_ID)
        c.send_records("vol", write(1, 0, b"a" * RS) + write(2, RS, b"b"))
        assert c.volume_info("vol")["journal"]["enabled"] is False
        with pytest.raises(DataUnavailable, match="keeps no journal"):
            list(c.changes("vol", 0, [(0, 2)]))
    server.stop()
    again = start_server(root=server.root)  # the default limit: on again, from what was applied
    with again.client() as c:
        journal = c.volume_info("vol")["journal"]
        assert journal["enabled"] is True and journal["base_seq"] == 2 and journal["records"] == 0
        c.send_records("vol", write(3, 0, b"c"))
        assert [h.seq for h, _ in c.changes("vol", 2, [(0, 2)])] == [3]
        with pytest.raises(DataUnavailable, match="no longer reaches back"):
            list(c.changes("vol", 1, [(0, 2)]))


def test_frames_layout() -> None:
    frame = wire.encode_frame_header(wire.FRAME_DATA, 3, 10, b"x" * 32)
    assert wire.decode_frame_header(frame).region == 3


def test_one_kept_alive_connection_serves_every_call(server: ServerProcess, client: ReplicaClient,
                                                     content: bytearray) -> None:
    client.volume_info("vol")
    list(client.read_regions("vol", [(0, 20)]))
    client.read_range("vol", 0, 100)
    list(client.changes("vol", 0, [(1, 1)]))
    client.volume_info("vol")
    peers = {line.split()[1] for line in server.log.read_text().splitlines() if '"' in line and "/v1/" in line}
    assert len(peers) == 1, peers


def _frames_of(server: ServerProcess, body: dict) -> list[tuple[int, int, bytes]]:
    """A raw batched read (no ReplicaClient): (region, frame kind, bytes) per region."""
    response = call(server, "POST", "/v1/volumes/vol/read", json=body)
    assert response.status_code == 200 and len(response.content) == int(response.headers["Content-Length"])
    view, out = memoryview(response.content), []
    while True:
        header = wire.decode_frame_header(view[:wire.FRAME_HEADER_SIZE])
        payload = view[wire.FRAME_HEADER_SIZE:wire.FRAME_HEADER_SIZE + header.payload_length]
        view = view[wire.FRAME_HEADER_SIZE + header.payload_length:]
        if header.kind == wire.FRAME_END:
            return out
        if header.kind == wire.FRAME_RUN:
            length, digests, data = wire.decode_run(header, payload)
            out += [(header.region + i, header.kind, bytes(data[i * length:(i + 1) * length]))
                    for i in range(len(digests) // 32)]
        else:
            out.append((header.region, header.kind, bytes(payload)))


def test_run_frames_carry_the_same_regions_as_a_frame_per_region(server: ServerProcess, content: bytearray) -> None:
    runs = [[0, 150], [149, 151], [7, 1]]
    single = _frames_of(server, {"runs": runs})
    batched = _frames_of(server, {"runs": runs, "frames": "runs"})
    assert {kind for _, kind, _ in single} == {wire.FRAME_DATA, wire.FRAME_ZERO}  # what an older client reads
    assert wire.FRAME_RUN in {kind for _, kind, _ in batched}
    assert [(r, data) for r, _, data in batched] == [(r, data) for r, _, data in single]
    assert [r for r, _, _ in batched] == [r for a, n in runs for r in range(a, a + n)]
    for region, kind, data in batched:
        if kind != wire.FRAME_ZERO:
            assert data == content[region * RS:(region + 1) * RS]
    response = call(server, "POST", "/v1/volumes/vol/read", json={"runs": runs, "frames": "bulk"})
    assert response.status_code == 400 and '"frames" must be' in response.json()["detail"]


def test_a_region_the_replicas_scrub_found_damaged_is_not_sent(server: ServerProcess, client: ReplicaClient,
                                                              content: bytearray) -> None:
    corrupt(server.root / "vol" / "mirror.img", 41 * RS + 17)
    position = 0
    while position is not None:
        position = client.verify_regions("vol", [(0, COUNT)], position)["next"]
    assert client.volume_info("vol")["scrub"]["bad_regions"]["mirror"] == [[41, 1]]
    results = list(client.read_regions("vol", [(40, 3)]))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].data is None and "found by the replica's scrub" in (results[1].reason or "")
    assert [bytes(results[i].data) for i in (0, 2)] == [content[40 * RS:41 * RS], content[42 * RS:43 * RS]]
