"""Failback in the engine (issue 11, item 5): writes during resync, crash replay, exact progress.

In-process and fast; tests/test_failback_crash.py is the same story with a real agent killed
with SIGKILL."""

from __future__ import annotations

import pytest

from drtool import api
from drtool import failback as failback_mod
from drtool.engine import Engine
from tests.conftest import corrupt, make_image

RS = 65536
REGIONS = 32
SIZE = REGIONS * RS
BAD = list(range(0, 30))


@pytest.fixture
def degraded(tmp_path, state_root, replica_server, monkeypatch):
    """A protected volume whose regions 0-29 are bad, in degraded mode; failback copies 4 regions
    a batch."""
    path = tmp_path / "dev.img"
    data = bytearray(make_image(path, SIZE, seed=5))
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    for region in BAD:
        corrupt(path, region * RS + 11, b"\xde\xad")
    api.scrub_volume("vol")
    api.recover("vol")
    monkeypatch.setattr(failback_mod, "BATCH_BYTES", 4 * RS)
    return path, data


def crash(engine: Engine) -> None:
    """What kill -9 leaves: the log and the data files are durable (the write was flushed), the
    maps and the record are as last checkpointed."""
    engine.flush()
    engine.look_only = True  # close() saves nothing
    engine.close()


def runs_of(bitmap) -> list[tuple[int, int]]:
    return [tuple(run) for run in bitmap.runs()]


def test_replay_marks_a_write_made_during_failback_for_copying_back(degraded, monkeypatch):
    path, data = degraded
    real = failback_mod._copy_region
    calls = []

    def stop_in_second_batch(engine, region, fetched):
        calls.append(region)
        if len(calls) == 6:
            raise KeyboardInterrupt("stop here")
        return real(engine, region, fetched)

    monkeypatch.setattr(failback_mod, "_copy_region", stop_in_second_batch)
    engine = Engine.open(None, "vol")
    try:
        with pytest.raises(KeyboardInterrupt):
            failback_mod.failback(engine)
        engine.save()  # the checkpoint after the first batch: regions 0-4 are on the device
        assert not engine.volume.resync.test(1)
        engine.write(RS, b"\xab" * RS, fua=True)  # region 1: copied already, written again
        assert engine.volume.overlay.test(1) and engine.volume.resync.test(1)
    except BaseException:
        engine.close()
        raise
    crash(engine)
    data[RS:2 * RS] = b"\xab" * RS

    with Engine.open(None, "vol") as engine:  # replays the write
        volume = engine.volume
        assert volume.overlay.test(1) and volume.resync.test(1)
        assert volume.unreplicated.test(1)
        assert engine.read_region(1) == b"\xab" * RS
        info = engine.record.failback
        assert (info.total_regions, info.done_regions) == (31, 31 - volume.resync.popcount())
    monkeypatch.setattr(failback_mod, "_copy_region", real)
    result = api.failback("vol")
    assert result["mode"] == "normal"
    status = api.status("vol", probe_peer=False)[0]
    assert status["maps"]["overlay"] == [] and status["maps"]["resync"] == []
    assert path.read_bytes() == bytes(data)
    assert api.read("vol", RS, RS) == b"\xab" * RS


def test_rewrites_during_failback_are_counted_once(degraded, monkeypatch):
    path, data = degraded
    real = failback_mod._copy_region
    calls = []

    def rewrite_copied_regions(engine, region, fetched):
        calls.append(region)
        if len(calls) == 6:  # regions 0-3 are on the device: two of them are written again
            for again in (1, 2):
                engine.write(again * RS, bytes([again]) * RS)
        return real(engine, region, fetched)

    monkeypatch.setattr(failback_mod, "_copy_region", rewrite_copied_regions)
    for again in (1, 2):
        data[again * RS:(again + 1) * RS] = bytes([again]) * RS
    with Engine.open(None, "vol") as engine:
        result = failback_mod.failback(engine)
    assert result["mode"] == "normal"
    assert result["regions_copied"] == 32  # 30, and regions 1 and 2 a second time
    info = result["failback"]
    assert (info["total_regions"], info["done_regions"]) == (32, 32)
    assert path.read_bytes() == bytes(data)


def test_failback_does_not_finish_while_a_write_put_a_region_back_in_the_overlay(degraded, monkeypatch):
    """A write between the last batch and the switch back to normal: copied, then normal."""
    path, data = degraded
    real = failback_mod._copy
    rounds = []

    def write_after_the_last_batch(engine, rate, progress):
        copied = real(engine, rate, progress)
        rounds.append(copied)
        if len(rounds) == 1:
            engine.write(3 * RS, b"\x33" * RS)
        return copied

    monkeypatch.setattr(failback_mod, "_copy", write_after_the_last_batch)
    data[3 * RS:4 * RS] = b"\x33" * RS
    with Engine.open(None, "vol") as engine:
        result = failback_mod.failback(engine)
        assert result["mode"] == "normal" and rounds == [30, 1]
        assert runs_of(engine.volume.overlay) == [] and runs_of(engine.volume.resync) == []
    assert path.read_bytes() == bytes(data)
    assert api.read("vol", 3 * RS, RS) == b"\x33" * RS


def test_an_overlay_region_not_marked_for_copying_is_copied_before_normal(degraded, monkeypatch):
    """Whatever left an overlay region unmarked (a replay before the fix did), failback copies
    it rather than drop the overlay with it."""
    path, data = degraded
    api.write("vol", 31 * RS, b"\x77" * RS)  # region 31: healthy, written in degraded mode
    data[31 * RS:] = b"\x77" * RS
    with Engine.open(None, "vol") as engine:
        engine.begin_resync(engine.record.device)
        engine.volume.resync.clear(31)  # the state the old replay left behind
        result = failback_mod.failback(engine)
        assert result["mode"] == "normal"
        assert runs_of(engine.volume.overlay) == []
    assert path.read_bytes() == bytes(data)
