"""`make demo` tells the whole story and leaves nothing behind (README's first command)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_the_whole_incident_and_cleans_up():
    require_root()
    require_tool("mkfs.ext4", "debugfs", "e2fsck", "nbdcopy", "nbdfuse")
    run = subprocess.run([sys.executable, "demo/demo.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={"COLUMNS": "100", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                           "HOME": "/root"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    for step in ("1. A primary volume", "3. The disk lies", "4. Detect", "5. Recover", "6. Write during",
                 "7. Repair and fail back"):
        assert step in out
    # The merged read through the agent and the repaired device are both the written bytes.
    assert "identical: every byte was served verified" in out
    before, after = re.findall(r"blake3 of the (?:volume through the agent before failback|repaired device "
                               r"after failback): *\s*([0-9a-f]{32})", out)
    assert before == after
    assert "the filesystem is clean, the volume is ONLINE again" in " ".join(out.split())
    assert "everything under .demo/ is gone" in out and not (ROOT / ".demo").exists()
