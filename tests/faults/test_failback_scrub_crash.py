"""kill -9 while failback scrubs the new device, after a checkpoint saved the record.

`failback --device NEW` first points the engine at NEW (`Engine.use_device`, which sets
`record.device` in memory), then scrubs NEW to learn which regions it must copy; the scrub's
findings (the bad map) are applied and saved only at its end.  In a running agent the checkpoint
thread saves the record every 2 s while writes come in (drtool/agent.py `_checkpoint_loop`), so
during a long scrub (every region NEW holds data in is read and hashed: hours on a large disk)
`volume.json` gets `device: NEW` with the old bad map.  Killed then, the failback run again
compares `--device NEW` with the record (drtool/failback.py `_prepare`: `new_device = device !=
record.device`), finds them equal, skips the scrub, and copies only the old bad and overlay
regions.

Here the process that runs the failback is the engine's own (a subprocess, so it can be killed
with SIGKILL); the checkpoint is the same `Engine.save` the agent's thread calls, made at the
start of the scrub, and the kill comes right after it.

Fixed: `Engine.use_device` records the new device's scrub as pending in the failback sub-record
(`failback.scrub_pending`), saved before `record.device` changes; only a scrub whose findings
are saved clears it, and `_prepare` scrubs whenever it is pending.
"""

from __future__ import annotations

import os
import subprocess
import sys

from drtool import api

RS = 65536
REGIONS = 16

FAILBACK_KILLED_IN_SCRUB = r"""
import os, signal, sys
from drtool import failback
from drtool.engine import Engine

with Engine.open(None, "vol") as engine:
    def scrub_with_a_checkpoint_then_kill(*args, **kwargs):
        engine.save()  # what the agent's checkpoint thread does every 2 s while writes arrive
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 before the scrub's findings are saved
    engine.scrub = scrub_with_a_checkpoint_then_kill
    failback.failback(engine, device=sys.argv[1])
"""


def test_failback_killed_while_scrubbing_the_new_device_copies_every_region_it_lacks(
        protect_volume, tmp_path, state_root):
    path, data = protect_volume(REGIONS * RS, seed=3)
    api.recover("vol")
    new = tmp_path / "new.img"
    with open(new, "wb") as handle:
        handle.truncate(REGIONS * RS)  # a blank replacement disk
    killed = subprocess.run([sys.executable, "-c", FAILBACK_KILLED_IN_SCRUB, str(new)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "DRTOOL_STATE_ROOT": str(state_root)})
    assert killed.returncode == -9, killed.stderr
    status = api.status("vol", probe_peer=False)[0]
    assert (status["mode"], status["device"]) == ("degraded", str(new))  # the checkpoint's record
    assert status["failback"]["scrub_pending"] == str(new)  # saved before the device switched

    result = api.failback("vol", device=str(new))
    status = api.status("vol", probe_peer=False)[0]
    zeros = sum(new.read_bytes()[r * RS:(r + 1) * RS] == bytes(RS) for r in range(REGIONS))
    assert (result["regions_copied"], zeros) == (REGIONS, 0), (result, status["health"], status["mode"])
    assert new.read_bytes() == data
