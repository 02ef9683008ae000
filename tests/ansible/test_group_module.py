"""drtool_group in-process against drtool's API (real volumes, a real replica server): created,
members changed, protected as a group, deleted; check mode, diff and a second run that changes
nothing.  drtool_status_info's groups.  drtool_role with a group's members, against a stand-in that
records what it asks (tests/ansible/test_role_module.py swaps a group with drtool's real API).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.ansible.conftest import MODULE_UTILS_NAME, load_module
from tests.conftest import make_image, state_files

SIZE = 1 << 20


@pytest.fixture
def site(tmp_path: Path, replica_server, run_module) -> SimpleNamespace:
    """Three volumes registered under one state root, not paired."""
    root = str(tmp_path / "state")
    for seed, name in enumerate(("db-wal", "db-data", "logs")):
        make_image(tmp_path / f"{name}.img", SIZE, seed=seed + 1)
        result = run_module("drtool_volume", {"name": name, "device": str(tmp_path / f"{name}.img"), "state_root": root})
        assert result.changed, result.data
    return SimpleNamespace(root=root, base=tmp_path, peer=replica_server.url,
                           token_file=str(replica_server.token_file))


def group_args(site: SimpleNamespace, **extra: Any) -> dict[str, Any]:
    return {"name": "db", "members": ["db-wal", "db-data"], "state_root": site.root, **extra}


def peers(site: SimpleNamespace) -> dict[str, Any]:
    from drtool import api

    return {s["volume"]: (s.get("peer") or {}).get("url") for s in api.status(None, root=site.root, probe_peer=False)}


def test_group_is_created_protected_then_unchanged(run_module, site):
    args = group_args(site, peer=site.peer, token_file=site.token_file)
    files = state_files(Path(site.root))
    check = run_module("drtool_group", args, check=True, diff=True)
    assert check.changed and check["actions"] == ["created", "protected"], check.data
    assert check["diff"]["before"] == {"exists": False, "members": [], "peer": None}
    assert check["diff"]["after"] == {"exists": True, "members": ["db-data", "db-wal"], "peer": site.peer}
    assert state_files(Path(site.root)) == files and peers(site) == {"db-wal": None, "db-data": None, "logs": None}

    first = run_module("drtool_group", args, diff=True)
    assert first.changed and first["actions"] == ["created", "protected"], first.data
    assert (first["exists"], first["members"], first["peer"]) == (True, ["db-data", "db-wal"], site.peer)
    assert first["diff"]["after"] == check["diff"]["after"]
    assert {m: (plan["mode"], plan["regions"]) for m, plan in first["plan"].items()} == {
        "db-wal": ("full", 16), "db-data": ("full", 16)}, first["plan"]
    # Protected as a group: every member paired with the peer; the volume outside the group is not.
    assert peers(site) == {"db-wal": site.peer, "db-data": site.peer, "logs": None}
    # The replica server keeps the group with both members: their writes come as group transactions.
    from drtool import api

    status = api.group_status("db", root=site.root)
    assert (status["consistent"], sorted((status["server"] or {}).get("members", []))) == (True, ["db-data", "db-wal"]), status

    again = run_module("drtool_group", args)
    assert not again.changed and again["actions"] == [], again.data
    assert run_module("drtool_group", args, check=True).changed is False


def test_group_protection_is_planned_in_check_mode_before_anything_is_copied(run_module, site, replica_server):
    assert run_module("drtool_group", group_args(site)).changed  # defined, not protected
    args = group_args(site, peer=site.peer, token_file=site.token_file)
    check = run_module("drtool_group", args, check=True)
    assert check.changed and check["actions"] == ["protected"], check.data
    assert {m: (plan["mode"], plan["regions"]) for m, plan in check["plan"].items()} == {
        "db-wal": ("full", 16), "db-data": ("full", 16)}, check["plan"]
    assert peers(site) == {"db-wal": None, "db-data": None, "logs": None}
    done = run_module("drtool_group", args)
    assert done["plan"] == check["plan"] and done["actions"] == ["protected"]
    assert "plan" not in run_module("drtool_group", args).data  # protected: nothing to plan


def test_group_members_follow_the_list(run_module, site):
    assert run_module("drtool_group", group_args(site)).changed
    args = group_args(site, members=["db-wal", "logs"])
    check = run_module("drtool_group", args, check=True, diff=True)
    assert check.changed and check["actions"] == ["members added", "members removed"]
    assert (check["added"], check["removed"]) == (["logs"], ["db-data"])
    assert check["diff"]["before"]["members"] == ["db-data", "db-wal"]
    assert check["diff"]["after"]["members"] == ["db-wal", "logs"]
    from drtool.storage.groups import load_group

    assert sorted(load_group(site.root, "db").members) == ["db-data", "db-wal"]
    done = run_module("drtool_group", args)
    assert done.changed and done["members"] == ["db-wal", "logs"]
    assert sorted(load_group(site.root, "db").members) == ["db-wal", "logs"]
    assert not run_module("drtool_group", args).changed


def test_group_absent_deletes_once_and_keeps_the_volumes(run_module, site):
    assert run_module("drtool_group", group_args(site, peer=site.peer, token_file=site.token_file)).changed
    absent = {"name": "db", "state": "absent", "state_root": site.root}
    check = run_module("drtool_group", absent, check=True, diff=True)
    assert check.changed and check["actions"] == ["deleted"]
    assert check["diff"]["before"]["members"] == ["db-data", "db-wal"] and check["diff"]["after"]["exists"] is False
    from drtool.storage.groups import list_groups

    assert list_groups(site.root) == ["db"]
    assert run_module("drtool_group", absent).changed
    assert list_groups(site.root) == []
    assert peers(site) == {"db-wal": site.peer, "db-data": site.peer, "logs": None}  # still paired, each alone
    assert not run_module("drtool_group", absent).changed


def test_group_bad_arguments_fail_before_anything_changes(run_module, site):
    from drtool.storage.groups import list_groups

    missing = run_module("drtool_group", {"name": "db", "state_root": site.root})
    assert missing.failed and "members" in missing["msg"] and "state is present" in missing["msg"]
    twice = run_module("drtool_group", group_args(site, members=["db-wal", "db-wal"]))
    assert twice.failed and "each once" in twice["msg"]
    empty = run_module("drtool_group", group_args(site, members=[]))
    assert empty.failed and "at least one volume" in empty["msg"]
    unknown = run_module("drtool_group", group_args(site, members=["db-wal", "nope"]))
    assert unknown.failed and "volume nope is not registered" in unknown["msg"]
    assert list_groups(site.root) == []


def test_group_drtool_errors_become_fail_json(run_module, site):
    assert run_module("drtool_group", group_args(site)).changed
    # A volume belongs to one group: drtool refuses, the module reports drtool's message and exit code.
    other = run_module("drtool_group", {"name": "db2", "members": ["db-wal"], "state_root": site.root})
    assert other.failed and "already in group db" in other["msg"] and other["exit_code"] != 0, other.data
    bad = run_module("drtool_group", {"name": "bad/name", "members": ["db-wal"], "state_root": site.root})
    assert bad.failed and "is not valid" in bad["msg"] and bad["exit_code"] == 2


def test_status_info_reports_the_groups_when_asked_and_changes_nothing(run_module, site):
    assert run_module("drtool_group", group_args(site)).changed
    files = state_files(Path(site.root))
    plain = run_module("drtool_status_info", {"state_root": site.root, "probe_peer": False})
    assert not plain.changed and plain["groups"] == [] and sorted(plain["names"]) == ["db-data", "db-wal", "logs"]
    for check in (False, True):
        asked = run_module("drtool_status_info", {"state_root": site.root, "probe_peer": False, "groups": True},
                           check=check)
        assert not asked.changed and [g["group"] for g in asked["groups"]] == ["db"], asked.data
        assert sorted(asked["groups"][0]["members"]) == ["db-data", "db-wal"]
    assert state_files(Path(site.root)) == files


# -- drtool_role with a group's members ----------------------------------------------------------


class SwapStandIn:
    """drtool.api's role operations on a group, as GROUPS.md has them (every member at once), over
    member statuses kept here: what drtool_role asks and in which order, not drtool's swap itself
    (tests/lab/test_failover.py runs that)."""

    def __init__(self, roles: dict[str, str | None]) -> None:
        self.roles = dict(roles)  # member -> "primary" | "secondary" | None (not registered)
        self.adopted: dict[str, str | None] = {m: None for m in roles}
        self.calls: list[tuple] = []

    def status(self, name: str, root: str | None = None, probe_peer: bool = True) -> list[dict[str, Any]]:
        from drtool.errors import VolumeNotFound

        if self.roles.get(name) is None:
            raise VolumeNotFound(name, root or "/state")
        demoted = {"adopted": {"url": self.adopted[name]} if self.adopted[name] else None, "lost": {"records": 0}}
        return [{"volume": name, "role": self.roles[name], "lag": {"records": 1},
                 "demoted": demoted if self.roles[name] == "secondary" else None,
                 "promoted": {"takeover": True} if self.roles[name] == "primary" else None}]

    def demote(self, name: str, timeout: float = 60.0, force: bool = False, root: str | None = None) -> dict:
        self.calls.append(("demote", name, force))
        self.roles = {m: "secondary" for m in self.roles}
        return {"group": name}

    def adopt(self, name: str, url: str, *args: Any, **kwargs: Any) -> dict:
        self.calls.append(("adopt", name, url))
        self.adopted = {m: url for m in self.roles}
        return {"group": name}

    def promote(self, name: str, url: str, *args: Any, force: bool = False, **kwargs: Any) -> dict:
        self.calls.append(("promote", name, force))
        self.roles = {m: "primary" for m in self.roles}
        return {"group": name}

    def replica_info(self, name: str, url: str, **kwargs: Any) -> dict:
        return {"state": "replica", "applied_seq": 7}


@pytest.fixture
def swap(monkeypatch: pytest.MonkeyPatch):
    import sys

    load_module("drtool_role")

    def make(roles: dict[str, str | None]) -> SwapStandIn:
        stand_in = SwapStandIn(roles)
        monkeypatch.setattr(sys.modules[MODULE_UTILS_NAME], "drtool_api", stand_in)
        return stand_in

    return make


MEMBERS = ["db-wal", "db-data"]


def test_role_group_steps_down_as_one_then_is_done(run_module, swap):
    api = swap({"db-wal": "primary", "db-data": "primary"})
    args = {"name": "db", "members": MEMBERS, "state": "secondary", "replica_url": "https://a:8470"}
    check = run_module("drtool_role", args, check=True, diff=True)
    assert check.changed and check["actions"] == ["demoted", "adopted"] and api.calls == []
    assert check["diff"]["after"] == {"roles": {"db-data": "secondary", "db-wal": "secondary"}}
    done = run_module("drtool_role", args)
    # One demotion and one adoption of the group, never of a member alone.
    assert done.changed and api.calls == [("demote", "db", False), ("adopt", "db", "https://a:8470")]
    assert {m: v["role"] for m, v in done["members"].items()} == {"db-data": "secondary", "db-wal": "secondary"}
    assert not run_module("drtool_role", args).changed and len(api.calls) == 2


def test_role_group_takes_over_as_one_then_is_done(run_module, swap):
    api = swap({"db-wal": None, "db-data": None})
    args = {"name": "db", "members": MEMBERS, "state": "primary", "force": True, "replica_url": "https://b:8470"}
    check = run_module("drtool_role", args, check=True)
    assert check.changed and check["replica"]["db-wal"] == {"state": "replica", "applied_seq": 7, "primary": None,
                                                             "promoted": None}
    assert api.calls == []
    done = run_module("drtool_role", args)
    assert done.changed and api.calls == [("promote", "db", True)]
    assert all(v["role"] == "primary" and v["promoted"]["takeover"] for v in done["members"].values())
    assert not run_module("drtool_role", args).changed and len(api.calls) == 1


def test_role_group_half_swapped_is_finished(run_module, swap):
    # One member promoted, the other not (an interrupted run): the group is promoted again, as one.
    api = swap({"db-wal": "primary", "db-data": None})
    done = run_module("drtool_role", {"name": "db", "members": MEMBERS, "state": "primary",
                                      "replica_url": "https://b:8470"})
    assert done.changed and api.calls == [("promote", "db", False)]


def test_role_group_members_named_twice_fail(run_module, swap):
    swap({"db-wal": "primary"})
    result = run_module("drtool_role", {"name": "db", "members": ["db-wal", "db-wal"], "state": "secondary"})
    assert result.failed and "each once" in result["msg"]
