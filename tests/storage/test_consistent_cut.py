"""consistent_cut: a cut that holds a dependent write holds the write it depends on."""

from __future__ import annotations

import threading

from drtool.regions import Geometry
from drtool.storage.replog import ReplicationLog, consistent_cut
from drtool.wire import KIND_WRITE

RS = 4096
GEOMETRY = Geometry(64 * RS, RS)


def test_a_cut_never_holds_b_without_the_a_it_followed(tmp_path) -> None:
    logs = [ReplicationLog.open(str(tmp_path / name / "log"), bytes(range(16)), GEOMETRY) for name in ("a", "b")]
    assert [log.name for log in logs] == ["a", "b"]
    stop = threading.Event()
    cuts: list[list[int]] = []

    def cutter() -> None:
        while not stop.is_set():
            cuts.append(consistent_cut(logs))  # a's tail read first: without the locks, b's could pass it

    thread = threading.Thread(target=cutter)
    thread.start()
    for n in range(1, 3001):
        logs[0].append(KIND_WRITE, 0, 8, 1, n.to_bytes(8, "little"))  # a's write n is "acknowledged" ...
        logs[1].append(KIND_WRITE, 0, 8, 1, n.to_bytes(8, "little"))  # ... before b's write n is issued
    stop.set()
    thread.join()
    assert len(cuts) > 10
    for a_tail, b_tail in cuts:
        assert b_tail <= a_tail  # b's record n (seq n) only in a cut that holds a's record n
    assert consistent_cut(logs) == [3000, 3000]
    for log in logs:
        log.close()
