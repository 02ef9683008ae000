"""The replica server killed (SIGKILL) in the middle of applying a large batch: the primary's
Replicator sees the batch fail, keeps its records, and once the server is back retries on its
own and converges, byte for byte, without applying any record twice."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import blake3
import pytest

from drtool import api
from drtool.engine import Engine
from drtool.errors import PeerError, PeerUnreachable
from drtool.replication import Replicator

RS = 65536
REGIONS = 1024  # the batch: 64 MiB, one record per region


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return value


def applied_state(replica_root) -> dict:
    with open(replica_root / "vol" / "applied.json", encoding="utf-8") as handle:
        return json.load(handle)


@pytest.mark.slow
def test_kill_in_the_middle_of_a_batch_then_the_replicator_converges(tmp_path, state_root, replica_server):
    path = tmp_path / "dev.img"
    with open(path, "wb") as handle:
        handle.truncate(REGIONS * RS)  # all zeros: the initial sync leaves the mirror without a block
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    mirror = replica_server.root / "vol" / "mirror.img"
    assert os.stat(mirror).st_blocks == 0
    synced = applied_state(replica_server.root)["watermark"]
    assert synced == 0  # the new replica is all zeros, like the volume: the sync ships nothing
    with replica_server.client() as c:
        c.create_snapshot("vol", "empty")

    content = random.Random(11).randbytes(REGIONS * RS)
    errors: list[Exception] = []
    stop = threading.Event()
    with Engine.open(None, "vol") as engine:
        replicator = Replicator(engine, batch_bytes=2 * REGIONS * RS)  # everything in one batch
        engine.write(0, content)
        batch_end = engine.log.next_seq - 1
        assert batch_end == synced + REGIONS and len(engine.log.pending()) == REGIONS
        loop = threading.Thread(target=replicator.run, args=(stop,),
                                kwargs={"interval": 0.05, "on_error": errors.append}, daemon=True)
        loop.start()
        try:
            # Freeze the server as soon as it writes the batch into the mirror ...
            wait_for(lambda: os.stat(mirror).st_blocks > 0, 60, "the apply to start")
            os.kill(replica_server.proc.pid, signal.SIGSTOP)
            # ... and prove it is mid-batch: bytes of the batch are in the mirror, yet nothing of it
            # is acknowledged (the applied state on disk is still the sync's).
            assert os.stat(mirror).st_blocks > 0
            assert applied_state(replica_server.root)["watermark"] == synced < batch_end
            assert not errors and len(engine.log.pending()) == REGIONS
            replica_server.stop(kill=True)  # SIGKILL while frozen in the middle of the apply

            wait_for(lambda: errors, 60, "the replicator to see the batch fail")
            assert all(isinstance(e, PeerError) for e in errors), errors
            assert isinstance(errors[0], PeerUnreachable), errors[0]  # (its wording: drtool.client.connect_failure)
            assert len(engine.log.pending()) == REGIONS  # nothing dropped
            assert engine.volume.unreplicated.popcount() == REGIONS
            assert applied_state(replica_server.root)["watermark"] == synced  # the kill applied nothing

            replica_server.start()  # same port: the Replicator's client is none the wiser
            wait_for(lambda: not engine.log.pending() and not engine.volume.unreplicated.any(), 120,
                     "the replicator to converge")
        finally:
            stop.set()
            loop.join(30)
        assert engine.record.replication.acked_through == batch_end

    assert mirror.read_bytes() == content
    replica_server.stop(kill=True)  # again, after the acknowledgement: the journal holds the batch
    replica_server.start()
    with replica_server.client() as c:
        info = c.volume_info("vol")
        assert info["applied_seq"] == batch_end and info["applied_ahead"] == []
        assert info["journal"]["records"] == batch_end
        expected = {r: blake3.blake3(content[r * RS:(r + 1) * RS]).digest() for r in range(REGIONS)}
        assert all(r.ok for r in c.read_regions("vol", [(0, REGIONS)], expected=expected.get))
        assert c.read_range("vol", 0, 2 * RS, snapshot="empty") == bytes(2 * RS)  # copy-on-write held
    replica_server.stop()  # a clean stop checkpoints: the applied state on disk says it all
    state = applied_state(replica_server.root)
    assert state["watermark"] == batch_end and state["ahead"] == []
    assert state["records"] == batch_end  # every record applied exactly once
