"""Role swaps of a consistency group between two "hosts" on this machine (issue 14): a planned
failover of a two-volume group and back, a takeover with its loss report per member and for
the group, a member refused alone, and group snapshots that are one consistent point.

Each host is a state root plus its own replica server (a real `drtool serve` subprocess), as in
tests/test_roles.py."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import pytest

from drtool import api
from drtool.errors import NotPermitted
from drtool.storage.groups import load_group
from tests.conftest import AgentProcess, Host, make_image

RS = 65536
SIZE = 32 * RS
MEMBERS = ["data", "wal"]


def grouped(a: Host, b: Host, token: str, tmp_path: Path) -> dict[str, bytearray]:
    """Host a: volumes data and wal in group db, protected as a group by b's replica server."""
    expected = {}
    for seed, name in enumerate(MEMBERS, start=5):
        image = tmp_path / f"a-{name}.img"
        expected[name] = bytearray(make_image(image, SIZE, seed=seed))
        a.call(api.init_volume, name, str(image), "64K")
    a.call(api.group_create, "db", MEMBERS)
    a.call(api.protect, "db", b.server.url, token)
    return expected


def write(host: Host, name: str, offset: int, data: bytes, expected: dict[str, bytearray]) -> None:
    host.call(api.write, name, offset, data)
    expected[name][offset:offset + len(data)] = data


def device(host: Host, name: str) -> bytes:
    return Path(host.call(api.status, name, probe_peer=False)[0]["device"]).read_bytes()


def test_a_member_cannot_change_roles_alone(hosts, tmp_path):
    a, b, token = hosts
    grouped(a, b, token, tmp_path)
    for call in (lambda: a.call(api.demote, "data", timeout=10),
                 lambda: a.call(api.demote, "wal", force=True),
                 lambda: a.call(api.adopt, "data", a.server.url, token)):
        with pytest.raises(NotPermitted, match=r"volume (data|wal) is in consistency group db: .*\(drtool "
                                               r"(demote|adopt) db\)"):
            call()
    # Nothing changed: both still take writes, both still primaries.
    a.call(api.write, "data", 0, b"still a primary")
    assert {s["role"] for s in a.call(api.status, probe_peer=False)} == {"primary"}


@pytest.mark.slow
def test_planned_failover_of_a_group_and_back(hosts, tmp_path):
    a, b, token = hosts
    expected = grouped(a, b, token, tmp_path)
    # A's members are served by A's agent, as in production: demote and adopt go through it.
    agent = AgentProcess(a.root, MEMBERS, tmp_path / "a-nbd.sock").start()
    try:
        _failover_and_back(a, b, token, tmp_path, expected, agent)
    finally:
        agent.stop(kill=True)


def _failover_and_back(a, b, token, tmp_path, expected, agent):
    group_id = load_group(str(a.root), "db").group_id
    write(a, "wal", 1 * RS, b"wal record 1" * 100, expected)
    write(a, "data", 7 * RS + 3, b"data page 1" * 100, expected)
    a.call(api.replicate, "db", wait=True)
    verified = a.call(api.verify_volume, "db")
    assert verified["group"] == "db" and verified["result"] == "equal" and verified["in_sync"]
    assert sorted(verified["members"]) == MEMBERS
    assert all(r["result"] == "equal" for r in verified["members"].values())
    write(a, "wal", 2 * RS, b"wal record 2, pending", expected)
    write(a, "data", 8 * RS, b"data page 2, pending", expected)

    # A -> B: every member demoted at one point (nothing lost), then served by A's server.
    demoted = a.call(api.demote, "db", timeout=30)
    assert demoted["group"] == "db" and demoted["changed"] and demoted["role"] == "secondary"
    assert sorted(demoted["members"]) == MEMBERS
    assert demoted["lost"] == {"records": 0, "bytes": 0, "regions": 0}
    for name in MEMBERS:
        assert demoted["members"][name]["demoted"]["lost"]["records"] == 0
        with pytest.raises(NotPermitted):
            a.call(api.write, name, 0, b"refused")
    again = a.call(api.demote, "db", timeout=30)
    assert not again["changed"]
    adopted = a.call(api.adopt, "db", a.server.url, token)
    assert adopted["changed"] and sorted(adopted["members"]) == MEMBERS
    assert all(r["left_agent"] for r in adopted["members"].values())
    assert a.call(api.agent_info)["volumes"] == []

    # B: a member alone is refused; the group is promoted whole, with A's group id.
    with pytest.raises(NotPermitted, match="consistency group db"):
        b.call(api.promote, "data", b.server.url, token)
    promoted = b.call(api.promote, "db", b.server.url, token)
    assert promoted["changed"] and not promoted["takeover"] and promoted["group_id"] == group_id
    assert load_group(str(b.root), "db").members == MEMBERS
    for name in MEMBERS:
        assert b.call(api.read, name, 0, SIZE) == bytes(expected[name])
    assert not b.call(api.promote, "db", b.server.url, token)["changed"]

    # B protects the group towards A: fast failback copies nothing; writes flow back as a group.
    b.call(api.protect, "db", a.server.url, token)
    write(b, "wal", 20 * RS, b"written on b" * 50, expected)
    write(b, "data", 21 * RS, b"page on b" * 50, expected)
    b.call(api.replicate, "db", wait=True)
    for name in MEMBERS:
        assert (tmp_path / f"a-{name}.img").read_bytes() == bytes(expected[name])  # A's devices
    status_b = b.call(api.group_status, "db")
    assert status_b["role"] == "primary" and status_b["protection"] == "PROTECTED"
    assert status_b["consistent"] is True, status_b["consistent_reason"]
    status_a = a.call(api.group_status, "db", probe_peer=False)
    assert status_a["role"] == "secondary" and status_a["consistent"] is None

    # B -> A.
    assert b.call(api.demote, "db", timeout=30)["changed"]
    b.call(api.adopt, "db", b.server.url, token)
    back = a.call(api.promote, "db", a.server.url, token)
    assert back["changed"] and back["group_id"] == group_id
    a.call(api.protect, "db", b.server.url, token)
    write(a, "data", 30 * RS, b"home again" * 10, expected)
    a.call(api.replicate, "db", wait=True)
    for name in MEMBERS:
        assert a.call(api.read, name, 0, SIZE) == bytes(expected[name])
        assert device(b, name) == bytes(expected[name])
    home = a.call(api.group_status, "db")
    assert home["role"] == "primary" and home["consistent"] is True and home["protection"] == "PROTECTED"


