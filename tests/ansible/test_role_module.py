"""drtool_role in-process: planned failover, takeover and the old primary's return on one machine.

Two "hosts", each a state root plus its own replica server (as in tests/test_roles.py); the lab
tests (tests/lab/test_failover.py) run the same steps through the playbooks over SSH.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from drtool import api
from tests.conftest import ReplicaServer, make_image, state_files

pytestmark = pytest.mark.slow

SIZE = 1 << 20  # 16 regions of 64 KiB
RS = 65536


@dataclass
class Host:
    root: Path
    server: ReplicaServer

    def args(self, **kw) -> dict:
        return {"name": "vol", "state_root": str(self.root), "token_file": str(self.server.token_file), **kw}


@pytest.fixture
def pair(tmp_path: Path):
    """Host a (primary of "vol", protected to b) and host b (its replica server holds the replica)."""
    token = tmp_path / "token"
    token.write_text("role-module-token-" + "z" * 20 + "\n")
    token.chmod(0o600)
    hosts = [Host(tmp_path / f"{n}-state", ReplicaServer(tmp_path / f"{n}-replicas", token).start()) for n in "ab"]
    a, b = hosts
    make_image(tmp_path / "a.img", SIZE, seed=8)
    api.init_volume("vol", str(tmp_path / "a.img"), "64K", root=str(a.root))
    api.protect("vol", b.server.url, str(token), root=str(a.root))
    yield a, b
    for host in hosts:
        host.server.stop(kill=True)


def managed(host: Host) -> dict:
    """What a host's status says of the volume's role, pairing, replication and maps."""
    status = api.status("vol", root=str(host.root), probe_peer=False)[0]
    return {key: status[key] for key in ("role", "device", "peer", "replication", "lag", "maps", "promoted",
                                         "demoted", "era")}


def test_planned_swap_step_by_step_with_check_mode_and_idempotence(run_module, pair):
    a, b = pair
    api.write("vol", 3 * RS, b"pending" * 100, root=str(a.root))
    before = state_files(a.root)
    check = run_module("drtool_role", a.args(state="secondary", replica_url=a.server.url), check=True, diff=True)
    assert check.changed and check["actions"] == ["demoted", "adopted"]
    assert check["lag"]["records"] == 1
    assert check["diff"]["before"]["role"] == "primary" and check["diff"]["after"] == {
        "role": "secondary", "registered": True, "adopted_by": a.server.url}
    assert state_files(a.root) == before and api.status("vol", root=str(a.root))[0]["role"] == "primary"

    demoted = run_module("drtool_role", a.args(state="secondary"))
    assert demoted.changed and demoted["actions"] == ["demoted"], demoted.data
    assert demoted["lost"] == {"records": 0, "bytes": 0, "regions": 0}
    assert not run_module("drtool_role", a.args(state="secondary")).changed
    adopted = run_module("drtool_role", a.args(state="secondary", replica_url=a.server.url + "/"))
    assert adopted["actions"] == ["adopted"] and adopted["demoted"]["adopted"]["url"] == a.server.url
    assert not run_module("drtool_role", a.args(state="secondary", replica_url=a.server.url)).changed

    check = run_module("drtool_role", b.args(state="primary", replica_url=b.server.url), check=True)
    assert check.changed and check["replica"]["state"] == "released"
    assert not (b.root / "vol").exists()
    promoted = run_module("drtool_role", b.args(state="primary", replica_url=b.server.url))
    assert promoted.changed and promoted["actions"] == ["promoted"] and not promoted["takeover"]
    assert promoted["device"] == check["replica"]["image"]
    assert api.read("vol", 3 * RS, 700, root=str(b.root)) == b"pending" * 100
    again = run_module("drtool_role", b.args(state="primary", replica_url=b.server.url))
    assert not again.changed and again["promoted"]["applied_seq"] == promoted["promoted"]["applied_seq"]
    # b was a pure secondary before: asking it for that role changed nothing.
    assert not run_module("drtool_role", {"name": "other", "state": "secondary", "state_root": str(a.root)}).changed


def test_drain_timeout_fails_and_changes_nothing(run_module, pair):
    a, b = pair
    b.server.stop(kill=True)  # nothing can be shipped
    api.write("vol", 0, b"unshipped", root=str(a.root))
    result = run_module("drtool_role", a.args(state="secondary", timeout=0.5))
    # Without an agent the drain ships itself and meets the dead peer at once; with one, it times out.
    assert result.failed and result["error"] in ("PeerUnreachable", "OperationTimeout"), result.data
    status = api.status("vol", root=str(a.root), probe_peer=False)[0]
    assert status["role"] == "primary" and status["demoted"] is None
    api.write("vol", RS, b"still writable", root=str(a.root))  # accepted: it raises if refused


def test_takeover_and_the_forced_demotion_count_the_loss(run_module, pair):
    a, b = pair
    api.write("vol", 5 * RS, b"lost" * 256, root=str(a.root))  # never shipped
    refused = run_module("drtool_role", b.args(state="primary", replica_url=b.server.url))
    assert refused.failed and "still claims" in refused["msg"] and refused["exit_code"] != 0
    assert not (b.root / "vol").exists()
    taken = run_module("drtool_role", b.args(state="primary", replica_url=b.server.url, force=True))
    assert taken.changed and taken["takeover"] and taken["promoted"]["takeover"]
    assert not run_module("drtool_role", b.args(state="primary", replica_url=b.server.url, force=True)).changed

    # a returns: it steps down without draining and counts what it lost, exactly.
    check = run_module("drtool_role", a.args(state="secondary", force=True), check=True)
    assert check["actions"] == ["demoted"] and check["lag"]["records"] == 1
    stepped = run_module("drtool_role", a.args(state="secondary", force=True, replica_url=a.server.url))
    assert stepped["actions"] == ["demoted", "adopted"]
    assert stepped["lost"] == {"records": 1, "bytes": 1024, "regions": 1, "exact": True, "after_seq": 16}
    plan = api.protect("vol", a.server.url, str(a.server.token_file), root=str(b.root), plan_only=True)["plan"]
    assert (plan["mode"], plan["regions"], plan["divergent"]) == ("incremental", 1, 1)

    # drtool_volume shows the fast failback's plan in check mode, before anything is copied, and the
    # real run copies exactly that.
    device = api.status("vol", root=str(b.root), probe_peer=False)[0]["device"]
    reverse = b.args(device=device, peer=a.server.url)
    before = managed(b)
    preview = run_module("drtool_volume", reverse, check=True)
    assert preview.changed and preview["actions"] == ["paired"], preview.data
    assert preview["plan"] == {"mode": "incremental", "regions": 1, "bytes": RS, "divergent": 1,
                               "lost": stepped["lost"]}
    # (Without an agent drtool opens the volume to plan, which checkpoints its maps: the files are
    # rewritten, what they say is not.)
    assert managed(b) == before
    paired = run_module("drtool_volume", reverse)
    assert paired.changed and paired["plan"] == preview["plan"] and paired["protect"]["regions_synced"] == 1
    assert "plan" not in run_module("drtool_volume", reverse).data  # paired: nothing to plan


def test_bad_arguments_fail_clearly(run_module, pair):
    a, b = pair
    no_url = run_module("drtool_role", b.args(state="primary"))
    assert no_url.failed and no_url["msg"] == "state is primary but all of the following are missing: replica_url"
    bad_timeout = run_module("drtool_role", a.args(state="secondary", timeout=0))
    assert bad_timeout.failed and "timeout" in bad_timeout["msg"]
    unknown = run_module("drtool_role", b.args(name="nope", state="secondary", replica_url=b.server.url))
    assert unknown.failed and "neither registered" in unknown["msg"]
    nothing = run_module("drtool_role", b.args(name="nope", state="primary", replica_url=b.server.url), check=True)
    assert nothing.failed and "holds no volume nope" in nothing["msg"]
    bad_role = run_module("drtool_role", a.args(state="tertiary"))
    assert bad_role.failed and "primary, secondary" in bad_role["msg"]
    # The option is state, like every other module's: the old name is refused, not taken silently.
    old_name = run_module("drtool_role", dict(a.args(), role="secondary"))
    assert old_name.failed and old_name["msg"] == "missing required arguments: state"


# -- a consistency group: its members change roles together -------------------------------------

MEMBERS = ["g-wal", "g-data"]


@pytest.fixture
def group_pair(tmp_path: Path):
    """Host a: the primary of g-wal and g-data, the group grp, protected to b's replica server."""
    token = tmp_path / "token"
    token.write_text("role-module-token-" + "g" * 20 + "\n")
    token.chmod(0o600)
    hosts = [Host(tmp_path / f"{n}-state", ReplicaServer(tmp_path / f"{n}-replicas", token).start()) for n in "ab"]
    a, b = hosts
    for seed, name in enumerate(MEMBERS, 20):
        make_image(tmp_path / f"{name}.img", SIZE, seed=seed)
        api.init_volume(name, str(tmp_path / f"{name}.img"), "64K", root=str(a.root))
    api.group_create("grp", MEMBERS, root=str(a.root))
    api.protect("grp", b.server.url, str(token), root=str(a.root))
    yield a, b
    for host in hosts:
        host.server.stop(kill=True)


