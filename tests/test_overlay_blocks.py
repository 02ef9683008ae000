"""The overlay's block map (issue 12's sub-region tracking): a degraded write of whole 4 KiB
blocks into a region the overlay does not hold goes in without reading the region's base; the
base is read (and verified) only when the region is read or failed back."""

from __future__ import annotations

import blake3
import pytest

from drtool import api
from drtool.engine import Engine
from drtool.errors import Conflict, DataUnavailable
from drtool.replication import Replicator
from drtool.wire import FLAG_OVERLAY, KIND_BASE, encode_record, encode_record_header
from tests.conftest import corrupt, make_image

RS = 65536
REGIONS = 24
SIZE = REGIONS * RS


@pytest.fixture
def degraded(tmp_path, state_root, replica_server):
    """A protected volume whose regions 3 and 9 rotted, recovered from the mirror."""
    path = tmp_path / "dev.img"
    data = bytearray(make_image(path, SIZE, seed=12))
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    for region in (3, 9):
        corrupt(path, region * RS + 11, b"\xde\xad")
    api.scrub_volume("vol")
    api.recover("vol")
    return path, data


def test_block_writes_read_no_base_and_reads_merge_it(degraded, replica_server):
    path, data = degraded
    writes = [(3 * RS + 4096, b"a" * 4096), (5 * RS, b"b" * 8192), (3 * RS + 12 * 4096, b"c" * 4096),
              (5 * RS + 60 * 1024, b"d" * 4096)]
    with Engine.open(None, "vol") as engine:
        for offset, chunk in writes:
            engine.write(offset, chunk)
            data[offset:offset + len(chunk)] = chunk
        # Nothing was fetched for the bad region 3, and the regions' digests are still their bases'.
        assert engine.record.recovery.fetched_regions == 0
        assert engine.volume.overlay_blocks.held(3) == [1, 12]
        assert engine.volume.overlay_blocks.held(5) == [0, 1, 15]
        # Each record holds the blocks written, after one base record per region.
        pending = [(e.header.kind, e.header.length) for e in engine.log.pending() if e.header.overlay]
        assert pending == [(KIND_BASE, RS), (1, 4096), (KIND_BASE, RS), (1, 8192), (1, 4096), (1, 4096)]
        # A read merges: region 3's base from the replica, region 5's from the device.
        assert bytes(engine.read(0, SIZE)) == bytes(data)
        assert bytes(engine.read(3 * RS + 4000, 200)) == bytes(data[3 * RS + 4000:3 * RS + 4200])
        Replicator(engine).ship()
    overlay = replica_server.client().read_range("vol", 0, SIZE, overlay=True)
    for region in (3, 5):
        assert overlay[region * RS:(region + 1) * RS] == bytes(data[region * RS:(region + 1) * RS])


def test_a_damaged_overlay_block_is_never_served(degraded):
    path, data = degraded
    with Engine.open(None, "vol") as engine:
        engine.write(6 * RS + 8192, b"z" * 4096)
        engine.sync_all()
        overlay = engine.volume.paths.overlay
    corrupt(overlay, 6 * RS + 8192 + 100, b"\x00\x01")
    with Engine.open(None, "vol") as engine:
        with pytest.raises(DataUnavailable, match="block 2 of region 6"):
            engine.read(6 * RS, RS)
        assert bytes(engine.read(7 * RS, RS)) == bytes(data[7 * RS:8 * RS])  # the other regions serve


