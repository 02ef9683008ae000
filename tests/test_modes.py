"""The mode machine: normal -> degraded -> resync -> normal, and nothing else."""

import pytest

from drtool.engine import modes
from drtool.errors import NotPermitted
from drtool.storage.record import VolumeRecord
from drtool.storage.records import Failback, Recovery


def record():
    return VolumeRecord.new("vol", "/dev/sdb", 1 << 20, 65536)


def recovery():
    return Recovery(entered=1.0, reason="operator ran recover", auto=False, local_era=None, source="mirror", era=2)


def test_the_cycle_and_what_each_step_does_to_the_record():
    r = record()
    modes.degrade(r, recovery())
    assert r.mode == "degraded" and r.recovery.reason == "operator ran recover" and modes.in_recovery(r)
    modes.start_resync(r, Failback(started=2.0, device="/dev/sdc", total_regions=3))
    assert r.mode == "resync" and modes.resyncing(r) and r.failback.finished is None
    r.faulted = {"reason": "gone", "since": 1.0}
    modes.finish_resync(r)
    assert r.mode == "normal" and modes.is_normal(r)
    assert r.recovery is None and r.faulted is None and r.failback.finished is not None
    assert [e["event"] for e in r.history] == ["degraded", "failback", "normal"]
    assert r.history[1]["device"] == "/dev/sdc"


@pytest.mark.parametrize("steps, refused, message", [
    ([], "resync", "cannot go from normal to resync mode (from normal only to degraded)"),
    ([], "normal", "cannot go from normal to normal mode"),
    (["degrade"], "degraded", "cannot go from degraded to degraded mode (from degraded only to resync)"),
    (["degrade"], "normal", "cannot go from degraded to normal mode"),
    (["degrade", "resync"], "degraded", "cannot go from resync to degraded mode (from resync only to normal)"),
])
def test_other_transitions_are_refused_and_change_nothing(steps, refused, message):
    r = record()
    if "degrade" in steps:
        modes.degrade(r, recovery())
    if "resync" in steps:
        modes.start_resync(r, Failback(started=2.0, device="/dev/sdc", total_regions=3))
    before = r.to_json()
    move = {"degraded": lambda: modes.degrade(r, recovery()),
            "resync": lambda: modes.start_resync(r, Failback(started=3.0, device="/x", total_regions=1)),
            "normal": lambda: modes.finish_resync(r)}[refused]
    with pytest.raises(NotPermitted, match=message.replace("(", r"\(").replace(")", r"\)")):
        move()
    assert r.to_json() == before


def test_the_engine_asks_the_machine_before_it_marks_anything(tmp_path, state_root):
    from drtool import api
    from drtool.engine import Engine
    from tests.conftest import make_image

    path = tmp_path / "dev.img"
    make_image(path, 4 * 65536)
    api.init_volume("vol", str(path), "64K")
    with Engine.open(None, "vol") as engine:
        engine.volume.bad.set(1)
        with pytest.raises(NotPermitted, match="cannot go from normal to resync mode"):
            engine.begin_resync(str(path))
        assert not engine.volume.resync.any() and engine.mode == "normal" and engine.record.failback is None
        with pytest.raises(NotPermitted, match="cannot go from normal to normal mode"):
            engine.finish_resync()
