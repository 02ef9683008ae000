"""Pairing by replica identity (issue 11, item 1): the server gives each replica a generation when
it creates it; the primary keeps it with the pairing and never calls a replica in sync that is not
the one it filled (deleted, a wiped root, a replaced disk), nor resyncs the same replica reached
under another URL."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from drtool import api
from drtool.replication import identity_problem
from drtool.storage.record import VolumeRecord

RS = 65536


def _paired_generation() -> str | None:
    """The generation kept with the pairing (volume.json's peer; status does not show it)."""
    state_dir = api.status("vol", probe_peer=False)[0]["state_dir"]
    return json.loads((Path(state_dir) / "volume.json").read_text())["peer"].get("generation")


def _mirror(replica_server) -> bytes:
    return (Path(replica_server.root) / "vol" / "mirror.img").read_bytes()


def test_a_replica_has_a_generation_kept_across_restarts(protect_volume, replica_server):
    protect_volume(4 * RS, seed=2)
    with replica_server.client() as client:
        generation = client.volume_info("vol")["generation"]
    assert isinstance(generation, str) and len(generation) == 32
    assert _paired_generation() == generation
    replica_server.stop()
    replica_server.start()
    with replica_server.client() as client:
        assert client.volume_info("vol")["generation"] == generation


def test_delete_then_protect_plans_a_full_resync_and_copies_every_byte(protect_volume, replica_server):
    path, data = protect_volume(16 * RS, seed=5, sparse_every=3)
    with replica_server.client() as client:
        old = client.volume_info("vol")["generation"]
        client.delete_volume("vol")
    planned = api.protect("vol", replica_server.url, str(replica_server.token_file), plan_only=True)
    assert planned["plan"]["mode"] == "full" and "lost" in planned["plan"]["reason"]
    protected = api.protect("vol", replica_server.url, str(replica_server.token_file))
    plan = protected["plan"]
    assert protected["changed"] is True and plan["mode"] == "full" and "lost" in plan["reason"], protected
    nonzero = sum(1 for r in range(16) if any(data[r * RS:(r + 1) * RS]))
    assert plan["regions"] == nonzero  # a new empty replica: only the non-zero regions ship
    api.replicate("vol", wait=True, timeout=60)
    assert _mirror(replica_server) == bytes(data)
    status = api.status("vol")[0]
    assert _paired_generation() not in (None, old)
    assert status["replication"]["initial_sync"] == "done" and "lost" in status["replication"]["reason"]
    assert api.verify_volume("vol")["result"] == "equal"
    # Protect again: the same replica now, nothing to do.
    again = api.protect("vol", replica_server.url, str(replica_server.token_file))
    assert again["changed"] is False and again["plan"]["mode"] == "resume"


def test_the_same_server_under_another_name_resumes(protect_volume, replica_server):
    protect_volume(8 * RS, seed=7)
    other = replica_server.url.replace("127.0.0.1", "localhost")
    assert other != replica_server.url
    result = api.protect("vol", other, str(replica_server.token_file))
    assert result["plan"]["mode"] == "resume" and result["plan"]["regions"] == 0, result
    assert result.get("records_shipped") == 0 and result.get("regions_synced") == 0
    assert api.status("vol")[0]["peer"]["url"] == other.rstrip("/")


def test_a_replica_behind_what_was_acknowledged_is_not_in_sync():
    record = VolumeRecord.__new__(VolumeRecord)
    from drtool.storage.records import Replication

    record.volume_id = "ab" * 16
    record.peer = {"url": "http://h:1", "generation": "g1"}
    record.replication = Replication(initial_sync="done", acked_through=40)
    record.failback = None
    record.mode = "normal"
    info = {"volume_id": "ab" * 16, "generation": "g1", "applied_seq": 40, "applied_ahead": []}
    assert identity_problem(record, info, "http://other:2", 40) is None
    assert "applied records up to sequence 12" in identity_problem(record, {**info, "applied_seq": 12},
                                                                   "http://h:1", 40)
    assert "replaced" in identity_problem(record, {**info, "generation": "g2"}, "http://h:1", 40)
    assert "lost" in identity_problem(record, None, "http://h:1", 40)
    legacy = {"url": "http://h:1"}  # paired before generations: known by URL
    record.peer = legacy
    assert identity_problem(record, info, "http://h:1", 40) is None
    assert identity_problem(record, info, "http://x:1", 40) is not None


def _qemu_io(uri: str, *commands: str) -> subprocess.CompletedProcess:
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    return subprocess.run([*argv, uri], capture_output=True, text=True, timeout=120)


def test_a_wiped_replica_root_under_a_running_agent_is_resynced(protect_volume, replica_server, start_agent, cli):
    path, data = protect_volume(16 * RS, seed=9)
    agent = start_agent("vol")
    replica_server.stop(kill=True)
    shutil.rmtree(replica_server.root)  # a replaced disk on the secondary
    Path(replica_server.root).mkdir()
    replica_server.start()
    result = _qemu_io(agent.uri(), "write -P 0x5c 70k 8k", "flush")
    assert result.returncode == 0, result.stderr
    data[70 * 1024:78 * 1024] = b"\x5c" * 8192
    deadline = time.monotonic() + 30
    while True:  # the agent's replicator notices on its own: its next batch finds no replica
        status = cli("status", "vol", "--json").json()
        replication = status["replication"]
        if replication.get("reason") and replication.get("initial_sync") == "done" and \
                status["lag"]["records"] == 0 and not status["lag"].get("regions"):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert "lost" in replication["reason"]
    assert _mirror(replica_server) == bytes(data)
    assert cli("verify", "vol").code == 0


def test_replicate_wait_checks_the_replica_even_with_nothing_pending(protect_volume, replica_server,
                                                                      start_agent, cli):
    path, data = protect_volume(8 * RS, seed=11)
    start_agent("vol")
    replica_server.stop(kill=True)
    shutil.rmtree(replica_server.root)
    Path(replica_server.root).mkdir()
    replica_server.start()
    assert cli("replicate", "vol", "--wait").code == 0  # not "in sync" on an empty replica: resynced
    status = cli("status", "vol", "--json").json()
    assert "lost" in status["replication"]["reason"]
    assert _mirror(replica_server) == bytes(data)


def test_a_replica_restored_from_an_older_copy_is_resynced(protect_volume, replica_server, start_agent, cli,
                                                           tmp_path):
    """Same volume id and generation, but it applied less than the primary had acknowledged."""
    path, data = protect_volume(8 * RS, seed=13)
    replica_server.stop()
    backup = tmp_path / "replica-backup"
    shutil.copytree(replica_server.root, backup)
    replica_server.start()
    agent = start_agent("vol")
    result = _qemu_io(agent.uri(), "write -P 0x7e 130k 8k", "flush")
    assert result.returncode == 0, result.stderr
    data[130 * 1024:138 * 1024] = b"\x7e" * 8192
    assert cli("replicate", "vol", "--wait").code == 0
    agent.stop()
    replica_server.stop()
    shutil.rmtree(replica_server.root)
    shutil.copytree(backup, replica_server.root)  # the older copy, same generation
    replica_server.start()
    protected = api.protect("vol", replica_server.url, str(replica_server.token_file))
    assert protected["plan"]["mode"] == "full" and "applied records up to" in protected["plan"]["reason"], protected
    api.replicate("vol", wait=True, timeout=60)
    assert _mirror(replica_server) == bytes(data)
    assert api.verify_volume("vol")["result"] == "equal"
