"""A server killed (SIGKILL) while it applies a large batch converges when the batch is resent."""

from __future__ import annotations

import os
import random
import threading

import blake3
import pytest

from drtool.errors import PeerError
from tests.replica.conftest import VOLUME_ID, ServerProcess, write

RS = 65536
REGIONS = 1024  # a 64 MiB batch


@pytest.mark.slow
def test_kill_during_a_large_batch_then_resend_converges(server: ServerProcess) -> None:
    rng = random.Random(11)
    content = rng.randbytes(REGIONS * RS)
    chunks = [c for r in range(REGIONS) for c in write(r + 1, r * RS, content[r * RS:(r + 1) * RS])]
    with server.client() as c:
        c.ensure_volume("vol", REGIONS * RS, RS, VOLUME_ID)
        c.create_snapshot("vol", "empty")
    mirror = server.root / "vol" / "mirror.img"
    outcome: list[object] = []

    def send() -> None:
        with server.client(retries=0) as c:
            try:
                outcome.append(c.send_records("vol", chunks))
            except PeerError as exc:
                outcome.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    # Kill as soon as the apply has started writing the mirror (or the batch finished first).
    while not outcome and os.stat(mirror).st_blocks == 0:
        sender.join(0.001)
    server.kill()
    sender.join(30)
    server.start()
    with server.client() as c:
        result = c.send_records("vol", chunks)
        assert result["applied_seq"] == REGIONS
        info = c.volume_info("vol")
        assert info["journal"]["records"] == REGIONS and info["applied_ahead"] == []
        expected = {r: blake3.blake3(content[r * RS:(r + 1) * RS]).digest() for r in range(REGIONS)}
        assert all(r.ok for r in c.read_regions("vol", [(0, REGIONS)], expected=expected.get))
        assert c.read_range("vol", 0, 4096, snapshot="empty") == bytes(4096)
    assert mirror.read_bytes() == content
