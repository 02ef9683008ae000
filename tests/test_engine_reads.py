"""Reads through the engine with block digests (issue 12): a small read verifies the 4 KiB
blocks it returns, against digests remembered from a whole verified region; every change of a
region's digest leaves none of its old block digests usable."""

import subprocess
import sys
import textwrap

import pytest

from drtool import api
from drtool.engine import Engine
from drtool.engine.changes import DEVICE, RegionChange
from drtool.errors import DataUnavailable
from drtool.storage.maps import BLOCK_SIZE, DIGESTS_PER_PAGE, block_digests, digest
from tests.conftest import corrupt, make_image

RS = 65536
REGIONS = 24
SIZE = REGIONS * RS - 1000  # a partial last region, its last block short


@pytest.fixture
def volume(tmp_path, state_root):
    path = tmp_path / "dev.img"
    data = bytearray(make_image(path, SIZE, seed=3, sparse_every=6))
    api.init_volume("vol", str(path), "64K")
    return path, data


def known(engine: Engine, region: int) -> bool:
    return engine.volume.manifest.blocks.known(region)


def test_small_reads_remember_block_digests_and_whole_reads_write_none(volume):
    path, data = volume
    with Engine.open(None, "vol") as engine:
        assert bytes(engine.read(0, 8 * RS)) == bytes(data[:8 * RS])  # whole regions only
        assert engine.volume.dirty_bytes == 0 and not known(engine, 3)
        assert bytes(engine.read(3 * RS + 5000, 100)) == bytes(data[3 * RS + 5000:3 * RS + 5100])
        assert known(engine, 3)
    with Engine.open(None, "vol") as engine:  # kept on disk with the maps
        assert known(engine, 3) and not known(engine, 4)


@pytest.mark.parametrize("offset,length", [(3 * RS + 4096, 4096), (3 * RS + 100, 9000), (2 * RS + 60000, 10000),
                                           (SIZE - 700, 700), (SIZE - 3 * RS - 50, 3 * RS + 50)])
def test_reads_of_known_blocks_return_the_device_bytes(volume, offset, length):
    _, data = volume
    with Engine.open(None, "vol") as engine:
        for region in range(REGIONS):  # every region's block digests known first
            engine.read(region * RS, 1)
        assert bytes(engine.read(offset, length)) == bytes(data[offset:offset + length])


def test_a_corrupted_block_is_found_by_a_small_read_of_it(volume):
    path, data = volume
    with Engine.open(None, "vol") as engine:
        engine.read(3 * RS, 4096)
        assert known(engine, 3)
    corrupt(path, 3 * RS + 5 * BLOCK_SIZE + 7)
    with Engine.open(None, "vol") as engine:
        # Another block of the region verifies by itself: served, nothing marked.
        assert bytes(engine.read(3 * RS + 2 * BLOCK_SIZE, 4096)) == bytes(data[3 * RS + 8192:3 * RS + 12288])
        assert not engine.volume.bad.any()
        with pytest.raises(DataUnavailable, match=r"regions \[\(3, 1\)\] are bad"):
            engine.read(3 * RS + 5 * BLOCK_SIZE, 512)
        assert engine.volume.bad.runs() == [(3, 1)]


def test_a_corrupted_block_of_a_protected_volume_is_served_from_the_replica(volume, replica_server):
    path, data = volume
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    with Engine.open(None, "vol") as engine:
        engine.read(9 * RS, 4096)
    corrupt(path, 9 * RS + 9 * BLOCK_SIZE, b"\x00\x01")
    with Engine.open(None, "vol") as engine:
        assert bytes(engine.read(9 * RS + 9 * BLOCK_SIZE, 4096)) == bytes(data[9 * RS + 9 * 4096:9 * RS + 10 * 4096])
        assert engine.volume.bad.runs() == [(9, 1)] and engine.mode == "degraded"


def test_an_all_zero_region_checks_its_blocks_against_zeros(volume):
    path, data = volume
    zero = next(r for r in range(REGIONS - 1) if data[r * RS:(r + 1) * RS] == bytes(RS))
    with Engine.open(None, "vol") as engine:
        assert bytes(engine.read(zero * RS + 4096, 4096)) == bytes(4096)
        assert not known(engine, zero) and engine.volume.dirty_bytes == 0  # nothing to remember
    corrupt(path, zero * RS + 4096 + 10)
    with Engine.open(None, "vol") as engine:
        with pytest.raises(DataUnavailable):
            engine.read(zero * RS + 4096, 4096)


def test_a_write_invalidates_block_digests_and_a_read_remembers_new_ones(volume):
    _, data = volume
    with Engine.open(None, "vol") as engine:
        engine.read(7 * RS, 4096)
        before = engine.volume.manifest.blocks.get(7, 0, 16)
        engine.write(7 * RS + 100, b"new bytes")
        data[7 * RS + 100:7 * RS + 109] = b"new bytes"
        assert not known(engine, 7)
        assert bytes(engine.read(7 * RS, 4096)) == bytes(data[7 * RS:7 * RS + 4096])
        after = engine.volume.manifest.blocks.get(7, 0, 16)
        assert after is not None and after[1:] != before[1:]  # keyed by the new region digest


