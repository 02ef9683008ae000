"""A 15 TiB sparse volume end to end (issue 10): its metadata costs what the work costs.

init, writes through the agent, checkpoint, scrub, protect, a region corrupted on the device,
scrub, recover, verified reads (the bad region from the replica), failback, scrub: every
command a real process whose exit code, reported regions and peak RSS (the kernel's
``ru_maxrss`` of that process alone, bench/scale.py's launcher) are checked.  The bound is
on memory, not time: 128 MiB for a command, 384 MiB for the agent.
"""

from __future__ import annotations

import os
import random
import sys

import pytest

from bench.scale import Measured, run_measured
from drtool.errors import ExitCode
from drtool.nbd import protocol as p
from tests.conftest import corrupt
from tests.nbd.rawclient import RawClient

pytestmark = pytest.mark.slow

KiB, MiB, TiB = 1 << 10, 1 << 20, 1 << 40
SIZE = 15 * TiB  # ext4 caps a file just under 16 TiB
RS = 64 * KiB
REGIONS = SIZE // RS
COMMAND_RSS = 128 * MiB
AGENT_RSS = 384 * MiB
CUT_RSS = 1 << 30  # a command past this is killed: the bound is long broken, spare the machine

#: The device's data: four 1 MiB extents in 15 TiB of holes (the first, two inside, the last).
EXTENTS = [0, 3 * TiB + 5 * RS, 7 * TiB + 123 * RS, SIZE - MiB]
BAD_REGION = EXTENTS[2] // RS + 3


