"""Issue 14's proof: dependent writes across two volumes are never reordered on the secondary.

A writer appends numbered records to volume A and, only once A's write returned (it is in A's
log: acknowledged), the same number to volume B: the database pattern, data after WAL.  The
property checked: for each n, **B holds n only if A holds n**, at every point the secondary can
be found at.

The volumes' engines run in this process, with the real replicator threads (the group's
GroupReplicator, or each volume's own Replicator) shipping over HTTP to a real replica server
subprocess.  In-process rather than through an agent over NBD because the test must stall,
throttle and resume the shipping of one volume or of the group at chosen moments (a client
wrapper around the replicators' real clients), which an agent's threads do not expose; what
is shipped, the server and everything it does are the real ones, and the server is the
process that gets killed.

A "takeover" kills the server (-9), opens its replica root as a promoted server would (the
group's recovery runs: uncommitted journal tails cut) and reads both mirrors; between takeovers
the live server is read too (B first, then A: A only grows, so B's n with A's n missing is a
violation at B's read).

Without a group a violation is found with a deterministic schedule (A's shipping stalled while
B's proceeds); with a group, never, across random throttles, pauses and kills.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from drtool import api
from drtool.engine import Engine
from drtool.errors import DrtoolError
from drtool.group_replication import GroupReplicator
from drtool.replica.store import ReplicaRoot
from drtool.replication import Replicator
from drtool.storage.groups import load_group

RS = 65536
REGIONS = 64
SIZE = REGIONS * RS
SLOT = 512
SLOTS = SIZE // SLOT


def record(n: int) -> bytes:
    return (b"N%07d" % n) * (SLOT // 8)


def held(image: bytes) -> set[int]:
    """The numbers whose record is in their slot."""
    out = set()
    for slot in range(1, SLOTS):
        if image[slot * SLOT:slot * SLOT + 8] == b"N%07d" % slot:
            out.add(slot)
    return out


def violations(a: bytes, b: bytes) -> list[int]:
    """Numbers B holds while A does not."""
    return sorted(held(b) - held(a))


class Valve:
    """Around a replicator's real client: each shipping request waits while the valve is shut
    and sleeps ``delay`` seconds first (throttle); everything else goes straight through."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.open = threading.Event()
        self.open.set()
        self.delay = 0.0

    def _gate(self) -> None:
        while not self.open.wait(0.05):
            pass
        if self.delay:
            time.sleep(self.delay)

    def send_records(self, *args: Any, **kwargs: Any) -> Any:
        self._gate()
        return self.client.send_records(*args, **kwargs)

    def send_group_txn(self, *args: Any, **kwargs: Any) -> Any:
        self._gate()
        return self.client.send_group_txn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def make_volumes(tmp_path: Path, server) -> None:
    for name in ("a", "b"):
        path = tmp_path / f"{name}.img"
        with open(path, "wb") as handle:
            handle.truncate(SIZE)
        api.init_volume(name, str(path), "64K")


def takeover(server) -> tuple[bytes, bytes]:
    """Kill the server (-9), open its root (recovery as at any start) and read both mirrors."""
    server.stop(kill=True)
    root = ReplicaRoot(str(server.root))
    try:
        a, b = (root.get(n).mirror.image.pread(SIZE, 0) for n in ("a", "b"))
    finally:
        root.close()
    return a, b