@pytest.mark.slow
def test_takeover_of_a_group_reports_the_loss_per_member_and_for_the_group(hosts, tmp_path):
    a, b, token = hosts
    expected = grouped(a, b, token, tmp_path)
    write(a, "wal", 3 * RS, b"replicated" * 10, expected)
    write(a, "data", 4 * RS, b"replicated" * 10, expected)
    a.call(api.replicate, "db", wait=True)
    replicated = {name: bytes(data) for name, data in expected.items()}
    lost = {"wal": [(10 * RS, b"lost wal" * 40), (11 * RS + 5, b"lost wal 2" * 40)],
            "data": [(12 * RS, b"lost page" * 30)]}
    for name, writes in lost.items():
        for offset, data in writes:
            a.call(api.write, name, offset, data)  # never shipped: the site is cut off now

    with pytest.raises(NotPermitted, match="still claims"):
        b.call(api.promote, "db", b.server.url, token)
    assert not (b.root / "@groups").exists() or "db" not in [p.stem for p in (b.root / "@groups").iterdir()]
    promoted = b.call(api.promote, "db", b.server.url, token, force=True)
    assert promoted["takeover"] and sorted(promoted["members"]) == MEMBERS
    for name in MEMBERS:
        assert b.call(api.read, name, 0, SIZE) == replicated[name]
    new = {name: bytearray(data) for name, data in replicated.items()}
    write(b, "data", 20 * RS, b"after the takeover", new)

    # The old primary returns: each member counts what it lost; the group sums them.
    demoted = a.call(api.demote, "db", force=True)
    for name, writes in lost.items():
        member = demoted["members"][name]["demoted"]["lost"]
        assert member["records"] == len(writes) and member["exact"]
        assert member["bytes"] == sum(len(d) for _, d in writes)
    assert demoted["lost"] == {"records": 3, "bytes": sum(len(d) for w in lost.values() for _, d in w),
                               "regions": 3, "exact": True}
    assert demoted["members"]["wal"]["demoted"]["divergent"] == [[10, 2]]
    a.call(api.adopt, "db", a.server.url, token)
    b.call(api.protect, "db", a.server.url, token)
    for name in MEMBERS:
        assert (tmp_path / f"a-{name}.img").read_bytes() == bytes(new[name])
    status = b.call(api.status, "data")[0]
    assert status["last_swap"]["event"] == "takeover"


# -- snapshots of a group: one consistent point ------------------------------------------------

SLOT = 512
WRITES = 200


def has(image: bytes, n: int) -> bool:
    return image[n * SLOT:n * SLOT + 8] == struct.pack(">Q", n)


