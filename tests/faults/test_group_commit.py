"""Group commit under kill -9 and a lost device cache: every write a FLUSH acknowledged survives.

A FLUSH makes the log durable, not the device (the log is the write-ahead log; the device is
synced by checkpoints), and concurrent flushes share one fdatasync.  Four writer threads in a
child process each write a 4 KiB block (partial writes: the region's base is read and verified
first), FLUSH, and only then record the block as acknowledged (fsync'ed to a side file).  The
child is killed with SIGKILL at a random moment; then the device file is put back as it was
before the child ran, as if none of its unsynced writes had reached the disk (the child never
checkpointed, so none was synced).  Opening the volume replays the log: every acknowledged
block must read back, and the volume must scrub clean.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from drtool import api
from drtool.engine import Engine
from tests.conftest import make_image

RS = 65536
REGIONS = 64
BLOCK = 4096

_CHILD = textwrap.dedent("""
    import os, struct, sys, threading
    from drtool.engine import Engine

    root, acked_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    engine = Engine.open(root, "vol")  # never closed or saved: the process is killed
    acked = os.open(acked_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    lock = threading.Lock()

    def writer(index):
        # Each thread has its own blocks (block % 4 == index): a block's writes are in order.
        number = 0
        while True:
            number += 1
            block = ((seed * 7919 + number * 104729) % ({regions} * 4)) * 4 + index
            engine.write(block * 4096, struct.pack("<II", index, number) * 512)
            engine.flush()
            with lock:  # acknowledged: recorded only after the flush returned
                os.write(acked, f"{{block}} {{index}} {{number}}\\n".encode())
                os.fsync(acked)

    for index in range(4):
        threading.Thread(target=writer, args=(index,), daemon=True).start()
    print("writing", flush=True)
    threading.Event().wait()
""").format(regions=REGIONS)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_flushed_write_survives_kill9_and_a_lost_device_cache(tmp_path, state_root, seed, fault_stats):
    path = tmp_path / "dev.img"
    make_image(path, REGIONS * RS, seed=seed)
    api.init_volume("vol", str(path), "64K")
    before = path.read_bytes()
    acked_path = tmp_path / "acked"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(state_root), str(acked_path), str(seed)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        # Kill once enough writes were acknowledged (each is a write and a flush), at a moment
        # the seed picks: a poll with a deadline, not a sleep.
        wanted = random.Random(seed).randint(20, 120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if acked_path.exists() and acked_path.read_text().count("\n") >= wanted:
                break
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    lines = acked_path.read_text().splitlines()
    assert len(lines) >= wanted
    path.write_bytes(before)  # the device lost every write it was not told to keep
    fault_stats.crash(phase="group-commit", target="writer threads", seed=seed, acknowledged=len(lines),
                      landed="after flushes")
    last: dict[int, tuple[int, int]] = {}
    for line in lines:
        block, index, number = map(int, line.split())
        last[block] = (index, number)
    with Engine.open(None, "vol") as engine:  # replays the log
        got = bytes(engine.read(0, REGIONS * RS))
    for block, (index, number) in last.items():
        piece = got[block * BLOCK:(block + 1) * BLOCK]
        fault_stats.checks["acknowledged block"] += 1
        stamp = struct.unpack_from("<II", piece)
        assert piece == piece[:8] * 512, f"block {block} is not one write's bytes"
        # The last acknowledged write of the block, or the one its thread had in flight after it.
        assert stamp[0] == index and stamp[1] >= number, (block, stamp, (index, number))
    untouched = set(range(REGIONS * 16)) - set(last)
    for block in list(untouched)[:200]:
        piece = got[block * BLOCK:(block + 1) * BLOCK]
        if piece != before[block * BLOCK:(block + 1) * BLOCK]:  # only an unacknowledged write
            assert struct.unpack_from("<I", piece)[0] == block % 4 and piece == piece[:8] * 512
    assert api.scrub_volume("vol")["bad_regions"] == []
