"""Release, promote (merge and fence) and their refusals, across restarts, on a real server."""

from __future__ import annotations

import blake3
import pytest

from drtool.client import ReplicaClient
from drtool.errors import Conflict, NotPermitted
from drtool.replica.store import describe_root
from tests.replica.conftest import VOLUME_ID, ServerProcess, assert_problem, call, write, zero

RS = 65536
COUNT = 8
SIZE = COUNT * RS


@pytest.fixture
def vol(client: ReplicaClient) -> str:
    client.ensure_volume("vol", SIZE, RS, VOLUME_ID)
    return "vol"


def region_bytes(fill: int) -> bytes:
    return bytes([fill]) * RS


def test_release_checks_the_watermark_and_is_idempotent(client: ReplicaClient, vol: str) -> None:
    client.send_records(vol, write(1, 0, b"a" * RS, era=3) + write(2, RS, b"b" * 10, era=3),
                        complete_through=2)
    with pytest.raises(Conflict, match="replica is at 2, primary released at 5"):
        client.release(vol, 3, 5)
    info = client.release(vol, 3, 2)
    assert info["state"] == "released" and info["primary"]["seq"] == 2 and info["primary"]["era"] == 3
    assert client.release(vol, 3, 2)["primary"] == info["primary"]  # same answer, same time
    with pytest.raises(Conflict, match="already released at seq 2"):
        client.release(vol, 3, 1)
    assert client.volume_info(vol)["max_era"] == 3


def test_release_counts_overlay_records_in_the_one_sequence_space(client: ReplicaClient, vol: str) -> None:
    client.send_records(vol, write(1, 0, b"m" * RS), complete_through=1)
    client.send_records(vol, write(2, RS, b"o" * RS, overlay=True), complete_through=2, overlay=True)
    assert client.release(vol, 1, 2)["state"] == "released"


def test_released_replica_refuses_new_records_until_cancelled(server: ServerProcess, client: ReplicaClient,
                                                              vol: str) -> None:
    batch = write(1, 0, b"a" * RS)
    client.send_records(vol, batch, complete_through=1)
    client.release(vol, 1, 1)
    assert client.send_records(vol, batch) == {"applied_seq": 1, "applied": 0, "skipped": 1}  # a resend
    with pytest.raises(NotPermitted, match="released by its primary at seq 1"):
        client.send_records(vol, write(2, RS, b"b" * RS))
    assert_problem(call(server, "POST", "/v1/volumes/vol/records", data=b"".join(write(2, RS, b"b")),
                        headers={"Content-Type": "application/x-drtool-records"}),
                   409, title="volume vol was released by its primary", kind=":released")
    assert client.cancel_release(vol)["state"] == "replica"
    assert client.send_records(vol, write(2, RS, b"b" * RS))["applied_seq"] == 2


def test_promote_needs_a_release_or_force(server: ServerProcess, client: ReplicaClient, vol: str) -> None:
    client.send_records(vol, write(1, 0, b"a" * RS, era=4) + write(2, 5 * RS, b"z" * 100, era=5))
    with pytest.raises(NotPermitted, match=r"the primary still claims volume vol: last record applied at "
                                           r"seq 2 \(.*\); use force for a takeover"):
        client.promote(vol)
    assert_problem(call(server, "POST", "/v1/volumes/vol/promote", json={"force": False}), 409,
                   title="the primary still claims volume vol", kind=":not-released")
    info = client.promote(vol, force=True)
    assert info["forced"] is True and info["released"] is None
    assert info["image"] == str(server.root / "vol" / "mirror.img")
    assert (info["size"], info["region_size"], info["volume_id"]) == (SIZE, RS, VOLUME_ID)
    assert info["applied_seq"] == 2 and info["max_era"] == 5 and info["last_record_at"] > 0
    assert info["overlay_regions_merged"] == 0
    assert client.promote(vol) == info  # idempotent, force or not


