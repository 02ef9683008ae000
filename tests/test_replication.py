"""Primary-to-secondary replication over real HTTP to a real `drtool serve`."""

import json

import pytest

from drtool import api
from drtool.engine import Engine
from drtool.errors import ExitCode
from drtool.replication import Replicator
from tests.conftest import make_image, state_files

RS = 65536
SIZE = 24 * RS + 777  # partial last region


@pytest.fixture
def protected(tmp_path, state_root, replica_server):
    path = tmp_path / "dev.img"
    data = bytearray(make_image(path, SIZE, sparse_every=3))
    api.init_volume("vol", str(path), "64K")
    result = api.protect("vol", replica_server.url, str(replica_server.token_file))
    # The new replica is all zeros: the initial sync ships only the regions that are not.
    nonzero = sum(1 for r in range(25) if any(data[r * RS:(r + 1) * RS]))
    assert result["changed"] and result["regions_synced"] == result["plan"]["regions"] == nonzero < 25
    return path, data


def replica_bytes(server, size=SIZE):
    return server.client().read_range("vol", 0, size)


WRITES = [(RS - 3, b"A" * 10), (2 * RS, b"B" * RS), (5 * RS + 100, b"C" * (3 * RS)),
          (SIZE - 50, b"D" * 50), (10, b"E" * 5)]


def test_initial_sync_copies_the_volume_and_keeps_zeros_sparse(protected, replica_server):
    _, data = protected
    assert replica_bytes(replica_server) == bytes(data)
    info = replica_server.client().volume_info("vol")
    assert info["size"] == SIZE


def test_writes_then_replicate_make_the_replica_exact(protected, replica_server, cli):
    path, data = protected
    for offset, chunk in WRITES:
        api.write("vol", offset, chunk)
        data[offset:offset + len(chunk)] = chunk
    status = cli("status", "vol", "--json").json()
    assert status["lag"]["records"] == 9 and status["lag"]["regions"] == 8  # regions 0-2, 5-8, 24
    assert status["peer"] == {"url": replica_server.url, "reachable": True, "error": None,
                              "token_file": str(replica_server.token_file), "ca": None}
    result = cli("replicate", "vol", "--json")
    assert result.code == 0 and result.json()["lag"]["records"] == 0
    assert replica_bytes(replica_server) == bytes(data) == path.read_bytes()
    assert cli("status", "vol", "--json").json()["lag"]["regions"] == 0


def test_restart_both_sides_between_writes(protected, replica_server):
    _, data = protected
    api.write("vol", 3 * RS + 5, b"before restart")
    data[3 * RS + 5:3 * RS + 19] = b"before restart"
    replica_server.stop()
    replica_server.start()
    api.write("vol", 7 * RS, b"after")
    data[7 * RS:7 * RS + 5] = b"after"
    api.replicate("vol")
    assert replica_bytes(replica_server) == bytes(data)


def test_unreachable_peer_keeps_the_lag_and_converges_later(protected, replica_server, cli):
    _, data = protected
    api.write("vol", 4 * RS, b"q" * 1000)
    data[4 * RS:4 * RS + 1000] = b"q" * 1000
    replica_server.stop(kill=True)
    result = cli("replicate", "vol")
    assert result.code == ExitCode.PEER and "drtool: " in result.err
    status = cli("status", "vol", "--json").json()
    assert status["peer"]["reachable"] is False and status["lag"]["regions"] == 1
    replica_server.start()
    assert cli("replicate", "vol", "--wait").code == 0
    assert replica_bytes(replica_server) == bytes(data)


def test_forced_regions_leave_other_records_pending(protected, replica_server):
    _, data = protected
    api.write("vol", 1 * RS, b"one")
    api.write("vol", 8 * RS, b"eight")
    api.write("vol", 1 * RS + 10, b"one again")
    result = api.replicate("vol", regions="1")
    assert result["forced_regions"] == [[1, 1]]
    assert result["lag"]["regions"] == 1 and result["lag"]["records"] == 1
    mirror = replica_bytes(replica_server)
    assert mirror[RS:RS + 3] == b"one" and mirror[RS + 10:RS + 19] == b"one again"
    assert mirror[8 * RS:8 * RS + 5] == bytes(data[8 * RS:8 * RS + 5])  # still the old bytes
    api.replicate("vol")
    assert replica_bytes(replica_server)[8 * RS:8 * RS + 5] == b"eight"


def test_lag_counts_exactly_what_is_pending_on_disk_and_after_a_restart(protected, replica_server, state_root):
    """Forced records are acknowledged out of order: neither the files nor a reopened engine
    count them as pending; bytes are the pending records' sizes; the age is the oldest write's."""
    import os
    import time

    from drtool.wire import RECORD_HEADER_SIZE

    api.write("vol", 8 * RS, b"eight")  # stays pending: the oldest unacknowledged write
    api.write("vol", 1 * RS, b"one")  # forced below, ahead of the older record
    api.write("vol", 9 * RS, b"nine!")
    written_before = time.time()
    api.replicate("vol", regions="1")
    lag = api.status("vol")[0]["lag"]  # no agent: from the files
    assert (lag["records"], lag["regions"]) == (2, 2)
    assert lag["bytes"] == 2 * RECORD_HEADER_SIZE + 5 + 5
    oldest = lag["oldest_seconds"]
    assert 0 <= oldest and time.time() - oldest <= written_before  # as old as the write, at least
    # The segment file is touched later: the age is still the oldest write's, not the file's.
    os.utime(next((state_root / "vol" / "log").glob("seg-*.log")))
    assert api.status("vol")[0]["lag"]["oldest_seconds"] >= oldest
    with Engine.open(None, "vol") as engine:  # a restart: the forced record is not pending again
        assert [e.header.length for e in engine.log.pending()] == [5, 5]
        stamp = engine.log.oldest_entry().stamp
        assert stamp <= written_before
    api.replicate("vol")
    lag = api.status("vol")[0]["lag"]
    assert (lag["records"], lag["bytes"], lag["regions"], lag["oldest_seconds"]) == (0, 0, 0, 0.0)


