"""A damaged replication log is never believed shipped: the engine marks the regions of lost
records to ship whole from the volume, status says the log is damaged until then, and after
replication the replica holds the bytes the primary acknowledged (issue 11, item 3)."""

import os

import pytest

from drtool import api
from drtool.engine import Engine

RS = 64 * 1024


def _segment(state_root):
    log_dir = state_root / "vol" / "log"
    return log_dir / sorted(n for n in os.listdir(log_dir) if n.startswith("seg-"))[-1]


@pytest.mark.parametrize("in_header", [False, True], ids=["data", "header"])
def test_a_flipped_byte_in_a_pending_record_ships_its_region_whole(protect_volume, state_root, replica_server,
                                                                    in_header):
    protect_volume(16 * RS)
    payload = {3: b"\x33" * RS, 9: b"\x99" * RS}
    with Engine.open(str(state_root), "vol") as engine:  # no replicator: the records stay pending
        for region, data in payload.items():
            engine.write(region * RS, data, fua=True)
    segment = _segment(state_root)
    raw = bytearray(segment.read_bytes())
    if in_header:
        where = raw.rfind(b"DRTR") + 20  # region 9's record header (its offset field)
    else:
        where = raw.rfind(b"\x99" * 64)  # inside region 9's record data
    raw[where] ^= 0x01
    segment.write_bytes(raw)

    if in_header:  # status reads headers only (no lock, no data digests): it sees this one
        before = api.status("vol")[0]
        assert before["lag"]["summary"].startswith("REPLICATION LOG DAMAGED"), before["lag"]

    with Engine.open(str(state_root), "vol") as engine:
        assert engine.volume.norecord.test(9) and engine.volume.unreplicated.test(9)
        assert engine.record.history[-1]["event"] == "log-damage"
        assert engine.read(9 * RS, RS) == payload[9]  # the device holds the acknowledged write
    after = api.status("vol")[0]
    assert "DAMAGED" not in after["lag"]["summary"]  # accounted for: not reported again

    api.replicate("vol", wait=True)
    assert api.status("vol")[0]["lag"]["summary"] == "in sync"
    client = replica_server.client()
    for region, data in payload.items():
        assert client.read_range("vol", region * RS, RS) == data