class Writer(threading.Thread):
    """n = 1, 2, ...: A's record n, and once that write returned, B's record n."""

    def __init__(self, engines: dict[str, Engine], count: int, pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.engines, self.count, self.pause = engines, count, pause
        self.done = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for n in range(1, self.count + 1):
                self.engines["a"].write(n * SLOT, record(n))
                self.engines["b"].write(n * SLOT, record(n))
                self.done = n
                if self.pause:
                    time.sleep(self.pause)  # a steady stream while the schedule runs
        except BaseException as exc:  # the test fails on it
            self.error = exc


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def test_without_a_group_b_can_hold_what_a_lacks(tmp_path, state_root, replica_server) -> None:
    """Each volume ships on its own: with A's shipping stalled and B's not, the secondary holds
    B's records without the A records they followed (what a group exists to prevent)."""
    make_volumes(tmp_path, replica_server)
    for name in ("a", "b"):
        api.protect(name, replica_server.url, str(replica_server.token_file))
    engines = {n: Engine.open(None, n) for n in ("a", "b")}
    stop = threading.Event()
    valves, threads = {}, []
    try:
        for name, engine in engines.items():
            replicator = Replicator(engine)
            valves[name] = replicator.client = Valve(replicator.client)
            threads.append(threading.Thread(target=replicator.run, args=(stop,), kwargs={"interval": 0.02},
                                            daemon=True))
        valves["a"].open.clear()  # A's shipping stalls
        for thread in threads:
            thread.start()
        writer = Writer(engines, 200)
        writer.start()
        writer.join(60)
        assert writer.error is None and writer.done == 200
        wait_for(lambda: engines["b"].log.oldest_seq() is None, 30, "B's records to ship")
        a, b = takeover(replica_server)
        found = violations(a, b)
        assert found, "B's shipping ran ahead of A's, yet no B record without its A record was found"
        assert found == list(range(1, 201))  # A shipped nothing: every B record is one
    finally:
        stop.set()
        valves.get("a") and valves["a"].open.set()
        for thread in threads:
            thread.join(10)
        for engine in engines.values():
            engine.close()


def test_with_a_group_b_never_holds_what_a_lacks(tmp_path, state_root, replica_server, fault_stats) -> None:
    seed = random.randrange(1 << 30)
    fault_stats.seeds.append(seed)
    rng = random.Random(seed)
    make_volumes(tmp_path, replica_server)
    api.group_create("g", ["a", "b"])
    api.protect("g", replica_server.url, str(replica_server.token_file))
    engines = {n: Engine.open(None, n) for n in ("a", "b")}
    for engine in engines.values():
        Replicator(engine)
    group = GroupReplicator(load_group(str(state_root), "g"), engines, root=str(state_root))
    valve = group.client = Valve(group.client)
    stop = threading.Event()
    shipper = threading.Thread(target=group.run, args=(stop,), kwargs={"interval": 0.02}, daemon=True)
    shipper.start()
    writer = Writer(engines, SLOTS - 1, pause=0.0015)
    checks = {"takeover": 0, "live": 0, "kill": 0, "pause": 0, "throttle": 0}
    held_max = 0
    try:
        writer.start()
        deadline = time.monotonic() + 25
        while writer.is_alive() and time.monotonic() < deadline:
            event = rng.choice(["takeover", "live", "live", "kill", "pause", "throttle"])
            checks[event] += 1
            if event == "throttle":
                valve.delay = rng.choice([0.0, 0.0, 0.01, 0.05])
            elif event == "pause":
                valve.open.clear()
                time.sleep(rng.uniform(0.05, 0.3))
                valve.open.set()
            elif event == "kill":
                time.sleep(rng.uniform(0, 0.1))
                replica_server.stop(kill=True)
                time.sleep(rng.uniform(0, 0.2))
                replica_server.start()
            elif event == "live":
                with replica_server.client() as client:
                    try:
                        b = client.read_range("b", 0, SIZE)
                        a = client.read_range("a", 0, SIZE)
                    except DrtoolError:
                        continue
                assert violations(a, b) == [], f"seed {seed}: live read: B holds what A lacks"
            else:
                time.sleep(rng.uniform(0, 0.1))
                a, b = takeover(replica_server)
                assert violations(a, b) == [], f"seed {seed}: after a takeover: B holds what A lacks"
                held_max = max(held_max, len(held(b)))
                replica_server.start()
            fault_stats.crash(phase="group-order", target=event, landed=writer.done)
        writer.join(60)
        assert writer.error is None
        valve.delay = 0.0
        valve.open.set()
        wait_for(lambda: all(e.log.oldest_seq() is None for e in engines.values()), 60, "the group to catch up")
        a, b = takeover(replica_server)
        assert violations(a, b) == []
        assert held(a) == held(b) == set(range(1, writer.done + 1))  # and everything arrived in the end
        fault_stats.checks["group-order takeovers"] += checks["takeover"] + 1
        fault_stats.checks["group-order live reads"] += checks["live"]
        assert checks["takeover"] and checks["kill"], checks  # the schedule did exercise both
        assert held_max > 0  # a takeover found records: the property was checked on real data
    finally:
        stop.set()
        valve.open.set()
        shipper.join(10)
        group.detach()
        for engine in engines.values():
            engine.close()
