"""The end of failback (Engine.finish_resync) under writes that never pause: it shuts writes
out (every stripe lock), copies the few regions written since the last copy pass itself and
switches to normal; writes after it go to the device."""

from __future__ import annotations

from drtool import api
from drtool import failback as failback_mod
from drtool.engine import Engine
from tests.conftest import make_image

RS = 65536
REGIONS = 16


def test_failback_finishes_while_every_copy_pass_is_followed_by_a_write(tmp_path, state_root, replica_server,
                                                                       monkeypatch):
    path = tmp_path / "dev.img"
    data = bytearray(make_image(path, REGIONS * RS, seed=9))
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    api.recover("vol")
    api.write("vol", 2 * RS, b"\x22" * RS)
    data[2 * RS:3 * RS] = b"\x22" * RS
    real = failback_mod._copy
    rounds: list[int] = []

    def a_write_after_every_pass(engine, rate, progress):
        copied = real(engine, rate, progress)
        rounds.append(copied)
        region = 5 + len(rounds)  # a new region each time: never a quiet moment
        engine.write(region * RS, bytes([region]) * RS)
        data[region * RS:(region + 1) * RS] = bytes([region]) * RS
        assert len(rounds) < 10, "failback never finishes while writes keep coming"
        return copied

    monkeypatch.setattr(failback_mod, "_copy", a_write_after_every_pass)
    with Engine.open(None, "vol") as engine:
        result = failback_mod.failback(engine)
        assert result["mode"] == "normal" and rounds == [1, 1]  # the last write: copied by the finish
        assert not engine.volume.overlay.any() and not engine.volume.resync.any()
        info = result["failback"]
        assert (info["total_regions"], info["done_regions"]) == (3, 3)
        engine.write(12 * RS, b"\x0c" * RS)  # normal mode: onto the device
        data[12 * RS:13 * RS] = b"\x0c" * RS
    assert path.read_bytes() == bytes(data)
    assert api.read("vol", 0, REGIONS * RS) == bytes(data)
