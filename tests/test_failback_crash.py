"""Failback under a crash: a write acknowledged (and flushed) during resync, into a region failback
has already copied, then kill -9 of the agent in the middle of the failback (issue 11, item 5).

Real processes: the agent serves the volume, the failback runs in it (the CLI is a client of its
control socket), qemu-io writes and flushes through the NBD export, the agent is killed with
SIGKILL and started again, and the failback is finished."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from drtool import api
from tests.conftest import DRTOOL, make_image, require_tool

pytestmark = pytest.mark.slow

RS = 65536
REGIONS = 512  # two failback batches of 256 regions (16 MiB): at 2M/s, 8 s between them
SIZE = REGIONS * RS
WRITTEN = 5  # qemu-io's "write -P 0xab 327680 65536": region 5, in the first batch


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def in_runs(region: int, runs) -> bool:
    return any(start <= region < start + count for start, count in runs)


def test_write_acknowledged_during_failback_survives_kill_dash_nine(tmp_path, state_root, replica_server,
                                                                   start_agent, cli):
    require_tool("qemu-io")
    path = tmp_path / "dev.img"
    data = bytearray(make_image(path, SIZE, seed=11))
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    agent = start_agent("vol")
    assert cli("recover", "vol").code == 0
    new = tmp_path / "new.img"
    with open(new, "wb") as handle:
        handle.truncate(SIZE)  # a blank replacement: every region is copied from the replica

    env = {**os.environ, "DRTOOL_STATE_ROOT": str(state_root)}
    failback = subprocess.Popen([*DRTOOL, "failback", "vol", "--device", str(new), "--rate", "2M"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        def first_batch_copied():
            status = api.status("vol", probe_peer=False)[0]
            return (status["mode"] == "resync" and status["failback"]["done_regions"] > WRITTEN
                    and not in_runs(WRITTEN, status["maps"]["resync"]))

        wait_for(first_batch_copied, 60, "failback to copy region 5")
        assert new.read_bytes()[WRITTEN * RS:(WRITTEN + 1) * RS] == data[WRITTEN * RS:(WRITTEN + 1) * RS]
        written = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0xab {WRITTEN * RS} {RS}",
                                  "-c", "flush", agent.uri()], capture_output=True, text=True, timeout=60)
        assert written.returncode == 0, written.stderr
        agent.proc.send_signal(signal.SIGKILL)  # at once: before the agent's next checkpoint
        agent.stop()
        failback.wait(timeout=60)
        assert failback.returncode != 0  # it ran in the agent, which died under it
        assert failback.poll() is not None
    finally:
        if failback.poll() is None:
            failback.kill()
            failback.wait()
        failback.stdout.close()
        failback.stderr.close()
    data[WRITTEN * RS:(WRITTEN + 1) * RS] = b"\xab" * RS

    # Restarted, the agent knows the region is in the overlay and must be copied back again.
    start_agent("vol")
    status = api.status("vol", probe_peer=False)[0]
    assert status["mode"] == "resync"
    assert in_runs(WRITTEN, status["maps"]["overlay"]) and in_runs(WRITTEN, status["maps"]["resync"])

    result = cli("failback", "vol", "--json")
    assert result.code == 0, result.err
    status = api.status("vol", probe_peer=False)[0]
    assert status["mode"] == "normal"
    assert status["maps"]["overlay"] == [] and status["maps"]["resync"] == []
    failback_info = status["failback"]
    assert failback_info["done_regions"] == failback_info["total_regions"] == REGIONS + 1  # region 5 twice
    assert api.read("vol", WRITTEN * RS, RS) == b"\xab" * RS
    assert new.read_bytes() == bytes(data)

    assert cli("replicate", "vol", "--wait").code == 0
    assert replica_server.client().read_range("vol", 0, SIZE) == bytes(data)