def test_the_commit_routine_keeps_block_digests_a_writer_supplies(volume):
    _, data = volume
    content = bytes(range(256)) * (RS // 256)
    with Engine.open(None, "vol") as engine:
        region_digest = digest(content)
        engine.commit_region(RegionChange(5, 5 * RS, RS, content, region_digest, None, DEVICE,
                                          blocks=block_digests(region_digest, content)))
        assert known(engine, 5)
        assert bytes(engine.read(5 * RS + 4096, 4096)) == content[4096:8192]


def test_stale_block_digests_never_verify_other_bytes(volume):
    """Block digests a path forgot to clear (an older drtool that set the digest) are keyed by the
    old region digest: they match nothing of the new content, so the region is checked whole."""
    path, data = volume
    with Engine.open(None, "vol") as engine:
        engine.read(10 * RS, 4096)
        stale = engine.volume.manifest.blocks.get(10, 0, 16)
    new = bytearray(data[10 * RS:11 * RS])
    new[0:4] = b"XXXX"  # block 0 changes, blocks 1.. keep their bytes
    with open(path, "r+b") as handle:
        handle.seek(10 * RS)
        handle.write(new)
    with Engine.open(None, "vol") as engine:
        manifest = engine.volume.manifest
        page, index = divmod(10, DIGESTS_PER_PAGE)
        manifest._pages.page_for_write(manifest._first + page)[index * 32:index * 32 + 32] = digest(new)
        assert manifest.blocks.get(10, 0, 16) == stale  # as an older drtool would leave them
        assert bytes(engine.read(10 * RS + 4096, 4096)) == bytes(new[4096:8192])
        assert not engine.volume.bad.any()
        assert manifest.blocks.get(10, 0, 16) == block_digests(digest(new), new)  # remembered again


def test_crash_replay_clears_the_block_digests_of_replayed_regions(volume, state_root):
    path, data = volume
    with Engine.open(None, "vol") as engine:
        for region in (2, 4, 7):
            engine.read(region * RS, 4096)
    code = textwrap.dedent(f"""
        import os
        from drtool.engine import Engine
        engine = Engine.open({str(state_root)!r}, "vol")
        engine.write(2 * {RS} + 5000, b"p" * 3000)        # a partial record
        engine.write(4 * {RS}, b"w" * {RS})               # a whole region
        engine.flush()
        os._exit(0)  # no checkpoint: the maps on disk still hold the old digests
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    data[2 * RS + 5000:2 * RS + 8000] = b"p" * 3000
    data[4 * RS:5 * RS] = b"w" * RS
    with Engine.open(None, "vol") as engine:
        assert not known(engine, 2) and not known(engine, 4) and known(engine, 7)
        for region in (2, 4, 7):
            assert bytes(engine.read(region * RS + 4096, 8192)) == bytes(data[region * RS + 4096:region * RS + 12288])
        assert not engine.volume.bad.any()


def test_failback_and_copy_on_read_keep_block_digests_that_still_hold(volume, replica_server):
    """Failback copies a region's verified bytes back (same digest): its block digests still hold
    and a small read after it verifies by them; a region written during the incident gets new ones."""
    path, data = volume
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    with Engine.open(None, "vol") as engine:
        for region in (1, 8):
            engine.read(region * RS, 4096)
    corrupt(path, 1 * RS + 3 * BLOCK_SIZE)
    api.scrub_volume("vol")
    api.recover("vol")
    assert api.read("vol", 1 * RS + 3 * BLOCK_SIZE, 4096) == bytes(data[RS + 3 * 4096:RS + 4 * 4096])  # copy-on-read
    api.write("vol", 8 * RS + 10, b"during")
    data[8 * RS + 10:8 * RS + 16] = b"during"
    api.failback("vol", rate="1G")
    assert path.read_bytes() == bytes(data)
    with Engine.open(None, "vol") as engine:
        assert known(engine, 1) and not known(engine, 8)
        assert bytes(engine.read(RS + 3 * BLOCK_SIZE, 4096)) == bytes(data[RS + 3 * 4096:RS + 4 * 4096])
        assert bytes(engine.read(8 * RS, 4096)) == bytes(data[8 * RS:8 * RS + 4096])
        assert known(engine, 8) and not engine.volume.bad.any()


def test_reads_stop_remembering_while_many_map_pages_wait_for_a_checkpoint(volume, monkeypatch):
    """Block digests remembered by reads stay in memory until a checkpoint: past the bound,
    reads keep verifying (whole regions) but remember nothing more."""
    from drtool.engine import changes

    _, data = volume
    monkeypatch.setattr(changes, "BLOCKS_DIRTY_LIMIT", 0)
    with Engine.open(None, "vol") as engine:
        engine.write(1 * RS, b"w")  # one dirty page: over the (patched) bound
        assert engine.volume.dirty_bytes > 0
        assert bytes(engine.read(3 * RS + 4096, 4096)) == bytes(data[3 * RS + 4096:3 * RS + 8192])
        assert not known(engine, 3)
        engine.save()
        monkeypatch.setattr(changes, "BLOCKS_DIRTY_LIMIT", 16 << 20)
        engine.read(3 * RS + 4096, 4096)
        assert known(engine, 3)


def test_a_write_between_a_reads_check_and_its_remembering_leaves_no_block_digests(volume):
    """The block digests a read remembers are keyed with the digest of the bytes it verified:
    if a write changed the region meanwhile, nothing is kept (else the old bytes' digests would
    pass for the new region's)."""
    _, data = volume
    with Engine.open(None, "vol") as engine:
        remember = engine.remember_blocks

        def write_first(region, digest, blocks):
            engine.write(region * RS + 4096, b"raced")
            return remember(region, digest, blocks)

        engine.remember_blocks = write_first
        assert bytes(engine.read(9 * RS + 4096, 4096)) == bytes(data[9 * RS + 4096:9 * RS + 8192])  # before
        assert not known(engine, 9)
        engine.remember_blocks = remember
        data[9 * RS + 4096:9 * RS + 4101] = b"raced"
        assert bytes(engine.read(9 * RS + 4096, 4096)) == bytes(data[9 * RS + 4096:9 * RS + 8192])
        assert known(engine, 9)
