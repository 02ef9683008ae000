"""One registry of operations (drtool.ops.OPERATIONS) serves both paths: api opening the volume
itself and the agent's control socket (issue 11: the agent's own table dropped scrub's
``record=False``, so a check-mode scrub wrote the bad map anyway).  Every registered operation
is run through a real agent here, with the arguments api sends."""

from __future__ import annotations

import pytest

from drtool import api, control, ops
from tests.conftest import corrupt, make_image

RS = 65536
REGIONS = 16
SIZE = REGIONS * RS


@pytest.fixture
def protected(tmp_path, state_root, replica_server):
    path = tmp_path / "dev.img"
    data = bytearray(make_image(path, SIZE, seed=6))
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    return path, data


def bad_map() -> list:
    return api.status("vol", probe_peer=False)[0]["maps"]["bad"]


def test_check_mode_scrub_through_the_agent_records_nothing(protected, start_agent):
    path, data = protected
    corrupt(path, 5 * RS + 7)
    start_agent("vol")
    report = api.scrub_volume("vol", record=False)
    assert report["bad_regions"] == [[5, 1]]
    assert bad_map() == []  # check mode: found, not written
    status = api.status("vol", probe_peer=False)[0]
    assert status["mode"] == "normal" and status["last_scrub"] is None
    report = api.scrub_volume("vol")
    assert report["bad_regions"] == [[5, 1]] and bad_map() == [[5, 1]]


def test_check_mode_scrub_without_an_agent_records_nothing(protected):
    path, data = protected
    corrupt(path, 5 * RS + 7)
    assert api.scrub_volume("vol", record=False)["bad_regions"] == [[5, 1]]
    assert bad_map() == []


def test_the_agent_serves_exactly_the_registered_operations(protected, start_agent):
    agent = start_agent("vol")
    socket_path = api.agent_socket("vol")
    assert socket_path
    for op in ("no-such-op", "_run", "__class__"):
        with pytest.raises(Exception, match="unknown (control )?operation"):
            control.call(socket_path, op, {})
    assert agent.proc.poll() is None


def test_every_operation_runs_through_the_agent(protected, start_agent, replica_server, tmp_path):
    """Each operation of the registry, in an order that makes sense, through the agent, with the
    arguments api sends; the results say the arguments were honoured."""
    path, data = protected
    start_agent("vol")
    socket_path = api.agent_socket("vol")
    seen: set[str] = set()

    def call(op: str, args: dict):
        seen.add(op)
        return control.call(socket_path, op, args)

    status = call("status", {"probe_peer": False})
    assert status["agent"]["running"] and status["mode"] == "normal"
    assert call("read", {"offset": RS, "length": 100}) == bytes(data[RS:RS + 100])
    written = call("write", {"offset": 2 * RS, "data": (b"w" * 10).hex(), "sync": True})
    assert written["length"] == 10 and written["synced"] is True
    data[2 * RS:2 * RS + 10] = b"w" * 10
    shown = call("configure", {"changes": {}})
    assert shown["changed"] is False
    assert call("configure", {"changes": {"copy_on_read": False}})["settings"]["copy_on_read"] is False
    era = call("checkpoint", {})["era"]
    assert era >= 2
    assert call("scan", {})["volume"] == "vol"
    corrupt(path, 7 * RS + 3)
    assert call("scrub", {"record": False})["bad_regions"] == [[7, 1]]
    assert bad_map() == []
    assert call("scrub", {"record": True})["bad_regions"] == [[7, 1]]
    assert bad_map() == [[7, 1]]
    replicated = call("replicate", {"wait": True, "regions": None, "timeout": 30.0})
    assert replicated["lag"]["regions"] == 0
    forced = call("replicate", {"wait": False, "regions": "2", "timeout": 30.0})
    assert forced["forced_regions"] == [[2, 1]]
    plan = call("protect", {"peer": replica_server.url, "token_file": str(replica_server.token_file),
                            "ca": None, "plan_only": True, "insecure": False})
    assert plan["changed"] is False and plan["plan"]["mode"] == "resume"
    recovered = call("recover", {"local_era": None, "source": None})
    assert recovered["mode"] == "degraded" and recovered["bad_count"] == 1
    assert call("read", {"offset": 7 * RS, "length": RS}) == bytes(data[7 * RS:8 * RS])
    back = call("failback", {"device": None, "rate": None})
    assert back["mode"] == "normal" and back["regions_copied"] == 1
    assert path.read_bytes() == bytes(data)
    if "verify" in ops.OPERATIONS:
        verified = call("verify", {"regions": None, "repair": False, "rate": None, "restart": False,
                                   "timeout": 60.0})
        assert verified["volume"] == "vol"
    demoted = call("demote", {"timeout": 30.0, "force": False})
    assert demoted["volume"] == "vol"
    assert call("status", {"probe_peer": False})["role"] == "secondary"
    assert seen == set(ops.OPERATIONS), "an operation of the registry is not run through the agent here"


def test_api_and_the_agent_use_the_same_registry(protected, start_agent, monkeypatch):
    """A registered operation is what both paths run: replaced in the registry, both see it."""
    calls = []
    original = ops.OPERATIONS["checkpoint"]

    def spy(engine, args, progress):
        calls.append(args)
        return original.run(engine, args, progress)

    monkeypatch.setitem(ops.OPERATIONS, "checkpoint", ops.Operation(spy, original.look_only))
    api.checkpoint("vol")
    assert len(calls) == 1
