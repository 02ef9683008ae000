"""A client write racing the end of failback (found by tests/faults/test_kill9.py, seed 20261209:
"failback complete, back to normal", then 0.1 s later "entered degraded mode: write to region 41
failed: its current bytes fail verification").

A write in resync mode checks the mode under its region's stripe lock, appends its overlay
record and writes its bytes into the overlay, and only then sets the region's overlay and resync
bits (the commit routine's map step).  `Engine.finish_resync` takes the `meta` lock but no stripe:
when it runs between the write's overlay write and its map step, it sees no overlay region left to
copy, switches to normal and deletes the overlay; the write then sets its digest in the manifest
and an overlay bit in normal mode, and is acknowledged.  The device keeps the old bytes, the
overlay file is gone: the acknowledged write is lost and the region fails verification.

The window is a few microseconds wide in a real agent (the loop hit it once in 5 runs); here the
write is held at its map step (a wrapper around the engine's own `_commit_maps`) while failback
finishes, so the race happens every time.  Fixed: the finish holds every stripe lock
(drtool/engine/changes.py, the locking rule), so it waits for this write, copies its region back
and only then switches to normal.
"""

from __future__ import annotations

import shutil
import threading

from drtool import api
from drtool import failback as failback_mod
from drtool.engine import Engine
from drtool.engine.changes import OVERLAY
from drtool.errors import DrtoolError

RS = 65536
RACED = 5  # a region failback has nothing to copy for: its overlay bit is not set yet


def test_a_write_racing_the_end_of_failback_is_not_lost(protect_volume, tmp_path):
    path, data = protect_volume(8 * RS)
    api.recover("vol")
    api.write("vol", 2 * RS, b"\x11" * RS)  # an incident write: failback has one region to copy
    new = tmp_path / "new.img"
    shutil.copyfile(path, new)
    written = b"\xab" * 4096

    with Engine.open(None, "vol") as engine:
        commit_maps, finish_resync = engine._commit_maps, engine.finish_resync
        in_map_step, failback_done = threading.Event(), threading.Event()

        def slow_map_step(region, digest, era, target, whole, logged, *rest):
            if region == RACED and target == OVERLAY and not in_map_step.is_set():
                in_map_step.set()  # the bytes are in the overlay; the bits are not set yet
                # Held until failback is done (it was, at once, before the fix) or a few seconds:
                # a finish that waits for writes in flight waits for this one.
                failback_done.wait(3)
            return commit_maps(region, digest, era, target, whole, logged, *rest)

        def finish_once_the_write_is_in_flight():
            assert in_map_step.wait(30), "the write never reached its map step"
            return finish_resync()

        engine._commit_maps = slow_map_step
        engine.finish_resync = finish_once_the_write_is_in_flight
        errors: list[BaseException] = []

        def run_failback():
            try:
                failback_mod.failback(engine, device=str(new))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            finally:
                failback_done.set()

        failback_thread = threading.Thread(target=run_failback, daemon=True)
        failback_thread.start()
        while engine.record.mode != "resync":
            assert failback_thread.is_alive(), errors
            threading.Event().wait(0.01)
        write_thread = threading.Thread(target=lambda: engine.write(RACED * RS + 100, written, fua=True),
                                        daemon=True)
        write_thread.start()  # acknowledged once it returns
        failback_thread.join(60)
        write_thread.join(60)
        assert not errors, errors
        assert not failback_thread.is_alive() and not write_thread.is_alive()

    status = api.status("vol", probe_peer=False)[0]
    expected = bytearray(data[RACED * RS:(RACED + 1) * RS])
    expected[100:100 + len(written)] = written
    try:
        got = api.read("vol", RACED * RS, RS)
    except DrtoolError as exc:
        got = f"{type(exc).__name__}: {exc}"
    symptom = (status["mode"], status["maps"]["overlay"], got if isinstance(got, str) else "the bytes read")
    assert got == bytes(expected) and status["maps"]["overlay"] == [], symptom