def roles_of(host: Host) -> dict:
    return {s["volume"]: s["role"] for s in api.status(None, root=str(host.root), probe_peer=False)}


def test_group_planned_swap_moves_every_member_at_once(run_module, group_pair):
    a, b = group_pair
    api.write("g-wal", 2 * RS, b"wal record" * 10, root=str(a.root))
    api.write("g-data", 4 * RS, b"data page" * 10, root=str(a.root))
    group = {"name": "grp", "members": MEMBERS}
    # A member alone is refused by drtool, naming its group; nothing changes.
    alone = run_module("drtool_role", a.args(name="g-wal", state="secondary"))
    assert alone.failed and "in consistency group grp" in alone["msg"], alone.data
    before = state_files(a.root)
    check = run_module("drtool_role", a.args(**group, state="secondary", replica_url=a.server.url), check=True,
                       diff=True)
    assert check.changed and check["actions"] == ["demoted", "adopted"], check.data
    assert check["diff"]["after"] == {"roles": {"g-data": "secondary", "g-wal": "secondary"}}
    assert state_files(a.root) == before and roles_of(a) == {"g-wal": "primary", "g-data": "primary"}

    down = run_module("drtool_role", a.args(**group, state="secondary", replica_url=a.server.url))
    assert down.changed and down["actions"] == ["demoted", "adopted"], down.data
    assert {m: (v["role"], v["lost"]["records"]) for m, v in down["members"].items()} == {
        "g-wal": ("secondary", 0), "g-data": ("secondary", 0)}
    assert all(v["demoted"]["adopted"]["url"] == a.server.url for v in down["members"].values())
    assert not run_module("drtool_role", a.args(**group, state="secondary", replica_url=a.server.url)).changed

    check = run_module("drtool_role", b.args(**group, state="primary", replica_url=b.server.url), check=True)
    assert check.changed and {m: r["state"] for m, r in check["replica"].items()} == {
        "g-wal": "released", "g-data": "released"}, check.data
    assert not (b.root / "g-wal").exists()
    up = run_module("drtool_role", b.args(**group, state="primary", replica_url=b.server.url))
    assert up.changed and up["actions"] == ["promoted"], up.data
    assert roles_of(b) == {"g-wal": "primary", "g-data": "primary"}
    assert api.group_status("grp", root=str(b.root), probe_peer=False)["group_id"] == \
        api.group_status("grp", root=str(a.root), probe_peer=False)["group_id"]
    assert api.read("g-wal", 2 * RS, 100, root=str(b.root)) == b"wal record" * 10
    assert api.read("g-data", 4 * RS, 90, root=str(b.root)) == b"data page" * 10
    assert not run_module("drtool_role", b.args(**group, state="primary", replica_url=b.server.url)).changed


def test_group_takeover_and_the_forced_demotion_count_the_loss_per_member(run_module, group_pair):
    a, b = group_pair
    api.write("g-wal", 5 * RS, b"lost" * 256, root=str(a.root))  # never shipped
    group = {"name": "grp", "members": MEMBERS}
    refused = run_module("drtool_role", b.args(**group, state="primary", replica_url=b.server.url))
    assert refused.failed and not (b.root / "g-wal").exists(), refused.data
    taken = run_module("drtool_role", b.args(**group, state="primary", replica_url=b.server.url, force=True))
    assert taken.changed and all(v["promoted"]["takeover"] for v in taken["members"].values()), taken.data
    assert not run_module("drtool_role", b.args(**group, state="primary", replica_url=b.server.url,
                                                force=True)).changed
    stepped = run_module("drtool_role", a.args(**group, state="secondary", force=True, replica_url=a.server.url))
    assert stepped["actions"] == ["demoted", "adopted"], stepped.data
    lost = {m: (v["lost"]["records"], v["lost"]["bytes"]) for m, v in stepped["members"].items()}
    assert lost == {"g-wal": (1, 1024), "g-data": (0, 0)}, stepped["members"]