def test_a_crash_between_the_block_write_and_the_map_commit_replays_from_the_log(degraded, state_root):
    path, data = degraded
    with Engine.open(None, "vol") as engine:
        engine.write(7 * RS + 4096, b"first" * 800 + bytes(96))
        engine.save()  # a checkpoint covers the first block write
        engine.write(7 * RS + 40960, b"y" * 4096)
        engine.write(9 * RS, b"q" * 4096)  # the bad region 9: its base is on the replica
        engine.write(7 * RS + 40960 + 10, b"tiny")  # part of a block: that block is read and merged
        engine.flush()
        overlay_path = engine.volume.paths.overlay
        engine.volume.lock.release()  # kill -9: no checkpoint, the maps on disk know the first only
        engine.volume.lock = None
        engine.log.close()
    data[7 * RS + 4096:7 * RS + 8192] = b"first" * 800 + bytes(96)
    data[7 * RS + 40960:7 * RS + 45056] = b"y" * 4096
    data[9 * RS:9 * RS + 4096] = b"q" * 4096
    data[7 * RS + 40970:7 * RS + 40974] = b"tiny"
    with open(overlay_path, "r+b") as handle:  # the overlay lost what no checkpoint had synced
        handle.seek(9 * RS)
        handle.write(bytes(4096))
    with Engine.open(None, "vol") as engine:
        assert engine.volume.overlay_blocks.held(7) == [1, 10]
        assert engine.volume.overlay_blocks.held(9) == [0]
        assert bytes(engine.read(0, SIZE)) == bytes(data)


def test_failback_completes_partial_regions(degraded, tmp_path):
    path, data = degraded
    with Engine.open(None, "vol") as engine:
        for region in (3, 4, 9):
            engine.write(region * RS + 2 * 4096, bytes([region]) * 4096)
            data[region * RS + 2 * 4096:region * RS + 3 * 4096] = bytes([region]) * 4096
    api.failback("vol")
    status = api.status("vol", probe_peer=False)[0]
    assert status["mode"] == "normal"
    assert api.read("vol", 0, SIZE) == bytes(data)
    assert path.read_bytes() == bytes(data)  # the device holds every region whole again
    api.replicate("vol", wait=True)
    assert api.verify_volume("vol")["result"] == "equal"  # the mirror got the completed regions


def test_the_overlay_replica_refuses_a_base_its_mirror_does_not_hold(degraded, replica_server):
    client = replica_server.client()
    with Engine.open(None, "vol") as engine:
        seq = engine.log.next_seq + 100
        era = engine.record.era
    wrong = blake3.blake3(b"not the mirror's region").digest()
    chunks = [encode_record_header(KIND_BASE, seq, 11 * RS, RS, era, wrong, FLAG_OVERLAY),
              *encode_record(1, seq + 1, 11 * RS + 4096, b"w" * 4096, era=era, flags=FLAG_OVERLAY)]
    with pytest.raises(Conflict, match="not the base"):
        client.send_records("vol", chunks, overlay=True)
    mirror = client.read_range("vol", 11 * RS, RS)
    right = blake3.blake3(mirror).digest()
    chunks[0] = encode_record_header(KIND_BASE, seq, 11 * RS, RS, era, right, FLAG_OVERLAY)
    client.send_records("vol", chunks, overlay=True)
    overlay = client.read_range("vol", 11 * RS, RS, overlay=True)
    assert overlay == mirror[:4096] + b"w" * 4096 + mirror[8192:]


def test_verify_compares_a_partial_regions_merged_content(degraded, replica_server):
    path, data = degraded
    with Engine.open(None, "vol") as engine:
        for region in (3, 5):
            engine.write(region * RS + 4096, b"v" * 4096)
        Replicator(engine).ship()
    report = api.verify_volume("vol", cursor=False)
    assert report["source"] == "overlay" and report["result"] == "equal", report
    with Engine.open(None, "vol") as engine:  # verify changed nothing: the regions are still partial
        assert engine.volume.overlay_blocks.held(3) == [1] and engine.volume.overlay_blocks.held(5) == [1]
    # The overlay replica's region 5 rots: its merged digest no longer matches.
    [replica_image] = replica_server.root.rglob("overlay.img")
    corrupt(replica_image, 5 * RS + 4096 + 7, b"\x00\xff")
    assert api.verify_volume("vol", cursor=False)["result"] != "equal"