def test_log_overflow_switches_to_bitmap_mode_and_converges(protected, replica_server, state_root):
    _, data = protected
    with Engine.open(None, "vol") as engine:
        engine.record.settings["log_limit"] = 3 * RS
        Replicator(engine)
        for region in range(2, 12):
            chunk = bytes([region]) * RS
            engine.write(region * RS, chunk)
            data[region * RS:(region + 1) * RS] = chunk
        assert engine.record.replication.get("overflows", 0) >= 1
        assert engine.volume.norecord.popcount() > 0
    status = api.status("vol")[0]
    assert status["lag"]["bitmap_mode"] and "BITMAP MODE" in status["lag"]["summary"]
    api.replicate("vol", wait=True)
    assert replica_bytes(replica_server) == bytes(data)
    assert not api.status("vol")[0]["lag"]["bitmap_mode"]


def test_protect_again_is_idempotent(protected, replica_server):
    again = api.protect("vol", replica_server.url, str(replica_server.token_file))
    assert again["changed"] is False and again["records_shipped"] == 0


def test_write_command_reads_stdin(protected, replica_server, state_root):
    from tests.conftest import run_drtool

    done = run_drtool("write", "vol", "--offset", "64K", "--sync", "--json", input=b"hello",
                      env={"DRTOOL_STATE_ROOT": str(state_root)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["length"] == 5
    api.replicate("vol")
    assert replica_bytes(replica_server)[RS:RS + 5] == b"hello"


def test_interrupted_initial_sync_resumes_where_it_stopped(tmp_path, state_root, replica_server, monkeypatch):
    from drtool import replication
    from drtool.errors import PeerError

    path = tmp_path / "big.img"
    data = make_image(path, 64 * RS)
    api.init_volume("vol", str(path), "64K")
    sent = []
    real = replication.Replicator._send

    def cut_after_three_batches(self, batch, complete):
        if len(sent) == 3:
            replica_server.stop(kill=True)  # the secondary vanishes mid-sync
        sent.append(len(batch))
        return real(self, batch, complete)

    monkeypatch.setattr(replication, "BATCH_BYTES", 8 * RS)
    monkeypatch.setattr(replication.Replicator, "_send", cut_after_three_batches)
    with pytest.raises(PeerError):
        api.protect("vol", replica_server.url, str(replica_server.token_file))
    monkeypatch.setattr(replication.Replicator, "_send", real)
    replica_server.start()
    plan = api.protect("vol", replica_server.url, str(replica_server.token_file), plan_only=True)["plan"]
    assert plan["mode"] == "resume" and 0 < plan["regions"] < 64
    result = api.protect("vol", replica_server.url, str(replica_server.token_file))
    assert result["regions_synced"] == plan["regions"]
    assert replica_server.client().read_range("vol", 0, 64 * RS) == data


def test_a_plan_and_a_check_mode_scrub_change_no_state_file(tmp_path, state_root, replica_server):
    path = tmp_path / "dev.img"
    make_image(path, SIZE)
    api.init_volume("vol", str(path), "64K")
    before = state_files(state_root, mtimes=True)
    plan = api.protect("vol", replica_server.url, str(replica_server.token_file), plan_only=True)
    assert plan["changed"] is False and plan["plan"]["mode"] == "full" and plan["plan"]["regions"] == 25
    assert api.scrub_volume("vol", record=False)["health"] == "ONLINE"
    assert state_files(state_root, mtimes=True) == before


def test_a_plan_for_an_unpaired_volume_under_a_running_agent(tmp_path, state_root, replica_server, start_agent):
    path = tmp_path / "dev.img"
    make_image(path, SIZE)
    api.init_volume("vol", str(path), "64K")
    start_agent("vol")
    plan = api.protect("vol", replica_server.url, str(replica_server.token_file), plan_only=True)
    assert plan["plan"]["regions"] == 25 and plan["changed"] is False
    assert api.status("vol")[0]["peer"] is None  # nothing paired
    result = api.protect("vol", replica_server.url, str(replica_server.token_file))  # then for real
    assert result["changed"] and result["regions_synced"] == 25


def test_an_idle_volume_sees_its_peer_come_back(protected, replica_server, state_root):
    """With nothing to ship, the replicator's identity check is what talks to the server: a
    server that answers again is reachable again (status and metrics said unreachable until
    the next write)."""
    from drtool.errors import PeerError

    with Engine.open(str(state_root), "vol") as engine:
        replicator = Replicator(engine)
        replica_server.stop(kill=True)
        with pytest.raises(PeerError):
            replicator.ship_batch()
        assert replicator.reachable is False and replicator.last_error
        replica_server.start()
        assert replicator.ship_batch() == 0  # nothing pending: only the check ran
        assert replicator.reachable is True and replicator.last_error is None