def test_promote_merges_the_overlay_replica_and_fences(server: ServerProcess, client: ReplicaClient,
                                                       vol: str) -> None:
    client.send_records(vol, write(1, 0, region_bytes(1)) + write(2, RS, region_bytes(2))
                        + write(3, 2 * RS, region_bytes(3)), complete_through=3)
    client.create_snapshot(vol, "before")
    # The incident: overlay writes to regions 1 (partial: filled from the mirror), 2 (zeroed), 4 (whole).
    client.send_records(vol, write(4, RS + 10, b"p" * 20, overlay=True) + write(5, 4 * RS, region_bytes(9),
                        overlay=True), complete_through=5, overlay=True)
    client.send_records(vol, zero(6, 2 * RS, RS, overlay=True), complete_through=6, overlay=True)
    expect = bytearray(SIZE)
    expect[0:RS] = region_bytes(1)
    expect[RS:2 * RS] = region_bytes(2)
    expect[RS + 10:RS + 30] = b"p" * 20
    expect[4 * RS:5 * RS] = region_bytes(9)
    client.release(vol, 1, 6)
    info = client.promote(vol)
    assert info["forced"] is False and info["released"]["seq"] == 6 and info["overlay_regions_merged"] == 3
    assert info["applied_seq"] == 6
    assert (server.root / "vol" / "mirror.img").read_bytes() == expect
    entries = list(client.manifest(vol, COUNT))
    assert entries == [(r, blake3.blake3(bytes(expect[r * RS:(r + 1) * RS])).digest()) for r in range(COUNT)
                       if any(expect[r * RS:(r + 1) * RS])]
    described = client.volume_info(vol)
    assert described["state"] == "promoted" and described["promoted"]["applied_seq"] == 6
    assert described["overlay"]["regions"] == 0  # merged, then emptied
    # Fenced: no records (mirror or overlay), no release, no verified reads; plain reads still work.
    for path, overlay in (("records", False), ("overlay/records", True)):
        assert_problem(call(server, "POST", f"/v1/volumes/vol/{path}", data=b"".join(write(7, 0, b"x",
                            overlay=overlay)), headers={"Content-Type": "application/x-drtool-records"}),
                       409, title="volume vol was promoted on this host", kind=":promoted")
    with pytest.raises(NotPermitted, match="promoted on this host"):
        client.send_records(vol, write(1, 0, region_bytes(1)))  # even a resend: the image is not ours
    with pytest.raises(NotPermitted, match="promoted on this host"):
        client.release(vol, 1, 6)
    with pytest.raises(NotPermitted, match="promoted on this host"):
        list(client.read_regions(vol, [(0, 1)]))
    with pytest.raises(NotPermitted, match="promoted on this host"):
        client.delete_volume(vol)
    assert client.read_range(vol, RS, 40) == bytes(expect[RS:RS + 40])
    # The snapshot preserved what the merge overwrote (read from disk: snapshot reads are fenced too).
    preserved = (server.root / "vol" / "snapshots" / "before" / "data.img").read_bytes()
    assert preserved[RS:2 * RS] == region_bytes(2) and preserved[2 * RS:3 * RS] == region_bytes(3)


def test_each_state_survives_a_restart(server: ServerProcess, vol: str) -> None:
    with server.client() as c:
        c.send_records(vol, write(1, 0, region_bytes(7), era=2), complete_through=1)
        released = c.release(vol, 2, 1)["primary"]
    server.stop()
    server.start()
    with server.client() as c:
        assert c.volume_info(vol)["state"] == "released" and c.volume_info(vol)["primary"] == released
        with pytest.raises(NotPermitted, match="released"):
            c.send_records(vol, write(2, 0, b"n"))
        promoted = c.promote(vol)
    server.stop()
    [on_disk] = describe_root(str(server.root))
    assert on_disk["state"] == "promoted" and on_disk["primary"] == released
    assert on_disk["last_record_at"] == promoted["last_record_at"] and on_disk["max_era"] == 2
    server.start()
    with server.client() as c:
        info = c.volume_info(vol)
        assert info["state"] == "promoted" and c.promote(vol) == promoted
        with pytest.raises(NotPermitted, match="promoted on this host"):
            c.send_records(vol, write(2, 0, b"n"))
        assert {k: v for k, v in info.items() if k != "journal"} == \
            {k: v for k, v in on_disk.items() if k != "journal"}
