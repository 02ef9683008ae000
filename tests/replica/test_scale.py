"""A 15 TiB replica costs what is written to it, not its size (issue 10, item 5).

The same story runs against a 1 GiB and a 15 TiB replica (64 KiB regions: 16,384 and
251,658,240 of them), each in its own replica server process, through the HTTP API
the primary uses: create (PUT), a batch of records at regions far apart, a
snapshot, a second batch (copy-on-write, a ZERO record, a partial record), reads
(ranges, batched frames with digests, the snapshot), GET info, then a restart of
the server and the same reads again.  The 15 TiB replica must give the same
answers while its state files stay few and small and its server's peak RSS stays
close to the 1 GiB one's.  No timing is asserted.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3

from drtool.wire import zero_digest
from tests.replica.conftest import VOLUME_ID, ServerProcess, write, zero

RS = 64 << 10
SMALL = 1 << 30
LARGE = 15 << 40
IMAGES = {"mirror.img", "overlay.img", "data.img"}


def state_files(directory: Path) -> dict[str, int]:
    """Every file of the replica but its (sparse) images, with its size."""
    found = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            if name not in IMAGES:
                path = Path(parent) / name
                found[str(path.relative_to(directory))] = path.stat().st_size
    return found


def proc_status(pid: int, key: str) -> int:
    """A /proc/PID/status value in bytes (VmHWM: the peak resident set)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def proc_write_bytes(pid: int) -> int | None:
    """Bytes the process sent to storage (/proc/PID/io), when the kernel accounts it."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def run_story(server: ServerProcess, size: int) -> dict[str, Any]:
    count = size // RS
    far = [0, 1, count // 3, count // 2 + 7, count - 1]  # the first, the last, pages and groups apart
    rng = random.Random(size)
    content: dict[int, bytes] = {}  # the regions written (every other one reads as zeros)

    def expected(region: int) -> bytes:
        return blake3.blake3(content.get(region, bytes(RS))).digest()

    with server.client() as c:
        created = c.ensure_volume("vol", size, RS, VOLUME_ID)
        assert created["region_count"] == count and created["zero_regions"] == count

        first = []
        for seq, region in enumerate(far, 1):
            content[region] = rng.randbytes(RS)
            first += write(seq, region * RS, content[region], era=1)
        assert c.send_records("vol", first, complete_through=len(far))["applied_seq"] == len(far)
        before = dict(content)
        assert c.create_snapshot("vol", "s1")["preserved_regions"] == 0

        changed, zeroed, partial = far[1], far[2], far[3]
        content[changed] = rng.randbytes(RS)
        patch = rng.randbytes(100)
        content[partial] = content[partial][:RS - 100] + patch
        fresh = count * 2 // 3 + 5
        content[fresh] = rng.randbytes(RS)
        second = (write(6, changed * RS, content[changed], era=2) + zero(7, zeroed * RS, RS)
                  + write(8, (partial + 1) * RS - 100, patch, era=2) + write(9, fresh * RS, content[fresh], era=2))
        del content[zeroed]
        assert c.send_records("vol", second, complete_through=9) == {"applied_seq": 9, "applied": 4, "skipped": 0}
        check_reads(c, count, far + [fresh], content, before, expected)
        io = proc_write_bytes(server.proc.pid)  # type: ignore[union-attr]
        hwm = proc_status(server.proc.pid, "VmHWM")  # type: ignore[union-attr]
        info = c.volume_info("vol")

    server.stop()
    server.start()  # a new process opens the replica from disk
    with server.client() as c:
        assert c.volume_info("vol") == info
        check_reads(c, count, far + [fresh], content, before, expected)
        restarted_hwm = proc_status(server.proc.pid, "VmHWM")  # type: ignore[union-attr]
    server.stop()
    mirror = server.root / "vol" / "mirror.img"
    return {"files": state_files(server.root / "vol"), "hwm": hwm, "restarted_hwm": restarted_hwm, "io": io,
            "mirror_allocated": mirror.stat().st_blocks * 512, "mirror_size": mirror.stat().st_size}


def check_reads(c: Any, count: int, regions: list[int], content: dict[int, bytes], before: dict[int, bytes],
                expected: Callable[[int], bytes]) -> None:
    """Bytes and digests of every touched region (and its neighbours), now and in the snapshot."""
    info = c.volume_info("vol")
    assert info["applied_seq"] == 9 and info["applied_ahead"] == [] and info["max_era"] == 2
    assert info["zero_regions"] == count - len(content)
    assert info["snapshots"] == ["s1"] and info["overlay"]["regions"] == 0
    assert info["journal"]["records"] == 9
    # The change log answers for runs naming the whole volume (never expanded into regions).
    assert [header.seq for header, _ in c.changes("vol", 0, [(0, count)])] == list(range(1, 10))
    assert [header.seq for header, _ in c.changes("vol", 5, [(regions[1], 1), (count - 1, 1)])] == [6]
    wanted = sorted({r for region in regions for r in (region - 1, region, region + 1) if 0 <= r < count})
    results = list(c.read_regions("vol", [(r, 1) for r in wanted], expected=expected))
    assert [r.region for r in results] == wanted and all(r.ok for r in results)
    for result in results:
        assert bytes(result.data) == content.get(result.region, bytes(RS))
    for region in regions:
        assert c.read_range("vol", region * RS, RS) == content.get(region, bytes(RS))
    last = count - 1
    assert c.read_range("vol", last * RS + RS - 10, 10) == content[last][-10:]
    # The snapshot kept the three regions the second batch changed, and nothing else.
    [snapshot] = c.list_snapshots("vol")
    assert snapshot["preserved_regions"] == 4  # changed, zeroed, partial and the fresh (zero) one
    old = list(c.read_regions("vol", [(r, 1) for r in regions], snapshot="s1",
                              expected=lambda r: blake3.blake3(before.get(r, bytes(RS))).digest()))
    assert all(r.ok for r in old) and [bytes(r.data) for r in old] == [before.get(r, bytes(RS)) for r in regions]
    assert c.read_range("vol", regions[2] * RS, RS, snapshot="s1") == before[regions[2]]
    assert zero_digest(RS) == expected(regions[2])  # zeroed by the ZERO record


def test_a_15_tib_replica_costs_what_is_written_not_its_size(start_server, tmp_path: Path) -> None:
    small = run_story(start_server(root=tmp_path / "small"), SMALL)
    large = run_story(start_server(root=tmp_path / "large"), LARGE)
    for name, run in (("1 GiB", small), ("15 TiB", large)):
        print(f"\n{name}: {len(run['files'])} state files, {sum(run['files'].values())} bytes; peak RSS "
              f"{run['hwm'] / 2**20:.1f} MiB ({run['restarted_hwm'] / 2**20:.1f} after the restart); "
              f"written to storage {run['io']} bytes")

    assert large["mirror_size"] == LARGE and large["mirror_allocated"] < 8 << 20
    # The state files: one index, a few groups and pages per table, the journal and the JSON files.
    assert len(large["files"]) < 40, sorted(large["files"])
    assert sum(large["files"].values()) < 2 << 20, large["files"]
    assert sum(large["files"].values()) < sum(small["files"].values()) + (256 << 10)
    if large["io"] is not None and small["io"] is not None:
        assert large["io"] < small["io"] + (2 << 20)
    # Memory: nothing per region of the volume.
    assert large["hwm"] < small["hwm"] + (32 << 20), (small["hwm"], large["hwm"])
    assert large["restarted_hwm"] < small["restarted_hwm"] + (32 << 20)
