"""What `drtool status` and `drtool group status` say of a consistency group (issue 14): its
members, its lag (the group's recovery point: the oldest write not acknowledged on any member),
whether its replica is write-order consistent and why not, and what to do."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from drtool import api, report, status
from drtool.engine import Engine
from drtool.engine.lag import group_lag
from drtool.replication import Replicator
from drtool.storage.groups import create_group
from tests.conftest import make_image

RS = 65536
REGIONS = 16


def words(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def draw(render, *args, width: int = 200, terminal: bool = True) -> str:
    out = io.StringIO()
    console = Console(file=out, width=width, highlight=False, color_system=None, force_terminal=terminal)
    render(console, *args)
    return out.getvalue()


@pytest.fixture
def pair(tmp_path, state_root, replica_server):
    """Volumes "data" and "wal", each protected by the test's replica server, and the group
    "db" of both (its definition only: no group replication is asked of the server here)."""
    for name, seed in (("data", 1), ("wal", 2)):
        path = tmp_path / f"{name}.img"
        make_image(path, REGIONS * RS, seed=seed)
        api.init_volume(name, str(path), "64K")
        api.protect(name, replica_server.url, str(replica_server.token_file))
    create_group(str(state_root), "db", ["data", "wal"])
    return state_root


def test_a_group_in_sync_is_protected_and_consistent(pair, cli):
    group = api.group_status("db", probe_peer=False)
    assert group["schema"] == "drtool.group-status/1"
    assert (group["group"], group["members"], group["role"]) == ("db", ["data", "wal"], "primary")
    assert group["protection"] == "PROTECTED" and group["consistent"] is True
    assert group["rpo_seconds"] == 0.0 and group["lag"]["records"] == 0 and group["lag"]["summary"] == "in sync"
    assert group["status"] is None and group["action"] is None and group["attention"] is False
    assert [m["volume"] for m in group["member_status"]] == ["data", "wal"]
    assert all(m["protection"] == "PROTECTED" for m in group["member_status"])
    # Every volume says which group it is in; the list stays a list of volume objects.
    listed = cli("status", "--json").json()
    assert {(s["volume"], s["group"]) for s in listed} == {("data", "db"), ("wal", "db")}
    # The same object from `drtool group status NAME --json` and `drtool status NAME --json`; they
    # ask the replica server too, which was never told of the group (each volume was protected
    # alone): the group's replica has no common write order.
    for argv in (("group", "status", "db"), ("status", "db")):
        shown = cli(*argv, "--json").json()
        assert shown["group"] == "db" and shown["members"] == ["data", "wal"]
        assert shown["consistent"] is False and "keeps no group db" in shown["consistent_reason"]
        assert shown["protection"] == "UNPROTECTED"
    everything = cli("group", "status", "--json").json()
    assert [g["group"] for g in everything] == ["db"]


def test_a_lagging_member_makes_the_group_lag_by_its_oldest_write(pair, cli):
    api.write("wal", 0, b"w" * 100)
    api.write("wal", 3 * RS, b"w" * 100)
    api.write("data", 5 * RS, b"d" * 4000)
    members = {s["volume"]: s for s in api.status(root=str(pair), probe_peer=False)}
    group = api.group_status("db", probe_peer=False)
    assert group["protection"] == "LAGGING" and group["consistent"] is True
    lag = group["lag"]
    assert lag["records"] == members["data"]["lag"]["records"] + members["wal"]["lag"]["records"] == 3
    assert lag["bytes"] == members["data"]["lag"]["bytes"] + members["wal"]["lag"]["bytes"]
    assert lag["regions"] == 3
    # The group's recovery point is its oldest unacknowledged write: wal's first one.
    assert lag["oldest_member"] == "wal"
    assert group["rpo_seconds"] >= members["data"]["lag"]["oldest_seconds"]
    assert group["status"].startswith("wal: replication lags") or group["status"].startswith("data: replication lags")
    assert group["protection_reason"].endswith(" ago, on wal")
    shown = words(draw(report.render_group, group))
    assert "protection LAGGING" in shown and "consistent yes" in shown
    assert "3 records, 3 regions" in shown and "(the oldest on wal)" in shown
    # Shipped: in sync again.
    api.replicate("data", wait=True)
    api.replicate("wal", wait=True)
    again = api.group_status("db", probe_peer=False)
    assert again["protection"] == "PROTECTED" and again["rpo_seconds"] == 0.0


def test_bitmap_mode_on_one_member_makes_the_group_inconsistent(pair, cli):
    api.write("data", 2 * RS, b"x" * 10)
    with Engine.open(str(pair), "data") as engine:
        Replicator(engine).overflow()  # its records are dropped: region 2 ships whole, out of order
    group = api.group_status("db", probe_peer=False)
    assert group["consistent"] is False
    assert group["consistent_reason"].startswith("bitmap mode on data (the log overflowed): 1 region ships whole")
    assert group["protection"] == "UNPROTECTED" and group["attention"] is True
    assert group["status"].startswith("the group's replica is not write-order consistent: bitmap mode on data")
    assert group["action"] == "drtool replicate db --wait"
    assert group["lag"]["bitmap_mode"] and group["lag"]["bitmap_regions"] == 1
    # The member's own status points at its group: it is replicated with it.
    assert api.status("data", probe_peer=False)[0]["action"] == "drtool replicate db --wait"
    plain = draw(report.render_group, group, terminal=False)
    assert "consistent  NO (bitmap mode on data" in plain
    assert "action  drtool replicate db --wait" in plain
    # The summary under `drtool status` lists the group too, with what to do.
    text = cli("status").out
    assert "CONSISTENT" in text and "db" in text and "NO" in text
    assert "group db: the group's replica is not write-order consistent" in text
    assert "action: drtool replicate db --wait" in text
    # Everything shipped: the group's replica is one write order again.
    api.replicate("data", wait=True)
    assert api.group_status("db", probe_peer=False)["consistent"] is True


def test_unpaired_member_and_unsynced_member_are_not_consistent(tmp_path, state_root, replica_server):
    for name in ("a", "b"):
        make_image(tmp_path / f"{name}.img", 4 * RS)
        api.init_volume(name, str(tmp_path / f"{name}.img"), "64K")
    api.protect("a", replica_server.url, str(replica_server.token_file))
    create_group(str(state_root), "g", ["a", "b"])
    group = api.group_status("g", probe_peer=False)
    assert group["consistent"] is False and group["consistent_reason"] == "b not replicated"
    assert group["action"] == "drtool protect g --peer URL --token-file FILE"


def test_the_server_keeps_no_such_group(pair, replica_server):
    """Probed, a replica server that never heard of the group: the members replicate one by
    one, so the group's replica has no common write order."""
    group = api.group_status("db")
    assert group["consistent"] is False
    assert group["consistent_reason"].startswith(f"the replica server at {replica_server.url} keeps no group db")
    assert group["action"] == f"drtool protect db --peer {replica_server.url}"


