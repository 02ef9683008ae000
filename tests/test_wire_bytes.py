"""Each byte crosses the wire once (issue 12): the bytes a Replicator sends are counted against
the bytes written.  A failback's copy of an incident write goes as a header naming what the
overlay replica holds already; a region re-logged whole in bitmap mode goes without the older
records it overwrites."""

from __future__ import annotations

import blake3

from drtool import api
from drtool import failback as failback_mod
from drtool.engine import Engine
from drtool.replication import Replicator
from drtool.wire import RECORD_HEADER_SIZE
from tests.conftest import make_image

RS = 65536
REGIONS = 16
INCIDENT = [3, 4, 9]  # regions written while degraded


def mirror_matches(replica_server, data: bytes) -> None:
    """The replica's mirror holds ``data`` and its digests are those of ``data`` (verified reads)."""
    expected = {r: blake3.blake3(data[r * RS:(r + 1) * RS]).digest() for r in range(REGIONS)}
    with replica_server.client() as client:
        results = list(client.read_regions("vol", [(0, REGIONS)], expected=expected.get))
    assert all(r.ok for r in results), [r.region for r in results if not r.ok]
    assert b"".join(bytes(r.data) for r in results) == data


def degraded_writes(tmp_path, replica_server) -> bytearray:
    """A protected volume, recovered, with INCIDENT written (shipped to the overlay replica)."""
    path = tmp_path / "dev.img"
    data = bytearray(make_image(path, REGIONS * RS, seed=4))
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    api.recover("vol")
    with Engine.open(None, "vol") as engine:
        replicator = Replicator(engine)
        for region in INCIDENT:
            engine.write(region * RS, bytes([region]) * RS)
            data[region * RS:(region + 1) * RS] = bytes([region]) * RS
        replicator.ship()
        assert replicator.shipped_bytes == len(INCIDENT) * (RS + RECORD_HEADER_SIZE)  # once, to the overlay
    return data


def test_failback_ships_incident_writes_as_headers_only(tmp_path, state_root, replica_server):
    data = degraded_writes(tmp_path, replica_server)
    with Engine.open(None, "vol") as engine:
        assert failback_mod.failback(engine)["mode"] == "normal"
        replicator = Replicator(engine)
        replicator.ship()
        # The mirror got the incident's regions from the overlay replica: a header each.
        assert replicator.logged_bytes == len(INCIDENT) * (RS + RECORD_HEADER_SIZE)
        assert replicator.shipped_bytes == len(INCIDENT) * RECORD_HEADER_SIZE
        assert not engine.volume.unreplicated.any()
    mirror_matches(replica_server, bytes(data))
    with replica_server.client() as client:
        assert client.volume_info("vol")["overlay"]["regions"] == 0  # superseded by the mirror's copies


def test_an_overlay_replica_that_lacks_the_bytes_gets_them_sent(tmp_path, state_root, replica_server):
    data = degraded_writes(tmp_path, replica_server)
    with replica_server.client() as client:
        client.drop_overlay("vol")  # the overlay replica no longer holds the incident's writes
    with Engine.open(None, "vol") as engine:
        failback_mod.failback(engine)
        replicator = Replicator(engine)
        replicator.ship()
        assert replicator.shipped_bytes == len(INCIDENT) * (RS + RECORD_HEADER_SIZE)  # refused, then sent
    mirror_matches(replica_server, bytes(data))


def test_a_region_relogged_whole_ships_without_the_records_it_overwrites(tmp_path, state_root, replica_server):
    path = tmp_path / "dev.img"
    data = bytearray(make_image(path, REGIONS * RS, seed=6))
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    with Engine.open(None, "vol") as engine:
        replicator = Replicator(engine)
        engine.write(5 * RS, b"a" * 4096)
        data[5 * RS:5 * RS + 4096] = b"a" * 4096
        replicator.overflow()  # bitmap mode: region 5 ships whole from the volume
        engine.write(5 * RS + 8192, b"b" * 4096)  # logged after the switch: the re-log covers it
        data[5 * RS + 8192:5 * RS + 12288] = b"b" * 4096
        written = 4096
        replicator.ship()
        assert replicator.logged_bytes == (RS + RECORD_HEADER_SIZE) + (written + RECORD_HEADER_SIZE)
        assert replicator.shipped_bytes == RS + RECORD_HEADER_SIZE  # the region, once
        assert not engine.volume.unreplicated.any()
    mirror_matches(replica_server, bytes(data))


def test_degraded_partial_writes_of_one_region_all_reach_the_overlay_replica(tmp_path, state_root,
                                                                             replica_server):
    # Partial writes while degraded ship their own bytes (a patch, or a partial record), never
    # the whole region, and none of them is taken for a record that makes the others moot.
    path = tmp_path / "dev.img"
    data = bytearray(make_image(path, REGIONS * RS, seed=8))
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    api.recover("vol")
    with Engine.open(None, "vol") as engine:
        replicator = Replicator(engine)
        for offset, fill in ((7 * RS + 4096, b"p"), (7 * RS + 20480, b"q"), (8 * RS, b"r")):
            engine.write(offset, fill * 4096)
            data[offset:offset + 4096] = fill * 4096
        replicator.ship()
        # the written bytes, once, and one base record per region (issue 12's sub-region tracking)
        assert replicator.shipped_bytes == 3 * (4096 + RECORD_HEADER_SIZE) + 2 * RECORD_HEADER_SIZE
    with replica_server.client() as client:
        assert client.read_range("vol", 0, REGIONS * RS, overlay=True) == bytes(data)
