"""The secondary loses the replica, and `protect` runs again (issue 11, item 1): no test held this
promise ("the replica is never called in sync without evidence") yet; this one shows it broken
today, and that `drtool verify` is the evidence that catches it."""

from __future__ import annotations

from pathlib import Path

import pytest

from drtool import api

RS = 65536


def test_protect_after_the_replica_was_lost_resyncs_or_refuses(protect_volume, replica_server):
    path, data = protect_volume(16 * RS, seed=5)
    with replica_server.client() as client:
        client.delete_volume("vol")  # a wiped replica root, a replaced disk on the secondary
    with pytest.raises(Exception, match="holds no replica of vol"):  # before protect, verify says so
        api.verify_volume("vol")
    try:
        protected = api.protect("vol", replica_server.url, str(replica_server.token_file))
    except Exception as exc:  # noqa: BLE001 - a refusal that says what to run is acceptable
        assert "protect" in str(exc) or "resync" in str(exc), exc
        return
    api.replicate("vol", wait=True, timeout=60)
    mirror = Path(replica_server.root) / "vol" / "mirror.img"
    status = api.status("vol")[0]
    verified = api.verify_volume("vol")
    assert mirror.read_bytes() == data, (protected["plan"], status["protection"], verified["differ"])
    assert verified["result"] == "equal"
