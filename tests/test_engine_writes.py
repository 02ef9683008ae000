"""Writes through the engine: logged, applied, digested; crash replay; the log's torn tail."""

import subprocess
import sys
import textwrap

import pytest

from drtool import api
from drtool.engine import Engine
from drtool.errors import CorruptStateFile
from tests.conftest import make_image

RS = 65536
SIZE = 20 * RS + 3000


@pytest.fixture
def volume(tmp_path, state_root):
    path = tmp_path / "dev.img"
    expected = bytearray(make_image(path, SIZE))
    api.init_volume("vol", str(path), "64K")
    return path, expected


def apply(expected: bytearray, offset: int, data: bytes) -> None:
    expected[offset:offset + len(data)] = data


def test_writes_straddling_regions_and_the_partial_tail(volume):
    path, expected = volume
    writes = [(RS - 10, b"a" * 30), (3 * RS, b"b" * RS), (5 * RS + 7, b"c" * (2 * RS)),
              (SIZE - 100, b"d" * 100), (0, b"e")]
    with Engine.open(None, "vol") as engine:
        for offset, data in writes:
            engine.write(offset, data)
            apply(expected, offset, data)
        assert bytes(engine.read(0, SIZE)) == bytes(expected)
        assert bytes(engine.read(RS - 5, 10)) == bytes(expected[RS - 5:RS + 5])
    assert path.read_bytes() == bytes(expected)
    assert api.scrub_volume("vol")["bad_regions"] == []


def test_write_zeroes_and_trim(volume):
    path, expected = volume
    with Engine.open(None, "vol") as engine:
        engine.write_zeroes(2 * RS, RS)  # whole region: punched
        engine.write_zeroes(4 * RS + 5, 10)  # partial
        engine.trim(6 * RS, RS)
        apply(expected, 2 * RS, bytes(RS))
        apply(expected, 4 * RS + 5, bytes(10))
        apply(expected, 6 * RS, bytes(RS))
        assert bytes(engine.read(0, SIZE)) == bytes(expected)
    assert api.scrub_volume("vol")["bad_regions"] == []


def test_writes_advance_the_era(volume):
    with Engine.open(None, "vol") as engine:
        era = engine.checkpoint()
        engine.write(7 * RS, b"x")
        assert engine.volume.eras[7] == era and engine.volume.eras[6] == 0  # not written since init


def test_crash_after_writes_is_replayed(volume, state_root):
    path, expected = volume
    code = textwrap.dedent(f"""
        import os
        from drtool.engine import Engine
        engine = Engine.open({str(state_root)!r}, "vol")
        for i in range(40):
            engine.write(i * 12345, bytes([i + 1]) * 5000)
        engine.flush()
        os._exit(0)  # no save: the maps on disk are stale, the log is not
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    for i in range(40):
        apply(expected, i * 12345, bytes([i + 1]) * 5000)
    assert path.read_bytes() == bytes(expected)
    report = api.scrub_volume("vol")  # opening replays the log first
    assert report["bad_regions"] == []
    with Engine.open(None, "vol") as engine:
        assert bytes(engine.read(0, SIZE)) == bytes(expected)


def test_torn_log_tail_is_cut(volume, state_root):
    path, expected = volume
    with Engine.open(None, "vol") as engine:
        engine.write(RS, b"z" * 100)
        segment = next(iter(engine.log.segments.values())).path
        engine.flush()
        # Keep the record in the log: stop before save() trims it.
        engine.volume.lock.release()
        engine.volume.lock = None
        engine.log.close()
    with open(segment, "ab") as handle:
        handle.write(b"DRTR" + b"\x01" * 30)  # half a record header
    with Engine.open(None, "vol") as engine:
        assert engine.log.cut_bytes == 34
        assert bytes(engine.read(RS, 100)) == b"z" * 100


def test_damaged_record_in_the_middle_is_refused(volume, state_root):
    with Engine.open(None, "vol") as engine:
        engine.write(RS, b"1" * 100)
        engine.write(2 * RS, b"2" * 100)
        entries = engine.log.pending()
        segment = engine.log.segments[entries[0].segment].path
        position = entries[0].position
        engine.flush()
        engine.volume.lock.release()
        engine.volume.lock = None
        engine.log.close()
    with open(segment, "r+b") as handle:
        handle.seek(position + 70)  # inside the first record's data
        handle.write(b"!")
    with pytest.raises(CorruptStateFile, match="damaged record"):
        Engine.open(None, "vol")


def test_a_flushed_write_whose_device_bytes_never_reached_the_disk_is_replayed(volume, state_root):
    """FLUSH makes the log durable, not the device (the log is the write-ahead log): after a
    power cut the device may hold its old bytes for a write acknowledged by a flush; opening
    the volume writes the record's bytes back."""
    path, expected = volume
    before = path.read_bytes()
    with Engine.open(None, "vol") as engine:
        synced = []
        for handle in (engine.device,):
            real = handle.sync
            handle.sync = lambda real=real: synced.append(1) or real()
        engine.write(3 * RS + 100, b"w" * 5000)  # partial: the base is read and verified
        engine.write(6 * RS, b"v" * RS, fua=True)  # whole region, FUA
        engine.flush()
        assert synced == []  # neither the FLUSH nor the FUA write synced the device
        engine.volume.lock.release()  # a crash: no save, and the device loses what it was not told to keep
        engine.volume.lock = None
        engine.log.close()
    path.write_bytes(before)
    apply(expected, 3 * RS + 100, b"w" * 5000)
    apply(expected, 6 * RS, b"v" * RS)
    with Engine.open(None, "vol") as engine:
        assert bytes(engine.read(0, SIZE)) == bytes(expected)
    assert path.read_bytes() == bytes(expected)
    assert api.scrub_volume("vol")["bad_regions"] == []


def test_a_checkpoint_syncs_the_device_before_the_maps_claim_its_records(volume):
    """The maps on disk let the log forget records: the device must hold their bytes first."""
    with Engine.open(None, "vol") as engine:
        order = []
        device_sync, save_maps = engine.device.sync, engine.volume.save_content_maps
        engine.device.sync = lambda: order.append("device") or device_sync()
        engine.volume.save_content_maps = lambda covered: order.append("maps") or save_maps(covered)
        engine.write(2 * RS, b"c" * 10)
        engine.save()
        assert order == ["device", "device", "maps"]  # the bulk before meta, the rest under it
