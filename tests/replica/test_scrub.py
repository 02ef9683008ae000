"""The replica's own scrub: POST .../verify (a bounded batch) and POST .../scrub (the whole replica).

What is on disk is re-read and re-hashed (never the stored table alone); holes whose digest
is the zeros' slot are not read; regions whose bytes fail their digest are remembered in
scrub.json and listed by GET .../scrub and GET /v1/volumes/{name}.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import blake3
import pytest

from drtool.client import ReplicaClient
from drtool.errors import NotPermitted, PeerAuthError, UsageError, VolumeNotFound
from tests.conftest import corrupt
from tests.replica.conftest import VOLUME_ID, ServerProcess, assert_problem, call, write

RS = 4096
COUNT = 300
SIZE = COUNT * RS - 1000  # partial last region
DATA_REGIONS = [r for r in range(COUNT) if r % 3]


@pytest.fixture
def content(client: ReplicaClient) -> bytearray:
    """Every third region never written (a hole), the rest random."""
    client.ensure_volume("vol", SIZE, RS, VOLUME_ID)
    rng = random.Random(7)
    data = bytearray(SIZE)
    chunks: list[bytes] = []
    for seq, region in enumerate(DATA_REGIONS, 1):
        start = region * RS
        piece = rng.randbytes(min(RS, SIZE - start))
        data[start:start + len(piece)] = piece
        chunks += write(seq, start, piece)
    client.send_records("vol", chunks, complete_through=len(DATA_REGIONS))
    return data


def image(server: ServerProcess) -> Path:
    return server.root / "vol" / "mirror.img"


def whole(client: ReplicaClient, runs, overlay: bool = False, max_bytes: int | None = None) -> tuple[list, int]:
    """Every entry of a verify of ``runs``, batch after batch; (entries, batches)."""
    entries, position, batches = [], 0, 0
    while position is not None:
        answer = client.verify_regions("vol", runs, position, overlay, max_bytes)
        entries += answer["entries"]
        assert answer["next"] is None or answer["next"] > position
        position = answer["next"]
        batches += 1
    return entries, batches


def test_verify_rehashes_the_data_regions_and_skips_the_holes(client, content):
    answer = client.verify_regions("vol", [(0, COUNT)])
    assert answer["next"] is None and answer["bad"] == []
    assert [e["region"] for e in answer["entries"]] == DATA_REGIONS
    assert answer["regions_read"] == len(DATA_REGIONS)
    assert answer["bytes_read"] == sum(min(RS, SIZE - r * RS) for r in DATA_REGIONS)
    for entry in answer["entries"]:
        start = entry["region"] * RS
        assert entry["computed"] == entry["stored"] == blake3.blake3(content[start:start + RS]).hexdigest()
        assert entry["source"] == "mirror"


def test_batches_are_bounded_and_continue_where_they_stopped(client, content):
    entries, batches = whole(client, [(0, COUNT)], max_bytes=10 * RS)
    assert batches >= len(DATA_REGIONS) // 10 and [e["region"] for e in entries] == DATA_REGIONS
    part = client.verify_regions("vol", [(5, 3), (100, 2)])
    assert [e["region"] for e in part["entries"]] == [5, 7, 100, 101]
    later = client.verify_regions("vol", [(0, COUNT)], 250)
    assert [e["region"] for e in later["entries"]] == [r for r in DATA_REGIONS if r >= 250]


def test_rot_is_found_on_disk_remembered_and_cleared_when_rewritten(client, content, server):
    corrupt(image(server), 10 * RS + 3)
    answer = client.verify_regions("vol", [(0, COUNT)])
    rotten = [e for e in answer["entries"] if e["computed"] != e["stored"]]
    assert [e["region"] for e in rotten] == [10] and answer["bad"] == [[10, 1]]
    assert client.volume_info("vol")["scrub"]["bad_regions"]["mirror"] == [[10, 1]]
    assert client.scrub_status("vol")["bad_count"] == 1
    # A verify of other regions leaves it listed; the record that rewrites it, then a verify, clears it.
    client.verify_regions("vol", [(20, 10)])
    assert client.scrub_status("vol")["bad_regions"]["mirror"] == [[10, 1]]
    client.send_records("vol", write(1000, 10 * RS, content[10 * RS:11 * RS]), complete_through=1000)
    assert client.verify_regions("vol", [(10, 1)])["bad"] == []
    assert client.scrub_status("vol")["bad_count"] == 0


def test_garbage_in_a_hole_is_read_and_is_rot(client, content, server):
    with open(image(server), "r+b") as handle:
        handle.seek(3 * RS + 100)
        handle.write(b"garbage")
    answer = client.verify_regions("vol", [(0, 6)])
    assert [e["region"] for e in answer["entries"]] == [1, 2, 3, 4, 5]
    assert answer["bad"] == [[3, 1]] and answer["entries"][2]["stored"] == blake3.blake3(bytes(RS)).hexdigest()


def test_the_bad_list_survives_a_restart(start_server, tmp_path):
    server = start_server()
    with server.client() as client:
        client.ensure_volume("vol", 8 * RS, RS, VOLUME_ID)
        client.send_records("vol", write(1, 2 * RS, b"x" * RS), complete_through=1)
        corrupt(image(server), 2 * RS)
        assert client.verify_regions("vol", [(0, 8)])["bad"] == [[2, 1]]
    server.stop()
    server.start()
    with server.client() as client:
        assert client.volume_info("vol")["scrub"]["bad_regions"]["mirror"] == [[2, 1]]


def test_the_overlay_replica_is_verified_merged_over_the_mirror(client, content, server):
    overlay = b"o" * RS
    client.send_records("vol", write(2000, 4 * RS, overlay, overlay=True), overlay=True)
    entries, _ = whole(client, [(0, 10)], overlay=True)
    by_region = {e["region"]: e for e in entries}
    assert by_region[4]["source"] == "overlay" and by_region[4]["computed"] == blake3.blake3(overlay).hexdigest()
    assert by_region[5]["source"] == "mirror"
    corrupt(server.root / "vol" / "overlay.img", 4 * RS + 1)
    answer = client.verify_regions("vol", [(0, 10)], overlay=True)
    assert answer["bad"] == [[4, 1]]
    assert client.scrub_status("vol")["bad_regions"] == {"mirror": [], "overlay": [[4, 1]]}


def wait_scrub(client: ReplicaClient, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        described = client.scrub_status("vol")
        if described["last"] and described["last"]["state"] != "running":
            return described
        assert time.monotonic() < deadline, described
        time.sleep(0.05)


def test_a_whole_scrub_runs_in_the_background_and_reports_its_progress(client, content, server):
    corrupt(image(server), 20 * RS)
    client.send_records("vol", write(3000, 50 * RS, b"v" * RS, overlay=True), overlay=True)
    corrupt(server.root / "vol" / "overlay.img", 50 * RS + 7)
    started = call(server, "POST", "/v1/volumes/vol/scrub", json={"rate": 64 * RS})
    assert started.status_code == 202, started.text
    assert started.json()["last"]["state"] == "running"
    again = call(server, "POST", "/v1/volumes/vol/scrub", json={})
    assert again.status_code == 200 and again.json()["last"]["state"] == "running"  # one at a time
    described = wait_scrub(client)
    last = described["last"]
    assert last["state"] == "done" and last["done_regions"] == last["total_regions"] == 2 * COUNT
    assert last["bad_found"] == 2 and last["regions_read"] == len(DATA_REGIONS) + 1
    assert described["bad_regions"] == {"mirror": [[20, 1]], "overlay": [[50, 1]]}
    info = client.volume_info("vol")["scrub"]
    assert info["bad_count"] == 2 and info["last"]["state"] == "done"
    # The throttle held: ~1.2 MB at 256 KiB/s takes seconds.
    assert last["finished"] - last["started"] >= 2.0
    assert client.scrub("vol")["last"]["state"] == "running"  # a finished one starts again
    wait_scrub(client)


def test_bad_requests(client, content, server):
    for body, detail in (({}, "runs"), ({"runs": []}, "runs"), ({"runs": [[0]]}, "pair"),
                         ({"runs": [[0, COUNT + 1]]}, ""), ({"runs": [[-1, 2]]}, ""),
                         ({"runs": [[True, 2]]}, "pair"), ({"runs": [[0, 1]], "from": -1}, "from"),
                         ({"runs": [[0, 1]], "overlay": "yes"}, "overlay"),
                         ({"runs": [[0, 1]], "max_bytes": 0}, "max_bytes"),
                         ({"runs": [[0, 1]] * 65537}, "at most")):
        assert_problem(call(server, "POST", "/v1/volumes/vol/verify", json=body), 400, detail)
    assert_problem(call(server, "POST", "/v1/volumes/vol/scrub", json={"rate": "fast"}), 400, "rate")
    assert_problem(call(server, "POST", "/v1/volumes/vol/scrub", json={"restart": 1}), 400, "restart")
    assert_problem(call(server, "GET", "/v1/volumes/vol/verify"), 405)
    assert_problem(call(server, "POST", "/v1/volumes/vol/verify", token=False, json={"runs": [[0, 1]]}), 401)
    with pytest.raises(VolumeNotFound):
        client.verify_regions("nosuch", [(0, 1)])
    with pytest.raises(UsageError):
        client.verify_regions("vol", [(COUNT, 1)])
    with server.client(token="wrong") as wrong, pytest.raises(PeerAuthError):
        wrong.verify_regions("vol", [(0, 1)])


def test_a_promoted_replica_is_not_verified_here(client, content):
    client.promote("vol", force=True)
    with pytest.raises(NotPermitted):
        client.verify_regions("vol", [(0, 1)])
    with pytest.raises(NotPermitted):
        client.scrub("vol")


def test_a_torn_scrub_file_is_described_and_never_written_over(start_server):
    server = start_server()
    with server.client() as client:
        client.ensure_volume("vol", 8 * RS, RS, VOLUME_ID)
        client.send_records("vol", write(1, 2 * RS, b"x" * RS), complete_through=1)
        corrupt(image(server), 2 * RS)
        assert client.verify_regions("vol", [(0, 8)])["bad"] == [[2, 1]]
    server.stop()
    path = server.root / "vol" / "scrub.json"
    path.write_text(path.read_text()[:40])
    server.start()
    with server.client() as client:
        info = client.volume_info("vol")  # the replica itself is still served
        assert "scrub.json" in info["scrub"]["error"] and info["applied_seq"] == 1
        response = call(server, "POST", "/v1/volumes/vol/verify", json={"runs": [[0, 8]]})
        assert_problem(response, 500, "remove it")
    assert path.read_text().startswith(path.read_text()[:40]) and len(path.read_text()) == 40