def test_a_member_that_cannot_be_read(pair, state_root):
    import shutil

    shutil.rmtree(state_root / "wal")
    group = api.group_status("db", probe_peer=False)
    assert group["consistent"] is False and "no status for wal" in group["consistent_reason"]
    assert group["member_status"][1]["volume"] == "wal" and "error" in group["member_status"][1]
    draw(report.render_group, group)  # renders, names the member
    assert "wal" in words(draw(report.render_group, group))


def test_group_lag_composes_the_members_lag_objects():
    data = {"records": 2, "bytes": 200, "regions": 2, "oldest_seconds": 4.0, "bitmap_mode": False,
            "bitmap_regions": 0, "summary": "2 records"}
    wal = {"records": 1, "bytes": 50, "regions": 1, "oldest_seconds": 9.5, "bitmap_mode": True,
           "bitmap_regions": 1, "summary": "1 record"}
    lag = group_lag({"data": data, "wal": wal})
    assert (lag["records"], lag["bytes"], lag["regions"], lag["oldest_seconds"]) == (3, 250, 3, 9.5)
    assert lag["bitmap_mode"] and lag["bitmap_regions"] == 1 and lag["oldest_member"] == "wal"
    assert lag["summary"].startswith("3 records, 3 regions, 250 bytes pending, oldest 9.5s; BITMAP MODE")
    idle = group_lag({"data": {**data, "records": 0, "regions": 0, "bytes": 0, "oldest_seconds": 0.0}})
    assert idle["summary"] == "in sync" and idle["oldest_member"] is None


def test_metrics_carry_the_groups_lag_and_consistency(pair):
    """The agent's collector: a group's series come from the same member status objects."""
    from drtool import metrics
    from drtool.storage.groups import load_groups

    api.write("wal", 0, b"w" * 100)
    with Engine.open(str(pair), "data") as engine:
        engine.write(2 * RS, b"x" * 10)
        Replicator(engine).overflow()
    facts = [metrics.VolumeFacts(name, lambda n=name: api.status(n, probe_peer=False)[0], None,
                                 metrics.VolumeStats()) for name in ("data", "wal")]
    collector = metrics.AgentCollector(lambda: facts, 0.0,
                                       lambda: [g.to_json() for g in load_groups(str(pair))], status.group_status)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in collector.collect() for s in family.samples}
    group = api.group_status("db", probe_peer=False)
    assert samples[("drtool_group_consistent", (("group", "db"),))] == 0.0
    assert samples[("drtool_group_lag_records", (("group", "db"),))] == group["lag"]["records"] == 1
    assert samples[("drtool_group_lag_bytes", (("group", "db"),))] == group["lag"]["bytes"]
    assert samples[("drtool_group_lag_seconds", (("group", "db"),))] > 0
    assert samples[("drtool_group_protection", (("group", "db"), ("state", "UNPROTECTED")))] == 1.0
    api.replicate("data", wait=True)
    api.replicate("wal", wait=True)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in collector.collect() for s in family.samples}
    assert samples[("drtool_group_consistent", (("group", "db"),))] == 1.0
    assert samples[("drtool_group_lag_seconds", (("group", "db"),))] == 0.0
    assert samples[("drtool_group_protection", (("group", "db"), ("state", "PROTECTED")))] == 1.0