@pytest.mark.slow
def test_group_snapshots_are_consistent_points(tmp_path, state_root, replica_server, start_agent):
    """A writer appends n to wal and, once that is acknowledged, n to data (the database
    pattern), while group snapshots are taken in a loop: no snapshot holds data's n without
    wal's n."""
    token = str(replica_server.token_file)
    for name in MEMBERS:
        (tmp_path / f"{name}.img").write_bytes(bytes(SIZE))
        api.init_volume(name, str(tmp_path / f"{name}.img"), "64K")
    api.group_create("db", MEMBERS)
    api.protect("db", replica_server.url, token)
    start_agent(*MEMBERS)
    done, halfway, resume = threading.Event(), threading.Event(), threading.Event()
    failure: list[BaseException] = []
    span = (WRITES + 1) * SLOT
    client = replica_server.client()

    def holds(snap: str) -> int:
        """How many of data's records the snapshot holds; fails on one without wal's."""
        wal = client.read_range("wal", 0, span, snapshot=snap)
        data = client.read_range("data", 0, span, snapshot=snap)
        broken = [n for n in range(1, WRITES + 1) if has(data, n) and not has(wal, n)]
        assert not broken, f"snapshot {snap}: data holds {broken[:5]} without wal's"
        return sum(has(data, n) for n in range(1, WRITES + 1))

    def writer() -> None:
        try:
            for n in range(1, WRITES + 1):
                api.write("wal", n * SLOT, struct.pack(">Q", n))
                api.write("data", n * SLOT, struct.pack(">Q", n))
                if n == WRITES // 2:
                    # Halfway, until a snapshot caught some of it: one snapshot at least is
                    # neither empty nor complete, whatever the machine's speed.
                    halfway.set()
                    resume.wait(60)
        except BaseException as exc:  # the test fails below with it
            failure.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    taken: list[str] = []
    try:
        while not done.is_set() or len(taken) < 3:
            name = f"s{len(taken)}"
            created = api.snapshot("create", "db", name)
            assert created["group"] == "db" and created["members"] == MEMBERS
            taken.append(name)
            if halfway.is_set() and not resume.is_set() and holds(name):
                resume.set()
    finally:
        resume.set()
        thread.join(60)
    assert not failure, failure
    api.replicate("db", wait=True)
    api.snapshot("create", "db", "final")
    taken.append("final")
    counts = [holds(snap) for snap in taken]
    assert any(0 < count < WRITES for count in counts), counts
    assert counts[-1] == WRITES  # the last, after the writer, holds everything
    listed = api.snapshot("list", "db")
    assert set(taken) <= set(listed["snapshots"])
    deleted = api.snapshot("delete", "db", "s0")
    assert deleted["members"] == MEMBERS
    assert "s0" not in api.snapshot("list", "db")["snapshots"]


@pytest.mark.slow
def test_the_agent_serving_a_group_demotes_it_whole(tmp_path, state_root, replica_server, start_agent, cli):
    """Through the agent: every member stops taking writes, is drained and released at once."""
    token = str(replica_server.token_file)
    expected = {}
    for seed, name in enumerate(MEMBERS, start=1):
        expected[name] = bytearray(make_image(tmp_path / f"{name}.img", SIZE, seed=seed))
        api.init_volume(name, str(tmp_path / f"{name}.img"), "64K")
    api.group_create("db", MEMBERS)
    api.protect("db", replica_server.url, token)
    start_agent(*MEMBERS)
    for n in range(20):
        for name in MEMBERS:
            offset = (n % 30) * RS + n * 7
            api.write(name, offset, bytes([n]) * 3000)
            expected[name][offset:offset + 3000] = bytes([n]) * 3000
    # The CLI by group name: verify every member, a group snapshot (the agent keeps shipping).
    assert api.replicate("db", wait=True)
    verified = cli("verify", "db")
    assert verified.code == 0 and "group db: replica EQUAL" in verified.out
    assert "volume data  replica EQUAL" in verified.out and "volume wal  replica EQUAL" in verified.out
    created = cli("snapshot", "create", "db", "before-swap")
    assert created.code == 0 and "snapshot before-swap of group db (data, wal) created" in created.out
    listed = cli("snapshot", "list", "db", "--json").json()
    assert listed["snapshots"] == ["before-swap"] and sorted(listed["members"]) == MEMBERS
    demoted = api.demote("db", timeout=30)
    assert demoted["changed"] and demoted["lost"] == {"records": 0, "bytes": 0, "regions": 0}
    client = replica_server.client()
    for name in MEMBERS:
        assert demoted["members"][name]["role"] == "secondary"
        assert client.volume_info(name)["state"] == "released"
        assert client.read_range(name, 0, SIZE) == bytes(expected[name])
        with pytest.raises(NotPermitted):
            api.write(name, 0, b"refused")
    assert api.group_status("db", probe_peer=False)["role"] == "secondary"


def test_a_demotion_that_cannot_drain_changes_nothing(tmp_path, state_root, replica_server, cli):
    """The replica server is gone: the group is not demoted, every member takes writes again."""
    for seed, name in enumerate(MEMBERS, start=1):
        make_image(tmp_path / f"{name}.img", SIZE, seed=seed)
        api.init_volume(name, str(tmp_path / f"{name}.img"), "64K")
    api.group_create("db", MEMBERS)
    api.protect("db", replica_server.url, str(replica_server.token_file))
    api.write("wal", 0, b"pending")
    replica_server.stop(kill=True)
    result = cli("demote", "db", "--timeout", "2")
    assert result.code != 0
    assert "group db was not demoted and accepts writes again" in result.err
    for name in MEMBERS:
        status = api.status(name, probe_peer=False)[0]
        assert status["role"] == "primary" and status["demoted"] is None
        api.write(name, RS, b"accepted")
