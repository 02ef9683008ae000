"""Replication of a two-volume consistency group against the same two volumes ungrouped.

    .venv/bin/python bench/group_replication.py [--size 512M] [--runs 3]

Two workloads, each run alternately grouped and ungrouped against one real `drtool serve`
(its state on disk), the volumes fresh and protected each run (initial sync not timed):

- **backlog**: --size bytes written to each volume (1 MiB writes, alternating volumes, the
  database pattern: one volume's write acknowledged before the other's is issued), then
  shipped until the secondary acknowledged everything.  Grouped: one GroupReplicator ships
  whole group transactions (consistent cuts, one atomic request per transaction).
  Ungrouped: each volume's Replicator ships its own log, both at once (two threads, as the
  agent runs them).  Rate = 2 x --size / shipping time.
- **streaming**: the replicators run in the background (as in the agent) while 64 KiB writes
  alternate between the volumes, with a flush every 32 writes; rate = 2 x --size / (time from
  the first write until the secondary acknowledged the last).  This pays the cuts in the write
  path as well as the transactions.

ratio = grouped rate / ungrouped rate, the median of the per-run ratios (issue 14's target:
the group costs at most 10 % of throughput, ratio >= 0.9).  CPU-seconds per GiB shipped (the
medians), of this process (the primary: shipping, and in streaming the writer too) and of the
replica server, are less sensitive to a loaded machine than the rates.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import median, parse_size, row, scratch_dir  # noqa: E402
from bench.remote_fetch import _start_server  # noqa: E402
from drtool import api  # noqa: E402
from drtool.client import ReplicaClient  # noqa: E402
from drtool.engine import Engine  # noqa: E402
from drtool.errors import VolumeNotFound  # noqa: E402
from drtool.group_replication import GroupReplicator  # noqa: E402
from drtool.replication import Replicator  # noqa: E402
from drtool.storage.groups import load_group  # noqa: E402

MEMBERS = ("wal", "data")


def _fresh(work: str, size: int, url: str, token_file: str, grouped: bool) -> str:
    root = os.path.join(work, "state")
    shutil.rmtree(root, ignore_errors=True)
    with ReplicaClient(url, token_file=token_file) as client:
        try:
            client.delete_group("g")
        except Exception:  # noqa: BLE001 - none yet
            pass
        for name in MEMBERS:
            try:
                client.delete_volume(name)
            except VolumeNotFound:
                pass
    for name in MEMBERS:
        image = os.path.join(work, f"{name}.img")
        with open(image, "wb") as handle:
            handle.truncate(size)
        api.init_volume(name, image, "64K", root=root, force=True)
    if grouped:
        api.group_create("g", list(MEMBERS), root=root)
        api.protect("g", url, token_file, root=root)
    else:
        for name in MEMBERS:
            api.protect(name, url, token_file, root=root)
    return root


class _Shipping:
    """The replication of both volumes: a GroupReplicator, or one Replicator per volume."""

    def __init__(self, root: str, engines: dict[str, Engine], grouped: bool) -> None:
        self.replicators = {name: Replicator(engine) for name, engine in engines.items()}
        self.group = GroupReplicator(load_group(root, "g"), engines, root=root) if grouped else None

    def ship(self) -> None:
        if self.group is not None:
            self.group.ship()
            return
        threads = [threading.Thread(target=r.ship) for r in self.replicators.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def run(self, stop: threading.Event) -> list[threading.Thread]:
        loops = [self.group] if self.group is not None else list(self.replicators.values())
        threads = [threading.Thread(target=loop.run, args=(stop,), daemon=True) for loop in loops]
        for thread in threads:
            thread.start()
        return threads

    def wire_bytes(self) -> int:
        return sum(r.shipped_bytes for r in self.replicators.values())


_SERVER_PID = 0


def _cpu() -> tuple[float, float]:
    """CPU-seconds used so far by this process and by the replica server."""
    with open(f"/proc/{_SERVER_PID}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return time.process_time(), (int(fields[11]) + int(fields[12])) / ticks


def _measured(size: int, started: float, cpu: tuple[float, float]) -> tuple[float, float, float]:
    """(rate, primary CPU-s/GiB, server CPU-s/GiB) since ``started`` and ``cpu``."""
    elapsed = time.perf_counter() - started
    now = _cpu()
    gib = 2 * size / (1 << 30)
    return 2 * size / elapsed, (now[0] - cpu[0]) / gib, (now[1] - cpu[1]) / gib


def _caught_up(engines: dict[str, Engine]) -> bool:
    return not any(engine.volume.unreplicated.any() for engine in engines.values())


def backlog_run(work: str, size: int, url: str, token_file: str, grouped: bool) -> tuple[float, float, float]:
    root = _fresh(work, size, url, token_file, grouped)
    payload = os.urandom(1 << 20)
    with Engine.open(root, MEMBERS[0]) as wal, Engine.open(root, MEMBERS[1]) as data:
        engines = {MEMBERS[0]: wal, MEMBERS[1]: data}
        for engine in engines.values():
            engine.record.settings["log_limit"] = 4 * size  # no bitmap mode: measure the log path
        shipping = _Shipping(root, engines, grouped)
        for offset in range(0, size, len(payload)):
            wal.write(offset, payload)
            data.write(offset, payload)
        wal.flush()
        data.flush()
        cpu, started = _cpu(), time.perf_counter()
        shipping.ship()
        measured = _measured(size, started, cpu)
        assert _caught_up(engines)
    return measured


def streaming_run(work: str, size: int, url: str, token_file: str, grouped: bool) -> tuple[float, float, float]:
    root = _fresh(work, size, url, token_file, grouped)
    block = 64 << 10
    payload = os.urandom(block)
    with Engine.open(root, MEMBERS[0]) as wal, Engine.open(root, MEMBERS[1]) as data:
        engines = {MEMBERS[0]: wal, MEMBERS[1]: data}
        for engine in engines.values():
            engine.record.settings["log_limit"] = 4 * size
        shipping = _Shipping(root, engines, grouped)
        stop = threading.Event()
        cpu, started = _cpu(), time.perf_counter()
        threads = shipping.run(stop)
        try:
            for index, offset in enumerate(range(0, size, block)):
                wal.write(offset, payload)
                data.write(offset, payload)
                if index % 32 == 31:
                    wal.flush()
                    data.flush()
            wal.flush()
            data.flush()
            deadline = time.monotonic() + float(os.environ.get("BENCH_DEADLINE", 600))
            while not _caught_up(engines):
                if time.monotonic() > deadline:
                    raise SystemExit("replication did not catch up in 600 s")
                time.sleep(0.002)
            measured = _measured(size, started, cpu)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
    return measured


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="512M", help="bytes written to each of the two volumes")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    work = scratch_dir("group-replication-")
    token_file = os.path.join(work, "token")
    with open(token_file, "w") as handle:
        handle.write(os.urandom(16).hex())
    os.chmod(token_file, 0o600)
    global _SERVER_PID
    server, address = _start_server(os.path.join(work, "replica"), token_file)
    _SERVER_PID = server.pid
    url = f"http://{address}"
    result: dict = {"bytes_per_volume": size}
    try:
        for name, one in (("backlog", backlog_run), ("streaming", streaming_run)):
            grouped, alone = [], []
            for run in range(args.runs):
                order = (True, False) if run % 2 == 0 else (False, True)  # alternate who goes first
                measured = {flag: one(work, size, url, token_file, flag) for flag in order}
                grouped.append(measured[True])
                alone.append(measured[False])
            ratios = [g[0] / a[0] for g, a in zip(grouped, alone)]

            def med(runs: list[tuple[float, float, float]], index: int) -> float:
                return median([r[index] for r in runs])

            result[name] = {"grouped": med(grouped, 0) / 1e9, "ungrouped": med(alone, 0) / 1e9,
                            "ratio": median(ratios), "ratios": ratios,
                            "cpu_per_gib": {"grouped": [med(grouped, 1), med(grouped, 2)],
                                            "ungrouped": [med(alone, 1), med(alone, 2)]}}
            print(row(f"group replication, {name}", f"2 x {size >> 20} MiB",
                      f"grouped {result[name]['grouped']:.3f} GB/s",
                      f"ungrouped {result[name]['ungrouped']:.3f} GB/s",
                      f"ratio {result[name]['ratio']:.2f}",
                      "runs " + " ".join(f"{r:.2f}" for r in ratios),
                      f"CPU-s/GiB primary+server grouped {med(grouped, 1):.2f}+{med(grouped, 2):.2f}, "
                      f"ungrouped {med(alone, 1):.2f}+{med(alone, 2):.2f}"))
        return result
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