class Model:
    """What the volume should hold: zeros, with byte strings laid over them in order."""

    def __init__(self) -> None:
        self.layers: list[tuple[int, bytes]] = []

    def put(self, offset: int, data: bytes) -> None:
        self.layers.append((offset, data))

    def get(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for start, data in self.layers:
            lo, hi = max(start, offset), min(start + len(data), offset + length)
            if lo < hi:
                out[lo - offset:hi - offset] = data[lo - start:hi - start]
        return bytes(out)


@pytest.fixture
def drtool(state_root):
    """drtool(*argv, expect=0) -> Measured: a real process, its peak RSS kept for the final check."""
    runs: list[tuple[str, Measured]] = []

    def run(*argv: str, expect: int = ExitCode.OK) -> Measured:
        result = run_measured([sys.executable, "-m", "drtool", *argv], dict(os.environ), timeout=60,
                              rss_cap=CUT_RSS)
        runs.append((" ".join(argv[:2]), result))
        assert result.cut is None, f"drtool {' '.join(argv)}: {result.cut} (peak RSS {result.peak_rss >> 20} MiB)"
        assert result.code == expect, f"drtool {' '.join(argv)}: exit {result.code}: {result.stderr[-2000:]}"
        return result

    run.runs = runs
    return run


def test_a_15_tib_sparse_volume_end_to_end(tmp_path, state_root, replica_server, start_agent, drtool):
    rng = random.Random(15)
    model = Model()
    device = tmp_path / "dev.img"
    with open(device, "wb") as handle:
        handle.truncate(SIZE)
        for offset in EXTENTS:
            data = rng.randbytes(MiB)
            handle.seek(offset)
            handle.write(data)
            model.put(offset, data)

    init = drtool("init", "vol", "--device", str(device), "--region-size", "64K", "--json").json()
    assert init["size"] == SIZE and init["regions_total"] == REGIONS and init["era"] == 1

    # Writes through the agent's NBD export: inside an extent, a whole region in a hole, two hole
    # regions across their boundary, the volume's last 4 KiB.
    writes = [(EXTENTS[1] + 4096, rng.randbytes(4096)), (9 * TiB, rng.randbytes(RS)),
              (11 * TiB - 2048, rng.randbytes(4096)), (SIZE - 4096, rng.randbytes(4096))]
    agent = start_agent("vol")
    with RawClient(str(agent.sock)) as client:
        size, _ = client.connect("vol")
        assert size == SIZE
        for offset, data in writes:
            assert client.write(offset, data) == 0
            model.put(offset, data)
        assert client.command(p.Command.FLUSH) == 0
        for offset, data in writes:
            lo, hi = offset - 512, min(SIZE, offset + len(data) + 512)
            assert client.read(lo, hi - lo) == (0, model.get(lo, hi - lo))
    agent_hwm = _vm_hwm(agent.proc.pid)
    assert agent.stop() == 0

    assert drtool("checkpoint", "vol", "--json").json()["era"] == 2

    scrub = drtool("scrub", "vol", "--json").json()
    assert scrub["health"] == "ONLINE" and scrub["bad_regions"] == [] and scrub["regions_total"] == REGIONS
    assert scrub["regions_scanned"] == REGIONS  # every region verified: read, or proved zeros by a hole
    assert scrub["bytes_scanned"] <= 8 * MiB  # only the allocated extents are read (4 MiB + the writes)

    drtool("protect", "vol", "--peer", replica_server.url, "--token-file", str(replica_server.token_file), "--json")

    corrupt(device, BAD_REGION * RS + 777, b"\xde\xad\xbe\xef")
    scrub = drtool("scrub", "vol", "--json", expect=ExitCode.BAD_REGIONS).json()
    assert scrub["bad_regions"] == [[BAD_REGION, 1]] and scrub["new_bad_regions"] == [[BAD_REGION, 1]]
    assert scrub["health"] == "DEGRADED" and scrub["errors"]["checksum"] == 1

    recover = drtool("recover", "vol", "--json").json()
    assert recover["mode"] == "degraded" and recover["changed"] is True

    # Verified reads: the bad region comes from the replica, the rest from the device's extents
    # and holes; the agent's writes are there.
    for offset, length in [((BAD_REGION - 1) * RS, 3 * RS), (9 * TiB - 4096, RS + 8192),
                           (11 * TiB - 4096, 8192), (EXTENTS[1], 2 * RS), (SIZE - RS, RS), (5 * TiB, 4096)]:
        read = drtool("read", "vol", "--offset", str(offset), "--length", str(length))
        assert read.stdout_bytes == model.get(offset, length), f"read at {offset} + {length}"

    status = drtool("status", "vol", "--json").json()
    assert status["mode"] == "degraded" and status["regions_total"] == REGIONS
    assert status["bad_regions"] == [[BAD_REGION, 1]] and status["recovery"]["fetched_regions"] == 1

    failback = drtool("failback", "vol", "--json").json()
    assert failback["mode"] == "normal" and failback["regions_copied"] == 1
    with open(device, "rb") as handle:
        handle.seek(BAD_REGION * RS)
        assert handle.read(RS) == model.get(BAD_REGION * RS, RS)
    scrub = drtool("scrub", "vol", "--json").json()
    assert scrub["health"] == "ONLINE" and scrub["bad_regions"] == []
    status = drtool("status", "vol", "--json").json()
    assert status["mode"] == "normal" and status["health"] == "ONLINE" and status["overlay"]["regions"] == 0

    peaks = {name: result.peak_rss for name, result in drtool.runs}
    over = {name: f"{peak / MiB:.0f} MiB" for name, peak in peaks.items() if peak > COMMAND_RSS}
    assert not over, f"commands above {COMMAND_RSS >> 20} MiB of RSS on a 15 TiB volume: {over}"
    assert agent_hwm <= AGENT_RSS, f"the agent's peak RSS {agent_hwm / MiB:.0f} MiB > {AGENT_RSS >> 20} MiB"


def _vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_the_peak_rss_is_the_commands_own(tmp_path):
    """The launcher reports the command's own peak (a vfork'd child would inherit the caller's)."""
    ballast = bytearray(os.urandom(1024)) * (200 * 1024)  # this process: 200 MiB more
    small = run_measured([sys.executable, "-c", "pass"])
    big = run_measured([sys.executable, "-c", "b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096])"])
    assert small.code == 0 and small.peak_rss < 64 * MiB
    assert big.code == 0 and 300 * MiB <= big.peak_rss < 400 * MiB
    cut = run_measured([sys.executable, "-c", "b = bytearray(1 << 30); b[::4096] = b'x' * len(b[::4096])"],
                       rss_cap=256 * MiB)
    assert cut.cut and cut.code == -9
    assert len(ballast) == 200 * MiB  # alive until here
