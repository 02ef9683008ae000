"""The engine's one commit routine, the interface its helpers get, and protect's scale rules."""

import ast
from pathlib import Path

import blake3
import pytest

from drtool import api
from drtool.engine import Engine
from drtool.engine.changes import DEVICE, MIRROR, RegionChange
from drtool.replication import Replicator, fast_sync_plan, known_all_zero, protect
from drtool.storage.maps import zero_digest
from drtool.wire import KIND_ZERO
from tests.conftest import make_image

RS = 65536
SIZE = 8 * RS

HELPERS = ("fetch.py", "replication.py", "failback.py", "roles.py")


@pytest.fixture
def engine(tmp_path, state_root):
    path = tmp_path / "dev.img"
    make_image(path, SIZE)
    api.init_volume("vol", str(path), "64K")
    with Engine.open(None, "vol") as opened:
        yield opened


def test_a_logged_whole_region_change_on_the_device_updates_every_map(engine):
    volume = engine.volume
    for bitmap in (volume.bad, volume.ioerror, volume.norecord):
        bitmap.set(3)
    era = engine.checkpoint()
    data = bytes([7]) * RS
    seq = engine.commit_region(RegionChange(3, 3 * RS, RS, data, blake3.blake3(data).digest(), MIRROR, DEVICE))
    assert seq == engine.log.next_seq - 1 and seq not in engine.inflight and engine.covered_seq() == seq
    assert engine.read_region(3) == data
    assert volume.manifest.matches(3, blake3.blake3(data).digest()) and volume.eras[3] == era
    assert not volume.bad.test(3) and not volume.ioerror.test(3) and not volume.norecord.test(3)
    assert not volume.unreplicated.test(3)  # not protected: nothing to replicate


def test_a_relog_changes_no_content_and_a_zero_region_logs_a_zero_record(engine):
    volume = engine.volume
    engine.write_zeroes(2 * RS, RS)
    era_before = volume.eras[2]
    volume.norecord.set(2)
    engine.checkpoint()
    seq = engine.relog_region(2)
    entry = engine.log.entries[seq]
    assert entry.header.kind == KIND_ZERO and not volume.norecord.test(2)
    assert volume.eras[2] == era_before and volume.manifest[2] == zero_digest(RS)


def test_a_failed_device_write_changes_no_map_and_leaves_nothing_in_flight(engine):
    volume = engine.volume
    before = volume.manifest[4]
    engine.device.close()
    engine.device = None
    with pytest.raises(Exception):
        engine.commit_region(RegionChange(4, 4 * RS, RS, b"x" * RS, b"d" * 32, MIRROR, DEVICE))
    assert volume.manifest[4] == before and not engine.inflight


def test_helpers_use_only_the_engines_public_interface():
    """drtool.fetch, replication, failback and roles: no engine private name, no engine lock."""
    root = Path(__file__).resolve().parent.parent / "drtool"
    for name in HELPERS:
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "engine":
                assert not node.attr.startswith("_"), f"{name}: engine.{node.attr}"
                assert node.attr not in ("meta", "stripes", "seq_lock", "device", "overlay"), f"{name}: engine.{node.attr}"
            if isinstance(node, ast.arg) and node.arg == "engine":
                assert ast.unparse(node.annotation) != "Any", f"{name}: an engine typed Any"


def test_fast_sync_plan_follows_the_eras_and_the_divergent_runs(engine):
    from drtool.storage.records import Promoted

    era = engine.checkpoint()
    engine.record.promoted = Promoted(time=1.0, era=era, applied_seq=0, forced=False, takeover=False,
                                      released=None, last_record_at=None, lost=None)
    engine.write(5 * RS + 1, b"x")
    peer = {"volume_id": engine.record.volume_id, "adopted": {"url": "u", "divergent": [[1, 2]]}}
    assert list(fast_sync_plan(engine, peer)) == [1, 2, 5]
    assert fast_sync_plan(engine, {**peer, "adopted": None}) is None


@pytest.mark.parametrize("description, zero", [
    (None, True),  # it does not exist yet: the server creates it empty
    ({"applied_seq": 0, "applied_ahead": [], "region_count": 8, "zero_regions": 8}, True),
    ({"applied_seq": 3, "applied_ahead": [], "region_count": 8, "zero_regions": 8}, False),
    ({"applied_seq": 0, "applied_ahead": [], "region_count": 8, "zero_regions": 7}, False),
    ({"applied_seq": 0, "region_count": 8}, False),  # no evidence
])
def test_a_replica_is_called_all_zero_only_with_evidence(description, zero):
    assert known_all_zero(description) is zero


def test_a_full_sync_into_a_replica_with_content_ships_every_region(tmp_path, state_root, replica_server):
    path = tmp_path / "dev.img"
    path.write_bytes(bytes(SIZE))  # all zeros here ...
    api.init_volume("vol", str(path), "64K")
    client = replica_server.client()
    # ... but the replica already holds something: a write shipped by a former pairing.
    with Engine.open(None, "vol") as opened:
        client.ensure_volume("vol", SIZE, RS, opened.record.volume_id)
        opened.write(RS, b"old bytes")
        opened.record.peer = {"url": replica_server.url, "token_file": str(replica_server.token_file), "ca": None}
        Replicator(opened, client).ship()
        opened.record.peer = None
        opened.write(RS, bytes(9))  # zeros again here, not on the replica
        result = protect(opened, "http://127.0.0.1:1", None, client=client)
    assert result["plan"] == {"mode": "full", "regions": 8, "bytes": 8 * RS}
    assert client.read_range("vol", 0, SIZE) == bytes(SIZE)


def test_protect_of_a_sparse_15_tib_volume_ships_only_its_data(tmp_path, state_root, replica_server):
    """251M regions, three of them written: the plan, the sync, the lag, recovery and failback
    follow the regions in use."""
    size = 15 << 40
    path = tmp_path / "big.img"
    try:
        with open(path, "wb") as handle:
            handle.truncate(size)
            for offset in (0, size // 3, size - RS):
                handle.seek(offset)
                handle.write(b"x" * RS)
    except OSError as exc:  # a filesystem without files this large
        pytest.skip(f"cannot make a 15 TiB sparse file here: {exc}")
    api.init_volume("vol", str(path), "64K")
    result = api.protect("vol", replica_server.url, str(replica_server.token_file))
    assert result["plan"] == {"mode": "full", "regions": 3, "bytes": 3 * RS}
    assert result["regions_synced"] == 3 and result["records_shipped"] == 3
    status = api.status("vol", probe_peer=False)[0]
    assert status["lag"]["summary"] == "in sync" and status["replication"]["initial_sync"] == "done"
    assert replica_server.client().read_range("vol", size // 3, RS) == b"x" * RS
    # ... and an incident: one region damaged, recovered from the replica, written, failed back.
    with open(path, "r+b") as handle:
        handle.seek(size // 3)
        handle.write(b"y" * 100)
    assert api.scrub_volume("vol")["bad_regions"] == [[size // 3 // RS, 1]]
    assert api.recover("vol")["requested_count"] == 1
    assert api.read("vol", size // 3, RS) == b"x" * RS
    api.write("vol", 7 * RS, b"z" * 10)
    result = api.failback("vol")
    assert result["mode"] == "normal" and result["regions_copied"] == 2
    assert api.replicate("vol", wait=True)["lag"]["summary"] == "in sync"
    assert replica_server.client().read_range("vol", 7 * RS, 10) == b"z" * 10
